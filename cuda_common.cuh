// cuda_common.cuh — what every CUDA file shares: error checks that throw one-line messages (CUDA, cuBLASLt, NCCL), the bf16 type, device
// buffers, the one cuBLASLt matmul wrapper, and host<->device copies with conversion (used by the GPU tests too).
//
// Layout conventions match reference.h: row-major activations [N, C]; weights W[OC, C] as in nn.Linear; activations and
// weights bf16, weight gradients, master weights and AdamW moments fp32.
#pragma once

#include <cublasLt.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <map>
#include <tuple>
#include <vector>

#include "common.h"

typedef __nv_bfloat16 bf16;

#define CUDA_CHECK(call)                                                                                         \
    do {                                                                                                         \
        cudaError_t err_ = (call);                                                                               \
        if (err_ != cudaSuccess) fail("CUDA error at %s:%d: %s", __FILE__, __LINE__, cudaGetErrorString(err_)); \
    } while (0)

#define CUBLAS_CHECK(call)                                                                                       \
    do {                                                                                                         \
        cublasStatus_t st_ = (call);                                                                             \
        if (st_ != CUBLAS_STATUS_SUCCESS) fail("cuBLASLt error %d at %s:%d", (int)st_, __FILE__, __LINE__);     \
    } while (0)

#define NCCL_CHECK(call)                                                                                         \
    do {                                                                                                         \
        ncclResult_t nr_ = (call);                                                                               \
        if (nr_ != ncclSuccess) fail("NCCL error at %s:%d: %s", __FILE__, __LINE__, ncclGetErrorString(nr_));   \
    } while (0)

// checks the last launch (cheap: no synchronisation)
#define CUDA_LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

inline int ceil_div(long long a, long long b) { return (int)((a + b - 1) / b); }

// one-time settings of a kernel (its shared-memory opt-in) are per device; launchers keep them for this many
constexpr int MAX_DEVICES = 64;

// ----------------------------------------------------------------------------
// device memory

// cudaMalloc that says how much was asked for and how much is free when it fails
template <typename T>
T* device_alloc(size_t count, const char* what) {
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, count * sizeof(T) + (count == 0));
    if (err != cudaSuccess) {
        cudaGetLastError();
        size_t free_bytes = 0, total_bytes = 0;
        cudaMemGetInfo(&free_bytes, &total_bytes);
        fail("out of GPU memory allocating %s: needed %.1f MiB, %.1f MiB free of %.1f MiB", what,
             count * sizeof(T) / 1048576.0, free_bytes / 1048576.0, total_bytes / 1048576.0);
    }
    return (T*)p;
}

// Device buffers allocated together at start-up and freed together; bytes counts
// what they hold (the memory a model or decoder reports). A planning arena only
// counts: its allocations return null, so that the same code that allocates a
// model's buffers first sizes them, before anything is allocated.
struct DeviceArena {
    std::vector<void*> buffers;
    size_t bytes = 0;
    bool plan = false;
};

template <typename T>
T* arena_alloc(DeviceArena& a, size_t count, const char* what) {
    if (a.plan) {
        a.bytes += count * sizeof(T);
        return nullptr;
    }
    T* p = device_alloc<T>(count, what);
    a.buffers.push_back(p);
    a.bytes += count * sizeof(T);
    return p;
}

// Refuses, before anything is allocated, a model whose parameters and training state (state_bytes) and
// a step's buffers for B sequences of T tokens (step_bytes) do not fit the GPU's free memory
inline void gpu_memory_check(size_t state_bytes, size_t step_bytes, int B, int T) {
    size_t free_bytes = 0, total_bytes = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    const double GiB = 1 << 30;
    if (state_bytes + step_bytes > free_bytes)
        fail("the model needs %.2f GiB of GPU memory at %d x %d tokens (%.2f GiB of parameters and their training state, %.2f GiB of "
             "activations and workspace); the GPU has %.2f GiB free of %.2f GiB (use a smaller batch or shorter sequences)",
             (state_bytes + step_bytes) / GiB, B, T, state_bytes / GiB, step_bytes / GiB, free_bytes / GiB, total_bytes / GiB);
}

inline void arena_free(DeviceArena& a) {
    for (void* p : a.buffers) cudaFree(p);
    a = DeviceArena{};
}

// copies host fp32/fp64 values to a device array of T (bf16 or float), converting
template <typename T, typename H>
void to_device(T* dst, const H* src, size_t n) {
    std::vector<T> tmp(n);
    for (size_t i = 0; i < n; i++) tmp[i] = (T)(float)src[i];
    CUDA_CHECK(cudaMemcpy(dst, tmp.data(), n * sizeof(T), cudaMemcpyHostToDevice));
}

// copies a device array of T back as floats
template <typename T>
std::vector<float> to_host(const T* src, size_t n) {
    std::vector<T> tmp(n);
    CUDA_CHECK(cudaMemcpy(tmp.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost));
    std::vector<float> out(n);
    for (size_t i = 0; i < n; i++) out[i] = (float)tmp[i];
    return out;
}

// ----------------------------------------------------------------------------
// cuBLASLt: out[M, N] (+)= A @ B in row-major terms, where A is [M, K] (or its transpose stored [K, M]) and B
// is [K, N] (or stored [N, K]). bf16 inputs, fp32 accumulation, output bf16 or fp32; beta = 1 accumulates
// into out (weight gradients). Row-major X is column-major X^T, so we ask cuBLASLt for out^T = B^T A^T.

// One GEMM shape's cuBLASLt objects and chosen algorithm. Creating descriptors and asking the heuristic costs tens of
// microseconds of host time, more than a small GEMM runs, so each shape is planned once and reused every step.
struct MatmulPlan {
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
};

// what a plan depends on: sizes, transposes, output type, leading dimensions,
// operand alignments, and for FP8 (fp8.cuh) B's tile height: 128 (a weight's blocks) or 1
struct MatmulKey {
    int m, n, k, lda, ldb, ldc;
    uint32_t align_a, align_b, align_c;
    bool trans_a, trans_b, out_fp32;
    int fp8_b_tile_rows = 0;  // 0: a bf16 GEMM
    bool operator<(const MatmulKey& o) const {
        return std::tie(m, n, k, lda, ldb, ldc, align_a, align_b, align_c, trans_a, trans_b, out_fp32, fp8_b_tile_rows) <
               std::tie(o.m, o.n, o.k, o.lda, o.ldb, o.ldc, o.align_a, o.align_b, o.align_c, o.trans_a, o.trans_b, o.out_fp32,
                        o.fp8_b_tile_rows);
    }
};

// cuBLASLt's workspace, shared by every GEMM
constexpr size_t MATMUL_WORKSPACE_BYTES = 32u << 20;

struct Matmul {
    cublasLtHandle_t handle = nullptr;
    void* workspace = nullptr;
    size_t workspace_bytes = MATMUL_WORKSPACE_BYTES;
    std::map<MatmulKey, MatmulPlan> plans;
    bool zero_outputs = false;  // DSV3_INITCHECK set: see matmul_zero_output
};

inline void matmul_init(Matmul& mm) {
    CUBLAS_CHECK(cublasLtCreate(&mm.handle));
    mm.workspace = device_alloc<char>(mm.workspace_bytes, "cuBLASLt workspace");
    mm.zero_outputs = getenv("DSV3_INITCHECK") != nullptr;
}

// compute-sanitizer's initcheck does not see cuBLASLt's kernels write their outputs, so it reports every
// later read of one (a buffer written by one GEMM and read by a trivial kernel shows it). Under
// `make test-gpu-sanitize` (DSV3_INITCHECK set) a GEMM that overwrites its output [rows, cols] (row pitch
// ld elements of elem bytes) first zeroes exactly that region, which the GEMM then writes over, so that
// initcheck reports only reads of memory that nothing wrote.
inline void matmul_zero_output(const Matmul& mm, void* out, int rows, int cols, int ld, size_t elem, float beta, cudaStream_t stream) {
    if (mm.zero_outputs && beta == 0.0f) CUDA_CHECK(cudaMemset2DAsync(out, ld * elem, 0, cols * elem, rows, stream));
}

inline void matmul_free(Matmul& mm) {
    for (auto& entry : mm.plans) {
        MatmulPlan& p = entry.second;
        for (cublasLtMatrixLayout_t layout : {p.la, p.lb, p.lc}) cublasLtMatrixLayoutDestroy(layout);
        cublasLtMatmulDescDestroy(p.desc);
    }
    if (mm.handle) cublasLtDestroy(mm.handle);
    if (mm.workspace) cudaFree(mm.workspace);
    mm = Matmul{};
}

// the largest power of two (up to 256) dividing both the address and the row pitch
inline uint32_t alignment_bytes(const void* p, size_t pitch_bytes) {
    uintptr_t bits = (uintptr_t)p | (uintptr_t)pitch_bytes | 256;
    return (uint32_t)(bits & (~bits + 1));
}

inline MatmulPlan matmul_plan(Matmul& mm, const MatmulKey& key) {
    MatmulPlan p;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    // column-major: out^T [N, M] = op(B^T) [N, K] @ op(A^T) [K, M]
    cublasOperation_t op_b = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t op_a = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_b, sizeof(op_b)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_a, sizeof(op_a)));
    const int M = key.m, N = key.n, K = key.k;
    const cudaDataType_t in_type = key.fp8_b_tile_rows ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
    if (key.fp8_b_tile_rows) {  // DeepSeek's fine-grained scales: A in 1 x 128 tiles; B (cuBLASLt's A) in blocks or tiles
        const cublasLtMatmulMatrixScale_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
                                          b_mode = key.fp8_b_tile_rows == 1 ? a_mode : CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &b_mode, sizeof(b_mode)));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &a_mode, sizeof(a_mode)));
        // the heuristic refuses null scale pointers; each fp8_matmul sets the real ones
        for (auto attr : {CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER})
            CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, attr, &mm.workspace, sizeof(mm.workspace)));
    }
    // B^T as column-major: rows N, cols K when not transposed
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lb, in_type, key.trans_b ? K : N, key.trans_b ? N : K, key.ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.la, in_type, key.trans_a ? M : K, key.trans_a ? K : M, key.lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lc, key.out_fp32 ? CUDA_R_32F : CUDA_R_16BF, N, M, key.ldc));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &mm.workspace_bytes,
                                                      sizeof(mm.workspace_bytes)));
    // the heuristic assumes 256-byte aligned operands unless told otherwise, and the
    // chosen kernel then refuses a sub-tensor such as kv_a's k_pe columns
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align_b, sizeof(key.align_b)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align_a, sizeof(key.align_a)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align_c, sizeof(key.align_c)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align_c, sizeof(key.align_c)));
    cublasLtMatmulHeuristicResult_t heuristic;
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(mm.handle, p.desc, p.lb, p.la, p.lc, p.lc, pref, 1, &heuristic, &found));
    cublasLtMatmulPreferenceDestroy(pref);
    if (found == 0) fail("cuBLASLt has no %salgorithm for a %dx%dx%d matmul", key.fp8_b_tile_rows ? "block-scaled FP8 (CUDA 12.9+, sm_90) " : "", M, N, K);
    p.algo = heuristic.algo;
    return p;
}

inline const MatmulPlan& matmul_plan_cached(Matmul& mm, const MatmulKey& key) {
    auto it = mm.plans.find(key);
    if (it == mm.plans.end()) it = mm.plans.emplace(key, matmul_plan(mm, key)).first;
    return it->second;
}

// trans_a: A is stored [K, M]; trans_b: B is stored [N, K]. out_fp32 selects the
// output type. Leading dimensions are the dense ones unless given.
inline void matmul(Matmul& mm, void* out, const bf16* A, const bf16* B, int M, int N, int K, bool trans_a, bool trans_b,
                   float beta, bool out_fp32, cudaStream_t stream, int lda = 0, int ldb = 0, int ldc = 0) {
    if (M == 0 || N == 0) return;
    if (!lda) lda = trans_a ? M : K;
    if (!ldb) ldb = trans_b ? K : N;
    if (!ldc) ldc = N;
    MatmulKey key{M, N, K, lda, ldb, ldc, alignment_bytes(A, (size_t)lda * 2), alignment_bytes(B, (size_t)ldb * 2),
                  alignment_bytes(out, (size_t)ldc * (out_fp32 ? 4 : 2)), trans_a, trans_b, out_fp32};
    const MatmulPlan& p = matmul_plan_cached(mm, key);
    const float alpha = 1.0f;
    matmul_zero_output(mm, out, M, N, ldc, out_fp32 ? 4 : 2, beta, stream);
    CUBLAS_CHECK(cublasLtMatmul(mm.handle, p.desc, &alpha, B, p.lb, A, p.la, &beta, out, p.lc, out, p.lc, &p.algo, mm.workspace,
                                mm.workspace_bytes, stream));
}

// ----------------------------------------------------------------------------
// Timing, for the benchmarks and the timing test cases. A card that has been idle runs below its clocks for a
// while, so a kernel timed at once reads slow (bench/RESULTS.md, session 12): f is first called for 0.2 s.

template <typename F>
void gpu_warm_up(F f) {
    for (const double start = now_seconds(); now_seconds() - start < 0.2;) {
        for (int i = 0; i < 10; i++) f();
        CUDA_CHECK(cudaDeviceSynchronize());
    }
}

// the median milliseconds of one call of f (work queued on stream), over runs calls each timed alone
template <typename F>
float gpu_median_ms(F f, int runs = 10, cudaStream_t stream = 0) {
    gpu_warm_up(f);
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    std::vector<float> ms(runs);
    for (float& m : ms) {
        CUDA_CHECK(cudaEventRecord(start, stream));
        f();
        CUDA_CHECK(cudaEventRecord(stop, stream));
        CUDA_CHECK(cudaEventSynchronize(stop));
        CUDA_CHECK(cudaEventElapsedTime(&m, start, stop));
    }
    CUDA_CHECK(cudaEventDestroy(start));
    CUDA_CHECK(cudaEventDestroy(stop));
    std::sort(ms.begin(), ms.end());
    return runs % 2 ? ms[runs / 2] : 0.5f * (ms[runs / 2 - 1] + ms[runs / 2]);
}

// ----------------------------------------------------------------------------
// Softmax exponentials as 2^(x log2 e - max log2 e): one FMA and one MUFU op

constexpr float LOG2E = 1.4426950408889634f;

// 2^x in one MUFU op (exp2f adds range handling the softmax callers do not need: their x <= 0,
// and -inf must give 0, which ex2.approx does)
__device__ inline float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ----------------------------------------------------------------------------
// Programmatic dependent launch (Hopper): a kernel launched by launch_programmatic may start while the kernel ahead
// of it on the stream (or in the graph captured from it) is still running, so that its launch and its prologue (a
// GEMV's weight loads) overlap that kernel's tail. Before it reads anything an earlier kernel wrote, or writes
// anything one may still read, it calls grid_dependency_wait(), which returns once the kernel ahead has finished and
// its writes are visible; grid_dependents_launch() then lets the kernel behind it start early in turn. In a kernel
// launched plainly both are no-ops.

__device__ inline void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ inline void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

template <typename... Params, typename... Args>
inline void launch_programmatic(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attribute;
    config.numAttrs = 1;
    CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
}

// ----------------------------------------------------------------------------
// device helpers

__device__ inline float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ inline float warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// sum (or max) over a block of up to 1024 threads; every thread gets the result.
// The reduction order is fixed, so results are deterministic.
template <float (*warp_op)(float)>
__device__ inline float block_reduce(float v, float identity) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
    v = warp_op(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : identity;
    return warp_op(v);
}

__device__ inline float block_sum(float v) { return block_reduce<warp_sum>(v, 0.0f); }
__device__ inline float block_max(float v) { return block_reduce<warp_max>(v, -INFINITY); }

// ----------------------------------------------------------------------------
// PTX of the tensor-core kernels (mla.cuh's flash attention, moe.cuh's grouped GEMM): ldmatrix, mma.sync m16n8k16 bf16
// with fp32 accumulation, and cp.async, which zero-fills what src_bytes leaves of the destination.

__device__ inline uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c[16x8] += a[16x16] b[16x8]
__device__ inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ inline void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ inline void cp_async4(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ inline void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ----------------------------------------------------------------------------
// Hopper's warpgroup MMA (wgmma, sm_90a only: built when GPU_ARCH=90a defines HOPPER_WGMMA). Four consecutive warps
// issue it together; both operands come from shared memory, each described by a 64-bit descriptor, and the
// accumulators stay in registers. The tiles here use the 128-byte swizzle: an atom is 8 rows of 128 bytes (1024
// bytes, 1024-aligned), and the 16-byte chunk c of row r sits at chunk c ^ (r % 8), so the 8 rows of a column of
// chunks fall in distinct banks. A K-major operand is rows of 64 k (one atom wide; the next 8 rows are `sbo` bytes on);
// an M- or N-major one is rows of 64 m (or n) per k, the next 8 k at `sbo`, the next 64 m at `lbo`.

// byte offset of 16-byte chunk `chunk` of row `row` in a 128-byte-swizzled tile
__host__ __device__ constexpr int swizzle128(int row, int chunk) { return row * 128 + ((chunk ^ (row % 8)) * 16); }

__device__ inline uint64_t wgmma_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return (uint64_t)((smem_addr & 0x3FFFF) >> 4) | (uint64_t)(lbo_bytes >> 4) << 16 | (uint64_t)(sbo_bytes >> 4) << 32 |
           1ull << 62;  // 62-63: the 128-byte swizzle
}

#ifdef HOPPER_WGMMA
// d[64 x 128] += a[64 x 16] b[16 x 128] in fp32; TRANS_A: a is M-major in smem (else K-major); TRANS_B: b is N-major.
// Thread t of the warpgroup holds d's rows 16*(t/32) + (t%32)/4 (+8) at columns 8*i + 2*(t%4) (+1): d[4i..4i+3].
template <int TRANS_A, int TRANS_B>
__device__ inline void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},"
        " %64, %65, p, 1, 1, %67, %68;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(1), "n"(TRANS_A), "n"(TRANS_B));
}

// orders the registers' earlier writes (and reads) before the next wgmma
__device__ inline void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ inline void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ inline void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// after wgmma_wait: the accumulators are final here, so the compiler must not read them earlier
__device__ inline void wgmma_fence_operands(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// makes this thread's shared-memory writes (cp.async's included) visible to the async proxy that wgmma reads through
__device__ inline void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The tensor copy engine (TMA, cp.async.bulk.tensor): one thread copies a box of a tensor described by a CUtensorMap
// into shared memory, in the layout of the map's swizzle, and the copy's bytes complete a transaction count on an
// mbarrier that the consumers wait on. Rows or columns outside the tensor land as zeros.
__device__ inline void mbar_init(uint32_t bar, int count) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count)); }
__device__ inline void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ inline void mbar_arrive(uint32_t bar) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory"); }
// returns once the barrier's phase of this parity has completed
__device__ inline void mbar_wait(uint32_t bar, int parity) {
    asm volatile(
        "{\n .reg .pred done;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n @!done bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ inline void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
                 "l"(map), "r"(c0), "r"(c1), "r"(bar)
                 : "memory");
}
__device__ inline void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
                 "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
                 : "memory");
}

// cuTensorMapEncodeTiled from the driver, fetched once through the runtime (so the build needs no -lcuda)
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found;
        CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
        if (found != cudaDriverEntryPointSuccess || !fn) fail("TMA: the driver has no cuTensorMapEncodeTiled");
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }();
    return encode;
}

// a bf16 tensor of RANK dims, dims[0] contiguous, strides[d] elements between steps of dims[d + 1]; copied in
// boxes of box[] elements into the 128-byte swizzle (box[0] must be 64), zeros outside the tensor
template <int RANK>
inline CUtensorMap bf16_tensor_map(const bf16* base, const uint64_t (&dims)[RANK], const uint64_t (&strides)[RANK - 1],
                                   const uint32_t (&box)[RANK]) {
    cuuint64_t gdim[RANK], gstride[RANK - 1];
    cuuint32_t bdim[RANK], elem_stride[RANK];
    for (int d = 0; d < RANK; d++) {
        gdim[d] = dims[d];
        bdim[d] = box[d];
        elem_stride[d] = 1;
        if (d < RANK - 1) gstride[d] = strides[d] * sizeof(bf16);
    }
    CUtensorMap map;
    const CUresult r = tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, RANK, const_cast<bf16*>(base), gdim, gstride, bdim,
                                            elem_stride, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) fail("TMA: cuTensorMapEncodeTiled failed (error %d)", (int)r);
    return map;
}
#endif
