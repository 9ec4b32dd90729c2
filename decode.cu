// decode.cu — the GPU decoder declared in decode.cuh: prefill through the training
// forward (gpu_forward), then one token per sequence per step with the absorbed MLA
// form over the bf16 latent cache, GPU sampling, and the step captured in a CUDA
// graph (it is launch-bound: ~20 kernels and GEMMs per layer for a handful of rows).
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
    GpuDecoder* dp = new GpuDecoder();
    GpuDecoder& d = *dp;
    d.m = &m;
    d.batch = batch;
    d.max_len = max_len;
    const int B = batch, D = c.hidden_size, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim;
    const int dn = c.qk_nope_head_dim, dv = c.v_head_dim, V = c.vocab_size, E = c.n_routed_experts, K = c.num_experts_per_tok;
    const int I = c.intermediate_size, MI = c.moe_intermediate_size, SI = c.n_shared_experts * MI, S = B * K, width = dc + dr;
    int device = 0, sms = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    d.splits = flash_decode_splits(B, H, max_len, sms);

    d.cache = arena_alloc<bf16>(d.arena, (size_t)c.num_hidden_layers * B * max_len * width, "the latent KV cache");
    d.cache_bytes = d.arena.bytes;
    d.tokens = arena_alloc<int>(d.arena, B, "decode state");
    d.pos = arena_alloc<int>(d.arena, B, "decode state");
    d.gen = arena_alloc<int>(d.arena, B, "decode state");
    d.active = arena_alloc<int>(d.arena, B, "decode state");
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
    if (c.first_k_dense_replace > 0 || E == 0) {
        d.gate_up = arena_alloc<bf16>(d.arena, (size_t)B * 2 * I, "decode activations");
        d.hidden = arena_alloc<bf16>(d.arena, (size_t)B * I, "decode activations");
    }
    if (E > 0) {
        d.router_logits = arena_alloc<float>(d.arena, (size_t)B * E, "decode activations");
        d.scores = arena_alloc<float>(d.arena, (size_t)B * E, "decode activations");
        d.gate = arena_alloc<float>(d.arena, (size_t)B * K, "decode activations");
        d.expert = arena_alloc<int>(d.arena, (size_t)B * K, "decode activations");
        d.offsets = arena_alloc<int>(d.arena, E + 1, "decode activations");
        d.slot_row = arena_alloc<int>(d.arena, S, "decode activations");
        d.row_slot = arena_alloc<int>(d.arena, S, "decode activations");
        d.perm_scratch = arena_alloc<int>(d.arena, moe_permute_scratch_ints(S, E), "decode activations");
        d.x_sorted = arena_alloc<bf16>(d.arena, (size_t)S * D, "decode activations");
        d.gu_sorted = arena_alloc<bf16>(d.arena, (size_t)S * 2 * MI, "decode activations");
        d.h_sorted = arena_alloc<bf16>(d.arena, (size_t)S * MI, "decode activations");
        d.y_sorted = arena_alloc<bf16>(d.arena, (size_t)S * D, "decode activations");
        if (SI > 0) {
            d.shared_gu = arena_alloc<bf16>(d.arena, (size_t)B * 2 * SI, "decode activations");
            d.shared_h = arena_alloc<bf16>(d.arena, (size_t)B * SI, "decode activations");
            d.shared_out = arena_alloc<bf16>(d.arena, (size_t)B * D, "decode activations");
        }
    }
    CUDA_CHECK(cudaMemset(d.active, 0, B * sizeof(int)));
    CUDA_CHECK(cudaMemset(d.pos, 0, B * sizeof(int)));
    CUDA_CHECK(cudaMemset(d.gen, 0, B * sizeof(int)));
    CUDA_CHECK(cudaMemset(d.tokens, 0, B * sizeof(int)));

    // weight pointers, looked up by name once
    auto w = [&](const std::string& name) { return (const bf16*)gpu_tensor(m, name).w; };
    for (int l = 0; l < c.num_hidden_layers; l++) {
        const std::string p = strfmt("model.layers.%d.", l), a = p + "self_attn.";
        DecodeLayerWeights x = {};
        x.in_norm = w(p + "input_layernorm.weight");
        if (qr > 0) {
            x.q_a = w(a + "q_a_proj.weight");
            x.q_a_norm = w(a + "q_a_layernorm.weight");
            x.q_b = w(a + "q_b_proj.weight");
        } else {
            x.q_proj = w(a + "q_proj.weight");
        }
        x.kv_a = w(a + "kv_a_proj_with_mqa.weight");
        x.kv_a_norm = w(a + "kv_a_layernorm.weight");
        x.kv_b = w(a + "kv_b_proj.weight");
        x.o_proj = w(a + "o_proj.weight");
        x.post_norm = w(p + "post_attention_layernorm.weight");
        if (!c.is_moe_layer(l)) {
            x.gate_up = w(p + "mlp.gate_proj.weight");  // up_proj follows: one [2I, D] matrix
            x.down = w(p + "mlp.down_proj.weight");
        } else {
            x.router = w(p + "mlp.gate.weight");
            x.bias = m.gpu->params32 + m.ref.layout.offset_of(p + "mlp.gate.e_score_correction_bias");
            x.expert_gate_up = w(p + "mlp.experts.0.gate_proj.weight");
            x.expert_down = w(p + "mlp.experts.0.down_proj.weight");
            if (SI > 0) {
                x.shared_gate_up = w(p + "mlp.shared_experts.gate_proj.weight");
                x.shared_down = w(p + "mlp.shared_experts.down_proj.weight");
            }
        }
        d.w.push_back(x);
    }
    return dp;
}

void decoder_free(GpuDecoder* d) {
    if (!d) return;
    CUDA_CHECK(cudaStreamSynchronize(d->m->gpu->stream));
    if (d->graph) cudaGraphExecDestroy(d->graph);
    arena_free(d->arena);
    cudaFreeHost(d->tokens_host);
    delete d;
}

size_t decoder_cache_bytes_per_token(const GpuDecoder& d) { return d.cache_bytes / ((size_t)d.batch * d.max_len); }

void decoder_prefill(GpuDecoder& d, const std::vector<std::vector<int>>& prompts) {
    Model& m = *d.m;
    GpuModel& g = *m.gpu;
    const Config& c = m.ref.cfg;
    const int n = (int)prompts.size(), V = c.vocab_size, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim;
    if (n < 1 || n > d.batch) fail("decode: %d prompts for a batch of %d", n, d.batch);
    int T = 0;
    for (const std::vector<int>& p : prompts) {
        if (p.empty() || (int)p.size() > d.max_len) fail("decode: a prompt of %zu tokens is outside 1..%d", p.size(), d.max_len);
        if ((int)p.size() > g.N) fail("decode: a prompt of %zu tokens exceeds the GPU buffers (%d tokens)", p.size(), g.N);
        for (int id : p)
            if (id < 0 || id >= V) fail("decode: token id %d is outside the vocabulary (%d)", id, V);
        T = std::max(T, (int)p.size());
    }
    // right padding: causal attention never lets a real position see the padding,
    // and decode overwrites the padded cache rows before it attends to them
    const int rows = std::max(1, std::min(n, g.N / T));
    std::vector<int> pos(d.batch, 0), active(d.batch, 0);
    for (int b0 = 0; b0 < n; b0 += rows) {
        const int r = std::min(rows, n - b0);
        std::vector<int> tokens((size_t)r * T, 0), targets((size_t)r * T, -1);
        for (int i = 0; i < r; i++) std::copy(prompts[b0 + i].begin(), prompts[b0 + i].end(), tokens.begin() + (size_t)i * T);
        CUDA_CHECK(cudaMemcpyAsync(g.tokens, tokens.data(), tokens.size() * sizeof(int), cudaMemcpyHostToDevice, g.stream));
        CUDA_CHECK(cudaMemcpyAsync(g.targets, targets.data(), targets.size() * sizeof(int), cudaMemcpyHostToDevice, g.stream));
        gpu_forward(m, r, T, StepOptions{}, false, 1.0f);
        for (int l = 0; l < c.num_hidden_layers; l++) {
            bf16* cache_l = d.cache + (size_t)l * d.batch * d.max_len * (dc + dr);
            prefill_cache_gpu(cache_l, g.layers[l].c_norm, g.layers[l].kv_a, r * T, T, b0, dc, dr, d.max_len, g.stream);
        }
        for (int i = 0; i < r; i++) {
            const int b = b0 + i, len = (int)prompts[b].size();
            CUDA_CHECK(cudaMemcpyAsync(d.logits + (size_t)b * V, g.logits + ((size_t)i * T + len - 1) * V, (size_t)V * sizeof(bf16),
                                       cudaMemcpyDeviceToDevice, g.stream));
            pos[b] = len;
            active[b] = 1;
        }
        // the host vectors above are reused next round: wait until they are copied
        CUDA_CHECK(cudaStreamSynchronize(g.stream));
    }
    CUDA_CHECK(cudaMemcpyAsync(d.pos, pos.data(), d.batch * sizeof(int), cudaMemcpyHostToDevice, g.stream));
    CUDA_CHECK(cudaMemcpyAsync(d.active, active.data(), d.batch * sizeof(int), cudaMemcpyHostToDevice, g.stream));
    CUDA_CHECK(cudaMemsetAsync(d.gen, 0, d.batch * sizeof(int), g.stream));
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
}

// out[B, OC] = x[B, C] @ W^T
static void decode_linear(GpuModel& g, bf16* out, const bf16* x, const bf16* w, int B, int C, int OC) {
    matmul(g.mm, out, x, w, B, OC, C, false, true, 0.0f, false, g.stream);
}

void decoder_forward(GpuDecoder& d) {
    Model& m = *d.m;
    GpuModel& g = *m.gpu;
    const Config& c = m.ref.cfg;
    const int B = d.batch, D = c.hidden_size, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim;
    const int dn = c.qk_nope_head_dim, dv = c.v_head_dim, V = c.vocab_size, E = c.n_routed_experts, K = c.num_experts_per_tok;
    const int I = c.intermediate_size, MI = c.moe_intermediate_size, SI = c.n_shared_experts * MI, S = B * K;
    const float eps = c.rms_norm_eps;
    cudaStream_t st = g.stream;
    embedding_forward_gpu(d.emb, d.tokens, gpu_tensor(m, "model.embed_tokens.weight").w, B, D, st);
    for (int l = 0; l < c.num_hidden_layers; l++) {
        const DecodeLayerWeights& w = d.w[l];
        // the fp32 residual stream, as in gpu_forward: res = emb (layer 0) or res +=
        // the previous layer's FFN output; xn = RMSNorm(res)
        rmsnorm_residual_forward_gpu<float>(d.res, d.xn, nullptr, l == 0 ? nullptr : d.res, l == 0 ? d.emb : d.ffn_out, w.in_norm, B, D,
                                            eps, st);
        if (qr > 0) {
            decode_linear(g, d.qa, d.xn, w.q_a, B, D, qr);
            rmsnorm_residual_forward_gpu(nullptr, d.qa_norm, nullptr, d.qa, nullptr, w.q_a_norm, B, qr, eps, st);
            decode_linear(g, d.q, d.qa_norm, w.q_b, B, qr, H * (dn + dr));
        } else {
            decode_linear(g, d.q, d.xn, w.q_proj, B, D, H * (dn + dr));
        }
        decode_linear(g, d.kv, d.xn, w.kv_a, B, D, dc + dr);
        bf16* cache_l = d.cache + (size_t)l * B * d.max_len * (dc + dr);
        decode_cache_write_gpu(cache_l, d.kv, w.kv_a_norm, g.rope, d.pos, B, dc, dr, d.max_len, eps, st);
        decode_absorb_query_gpu(d.qlat, d.q, w.kv_b, g.rope, d.pos, B, H, dn, dr, dv, dc, st);
        flash_decode_gpu(d.o_lat, d.part_acc, d.part_ml, d.qlat, cache_l, d.pos, B, H, dc, dr, d.max_len, d.splits, g.rope.softmax_scale, st);
        decode_value_up_gpu(d.o, d.o_lat, w.kv_b, B, H, dn, dv, dc, st);
        decode_linear(g, d.attn_out, d.o, w.o_proj, B, H * dv, D);
        rmsnorm_residual_forward_gpu<float>(d.res, d.xn, nullptr, d.res, d.attn_out, w.post_norm, B, D, eps, st);
        if (!c.is_moe_layer(l)) {
            decode_linear(g, d.gate_up, d.xn, w.gate_up, B, D, 2 * I);
            swiglu_forward_fused_gpu(d.hidden, d.gate_up, B, I, st);
            decode_linear(g, d.ffn_out, d.hidden, w.down, B, I, D);
            continue;
        }
        matmul(g.mm, d.router_logits, d.xn, w.router, B, E, D, false, true, 0.0f, true, st);
        router_forward_gpu(d.scores, d.expert, d.gate, nullptr, d.router_logits, w.bias, c, B, st);
        moe_permute_gpu(d.offsets, d.slot_row, d.row_slot, d.perm_scratch, d.expert, S, E, st);
        moe_gather_gpu(d.x_sorted, d.xn, d.row_slot, B, K, D, st);
        const size_t expert_stride = (size_t)3 * MI * D;
        grouped_gemm_forward_gpu(d.gu_sorted, d.x_sorted, w.expert_gate_up, expert_stride, d.offsets, S, E, D, 2 * MI, st);
        swiglu_forward_fused_gpu(d.h_sorted, d.gu_sorted, S, MI, st);
        grouped_gemm_forward_gpu(d.y_sorted, d.h_sorted, w.expert_down, expert_stride, d.offsets, S, E, MI, D, st);
        if (SI > 0) {
            decode_linear(g, d.shared_gu, d.xn, w.shared_gate_up, B, D, 2 * SI);
            swiglu_forward_fused_gpu(d.shared_h, d.shared_gu, B, SI, st);
            decode_linear(g, d.shared_out, d.shared_h, w.shared_down, B, SI, D);
        }
        moe_combine_forward_gpu(d.ffn_out, d.y_sorted, d.gate, d.slot_row, SI > 0 ? d.shared_out : nullptr, B, K, D, st);
    }
    rmsnorm_residual_forward_gpu<float>(d.res, d.xn, nullptr, d.res, d.ffn_out, gpu_tensor(m, "model.norm.weight").w, B, D, eps, st);
    decode_linear(g, d.logits, d.xn, gpu_tensor(m, "lm_head.weight").w, B, D, V);
    decode_advance_kernel<<<ceil_div(B, 256), 256, 0, st>>>(d.pos, d.active, B, d.max_len);
    CUDA_LAUNCH_CHECK();
}

void decoder_sample(GpuDecoder& d, const SamplingOptions& so, uint64_t seed) {
    sample_gpu(d.tokens, d.gen, nullptr, d.logits, d.active, d.batch, d.m->ref.cfg.vocab_size, so, seed, d.m->gpu->stream);
}

void decoder_step(GpuDecoder& d, const SamplingOptions& so, uint64_t seed, bool use_graph) {
    cudaStream_t st = d.m->gpu->stream;
    if (!use_graph) {
        decoder_forward(d);
        decoder_sample(d, so, seed);
        return;
    }
    const bool same = d.graph && d.graph_seed == seed && d.graph_so.temperature == so.temperature && d.graph_so.top_k == so.top_k &&
                      d.graph_so.top_p == so.top_p;
    if (!same) {
        if (d.graph) CUDA_CHECK(cudaGraphExecDestroy(d.graph));
        cudaGraph_t graph;
        // relaxed: the launchers' one-time shared-memory opt-ins may run while capturing
        CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed));
        decoder_forward(d);
        decoder_sample(d, so, seed);
        CUDA_CHECK(cudaStreamEndCapture(st, &graph));
        CUDA_CHECK(cudaGraphInstantiate(&d.graph, graph, 0));
        CUDA_CHECK(cudaGraphDestroy(graph));
        d.graph_so = so;
        d.graph_seed = seed;
    }
    CUDA_CHECK(cudaGraphLaunch(d.graph, st));
}

const int* decoder_tokens(GpuDecoder& d) {
    cudaStream_t st = d.m->gpu->stream;
    CUDA_CHECK(cudaMemcpyAsync(d.tokens_host, d.tokens, d.batch * sizeof(int), cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    return d.tokens_host;
}

void decoder_set_active(GpuDecoder& d, int b, bool active) {
    if (b < 0 || b >= d.batch) fail("decode: sequence %d is outside the batch of %d", b, d.batch);
    const int v = active;
    // pageable source: the copy is staged before this returns, and the stream orders it
    CUDA_CHECK(cudaMemcpyAsync(d.active + b, &v, sizeof(int), cudaMemcpyHostToDevice, d.m->gpu->stream));
}
