// test_fp8.cpp — fp8.cuh's E4M3 and E5M2 encoder and decoder on the host against
// CUDA's own conversions (cuda_fp8.h's host code, the same rounding as the device's
// cvt.rn.satfinite): every one of the 256 codes both ways, the ties between
// neighbouring codes, the special values, and millions of random floats over the
// whole float range, subnormals included. Then the quantizers' tiles and scales, the
// emulated FP8 GEMM against the dequantized product, and FP8 training on the CPU
// against the fp32 model.
#include <doctest/doctest.h>

#include <cuda_fp8.h>

#include <algorithm>
#include <cfloat>
#include <cstring>
#include <vector>

#include <unistd.h>

#include "common.h"
#include "fp8.cuh"
#include "kernels.cuh"
#include "model.h"
#include "test_configs.h"

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

TEST_CASE("fp8: 1x128 and 128x128 quantization: scale amax/448 per tile, the tile's largest at 448, error within E4M3's step") {
    struct Shape {
        int rows, cols, tile_rows;
    };
    for (Shape sh : {Shape{5, 300, 1}, Shape{1, 128, 1}, Shape{200, 130, 128}, Shape{128, 256, 128}}) {
        CAPTURE(sh.rows);
        CAPTURE(sh.cols);
        CAPTURE(sh.tile_rows);
        const int tiles_r = (sh.rows + sh.tile_rows - 1) / sh.tile_rows, tiles_c = (sh.cols + 127) / 128;
        std::vector<float> x((size_t)sh.rows * sh.cols);
        for (size_t i = 0; i < x.size(); i++) {
            // values over several decades, and a large outlier now and then
            const float u = rng_uniform(5, i) * 2 - 1, e = (float)(rng_hash(6, i) % 8);
            x[i] = u * ldexpf(1.0f, (int)e - 4) * (rng_hash(7, i) % 97 == 0 ? 1000.0f : 1.0f);
        }
        for (int r = 0; r < std::min(sh.rows, sh.tile_rows); r++)  // the first tile all zero
            for (int c = 0; c < std::min(sh.cols, 128); c++) x[(size_t)r * sh.cols + c] = 0;
        std::vector<uint8_t> codes(x.size());
        std::vector<float> scales(fp8_scale_count(sh.rows, sh.cols, sh.tile_rows), -1.0f), amax(scales.size(), -1.0f);
        fp8_quantize_host(Fp8Matrix{codes.data(), scales.data(), sh.rows, sh.cols, sh.tile_rows}, x.data());
        auto tile = [&](int r, int c) { return fp8_scale_index(r / sh.tile_rows, c / 128, sh.rows, sh.cols, sh.tile_rows); };
        for (int r = 0; r < sh.rows; r++)
            for (int c = 0; c < sh.cols; c++) {
                float& a = amax[tile(r, c)];
                a = fmaxf(a, fabsf(x[(size_t)r * sh.cols + c]));
            }
        size_t at_max = 0, bad = 0;
        for (int r = 0; r < sh.rows; r++)
            for (int c = 0; c < sh.cols; c++) {
                const size_t i = (size_t)r * sh.cols + c, t = tile(r, c);
                const float s = scales[t], back = fp8_decode(codes[i], FP8_E4M3) * s;
                // E4M3 keeps 3 mantissa bits: relative error <= 2^-4 for normal codes; below
                // the smallest normal (2^-6 after scaling) the step is 2^-9 * s
                const float bound = fmaxf(fabsf(x[i]) * 0.0625f, ldexpf(s, -10));
                bad += !(fabsf(back - x[i]) <= bound);
                at_max += s > 0 && fabsf(x[i]) == amax[t] && fabsf(fp8_decode(codes[i], FP8_E4M3)) == 448.0f;
            }
        CHECK(bad == 0);
        size_t tiles = 0;  // the padding (amax -1) is left alone
        for (size_t t = 0; t < scales.size(); t++) {
            CHECK(scales[t] == (amax[t] < 0 ? -1.0f : amax[t] / 448.0f));
            tiles += amax[t] >= 0;
        }
        CHECK(tiles == (size_t)tiles_r * tiles_c);
        CHECK(scales[0] == 0);            // the all-zero tile
        CHECK(at_max >= tiles - 1);       // every other tile's largest value is at +-448
    }
}

TEST_CASE("fp8: a tile too small for its scale to have a finite inverse gets zero codes, not NaN") {
    // one row of two tiles: the first's values near 2^-130, zeros among them (amax / 448 below 2^-128, so
    // 1 / s overflows), the second's ordinary
    std::vector<float> x(256);
    for (int c = 0; c < 256; c++) {
        const float u = rng_uniform(8, c) * 2 - 1;
        x[c] = c < 128 ? (c % 5 ? ldexpf(u, -128) : 0.0f) : u;
    }
    std::vector<uint8_t> codes(x.size(), 0x7f);
    std::vector<float> scales(fp8_scale_count(1, 256, 1));
    fp8_quantize_host(Fp8Matrix{codes.data(), scales.data(), 1, 256, 1}, x.data());
    float amax = 0;
    for (int c = 0; c < 128; c++) amax = fmaxf(amax, fabsf(x[c]));
    const size_t first = fp8_scale_index(0, 0, 1, 256, 1), second = fp8_scale_index(0, 1, 1, 256, 1);
    CHECK(amax > 0);
    CHECK(scales[first] == amax / 448.0f);
    CHECK(std::isinf(1.0f / scales[first]));
    CHECK(fp8_inverse_scale(scales[first]) == 0.0f);
    size_t nonzero = 0, off = 0;
    for (int c = 0; c < 128; c++) nonzero += codes[c] != 0;
    for (int c = 128; c < 256; c++) {
        const float back = fp8_decode(codes[c], FP8_E4M3) * scales[second];
        off += !(fabsf(back - x[c]) <= fmaxf(fabsf(x[c]) * 0.0625f, ldexpf(scales[second], -10)));
    }
    CHECK(nonzero == 0);
    CHECK(off == 0);
    CHECK(fp8_quantize(0.0f, fp8_inverse_scale(scales[first])) == 0);
}

TEST_CASE("fp8_matmul refuses shapes it was not checked for, before touching the GPU") {
    Matmul mm;  // never initialised: the shape check comes first
    for (int bad : {0, 1}) {
        const int N = bad ? 6 : 8, K = bad ? 128 : 100;  // N not a multiple of 4; K not of 16
        const Fp8Matrix x{nullptr, nullptr, N, K, 1}, w{nullptr, nullptr, 128, K, 128};
        CHECK_THROWS_WITH_AS(fp8_matmul(mm, nullptr, false, x, w, false, 0), doctest::Contains("must be a multiple of 16"), std::runtime_error);
    }
}

// model_to_gpu sizes the FP8 Linears' scratch once; a row count it did not foresee would stop a run midway
TEST_CASE("fp8_model_scratch_bytes covers every row count a model runs, and pads only where counts need it") {
    std::vector<Fp8Weight> linears(3);
    const int shapes[3][2] = {{6144, 768}, {768, 3072}, {384, 768}};  // out x in: small's dense gate_up, down, q_a
    for (int i = 0; i < 3; i++) linears[i].w = {nullptr, nullptr, shapes[i][0], shapes[i][1], 128};
    auto need = [&](int rows, bool copies) {
        size_t most = 0;
        for (const Fp8Weight& q : linears) most = std::max(most, fp8_linear_scratch_bytes(rows, q.w.cols, q.w.rows, false, copies));
        return most;
    };
    for (const std::pair<int, int>& shape : {std::pair{2, 30}, std::pair{3, 7}, std::pair{1, 5}, std::pair{1, 64}, std::pair{4, 64}, std::pair{1, 1}})
        for (bool inference : {false, true}) {
            const int B = shape.first, T = shape.second;
            CAPTURE(B);
            CAPTURE(T);
            CAPTURE(inference);
            // training and evaluation: steps and full windows of r x T rows, a last window or a sample shorter than T;
            // decoding: any count up to B x T
            std::vector<int> counts;
            for (int n = 1; n <= B * T; n++)
                if (inference || n % T == 0 || n < T) counts.push_back(n);
            const size_t sized = fp8_model_scratch_bytes(linears, B, T, inference, false);
            int unforeseen = 0;
            for (int n : counts) unforeseen += need(n, !inference) > sized;
            CHECK(unforeseen == 0);
        }
    // a step of 4 x 64 rows needs no padded output, and the sizing does not reserve the batch-wide one
    // training quantizes the operands no kernel copied into the copies' room, so its scratch holds no codes at all,
    // only the padded output of an evaluation's last window (63 rows); an inference model's holds its widest operand's
    const size_t training = fp8_model_scratch_bytes(linears, 4, 64, false, false);
    CHECK(training < need(4 * 64 - 1, true));
    CHECK(training == need(64 - 1, true));
    CHECK(training == (size_t)64 * 6144 * sizeof(bf16) + 256);
    CHECK(fp8_model_scratch_bytes(linears, 4, 64, true, false) >= (size_t)4 * 64 * 6144);
}

// x [rows, cols]: tiles of very different magnitudes, so that a scale applied to the
// wrong tile shows
static std::vector<float> tiled_values(int rows, int cols, uint64_t seed) {
    std::vector<float> x((size_t)rows * cols);
    for (size_t i = 0; i < x.size(); i++) {
        const size_t r = i / cols, c = i % cols;
        x[i] = (rng_uniform(seed, i) * 2 - 1) * ldexpf(1.0f, (int)(mix64(seed + (r / 128) * 1000 + c / 128) % 9) - 4);
    }
    return x;
}

TEST_CASE("fp8_matmul_host: the emulated GEMM is the dequantized product to fp32 rounding, and near the unquantized one") {
    struct Shape {
        int N, K, OC, w_tile_rows;
    };
    for (Shape sh : {Shape{7, 300, 130, 128}, Shape{64, 96, 200, 128}, Shape{33, 260, 20, 1}}) {
        CAPTURE(sh.K);
        const std::vector<float> x = tiled_values(sh.N, sh.K, 1), w = tiled_values(sh.OC, sh.K, 2);
        Fp8HostMatrix xq(sh.N, sh.K, 1), wq(sh.OC, sh.K, sh.w_tile_rows);
        fp8_quantize_host(xq.m, x.data());
        fp8_quantize_host(wq.m, w.data());
        std::vector<float> out((size_t)sh.N * sh.OC, 0.5f);
        for (bool accumulate : {false, true}) {
            const std::vector<float> before = out;
            fp8_matmul_host(out.data(), xq.m, wq.m, accumulate);
            std::vector<double> dequantized(out.size()), exact(out.size()), got(out.size());
            for (int n = 0; n < sh.N; n++)
                for (int o = 0; o < sh.OC; o++) {
                    double dq = accumulate ? before[(size_t)n * sh.OC + o] : 0, ex = dq;
                    for (int k = 0; k < sh.K; k++) {
                        dq += (double)fp8_decode(xq.codes[(size_t)n * sh.K + k], FP8_E4M3) * fp8_scale_of(xq.m, n, k) *
                              fp8_decode(wq.codes[(size_t)o * sh.K + k], FP8_E4M3) * fp8_scale_of(wq.m, o, k);
                        ex += (double)x[(size_t)n * sh.K + k] * w[(size_t)o * sh.K + k];
                    }
                    dequantized[(size_t)n * sh.OC + o] = dq;
                    exact[(size_t)n * sh.OC + o] = ex;
                    got[(size_t)n * sh.OC + o] = out[(size_t)n * sh.OC + o];
                }
            const double e_dq = rel_error(got.data(), dequantized.data(), got.size()), e_ex = rel_error(got.data(), exact.data(), got.size());
            MESSAGE("N ", sh.N, " K ", sh.K, " OC ", sh.OC, ": against the dequantized product ", e_dq, ", the unquantized ", e_ex);
            CHECK(e_dq < 1e-6);
            CHECK(e_ex < 0.05);  // E4M3's 3 mantissa bits: about 2^-5 rms per operand, averaged over K
        }
    }
}

// 4096 uniformly random tokens in a token file of its own, for the training-step tests
static std::string random_token_file(const char* name, uint64_t seed, int vocab) {
    std::vector<int> tokens(4096);
    for (size_t i = 0; i < tokens.size(); i++) tokens[i] = (int)(rng_hash(seed, i) % vocab);
    const std::string path = strfmt("/tmp/dsv3_test_%s_%d.bin", name, (int)getpid());
    write_token_file(path, tokens, 1);
    return path;
}

// FP8 training keeps the SwiGLU input in E4M3 for the backward (DeepSeek-V3 §3.3.3): the emulation's FFN backward
// must be the fp32 backward of gate_up's round trip, with hidden rebuilt from it, and its forward unchanged
TEST_CASE("FP8 training's FFN keeps gate_up as its E4M3 copy holds it: the backward reads that, the forward does not") {
    const int n = 6, D = 16, I = 136;  // a row of gate_up: two whole 1 x 128 tiles and a partial one
    std::vector<double> weights((size_t)3 * I * D), x((size_t)n * D), dout((size_t)n * D);
    for (size_t i = 0; i < weights.size(); i++) weights[i] = (rng_uniform(71, i) * 2 - 1) * 0.3;
    for (size_t i = 0; i < x.size(); i++) x[i] = (rng_uniform(72, i) * 2 - 1) * (i % 7 + 1);
    for (size_t i = 0; i < dout.size(); i++) dout[i] = rng_uniform(73, i) * 2 - 1;
    const FfnWeights<double> w{{weights.data(), I, D}, {weights.data() + (size_t)I * D, I, D}, {weights.data() + (size_t)2 * I * D, D, I}};
    struct Run {
        std::vector<double> out, dx, grads;
        FfnActs<double> acts;
    };
    auto backward = [&](Run& r) {
        r.dx.assign((size_t)n * D, 0);
        r.grads.assign(weights.size(), 0);
        const FfnWeights<double> g{{r.grads.data(), I, D}, {r.grads.data() + (size_t)I * D, I, D}, {r.grads.data() + (size_t)2 * I * D, D, I}};
        ffn_backward(w, g, r.dx.data(), dout.data(), x.data(), n, r.acts, false);
    };
    Run plain, fp8, by_hand;
    for (Run* r : {&plain, &fp8}) {
        r->acts.fp8 = r == &fp8;
        r->out.resize((size_t)n * D);
        ffn_forward(w, r->out.data(), x.data(), n, r->acts);
        backward(*r);
    }
    CHECK(fp8.out == plain.out);
    // the round trip: each value within E4M3's step of its tile's scale
    const std::vector<double>& exact = plain.acts.gate_up;
    int outside = 0, moved = 0;
    for (int r = 0; r < n; r++)
        for (int c0 = 0; c0 < 2 * I; c0 += FP8_TILE) {
            double amax = 0;
            for (int c = c0; c < std::min(c0 + FP8_TILE, 2 * I); c++) amax = std::max(amax, fabs(exact[(size_t)r * 2 * I + c]));
            for (int c = c0; c < std::min(c0 + FP8_TILE, 2 * I); c++) {
                const double v = exact[(size_t)r * 2 * I + c], kept = fp8.acts.gate_up[(size_t)r * 2 * I + c];
                outside += fabs(kept - v) > std::max(fabs(v) / 16, amax / 448 / 512) * 1.0001;
                moved += kept != v;
            }
        }
    CHECK(outside == 0);
    CHECK(moved > n * I);
    // by hand: the plain backward on the round trip and the hidden it gives
    by_hand.acts = plain.acts;
    fp8_round_trip_host(by_hand.acts.gate_up.data(), n, 2 * I);
    for (size_t r = 0; r < (size_t)n; r++)
        for (int i = 0; i < I; i++) {
            const double g = by_hand.acts.gate_up[r * 2 * I + i], u = by_hand.acts.gate_up[r * 2 * I + I + i];
            by_hand.acts.hidden[r * I + i] = g * sigmoid(g) * u;
        }
    backward(by_hand);
    CHECK(fp8.acts.gate_up == by_hand.acts.gate_up);
    CHECK(fp8.dx == by_hand.dx);
    CHECK(fp8.grads == by_hand.grads);
    const double e_dx = rel_error(fp8.dx.data(), plain.dx.data(), plain.dx.size());
    const double e_grads = rel_error(fp8.grads.data(), plain.grads.data(), plain.grads.size());
    MESSAGE("FFN backward from gate_up's E4M3 copy vs exact: dx ", e_dx, ", weight gradients ", e_grads);
    CHECK(e_dx > 1e-4);  // it did read the copy
    CHECK(e_dx < 0.05);
    CHECK(e_grads < 0.05);
}

TEST_CASE("FP8 training on the CPU: the emulated step's loss and gradients follow the fp32 model's within FP8's error") {
    const Config c = fp8_test_config(96);
    TrainOptions o;
    o.batch_size = 2;
    o.seq_len = 32;
    const std::string path = random_token_file("fp8", 41, c.vocab_size);
    // HF's initialisation, as training starts: on the tests' O(1) random weights the
    // model is so ill-conditioned that E4M3's 3.5% per GEMM moves gradients by 27%
    Model plain, fp8, whole;  // whole: --fp8-wgrad
    model_create(plain, c, 5);
    model_create(fp8, c, 5);
    model_create(whole, c, 5);
    fp8.ref.params = whole.ref.params = plain.ref.params;
    ref_enable_fp8(fp8.ref);
    ref_enable_fp8(whole.ref, true);
    CHECK(fp8.ref.w.layers[0].attn.kv_a.fp8 != nullptr);
    CHECK(fp8.ref.w.layers[1].moe.router.fp8 == nullptr);  // the router, head and routed experts stay in fp32
    CHECK(fp8.ref.w.lm_head.fp8 == nullptr);
    DataLoader a, b;
    dataloader_open(a, path, o.batch_size, o.seq_len, c.vocab_size);
    dataloader_open(b, path, o.batch_size, o.seq_len, c.vocab_size);
    const StepStats sp = model_train_step(plain, a, o, 0), sf = model_train_step(fp8, b, o, 0);
    const double e_loss = std::fabs(sf.loss - sp.loss) / sp.loss;
    const double e_grad = rel_error(fp8.ref.grads.data(), plain.ref.grads.data(), plain.ref.grads.size());
    MESSAGE("FP8 vs fp32 on the CPU: loss ", sf.loss, " vs ", sp.loss, " (", e_loss, "), gradients ", e_grad);
    CHECK(e_loss > 0);  // the GEMMs did run in FP8
    CHECK(e_loss < 5e-3);
    CHECK(e_grad < 0.1);  // 3.5% per FP8 GEMM (the emulated GEMM test), compounded over the layers
    // --fp8-wgrad: the same forward, and weight gradients from FP8 GEMMs too
    DataLoader d;
    dataloader_open(d, path, o.batch_size, o.seq_len, c.vocab_size);
    const StepStats sw = model_train_step(whole, d, o, 0);
    const double e_whole = rel_error(whole.ref.grads.data(), plain.ref.grads.data(), plain.ref.grads.size());
    const double e_vs_fp8 = rel_error(whole.ref.grads.data(), fp8.ref.grads.data(), plain.ref.grads.size());
    MESSAGE("FP8 with FP8 Wgrad vs fp32: gradients ", e_whole, "; vs FP8 with bf16 Wgrad ", e_vs_fp8);
    CHECK(sw.loss == sf.loss);  // the forward does not depend on how Wgrad runs
    CHECK(e_vs_fp8 > 0);        // Wgrad did run in FP8
    CHECK(e_whole < 0.1);
    remove(path.c_str());
}

TEST_CASE("FP8 training: a projection whose sides are not multiples of 16 stays in the model's type, the rest run in FP8") {
    Model m;
    model_create(m, config_preset("tiny"), 5);  // hidden 32, q_lora_rank 16, kv_lora_rank 12, 2 heads of v 6
    ref_enable_fp8(m.ref);
    const MlaWeights<float>& a = m.ref.w.layers[0].attn;
    CHECK(a.q_a.fp8 != nullptr);   // 32 -> 16
    CHECK(a.kv_a.fp8 != nullptr);  // 32 -> 12 + 4
    CHECK(a.q_b.fp8 == nullptr);   // 16 -> 2 x 12
    CHECK(a.kv_b.fp8 == nullptr);  // 12 -> ...
    CHECK(a.o_proj.fp8 == nullptr);  // 2 x 6 -> 32
    CHECK(m.ref.w.layers[0].ffn.gate.fp8 != nullptr);  // 32 -> 2 x 48
    CHECK(m.ref.w.layers[0].ffn.down.fp8 != nullptr);  // 48 -> 32
    size_t visited = 0;
    for_each_fp8_linear(m.ref.w, [&](const Linear<float>& l, const Fp8Weight* q) {
        CHECK(q != nullptr);
        CHECK(l.in % 16 == 0);
        CHECK(l.out % 16 == 0);
        visited++;
    });
    CHECK(visited == m.ref.fp8.size());
}

TEST_CASE("FP8 training with the MTP module: its block's projections run in FP8, eh_proj stays, both losses follow fp32's") {
    Config c = fp8_test_config(96);
    c.num_nextn_predict_layers = 1;
    TrainOptions o;
    o.batch_size = 2;
    o.seq_len = 32;
    const std::string path = random_token_file("fp8_mtp", 43, c.vocab_size);
    Model plain, fp8;
    model_create(plain, c, 6);
    model_create(fp8, c, 6);
    fp8.ref.params = plain.ref.params;
    ref_enable_fp8(fp8.ref);
    CHECK(fp8.ref.w.mtp.block.attn.kv_a.fp8 != nullptr);
    CHECK(fp8.ref.w.mtp.block.moe.shared.down.fp8 != nullptr);
    CHECK(fp8.ref.w.mtp.eh_proj.fp8 == nullptr);  // bf16 in DeepSeek-V3's release
    DataLoader a, b;
    dataloader_open(a, path, o.batch_size, o.seq_len, c.vocab_size);
    dataloader_open(b, path, o.batch_size, o.seq_len, c.vocab_size);
    const StepStats sp = model_train_step(plain, a, o, 0), sf = model_train_step(fp8, b, o, 0);
    const double e_mtp = std::fabs(sf.mtp_loss - sp.mtp_loss) / sp.mtp_loss;
    const double e_grad = rel_error(fp8.ref.grads.data(), plain.ref.grads.data(), plain.ref.grads.size());
    MESSAGE("FP8 vs fp32 with MTP: mtp loss ", sf.mtp_loss, " vs ", sp.mtp_loss, " (", e_mtp, "), gradients ", e_grad);
    CHECK(e_mtp > 0);
    CHECK(e_mtp < 5e-3);
    CHECK(std::fabs(sf.loss - sp.loss) / sp.loss < 5e-3);
    CHECK(e_grad < 0.1);
    remove(path.c_str());
}
