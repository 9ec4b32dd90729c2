// decode.cu — the GPU decoder of decode.h (kernels in decode.cuh): prefill through the training forward (gpu_forward),
// then one token per sequence per step with the absorbed MLA form over the bf16 latent cache, GPU sampling, and the
// step captured in a CUDA graph (it is launch-bound: ~20 kernels and GEMMs per layer for a handful of rows). With the
// MTP module a speculative step drafts a token per sequence and verifies it in the same pass as the last one.
#include "decode.cuh"

#include <algorithm>

// prompt tokens the prefill runs at once at most (bounds its activation memory)
constexpr long long PREFILL_TOKENS = 16384;

// A step of up to this many rows runs its bf16 Linears on gemv_forward_gpu and its MoE layers on
// moe_decode_forward_gpu, with the norms folded in (decode_fused); more rows take the training form (cuBLASLt,
// moe_forward_gpu). The kernels take up to GEMV_MAX_ROWS, but at 8 rows the GEMVs cost more than cuBLASLt's GEMMs
// (1.438 against 1.252 ms a step) and at 6 a little (1.214 against 1.187; bench/RESULTS.md, session 18).
constexpr int DECODE_GEMV_MAX_ROWS = 4;
static_assert(DECODE_GEMV_MAX_ROWS <= GEMV_MAX_ROWS, "the GEMV and MoE decoding kernels' rows");

GpuDecoder* decoder_create(Model& m, int batch, int max_len, int max_prompt, bool speculative) {
    const Config& c = m.ref.cfg;
    if (batch < 1) fail("decode: batch %d must be positive", batch);
    if (speculative && c.num_nextn_predict_layers == 0) fail("decode: speculative decoding needs the MTP module (num_nextn_predict_layers is 0)");
    if (max_len < 1 || max_len > c.max_position_embeddings)
        fail("decode: sequences of %d tokens are outside 1..%d (max_position_embeddings)", max_len, c.max_position_embeddings);
    if (max_prompt < 1 || max_prompt > max_len) fail("decode: prompts of %d tokens do not fit sequences of %d", max_prompt, max_len);
    if (!m.gpu) model_to_gpu(m, (int)std::max(1LL, std::min<long long>(batch, PREFILL_TOKENS / max_prompt)), max_prompt, true);
    if (m.gpu->N < max_prompt) fail("decode: the GPU buffers hold %d tokens, fewer than a %d-token prompt", m.gpu->N, max_prompt);
    GpuDecoder* dp = new GpuDecoder{&m, batch, max_len, 0, speculative, speculative ? 2 * batch : batch};
    GpuDecoder& d = *dp;
    const int B = d.rows, D = c.hidden_size, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim;
    const int dn = c.qk_nope_head_dim, dv = c.v_head_dim, V = c.vocab_size, E = c.n_routed_experts, K = c.num_experts_per_tok;
    const int I = c.intermediate_size, MI = c.moe_intermediate_size, SI = c.n_shared_experts * MI, S = B * K, width = dc + dr;
    int device = 0, sms = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    d.splits = flash_decode_splits(B, H, max_len, sms);

    // below, B is the step's rows; the cache and the per-sequence state are the batch's
    d.cache = arena_alloc<bf16>(d.arena, (size_t)(c.num_hidden_layers + speculative) * batch * max_len * width, "the latent KV cache");
    d.cache_bytes = d.arena.bytes;
    for (int** state : {&d.tokens, &d.pos, &d.gen, &d.active}) {
        *state = arena_alloc<int>(d.arena, batch, "decode state");
        CUDA_CHECK(cudaMemset(*state, 0, batch * sizeof(int)));
    }
    CUDA_CHECK(cudaMallocHost(&d.tokens_host, batch * sizeof(int)));
    d.active_host.assign(batch, 0);
    d.prefill_rows = arena_alloc<int>(d.arena, 3 * (size_t)batch, "decode state");
    if (speculative) {
        for (int** state : {&d.rows_tokens, &d.mtp_tokens}) {
            *state = arena_alloc<int>(d.arena, B, "decode state");
            CUDA_CHECK(cudaMemset(*state, 0, B * sizeof(int)));
        }
        d.mtp_h = arena_alloc<bf16>(d.arena, (size_t)B * D, "decode state");
        CUDA_CHECK(cudaMemset(d.mtp_h, 0, (size_t)B * D * sizeof(bf16)));  // unused rows still run: finite inputs
        d.mtp_cat = arena_alloc<bf16>(d.arena, (size_t)B * 2 * D, "decode activations");
        d.main_probs = arena_alloc<float>(d.arena, (size_t)batch * V, "decode activations");
        d.draft_probs = arena_alloc<float>(d.arena, (size_t)batch * V, "decode activations");
        d.next = arena_alloc<int>(d.arena, batch, "decode state");
        d.out = arena_alloc<int>(d.arena, 3 * batch, "decode state");  // out [batch, 2], then count [batch]
        d.count = d.out + 2 * batch;
        CUDA_CHECK(cudaMallocHost(&d.out_host, 3 * batch * sizeof(int)));
    }
    d.emb = arena_alloc<bf16>(d.arena, (size_t)B * D, "decode activations");
    d.res = arena_alloc<float>(d.arena, (size_t)B * D, "decode activations");
    d.xn = arena_alloc<bf16>(d.arena, (size_t)B * D, "decode activations");
    // every step writes d.xn before reading it; zeroed here because compute-sanitizer's initcheck checks the sources
    // of a graph's copies (speculative_forward_sample's) when the graph is launched, before its kernels have run
    CUDA_CHECK(cudaMemset(d.xn, 0, (size_t)B * D * sizeof(bf16)));
    if (qr > 0) {
        d.qa = arena_alloc<bf16>(d.arena, (size_t)B * qr, "decode activations");
        d.qa_norm = arena_alloc<bf16>(d.arena, (size_t)B * qr, "decode activations");
    }
    d.q = arena_alloc<bf16>(d.arena, (size_t)B * H * (dn + dr), "decode activations");
    d.kv = arena_alloc<bf16>(d.arena, (size_t)B * width, "decode activations");
    d.qlat = arena_alloc<float>(d.arena, (size_t)B * H * width, "decode activations");
    d.part_acc = arena_alloc<float>(d.arena, (size_t)B * H * d.splits * dc, "decode activations");
    d.part_ml = arena_alloc<float2>(d.arena, (size_t)B * H * d.splits, "decode activations");
    d.flash_done = arena_alloc<int>(d.arena, (size_t)B * H, "decode state");
    CUDA_CHECK(cudaMemset(d.flash_done, 0, (size_t)B * H * sizeof(int)));
    d.o_lat = arena_alloc<float>(d.arena, (size_t)B * H * dc, "decode activations");
    d.o = arena_alloc<bf16>(d.arena, (size_t)B * H * dv, "decode activations");
    d.attn_out = arena_alloc<bf16>(d.arena, (size_t)B * D, "decode activations");
    d.ffn_out = arena_alloc<bf16>(d.arena, (size_t)B * D, "decode activations");
    d.logits = arena_alloc<bf16>(d.arena, (size_t)B * V, "decode logits");
    auto acts = [&](size_t n) { return arena_alloc<bf16>(d.arena, n, "decode activations"); };
    bf16* hidden = acts(std::max({(size_t)B * I, (size_t)S * MI, (size_t)B * SI}));
    if (c.first_k_dense_replace > 0 || E == 0) d.ffn = FfnActsGpu{acts((size_t)B * 2 * I), hidden, nullptr, nullptr};
    if (E > 0) d.moe = moe_layer_alloc(d.arena, c, B, 1, moe_shared_alloc(d.arena, c, B, FfnActsGpu{nullptr, hidden, nullptr, nullptr}, false), false);
    if (E > 0 && B <= DECODE_GEMV_MAX_ROWS) d.moe_hidden = acts((size_t)B * (K * MI + SI));

    return dp;
}

void decoder_free(GpuDecoder* d) {
    if (!d) return;
    CUDA_CHECK(cudaStreamSynchronize(d->m->gpu->ctx.stream));
    if (d->graph) cudaGraphExecDestroy(d->graph);
    arena_free(d->arena);
    cudaFreeHost(d->tokens_host);
    if (d->out_host) cudaFreeHost(d->out_host);
    delete d;
}

size_t decoder_cache_bytes_per_token(const GpuDecoder& d) { return d.cache_bytes / ((size_t)d.batch * d.max_len); }

// The speculative state after the prefill of sequences b0 .. b0 + r - 1 (rows of T tokens in gpu_forward's batch):
// the MTP module's cache from its prefill, and its two rows' inputs at the prompt's last two positions (both at 0
// after a one-token prompt; the rows' positions follow from pos = len, decode.cuh DecodeRows), gathered from the
// rows d.prefill_rows[r .. 3r) that decoder_prefill uploaded.
static void speculative_prefill(GpuDecoder& d, const std::vector<std::vector<int>>& prompts, int b0, int r, int T, std::vector<int>& mtp_tokens) {
    Model& m = *d.m;
    GpuModel& gpu = *m.gpu;
    const Config& c = m.ref.cfg;
    const int B = d.batch, D = c.hidden_size, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim, L = c.num_hidden_layers;
    gpu_mtp_prefill(m, r, T);
    bf16* cache_mtp = d.cache + (size_t)L * B * d.max_len * (dc + dr);
    prefill_cache_gpu(cache_mtp, gpu.layers[L].attn.c_norm, gpu.layers[L].attn.kv_a, r * T, T, b0, dc, dr, d.max_len, gpu.ctx.stream);
    // moe.cuh's row gather with K = 1: row i of the destination is row prefill_rows[i] of hn
    for (int k : {0, 1})
        moe_gather_gpu(d.mtp_h + (size_t)(k * B + b0) * D, gpu.hn, d.prefill_rows + (size_t)(k + 1) * r, r, 1, D, gpu.ctx.stream);
    for (int b = b0; b < b0 + r; b++) mtp_tokens[b] = prompts[b].back();  // speculative_inputs_kernel replaces it when both rows are at 0
}

size_t decoder_device_bytes(const GpuDecoder& d) { return d.arena.bytes; }

void decoder_prefill(GpuDecoder& d, const std::vector<std::vector<int>>& prompts) {
    Model& m = *d.m;
    GpuModel& gpu = *m.gpu;
    const Config& c = m.ref.cfg;
    const int n = (int)prompts.size(), V = c.vocab_size, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim;
    if (n < 1 || n > d.batch) fail("decode: %d prompts for a batch of %d", n, d.batch);
    int T = 0;
    for (const std::vector<int>& p : prompts) {
        if (p.empty() || (int)p.size() > d.max_len) fail("decode: a prompt of %zu tokens is outside 1..%d", p.size(), d.max_len);
        if ((int)p.size() > gpu.N) fail("decode: a prompt of %zu tokens exceeds the GPU buffers (%d tokens)", p.size(), gpu.N);
        for (int id : p)
            if (id < 0 || id >= V) fail("decode: token id %d is outside the vocabulary (%d)", id, V);
        T = std::max(T, (int)p.size());
    }
    // right padding: causal attention never lets a real position see the padding,
    // and decode overwrites the padded cache rows before it attends to them
    const int rows = std::max(1, std::min(n, gpu.N / T));
    std::vector<int> pos(d.batch, 0), active(d.batch, 0), mtp_tokens(2 * d.batch, 0);
    for (int b0 = 0; b0 < n; b0 += rows) {
        const int r = std::min(rows, n - b0);
        // gathered rows of the chunk's output, one copy for all of them: each prompt's last (its logits), then the
        // MTP module's two (speculative_prefill)
        std::vector<int> tokens((size_t)r * T, 0), targets((size_t)r * T, -1), gather(3 * (size_t)r);
        for (int i = 0; i < r; i++) {
            const std::vector<int>& p = prompts[b0 + i];
            const int len = (int)p.size();
            std::copy(p.begin(), p.end(), tokens.begin() + (size_t)i * T);
            if (d.speculative)  // the MTP module's prefill reads the next tokens as targets
                std::copy(p.begin() + 1, p.end(), targets.begin() + (size_t)i * T);
            gather[i] = gather[2 * r + i] = i * T + len - 1;
            gather[r + i] = i * T + std::max(len - 2, 0);
        }
        CUDA_CHECK(cudaMemcpyAsync(gpu.tokens, tokens.data(), tokens.size() * sizeof(int), cudaMemcpyHostToDevice, gpu.ctx.stream));
        CUDA_CHECK(cudaMemcpyAsync(gpu.targets, targets.data(), targets.size() * sizeof(int), cudaMemcpyHostToDevice, gpu.ctx.stream));
        CUDA_CHECK(cudaMemcpyAsync(d.prefill_rows, gather.data(), gather.size() * sizeof(int), cudaMemcpyHostToDevice, gpu.ctx.stream));
        gpu_forward(m, r, T, StepOptions{}, false, 1.0f);
        for (int l = 0; l < c.num_hidden_layers; l++) {
            bf16* cache_l = d.cache + (size_t)l * d.batch * d.max_len * (dc + dr);
            prefill_cache_gpu(cache_l, gpu.layers[l].attn.c_norm, gpu.layers[l].attn.kv_a, r * T, T, b0, dc, dr, d.max_len, gpu.ctx.stream);
        }
        if (d.speculative) speculative_prefill(d, prompts, b0, r, T, mtp_tokens);
        moe_gather_gpu(d.logits + (size_t)b0 * V, gpu.logits, d.prefill_rows, r, 1, V, gpu.ctx.stream);
        for (int b = b0; b < b0 + r; b++) {
            pos[b] = (int)prompts[b].size();
            active[b] = 1;
        }
        // the host vectors above are reused next round: wait until they are copied
        CUDA_CHECK(cudaStreamSynchronize(gpu.ctx.stream));
    }
    CUDA_CHECK(cudaMemcpyAsync(d.pos, pos.data(), d.batch * sizeof(int), cudaMemcpyHostToDevice, gpu.ctx.stream));
    CUDA_CHECK(cudaMemcpyAsync(d.active, active.data(), d.batch * sizeof(int), cudaMemcpyHostToDevice, gpu.ctx.stream));
    d.active_host = active;
    d.active_changed = false;
    CUDA_CHECK(cudaMemsetAsync(d.gen, 0, d.batch * sizeof(int), gpu.ctx.stream));
    if (d.speculative)
        CUDA_CHECK(cudaMemcpyAsync(d.mtp_tokens, mtp_tokens.data(), mtp_tokens.size() * sizeof(int), cudaMemcpyHostToDevice, gpu.ctx.stream));
    CUDA_CHECK(cudaStreamSynchronize(gpu.ctx.stream));
}

// A Linear of the step's R rows: gemv_forward_gpu for a decoding step's few rows on bf16 weights, else as in training
static void decode_linear_gpu(bf16* out, const bf16* x, const Linear<bf16>& w, int R, GpuContext& ctx) {
    if (R <= DECODE_GEMV_MAX_ROWS && !w.fp8) gemv_forward_gpu(out, x, w.w, R, w.in, w.out, ctx.stream);
    else linear_forward_gpu(out, x, w, R, ctx);
}

// The step takes its fused form when its rows fit the GEMVs and its weights are bf16 (an FP8 model's Linears keep the
// training form): each norm that only GEMVs read is folded into them (gemv_forward_gpu's GemvExtra), q_a and kv_a run
// in one launch, and o_proj and the FFN's last GEMV add their outputs into the residual stream themselves. At batch 1
// that takes 4 of a MoE layer's 15 launches (bench/RESULTS.md, batch-1 decoding).
static bool decode_fused(const GpuDecoder& d, int R) {
    return R <= DECODE_GEMV_MAX_ROWS && d.m->gpu->fp8.empty() && (d.m->ref.cfg.n_routed_experts == 0 || d.moe_hidden);
}

// The absorbed MLA's core on the step's R rows (d.q [R, H*(dn+dr)] and d.kv [R, dc+dr], the input projections'
// outputs; row b at rows' position of sequence b % batch, decode.cuh DecodeRows), the GPU twin of decode.h's
// mla_decode_forward: appends each row's latent to cache_l [batch, max_len, dc+dr] and writes d.o [R, H*dv], o_proj's
// input.
static void mla_decode_attention_gpu(const Config& c, const MlaWeights<bf16>& w, const RopeGpu& rope, bf16* cache_l, int R,
                                     const DecodeRows& rows, GpuDecoder& d, cudaStream_t st) {
    const int H = c.num_attention_heads, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim, dv = c.v_head_dim;
    decode_attention_inputs_gpu(cache_l, d.qlat, d.kv, w.kv_a_norm, d.q, w.kv_b.w, rope, rows, R, H, dn, dr, dv, dc, c.rms_norm_eps, st);
    flash_decode_gpu(d.o_lat, d.part_acc, d.part_ml, d.flash_done, d.qlat, cache_l, rows, R, H, dc, dr, d.splits, rope.softmax_scale, st);
    decode_value_up_gpu(d.o, d.o_lat, w.kv_b.w, R, H, dn, dv, dc, st);
}

// Block l (a main layer, or the MTP module's) on the step's R rows at the sequences' positions plus shift (decode.cuh
// DecodeRows). On entry the fp32 residual stream d.res holds everything before the block but pending (the first
// block: d.res = pending; null: nothing). Returns what the stream has still to take after the block: the FFN's output
// d.ffn_out, or null where the FFN added it itself.
static const bf16* block_decode_forward_gpu(GpuDecoder& d, int l, const bf16* pending, bool first, int R, int shift) {
    GpuModel& gpu = *d.m->gpu;
    GpuContext& ctx = gpu.ctx;
    const Config& c = d.m->ref.cfg;
    const int D = c.hidden_size, qr = c.q_lora_rank, width = c.kv_lora_rank + c.qk_rope_head_dim;
    const float eps = c.rms_norm_eps;
    const LayerWeights<bf16>& w = block_weights(gpu.w, l);
    const MlaWeights<bf16>& a = w.attn;
    const bool fused = decode_fused(d, R);
    cudaStream_t st = ctx.stream;
    // where the stream has a branch to take (or the step is not fused) the norm kernel takes it and writes d.xn
    const bool normed = pending || !fused;
    if (normed) rmsnorm_residual_forward_gpu<float>(d.res, d.xn, nullptr, first ? nullptr : d.res, pending, w.input_norm, R, D, eps, st);

    // attention's input projections: d.q and d.kv
    if (fused) {
        const Linear<bf16>& q_in = qr > 0 ? a.q_a : a.q_proj;
        GemvExtra<bf16> e;
        e.out2 = d.kv;
        e.w2 = a.kv_a.w;
        e.out2_cols = width;
        if (normed) {
            gemv_forward_gpu(qr > 0 ? d.qa : d.q, d.xn, q_in.w, R, D, q_in.out, st, e);
        } else {
            e.norm = w.input_norm;
            e.eps = eps;
            gemv_forward_gpu(qr > 0 ? d.qa : d.q, d.res, q_in.w, R, D, q_in.out, st, e);
        }
        if (qr > 0) {
            GemvExtra<bf16> qn;
            qn.norm = a.q_a_norm;
            qn.eps = eps;
            gemv_forward_gpu(d.q, d.qa, a.q_b.w, R, qr, a.q_b.out, st, qn);
        }
    } else {
        if (qr > 0) {
            decode_linear_gpu(d.qa, d.xn, a.q_a, R, ctx);
            rmsnorm_residual_forward_gpu(nullptr, d.qa_norm, nullptr, d.qa, nullptr, a.q_a_norm, R, qr, eps, st);
            decode_linear_gpu(d.q, d.qa_norm, a.q_b, R, ctx);
        } else {
            decode_linear_gpu(d.q, d.xn, a.q_proj, R, ctx);
        }
        decode_linear_gpu(d.kv, d.xn, a.kv_a, R, ctx);
    }
    mla_decode_attention_gpu(c, a, gpu.rope, d.cache + (size_t)l * d.batch * d.max_len * width, R, DecodeRows{d.pos, d.batch, shift, d.max_len},
                             d, st);
    if (fused) {
        gemv_residual_add_gpu(d.res, d.o, a.o_proj.w, R, a.o_proj.in, D, st);
    } else {
        decode_linear_gpu(d.attn_out, d.o, a.o_proj, R, ctx);
        rmsnorm_residual_forward_gpu<float>(d.res, d.xn, nullptr, d.res, d.attn_out, w.post_norm, R, D, eps, st);
    }

    if (c.is_moe_layer(l)) {  // an FP8 shared expert keeps the training form, as the Linears do
        const float* bias = block_weights(gpu.master, l).moe.bias;
        if (d.moe_hidden && !w.moe.shared.gate.fp8) {
            moe_decode_forward_gpu(c, w.moe, bias, d.res, d.xn, fused ? w.post_norm : nullptr, R, d.moe, d.moe_hidden, ctx);
            return nullptr;
        }
        moe_forward_gpu(c, w.moe, bias, d.ffn_out, d.xn, R, d.moe, nullptr, ctx);
    } else if (fused) {  // ffn_forward_gpu on gemv_forward_gpu, the post-attention norm folded into gate_up
        const int I = w.ffn.gate.out;
        GemvExtra<bf16> e;
        e.norm = w.post_norm;
        e.eps = eps;
        gemv_forward_gpu(d.ffn.gate_up, d.res, gate_up(w.ffn).w, R, D, 2 * I, st, e);
        swiglu_forward_fused_gpu(d.ffn.hidden, d.ffn.gate_up, R, I, st);
        gemv_residual_add_gpu(d.res, d.ffn.hidden, w.ffn.down.w, R, I, D, st);
        return nullptr;
    } else {
        ffn_forward_gpu(w.ffn, d.ffn_out, d.xn, R, d.ffn, ctx);
    }
    return d.ffn_out;
}

// The main model on the step's R rows (tokens [R], at the sequences' positions): d.xn [R, D] ends as its normed
// output, d.logits [R, V] as the head's.
static void main_decode_forward_gpu(GpuDecoder& d, int R, const int* tokens) {
    GpuModel& gpu = *d.m->gpu;
    const Config& c = d.m->ref.cfg;
    const int D = c.hidden_size;
    cudaStream_t st = gpu.ctx.stream;
    embedding_forward_gpu(d.emb, tokens, gpu.w.embed, R, D, st);
    const bf16* pending = d.emb;
    for (int l = 0; l < c.num_hidden_layers; l++) pending = block_decode_forward_gpu(d, l, pending, l == 0, R, 0);
    rmsnorm_residual_forward_gpu<float>(d.res, d.xn, nullptr, d.res, pending, gpu.w.final_norm, R, D, c.rms_norm_eps, st);
    decode_linear_gpu(d.logits, d.xn, gpu.w.lm_head, R, gpu.ctx);
}

// uploads what decoder_set_active changed since the last upload: one copy, however many sequences stopped
static void upload_active(GpuDecoder& d) {
    if (!d.active_changed) return;
    // pageable source: the copy is staged before this returns, and the stream orders it
    CUDA_CHECK(cudaMemcpyAsync(d.active, d.active_host.data(), d.batch * sizeof(int), cudaMemcpyHostToDevice, d.m->gpu->ctx.stream));
    d.active_changed = false;
}

void decoder_forward(GpuDecoder& d) {
    upload_active(d);  // nothing, inside decoder_step's capture: it uploaded first
    if (d.speculative) fail("internal: decoder_forward on a speculative decoder");
    main_decode_forward_gpu(d, d.batch, d.tokens);
    decode_advance_kernel<<<ceil_div(d.batch, 256), 256, 0, d.m->gpu->ctx.stream>>>(d.pos, d.active, d.batch, d.max_len);
    CUDA_LAUNCH_CHECK();
}

// The MTP module on the step's 2 x batch rows (decode.h mtp_decode_step), two positions behind the main model's:
// d.logits [batch, V] ends as its head's output at the second rows, the drafts' logits.
static void mtp_decode_forward_gpu(GpuDecoder& d) {
    GpuModel& gpu = *d.m->gpu;
    const Config& c = d.m->ref.cfg;
    const MtpWeights<bf16>& w = gpu.w.mtp;
    const int B = d.batch, R = d.rows, D = c.hidden_size;
    const float eps = c.rms_norm_eps;
    const size_t row = (size_t)D * sizeof(bf16);
    cudaStream_t st = gpu.ctx.stream;
    embedding_forward_gpu(d.emb, d.mtp_tokens, gpu.w.embed, R, D, st);
    rmsnorm_residual_forward_gpu<bf16>(nullptr, d.xn, nullptr, d.emb, nullptr, w.enorm, R, D, eps, st);
    CUDA_CHECK(cudaMemcpy2DAsync(d.mtp_cat, 2 * row, d.xn, row, row, R, cudaMemcpyDeviceToDevice, st));
    rmsnorm_residual_forward_gpu<bf16>(nullptr, d.xn, nullptr, d.mtp_h, nullptr, w.hnorm, R, D, eps, st);
    CUDA_CHECK(cudaMemcpy2DAsync(d.mtp_cat + D, 2 * row, d.xn, row, row, R, cudaMemcpyDeviceToDevice, st));
    decode_linear_gpu(d.emb, d.mtp_cat, w.eh_proj, R, gpu.ctx);
    const bf16* pending = block_decode_forward_gpu(d, c.num_hidden_layers, d.emb, true, R, -2);
    rmsnorm_residual_forward_gpu<float>(d.res, d.xn, nullptr, d.res, pending, w.head_norm, R, D, eps, st);
    decode_linear_gpu(d.logits, d.xn + (size_t)B * D, gpu.w.lm_head, B, gpu.ctx);
}

// One speculative step (decode.cuh, speculative_accept_kernel): draft, verify x and the draft in one pass of the
// main model, take one or two tokens. Four draws per sequence: the draft, p's (only its distribution is used),
// the token after the draft, and the verdict's two coins.
static void speculative_forward_sample(GpuDecoder& d, const SamplingOptions& so, uint64_t seed) {
    GpuModel& gpu = *d.m->gpu;
    const int B = d.batch, V = d.m->ref.cfg.vocab_size, D = d.m->ref.cfg.hidden_size;
    cudaStream_t st = gpu.ctx.stream;
    speculative_inputs_kernel<<<ceil_div(B, 256), 256, 0, st>>>(d.rows_tokens, d.mtp_tokens, d.tokens, d.pos, B, d.max_len);
    CUDA_LAUNCH_CHECK();
    mtp_decode_forward_gpu(d);
    sample_gpu(d.rows_tokens + B, d.gen, d.draft_probs, d.logits, d.active, B, V, so, seed, st);
    main_decode_forward_gpu(d, d.rows, d.rows_tokens);
    sample_gpu(d.next, d.gen, d.main_probs, d.logits, d.active, B, V, so, seed, st);  // its token is overwritten next
    sample_gpu(d.next, d.gen, nullptr, d.logits + (size_t)B * V, d.active, B, V, so, seed, st);
    speculative_accept_kernel<<<B, SAMPLE_THREADS, 0, st>>>(d.out, d.count, d.tokens, d.pos, d.rows_tokens, d.mtp_tokens, d.mtp_h, d.gen,
                                                            d.main_probs, d.draft_probs, d.next, d.xn, d.active, B, V, D, d.max_len, seed);
    CUDA_LAUNCH_CHECK();
}

static void sample_launch(GpuDecoder& d, const SamplingOptions& sampling, uint64_t seed) {
    sample_gpu(d.tokens, d.gen, nullptr, d.logits, d.active, d.batch, d.m->ref.cfg.vocab_size, sampling, seed, d.m->gpu->ctx.stream);
}

void decoder_sample(GpuDecoder& d, const SamplingOptions& sampling, uint64_t seed) {
    upload_active(d);
    sample_launch(d, sampling, seed);
}

// a plain step (decoder_forward + sampling) or a speculative one
static void step_launch(GpuDecoder& d, const SamplingOptions& sampling, uint64_t seed) {
    if (d.speculative) return speculative_forward_sample(d, sampling, seed);
    decoder_forward(d);
    sample_launch(d, sampling, seed);
}

void decoder_step(GpuDecoder& d, const SamplingOptions& sampling, uint64_t seed, bool use_graph) {
    cudaStream_t st = d.m->gpu->ctx.stream;
    upload_active(d);
    if (!use_graph) return step_launch(d, sampling, seed);
    const bool same = d.graph && d.graph_seed == seed && d.graph_sampling.temperature == sampling.temperature && d.graph_sampling.top_k == sampling.top_k &&
                      d.graph_sampling.top_p == sampling.top_p;
    if (!same) {
        if (d.graph) CUDA_CHECK(cudaGraphExecDestroy(d.graph));
        cudaGraph_t graph;
        // relaxed: the launchers' one-time shared-memory opt-ins may run while capturing
        CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed));
        step_launch(d, sampling, seed);
        CUDA_CHECK(cudaStreamEndCapture(st, &graph));
        CUDA_CHECK(cudaGraphInstantiate(&d.graph, graph, 0));
        CUDA_CHECK(cudaGraphDestroy(graph));
        d.graph_sampling = sampling;
        d.graph_seed = seed;
    }
    CUDA_CHECK(cudaGraphLaunch(d.graph, st));
}

const int* decoder_speculative_tokens(GpuDecoder& d, const int** count) {
    if (!d.speculative) fail("internal: decoder_speculative_tokens on a plain decoder");
    cudaStream_t st = d.m->gpu->ctx.stream;
    CUDA_CHECK(cudaMemcpyAsync(d.out_host, d.out, 3 * d.batch * sizeof(int), cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    *count = d.out_host + 2 * d.batch;
    return d.out_host;
}

const int* decoder_tokens(GpuDecoder& d) {
    cudaStream_t st = d.m->gpu->ctx.stream;
    CUDA_CHECK(cudaMemcpyAsync(d.tokens_host, d.tokens, d.batch * sizeof(int), cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    return d.tokens_host;
}

void decoder_set_active(GpuDecoder& d, int b, bool active) {
    if (b < 0 || b >= d.batch) fail("decode: sequence %d is outside the batch of %d", b, d.batch);
    d.active_host[b] = active;
    d.active_changed = true;
}
