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
//   res_in [N,D]  residual stream entering the layer (fp32)   xn, rstd1  its RMSNorm
//   q [N,H*dqk] (q_pe roped), qa/qa_norm/qa_rstd (q_lora), c/c_norm/c_rstd [N,dc],
//   kv_a [N,dc+dr] (only k_pe, roped, is used), k, v, o, lse
//   res_mid (fp32), xn2, rstd2  (after the attention branch's residual add)
//   dense FFN: gate_up [N,2I]
//   MoE: router logits/scores [N,E] fp32, expert/gate [N,K], permutation,
//        gu/y sorted by expert [S,*], shared expert gate_up
// Tensors that only the forward reads (kv_b, each branch's output, the shared
// experts' output) and those the backward recomputes cheaply (SwiGLU outputs, the
// expert-sorted inputs) live once in GpuModel, reused by every layer.

struct GpuLayer {
    float *res_in, *res_mid;
    bf16 *xn, *qa, *qa_norm, *q, *c, *c_norm, *kv_a, *k, *v, *o, *xn2;
    float *rstd1, *qa_rstd, *c_rstd, *lse, *rstd2;
    bf16* gate_up;                                            // dense FFN
    float *router_logits, *scores, *gate, *frac, *seq_loss;  // MoE
    int *expert, *offsets, *slot_row, *row_slot;
    bf16 *gu_sorted, *y_sorted, *shared_gu;
};

// what a captured micro-step bakes in: the batch shape and the loss scalings
struct GraphKey {
    int B = 0, T = 0;
    float dloss = 0, balance_alpha = 0;
    bool operator==(const GraphKey& o) const { return B == o.B && T == o.T && dloss == o.dloss && balance_alpha == o.balance_alpha; }
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
    float* h_final;  // the residual stream after the last layer
    bf16 *emb, *hn, *logits;
    // forward temporaries, reused by every layer: kv_b [N, H*(dn+dv)]; branch [N, D],
    // the attention or FFN output (after dropout) until the next residual add;
    // shared_out [N, D], the shared experts' output until the combine
    bf16 *kv_b, *branch, *shared_out;
    // reused by every layer and rebuilt by the backward: hidden, a SwiGLU output
    // (dense [N,I], routed [S,MI] or shared [N,SI]); x_sorted [S,D], the MoE input
    // gathered by expert
    bf16 *hidden, *x_sorted;
    float *hn_rstd, *losses, *ce_scale, *norm2;
    float* step_loss;     // the step's mean loss, summed over micro-batches (each x 1/grad_accum)
    float* balance_loss;  // [moe_layers] the step's balance loss per MoE layer, summed likewise
    // backward temporaries, reused by every layer
    float* dres;  // the residual stream's gradient: fp32, it sums a term from every layer
    bf16 *dbranch, *dxn, *d_o, *dq, *dk, *dv, *dkv_b, *dkv_a, *dc_norm, *dc, *dqa_norm, *dqa;
    bf16 *dgate_up, *dhidden, *dy_sorted, *dh_sorted, *dgu_sorted, *dx_sorted, *router_dlogits16;
    float *dgate, *dscores, *router_dlogits;
    void* scratch;
    size_t scratch_bytes;
    DeviceArena arena;  // all of the above (the cuBLASLt workspace is in mm)
    cudaGraphExec_t graph = nullptr;  // the captured forward + backward of one micro-batch
    GraphKey graph_key;
};

// pointers to one tensor of the bf16 weights and of the fp32 gradients
struct GpuTensor {
    const bf16* w;
    float* g;
};

inline GpuTensor gpu_tensor(const Model& m, const std::string& name) {
    size_t off = m.ref.layout.offset_of(name);
    return {m.gpu->params16 + off, m.gpu->grads ? m.gpu->grads + off : nullptr};
}

// Forward of one micro-batch already in g.tokens/g.targets (B rows of T tokens).
// train: dropout on, CE gradient written into g.logits; otherwise losses only.
void gpu_forward(Model& m, int B, int T, const StepOptions& so, bool train, float dloss);
