// decode.cu — the GPU decoder of decode.h (kernels in decode.cuh): prefill through the training forward (gpu_forward),
// then one token per sequence per step with the absorbed MLA form over the bf16 latent cache, GPU sampling, and the
// step captured in a CUDA graph (it is launch-bound: ~20 kernels and GEMMs per layer for a handful of rows).
#include "decode.cuh"

#include <algorithm>

// prompt tokens the prefill runs at once at most (bounds its activation memory)
constexpr long long PREFILL_TOKENS = 16384;

GpuDecoder* decoder_create(Model& m, int batch, int max_len, int max_prompt) {
    const Config& c = m.ref.cfg;
    if (batch < 1) fail("decode: batch %d must be positive", batch);
    if (max_len < 1 || max_len > c.max_position_embeddings)
        fail("decode: sequences of %d tokens are outside 1..%d (max_position_embeddings)", max_len, c.max_position_embeddings);
    if (max_prompt < 1 || max_prompt > max_len) fail("decode: prompts of %d tokens do not fit sequences of %d", max_prompt, max_len);
    if (!m.gpu) model_to_gpu(m, (int)std::max(1LL, std::min<long long>(batch, PREFILL_TOKENS / max_prompt)), max_prompt, true);
    if (m.gpu->N < max_prompt) fail("decode: the GPU buffers hold %d tokens, fewer than a %d-token prompt", m.gpu->N, max_prompt);
    GpuDecoder* dp = new GpuDecoder{&m, batch, max_len};
    GpuDecoder& d = *dp;
    const int B = batch, D = c.hidden_size, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim;
    const int dn = c.qk_nope_head_dim, dv = c.v_head_dim, V = c.vocab_size, E = c.n_routed_experts, K = c.num_experts_per_tok;
    const int I = c.intermediate_size, MI = c.moe_intermediate_size, SI = c.n_shared_experts * MI, S = B * K, width = dc + dr;
    int device = 0, sms = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    d.splits = flash_decode_splits(B, H, max_len, sms);

    d.cache = arena_alloc<bf16>(d.arena, (size_t)c.num_hidden_layers * B * max_len * width, "the latent KV cache");
    d.cache_bytes = d.arena.bytes;
    for (int** state : {&d.tokens, &d.pos, &d.gen, &d.active}) {
        *state = arena_alloc<int>(d.arena, B, "decode state");
        CUDA_CHECK(cudaMemset(*state, 0, B * sizeof(int)));
    }
    CUDA_CHECK(cudaMallocHost(&d.tokens_host, B * sizeof(int)));
    d.emb = arena_alloc<bf16>(d.arena, (size_t)B * D, "decode activations");
    d.res = arena_alloc<float>(d.arena, (size_t)B * D, "decode activations");
    d.xn = arena_alloc<bf16>(d.arena, (size_t)B * D, "decode activations");
    if (qr > 0) {
        d.qa = arena_alloc<bf16>(d.arena, (size_t)B * qr, "decode activations");
        d.qa_norm = arena_alloc<bf16>(d.arena, (size_t)B * qr, "decode activations");
    }
    d.q = arena_alloc<bf16>(d.arena, (size_t)B * H * (dn + dr), "decode activations");
    d.kv = arena_alloc<bf16>(d.arena, (size_t)B * width, "decode activations");
    d.qlat = arena_alloc<float>(d.arena, (size_t)B * H * width, "decode activations");
    d.part_acc = arena_alloc<float>(d.arena, (size_t)B * H * d.splits * dc, "decode activations");
    d.part_ml = arena_alloc<float2>(d.arena, (size_t)B * H * d.splits, "decode activations");
    d.o_lat = arena_alloc<float>(d.arena, (size_t)B * H * dc, "decode activations");
    d.o = arena_alloc<bf16>(d.arena, (size_t)B * H * dv, "decode activations");
    d.attn_out = arena_alloc<bf16>(d.arena, (size_t)B * D, "decode activations");
    d.ffn_out = arena_alloc<bf16>(d.arena, (size_t)B * D, "decode activations");
    d.logits = arena_alloc<bf16>(d.arena, (size_t)B * V, "decode logits");
    auto acts = [&](size_t n) { return arena_alloc<bf16>(d.arena, n, "decode activations"); };
    bf16* hidden = acts(std::max({(size_t)B * I, (size_t)S * MI, (size_t)B * SI}));
    if (c.first_k_dense_replace > 0 || E == 0) d.ffn = FfnActsGpu{acts((size_t)B * 2 * I), hidden, nullptr, nullptr};
    if (E > 0) d.moe = moe_layer_alloc(d.arena, c, B, 1, moe_shared_alloc(d.arena, c, B, FfnActsGpu{nullptr, hidden, nullptr, nullptr}, false));

    return dp;
}

void decoder_free(GpuDecoder* d) {
    if (!d) return;
    CUDA_CHECK(cudaStreamSynchronize(d->m->gpu->ctx.stream));
    if (d->graph) cudaGraphExecDestroy(d->graph);
    arena_free(d->arena);
    cudaFreeHost(d->tokens_host);
    delete d;
}

size_t decoder_cache_bytes_per_token(const GpuDecoder& d) { return d.cache_bytes / ((size_t)d.batch * d.max_len); }

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
    std::vector<int> pos(d.batch, 0), active(d.batch, 0);
    for (int b0 = 0; b0 < n; b0 += rows) {
        const int r = std::min(rows, n - b0);
        std::vector<int> tokens((size_t)r * T, 0), targets((size_t)r * T, -1);
        for (int i = 0; i < r; i++) std::copy(prompts[b0 + i].begin(), prompts[b0 + i].end(), tokens.begin() + (size_t)i * T);
        CUDA_CHECK(cudaMemcpyAsync(gpu.tokens, tokens.data(), tokens.size() * sizeof(int), cudaMemcpyHostToDevice, gpu.ctx.stream));
        CUDA_CHECK(cudaMemcpyAsync(gpu.targets, targets.data(), targets.size() * sizeof(int), cudaMemcpyHostToDevice, gpu.ctx.stream));
        gpu_forward(m, r, T, StepOptions{}, false, 1.0f);
        for (int l = 0; l < c.num_hidden_layers; l++) {
            bf16* cache_l = d.cache + (size_t)l * d.batch * d.max_len * (dc + dr);
            prefill_cache_gpu(cache_l, gpu.layers[l].attn.c_norm, gpu.layers[l].attn.kv_a, r * T, T, b0, dc, dr, d.max_len, gpu.ctx.stream);
        }
        for (int i = 0; i < r; i++) {
            const int b = b0 + i, len = (int)prompts[b].size();
            CUDA_CHECK(cudaMemcpyAsync(d.logits + (size_t)b * V, gpu.logits + ((size_t)i * T + len - 1) * V, (size_t)V * sizeof(bf16),
                                       cudaMemcpyDeviceToDevice, gpu.ctx.stream));
            pos[b] = len;
            active[b] = 1;
        }
        // the host vectors above are reused next round: wait until they are copied
        CUDA_CHECK(cudaStreamSynchronize(gpu.ctx.stream));
    }
    CUDA_CHECK(cudaMemcpyAsync(d.pos, pos.data(), d.batch * sizeof(int), cudaMemcpyHostToDevice, gpu.ctx.stream));
    CUDA_CHECK(cudaMemcpyAsync(d.active, active.data(), d.batch * sizeof(int), cudaMemcpyHostToDevice, gpu.ctx.stream));
    CUDA_CHECK(cudaMemsetAsync(d.gen, 0, d.batch * sizeof(int), gpu.ctx.stream));
    CUDA_CHECK(cudaStreamSynchronize(gpu.ctx.stream));
}

// The absorbed MLA of one token per sequence (x [B, D] at positions pos[b]), the GPU twin of decode.h's
// mla_decode_forward: appends each sequence's latent row to cache_l [B, max_len, dc+dr] and writes out [B, D].
static void mla_decode_forward_gpu(const Config& c, const MlaWeights<bf16>& w, const RopeGpu& rope, bf16* out, const bf16* x,
                                   bf16* cache_l, GpuDecoder& d, GpuContext& ctx) {
    const int B = d.batch, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim;
    const int dn = c.qk_nope_head_dim, dv = c.v_head_dim;
    cudaStream_t st = ctx.stream;
    if (qr > 0) {
        linear_forward_gpu(d.qa, x, w.q_a, B, ctx);
        rmsnorm_residual_forward_gpu(nullptr, d.qa_norm, nullptr, d.qa, nullptr, w.q_a_norm, B, qr, c.rms_norm_eps, st);
        linear_forward_gpu(d.q, d.qa_norm, w.q_b, B, ctx);
    } else {
        linear_forward_gpu(d.q, x, w.q_proj, B, ctx);
    }
    linear_forward_gpu(d.kv, x, w.kv_a, B, ctx);
    decode_cache_write_gpu(cache_l, d.kv, w.kv_a_norm, rope, d.pos, B, dc, dr, d.max_len, c.rms_norm_eps, st);
    decode_absorb_query_gpu(d.qlat, d.q, w.kv_b.w, rope, d.pos, B, H, dn, dr, dv, dc, st);
    flash_decode_gpu(d.o_lat, d.part_acc, d.part_ml, d.qlat, cache_l, d.pos, B, H, dc, dr, d.max_len, d.splits, rope.softmax_scale, st);
    decode_value_up_gpu(d.o, d.o_lat, w.kv_b.w, B, H, dn, dv, dc, st);
    linear_forward_gpu(out, d.o, w.o_proj, B, ctx);
}

void decoder_forward(GpuDecoder& d) {
    Model& m = *d.m;
    GpuModel& gpu = *m.gpu;
    GpuContext& ctx = gpu.ctx;
    const Config& c = m.ref.cfg;
    const int B = d.batch, D = c.hidden_size, width = c.kv_lora_rank + c.qk_rope_head_dim;
    const float eps = c.rms_norm_eps;
    cudaStream_t st = ctx.stream;
    embedding_forward_gpu(d.emb, d.tokens, gpu.w.embed, B, D, st);
    for (int l = 0; l < c.num_hidden_layers; l++) {
        const LayerWeights<bf16>& w = gpu.w.layers[l];
        // the fp32 residual stream, as in gpu_forward: res = emb (layer 0) or res +=
        // the previous layer's FFN output; xn = RMSNorm(res)
        rmsnorm_residual_forward_gpu<float>(d.res, d.xn, nullptr, l == 0 ? nullptr : d.res, l == 0 ? d.emb : d.ffn_out, w.input_norm, B, D,
                                            eps, st);
        mla_decode_forward_gpu(c, w.attn, gpu.rope, d.attn_out, d.xn, d.cache + (size_t)l * B * d.max_len * width, d, ctx);
        rmsnorm_residual_forward_gpu<float>(d.res, d.xn, nullptr, d.res, d.attn_out, w.post_norm, B, D, eps, st);
        if (c.is_moe_layer(l)) moe_forward_gpu(c, w.moe, gpu.master.layers[l].moe.bias, d.ffn_out, d.xn, B, d.moe, nullptr, ctx);
        else ffn_forward_gpu(w.ffn, d.ffn_out, d.xn, B, d.ffn, ctx);
    }
    rmsnorm_residual_forward_gpu<float>(d.res, d.xn, nullptr, d.res, d.ffn_out, gpu.w.final_norm, B, D, eps, st);
    linear_forward_gpu(d.logits, d.xn, gpu.w.lm_head, B, ctx);
    decode_advance_kernel<<<ceil_div(B, 256), 256, 0, st>>>(d.pos, d.active, B, d.max_len);
    CUDA_LAUNCH_CHECK();
}

void decoder_sample(GpuDecoder& d, const SamplingOptions& sampling, uint64_t seed) {
    sample_gpu(d.tokens, d.gen, nullptr, d.logits, d.active, d.batch, d.m->ref.cfg.vocab_size, sampling, seed, d.m->gpu->ctx.stream);
}

void decoder_step(GpuDecoder& d, const SamplingOptions& sampling, uint64_t seed, bool use_graph) {
    cudaStream_t st = d.m->gpu->ctx.stream;
    if (!use_graph) {
        decoder_forward(d);
        decoder_sample(d, sampling, seed);
        return;
    }
    const bool same = d.graph && d.graph_seed == seed && d.graph_sampling.temperature == sampling.temperature && d.graph_sampling.top_k == sampling.top_k &&
                      d.graph_sampling.top_p == sampling.top_p;
    if (!same) {
        if (d.graph) CUDA_CHECK(cudaGraphExecDestroy(d.graph));
        cudaGraph_t graph;
        // relaxed: the launchers' one-time shared-memory opt-ins may run while capturing
        CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed));
        decoder_forward(d);
        decoder_sample(d, sampling, seed);
        CUDA_CHECK(cudaStreamEndCapture(st, &graph));
        CUDA_CHECK(cudaGraphInstantiate(&d.graph, graph, 0));
        CUDA_CHECK(cudaGraphDestroy(graph));
        d.graph_sampling = sampling;
        d.graph_seed = seed;
    }
    CUDA_CHECK(cudaGraphLaunch(d.graph, st));
}

const int* decoder_tokens(GpuDecoder& d) {
    cudaStream_t st = d.m->gpu->ctx.stream;
    CUDA_CHECK(cudaMemcpyAsync(d.tokens_host, d.tokens, d.batch * sizeof(int), cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    return d.tokens_host;
}

void decoder_set_active(GpuDecoder& d, int b, bool active) {
    if (b < 0 || b >= d.batch) fail("decode: sequence %d is outside the batch of %d", b, d.batch);
    const int v = active;
    // pageable source: the copy is staged before this returns, and the stream orders it
    CUDA_CHECK(cudaMemcpyAsync(d.active + b, &v, sizeof(int), cudaMemcpyHostToDevice, d.m->gpu->ctx.stream));
}
