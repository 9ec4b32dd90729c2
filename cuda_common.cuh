// cuda_common.cuh — what every CUDA file shares: error checks that throw one-line
// messages, the bf16 type, device buffers, the one cuBLASLt matmul wrapper, and
// host<->device copies with conversion (used by the GPU tests too).
//
// Layout conventions match reference.h: row-major activations [N, C]; weights
// W[OC, C] as in nn.Linear; activations and weights bf16, weight gradients,
// master weights and AdamW moments fp32.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

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

// checks the last launch (cheap: no synchronisation)
#define CUDA_LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

inline int ceil_div(long long a, long long b) { return (int)((a + b - 1) / b); }

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
// cuBLASLt: out[M, N] (+)= A @ B in row-major terms, where A is [M, K] (or its
// transpose stored [K, M]) and B is [K, N] (or stored [N, K]). bf16 inputs, fp32
// accumulation, output bf16 or fp32; beta = 1 accumulates into out (weight
// gradients). Row-major X is column-major X^T, so we ask cuBLASLt for
// out^T = B^T A^T.

struct Matmul {
    cublasLtHandle_t handle = nullptr;
    void* workspace = nullptr;
    size_t workspace_bytes = 32u << 20;
};

inline void matmul_init(Matmul& mm) {
    CUBLAS_CHECK(cublasLtCreate(&mm.handle));
    mm.workspace = device_alloc<char>(mm.workspace_bytes, "cuBLASLt workspace");
}

inline void matmul_free(Matmul& mm) {
    if (mm.handle) cublasLtDestroy(mm.handle);
    if (mm.workspace) cudaFree(mm.workspace);
    mm = Matmul{};
}

// the largest power of two (up to 256) dividing both the address and the row pitch
inline uint32_t alignment_bytes(const void* p, size_t pitch_bytes) {
    uintptr_t bits = (uintptr_t)p | (uintptr_t)pitch_bytes | 256;
    return (uint32_t)(bits & (~bits + 1));
}

// trans_a: A is stored [K, M]; trans_b: B is stored [N, K]. out_fp32 selects the
// output type. Leading dimensions are the dense ones unless given.
inline void matmul(Matmul& mm, void* out, const bf16* A, const bf16* B, int M, int N, int K, bool trans_a, bool trans_b,
                   float beta, bool out_fp32, cudaStream_t stream, int lda = 0, int ldb = 0, int ldc = 0) {
    if (M == 0 || N == 0) return;
    cublasLtMatmulDesc_t desc;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    // column-major: out^T [N, M] = op(B^T) [N, K] @ op(A^T) [K, M]
    cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_b, sizeof(op_b)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_a, sizeof(op_a)));
    if (!lda) lda = trans_a ? M : K;
    if (!ldb) ldb = trans_b ? K : N;
    if (!ldc) ldc = N;
    cublasLtMatrixLayout_t lb, la, lc;
    // B^T as column-major: rows N, cols K when not transposed
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, trans_b ? K : N, trans_b ? N : K, ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, trans_a ? M : K, trans_a ? K : M, lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lc, out_fp32 ? CUDA_R_32F : CUDA_R_16BF, N, M, ldc));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &mm.workspace_bytes,
                                                      sizeof(mm.workspace_bytes)));
    // the heuristic assumes 256-byte aligned operands unless told otherwise, and the
    // chosen kernel then refuses a sub-tensor such as kv_a's k_pe columns
    const int out_bytes = out_fp32 ? 4 : 2;
    uint32_t align_b = alignment_bytes(B, (size_t)ldb * 2), align_a = alignment_bytes(A, (size_t)lda * 2);
    uint32_t align_c = alignment_bytes(out, (size_t)ldc * out_bytes);
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_b, sizeof(align_b)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_a, sizeof(align_a)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof(align_c)));
    cublasLtMatmulHeuristicResult_t heuristic;
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(mm.handle, desc, lb, la, lc, lc, pref, 1, &heuristic, &found));
    if (found == 0) fail("cuBLASLt has no algorithm for a %dx%dx%d matmul", M, N, K);
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasLtMatmul(mm.handle, desc, &alpha, B, lb, A, la, &beta, out, lc, out, lc, &heuristic.algo, mm.workspace,
                                mm.workspace_bytes, stream));
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(desc);
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

// sum over a block of up to 1024 threads; every thread gets the result. The
// reduction order is fixed, so results are deterministic.
__device__ inline float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(v);
}
