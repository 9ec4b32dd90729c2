// fp8.cuh — FP8 for DeepSeek-V3's training recipe. So far the two formats: the
// encoder and decoder a reader checks first, the same code on the host (the CPU
// emulation) and the device (the kernels), bit-exact with CUDA's __nv_fp8
// conversions in their saturating mode.
//
//   E4M3: sign, 4 exponent bits (bias 7), 3 mantissa bits. No infinities; the
//         all-ones pattern S.1111.111 is NaN, so the largest finite is 1.75 * 2^8
//         = 448. Subnormals (exponent 0) are m/8 * 2^-6, down to 2^-9.
//   E5M2: sign, 5 exponent bits (bias 15), 2 mantissa bits, IEEE-like: exponent
//         31 is inf (mantissa 0) or NaN. Largest finite 1.75 * 2^15 = 57344;
//         subnormals m/4 * 2^-14, down to 2^-16.
//
// Encoding rounds to the nearest code, ties to the even one; what rounds past the
// largest finite (infinities included) saturates to it, as DeepSeek's scaled values
// never should but a stray outlier must not become inf or NaN; NaN stays NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_common.cuh"

enum Fp8Format { FP8_E4M3 = 0, FP8_E5M2 = 1 };

struct Fp8Spec {
    int mantissa_bits, bias;
    uint8_t max_code;  // the largest finite magnitude's code
    uint8_t nan_code;  // the canonical NaN (sign clear)
};

__host__ __device__ inline Fp8Spec fp8_spec(Fp8Format f) {
    return f == FP8_E4M3 ? Fp8Spec{3, 7, 0x7E, 0x7F} : Fp8Spec{2, 15, 0x7B, 0x7F};
}

__host__ __device__ inline uint32_t fp8_float_bits(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
#endif
}

__host__ __device__ inline uint8_t fp8_encode(float x, Fp8Format f) {
    const Fp8Spec s = fp8_spec(f);
    const uint32_t u = fp8_float_bits(x), sign = (u >> 24) & 0x80, mag = u & 0x7FFFFFFF;
    if (mag > 0x7F800000) return s.nan_code;
    const int exp = (int)(mag >> 23) - 127, emin = 1 - s.bias;  // emin: the smallest normal exponent
    uint32_t code;
    if (exp < emin) {
        // subnormal (or zero) in FP8: a whole number of the smallest step 2^(emin - m);
        // the scaling by a power of two is exact, and rint rounds half to even
        code = (uint32_t)rintf(ldexpf(fabsf(x), s.mantissa_bits - emin));
    } else {
        // normal: keep the top mantissa bits, round the dropped ones half to even; a
        // carry out of the mantissa moves to the exponent, as it should
        const int drop = 23 - s.mantissa_bits;
        const uint32_t rest = mag & ((1u << drop) - 1), half = 1u << (drop - 1);
        code = (uint32_t)((exp + s.bias) << s.mantissa_bits) | ((mag & 0x7FFFFF) >> drop);
        if (rest > half || (rest == half && (code & 1))) code++;
    }
    if (code > s.max_code) code = s.max_code;  // past the largest finite, infinities too
    return (uint8_t)(sign | code);
}

__host__ __device__ inline float fp8_decode(uint8_t c, Fp8Format f) {
    const Fp8Spec s = fp8_spec(f);
    const int m = c & ((1 << s.mantissa_bits) - 1), e = (c & 0x7F) >> s.mantissa_bits;
    const float sign = (c & 0x80) ? -1.0f : 1.0f;
    if (f == FP8_E4M3 ? (c & 0x7F) == 0x7F : e == 31) return m == 0 ? sign * INFINITY : NAN;
    if (e == 0) return sign * ldexpf((float)m, 1 - s.bias - s.mantissa_bits);
    return sign * ldexpf((float)((1 << s.mantissa_bits) + m), e - s.bias - s.mantissa_bits);
}

// ----------------------------------------------------------------------------
// Fine-grained quantization (DeepSeek-V3 §3.3.2): each tile of 128 values along a
// row (activations, 1 x 128) or each 128 x 128 block (weights) gets its own fp32
// scale s = amax / 448, and its values are stored as E4M3 codes of x / s, so an
// outlier costs precision only in its own tile. x ~ decode(code) * s; s is what
// DeepSeek's checkpoints call weight_scale_inv. An all-zero tile gets s = 0 and
// zero codes. The host and the device run the same element function, so their
// codes and scales are bit-identical.

constexpr int FP8_TILE = 128;
constexpr float FP8_E4M3_MAX = 448.0f;

// Where each tile's scale lives: the layouts cuBLASLt's block-scaled GEMM reads
// (found by experiment on an H200 with cuBLAS 13.1; the docs leave it implicit).
// Activation tiles (tile_rows 1) by 128-column slice, then row: [ceil(cols/128)][rows],
// the transposed layout DeepGEMM also uses. Weight blocks (tile_rows 128) by block row:
// [ceil(rows/128)][pitch], DeepSeek's weight_scale_inv with each row padded to a
// multiple of 4 floats (16 bytes).
__host__ __device__ inline int fp8_scale_pitch(int cols) { return ((cols + FP8_TILE - 1) / FP8_TILE + 3) / 4 * 4; }

__host__ __device__ inline size_t fp8_scale_index(int tile_r, int tile_c, int rows, int cols, int tile_rows) {
    return tile_rows == 1 ? (size_t)tile_c * rows + tile_r : (size_t)tile_r * fp8_scale_pitch(cols) + tile_c;
}

// the floats a scale array holds (the padding included)
inline size_t fp8_scale_count(int rows, int cols, int tile_rows) {
    return tile_rows == 1 ? (size_t)(cols + FP8_TILE - 1) / FP8_TILE * rows : (size_t)(rows + FP8_TILE - 1) / FP8_TILE * fp8_scale_pitch(cols);
}

__host__ __device__ inline uint8_t fp8_quantize(float x, float scale) { return scale > 0 ? fp8_encode(x / scale, FP8_E4M3) : 0; }

// x [rows, cols] fp32 -> codes [rows, cols] and scales (laid out by fp8_scale_index);
// tile_rows = 1 for activations, 128 for weights. The host reference.
inline void fp8_quantize_host(uint8_t* codes, float* scales, const float* x, int rows, int cols, int tile_rows) {
    for (int r0 = 0; r0 < rows; r0 += tile_rows)
        for (int c0 = 0; c0 < cols; c0 += FP8_TILE) {
            const int r1 = r0 + tile_rows < rows ? r0 + tile_rows : rows, c1 = c0 + FP8_TILE < cols ? c0 + FP8_TILE : cols;
            float amax = 0;
            for (int r = r0; r < r1; r++)
                for (int c = c0; c < c1; c++) amax = fmaxf(amax, fabsf(x[(size_t)r * cols + c]));
            const float scale = amax / FP8_E4M3_MAX;
            scales[fp8_scale_index(r0 / tile_rows, c0 / FP8_TILE, rows, cols, tile_rows)] = scale;
            for (int r = r0; r < r1; r++)
                for (int c = c0; c < c1; c++) codes[(size_t)r * cols + c] = fp8_quantize(x[(size_t)r * cols + c], scale);
        }
}

#ifdef __CUDACC__
// One block of 256 threads per tile of tile_rows x 128: the block's amax (max is
// exact in any order, so the result does not depend on the reduction), then the codes.
template <typename T>
__global__ void fp8_quantize_kernel(uint8_t* codes, float* scales, const T* x, int rows, int cols, int tile_rows) {
    __shared__ float warp_max[8];
    const int r0 = blockIdx.y * tile_rows, c0 = blockIdx.x * FP8_TILE;
    const int r1 = min(r0 + tile_rows, rows), c1 = min(c0 + FP8_TILE, cols), width = c1 - c0, count = (r1 - r0) * width;
    float amax = 0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) amax = fmaxf(amax, fabsf((float)x[(size_t)(r0 + i / width) * cols + c0 + i % width]));
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = 0;
    for (int w = 0; w < (int)blockDim.x / 32; w++) amax = fmaxf(amax, warp_max[w]);
    const float scale = amax / FP8_E4M3_MAX;
    if (threadIdx.x == 0) scales[fp8_scale_index(blockIdx.y, blockIdx.x, rows, cols, tile_rows)] = scale;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const size_t at = (size_t)(r0 + i / width) * cols + c0 + i % width;
        codes[at] = fp8_quantize((float)x[at], scale);
    }
}

// codes [rows, cols] and scales (fp8_scale_index) from x [rows, cols] (fp32 or bf16);
// tile_rows 1 (activations) or 128 (weights)
template <typename T>
inline void fp8_quantize_gpu(uint8_t* codes, float* scales, const T* x, int rows, int cols, int tile_rows, cudaStream_t stream) {
    if (rows == 0 || cols == 0) return;
    const dim3 grid((cols + FP8_TILE - 1) / FP8_TILE, (rows + tile_rows - 1) / tile_rows);
    fp8_quantize_kernel<T><<<grid, 256, 0, stream>>>(codes, scales, x, rows, cols, tile_rows);
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// The FP8 Linear forward on cuBLASLt's block-scaled path (CUDA 12.9+, sm_90):
// out [N, OC] bf16 = dequant(x) [N, K] @ dequant(w) [OC, K]^T, fp32 accumulation,
// with x in 1x128 tiles and w in 128x128 blocks, codes and scales as fp8_quantize_*
// lay them out (N a multiple of 4: only such batches were checked). In
// cuBLASLt's column-major terms out^T = W X^T: operand A is W read transposed (the
// "TN" form FP8 requires) with BLK128x128 scales, B is X with VEC128 scales.
inline void fp8_matmul(Matmul& mm, bf16* out, const uint8_t* x, const float* x_scales, const uint8_t* w, const float* w_scales, int N,
                       int K, int OC, cudaStream_t stream) {
    if (K % 16 || N % 4 || N == 0 || OC == 0) fail("fp8_matmul: K = %d must be a multiple of 16 and N = %d of 4", K, N);
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
    const cublasLtMatmulMatrixScale_t blk = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, vec = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &blk, sizeof(blk)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &vec, sizeof(vec)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scales, sizeof(w_scales)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scales, sizeof(x_scales)));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, K, OC, K));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, K, N, K));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, OC, N, OC));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &mm.workspace_bytes,
                                                      sizeof(mm.workspace_bytes)));
    cublasLtMatmulHeuristicResult_t heuristic;
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(mm.handle, desc, la, lb, lc, lc, pref, 1, &heuristic, &found));
    if (found == 0) fail("cuBLASLt has no block-scaled FP8 algorithm for a %dx%dx%d matmul (needs CUDA 12.9+ and sm_90)", N, OC, K);
    const float alpha = 1.0f, beta = 0.0f;
    CUBLAS_CHECK(cublasLtMatmul(mm.handle, desc, &alpha, w, la, x, lb, &beta, out, lc, out, lc, &heuristic.algo, mm.workspace,
                                mm.workspace_bytes, stream));
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(desc);
}
#endif
