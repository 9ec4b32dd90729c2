// moe.cuh — the DeepSeekMoE layer on the GPU, forward and backward: the router (sigmoid/softmax scores, correction
// bias, group-limited top-k, gate normalisation and scaling, expert-load counters), the sequence-wise balance loss, the
// deterministic permutation of token slots by expert, gather / weighted combine / scatter, and a tensor-core grouped
// GEMM (wgmma on Hopper, mma.sync elsewhere) whose per-expert row counts stay on the device (no host sync anywhere in
// the layer).
//
// The CPU reference is reference.h (router_forward/backward, balance_loss_forward/backward, moe_forward/backward);
// every kernel here computes the same thing, in the same summation order where the order is ours to choose. Router math
// is fp32 (its logits come from a GEMM as fp32); expert activations are bf16 with fp32 accumulation. Nothing uses float
// atomics: every result is bit-identical run to run (integer atomics commute, so counters may use them).
//
// How moe_forward_gpu (at the end of this file) puts a layer together (N tokens, K experts per token, S = N*K slots;
// slot n*K+k is the k-th choice of token n):
//   logits [N,E] fp32 = u @ W_router^T                      (cuBLASLt matmul)
//   router_forward_gpu      -> scores [N,E], expert [N,K], gate [N,K], load [E]
//   moe_permute_gpu         -> offsets [E+1], slot_row [S], row_slot [S]
//   moe_gather_gpu          -> x_sorted [S,D]   (rows grouped by expert)
//   grouped_gemm_forward_gpu (W = gate_proj|up_proj, OC = 2I) -> gu [S,2I]
//   SwiGLU                  -> h [S,I]   (kernels.cuh's swiglu_*_fused_gpu read this [S,2I] layout)
//   grouped_gemm_forward_gpu (W = down_proj, OC = D) -> y_sorted [S,D]
//   ffn_forward_gpu         -> the shared experts' output [N,D]
//   moe_combine_forward_gpu -> out [N,D] = sum_k gate * y (+ shared expert output)
// and moe_backward_gpu in reverse: moe_combine_backward_gpu (dy_sorted, dgate), grouped_gemm_backward_input/weight_gpu,
// moe_scatter_backward_gpu (du), router_backward_gpu (dlogits), with balance_loss_backward_gpu feeding its
// dscores_extra. A decoding step of a few tokens takes moe_decode_forward_gpu instead: the same router's GEMV (it can
// take the layer's norm from the residual stream), then two kernels of one warp per output for the selection, the
// experts, the shared expert and the combine, the last adding the layer's output into the residual stream.
//
// Expert weights: the grouped GEMMs take a base pointer and an expert stride in elements, W_e = w + e * w_stride, each
// W_e [OC, C] row-major. The model stores experts in Hugging Face order (per expert gate_proj [I,D], up_proj [I,D],
// down_proj [D,I]), so with MoeWeights' expert_stride (3*I*D): gate_up(experts) as the base and OC = 2I runs gate_proj
// and up_proj as one GEMM, and experts.down as the base runs the down projection. bind_weights (reference.h) checks
// both layouts when it binds them. A contiguous [E, OC, C] block is stride OC*C. Weight gradients use the same scheme
// in fp32.
#pragma once

#include <climits>
#include <cstdint>
#include <initializer_list>

#include "config.h"
#include "cuda_common.cuh"
#include "kernels.cuh"

// limits of the router kernel: one warp per token holds E/32 scores per lane
constexpr int MOE_MAX_EXPERTS = 256;
constexpr int MOE_MAX_TOPK = 8;
constexpr int MOE_MAX_GROUPS = 8;

// ----------------------------------------------------------------------------
// What routing needs of the Config, passed to the kernels as one value
struct RouterShape {
    int E, K, G, topk_group, softmax, norm_topk;
    float rsf;  // routed_scaling_factor
};

inline RouterShape router_shape(const Config& c) {
    return {c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group, c.scoring_func == SCORING_SOFTMAX, c.norm_topk_prob,
            c.routed_scaling_factor};
}

// Router forward. One warp per token; lane l holds experts l, l+32, ... in registers (J of them, a template argument,
// so small E costs little). Selection runs on biased = s + bias; the group step keeps the topk_group groups with the
// largest sum of their two best biased scores (ties to the lower group index, like the reference's stable sort), masks
// the rest to -inf, then K rounds of a warp arg-max (ties to the lower expert index) pick the experts in order. Gates
// are the unbiased scores of the chosen, normalised when norm_topk_prob, times routed_scaling_factor.
//
// scores [N,E] fp32, expert [N,K] int, gate [N,K] fp32, load [E] int (+=, may be null), logits [N,E] fp32, bias [E]
// fp32.

// One warp routes one token: z [E] its logits; writes scores_row [E] (unless null), expert_row [K], gate_row [K], and
// counts the choices into hist [E] (unless null). Every lane of the warp calls it.
template <int J>  // experts per lane: E <= 32 * J
__device__ inline void router_route_token(float* scores_row, int* expert_row, float* gate_row, int* hist, const float* z, const float* bias,
                                          const RouterShape& r) {
    const int lane = threadIdx.x % 32, E = r.E, K = r.K, G = r.G;
    float s[J], b[J];
    // scores
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < J; j++) {
        int e = j * 32 + lane;
        s[j] = e < E ? z[e] : -INFINITY;
        mx = fmaxf(mx, s[j]);
    }
    if (r.softmax) {
        mx = warp_max(mx);
        float sum = 0;
#pragma unroll
        for (int j = 0; j < J; j++) {
            int e = j * 32 + lane;
            s[j] = e < E ? expf(s[j] - mx) : 0.0f;
            sum += s[j];
        }
        sum = warp_sum(sum);
#pragma unroll
        for (int j = 0; j < J; j++) s[j] /= sum;
    } else {
#pragma unroll
        for (int j = 0; j < J; j++) s[j] = 1.0f / (1.0f + expf(-s[j]));
    }
#pragma unroll
    for (int j = 0; j < J; j++) {
        int e = j * 32 + lane;
        if (e < E && scores_row) scores_row[e] = s[j];
        b[j] = e < E ? s[j] + bias[e] : -INFINITY;
    }
    // group-limited routing
    if (G > 1) {
        const int per_group = E / G;
        int gid[J];  // group of each held expert (G for none): one division each, not one per group
#pragma unroll
        for (int j = 0; j < J; j++) gid[j] = j * 32 + lane < E ? (j * 32 + lane) / per_group : G;
        float gs[MOE_MAX_GROUPS];
#pragma unroll
        for (int g = 0; g < MOE_MAX_GROUPS; g++) {
            gs[g] = -INFINITY;
            if (g >= G) continue;
            float m1 = -INFINITY, m2 = -INFINITY;  // this lane's two best in group g
#pragma unroll
            for (int j = 0; j < J; j++) {
                if (gid[j] == g) {
                    float v = b[j];
                    if (v > m1) { m2 = m1; m1 = v; }
                    else if (v > m2) m2 = v;
                }
            }
            // merge the lanes' pairs: the two best of four values
            for (int off = 16; off > 0; off >>= 1) {
                float o1 = __shfl_xor_sync(0xffffffffu, m1, off), o2 = __shfl_xor_sync(0xffffffffu, m2, off);
                float hi = fmaxf(m1, o1), lo = fmaxf(fminf(m1, o1), fmaxf(m2, o2));
                m1 = hi;
                m2 = lo;
            }
            gs[g] = m1 + m2;
        }
        // group g survives when fewer than topk_group groups rank before it
        unsigned keep = 0;
#pragma unroll
        for (int g = 0; g < MOE_MAX_GROUPS; g++) {
            if (g >= G) continue;
            int rank = 0;
#pragma unroll
            for (int h = 0; h < MOE_MAX_GROUPS; h++)
                if (h < G && (gs[h] > gs[g] || (gs[h] == gs[g] && h < g))) rank++;
            if (rank < r.topk_group) keep |= 1u << g;
        }
#pragma unroll
        for (int j = 0; j < J; j++) {
            if (gid[j] < G && !((keep >> gid[j]) & 1u)) b[j] = -INFINITY;
        }
    }
    // top-k by repeated warp arg-max; `taken` marks this lane's chosen experts
    unsigned taken = 0;
    int sel_e[MOE_MAX_TOPK];
    float sel_s[MOE_MAX_TOPK];
#pragma unroll
    for (int k = 0; k < MOE_MAX_TOPK; k++) {
        sel_e[k] = 0;
        sel_s[k] = 0;
        if (k >= K) continue;
        float bv = -INFINITY, bs = 0;
        int bi = INT_MAX;
#pragma unroll
        for (int j = 0; j < J; j++) {
            int e = j * 32 + lane;
            // e ascends with j, so `>` keeps the lower index on ties (but a
            // first valid candidate always replaces the INT_MAX sentinel)
            if (e < E && !((taken >> j) & 1u) && (b[j] > bv || bi == INT_MAX)) {
                bv = b[j];
                bi = e;
                bs = s[j];
            }
        }
        for (int off = 16; off > 0; off >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, off), os = __shfl_xor_sync(0xffffffffu, bs, off);
            int oi = __shfl_xor_sync(0xffffffffu, bi, off);
            if (oi != INT_MAX && (bi == INT_MAX || ov > bv || (ov == bv && oi < bi))) {
                bv = ov;
                bi = oi;
                bs = os;
            }
        }
        if (bi % 32 == lane) taken |= 1u << (bi / 32);
        sel_e[k] = bi;
        sel_s[k] = bs;
    }
    float sum = 0;
#pragma unroll
    for (int k = 0; k < MOE_MAX_TOPK; k++)
        if (k < K) sum += sel_s[k];
    const float scale = r.norm_topk ? 1.0f / (sum + 1e-20f) : 1.0f;
#pragma unroll
    for (int k = 0; k < MOE_MAX_TOPK; k++) {
        if (k < K && lane == k) {
            expert_row[k] = sel_e[k];
            gate_row[k] = sel_s[k] * scale * r.rsf;
            if (hist) atomicAdd(&hist[sel_e[k]], 1);
        }
    }
}

template <int J>
static __global__ void router_forward_kernel(float* scores, int* expert, float* gate, int* load, const float* logits,
                                             const float* bias, int N, RouterShape r) {
    __shared__ int hist[MOE_MAX_EXPERTS];  // this block's expert counts: one global atomic per expert per block
    if (load)
        for (int e = threadIdx.x; e < r.E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n < N)  // no early return: the block syncs again below
        router_route_token<J>(scores + (size_t)n * r.E, expert + (size_t)n * r.K, gate + (size_t)n * r.K, load ? hist : nullptr,
                              logits + (size_t)n * r.E, bias, r);
    if (load) {
        __syncthreads();
        for (int e = threadIdx.x; e < r.E; e += blockDim.x)
            if (hist[e]) atomicAdd(&load[e], hist[e]);
    }
}

inline void router_check(const Config& c) {
    const int E = c.n_routed_experts, K = c.num_experts_per_tok, G = c.n_group;
    if (E < 1 || E > MOE_MAX_EXPERTS) fail("router: n_routed_experts = %d, the GPU router supports 1..%d", E, MOE_MAX_EXPERTS);
    if (K < 1 || K > MOE_MAX_TOPK || K > E) fail("router: num_experts_per_tok = %d, the GPU router supports 1..%d", K, MOE_MAX_TOPK);
    if (G < 1 || G > MOE_MAX_GROUPS || E % G) fail("router: n_group = %d, the GPU router supports 1..%d dividing n_routed_experts", G, MOE_MAX_GROUPS);
}

inline void router_forward_gpu(float* scores, int* expert, float* gate, int* load, const float* logits, const float* bias,
                               const Config& c, int N, cudaStream_t stream) {
    router_check(c);
    if (N <= 0) return;
    const int warps = 8, E = c.n_routed_experts;
    auto kernel = E <= 32 ? router_forward_kernel<1> : E <= 64 ? router_forward_kernel<2> : E <= 128 ? router_forward_kernel<4>
                                                                                                   : router_forward_kernel<8>;
    kernel<<<ceil_div(N, warps), warps * 32, 0, stream>>>(scores, expert, gate, load, logits, bias, N, router_shape(c));
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// Router backward: dgate [N,K] -> dscores [N,E] (+ dscores_extra, the balance loss's gradient, when not null)
// -> dlogits [N,E] (overwritten). One warp per token. With norm_topk_prob, g_k = rsf * s_k / S (S = sum of
// the chosen s), so ds_k = rsf * (dg_k / S - sum_j dg_j s_j / S^2).

template <int J>  // experts per lane: E <= 32 * J
static __global__ void router_backward_kernel(float* dlogits, const float* dgate, const float* dscores_extra,
                                              const float* scores, const int* expert, int N, int E, int K, int softmax,
                                              int norm_topk, float rsf) {
    const int lane = threadIdx.x % 32;
    const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const float* s_row = scores + (size_t)n * E;
    float s[J], ds[J];
#pragma unroll
    for (int j = 0; j < J; j++) {
        int e = j * 32 + lane;
        s[j] = e < E ? s_row[e] : 0.0f;
        ds[j] = e < E && dscores_extra ? dscores_extra[(size_t)n * E + e] : 0.0f;
    }
    // every lane computes S and the dot product in selection order (broadcast loads)
    float S = 0, dot = 0;
    if (norm_topk) {
        for (int k = 0; k < K; k++) S += s_row[expert[(size_t)n * K + k]];
        S += 1e-20f;
        for (int k = 0; k < K; k++) dot += dgate[(size_t)n * K + k] * s_row[expert[(size_t)n * K + k]];
    }
    for (int k = 0; k < K; k++) {
        int e = expert[(size_t)n * K + k];
        float dg = dgate[(size_t)n * K + k];
        float d = norm_topk ? rsf * (dg / S - dot / (S * S)) : rsf * dg;
#pragma unroll
        for (int j = 0; j < J; j++)
            if (j * 32 + lane == e) ds[j] += d;
    }
    float* dz = dlogits + (size_t)n * E;
    if (softmax) {
        float sum = 0;
#pragma unroll
        for (int j = 0; j < J; j++) sum += ds[j] * s[j];
        sum = warp_sum(sum);
#pragma unroll
        for (int j = 0; j < J; j++)
            if (j * 32 + lane < E) dz[j * 32 + lane] = s[j] * (ds[j] - sum);
    } else {
#pragma unroll
        for (int j = 0; j < J; j++)
            if (j * 32 + lane < E) dz[j * 32 + lane] = ds[j] * s[j] * (1.0f - s[j]);
    }
}

inline void router_backward_gpu(float* dlogits, const float* dgate, const float* dscores_extra, const float* scores,
                                const int* expert, const Config& c, int N, cudaStream_t stream) {
    router_check(c);
    if (N <= 0) return;
    const int warps = 8, E = c.n_routed_experts;
    auto kernel = E <= 32 ? router_backward_kernel<1> : E <= 64 ? router_backward_kernel<2> : E <= 128 ? router_backward_kernel<4>
                                                                                                     : router_backward_kernel<8>;
    kernel<<<ceil_div(N, warps), warps * 32, 0, stream>>>(dlogits, dgate, dscores_extra, scores, expert, N, E, c.num_experts_per_tok,
                                                          c.scoring_func == SCORING_SOFTMAX, c.norm_topk_prob, c.routed_scaling_factor);
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// Sequence-wise balance loss over B sequences of T tokens (N = B*T):
//   L = alpha / (B*T) * sum_n sum_e f[b(n), e] * s[n, e] / sum_e s[n, e],
//   f[b, e] = E / (K*T) * (times expert e was chosen in sequence b).
// Forward: one block per sequence counts its choices (integer shared atomics), writes frac [B,E] (kept for
// backward) and the sequence's sum to seq_loss [B] (a thread per token, summed in a fixed order); a one-warp
// kernel then sums the B sequence terms in a fixed order into the device scalar *loss.

static __global__ void balance_loss_sequence_kernel(float* frac, float* seq_loss, const float* scores, const int* expert,
                                                    int T, int E, int K) {
    __shared__ int count[MOE_MAX_EXPERTS];
    __shared__ float f[MOE_MAX_EXPERTS];
    const int b = blockIdx.x;
    for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < T * K; i += blockDim.x) atomicAdd(&count[expert[(size_t)b * T * K + i]], 1);
    __syncthreads();
    const float unit = (float)E / ((float)K * (float)T);
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        f[e] = (float)count[e] * unit;
        frac[(size_t)b * E + e] = f[e];
    }
    __syncthreads();
    // thread i sums tokens i, i + blockDim.x, ... in order, each over its E scores
    // (E is small: a warp per token would leave most lanes idle)
    float acc = 0;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const float* s = scores + ((size_t)b * T + t) * E;
        float sum = 0, fs = 0;
        for (int e = 0; e < E; e++) {
            sum += s[e];
            fs += f[e] * s[e];
        }
        acc += fs / sum;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) seq_loss[b] = acc;
}

static __global__ void balance_loss_finish_kernel(float* loss, const float* seq_loss, int B, float scale, int accumulate) {
    float acc = 0;
    for (int b = threadIdx.x; b < B; b += 32) acc += seq_loss[b];
    acc = warp_sum(acc);
    if (threadIdx.x == 0) *loss = (accumulate ? *loss : 0.0f) + acc * scale;
}

// loss: device scalar, overwritten or, with accumulate, added to (a step sums its
// micro-batches without a host sync); frac [B,E] and seq_loss [B]: fp32 scratch,
// frac is read again by the backward. scores [N,E], expert [N,K] from the router.
inline void balance_loss_forward_gpu(float* loss, float* frac, float* seq_loss, const float* scores, const int* expert, int B,
                                     int T, int E, int K, float alpha, bool accumulate, cudaStream_t stream) {
    if (E < 1 || E > MOE_MAX_EXPERTS) fail("balance loss: %d experts, supported 1..%d", E, MOE_MAX_EXPERTS);
    if (B <= 0 || T <= 0) return;
    balance_loss_sequence_kernel<<<B, 256, 0, stream>>>(frac, seq_loss, scores, expert, T, E, K);
    CUDA_LAUNCH_CHECK();
    balance_loss_finish_kernel<<<1, 32, 0, stream>>>(loss, seq_loss, B, (float)(alpha / ((double)B * T)), accumulate ? 1 : 0);
    CUDA_LAUNCH_CHECK();
}

// dscores [N,E] (overwritten) = scale * (f_e - sum_j f_j s_j / sum_j s_j) / sum_j s_j,
// scale = dloss * alpha / (B*T); one warp per token; frac [B,E] from the forward.
static __global__ void balance_loss_backward_kernel(float* dscores, const float* frac, const float* scores, int N, int T, int E,
                                                    float scale) {
    const int lane = threadIdx.x % 32;
    const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const float* s = scores + (size_t)n * E;
    const float* f = frac + (size_t)(n / T) * E;
    float sum = 0, fs = 0;
    for (int e = lane; e < E; e += 32) {
        sum += s[e];
        fs += f[e] * s[e];
    }
    sum = warp_sum(sum);
    fs = warp_sum(fs);
    for (int e = lane; e < E; e += 32) dscores[(size_t)n * E + e] = scale * (f[e] - fs / sum) / sum;
}

inline void balance_loss_backward_gpu(float* dscores, const float* frac, const float* scores, int B, int T, int E,
                                      float alpha, float dloss, cudaStream_t stream) {
    const int N = B * T;
    if (N <= 0) return;
    const int warps = 8;
    balance_loss_backward_kernel<<<ceil_div(N, warps), warps * 32, 0, stream>>>(
        dscores, frac, scores, N, T, E, (float)((double)dloss * alpha / ((double)B * T)));
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// Permutation of the S = N*K slots by expert, stable (an expert's rows are its slots in ascending slot order,
// as in the reference's per-expert lists):
//   offsets [E+1]: expert e owns rows offsets[e] .. offsets[e+1]-1,
//   slot_row [S]:  the row of slot n*K+k,  row_slot [S]: its inverse.
// Three kernels, all deterministic (integer counts only): count each chunk's slots per expert; one block
// scans the counts (per expert over chunks, then over experts); each chunk then places its slots, ranking
// equal experts within a warp with __match_any_sync and across the block's warps through shared counts.

constexpr int MOE_PERM_CHUNK = 2048;   // slots per block
constexpr int MOE_PERM_THREADS = 256;  // threads per block (8 warps)

// ints of scratch moe_permute_gpu needs: [chunks, E] chunk bases
inline size_t moe_permute_scratch_ints(int S, int E) { return (size_t)ceil_div(S, MOE_PERM_CHUNK) * E + 1; }

static __global__ void moe_permute_count_kernel(int* chunk_count, const int* expert, int S, int E) {
    __shared__ int count[MOE_MAX_EXPERTS];
    for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
    __syncthreads();
    const int start = blockIdx.x * MOE_PERM_CHUNK, end = min(S, start + MOE_PERM_CHUNK);
    for (int i = start + threadIdx.x; i < end; i += blockDim.x) atomicAdd(&count[expert[i]], 1);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) chunk_count[(size_t)blockIdx.x * E + e] = count[e];
}

// one block of MOE_MAX_EXPERTS threads: chunk_count becomes each chunk's first row per expert
static __global__ void moe_permute_scan_kernel(int* offsets, int* chunk_count, int chunks, int E) {
    __shared__ int total[MOE_MAX_EXPERTS + 1];
    const int e = threadIdx.x;
    int running = 0;
    if (e < E)
        for (int c = 0; c < chunks; c++) {
            int v = chunk_count[(size_t)c * E + e];
            chunk_count[(size_t)c * E + e] = running;
            running += v;
        }
    if (e < E) total[e] = running;
    __syncthreads();
    if (e == 0) {
        int acc = 0;
        for (int i = 0; i < E; i++) {
            int v = total[i];
            total[i] = acc;
            acc += v;
        }
        total[E] = acc;
    }
    __syncthreads();
    if (e < E) offsets[e] = total[e];
    if (e == 0) offsets[E] = total[E];  // (E may equal the block size)
    if (e < E)
        for (int c = 0; c < chunks; c++) chunk_count[(size_t)c * E + e] += total[e];
}

static __global__ void moe_permute_place_kernel(int* slot_row, int* row_slot, const int* chunk_base, const int* expert, int S,
                                                int E) {
    constexpr int W = MOE_PERM_THREADS / 32;
    __shared__ int base[MOE_MAX_EXPERTS];
    __shared__ int warp_count[W][MOE_MAX_EXPERTS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        base[e] = chunk_base[(size_t)blockIdx.x * E + e];
        for (int w = 0; w < W; w++) warp_count[w][e] = 0;
    }
    __syncthreads();
    const unsigned lower = (1u << lane) - 1;
    const int start = blockIdx.x * MOE_PERM_CHUNK;
    for (int i0 = start; i0 < min(S, start + MOE_PERM_CHUNK); i0 += MOE_PERM_THREADS) {
        const int slot = i0 + threadIdx.x;
        const bool valid = slot < S;
        const int e = valid ? expert[slot] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        const int rank = __popc(peers & lower);
        const bool leader = rank == 0;
        if (valid && leader) warp_count[warp][e] = __popc(peers);
        __syncthreads();
        if (valid) {
            int row = base[e] + rank;
            for (int w = 0; w < warp; w++) row += warp_count[w][e];
            slot_row[slot] = row;
            row_slot[row] = slot;
        }
        __syncthreads();
        if (valid && leader) {
            atomicAdd(&base[e], __popc(peers));  // integer: the order of the adds does not matter
            warp_count[warp][e] = 0;
        }
        __syncthreads();
    }
}

// expert [S] (values 0..E-1) -> offsets [E+1], slot_row [S], row_slot [S]; scratch: moe_permute_scratch_ints(S, E) ints
inline void moe_permute_gpu(int* offsets, int* slot_row, int* row_slot, int* scratch, const int* expert, int S, int E,
                            cudaStream_t stream) {
    if (E < 1 || E > MOE_MAX_EXPERTS) fail("moe permutation: %d experts, supported 1..%d", E, MOE_MAX_EXPERTS);
    const int chunks = ceil_div(S, MOE_PERM_CHUNK);
    if (chunks > 0) {
        moe_permute_count_kernel<<<chunks, MOE_PERM_THREADS, 0, stream>>>(scratch, expert, S, E);
        CUDA_LAUNCH_CHECK();
    }
    moe_permute_scan_kernel<<<1, MOE_MAX_EXPERTS, 0, stream>>>(offsets, scratch, chunks, E);
    CUDA_LAUNCH_CHECK();
    if (chunks > 0) {
        moe_permute_place_kernel<<<chunks, MOE_PERM_THREADS, 0, stream>>>(slot_row, row_slot, scratch, expert, S, E);
        CUDA_LAUNCH_CHECK();
    }
}

// ----------------------------------------------------------------------------
// Gather, combine, scatter. Rows of D elements move as 16-byte vectors of 8 bf16 when D % 8 == 0 (and element by
// element otherwise). Sums are fp32 in the reference's order: slots of a token in selection order k = 0..K-1.

struct MoeBf16x8 {
    float v[8];
};

template <bool VEC>
__device__ inline MoeBf16x8 moe_load8(const bf16* p, int valid) {
    MoeBf16x8 r;
    if (VEC) {
        uint4 raw = *(const uint4*)p;
        const __nv_bfloat162* h = (const __nv_bfloat162*)&raw;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float2 f = __bfloat1622float2(h[i]);
            r.v[2 * i] = f.x;
            r.v[2 * i + 1] = f.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) r.v[i] = i < valid ? __bfloat162float(p[i]) : 0.0f;
    }
    return r;
}

template <bool VEC>
__device__ inline void moe_store8(bf16* p, const MoeBf16x8& r, int valid) {
    if (VEC) {
        uint4 raw;
        __nv_bfloat162* h = (__nv_bfloat162*)&raw;
#pragma unroll
        for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(r.v[2 * i], r.v[2 * i + 1]);
        *(uint4*)p = raw;
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (i < valid) p[i] = __float2bfloat16(r.v[i]);
    }
}

// x_sorted [S,D]: row r is u[row_slot[r] / K]; one thread per 8 elements
template <bool VEC>
static __global__ void moe_gather_kernel(bf16* x_sorted, const bf16* u, const int* row_slot, int S, int D, int K) {
    const int chunks = (D + 7) / 8;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)S * chunks) return;
    const int r = (int)(idx / chunks), i = (int)(idx % chunks) * 8;
    const int n = row_slot[r] / K;
    if (VEC) {
        *(uint4*)(x_sorted + (size_t)r * D + i) = *(const uint4*)(u + (size_t)n * D + i);
    } else {
        for (int j = i; j < min(D, i + 8); j++) x_sorted[(size_t)r * D + j] = u[(size_t)n * D + j];
    }
}

inline void moe_gather_gpu(bf16* x_sorted, const bf16* u, const int* row_slot, int N, int K, int D, cudaStream_t stream) {
    const size_t work = (size_t)N * K * ceil_div(D, 8);
    if (work == 0) return;
    const bool vec = D % 8 == 0 && kdetail::aligned16({x_sorted, u});
    if (vec) moe_gather_kernel<true><<<ceil_div(work, 256), 256, 0, stream>>>(x_sorted, u, row_slot, N * K, D, K);
    else moe_gather_kernel<false><<<ceil_div(work, 256), 256, 0, stream>>>(x_sorted, u, row_slot, N * K, D, K);
    CUDA_LAUNCH_CHECK();
}

// out [N,D] = sum_k gate[n,k] * y_sorted[slot_row[n*K+k]] (+ shared [N,D] when not null)
template <bool VEC>
static __global__ void moe_combine_forward_kernel(bf16* out, const bf16* y_sorted, const float* gate, const int* slot_row,
                                                  const bf16* shared, int N, int D, int K) {
    const int chunks = (D + 7) / 8;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * chunks) return;
    const int n = (int)(idx / chunks), i = (int)(idx % chunks) * 8, valid = min(8, D - i);
    MoeBf16x8 acc = {};
    for (int k = 0; k < K; k++) {
        const float g = gate[(size_t)n * K + k];
        const MoeBf16x8 y = moe_load8<VEC>(y_sorted + (size_t)slot_row[(size_t)n * K + k] * D + i, valid);
#pragma unroll
        for (int j = 0; j < 8; j++) acc.v[j] += g * y.v[j];
    }
    if (shared) {
        const MoeBf16x8 sh = moe_load8<VEC>(shared + (size_t)n * D + i, valid);
#pragma unroll
        for (int j = 0; j < 8; j++) acc.v[j] += sh.v[j];
    }
    moe_store8<VEC>(out + (size_t)n * D + i, acc, valid);
}

inline void moe_combine_forward_gpu(bf16* out, const bf16* y_sorted, const float* gate, const int* slot_row, const bf16* shared,
                                    int N, int K, int D, cudaStream_t stream) {
    const size_t work = (size_t)N * ceil_div(D, 8);
    if (work == 0) return;
    const bool vec = D % 8 == 0 && kdetail::aligned16({out, y_sorted, shared});  // shared may be null
    if (vec) moe_combine_forward_kernel<true><<<ceil_div(work, 256), 256, 0, stream>>>(out, y_sorted, gate, slot_row, shared, N, D, K);
    else moe_combine_forward_kernel<false><<<ceil_div(work, 256), 256, 0, stream>>>(out, y_sorted, gate, slot_row, shared, N, D, K);
    CUDA_LAUNCH_CHECK();
}

// one warp per slot: dy_sorted[row] = gate * dout[n] (bf16), dgate[slot] = dout[n] . y_sorted[row]
template <bool VEC>
static __global__ void moe_combine_backward_kernel(bf16* dy_sorted, float* dgate, const bf16* dout, const bf16* y_sorted,
                                                   const float* gate, const int* slot_row, int S, int D, int K) {
    const int lane = threadIdx.x % 32;
    const int slot = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (slot >= S) return;
    const int n = slot / K, row = slot_row[slot];
    const float g = gate[slot];
    float dot = 0;
    for (int i = lane * 8; i < D; i += 32 * 8) {
        const int valid = min(8, D - i);
        const MoeBf16x8 d = moe_load8<VEC>(dout + (size_t)n * D + i, valid);
        const MoeBf16x8 y = moe_load8<VEC>(y_sorted + (size_t)row * D + i, valid);
        MoeBf16x8 dy;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            dot += d.v[j] * y.v[j];
            dy.v[j] = g * d.v[j];
        }
        moe_store8<VEC>(dy_sorted + (size_t)row * D + i, dy, valid);
    }
    dot = warp_sum(dot);
    if (lane == 0) dgate[slot] = dot;
}

inline void moe_combine_backward_gpu(bf16* dy_sorted, float* dgate, const bf16* dout, const bf16* y_sorted, const float* gate,
                                     const int* slot_row, int N, int K, int D, cudaStream_t stream) {
    const int S = N * K, warps = 8;
    if (S == 0) return;
    const bool vec = D % 8 == 0 && kdetail::aligned16({dy_sorted, dout, y_sorted});
    if (vec) moe_combine_backward_kernel<true><<<ceil_div(S, warps), warps * 32, 0, stream>>>(dy_sorted, dgate, dout, y_sorted, gate, slot_row, S, D, K);
    else moe_combine_backward_kernel<false><<<ceil_div(S, warps), warps * 32, 0, stream>>>(dy_sorted, dgate, dout, y_sorted, gate, slot_row, S, D, K);
    CUDA_LAUNCH_CHECK();
}

// du [N,D] (+= when accumulate, else =) sum_k dx_sorted[slot_row[n*K+k]], fp32 sum, one rounding
template <bool VEC>
static __global__ void moe_scatter_backward_kernel(bf16* du, const bf16* dx_sorted, const int* slot_row, int N, int D, int K,
                                                   int accumulate) {
    const int chunks = (D + 7) / 8;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * chunks) return;
    const int n = (int)(idx / chunks), i = (int)(idx % chunks) * 8, valid = min(8, D - i);
    MoeBf16x8 acc = {};
    if (accumulate) acc = moe_load8<VEC>(du + (size_t)n * D + i, valid);
    for (int k = 0; k < K; k++) {
        const MoeBf16x8 d = moe_load8<VEC>(dx_sorted + (size_t)slot_row[(size_t)n * K + k] * D + i, valid);
#pragma unroll
        for (int j = 0; j < 8; j++) acc.v[j] += d.v[j];
    }
    moe_store8<VEC>(du + (size_t)n * D + i, acc, valid);
}

inline void moe_scatter_backward_gpu(bf16* du, const bf16* dx_sorted, const int* slot_row, int N, int K, int D, bool accumulate,
                                     cudaStream_t stream) {
    const size_t work = (size_t)N * ceil_div(D, 8);
    if (work == 0) return;
    const bool vec = D % 8 == 0 && kdetail::aligned16({du, dx_sorted});
    if (vec) moe_scatter_backward_kernel<true><<<ceil_div(work, 256), 256, 0, stream>>>(du, dx_sorted, slot_row, N, D, K, accumulate);
    else moe_scatter_backward_kernel<false><<<ceil_div(work, 256), 256, 0, stream>>>(du, dx_sorted, slot_row, N, D, K, accumulate);
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// Grouped expert GEMM on tensor cores (mma.sync m16n8k16 bf16, fp32 accumulate).
//
// One kernel template computes a BM x BN tile (BM = 128, BN = 128 or 64) of D[m, n] = sum_k A[m, k] B[k, n] for one
// expert, with a multi-stage cp.async pipeline of BK-wide k slices; 8 warps in a 2x4 grid each own 64 x BN/4 outputs.
// Operands are read either k-contiguous ("K-major": smem [row][k], plain ldmatrix) or m/n-contiguous (smem [k][row],
// ldmatrix.trans), which covers the three products without transposing anything in memory:
//   forward          out[r, o] = x[r, :] . W_e[o, :]    A = x (K-major),    B = W_e (K-major)
//   backward input   dx[r, c]  = dout[r, :] @ W_e[:, c]  A = dout (K-major), B = W_e (N-major)
//   backward weight  dW_e[o,c] += sum_r dout[r,o] x[r,c]  A = dout (M-major), B = x (N-major)
// Forward and backward-input CTAs find their expert and row tile from the device offsets (grid.y is the worst case,
// ceil(S/BM) + E tiles; surplus CTAs exit); grid.x runs over output columns so CTAs in flight share their A rows in L2.
// Backward-weight CTAs own one (expert, OC tile, C tile) and walk all of the expert's rows in order, so dW needs no
// atomics and is bit-reproducible. Every output element accumulates its k16 steps in ascending k whatever the tile
// config, so all configs give bit-identical results. Rows past an expert's end and columns past C/OC are zero-filled
// (cp.async with src-size 0). The 16-byte path needs C % 8 == 0, OC % 8 == 0 and 16-byte aligned pointers and strides;
// otherwise a scalar-load path handles any size (e.g. the tiny preset's moe_intermediate_size = 12), more slowly.

constexpr int MOE_GEMM_BM = 128, MOE_GEMM_THREADS = 256;
constexpr int MOE_GEMM_PAD = 8;  // bf16 of padding per smem row: the 8 rows of an ldmatrix land in distinct banks

// smem elements of one stage of an operand tile with `rows` rows (BM or BN)
template <bool KMAJOR, int BK>
__host__ __device__ constexpr int moe_gemm_tile_elems(int rows) {
    return KMAJOR ? rows * (BK + MOE_GEMM_PAD) : BK * (rows + MOE_GEMM_PAD);
}

template <int MODE, bool B_KMAJOR, int BN, int BK, int STAGES>
constexpr int moe_gemm_smem_bytes() {
    return STAGES * 2 * (moe_gemm_tile_elems<MODE == 0, BK>(MOE_GEMM_BM) + moe_gemm_tile_elems<B_KMAJOR, BK>(BN));
}

// Loads one BK-wide k slice of an operand tile into smem. The operand holds ROWS rows starting at its base;
// element (row, k) lives at base[row * ld + k] when KMAJOR, else at base[k * ld + row]. Valid rows < row_end,
// valid k < k_end; the rest is zero-filled.
template <bool KMAJOR, bool VEC, int ROWS, int BK>
__device__ inline void moe_gemm_load_tile(bf16* smem, const bf16* base, int ld, int row_end, int k0, int k_end) {
    constexpr int CHUNKS = ROWS * BK / 8;  // 16-byte chunks per tile
    static_assert(CHUNKS % MOE_GEMM_THREADS == 0, "tile chunks must divide among the threads");
#pragma unroll
    for (int it = 0; it < CHUNKS / MOE_GEMM_THREADS; it++) {
        const int idx = threadIdx.x + it * MOE_GEMM_THREADS;
        int row, k;  // first element of the chunk; the chunk runs along the contiguous dimension
        bf16* dst;
        if (KMAJOR) {
            row = idx / (BK / 8);
            k = (idx % (BK / 8)) * 8;
            dst = smem + row * (BK + MOE_GEMM_PAD) + k;
        } else {
            k = idx / (ROWS / 8);
            row = (idx % (ROWS / 8)) * 8;
            dst = smem + k * (ROWS + MOE_GEMM_PAD) + row;
        }
        const int kk = k0 + k;
        const bf16* src = KMAJOR ? base + (size_t)row * ld + kk : base + (size_t)kk * ld + row;
        if (VEC) {
            const bool valid = row < row_end && kk < k_end;
            cp_async16(smem_u32(dst), valid ? src : base, valid ? 16 : 0);
        } else {
            // scalar path: 8 bounds-checked loads along the contiguous dimension
            MoeBf16x8 v;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const bool valid = KMAJOR ? (row < row_end && kk + j < k_end) : (row + j < row_end && kk < k_end);
                v.v[j] = valid ? __bfloat162float(src[j]) : 0.0f;
            }
            moe_store8<true>(dst, v, 8);
        }
    }
}

// MOE_GEMM_FWD: bf16 out, m runs over the expert's rows. MOE_GEMM_WGRAD: fp32 dW +=.
enum { MOE_GEMM_FWD = 0, MOE_GEMM_WGRAD = 1 };

// The row tiles of all experts, numbered in expert order (expert e has ceil(rows_e / BM) of them): which expert owns
// tile t, and which of its tiles it is. A warp-wide scan of the tile counts, run by every warp of the block; -1 past
// the last tile (the grid is sized for the worst case, ceil(S / BM) + E tiles).
__device__ inline int moe_find_row_tile(const int* offsets, int E, int BM, int t, int& tile_in) {
    const int lane = threadIdx.x % 32;
    int before = 0;
    for (int e0 = 0; e0 < E; e0 += 32) {
        const int ee = e0 + lane;
        const int cnt = ee < E ? offsets[ee + 1] - offsets[ee] : 0;
        const int tiles = (cnt + BM - 1) / BM;
        int incl = tiles;
        for (int off = 1; off < 32; off <<= 1) {
            int v = __shfl_up_sync(0xffffffffu, incl, off);
            if (lane >= off) incl += v;
        }
        const int excl = incl - tiles;
        const unsigned hit = __ballot_sync(0xffffffffu, t >= before + excl && t < before + incl);
        if (hit) {
            const int l = __ffs(hit) - 1;
            tile_in = t - before - __shfl_sync(0xffffffffu, excl, l);
            return e0 + l;
        }
        before += __shfl_sync(0xffffffffu, incl, 31);
    }
    return -1;
}

// What one CTA of a grouped GEMM kernel computes: rows row0.. (m_end of them) and columns n0.. (n_end) of expert e's
// output, over k_end k. FWD: the rows are the expert's slots, out's rows row0..; a = the A rows (K-major), b = W_e's
// columns n0... WGRAD: the rows are dW_e's (output channels) row0..; a and b start at the expert's first slot, k runs
// over its slots.
struct MoeGemmTile {
    const bf16 *a, *b;
    int e, row0, n0, m_end, n_end, k_end;
};

// false when the CTA has nothing to do (a surplus CTA of the worst-case grid, or dW_e += 0); uniform over the block
template <int MODE, bool B_KMAJOR>
__device__ inline bool moe_gemm_tile(MoeGemmTile& t, int BM, int BN, const bf16* A, int lda, const bf16* Bw, size_t b_stride, int ldb,
                                     const int* offsets, int E, int M, int N, int K) {
    t.n0 = blockIdx.x * BN;
    t.n_end = N - t.n0;
    if (MODE == MOE_GEMM_FWD) {
        int tile_in;
        t.e = moe_find_row_tile(offsets, E, BM, blockIdx.y, tile_in);
        if (t.e < 0) return false;
        t.row0 = offsets[t.e] + tile_in * BM;
        t.m_end = min(BM, offsets[t.e + 1] - t.row0);
        t.a = A + (size_t)t.row0 * lda;
        t.b = Bw + (size_t)t.e * b_stride + (B_KMAJOR ? (size_t)t.n0 * ldb : (size_t)t.n0);
        t.k_end = K;
    } else {
        t.e = blockIdx.z;
        const int r0 = offsets[t.e];
        t.k_end = offsets[t.e + 1] - r0;
        if (t.k_end == 0) return false;
        t.row0 = blockIdx.y * BM;
        t.m_end = M - t.row0;
        t.a = A + (size_t)r0 * lda + t.row0;  // element (m, k) at [k * lda + m]
        t.b = Bw + (size_t)r0 * ldb + t.n0;
    }
    return true;
}

// stores outputs (m, n) and (m, n + 1) of the tile: bf16 to out [., N], or fp32 added to dW_e [M, N]
template <int MODE, bool VEC>
__device__ inline void moe_gemm_store_pair(bf16* out, float* dw, size_t dw_stride, const MoeGemmTile& t, int N, int m, int n, float v0,
                                           float v1) {
    if (m >= t.m_end || n >= t.n_end) return;
    if (MODE == MOE_GEMM_FWD) {
        bf16* o = out + (size_t)(t.row0 + m) * N + t.n0 + n;
        if (VEC) {
            *(__nv_bfloat162*)o = __floats2bfloat162_rn(v0, v1);
        } else {
            o[0] = __float2bfloat16(v0);
            if (n + 1 < t.n_end) o[1] = __float2bfloat16(v1);
        }
    } else {
        float* o = dw + (size_t)t.e * dw_stride + (size_t)(t.row0 + m) * N + t.n0 + n;
        if (VEC) {
            const float2 old = *(float2*)o;
            *(float2*)o = make_float2(old.x + v0, old.y + v1);
        } else {
            o[0] += v0;
            if (n + 1 < t.n_end) o[1] += v1;
        }
    }
}

// Starts a STAGES-deep cp.async pipeline over KT k slices: slices 0..STAGES-2 into stages of the same number, one
// commit group each (empty past the last slice, so that the main loop's wait counts hold)
template <int STAGES, typename Load>
__device__ inline void moe_gemm_prologue(int KT, Load load_stage) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < KT) load_stage(s, s);
        cp_async_commit();
    }
}

// Forward / backward-input (MOE_GEMM_FWD): A is the [S, lda] activations (K-major), B is W_e = Bw + e * b_stride
// (K-major for forward, N-major for backward input), out [S, N]. Backward weight (MOE_GEMM_WGRAD): M = OC, N = C,
// K = the expert's rows; A = dout [S, OC] (M-major), B = x [S, C] (N-major), dw + e * dw_stride [OC, C] fp32 +=.
template <int MODE, bool B_KMAJOR, bool VEC, int BN, int BK, int STAGES>
static __global__ void __launch_bounds__(MOE_GEMM_THREADS, 2)
    grouped_gemm_kernel(bf16* out, float* dw, size_t dw_stride, const bf16* A, int lda, const bf16* Bw, size_t b_stride,
                        int ldb, const int* offsets, int E, int M, int N, int K) {
    constexpr bool A_KMAJOR = MODE == MOE_GEMM_FWD;
    constexpr int BM = MOE_GEMM_BM;
    constexpr int A_ELEMS = moe_gemm_tile_elems<A_KMAJOR, BK>(BM), B_ELEMS = moe_gemm_tile_elems<B_KMAJOR, BK>(BN);
    constexpr int WN = BN / 4, NI = WN / 8;  // warp tile 64 x WN: 4 x NI mma tiles
    static_assert(NI % 2 == 0, "B fragments load in pairs of n8 tiles");
    extern __shared__ __align__(16) unsigned char moe_gemm_smem[];
    bf16* As = (bf16*)moe_gemm_smem;
    bf16* Bs = As + STAGES * A_ELEMS;

    MoeGemmTile t;
    if (!moe_gemm_tile<MODE, B_KMAJOR>(t, BM, BN, A, lda, Bw, b_stride, ldb, offsets, E, M, N, K)) return;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int warp_m = warp / 4, warp_n = warp % 4;

    float acc[4][NI][4] = {};

    const int KT = (t.k_end + BK - 1) / BK;
    auto load_stage = [&](int stage, int kt) {
        moe_gemm_load_tile<A_KMAJOR, VEC, BM, BK>(As + stage * A_ELEMS, t.a, lda, t.m_end, kt * BK, t.k_end);
        moe_gemm_load_tile<B_KMAJOR, VEC, BN, BK>(Bs + stage * B_ELEMS, t.b, ldb, t.n_end, kt * BK, t.k_end);
    };
    moe_gemm_prologue<STAGES>(KT, load_stage);
    for (int kt = 0; kt < KT; kt++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // slice kt is in smem for everyone; slice kt-1's stage is free again
        if (kt + STAGES - 1 < KT) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
        cp_async_commit();
        const bf16* as = As + (kt % STAGES) * A_ELEMS;
        const bf16* bs = Bs + (kt % STAGES) * B_ELEMS;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned af[4][4], bfr[NI][2];
            const int mat = lane / 8, r8 = lane % 8;
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
                const int mb = warp_m * 64 + mi * 16;
                if (A_KMAJOR) ldsm_x4(af[mi], smem_u32(as + (mb + lane % 16) * (BK + MOE_GEMM_PAD) + kk + (lane / 16) * 8));
                else ldsm_x4_trans(af[mi], smem_u32(as + (kk + r8 + (mat / 2) * 8) * (BM + MOE_GEMM_PAD) + mb + (mat % 2) * 8));
            }
#pragma unroll
            for (int p = 0; p < NI / 2; p++) {
                const int nb = warp_n * WN + p * 16;
                unsigned r[4];
                if (B_KMAJOR) ldsm_x4(r, smem_u32(bs + (nb + r8 + (mat / 2) * 8) * (BK + MOE_GEMM_PAD) + kk + (mat % 2) * 8));
                else ldsm_x4_trans(r, smem_u32(bs + (kk + r8 + (mat % 2) * 8) * (BN + MOE_GEMM_PAD) + nb + (mat / 2) * 8));
                bfr[2 * p][0] = r[0];
                bfr[2 * p][1] = r[1];
                bfr[2 * p + 1][0] = r[2];
                bfr[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < NI; ni++) mma16816(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
        }
    }
    cp_async_wait<0>();

    // epilogue: the thread holds rows lane/4 (+8), columns 2*(lane%4) (+1) of each 16x8 tile
#pragma unroll
    for (int mi = 0; mi < 4; mi++)
#pragma unroll
        for (int ni = 0; ni < NI; ni++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int m = warp_m * 64 + mi * 16 + lane / 4 + h * 8;
                const int n = warp_n * WN + ni * 8 + (lane % 4) * 2;
                moe_gemm_store_pair<MODE, VEC>(out, dw, dw_stride, t, N, m, n, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
            }
}

#ifdef HOPPER_WGMMA
// ----------------------------------------------------------------------------
// The same three products on Hopper's wgmma: a 128 x 128 tile per CTA, each of two warpgroups computing 64 x 128 with
// m64n128k16 from 64-wide k slices in 128-byte-swizzled smem (see cuda_common.cuh). wgmma reads either major-ness
// from smem, so here too nothing is transposed in memory:
//   forward          A = x (K-major),    B = W_e (K-major)     grouped_gemm_tma_kernel
//   backward input   A = dout (K-major), B = W_e (N-major)     grouped_gemm_tma_kernel
//   backward weight  A = dout (M-major), B = x (N-major)       grouped_gemm_wgrad_wgmma_kernel
// The first two are fed by the tensor copy engine (TMA). The weight gradient's k is an expert's rows, which end
// mid-slice; a TMA box cannot stop there (the next expert's rows would enter the sum), so its slices come through
// cp.async, which zero-fills past the end. Tiles are assigned as in the mma.sync kernel above, and each output element
// still sums its expert's k in ascending 16-wide steps, so the results are the mma.sync kernel's, bit for bit. The
// 16-byte path only: the kernel above covers other sizes and builds for GPUs before Hopper.

constexpr int MOE_WG_BN = 128, MOE_WG_BK = 64;
constexpr int MOE_WG_TILE_BYTES = MOE_GEMM_BM * MOE_WG_BK * 2;  // one operand's stage: 128 rows x 64 k of bf16

template <int STAGES>
constexpr int moe_wgmma_smem_bytes() {
    return STAGES * 2 * MOE_WG_TILE_BYTES + 1024;  // + slack to align the tiles to 1024 bytes, as the swizzle needs
}

// Loads one 64-wide k slice of a ROWS-row M- or N-major operand tile (element (row, k) at base[k * ld + row]) into
// swizzled smem at `smem` (1024-aligned) as atoms of 64 rows (8 KiB each) of 64 k, the THREADS loading threads
// numbered by tid. Rows >= row_end and k >= k_end are zero-filled.
template <int ROWS, int THREADS>
__device__ inline void moe_wgmma_load_tile(uint32_t smem, const bf16* base, int ld, int row_end, int k0, int k_end, int tid) {
    constexpr int CHUNKS = ROWS * MOE_WG_BK / 8;  // of 16 bytes
    static_assert(CHUNKS % THREADS == 0, "tile chunks must divide among the threads");
#pragma unroll
    for (int it = 0; it < CHUNKS / THREADS; it++) {
        const int idx = tid + it * THREADS;
        const int k = idx / (ROWS / 8), row = (idx % (ROWS / 8)) * 8;  // the chunk's first element; it runs along rows
        const uint32_t dst = smem + (row / 64) * (MOE_WG_BK * 128) + swizzle128(k, (row % 64) / 8);
        const int kk = k0 + k;
        const bf16* src = base + (size_t)kk * ld + row;
        const bool valid = row < row_end && kk < k_end;
        cp_async16(dst, valid ? src : base, valid ? 16 : 0);
    }
}

// a wgmma kernel's epilogue: the thread holds rows (warp % 4) * 16 + lane / 4 (+8) of its warpgroup's 64 of the 128 x 128
// tile, columns 8i + 2 (lane % 4) (+1)
template <int MODE>
__device__ inline void moe_wgmma_store(bf16* out, float* dw, size_t dw_stride, const MoeGemmTile& t, int N, const float (&acc)[64]) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, wg = warp / 4;
#pragma unroll
    for (int i = 0; i < MOE_WG_BN / 8; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int m = wg * 64 + (warp % 4) * 16 + lane / 4 + h * 8;
            const int n = i * 8 + (lane % 4) * 2;
            moe_gemm_store_pair<MODE, true>(out, dw, dw_stride, t, N, m, n, acc[4 * i + 2 * h], acc[4 * i + 2 * h + 1]);
        }
}

// The backward weight, STAGES slices deep; arguments as grouped_gemm_kernel's (out, b_stride and K unused).
template <int STAGES>
static __global__ void __launch_bounds__(MOE_GEMM_THREADS, STAGES <= 3 ? 2 : 1)
    grouped_gemm_wgrad_wgmma_kernel(bf16* out, float* dw, size_t dw_stride, const bf16* A, int lda, const bf16* Bw, size_t b_stride,
                                    int ldb, const int* offsets, int E, int M, int N, int K) {
    constexpr int BM = MOE_GEMM_BM, BN = MOE_WG_BN, BK = MOE_WG_BK, TILE = MOE_WG_TILE_BYTES;
    extern __shared__ __align__(16) unsigned char moe_gemm_smem[];
    const uint32_t As = (smem_u32(moe_gemm_smem) + 1023) & ~1023u;
    const uint32_t Bs = As + STAGES * TILE;

    MoeGemmTile t;
    if (!moe_gemm_tile<MOE_GEMM_WGRAD, false>(t, BM, BN, A, lda, Bw, b_stride, ldb, offsets, E, M, N, K)) return;
    const int wg = threadIdx.x / 128;  // the warpgroup's rows of the tile: 64 * wg ..

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = 0.0f;

    const int KT = (t.k_end + BK - 1) / BK;
    auto load_stage = [&](int stage, int kt) {
        moe_wgmma_load_tile<BM, MOE_GEMM_THREADS>(As + stage * TILE, t.a, lda, t.m_end, kt * BK, t.k_end, threadIdx.x);
        moe_wgmma_load_tile<BN, MOE_GEMM_THREADS>(Bs + stage * TILE, t.b, ldb, t.n_end, kt * BK, t.k_end, threadIdx.x);
    };
    moe_gemm_prologue<STAGES>(KT, load_stage);
    for (int kt = 0; kt < KT; kt++) {
        cp_async_wait<STAGES - 2>();
        fence_proxy_async();
        __syncthreads();  // slice kt is in smem for both warpgroups, and both have finished reading slice kt-1
        if (kt + STAGES - 1 < KT) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
        cp_async_commit();
        // this warpgroup's 64 rows are the A tile's 64-row atom wg (8 KiB each); a 16-wide k step is 16 rows of an atom
        const uint32_t as = As + (kt % STAGES) * TILE + wg * 8192, bs = Bs + (kt % STAGES) * TILE;
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < BK / 16; j++)
            wgmma_m64n128k16<true, true>(acc, wgmma_desc(as + j * 2048, 8192, 1024), wgmma_desc(bs + j * 2048, 8192, 1024));
        wgmma_commit();
        wgmma_wait<0>();
    }
    wgmma_fence_operands(acc);
    cp_async_wait<0>();

    moe_wgmma_store<MOE_GEMM_WGRAD>(out, dw, dw_stride, t, N, acc);
}

// ----------------------------------------------------------------------------
// Forward and backward-input on wgmma, fed by the tensor copy engine (TMA) instead of the threads. Nine warps: warp 8's
// first lane issues each stage's copies (A's 128 x 64 box, B's 128 x 64 or two 64 x 64) onto an mbarrier, and the two
// warpgroups of warps 0..7 only wait on it and issue their m64n128k16s, keeping one wgmma group in flight; each warp
// hands a stage back on a second mbarrier once the group that read it is retired. So no thread spends issue slots on
// loads, and no barrier stops both warpgroups once a slice: 1.12-1.26x the same wgmma loop fed by 256 threads' cp.async
// (H200, small's shapes). The copies land in the 128-byte-swizzled layout the descriptors expect; rows past an
// expert's end are the next expert's (their outputs are never stored), and k or n past the tensor's end read as zeros.

constexpr int MOE_TMA_STAGES = 3, MOE_TMA_THREADS = 288;

// out [S, N] as grouped_gemm_kernel<MOE_GEMM_FWD, B_KMAJOR>: map_a is A [S rows, K] (box 64 k x 128 rows); map_b
// is W [E][N rows][K] (B_KMAJOR, box 64 x 128 x 1) or W [E][K rows][N] (box 64 n x 64 k x 1, two a stage)
template <bool B_KMAJOR>
static __global__ void __launch_bounds__(MOE_TMA_THREADS, 2)
    grouped_gemm_tma_kernel(bf16* out, const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                            const int* offsets, int E, int N, int K) {
    constexpr int BM = MOE_GEMM_BM, BN = MOE_WG_BN, BK = MOE_WG_BK, TILE = MOE_WG_TILE_BYTES, STAGES = MOE_TMA_STAGES;
    extern __shared__ __align__(16) unsigned char moe_gemm_smem[];
    const uint32_t As = (smem_u32(moe_gemm_smem) + 1023) & ~1023u;
    const uint32_t Bs = As + STAGES * TILE;
    const uint32_t full = Bs + STAGES * TILE;  // [STAGES] mbarriers: the stage's bytes have landed
    const uint32_t empty = full + 8 * STAGES;  // [STAGES]: the 8 multiplying warps are done with the stage

    MoeGemmTile t;
    if (!moe_gemm_tile<MOE_GEMM_FWD, B_KMAJOR>(t, BM, BN, nullptr, 0, nullptr, 0, 0, offsets, E, 0, N, K)) return;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    const int KT = (K + BK - 1) / BK;

    if (warp == 8) {  // the loader
        if (lane == 0)
            for (int kt = 0; kt < KT; kt++) {
                const int s = kt % STAGES;
                if (kt >= STAGES) mbar_wait(empty + 8 * s, (kt / STAGES - 1) & 1);
                const uint32_t bar = full + 8 * s, a = As + s * TILE, b = Bs + s * TILE;
                mbar_expect_tx(bar, 2 * TILE);
                tma_load_2d(a, &map_a, kt * BK, t.row0, bar);
                if (B_KMAJOR) {
                    tma_load_3d(b, &map_b, kt * BK, t.n0, t.e, bar);
                } else {
                    tma_load_3d(b, &map_b, t.n0, kt * BK, t.e, bar);
                    tma_load_3d(b + TILE / 2, &map_b, t.n0 + 64, kt * BK, t.e, bar);
                }
            }
        return;
    }

    const int wg = warp / 4;
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = 0.0f;
    for (int kt = 0; kt < KT; kt++) {
        const int s = kt % STAGES;
        mbar_wait(full + 8 * s, (kt / STAGES) & 1);
        const uint32_t as = As + s * TILE + wg * 8192, bs = Bs + s * TILE;
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < BK / 16; j++) {
            const uint64_t da = wgmma_desc(as + j * 32, 16, 1024);
            const uint64_t db = B_KMAJOR ? wgmma_desc(bs + j * 32, 16, 1024) : wgmma_desc(bs + j * 2048, 8192, 1024);
            wgmma_m64n128k16<false, !B_KMAJOR>(acc, da, db);
        }
        wgmma_commit();
        wgmma_wait<1>();  // slice kt-1's group is retired: its stage can be loaded again
        if (kt > 0 && lane == 0) mbar_arrive(empty + 8 * ((kt - 1) % STAGES));
    }
    wgmma_wait<0>();
    wgmma_fence_operands(acc);
    moe_wgmma_store<MOE_GEMM_FWD>(out, nullptr, 0, t, N, acc);
}

constexpr int moe_tma_smem_bytes() { return 2 * MOE_TMA_STAGES * MOE_WG_TILE_BYTES + 16 * MOE_TMA_STAGES + 1024; }

#endif

// The > 48 KiB shared-memory opt-in, once per kernel and device (the attribute is the current device's; a process may
// drive several, as test/gpu_dist.cu does). Static like the kernels, so every translation unit opts its own copy in.
template <auto KERNEL>
static inline void moe_gemm_opt_in(int smem) {
    static bool configured[MAX_DEVICES] = {};
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    if (dev >= MAX_DEVICES || !configured[dev]) {
        CUDA_CHECK(cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        if (dev < MAX_DEVICES) configured[dev] = true;
    }
}

// Launches one grouped GEMM kernel of MOE_GEMM_THREADS threads
template <auto KERNEL>
static inline void moe_gemm_run(int smem, dim3 grid, cudaStream_t stream, bf16* out, float* dw, size_t dw_stride, const bf16* A, int lda,
                                const bf16* B, size_t b_stride, int ldb, const int* offsets, int E, int M, int N, int K) {
    moe_gemm_opt_in<KERNEL>(smem);
    KERNEL<<<grid, MOE_GEMM_THREADS, smem, stream>>>(out, dw, dw_stride, A, lda, B, b_stride, ldb, offsets, E, M, N, K);
    CUDA_LAUNCH_CHECK();
}

// vec: the 16-byte path (grouped_gemm_vec). wgmma: Hopper's kernels where the build has them and vec holds (their own
// 128 x 128 tile; STAGES is the weight gradient's, BN and BK the mma.sync kernel's).
template <int MODE, bool B_KMAJOR, int BN, int BK, int STAGES>
static inline void grouped_gemm_launch(bool vec, bool wgmma, dim3 grid, cudaStream_t stream, bf16* out, float* dw, size_t dw_stride,
                                       const bf16* A, int lda, const bf16* B, size_t b_stride, int ldb, const int* offsets, int E, int M,
                                       int N, int K) {
#ifdef HOPPER_WGMMA
    if (vec && wgmma) {
        grid.x = ceil_div(N, MOE_WG_BN);
        if constexpr (MODE == MOE_GEMM_FWD) {
            const uint64_t k = K, n = N, experts = E, b_ld = ldb;
            const CUtensorMap map_a = bf16_tensor_map<2>(A, {k, (uint64_t)M}, {(uint64_t)lda}, {MOE_WG_BK, MOE_GEMM_BM});
            const CUtensorMap map_b = B_KMAJOR ? bf16_tensor_map<3>(B, {k, n, experts}, {b_ld, b_stride}, {MOE_WG_BK, MOE_WG_BN, 1})
                                               : bf16_tensor_map<3>(B, {n, k, experts}, {b_ld, b_stride}, {64, MOE_WG_BK, 1});
            constexpr int smem = moe_tma_smem_bytes();
            moe_gemm_opt_in<grouped_gemm_tma_kernel<B_KMAJOR>>(smem);
            grouped_gemm_tma_kernel<B_KMAJOR><<<grid, MOE_TMA_THREADS, smem, stream>>>(out, map_a, map_b, offsets, E, N, K);
            CUDA_LAUNCH_CHECK();
        } else {
            static_assert(!B_KMAJOR, "the weight gradient reads x N-major");
            moe_gemm_run<grouped_gemm_wgrad_wgmma_kernel<STAGES>>(moe_wgmma_smem_bytes<STAGES>(), grid, stream, out, dw, dw_stride, A, lda, B,
                                                                  b_stride, ldb, offsets, E, M, N, K);
        }
        return;
    }
#endif
    (void)wgmma;
    constexpr int smem = moe_gemm_smem_bytes<MODE, B_KMAJOR, BN, BK, STAGES>();
    if (vec)
        moe_gemm_run<grouped_gemm_kernel<MODE, B_KMAJOR, true, BN, BK, STAGES>>(smem, grid, stream, out, dw, dw_stride, A, lda, B, b_stride,
                                                                              ldb, offsets, E, M, N, K);
    else
        moe_gemm_run<grouped_gemm_kernel<MODE, B_KMAJOR, false, BN, BK, STAGES>>(smem, grid, stream, out, dw, dw_stride, A, lda, B, b_stride,
                                                                               ldb, offsets, E, M, N, K);
}

inline void grouped_gemm_check(const char* what, int S, int E, int C, int OC) {
    if (E < 1 || E > MOE_MAX_EXPERTS) fail("%s: %d experts, supported 1..%d", what, E, MOE_MAX_EXPERTS);
    if (S < 0 || C <= 0 || OC <= 0) fail("%s: bad shape rows=%d C=%d OC=%d", what, S, C, OC);
    if ((long long)ceil_div(S, MOE_GEMM_BM) + E > 65535) fail("%s: %d rows exceed the grid limit", what, S);
}

// the 16-byte path: dimensions multiples of 8, 16-byte aligned pointers, strides multiples of 8
inline bool grouped_gemm_vec(int C, int OC, size_t stride, std::initializer_list<const void*> ptrs) {
    return C % 8 == 0 && OC % 8 == 0 && stride % 8 == 0 && kdetail::aligned16(ptrs);
}

// The tile config (BN in {64, 128}, BK in {32, 64}, STAGES) is a template argument; the default, BN=128, BK=64, 3
// stages (110.6 KB of shared memory, 2 CTAs per SM), measured fastest of {128,32,4}, {128,64,3}, {128,64,4}, {64,64,4},
// {64,32,4} for all three products at rows=32768, C=768, OC=768/1536, E=8 (test/gpu_moe.cu's "moe timing" case).
// The wgmma weight-gradient kernel takes STAGES only; 3 (97 KB, 2 CTAs per SM) beat 4 (1 CTA) there too. On an H200 at
// those shapes the cp.async wgmma kernel ran 290-420 TFLOP/s against the mma.sync kernel's 190-285 (cuBLASLt, one
// launch per expert: 340-560), and the TMA kernel now runs forward and backward-input at 374-463. Session 7's
// warp-specialised form (a loading warpgroup of cp.async, 1 CTA per SM) was no faster; what paid was the copy engine,
// which frees the warps of loads, at 2 CTAs per SM.

// out [S, OC] = x [S, C] @ W_e^T for the rows offsets[e]..offsets[e+1]-1 of each expert e; W_e = w + e * w_stride is
// [OC, C]. S = N*K is the total row count (offsets[E] must equal it; the host uses it only to size the grid).
template <int BN = 128, int BK = 64, int STAGES = 3>
inline void grouped_gemm_forward_gpu(bf16* out, const bf16* x, const bf16* w, size_t w_stride, const int* offsets, int S, int E,
                                     int C, int OC, cudaStream_t stream, bool allow_wgmma = true) {
    grouped_gemm_check("grouped_gemm_forward", S, E, C, OC);
    if (S == 0) return;
    dim3 grid(ceil_div(OC, BN), ceil_div(S, MOE_GEMM_BM) + E);
    grouped_gemm_launch<MOE_GEMM_FWD, true, BN, BK, STAGES>(grouped_gemm_vec(C, OC, w_stride, {out, x, w}), allow_wgmma, grid, stream, out, nullptr, 0,
                                                            x, C, w, w_stride, C, offsets, E, S, OC, C);
}

// dx [S, C] = dout [S, OC] @ W_e for each expert's rows (written)
template <int BN = 128, int BK = 64, int STAGES = 3>
inline void grouped_gemm_backward_input_gpu(bf16* dx, const bf16* dout, const bf16* w, size_t w_stride, const int* offsets, int S,
                                            int E, int C, int OC, cudaStream_t stream, bool allow_wgmma = true) {
    grouped_gemm_check("grouped_gemm_backward_input", S, E, C, OC);
    if (S == 0) return;
    dim3 grid(ceil_div(C, BN), ceil_div(S, MOE_GEMM_BM) + E);
    grouped_gemm_launch<MOE_GEMM_FWD, false, BN, BK, STAGES>(grouped_gemm_vec(C, OC, w_stride, {dx, dout, w}), allow_wgmma, grid, stream, dx, nullptr, 0,
                                                             dout, OC, w, w_stride, C, offsets, E, S, C, OC);
}

// dW_e [OC, C] += dout[rows_e, OC]^T @ x[rows_e, C] in fp32, dW_e = dw + e * dw_stride;
// each element sums its expert's rows in a fixed order (deterministic, no atomics)
template <int BN = 128, int BK = 64, int STAGES = 3>
inline void grouped_gemm_backward_weight_gpu(float* dw, size_t dw_stride, const bf16* dout, const bf16* x, const int* offsets, int S,
                                             int E, int C, int OC, cudaStream_t stream, bool allow_wgmma = true) {
    grouped_gemm_check("grouped_gemm_backward_weight", S, E, C, OC);
    if (S == 0) return;
    dim3 grid(ceil_div(C, BN), ceil_div(OC, MOE_GEMM_BM), E);
    grouped_gemm_launch<MOE_GEMM_WGRAD, false, BN, BK, STAGES>(grouped_gemm_vec(C, OC, dw_stride, {dw, dout, x}), allow_wgmma, grid, stream, nullptr, dw,
                                                               dw_stride, dout, OC, x, 0, C, offsets, E, OC, C, 0);
}

// ----------------------------------------------------------------------------
// The SwiGLU FFN and the MoE layer on the GPU, the twins of reference.h's ffn_forward / ffn_backward and
// moe_forward / moe_backward (same arguments in the same order, then the GpuContext, then in the forwards an
// optional FP8 copy of the input). Dense layers and the shared experts run the FFN; the routed experts run the
// grouped GEMMs above on the same weights' layout.

struct FfnActsGpu {
    bf16* gate_up;             // [n, 2I] one layer's, kept from forward to backward; in FP8 training a temporary
    // temporaries shared by every layer
    bf16* hidden;              // [n, I] the SwiGLU output, rebuilt by the backward
    bf16 *dgate_up, *dhidden;  // the backward's, shaped as above
    Fp8Matrix gate_up_fp8;     // FP8 training: the layer's E4M3 copy of gate_up, kept instead (kernels.cuh's SwiGLU)
};

// out [n, D] = down(silu(gate x) * up x), gate and up as one [2I, D] GEMM; x_fp8: x's
// FP8 copy (fp8_copy), if the norm that made x wrote one
inline void ffn_forward_gpu(const FfnWeights<bf16>& w, bf16* out, const bf16* x, int n, FfnActsGpu& a, GpuContext& ctx,
                            const Fp8Matrix& x_fp8 = {}) {
    linear_forward_gpu(a.gate_up, x, gate_up(w), n, ctx, x_fp8);
    const Fp8Matrix hidden_fp8 = fp8_input_copy(ctx, w.down, n);
    swiglu_forward_fused_gpu(a.hidden, a.gate_up, n, w.gate.out, ctx.stream, hidden_fp8, a.gate_up_fp8);
    linear_forward_gpu(out, a.hidden, w.down, n, ctx, hidden_fp8);
}

// dx [n, D] written, or added to when accumulate (the shared experts add theirs to
// the routed experts'); weight gradients added into dw
inline void ffn_backward_gpu(const FfnWeights<bf16>& w, const FfnWeights<float>& dw, bf16* dx, const bf16* dout, const bf16* x, int n,
                             const FfnActsGpu& a, bool accumulate, GpuContext& ctx) {
    const int I = w.gate.out;
    const bf16* kept = a.gate_up_fp8.codes ? nullptr : a.gate_up;  // null: gate_up's FP8 copy
    swiglu_forward_fused_gpu(a.hidden, kept, n, I, ctx.stream, {}, a.gate_up_fp8);
    linear_backward_gpu(a.dhidden, dw.down, dout, a.hidden, w.down, n, false, ctx);
    const Fp8Matrix dgate_up_fp8 = fp8_copy(ctx, gate_up(w).fp8, n, 2 * I);  // Dgrad's operand
    swiglu_backward_fused_gpu(a.dgate_up, a.dhidden, kept, n, I, ctx.stream, dgate_up_fp8, a.gate_up_fp8);
    linear_backward_gpu(dx, gate_up(dw), a.dgate_up, x, gate_up(w), n, accumulate, ctx, dgate_up_fp8);
}

struct MoeActsGpu {
    // one layer's, kept from forward to backward (N tokens, S = N*K slots)
    float *router_logits, *scores, *gate;       // [N, E], [N, E], [N, K]
    int *expert, *offsets, *slot_row, *row_slot;  // [N, K], [E+1], [S], [S]
    bf16 *gu_sorted, *y_sorted;                 // [S, 2I], [S, D] by expert (gu_sorted a temporary in FP8 training,
    Fp8Matrix gu_fp8;                           // which keeps its E4M3 copy instead, as FfnActsGpu's gate_up)
    float *frac, *seq_loss;                     // the balance loss's [B, E], [B] (training only)
    FfnActsGpu shared;                          // the shared experts (their gate_up is per layer)
    // temporaries shared by every layer
    bf16 *x_sorted, *hidden, *shared_out;       // [S, D] (rebuilt by the backward), [S, I], [N, D]
    int* permute_scratch;                       // moe_permute_scratch_ints(S, E)
    bf16 *dy_sorted, *dh_sorted, *dgu_sorted, *dx_sorted, *router_dlogits16;  // the backward's
    float *dgate, *router_dlogits;
};

// the temporaries every MoE layer shares, for N tokens, around `ffn` (the SwiGLU
// buffers the owner shares with its dense layers); backward: the gradients too
inline MoeActsGpu moe_shared_alloc(DeviceArena& arena, const Config& c, int N, const FfnActsGpu& ffn, bool backward) {
    const int D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.moe_intermediate_size, S = N * K;
    auto grads = [&](size_t n) { return backward ? arena_alloc<bf16>(arena, n, "gradients") : nullptr; };
    MoeActsGpu a{};
    a.shared = ffn;
    a.hidden = ffn.hidden;
    a.x_sorted = arena_alloc<bf16>(arena, (size_t)S * D, "activations");
    if (c.n_shared_experts > 0) a.shared_out = arena_alloc<bf16>(arena, (size_t)N * D, "activations");
    a.permute_scratch = arena_alloc<int>(arena, moe_permute_scratch_ints(S, E), "activations");
    a.dy_sorted = grads((size_t)S * D);
    a.dh_sorted = grads((size_t)S * I);
    a.dgu_sorted = grads((size_t)S * 2 * I);
    a.dx_sorted = grads((size_t)S * D);
    a.router_dlogits16 = grads((size_t)N * E);
    if (backward) {
        a.dgate = arena_alloc<float>(arena, (size_t)N * K, "gradients");
        a.router_dlogits = arena_alloc<float>(arena, (size_t)N * E, "gradients");
    }
    return a;
}

// Where a layer keeps a SwiGLU input gate_up [rows, cols] for its backward: a bf16 tensor of its own, or in FP8
// training (fp8) an E4M3 copy, the GEMM's bf16 output then passing through `temporary` (the backward's buffer of that
// shape, which the forward leaves free)
inline void gate_up_alloc(DeviceArena& arena, bf16** gate_up, Fp8Matrix* copy, bf16* temporary, int rows, int cols, bool fp8) {
    if (!fp8) {
        *gate_up = arena_alloc<bf16>(arena, (size_t)rows * cols, "activations");
        return;
    }
    *gate_up = temporary;
    *copy = fp8_arena_alloc(arena, rows, cols);
}

// one layer's own tensors for B sequences of T tokens, beside the shared ones; fp8: FP8 training (gate_up_alloc)
inline MoeActsGpu moe_layer_alloc(DeviceArena& arena, const Config& c, int B, int T, const MoeActsGpu& shared, bool fp8) {
    const int N = B * T, D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.moe_intermediate_size, S = N * K;
    auto acts = [&](size_t n) { return arena_alloc<bf16>(arena, n, "activations"); };
    auto acts32 = [&](size_t n) { return arena_alloc<float>(arena, n, "activations"); };
    auto ints = [&](size_t n) { return arena_alloc<int>(arena, n, "activations"); };
    MoeActsGpu a = shared;
    a.router_logits = acts32((size_t)N * E);
    a.scores = acts32((size_t)N * E);
    a.gate = acts32((size_t)N * K);
    a.frac = acts32((size_t)B * E);
    a.seq_loss = acts32(B);
    a.expert = ints((size_t)N * K);
    a.offsets = ints(E + 1);
    a.slot_row = ints(S);
    a.row_slot = ints(S);
    a.y_sorted = acts((size_t)S * D);
    gate_up_alloc(arena, &a.gu_sorted, &a.gu_fp8, a.dgu_sorted, S, 2 * I, fp8);
    if (c.n_shared_experts > 0)
        gate_up_alloc(arena, &a.shared.gate_up, &a.shared.gate_up_fp8, a.shared.dgate_up, N, 2 * c.n_shared_experts * I, fp8);
    return a;
}

// out [N, D] = sum_k gate_k E_k(u) + Shared(u) for u [N, D]. The router reads the fp32 master bias (a bf16
// copy would round its small steps away) and adds each token's choices to load [E] when not null. u_fp8:
// u's FP8 copy (fp8_copy) for the shared experts, if the norm that made u wrote one.
inline void moe_forward_gpu(const Config& c, const MoeWeights<bf16>& w, const float* bias, bf16* out, const bf16* u, int N,
                            MoeActsGpu& a, int* load, GpuContext& ctx, const Fp8Matrix& u_fp8 = {}) {
    const int D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.moe_intermediate_size, S = N * K;
    const bool shared = c.n_shared_experts > 0;
    cudaStream_t st = ctx.stream;
    // fp32 logits: routing decisions near a tie must not hinge on bf16 rounding
    matmul(ctx.mm, a.router_logits, u, w.router.w, N, E, D, false, true, 0.0f, true, st);
    router_forward_gpu(a.scores, a.expert, a.gate, load, a.router_logits, bias, c, N, st);
    moe_permute_gpu(a.offsets, a.slot_row, a.row_slot, a.permute_scratch, a.expert, S, E, st);
    moe_gather_gpu(a.x_sorted, u, a.row_slot, N, K, D, st);
    grouped_gemm_forward_gpu(a.gu_sorted, a.x_sorted, gate_up(w.experts).w, w.expert_stride, a.offsets, S, E, D, 2 * I, st);
    swiglu_forward_fused_gpu(a.hidden, a.gu_sorted, S, I, st, {}, a.gu_fp8);
    grouped_gemm_forward_gpu(a.y_sorted, a.hidden, w.experts.down.w, w.expert_stride, a.offsets, S, E, I, D, st);
    if (shared) ffn_forward_gpu(w.shared, a.shared_out, u, N, a.shared, ctx, u_fp8);
    moe_combine_forward_gpu(out, a.y_sorted, a.gate, a.slot_row, shared ? a.shared_out : nullptr, N, K, D, st);
}

// The MoE layer of a decoding step's few rows (R <= GEMV_MAX_ROWS, kernels.cuh). moe_forward_gpu permutes the slots
// by expert and runs grouped GEMMs whose 128-row tiles are almost empty here: 13 launches a layer at batch 1, two of
// them 10 us grouped GEMMs (bench/RESULTS.md, batch-1 decoding). After the same router GEMV, two kernels do the rest,
// every output one warp's dot products over a weight row: the selection (router_route_token), gate_up and SwiGLU for
// each token's K experts and the shared expert, then each expert's down projection and the gated sum. Values are
// rounded where moe_forward_gpu rounds them (gate_up, hidden and each expert's output to bf16, the gated sum in fp32,
// in the same order), so the two differ only in the order of each dot product's fp32 terms.

// hidden [R, K*I + SI]: row n's K routed experts' SwiGLU outputs (I each, in choice order), then the shared
// expert's (SI). One warp per output column: silu(x . W_gate[c]) * (x . W_up[c]) with W_gate = rows 0..I-1 and
// W_up = rows I..2I-1 of the expert's gate_up [2I, D] (expert e's at experts_gu + e * stride). The lanes take STEP
// columns at a time (8: 16-byte loads), the gate's and the up's in one loop so that their loads are in flight together.
// The router's selection runs here, not in a launch of its own: every block routes the R rows from the router's
// logits [R, E] (warp n row n, as router_forward_gpu), and block 0 writes expert [R, K] and gate [R, K] for the down
// kernel.
template <int STEP, int J>
static __global__ void __launch_bounds__(256)
    moe_decode_up_kernel(bf16* hidden, int* expert, float* gate, const float* logits, const float* bias, RouterShape route, const bf16* x,
                         const bf16* experts_gu, size_t stride, const bf16* shared_gu, int R, int D, int I, int SI) {
    grid_dependency_wait();  // launched early (launch_programmatic): everything it reads but the weights comes from the kernels ahead
    grid_dependents_launch();
    static_assert(GEMV_MAX_ROWS <= 256 / 32, "a warp of the block routes each row");
    __shared__ int expert_s[GEMV_MAX_ROWS * MOE_MAX_TOPK];
    __shared__ float gate_s[GEMV_MAX_ROWS * MOE_MAX_TOPK];
    const int K = route.K, width = K * I + SI, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (warp < R)
        router_route_token<J>(nullptr, expert_s + warp * K, gate_s + warp * K, nullptr, logits + (size_t)warp * route.E, bias, route);
    __syncthreads();
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < R * K; i += blockDim.x) {
            expert[i] = expert_s[i];
            gate[i] = gate_s[i];
        }
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (w >= (long long)R * width) return;
    const int n = (int)(w / width), r = (int)(w % width);
    const bool routed = r < K * I;
    const int c = routed ? r % I : r - K * I, rows = routed ? I : SI;
    const bf16* W = routed ? experts_gu + (size_t)expert_s[n * K + r / I] * stride : shared_gu;
    const bf16 *xn = x + (size_t)n * D, *wg = W + (size_t)c * D, *wu = W + (size_t)(rows + c) * D;
    float g = 0, u = 0;
#pragma unroll 4  // the rounds' loads in flight together: the step is latency-bound
    for (int i = lane * STEP; i < D; i += 32 * STEP) {
        float xv[STEP], gv[STEP], uv[STEP];
        kdetail::load_bf16<STEP>(xv, xn + i);
        kdetail::load_bf16<STEP>(gv, wg + i);
        kdetail::load_bf16<STEP>(uv, wu + i);
#pragma unroll
        for (int k = 0; k < STEP; k++) {
            g += xv[k] * gv[k];
            u += xv[k] * uv[k];
        }
    }
    g = rounded_bf16(warp_sum(g));
    u = rounded_bf16(warp_sum(u));
    if (lane == 0) hidden[w] = __float2bfloat16(g * swiglu_sigmoid(g) * u);
}

// the up kernel for E experts (J = E / 32 per lane, rounded up as router_forward_gpu does)
template <int STEP>
static auto moe_decode_up_for(int E) {
    return E <= 32 ? moe_decode_up_kernel<STEP, 1> : E <= 64 ? moe_decode_up_kernel<STEP, 2> : E <= 128 ? moe_decode_up_kernel<STEP, 4>
                                                                                                    : moe_decode_up_kernel<STEP, 8>;
}

// res [R, D] += sum over k of gate[n, k] * (hidden_k . W_down_e[d]) + hidden_shared . W_shared_down[d], each expert's
// output rounded to bf16 before the sum (down [D, I] at experts_down + e * stride; the shared one's [D, SI]), the sum
// rounded to bf16 before it joins the fp32 residual stream. One warp per output element; the K routed products share
// one loop, so that their loads are in flight together.
template <int STEP>
static __global__ void __launch_bounds__(256)
    moe_decode_down_kernel(float* res, const bf16* hidden, const int* expert, const float* gate, const bf16* experts_down, size_t stride,
                           const bf16* shared_down, int R, int K, int D, int I, int SI) {
    grid_dependency_wait();  // launched early (launch_programmatic): everything it reads but the weights comes from the kernels ahead
    grid_dependents_launch();
    const int lane = threadIdx.x % 32;
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (w >= (long long)R * D) return;
    const int n = (int)(w / D), d = (int)(w % D);
    const bf16* h = hidden + (size_t)n * (K * I + SI);
    const bf16* W[MOE_MAX_TOPK] = {};
    float part[MOE_MAX_TOPK] = {}, shared = 0;
#pragma unroll
    for (int k = 0; k < MOE_MAX_TOPK; k++)
        if (k < K) W[k] = experts_down + (size_t)expert[(size_t)n * K + k] * stride + (size_t)d * I;
#pragma unroll 2
    for (int i = lane * STEP; i < I; i += 32 * STEP) {
#pragma unroll
        for (int k = 0; k < MOE_MAX_TOPK; k++) {
            if (k >= K) break;
            float hv[STEP], wv[STEP];
            kdetail::load_bf16<STEP>(hv, h + (size_t)k * I + i);
            kdetail::load_bf16<STEP>(wv, W[k] + i);
#pragma unroll
            for (int j = 0; j < STEP; j++) part[k] += hv[j] * wv[j];
        }
    }
    for (int i = lane * STEP; i < SI; i += 32 * STEP) {
        float hv[STEP], wv[STEP];
        kdetail::load_bf16<STEP>(hv, h + (size_t)K * I + i);
        kdetail::load_bf16<STEP>(wv, shared_down + (size_t)d * SI + i);
#pragma unroll
        for (int j = 0; j < STEP; j++) shared += hv[j] * wv[j];
    }
    float acc = 0;
#pragma unroll
    for (int k = 0; k < MOE_MAX_TOPK; k++)
        if (k < K) acc += gate[(size_t)n * K + k] * rounded_bf16(warp_sum(part[k]));
    if (SI > 0) acc += rounded_bf16(warp_sum(shared));
    if (lane == 0) res[w] += rounded_bf16(acc);
}

// The layer on the fp32 residual stream res [R, D]: res += the output moe_forward_gpu would give for u [R, D] (no
// expert loads counted). With norm, u is RMSNorm(res) with that weight, written on the way by the router's GEMV; without
// it, u is given. hidden [R, K*I + SI] is scratch.
inline void moe_decode_forward_gpu(const Config& c, const MoeWeights<bf16>& w, const float* bias, float* res, bf16* u, const bf16* norm,
                                   int R, MoeActsGpu& a, bf16* hidden, GpuContext& ctx) {
    const int D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.moe_intermediate_size;
    const int SI = c.n_shared_experts > 0 ? w.shared.gate.out : 0;
    cudaStream_t st = ctx.stream;
    // fp32 logits, as moe_forward_gpu
    if (norm) gemv_forward_gpu(a.router_logits, res, w.router.w, R, D, E, st, GemvExtra<float>{norm, c.rms_norm_eps, u});
    else gemv_forward_gpu(a.router_logits, u, w.router.w, R, D, E, st);
    router_check(c);
    if (R > GEMV_MAX_ROWS) fail("internal: moe_decode_forward_gpu on %d rows (at most %d)", R, GEMV_MAX_ROWS);
    const bf16* shared_gu = SI > 0 ? gate_up(w.shared).w : nullptr;
    const bf16* shared_down = SI > 0 ? w.shared.down.w : nullptr;
    // 16-byte loads where every row of x, the weights and hidden starts on 8 elements
    const bool vec = D % 8 == 0 && I % 8 == 0 && SI % 8 == 0 && w.expert_stride % 8 == 0 &&
                     kdetail::aligned16({u, hidden, gate_up(w.experts).w, w.experts.down.w, shared_gu, shared_down});
    const int up_blocks = ceil_div((long long)R * (K * I + SI) * 32, 256), down_blocks = ceil_div((long long)R * D * 32, 256);
    auto up = vec ? moe_decode_up_for<8>(E) : moe_decode_up_for<1>(E);
    auto down = vec ? moe_decode_down_kernel<8> : moe_decode_down_kernel<1>;
    launch_programmatic(up, dim3(up_blocks), dim3(256), 0, st, hidden, a.expert, a.gate, a.router_logits, bias, router_shape(c), u,
                        gate_up(w.experts).w, w.expert_stride, shared_gu, R, D, I, SI);
    launch_programmatic(down, dim3(down_blocks), dim3(256), 0, st, res, hidden, a.expert, a.gate, w.experts.down.w, w.expert_stride,
                        shared_down, R, K, D, I, SI);
}

// du [N, D] written from dout [N, D]; weight gradients added into dw;
// dscores_balance [N, E] is the balance loss's gradient of the scores (or null)
inline void moe_backward_gpu(const Config& c, const MoeWeights<bf16>& w, const MoeWeights<float>& dw, bf16* du, const bf16* dout,
                             const bf16* u, int N, const MoeActsGpu& a, const float* dscores_balance, GpuContext& ctx) {
    const int D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.moe_intermediate_size, S = N * K;
    const size_t stride = w.expert_stride;
    cudaStream_t st = ctx.stream;
    moe_combine_backward_gpu(a.dy_sorted, a.dgate, dout, a.y_sorted, a.gate, a.slot_row, N, K, D, st);
    grouped_gemm_backward_input_gpu(a.dh_sorted, a.dy_sorted, w.experts.down.w, stride, a.offsets, S, E, I, D, st);
    const bf16* kept = a.gu_fp8.codes ? nullptr : a.gu_sorted;  // null: its FP8 copy
    swiglu_forward_fused_gpu(a.hidden, kept, S, I, st, {}, a.gu_fp8);
    grouped_gemm_backward_weight_gpu(dw.experts.down.w, stride, a.dy_sorted, a.hidden, a.offsets, S, E, I, D, st);
    swiglu_backward_fused_gpu(a.dgu_sorted, a.dh_sorted, kept, S, I, st, {}, a.gu_fp8);
    grouped_gemm_backward_input_gpu(a.dx_sorted, a.dgu_sorted, gate_up(w.experts).w, stride, a.offsets, S, E, D, 2 * I, st);
    moe_gather_gpu(a.x_sorted, u, a.row_slot, N, K, D, st);
    grouped_gemm_backward_weight_gpu(gate_up(dw.experts).w, stride, a.dgu_sorted, a.x_sorted, a.offsets, S, E, D, 2 * I, st);
    moe_scatter_backward_gpu(du, a.dx_sorted, a.slot_row, N, K, D, false, st);
    if (c.n_shared_experts > 0) ffn_backward_gpu(w.shared, dw.shared, du, dout, u, N, a.shared, true, ctx);
    router_backward_gpu(a.router_dlogits, a.dgate, dscores_balance, a.scores, a.expert, c, N, st);
    float_to_bf16_gpu(a.router_dlogits16, a.router_dlogits, (size_t)N * E, st);
    linear_backward_gpu(du, dw.router, a.router_dlogits16, u, w.router, N, true, ctx);
}
