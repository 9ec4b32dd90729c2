// gpu_fp8.cu — fp8.cuh on the device: its encoder gives the host's codes and the
// hardware's own conversion (cvt.rn.satfinite, through cuda_fp8.h) for every code's
// value, the ties between codes, the specials and millions of random floats; its
// decoder gives the host's values for all 256 codes.
#include <doctest/doctest.h>

#include <cuda_fp8.h>

#include <cfloat>
#include <cstring>
#include <vector>

#include "common.h"
#include "cuda_common.cuh"
#include "fp8.cuh"

namespace {

__global__ void fp8_convert_kernel(uint8_t* ours, uint8_t* hardware, float* decoded, const float* x, size_t n, Fp8Format f) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        ours[i] = fp8_encode(x[i], f);
        hardware[i] = (uint8_t)__nv_cvt_float_to_fp8(x[i], __NV_SATFINITE, f == FP8_E4M3 ? __NV_E4M3 : __NV_E5M2);
        if (i < 256) decoded[i] = fp8_decode((uint8_t)i, f);
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
        uint8_t *d_ours = device_alloc<uint8_t>(n, "test buffer"), *d_hw = device_alloc<uint8_t>(n, "test buffer");
        CUDA_CHECK(cudaMemcpy(d_x, x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
        fp8_convert_kernel<<<1024, 256>>>(d_ours, d_hw, d_decoded, d_x, n, f);
        CUDA_LAUNCH_CHECK();
        const std::vector<uint8_t> ours = download(d_ours, n), hw = download(d_hw, n);
        const std::vector<float> decoded = download(d_decoded, 256);
        size_t vs_host = 0, vs_hardware = 0, values = 0;
        for (size_t i = 0; i < n; i++) {
            vs_host += ours[i] != fp8_encode(x[i], f);
            vs_hardware += ours[i] != hw[i];
        }
        for (int c = 0; c < 256; c++) {
            const float h = fp8_decode((uint8_t)c, f);
            values += !((std::isnan(h) && std::isnan(decoded[c])) || memcmp(&h, &decoded[c], 4) == 0);
        }
        printf("fp8 format %d on the device: %zu floats, %zu codes differ from the host's, %zu from the hardware's; %zu of 256 "
               "values differ\n", (int)f, n, vs_host, vs_hardware, values);
        CHECK(vs_host == 0);
        CHECK(vs_hardware == 0);
        CHECK(values == 0);
        for (void* p : {(void*)d_x, (void*)d_decoded, (void*)d_ours, (void*)d_hw}) CUDA_CHECK(cudaFree(p));
    }
}

TEST_CASE("fp8 quantization on the device: codes and scales bit-identical to the host's, from fp32 and bf16") {
    struct Shape {
        int rows, cols, tile_rows;
    };
    for (Shape sh : {Shape{1000, 768, 1}, Shape{7, 300, 1}, Shape{768, 1536, 128}, Shape{200, 130, 128}}) {
        for (bool bf16_input : {false, true}) {
            CAPTURE(sh.rows);
            CAPTURE(sh.cols);
            CAPTURE(sh.tile_rows);
            CAPTURE(bf16_input);
            const size_t n = (size_t)sh.rows * sh.cols, tiles = fp8_scale_count(sh.rows, sh.cols, sh.tile_rows);
            std::vector<float> x(n);
            for (size_t i = 0; i < n; i++) {
                const float v = (rng_uniform(11, i) * 2 - 1) * ldexpf(1.0f, (int)(rng_hash(12, i) % 12) - 6);
                x[i] = bf16_input ? bf16_to_float(float_to_bf16(v)) : v;  // what the device reads
            }
            std::vector<uint8_t> codes(n);
            std::vector<float> scales(tiles);
            fp8_quantize_host(codes.data(), scales.data(), x.data(), sh.rows, sh.cols, sh.tile_rows);
            uint8_t* d_codes = device_alloc<uint8_t>(n, "test buffer");
            float* d_scales = device_alloc<float>(tiles, "test buffer");
            float* d_x32 = device_alloc<float>(n, "test buffer");
            bf16* d_x16 = device_alloc<bf16>(n, "test buffer");
            CUDA_CHECK(cudaMemcpy(d_x32, x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
            to_device(d_x16, x.data(), n);
            CUDA_CHECK(cudaMemset(d_codes, 0xAB, n));
            CUDA_CHECK(cudaMemset(d_scales, 0, tiles * sizeof(float)));  // the padding, as the host's
            if (bf16_input) fp8_quantize_gpu(d_codes, d_scales, (const bf16*)d_x16, sh.rows, sh.cols, sh.tile_rows, 0);
            else fp8_quantize_gpu(d_codes, d_scales, (const float*)d_x32, sh.rows, sh.cols, sh.tile_rows, 0);
            CHECK(download(d_codes, n) == codes);
            const std::vector<float> got = download(d_scales, tiles);
            CHECK(memcmp(got.data(), scales.data(), tiles * sizeof(float)) == 0);
            for (void* p : {(void*)d_codes, (void*)d_scales, (void*)d_x32, (void*)d_x16}) CUDA_CHECK(cudaFree(p));
        }
    }
}

TEST_CASE("fp8_matmul (cuBLASLt, 1x128 x 128x128 block scales) equals the dequantized product in double") {
    struct Shape {
        int N, K, OC;
    };
    Matmul mm;
    matmul_init(mm);
    for (Shape sh : {Shape{64, 128, 128}, Shape{200, 512, 384}, Shape{256, 768, 1536}, Shape{132, 1280, 200}}) {
        CAPTURE(sh.N);
        CAPTURE(sh.K);
        CAPTURE(sh.OC);
        // tiles of very different magnitudes, so that a scale applied to the wrong tile shows
        std::vector<float> x((size_t)sh.N * sh.K), w((size_t)sh.OC * sh.K);
        for (size_t i = 0; i < x.size(); i++)
            x[i] = (rng_uniform(21, i) * 2 - 1) * ldexpf(1.0f, (int)(mix64(i / 128 + 1) % 9) - 4);
        for (size_t i = 0; i < w.size(); i++) {
            const size_t r = i / sh.K, c = i % sh.K;
            w[i] = (rng_uniform(22, i) * 2 - 1) * ldexpf(1.0f, (int)(mix64((r / 128) * 1000 + c / 128 + 7) % 9) - 4);
        }
        std::vector<uint8_t> xc(x.size()), wc(w.size());
        std::vector<float> xs(fp8_scale_count(sh.N, sh.K, 1)), ws(fp8_scale_count(sh.OC, sh.K, 128));
        fp8_quantize_host(xc.data(), xs.data(), x.data(), sh.N, sh.K, 1);
        fp8_quantize_host(wc.data(), ws.data(), w.data(), sh.OC, sh.K, 128);
        std::vector<double> ref((size_t)sh.N * sh.OC);
        for (int n = 0; n < sh.N; n++)
            for (int o = 0; o < sh.OC; o++) {
                double acc = 0;
                for (int k = 0; k < sh.K; k++)
                    acc += (double)fp8_decode(xc[(size_t)n * sh.K + k], FP8_E4M3) * xs[fp8_scale_index(n, k / 128, sh.N, sh.K, 1)] *
                           (double)fp8_decode(wc[(size_t)o * sh.K + k], FP8_E4M3) * ws[fp8_scale_index(o / 128, k / 128, sh.OC, sh.K, 128)];
                ref[(size_t)n * sh.OC + o] = acc;
            }
        uint8_t *d_xc = device_alloc<uint8_t>(xc.size(), "test buffer"), *d_wc = device_alloc<uint8_t>(wc.size(), "test buffer");
        float *d_xs = device_alloc<float>(xs.size(), "test buffer"), *d_ws = device_alloc<float>(ws.size(), "test buffer");
        bf16* d_out = device_alloc<bf16>(ref.size(), "test buffer");
        CUDA_CHECK(cudaMemcpy(d_xc, xc.data(), xc.size(), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(d_wc, wc.data(), wc.size(), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(d_xs, xs.data(), xs.size() * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(d_ws, ws.data(), ws.size() * sizeof(float), cudaMemcpyHostToDevice));
        fp8_matmul(mm, d_out, d_xc, d_xs, d_wc, d_ws, sh.N, sh.K, sh.OC, 0);
        CUDA_CHECK(cudaDeviceSynchronize());
        const std::vector<float> out = to_host(d_out, ref.size());
        double diff = 0, norm = 0;
        for (size_t i = 0; i < ref.size(); i++) {
            diff += (out[i] - ref[i]) * (out[i] - ref[i]);
            norm += ref[i] * ref[i];
        }
        const double rel = std::sqrt(diff / norm);
        printf("fp8_matmul N=%d K=%d OC=%d: relative error %.2e against the dequantized product (bf16 output)\n", sh.N, sh.K, sh.OC, rel);
        CHECK(rel < 4e-3);  // the bf16 rounding of the output: about 2^-9 relative, rms
        for (void* p : {(void*)d_xc, (void*)d_wc, (void*)d_xs, (void*)d_ws, (void*)d_out}) CUDA_CHECK(cudaFree(p));
    }
    matmul_free(mm);
}
