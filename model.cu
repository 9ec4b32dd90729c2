// model.cu — the model behind the binaries: creation, the training step
// (gradient accumulation, clipping, AdamW, expert-bias update), evaluation,
// sampling and checkpoints, on the CPU reference (reference.h) or, once
// model_to_gpu has run, on the CUDA path in the second half of this file.
#include "model.h"

#include <algorithm>

#include "fileutil.h"
#include "safetensors.h"

void model_create(Model& m, const Config& c, uint64_t seed) {
    ref_init(m.ref, c);
    ref_init_weights(m.ref, seed);
    m.adam_m.assign(m.ref.layout.total, 0);
    m.adam_v.assign(m.ref.layout.total, 0);
    m.tokenizer = tokenizer_bytes();
    m.expert_load.assign(c.num_hidden_layers, std::vector<int64_t>(c.n_routed_experts, 0));
}

// dropout and balance-loss settings of one micro-step; the dropout key depends on
// (seed, step, micro-step) only, so a resumed run draws the same masks
static StepOptions micro_step_options(const TrainOptions& o, int step, int micro) {
    StepOptions so;
    so.dropout = o.dropout;
    so.balance_alpha = o.balance_alpha;
    so.dropout_key = mix64(o.seed ^ mix64((uint64_t)step * o.grad_accum + micro));
    return so;
}

static StepStats gpu_train_step(Model& m, DataLoader& loader, const TrainOptions& o, int step);
static double gpu_eval_window(Model& m, const std::vector<int>& inputs, const std::vector<int>& targets, int rows, int len);

StepStats model_train_step(Model& m, DataLoader& loader, const TrainOptions& o, int step) {
    if (m.gpu) return gpu_train_step(m, loader, o, step);
    const Config& c = m.ref.cfg;
    std::fill(m.ref.grads.begin(), m.ref.grads.end(), 0.0f);
    std::vector<std::vector<int64_t>> load(c.num_hidden_layers, std::vector<int64_t>(c.n_routed_experts, 0));
    std::vector<int> inputs, targets;
    StepStats s{0, 0, 0, 0};
    for (int micro = 0; micro < o.grad_accum; micro++) {
        dataloader_next(loader, inputs, targets);
        const StepOptions so = micro_step_options(o, step, micro);
        ref_forward(m.ref, inputs.data(), targets.data(), o.batch_size, o.seq_len, so);
        ref_backward(m.ref, 1.0f / o.grad_accum);
        s.loss += m.ref.ce_loss / o.grad_accum;
        s.balance_loss += m.ref.balance_loss / o.grad_accum;
        for (int l = 0; l < c.num_hidden_layers; l++)
            for (int e = 0; e < c.n_routed_experts; e++) load[l][e] += m.ref.expert_load[l][e];
    }
    s.grad_norm = grad_norm(m.ref.layout, m.ref.grads.data());
    s.lr = learning_rate(o.optim, step);
    adamw_update(m.ref.layout, m.ref.params.data(), m.ref.grads.data(), m.adam_m.data(), m.adam_v.data(), o.optim, s.lr, step + 1,
                 s.grad_norm);
    if (o.optim.bias_update_speed > 0) expert_bias_update(c, m.ref.layout, m.ref.params.data(), load, o.optim.bias_update_speed);
    for (int l = 0; l < c.num_hidden_layers; l++)
        for (int e = 0; e < c.n_routed_experts; e++) m.expert_load[l][e] += load[l][e];
    return s;
}

double model_eval_loss(Model& m, const std::vector<int>& tokens, int seq_len, int batch_size) {
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
        double mean = m.gpu ? gpu_eval_window(m, inputs, targets, rows, (int)len)
                            : ref_forward(m.ref, inputs.data(), targets.data(), rows, (int)len, StepOptions{});
        total += mean * (double)(rows * len);
        start += rows * len;
    }
    return total / (double)predictions;
}

static void gpu_logits(Model& m, const std::vector<int>& tokens);

const std::vector<float>& model_logits(Model& m, const std::vector<int>& tokens) {
    if (m.gpu) gpu_logits(m, tokens);
    else ref_forward(m.ref, tokens.data(), nullptr, 1, (int)tokens.size(), StepOptions{});
    return m.ref.logits;
}

int sample_token(const float* logits, int V, const SamplingOptions& s, float coin) {
    if (s.temperature <= 0) return (int)(std::max_element(logits, logits + V) - logits);
    std::vector<int> order(V);
    for (int i = 0; i < V; i++) order[i] = i;
    // ties keep the lower id first, so a fixed seed repeats exactly
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
    int keep = (s.top_k > 0 && s.top_k < V) ? s.top_k : V;
    std::vector<double> p(keep);
    double sum = 0;
    for (int i = 0; i < keep; i++) sum += (p[i] = std::exp((double)(logits[order[i]] - logits[order[0]]) / s.temperature));
    if (s.top_p < 1) {
        // the smallest prefix whose mass reaches top_p
        double mass = 0;
        int n = 0;
        while (n < keep && mass < s.top_p * sum) mass += p[n++];
        keep = std::max(n, 1);
        sum = mass;
    }
    double target = coin * sum, acc = 0;
    for (int i = 0; i < keep; i++) {
        acc += p[i];
        if (target < acc) return order[i];
    }
    return order[keep - 1];
}

// ----------------------------------------------------------------------------
// Checkpoints

static std::vector<SafeTensor> tensors_of(const ParamLayout& L, const float* data, const std::string& prefix, const char* dtype) {
    std::vector<SafeTensor> out;
    for (const TensorSpec& s : L.tensors) {
        // the correction bias steers routing by tiny steps: never round it to bf16
        const char* d = s.kind == TENSOR_BUFFER ? "F32" : dtype;
        out.push_back({prefix + s.name, d, s.shape, std::vector<float>(data + s.offset, data + s.offset + s.numel)});
    }
    return out;
}

static std::string state_to_json(const TrainState& st) {
    const TrainOptions& o = st.options;
    std::string s = "{\n";
    s += strfmt("  \"step\": %d,\n  \"data_position\": %llu,\n", st.step, (unsigned long long)st.data_position);
    s += std::isfinite(st.best_val_loss) ? strfmt("  \"best_val_loss\": %.17g,\n", st.best_val_loss) : "  \"best_val_loss\": null,\n";
    s += strfmt("  \"seed\": %llu,\n  \"batch_size\": %d,\n  \"seq_len\": %d,\n  \"grad_accum\": %d,\n", (unsigned long long)o.seed,
                o.batch_size, o.seq_len, o.grad_accum);
    s += strfmt("  \"dropout\": %.9g,\n  \"balance_alpha\": %.9g,\n", o.dropout, o.balance_alpha);
    s += strfmt("  \"lr\": %.9g,\n  \"min_lr_fraction\": %.9g,\n  \"warmup_steps\": %d,\n  \"total_steps\": %d,\n", o.optim.lr,
                o.optim.min_lr_fraction, o.optim.warmup_steps, o.optim.total_steps);
    s += strfmt("  \"beta1\": %.9g,\n  \"beta2\": %.9g,\n  \"eps\": %.9g,\n  \"weight_decay\": %.9g,\n", o.optim.beta1, o.optim.beta2,
                o.optim.eps, o.optim.weight_decay);
    s += strfmt("  \"grad_clip\": %.9g,\n  \"bias_update_speed\": %.9g\n}\n", o.optim.grad_clip, o.optim.bias_update_speed);
    return s;
}

static TrainState state_from_json(const std::string& text, const std::string& where) {
    JsonValue root;
    std::string err;
    if (!json_parse(text, root, err)) fail("%s: invalid JSON: %s", where.c_str(), err.c_str());
    auto num = [&](const char* key) {
        const JsonValue* v = root.get(key);
        if (!v || v->type != JsonValue::Number) fail("%s: missing or non-numeric field \"%s\"", where.c_str(), key);
        return v->number;
    };
    TrainState st;
    TrainOptions& o = st.options;
    st.step = (int)num("step");
    st.data_position = (uint64_t)num("data_position");
    const JsonValue* best = root.get("best_val_loss");
    st.best_val_loss = best && best->type == JsonValue::Number ? best->number : INFINITY;
    o.seed = (uint64_t)num("seed");
    o.batch_size = (int)num("batch_size");
    o.seq_len = (int)num("seq_len");
    o.grad_accum = (int)num("grad_accum");
    o.dropout = (float)num("dropout");
    o.balance_alpha = (float)num("balance_alpha");
    o.optim.lr = (float)num("lr");
    o.optim.min_lr_fraction = (float)num("min_lr_fraction");
    o.optim.warmup_steps = (int)num("warmup_steps");
    o.optim.total_steps = (int)num("total_steps");
    o.optim.beta1 = (float)num("beta1");
    o.optim.beta2 = (float)num("beta2");
    o.optim.eps = (float)num("eps");
    o.optim.weight_decay = (float)num("weight_decay");
    o.optim.grad_clip = (float)num("grad_clip");
    o.optim.bias_update_speed = (float)num("bias_update_speed");
    if (st.step < 0 || o.batch_size < 1 || o.seq_len < 1 || o.grad_accum < 1) fail("%s: inconsistent training state", where.c_str());
    return st;
}

void model_save(Model& m, const std::string& dir, const TrainState* state, bool bf16) {
    model_sync_host(m);
    std::string tmp = atomic_dir_begin(dir);
    write_file_atomic(tmp + "/config.json", config_to_json(m.ref.cfg));
    safetensors_write(tmp + "/model.safetensors", tensors_of(m.ref.layout, m.ref.params.data(), "", bf16 ? "BF16" : "F32"),
                      {{"format", "pt"}});
    // no file stands for the byte tokenizer, so byte-level models of any vocab size load
    if (!m.tokenizer.merges.empty()) tokenizer_save(m.tokenizer, tmp + "/tokenizer.bin");
    if (state) {
        std::vector<SafeTensor> moments = tensors_of(m.ref.layout, m.adam_m.data(), "exp_avg.", "F32");
        std::vector<SafeTensor> second = tensors_of(m.ref.layout, m.adam_v.data(), "exp_avg_sq.", "F32");
        moments.insert(moments.end(), second.begin(), second.end());
        safetensors_write(tmp + "/optimizer.safetensors", moments);
        write_file_atomic(tmp + "/trainer_state.json", state_to_json(*state));
    }
    atomic_dir_commit(tmp, dir);
}

bool checkpoint_has_state(const std::string& dir) {
    return path_exists(dir + "/trainer_state.json") && path_exists(dir + "/optimizer.safetensors");
}

// copies every tensor of the layout from f into dst, refusing missing,
// mis-shaped and unexpected tensors
static void take_all(const SafeTensorsFile& f, const ParamLayout& L, float* dst) {
    for (const TensorSpec& s : L.tensors) safetensors_take(f, s.name, s.shape, dst + s.offset);
    for (const SafeTensor& t : f.tensors)
        if (!L.index.count(t.name)) fail("%s: unexpected tensor '%s' (not part of this config)", f.path.c_str(), t.name.c_str());
}

void model_load(Model& m, const std::string& dir, TrainState* state) {
    if (!path_exists(dir)) fail("%s: checkpoint directory does not exist", dir.c_str());
    std::string config_path = dir + "/config.json";
    Config c = config_from_json(read_file(config_path), config_path);
    model_create(m, c, 0);
    SafeTensorsFile weights = safetensors_read(dir + "/model.safetensors");
    take_all(weights, m.ref.layout, m.ref.params.data());
    std::string tok_path = dir + "/tokenizer.bin";
    if (path_exists(tok_path)) {
        m.tokenizer = tokenizer_load(tok_path);
        if (m.tokenizer.vocab_size > c.vocab_size)
            fail("%s: tokenizer has %d tokens but the model's vocab_size is %d", tok_path.c_str(), m.tokenizer.vocab_size, c.vocab_size);
    }
    if (!state) {
        // inference needs no optimizer moments: give their memory back
        std::vector<float>().swap(m.adam_m);
        std::vector<float>().swap(m.adam_v);
        return;
    }
    if (!checkpoint_has_state(dir)) fail("%s: no training state (trainer_state.json, optimizer.safetensors) to resume from", dir.c_str());
    std::string state_path = dir + "/trainer_state.json";
    *state = state_from_json(read_file(state_path), state_path);
    SafeTensorsFile opt = safetensors_read(dir + "/optimizer.safetensors");
    for (const TensorSpec& s : m.ref.layout.tensors) {
        safetensors_take(opt, "exp_avg." + s.name, s.shape, m.adam_m.data() + s.offset);
        safetensors_take(opt, "exp_avg_sq." + s.name, s.shape, m.adam_v.data() + s.offset);
    }
}

std::string model_resolve_dir(const std::string& dir, bool is_default) {
    if (path_exists(dir + "/config.json")) return dir;
    if (path_exists(dir + "/checkpoint/config.json")) return dir + "/checkpoint";
    if (!path_exists(dir))
        fail("%s: model directory does not exist%s", dir.c_str(), is_default ? " (train one with ./train, or pass --model DIR)" : "");
    fail("%s: not a checkpoint directory (no config.json, and no checkpoint/config.json)", dir.c_str());
}

// ----------------------------------------------------------------------------
// The CUDA training path. The same step as model_train_step's CPU loop, layer by
// layer with the kernels of kernels.cuh, mla.cuh and moe.cuh and cuBLASLt GEMMs:
// bf16 weights and activations, fp32 weight gradients, master weights and AdamW
// moments. Nothing waits for the host inside a step; the loss, the gradient norm
// and the expert loads come back once per step, for logging. The device state
// (GpuModel) is declared in gpu_model.cuh.
#include "gpu_model.cuh"

size_t model_gpu_bytes(const Model& m) { return m.gpu ? m.gpu->arena.bytes + m.gpu->mm.workspace_bytes : 0; }

bool gpu_available() {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

// the GPU router's limits (experts, top-k, groups)
static void gpu_check_config(const Config& c) {
    if (c.n_routed_experts > 0) router_check(c);
}

void model_to_gpu(Model& m, int B, int T, bool inference) {
    const Config& c = m.ref.cfg;
    gpu_check_config(c);
    if (!gpu_available()) fail("--device gpu: no CUDA device is available");
    GpuModel* gp = new GpuModel();
    GpuModel& g = *gp;
    g.B = B;
    g.T = T;
    g.N = B * T;
    const int N = g.N, D = c.hidden_size, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank;
    const int dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, dqk = dn + dr, V = c.vocab_size;
    const int E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.intermediate_size, MI = c.moe_intermediate_size;
    const int SI = c.n_shared_experts * MI, S = N * K;
    const size_t P = m.ref.layout.total;
    CUDA_CHECK(cudaStreamCreate(&g.stream));
    matmul_init(g.mm);
    g.rope = rope_table_upload(m.ref.rope);
    g.params32 = arena_alloc<float>(g.arena, P, "fp32 master weights");
    if (!inference) {
        g.grads = arena_alloc<float>(g.arena, P, "gradients");
        g.adam_m = arena_alloc<float>(g.arena, P, "AdamW first moments");
        g.adam_v = arena_alloc<float>(g.arena, P, "AdamW second moments");
        CUDA_CHECK(cudaMemset(g.grads, 0, P * sizeof(float)));
    }
    g.params16 = arena_alloc<bf16>(g.arena, P, "bf16 weights");
    CUDA_CHECK(cudaMemcpy(g.params32, m.ref.params.data(), P * sizeof(float), cudaMemcpyHostToDevice));
    if (!inference && m.adam_m.size() == P) {
        CUDA_CHECK(cudaMemcpy(g.adam_m, m.adam_m.data(), P * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(g.adam_v, m.adam_v.data(), P * sizeof(float), cudaMemcpyHostToDevice));
    } else if (!inference) {  // weights without a training state: the optimizer starts afresh
        CUDA_CHECK(cudaMemset(g.adam_m, 0, P * sizeof(float)));
        CUDA_CHECK(cudaMemset(g.adam_v, 0, P * sizeof(float)));
    }
    float_to_bf16_gpu(g.params16, g.params32, P, g.stream);
    std::vector<ParamChunk> chunks = param_chunks(m.ref.layout);
    g.chunks = param_chunks_upload(chunks);
    g.arena.buffers.push_back(g.chunks);
    g.num_chunks = (int)chunks.size();

    std::vector<size_t> bias_offsets;
    for (int l = 0; l < c.num_hidden_layers; l++)
        if (c.is_moe_layer(l)) bias_offsets.push_back(m.ref.layout.offset_of(strfmt("model.layers.%d.mlp.gate.e_score_correction_bias", l)));
    g.moe_layers = (int)bias_offsets.size();
    g.bias_offsets = arena_alloc<size_t>(g.arena, bias_offsets.size(), "expert bias offsets");
    CUDA_CHECK(cudaMemcpy(g.bias_offsets, bias_offsets.data(), bias_offsets.size() * sizeof(size_t), cudaMemcpyHostToDevice));
    g.load = arena_alloc<int>(g.arena, (size_t)std::max(1, g.moe_layers) * std::max(1, E), "expert loads");

    g.layers.resize(c.num_hidden_layers);
    for (int l = 0; l < c.num_hidden_layers; l++) {
        GpuLayer& a = g.layers[l];
        a = GpuLayer{};
        a.res_in = arena_alloc<float>(g.arena, (size_t)N * D, "activations");
        a.xn = arena_alloc<bf16>(g.arena, (size_t)N * D, "activations");
        a.rstd1 = arena_alloc<float>(g.arena, N, "activations");
        if (qr > 0) {
            a.qa = arena_alloc<bf16>(g.arena, (size_t)N * qr, "activations");
            a.qa_norm = arena_alloc<bf16>(g.arena, (size_t)N * qr, "activations");
            a.qa_rstd = arena_alloc<float>(g.arena, N, "activations");
        }
        a.q = arena_alloc<bf16>(g.arena, (size_t)N * H * dqk, "activations");
        a.c = arena_alloc<bf16>(g.arena, (size_t)N * dc, "activations");
        a.c_norm = arena_alloc<bf16>(g.arena, (size_t)N * dc, "activations");
        a.c_rstd = arena_alloc<float>(g.arena, N, "activations");
        a.kv_a = arena_alloc<bf16>(g.arena, (size_t)N * (dc + dr), "activations");
        a.k = arena_alloc<bf16>(g.arena, (size_t)N * H * dqk, "activations");
        a.v = arena_alloc<bf16>(g.arena, (size_t)N * H * dv, "activations");
        a.o = arena_alloc<bf16>(g.arena, (size_t)N * H * dv, "activations");
        a.lse = arena_alloc<float>(g.arena, (size_t)N * H, "activations");
        a.res_mid = arena_alloc<float>(g.arena, (size_t)N * D, "activations");
        a.xn2 = arena_alloc<bf16>(g.arena, (size_t)N * D, "activations");
        a.rstd2 = arena_alloc<float>(g.arena, N, "activations");
        if (!c.is_moe_layer(l)) {
            a.gate_up = arena_alloc<bf16>(g.arena, (size_t)N * 2 * I, "activations");
            continue;
        }
        a.router_logits = arena_alloc<float>(g.arena, (size_t)N * E, "activations");
        a.scores = arena_alloc<float>(g.arena, (size_t)N * E, "activations");
        a.gate = arena_alloc<float>(g.arena, (size_t)N * K, "activations");
        a.frac = arena_alloc<float>(g.arena, (size_t)B * E, "activations");
        a.seq_loss = arena_alloc<float>(g.arena, B, "activations");
        a.expert = arena_alloc<int>(g.arena, (size_t)N * K, "activations");
        a.offsets = arena_alloc<int>(g.arena, E + 1, "activations");
        a.slot_row = arena_alloc<int>(g.arena, S, "activations");
        a.row_slot = arena_alloc<int>(g.arena, S, "activations");
        a.gu_sorted = arena_alloc<bf16>(g.arena, (size_t)S * 2 * MI, "activations");
        a.y_sorted = arena_alloc<bf16>(g.arena, (size_t)S * D, "activations");
        if (SI > 0) {
            a.shared_gu = arena_alloc<bf16>(g.arena, (size_t)N * 2 * SI, "activations");
        }
    }
    g.tokens = arena_alloc<int>(g.arena, N, "tokens");
    g.targets = arena_alloc<int>(g.arena, N, "targets");
    g.emb = arena_alloc<bf16>(g.arena, (size_t)N * D, "activations");
    g.h_final = arena_alloc<float>(g.arena, (size_t)N * D, "activations");
    g.hn = arena_alloc<bf16>(g.arena, (size_t)N * D, "activations");
    g.kv_b = arena_alloc<bf16>(g.arena, (size_t)N * H * (dn + dv), "activations");
    g.branch = arena_alloc<bf16>(g.arena, (size_t)N * D, "activations");
    if (SI > 0) g.shared_out = arena_alloc<bf16>(g.arena, (size_t)N * D, "activations");
    g.hidden = arena_alloc<bf16>(g.arena, std::max({(size_t)N * I, (size_t)S * MI, (size_t)N * SI}), "activations");
    if (E > 0) g.x_sorted = arena_alloc<bf16>(g.arena, (size_t)S * D, "activations");
    g.hn_rstd = arena_alloc<float>(g.arena, N, "activations");
    g.logits = arena_alloc<bf16>(g.arena, (size_t)N * V, "logits");
    g.losses = arena_alloc<float>(g.arena, N, "losses");
    g.ce_scale = arena_alloc<float>(g.arena, 1, "scalars");
    g.step_loss = arena_alloc<float>(g.arena, 1, "scalars");
    g.balance_loss = arena_alloc<float>(g.arena, std::max(1, g.moe_layers), "scalars");
    g.norm2 = arena_alloc<float>(g.arena, 1, "scalars");

    // backward temporaries (generation needs none)
    if (!inference) {
        const size_t wide = (size_t)N * std::max({D, H * dqk, H * (dn + dv), dc + dr, std::max(qr, 1), 2 * I, 2 * SI});
        g.dres = arena_alloc<float>(g.arena, (size_t)N * D, "gradients");
        g.dbranch = arena_alloc<bf16>(g.arena, (size_t)N * D, "gradients");
        g.dxn = arena_alloc<bf16>(g.arena, (size_t)N * D, "gradients");
        g.d_o = arena_alloc<bf16>(g.arena, (size_t)N * H * dv, "gradients");
        g.dq = arena_alloc<bf16>(g.arena, (size_t)N * H * dqk, "gradients");
        g.dk = arena_alloc<bf16>(g.arena, (size_t)N * H * dqk, "gradients");
        g.dv = arena_alloc<bf16>(g.arena, (size_t)N * H * dv, "gradients");
        g.dkv_b = arena_alloc<bf16>(g.arena, (size_t)N * H * (dn + dv), "gradients");
        g.dkv_a = arena_alloc<bf16>(g.arena, (size_t)N * (dc + dr), "gradients");
        g.dc_norm = arena_alloc<bf16>(g.arena, (size_t)N * dc, "gradients");
        g.dc = arena_alloc<bf16>(g.arena, (size_t)N * dc, "gradients");
        if (qr > 0) {
            g.dqa_norm = arena_alloc<bf16>(g.arena, (size_t)N * qr, "gradients");
            g.dqa = arena_alloc<bf16>(g.arena, (size_t)N * qr, "gradients");
        }
        g.dgate_up = arena_alloc<bf16>(g.arena, wide, "gradients");
        g.dhidden = arena_alloc<bf16>(g.arena, wide, "gradients");
        if (E > 0) {
            g.dy_sorted = arena_alloc<bf16>(g.arena, (size_t)S * D, "gradients");
            g.dh_sorted = arena_alloc<bf16>(g.arena, (size_t)S * MI, "gradients");
            g.dgu_sorted = arena_alloc<bf16>(g.arena, (size_t)S * 2 * MI, "gradients");
            g.dx_sorted = arena_alloc<bf16>(g.arena, (size_t)S * D, "gradients");
            g.dgate = arena_alloc<float>(g.arena, (size_t)N * K, "gradients");
            g.dscores = arena_alloc<float>(g.arena, (size_t)N * E, "gradients");
            g.router_dlogits = arena_alloc<float>(g.arena, (size_t)N * E, "gradients");
            g.router_dlogits16 = arena_alloc<bf16>(g.arena, (size_t)N * E, "gradients");
        }
    }
    g.scratch_bytes = std::max({embedding_backward_scratch_bytes(N, D, V), rmsnorm_backward_scratch_bytes(N, std::max({D, dc, qr})),
                                grad_norm_scratch_bytes(g.num_chunks), attention_backward_scratch_floats(B, T, H) * sizeof(float),
                                E > 0 ? moe_permute_scratch_ints(S, E) * sizeof(int) : (size_t)0});
    g.scratch = arena_alloc<char>(g.arena, g.scratch_bytes, "scratch");
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    m.gpu = gp;
}

void model_free_gpu(Model& m) {
    if (!m.gpu) return;
    GpuModel& g = *m.gpu;
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    if (g.graph) cudaGraphExecDestroy(g.graph);
    arena_free(g.arena);
    rope_table_free(g.rope);
    matmul_free(g.mm);
    cudaStreamDestroy(g.stream);
    delete m.gpu;
    m.gpu = nullptr;
}

void model_sync_host(Model& m) {
    if (!m.gpu) return;
    GpuModel& g = *m.gpu;
    const size_t P = m.ref.layout.total;
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    CUDA_CHECK(cudaMemcpy(m.ref.params.data(), g.params32, P * sizeof(float), cudaMemcpyDeviceToHost));
    if (!g.grads) return;  // inference only: no gradients or moments
    CUDA_CHECK(cudaMemcpy(m.ref.grads.data(), g.grads, P * sizeof(float), cudaMemcpyDeviceToHost));
    m.adam_m.resize(P);
    m.adam_v.resize(P);
    CUDA_CHECK(cudaMemcpy(m.adam_m.data(), g.adam_m, P * sizeof(float), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(m.adam_v.data(), g.adam_v, P * sizeof(float), cudaMemcpyDeviceToHost));
}

// out[N, OC] = x[N, C] @ W^T (bf16 out); the nn.Linear forward
static void linear_forward(GpuModel& g, bf16* out, const bf16* x, const bf16* w, int N, int C, int OC, int ldc = 0) {
    matmul(g.mm, out, x, w, N, OC, C, false, true, 0.0f, false, g.stream, 0, 0, ldc);
}

// dx[N, C] (= or += when accumulate) dout[N, OC] @ W; dW[OC, C] += dout^T @ x
static void linear_backward(GpuModel& g, bf16* dx, float* dw, const bf16* dout, const bf16* x, const bf16* w, int N, int C, int OC,
                            bool accumulate, int ld_dout = 0) {
    if (dx) matmul(g.mm, dx, dout, w, N, C, OC, false, false, accumulate ? 1.0f : 0.0f, false, g.stream, ld_dout);
    matmul(g.mm, dw, dout, x, OC, C, N, true, false, 1.0f, true, g.stream, ld_dout);
}

// the forward described in gpu_model.cuh
void gpu_forward(Model& m, int B, int T, const StepOptions& so, bool train, float dloss) {
    GpuModel& g = *m.gpu;
    const Config& c = m.ref.cfg;
    const int N = B * T, D = c.hidden_size, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank;
    const int dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, dqk = dn + dr, V = c.vocab_size;
    const int E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.intermediate_size, MI = c.moe_intermediate_size;
    const int SI = c.n_shared_experts * MI, S = N * K;
    const float p = train ? so.dropout : 0.0f;
    const float eps = c.rms_norm_eps;
    cudaStream_t st = g.stream;
    uint64_t site = 0;

    embedding_forward_gpu(g.emb, g.tokens, gpu_tensor(m, "model.embed_tokens.weight").w, N, D, st);
    if (p > 0) dropout_forward_gpu(g.emb, (size_t)N * D, p, dropout_site_key(so.dropout_key, ++site), st);
    int moe_index = 0;
    for (int l = 0; l < c.num_hidden_layers; l++) {
        GpuLayer& a = g.layers[l];
        std::string pre = strfmt("model.layers.%d.", l);
        // the stream starts as the embedding: layer 0 adds it to nothing
        const float* prev_res = l == 0 ? nullptr : g.layers[l - 1].res_mid;
        const bf16* prev_branch = l == 0 ? g.emb : g.branch;
        rmsnorm_residual_forward_gpu<float>(a.res_in, a.xn, a.rstd1, prev_res, prev_branch, gpu_tensor(m, pre + "input_layernorm.weight").w, N,
                                     D, eps, st);
        // MLA
        if (qr > 0) {
            linear_forward(g, a.qa, a.xn, gpu_tensor(m, pre + "self_attn.q_a_proj.weight").w, N, D, qr);
            rmsnorm_residual_forward_gpu(nullptr, a.qa_norm, a.qa_rstd, a.qa, nullptr, gpu_tensor(m, pre + "self_attn.q_a_layernorm.weight").w,
                                         N, qr, eps, st);
            linear_forward(g, a.q, a.qa_norm, gpu_tensor(m, pre + "self_attn.q_b_proj.weight").w, N, qr, H * dqk);
        } else {
            linear_forward(g, a.q, a.xn, gpu_tensor(m, pre + "self_attn.q_proj.weight").w, N, D, H * dqk);
        }
        const bf16* w_kv_a = gpu_tensor(m, pre + "self_attn.kv_a_proj_with_mqa.weight").w;
        linear_forward(g, a.c, a.xn, w_kv_a, N, D, dc);
        linear_forward(g, a.kv_a + dc, a.xn, w_kv_a + (size_t)dc * D, N, D, dr, dc + dr);
        rmsnorm_residual_forward_gpu(nullptr, a.c_norm, a.c_rstd, a.c, nullptr, gpu_tensor(m, pre + "self_attn.kv_a_layernorm.weight").w, N,
                                     dc, eps, st);
        linear_forward(g, g.kv_b, a.c_norm, gpu_tensor(m, pre + "self_attn.kv_b_proj.weight").w, N, dc, H * (dn + dv));
        rope_forward_gpu(a.q, a.kv_a, g.rope, N, T, H, dn, dc, 0, st);
        mla_assemble_kv_gpu(a.k, a.v, g.kv_b, a.kv_a, N, H, dn, dr, dv, dc, st);
        attention_forward_gpu(a.o, a.lse, a.q, a.k, a.v, B, T, H, dqk, dv, g.rope.softmax_scale, st);
        linear_forward(g, g.branch, a.o, gpu_tensor(m, pre + "self_attn.o_proj.weight").w, N, H * dv, D);
        if (p > 0) dropout_forward_gpu(g.branch, (size_t)N * D, p, dropout_site_key(so.dropout_key, ++site), st);
        rmsnorm_residual_forward_gpu(a.res_mid, a.xn2, a.rstd2, a.res_in, g.branch, gpu_tensor(m, pre + "post_attention_layernorm.weight").w,
                                     N, D, eps, st);
        // FFN
        if (!c.is_moe_layer(l)) {
            linear_forward(g, a.gate_up, a.xn2, gpu_tensor(m, pre + "mlp.gate_proj.weight").w, N, D, 2 * I);
            swiglu_forward_fused_gpu(g.hidden, a.gate_up, N, I, st);
            linear_forward(g, g.branch, g.hidden, gpu_tensor(m, pre + "mlp.down_proj.weight").w, N, I, D);
        } else {
            const size_t bias_off = m.ref.layout.offset_of(pre + "mlp.gate.e_score_correction_bias");
            matmul(g.mm, a.router_logits, a.xn2, gpu_tensor(m, pre + "mlp.gate.weight").w, N, E, D, false, true, 0.0f, true, st);
            router_forward_gpu(a.scores, a.expert, a.gate, train ? g.load + (size_t)moe_index * E : nullptr, a.router_logits,
                               g.params32 + bias_off, c, N, st);
            moe_permute_gpu(a.offsets, a.slot_row, a.row_slot, (int*)g.scratch, a.expert, S, E, st);
            moe_gather_gpu(g.x_sorted, a.xn2, a.row_slot, N, K, D, st);
            const GpuTensor expert0_gate = gpu_tensor(m, pre + "mlp.experts.0.gate_proj.weight");
            const GpuTensor expert0_down = gpu_tensor(m, pre + "mlp.experts.0.down_proj.weight");
            const size_t expert_stride = (size_t)3 * MI * D;
            grouped_gemm_forward_gpu(a.gu_sorted, g.x_sorted, expert0_gate.w, expert_stride, a.offsets, S, E, D, 2 * MI, st);
            swiglu_forward_fused_gpu(g.hidden, a.gu_sorted, S, MI, st);
            grouped_gemm_forward_gpu(a.y_sorted, g.hidden, expert0_down.w, expert_stride, a.offsets, S, E, MI, D, st);
            if (SI > 0) {
                linear_forward(g, a.shared_gu, a.xn2, gpu_tensor(m, pre + "mlp.shared_experts.gate_proj.weight").w, N, D, 2 * SI);
                swiglu_forward_fused_gpu(g.hidden, a.shared_gu, N, SI, st);
                linear_forward(g, g.shared_out, g.hidden, gpu_tensor(m, pre + "mlp.shared_experts.down_proj.weight").w, N, SI, D);
            }
            moe_combine_forward_gpu(g.branch, a.y_sorted, a.gate, a.slot_row, SI > 0 ? g.shared_out : nullptr, N, K, D, st);
            if (train && so.balance_alpha > 0)
                balance_loss_forward_gpu(g.balance_loss + moe_index, a.frac, a.seq_loss, a.scores, a.expert, B, T, E, K, so.balance_alpha * dloss, true,
                                         st);
            moe_index++;
        }
        if (p > 0) dropout_forward_gpu(g.branch, (size_t)N * D, p, dropout_site_key(so.dropout_key, ++site), st);
    }
    const GpuLayer& last = g.layers.back();
    rmsnorm_residual_forward_gpu(g.h_final, g.hn, g.hn_rstd, last.res_mid, g.branch, gpu_tensor(m, "model.norm.weight").w, N, D, eps,
                                 st);
    linear_forward(g, g.logits, g.hn, gpu_tensor(m, "lm_head.weight").w, N, D, V);
    if (train) {
        crossentropy_scale_gpu(g.ce_scale, g.targets, N, 1.0f, st);
        crossentropy_forward_backward_gpu(g.losses, g.logits, g.targets, N, V, dloss, g.ce_scale, st);
    } else {
        crossentropy_forward_gpu(g.losses, g.logits, g.targets, N, V, st);
    }
}

// backward of the last gpu_forward(train=true); accumulates into g.grads
static void gpu_backward(Model& m, int B, int T, const StepOptions& so, float dloss) {
    GpuModel& g = *m.gpu;
    const Config& c = m.ref.cfg;
    const int N = B * T, D = c.hidden_size, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank;
    const int dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, dqk = dn + dr, V = c.vocab_size;
    const int E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.intermediate_size, MI = c.moe_intermediate_size;
    const int SI = c.n_shared_experts * MI, S = N * K;
    const float p = so.dropout;
    cudaStream_t st = g.stream;
    // dropout sites were numbered 1 (embedding), then 2 per layer
    uint64_t site = 1 + 2 * (uint64_t)c.num_hidden_layers;

    const GpuTensor head = gpu_tensor(m, "lm_head.weight");
    linear_backward(g, g.dxn, head.g, g.logits, g.hn, head.w, N, D, V, false);
    const GpuTensor norm = gpu_tensor(m, "model.norm.weight");
    rmsnorm_backward_gpu(g.dres, norm.g, nullptr, g.dxn, g.h_final, norm.w, g.hn_rstd, N, D, g.scratch, g.scratch_bytes, st);
    int moe_index = g.moe_layers;
    for (int l = c.num_hidden_layers - 1; l >= 0; l--) {
        GpuLayer& a = g.layers[l];
        std::string pre = strfmt("model.layers.%d.", l);
        // FFN branch: its output gradient is the residual gradient (through dropout)
        dropout_to_bf16_gpu(g.dbranch, g.dres, (size_t)N * D, p, dropout_site_key(so.dropout_key, site--), st);
        const bf16* dffn = g.dbranch;
        if (!c.is_moe_layer(l)) {
            const GpuTensor down = gpu_tensor(m, pre + "mlp.down_proj.weight"), gate_up = gpu_tensor(m, pre + "mlp.gate_proj.weight");
            swiglu_forward_fused_gpu(g.hidden, a.gate_up, N, I, st);
            linear_backward(g, g.dhidden, down.g, dffn, g.hidden, down.w, N, I, D, false);
            swiglu_backward_fused_gpu(g.dgate_up, g.dhidden, a.gate_up, N, I, st);
            linear_backward(g, g.dxn, gate_up.g, g.dgate_up, a.xn2, gate_up.w, N, D, 2 * I, false);
        } else {
            moe_index--;
            const GpuTensor expert0_gate = gpu_tensor(m, pre + "mlp.experts.0.gate_proj.weight");
            const GpuTensor expert0_down = gpu_tensor(m, pre + "mlp.experts.0.down_proj.weight");
            const size_t expert_stride = (size_t)3 * MI * D;
            moe_combine_backward_gpu(g.dy_sorted, g.dgate, dffn, a.y_sorted, a.gate, a.slot_row, N, K, D, st);
            grouped_gemm_backward_input_gpu(g.dh_sorted, g.dy_sorted, expert0_down.w, expert_stride, a.offsets, S, E, MI, D, st);
            swiglu_forward_fused_gpu(g.hidden, a.gu_sorted, S, MI, st);
            grouped_gemm_backward_weight_gpu(expert0_down.g, expert_stride, g.dy_sorted, g.hidden, a.offsets, S, E, MI, D, st);
            swiglu_backward_fused_gpu(g.dgu_sorted, g.dh_sorted, a.gu_sorted, S, MI, st);
            grouped_gemm_backward_input_gpu(g.dx_sorted, g.dgu_sorted, expert0_gate.w, expert_stride, a.offsets, S, E, D, 2 * MI, st);
            moe_gather_gpu(g.x_sorted, a.xn2, a.row_slot, N, K, D, st);
            grouped_gemm_backward_weight_gpu(expert0_gate.g, expert_stride, g.dgu_sorted, g.x_sorted, a.offsets, S, E, D, 2 * MI, st);
            moe_scatter_backward_gpu(g.dxn, g.dx_sorted, a.slot_row, N, K, D, false, st);
            if (SI > 0) {
                const GpuTensor down = gpu_tensor(m, pre + "mlp.shared_experts.down_proj.weight");
                const GpuTensor gate_up = gpu_tensor(m, pre + "mlp.shared_experts.gate_proj.weight");
                swiglu_forward_fused_gpu(g.hidden, a.shared_gu, N, SI, st);
                linear_backward(g, g.dhidden, down.g, dffn, g.hidden, down.w, N, SI, D, false);
                swiglu_backward_fused_gpu(g.dgate_up, g.dhidden, a.shared_gu, N, SI, st);
                linear_backward(g, g.dxn, gate_up.g, g.dgate_up, a.xn2, gate_up.w, N, D, 2 * SI, true);
            }
            const float* dscores = nullptr;
            if (so.balance_alpha > 0) {
                balance_loss_backward_gpu(g.dscores, a.frac, a.scores, B, T, E, so.balance_alpha, dloss, st);
                dscores = g.dscores;
            }
            router_backward_gpu(g.router_dlogits, g.dgate, dscores, a.scores, a.expert, c, N, st);
            float_to_bf16_gpu(g.router_dlogits16, g.router_dlogits, (size_t)N * E, st);
            const GpuTensor router = gpu_tensor(m, pre + "mlp.gate.weight");
            linear_backward(g, g.dxn, router.g, g.router_dlogits16, a.xn2, router.w, N, D, E, true);
        }
        const GpuTensor post_norm = gpu_tensor(m, pre + "post_attention_layernorm.weight");
        rmsnorm_backward_gpu(g.dres, post_norm.g, g.dres, g.dxn, a.res_mid, post_norm.w, a.rstd2, N, D, g.scratch, g.scratch_bytes, st);

        // attention branch
        dropout_to_bf16_gpu(g.dbranch, g.dres, (size_t)N * D, p, dropout_site_key(so.dropout_key, site--), st);
        const bf16* dattn = g.dbranch;
        const GpuTensor o_proj = gpu_tensor(m, pre + "self_attn.o_proj.weight");
        linear_backward(g, g.d_o, o_proj.g, dattn, a.o, o_proj.w, N, H * dv, D, false);
        attention_backward_gpu(g.dq, g.dk, g.dv, g.d_o, a.o, a.lse, a.q, a.k, a.v, B, T, H, dqk, dv, g.rope.softmax_scale, (float*)g.scratch,
                               st);
        mla_assemble_kv_backward_gpu(g.dkv_b, g.dkv_a, g.dk, g.dv, N, H, dn, dr, dv, dc, st);
        rope_backward_gpu(g.dq, g.dkv_a, g.rope, N, T, H, dn, dc, 0, st);
        const GpuTensor kv_b = gpu_tensor(m, pre + "self_attn.kv_b_proj.weight");
        linear_backward(g, g.dc_norm, kv_b.g, g.dkv_b, a.c_norm, kv_b.w, N, dc, H * (dn + dv), false);
        const GpuTensor kv_norm = gpu_tensor(m, pre + "self_attn.kv_a_layernorm.weight");
        rmsnorm_backward_gpu(g.dc, kv_norm.g, nullptr, g.dc_norm, a.c, kv_norm.w, a.c_rstd, N, dc, g.scratch, g.scratch_bytes, st);
        const GpuTensor kv_a = gpu_tensor(m, pre + "self_attn.kv_a_proj_with_mqa.weight");
        linear_backward(g, g.dxn, kv_a.g, g.dc, a.xn, kv_a.w, N, D, dc, false);
        linear_backward(g, g.dxn, kv_a.g + (size_t)dc * D, g.dkv_a + dc, a.xn, kv_a.w + (size_t)dc * D, N, D, dr, true, dc + dr);
        if (qr > 0) {
            const GpuTensor q_b = gpu_tensor(m, pre + "self_attn.q_b_proj.weight");
            linear_backward(g, g.dqa_norm, q_b.g, g.dq, a.qa_norm, q_b.w, N, qr, H * dqk, false);
            const GpuTensor q_norm = gpu_tensor(m, pre + "self_attn.q_a_layernorm.weight");
            rmsnorm_backward_gpu(g.dqa, q_norm.g, nullptr, g.dqa_norm, a.qa, q_norm.w, a.qa_rstd, N, qr, g.scratch, g.scratch_bytes, st);
            const GpuTensor q_a = gpu_tensor(m, pre + "self_attn.q_a_proj.weight");
            linear_backward(g, g.dxn, q_a.g, g.dqa, a.xn, q_a.w, N, D, qr, true);
        } else {
            const GpuTensor q = gpu_tensor(m, pre + "self_attn.q_proj.weight");
            linear_backward(g, g.dxn, q.g, g.dq, a.xn, q.w, N, D, H * dqk, true);
        }
        const GpuTensor in_norm = gpu_tensor(m, pre + "input_layernorm.weight");
        rmsnorm_backward_gpu(g.dres, in_norm.g, g.dres, g.dxn, a.res_in, in_norm.w, a.rstd1, N, D, g.scratch, g.scratch_bytes, st);
    }
    dropout_to_bf16_gpu(g.dbranch, g.dres, (size_t)N * D, p, dropout_site_key(so.dropout_key, site--), st);
    embedding_backward_gpu(gpu_tensor(m, "model.embed_tokens.weight").g, g.dbranch, g.tokens, N, D, V, g.scratch, g.scratch_bytes, st);
}

// Copies from pageable host memory return once the data is staged, so the host
// vectors may change right after; no synchronisation needed.
static void gpu_upload_batch(GpuModel& g, const std::vector<int>& inputs, const std::vector<int>& targets) {
    if (inputs.size() > (size_t)g.N) fail("internal: a batch of %zu tokens exceeds the GPU buffers (%d)", inputs.size(), g.N);
    CUDA_CHECK(cudaMemcpyAsync(g.tokens, inputs.data(), inputs.size() * sizeof(int), cudaMemcpyHostToDevice, g.stream));
    CUDA_CHECK(cudaMemcpyAsync(g.targets, targets.data(), targets.size() * sizeof(int), cudaMemcpyHostToDevice, g.stream));
}

// Forward and backward of the micro-batch in g.tokens/g.targets, adding its loss
// and balance loss to the step's accumulators. Without dropout every kernel
// argument is the same from step to step, so after one eager run (which also
// plans the GEMMs) the pair is captured once as a CUDA graph and replayed: one
// launch instead of hundreds of small ones. Dropout masks are keyed by the step,
// so with dropout the kernels are launched one by one.
static void gpu_forward_backward(Model& m, const TrainOptions& o, const StepOptions& so, float dloss) {
    GpuModel& g = *m.gpu;
    auto launch = [&] {
        gpu_forward(m, o.batch_size, o.seq_len, so, true, dloss);
        mean_loss_gpu(g.step_loss, g.losses, g.targets, o.batch_size * o.seq_len, dloss, true, g.stream);
        gpu_backward(m, o.batch_size, o.seq_len, so, dloss);
    };
    const GraphKey key{o.batch_size, o.seq_len, dloss, so.balance_alpha};
    if (!o.cuda_graph || so.dropout > 0) return launch();
    if (!(key == g.graph_key)) {
        if (g.graph) CUDA_CHECK(cudaGraphExecDestroy(g.graph));
        g.graph = nullptr;
        g.graph_key = key;
        return launch();
    }
    if (!g.graph) {
        cudaGraph_t graph;
        CUDA_CHECK(cudaStreamBeginCapture(g.stream, cudaStreamCaptureModeThreadLocal));
        launch();
        CUDA_CHECK(cudaStreamEndCapture(g.stream, &graph));
        CUDA_CHECK(cudaGraphInstantiate(&g.graph, graph, 0));
        CUDA_CHECK(cudaGraphDestroy(graph));
    }
    CUDA_CHECK(cudaGraphLaunch(g.graph, g.stream));
}

static StepStats gpu_train_step(Model& m, DataLoader& loader, const TrainOptions& o, int step) {
    GpuModel& g = *m.gpu;
    const Config& c = m.ref.cfg;
    const int E = c.n_routed_experts;
    const float dloss = 1.0f / o.grad_accum;
    std::vector<int> inputs, targets;
    // gradients are cleared at the start, so after the step they still show what it used
    CUDA_CHECK(cudaMemsetAsync(g.grads, 0, m.ref.layout.total * sizeof(float), g.stream));
    CUDA_CHECK(cudaMemsetAsync(g.load, 0, (size_t)std::max(1, g.moe_layers) * std::max(1, E) * sizeof(int), g.stream));
    CUDA_CHECK(cudaMemsetAsync(g.step_loss, 0, sizeof(float), g.stream));
    CUDA_CHECK(cudaMemsetAsync(g.balance_loss, 0, std::max(1, g.moe_layers) * sizeof(float), g.stream));
    for (int micro = 0; micro < o.grad_accum; micro++) {
        dataloader_next(loader, inputs, targets);
        gpu_upload_batch(g, inputs, targets);
        gpu_forward_backward(m, o, micro_step_options(o, step, micro), dloss);
    }
    StepStats s{0, 0, 0, 0};
    s.lr = learning_rate(o.optim, step);
    grad_norm_squared_gpu(g.norm2, g.grads, g.chunks, g.num_chunks, g.scratch, g.scratch_bytes, g.stream);
    adamw_gpu(g.params32, g.params16, g.grads, g.adam_m, g.adam_v, g.chunks, g.num_chunks, s.lr, o.optim.beta1, o.optim.beta2, o.optim.eps,
              o.optim.weight_decay, step + 1, g.norm2, o.optim.grad_clip, g.stream);
    if (o.optim.bias_update_speed > 0 && g.moe_layers > 0)
        expert_bias_update_gpu(g.params32, g.bias_offsets, g.load, g.moe_layers, E, o.optim.bias_update_speed, g.stream);
    float loss = 0, norm2 = 0;
    std::vector<int> load((size_t)g.moe_layers * E);
    std::vector<float> balance(g.moe_layers);
    CUDA_CHECK(cudaMemcpyAsync(&loss, g.step_loss, sizeof(float), cudaMemcpyDeviceToHost, g.stream));
    CUDA_CHECK(cudaMemcpyAsync(&norm2, g.norm2, sizeof(float), cudaMemcpyDeviceToHost, g.stream));
    if (!load.empty()) CUDA_CHECK(cudaMemcpyAsync(load.data(), g.load, load.size() * sizeof(int), cudaMemcpyDeviceToHost, g.stream));
    if (!balance.empty())
        CUDA_CHECK(cudaMemcpyAsync(balance.data(), g.balance_loss, balance.size() * sizeof(float), cudaMemcpyDeviceToHost, g.stream));
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    s.loss = loss;
    s.grad_norm = std::sqrt((double)norm2);
    if (o.balance_alpha > 0)
        for (float b : balance) s.balance_loss += b;
    int moe_index = 0;
    for (int l = 0; l < c.num_hidden_layers; l++)
        if (c.is_moe_layer(l)) {
            for (int e = 0; e < E; e++) m.expert_load[l][e] += load[(size_t)moe_index * E + e];
            moe_index++;
        }
    return s;
}

// mean loss of rows x len tokens on the GPU (forward only)
static double gpu_eval_window(Model& m, const std::vector<int>& inputs, const std::vector<int>& targets, int rows, int len) {
    GpuModel& g = *m.gpu;
    gpu_upload_batch(g, inputs, targets);
    gpu_forward(m, rows, len, StepOptions{}, false, 1.0f);
    mean_loss_gpu(g.step_loss, g.losses, g.targets, rows * len, 1.0f, false, g.stream);
    float loss = 0;
    CUDA_CHECK(cudaMemcpyAsync(&loss, g.step_loss, sizeof(float), cudaMemcpyDeviceToHost, g.stream));
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    return loss;
}

// logits [T, V] of one sequence into m.ref.logits (the GPU buffers hold up to B*T tokens)
static void gpu_logits(Model& m, const std::vector<int>& tokens) {
    GpuModel& g = *m.gpu;
    const int T = (int)tokens.size(), V = m.ref.cfg.vocab_size;
    if (T > g.T) {
        // longer than the training batches the buffers were sized for: use the CPU
        model_sync_host(m);
        ref_forward(m.ref, tokens.data(), nullptr, 1, T, StepOptions{});
        return;
    }
    gpu_upload_batch(g, tokens, std::vector<int>(T, -1));
    gpu_forward(m, 1, T, StepOptions{}, false, 1.0f);
    std::vector<float> logits = to_host(g.logits, (size_t)T * V);
    m.ref.logits.swap(logits);
}
