// fp8.cuh — FP8 for DeepSeek-V3's training recipe (paper §3.3), in three parts:
// the formats (the encoder and decoder a reader checks first, bit-exact with CUDA's
// __nv_fp8 conversions in their saturating mode), fine-grained quantization, and the
// block-scaled GEMM, each on the host (the CPU emulation reference.h runs) and on the
// device (the kernels and cuBLASLt). Host-only files include it too: the CUDA parts
// are compiled by nvcc only.
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

#ifdef __CUDACC__
#include <cuda_fp8.h>

#include "cuda_common.cuh"
#endif

enum Fp8Format { FP8_E4M3 = 0, FP8_E5M2 = 1 };

struct Fp8Spec {
    int mantissa_bits, bias;
    uint8_t max_code;  // the largest finite magnitude's code
    uint8_t nan_code;  // the canonical NaN (sign clear)
};

HD inline Fp8Spec fp8_spec(Fp8Format f) {
    return f == FP8_E4M3 ? Fp8Spec{3, 7, 0x7E, 0x7F} : Fp8Spec{2, 15, 0x7B, 0x7F};
}

HD inline uint32_t fp8_float_bits(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
#endif
}

HD inline uint8_t fp8_encode(float x, Fp8Format f) {
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

HD inline float fp8_decode(uint8_t c, Fp8Format f) {
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
// Activation tiles (tile_rows 1) by 128-column slice, then row: [ceil(cols/128)]
// [rows rounded up to 4], the transposed layout DeepGEMM also uses. Weight blocks
// (tile_rows 128) by block row: [ceil(rows/128)][pitch], DeepSeek's weight_scale_inv
// with each row padded to a multiple of 4 floats (16 bytes).
HD inline int fp8_scale_pitch(int cols) { return ((cols + FP8_TILE - 1) / FP8_TILE + 3) / 4 * 4; }

HD inline size_t fp8_scale_index(int tile_r, int tile_c, int rows, int cols, int tile_rows) {
    return tile_rows == 1 ? (size_t)tile_c * ((rows + 3) / 4 * 4) + tile_r : (size_t)tile_r * fp8_scale_pitch(cols) + tile_c;
}

// the floats a scale array holds (the padding included)
inline size_t fp8_scale_count(int rows, int cols, int tile_rows) {
    return tile_rows == 1 ? (size_t)(cols + FP8_TILE - 1) / FP8_TILE * ((rows + 3) / 4 * 4)
                          : (size_t)(rows + FP8_TILE - 1) / FP8_TILE * fp8_scale_pitch(cols);
}

// On sm_89+ the device encodes with the hardware's cvt.rn.satfinite, one instruction
// for fp8_encode's many: the same code for every float (gpu_fp8.cu checks that).
HD inline uint8_t fp8_quantize(float x, float scale) {
    if (!(scale > 0)) return 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    return (uint8_t)__nv_cvt_float_to_fp8(x / scale, __NV_SATFINITE, __NV_E4M3);
#else
    return fp8_encode(x / scale, FP8_E4M3);
#endif
}

// One operand of an FP8 GEMM: E4M3 codes [rows, cols], row-major, and one scale per
// tile (tile_rows 1: 1 x 128 tiles; 128: 128 x 128 blocks) laid out as above.
struct Fp8Matrix {
    uint8_t* codes = nullptr;
    float* scales = nullptr;
    int rows = 0, cols = 0, tile_rows = 1;
};

HD inline float fp8_scale_of(const Fp8Matrix& m, int r, int c) {
    return m.scales[fp8_scale_index(r / m.tile_rows, c / FP8_TILE, m.rows, m.cols, m.tile_rows)];
}

// The E4M3 copy of a weight W [out, in] that FP8 GEMMs read: W in 128 x 128 blocks
// (Fprop) and W^T (Dgrad contracts over W's rows), whose blocks are W's transposed,
// with the same codes and scales.
struct Fp8Weight {
    Fp8Matrix w, wt;
};

// codes and scales of an Fp8Matrix of `rows` x `cols` cut from two flat arrays at
// *codes_at and *scales_at, which advance (16-byte aligned, as cuBLASLt wants); with
// null bases it only counts
inline Fp8Matrix fp8_matrix_at(uint8_t* codes, float* scales, size_t* codes_at, size_t* scales_at, int rows, int cols, int tile_rows) {
    Fp8Matrix m{codes ? codes + *codes_at : nullptr, scales ? scales + *scales_at : nullptr, rows, cols, tile_rows};
    *codes_at += ((size_t)rows * cols + 15) / 16 * 16;
    *scales_at += (fp8_scale_count(rows, cols, tile_rows) + 3) / 4 * 4;
    return m;
}

// x [rows, cols] -> q's codes and scales (q.rows x q.cols, q.tile_rows). The host reference.
template <typename T>
void fp8_quantize_host(const Fp8Matrix& q, const T* x) {
#pragma omp parallel for collapse(2) schedule(static)  // tiles are independent
    for (int r0 = 0; r0 < q.rows; r0 += q.tile_rows)
        for (int c0 = 0; c0 < q.cols; c0 += FP8_TILE) {
            const int r1 = std::min(r0 + q.tile_rows, q.rows), c1 = std::min(c0 + FP8_TILE, q.cols);
            float amax = 0;
            for (int r = r0; r < r1; r++)
                for (int c = c0; c < c1; c++) amax = fmaxf(amax, fabsf((float)x[(size_t)r * q.cols + c]));
            const float scale = amax / FP8_E4M3_MAX;
            q.scales[fp8_scale_index(r0 / q.tile_rows, c0 / FP8_TILE, q.rows, q.cols, q.tile_rows)] = scale;
            for (int r = r0; r < r1; r++)
                for (int c = c0; c < c1; c++) q.codes[(size_t)r * q.cols + c] = fp8_quantize((float)x[(size_t)r * q.cols + c], scale);
        }
}

// q holds x^T for x [q.cols, q.rows]: the tiling Wgrad needs, 128 tokens by one channel
template <typename T>
void fp8_quantize_transposed_host(const Fp8Matrix& q, const T* x) {
    std::vector<float> xt((size_t)q.rows * q.cols);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < q.rows; r++)
        for (int c = 0; c < q.cols; c++) xt[(size_t)r * q.cols + c] = (float)x[(size_t)c * q.rows + r];
    fp8_quantize_host(q, xt.data());
}

// The emulated FP8 GEMM: out [x.rows, w.rows] (+)= dequant(x) @ dequant(w)^T with x in
// 1 x 128 tiles. As on the tensor cores, each 128-wide slice of the contraction is
// summed in fp32 from the decoded codes, then scaled by its two tiles' scales and
// added to the fp32 total.
template <typename T>
void fp8_matmul_host(T* out, const Fp8Matrix& x, const Fp8Matrix& w, bool accumulate) {
    float value[256];
    for (int c = 0; c < 256; c++) value[c] = fp8_decode((uint8_t)c, FP8_E4M3);
    const int K = x.cols;
#pragma omp parallel for collapse(2) schedule(static)
    for (int n = 0; n < x.rows; n++)
        for (int o = 0; o < w.rows; o++) {
            const uint8_t *xr = x.codes + (size_t)n * K, *wr = w.codes + (size_t)o * K;
            float total = accumulate ? (float)out[(size_t)n * w.rows + o] : 0.0f;
            for (int k0 = 0; k0 < K; k0 += FP8_TILE) {
                float part = 0;
                for (int k = k0; k < std::min(k0 + FP8_TILE, K); k++) part += value[xr[k]] * value[wr[k]];
                total += part * (fp8_scale_of(x, n, k0) * fp8_scale_of(w, o, k0));
            }
            out[(size_t)n * w.rows + o] = (T)total;
        }
}

// an Fp8Matrix with its own host storage
struct Fp8HostMatrix {
    std::vector<uint8_t> codes;
    std::vector<float> scales;
    Fp8Matrix m;
    Fp8HostMatrix(int rows, int cols, int tile_rows)
        : codes((size_t)rows * cols), scales(fp8_scale_count(rows, cols, tile_rows)), m{codes.data(), scales.data(), rows, cols, tile_rows} {}
};

// The FP8 Linear, emulated (the twin of fp8_linear_forward_gpu): out [N, OC] =
// x [N, K] @ W^T, x quantized in 1 x 128 tiles along K
template <typename T>
void fp8_linear_forward_host(T* out, const T* x, const Fp8Weight& w, int N) {
    Fp8HostMatrix xq(N, w.w.cols, 1);
    fp8_quantize_host(xq.m, x);
    fp8_matmul_host(out, xq.m, w.w, false);
}

// Dgrad: dx [N, K] (+= when accumulate; null: not wanted) = dout @ W, dout in 1 x 128
// tiles along OC against W^T's blocks. Wgrad: dw [OC, K] += dout^T @ x, contracting
// over the tokens, so both operands are transposed and tiled 128 tokens by one channel.
template <typename T>
void fp8_linear_backward_host(T* dx, T* dw, const T* dout, const T* x, const Fp8Weight& w, int N, bool accumulate) {
    const int OC = w.w.rows, K = w.w.cols;
    if (dx) {
        Fp8HostMatrix dq(N, OC, 1);
        fp8_quantize_host(dq.m, dout);
        fp8_matmul_host(dx, dq.m, w.wt, accumulate);
    }
    Fp8HostMatrix dt(OC, N, 1), xt(K, N, 1);
    fp8_quantize_transposed_host(dt.m, dout);
    fp8_quantize_transposed_host(xt.m, x);
    fp8_matmul_host(dw, dt.m, xt.m, true);
}

#ifdef __CUDACC__
// ----------------------------------------------------------------------------
// The quantization kernels, each the twin of a host function above.

// the codes of v[0..3] at out[0..3], of those before out's row ends (`room` left); one
// 4-byte store when the row pitch keeps it aligned
__device__ inline void fp8_store4(uint8_t* out, const float* v, float scale, int room, bool aligned) {
    if (aligned && room >= 4) {
        *(uint32_t*)out = fp8_quantize(v[0], scale) | fp8_quantize(v[1], scale) << 8 | fp8_quantize(v[2], scale) << 16 |
                          (uint32_t)fp8_quantize(v[3], scale) << 24;
        return;
    }
    for (int i = 0; i < 4 && i < room; i++) out[i] = fp8_quantize(v[i], scale);
}

// 1 x 128 tiles: one warp per tile, 4 values per lane; x [q.rows, q.cols] with row pitch ld
template <typename T>
static __global__ void fp8_quantize_rows_kernel(Fp8Matrix q, const T* x, int ld) {
    const int tiles_per_row = (q.cols + FP8_TILE - 1) / FP8_TILE, lane = threadIdx.x % 32;
    const size_t tile = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (tile >= (size_t)q.rows * tiles_per_row) return;
    const int r = (int)(tile / tiles_per_row), t = (int)(tile % tiles_per_row), c0 = t * FP8_TILE + lane * 4;
    float v[4], amax = 0;
    for (int i = 0; i < 4; i++) {
        v[i] = c0 + i < q.cols ? (float)x[(size_t)r * ld + c0 + i] : 0.0f;
        amax = fmaxf(amax, fabsf(v[i]));
    }
    const float scale = warp_max(amax) / FP8_E4M3_MAX;
    fp8_store4(q.codes + (size_t)r * q.cols + c0, v, scale, q.cols - c0, q.cols % 4 == 0);
    if (lane == 0) q.scales[fp8_scale_index(r, t, q.rows, q.cols, 1)] = scale;
}

// 128 x 128 blocks, one block of 256 threads each; also writes the transposed copy
// qt when it has codes (weights for Dgrad), through shared memory so that both
// writes are row-wise
template <typename T>
static __global__ void fp8_quantize_blocks_kernel(Fp8Matrix q, Fp8Matrix qt, const T* x) {
    __shared__ uint8_t tile[FP8_TILE][FP8_TILE + 4];
    const int r0 = blockIdx.y * FP8_TILE, c0 = blockIdx.x * FP8_TILE;
    const int height = min(FP8_TILE, q.rows - r0), width = min(FP8_TILE, q.cols - c0), count = height * width;
    float amax = 0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) amax = fmaxf(amax, fabsf((float)x[(size_t)(r0 + i / width) * q.cols + c0 + i % width]));
    const float scale = block_max(amax) / FP8_E4M3_MAX;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const size_t at = (size_t)(r0 + i / width) * q.cols + c0 + i % width;
        q.codes[at] = tile[i % width][i / width] = fp8_quantize((float)x[at], scale);
    }
    if (threadIdx.x == 0) q.scales[fp8_scale_index(blockIdx.y, blockIdx.x, q.rows, q.cols, FP8_TILE)] = scale;
    if (!qt.codes) return;
    __syncthreads();
    for (int i = threadIdx.x; i < count; i += blockDim.x) qt.codes[(size_t)(c0 + i / height) * q.rows + r0 + i % height] = tile[i / height][i % height];
    if (threadIdx.x == 0) qt.scales[fp8_scale_index(blockIdx.x, blockIdx.y, q.cols, q.rows, FP8_TILE)] = scale;
}

// x [rows, cols] (row pitch ld; rows = q.rows) -> q in its tiles: 1 x 128 or 128 x 128
template <typename T>
void fp8_quantize_gpu(const Fp8Matrix& q, const T* x, int ld, cudaStream_t stream) {
    if (q.rows == 0 || q.cols == 0) return;
    if (q.tile_rows == 1) {
        const size_t tiles = (size_t)q.rows * ((q.cols + FP8_TILE - 1) / FP8_TILE);
        fp8_quantize_rows_kernel<T><<<(unsigned)((tiles + 7) / 8), 256, 0, stream>>>(q, x, ld);
    } else {
        const dim3 grid((q.cols + FP8_TILE - 1) / FP8_TILE, (q.rows + FP8_TILE - 1) / FP8_TILE);
        fp8_quantize_blocks_kernel<T><<<grid, 256, 0, stream>>>(q, Fp8Matrix{}, x);
    }
    CUDA_LAUNCH_CHECK();
}

// a weight W [out, in] -> its FP8 copy: W's blocks and W^T's
inline void fp8_quantize_weight_gpu(const Fp8Weight& q, const bf16* w, cudaStream_t stream) {
    const dim3 grid((q.w.cols + FP8_TILE - 1) / FP8_TILE, (q.w.rows + FP8_TILE - 1) / FP8_TILE);
    fp8_quantize_blocks_kernel<bf16><<<grid, 256, 0, stream>>>(q.w, q.wt, w);
    CUDA_LAUNCH_CHECK();
}

// Both tilings of one bf16 matrix in a single read, for the backward: x [rows, cols] in
// 1 x 128 tiles along its rows (q: Dgrad's dout) and x^T in tiles of 128 rows (qt:
// Wgrad's operands). A block of 256 threads stages a 128 x 128 tile in shared memory
// with 16-byte loads; each warp then quantizes 16 of its rows and 16 of its columns.
// The row pitch of 130 bf16 (65 words) keeps the column reads, lane i on row i + 32k,
// free of bank conflicts.
constexpr int FP8_BOTH_PITCH = FP8_TILE + 2;

static __global__ void fp8_quantize_both_kernel(Fp8Matrix q, Fp8Matrix qt, const bf16* x, int ld) {
    __shared__ bf16 tile[FP8_TILE][FP8_BOTH_PITCH];
    const int rows = qt.cols, cols = qt.rows;  // x's shape; q (when wanted) has the same
    const int r0 = blockIdx.y * FP8_TILE, c0 = blockIdx.x * FP8_TILE, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const bool vector_loads = ld % 8 == 0 && ((uintptr_t)x & 15) == 0;
    for (int i = threadIdx.x; i < FP8_TILE * FP8_TILE / 8; i += blockDim.x) {
        const int r = i / (FP8_TILE / 8), c = i % (FP8_TILE / 8) * 8;
        bf16 v[8];
        if (vector_loads && r0 + r < rows && c0 + c + 8 <= cols) {
            *(int4*)v = *(const int4*)(x + (size_t)(r0 + r) * ld + c0 + c);
        } else {
            for (int k = 0; k < 8; k++) v[k] = r0 + r < rows && c0 + c + k < cols ? x[(size_t)(r0 + r) * ld + c0 + c + k] : bf16(0.0f);
        }
        for (int k = 0; k < 8; k += 2) *(__nv_bfloat162*)&tile[r][c + k] = __nv_bfloat162{v[k], v[k + 1]};
    }
    __syncthreads();
    for (int k = warp * 16; k < warp * 16 + 16; k++) {
        if (q.codes && r0 + k < rows) {  // row k: a 1 x 128 tile of x, 4 columns a lane
            float v[4];
            for (int i = 0; i < 4; i++) v[i] = (float)tile[k][lane * 4 + i];
            const float scale = warp_max(fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])))) / FP8_E4M3_MAX;
            if (c0 + lane * 4 < cols) fp8_store4(q.codes + (size_t)(r0 + k) * cols + c0 + lane * 4, v, scale, cols - c0 - lane * 4, cols % 4 == 0);
            if (lane == 0) q.scales[fp8_scale_index(r0 + k, blockIdx.x, rows, cols, 1)] = scale;
        }
        if (c0 + k < cols) {  // column k: a tile of 128 rows of x, a row of x^T; lane i takes rows i + 32j
            float v[4], amax = 0;
            for (int i = 0; i < 4; i++) amax = fmaxf(amax, fabsf(v[i] = (float)tile[lane + 32 * i][k]));
            const float scale = warp_max(amax) / FP8_E4M3_MAX;
            uint8_t* out = qt.codes + (size_t)(c0 + k) * rows + r0;
            for (int i = 0; i < 4; i++)
                if (r0 + lane + 32 * i < rows) out[lane + 32 * i] = fp8_quantize(v[i], scale);
            if (lane == 0) qt.scales[fp8_scale_index(c0 + k, blockIdx.y, cols, rows, 1)] = scale;
        }
    }
}

// q (x in 1 x 128 tiles; null codes: not wanted) and qt (x^T in tiles of 128 rows of x)
// from x [qt.cols, qt.rows] with row pitch ld
inline void fp8_quantize_both_gpu(const Fp8Matrix& q, const Fp8Matrix& qt, const bf16* x, int ld, cudaStream_t stream) {
    if (qt.rows == 0 || qt.cols == 0) return;
    const dim3 grid((qt.rows + FP8_TILE - 1) / FP8_TILE, (qt.cols + FP8_TILE - 1) / FP8_TILE);
    fp8_quantize_both_kernel<<<grid, 256, 0, stream>>>(q, qt, x, ld);
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// The FP8 GEMM on cuBLASLt's block-scaled path (CUDA 12.9+, sm_90), the twin of
// fp8_matmul_host: out [x.rows, w.rows] (+)= dequant(x) @ dequant(w)^T, fp32
// accumulation, bf16 or fp32 out. x is in 1 x 128 tiles; w in 128 x 128 blocks
// (a weight: Fprop, Dgrad) or 1 x 128 tiles (Wgrad's token-tiled operand). In
// cuBLASLt's column-major terms out^T = W X^T: W is operand A read transposed (the
// "TN" form FP8 requires), X operand B; matmul_plan sets the scale modes.
inline void fp8_matmul(Matmul& mm, void* out, bool out_fp32, const Fp8Matrix& x, const Fp8Matrix& w, bool accumulate, cudaStream_t stream) {
    const int N = x.rows, OC = w.rows, K = x.cols;
    if (K % 16 || N % 4 || N == 0 || OC == 0 || w.cols != K || x.tile_rows != 1)
        fail("fp8_matmul: K = %d must be a multiple of 16 and N = %d of 4 (an FP8 GEMM of %dx%d by %dx%d)", K, N, N, K, OC, w.cols);
    const MatmulKey key{N,     OC,   K, K, K, OC, alignment_bytes(x.codes, K), alignment_bytes(w.codes, K), alignment_bytes(out, (size_t)OC * (out_fp32 ? 4 : 2)),
                        false, true, out_fp32, w.tile_rows};
    const MatmulPlan& p = matmul_plan_cached(mm, key);
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w.scales, sizeof(w.scales)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x.scales, sizeof(x.scales)));
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    CUBLAS_CHECK(cublasLtMatmul(mm.handle, p.desc, &alpha, w.codes, p.lb, x.codes, p.la, &beta, out, p.lc, out, p.lc, &p.algo, mm.workspace,
                                mm.workspace_bytes, stream));
}
#endif
