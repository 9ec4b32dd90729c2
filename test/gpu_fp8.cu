// gpu_fp8.cu — fp8.cuh on the device: its encoder gives the host's codes and the
// hardware's own conversion (cvt.rn.satfinite, through cuda_fp8.h) for every code's
// value, the ties between codes, the specials and millions of random floats; its
// decoder gives the host's values for all 256 codes. Every quantization kernel
// against its host twin (bit for bit), the cuBLASLt FP8 GEMM in each of its three
// pairings against the emulated GEMM, the FP8 Linear against reference.h's, and the
// FP8 copies RMSNorm and SwiGLU write beside their outputs against the quantizer.
#include <doctest/doctest.h>

#include <cuda_fp8.h>

#include <cfloat>
#include <cstring>
#include <memory>
#include <vector>

#include "common.h"
#include "cuda_common.cuh"
#include "fp8.cuh"
#include "kernels.cuh"
#include "test_configs.h"

namespace {

__global__ void fp8_convert_kernel(uint8_t* ours, uint8_t* hardware, float* decoded, float* dequantized, const float* x, size_t n, Fp8Format f) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        ours[i] = fp8_encode(x[i], f);
        hardware[i] = (uint8_t)__nv_cvt_float_to_fp8(x[i], __NV_SATFINITE, f == FP8_E4M3 ? __NV_E4M3 : __NV_E5M2);
        if (i < 256) decoded[i] = fp8_decode((uint8_t)i, f);
        if (i < 256) dequantized[i] = fp8_dequantize((uint8_t)i, 0.375f);  // E4M3 through the hardware's conversion
    }
}

template <typename T>
std::vector<T> download(const T* p, size_t n) {
    std::vector<T> h(n);
    CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

}  // namespace

TEST_CASE("fp8 on the device: the host's codes and the hardware conversion's, and the host's values") {
    for (Fp8Format f : {FP8_E4M3, FP8_E5M2}) {
        CAPTURE((int)f);
        std::vector<float> x;
        for (int c = 0; c < 256; c++) x.push_back(fp8_decode((uint8_t)c, f));
        for (int c = 0; c < fp8_spec(f).max_code; c++) {  // ties and their neighbours
            const float mid = 0.5f * (fp8_decode((uint8_t)c, f) + fp8_decode((uint8_t)(c + 1), f));
            for (float v : {nextafterf(mid, 0.0f), mid, nextafterf(mid, INFINITY)}) x.insert(x.end(), {v, -v});
        }
        for (float v : {INFINITY, -INFINITY, NAN, FLT_MAX, FLT_MIN, 1e-12f, 1e30f}) x.insert(x.end(), {v, -v});
        for (uint64_t i = 0; i < 4000000; i++) {
            const uint64_t r = rng_hash(99 + f, i);
            uint32_t bits = (uint32_t)r;
            float v;
            memcpy(&v, &bits, 4);
            x.push_back(i % 2 ? v : (r & 1 ? -1 : 1) * ldexpf(1.0f + (float)((r >> 8) & 0xFFFFFF) / 16777216.0f, (int)((r >> 40) % 48) - 26));
        }
        const size_t n = x.size();
        float *d_x = device_alloc<float>(n, "test buffer"), *d_decoded = device_alloc<float>(256, "test buffer");
        float* d_dequantized = device_alloc<float>(256, "test buffer");
        uint8_t *d_ours = device_alloc<uint8_t>(n, "test buffer"), *d_hw = device_alloc<uint8_t>(n, "test buffer");
        CUDA_CHECK(cudaMemcpy(d_x, x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
        fp8_convert_kernel<<<1024, 256>>>(d_ours, d_hw, d_decoded, d_dequantized, d_x, n, f);
        CUDA_LAUNCH_CHECK();
        const std::vector<uint8_t> ours = download(d_ours, n), hw = download(d_hw, n);
        const std::vector<float> decoded = download(d_decoded, 256), dequantized = download(d_dequantized, 256);
        size_t vs_host = 0, vs_hardware = 0, values = 0;
        for (size_t i = 0; i < n; i++) {
            vs_host += ours[i] != fp8_encode(x[i], f);
            vs_hardware += ours[i] != hw[i];
        }
        for (int c = 0; c < 256; c++) {
            const float h = fp8_decode((uint8_t)c, f);
            values += !((std::isnan(h) && std::isnan(decoded[c])) || memcmp(&h, &decoded[c], 4) == 0);
            const float q = fp8_dequantize((uint8_t)c, 0.375f);
            if (f == FP8_E4M3) values += !((std::isnan(q) && std::isnan(dequantized[c])) || memcmp(&q, &dequantized[c], 4) == 0);
        }
        printf("fp8 format %d on the device: %zu floats, %zu codes differ from the host's, %zu from the hardware's; %zu "
               "values differ (E4M3: decoded and dequantized)\n", (int)f, n, vs_host, vs_hardware, values);
        CHECK(vs_host == 0);
        CHECK(vs_hardware == 0);
        CHECK(values == 0);
        for (void* p : {(void*)d_x, (void*)d_decoded, (void*)d_dequantized, (void*)d_ours, (void*)d_hw}) CUDA_CHECK(cudaFree(p));
    }
}

namespace {

// an Fp8Matrix in device memory: codes poisoned, scales zeroed (the padding, as the host's)
struct DevFp8 {
    Fp8Matrix m;
    DevFp8(int rows, int cols, int tile_rows) {
        m = {device_alloc<uint8_t>((size_t)rows * cols, "test buffer"), device_alloc<float>(fp8_scale_count(rows, cols, tile_rows), "test buffer"),
             rows, cols, tile_rows};
        CUDA_CHECK(cudaMemset(m.codes, 0xAB, (size_t)rows * cols));
        CUDA_CHECK(cudaMemset(m.scales, 0, fp8_scale_count(rows, cols, tile_rows) * sizeof(float)));
    }
    explicit DevFp8(const Fp8HostMatrix& h) : DevFp8(h.m.rows, h.m.cols, h.m.tile_rows) {
        CUDA_CHECK(cudaMemcpy(m.codes, h.codes.data(), h.codes.size(), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(m.scales, h.scales.data(), h.scales.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
    ~DevFp8() {
        cudaFree(m.codes);
        cudaFree(m.scales);
    }
    // codes and scales equal the host's, bit for bit
    bool equals(const Fp8HostMatrix& h) const {
        const std::vector<float> scales = download(m.scales, h.scales.size());
        return download(m.codes, h.codes.size()) == h.codes && memcmp(scales.data(), h.scales.data(), scales.size() * 4) == 0;
    }
};

// two device copies' codes and scales equal, bit for bit
bool same_fp8(const Fp8Matrix& a, const Fp8Matrix& b) {
    const size_t scales = fp8_scale_count(a.rows, a.cols, a.tile_rows);
    const std::vector<float> sa = download(a.scales, scales), sb = download(b.scales, scales);
    return download(a.codes, (size_t)a.rows * a.cols) == download(b.codes, (size_t)b.rows * b.cols) &&
           memcmp(sa.data(), sb.data(), scales * 4) == 0;
}

template <typename T>
bool same_bytes(const T* a, const T* b, size_t n) {
    const std::vector<T> x = download(a, n), y = download(b, n);
    return memcmp(x.data(), y.data(), n * sizeof(T)) == 0;
}

// x [rows, cols] over several decades; bf16 values, so the device reads what the host does
std::vector<float> test_values(int rows, int cols, uint64_t seed) {
    std::vector<float> x((size_t)rows * cols);
    for (size_t i = 0; i < x.size(); i++) {
        const size_t r = i / cols, c = i % cols;
        float v = (rng_uniform(seed, i) * 2 - 1) * ldexpf(1.0f, (int)(mix64(seed + (r / 128) * 1000 + c / 128) % 9) - 4);
        if (r < 128 && c / 128 == 1) v = c % 7 ? ldexpf(v, -126) : 0.0f;  // a tile whose scale has no finite inverse, zeros in it
        x[i] = bf16_to_float(float_to_bf16(v));
    }
    return x;
}

// x on the device as bf16 with row pitch ld >= cols
bf16* upload_pitched(const std::vector<float>& x, int rows, int cols, int ld) {
    std::vector<float> padded((size_t)rows * ld, 1e6f);  // the gap would show in any tile's amax
    for (int r = 0; r < rows; r++) std::copy(x.begin() + (size_t)r * cols, x.begin() + (size_t)(r + 1) * cols, padded.begin() + (size_t)r * ld);
    bf16* d = device_alloc<bf16>(padded.size(), "test buffer");
    to_device(d, padded.data(), padded.size());
    return d;
}

// SwiGLU's tensors for N rows of width I: gate_up [N, 2I] and dhidden [N, I] (test_values from seed and seed + 1),
// on the host and the device, and two of each output on the device, to compare
struct SwigluBuffers {
    size_t n;
    std::vector<float> gate_up, dhidden;
    bf16 *gu, *dh, *h, *h2, *dgu, *dgu2;
    SwigluBuffers(int N, int I, uint64_t seed) : n((size_t)N * I), gate_up(test_values(N, 2 * I, seed)), dhidden(test_values(N, I, seed + 1)) {
        gu = device_alloc<bf16>(2 * n, "test buffer");
        dh = device_alloc<bf16>(n, "test buffer");
        h = device_alloc<bf16>(n, "test buffer");
        h2 = device_alloc<bf16>(n, "test buffer");
        dgu = device_alloc<bf16>(2 * n, "test buffer");
        dgu2 = device_alloc<bf16>(2 * n, "test buffer");
        to_device(gu, gate_up.data(), 2 * n);
        to_device(dh, dhidden.data(), n);
    }
    ~SwigluBuffers() {
        for (bf16* p : {gu, dh, h, h2, dgu, dgu2}) cudaFree(p);
    }
};

}  // namespace

TEST_CASE("fp8 quantization kernels: codes and scales bit-identical to the host's, for every tiling") {
    struct Shape {
        int rows, cols;
    };
    const std::vector<Shape> shapes = {{1000, 768}, {7, 300}, {200, 130}, {768, 1536}, {64, 160}, {130, 256}};
    // activations in 1 x 128 tiles, from a pitched bf16 and a dense fp32 array
    for (Shape sh : shapes) {
        CAPTURE(sh.rows);
        CAPTURE(sh.cols);
        const std::vector<float> x = test_values(sh.rows, sh.cols, 11);
        bf16* pitched = upload_pitched(x, sh.rows, sh.cols, sh.cols + 24);
        float* x32 = device_alloc<float>(x.size(), "test buffer");
        CUDA_CHECK(cudaMemcpy(x32, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice));
        Fp8HostMatrix want(sh.rows, sh.cols, 1);
        fp8_quantize_host(want.m, x.data());
        DevFp8 from16(sh.rows, sh.cols, 1), from32(sh.rows, sh.cols, 1);
        fp8_quantize_gpu(from16.m, pitched, sh.cols + 24, 0);
        fp8_quantize_gpu(from32.m, x32, sh.cols, 0);
        CHECK(from16.equals(want));
        CHECK(from32.equals(want));
        // --fp8-wgrad's pass over dout: x in 1 x 128 tiles and x^T in tiles of 128 rows of x, from one
        // read; and x^T alone (Wgrad's x)
        Fp8HostMatrix xt(sh.cols, sh.rows, 1);
        fp8_quantize_transposed_host(xt.m, x.data());
        DevFp8 drows(sh.rows, sh.cols, 1), dxt(sh.cols, sh.rows, 1), dxt_alone(sh.cols, sh.rows, 1);
        bf16* dense = upload_pitched(x, sh.rows, sh.cols, sh.cols);
        fp8_quantize_both_gpu(drows.m, dxt.m, pitched, sh.cols + 24, 0);
        fp8_quantize_both_gpu(Fp8Matrix{}, dxt_alone.m, dense, sh.cols, 0);
        CHECK(drows.equals(want));
        CHECK(dxt.equals(xt));
        CHECK(dxt_alone.equals(xt));
        for (void* p : {(void*)pitched, (void*)dense, (void*)x32}) CUDA_CHECK(cudaFree(p));
    }
    // every shape as a weight, all in one launch: W and W^T in 128 x 128 blocks, the
    // partial blocks at the edges included
    std::vector<Fp8HostMatrix> want_w, want_wt;
    std::vector<std::unique_ptr<DevFp8>> got_w, got_wt;
    std::vector<bf16*> weights;
    std::vector<Fp8WeightJob> jobs;
    want_w.reserve(shapes.size());  // each Fp8HostMatrix points into its own vectors
    want_wt.reserve(shapes.size());
    for (size_t i = 0; i < shapes.size(); i++) {
        const Shape sh = shapes[i];
        const std::vector<float> x = test_values(sh.rows, sh.cols, 12 + i);
        want_w.emplace_back(sh.rows, sh.cols, 128);
        want_wt.emplace_back(sh.cols, sh.rows, 128);
        fp8_quantize_host(want_w.back().m, x.data());
        fp8_quantize_transposed_host(want_wt.back().m, x.data());
        got_w.push_back(std::make_unique<DevFp8>(sh.rows, sh.cols, 128));
        got_wt.push_back(std::make_unique<DevFp8>(sh.cols, sh.rows, 128));
        weights.push_back(upload_pitched(x, sh.rows, sh.cols, sh.cols));
        jobs.push_back({Fp8Weight{got_w.back()->m, got_wt.back()->m}, weights.back(), 0});
    }
    int blocks = 0;
    Fp8WeightJob* d_jobs = fp8_weight_jobs_upload(jobs, &blocks);
    fp8_quantize_weights_gpu(d_jobs, (int)jobs.size(), blocks, 0);
    for (size_t i = 0; i < shapes.size(); i++) {
        CAPTURE(i);
        CHECK(got_w[i]->equals(want_w[i]));
        CHECK(got_wt[i]->equals(want_wt[i]));
        CUDA_CHECK(cudaFree(weights[i]));
    }
    CUDA_CHECK(cudaFree(d_jobs));
}

// The FP8 copies that the kernels making an FP8 Linear's input write beside their bf16 output (kernels.cuh:
// RMSNorm, SwiGLU forward, and SwiGLU backward's dgate_up for gate_up's Dgrad): their codes and scales equal
// fp8_quantize_gpu's of that output bit for bit, and the output is the one they write without a copy. Widths with
// whole and partial 1 x 128 tiles, and ones that take the separate pass (not a multiple of 8; SwiGLU's I not a
// multiple of 128); 37 rows, so that the scales' pitch is padded.
TEST_CASE("fp8 copies written by RMSNorm and SwiGLU equal fp8_quantize_gpu's of their outputs, bit for bit") {
    const int N = 37;
    for (int C : {160, 256, 768, 100}) {
        CAPTURE(C);
        const size_t n = (size_t)N * C;
        const std::vector<float> res = test_values(N, C, 41), branch = test_values(N, C, 42), weight = test_values(1, C, 43);
        float *d_res = device_alloc<float>(n, "test buffer"), *d_res_out = device_alloc<float>(n, "test buffer");
        float* d_rstd = device_alloc<float>(N, "test buffer");
        bf16 *d_branch = device_alloc<bf16>(n, "test buffer"), *d_w = device_alloc<bf16>(C, "test buffer");
        bf16 *d_out = device_alloc<bf16>(n, "test buffer"), *d_plain = device_alloc<bf16>(n, "test buffer");
        CUDA_CHECK(cudaMemcpy(d_res, res.data(), n * sizeof(float), cudaMemcpyHostToDevice));
        to_device(d_branch, branch.data(), n);
        to_device(d_w, weight.data(), C);
        DevFp8 fused(N, C, 1), separate(N, C, 1);
        rmsnorm_residual_forward_gpu<float>(d_res_out, d_out, d_rstd, d_res, d_branch, d_w, N, C, 1e-6f, 0, fused.m);
        rmsnorm_residual_forward_gpu<float>(d_res_out, d_plain, d_rstd, d_res, d_branch, d_w, N, C, 1e-6f, 0);
        fp8_quantize_gpu(separate.m, d_plain, C, 0);
        CHECK(same_bytes(d_out, d_plain, n));
        CHECK(same_fp8(fused.m, separate.m));
        // the latents' norm: a bf16 input, no residual
        DevFp8 fused16(N, C, 1), separate16(N, C, 1);
        rmsnorm_residual_forward_gpu(nullptr, d_out, d_rstd, d_branch, nullptr, d_w, N, C, 1e-6f, 0, fused16.m);
        rmsnorm_residual_forward_gpu(nullptr, d_plain, d_rstd, d_branch, nullptr, d_w, N, C, 1e-6f, 0);
        fp8_quantize_gpu(separate16.m, d_plain, C, 0);
        CHECK(same_bytes(d_out, d_plain, n));
        CHECK(same_fp8(fused16.m, separate16.m));
        for (void* p : {(void*)d_res, (void*)d_res_out, (void*)d_rstd, (void*)d_branch, (void*)d_w, (void*)d_out, (void*)d_plain})
            CUDA_CHECK(cudaFree(p));
    }
    for (int I : {128, 384, 144, 100}) {
        CAPTURE(I);
        SwigluBuffers b(N, I, 44);
        DevFp8 h_fused(N, I, 1), h_separate(N, I, 1), dgu_fused(N, 2 * I, 1), dgu_separate(N, 2 * I, 1);
        swiglu_forward_fused_gpu(b.h, b.gu, N, I, 0, h_fused.m);
        swiglu_forward_fused_gpu(b.h2, b.gu, N, I, 0);
        fp8_quantize_gpu(h_separate.m, b.h2, I, 0);
        swiglu_backward_fused_gpu(b.dgu, b.dh, b.gu, N, I, 0, dgu_fused.m);
        swiglu_backward_fused_gpu(b.dgu2, b.dh, b.gu, N, I, 0);
        fp8_quantize_gpu(dgu_separate.m, b.dgu2, 2 * I, 0);
        CHECK(same_bytes(b.h, b.h2, b.n));
        CHECK(same_fp8(h_fused.m, h_separate.m));
        CHECK(same_bytes(b.dgu, b.dgu2, 2 * b.n));
        CHECK(same_fp8(dgu_fused.m, dgu_separate.m));
    }
}

// FP8 training keeps each layer's gate_up as an E4M3 copy for the backward (FfnActsGpu::gate_up_fp8). I 128 and
// 384 write it in the forward kernel, beside hidden's copy; 144, 100 and 12 take the separate pass. The copy is
// allocated for more rows than the call runs, as a layer's is for an evaluation's shorter windows.
TEST_CASE("SwiGLU's E4M3 copy of gate_up: written as fp8_quantize_gpu's, and read back by the backward as its values") {
    const int N = 37;
    for (int I : {128, 384, 144, 100, 12}) {
        CAPTURE(I);
        SwigluBuffers b(N, I, 46);
        const size_t n = b.n;
        DevFp8 cache(N + 8, 2 * I, 1), separate(N, 2 * I, 1), h_copy(N, I, 1), h_separate(N, I, 1), dgu_copy(N, 2 * I, 1);
        swiglu_forward_fused_gpu(b.h, b.gu, N, I, 0, h_copy.m, cache.m);
        swiglu_forward_fused_gpu(b.h2, b.gu, N, I, 0);
        fp8_quantize_gpu(separate.m, b.gu, 2 * I, 0);
        fp8_quantize_gpu(h_separate.m, b.h2, I, 0);
        const Fp8Matrix kept{cache.m.codes, cache.m.scales, N, 2 * I, 1};  // laid out for the N rows run
        CHECK(same_fp8(kept, separate.m));
        CHECK(same_bytes(b.h, b.h2, n));
        CHECK(same_fp8(h_copy.m, h_separate.m));

        // the host: gate_up's values as the copy holds them, and hidden and dgate_up from those
        const std::vector<uint8_t> codes = download(kept.codes, (size_t)N * 2 * I);
        const std::vector<float> scales = download(kept.scales, fp8_scale_count(N, 2 * I, 1));
        const Fp8Matrix host{(uint8_t*)codes.data(), (float*)scales.data(), N, 2 * I, 1};
        std::vector<float> h_want(n), dgu_want(2 * n);
        double moved = 0;  // how far the copy's values are from gate_up's
        for (int r = 0; r < N; r++)
            for (int i = 0; i < I; i++) {
                const size_t gi = (size_t)r * 2 * I + i, ui = gi + I;
                const float g = fp8_dequantize(codes[gi], fp8_scale_of(host, r, i)), u = fp8_dequantize(codes[ui], fp8_scale_of(host, r, I + i));
                const float s = 1.0f / (1.0f + expf(-g)), dh = b.dhidden[(size_t)r * I + i];
                moved = std::max(moved, (double)fabsf(g - b.gate_up[gi]) / (fabsf(b.gate_up[gi]) + 1e-3));
                h_want[(size_t)r * I + i] = bf16_to_float(float_to_bf16(g * s * u));
                dgu_want[gi] = bf16_to_float(float_to_bf16(dh * u * (s + g * s * (1.0f - s))));
                dgu_want[ui] = bf16_to_float(float_to_bf16(dh * g * s));
            }
        CHECK(moved > 1e-3);  // E4M3 keeps 3 mantissa bits: the backward sees other values than the forward did
        swiglu_forward_fused_gpu(b.h, nullptr, N, I, 0, {}, cache.m);
        swiglu_backward_fused_gpu(b.dgu, b.dh, nullptr, N, I, 0, {}, cache.m);
        swiglu_backward_fused_gpu(b.dgu2, b.dh, nullptr, N, I, 0, dgu_copy.m, cache.m);
        const std::vector<float> h_got = to_host(b.h, n), dgu_got = to_host(b.dgu, 2 * n);
        const double e_h = rel_error(h_got.data(), h_want.data(), n), e_dgu = rel_error(dgu_got.data(), dgu_want.data(), 2 * n);
        MESSAGE("SwiGLU from the E4M3 copy, I ", I, ": hidden ", e_h, ", dgate_up ", e_dgu, " from the host's");
        CHECK(e_h < 1e-3);  // the device's expf against the host's: a bf16 rounding apart at most, here and there
        CHECK(e_dgu < 1e-3);
        CHECK(same_bytes(b.dgu2, b.dgu, 2 * n));
        fp8_quantize_gpu(separate.m, b.dgu, 2 * I, 0);
        CHECK(same_fp8(dgu_copy.m, separate.m));
    }
}

TEST_CASE("fp8_matmul (cuBLASLt, block-scaled) equals the emulated GEMM: Fprop, Dgrad (accumulating) and Wgrad (fp32) pairings") {
    struct Shape {
        int N, K, OC;
    };
    Matmul mm;
    matmul_init(mm);
    // Wgrad contracts over N: only training's N, a multiple of 16, takes the third pairing
    for (Shape sh : {Shape{64, 128, 128}, Shape{200, 512, 384}, Shape{132, 1280, 200}, Shape{64, 96, 48}, Shape{256, 160, 1536}}) {
        CAPTURE(sh.N);
        CAPTURE(sh.K);
        CAPTURE(sh.OC);
        Fp8HostMatrix x(sh.N, sh.K, 1), w(sh.OC, sh.K, 128), w_tiles(sh.OC, sh.K, 1);
        const std::vector<float> xv = test_values(sh.N, sh.K, 21), wv = test_values(sh.OC, sh.K, 22), before = test_values(sh.N, sh.OC, 23);
        fp8_quantize_host(x.m, xv.data());
        fp8_quantize_host(w.m, wv.data());
        fp8_quantize_host(w_tiles.m, wv.data());
        DevFp8 dx(x), dw(w), dw_tiles(w_tiles);
        for (int pairing = 0; pairing < (sh.N % 16 ? 2 : 3); pairing++) {  // 0: Fprop, 1: Dgrad (accumulates), 2: Wgrad
            CAPTURE(pairing);
            const bool out_fp32 = pairing == 2, accumulate = pairing > 0;
            std::vector<float> want = before;
            fp8_matmul_host(want.data(), x.m, pairing == 2 ? w_tiles.m : w.m, accumulate);
            void* out = out_fp32 ? (void*)device_alloc<float>(want.size(), "test buffer") : (void*)device_alloc<bf16>(want.size(), "test buffer");
            if (out_fp32) to_device((float*)out, before.data(), before.size());
            else to_device((bf16*)out, before.data(), before.size());
            fp8_matmul(mm, out, out_fp32, dx.m, pairing == 2 ? dw_tiles.m : dw.m, accumulate, 0);
            CUDA_CHECK(cudaDeviceSynchronize());
            const std::vector<float> got = out_fp32 ? to_host((float*)out, want.size()) : to_host((bf16*)out, want.size());
            const double rel = rel_error(got.data(), want.data(), want.size());
            MESSAGE("fp8_matmul N=", sh.N, " K=", sh.K, " OC=", sh.OC, " pairing ", pairing, ": relative error ", rel);
            // bf16 out: its rounding, 2^-9 relative rms. fp32 out: the tensor cores sum each
            // 128-wide slice with about 14 bits kept (DeepSeek-V3 §3.3.2, the reason for the
            // 128-wide promotion to fp32 that the block scales give), so 2^-14 per slice
            CHECK(rel < (out_fp32 ? 3e-4 : 4e-3));
            CUDA_CHECK(cudaFree(out));
        }
    }
    matmul_free(mm);
}

// N 93: an evaluation's last, partial window, which cuBLASLt takes only padded to 4 rows
// (forward only: training's N is a multiple of 4)
TEST_CASE("an FP8 Linear on the GPU (linear_forward_gpu / linear_backward_gpu) equals the emulated one of reference.h") {
    for (int run = 0; run < 3; run++) {  // 0, 1: Wgrad in bf16; 2: in FP8 (--fp8-wgrad)
        const int N = run == 1 ? 93 : 96;
        const bool wgrad = run == 2;
        CAPTURE(wgrad);
        const int in = 160, out = 144;
        const bool backward = N % 4 == 0;
        const std::vector<float> wv = test_values(out, in, 31), x = test_values(N, in, 32), dout = test_values(N, out, 33),
                                 dx0 = test_values(N, in, 34), dw0 = test_values(out, in, 35);
        // the CPU: the copy of W that ref_forward makes, and the emulated GEMMs
        Fp8HostMatrix q(out, in, 128), qt(in, out, 128);
        fp8_quantize_host(q.m, wv.data());
        fp8_quantize_transposed_host(qt.m, wv.data());
        const Fp8Weight host_copy{q.m, qt.m, wgrad};
        std::vector<float> w_cpu = wv, dw_cpu = dw0, dx_cpu = dx0, out_cpu((size_t)N * out);
        const Linear<float> lin_cpu{w_cpu.data(), out, in, &host_copy}, grad_cpu{dw_cpu.data(), out, in};
        linear_forward(out_cpu.data(), x.data(), lin_cpu, N);
        if (backward) linear_backward(dx_cpu.data(), grad_cpu, dout.data(), x.data(), lin_cpu, N, true);
        // the GPU: the copy made from the bf16 weight by the kernel
        GpuContext ctx;
        matmul_init(ctx.mm);
        ctx.scratch_bytes = fp8_linear_scratch_bytes(N, in, out, wgrad, false);
        ctx.scratch = device_alloc<char>(ctx.scratch_bytes, "test buffer");
        DevFp8 dq(out, in, 128), dqt(in, out, 128);
        const Fp8Weight dev_copy{dq.m, dqt.m, wgrad};
        bf16 *d_w = device_alloc<bf16>(wv.size(), "test buffer"), *d_x = device_alloc<bf16>(x.size(), "test buffer");
        bf16 *d_dout = device_alloc<bf16>(dout.size(), "test buffer"), *d_out = device_alloc<bf16>(out_cpu.size(), "test buffer");
        bf16* d_dx = device_alloc<bf16>(dx0.size(), "test buffer");
        float* d_dw = device_alloc<float>(dw0.size(), "test buffer");
        to_device(d_w, wv.data(), wv.size());
        to_device(d_x, x.data(), x.size());
        to_device(d_dout, dout.data(), dout.size());
        to_device(d_dx, dx0.data(), dx0.size());
        to_device(d_dw, dw0.data(), dw0.size());
        int blocks = 0;
        Fp8WeightJob* jobs = fp8_weight_jobs_upload({{dev_copy, d_w, 0}}, &blocks);
        fp8_quantize_weights_gpu(jobs, 1, blocks, 0);
        const Linear<bf16> lin_gpu{d_w, out, in, &dev_copy};
        linear_forward_gpu(d_out, d_x, lin_gpu, N, ctx);
        if (backward) linear_backward_gpu(d_dx, Linear<float>{d_dw, out, in}, d_dout, d_x, lin_gpu, N, true, ctx);
        CUDA_CHECK(cudaDeviceSynchronize());
        auto rel = [](const std::vector<float>& a, const std::vector<float>& b) { return rel_error(a.data(), b.data(), b.size()); };
        const double e_out = rel(to_host(d_out, out_cpu.size()), out_cpu), e_dx = rel(to_host(d_dx, dx_cpu.size()), dx_cpu);
        const double e_dw = rel(to_host(d_dw, dw_cpu.size()), dw_cpu);
        const std::string what = wgrad ? "FP8 Linear (Wgrad in FP8), N " : "FP8 Linear, N ";
        MESSAGE(what, N, ", GPU vs emulation: out ", e_out, ", dx ", e_dx, ", dW ", e_dw);
        CHECK(e_out < 4e-3);  // bf16 outputs
        CHECK(e_dx < 4e-3);
        // FP8 Wgrad: fp32 out, the tensor cores' ~14-bit sums (see the GEMM test); bf16 Wgrad:
        // bf16-exact values, summed in fp32 on both sides
        CHECK(e_dw < (wgrad ? 3e-4 : 1e-5));
        // given the FP8 copies of x and dout that a norm or SwiGLU would have written (rows padded to fours, as
        // fp8_copy leaves room for): the same bits as when the Linear quantizes them itself
        const int padded = (N + 3) / 4 * 4;
        DevFp8 x_copy(padded, in, 1), dout_copy(padded, out, 1);
        x_copy.m.rows = dout_copy.m.rows = N;
        fp8_quantize_gpu(x_copy.m, d_x, in, 0);
        fp8_quantize_gpu(dout_copy.m, d_dout, out, 0);
        bf16* d_again = device_alloc<bf16>(out_cpu.size(), "test buffer");
        linear_forward_gpu(d_again, d_x, lin_gpu, N, ctx, x_copy.m);
        CHECK(same_bytes(d_again, d_out, out_cpu.size()));
        if (backward) {
            const std::vector<float> dx1 = to_host(d_dx, dx0.size()), dw1 = to_host(d_dw, dw0.size());
            to_device(d_dx, dx0.data(), dx0.size());
            to_device(d_dw, dw0.data(), dw0.size());
            linear_backward_gpu(d_dx, Linear<float>{d_dw, out, in}, d_dout, d_x, lin_gpu, N, true, ctx, dout_copy.m);
            CHECK(to_host(d_dx, dx0.size()) == dx1);
            CHECK(to_host(d_dw, dw0.size()) == dw1);
        }
        // a training context: room for the copies, where the Linear quantizes x and dout itself, and only the scratch
        // that fp8_linear_scratch_bytes then asks for (none at all unless padding or FP8 Wgrad): the same bits
        GpuContext train = ctx;
        DevFp8 room(padded, std::max(in, out), 1);
        train.fp8_codes = room.m.codes;
        train.fp8_scales = room.m.scales;
        train.fp8_code_bytes = (size_t)padded * std::max(in, out);
        train.fp8_scale_floats = fp8_scale_count(padded, std::max(in, out), 1);
        train.scratch_bytes = fp8_linear_scratch_bytes(N, in, out, wgrad, true);
        train.scratch = train.scratch_bytes ? device_alloc<char>(train.scratch_bytes, "test buffer") : nullptr;
        CHECK(train.scratch_bytes < ctx.scratch_bytes);
        linear_forward_gpu(d_again, d_x, lin_gpu, N, train);
        CHECK(same_bytes(d_again, d_out, out_cpu.size()));
        if (backward) {
            const std::vector<float> dx1 = to_host(d_dx, dx0.size()), dw1 = to_host(d_dw, dw0.size());
            to_device(d_dx, dx0.data(), dx0.size());
            to_device(d_dw, dw0.data(), dw0.size());
            linear_backward_gpu(d_dx, Linear<float>{d_dw, out, in}, d_dout, d_x, lin_gpu, N, true, train);
            CHECK(to_host(d_dx, dx0.size()) == dx1);
            CHECK(to_host(d_dw, dw0.size()) == dw1);
        }
        for (void* p : {(void*)d_w, (void*)d_x, (void*)d_dout, (void*)d_out, (void*)d_again, (void*)d_dx, (void*)d_dw, (void*)jobs, ctx.scratch,
                        train.scratch})
            CUDA_CHECK(cudaFree(p));
        matmul_free(ctx.mm);
    }
}
