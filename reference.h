// reference.h — the CPU reference of every layer of the DeepSeek-V3 model, forward
// and backward, in plain C++17 + OpenMP, templated on the float type so the
// gradient checks can run in double. Read it top to bottom: the parameter layout
// (Hugging Face tensor names) and the typed weights bound to it, then one
// *_forward / *_backward pair per layer, then the whole model, then the optimizer.
// The GPU twin of each layer (mla.cuh, moe.cuh, kernels.cuh) has the same name with
// _gpu and the same arguments in the same order.
//
// Conventions: N = B*T token rows; a weight W[OC, C] maps C inputs to OC outputs
// (PyTorch's nn.Linear layout, so checkpoints load as they are).
//
// The gradient rule, here and on the GPU alike: a backward ADDS (+=) into weight
// gradients, so a step sums its micro-batches into them, and WRITES (=) the
// gradients of its inputs. Where an input gradient has a second source, the call
// says so: an `accumulate` flag, or a `dresidual` argument (the residual stream's
// gradient flowing past the layer).
//
// Loops are parallel over independent outputs only, so results never depend on
// the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "config.h"
#include "fp8.cuh"

// ----------------------------------------------------------------------------
// Parameter layout: every tensor of the model, with its HF name and shape, in one
// flat array.

enum TensorKind {
    TENSOR_DECAY = 0,     // a matrix: AdamW applies weight decay
    TENSOR_NO_DECAY = 1,  // a norm weight: no weight decay
    TENSOR_BUFFER = 2,    // e_score_correction_bias: saved, but no gradient
};

struct TensorSpec {
    std::string name;
    std::vector<int64_t> shape;
    size_t offset;
    size_t numel;
    int kind;
};

struct ParamLayout {
    std::vector<TensorSpec> tensors;
    std::unordered_map<std::string, size_t> index;
    size_t total = 0;
    size_t offset_of(const std::string& name) const {
        auto it = index.find(name);
        if (it == index.end()) fail("internal: no tensor named '%s'", name.c_str());
        return tensors[it->second].offset;
    }
};

// Tensors start on 64-element boundaries (256 bytes of fp32) so the GPU reads them
// with wide loads, except where the GPU needs neighbours contiguous: up_proj and
// down_proj follow their gate_proj (gate and up form one [2I, D] GEMM), and the
// routed experts of a layer follow one another at a fixed stride (the grouped
// GEMMs step from expert to expert).
constexpr size_t PARAM_ALIGN = 64;

inline bool is_routed_expert(const std::string& name) { return name.find(".mlp.experts.") != std::string::npos; }

// The routed experts a process holds: [first, first + count) of every MoE layer. Under expert parallelism
// (dist.h ep_group, ep_shard) each rank holds its group's share; everything else, the router and the shared
// experts included, every rank holds whole. count -1: all of them (one process, or data parallelism alone).
struct ExpertShard {
    int first = 0, count = -1;
    size_t align = PARAM_ALIGN;  // elements, a multiple of PARAM_ALIGN: where the held experts start, and the
                                 // tensor after them (dist.h cuts gradient buckets there)
};

// The flat layout of the parameters a process holds. A shard's experts keep their global names (a checkpoint
// gathers them by name), and every rank of an expert-parallel group gets the same offsets, tensor for tensor,
// its own experts standing where the others' stand on theirs.
inline ParamLayout param_layout(const Config& c, ExpertShard shard = {}) {
    const int first_expert = shard.first, held_experts = shard.count < 0 ? c.n_routed_experts : shard.count;
    if (first_expert < 0 || held_experts < 0 || first_expert + held_experts > c.n_routed_experts || shard.align % PARAM_ALIGN)
        fail("internal: experts [%d, %d) of %d, aligned to %zu", first_expert, first_expert + held_experts, c.n_routed_experts,
             shard.align);
    ParamLayout L;
    auto align_to = [&](size_t unit) { L.total = (L.total + unit - 1) / unit * unit; };
    auto add = [&](const std::string& name, std::vector<int64_t> shape, int kind) {
        size_t n = 1;
        for (int64_t s : shape) n *= (size_t)s;
        bool follows = ends_with(name, "up_proj.weight") || ends_with(name, "down_proj.weight") ||
                       (is_routed_expert(name) && name.find(strfmt(".experts.%d.gate_proj", first_expert)) == std::string::npos);
        if (!follows) align_to(PARAM_ALIGN);
        L.index[name] = L.tensors.size();
        L.tensors.push_back({name, shape, L.total, n, kind});
        L.total += n;
    };
    const int D = c.hidden_size, H = c.num_attention_heads, dqk = c.qk_head_dim();
    // one transformer block's tensors under prefix p (model.layers.L.)
    auto add_block = [&](const std::string& p, bool moe) {
        add(p + "input_layernorm.weight", {D}, TENSOR_NO_DECAY);
        if (c.q_lora_rank > 0) {
            add(p + "self_attn.q_a_proj.weight", {c.q_lora_rank, D}, TENSOR_DECAY);
            add(p + "self_attn.q_a_layernorm.weight", {c.q_lora_rank}, TENSOR_NO_DECAY);
            add(p + "self_attn.q_b_proj.weight", {H * dqk, c.q_lora_rank}, TENSOR_DECAY);
        } else {
            add(p + "self_attn.q_proj.weight", {H * dqk, D}, TENSOR_DECAY);
        }
        add(p + "self_attn.kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, D}, TENSOR_DECAY);
        add(p + "self_attn.kv_a_layernorm.weight", {c.kv_lora_rank}, TENSOR_NO_DECAY);
        add(p + "self_attn.kv_b_proj.weight", {H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}, TENSOR_DECAY);
        add(p + "self_attn.o_proj.weight", {D, H * c.v_head_dim}, TENSOR_DECAY);
        add(p + "post_attention_layernorm.weight", {D}, TENSOR_NO_DECAY);
        if (!moe) {
            add(p + "mlp.gate_proj.weight", {c.intermediate_size, D}, TENSOR_DECAY);
            add(p + "mlp.up_proj.weight", {c.intermediate_size, D}, TENSOR_DECAY);
            add(p + "mlp.down_proj.weight", {D, c.intermediate_size}, TENSOR_DECAY);
            return;
        }
        const int I = c.moe_intermediate_size;
        add(p + "mlp.gate.weight", {c.n_routed_experts, D}, TENSOR_DECAY);
        add(p + "mlp.gate.e_score_correction_bias", {c.n_routed_experts}, TENSOR_BUFFER);
        align_to(shard.align);
        for (int e = first_expert; e < first_expert + held_experts; e++) {
            std::string q = p + strfmt("mlp.experts.%d.", e);
            add(q + "gate_proj.weight", {I, D}, TENSOR_DECAY);
            add(q + "up_proj.weight", {I, D}, TENSOR_DECAY);
            add(q + "down_proj.weight", {D, I}, TENSOR_DECAY);
        }
        align_to(shard.align);
        if (c.n_shared_experts > 0) {
            const int S = c.n_shared_experts * I;
            add(p + "mlp.shared_experts.gate_proj.weight", {S, D}, TENSOR_DECAY);
            add(p + "mlp.shared_experts.up_proj.weight", {S, D}, TENSOR_DECAY);
            add(p + "mlp.shared_experts.down_proj.weight", {D, S}, TENSOR_DECAY);
        }
    };
    add("model.embed_tokens.weight", {c.vocab_size, D}, TENSOR_DECAY);
    for (int l = 0; l < c.num_hidden_layers; l++) add_block(strfmt("model.layers.%d.", l), c.is_moe_layer(l));
    add("model.norm.weight", {D}, TENSOR_NO_DECAY);
    add("lm_head.weight", {c.vocab_size, D}, TENSOR_DECAY);
    // the MTP module after the main model's tensors (whose offsets it leaves as they are), under DeepSeek-V3's
    // names; its embedding and head are the main model's (mtp_shared_tensors)
    if (c.num_nextn_predict_layers > 0) {
        const int l = c.num_hidden_layers;
        const std::string p = strfmt("model.layers.%d.", l);
        add(p + "enorm.weight", {D}, TENSOR_NO_DECAY);
        add(p + "hnorm.weight", {D}, TENSOR_NO_DECAY);
        add(p + "eh_proj.weight", {D, 2 * D}, TENSOR_DECAY);
        add_block(p, c.is_moe_layer(l));
        add(p + "shared_head.norm.weight", {D}, TENSOR_NO_DECAY);
    }
    return L;
}

// DeepSeek-V3's released checkpoint stores the MTP module's embedding and output head
// again under the module's prefix, though training shares them with the main model
// (§2.2; Megatron, which trained it, writes its one tensor under both names). Here
// they are one parameter each: checkpoints write these copies and loading checks
// them. {the copy's name, the parameter's name}.
inline std::vector<std::pair<std::string, std::string>> mtp_shared_tensors(const Config& c) {
    if (c.num_nextn_predict_layers == 0) return {};
    const std::string p = strfmt("model.layers.%d.", c.num_hidden_layers);
    return {{p + "embed_tokens.weight", "model.embed_tokens.weight"}, {p + "shared_head.head.weight", "lm_head.weight"}};
}

// ----------------------------------------------------------------------------
// Typed weights: one struct per layer, bound once (bind_weights) to any flat
// array in the layout above: the CPU parameters or gradients, or on the GPU the
// bf16 weights, fp32 master weights or fp32 gradients. Layers read fields, never
// names; llm.c binds its ParameterTensors the same way.

template <typename T>
struct Linear {  // an nn.Linear weight W [out, in], row-major
    T* w = nullptr;
    int out = 0, in = 0;
    const Fp8Weight* fp8 = nullptr;  // FP8 training: W's E4M3 copy, which the GEMMs then read (bind_fp8_weights)
};

template <typename T>
struct FfnWeights {  // SwiGLU: down(silu(gate x) * up x); up follows gate in memory
    Linear<T> gate, up, down;  // [I, D], [I, D], [D, I]
};

// gate and up as one [2I, D] matrix: one GEMM computes both (gate's FP8 copy is the pair's)
template <typename T>
Linear<T> gate_up(const FfnWeights<T>& f) {
    return {f.gate.w, 2 * f.gate.out, f.gate.in, f.gate.fp8};
}

template <typename T>
struct MlaWeights {
    Linear<T> q_proj;         // [H*dqk, D]      q_lora_rank == 0
    Linear<T> q_a;            // [qr, D]         q_lora_rank > 0
    T* q_a_norm = nullptr;    // [qr]
    Linear<T> q_b;            // [H*dqk, qr]
    Linear<T> kv_a;           // [dc + dr, D]    latent c, then the shared k_pe
    T* kv_a_norm = nullptr;   // [dc]
    Linear<T> kv_b;           // [H*(dn+dv), dc] per head [k_nope; v]
    Linear<T> o_proj;         // [D, H*dv]
};

template <typename T>
struct MoeWeights {
    Linear<T> router;          // [E, D]
    T* bias = nullptr;         // e_score_correction_bias [E]: a buffer, no gradient
    FfnWeights<T> experts;     // expert 0; expert e is expert_stride elements further (moe_expert)
    size_t expert_stride = 0;
    FfnWeights<T> shared;      // n_shared_experts * I wide; null when there are none
};

template <typename T>
FfnWeights<T> moe_expert(const MoeWeights<T>& m, int e) {
    const size_t off = (size_t)e * m.expert_stride;
    FfnWeights<T> f = m.experts;
    f.gate.w += off;
    f.up.w += off;
    f.down.w += off;
    return f;
}

template <typename T>
struct LayerWeights {
    T* input_norm = nullptr;     // [D]
    MlaWeights<T> attn;
    T* post_norm = nullptr;      // [D]
    FfnWeights<T> ffn;           // dense layers (l < first_k_dense_replace)
    MoeWeights<T> moe;           // MoE layers
};

// the multi-token-prediction module (num_nextn_predict_layers = 1), under
// model.layers.{num_hidden_layers}.; it reads the main model's embedding and head
template <typename T>
struct MtpWeights {
    T* enorm = nullptr;          // [D]      enorm: RMSNorm of the next token's embedding
    T* hnorm = nullptr;          // [D]      hnorm: RMSNorm of the main model's output
    Linear<T> eh_proj;           // [D, 2D]  on [enorm(e); hnorm(h)]
    LayerWeights<T> block;       // the usual block names; MoE or dense by the layer rule
    T* head_norm = nullptr;      // [D]      shared_head.norm, before the shared head
};

template <typename T>
struct ModelWeights {
    T* embed = nullptr;          // [V, D]
    std::vector<LayerWeights<T>> layers;
    T* final_norm = nullptr;     // [D]
    Linear<T> lm_head;           // [V, D]
    MtpWeights<T> mtp;           // null pointers when num_nextn_predict_layers = 0
};

// block l of c.total_layers(): a main layer, or the MTP module's block after them
template <typename T>
const LayerWeights<T>& block_weights(const ModelWeights<T>& w, int l) {
    return l < (int)w.layers.size() ? w.layers[l] : w.mtp.block;
}

// Points a ModelWeights at the flat array `base` laid out by L, and checks the two
// contiguity contracts the GPU relies on: up_proj right after gate_proj, and the
// routed experts of a layer at one fixed stride.
template <typename T>
ModelWeights<T> bind_weights(const Config& c, const ParamLayout& L, T* base) {
    auto at = [&](const std::string& name) { return base + L.offset_of(name); };
    auto linear = [&](const std::string& name) {
        const TensorSpec& s = L.tensors[L.index.at(name)];
        return Linear<T>{base + s.offset, (int)s.shape[0], (int)s.shape[1]};
    };
    auto ffn = [&](const std::string& p) {
        FfnWeights<T> f{linear(p + "gate_proj.weight"), linear(p + "up_proj.weight"), linear(p + "down_proj.weight")};
        if (f.up.w != f.gate.w + (size_t)f.gate.out * f.gate.in) fail("internal: %sup_proj does not follow gate_proj", p.c_str());
        return f;
    };
    auto block = [&](int l) {
        const std::string p = strfmt("model.layers.%d.", l), a = p + "self_attn.";
        LayerWeights<T> x;
        x.input_norm = at(p + "input_layernorm.weight");
        x.post_norm = at(p + "post_attention_layernorm.weight");
        if (c.q_lora_rank > 0) {
            x.attn.q_a = linear(a + "q_a_proj.weight");
            x.attn.q_a_norm = at(a + "q_a_layernorm.weight");
            x.attn.q_b = linear(a + "q_b_proj.weight");
        } else {
            x.attn.q_proj = linear(a + "q_proj.weight");
        }
        x.attn.kv_a = linear(a + "kv_a_proj_with_mqa.weight");
        x.attn.kv_a_norm = at(a + "kv_a_layernorm.weight");
        x.attn.kv_b = linear(a + "kv_b_proj.weight");
        x.attn.o_proj = linear(a + "o_proj.weight");
        if (!c.is_moe_layer(l)) {
            x.ffn = ffn(p + "mlp.");
            return x;
        }
        MoeWeights<T>& m = x.moe;
        m.router = linear(p + "mlp.gate.weight");
        m.bias = at(p + "mlp.gate.e_score_correction_bias");
        m.experts = ffn(p + "mlp.experts.0.");
        m.expert_stride = (size_t)3 * c.moe_intermediate_size * c.hidden_size;
        for (int e = 1; e < c.n_routed_experts; e++) {
            FfnWeights<T> want = moe_expert(m, e), got = ffn(p + strfmt("mlp.experts.%d.", e));
            if (got.gate.w != want.gate.w || got.down.w != want.down.w)
                fail("internal: expert %d of layer %d is not at the fixed expert stride", e, l);
        }
        if (c.n_shared_experts > 0) m.shared = ffn(p + "mlp.shared_experts.");
        return x;
    };
    ModelWeights<T> w;
    w.embed = at("model.embed_tokens.weight");
    w.final_norm = at("model.norm.weight");
    w.lm_head = linear("lm_head.weight");
    for (int l = 0; l < c.num_hidden_layers; l++) w.layers.push_back(block(l));
    if (c.num_nextn_predict_layers > 0) {
        const std::string p = strfmt("model.layers.%d.", c.num_hidden_layers);
        w.mtp.enorm = at(p + "enorm.weight");
        w.mtp.hnorm = at(p + "hnorm.weight");
        w.mtp.eh_proj = linear(p + "eh_proj.weight");
        w.mtp.block = block(c.num_hidden_layers);
        w.mtp.head_norm = at(p + "shared_head.norm.weight");
    }
    return w;
}

// FP8 training (fp8.cuh) runs every projection of attention and of the dense and
// shared-expert FFNs in E4M3; the embedding, the router, the output head and the norms
// stay in the model's type, as in DeepSeek-V3, and so do the routed experts here: an
// E4M3 form of our grouped GEMM (mma.sync, branch fp8-experts) ran at 0.72x the bf16
// one on an H200, its shared-memory feed the limit, not the tensor cores. So
// does a projection whose sides are not multiples of 16: the FP8 GEMMs contract over
// both (in: Fprop; out: Dgrad), and cuBLASLt takes FP8 K in steps of 16.
// visit(weight, slot) for each FP8 GEMM weight; slot is its Linear's fp8 pointer.
template <typename T, typename Visit>
void for_each_fp8_linear(ModelWeights<T>& w, Visit visit) {
    auto fits = [](const Linear<T>& l) { return l.w && l.in % 16 == 0 && l.out % 16 == 0; };
    std::vector<LayerWeights<T>*> blocks;
    for (LayerWeights<T>& l : w.layers) blocks.push_back(&l);
    if (w.mtp.eh_proj.w) blocks.push_back(&w.mtp.block);  // its eh_proj stays in T, as DeepSeek-V3 releases it
    for (LayerWeights<T>* b : blocks) {
        LayerWeights<T>& l = *b;
        MlaWeights<T>& a = l.attn;
        for (Linear<T>* p : {&a.q_proj, &a.q_a, &a.q_b, &a.kv_a, &a.kv_b, &a.o_proj, &l.ffn.down, &l.moe.shared.down})
            if (fits(*p)) visit(*p, p->fp8);
        for (FfnWeights<T>* f : {&l.ffn, &l.moe.shared})
            if (fits(gate_up(*f))) visit(gate_up(*f), f->gate.fp8);
    }
}

// Gives each FP8 Linear of w its copy (W and W^T in 128 x 128 blocks), a record in
// `records` whose codes and scales are cut from two flat arrays; with null arrays it
// only counts their sizes into *codes_n and *scales_n. wgrad: the records' Fp8Weight::wgrad (--fp8-wgrad).
template <typename T>
void bind_fp8_weights(ModelWeights<T>& w, std::vector<Fp8Weight>& records, uint8_t* codes, float* scales, size_t* codes_n, size_t* scales_n,
                      bool wgrad) {
    size_t count = 0;
    for_each_fp8_linear(w, [&](const Linear<T>&, const Fp8Weight*&) { count++; });
    records.clear();
    records.reserve(count);  // never reallocated: the Linears point into it
    *codes_n = *scales_n = 0;
    for_each_fp8_linear(w, [&](const Linear<T>& l, const Fp8Weight*& slot) {
        const Fp8Matrix q = fp8_matrix_at(codes, scales, codes_n, scales_n, l.out, l.in, FP8_TILE);
        records.push_back({q, fp8_matrix_at(codes, scales, codes_n, scales_n, l.in, l.out, FP8_TILE), wgrad});
        slot = &records.back();
    });
}

// ----------------------------------------------------------------------------
// Matmul: out[N, OC] = inp[N, C] @ W[OC, C]^T

template <typename T>
inline T dot(const T* a, const T* b, int n) {
    // eight partial sums let the compiler vectorise without -ffast-math
    T s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    T total = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, int N, int C, int OC) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) out[(size_t)n * OC + o] = dot(inp + (size_t)n * C, weight + (size_t)o * C, C);
}

// dinp[N, C] = dout[N, OC] @ W (+= when accumulate; null: not wanted);
// dweight[OC, C] += dout^T @ inp
template <typename T>
void matmul_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight, int N, int C, int OC, bool accumulate) {
    if (dinp) {
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            T* di = dinp + (size_t)n * C;
            if (!accumulate) std::fill(di, di + C, (T)0);
            for (int o = 0; o < OC; o++) {
                T d = dout[(size_t)n * OC + o];
                const T* w = weight + (size_t)o * C;
                for (int c = 0; c < C; c++) di[c] += d * w[c];
            }
        }
    }
#pragma omp parallel for schedule(static)
    for (int o = 0; o < OC; o++) {
        T* dw = dweight + (size_t)o * C;
        for (int n = 0; n < N; n++) {
            T d = dout[(size_t)n * OC + o];
            const T* x = inp + (size_t)n * C;
            for (int c = 0; c < C; c++) dw[c] += d * x[c];
        }
    }
}

// nn.Linear: out[N, W.out] = inp[N, W.in] @ W^T; with an FP8 copy of W, the emulated
// FP8 GEMMs of fp8.cuh for the output and dinp, and for dW with --fp8-wgrad
template <typename T>
void linear_forward(T* out, const T* inp, const Linear<T>& w, int N) {
    if (w.fp8) fp8_linear_forward_host(out, inp, *w.fp8, N);
    else matmul_forward(out, inp, w.w, N, w.in, w.out);
}

template <typename T>
void linear_backward(T* dinp, const Linear<T>& dw, const T* dout, const T* inp, const Linear<T>& w, int N, bool accumulate) {
    if (!w.fp8) return matmul_backward(dinp, dw.w, dout, inp, w.w, N, w.in, w.out, accumulate);
    if (dinp) fp8_linear_backward_input_host(dinp, dout, *w.fp8, N, accumulate);
    if (w.fp8->wgrad) fp8_linear_backward_weight_host(dw.w, dout, inp, *w.fp8, N);
    else matmul_backward((T*)nullptr, dw.w, dout, inp, w.w, N, w.in, w.out, false);
}

// ----------------------------------------------------------------------------
// Embedding: out[N, D] = wte[tokens[n], :]

template <typename T>
void embedding_forward(T* out, const int* tokens, const T* wte, int N, int D) {
    for (int n = 0; n < N; n++) std::copy(wte + (size_t)tokens[n] * D, wte + (size_t)(tokens[n] + 1) * D, out + (size_t)n * D);
}

// rows of dwte are summed in token order, so the result is deterministic
template <typename T>
void embedding_backward(T* dwte, const T* dout, const int* tokens, int N, int D) {
    for (int n = 0; n < N; n++) {
        T* row = dwte + (size_t)tokens[n] * D;
        for (int i = 0; i < D; i++) row[i] += dout[(size_t)n * D + i];
    }
}

// ----------------------------------------------------------------------------
// RMSNorm: out[N, C] = w * x / sqrt(mean(x^2) + eps); rstd[N] is saved for backward

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int N, int C, float eps) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const T* x = inp + (size_t)n * C;
        T ms = dot(x, x, C) / C;
        T r = 1 / std::sqrt(ms + (T)eps);
        rstd[n] = r;
        for (int i = 0; i < C; i++) out[(size_t)n * C + i] = weight[i] * (x[i] * r);
    }
}

// dx_i = r * w_i dy_i - r^3 / C * x_i * sum_j w_j dy_j x_j, plus dresidual [N, C]
// when not null (it may be dinp itself)
template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dresidual, const T* dout, const T* inp, const T* weight, const T* rstd, int N,
                      int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const T* x = inp + (size_t)n * C;
        const T* dy = dout + (size_t)n * C;
        T r = rstd[n];
        T s = 0;
        for (int i = 0; i < C; i++) s += weight[i] * dy[i] * x[i];
        T k = r * r * r * s / C;
        for (int i = 0; i < C; i++)
            dinp[(size_t)n * C + i] = (dresidual ? dresidual[(size_t)n * C + i] : 0) + (r * weight[i] * dy[i] - k * x[i]);
    }
    for (int n = 0; n < N; n++)
        for (int i = 0; i < C; i++) dweight[i] += dout[(size_t)n * C + i] * inp[(size_t)n * C + i] * rstd[n];
}

// ----------------------------------------------------------------------------
// RoPE with HF's rope_interleave=True convention: pairs (2i, 2i+1) are rotated by
// pos * inv_freq[i]. YaRN blends interpolated and extrapolated frequencies and
// scales cos/sin by its attention factor, as transformers' yarn rope does.

struct RopeTable {
    int dim = 0, max_len = 0;
    std::vector<double> cos, sin;  // [max_len, dim/2], attention factor included
    double softmax_scale = 1;      // (dn+dr)^-0.5, times mscale^2 under YaRN with mscale_all_dim
};

inline double yarn_get_mscale(double scale, double mscale) { return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0; }

inline RopeTable rope_build(const Config& c, int max_len) {
    RopeTable r;
    const int d = c.qk_rope_head_dim, half = d / 2;
    r.dim = d;
    r.max_len = max_len;
    std::vector<double> inv_freq(half);
    for (int i = 0; i < half; i++) inv_freq[i] = 1.0 / std::pow((double)c.rope_theta, 2.0 * i / d);
    double attention_factor = 1.0;
    r.softmax_scale = 1.0 / std::sqrt((double)c.qk_head_dim());
    if (c.yarn) {
        const double f = c.yarn_factor, base = c.rope_theta, orig = c.yarn_original_max_position_embeddings;
        auto correction_dim = [&](double rotations) { return d * std::log(orig / (rotations * 2 * M_PI)) / (2 * std::log(base)); };
        double low = std::max(std::floor(correction_dim(c.yarn_beta_fast)), 0.0);
        double high = std::min(std::ceil(correction_dim(c.yarn_beta_slow)), (double)(d - 1));
        if (low == high) high += 0.001;
        for (int i = 0; i < half; i++) {
            double ramp = std::min(std::max((i - low) / (high - low), 0.0), 1.0);
            double extrapolation_weight = 1 - ramp;
            inv_freq[i] = inv_freq[i] / f * (1 - extrapolation_weight) + inv_freq[i] * extrapolation_weight;
        }
        if (c.yarn_mscale != 0 && c.yarn_mscale_all_dim != 0)
            attention_factor = yarn_get_mscale(f, c.yarn_mscale) / yarn_get_mscale(f, c.yarn_mscale_all_dim);
        else
            attention_factor = yarn_get_mscale(f, 1.0);
        if (c.yarn_mscale_all_dim != 0) {
            double m = yarn_get_mscale(f, c.yarn_mscale_all_dim);
            r.softmax_scale *= m * m;
        }
    }
    r.cos.resize((size_t)max_len * half);
    r.sin.resize((size_t)max_len * half);
    for (int p = 0; p < max_len; p++)
        for (int i = 0; i < half; i++) {
            double angle = p * inv_freq[i];
            r.cos[(size_t)p * half + i] = std::cos(angle) * attention_factor;
            r.sin[(size_t)p * half + i] = std::sin(angle) * attention_factor;
        }
    return r;
}

// rotates x[dim] in place for position pos
template <typename T>
void rope_forward(T* x, int pos, const RopeTable& r) {
    const int half = r.dim / 2;
    for (int i = 0; i < half; i++) {
        T c = (T)r.cos[(size_t)pos * half + i], s = (T)r.sin[(size_t)pos * half + i];
        T x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * c - x1 * s;
        x[2 * i + 1] = x1 * c + x0 * s;
    }
}

// the transpose of the rotation, applied in place to the gradient
template <typename T>
void rope_backward(T* dx, int pos, const RopeTable& r) {
    const int half = r.dim / 2;
    for (int i = 0; i < half; i++) {
        T c = (T)r.cos[(size_t)pos * half + i], s = (T)r.sin[(size_t)pos * half + i];
        T d0 = dx[2 * i], d1 = dx[2 * i + 1];
        dx[2 * i] = d0 * c + d1 * s;
        dx[2 * i + 1] = d1 * c - d0 * s;
    }
}

// ----------------------------------------------------------------------------
// Causal attention, expanded form (each head has its own K and V):
// q, k [B, T, H, dqk], v [B, T, H, dv] -> out [B, T, H, dv]; att [B, H, T, T] keeps
// the probabilities for backward (zero above the diagonal).
//
// Dropout on the probabilities (nanoGPT's attn_dropout), inverted: out_t = sum_j
// p_tj m_tj v_j with m_tj = 0 or 1/(1-p) drawn as dropout_forward draws, counter
// (b, h, t, j) -> ((b H + h) T + t) T + j. No mask is stored: backward redraws it,
// as the GPU's flash attention does.

struct AttentionDropout {
    float p = 0;       // probability; 0 = off
    uint64_t key = 0;  // the layer's key within the micro-step (attention_dropout_key)
};

// m_tj of AttentionDropout at counter i
template <typename T>
inline T attention_dropout_mask(const AttentionDropout& drop, uint64_t i) {
    if (drop.p <= 0) return (T)1;
    return rng_uniform(drop.key, i) < drop.p ? (T)0 : (T)(1.0 / (1.0 - drop.p));
}

template <typename T>
void attention_forward(T* out, T* att, const T* q, const T* k, const T* v, int B, int Tlen, int H, int dqk, int dv, double scale,
                       AttentionDropout drop = {}) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < Tlen; t++) {
                const T* qt = q + (((size_t)b * Tlen + t) * H + h) * dqk;
                T* p = att + (((size_t)b * H + h) * Tlen + t) * Tlen;
                T mx = -INFINITY;
                for (int j = 0; j <= t; j++) {
                    p[j] = dot(qt, k + (((size_t)b * Tlen + j) * H + h) * dqk, dqk) * (T)scale;
                    mx = std::max(mx, p[j]);
                }
                T sum = 0;
                for (int j = 0; j <= t; j++) sum += (p[j] = std::exp(p[j] - mx));
                for (int j = 0; j <= t; j++) p[j] /= sum;
                for (int j = t + 1; j < Tlen; j++) p[j] = 0;
                T* o = out + (((size_t)b * Tlen + t) * H + h) * dv;
                for (int i = 0; i < dv; i++) o[i] = 0;
                const uint64_t row = (((uint64_t)b * H + h) * Tlen + t) * Tlen;
                for (int j = 0; j <= t; j++) {
                    const T* vj = v + (((size_t)b * Tlen + j) * H + h) * dv;
                    const T pm = p[j] * attention_dropout_mask<T>(drop, row + j);
                    for (int i = 0; i < dv; i++) o[i] += pm * vj[i];
                }
            }
}

// dscore_tj = p_tj (dp_tj - sum_j' p_tj' dp_tj'), dp_tj = m_tj dout_t . v_j (m_tj = 1 without dropout)
template <typename T>
void attention_backward(T* dq, T* dk, T* dvalue, const T* dout, const T* att, const T* q, const T* k, const T* v, int B, int Tlen,
                        int H, int dqk, int dv, double scale, AttentionDropout drop = {}) {
    std::fill(dq, dq + (size_t)B * Tlen * H * dqk, (T)0);
    std::fill(dk, dk + (size_t)B * Tlen * H * dqk, (T)0);
    std::fill(dvalue, dvalue + (size_t)B * Tlen * H * dv, (T)0);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            std::vector<T> dp(Tlen);
            for (int t = 0; t < Tlen; t++) {
                const T* p = att + (((size_t)b * H + h) * Tlen + t) * Tlen;
                const T* dot_ = dout + (((size_t)b * Tlen + t) * H + h) * dv;
                T sum = 0;
                const uint64_t row = (((uint64_t)b * H + h) * Tlen + t) * Tlen;
                for (int j = 0; j <= t; j++) {
                    const T m = attention_dropout_mask<T>(drop, row + j);
                    dp[j] = m * dot(dot_, v + (((size_t)b * Tlen + j) * H + h) * dv, dv);
                    sum += p[j] * dp[j];
                    T* dvj = dvalue + (((size_t)b * Tlen + j) * H + h) * dv;
                    for (int i = 0; i < dv; i++) dvj[i] += p[j] * m * dot_[i];
                }
                const T* qt = q + (((size_t)b * Tlen + t) * H + h) * dqk;
                T* dqt = dq + (((size_t)b * Tlen + t) * H + h) * dqk;
                for (int j = 0; j <= t; j++) {
                    T ds = p[j] * (dp[j] - sum) * (T)scale;
                    const T* kj = k + (((size_t)b * Tlen + j) * H + h) * dqk;
                    T* dkj = dk + (((size_t)b * Tlen + j) * H + h) * dqk;
                    for (int i = 0; i < dqk; i++) {
                        dqt[i] += ds * kj[i];
                        dkj[i] += ds * qt[i];
                    }
                }
            }
        }
}

// ----------------------------------------------------------------------------
// Multi-head Latent Attention (expanded form, as in training):
//   q = Wq_b RMSNorm(Wq_a x)  (or Wq x)          per head [q_nope(dn); q_pe(dr)]
//   [c; k_pe] = Wkv_a x,  [k_nope; v] = Wkv_b RMSNorm(c)   per head
//   RoPE on q_pe and on k_pe (one k_pe shared by all heads)
//   out = Wo attention(q, [k_nope; k_pe], v)

template <typename T>
struct MlaActs {
    std::vector<T> qa, qa_norm, qa_rstd;  // [N, qr], [N, qr], [N]  (q_lora only)
    std::vector<T> q;                     // [N, H, dqk], q_pe roped
    std::vector<T> kv_a;                  // [N, dc + dr], k_pe part roped
    std::vector<T> c_norm, c_rstd;        // [N, dc], [N]
    std::vector<T> kv_b;                  // [N, H, dn + dv]
    std::vector<T> k, v;                  // [N, H, dqk], [N, H, dv]
    std::vector<T> att;                   // [B, H, T, T]
    AttentionDropout dropout;             // the forward's, which the backward redraws
    std::vector<T> o;                     // [N, H, dv]
};

template <typename T>
void mla_forward(const Config& c, const MlaWeights<T>& w, const RopeTable& rope, T* out, const T* x, int B, int Tlen, MlaActs<T>& a,
                 AttentionDropout drop = {}) {
    const int N = B * Tlen, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank;
    const int dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, dqk = dn + dr;
    a.q.resize((size_t)N * H * dqk);
    if (qr > 0) {
        a.qa.resize((size_t)N * qr);
        a.qa_norm.resize((size_t)N * qr);
        a.qa_rstd.resize(N);
        linear_forward(a.qa.data(), x, w.q_a, N);
        rmsnorm_forward(a.qa_norm.data(), a.qa_rstd.data(), a.qa.data(), w.q_a_norm, N, qr, c.rms_norm_eps);
        linear_forward(a.q.data(), a.qa_norm.data(), w.q_b, N);
    } else {
        linear_forward(a.q.data(), x, w.q_proj, N);
    }
    a.kv_a.resize((size_t)N * (dc + dr));
    linear_forward(a.kv_a.data(), x, w.kv_a, N);
    a.c_norm.resize((size_t)N * dc);
    a.c_rstd.resize(N);
    std::vector<T> latent((size_t)N * dc);
    for (int n = 0; n < N; n++) std::copy_n(&a.kv_a[(size_t)n * (dc + dr)], dc, &latent[(size_t)n * dc]);
    rmsnorm_forward(a.c_norm.data(), a.c_rstd.data(), latent.data(), w.kv_a_norm, N, dc, c.rms_norm_eps);
    a.kv_b.resize((size_t)N * H * (dn + dv));
    linear_forward(a.kv_b.data(), a.c_norm.data(), w.kv_b, N);
    a.k.resize((size_t)N * H * dqk);
    a.v.resize((size_t)N * H * dv);
    for (int n = 0; n < N; n++) {
        int pos = n % Tlen;
        T* k_pe = &a.kv_a[(size_t)n * (dc + dr) + dc];
        rope_forward(k_pe, pos, rope);
        for (int h = 0; h < H; h++) {
            rope_forward(&a.q[((size_t)n * H + h) * dqk + dn], pos, rope);
            const T* kvb = &a.kv_b[((size_t)n * H + h) * (dn + dv)];
            T* k = &a.k[((size_t)n * H + h) * dqk];
            std::copy_n(kvb, dn, k);
            std::copy_n(k_pe, dr, k + dn);
            std::copy_n(kvb + dn, dv, &a.v[((size_t)n * H + h) * dv]);
        }
    }
    a.att.resize((size_t)B * H * Tlen * Tlen);
    a.o.resize((size_t)N * H * dv);
    a.dropout = drop;
    attention_forward(a.o.data(), a.att.data(), a.q.data(), a.k.data(), a.v.data(), B, Tlen, H, dqk, dv, rope.softmax_scale, drop);
    linear_forward(out, a.o.data(), w.o_proj, N);
}

template <typename T>
void mla_backward(const Config& c, const MlaWeights<T>& w, const MlaWeights<T>& dw, const RopeTable& rope, T* dx, const T* dout,
                  const T* x, int B, int Tlen, const MlaActs<T>& a) {
    const int N = B * Tlen, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank;
    const int dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, dqk = dn + dr;
    std::vector<T> d_o((size_t)N * H * dv, 0);
    linear_backward(d_o.data(), dw.o_proj, dout, a.o.data(), w.o_proj, N, false);
    std::vector<T> dq((size_t)N * H * dqk, 0), dk((size_t)N * H * dqk, 0), dvalue((size_t)N * H * dv, 0);
    attention_backward(dq.data(), dk.data(), dvalue.data(), d_o.data(), a.att.data(), a.q.data(), a.k.data(), a.v.data(), B, Tlen, H,
                       dqk, dv, rope.softmax_scale, a.dropout);
    // split dK, dV back into d kv_b and the shared d k_pe, then undo the rotations
    std::vector<T> dkv_b((size_t)N * H * (dn + dv)), dkv_a((size_t)N * (dc + dr), 0);
    for (int n = 0; n < N; n++) {
        int pos = n % Tlen;
        T* dk_pe = &dkv_a[(size_t)n * (dc + dr) + dc];
        for (int h = 0; h < H; h++) {
            const T* dkh = &dk[((size_t)n * H + h) * dqk];
            T* dkvb = &dkv_b[((size_t)n * H + h) * (dn + dv)];
            std::copy_n(dkh, dn, dkvb);
            std::copy_n(&dvalue[((size_t)n * H + h) * dv], dv, dkvb + dn);
            for (int i = 0; i < dr; i++) dk_pe[i] += dkh[dn + i];
            rope_backward(&dq[((size_t)n * H + h) * dqk + dn], pos, rope);
        }
        rope_backward(dk_pe, pos, rope);
    }
    std::vector<T> dc_norm((size_t)N * dc, 0), dlatent((size_t)N * dc, 0), latent((size_t)N * dc);
    linear_backward(dc_norm.data(), dw.kv_b, dkv_b.data(), a.c_norm.data(), w.kv_b, N, false);
    for (int n = 0; n < N; n++) std::copy_n(&a.kv_a[(size_t)n * (dc + dr)], dc, &latent[(size_t)n * dc]);
    rmsnorm_backward(dlatent.data(), dw.kv_a_norm, (const T*)nullptr, dc_norm.data(), latent.data(), w.kv_a_norm, a.c_rstd.data(), N, dc);
    for (int n = 0; n < N; n++) std::copy_n(&dlatent[(size_t)n * dc], dc, &dkv_a[(size_t)n * (dc + dr)]);
    linear_backward(dx, dw.kv_a, dkv_a.data(), x, w.kv_a, N, false);
    if (qr > 0) {
        std::vector<T> dqa_norm((size_t)N * qr, 0), dqa((size_t)N * qr, 0);
        linear_backward(dqa_norm.data(), dw.q_b, dq.data(), a.qa_norm.data(), w.q_b, N, false);
        rmsnorm_backward(dqa.data(), dw.q_a_norm, (const T*)nullptr, dqa_norm.data(), a.qa.data(), w.q_a_norm, a.qa_rstd.data(), N, qr);
        linear_backward(dx, dw.q_a, dqa.data(), x, w.q_a, N, true);
    } else {
        linear_backward(dx, dw.q_proj, dq.data(), x, w.q_proj, N, true);
    }
}

// ----------------------------------------------------------------------------
// SwiGLU FFN (dense layers, every routed expert and the shared experts):
// out[n, D] = W_down (silu(W_gate x) * W_up x), hidden width I

template <typename T>
struct FfnActs {
    std::vector<T> gate_up, hidden;  // [n, 2I] (gate, then up), [n, I]
    // FP8 training: the forward keeps gate_up as what its E4M3 copy in 1 x 128 tiles holds (fp8_round_trip_host), as
    // DeepSeek-V3 caches its SwiGLU inputs (§3.3.3), and the backward recomputes hidden from that
    bool fp8 = false;
};

template <typename T>
inline T sigmoid(T x) {
    return 1 / (1 + std::exp(-x));
}

// hidden [n, I] = silu(gate) * up, from gate_up [n, 2I] (gate, then up)
template <typename T>
void swiglu_forward(T* hidden, const T* gate_up, int n, int I) {
    for (size_t r = 0; r < (size_t)n; r++)
        for (int i = 0; i < I; i++) {
            const T g = gate_up[r * 2 * I + i], u = gate_up[r * 2 * I + I + i];
            hidden[r * I + i] = g * sigmoid(g) * u;
        }
}

template <typename T>
void ffn_forward(const FfnWeights<T>& w, T* out, const T* x, int n, FfnActs<T>& a) {
    const int I = w.gate.out;
    a.gate_up.resize((size_t)n * 2 * I);
    a.hidden.resize((size_t)n * I);
    linear_forward(a.gate_up.data(), x, gate_up(w), n);
    swiglu_forward(a.hidden.data(), a.gate_up.data(), n, I);
    linear_forward(out, a.hidden.data(), w.down, n);
    if (a.fp8) fp8_round_trip_host(a.gate_up.data(), n, 2 * I);
}

// silu'(g) = s + g s (1 - s), s = sigmoid(g); dx += when accumulate (the shared
// experts add theirs to the routed experts')
template <typename T>
void ffn_backward(const FfnWeights<T>& w, const FfnWeights<T>& dw, T* dx, const T* dout, const T* x, int n, const FfnActs<T>& a,
                  bool accumulate) {
    const int I = w.gate.out;
    std::vector<T> dhidden((size_t)n * I), dgate_up((size_t)n * 2 * I), rebuilt;
    if (a.fp8) {  // hidden from the kept copy of gate_up, as the backward reads it
        rebuilt.resize((size_t)n * I);
        swiglu_forward(rebuilt.data(), a.gate_up.data(), n, I);
    }
    linear_backward(dhidden.data(), dw.down, dout, a.fp8 ? rebuilt.data() : a.hidden.data(), w.down, n, false);
    for (size_t r = 0; r < (size_t)n; r++)
        for (int i = 0; i < I; i++) {
            const T g = a.gate_up[r * 2 * I + i], u = a.gate_up[r * 2 * I + I + i], s = sigmoid(g), dh = dhidden[r * I + i];
            dgate_up[r * 2 * I + i] = dh * u * (s + g * s * (1 - s));
            dgate_up[r * 2 * I + I + i] = dh * g * s;
        }
    linear_backward(dx, gate_up(dw), dgate_up.data(), x, gate_up(w), n, accumulate);
}

// ----------------------------------------------------------------------------
// MoE router: scores s = sigmoid(W_g u) (or softmax); experts are chosen on s + b
// (b = e_score_correction_bias, no gradient) within the topk_group best groups
// (group score = sum of its two best biased scores); the gates are the unbiased s
// of the chosen, normalised when norm_topk_prob, times routed_scaling_factor.

template <typename T>
struct RouterActs {
    std::vector<T> scores;        // [N, E]
    std::vector<int> expert;      // [N, K] chosen experts, in order of selection
    std::vector<T> gate;          // [N, K]
};

template <typename T>
void router_forward(const Config& c, T* logits, const T* u, const T* w_router, const T* bias, int N, RouterActs<T>& a) {
    const int D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok, G = c.n_group, per_group = E / G;
    matmul_forward(logits, u, w_router, N, D, E);
    a.scores.resize((size_t)N * E);
    a.expert.resize((size_t)N * K);
    a.gate.resize((size_t)N * K);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const T* z = logits + (size_t)n * E;
        T* s = &a.scores[(size_t)n * E];
        if (c.scoring_func == SCORING_SIGMOID) {
            for (int e = 0; e < E; e++) s[e] = sigmoid(z[e]);
        } else {
            T mx = *std::max_element(z, z + E), sum = 0;
            for (int e = 0; e < E; e++) sum += (s[e] = std::exp(z[e] - mx));
            for (int e = 0; e < E; e++) s[e] /= sum;
        }
        std::vector<T> biased(E);
        for (int e = 0; e < E; e++) biased[e] = s[e] + bias[e];
        if (G > 1) {
            std::vector<std::pair<T, int>> group_score(G);
            for (int g = 0; g < G; g++) {
                std::vector<T> v(biased.begin() + g * per_group, biased.begin() + (g + 1) * per_group);
                std::partial_sort(v.begin(), v.begin() + 2, v.end(), std::greater<T>());
                group_score[g] = {v[0] + v[1], g};
            }
            // ties go to the lower index, as torch.topk does on CPU
            std::stable_sort(group_score.begin(), group_score.end(),
                             [](const std::pair<T, int>& x, const std::pair<T, int>& y) { return x.first > y.first; });
            for (int r = c.topk_group; r < G; r++)
                for (int e = 0; e < per_group; e++) biased[group_score[r].second * per_group + e] = -INFINITY;
        }
        std::vector<int> order(E);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return biased[x] > biased[y]; });
        T sum = 0;
        for (int k = 0; k < K; k++) {
            a.expert[(size_t)n * K + k] = order[k];
            sum += s[order[k]];
        }
        T norm = c.norm_topk_prob ? 1 / (sum + (T)1e-20) : 1;
        for (int k = 0; k < K; k++) a.gate[(size_t)n * K + k] = s[order[k]] * norm * (T)c.routed_scaling_factor;
    }
}

// dgate [N, K] -> dscores [N, E] (into dscores, which it overwrites) -> dlogits [N, E]
template <typename T>
void router_backward(const Config& c, T* dlogits, const T* dgate, const T* dscores_extra, const RouterActs<T>& a, int N) {
    const int E = c.n_routed_experts, K = c.num_experts_per_tok;
    const T rsf = (T)c.routed_scaling_factor;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const T* s = &a.scores[(size_t)n * E];
        const int* ex = &a.expert[(size_t)n * K];
        const T* dg = dgate + (size_t)n * K;
        std::vector<T> ds(E, 0);
        if (dscores_extra)
            for (int e = 0; e < E; e++) ds[e] = dscores_extra[(size_t)n * E + e];
        if (c.norm_topk_prob) {
            // g_k = rsf * s_k / S, S = sum of chosen s
            T S = 0, dot_ = 0;
            for (int k = 0; k < K; k++) S += s[ex[k]];
            S += (T)1e-20;
            for (int k = 0; k < K; k++) dot_ += dg[k] * s[ex[k]];
            for (int k = 0; k < K; k++) ds[ex[k]] += rsf * (dg[k] / S - dot_ / (S * S));
        } else {
            for (int k = 0; k < K; k++) ds[ex[k]] += rsf * dg[k];
        }
        T* dz = dlogits + (size_t)n * E;
        if (c.scoring_func == SCORING_SIGMOID) {
            for (int e = 0; e < E; e++) dz[e] = ds[e] * s[e] * (1 - s[e]);
        } else {
            T sum = 0;
            for (int e = 0; e < E; e++) sum += ds[e] * s[e];
            for (int e = 0; e < E; e++) dz[e] = s[e] * (ds[e] - sum);
        }
    }
}

// ----------------------------------------------------------------------------
// Sequence-wise balance loss (DeepSeek-V3 eq. 17-20), averaged over sequences:
//   L = alpha * sum_i f_i P_i,  f_i = E/(K T) * #{t : i chosen at t},
//   P_i = 1/T sum_t s_i,t / sum_j s_j,t
// f is a count, so only P carries gradient.

// f [B, E] of the routing decisions
template <typename T>
std::vector<T> balance_fractions(const Config& c, const RouterActs<T>& a, int B, int Tlen) {
    const int E = c.n_routed_experts, K = c.num_experts_per_tok;
    std::vector<T> f((size_t)B * E, 0);
    for (int n = 0; n < B * Tlen; n++)
        for (int k = 0; k < K; k++) f[(size_t)(n / Tlen) * E + a.expert[(size_t)n * K + k]] += (T)E / ((T)K * Tlen);
    return f;
}

template <typename T>
T balance_loss_forward(const Config& c, const RouterActs<T>& a, int B, int Tlen, double alpha) {
    const int E = c.n_routed_experts;
    std::vector<T> f = balance_fractions(c, a, B, Tlen);
    T loss = 0;
    for (int n = 0; n < B * Tlen; n++) {
        const T* s = &a.scores[(size_t)n * E];
        const T* fb = &f[(size_t)(n / Tlen) * E];
        T sum = 0, fs = 0;
        for (int e = 0; e < E; e++) sum += s[e];
        for (int e = 0; e < E; e++) fs += fb[e] * s[e];
        loss += fs / sum;
    }
    return loss * (T)(alpha / ((double)B * Tlen));
}

// dscores [N, E] (overwritten): d(s_e / sum)/ds = (f_e - sum_j f_j s_j / sum) / sum
template <typename T>
void balance_loss_backward(const Config& c, T* dscores, const RouterActs<T>& a, int B, int Tlen, double alpha, double dloss) {
    const int E = c.n_routed_experts;
    std::vector<T> f = balance_fractions(c, a, B, Tlen);
    const T scale = (T)(dloss * alpha / ((double)B * Tlen));
    for (int n = 0; n < B * Tlen; n++) {
        const T* s = &a.scores[(size_t)n * E];
        const T* fb = &f[(size_t)(n / Tlen) * E];
        T sum = 0, fs = 0;
        for (int e = 0; e < E; e++) sum += s[e];
        for (int e = 0; e < E; e++) fs += fb[e] * s[e];
        for (int e = 0; e < E; e++) dscores[(size_t)n * E + e] = scale * (fb[e] - fs / sum) / sum;
    }
}

// ----------------------------------------------------------------------------
// MoE layer: out = sum_k gate_k E_{expert_k}(u) + Shared(u). Tokens are grouped
// by expert in token order, so each expert runs one matmul over its rows.

template <typename T>
struct MoeActs {
    std::vector<T> logits;                 // [N, E]
    RouterActs<T> router;
    std::vector<std::vector<int>> rows;    // per expert: (token n, slot k) as n * K + k, ascending
    std::vector<std::pair<int, int>> slot; // [N * K] -> (expert, row in that expert's batch)
    std::vector<std::vector<T>> x, y;      // per expert: gathered inputs and outputs [rows, D]
    std::vector<FfnActs<T>> ffn;           // per expert
    FfnActs<T> shared;
    std::vector<T> shared_out;             // [N, D]
    bool fp8 = false;                      // FP8 training: every FFN's FfnActs::fp8
};

template <typename T>
void moe_forward(const Config& c, const MoeWeights<T>& w, T* out, const T* u, int N, MoeActs<T>& a) {
    const int D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok;
    a.logits.resize((size_t)N * E);
    router_forward(c, a.logits.data(), u, w.router.w, w.bias, N, a.router);
    a.rows.assign(E, {});
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) a.rows[a.router.expert[(size_t)n * K + k]].push_back(n * K + k);
    a.x.resize(E);
    a.y.resize(E);
    a.ffn.resize(E);
    for (FfnActs<T>& f : a.ffn) f.fp8 = a.fp8;
    a.shared.fp8 = a.fp8;
    std::fill(out, out + (size_t)N * D, (T)0);
    for (int e = 0; e < E; e++) {
        const int m = (int)a.rows[e].size();
        a.x[e].resize((size_t)m * D);
        a.y[e].resize((size_t)m * D);
        for (int r = 0; r < m; r++) std::copy_n(u + (size_t)(a.rows[e][r] / K) * D, D, &a.x[e][(size_t)r * D]);
        if (m == 0) continue;
        ffn_forward(moe_expert(w, e), a.y[e].data(), a.x[e].data(), m, a.ffn[e]);
    }
    // combine in token order, slots in selection order: deterministic sums
    a.slot.resize((size_t)N * K);
    for (int e = 0; e < E; e++)
        for (int r = 0; r < (int)a.rows[e].size(); r++) a.slot[a.rows[e][r]] = {e, r};
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            auto er = a.slot[(size_t)n * K + k];
            T g = a.router.gate[(size_t)n * K + k];
            const T* y = &a.y[er.first][(size_t)er.second * D];
            for (int i = 0; i < D; i++) out[(size_t)n * D + i] += g * y[i];
        }
    if (c.n_shared_experts > 0) {
        a.shared_out.resize((size_t)N * D);
        ffn_forward(w.shared, a.shared_out.data(), u, N, a.shared);
        for (size_t i = 0; i < (size_t)N * D; i++) out[i] += a.shared_out[i];
    }
}

// dscores_balance [N, E] (or null) is the balance loss's gradient w.r.t. the scores
template <typename T>
void moe_backward(const Config& c, const MoeWeights<T>& w, const MoeWeights<T>& dw, T* du, const T* dout, const T* u, int N,
                  const MoeActs<T>& a, const T* dscores_balance) {
    const int D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok;
    std::vector<T> dgate((size_t)N * K);
    std::vector<std::vector<T>> dx(E);
    for (int e = 0; e < E; e++) {
        const int m = (int)a.rows[e].size();
        if (m == 0) continue;
        std::vector<T> dy((size_t)m * D);
        for (int r = 0; r < m; r++) {
            int slot = a.rows[e][r];
            const T* go = dout + (size_t)(slot / K) * D;
            T g = a.router.gate[slot];
            dgate[slot] = dot(go, &a.y[e][(size_t)r * D], D);
            for (int i = 0; i < D; i++) dy[(size_t)r * D + i] = g * go[i];
        }
        dx[e].assign((size_t)m * D, 0);
        ffn_backward(moe_expert(w, e), moe_expert(dw, e), dx[e].data(), dy.data(), a.x[e].data(), m, a.ffn[e], false);
    }
    // scatter expert input gradients back in token order
    std::fill(du, du + (size_t)N * D, (T)0);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            auto er = a.slot[(size_t)n * K + k];
            const T* d = &dx[er.first][(size_t)er.second * D];
            for (int i = 0; i < D; i++) du[(size_t)n * D + i] += d[i];
        }
    std::vector<T> dlogits((size_t)N * E);
    router_backward(c, dlogits.data(), dgate.data(), dscores_balance, a.router, N);
    linear_backward(du, dw.router, dlogits.data(), u, w.router, N, true);
    if (c.n_shared_experts > 0) ffn_backward(w.shared, dw.shared, du, dout, u, N, a.shared, true);
}

// ----------------------------------------------------------------------------
// Fused softmax + cross-entropy: mean over targets >= 0 of -log p[target].
// probs [N, V] keeps the softmax for backward.

template <typename T>
T crossentropy_forward(T* probs, const T* logits, const int* targets, int N, int V) {
    T loss = 0;
    int count = 0;
    for (int n = 0; n < N; n++) {
        const T* z = logits + (size_t)n * V;
        T* p = probs + (size_t)n * V;
        T mx = *std::max_element(z, z + V), sum = 0;
        for (int i = 0; i < V; i++) sum += (p[i] = std::exp(z[i] - mx));
        for (int i = 0; i < V; i++) p[i] /= sum;
        if (targets[n] < 0) continue;
        loss += -(z[targets[n]] - mx - std::log(sum));
        count++;
    }
    return count ? loss / count : 0;
}

// dlogits = (p - onehot(target)) * dloss / count
template <typename T>
void crossentropy_backward(T* dlogits, const T* probs, const int* targets, int N, int V, T dloss) {
    int count = 0;
    for (int n = 0; n < N; n++) count += targets[n] >= 0;
    const T scale = count > 0 ? dloss / count : 0;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int i = 0; i < V; i++)
            dlogits[(size_t)n * V + i] = targets[n] < 0 ? 0 : scale * (probs[(size_t)n * V + i] - (i == targets[n] ? 1 : 0));
}

// ----------------------------------------------------------------------------
// Dropout (inverted): mask [n] holds 0 or 1/(1-p), drawn from the counter RNG keyed
// by (seed, step, site), so a resumed run draws the same masks.

template <typename T>
void dropout_forward(T* x, T* mask, size_t n, float p, uint64_t key) {
    for (size_t i = 0; i < n; i++) {
        mask[i] = rng_uniform(key, i) < p ? (T)0 : (T)(1.0 / (1.0 - p));
        x[i] *= mask[i];
    }
}

// ----------------------------------------------------------------------------
// The whole model: h = Emb[tok]; per layer h += MLA(RMSNorm(h)), h += FFN(RMSNorm(h));
// logits = Head(RMSNorm(h)); loss = mean cross-entropy (+ balance loss), plus
// mtp_lambda times the MTP module's loss when the config has one.

struct StepOptions {
    float dropout = 0;          // probability; 0 = off
    float attn_dropout = 0;     // on the attention probabilities (AttentionDropout); 0 = off
    float balance_alpha = 0;    // sequence-wise balance loss weight; 0 = off
    float mtp_lambda = 0;       // weight of the MTP module's loss (num_nextn_predict_layers = 1)
    uint64_t dropout_key = 0;   // varies per micro-step so every step draws new masks
};

// the key of one dropout site (1 = embedding, then attention and FFN of each layer
// in order, the MTP module's block last) within a micro-step; the GPU path draws its
// masks with the same keys
inline uint64_t dropout_site_key(uint64_t step_key, uint64_t site) { return mix64(step_key ^ mix64(site)); }

// the key of a block's attention-probability dropout, drawn from its attention site's key
inline uint64_t attention_dropout_key(uint64_t attn_site_key) { return dropout_site_key(attn_site_key, 0); }

// ----------------------------------------------------------------------------
// One transformer block on the residual stream h [N, D], in place:
//   h += MLA(RMSNorm(h)),  h += FFN(RMSNorm(h))   (FFN = MoE or dense SwiGLU)
// with dropout p on each branch's output (keys: the two sites' dropout_site_key) and
// attn_p on the attention probabilities (key: attention_dropout_key of the first).

template <typename T>
struct LayerActs {
    std::vector<T> h_in, xn, xn_rstd;    // [N, D], [N, D], [N]   residual in, normed
    MlaActs<T> mla;
    std::vector<T> attn_out;             // [N, D]
    std::vector<T> h_mid, xn2, xn2_rstd; // residual after attention, normed
    FfnActs<T> ffn;                      // dense layers
    MoeActs<T> moe;                      // MoE layers
    std::vector<T> ffn_out;              // [N, D]
    std::vector<T> attn_mask, ffn_mask;  // dropout masks
    bool fp8 = false;                    // FP8 training: the FFN keeps its SwiGLU input in E4M3 (FfnActs::fp8)
};

template <typename T>
void block_forward(const Config& c, const LayerWeights<T>& w, bool moe, const RopeTable& rope, T* h, int B, int Tlen, LayerActs<T>& a,
                   float p, uint64_t attn_key, uint64_t ffn_key, float attn_p) {
    const int N = B * Tlen, D = c.hidden_size;
    const size_t ND = (size_t)N * D;
    a.h_in.assign(h, h + ND);
    a.xn.resize(ND);
    a.xn_rstd.resize(N);
    rmsnorm_forward(a.xn.data(), a.xn_rstd.data(), h, w.input_norm, N, D, c.rms_norm_eps);
    a.attn_out.resize(ND);
    mla_forward(c, w.attn, rope, a.attn_out.data(), a.xn.data(), B, Tlen, a.mla, AttentionDropout{attn_p, attention_dropout_key(attn_key)});
    if (p > 0) {
        a.attn_mask.resize(ND);
        dropout_forward(a.attn_out.data(), a.attn_mask.data(), ND, p, attn_key);
    }
    for (size_t i = 0; i < ND; i++) h[i] += a.attn_out[i];
    a.h_mid.assign(h, h + ND);
    a.xn2.resize(ND);
    a.xn2_rstd.resize(N);
    rmsnorm_forward(a.xn2.data(), a.xn2_rstd.data(), h, w.post_norm, N, D, c.rms_norm_eps);
    a.ffn_out.resize(ND);
    a.ffn.fp8 = a.moe.fp8 = a.fp8;
    if (moe) moe_forward(c, w.moe, a.ffn_out.data(), a.xn2.data(), N, a.moe);
    else ffn_forward(w.ffn, a.ffn_out.data(), a.xn2.data(), N, a.ffn);
    if (p > 0) {
        a.ffn_mask.resize(ND);
        dropout_forward(a.ffn_out.data(), a.ffn_mask.data(), ND, p, ffn_key);
    }
    for (size_t i = 0; i < ND; i++) h[i] += a.ffn_out[i];
}

// dh [N, D]: in, the gradient of the block's output; out, of its input. A MoE block
// adds the gradient of dloss times its balance loss when balance_alpha > 0.
template <typename T>
void block_backward(const Config& c, const LayerWeights<T>& w, const LayerWeights<T>& g, bool moe, const RopeTable& rope, T* dh, int B,
                    int Tlen, const LayerActs<T>& a, float p, float balance_alpha, T dloss) {
    const int N = B * Tlen, D = c.hidden_size;
    const size_t ND = (size_t)N * D;
    // dh flows to the FFN branch and straight through the residual
    std::vector<T> dbranch(dh, dh + ND), dxn(ND);
    if (p > 0)
        for (size_t i = 0; i < ND; i++) dbranch[i] *= a.ffn_mask[i];
    if (moe) {
        std::vector<T> dscores;
        if (balance_alpha > 0) {
            dscores.resize((size_t)N * c.n_routed_experts);
            balance_loss_backward(c, dscores.data(), a.moe.router, B, Tlen, balance_alpha, (double)dloss);
        }
        moe_backward(c, w.moe, g.moe, dxn.data(), dbranch.data(), a.xn2.data(), N, a.moe, dscores.empty() ? nullptr : dscores.data());
    } else {
        ffn_backward(w.ffn, g.ffn, dxn.data(), dbranch.data(), a.xn2.data(), N, a.ffn, false);
    }
    rmsnorm_backward(dh, g.post_norm, dh, dxn.data(), a.h_mid.data(), w.post_norm, a.xn2_rstd.data(), N, D);
    dbranch.assign(dh, dh + ND);
    if (p > 0)
        for (size_t i = 0; i < ND; i++) dbranch[i] *= a.attn_mask[i];
    mla_backward(c, w.attn, g.attn, rope, dxn.data(), dbranch.data(), a.xn.data(), B, Tlen, a.mla);
    rmsnorm_backward(dh, g.input_norm, dh, dxn.data(), a.h_in.data(), w.input_norm, a.xn_rstd.data(), N, D);
}

// ----------------------------------------------------------------------------
// Multi-token prediction (DeepSeek-V3 §2.2), depth 1: at position i the module
// combines the main model's output h_i with the embedding of the next token t_{i+1}
// and predicts t_{i+2}:
//   h'_i = eh_proj [enorm(Emb(t_{i+1})); hnorm(h_i)]
//   h'   = block(h')                         (layer index num_hidden_layers)
//   logits_i = lm_head(shared_head.norm(h'_i))
// Emb and lm_head are the main model's. The paper writes [hnorm(h); enorm(Emb)], but
// the released weights are run (Megatron, vLLM, SGLang) with the embedding first, and
// h is what the main head reads, after model.norm. t_{i+1} is the main target at i,
// so the last position of each row has no t_{i+2} and predicts nothing; where a
// target is ignored (< 0) that position's embedding row is zero and neither it nor
// the position before predicts. The loss is the mean cross-entropy over the
// predictions, plus the block's balance loss when it is a MoE block and
// balance_alpha > 0.

template <typename T>
struct MtpActs {
    std::vector<int> tokens, targets;  // [N] t_{i+1} (-1: unknown), t_{i+2} (-1: no prediction)
    std::vector<T> emb, en, en_rstd;   // [N, D] Emb(t_{i+1}) (zero rows where unknown), enorm of it, [N]
    std::vector<T> hh, hh_rstd;        // [N, D] hnorm(h), [N]
    std::vector<T> cat;                // [N, 2D] [en; hh], eh_proj's input
    std::vector<T> h;                  // [N, D] eh_proj's output, then in place the block's
    LayerActs<T> block;
    std::vector<T> z, z_rstd;          // [N, D] shared_head.norm(h), [N]
    std::vector<T> logits, probs;      // [N, V]
    T loss = 0, balance = 0;           // the cross-entropy; the block's balance loss
};

// the embedding rows the module reads: unknown tokens read row 0, whose values are then zeroed
inline std::vector<int> mtp_embedding_ids(const std::vector<int>& tokens) {
    std::vector<int> ids(tokens.size());
    for (size_t n = 0; n < tokens.size(); n++) ids[n] = std::max(tokens[n], 0);
    return ids;
}

// the module's targets for rows of Tlen: position n predicts t_{n+2}, the main model's target at n + 1 in the same
// row, where the module's input t_{n+1} (the main target at n) is known; else -1 (mtp_inputs_kernel on the GPU)
inline std::vector<int> mtp_targets(const int* targets, int N, int Tlen) {
    std::vector<int> out(N);
    for (int n = 0; n < N; n++) out[n] = targets[n] >= 0 && n % Tlen < Tlen - 1 ? targets[n + 1] : -1;
    return out;
}

// h [N, D]: the main model's normed output; targets [N]: its targets. Returns loss + balance.
template <typename T>
T mtp_forward(const Config& c, const ModelWeights<T>& w, const RopeTable& rope, const T* h, const int* targets, int B, int Tlen,
              const StepOptions& opt, MtpActs<T>& a) {
    const int N = B * Tlen, D = c.hidden_size, V = c.vocab_size, layer = c.num_hidden_layers;
    const size_t ND = (size_t)N * D;
    a.tokens.assign(targets, targets + N);
    a.targets = mtp_targets(targets, N, Tlen);
    a.emb.resize(ND);
    embedding_forward(a.emb.data(), mtp_embedding_ids(a.tokens).data(), w.embed, N, D);
    for (int n = 0; n < N; n++)
        if (a.tokens[n] < 0) std::fill_n(&a.emb[(size_t)n * D], D, (T)0);
    a.en.resize(ND);
    a.en_rstd.resize(N);
    rmsnorm_forward(a.en.data(), a.en_rstd.data(), a.emb.data(), w.mtp.enorm, N, D, c.rms_norm_eps);
    a.hh.resize(ND);
    a.hh_rstd.resize(N);
    rmsnorm_forward(a.hh.data(), a.hh_rstd.data(), h, w.mtp.hnorm, N, D, c.rms_norm_eps);
    a.cat.resize(2 * ND);
    for (int n = 0; n < N; n++) {
        std::copy_n(&a.en[(size_t)n * D], D, &a.cat[(size_t)n * 2 * D]);
        std::copy_n(&a.hh[(size_t)n * D], D, &a.cat[(size_t)n * 2 * D + D]);
    }
    a.h.resize(ND);
    linear_forward(a.h.data(), a.cat.data(), w.mtp.eh_proj, N);
    const uint64_t site = 2 + 2 * (uint64_t)layer;  // after the embedding's and the main layers' sites
    block_forward(c, w.mtp.block, c.is_moe_layer(layer), rope, a.h.data(), B, Tlen, a.block, opt.dropout,
                  dropout_site_key(opt.dropout_key, site), dropout_site_key(opt.dropout_key, site + 1), opt.attn_dropout);
    a.z.resize(ND);
    a.z_rstd.resize(N);
    rmsnorm_forward(a.z.data(), a.z_rstd.data(), a.h.data(), w.mtp.head_norm, N, D, c.rms_norm_eps);
    a.logits.resize((size_t)N * V);
    linear_forward(a.logits.data(), a.z.data(), w.lm_head, N);
    a.probs.resize(a.logits.size());
    a.loss = crossentropy_forward(a.probs.data(), a.logits.data(), a.targets.data(), N, V);
    a.balance = c.is_moe_layer(layer) && opt.balance_alpha > 0 ? balance_loss_forward(c, a.block.moe.router, B, Tlen, opt.balance_alpha) : 0;
    return a.loss + a.balance;
}

// Adds the gradient of dloss * (loss + balance) of the last mtp_forward into g (the
// shared embedding and head included) and into dh [N, D], the gradient of h.
template <typename T>
void mtp_backward(const Config& c, const ModelWeights<T>& w, const ModelWeights<T>& g, const RopeTable& rope, T* dh, const T* h, int B,
                  int Tlen, const StepOptions& opt, const MtpActs<T>& a, T dloss) {
    const int N = B * Tlen, D = c.hidden_size, V = c.vocab_size, layer = c.num_hidden_layers;
    const size_t ND = (size_t)N * D;
    std::vector<T> dlogits((size_t)N * V), dz(ND), dstream(ND), dcat(2 * ND), den(ND), dhh(ND), demb(ND);
    crossentropy_backward(dlogits.data(), a.probs.data(), a.targets.data(), N, V, dloss);
    linear_backward(dz.data(), g.lm_head, dlogits.data(), a.z.data(), w.lm_head, N, false);
    rmsnorm_backward(dstream.data(), g.mtp.head_norm, (const T*)nullptr, dz.data(), a.h.data(), w.mtp.head_norm, a.z_rstd.data(), N, D);
    block_backward(c, w.mtp.block, g.mtp.block, c.is_moe_layer(layer), rope, dstream.data(), B, Tlen, a.block, opt.dropout,
                   opt.balance_alpha, dloss);
    linear_backward(dcat.data(), g.mtp.eh_proj, dstream.data(), a.cat.data(), w.mtp.eh_proj, N, false);
    for (int n = 0; n < N; n++) {
        std::copy_n(&dcat[(size_t)n * 2 * D], D, &den[(size_t)n * D]);
        std::copy_n(&dcat[(size_t)n * 2 * D + D], D, &dhh[(size_t)n * D]);
    }
    rmsnorm_backward(dh, g.mtp.hnorm, dh, dhh.data(), h, w.mtp.hnorm, a.hh_rstd.data(), N, D);
    rmsnorm_backward(demb.data(), g.mtp.enorm, (const T*)nullptr, den.data(), a.emb.data(), w.mtp.enorm, a.en_rstd.data(), N, D);
    for (int n = 0; n < N; n++)  // a zero row is no embedding's
        if (a.tokens[n] < 0) std::fill_n(&demb[(size_t)n * D], D, (T)0);
    embedding_backward(g.embed, demb.data(), mtp_embedding_ids(a.tokens).data(), N, D);
}

// How often the MTP module's drafts would be accepted in self-speculative decoding (decode.h), on data the
// last forward read: at position n it drafts t_{n+2} from q, its softmax there, and the main model verifies
// it with p, its softmax at n + 1. A draft sampled from q is accepted with probability sum_x min(p(x), q(x))
// (at temperature 1), a greedy one when the two arg-maxes agree (lowest id on ties). probs, mtp_probs,
// logits, mtp_logits [N, V]; sums over the positions with an MTP target (mtp_targets[n] >= 0, so n + 1 is in
// the row) into sampled and greedy; returns their count.
template <typename T>
int mtp_acceptance(const T* probs, const T* mtp_probs, const T* logits, const T* mtp_logits, const int* mtp_targets, int N, int V,
                   double& sampled, double& greedy) {
    int count = 0;
    for (int n = 0; n + 1 < N; n++) {
        if (mtp_targets[n] < 0) continue;
        const T *p = probs + (size_t)(n + 1) * V, *q = mtp_probs + (size_t)n * V;
        for (int i = 0; i < V; i++) sampled += std::min(p[i], q[i]);
        const T *zp = logits + (size_t)(n + 1) * V, *zq = mtp_logits + (size_t)n * V;
        greedy += std::max_element(zp, zp + V) - zp == std::max_element(zq, zq + V) - zq;
        count++;
    }
    return count;
}

template <typename T>
struct RefModel {
    Config cfg;
    ParamLayout layout;
    RopeTable rope;
    std::vector<T> params, grads;
    ModelWeights<T> w, g;  // bound to params and to grads
    // activations of the last forward
    int B = 0, Tlen = 0;
    std::vector<int> inputs, targets;
    std::vector<T> emb_mask;
    std::vector<LayerActs<T>> layers;
    std::vector<T> h_final, hn, hn_rstd, logits, probs;
    MtpActs<T> mtp;  // the MTP module's, when the config has one and the forward had targets
    StepOptions opt;
    T ce_loss = 0, balance_loss = 0;  // balance_loss: the main layers', plus mtp_lambda times the MTP block's
    T mtp_loss = 0;                   // the MTP module's cross-entropy (0 without one)
    std::vector<std::vector<int64_t>> expert_load;  // [c.total_layers()][expert] tokens routed in the last forward
    // FP8 training (ref_enable_fp8): the E4M3 copies of the weights, refreshed by each forward
    std::vector<Fp8Weight> fp8;
    std::vector<uint8_t> fp8_codes;
    std::vector<float> fp8_scales;
};

template <typename T>
void ref_init(RefModel<T>& m, const Config& c) {
    config_check(c);
    m.cfg = c;
    m.layout = param_layout(c);
    m.rope = rope_build(c, c.max_position_embeddings);
    m.params.assign(m.layout.total, 0);
    m.grads.assign(m.layout.total, 0);
    m.w = bind_weights(c, m.layout, m.params.data());
    m.g = bind_weights(c, m.layout, m.grads.data());
}

// the FP8 copies from the weights as they are now (each forward does it, as the GPU's does)
template <typename T>
void ref_quantize_fp8(RefModel<T>& m) {
    for_each_fp8_linear(m.w, [](const Linear<T>& l, const Fp8Weight* q) {
        if (!q) return;
        fp8_quantize_host(q->w, l.w);
        fp8_quantize_transposed_host(q->wt, l.w);
    });
}

// From here on the model's Linears that for_each_fp8_linear names run in FP8, emulated;
// wgrad: their weight gradients too (--fp8-wgrad)
template <typename T>
void ref_enable_fp8(RefModel<T>& m, bool wgrad = false) {
    size_t codes = 0, scales = 0;
    bind_fp8_weights(m.w, m.fp8, nullptr, nullptr, &codes, &scales, wgrad);
    m.fp8_codes.assign(codes, 0);
    m.fp8_scales.assign(scales, 0.0f);
    bind_fp8_weights(m.w, m.fp8, m.fp8_codes.data(), m.fp8_scales.data(), &codes, &scales, wgrad);
    ref_quantize_fp8(m);
}

// and back to the model's type
template <typename T>
void ref_disable_fp8(RefModel<T>& m) {
    for_each_fp8_linear(m.w, [](const Linear<T>&, const Fp8Weight*& slot) { slot = nullptr; });
    m.fp8.clear();
}

// HF's initialisation: normal(0, 0.02) matrices, unit norm weights, zero bias
template <typename T>
void ref_init_weights(RefModel<T>& m, uint64_t seed) {
    for (size_t t = 0; t < m.layout.tensors.size(); t++) {
        const TensorSpec& s = m.layout.tensors[t];
#pragma omp parallel for schedule(static) if (s.numel > (1 << 16))  // each value depends on (seed, tensor, index) alone
        for (size_t i = 0; i < s.numel; i++) {
            T v = 0;
            if (s.kind == TENSOR_DECAY) v = (T)(0.02 * rng_normal(seed + t, i));
            else if (s.kind == TENSOR_NO_DECAY) v = 1;
            m.params[s.offset + i] = v;
        }
    }
}

// Runs the forward pass over inputs [B, T]; targets may be null (logits only;
// entries < 0 are ignored). Returns the cross-entropy plus the balance loss.
template <typename T>
T ref_forward(RefModel<T>& m, const int* inputs, const int* targets, int B, int Tlen, const StepOptions& opt) {
    const Config& c = m.cfg;
    const int N = B * Tlen, D = c.hidden_size, V = c.vocab_size;
    if (Tlen > c.max_position_embeddings) fail("sequence length %d exceeds max_position_embeddings %d", Tlen, c.max_position_embeddings);
    for (int n = 0; n < N; n++)
        if (inputs[n] < 0 || inputs[n] >= V) fail("token id %d at position %d is outside the vocabulary (%d)", inputs[n], n, V);
    m.B = B;
    m.Tlen = Tlen;
    m.opt = opt;
    m.inputs.assign(inputs, inputs + N);
    m.targets.assign(N, -1);
    if (targets) m.targets.assign(targets, targets + N);
    m.layers.resize(c.num_hidden_layers);
    m.expert_load.assign(c.total_layers(), std::vector<int64_t>(c.n_routed_experts, 0));
    m.balance_loss = 0;
    m.mtp_loss = 0;
    uint64_t site = 0;
    auto dropout_key = [&]() { return dropout_site_key(opt.dropout_key, ++site); };
    auto count_load = [&](int l, const LayerActs<T>& a) {
        if (c.is_moe_layer(l))
            for (int n = 0; n < N * c.num_experts_per_tok; n++) m.expert_load[l][a.moe.router.expert[n]]++;
    };
    ref_quantize_fp8(m);

    std::vector<T> h((size_t)N * D);
    embedding_forward(h.data(), inputs, m.w.embed, N, D);
    const uint64_t emb_key = dropout_key();
    if (opt.dropout > 0) {
        m.emb_mask.resize(h.size());
        dropout_forward(h.data(), m.emb_mask.data(), h.size(), opt.dropout, emb_key);
    }
    for (int l = 0; l < c.num_hidden_layers; l++) {
        const uint64_t attn_key = dropout_key(), ffn_key = dropout_key();
        m.layers[l].fp8 = !m.fp8.empty();
        block_forward(c, m.w.layers[l], c.is_moe_layer(l), m.rope, h.data(), B, Tlen, m.layers[l], opt.dropout, attn_key, ffn_key,
                      opt.attn_dropout);
        count_load(l, m.layers[l]);
    }
    m.h_final = h;
    m.hn.resize(h.size());
    m.hn_rstd.resize(N);
    rmsnorm_forward(m.hn.data(), m.hn_rstd.data(), h.data(), m.w.final_norm, N, D, c.rms_norm_eps);
    m.logits.resize((size_t)N * V);
    linear_forward(m.logits.data(), m.hn.data(), m.w.lm_head, N);
    if (!targets) return 0;
    for (int n = 0; n < N; n++)
        if (targets[n] >= V) fail("target id %d at position %d is outside the vocabulary (%d)", targets[n], n, V);
    m.probs.resize(m.logits.size());
    m.ce_loss = crossentropy_forward(m.probs.data(), m.logits.data(), targets, N, V);
    if (opt.balance_alpha > 0)
        for (int l = 0; l < c.num_hidden_layers; l++)
            if (c.is_moe_layer(l)) m.balance_loss += balance_loss_forward(c, m.layers[l].moe.router, B, Tlen, opt.balance_alpha);
    if (c.num_nextn_predict_layers > 0) {
        m.mtp.block.fp8 = !m.fp8.empty();
        mtp_forward(c, m.w, m.rope, m.hn.data(), targets, B, Tlen, opt, m.mtp);
        count_load(c.num_hidden_layers, m.mtp.block);
        m.mtp_loss = m.mtp.loss;
        m.balance_loss += opt.mtp_lambda * m.mtp.balance;
    }
    return m.ce_loss + m.balance_loss + opt.mtp_lambda * m.mtp_loss;
}

// Accumulates the gradient of the last forward's loss (times dloss) into m.grads.
template <typename T>
void ref_backward(RefModel<T>& m, T dloss = 1) {
    const Config& c = m.cfg;
    const int B = m.B, Tlen = m.Tlen, N = B * Tlen, D = c.hidden_size, V = c.vocab_size;
    std::vector<T> dlogits((size_t)N * V), dhn((size_t)N * D), dh((size_t)N * D);
    crossentropy_backward(dlogits.data(), m.probs.data(), m.targets.data(), N, V, dloss);
    linear_backward(dhn.data(), m.g.lm_head, dlogits.data(), m.hn.data(), m.w.lm_head, N, false);
    if (c.num_nextn_predict_layers > 0)
        mtp_backward(c, m.w, m.g, m.rope, dhn.data(), m.hn.data(), B, Tlen, m.opt, m.mtp, dloss * (T)m.opt.mtp_lambda);
    rmsnorm_backward(dh.data(), m.g.final_norm, (const T*)nullptr, dhn.data(), m.h_final.data(), m.w.final_norm, m.hn_rstd.data(), N, D);
    for (int l = c.num_hidden_layers - 1; l >= 0; l--)
        block_backward(c, m.w.layers[l], m.g.layers[l], c.is_moe_layer(l), m.rope, dh.data(), B, Tlen, m.layers[l], m.opt.dropout,
                       m.opt.balance_alpha, dloss);
    if (m.opt.dropout > 0)
        for (size_t i = 0; i < dh.size(); i++) dh[i] *= m.emb_mask[i];
    embedding_backward(m.g.embed, dh.data(), m.inputs.data(), N, D);
}

// ----------------------------------------------------------------------------
// Optimizer: global-norm clipping, AdamW (no decay on norm weights), warmup +
// cosine learning rate, and the aux-loss-free bias update.

struct OptimOptions {
    float lr = 1e-3f;
    float min_lr_fraction = 0.1f;   // cosine decays to lr * this
    int warmup_steps = 100;
    int total_steps = 1000;
    float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
    float weight_decay = 0.1f;
    float grad_clip = 1.0f;         // 0 = off
    float bias_update_speed = 1e-3f;  // gamma of the aux-loss-free balancing; 0 = off
};

// linear warmup from lr/warmup to lr, then cosine down to lr * min_lr_fraction
inline float learning_rate(const OptimOptions& o, int step) {
    if (step < o.warmup_steps) return o.lr * (step + 1) / o.warmup_steps;
    if (step >= o.total_steps) return o.lr * o.min_lr_fraction;
    double progress = (double)(step - o.warmup_steps) / std::max(1, o.total_steps - o.warmup_steps);
    double coeff = 0.5 * (1.0 + std::cos(M_PI * progress));
    return (float)(o.lr * (o.min_lr_fraction + (1 - o.min_lr_fraction) * coeff));
}

// the L2 norm over every trainable gradient, summed in a fixed order
template <typename T>
double grad_norm(const ParamLayout& L, const T* grads) {
    double total = 0;
    for (const TensorSpec& s : L.tensors) {
        if (s.kind == TENSOR_BUFFER) continue;
        double part = 0;
        for (size_t i = 0; i < s.numel; i++) part += (double)grads[s.offset + i] * grads[s.offset + i];
        total += part;
    }
    return std::sqrt(total);
}

// One AdamW step over every trainable tensor; step counts from 1 (bias correction).
// Gradients are scaled by clip / norm first when the norm exceeds clip.
template <typename T>
void adamw_update(const ParamLayout& L, T* params, const T* grads, float* m, float* v, const OptimOptions& o, float lr, int step,
                  double norm) {
    const double scale = (o.grad_clip > 0 && norm > o.grad_clip) ? o.grad_clip / norm : 1.0;
    const double bc1 = 1 - std::pow((double)o.beta1, step), bc2 = 1 - std::pow((double)o.beta2, step);
    for (const TensorSpec& s : L.tensors) {
        if (s.kind == TENSOR_BUFFER) continue;
        const float wd = s.kind == TENSOR_DECAY ? o.weight_decay : 0.0f;
#pragma omp parallel for schedule(static)
        for (size_t i = s.offset; i < s.offset + s.numel; i++) {
            float g = (float)(grads[i] * scale);
            m[i] = o.beta1 * m[i] + (1 - o.beta1) * g;
            v[i] = o.beta2 * v[i] + (1 - o.beta2) * g * g;
            float mhat = (float)(m[i] / bc1), vhat = (float)(v[i] / bc2);
            params[i] -= (T)(lr * (mhat / (std::sqrt(vhat) + o.eps) + wd * (float)params[i]));
        }
    }
}

// b_i += gamma * sign(mean load - load_i) for every MoE layer (DeepSeek-V3 §2.1.2),
// the MTP module's block as one more: its router balances its own load
template <typename T>
void expert_bias_update(const Config& c, const ModelWeights<T>& w, const std::vector<std::vector<int64_t>>& load, float gamma) {
    for (int l = 0; l < c.total_layers(); l++) {
        if (!c.is_moe_layer(l)) continue;
        T* bias = block_weights(w, l).moe.bias;
        double mean = 0;
        for (int64_t x : load[l]) mean += (double)x;
        mean /= c.n_routed_experts;
        for (int e = 0; e < c.n_routed_experts; e++) {
            double diff = mean - (double)load[l][e];
            bias[e] += (T)(gamma * (diff > 0 ? 1 : diff < 0 ? -1 : 0));
        }
    }
}
