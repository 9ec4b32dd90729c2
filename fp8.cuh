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
// scale s = amax / 448, and its values are stored as E4M3 codes of x · (1 / s), so an
// outlier costs precision only in its own tile. x ~ decode(code) * s; s is what
// DeepSeek's checkpoints call weight_scale_inv. An all-zero tile gets s = 0 and
// zero codes, and so does a tile of values under about 1e-36 (fp8_inverse_scale).
// The host and the device run the same element function, so their codes and scales
// are bit-identical.

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

// A tile's values are encoded as x * (1 / s), one division a tile and a multiplication a
// value, as DeepGEMM's casts multiply by 448 / amax: the division a value cost the SwiGLU
// forward 1.3-1.4x its time (bench/RESULTS.md, session 15). The product can differ from
// x / s by an ulp, so a code could differ from a division's at a rounding boundary: none
// did in 176 million measured. 0 for a tile of zeros (s = 0, or s not finite), and for a
// tile so small that 1 / s overflows (amax under 448 * 2^-128, about 1.3e-36): its codes
// are then all zero, where an infinite inverse would make 0 * inf a NaN code (a NaN
// gradient in FP8 training, bench/RESULTS.md, session 16).
HD inline float fp8_inverse_scale(float scale) {
    const float inverse = scale > 0 ? 1.0f / scale : 0.0f;
    return inverse < INFINITY ? inverse : 0.0f;
}

// On sm_89+ the device encodes with the hardware's cvt.rn.satfinite, one instruction
// for fp8_encode's many: the same code for every float (gpu_fp8.cu checks that).
HD inline uint8_t fp8_quantize(float x, float inverse_scale) {
    if (!(inverse_scale > 0)) return 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    return (uint8_t)__nv_cvt_float_to_fp8(x * inverse_scale, __NV_SATFINITE, __NV_E4M3);
#else
    return fp8_encode(x * inverse_scale, FP8_E4M3);
#endif
}

// the value an E4M3 code stands for in a tile of this scale, decode(code) * scale; the device decodes with the
// hardware's conversion to half, exact for every E4M3 value
HD inline float fp8_dequantize(uint8_t code, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3))) * scale;
#else
    return fp8_decode(code, FP8_E4M3) * scale;
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
    bool wgrad = false;  // Wgrad in FP8 too (--fp8-wgrad); otherwise bf16 (see "Where FP8 pays")
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
            const float scale = amax / FP8_E4M3_MAX, inverse = fp8_inverse_scale(scale);
            q.scales[fp8_scale_index(r0 / q.tile_rows, c0 / FP8_TILE, q.rows, q.cols, q.tile_rows)] = scale;
            for (int r = r0; r < r1; r++)
                for (int c = c0; c < c1; c++) q.codes[(size_t)r * q.cols + c] = fp8_quantize((float)x[(size_t)r * q.cols + c], inverse);
        }
}

// q holds x^T for x [q.cols, q.rows]: a weight's W^T, whose blocks Dgrad reads, or (in
// 1 x 128 tiles) an FP8 Wgrad's operand, 128 tokens by one channel
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

// x [rows, cols] in place -> what its E4M3 copy in 1 x 128 tiles holds: the SwiGLU input that FP8 training keeps
// for the backward (reference.h's FfnActs::fp8; kernels.cuh keeps the codes)
template <typename T>
void fp8_round_trip_host(T* x, int rows, int cols) {
    Fp8HostMatrix q(rows, cols, 1);
    fp8_quantize_host(q.m, x);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) x[(size_t)r * cols + c] = (T)fp8_dequantize(q.codes[(size_t)r * cols + c], fp8_scale_of(q.m, r, c));
}

// The FP8 Linear, emulated (the twin of kernels.cuh's linear_forward_gpu): out [N, OC] =
// x [N, K] @ W^T, x quantized in 1 x 128 tiles along K
template <typename T>
void fp8_linear_forward_host(T* out, const T* x, const Fp8Weight& w, int N) {
    Fp8HostMatrix xq(N, w.w.cols, 1);
    fp8_quantize_host(xq.m, x);
    fp8_matmul_host(out, xq.m, w.w, false);
}

// Dgrad, emulated: dx [N, K] (+= when accumulate) = dout @ W, dout in 1 x 128 tiles
// along OC against W^T's blocks
template <typename T>
void fp8_linear_backward_input_host(T* dx, const T* dout, const Fp8Weight& w, int N, bool accumulate) {
    Fp8HostMatrix dq(N, w.w.rows, 1);
    fp8_quantize_host(dq.m, dout);
    fp8_matmul_host(dx, dq.m, w.wt, accumulate);
}

// Wgrad in FP8 (w.wgrad), emulated: dw [OC, K] += dout^T @ x, contracting over the
// tokens, so both operands are transposed and tiled 128 tokens by one channel.
// Without w.wgrad, reference.h's linear_backward runs it in the model's type.
template <typename T>
void fp8_linear_backward_weight_host(T* dw, const T* dout, const T* x, const Fp8Weight& w, int N) {
    Fp8HostMatrix dt(w.w.rows, N, 1), xt(w.w.cols, N, 1);
    fp8_quantize_transposed_host(dt.m, dout);
    fp8_quantize_transposed_host(xt.m, x);
    fp8_matmul_host(dw, dt.m, xt.m, true);
}

#ifdef __CUDACC__
// ----------------------------------------------------------------------------
// Where FP8 pays, measured on an H200 (bench/fp8_gemm, bench/RESULTS.md): the
// block-scaled Fprop and Dgrad GEMMs run 1.1-1.6x the bf16 ones at this project's
// shapes. Wgrad contracts over the tokens, so FP8 needs both of its operands
// quantized again along the tokens (a transposing pass over dout and x); that
// 1x128-by-1x128 GEMM ran 0.66-1.2x bf16 before the passes, which cost 0.5-1x
// the GEMM on top. So by default Wgrad reads the bf16 dout and x as they are, a
// plain bf16 GEMM into the fp32 gradient; --fp8-wgrad runs DeepSeek-V3's whole
// recipe (Fp8Weight::wgrad), for shapes where it pays and for comparison.
//
// The quantization kernels, each the twin of a host function above.

// The 1 x 128 tile of row r that 16 consecutive lanes hold, 8 values each (the
// half-warp's first lane at the tile's first column; lane k at column c = that
// + 8k): its amax across the half-warp, then the lane's codes and, from the first
// lane, the tile's scale. A lane with active false (or c past the row's end) takes
// part with zeros and writes nothing; all 32 lanes of the warp must call it. The
// quantizer below and the kernels that write an FP8 Linear's input (RMSNorm,
// SwiGLU: kernels.cuh) share it, so their codes are the same.
__device__ inline void fp8_quantize_tile8(const Fp8Matrix& q, int r, int c, const float (&v)[8], bool active) {
    float amax = 0;
    for (int i = 0; i < 8; i++) amax = fmaxf(amax, fabsf(v[i]));
    for (int o = 8; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (!active) return;
    const float scale = amax / FP8_E4M3_MAX, inverse = fp8_inverse_scale(scale);
    uint8_t* out = q.codes + (size_t)r * q.cols + c;
    if (c + 8 <= q.cols && q.cols % 8 == 0) {
        uint32_t lo = 0, hi = 0;
        for (int i = 0; i < 4; i++) lo |= (uint32_t)fp8_quantize(v[i], inverse) << 8 * i, hi |= (uint32_t)fp8_quantize(v[i + 4], inverse) << 8 * i;
        *(uint2*)out = make_uint2(lo, hi);
    } else {
        for (int i = 0; i < 8 && c + i < q.cols; i++) out[i] = fp8_quantize(v[i], inverse);
    }
    if (threadIdx.x % 16 == 0) q.scales[fp8_scale_index(r, c / FP8_TILE, q.rows, q.cols, 1)] = scale;
}

// 1 x 128 tiles: half a warp per tile, 8 values (16 bytes) per lane, so a warp
// takes two tiles; x [q.rows, q.cols] with row pitch ld
template <typename T>
static __global__ void fp8_quantize_rows_kernel(Fp8Matrix q, const T* x, int ld) {
    const int tiles_per_row = (q.cols + FP8_TILE - 1) / FP8_TILE, lane = threadIdx.x % 16;
    const size_t tile = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 16;
    const bool inside = tile < (size_t)q.rows * tiles_per_row;  // whole half-warps leave together: no early return before the shuffles
    const int r = inside ? (int)(tile / tiles_per_row) : 0, t = (int)(tile % tiles_per_row), c0 = t * FP8_TILE + lane * 8;
    const T* src = x + (size_t)r * ld + c0;
    float v[8];
    if (inside && sizeof(T) == 2 && c0 + 8 <= q.cols && ld % 8 == 0 && ((uintptr_t)x & 15) == 0) {
        bf16 h[8];
        *(int4*)h = *(const int4*)src;
        for (int i = 0; i < 8; i++) v[i] = (float)h[i];
    } else {
        for (int i = 0; i < 8; i++) v[i] = inside && c0 + i < q.cols ? (float)src[i] : 0.0f;
    }
    fp8_quantize_tile8(q, r, c0, v, inside);
}

// x [rows, cols] (row pitch ld; rows = q.rows) -> q in 1 x 128 tiles
template <typename T>
void fp8_quantize_gpu(const Fp8Matrix& q, const T* x, int ld, cudaStream_t stream) {
    if (q.rows == 0 || q.cols == 0) return;
    const size_t tiles = (size_t)q.rows * ((q.cols + FP8_TILE - 1) / FP8_TILE);
    fp8_quantize_rows_kernel<T><<<(unsigned)((tiles + 15) / 16), 256, 0, stream>>>(q, x, ld);
    CUDA_LAUNCH_CHECK();
}

// FP8 Wgrad's operands (--fp8-wgrad): x [rows, cols] quantized both ways in a single
// read, in 1 x 128 tiles along its rows (q, when it has codes: Dgrad's dout) and as
// x^T in tiles of 128 rows of x (qt). A block of 256 threads stages a 128 x 128 tile
// in shared memory with 16-byte loads; each warp then quantizes 16 of its rows and 16
// of its columns. The row pitch of 130 bf16 (65 words) keeps the column reads, lane i
// on row i + 32k, free of bank conflicts.
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
            uint8_t* out = q.codes + (size_t)(r0 + k) * cols + c0 + lane * 4;
            const float inverse = fp8_inverse_scale(scale);
            for (int i = 0; i < 4; i++)
                if (c0 + lane * 4 + i < cols) out[i] = fp8_quantize(v[i], inverse);
            if (lane == 0) q.scales[fp8_scale_index(r0 + k, blockIdx.x, rows, cols, 1)] = scale;
        }
        if (c0 + k < cols) {  // column k: a tile of 128 rows of x, a row of x^T; lane i takes rows i + 32j
            float v[4], amax = 0;
            for (int i = 0; i < 4; i++) amax = fmaxf(amax, fabsf(v[i] = (float)tile[lane + 32 * i][k]));
            const float scale = warp_max(amax) / FP8_E4M3_MAX;
            uint8_t* out = qt.codes + (size_t)(c0 + k) * rows + r0;
            const float inverse = fp8_inverse_scale(scale);
            for (int i = 0; i < 4; i++)
                if (r0 + lane + 32 * i < rows) out[lane + 32 * i] = fp8_quantize(v[i], inverse);
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

// The weights' copies, all in one launch after each optimizer step (the weights do not
// change between a step's forwards, so quantizing once per step is what each forward
// would get): one job per weight W [out, in], one 256-thread block per 128 x 128
// block. A block reads its bf16 values once into registers, 16 bytes a load where the
// block is whole, writes W's codes row-wise, and W^T's through a shared-memory tile.
struct Fp8WeightJob {
    Fp8Weight q;
    const bf16* w;
    int first_block;  // the blocks before this job's, over all jobs
};

static __global__ void fp8_quantize_weights_kernel(const Fp8WeightJob* jobs, int count) {
    __shared__ uint8_t tile[FP8_TILE][FP8_TILE + 4];
    int j = 0;
    while (j + 1 < count && jobs[j + 1].first_block <= (int)blockIdx.x) j++;
    const Fp8WeightJob job = jobs[j];
    const Fp8Matrix q = job.q.w, qt = job.q.wt;
    const int blocks_across = (q.cols + FP8_TILE - 1) / FP8_TILE, b = blockIdx.x - job.first_block;
    const int br = b / blocks_across, bc = b % blocks_across, r0 = br * FP8_TILE, c0 = bc * FP8_TILE;
    const int height = min(FP8_TILE, q.rows - r0), width = min(FP8_TILE, q.cols - c0);
    // thread t holds 8 consecutive values of rows t / 16 + 16 i, i = 0..7
    const int row = threadIdx.x / 16, col = threadIdx.x % 16 * 8;
    const bool whole = height == FP8_TILE && width == FP8_TILE && q.cols % 8 == 0 && ((uintptr_t)job.w & 15) == 0;
    float v[8][8], amax = 0;
    for (int i = 0; i < 8; i++) {
        const int r = row + 16 * i;
        const bf16* src = job.w + (size_t)(r0 + r) * q.cols + c0 + col;
        if (whole) {
            bf16 h[8];
            *(int4*)h = *(const int4*)src;
            for (int k = 0; k < 8; k++) v[i][k] = (float)h[k];
        } else {
            for (int k = 0; k < 8; k++) v[i][k] = r < height && col + k < width ? (float)src[k] : 0.0f;
        }
        for (int k = 0; k < 8; k++) amax = fmaxf(amax, fabsf(v[i][k]));
    }
    const float scale = block_max(amax) / FP8_E4M3_MAX, inverse = fp8_inverse_scale(scale);
    for (int i = 0; i < 8; i++) {
        const int r = row + 16 * i;
        uint8_t c[8];
        for (int k = 0; k < 8; k++) tile[r][col + k] = c[k] = fp8_quantize(v[i][k], inverse);
        uint8_t* dst = q.codes + (size_t)(r0 + r) * q.cols + c0 + col;
        if (whole) *(uint2*)dst = *(uint2*)c;
        else
            for (int k = 0; k < 8; k++)
                if (r < height && col + k < width) dst[k] = c[k];
    }
    if (threadIdx.x == 0) {
        q.scales[fp8_scale_index(br, bc, q.rows, q.cols, FP8_TILE)] = scale;
        qt.scales[fp8_scale_index(bc, br, q.cols, q.rows, FP8_TILE)] = scale;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < height * width; i += blockDim.x) {  // W^T's rows are W's columns
        const int c = i / height, r = i % height;
        qt.codes[(size_t)(c0 + c) * q.rows + r0 + r] = tile[r][c];
    }
}

// the job list of a set of weights, on the device (the caller frees it), and its block count
inline Fp8WeightJob* fp8_weight_jobs_upload(std::vector<Fp8WeightJob> jobs, int* blocks) {
    *blocks = 0;
    for (Fp8WeightJob& job : jobs) {
        job.first_block = *blocks;
        *blocks += ((job.q.w.rows + FP8_TILE - 1) / FP8_TILE) * ((job.q.w.cols + FP8_TILE - 1) / FP8_TILE);
    }
    Fp8WeightJob* d = device_alloc<Fp8WeightJob>(std::max<size_t>(jobs.size(), 1), "FP8 weight jobs");
    CUDA_CHECK(cudaMemcpy(d, jobs.data(), jobs.size() * sizeof(Fp8WeightJob), cudaMemcpyHostToDevice));
    return d;
}

inline void fp8_quantize_weights_gpu(const Fp8WeightJob* jobs, int count, int blocks, cudaStream_t stream) {
    if (blocks == 0) return;
    fp8_quantize_weights_kernel<<<blocks, 256, 0, stream>>>(jobs, count);
    CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------
// The FP8 GEMM on cuBLASLt's block-scaled path (CUDA 12.9+, sm_90), the twin of
// fp8_matmul_host: out [x.rows, w.rows] (+)= dequant(x) @ dequant(w)^T, fp32
// accumulation, bf16 or fp32 out. x is in 1 x 128 tiles; w in 128 x 128 blocks
// (a weight: Fprop, Dgrad) or 1 x 128 tiles (FP8 Wgrad's token-tiled operand). In
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
    matmul_zero_output(mm, out, N, OC, OC, out_fp32 ? 4 : 2, beta, stream);
    CUBLAS_CHECK(cublasLtMatmul(mm.handle, p.desc, &alpha, w.codes, p.lb, x.codes, p.la, &beta, out, p.lc, out, p.lc, &p.algo, mm.workspace,
                                mm.workspace_bytes, stream));
}
#endif
