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
