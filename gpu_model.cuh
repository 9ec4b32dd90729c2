// gpu_model.cuh — the CUDA path's device state, shared by the training step
// (model.cu) and GPU generation: the weights, optimizer state and every layer's
// activations, allocated once for batches of up to B sequences of T tokens.
#pragma once

#include "dist.h"
#include "model.h"
#include "kernels.cuh"
#include "mla.cuh"
#include "moe.cuh"

// One layer's activations for N = B*T tokens, kept from forward to backward: the
// fp32 residual stream entering the layer (res_in) and after the attention branch
// (res_mid), their RMSNorms (bf16) with rstd [N], and each branch's own tensors.
// Tensors that only the forward reads, and those the backward recomputes cheaply
// (SwiGLU outputs, the expert-sorted inputs), exist once, shared by every layer.
struct GpuLayer {
    float *res_in, *res_mid;  // [N, D]
    bf16 *xn, *xn2;           // [N, D]
    float *rstd1, *rstd2;     // [N]
    MlaActsGpu attn;
    FfnActsGpu ffn;           // dense layers
    MoeActsGpu moe;           // MoE layers
};

// The MTP module's own tensors for N tokens (its block's activations are gpu.layers[num_hidden_layers]).
// At position i it reads the embedding of t_{i+1} and predicts t_{i+2}.
struct MtpGpu {
    int *ids, *targets;        // [N] the embedding rows read (t_{i+1}, row 0 where unknown); the targets t_{i+2} (-1: none)
    bf16* emb;                 // [N, D] Emb(t_{i+1}), zero rows where unknown
    bf16* normed;              // [N, D] enorm(emb), then hnorm(hn), on their way into cat
    bf16* cat;                 // [N, 2D] [enorm(emb); hnorm(hn)], eh_proj's input
    bf16* h;                   // [N, D] eh_proj's output, the block's input
    float *en_rstd, *hh_rstd;  // [N]
    float* h_final;            // [N, D] the stream after the block
    bf16* z;                   // [N, D] shared_head.norm of h_final, the shared head's input
    float* z_rstd;             // [N]
    float *losses, *ce_scale;  // [N] per-row cross-entropy; its gradient's scale
    float* step_loss;          // the step's mean MTP loss, summed over micro-batches like gpu.step_loss
    bf16* dhn;                 // [N, D] the gradient of the main model's normed output, which both heads read
    bf16* dcat;                // [N, 2D] cat's gradient; its first half then serves emb's
    bf16* eval_logits;         // [N, V] its logits in evaluation, beside the main model's (allocated at the first
    float* eval_stats;         // use; training shares gpu.logits) and the window's loss and acceptances [3]
};

// what a captured micro-step bakes in: the batch shape and the loss scalings
struct GraphKey {
    int B = 0, T = 0;
    float dloss = 0, balance_alpha = 0, mtp_lambda = 0;
    bool operator==(const GraphKey& o) const {
        return B == o.B && T == o.T && dloss == o.dloss && balance_alpha == o.balance_alpha && mtp_lambda == o.mtp_lambda;
    }
};

struct GpuModel {
    int B, T, N;  // the largest batch the buffers hold
    GpuContext ctx;
    RopeGpu rope;
    size_t flat;                                // P, the layout's total; under ZeRO-1 zero.padded
    float *params32, *grads;                    // [flat] fp32 master weights, gradients
    float *adam_m, *adam_v;                     // [P] AdamW moments; under ZeRO-1 [zero.shard], this rank's slices
    bf16* params16;                             // [flat] the bf16 copy the GEMMs read
    ModelWeights<bf16> w;                       // bound to params16
    ModelWeights<float> master, grad;           // bound to params32 and grads
    std::vector<Fp8Weight> fp8;                 // FP8 training: the E4M3 copies of w's FP8 Linears,
    Fp8WeightJob* fp8_jobs = nullptr;           // refreshed from w after each optimizer step by these jobs
    int fp8_job_count = 0, fp8_blocks = 0;
    ParamChunk* chunks;
    int num_chunks;
    std::vector<GpuLayer> layers;  // the main layers, then the MTP module's block when the model has one
    MtpGpu mtp;                    // when the model has the MTP module (mtp.h set; dhn and dcat only to train it)
    int moe_layers;        // MoE blocks among layers
    size_t* bias_offsets;  // [moe_layers] offsets of the correction biases in params32
    int* load;             // [moe_layers, E] tokens routed this step
    int *tokens, *targets;
    float* h_final;  // the residual stream after the last layer
    bf16 *emb, *hn, *logits;
    bf16* branch;    // [N, D] the attention or FFN output (after dropout) until the next residual add
    float *hn_rstd, *losses, *ce_scale, *norm2;
    float* step_loss;     // the step's mean loss, summed over micro-batches (each x 1/grad_accum)
    float* balance_loss;  // [moe_layers] the step's balance loss per MoE block, summed likewise (the MTP block's x mtp_lambda)
    // backward temporaries, reused by every layer
    float* dres;          // the residual stream's gradient: fp32, it sums a term from every layer
    bf16 *dbranch, *dxn;  // [N, D]
    float* dscores;       // [N, E] the balance loss's gradient of the router scores
    DeviceArena arena;    // all of the above (the cuBLASLt workspace is in ctx.mm)
    cudaGraphExec_t graph = nullptr;  // the captured forward + backward of one micro-batch
    GraphKey graph_key;
    // Data parallel with ZeRO-1 (dist.world > 1; on one GPU none of this is set up). chunks lists this rank's
    // slices only; each rank updates its slices of params32 and params16, whose other slices are stale until
    // the all-gather (params16, every step) or model_sync_host (params32).
    DistGroup dist;
    ZeroPlan zero;
    cudaStream_t comm_stream = nullptr;     // the reduce-scatters, running beside the rest of the backward
    std::vector<cudaEvent_t> point_done;    // [layers + 2] recorded after each backward point (dist.h grad_ready_point)
    cudaEvent_t comm_done = nullptr;        // every reduce-scatter of the step has run
    bool communicate = false;               // this backward reduce-scatters its buckets (the step's last micro-batch)
    bool host_current = false;              // model_sync_host gathered the state since the last step: a second call
                                            // (model_save's own, on rank 0 only) must not start a collective
};

// Forward of one micro-batch already in gpu.tokens/gpu.targets (B rows of T tokens).
// train: dropout on, CE gradient written into gpu.logits; otherwise losses only.
void gpu_forward(Model& m, int B, int T, const StepOptions& opt, bool train, float dloss);

// The MTP module's input and block over the batch of the last gpu_forward, whose targets are the next tokens
// (-1 where unknown), without dropout: the activations decoding fills the module's latent cache from (decode.cu).
void gpu_mtp_prefill(Model& m, int B, int T);
