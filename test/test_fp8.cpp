// test_fp8.cpp — fp8.cuh's E4M3 and E5M2 encoder and decoder on the host against
// CUDA's own conversions (cuda_fp8.h's host code, the same rounding as the device's
// cvt.rn.satfinite): every one of the 256 codes both ways, the ties between
// neighbouring codes, the special values, and millions of random floats over the
// whole float range, subnormals included.
#include <doctest/doctest.h>

#include <cuda_fp8.h>

#include <cfloat>
#include <cstring>

#include "common.h"
#include "fp8.cuh"

namespace {

__nv_fp8_interpretation_t cuda_format(Fp8Format f) { return f == FP8_E4M3 ? __NV_E4M3 : __NV_E5M2; }

uint8_t cuda_encode(float x, Fp8Format f) { return (uint8_t)__nv_cvt_float_to_fp8(x, __NV_SATFINITE, cuda_format(f)); }

float cuda_decode(uint8_t c, Fp8Format f) {
    const __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)c, cuda_format(f));
    return __half2float(__half(h));
}

float from_bits(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

// same code, or both NaN
bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || memcmp(&a, &b, 4) == 0; }

}  // namespace

TEST_CASE("fp8: every code decodes as CUDA's does and encodes back to itself") {
    for (Fp8Format f : {FP8_E4M3, FP8_E5M2}) {
        CAPTURE((int)f);
        int nans = 0, infs = 0;
        for (int c = 0; c < 256; c++) {
            CAPTURE(c);
            const float x = fp8_decode((uint8_t)c, f);
            CHECK(same(x, cuda_decode((uint8_t)c, f)));
            nans += std::isnan(x);
            infs += std::isinf(x);
            // every finite code is its own encoding (-0 stays -0); infinities
            // saturate, NaN stays NaN
            if (std::isfinite(x)) CHECK(fp8_encode(x, f) == c);
        }
        CHECK(nans == (f == FP8_E4M3 ? 2 : 6));
        CHECK(infs == (f == FP8_E4M3 ? 0 : 2));
        CHECK(fp8_decode(fp8_spec(f).max_code, f) == (f == FP8_E4M3 ? 448.0f : 57344.0f));
    }
}

TEST_CASE("fp8: ties round to the even code, and the range's edges and specials match CUDA") {
    for (Fp8Format f : {FP8_E4M3, FP8_E5M2}) {
        CAPTURE((int)f);
        const float max = fp8_decode(fp8_spec(f).max_code, f);
        int ties = 0;
        // the midpoint of each pair of neighbouring positive codes, and the floats just around it
        for (int c = 0; c < fp8_spec(f).max_code; c++) {
            const float lo = fp8_decode((uint8_t)c, f), hi = fp8_decode((uint8_t)(c + 1), f), mid = 0.5f * (lo + hi);
            CAPTURE(c);
            CHECK(fp8_encode(mid, f) == ((c & 1) ? c + 1 : c));
            CHECK(fp8_encode(-mid, f) == (0x80 | ((c & 1) ? c + 1 : c)));
            for (float x : {nextafterf(mid, 0.0f), mid, nextafterf(mid, INFINITY)}) CHECK(fp8_encode(x, f) == cuda_encode(x, f));
            ties++;
        }
        CHECK(ties == fp8_spec(f).max_code);
        for (float x : {0.0f, -0.0f, INFINITY, -INFINITY, NAN, -NAN, max, -max, nextafterf(max, INFINITY), 2 * max, 1e30f, -1e30f,
                        FLT_MAX, FLT_MIN, -FLT_MIN, from_bits(1), from_bits(0x80000001), 1e-12f}) {
            CAPTURE(x);
            CHECK(fp8_encode(x, f) == cuda_encode(x, f));
        }
        CHECK(fp8_encode(INFINITY, f) == fp8_spec(f).max_code);  // saturates
        CHECK(fp8_encode(-2 * max, f) == (0x80 | fp8_spec(f).max_code));
    }
}

TEST_CASE("fp8: millions of random floats encode as CUDA's conversion does") {
    for (Fp8Format f : {FP8_E4M3, FP8_E5M2}) {
        CAPTURE((int)f);
        size_t mismatches = 0;
        for (uint64_t i = 0; i < 4000000; i++) {
            // half the draws: any bit pattern (every exponent, NaNs, subnormals); half:
            // magnitudes within and around FP8's range, where the rounding matters
            const uint64_t r = rng_hash(77 + f, i);
            const float x = i % 2 ? from_bits((uint32_t)r) : (r & 1 ? -1 : 1) * ldexpf(1.0f + (float)((r >> 8) & 0xFFFFFF) / 16777216.0f,
                                                                                             (int)((r >> 40) % 48) - 26);
            if (fp8_encode(x, f) != cuda_encode(x, f) && mismatches++ < 5) {
                CAPTURE(x);
                CHECK(fp8_encode(x, f) == cuda_encode(x, f));
            }
        }
        CHECK(mismatches == 0);
    }
}
