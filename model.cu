// model.cu — the model behind the binaries: creation, the training step
// (gradient accumulation, clipping, AdamW, expert-bias update), evaluation and
// sampling, on the CPU reference (reference.h) or, once model_to_gpu has run, on
// the CUDA path in the second half of this file. Checkpoints are checkpoint.cpp.
#include "model.h"

#include <algorithm>

void model_create(Model& m, const Config& c, uint64_t seed) {
    config_check(c);  // before sizing anything from it
    const double need = (double)param_layout(c).total * 4 * sizeof(float), have = host_memory_bytes();
    if (need > have)
        fail("the model needs %.1f GiB of host memory (fp32 weights, gradients and AdamW's two moments); this machine has %.1f GiB",
             need / (1 << 30), have / (1 << 30));
    ref_init(m.ref, c);
    ref_init_weights(m.ref, seed);
    m.adam_m.assign(m.ref.layout.total, 0);
    m.adam_v.assign(m.ref.layout.total, 0);
    m.tokenizer = tokenizer_bytes();
    m.expert_load.assign(c.total_layers(), std::vector<int64_t>(c.n_routed_experts, 0));
}

// dropout and balance-loss settings of one micro-step; the dropout key depends on
// (seed, step, micro-step) only, so a resumed run draws the same masks. With several
// ranks the micro-step is counted over the whole step in the loader's order (rank r's
// k-th micro-batch is the step's (k * world + r)-th window), so that the ranks draw
// different masks, those of one rank with grad_accum x world micro-batches.
static StepOptions micro_step_options(const TrainOptions& o, int step, const DataLoader& loader, int micro) {
    StepOptions opt;
    opt.dropout = o.dropout;
    opt.attn_dropout = o.attn_dropout;
    opt.balance_alpha = o.balance_alpha;
    opt.mtp_lambda = o.mtp_lambda;
    const uint64_t per_step = (uint64_t)o.grad_accum * loader.world, index = (uint64_t)micro * loader.world + loader.rank;
    opt.dropout_key = mix64(o.seed ^ mix64((uint64_t)step * per_step + index));
    return opt;
}

static StepStats gpu_train_step(Model& m, DataLoader& loader, const TrainOptions& o, int step);
static double gpu_eval_window(Model& m, const std::vector<int>& inputs, const std::vector<int>& targets, int rows, int len, MtpEval* mtp);

StepStats model_train_step(Model& m, DataLoader& loader, const TrainOptions& o, int step) {
    if (m.gpu) return gpu_train_step(m, loader, o, step);
    const Config& c = m.ref.cfg;
    std::fill(m.ref.grads.begin(), m.ref.grads.end(), 0.0f);
    std::vector<std::vector<int64_t>> load(c.total_layers(), std::vector<int64_t>(c.n_routed_experts, 0));
    std::vector<int> inputs, targets;
    StepStats s{0, 0, 0, 0, 0};
    for (int micro = 0; micro < o.grad_accum; micro++) {
        dataloader_next(loader, inputs, targets);
        ref_forward(m.ref, inputs.data(), targets.data(), o.batch_size, o.seq_len, micro_step_options(o, step, loader, micro));
        ref_backward(m.ref, 1.0f / o.grad_accum);
        s.loss += m.ref.ce_loss / o.grad_accum;
        s.balance_loss += m.ref.balance_loss / o.grad_accum;
        s.mtp_loss += m.ref.mtp_loss / o.grad_accum;
        for (int l = 0; l < c.total_layers(); l++)
            for (int e = 0; e < c.n_routed_experts; e++) load[l][e] += m.ref.expert_load[l][e];
    }
    s.grad_norm = grad_norm(m.ref.layout, m.ref.grads.data());
    s.lr = learning_rate(o.optim, step);
    if (!std::isfinite(s.grad_norm)) return s;  // a NaN or inf gradient: the step is skipped, as the GPU's kernels skip it
    adamw_update(m.ref.layout, m.ref.params.data(), m.ref.grads.data(), m.adam_m.data(), m.adam_v.data(), o.optim, s.lr, step + 1, s.grad_norm);
    if (o.optim.bias_update_speed > 0) expert_bias_update(c, m.ref.w, load, o.optim.bias_update_speed);
    for (int l = 0; l < c.total_layers(); l++)
        for (int e = 0; e < c.n_routed_experts; e++) m.expert_load[l][e] += load[l][e];
    return s;
}

// mean loss of rows x len tokens on the CPU reference; mtp: the module's means over the window (MtpEval), as
// gpu_eval_window's
static double ref_eval_window(RefModel<float>& r, const std::vector<int>& inputs, const std::vector<int>& targets, int rows, int len,
                              MtpEval* mtp) {
    const double loss = ref_forward(r, inputs.data(), targets.data(), rows, len, StepOptions{});
    if (mtp) {  // the reference ran the module too (ref_forward with targets)
        *mtp = MtpEval{};
        mtp->predictions = mtp_acceptance(r.probs.data(), r.mtp.probs.data(), r.logits.data(), r.mtp.logits.data(), r.mtp.targets.data(), rows * len,
                                          r.cfg.vocab_size, mtp->accepted_sampled, mtp->accepted_greedy);
        mtp->loss = r.mtp_loss;
        if (mtp->predictions > 0)
            for (double* x : {&mtp->accepted_sampled, &mtp->accepted_greedy}) *x /= (double)mtp->predictions;
    }
    return loss;
}

double model_eval_loss(Model& m, const std::vector<int>& tokens, int seq_len, int batch_size, MtpEval* mtp) {
    if (m.ref.cfg.num_nextn_predict_layers == 0) mtp = nullptr;
    if (mtp) *mtp = MtpEval{};
    if (tokens.size() < 2) fail("evaluation needs at least 2 tokens, got %zu", tokens.size());
    const size_t predictions = tokens.size() - 1;
    double total = 0;
    std::vector<int> inputs, targets;
    // full windows go in batches; the last partial window runs on its own
    size_t start = 0;
    while (start < predictions) {
        size_t len = std::min((size_t)seq_len, predictions - start);
        int rows = 1;
        if (len == (size_t)seq_len)
            while (rows < batch_size && start + (size_t)(rows + 1) * seq_len <= predictions) rows++;
        inputs.assign(tokens.begin() + start, tokens.begin() + start + rows * len);
        targets.assign(tokens.begin() + start + 1, tokens.begin() + start + 1 + rows * len);
        MtpEval window;
        const double mean = m.gpu ? gpu_eval_window(m, inputs, targets, rows, (int)len, mtp ? &window : nullptr)
                                  : ref_eval_window(m.ref, inputs, targets, rows, (int)len, mtp ? &window : nullptr);
        total += mean * (double)(rows * len);
        if (mtp) {  // the windows' means, weighted by their predictions
            const double n = (double)window.predictions;
            mtp->loss += window.loss * n;
            mtp->accepted_sampled += window.accepted_sampled * n;
            mtp->accepted_greedy += window.accepted_greedy * n;
            mtp->predictions += window.predictions;
        }
        start += rows * len;
    }
    if (mtp && mtp->predictions > 0)
        for (double* x : {&mtp->loss, &mtp->accepted_sampled, &mtp->accepted_greedy}) *x /= (double)mtp->predictions;
    return total / (double)predictions;
}

static void gpu_logits(Model& m, const std::vector<int>& tokens);

const std::vector<float>& model_logits(Model& m, const std::vector<int>& tokens) {
    if (m.gpu) gpu_logits(m, tokens);
    else ref_forward(m.ref, tokens.data(), nullptr, 1, (int)tokens.size(), StepOptions{});
    return m.ref.logits;
}

// The tokens sample_token may draw, most likely first (ties: the lower id first, so a fixed seed repeats
// exactly), with their unnormalised weights p and sum; returns how many there are (>= 1). Not greedy.
static int sampling_kept(const float* logits, int V, const SamplingOptions& s, std::vector<int>& order, std::vector<double>& p,
                         double& sum) {
    order.resize(V);
    for (int i = 0; i < V; i++) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
    int keep = (s.top_k > 0 && s.top_k < V) ? s.top_k : V;
    p.resize(keep);
    sum = 0;
    for (int i = 0; i < keep; i++) sum += (p[i] = std::exp((double)(logits[order[i]] - logits[order[0]]) / s.temperature));
    if (s.top_p < 1) {
        // the smallest prefix whose mass reaches top_p
        double mass = 0;
        int n = 0;
        while (n < keep && mass < s.top_p * sum) mass += p[n++];
        keep = std::max(n, 1);
        sum = mass;
    }
    return keep;
}

static void check_finite(const float* logits, int V) {
    for (int i = 0; i < V; i++)
        if (!std::isfinite(logits[i])) fail("the model's logits are not finite (logit %d is %g): its weights overflowed or hold NaN", i, logits[i]);
}

int sample_token(const float* logits, int V, const SamplingOptions& s, float coin) {
    check_finite(logits, V);
    if (s.temperature <= 0) return (int)(std::max_element(logits, logits + V) - logits);
    std::vector<int> order;
    std::vector<double> p;
    double sum;
    const int keep = sampling_kept(logits, V, s, order, p, sum);
    double target = coin * sum, acc = 0;
    for (int i = 0; i < keep; i++) {
        acc += p[i];
        if (target < acc) return order[i];
    }
    return order[keep - 1];
}

void sampling_probs(std::vector<double>& probs, const float* logits, int V, const SamplingOptions& s) {
    check_finite(logits, V);
    probs.assign(V, 0);
    if (s.temperature <= 0) {
        probs[std::max_element(logits, logits + V) - logits] = 1;
        return;
    }
    std::vector<int> order;
    std::vector<double> p;
    double sum;
    const int keep = sampling_kept(logits, V, s, order, p, sum);
    for (int i = 0; i < keep; i++) probs[order[i]] = p[i] / sum;
}

int sample_probs(const std::vector<double>& probs, float coin) {
    double sum = 0;
    for (double q : probs) sum += q;
    double target = coin * sum, acc = 0;
    int last = -1;
    for (int i = 0; i < (int)probs.size(); i++) {
        if (probs[i] <= 0) continue;
        acc += probs[i];
        last = i;
        if (target < acc) return i;
    }
    if (last < 0) fail("sample_probs: the distribution has no mass");
    return last;
}

// ----------------------------------------------------------------------------
// The CUDA training path. The same step as model_train_step's CPU loop, layer by
// layer with the kernels of kernels.cuh, mla.cuh and moe.cuh and cuBLASLt GEMMs:
// bf16 weights and activations, fp32 weight gradients, master weights and AdamW
// moments. Nothing waits for the host inside a step; the loss, the gradient norm
// and the expert loads come back once per step, for logging. The device state
// (GpuModel) is declared in gpu_model.cuh. On several GPUs (dist.h: data parallel,
// ZeRO-1) the step's last micro-batch reduce-scatters each bucket of gradients as the
// backward finishes it (gpu_backward_point), and the step ends with the group's norm,
// loads and loss (gpu_reduce_step_stats), AdamW on this rank's slices and an all-gather
// of the bf16 weights (gpu_gather_weights).
#include "gpu_model.cuh"

size_t model_gpu_bytes(const Model& m) { return m.gpu ? m.gpu->arena.bytes + m.gpu->ctx.mm.workspace_bytes : 0; }

bool gpu_available() {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

// The activations, temporaries and scratch of a step over B sequences of T tokens
// (training: their gradients too), in gpu.arena; with a planning arena, their size.
// fp8_width > 0 (FP8 training): room for the FP8 copies (GpuContext::fp8_codes) of rows that wide, and each layer
// keeps its SwiGLU inputs as E4M3 copies (FfnActsGpu::gate_up_fp8), their bf16 forms passing through the backward's
// buffers, which the forward leaves free.
static void gpu_alloc_step_buffers(GpuModel& gpu, const Config& c, int B, int T, bool inference, size_t scratch, int fp8_width) {
    const int N = B * T, D = c.hidden_size, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank, V = c.vocab_size;
    const int E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.intermediate_size, MI = c.moe_intermediate_size;
    const int SI = c.n_shared_experts * MI, S = N * K;
    DeviceArena& arena = gpu.arena;
    auto acts = [&](size_t n) { return arena_alloc<bf16>(arena, n, "activations"); };
    auto acts32 = [&](size_t n) { return arena_alloc<float>(arena, n, "activations"); };
    auto grads = [&](size_t n) { return inference ? nullptr : arena_alloc<bf16>(arena, n, "gradients"); };
    gpu.load = arena_alloc<int>(arena, (size_t)std::max(1, gpu.moe_layers) * std::max(1, E), "expert loads");

    // the temporaries every layer shares; the SwiGLU buffers serve the dense FFN
    // [N, I], the routed experts [S, MI] and the shared experts [N, SI] alike
    const size_t hidden = std::max({(size_t)N * I, (size_t)S * MI, (size_t)N * SI});
    const size_t gate_up = std::max({(size_t)N * 2 * I, (size_t)S * 2 * MI, (size_t)N * 2 * SI});
    const FfnActsGpu ffn{nullptr, acts(hidden), grads(gate_up), grads(hidden)};
    const MlaActsGpu mla = mla_shared_alloc(arena, c, N, !inference);
    const MoeActsGpu moe = E > 0 ? moe_shared_alloc(arena, c, N, ffn, !inference) : MoeActsGpu{};
    if (E > 0 && !inference) gpu.dscores = arena_alloc<float>(arena, (size_t)N * E, "gradients");
    // the MTP module's block, when the model has one, is one more layer (decoding's prefill runs it too)
    const int blocks = c.total_layers();
    gpu.layers.resize(blocks);
    for (int l = 0; l < blocks; l++) {
        GpuLayer& a = gpu.layers[l];
        a.res_in = acts32((size_t)N * D);
        a.xn = acts((size_t)N * D);
        a.rstd1 = acts32(N);
        a.res_mid = acts32((size_t)N * D);
        a.xn2 = acts((size_t)N * D);
        a.rstd2 = acts32(N);
        a.attn = mla_layer_alloc(arena, c, N, mla);
        if (!c.is_moe_layer(l)) {
            a.ffn = ffn;
            gate_up_alloc(arena, &a.ffn.gate_up, &a.ffn.gate_up_fp8, ffn.dgate_up, N, 2 * I, fp8_width > 0);
            continue;
        }
        a.moe = moe_layer_alloc(arena, c, B, T, moe, fp8_width > 0);
    }
    gpu.tokens = arena_alloc<int>(arena, N, "tokens");
    gpu.targets = arena_alloc<int>(arena, N, "targets");
    gpu.emb = acts((size_t)N * D);
    gpu.h_final = acts32((size_t)N * D);
    gpu.hn = acts((size_t)N * D);
    gpu.branch = acts((size_t)N * D);
    gpu.hn_rstd = acts32(N);
    gpu.logits = arena_alloc<bf16>(arena, (size_t)N * V, "logits");
    gpu.losses = arena_alloc<float>(arena, N, "losses");
    gpu.ce_scale = arena_alloc<float>(arena, 1, "scalars");
    gpu.step_loss = arena_alloc<float>(arena, 1, "scalars");
    gpu.balance_loss = arena_alloc<float>(arena, std::max(1, gpu.moe_layers), "scalars");
    gpu.norm2 = arena_alloc<float>(arena, 1, "scalars");
    if (!inference) {
        gpu.dres = arena_alloc<float>(arena, (size_t)N * D, "gradients");
        gpu.dbranch = grads((size_t)N * D);
        gpu.dxn = grads((size_t)N * D);
    }
    if (blocks > c.num_hidden_layers) {
        MtpGpu& mtp = gpu.mtp;
        mtp.ids = arena_alloc<int>(arena, N, "tokens");
        mtp.targets = arena_alloc<int>(arena, N, "targets");
        mtp.emb = acts((size_t)N * D);
        mtp.normed = acts((size_t)N * D);
        mtp.cat = acts((size_t)N * 2 * D);
        mtp.h = acts((size_t)N * D);
        mtp.en_rstd = acts32(N);
        mtp.hh_rstd = acts32(N);
        mtp.h_final = acts32((size_t)N * D);
        mtp.z = acts((size_t)N * D);
        mtp.z_rstd = acts32(N);
        mtp.losses = arena_alloc<float>(arena, N, "losses");
        mtp.ce_scale = arena_alloc<float>(arena, 1, "scalars");
        mtp.step_loss = arena_alloc<float>(arena, 1, "scalars");
        mtp.dhn = grads((size_t)N * D);
        mtp.dcat = grads((size_t)N * 2 * D);
    }
    GpuContext& ctx = gpu.ctx;
    ctx.scratch_bytes = std::max({scratch, embedding_backward_scratch_bytes(N, D, V), rmsnorm_backward_scratch_bytes(N, std::max({D, dc, qr})),
                                  grad_norm_scratch_bytes(gpu.num_chunks), attention_backward_scratch_floats(B, T, H) * sizeof(float)});
    ctx.scratch = arena_alloc<char>(arena, ctx.scratch_bytes, "scratch");
    if (fp8_width > 0) {
        ctx.fp8_code_bytes = (size_t)(N + 3) / 4 * 4 * fp8_width;
        ctx.fp8_scale_floats = fp8_scale_count(N, fp8_width, 1);
        ctx.fp8_codes = arena_alloc<uint8_t>(arena, ctx.fp8_code_bytes, "FP8 activations");
        ctx.fp8_scales = arena_alloc<float>(arena, ctx.fp8_scale_floats, "FP8 activations");
    }
}

void model_to_gpu(Model& m, int B, int T, bool inference, const DistGroup& dist) {
    const Config& c = m.ref.cfg;
    if (c.n_routed_experts > 0) router_check(c);
    if (!gpu_available()) fail("--device gpu: no CUDA device is available");
    const bool fp8 = !m.ref.fp8.empty();  // FP8 (ref_enable_fp8): the E4M3 copies of w, made here and after each optimizer step
    const bool wgrad = fp8 && m.ref.fp8[0].wgrad;
    if (fp8) {                                 // cuBLASLt's FP8 GEMM takes rows in fours (the forward pads) and
        if (!inference && B * T % (wgrad ? 16 : 4))  // K in sixteens: Dgrad reads dout as it is, FP8 Wgrad contracts over N
            fail("--fp8%s: batch size x sequence length (%d) must be a multiple of %d", wgrad ? "-wgrad" : "", B * T, wgrad ? 16 : 4);
        int device = 0;
        cudaDeviceProp prop;
        CUDA_CHECK(cudaGetDevice(&device));
        CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
        if (prop.major < 9)  // cuBLASLt's block-scaled FP8 GEMM runs on Hopper and newer
            fail("--fp8 needs a GPU of compute capability 9.0 or newer; this %s is %d.%d", prop.name, prop.major, prop.minor);
    }
    const size_t P = m.ref.layout.total;
    const bool zero = dist.world > 1 && !inference;
    const ZeroPlan zero_layout = zero ? zero_plan(m.ref.layout, c.num_hidden_layers, dist.world) : ZeroPlan{};
    const size_t flat = zero ? zero_layout.padded : P, moments = zero ? zero_layout.shard : P;
    std::vector<ParamChunk> chunks = param_chunks(m.ref.layout);
    if (zero) chunks = zero_rank_chunks(chunks, zero_layout, dist.rank);
    int moe_layers = 0;
    for (int l = 0; l < c.total_layers(); l++) moe_layers += c.is_moe_layer(l);
    const size_t scratch = fp8_model_scratch_bytes(m.ref.fp8, B, T, inference, wgrad);
    int fp8_width = 0;  // training: the widest FP8 Linear input or output gradient (gate_up's) a kernel copies to FP8
    if (!inference)
        for (const Fp8Weight& q : m.ref.fp8) fp8_width = std::max({fp8_width, q.w.cols, q.w.rows});

    // the whole model's device memory, sized before anything is allocated: a model or batch
    // that cannot fit is refused with its sizes, not at whichever allocation fails first
    const size_t state = flat * (sizeof(float) + sizeof(bf16)) + m.ref.fp8_codes.size() + m.ref.fp8_scales.size() * sizeof(float) +
                         (inference ? 0 : (flat + 2 * moments) * sizeof(float));
    GpuModel plan;
    plan.arena.plan = true;
    plan.moe_layers = moe_layers;
    plan.num_chunks = (int)chunks.size();
    gpu_alloc_step_buffers(plan, c, B, T, inference, scratch, fp8_width);
    gpu_memory_check(state, plan.arena.bytes + MATMUL_WORKSPACE_BYTES, B, T);

    GpuModel* gp = new GpuModel();
    GpuModel& gpu = *gp;
    gpu.B = B;
    gpu.T = T;
    gpu.N = B * T;
    if (zero) {
        gpu.dist = dist;
        gpu.zero = zero_layout;
    }
    gpu.flat = flat;
    gpu.num_chunks = (int)chunks.size();
    gpu.moe_layers = moe_layers;
    DeviceArena& arena = gpu.arena;
    CUDA_CHECK(cudaStreamCreate(&gpu.ctx.stream));
    matmul_init(gpu.ctx.mm);
    gpu.rope = rope_table_upload(m.ref.rope);
    gpu.params32 = arena_alloc<float>(arena, gpu.flat, "fp32 master weights");
    gpu.params16 = arena_alloc<bf16>(arena, gpu.flat, "bf16 weights");
    if (zero) CUDA_CHECK(cudaMemset(gpu.params32, 0, gpu.flat * sizeof(float)));  // the padding
    CUDA_CHECK(cudaMemcpy(gpu.params32, m.ref.params.data(), P * sizeof(float), cudaMemcpyHostToDevice));
    float_to_bf16_gpu(gpu.params16, gpu.params32, gpu.flat, gpu.ctx.stream);
    gpu.w = bind_weights(c, m.ref.layout, gpu.params16);
    gpu.master = bind_weights(c, m.ref.layout, gpu.params32);
    if (fp8) {
        size_t codes = 0, scales = 0;
        bind_fp8_weights(gpu.w, gpu.fp8, arena_alloc<uint8_t>(arena, m.ref.fp8_codes.size(), "FP8 weights"),
                         arena_alloc<float>(arena, m.ref.fp8_scales.size(), "FP8 weights"), &codes, &scales, wgrad);
        std::vector<Fp8WeightJob> jobs;
        for_each_fp8_linear(gpu.w, [&](const Linear<bf16>& l, const Fp8Weight* q) { jobs.push_back({*q, l.w, 0}); });
        gpu.fp8_job_count = (int)jobs.size();
        gpu.fp8_jobs = fp8_weight_jobs_upload(jobs, &gpu.fp8_blocks);
        arena.buffers.push_back(gpu.fp8_jobs);
        fp8_quantize_weights_gpu(gpu.fp8_jobs, gpu.fp8_job_count, gpu.fp8_blocks, gpu.ctx.stream);
    }
    if (!inference) {
        gpu.grads = arena_alloc<float>(arena, gpu.flat, "gradients");
        gpu.adam_m = arena_alloc<float>(arena, moments, "AdamW first moments");
        gpu.adam_v = arena_alloc<float>(arena, moments, "AdamW second moments");
        CUDA_CHECK(cudaMemset(gpu.grads, 0, gpu.flat * sizeof(float)));
        gpu.grad = bind_weights(c, m.ref.layout, gpu.grads);
        if (zero) {  // this rank's slices of the moments (none past P: the padding starts at zero)
            CUDA_CHECK(cudaMemset(gpu.adam_m, 0, moments * sizeof(float)));
            CUDA_CHECK(cudaMemset(gpu.adam_v, 0, moments * sizeof(float)));
            for (const GradBucket& b : gpu.zero.buckets) {
                const size_t slice = b.len / dist.world, lo = b.begin + dist.rank * slice, n = lo < P ? std::min(slice, P - lo) : 0;
                if (m.adam_m.size() != P || n == 0) continue;
                CUDA_CHECK(cudaMemcpy(gpu.adam_m + b.state, m.adam_m.data() + lo, n * sizeof(float), cudaMemcpyHostToDevice));
                CUDA_CHECK(cudaMemcpy(gpu.adam_v + b.state, m.adam_v.data() + lo, n * sizeof(float), cudaMemcpyHostToDevice));
            }
        } else if (m.adam_m.size() == P) {
            CUDA_CHECK(cudaMemcpy(gpu.adam_m, m.adam_m.data(), P * sizeof(float), cudaMemcpyHostToDevice));
            CUDA_CHECK(cudaMemcpy(gpu.adam_v, m.adam_v.data(), P * sizeof(float), cudaMemcpyHostToDevice));
        } else {  // weights without a training state: the optimizer starts afresh
            CUDA_CHECK(cudaMemset(gpu.adam_m, 0, P * sizeof(float)));
            CUDA_CHECK(cudaMemset(gpu.adam_v, 0, P * sizeof(float)));
        }
    }
    gpu.chunks = param_chunks_upload(chunks);
    arena.buffers.push_back(gpu.chunks);
    std::vector<size_t> bias_offsets;
    for (int l = 0; l < c.total_layers(); l++)
        if (c.is_moe_layer(l)) bias_offsets.push_back(block_weights(gpu.master, l).moe.bias - gpu.params32);
    gpu.bias_offsets = arena_alloc<size_t>(arena, bias_offsets.size(), "expert bias offsets");
    CUDA_CHECK(cudaMemcpy(gpu.bias_offsets, bias_offsets.data(), bias_offsets.size() * sizeof(size_t), cudaMemcpyHostToDevice));
    gpu_alloc_step_buffers(gpu, c, B, T, inference, scratch, fp8_width);
    if (zero) {
        // the reduce-scatters' stream gets the higher priority, so that a bucket leaves as soon as it is ready
        int least = 0, greatest = 0;
        CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
        CUDA_CHECK(cudaStreamCreateWithPriority(&gpu.comm_stream, cudaStreamNonBlocking, greatest));
        gpu.point_done.resize(c.num_hidden_layers + 2);
        for (cudaEvent_t& e : gpu.point_done) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&gpu.comm_done, cudaEventDisableTiming));
    }
    CUDA_CHECK(cudaStreamSynchronize(gpu.ctx.stream));
    m.gpu = gp;
}

void model_free_gpu(Model& m) {
    if (!m.gpu) return;
    GpuModel& gpu = *m.gpu;
    CUDA_CHECK(cudaStreamSynchronize(gpu.ctx.stream));
    if (gpu.graph) cudaGraphExecDestroy(gpu.graph);
    if (gpu.comm_stream) {
        CUDA_CHECK(cudaStreamSynchronize(gpu.comm_stream));
        for (cudaEvent_t e : gpu.point_done) cudaEventDestroy(e);
        cudaEventDestroy(gpu.comm_done);
        cudaStreamDestroy(gpu.comm_stream);
    }
    arena_free(gpu.arena);
    rope_table_free(gpu.rope);
    matmul_free(gpu.ctx.mm);
    cudaStreamDestroy(gpu.ctx.stream);
    delete m.gpu;
    m.gpu = nullptr;
}

// ZeRO-1: each rank's current master weights and moments are those of its slices; one all-gather per bucket
// puts them together on every rank (the moments through the gradient buffer, which the next step clears)
static void gpu_gather_state(Model& m) {
    GpuModel& gpu = *m.gpu;
    const size_t P = m.ref.layout.total;
    const int W = gpu.dist.world, r = gpu.dist.rank;
    cudaStream_t st = gpu.ctx.stream;
    NCCL_CHECK(ncclGroupStart());
    for (const GradBucket& b : gpu.zero.buckets) {
        const size_t slice = b.len / W;
        NCCL_CHECK(ncclAllGather(gpu.params32 + b.begin + r * slice, gpu.params32 + b.begin, slice, ncclFloat, gpu.dist.comm, st));
    }
    NCCL_CHECK(ncclGroupEnd());
    CUDA_CHECK(cudaMemcpyAsync(m.ref.params.data(), gpu.params32, P * sizeof(float), cudaMemcpyDeviceToHost, st));
    m.adam_m.resize(P);
    m.adam_v.resize(P);
    for (auto [moment, host] : {std::make_pair(gpu.adam_m, &m.adam_m), std::make_pair(gpu.adam_v, &m.adam_v)}) {
        NCCL_CHECK(ncclGroupStart());
        for (const GradBucket& b : gpu.zero.buckets)
            NCCL_CHECK(ncclAllGather(moment + b.state, gpu.grads + b.begin, b.len / W, ncclFloat, gpu.dist.comm, st));
        NCCL_CHECK(ncclGroupEnd());
        CUDA_CHECK(cudaMemcpyAsync(host->data(), gpu.grads, P * sizeof(float), cudaMemcpyDeviceToHost, st));
    }
    CUDA_CHECK(cudaStreamSynchronize(st));
}

void model_sync_host(Model& m) {
    if (!m.gpu) return;
    GpuModel& gpu = *m.gpu;
    const size_t P = m.ref.layout.total;
    CUDA_CHECK(cudaStreamSynchronize(gpu.ctx.stream));
    if (gpu.comm_stream) {
        if (!gpu.host_current) gpu_gather_state(m);
        gpu.host_current = true;
        return;
    }
    CUDA_CHECK(cudaMemcpy(m.ref.params.data(), gpu.params32, P * sizeof(float), cudaMemcpyDeviceToHost));
    if (!gpu.grads) return;  // inference only: no gradients or moments
    CUDA_CHECK(cudaMemcpy(m.ref.grads.data(), gpu.grads, P * sizeof(float), cudaMemcpyDeviceToHost));
    m.adam_m.resize(P);
    m.adam_v.resize(P);
    CUDA_CHECK(cudaMemcpy(m.adam_m.data(), gpu.adam_m, P * sizeof(float), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(m.adam_v.data(), gpu.adam_v, P * sizeof(float), cudaMemcpyDeviceToHost));
}

// Block l (a main layer, or the MTP module's at l = num_hidden_layers), the twin of reference.h block_forward:
// the stream enters as res + branch (res null: branch alone) and leaves as the block's res_mid + gpu.branch,
// its FFN output. In training, an MoE block counts its routing into slot moe_index of the step's loads and adds
// its balance loss, times balance_scale, into that slot of the step's balance losses.
static void block_forward_gpu(GpuModel& gpu, const Config& c, int l, const float* res, const bf16* branch, int B, int T,
                              const StepOptions& opt, bool train, float balance_scale, int moe_index) {
    GpuLayer& a = gpu.layers[l];
    const LayerWeights<bf16>& w = block_weights(gpu.w, l);
    const int N = B * T, D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok;
    const float p = train ? opt.dropout : 0.0f, eps = c.rms_norm_eps;
    GpuContext& ctx = gpu.ctx;
    cudaStream_t st = ctx.stream;
    // dropout sites as reference.h numbers them: 1 is the embedding's, then two per block
    const uint64_t attn_site = 2 + 2 * (uint64_t)l, ffn_site = attn_site + 1;
    const uint64_t attn_key = dropout_site_key(opt.dropout_key, attn_site);
    // each norm writes its output's FP8 copy too where a Linear reading it runs in FP8 (fp8_copy)
    const Fp8Matrix xn_fp8 = fp8_copy(ctx, w.attn.q_proj.fp8 || w.attn.q_a.fp8 || w.attn.kv_a.fp8, N, D);
    rmsnorm_residual_forward_gpu<float>(a.res_in, a.xn, a.rstd1, res, branch, w.input_norm, N, D, eps, st, xn_fp8);
    const AttentionDropout attn_drop{train ? opt.attn_dropout : 0.0f, attention_dropout_key(attn_key)};
    mla_forward_gpu(c, w.attn, gpu.rope, gpu.branch, a.xn, B, T, a.attn, ctx, attn_drop, xn_fp8);
    if (p > 0) dropout_forward_gpu(gpu.branch, (size_t)N * D, p, attn_key, st);
    const bool moe = c.is_moe_layer(l);
    const Fp8Matrix xn2_fp8 = fp8_copy(ctx, (moe ? w.moe.shared : w.ffn).gate.fp8, N, D);
    rmsnorm_residual_forward_gpu(a.res_mid, a.xn2, a.rstd2, a.res_in, gpu.branch, w.post_norm, N, D, eps, st, xn2_fp8);
    if (moe) {
        int* load = train ? gpu.load + (size_t)moe_index * E : nullptr;
        moe_forward_gpu(c, w.moe, block_weights(gpu.master, l).moe.bias, gpu.branch, a.xn2, N, a.moe, load, ctx, xn2_fp8);
        if (train && opt.balance_alpha > 0)
            balance_loss_forward_gpu(gpu.balance_loss + moe_index, a.moe.frac, a.moe.seq_loss, a.moe.scores, a.moe.expert, B, T, E, K,
                                     opt.balance_alpha * balance_scale, true, st);
    } else {
        ffn_forward_gpu(w.ffn, gpu.branch, a.xn2, N, a.ffn, ctx, xn2_fp8);
    }
    if (p > 0) dropout_forward_gpu(gpu.branch, (size_t)N * D, p, dropout_site_key(opt.dropout_key, ffn_site), st);
}

// The backward of block_forward_gpu: gpu.dres, the stream's gradient where the block left it, becomes its
// gradient where the block took it (res + branch); adds into the block's gradients. dloss weighs its balance loss.
static void block_backward_gpu(GpuModel& gpu, const Config& c, int l, int B, int T, const StepOptions& opt, float dloss) {
    const GpuLayer& a = gpu.layers[l];
    const LayerWeights<bf16>& w = block_weights(gpu.w, l);
    const LayerWeights<float>& dw = block_weights(gpu.grad, l);
    const int N = B * T, D = c.hidden_size, E = c.n_routed_experts;
    const float p = opt.dropout;
    GpuContext& ctx = gpu.ctx;
    cudaStream_t st = ctx.stream;
    const uint64_t attn_site = 2 + 2 * (uint64_t)l, ffn_site = attn_site + 1;
    // FFN branch: its output gradient is the residual gradient (through dropout)
    dropout_to_bf16_gpu(gpu.dbranch, gpu.dres, (size_t)N * D, p, dropout_site_key(opt.dropout_key, ffn_site), st);
    if (c.is_moe_layer(l)) {
        if (opt.balance_alpha > 0) balance_loss_backward_gpu(gpu.dscores, a.moe.frac, a.moe.scores, B, T, E, opt.balance_alpha, dloss, st);
        moe_backward_gpu(c, w.moe, dw.moe, gpu.dxn, gpu.dbranch, a.xn2, N, a.moe, opt.balance_alpha > 0 ? gpu.dscores : nullptr, ctx);
    } else {
        ffn_backward_gpu(w.ffn, dw.ffn, gpu.dxn, gpu.dbranch, a.xn2, N, a.ffn, false, ctx);
    }
    rmsnorm_backward_gpu(gpu.dres, dw.post_norm, gpu.dres, gpu.dxn, a.res_mid, w.post_norm, a.rstd2, N, D, ctx.scratch, ctx.scratch_bytes, st);
    // attention branch
    dropout_to_bf16_gpu(gpu.dbranch, gpu.dres, (size_t)N * D, p, dropout_site_key(opt.dropout_key, attn_site), st);
    mla_backward_gpu(c, w.attn, dw.attn, gpu.rope, gpu.dxn, gpu.dbranch, a.xn, B, T, a.attn, ctx);
    rmsnorm_backward_gpu(gpu.dres, dw.input_norm, gpu.dres, gpu.dxn, a.res_in, w.input_norm, a.rstd1, N, D, ctx.scratch, ctx.scratch_bytes,
                         st);
}

// The model's forward, the twin of ref_forward: embedding, the blocks each adding
// their attention and FFN branches to the fp32 residual stream, then the head and the
// loss. The MTP module, when training one, runs inside gpu_backward.
void gpu_forward(Model& m, int B, int T, const StepOptions& opt, bool train, float dloss) {
    GpuModel& gpu = *m.gpu;
    const Config& c = m.ref.cfg;
    const int N = B * T, D = c.hidden_size, V = c.vocab_size;
    const float p = train ? opt.dropout : 0.0f;
    GpuContext& ctx = gpu.ctx;
    cudaStream_t st = ctx.stream;

    embedding_forward_gpu(gpu.emb, gpu.tokens, gpu.w.embed, N, D, st);
    if (p > 0) dropout_forward_gpu(gpu.emb, (size_t)N * D, p, dropout_site_key(opt.dropout_key, 1), st);
    int moe_index = 0;
    for (int l = 0; l < c.num_hidden_layers; l++) {
        // the stream starts as the embedding: layer 0 adds it to nothing
        const float* res = l == 0 ? nullptr : gpu.layers[l - 1].res_mid;
        block_forward_gpu(gpu, c, l, res, l == 0 ? gpu.emb : gpu.branch, B, T, opt, train, dloss, moe_index);
        moe_index += c.is_moe_layer(l);
    }
    rmsnorm_residual_forward_gpu(gpu.h_final, gpu.hn, gpu.hn_rstd, gpu.layers[c.num_hidden_layers - 1].res_mid, gpu.branch, gpu.w.final_norm, N,
                                 D, c.rms_norm_eps, st);
    linear_forward_gpu(gpu.logits, gpu.hn, gpu.w.lm_head, N, ctx);
    if (train) {
        crossentropy_scale_gpu(gpu.ce_scale, gpu.targets, N, 1.0f, st);
        crossentropy_forward_backward_gpu(gpu.losses, gpu.logits, gpu.targets, N, V, dloss, gpu.ce_scale, st);
    } else {
        crossentropy_forward_gpu(gpu.losses, gpu.logits, gpu.targets, N, V, st);
    }
}

// The MTP module's input and block, the twin of the first half of reference.h mtp_forward, on the main model's
// normed output gpu.hn and targets: the block's output is left as gpu.layers[L].res_mid + gpu.branch.
static void mtp_trunk_forward_gpu(GpuModel& gpu, const Config& c, int B, int T, const StepOptions& opt, bool train, float balance_scale) {
    MtpGpu& mtp = gpu.mtp;
    const MtpWeights<bf16>& w = gpu.w.mtp;
    const int N = B * T, D = c.hidden_size, L = c.num_hidden_layers;
    const float eps = c.rms_norm_eps;
    cudaStream_t st = gpu.ctx.stream;
    const size_t row = (size_t)D * sizeof(bf16);
    mtp_inputs_gpu(mtp.ids, mtp.targets, gpu.targets, N, T, st);
    embedding_forward_gpu(mtp.emb, mtp.ids, gpu.w.embed, N, D, st);
    zero_unknown_rows_gpu(mtp.emb, gpu.targets, N, D, st);
    // cat = [enorm(emb); hnorm(hn)], each half written at a row pitch of 2D
    rmsnorm_residual_forward_gpu<bf16>(nullptr, mtp.normed, mtp.en_rstd, mtp.emb, nullptr, w.enorm, N, D, eps, st);
    CUDA_CHECK(cudaMemcpy2DAsync(mtp.cat, 2 * row, mtp.normed, row, row, N, cudaMemcpyDeviceToDevice, st));
    rmsnorm_residual_forward_gpu<bf16>(nullptr, mtp.normed, mtp.hh_rstd, gpu.hn, nullptr, w.hnorm, N, D, eps, st);
    CUDA_CHECK(cudaMemcpy2DAsync(mtp.cat + D, 2 * row, mtp.normed, row, row, N, cudaMemcpyDeviceToDevice, st));
    linear_forward_gpu(mtp.h, mtp.cat, w.eh_proj, N, gpu.ctx);
    block_forward_gpu(gpu, c, L, nullptr, mtp.h, B, T, opt, train, balance_scale, gpu.moe_layers - c.is_moe_layer(L));
}

// The MTP module's head after mtp_trunk_forward_gpu, the twin of the end of reference.h mtp_forward: the block's
// output into mtp.h_final [N, D], shared_head.norm of it into mtp.z, and the shared lm_head's logits [N, V].
static void mtp_head_forward_gpu(GpuModel& gpu, const Config& c, bf16* logits, int N) {
    MtpGpu& mtp = gpu.mtp;
    rmsnorm_residual_forward_gpu(mtp.h_final, mtp.z, mtp.z_rstd, gpu.layers[c.num_hidden_layers].res_mid, gpu.branch, gpu.w.mtp.head_norm,
                                 N, c.hidden_size, c.rms_norm_eps, gpu.ctx.stream);
    linear_forward_gpu(logits, mtp.z, gpu.w.lm_head, N, gpu.ctx);
}

// The MTP module's forward in training, the twin of reference.h mtp_forward: its loss, times dloss / (targets)
// into the step's MTP loss, and the gradient of mtp_lambda times it in gpu.logits (which the main head's
// backward has finished reading).
static void mtp_forward_gpu(GpuModel& gpu, const Config& c, int B, int T, const StepOptions& opt, float dloss) {
    MtpGpu& mtp = gpu.mtp;
    const int N = B * T, V = c.vocab_size;
    cudaStream_t st = gpu.ctx.stream;
    mtp_trunk_forward_gpu(gpu, c, B, T, opt, true, dloss * opt.mtp_lambda);
    mtp_head_forward_gpu(gpu, c, gpu.logits, N);
    crossentropy_scale_gpu(mtp.ce_scale, mtp.targets, N, 1.0f, st);
    crossentropy_forward_backward_gpu(mtp.losses, gpu.logits, mtp.targets, N, V, dloss * opt.mtp_lambda, mtp.ce_scale, st);
    mean_loss_gpu(mtp.step_loss, mtp.losses, mtp.targets, N, dloss, true, st);
}

void gpu_mtp_prefill(Model& m, int B, int T) {
    mtp_trunk_forward_gpu(*m.gpu, m.ref.cfg, B, T, StepOptions{}, false, 0.0f);
}

// The backward of mtp_forward_gpu, the twin of reference.h mtp_backward: adds into the module's gradients and
// the shared embedding's and head's, and into mtp.dhn, the gradient of the main model's normed output.
static void mtp_backward_gpu(GpuModel& gpu, const Config& c, int B, int T, const StepOptions& opt, float dloss) {
    MtpGpu& mtp = gpu.mtp;
    const MtpWeights<bf16>& w = gpu.w.mtp;
    const MtpWeights<float>& dw = gpu.grad.mtp;
    const int N = B * T, D = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;
    GpuContext& ctx = gpu.ctx;
    cudaStream_t st = ctx.stream;
    const size_t row = (size_t)D * sizeof(bf16);
    linear_backward_gpu(gpu.dxn, gpu.grad.lm_head, gpu.logits, mtp.z, gpu.w.lm_head, N, false, ctx);
    rmsnorm_backward_gpu(gpu.dres, dw.head_norm, nullptr, gpu.dxn, mtp.h_final, w.head_norm, mtp.z_rstd, N, D, ctx.scratch, ctx.scratch_bytes,
                         st);
    block_backward_gpu(gpu, c, L, B, T, opt, dloss * opt.mtp_lambda);
    dropout_to_bf16_gpu(gpu.dbranch, gpu.dres, (size_t)N * D, 0.0f, 0, st);  // the block's input had no dropout
    linear_backward_gpu(mtp.dcat, dw.eh_proj, gpu.dbranch, mtp.cat, w.eh_proj, N, false, ctx);
    // cat's halves: enorm's gradient to dxn, hnorm's to dbranch
    CUDA_CHECK(cudaMemcpy2DAsync(gpu.dxn, row, mtp.dcat, 2 * row, row, N, cudaMemcpyDeviceToDevice, st));
    CUDA_CHECK(cudaMemcpy2DAsync(gpu.dbranch, row, mtp.dcat + D, 2 * row, row, N, cudaMemcpyDeviceToDevice, st));
    rmsnorm_backward_gpu(mtp.dhn, dw.hnorm, mtp.dhn, gpu.dbranch, gpu.hn, w.hnorm, mtp.hh_rstd, N, D, ctx.scratch, ctx.scratch_bytes, st);
    bf16* demb = mtp.dcat;  // [N, D]: dcat is spent
    rmsnorm_backward_gpu(demb, dw.enorm, nullptr, gpu.dxn, mtp.emb, w.enorm, mtp.en_rstd, N, D, ctx.scratch, ctx.scratch_bytes, st);
    zero_unknown_rows_gpu(demb, gpu.targets, N, D, st);  // a zero row is no embedding's
    embedding_backward_gpu(gpu.grad.embed, demb, mtp.ids, N, D, V, ctx.scratch, ctx.scratch_bytes, st);
}

// ZeRO-1, in the backward that communicates: the gradients of the buckets final at this point
// (dist.h grad_ready_point) are averaged over the ranks, each rank receiving its slice, on the
// comm stream while the main stream goes on with the layers below.
static void gpu_backward_point(GpuModel& gpu, int point) {
    if (!gpu.communicate) return;
    const int W = gpu.dist.world, r = gpu.dist.rank;
    CUDA_CHECK(cudaEventRecord(gpu.point_done[point], gpu.ctx.stream));
    CUDA_CHECK(cudaStreamWaitEvent(gpu.comm_stream, gpu.point_done[point], 0));
    NCCL_CHECK(ncclGroupStart());
    for (const GradBucket& b : gpu.zero.buckets) {
        if (b.ready != point) continue;
        const size_t slice = b.len / W;
        NCCL_CHECK(ncclReduceScatter(gpu.grads + b.begin, gpu.grads + b.begin + r * slice, slice, ncclFloat, ncclAvg, gpu.dist.comm,
                                     gpu.comm_stream));
    }
    NCCL_CHECK(ncclGroupEnd());
}

// The backward of the last gpu_forward(train=true), the twin of ref_backward;
// adds into gpu.grad. With the MTP module, the module's forward and backward run
// once the main head's backward has read the logits, so that both heads share one
// logits buffer, and its gradient joins the head's before the final norm's backward.
static void gpu_backward(Model& m, int B, int T, const StepOptions& opt, float dloss) {
    GpuModel& gpu = *m.gpu;
    const Config& c = m.ref.cfg;
    const int N = B * T, D = c.hidden_size, V = c.vocab_size;
    GpuContext& ctx = gpu.ctx;
    cudaStream_t st = ctx.stream;

    bf16* dhn = gpu.mtp.h ? gpu.mtp.dhn : gpu.dxn;
    linear_backward_gpu(dhn, gpu.grad.lm_head, gpu.logits, gpu.hn, gpu.w.lm_head, N, false, ctx);
    if (gpu.mtp.h) {
        mtp_forward_gpu(gpu, c, B, T, opt, dloss);
        mtp_backward_gpu(gpu, c, B, T, opt, dloss);
    }
    rmsnorm_backward_gpu(gpu.dres, gpu.grad.final_norm, nullptr, dhn, gpu.h_final, gpu.w.final_norm, gpu.hn_rstd, N, D, ctx.scratch,
                         ctx.scratch_bytes, st);
    gpu_backward_point(gpu, 0);
    for (int l = c.num_hidden_layers - 1; l >= 0; l--) {
        block_backward_gpu(gpu, c, l, B, T, opt, dloss);
        gpu_backward_point(gpu, 1 + (c.num_hidden_layers - 1 - l));
    }
    dropout_to_bf16_gpu(gpu.dbranch, gpu.dres, (size_t)N * D, opt.dropout, dropout_site_key(opt.dropout_key, 1), st);
    embedding_backward_gpu(gpu.grad.embed, gpu.dbranch, gpu.tokens, N, D, V, ctx.scratch, ctx.scratch_bytes, st);
    gpu_backward_point(gpu, c.num_hidden_layers + 1);
}

// Copies from pageable host memory return once the data is staged, so the host
// vectors may change right after; no synchronisation needed.
static void gpu_upload_batch(GpuModel& gpu, const std::vector<int>& inputs, const std::vector<int>& targets) {
    if (inputs.size() > (size_t)gpu.N) fail("internal: a batch of %zu tokens exceeds the GPU buffers (%d)", inputs.size(), gpu.N);
    CUDA_CHECK(cudaMemcpyAsync(gpu.tokens, inputs.data(), inputs.size() * sizeof(int), cudaMemcpyHostToDevice, gpu.ctx.stream));
    CUDA_CHECK(cudaMemcpyAsync(gpu.targets, targets.data(), targets.size() * sizeof(int), cudaMemcpyHostToDevice, gpu.ctx.stream));
}

// Forward and backward of the micro-batch in gpu.tokens/gpu.targets, adding its loss
// and balance loss to the step's accumulators. Without dropout every kernel
// argument is the same from step to step, so after one eager run (which also
// plans the GEMMs) the pair is captured once as a CUDA graph and replayed: one
// launch instead of hundreds of small ones. Dropout masks are keyed by the step,
// so with dropout the kernels are launched one by one.
static void gpu_forward_backward(Model& m, const TrainOptions& o, const StepOptions& opt, float dloss) {
    GpuModel& gpu = *m.gpu;
    auto launch = [&] {
        gpu_forward(m, o.batch_size, o.seq_len, opt, true, dloss);
        mean_loss_gpu(gpu.step_loss, gpu.losses, gpu.targets, o.batch_size * o.seq_len, dloss, true, gpu.ctx.stream);
        gpu_backward(m, o.batch_size, o.seq_len, opt, dloss);
    };
    const GraphKey key{o.batch_size, o.seq_len, dloss, opt.balance_alpha, opt.mtp_lambda};
    // the micro-step that communicates runs eagerly: its NCCL calls and cross-stream events stay out of the graph
    if (!o.cuda_graph || opt.dropout > 0 || opt.attn_dropout > 0 || gpu.communicate) return launch();
    if (!(key == gpu.graph_key)) {
        if (gpu.graph) CUDA_CHECK(cudaGraphExecDestroy(gpu.graph));
        gpu.graph = nullptr;
        gpu.graph_key = key;
        return launch();
    }
    if (!gpu.graph) {
        cudaGraph_t graph;
        CUDA_CHECK(cudaStreamBeginCapture(gpu.ctx.stream, cudaStreamCaptureModeThreadLocal));
        launch();
        CUDA_CHECK(cudaStreamEndCapture(gpu.ctx.stream, &graph));
        CUDA_CHECK(cudaGraphInstantiate(&gpu.graph, graph, 0));
        CUDA_CHECK(cudaGraphDestroy(graph));
    }
    CUDA_CHECK(cudaGraphLaunch(gpu.graph, gpu.ctx.stream));
}

// ZeRO-1: the squared gradient norm is the sum of the ranks' partial sums over their slices; the expert loads
// (for the bias update and the balance statistics) are all ranks' counts; the losses are the ranks' mean.
// The sum of the ranks' norm partials is not the single-GPU order of summation: equal within rounding.
static void gpu_reduce_step_stats(GpuModel& gpu, int E) {
    ncclComm_t comm = gpu.dist.comm;
    cudaStream_t st = gpu.ctx.stream;
    const int layers = std::max(1, gpu.moe_layers);
    NCCL_CHECK(ncclGroupStart());
    NCCL_CHECK(ncclAllReduce(gpu.norm2, gpu.norm2, 1, ncclFloat, ncclSum, comm, st));
    NCCL_CHECK(ncclAllReduce(gpu.load, gpu.load, (size_t)layers * std::max(1, E), ncclInt32, ncclSum, comm, st));
    NCCL_CHECK(ncclAllReduce(gpu.step_loss, gpu.step_loss, 1, ncclFloat, ncclAvg, comm, st));
    NCCL_CHECK(ncclAllReduce(gpu.balance_loss, gpu.balance_loss, layers, ncclFloat, ncclAvg, comm, st));
    if (gpu.mtp.h) NCCL_CHECK(ncclAllReduce(gpu.mtp.step_loss, gpu.mtp.step_loss, 1, ncclFloat, ncclAvg, comm, st));
    NCCL_CHECK(ncclGroupEnd());
}

// ZeRO-1, after AdamW: every rank's updated slices of the bf16 weights, to every rank
static void gpu_gather_weights(GpuModel& gpu) {
    const int W = gpu.dist.world, r = gpu.dist.rank;
    NCCL_CHECK(ncclGroupStart());
    for (const GradBucket& b : gpu.zero.buckets) {
        const size_t slice = b.len / W;
        NCCL_CHECK(ncclAllGather(gpu.params16 + b.begin + r * slice, gpu.params16 + b.begin, slice, ncclBfloat16, gpu.dist.comm,
                                 gpu.ctx.stream));
    }
    NCCL_CHECK(ncclGroupEnd());
}

static StepStats gpu_train_step(Model& m, DataLoader& loader, const TrainOptions& o, int step) {
    GpuModel& gpu = *m.gpu;
    const Config& c = m.ref.cfg;
    const int E = c.n_routed_experts;
    const float dloss = 1.0f / o.grad_accum;
    std::vector<int> inputs, targets;
    // gradients are cleared at the start, so after the step they still show what it used
    CUDA_CHECK(cudaMemsetAsync(gpu.grads, 0, gpu.flat * sizeof(float), gpu.ctx.stream));
    CUDA_CHECK(cudaMemsetAsync(gpu.load, 0, (size_t)std::max(1, gpu.moe_layers) * std::max(1, E) * sizeof(int), gpu.ctx.stream));
    CUDA_CHECK(cudaMemsetAsync(gpu.step_loss, 0, sizeof(float), gpu.ctx.stream));
    if (gpu.mtp.h) CUDA_CHECK(cudaMemsetAsync(gpu.mtp.step_loss, 0, sizeof(float), gpu.ctx.stream));
    CUDA_CHECK(cudaMemsetAsync(gpu.balance_loss, 0, std::max(1, gpu.moe_layers) * sizeof(float), gpu.ctx.stream));
    const bool zero = gpu.comm_stream != nullptr;
    for (int micro = 0; micro < o.grad_accum; micro++) {
        dataloader_next(loader, inputs, targets);
        gpu_upload_batch(gpu, inputs, targets);
        gpu.communicate = zero && micro == o.grad_accum - 1;  // the gradients are summed locally first
        gpu_forward_backward(m, o, micro_step_options(o, step, loader, micro), dloss);
    }
    gpu.communicate = false;
    gpu.host_current = false;
    StepStats s{0, 0, 0, 0, 0};
    s.lr = learning_rate(o.optim, step);
    if (zero) {
        CUDA_CHECK(cudaEventRecord(gpu.comm_done, gpu.comm_stream));
        CUDA_CHECK(cudaStreamWaitEvent(gpu.ctx.stream, gpu.comm_done, 0));
    }
    grad_norm_squared_gpu(gpu.norm2, gpu.grads, gpu.chunks, gpu.num_chunks, gpu.ctx.scratch, gpu.ctx.scratch_bytes, gpu.ctx.stream);
    if (zero) gpu_reduce_step_stats(gpu, E);
    adamw_gpu(gpu.params32, gpu.params16, gpu.grads, gpu.adam_m, gpu.adam_v, gpu.chunks, gpu.num_chunks, s.lr, o.optim.beta1, o.optim.beta2, o.optim.eps,
              o.optim.weight_decay, step + 1, gpu.norm2, o.optim.grad_clip, gpu.ctx.stream);
    if (o.optim.bias_update_speed > 0 && gpu.moe_layers > 0)
        expert_bias_update_gpu(gpu.params32, gpu.bias_offsets, gpu.load, gpu.moe_layers, E, o.optim.bias_update_speed, gpu.norm2, gpu.ctx.stream);
    if (zero) gpu_gather_weights(gpu);
    // the next step's FP8 copies, from the whole updated bf16 weights (after the all-gather under ZeRO)
    fp8_quantize_weights_gpu(gpu.fp8_jobs, gpu.fp8_job_count, gpu.fp8_blocks, gpu.ctx.stream);
    float loss = 0, norm2 = 0, mtp_loss = 0;
    std::vector<int> load((size_t)gpu.moe_layers * E);
    std::vector<float> balance(gpu.moe_layers);
    CUDA_CHECK(cudaMemcpyAsync(&loss, gpu.step_loss, sizeof(float), cudaMemcpyDeviceToHost, gpu.ctx.stream));
    CUDA_CHECK(cudaMemcpyAsync(&norm2, gpu.norm2, sizeof(float), cudaMemcpyDeviceToHost, gpu.ctx.stream));
    if (gpu.mtp.h) CUDA_CHECK(cudaMemcpyAsync(&mtp_loss, gpu.mtp.step_loss, sizeof(float), cudaMemcpyDeviceToHost, gpu.ctx.stream));
    if (!load.empty()) CUDA_CHECK(cudaMemcpyAsync(load.data(), gpu.load, load.size() * sizeof(int), cudaMemcpyDeviceToHost, gpu.ctx.stream));
    if (!balance.empty())
        CUDA_CHECK(cudaMemcpyAsync(balance.data(), gpu.balance_loss, balance.size() * sizeof(float), cudaMemcpyDeviceToHost, gpu.ctx.stream));
    CUDA_CHECK(cudaStreamSynchronize(gpu.ctx.stream));
    s.loss = loss;
    s.mtp_loss = mtp_loss;
    s.grad_norm = std::sqrt((double)norm2);
    if (o.balance_alpha > 0)
        for (float b : balance) s.balance_loss += b;
    int moe_index = 0;
    for (int l = 0; l < (int)gpu.layers.size(); l++)
        if (c.is_moe_layer(l)) {
            for (int e = 0; e < E; e++) m.expert_load[l][e] += load[(size_t)moe_index * E + e];
            moe_index++;
        }
    return s;
}

// mean loss of rows x len tokens on the GPU (forward only); mtp: the module's means over the window (MtpEval)
static double gpu_eval_window(Model& m, const std::vector<int>& inputs, const std::vector<int>& targets, int rows, int len, MtpEval* mtp) {
    GpuModel& gpu = *m.gpu;
    const Config& c = m.ref.cfg;
    const int N = rows * len, V = c.vocab_size;
    cudaStream_t st = gpu.ctx.stream;
    gpu_upload_batch(gpu, inputs, targets);
    gpu_forward(m, rows, len, StepOptions{}, false, 1.0f);
    mean_loss_gpu(gpu.step_loss, gpu.losses, gpu.targets, N, 1.0f, false, st);
    float loss = 0, stats[3] = {0, 0, 0};
    if (mtp) {
        MtpGpu& a = gpu.mtp;
        if (!a.eval_logits) {
            a.eval_logits = arena_alloc<bf16>(gpu.arena, (size_t)gpu.N * V, "logits");
            a.eval_stats = arena_alloc<float>(gpu.arena, 3, "scalars");
        }
        mtp_trunk_forward_gpu(gpu, c, rows, len, StepOptions{}, false, 0.0f);
        mtp_head_forward_gpu(gpu, c, a.eval_logits, N);
        crossentropy_forward_gpu(a.losses, a.eval_logits, a.targets, N, V, st);
        mean_loss_gpu(a.eval_stats, a.losses, a.targets, N, 1.0f, false, st);
        // the per-row acceptances overwrite the two per-row loss buffers, both reduced by now
        mtp_acceptance_gpu(a.losses, gpu.losses, gpu.logits, a.eval_logits, a.targets, N, V, st);
        mean_loss_gpu(a.eval_stats + 1, a.losses, a.targets, N, 1.0f, false, st);
        mean_loss_gpu(a.eval_stats + 2, gpu.losses, a.targets, N, 1.0f, false, st);
        CUDA_CHECK(cudaMemcpyAsync(stats, a.eval_stats, sizeof(stats), cudaMemcpyDeviceToHost, st));
    }
    CUDA_CHECK(cudaMemcpyAsync(&loss, gpu.step_loss, sizeof(float), cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    if (mtp) {
        const std::vector<int> shifted = mtp_targets(targets.data(), N, len);  // the rows mean_loss_gpu averaged over
        *mtp = MtpEval{stats[0], stats[1], stats[2], std::count_if(shifted.begin(), shifted.end(), [](int t) { return t >= 0; })};
    }
    return loss;
}

// logits [T, V] of one sequence into m.ref.logits (the GPU buffers hold up to B*T tokens)
static void gpu_logits(Model& m, const std::vector<int>& tokens) {
    GpuModel& gpu = *m.gpu;
    const int T = (int)tokens.size(), V = m.ref.cfg.vocab_size;
    if (T > gpu.T) {
        // longer than the training batches the buffers were sized for: use the CPU
        model_sync_host(m);
        ref_forward(m.ref, tokens.data(), nullptr, 1, T, StepOptions{});
        return;
    }
    gpu_upload_batch(gpu, tokens, std::vector<int>(T, -1));
    gpu_forward(m, 1, T, StepOptions{}, false, 1.0f);
    std::vector<float> logits = to_host(gpu.logits, (size_t)T * V);
    m.ref.logits.swap(logits);
}
