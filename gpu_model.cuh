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

// what a captured micro-step bakes in: the batch shape and the loss scalings
struct GraphKey {
    int B = 0, T = 0;
    float dloss = 0, balance_alpha = 0;
    bool operator==(const GraphKey& o) const { return B == o.B && T == o.T && dloss == o.dloss && balance_alpha == o.balance_alpha; }
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
    std::vector<GpuLayer> layers;
    int moe_layers;
    size_t* bias_offsets;  // [moe_layers] offsets of the correction biases in params32
    int* load;             // [moe_layers, E] tokens routed this step
    int *tokens, *targets;
    float* h_final;  // the residual stream after the last layer
    bf16 *emb, *hn, *logits;
    bf16* branch;    // [N, D] the attention or FFN output (after dropout) until the next residual add
    float *hn_rstd, *losses, *ce_scale, *norm2;
    float* step_loss;     // the step's mean loss, summed over micro-batches (each x 1/grad_accum)
    float* balance_loss;  // [moe_layers] the step's balance loss per MoE layer, summed likewise
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
