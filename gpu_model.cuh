// gpu_model.cuh — the CUDA path's device state, shared by the training step
// (model.cu) and GPU generation: the weights, optimizer state and every layer's
// activations, allocated once for batches of up to B sequences of T tokens.
#pragma once

#include "model.h"
#include "kernels.cuh"
#include "mla.cuh"
#include "moe.cuh"

// Activations of one layer for a batch of N = B*T tokens (bf16 unless noted),
// kept from forward to backward:
//   res_in [N,D]  residual stream entering the layer     xn, rstd1  its RMSNorm
//   q [N,H*dqk] (q_pe roped), qa/qa_norm/qa_rstd (q_lora), c/c_norm/c_rstd [N,dc],
//   kv_a [N,dc+dr] (only k_pe, roped, is used), kv_b [N,H*(dn+dv)], k, v, o, lse
//   attn_out [N,D]  (after dropout)                      res_mid, xn2, rstd2
//   dense FFN: gate_up [N,2I], hidden [N,I]
//   MoE: router logits/scores [N,E] fp32, expert/gate [N,K], permutation,
//        x/gu/h/y sorted by expert [S,*], shared expert gate_up/hidden/out
//   ffn_out [N,D]  (after dropout)

struct GpuLayer {
    bf16 *res_in, *xn, *qa, *qa_norm, *q, *c, *c_norm, *kv_a, *kv_b, *k, *v, *o, *attn_out, *res_mid, *xn2;
    float *rstd1, *qa_rstd, *c_rstd, *lse, *rstd2;
    bf16 *gate_up, *hidden;                                   // dense FFN
    float *router_logits, *scores, *gate, *frac, *seq_loss;  // MoE
    int *expert, *offsets, *slot_row, *row_slot;
    bf16 *x_sorted, *gu_sorted, *h_sorted, *y_sorted, *shared_gu, *shared_h, *shared_out;
    bf16* ffn_out;
};

struct GpuModel {
    int B, T, N;  // the largest batch the buffers hold
    cudaStream_t stream;
    Matmul mm;
    RopeGpu rope;
    float *params32, *grads, *adam_m, *adam_v;
    bf16* params16;
    ParamChunk* chunks;
    int num_chunks;
    std::vector<GpuLayer> layers;
    int moe_layers;
    size_t* bias_offsets;  // [moe_layers] offsets of the correction biases in params32
    int* load;             // [moe_layers, E] tokens routed this step
    int *tokens, *targets;
    bf16 *emb, *h_final, *hn, *logits;
    float *hn_rstd, *losses, *ce_scale, *step_loss, *balance_loss, *norm2;
    // backward temporaries, reused by every layer
    float* dres;  // the residual stream's gradient: fp32, it sums a term from every layer
    bf16 *dbranch, *dxn, *d_o, *dq, *dk, *dv, *dkv_b, *dkv_a, *dc_norm, *dc, *dqa_norm, *dqa;
    bf16 *dgate_up, *dhidden, *dy_sorted, *dh_sorted, *dgu_sorted, *dx_sorted, *router_dlogits16;
    float *dgate, *dscores, *router_dlogits;
    void* scratch;
    size_t scratch_bytes;
    std::vector<void*> allocations;
    size_t bytes = 0;  // all of the above, plus the cuBLASLt workspace
};

// pointers to one tensor of the bf16 weights and of the fp32 gradients
struct GpuTensor {
    const bf16* w;
    float* g;
};

inline GpuTensor gpu_tensor(const Model& m, const std::string& name) {
    size_t off = m.ref.layout.offset_of(name);
    return {m.gpu->params16 + off, m.gpu->grads + off};
}

// Forward of one micro-batch already in g.tokens/g.targets (B rows of T tokens).
// train: dropout on, CE gradient written into g.logits; otherwise losses only.
void gpu_forward(Model& m, int B, int T, const StepOptions& so, bool train, float dloss);
