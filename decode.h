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
//
// The MTP module (num_nextn_predict_layers = 1) decodes as one more cached layer with its own latent cache: from the
// main model's normed output at position i and token i+1 it gives mtp_forward's logits for token i+2. Self-speculative
// decoding (speculative_step) drafts with it and verifies with the main model, keeping the main model's distribution.
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

// The bytes a plain decode step over `batch` sequences, each with cache_len tokens cached, has to read from device
// memory: every bf16 weight of the main model once (of the embedding only the batch's rows; of a MoE layer's
// routed experts the min(E, batch x K) that its rows reach, exact at batch 1 and an upper bound beyond) and each
// sequence's latent cache. decode_bench divides it by the step's time: the bandwidth a step achieves.
inline double decode_step_bytes(const Config& c, const ParamLayout& L, int batch, double cache_len) {
    const double reach = c.n_routed_experts ? std::min(1.0, (double)batch * c.num_experts_per_tok / c.n_routed_experts) : 1.0;
    const std::string mtp = strfmt("model.layers.%d.", c.num_hidden_layers);
    double weights = 0;
    for (const TensorSpec& t : L.tensors) {
        if (t.kind == TENSOR_BUFFER || t.name.compare(0, mtp.size(), mtp) == 0) continue;  // fp32 routing biases; the MTP module
        if (t.name == "model.embed_tokens.weight") weights += (double)batch * c.hidden_size;
        else weights += (t.name.find(".mlp.experts.") != std::string::npos ? reach : 1.0) * t.numel;
    }
    return 2 * weights + batch * cache_len * kv_latent_bytes_per_token(c);
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
    std::vector<T> hn;          // [D] the main model's normed output at the last position (the MTP module's input)
    int mtp_len = 0;            // positions in the MTP module's cache
    std::vector<T> mtp_cache;   // [max_len, dc + dr], when the config has the module
    std::vector<T> mtp_e, mtp_cat, mtp_h, mtp_logits;  // [D], [2D] [enorm(e); hnorm(h)], [D], [V]
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
    s.mtp_len = 0;
    s.cache.assign((size_t)c.num_hidden_layers * max_len * (c.kv_lora_rank + c.qk_rope_head_dim), 0);
    s.mtp_cache.assign((size_t)c.num_nextn_predict_layers * max_len * (c.kv_lora_rank + c.qk_rope_head_dim), 0);
}

// the bytes the main model's cache holds per token (its own element type: fp32 on the CPU)
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

// One block on the residual h [D] of the token at position pos, its latent appended to cache_l (row pos):
//   h += MLA(RMSNorm(h)),  h += FFN(RMSNorm(h))   (block_forward for one token)
template <typename T>
void block_decode_forward(const Config& c, const LayerWeights<T>& w, bool moe, const RopeTable& rope, T* h, T* cache_l, int pos,
                          DecodeState<T>& s) {
    const int D = c.hidden_size;
    for (std::vector<T>* v : {&s.xn, &s.attn_out, &s.ffn_out}) v->resize(D);
    s.xn_rstd.resize(1);
    rmsnorm_forward(s.xn.data(), s.xn_rstd.data(), h, w.input_norm, 1, D, c.rms_norm_eps);
    mla_decode_forward(c, w.attn, rope, s.attn_out.data(), s.xn.data(), cache_l, pos, s);
    for (int i = 0; i < D; i++) h[i] += s.attn_out[i];
    rmsnorm_forward(s.xn.data(), s.xn_rstd.data(), h, w.post_norm, 1, D, c.rms_norm_eps);
    if (moe)
        moe_forward(c, w.moe, s.ffn_out.data(), s.xn.data(), 1, s.moe);
    else
        ffn_forward(w.ffn, s.ffn_out.data(), s.xn.data(), 1, s.ffn);
    for (int i = 0; i < D; i++) h[i] += s.ffn_out[i];
}

// Runs token through the model at position s.len, appends its latents to the cache, keeps the normed output in
// s.hn and returns the next-token logits [V]. Fails when the cache is full. Setting s.len back drops positions:
// the next step overwrites them.
template <typename T>
const std::vector<T>& decode_step(RefModel<T>& m, DecodeState<T>& s, int token) {
    const Config& c = m.cfg;
    const int D = c.hidden_size, V = c.vocab_size, width = c.kv_lora_rank + c.qk_rope_head_dim;
    if (token < 0 || token >= V) fail("decode: token id %d is outside the vocabulary (%d)", token, V);
    if (s.len >= s.max_len) fail("decode: the cache is full (%d tokens)", s.max_len);
    const int pos = s.len;
    s.h.resize(D);
    s.xn_rstd.resize(1);
    embedding_forward(s.h.data(), &token, m.w.embed, 1, D);
    for (int l = 0; l < c.num_hidden_layers; l++)
        block_decode_forward(c, m.w.layers[l], c.is_moe_layer(l), m.rope, s.h.data(), s.cache.data() + (size_t)l * s.max_len * width,
                             pos, s);
    s.hn.resize(D);
    rmsnorm_forward(s.hn.data(), s.xn_rstd.data(), s.h.data(), m.w.final_norm, 1, D, c.rms_norm_eps);
    s.logits.resize(V);
    linear_forward(s.logits.data(), s.hn.data(), m.w.lm_head, 1);
    s.len++;
    return s.logits;
}

// The MTP module at position s.mtp_len: h [D] the main model's normed output there (s.hn after its decode_step),
// token the one after it. Appends to the module's cache and returns its logits for the token after that [V]
// (mtp_forward's at that position).
template <typename T>
const std::vector<T>& mtp_decode_step(RefModel<T>& m, DecodeState<T>& s, const T* h, int token) {
    const Config& c = m.cfg;
    const int D = c.hidden_size, V = c.vocab_size;
    if (c.num_nextn_predict_layers == 0) fail("decode: the model has no MTP module");
    if (token < 0 || token >= V) fail("decode: token id %d is outside the vocabulary (%d)", token, V);
    if (s.mtp_len >= s.max_len) fail("decode: the MTP cache is full (%d tokens)", s.max_len);
    for (std::vector<T>* v : {&s.mtp_e, &s.mtp_h}) v->resize(D);
    s.mtp_cat.resize(2 * D);
    s.xn_rstd.resize(1);
    embedding_forward(s.mtp_e.data(), &token, m.w.embed, 1, D);
    rmsnorm_forward(s.mtp_cat.data(), s.xn_rstd.data(), s.mtp_e.data(), m.w.mtp.enorm, 1, D, c.rms_norm_eps);
    rmsnorm_forward(s.mtp_cat.data() + D, s.xn_rstd.data(), h, m.w.mtp.hnorm, 1, D, c.rms_norm_eps);
    linear_forward(s.mtp_h.data(), s.mtp_cat.data(), m.w.mtp.eh_proj, 1);
    block_decode_forward(c, m.w.mtp.block, c.is_moe_layer(c.num_hidden_layers), m.rope, s.mtp_h.data(), s.mtp_cache.data(), s.mtp_len, s);
    rmsnorm_forward(s.mtp_h.data(), s.xn_rstd.data(), s.mtp_h.data(), m.w.mtp.head_norm, 1, D, c.rms_norm_eps);
    s.mtp_logits.resize(V);
    linear_forward(s.mtp_logits.data(), s.mtp_h.data(), m.w.lm_head, 1);
    s.mtp_len++;
    return s.mtp_logits;
}

// ----------------------------------------------------------------------------
// Self-speculative decoding (DeepSeek-V3 §2.2 with the speculative-sampling rule of Leviathan et al. and Chen et al.).
// Between steps a sequence holds: the main cache at L positions, the MTP cache at L-1, s.hn the main model's normed
// output at L-1, and x = t_L, the last token taken, not yet in a cache. A step drafts d ~ q from the MTP module at
// position L-1, runs the main model on [x, d] (positions L and L+1; on the CPU one after the other), and accepts d with
// probability min(1, p(d) / q(d)), p being the main model's distribution at L; a rejected d is replaced by a draw from
// normalize(max(0, p - q)) and position L+1 is dropped from the cache. Either way the token at L+1 follows p exactly,
// and after an acceptance the main model's logits at L+1 give one more token for free. p and q are sampling_probs's
// distributions (temperature, top-k, top-p), so greedy (one-hot p and q) accepts exactly when d is the main model's
// argmax: the output is plain greedy's.

struct SpeculativeStats {
    long long drafted = 0, accepted = 0;
};

// The prompt into both caches: the main model at every position, the MTP module at every position but the last
// (its input at i is token i+1). Returns the main model's logits at the last position.
inline const std::vector<float>& speculative_prefill(RefModel<float>& m, DecodeState<float>& s, const std::vector<int>& prompt) {
    if (prompt.empty()) fail("decode: an empty prompt");
    for (size_t i = 0; i < prompt.size(); i++) {
        if (i > 0) mtp_decode_step(m, s, s.hn.data(), prompt[i]);
        decode_step(m, s, prompt[i]);
    }
    return s.logits;
}

// One step from the state above with x: appends the tokens it takes to out (one, or two after an acceptance); the last
// of them is the new x. With no room for two more positions it takes one plain step.
inline void speculative_step(RefModel<float>& m, DecodeState<float>& s, int x, const SamplingOptions& so, Rng& rng,
                             std::vector<int>& out, SpeculativeStats& stats) {
    const int V = m.cfg.vocab_size, L = s.len;
    std::vector<double> p, q;
    if (L + 2 > s.max_len) {
        sampling_probs(p, decode_step(m, s, x).data(), V, so);
        out.push_back(sample_probs(p, rng.uniform()));
        return;
    }
    sampling_probs(q, mtp_decode_step(m, s, s.hn.data(), x).data(), V, so);
    const int d = sample_probs(q, rng.uniform());
    sampling_probs(p, decode_step(m, s, x).data(), V, so);
    const std::vector<float> hn_x = s.hn;  // the main model's output at L: the MTP module's input there
    decode_step(m, s, d);
    stats.drafted++;
    if (rng.uniform() * q[d] < p[d]) {  // q[d] > 0: d was drawn from q
        stats.accepted++;
        out.push_back(d);
        mtp_decode_step(m, s, hn_x.data(), d);  // position L of the MTP cache; its draft is not needed
        sampling_probs(p, s.logits.data(), V, so);
        out.push_back(sample_probs(p, rng.uniform()));
    } else {
        for (int i = 0; i < V; i++) p[i] = std::max(0.0, p[i] - q[i]);  // has mass: p(d) < q(d) here
        out.push_back(sample_probs(p, rng.uniform()));
        s.len = L + 1;
        s.hn = hn_x;
    }
}

// ----------------------------------------------------------------------------
// The GPU decoder (decode.cu, its kernels in decode.cuh): the same absorbed form for a batch of sequences on
// the device, over a bf16 latent cache, with GPU sampling and each step replayable as a CUDA graph. This is
// its whole API; the front ends need no CUDA header.

struct GpuDecoder;

// Sequences of up to max_len tokens (<= max_position_embeddings), prompts of up to
// max_prompt tokens. Fails with a clear message (no GPU, out of memory).
// speculative: self-speculative decoding with the model's MTP module (decoder_step takes one or two tokens per
// sequence, decoder_speculative_tokens says which).
GpuDecoder* decoder_create(Model& m, int batch, int max_len, int max_prompt, bool speculative = false);
void decoder_free(GpuDecoder* d);

// Fills the cache with the prompts (1..batch of them, each 1..max_prompt tokens) through the training forward
// (gpu_forward), leaves each sequence's last-position logits in d.logits, pos[b] = its length, gen[b] = 0,
// active[b] = 1 (0 for unused rows). Prompts run in groups of sequences that fit the model's activation buffers.
void decoder_prefill(GpuDecoder& d, const std::vector<std::vector<int>>& prompts);

// One token per sequence: d.tokens[b] at position pos[b] -> d.logits [batch, V];
// appends to the cache and advances pos for active sequences. Plain decoders only.
void decoder_forward(GpuDecoder& d);

// d.logits -> d.tokens for active sequences (sample_gpu)
void decoder_sample(GpuDecoder& d, const SamplingOptions& so, uint64_t seed);

// decoder_forward + decoder_sample, replayed from a CUDA graph when use_graph (captured
// on the first call; a change of sampling options recaptures). A speculative decoder's step (after
// decoder_prefill and decoder_sample) drafts with the MTP module, verifies with the main model and
// takes one or two tokens per active sequence, as speculative_step does on the CPU.
void decoder_step(GpuDecoder& d, const SamplingOptions& so, uint64_t seed, bool use_graph);

// the sampled tokens, copied back (waits for the stream); after a speculative step, the last token taken
const int* decoder_tokens(GpuDecoder& d);

// A speculative step's tokens, copied back (waits for the stream): sequence b took out[2b], and out[2b + 1]
// when (*count)[b] is 2.
const int* decoder_speculative_tokens(GpuDecoder& d, const int** count);

// stops (or restarts) sequence b: an inactive sequence keeps its cache and position. Host-side until the next
// decoder_forward, decoder_sample or decoder_step uploads every change at once.
void decoder_set_active(GpuDecoder& d, int b, bool active);

// the cache's allocated device bytes per token of one sequence (its capacity is batch * max_len tokens)
size_t decoder_cache_bytes_per_token(const GpuDecoder& d);

// the decoder's own device bytes: the cache and the step's buffers (the weights
// and the prefill's activations are the model's)
size_t decoder_device_bytes(const GpuDecoder& d);
