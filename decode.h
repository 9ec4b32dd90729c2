// decode.h — incremental decoding on the CPU reference with the absorbed MLA form (DeepSeek-V2/V3's inference trick),
// one token at a time with a latent KV cache.
//
// Training (reference.h mla_forward) expands the latent c of every token into per-head keys and values: k_h = [W_UK_h
// RMSNorm(c); k_pe], v_h = W_UV_h RMSNorm(c), where kv_b_proj = [W_UK_0; W_UV_0; W_UK_1; W_UV_1; ...] (per head dn rows
// of W_UK then dv rows of W_UV, each row dc wide). Decoding caches only, per token and layer,
//     RMSNorm(c) [dc]  and  the roped k_pe [dr]         (one (dc+dr)-vector)
// and moves the two up-projections off the cached side:
//     q_nope_h . (W_UK_h c_t) = (W_UK_h^T q_nope_h) . c_t   -> a query in latent space
//     sum_t p_t (W_UV_h c_t)  = W_UV_h (sum_t p_t c_t)      -> W_UV after attention
// so every head attends over the same shared (dc+dr)-wide key, and the values are the latent vectors themselves. The
// scores and the softmax scale (YaRN mscale included) are those of reference.h, so the logits equal ref_forward's.
#pragma once

#include "model.h"
#include "reference.h"

// ----------------------------------------------------------------------------
// KV-cache size per token of one sequence, in bytes, for values of
// bytes_per_value bytes (2 = bf16, what the GPU cache stores):
//   latent (what this file and decode.cu cache): per layer RMSNorm(c) and k_pe,
//     bytes_per_value * (kv_lora_rank + qk_rope_head_dim) * layers
//   MHA-equivalent (a standard cache of the same model, e.g. transformers'
//     DynamicCache): per layer every head's key (qk_head_dim = nope + rope) and
//     value (v_head_dim),
//     bytes_per_value * heads * (qk_head_dim + v_head_dim) * layers

inline size_t kv_latent_bytes_per_token(const Config& c, size_t bytes_per_value = 2) {
    return bytes_per_value * (size_t)(c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers;
}

inline size_t kv_mha_bytes_per_token(const Config& c, size_t bytes_per_value = 2) {
    return bytes_per_value * (size_t)c.num_attention_heads * (c.qk_head_dim() + c.v_head_dim) * c.num_hidden_layers;
}

// ----------------------------------------------------------------------------
// Absorbed attention of one query over a latent cache:
//   q [H, dn+dr] (q_pe already roped), cache [len, dc+dr] (RMSNorm(c), roped k_pe),
//   w_kv_b [H*(dn+dv), dc] -> o [H, dv]
// score_t = (q_lat . c_t + q_pe . k_pe_t) * scale,  q_lat = W_UK_h^T q_nope  [dc]
// o_h = W_UV_h (sum_t softmax(score)_t c_t)
template <typename T>
void mla_absorbed_attention(T* o, const T* q, const T* cache, int len, const T* w_kv_b, int H, int dn, int dr, int dv, int dc,
                            double scale) {
    const int width = dc + dr;
    for (int h = 0; h < H; h++) {
        const T* q_nope = q + (size_t)h * (dn + dr);
        const T* w_uk = w_kv_b + (size_t)h * (dn + dv) * dc;  // [dn, dc]
        const T* w_uv = w_uk + (size_t)dn * dc;               // [dv, dc]
        // the absorbed query: [q_lat (dc); q_pe (dr)], so a score is one dot product
        std::vector<T> qa(width, 0);
        for (int i = 0; i < dn; i++)
            for (int j = 0; j < dc; j++) qa[j] += q_nope[i] * w_uk[(size_t)i * dc + j];
        std::copy_n(q_nope + dn, dr, qa.data() + dc);
        std::vector<T> p(len);
        T mx = -INFINITY;
        for (int t = 0; t < len; t++) {
            p[t] = dot(qa.data(), cache + (size_t)t * width, width) * (T)scale;
            mx = std::max(mx, p[t]);
        }
        T sum = 0;
        for (int t = 0; t < len; t++) sum += (p[t] = std::exp(p[t] - mx));
        std::vector<T> o_lat(dc, 0);  // attention over the latent values
        for (int t = 0; t < len; t++) {
            const T* ct = cache + (size_t)t * width;
            const T pt = p[t] / sum;
            for (int j = 0; j < dc; j++) o_lat[j] += pt * ct[j];
        }
        for (int v = 0; v < dv; v++) o[(size_t)h * dv + v] = dot(w_uv + (size_t)v * dc, o_lat.data(), dc);
    }
}

// ----------------------------------------------------------------------------
// One sequence's decoding state: the latent cache of every layer and the activations of one token.

template <typename T>
struct DecodeState {
    int max_len = 0, len = 0;   // capacity and tokens cached so far (= the next position)
    std::vector<T> cache;       // [layers, max_len, dc + dr]
    std::vector<T> h, xn, xn_rstd, attn_out, ffn_out, logits;  // [D] ... [V]
    std::vector<T> qa, qa_norm, qa_rstd, q, kv, c_rstd, o;     // MLA of one token
    FfnActs<T> ffn;
    MoeActs<T> moe;
};

template <typename T>
void decode_init(DecodeState<T>& s, const Config& c, int max_len) {
    if (max_len < 1 || max_len > c.max_position_embeddings)
        fail("decode: a cache of %d tokens is outside 1..%d (max_position_embeddings)", max_len, c.max_position_embeddings);
    s.max_len = max_len;
    s.len = 0;
    s.cache.assign((size_t)c.num_hidden_layers * max_len * (c.kv_lora_rank + c.qk_rope_head_dim), 0);
}

// the bytes the cache holds per token (its own element type: fp32 on the CPU)
template <typename T>
size_t decode_cache_bytes_per_token(const DecodeState<T>& s) {
    return s.cache.size() * sizeof(T) / (size_t)s.max_len;
}

// MLA of one token x [D] at position pos: appends its latent to cache_l [max_len,
// dc+dr] (row pos) and writes out [D] = W_o o over the positions 0..pos.
template <typename T>
void mla_decode_forward(const Config& c, const MlaWeights<T>& w, const RopeTable& rope, T* out, const T* x, T* cache_l, int pos,
                        DecodeState<T>& s) {
    const int H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank;
    const int dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, dqk = dn + dr;
    s.q.resize((size_t)H * dqk);
    if (qr > 0) {
        s.qa.resize(qr);
        s.qa_norm.resize(qr);
        s.qa_rstd.resize(1);
        linear_forward(s.qa.data(), x, w.q_a, 1);
        rmsnorm_forward(s.qa_norm.data(), s.qa_rstd.data(), s.qa.data(), w.q_a_norm, 1, qr, c.rms_norm_eps);
        linear_forward(s.q.data(), s.qa_norm.data(), w.q_b, 1);
    } else {
        linear_forward(s.q.data(), x, w.q_proj, 1);
    }
    for (int h = 0; h < H; h++) rope_forward(&s.q[(size_t)h * dqk + dn], pos, rope);
    // the new cache row: [RMSNorm(c); rope(k_pe)]
    s.kv.resize(dc + dr);
    s.c_rstd.resize(1);
    linear_forward(s.kv.data(), x, w.kv_a, 1);
    T* row = cache_l + (size_t)pos * (dc + dr);
    rmsnorm_forward(row, s.c_rstd.data(), s.kv.data(), w.kv_a_norm, 1, dc, c.rms_norm_eps);
    std::copy_n(s.kv.data() + dc, dr, row + dc);
    rope_forward(row + dc, pos, rope);
    s.o.resize((size_t)H * dv);
    mla_absorbed_attention(s.o.data(), s.q.data(), cache_l, pos + 1, w.kv_b.w, H, dn, dr, dv, dc, rope.softmax_scale);
    linear_forward(out, s.o.data(), w.o_proj, 1);
}

// Runs token through the model at position s.len, appends its latents to the cache
// and returns the next-token logits [V]. Fails when the cache is full.
template <typename T>
const std::vector<T>& decode_step(RefModel<T>& m, DecodeState<T>& s, int token) {
    const Config& c = m.cfg;
    const int D = c.hidden_size, V = c.vocab_size, width = c.kv_lora_rank + c.qk_rope_head_dim;
    if (token < 0 || token >= V) fail("decode: token id %d is outside the vocabulary (%d)", token, V);
    if (s.len >= s.max_len) fail("decode: the cache is full (%d tokens)", s.max_len);
    const int pos = s.len;
    for (std::vector<T>* v : {&s.h, &s.xn, &s.attn_out, &s.ffn_out}) v->resize(D);
    s.xn_rstd.resize(1);
    embedding_forward(s.h.data(), &token, m.w.embed, 1, D);
    for (int l = 0; l < c.num_hidden_layers; l++) {
        const LayerWeights<T>& w = m.w.layers[l];
        rmsnorm_forward(s.xn.data(), s.xn_rstd.data(), s.h.data(), w.input_norm, 1, D, c.rms_norm_eps);
        T* cache_l = s.cache.data() + (size_t)l * s.max_len * width;
        mla_decode_forward(c, w.attn, m.rope, s.attn_out.data(), s.xn.data(), cache_l, pos, s);
        for (int i = 0; i < D; i++) s.h[i] += s.attn_out[i];
        rmsnorm_forward(s.xn.data(), s.xn_rstd.data(), s.h.data(), w.post_norm, 1, D, c.rms_norm_eps);
        if (c.is_moe_layer(l))
            moe_forward(c, w.moe, s.ffn_out.data(), s.xn.data(), 1, s.moe);
        else
            ffn_forward(w.ffn, s.ffn_out.data(), s.xn.data(), 1, s.ffn);
        for (int i = 0; i < D; i++) s.h[i] += s.ffn_out[i];
    }
    rmsnorm_forward(s.xn.data(), s.xn_rstd.data(), s.h.data(), m.w.final_norm, 1, D, c.rms_norm_eps);
    s.logits.resize(V);
    linear_forward(s.logits.data(), s.xn.data(), m.w.lm_head, 1);
    s.len++;
    return s.logits;
}

// ----------------------------------------------------------------------------
// The GPU decoder (decode.cu, its kernels in decode.cuh): the same absorbed form for a batch of sequences on
// the device, over a bf16 latent cache, with GPU sampling and each step replayable as a CUDA graph. This is
// its whole API; the front ends need no CUDA header.

struct GpuDecoder;

// Sequences of up to max_len tokens (<= max_position_embeddings), prompts of up to
// max_prompt tokens. Fails with a clear message (no GPU, out of memory).
GpuDecoder* decoder_create(Model& m, int batch, int max_len, int max_prompt);
void decoder_free(GpuDecoder* d);

// Fills the cache with the prompts (1..batch of them, each 1..max_prompt tokens) through the training forward
// (gpu_forward), leaves each sequence's last-position logits in d.logits, pos[b] = its length, gen[b] = 0,
// active[b] = 1 (0 for unused rows). Prompts run in groups of sequences that fit the model's activation buffers.
void decoder_prefill(GpuDecoder& d, const std::vector<std::vector<int>>& prompts);

// One token per sequence: d.tokens[b] at position pos[b] -> d.logits [batch, V];
// appends to the cache and advances pos for active sequences.
void decoder_forward(GpuDecoder& d);

// d.logits -> d.tokens for active sequences (sample_gpu)
void decoder_sample(GpuDecoder& d, const SamplingOptions& so, uint64_t seed);

// decoder_forward + decoder_sample, replayed from a CUDA graph when use_graph (captured
// on the first call; a change of sampling options recaptures)
void decoder_step(GpuDecoder& d, const SamplingOptions& so, uint64_t seed, bool use_graph);

// the sampled tokens, copied back (waits for the stream)
const int* decoder_tokens(GpuDecoder& d);

// stops (or restarts) sequence b: an inactive sequence keeps its cache and position
void decoder_set_active(GpuDecoder& d, int b, bool active);

// the cache's allocated device bytes per token of one sequence (its capacity is batch * max_len tokens)
size_t decoder_cache_bytes_per_token(const GpuDecoder& d);

// the decoder's own device bytes: the cache and the step's buffers (the weights
// and the prefill's activations are the model's)
size_t decoder_device_bytes(const GpuDecoder& d);
