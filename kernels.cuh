// kernels.cuh — the GpuContext every GPU layer takes, nn.Linear on cuBLASLt, and
// the hand-written CUDA kernels shared by every layer that is not attention or MoE
// routing: embedding, RMSNorm fused with the residual add, SwiGLU, dropout, fused
// softmax + cross-entropy + dlogits, and the optimizer (global grad norm, AdamW,
// the aux-loss-free expert-bias update, fp32 -> bf16). In FP8 training the RMSNorm
// and SwiGLU kernels also write the FP8 copy of their output that the next Linear
// reads (fp8_copy), as the FP8 normalisation of DeepSeek-V3's design does.
// Each *_kernel has a host launcher *_gpu(..., stream) that checks the launch, and
// each matches the function of the same name in reference.h (read that first: the
// math here is the same, line for line, in fp32).
//
// Conventions: bf16 activations and weights, fp32 math inside the kernels, fp32
// weight gradients, master weights and AdamW moments. Row-major [N, C] as in
// reference.h, and its gradient rule (stated at its top).
//
// Determinism: no float atomics anywhere. Every reduction runs in an order fixed by
// the problem size alone (never by timing or by the GPU model), so the same inputs
// give bit-identical outputs run to run.
//
// Scratch memory: a kernel that needs temporary device memory takes
// (void* scratch, size_t scratch_bytes) and has a *_scratch_bytes(...) query, so the
// caller allocates once at start-up (one buffer can serve every such kernel, sized
// for the largest) and the training step never calls cudaMalloc.
#pragma once

#include <cub/cub.cuh>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "cuda_common.cuh"
#include "reference.h"

// ----------------------------------------------------------------------------
// helpers

namespace kdetail {

// 8 bf16 move as one 16-byte load/store when the size is a multiple of 8 and every
// pointer involved is 16-byte aligned; otherwise the kernels fall back to scalars
// (the tests use odd sizes such as C = 37 on purpose).
inline bool aligned16(std::initializer_list<const void*> ptrs) {
    for (const void* p : ptrs)
        if (p && ((uintptr_t)p & 15) != 0) return false;
    return true;
}

template <int VEC>
__device__ inline void load_bf16(float* out, const bf16* p) {
    if constexpr (VEC == 8) {
        int4 raw = *reinterpret_cast<const int4*>(p);
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 f = __bfloat1622float2(h[k]);
            out[2 * k] = f.x;
            out[2 * k + 1] = f.y;
        }
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) out[k] = __bfloat162float(p[k]);
    }
}

template <int VEC>
__device__ inline void store_bf16(bf16* p, const float* in) {
    if constexpr (VEC == 8) {
        int4 raw;
        bf16* h = reinterpret_cast<bf16*>(&raw);
#pragma unroll
        for (int k = 0; k < 8; k++) h[k] = __float2bfloat16(in[k]);
        *reinterpret_cast<int4*>(p) = raw;
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) p[k] = __float2bfloat16(in[k]);
    }
}

// the same for fp32 rows (the backward's residual gradient stream)
template <int VEC>
__device__ inline void load_bf16(float* out, const float* p) {
#pragma unroll
    for (int k = 0; k < VEC; k++) out[k] = p[k];
}

template <int VEC>
__device__ inline void store_bf16(float* p, const float* in) {
#pragma unroll
    for (int k = 0; k < VEC; k++) p[k] = in[k];
}

// keeps a template parameter out of deduction (a null pointer argument has no type)
template <typename T>
struct same_type {
    typedef T type;
};

// threads for a block that walks a row of `work` items: a multiple of 32 (block_sum
// needs whole warps), at least one warp, at most max_threads
inline int row_threads(long long work, int max_threads) {
    long long t = (work + 31) / 32 * 32;
    return (int)std::max<long long>(32, std::min<long long>(max_threads, t));
}

// blocks for a grid-stride elementwise kernel: depends on the size only
inline int elementwise_blocks(size_t items, int threads) {
    return (int)std::min<size_t>((items + threads - 1) / threads, (size_t)1 << 16);
}

// block-wide sum for any arithmetic type (double for the grad norm, int for
// counts), same fixed tree as block_sum in cuda_common.cuh
template <typename T>
__device__ inline T block_sum_t(T v) {
    __shared__ T partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : (T)0;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// running (max, sum of exp(x - max)) of the online softmax
struct MaxSum {
    float m, s;
};

__device__ inline MaxSum maxsum_combine(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, 0.0f};  // both empty: avoid exp(-inf - -inf) = NaN
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ inline MaxSum block_maxsum(MaxSum v) {
    __shared__ MaxSum partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
    for (int off = 16; off > 0; off >>= 1)
        v = maxsum_combine(v, {__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off)});
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : MaxSum{-INFINITY, 0.0f};
    for (int off = 16; off > 0; off >>= 1)
        v = maxsum_combine(v, {__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off)});
    return v;
}

// carves one scratch buffer into 256-byte-aligned pieces; with base == nullptr it
// only counts, so the *_scratch_bytes queries and the launchers share one layout
struct Carver {
    char* base;
    size_t used = 0;
    template <typename T>
    T* take(size_t count) {
        used = (used + 255) & ~(size_t)255;
        T* p = base ? (T*)(base + used) : nullptr;
        used += count * sizeof(T);
        return p;
    }
};

inline void check_scratch(size_t have, size_t need, const char* what) {
    if (have < need) fail("internal: %s needs %zu bytes of scratch, got %zu", what, need, have);
}

}  // namespace kdetail

// ----------------------------------------------------------------------------
// What every GPU layer function takes last, beside its tensors: the stream, the
// cuBLASLt handle with its cached plans, and one scratch buffer sized by the owner
// for the largest kernel that needs one.
struct GpuContext {
    cudaStream_t stream = nullptr;
    Matmul mm;
    void* scratch = nullptr;
    size_t scratch_bytes = 0;
    // FP8 training: the FP8 copy of the next FP8 Linear's input (or of gate_up's output
    // gradient) that the RMSNorm or SwiGLU making it writes beside its bf16 output, so
    // that the Linear skips its own quantization pass (fp8_copy); a Linear whose operand
    // no kernel copied quantizes it here itself. null: none are written (inference)
    uint8_t* fp8_codes = nullptr;
    float* fp8_scales = nullptr;
    size_t fp8_code_bytes = 0, fp8_scale_floats = 0;
};

// ctx's FP8 copy of a [rows, cols] tensor in 1 x 128 tiles, with the rows the FP8
// forward pads to (fours); none ({}) where not wanted (the Linear reading it runs in
// bf16) or ctx holds no room for it (inference: the Linear then quantizes its input
// itself, in scratch, to the same codes)
inline Fp8Matrix fp8_copy(const GpuContext& ctx, bool wanted, int rows, int cols) {
    if (!wanted || (size_t)(rows + 3) / 4 * 4 * cols > ctx.fp8_code_bytes || fp8_scale_count(rows, cols, 1) > ctx.fp8_scale_floats) return {};
    return {ctx.fp8_codes, ctx.fp8_scales, rows, cols, 1};
}

// an Fp8Matrix [rows, cols] in 1 x 128 tiles from the arena
inline Fp8Matrix fp8_arena_alloc(DeviceArena& arena, int rows, int cols) {
    return {arena_alloc<uint8_t>(arena, (size_t)rows * cols, "FP8 activations"), arena_alloc<float>(arena, fp8_scale_count(rows, cols, 1), "FP8 activations"),
            rows, cols, 1};
}

// the copy of an FP8 Linear's input, for the kernel that makes that input
inline Fp8Matrix fp8_input_copy(const GpuContext& ctx, const Linear<bf16>& w, int rows) { return fp8_copy(ctx, w.fp8, rows, w.in); }

// nn.Linear on cuBLASLt, the twins of reference.h's linear_forward / linear_backward:
// in bf16, or where W has an FP8 copy, its output and input gradient in E4M3 with
// DeepSeek's tiles (fp8.cuh), and its weight gradient too with --fp8-wgrad (otherwise
// bf16: fp8.cuh says why), each operand quantized into ctx.scratch first
// (fp8_linear_scratch_bytes).

namespace kdetail {
inline void check_fp8_copy(const Fp8Matrix& q, int rows, int cols) {
    if (q.codes && (q.rows != rows || q.cols != cols || q.tile_rows != 1))
        fail("an FP8 linear: the given FP8 copy is %d x %d, not %d x %d", q.rows, q.cols, rows, cols);
}
inline Fp8Matrix fp8_take(Carver& c, int rows, int cols) {
    return {c.take<uint8_t>((size_t)rows * cols), c.take<float>(fp8_scale_count(rows, cols, 1)), rows, cols, 1};
}
}  // namespace kdetail

// the scratch bytes an FP8 Linear of `in` -> `out` features takes for N rows. copies: its context has room for the
// FP8 copies (training, GpuContext::fp8_codes), where the Linear quantizes the operands no kernel copied for it (that
// room is free between a copy's maker and its Linear), so that scratch holds only a padded output and --fp8-wgrad's
// transposed operands; sized as scratch, those copies took another 99 MiB at small's 16 x 1024 (gate_up's dout)
inline size_t fp8_linear_scratch_bytes(int N, int in, int out, bool wgrad, bool copies) {
    kdetail::Carver forward{nullptr}, backward{nullptr};
    if (!copies) kdetail::fp8_take(forward, (N + 3) / 4 * 4, in);
    if (N % 4) forward.take<bf16>((size_t)(N + 3) / 4 * 4 * out);  // the padded output (linear_forward_gpu)
    if (!copies) kdetail::fp8_take(backward, N, out);
    if (wgrad) {
        kdetail::fp8_take(backward, out, N);
        kdetail::fp8_take(backward, in, N);
    }
    return std::max(forward.used, backward.used) + 256;
}

// The scratch a model's FP8 Linears take at every row count a model built for B x T runs, since a count that is not
// a multiple of 4 takes room for a padded output too: a step's B x T, an evaluation's windows and a sample's context
// (r x T for r <= B, or one row shorter than T), or when decoding (inference) any count up to B x T. The need grows
// with the count among the multiples of 4 and among the others, so the largest of each kind is the one to size for.
inline size_t fp8_model_scratch_bytes(const std::vector<Fp8Weight>& linears, int B, int T, bool inference, bool wgrad) {
    const bool copies = !inference;  // model_to_gpu gives training and evaluation room for the copies (fp8_copy)
    std::vector<int> row_counts = {B * T, B * T - 1, B * T - 2};
    if (!inference) {
        row_counts = {T - 1, T - 2};
        for (int r = 1; r <= B; r++) row_counts.push_back(r * T);
    }
    size_t scratch = 0;
    for (const Fp8Weight& q : linears)
        for (int rows : row_counts)
            if (rows > 0) scratch = std::max(scratch, fp8_linear_scratch_bytes(rows, q.w.cols, q.w.rows, wgrad, copies));
    return scratch;
}

// out [N, W.out] = x [N, W.in] @ W^T; x_fp8: x's FP8 copy (fp8_copy), if its maker wrote one
inline void linear_forward_gpu(bf16* out, const bf16* x, const Linear<bf16>& w, int N, GpuContext& ctx, const Fp8Matrix& x_fp8 = {}) {
    if (!w.fp8) return matmul(ctx.mm, out, x, w.w, N, w.out, w.in, false, true, 0.0f, false, ctx.stream);
    kdetail::check_fp8_copy(x_fp8, N, w.in);
    const Fp8Matrix room = fp8_copy(ctx, !x_fp8.codes, N, w.in);  // where to quantize x if no kernel did
    kdetail::check_scratch(ctx.scratch_bytes, fp8_linear_scratch_bytes(N, w.in, w.out, false, x_fp8.codes || room.codes), "an FP8 linear");
    // cuBLASLt's block-scaled GEMM takes rows in multiples of 4: an evaluation's last,
    // partial window computes up to 3 rows more in scratch and keeps N of them
    const int padded = (N + 3) / 4 * 4;
    kdetail::Carver c{(char*)ctx.scratch};
    Fp8Matrix xq = x_fp8;
    if (!xq.codes) {
        xq = room.codes ? room : kdetail::fp8_take(c, padded, w.in);
        xq.rows = N;
        fp8_quantize_gpu(xq, x, w.in, ctx.stream);
    }
    xq.rows = padded;  // the scales' layout is the same: its pitch is N rounded up to 4
    bf16* y = padded == N ? out : c.take<bf16>((size_t)padded * w.out);
    fp8_matmul(ctx.mm, y, false, xq, w.fp8->w, false, ctx.stream);
    if (y != out) CUDA_CHECK(cudaMemcpyAsync(out, y, (size_t)N * w.out * sizeof(bf16), cudaMemcpyDeviceToDevice, ctx.stream));
}

// out [R, OUT] = x [R, IN] @ W^T for the few rows of a decoding step (R <= GEMV_MAX_ROWS), W [OUT, IN] bf16, fp32
// sums: one warp per output column reads its weight row once for all R rows. cuBLASLt's GEMMs at R = 1 took about 5 us
// each, 84 of them a step (bench/RESULTS.md, batch-1 decoding). A row's result does not depend on R or on the rows
// beside it, so a sequence decodes to the same bits alone and in a batch, one token a step or two.
constexpr int GEMV_MAX_ROWS = 8;

__device__ inline float rounded_bf16(float x) { return __bfloat162float(__float2bfloat16(x)); }

// What a decoding GEMV does besides out = x @ W^T, each in place of a launch of its own (a step is launch-bound):
//   norm: x is the fp32 residual stream (or a bf16 tensor) and the GEMV reads its RMSNorm with this weight instead,
//     each normed element rounded to bf16 as rmsnorm_residual_forward_kernel's output is; each block computes the
//     rows' rstd itself, warp r row r's (the rows are a few KB, read from L2), so a row's rstd does not depend on R.
//     normed: where wanted, that normed input [R, IN].
//   out2 = x @ W2^T [R, OUT2]: a second Linear on the same input (q_a and kv_a) in the same launch.
//   add: out is the fp32 residual stream and takes the output, out += bf16(x @ W^T), the add that
//     rmsnorm_residual_forward_kernel would make; each warp owns its (row, column), so nothing else touches it.
template <typename Out>
struct GemvExtra {
    const bf16* norm = nullptr;
    float eps = 0;
    bf16* normed = nullptr;
    Out* out2 = nullptr;
    const bf16* w2 = nullptr;
    int out2_cols = 0;
    bool add = false;
};

// A lane keeps GEMV_WEIGHT_LOADS weight loads in flight (rows up to 1024 wide in one round at 16 bytes a load), the
// first round issued before the kernel waits for the one ahead of it (launch_programmatic) and before the norm's pass
// over x, neither of which it needs. Measured with the block's shared rstd,
// the step's GEMV time moved within noise (262 -> 253 us, bench/RESULTS.md, session 14): the HBM wait is not where
// its 4-7 us a launch go.
constexpr int GEMV_WEIGHT_LOADS = 4;
static_assert(GEMV_MAX_ROWS <= 256 / 32, "gemv_kernel's norm takes a warp of its 256 threads per row");

template <bool VEC, bool NORM, typename X, typename Out>
static __global__ void __launch_bounds__(256) gemv_kernel(Out* out, const X* x, const bf16* w, int R, int IN, int OUT, GemvExtra<Out> e) {
    const int c = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32), lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    constexpr int STEP = VEC ? 8 : 1, LOADS = GEMV_WEIGHT_LOADS, ROUND = 32 * STEP * LOADS;
    const bool active = c < OUT + e.out2_cols, second = c >= OUT;
    const bf16* wc = !active ? nullptr : second ? e.w2 + (size_t)(c - OUT) * IN : w + (size_t)c * IN;
    float wv[LOADS][STEP];
    auto load_weights = [&](int i0) {
#pragma unroll
        for (int p = 0; p < LOADS; p++)
            if (active && i0 + p * 32 * STEP < IN) kdetail::load_bf16<STEP>(wv[p], wc + i0 + p * 32 * STEP);
    };
    load_weights(lane * STEP);
    grid_dependency_wait();  // x and out belong to the kernels around this one (gemv_forward_gpu launches it early)
    grid_dependents_launch();
    __shared__ float rstd[GEMV_MAX_ROWS];
    if constexpr (NORM) {
        if (warp < R) {
            float ss = 0;
            for (int i = lane * STEP; i < IN; i += 32 * STEP) {
                float xv[STEP];
                kdetail::load_bf16<STEP>(xv, x + (size_t)warp * IN + i);
#pragma unroll
                for (int k = 0; k < STEP; k++) ss += xv[k] * xv[k];
            }
            ss = warp_sum(ss);
            if (lane == 0) rstd[warp] = 1.0f / sqrtf(ss / IN + e.eps);
        }
        __syncthreads();
    }
    if (!active) return;
    const bool write_normed = NORM && e.normed && c == 0;
    float acc[GEMV_MAX_ROWS] = {};
    for (int i0 = lane * STEP; i0 < IN; i0 += ROUND) {
        if (i0 != lane * STEP) load_weights(i0);
#pragma unroll
        for (int p = 0; p < LOADS; p++) {
            const int i = i0 + p * 32 * STEP;
            if (i >= IN) break;
            float gv[STEP];
            if constexpr (NORM) kdetail::load_bf16<STEP>(gv, e.norm + i);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (r >= R) break;
                float xv[STEP];
                kdetail::load_bf16<STEP>(xv, x + (size_t)r * IN + i);
                if constexpr (NORM) {
#pragma unroll
                    for (int k = 0; k < STEP; k++) xv[k] = rounded_bf16(gv[k] * (xv[k] * rstd[r]));
                    if (write_normed) kdetail::store_bf16<STEP>(e.normed + (size_t)r * IN + i, xv);
                }
#pragma unroll
                for (int k = 0; k < STEP; k++) acc[r] += wv[p][k] * xv[k];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) {
        if (r >= R) break;
        const float sum = warp_sum(acc[r]);
        if (lane != 0) continue;
        Out* o = second ? e.out2 + (size_t)r * e.out2_cols + c - OUT : out + (size_t)r * OUT + c;
        if constexpr (std::is_same<Out, float>::value) *o = e.add ? *o + rounded_bf16(sum) : sum;
        else *o = (Out)sum;
    }
}

// X: bf16, or float (the residual stream) with e.norm set
template <typename X, typename Out>
inline void gemv_forward_gpu(Out* out, const X* x, const bf16* w, int R, int IN, int OUT, cudaStream_t stream, const GemvExtra<Out>& e = {}) {
    if (R < 1 || R > GEMV_MAX_ROWS) fail("internal: gemv_forward_gpu takes 1..%d rows, not %d", GEMV_MAX_ROWS, R);
    if (!e.norm && !std::is_same<X, bf16>::value) fail("internal: gemv_forward_gpu reads fp32 inputs only through their norm");
    const int blocks = ceil_div((long long)(OUT + e.out2_cols) * 32, 256);
    const bool vec = IN % 8 == 0 && kdetail::aligned16({(const void*)x, w, e.norm, e.normed, e.w2});
    auto kernel = e.norm ? (vec ? gemv_kernel<true, true, X, Out> : gemv_kernel<false, true, X, Out>)
                         : (vec ? gemv_kernel<true, false, X, Out> : gemv_kernel<false, false, X, Out>);
    launch_programmatic(kernel, dim3(blocks), dim3(256), 0, stream, out, x, w, R, IN, OUT, e);
}

// res [R, OUT] (the fp32 residual stream) += bf16(x [R, IN] @ W^T)
inline void gemv_residual_add_gpu(float* res, const bf16* x, const bf16* w, int R, int IN, int OUT, cudaStream_t stream) {
    GemvExtra<float> e;
    e.add = true;
    gemv_forward_gpu(res, x, w, R, IN, OUT, stream, e);
}

// dx [N, W.in] = dout @ W (+= when accumulate; null: not wanted); dW += dout^T @ x in fp32;
// dout_fp8: dout's FP8 copy (fp8_copy), if its maker wrote one
inline void linear_backward_gpu(bf16* dx, const Linear<float>& dw, const bf16* dout, const bf16* x, const Linear<bf16>& w, int N,
                                bool accumulate, GpuContext& ctx, const Fp8Matrix& dout_fp8 = {}) {
    if (!w.fp8) {
        if (dx) matmul(ctx.mm, dx, dout, w.w, N, w.in, w.out, false, false, accumulate ? 1.0f : 0.0f, false, ctx.stream);
        return matmul(ctx.mm, dw.w, dout, x, w.out, w.in, N, true, false, 1.0f, true, ctx.stream);
    }
    const bool wgrad = w.fp8->wgrad, given = dout_fp8.codes;
    kdetail::check_fp8_copy(dout_fp8, N, w.out);
    const Fp8Matrix room = fp8_copy(ctx, !given, N, w.out);  // where to quantize dout if no kernel did
    kdetail::check_scratch(ctx.scratch_bytes, fp8_linear_scratch_bytes(N, w.in, w.out, wgrad, given || room.codes), "an FP8 linear");
    kdetail::Carver c{(char*)ctx.scratch};
    const Fp8Matrix dq = given ? dout_fp8 : room.codes ? room : kdetail::fp8_take(c, N, w.out);
    const Fp8Matrix make_dq = dx && !given ? dq : Fp8Matrix{};  // Dgrad's operand, where no kernel wrote it
    if (wgrad) {  // dout read once for both its tilings: Dgrad's 1 x 128 tiles, and Wgrad's, transposed along the tokens
        const Fp8Matrix dt = kdetail::fp8_take(c, w.out, N), xt = kdetail::fp8_take(c, w.in, N);
        fp8_quantize_both_gpu(make_dq, dt, dout, w.out, ctx.stream);
        fp8_quantize_both_gpu(Fp8Matrix{}, xt, x, w.in, ctx.stream);
        fp8_matmul(ctx.mm, dw.w, true, dt, xt, true, ctx.stream);
    } else {
        if (make_dq.codes) fp8_quantize_gpu(make_dq, dout, w.out, ctx.stream);
        matmul(ctx.mm, dw.w, dout, x, w.out, w.in, N, true, false, 1.0f, true, ctx.stream);
    }
    if (dx) fp8_matmul(ctx.mm, dx, false, dq, w.fp8->wt, accumulate, ctx.stream);  // Dgrad: against W^T's blocks
}

// ----------------------------------------------------------------------------
// Embedding: out[N, D] = wte[tokens[n], :]

// one block per row; a plain copy
template <int VEC>
static __global__ void embedding_forward_kernel(bf16* out, const int* tokens, const bf16* wte, int D) {
    const int n = blockIdx.x;
    const bf16* src = wte + (size_t)tokens[n] * D;
    bf16* dst = out + (size_t)n * D;
    for (int i = threadIdx.x * VEC; i < D; i += blockDim.x * VEC) {
        if constexpr (VEC == 8) *reinterpret_cast<int4*>(dst + i) = *reinterpret_cast<const int4*>(src + i);
        else dst[i] = src[i];
    }
}

// out[N, D], tokens[N] (each in [0, V): the caller checks), wte[V, D]
inline void embedding_forward_gpu(bf16* out, const int* tokens, const bf16* wte, int N, int D, cudaStream_t stream) {
    if (N == 0 || D == 0) return;
    if (D % 8 == 0 && kdetail::aligned16({out, wte})) {
        embedding_forward_kernel<8><<<N, kdetail::row_threads(D / 8, 256), 0, stream>>>(out, tokens, wte, D);
    } else {
        embedding_forward_kernel<1><<<N, kdetail::row_threads(D, 256), 0, stream>>>(out, tokens, wte, D);
    }
    CUDA_LAUNCH_CHECK();
}

// Deterministic backward, dwte[V, D] += scatter of dout[N, D] by tokens. A float
// atomicAdd per row would make the sum order depend on timing, so instead:
//   1. a stable radix sort of (token, position) pairs groups the positions of each
//      token together, in position order;
//   2. the sorted list is cut into chunks of EMB_CHUNK entries; one block per
//      (chunk, column tile) walks its chunk in order, one thread per column, summing
//      runs of equal tokens. A run wholly inside the chunk is added to dwte at once
//      (no other block touches that token). A run that crosses a chunk boundary
//      leaves its pieces in scratch: `tail` for the piece where the run starts,
//      `head` for pieces in later chunks;
//   3. the chunk where a crossing run starts adds tail + the following heads, in
//      chunk order, to dwte.
// Chunking keeps frequent tokens (a space in byte-level text) from serialising one
// thread over thousands of rows. Every sum has a fixed order: bit-identical results.
constexpr int EMB_CHUNK = 64;

inline int embedding_key_bits(int V) {
    int bits = 1;
    while (bits < 31 && (1ll << bits) < (long long)V) bits++;
    return bits;
}

struct EmbeddingBackwardScratch {
    unsigned* tok_sorted;  // [N]
    int* pos;              // [N] 0..N-1, the sort's values
    int* pos_sorted;       // [N]
    float* head;           // [chunks, D]
    float* tail;           // [chunks, D]
    void* sort_temp;
    size_t sort_bytes;
    size_t total;
};

inline EmbeddingBackwardScratch embedding_backward_carve(void* base, int N, int D, int V) {
    EmbeddingBackwardScratch s{};
    kdetail::Carver c{(char*)base};
    const int chunks = ceil_div(N, EMB_CHUNK);
    s.tok_sorted = c.take<unsigned>(N);
    s.pos = c.take<int>(N);
    s.pos_sorted = c.take<int>(N);
    s.head = c.take<float>((size_t)chunks * D);
    s.tail = c.take<float>((size_t)chunks * D);
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, s.sort_bytes, (const unsigned*)nullptr, (unsigned*)nullptr,
                                               (const int*)nullptr, (int*)nullptr, N, 0, embedding_key_bits(V)));
    s.sort_temp = c.take<char>(s.sort_bytes);
    s.total = c.used;
    return s;
}

// scratch bytes embedding_backward_gpu needs for N rows of width D, vocabulary V
inline size_t embedding_backward_scratch_bytes(int N, int D, int V) { return embedding_backward_carve(nullptr, N, D, V).total; }

static __global__ void embedding_iota_kernel(int* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = i;
}

// grid (chunks, column tiles), one thread per column
static __global__ void embedding_backward_chunk_kernel(float* dwte, float* head, float* tail, const bf16* dout, const unsigned* tok_sorted,
                                                const int* pos_sorted, int N, int D) {
    __shared__ unsigned s_tok[EMB_CHUNK];
    __shared__ int s_pos[EMB_CHUNK];
    const int chunk = blockIdx.x, begin = chunk * EMB_CHUNK, len = min(EMB_CHUNK, N - begin);
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        s_tok[j] = tok_sorted[begin + j];
        s_pos[j] = pos_sorted[begin + j];
    }
    __syncthreads();
    const int d = blockIdx.y * blockDim.x + threadIdx.x;
    if (d >= D) return;
    // does the first run come from the previous chunk / the last go on into the next?
    const bool first_continues = begin > 0 && tok_sorted[begin - 1] == s_tok[0];
    const bool last_continues = begin + len < N && tok_sorted[begin + len] == s_tok[len - 1];
    float acc = 0.0f;
    int start = 0;
    for (int j = 0; j < len; j++) {
        acc += __bfloat162float(dout[(size_t)s_pos[j] * D + d]);
        if (j == len - 1 || s_tok[j + 1] != s_tok[j]) {
            if (start == 0 && first_continues) head[(size_t)chunk * D + d] = acc;
            else if (j == len - 1 && last_continues) tail[(size_t)chunk * D + d] = acc;
            else dwte[(size_t)s_tok[j] * D + d] += acc;
            acc = 0.0f;
            start = j + 1;
        }
    }
}

// grid (chunks, column tiles): the chunk where a boundary-crossing run starts sums it
static __global__ void embedding_backward_merge_kernel(float* dwte, const float* head, const float* tail, const unsigned* tok_sorted, int N,
                                                int D) {
    const int chunk = blockIdx.x, begin = chunk * EMB_CHUNK, end = min(N, begin + EMB_CHUNK);
    const unsigned t = tok_sorted[end - 1];
    const bool last_continues = end < N && tok_sorted[end] == t;
    // the run started here unless the whole chunk is its middle piece (a head)
    const bool started_here = tok_sorted[begin] != t || begin == 0 || tok_sorted[begin - 1] != t;
    const int d = blockIdx.y * blockDim.x + threadIdx.x;
    if (!last_continues || !started_here || d >= D) return;
    float acc = tail[(size_t)chunk * D + d];
    for (int k = chunk + 1;; k++) {
        acc += head[(size_t)k * D + d];
        const int next = (k + 1) * EMB_CHUNK;
        if (next >= N || tok_sorted[next] != t) break;
    }
    dwte[(size_t)t * D + d] += acc;
}

// dwte[V, D] (fp32, +=), dout[N, D], tokens[N] in [0, V); scratch of
// embedding_backward_scratch_bytes(N, D, V) bytes
inline void embedding_backward_gpu(float* dwte, const bf16* dout, const int* tokens, int N, int D, int V, void* scratch,
                                   size_t scratch_bytes, cudaStream_t stream) {
    if (N == 0 || D == 0) return;
    EmbeddingBackwardScratch s = embedding_backward_carve(scratch, N, D, V);
    kdetail::check_scratch(scratch_bytes, s.total, "embedding_backward_gpu");
    embedding_iota_kernel<<<kdetail::elementwise_blocks(N, 256), 256, 0, stream>>>(s.pos, N);
    CUDA_LAUNCH_CHECK();
    size_t sort_bytes = s.sort_bytes;
    // radix sort is stable: within a token, positions stay in increasing order
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(s.sort_temp, sort_bytes, (const unsigned*)tokens, s.tok_sorted, s.pos, s.pos_sorted, N, 0,
                                               embedding_key_bits(V), stream));
    const int threads = kdetail::row_threads(D, 128);
    dim3 grid(ceil_div(N, EMB_CHUNK), ceil_div(D, threads));
    embedding_backward_chunk_kernel<<<grid, threads, 0, stream>>>(dwte, s.head, s.tail, dout, s.tok_sorted, s.pos_sorted, N, D);
    CUDA_LAUNCH_CHECK();
    embedding_backward_merge_kernel<<<grid, threads, 0, stream>>>(dwte, s.head, s.tail, s.tok_sorted, N, D);
    CUDA_LAUNCH_CHECK();
}

// The MTP module's inputs (reference.h mtp_forward): position i of a row of T reads the embedding of
// t_{i+1}, the main model's target there, and predicts t_{i+2}, the next position's target.

// ids[N] = max(targets, 0); mtp_targets[N] = targets[n + 1] within the row where targets[n] is known, else -1
static __global__ void mtp_inputs_kernel(int* ids, int* mtp_targets, const int* targets, int N, int T) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    ids[n] = max(targets[n], 0);
    mtp_targets[n] = targets[n] >= 0 && n % T < T - 1 ? targets[n + 1] : -1;
}

inline void mtp_inputs_gpu(int* ids, int* mtp_targets, const int* targets, int N, int T, cudaStream_t stream) {
    if (N == 0) return;
    mtp_inputs_kernel<<<ceil_div(N, 256), 256, 0, stream>>>(ids, mtp_targets, targets, N, T);
    CUDA_LAUNCH_CHECK();
}

// The GPU twin of reference.h mtp_acceptance, per position n (one block each): sampled[n] = sum_x min(p(x), q(x))
// and greedy[n] = 1 when the arg-maxes agree, p = softmax(logits[n + 1]), q = softmax(mtp_logits[n]); both 0
// where mtp_targets[n] < 0 (mean_loss_gpu then averages over the others).
static __global__ void __launch_bounds__(1024)
    mtp_acceptance_kernel(float* sampled, float* greedy, const bf16* logits, const bf16* mtp_logits, const int* mtp_targets, int V) {
    const int n = blockIdx.x;
    if (mtp_targets[n] < 0) {
        if (threadIdx.x == 0) sampled[n] = greedy[n] = 0.0f;
        return;
    }
    const bf16 *zp = logits + (size_t)(n + 1) * V, *zq = mtp_logits + (size_t)n * V;
    kdetail::MaxSum mp{-INFINITY, 0.0f}, mq{-INFINITY, 0.0f};
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        mp = kdetail::maxsum_combine(mp, {__bfloat162float(zp[i]), 1.0f});
        mq = kdetail::maxsum_combine(mq, {__bfloat162float(zq[i]), 1.0f});
    }
    mp = kdetail::block_maxsum(mp);
    mq = kdetail::block_maxsum(mq);
    // the arg-maxes: the lowest id that reaches each maximum
    __shared__ int first[2];
    if (threadIdx.x == 0) first[0] = first[1] = INT_MAX;
    __syncthreads();
    float overlap = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float a = __bfloat162float(zp[i]), b = __bfloat162float(zq[i]);
        if (a == mp.m) atomicMin(&first[0], i);
        if (b == mq.m) atomicMin(&first[1], i);
        overlap += fminf(expf(a - mp.m) / mp.s, expf(b - mq.m) / mq.s);
    }
    overlap = kdetail::block_sum_t(overlap);  // its barriers also order the atomics before the read below
    if (threadIdx.x == 0) {
        sampled[n] = overlap;
        greedy[n] = first[0] == first[1] ? 1.0f : 0.0f;
    }
}

inline void mtp_acceptance_gpu(float* sampled, float* greedy, const bf16* logits, const bf16* mtp_logits, const int* mtp_targets, int N, int V,
                               cudaStream_t stream) {
    if (N == 0) return;
    mtp_acceptance_kernel<<<N, 1024, 0, stream>>>(sampled, greedy, logits, mtp_logits, mtp_targets, V);
    CUDA_LAUNCH_CHECK();
}

// x[N, D]: the rows whose token is unknown (< 0) set to zero, one block per row
static __global__ void zero_unknown_rows_kernel(bf16* x, const int* tokens, int D) {
    if (tokens[blockIdx.x] >= 0) return;
    for (int i = threadIdx.x; i < D; i += blockDim.x) x[(size_t)blockIdx.x * D + i] = __float2bfloat16(0.0f);
}

inline void zero_unknown_rows_gpu(bf16* x, const int* tokens, int N, int D, cudaStream_t stream) {
    if (N == 0) return;
    zero_unknown_rows_kernel<<<N, kdetail::row_threads(D, 256), 0, stream>>>(x, tokens, D);
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// RMSNorm fused with the residual add:
//   residual_out = residual_in + branch
//   out = weight * (residual_out * rstd),  rstd = 1 / sqrt(mean(residual_out^2) + eps)
// The residual stream R is fp32 in the model (as under PyTorch autocast: it sums a
// term from every layer, and bf16 would round each one away); R = bf16 serves the
// plain norms of bf16 tensors (q_a, kv_a) and is rounded after the add, so the
// norm is taken of the same tensor the backward reads.

// one block per row; the row lives in shared memory between the two passes because
// residual_out may overwrite residual_in in place. FP8 (VEC 8): out's FP8 copy q too,
// each half-warp quantizing the 1 x 128 tile it just wrote (fp8_quantize_tile8), so
// every round of the output loop runs on whole warps.
template <int VEC, typename R, bool FP8>
static __global__ void rmsnorm_residual_forward_kernel(R* residual_out, bf16* out, Fp8Matrix q, float* rstd, const R* residual_in,
                                                       const bf16* branch, const bf16* weight, int C, float eps) {
    extern __shared__ float xs[];  // [C]
    const size_t base = (size_t)blockIdx.x * C;
    float ss = 0.0f;
    for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) {
        float x[VEC] = {};
        if (residual_in) kdetail::load_bf16<VEC>(x, residual_in + base + i);
        if (branch) {
            float b[VEC];
            kdetail::load_bf16<VEC>(b, branch + base + i);
#pragma unroll
            for (int k = 0; k < VEC; k++) {
                x[k] += b[k];
                if constexpr (std::is_same<R, bf16>::value) x[k] = __bfloat162float(__float2bfloat16(x[k]));
            }
        }
        if (residual_out) kdetail::store_bf16<VEC>(residual_out + base + i, x);
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            xs[i + k] = x[k];
            ss += x[k] * x[k];
        }
    }
    ss = block_sum(ss);
    const float r = 1.0f / sqrtf(ss / C + eps);
    if (rstd && threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int i0 = 0; i0 < C; i0 += blockDim.x * VEC) {
        const int i = i0 + threadIdx.x * VEC;
        float y[VEC] = {};
        if (i < C) {
            float w[VEC];
            kdetail::load_bf16<VEC>(w, weight + i);
#pragma unroll
            for (int k = 0; k < VEC; k++) y[k] = __bfloat162float(__float2bfloat16(w[k] * (xs[i + k] * r)));  // out's value
            kdetail::store_bf16<VEC>(out + base + i, y);
        }
        if constexpr (FP8) fp8_quantize_tile8(q, blockIdx.x, i, y, i < C);
    }
}

constexpr int RMSNORM_MAX_C = 12288;  // the row in 48 KiB of shared memory

// residual_out[N, C] (may be null; may alias residual_in), out[N, C], rstd[N] (may be
// null: inference), residual_in[N, C] (null: zero, so residual_out = branch),
// branch[N, C] (null: a plain RMSNorm of residual_in), weight[C]; out_fp8: out's FP8
// copy (fp8_copy), written too where it has codes. R is bf16 or float; name it
// (rmsnorm_residual_forward_gpu<float>) when residual_in is null.
template <typename R>
inline void rmsnorm_residual_forward_gpu(typename kdetail::same_type<R>::type* residual_out, bf16* out, float* rstd, const R* residual_in,
                                         const bf16* branch, const bf16* weight, int N, int C, float eps, cudaStream_t stream,
                                         const Fp8Matrix& out_fp8 = {}) {
    if (N == 0) return;
    if (C <= 0 || C > RMSNORM_MAX_C) fail("rmsnorm_residual_forward_gpu: width %d is outside 1..%d", C, RMSNORM_MAX_C);
    const size_t shmem = (size_t)C * sizeof(float);
    if (C % 8 == 0 && kdetail::aligned16({residual_out, out, residual_in, branch, weight})) {
        const int threads = kdetail::row_threads(C / 8, 512);
        if (out_fp8.codes)
            rmsnorm_residual_forward_kernel<8, R, true><<<N, threads, shmem, stream>>>(residual_out, out, out_fp8, rstd, residual_in, branch,
                                                                                       weight, C, eps);
        else
            rmsnorm_residual_forward_kernel<8, R, false><<<N, threads, shmem, stream>>>(residual_out, out, out_fp8, rstd, residual_in, branch,
                                                                                        weight, C, eps);
        CUDA_LAUNCH_CHECK();
        return;
    }
    rmsnorm_residual_forward_kernel<1, R, false><<<N, kdetail::row_threads(C, 512), shmem, stream>>>(residual_out, out, out_fp8, rstd,
                                                                                                    residual_in, branch, weight, C, eps);
    CUDA_LAUNCH_CHECK();
    if (out_fp8.codes) fp8_quantize_gpu(out_fp8, out, C, stream);
}

// Backward (reference.h rmsnorm_backward, with the residual gradient folded in):
//   dinp = dresidual + r w dy - r^3/C x sum_j(w_j dy_j x_j)        (bf16, written)
//   dweight += sum_n dy x r                                         (fp32)
// dweight is deterministic: the rows are split into a fixed number of contiguous
// ranges (a function of N and C only), each block sums its range's dweight in
// shared memory (each thread owns its columns: no atomics) and writes a partial
// row to scratch; a second kernel adds the partials in block order.
template <int VEC, typename G, typename X>
static __global__ void rmsnorm_backward_kernel(G* dinp, float* dweight_partial, const G* dresidual, const bf16* dout, const X* inp,
                                        const bf16* weight, const float* rstd, int N, int C, int rows_per_block) {
    extern __shared__ float dw[];  // [C]
    for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC)
#pragma unroll
        for (int k = 0; k < VEC; k++) dw[i + k] = 0.0f;
    const int row0 = blockIdx.x * rows_per_block, row1 = min(N, row0 + rows_per_block);
    for (int row = row0; row < row1; row++) {
        const size_t base = (size_t)row * C;
        float s = 0.0f;
        for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) {
            float dy[VEC], x[VEC], w[VEC];
            kdetail::load_bf16<VEC>(dy, dout + base + i);
            kdetail::load_bf16<VEC>(x, inp + base + i);
            kdetail::load_bf16<VEC>(w, weight + i);
#pragma unroll
            for (int k = 0; k < VEC; k++) s += w[k] * dy[k] * x[k];
        }
        s = block_sum(s);
        const float r = rstd[row];
        const float kk = r * r * r * s / C;
        // second pass re-reads the row (from L1/L2): holding it in registers would
        // cap C
        for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) {
            float dy[VEC], x[VEC], w[VEC], dx[VEC];
            kdetail::load_bf16<VEC>(dy, dout + base + i);
            kdetail::load_bf16<VEC>(x, inp + base + i);
            kdetail::load_bf16<VEC>(w, weight + i);
            if (dresidual) kdetail::load_bf16<VEC>(dx, dresidual + base + i);
#pragma unroll
            for (int k = 0; k < VEC; k++) {
                const float g = r * w[k] * dy[k] - kk * x[k];
                dx[k] = dresidual ? dx[k] + g : g;
                dw[i + k] += dy[k] * x[k] * r;
            }
            kdetail::store_bf16<VEC>(dinp + base + i, dx);
        }
    }
    for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC)
#pragma unroll
        for (int k = 0; k < VEC; k++) dweight_partial[(size_t)blockIdx.x * C + i + k] = dw[i + k];
}

// The same backward with one warp a row, for C <= 1024 in 16-byte packs: the row lives in the lane's registers
// (CHUNKS = C/256 rounded up, 8 consecutive columns a lane in each), one shuffle reduction and no barrier a row,
// against the block kernel's two barriers a row. The block's warps take every RMSNORM_WARPS-th row of its range;
// each lane sums dweight over its rows for its own columns, and the warps' sums are added in warp order, so
// dweight stays deterministic. 1.4-1.8x the block kernel at small's widths (bench/RESULTS.md).
constexpr int RMSNORM_WARPS = 8;
template <int CHUNKS, typename G, typename X>
static __global__ void __launch_bounds__(RMSNORM_WARPS * 32)
    rmsnorm_backward_warp_kernel(G* dinp, float* dweight_partial, const G* dresidual, const bf16* dout, const X* inp, const bf16* weight,
                                 const float* rstd, int N, int C, int rows_per_block) {
    __shared__ float dw_warps[RMSNORM_WARPS][CHUNKS * 256];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float w[CHUNKS][8], dw[CHUNKS][8] = {};
#pragma unroll
    for (int c = 0; c < CHUNKS; c++)
        if (c * 256 + lane * 8 < C) kdetail::load_bf16<8>(w[c], weight + c * 256 + lane * 8);
    const int row0 = blockIdx.x * rows_per_block, row1 = min(N, row0 + rows_per_block);
    for (int row = row0 + warp; row < row1; row += RMSNORM_WARPS) {
        const size_t base = (size_t)row * C;
        float dy[CHUNKS][8], x[CHUNKS][8];
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            const int i = c * 256 + lane * 8;
            if (i >= C) continue;
            kdetail::load_bf16<8>(dy[c], dout + base + i);
            kdetail::load_bf16<8>(x[c], inp + base + i);
#pragma unroll
            for (int k = 0; k < 8; k++) s += w[c][k] * dy[c][k] * x[c][k];
        }
        const float r = rstd[row], kk = r * r * r * warp_sum(s) / C;
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            const int i = c * 256 + lane * 8;
            if (i >= C) continue;
            float dx[8];
            if (dresidual) kdetail::load_bf16<8>(dx, dresidual + base + i);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float g = r * w[c][k] * dy[c][k] - kk * x[c][k];
                dx[k] = dresidual ? dx[k] + g : g;
                dw[c][k] += dy[c][k] * x[c][k] * r;
            }
            kdetail::store_bf16<8>(dinp + base + i, dx);
        }
    }
#pragma unroll
    for (int c = 0; c < CHUNKS; c++)
        if (c * 256 + lane * 8 < C)
#pragma unroll
            for (int k = 0; k < 8; k++) dw_warps[warp][c * 256 + lane * 8 + k] = dw[c][k];
    __syncthreads();
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float total = 0.0f;
        for (int v = 0; v < RMSNORM_WARPS; v++) total += dw_warps[v][i];
        dweight_partial[(size_t)blockIdx.x * C + i] = total;
    }
}

// block (32 columns, 32 row groups): group g sums partials g, g+32, ... of its
// column, then group 0 adds the 32 group sums in order
static __global__ void rmsnorm_dweight_reduce_kernel(float* dweight, const float* partial, int blocks, int C) {
    __shared__ float sums[32][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (c < C)
        for (int b = threadIdx.y; b < blocks; b += 32) s += partial[(size_t)b * C + c];
    sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float total = 0.0f;
        for (int g = 0; g < 32; g++) total += sums[g][threadIdx.x];
        dweight[c] += total;
    }
}

// how many blocks (row ranges) the backward uses: at most 512, enough to fill the
// GPU while the reduce above, which has only C/32 blocks, stays short; a function
// of N alone
inline int rmsnorm_backward_blocks(int N, int* rows_per_block) {
    const int rpb = ceil_div(N, 512);
    if (rows_per_block) *rows_per_block = rpb;
    return ceil_div(N, rpb);
}

inline size_t rmsnorm_backward_scratch_bytes(int N, int C) {
    if (N == 0) return 0;
    return (size_t)rmsnorm_backward_blocks(N, nullptr) * C * sizeof(float);
}

// dinp[N, C] (written = dresidual + norm backward; may alias dresidual),
// dweight[C] (fp32, +=), dresidual[N, C] (the gradient already in the residual
// stream; null = none), dout[N, C], inp[N, C] (the forward's residual_out), weight[C],
// rstd[N]; scratch of rmsnorm_backward_scratch_bytes(N, C) bytes. G, the type of
// dinp and dresidual, is bf16, or float for the residual stream's gradient, which
// gathers a term from every layer and so keeps fp32; X, the input's type, is
// float for the residual stream and bf16 for the q_a / kv_a norms.
template <typename G, typename X>
inline void rmsnorm_backward_gpu(G* dinp, float* dweight, const typename kdetail::same_type<G>::type* dresidual, const bf16* dout,
                                 const X* inp, const bf16* weight, const float* rstd, int N, int C, void* scratch, size_t scratch_bytes,
                                 cudaStream_t stream) {
    if (N == 0) return;
    if (C <= 0 || C > RMSNORM_MAX_C) fail("rmsnorm_backward_gpu: width %d is outside 1..%d", C, RMSNORM_MAX_C);
    kdetail::check_scratch(scratch_bytes, rmsnorm_backward_scratch_bytes(N, C), "rmsnorm_backward_gpu");
    int rpb = 0;
    const int blocks = rmsnorm_backward_blocks(N, &rpb);
    float* partial = (float*)scratch;
    const size_t shmem = (size_t)C * sizeof(float);
    const bool packs = C % 8 == 0 && kdetail::aligned16({dinp, dresidual, dout, inp, weight});
    if (packs && C <= 1024) {
        auto kernel = C <= 256   ? rmsnorm_backward_warp_kernel<1, G, X>
                      : C <= 512 ? rmsnorm_backward_warp_kernel<2, G, X>
                      : C <= 768 ? rmsnorm_backward_warp_kernel<3, G, X>
                                 : rmsnorm_backward_warp_kernel<4, G, X>;
        kernel<<<blocks, RMSNORM_WARPS * 32, 0, stream>>>(dinp, partial, dresidual, dout, inp, weight, rstd, N, C, rpb);
    } else if (packs) {
        rmsnorm_backward_kernel<8, G, X><<<blocks, kdetail::row_threads(C / 8, 512), shmem, stream>>>(dinp, partial, dresidual, dout, inp,
                                                                                                   weight, rstd, N, C, rpb);
    } else {
        rmsnorm_backward_kernel<1, G, X><<<blocks, kdetail::row_threads(C, 512), shmem, stream>>>(dinp, partial, dresidual, dout, inp, weight,
                                                                                               rstd, N, C, rpb);
    }
    CUDA_LAUNCH_CHECK();
    rmsnorm_dweight_reduce_kernel<<<ceil_div(C, 32), dim3(32, 32), 0, stream>>>(dweight, partial, blocks, C);
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// SwiGLU: hidden = silu(gate) * up = gate * sigmoid(gate) * up
// backward: dup = dh * gate * s, dgate = dh * up * (s + gate * s * (1 - s))
//
// On gate_up [n, 2I] from one GEMM (gate in columns 0..I-1, up in I..2I-1): element e
// of hidden (row e / I, column e % I) reads gate_up[row * 2I + col] and the up beside it,
// I further on.

__device__ inline float swiglu_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// In FP8 training a layer keeps gate_up for its backward as an E4M3 copy in 1 x 128 tiles (`cache`), half the bytes
// of bf16, as DeepSeek-V3 caches its SwiGLU inputs in FP8 (§3.3.3); the backward reads the copy back, recomputing
// the output from it. The forward's own SwiGLU reads the exact bf16 GEMM output.
namespace kdetail {
// VEC values of gate_up [n, 2I] at (row, col): from the bf16 tensor, or where it is null from its E4M3 copy (a pack
// of VEC never crosses a 128-column tile: col is a multiple of VEC)
template <int VEC>
__device__ inline void load_gate_up(float* v, const bf16* gate_up, const Fp8Matrix& cache, size_t row, size_t col) {
    const size_t at = row * cache.cols + col;
    if (gate_up) return load_bf16<VEC>(v, gate_up + at);
    const float scale = cache.scales[fp8_scale_index((int)row, (int)(col / FP8_TILE), cache.rows, cache.cols, 1)];
    uint8_t codes[VEC];
    if constexpr (VEC == 8) *(uint2*)codes = *(const uint2*)(cache.codes + at);
    else for (int k = 0; k < VEC; k++) codes[k] = cache.codes[at + k];
#pragma unroll
    for (int k = 0; k < VEC; k++) v[k] = fp8_dequantize(codes[k], scale);
}
}  // namespace kdetail

// COPY (VEC 8, I % 128 == 0): the FP8 copy `copy` of what the kernel writes (forward:
// hidden [n, I]; backward: dgate_up [n, 2I]) too. 16 consecutive packs are then one
// 1 x 128 tile of one row, quantized by the half-warp that wrote it
// (fp8_quantize_tile8), so every round of the loop runs on whole warps. CACHE (the same
// conditions): the forward writes gate_up's E4M3 copy `cache` from what it read.
// cache.cols is 2I in every case.
template <int VEC, bool COPY, bool CACHE>
static __global__ void swiglu_forward_kernel(bf16* hidden, Fp8Matrix copy, Fp8Matrix cache, const bf16* gate_up, size_t packs, long long I) {
    for (size_t p0 = (size_t)blockIdx.x * blockDim.x; p0 < packs; p0 += (size_t)gridDim.x * blockDim.x) {
        const size_t p = p0 + threadIdx.x, e = p < packs ? p * VEC : 0, row = e / I, col = e % I;
        float g[VEC] = {}, u[VEC] = {}, h[VEC] = {};
        if (p < packs) {
            kdetail::load_gate_up<VEC>(g, gate_up, cache, row, col);
            kdetail::load_gate_up<VEC>(u, gate_up, cache, row, I + col);
#pragma unroll
            for (int k = 0; k < VEC; k++) h[k] = __bfloat162float(__float2bfloat16(g[k] * swiglu_sigmoid(g[k]) * u[k]));  // hidden's value
            kdetail::store_bf16<VEC>(hidden + e, h);
        }
        if constexpr (COPY) fp8_quantize_tile8(copy, (int)row, (int)col, h, p < packs);
        if constexpr (CACHE) {
            fp8_quantize_tile8(cache, (int)row, (int)col, g, p < packs);
            fp8_quantize_tile8(cache, (int)row, (int)(I + col), u, p < packs);
        }
    }
}

// dgate_up may alias gate_up (each thread reads its elements before writing them)
template <int VEC, bool COPY>
static __global__ void swiglu_backward_kernel(bf16* dgate_up, Fp8Matrix copy, Fp8Matrix cache, const bf16* dhidden, const bf16* gate_up,
                                              size_t packs, long long I) {
    for (size_t p0 = (size_t)blockIdx.x * blockDim.x; p0 < packs; p0 += (size_t)gridDim.x * blockDim.x) {
        const size_t p = p0 + threadIdx.x, e = p < packs ? p * VEC : 0, row = e / I, col = e % I, in = row * 2 * I + col;
        float dg[VEC] = {}, du[VEC] = {};
        if (p < packs) {
            float g[VEC], u[VEC], dh[VEC];
            kdetail::load_gate_up<VEC>(g, gate_up, cache, row, col);
            kdetail::load_gate_up<VEC>(u, gate_up, cache, row, I + col);
            kdetail::load_bf16<VEC>(dh, dhidden + e);
#pragma unroll
            for (int k = 0; k < VEC; k++) {
                const float s = swiglu_sigmoid(g[k]);
                du[k] = __bfloat162float(__float2bfloat16(dh[k] * g[k] * s));
                dg[k] = __bfloat162float(__float2bfloat16(dh[k] * u[k] * (s + g[k] * s * (1.0f - s))));
            }
            kdetail::store_bf16<VEC>(dgate_up + in, dg);
            kdetail::store_bf16<VEC>(dgate_up + in + I, du);
        }
        if constexpr (COPY) {
            fp8_quantize_tile8(copy, (int)row, (int)col, dg, p < packs);
            fp8_quantize_tile8(copy, (int)row, (int)(I + col), du, p < packs);
        }
    }
}

namespace kdetail {
// gate_up's E4M3 copy laid out for n rows (a layer's is allocated for the most it runs); without one, only that
// layout, by which the kernels also index the bf16 gate_up
inline Fp8Matrix swiglu_cache(const Fp8Matrix& cache, int n, int I) {
    if (cache.codes && (cache.cols != 2 * I || cache.tile_rows != 1 || n > cache.rows))
        fail("swiglu: the FP8 copy of gate_up is %d x %d, not %d x %d", cache.rows, cache.cols, n, 2 * I);
    return {cache.codes, cache.scales, n, 2 * I, 1};
}
}  // namespace kdetail

// hidden[n, I] from gate_up[n, 2I] (gate = columns 0..I-1, up = columns I..2I-1), or where
// gate_up is null from `cache`, its E4M3 copy (the backward's recomputation in FP8 training).
// Where both are given, gate_up's copy is written into cache (the forward in FP8 training).
// hidden_fp8: hidden's FP8 copy (fp8_copy), written too where it has codes
inline void swiglu_forward_fused_gpu(bf16* hidden, const bf16* gate_up, int n, int I, cudaStream_t stream, const Fp8Matrix& hidden_fp8 = {},
                                     const Fp8Matrix& cache = {}) {
    const size_t count = (size_t)n * I;
    if (count == 0) return;
    const Fp8Matrix kept = kdetail::swiglu_cache(cache, n, I);
    const bool write = gate_up && kept.codes, vec = I % 8 == 0 && kdetail::aligned16({hidden, gate_up});
    const bool tiles = vec && I % FP8_TILE == 0;  // the copies in the kernel where their tiles line up with the packs
    const bool copy_here = tiles && hidden_fp8.codes, write_here = tiles && write;
    auto kernel = !vec        ? swiglu_forward_kernel<1, false, false>
                  : copy_here ? (write_here ? swiglu_forward_kernel<8, true, true> : swiglu_forward_kernel<8, true, false>)
                              : (write_here ? swiglu_forward_kernel<8, false, true> : swiglu_forward_kernel<8, false, false>);
    const size_t packs = vec ? count / 8 : count;
    kernel<<<kdetail::elementwise_blocks(packs, 256), 256, 0, stream>>>(hidden, hidden_fp8, kept, gate_up, packs, I);
    CUDA_LAUNCH_CHECK();
    if (hidden_fp8.codes && !copy_here) fp8_quantize_gpu(hidden_fp8, hidden, I, stream);
    if (write && !write_here) fp8_quantize_gpu(kept, gate_up, 2 * I, stream);
}

// dgate_up[n, 2I] (written; may alias gate_up), dhidden[n, I], gate_up[n, 2I] or, where
// null, its E4M3 copy `cache` (FP8 training); dgate_up_fp8: dgate_up's FP8 copy
// (fp8_copy), written too where it has codes
inline void swiglu_backward_fused_gpu(bf16* dgate_up, const bf16* dhidden, const bf16* gate_up, int n, int I, cudaStream_t stream,
                                      const Fp8Matrix& dgate_up_fp8 = {}, const Fp8Matrix& cache = {}) {
    const size_t count = (size_t)n * I;
    if (count == 0) return;
    const Fp8Matrix& q = dgate_up_fp8;
    const Fp8Matrix kept = kdetail::swiglu_cache(cache, n, I);
    if (!gate_up && !kept.codes) fail("swiglu_backward_fused_gpu: neither gate_up nor its FP8 copy is given");
    const bool vec = I % 8 == 0 && kdetail::aligned16({dgate_up, dhidden, gate_up});
    const bool copy_here = vec && q.codes && I % FP8_TILE == 0;  // the copy in the kernel where its tiles line up with the packs
    auto kernel = !vec ? swiglu_backward_kernel<1, false> : copy_here ? swiglu_backward_kernel<8, true> : swiglu_backward_kernel<8, false>;
    const size_t packs = vec ? count / 8 : count;
    kernel<<<kdetail::elementwise_blocks(packs, 256), 256, 0, stream>>>(dgate_up, q, kept, dhidden, gate_up, packs, I);
    CUDA_LAUNCH_CHECK();
    if (q.codes && !copy_here) fp8_quantize_gpu(q, dgate_up, 2 * I, stream);
}

// ----------------------------------------------------------------------------
// Dropout (inverted), in place: x[i] *= mask[i], mask[i] = rng_uniform(key, i) < p ?
// 0 : 1/(1-p), the same counter RNG as reference.h's dropout_forward, so the GPU's
// mask equals the CPU's bit for bit and no mask is stored: backward redraws it.

// out = bf16(in * mask); in is bf16 (may alias out) or fp32
template <int VEC, typename In>
static __global__ void dropout_kernel(bf16* out, const In* in, size_t packs, float p, float scale, uint64_t key) {
    for (size_t q = (size_t)blockIdx.x * blockDim.x + threadIdx.x; q < packs; q += (size_t)gridDim.x * blockDim.x) {
        const size_t i = q * VEC;
        float v[VEC];
        kdetail::load_bf16<VEC>(v, in + i);
        if (p > 0)
#pragma unroll
            for (int k = 0; k < VEC; k++) v[k] *= rng_uniform(key, i + k) < p ? 0.0f : scale;
        kdetail::store_bf16<VEC>(out + i, v);
    }
}

namespace kdetail {
template <typename In>
inline void dropout_launch(bf16* out, const In* in, size_t n, float p, uint64_t key, cudaStream_t stream) {
    if (n == 0 || (p <= 0 && (const void*)out == (const void*)in)) return;  // p = 0: the mask is all ones
    const float scale = (float)(1.0 / (1.0 - p));  // as reference.h: (T)(1.0 / (1.0 - p))
    if (n % 8 == 0 && aligned16({out, in})) {
        dropout_kernel<8, In><<<elementwise_blocks(n / 8, 256), 256, 0, stream>>>(out, in, n / 8, p, scale, key);
    } else {
        dropout_kernel<1, In><<<elementwise_blocks(n, 256), 256, 0, stream>>>(out, in, n, p, scale, key);
    }
    CUDA_LAUNCH_CHECK();
}
}  // namespace kdetail

// x[n] in place; key as reference.h's dropout keys (one per site and micro-step)
inline void dropout_forward_gpu(bf16* x, size_t n, float p, uint64_t key, cudaStream_t stream) {
    kdetail::dropout_launch(x, x, n, p, key, stream);
}

// out[n] (bf16) = in[n] (fp32) times the forward's mask for this key (p = 0: a plain
// conversion): a branch's output gradient taken from the fp32 residual gradient
inline void dropout_to_bf16_gpu(bf16* out, const float* in, size_t n, float p, uint64_t key, cudaStream_t stream) {
    kdetail::dropout_launch(out, in, n, p, key, stream);
}

// ----------------------------------------------------------------------------
// Fused softmax + cross-entropy + dlogits, one block per row:
//   pass 1: online max and sum of exp over the row, in fp32;
//   loss[row] = -(z[t] - max - log(sum))   (0 for an ignored row, target < 0);
//   pass 2: logits[row] = (softmax - onehot(t)) * scale in place (all zeros for an
//   ignored row), scale = dloss_scale (* *dloss_scale_dev when given), normally
//   dloss / (number of targets >= 0): see crossentropy_scale_gpu.
// The logits buffer [N, V] is overwritten with dlogits, so no second N x V buffer.
// Each exp is one MUFU op (ex2 of x log2(e) - max log2(e), one FMA in), the max moves
// once a pack, and pass 2 multiplies by scale / sum: expf and a division per element
// kept the kernel issue-bound, well short of the two reads and one write it moves.

template <int VEC, bool WRITE>
static __global__ void __launch_bounds__(1024)
    crossentropy_kernel(float* losses, bf16* logits, const int* targets, int V, float dloss_scale, const float* dloss_scale_dev) {
    const int row = blockIdx.x;
    bf16* z = logits + (size_t)row * V;
    const int target = targets[row];
    // every thread reads z[target] before the barriers in block_maxsum, so before
    // any thread overwrites the row
    const float zt = target >= 0 ? __bfloat162float(z[target]) : 0.0f;
    kdetail::MaxSum ms{-INFINITY, 0.0f};
    for (int i = threadIdx.x * VEC; i < V; i += blockDim.x * VEC) {
        float x[VEC];
        kdetail::load_bf16<VEC>(x, z + i);
        float pack_max = x[0];
#pragma unroll
        for (int k = 1; k < VEC; k++) pack_max = fmaxf(pack_max, x[k]);
        if (pack_max > ms.m) {
            ms.s *= ex2((ms.m - pack_max) * LOG2E);
            ms.m = pack_max;
        }
        const float m_log2 = ms.m * LOG2E;
#pragma unroll
        for (int k = 0; k < VEC; k++) ms.s += ex2(fmaf(x[k], LOG2E, -m_log2));
    }
    ms = kdetail::block_maxsum(ms);
    if (threadIdx.x == 0) losses[row] = target >= 0 ? -((zt - ms.m) - logf(ms.s)) : 0.0f;
    if constexpr (WRITE) {
        const float scale = target < 0 ? 0.0f : dloss_scale * (dloss_scale_dev ? *dloss_scale_dev : 1.0f);
        const float m_log2 = ms.m * LOG2E, p_scale = scale / ms.s;
        for (int i = threadIdx.x * VEC; i < V; i += blockDim.x * VEC) {
            float x[VEC];
            kdetail::load_bf16<VEC>(x, z + i);
#pragma unroll
            for (int k = 0; k < VEC; k++) x[k] = ex2(fmaf(x[k], LOG2E, -m_log2)) * p_scale;
            if ((unsigned)(target - i) < (unsigned)VEC)
#pragma unroll
                for (int k = 0; k < VEC; k++)
                    if (i + k == target) x[k] -= scale;
            kdetail::store_bf16<VEC>(z + i, x);
        }
    }
}

namespace kdetail {
template <bool WRITE>
inline void crossentropy_launch(float* losses, bf16* logits, const int* targets, int N, int V, float dloss_scale, const float* dloss_scale_dev,
                                cudaStream_t stream) {
    if (N == 0) return;
    if (V <= 0) fail("crossentropy: vocabulary size %d", V);
    if (V % 8 == 0 && aligned16({logits})) {
        crossentropy_kernel<8, WRITE>
            <<<N, row_threads(V / 8, 1024), 0, stream>>>(losses, logits, targets, V, dloss_scale, dloss_scale_dev);
    } else {
        crossentropy_kernel<1, WRITE><<<N, row_threads(V, 1024), 0, stream>>>(losses, logits, targets, V, dloss_scale, dloss_scale_dev);
    }
    CUDA_LAUNCH_CHECK();
}
}  // namespace kdetail

// losses[N] (per row; 0 where targets < 0), logits[N, V] -> dlogits in place,
// targets[N] (< 0 ignored, else < V: the caller checks). The dlogits scale is
// dloss_scale, times *dloss_scale_dev when that is not null (so it can come from
// crossentropy_scale_gpu without a host sync).
inline void crossentropy_forward_backward_gpu(float* losses, bf16* logits, const int* targets, int N, int V, float dloss_scale,
                                              const float* dloss_scale_dev, cudaStream_t stream) {
    kdetail::crossentropy_launch<true>(losses, logits, targets, N, V, dloss_scale, dloss_scale_dev, stream);
}

// evaluation: the per-row losses only, logits left as they are
inline void crossentropy_forward_gpu(float* losses, const bf16* logits, const int* targets, int N, int V, cudaStream_t stream) {
    kdetail::crossentropy_launch<false>(losses, const_cast<bf16*>(logits), targets, N, V, 0.0f, nullptr, stream);
}

// one block: count of targets >= 0 (exact integer sum) and the mean loss (double
// sum in a fixed order)
static __global__ void mean_loss_kernel(float* out, const float* losses, const int* targets, int N, float multiplier, int accumulate) {
    double sum = 0;
    int count = 0;
    for (int i = threadIdx.x; i < N; i += blockDim.x)
        if (targets[i] >= 0) {
            sum += losses[i];
            count++;
        }
    sum = kdetail::block_sum_t<double>(sum);
    count = kdetail::block_sum_t<int>(count);
    if (threadIdx.x == 0) {
        const float mean = count ? (float)(sum / count) : 0.0f;
        out[0] = (accumulate ? out[0] : 0.0f) + multiplier * mean;
    }
}

// out[0] (device) = (accumulate ? out[0] : 0) + multiplier * mean of losses[N] over
// rows with targets >= 0 (0 if none): multiplier 1/grad_accum and accumulate across
// micro-steps gives the step's loss with no host sync
inline void mean_loss_gpu(float* out, const float* losses, const int* targets, int N, float multiplier, bool accumulate, cudaStream_t stream) {
    mean_loss_kernel<<<1, 1024, 0, stream>>>(out, losses, targets, N, multiplier, accumulate ? 1 : 0);
    CUDA_LAUNCH_CHECK();
}

static __global__ void crossentropy_scale_kernel(float* scale, const int* targets, int N, float dloss) {
    int count = 0;
    for (int i = threadIdx.x; i < N; i += blockDim.x) count += targets[i] >= 0;
    count = kdetail::block_sum_t<int>(count);
    if (threadIdx.x == 0) scale[0] = count ? dloss / (float)count : 0.0f;
}

// scale[0] (device) = dloss / (number of targets >= 0), 0 if none: reference.h's
// crossentropy_backward scale, computed on the device from the device targets
inline void crossentropy_scale_gpu(float* scale, const int* targets, int N, float dloss, cudaStream_t stream) {
    crossentropy_scale_kernel<<<1, 1024, 0, stream>>>(scale, targets, N, dloss);
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// Optimizer over the flat fp32 parameter array of a ParamLayout.
//
// Which elements are trained is described by a device array of ParamChunk: every
// non-buffer tensor of the layout cut into pieces of at most PARAM_CHUNK elements,
// each with its weight-decay flag; TENSOR_BUFFER tensors (the expert correction
// biases) are simply absent, so the grad norm skips them and AdamW never touches
// them. Build it once with param_chunks(layout) and upload it (param_chunks_upload).
// One block per chunk: a fixed grid, so the grad norm's partial sums have a fixed
// order (bit-identical results).

struct ParamChunk {
    size_t begin;  // first element in the flat array
    int len;       // elements
    int decay;     // 1 = TENSOR_DECAY (AdamW applies weight decay), 0 = TENSOR_NO_DECAY
    size_t state;  // where the first element's AdamW moments are: begin, except under ZeRO-1, where a rank keeps
                   // the moments of its slices only (dist.h zero_rank_chunks)
};

constexpr int PARAM_CHUNK = 32768;

inline std::vector<ParamChunk> param_chunks(const ParamLayout& L, int max_len = PARAM_CHUNK) {
    std::vector<ParamChunk> out;
    for (const TensorSpec& s : L.tensors) {
        if (s.kind == TENSOR_BUFFER) continue;
        for (size_t at = 0; at < s.numel; at += (size_t)max_len)
            out.push_back({s.offset + at, (int)std::min<size_t>(max_len, s.numel - at), s.kind == TENSOR_DECAY ? 1 : 0, s.offset + at});
    }
    return out;
}

// a device copy of the chunk list (cudaFree it when done)
inline ParamChunk* param_chunks_upload(const std::vector<ParamChunk>& chunks) {
    ParamChunk* d = device_alloc<ParamChunk>(chunks.size(), "optimizer chunk list");
    CUDA_CHECK(cudaMemcpy(d, chunks.data(), chunks.size() * sizeof(ParamChunk), cudaMemcpyHostToDevice));
    return d;
}

// sum of squares in double (as reference.h's grad_norm), one partial per chunk
static __global__ void grad_norm_partial_kernel(double* partial, const float* grads, const ParamChunk* chunks) {
    const ParamChunk c = chunks[blockIdx.x];
    double s = 0;
    for (int i = threadIdx.x; i < c.len; i += blockDim.x) {
        const double g = grads[c.begin + i];
        s += g * g;
    }
    s = kdetail::block_sum_t<double>(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

static __global__ void grad_norm_final_kernel(float* out, const double* partial, int count) {
    double s = 0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
    s = kdetail::block_sum_t<double>(s);
    if (threadIdx.x == 0) out[0] = (float)s;
}

inline size_t grad_norm_scratch_bytes(int num_chunks) { return (size_t)std::max(num_chunks, 1) * sizeof(double); }

// out[0] (device) = sum of grads^2 over the chunks (the squared global norm, before
// clipping; sqrt it on the host for logging). grads: the flat fp32 gradient array;
// chunks: device array from param_chunks_upload; scratch of
// grad_norm_scratch_bytes(num_chunks) bytes
inline void grad_norm_squared_gpu(float* out, const float* grads, const ParamChunk* chunks, int num_chunks, void* scratch, size_t scratch_bytes,
                                  cudaStream_t stream) {
    kdetail::check_scratch(scratch_bytes, grad_norm_scratch_bytes(num_chunks), "grad_norm_squared_gpu");
    if (num_chunks > 0) {
        grad_norm_partial_kernel<<<num_chunks, 256, 0, stream>>>((double*)scratch, grads, chunks);
        CUDA_LAUNCH_CHECK();
    }
    grad_norm_final_kernel<<<1, 1024, 0, stream>>>(out, (const double*)scratch, num_chunks);
    CUDA_LAUNCH_CHECK();
}

// reference.h adamw_update, element for element. The explicit __f*_rn intrinsics
// stop nvcc fusing multiply-adds, so each operation rounds exactly as the CPU's;
// given the same norm the update is bit-identical to the reference. The clipping
// scale min(1, clip / norm) is computed here from the device norm^2: no host sync.
struct AdamwConsts {
    float lr, beta1, beta2, one_b1, one_b2, eps, wd;
    double bc1, bc2, scale;
};

// one element: updates m and v, returns the new parameter
__device__ inline float adamw_element(float p, float grad, float& m, float& v, const AdamwConsts& k) {
    const float g = (float)((double)grad * k.scale);
    m = __fadd_rn(__fmul_rn(k.beta1, m), __fmul_rn(k.one_b1, g));
    v = __fadd_rn(__fmul_rn(k.beta2, v), __fmul_rn(__fmul_rn(k.one_b2, g), g));
    const float mhat = (float)((double)m / k.bc1), vhat = (float)((double)v / k.bc2);
    const float update = __fmul_rn(k.lr, __fadd_rn(__fdiv_rn(mhat, __fadd_rn(__fsqrt_rn(vhat), k.eps)), __fmul_rn(k.wd, p)));
    return __fsub_rn(p, update);
}

// One block per chunk. A chunk whose elements and moments start on 4-element boundaries (all but a few in practice)
// moves 16 bytes a lane; any other chunk goes element by element. The arithmetic is the same either way.
static __global__ void adamw_kernel(float* params32, bf16* params16, const float* grads, float* m, float* v, const ParamChunk* chunks, float lr,
                             float beta1, float beta2, float eps, float weight_decay, double bc1, double bc2,
                             const float* grad_norm_squared, float grad_clip) {
    const ParamChunk c = chunks[blockIdx.x];
    if (grad_norm_squared && !isfinite(*grad_norm_squared)) return;  // a NaN or inf gradient: the step is skipped
    double scale = 1.0;
    if (grad_norm_squared && grad_clip > 0) {
        const double norm = sqrt((double)*grad_norm_squared);
        if (norm > grad_clip) scale = grad_clip / norm;
    }
    const AdamwConsts k{lr, beta1, beta2, __fsub_rn(1.0f, beta1), __fsub_rn(1.0f, beta2), eps, c.decay ? weight_decay : 0.0f, bc1, bc2, scale};
    if (c.begin % 4 == 0 && c.state % 4 == 0 && c.len % 4 == 0) {
        for (int j = 4 * threadIdx.x; j < c.len; j += 4 * blockDim.x) {
            const size_t i = c.begin + j, s = c.state + j;
            float4 p = *(const float4*)(params32 + i), g = *(const float4*)(grads + i), m4 = *(float4*)(m + s), v4 = *(float4*)(v + s);
            p.x = adamw_element(p.x, g.x, m4.x, v4.x, k);
            p.y = adamw_element(p.y, g.y, m4.y, v4.y, k);
            p.z = adamw_element(p.z, g.z, m4.z, v4.z, k);
            p.w = adamw_element(p.w, g.w, m4.w, v4.w, k);
            *(float4*)(m + s) = m4;
            *(float4*)(v + s) = v4;
            *(float4*)(params32 + i) = p;
            if (params16) {
                __nv_bfloat162 lo = __floats2bfloat162_rn(p.x, p.y), hi = __floats2bfloat162_rn(p.z, p.w);
                uint2 packed;
                packed.x = *(uint32_t*)&lo;
                packed.y = *(uint32_t*)&hi;
                *(uint2*)(params16 + i) = packed;
            }
        }
        return;
    }
    for (int j = threadIdx.x; j < c.len; j += blockDim.x) {
        const size_t i = c.begin + j, s = c.state + j;
        const float np = adamw_element(params32[i], grads[i], m[s], v[s], k);
        params32[i] = np;
        if (params16) params16[i] = __float2bfloat16(np);
    }
}

// One AdamW step (step counts from 1) over the chunks. params32/grads: the flat
// fp32 arrays; m/v: the moments, indexed by the chunks' state; params16: the bf16 working copy in the same layout, refreshed for the
// updated elements (null: none). grad_norm_squared: device scalar from
// grad_norm_squared_gpu (null or grad_clip <= 0: no clipping). weight_decay applies
// to chunks with decay = 1.
inline void adamw_gpu(float* params32, bf16* params16, const float* grads, float* m, float* v, const ParamChunk* chunks, int num_chunks,
                      float lr, float beta1, float beta2, float eps, float weight_decay, int step, const float* grad_norm_squared,
                      float grad_clip, cudaStream_t stream) {
    if (num_chunks == 0) return;
    if (step < 1) fail("adamw_gpu: step %d (steps count from 1)", step);
    const double bc1 = 1 - std::pow((double)beta1, step), bc2 = 1 - std::pow((double)beta2, step);
    adamw_kernel<<<num_chunks, 256, 0, stream>>>(params32, params16, grads, m, v, chunks, lr, beta1, beta2, eps, weight_decay, bc1, bc2,
                                                 grad_norm_squared, grad_clip);
    CUDA_LAUNCH_CHECK();
}

// b_e += gamma * sign(mean load - load_e), one block per MoE layer (reference.h
// expert_bias_update). The mean is an exact double sum of integer loads.
template <typename LoadT>
static __global__ void expert_bias_update_kernel(float* bias_base, const size_t* bias_offsets, const LoadT* load, int E, float gamma,
                                                 const float* grad_norm_squared) {
    if (grad_norm_squared && !isfinite(*grad_norm_squared)) return;  // the step is skipped, as adamw_kernel skips it
    float* bias = bias_base + bias_offsets[blockIdx.x];
    const LoadT* l = load + (size_t)blockIdx.x * E;
    __shared__ double mean;
    if (threadIdx.x == 0) {
        double s = 0;
        for (int e = 0; e < E; e++) s += (double)l[e];
        mean = s / E;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const double diff = mean - (double)l[e];
        const int sign = diff > 0 ? 1 : diff < 0 ? -1 : 0;
        bias[e] = __fadd_rn(bias[e], __fmul_rn(gamma, (float)sign));
    }
}

// Every MoE layer in one launch: layer k's bias is params32 + bias_offsets[k]
// (device array [layers]) and its load is load[k * E .. k * E + E) (device
// [layers, E], int or int64_t counts of tokens routed to each expert).
template <typename LoadT>
inline void expert_bias_update_gpu(float* params32, const size_t* bias_offsets, const LoadT* load, int layers, int E, float gamma,
                                   const float* grad_norm_squared, cudaStream_t stream) {
    if (layers == 0 || E == 0) return;
    expert_bias_update_kernel<LoadT><<<layers, kdetail::row_threads(E, 256), 0, stream>>>(params32, bias_offsets, load, E, gamma,
                                                                                          grad_norm_squared);
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// fp32 master -> bf16 working copy (round to nearest even, as common.h's float_to_bf16)

static __global__ void float_to_bf16_kernel(bf16* dst, const float* src, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16(src[i]);
}

// dst[n] = bf16(src[n])
inline void float_to_bf16_gpu(bf16* dst, const float* src, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    float_to_bf16_kernel<<<kdetail::elementwise_blocks(n, 256), 256, 0, stream>>>(dst, src, n);
    CUDA_LAUNCH_CHECK();
}
