// dev/swiglu_fp8_bench.cu — what keeping the SwiGLU inputs as E4M3 copies (FfnActsGpu::gate_up_fp8) costs a
// step of FP8 training, kernel by kernel, at small's shapes: the forward writing the copy beside hidden's, and the
// backward's recomputation and gradient reading it, against the same kernels on the bf16 gate_up that FP8 training
// kept before. FP8 training's step went from 0.986x to 0.964x BF16's with the copies (bench/RESULTS.md, session 15).
// Beside them, a candidate for the forward's quantization (below), timed and compared code for code.
//
//   make dev/swiglu_fp8_bench && ./dev/swiglu_fp8_bench
#include <cstdio>
#include <vector>

#include "cuda_common.cuh"
#include "kernels.cuh"

// A candidate for the forward's quantization: fp8_quantize_tile8 with one division a tile and a multiplication a
// value, x * (1 / scale), as DeepGEMM's per-token cast multiplies by 448 / amax; it is not bit-identical to x / scale
// for every x, so the bench also counts the codes it changes
__device__ void quantize_tile8_reciprocal(const Fp8Matrix& q, int r, int c, const float (&v)[8], bool active) {
    float amax = 0;
    for (int i = 0; i < 8; i++) amax = fmaxf(amax, fabsf(v[i]));
    for (int o = 8; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (!active) return;
    const float scale = amax / FP8_E4M3_MAX, inv = scale > 0 ? 1.0f / scale : 0.0f;
    uint32_t lo = 0, hi = 0;
    for (int i = 0; i < 4; i++) {
        lo |= (uint32_t)__nv_cvt_float_to_fp8(v[i] * inv, __NV_SATFINITE, __NV_E4M3) << 8 * i;
        hi |= (uint32_t)__nv_cvt_float_to_fp8(v[i + 4] * inv, __NV_SATFINITE, __NV_E4M3) << 8 * i;
    }
    *(uint2*)(q.codes + (size_t)r * q.cols + c) = make_uint2(lo, hi);
    if (threadIdx.x % 16 == 0) q.scales[fp8_scale_index(r, c / FP8_TILE, q.rows, q.cols, 1)] = scale;
}

// swiglu_forward_kernel<8, true, true> with the candidate quantizer (I % 128 == 0)
__global__ void swiglu_forward_reciprocal_kernel(bf16* hidden, Fp8Matrix copy, Fp8Matrix cache, const bf16* gate_up, size_t packs, long long I) {
    for (size_t p0 = (size_t)blockIdx.x * blockDim.x; p0 < packs; p0 += (size_t)gridDim.x * blockDim.x) {
        const size_t p = p0 + threadIdx.x, e = p < packs ? p * 8 : 0, row = e / I, col = e % I;
        float g[8] = {}, u[8] = {}, h[8] = {};
        if (p < packs) {
            kdetail::load_bf16<8>(g, gate_up + row * 2 * I + col);
            kdetail::load_bf16<8>(u, gate_up + row * 2 * I + I + col);
            for (int k = 0; k < 8; k++) h[k] = __bfloat162float(__float2bfloat16(g[k] * swiglu_sigmoid(g[k]) * u[k]));
            kdetail::store_bf16<8>(hidden + e, h);
        }
        if (copy.codes) quantize_tile8_reciprocal(copy, (int)row, (int)col, h, p < packs);
        quantize_tile8_reciprocal(cache, (int)row, (int)col, g, p < packs);
        quantize_tile8_reciprocal(cache, (int)row, (int)(I + col), u, p < packs);
    }
}

struct Shape {
    const char* name;
    int rows, I, per_step;  // rows [rows, 2I] of gate_up; how many such FFNs a step of small at 16 x 1024 runs
    bool copies;            // hidden's copy and dgate_up's are written (dense and shared FFNs: FP8 Linears read them)
};

int main() {
    const Shape shapes[] = {{"dense FFN", 16384, 3072, 1, true}, {"shared experts", 16384, 768, 11, true}, {"routed experts", 32768, 768, 11, false}};
    cudaStream_t st = 0;
    double before_total = 0, after_total = 0;
    printf("%-15s %9s %9s %9s %9s %9s %10s | %9s %9s | %9s %s\n", "FFN", "fwd", "fwd E4M3", "bwd", "bwd E4M3", "rebuild", "rebld E4M3", "before",
           "after", "fwd recip", "(us; codes the candidate changes)");
    for (const Shape& s : shapes) {
        const size_t n = (size_t)s.rows * s.I;
        std::vector<float> host(2 * n);
        for (size_t i = 0; i < host.size(); i++) host[i] = (rng_uniform(5, i) * 2 - 1) * 3;
        bf16 *gu = device_alloc<bf16>(2 * n, "bench"), *h = device_alloc<bf16>(n, "bench"), *dh = device_alloc<bf16>(n, "bench");
        bf16* dgu = device_alloc<bf16>(2 * n, "bench");
        std::vector<bf16> h16(host.size());
        for (size_t i = 0; i < host.size(); i++) h16[i] = __float2bfloat16(host[i]);
        CUDA_CHECK(cudaMemcpy(gu, h16.data(), 2 * n * sizeof(bf16), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(dh, h16.data(), n * sizeof(bf16), cudaMemcpyHostToDevice));
        auto fp8 = [](int rows, int cols) {
            return Fp8Matrix{device_alloc<uint8_t>((size_t)rows * cols, "bench"), device_alloc<float>(fp8_scale_count(rows, cols, 1), "bench"),
                             rows, cols, 1};
        };
        const Fp8Matrix cache = fp8(s.rows, 2 * s.I), h_copy = s.copies ? fp8(s.rows, s.I) : Fp8Matrix{},
                        dgu_copy = s.copies ? fp8(s.rows, 2 * s.I) : Fp8Matrix{};
        auto us = [&](auto f) { return 1000.0 * gpu_median_ms(f, 20, st); };
        const double fwd = us([&] { swiglu_forward_fused_gpu(h, gu, s.rows, s.I, st, h_copy); });
        const double fwd_cache = us([&] { swiglu_forward_fused_gpu(h, gu, s.rows, s.I, st, h_copy, cache); });
        const double bwd = us([&] { swiglu_backward_fused_gpu(dgu, dh, gu, s.rows, s.I, st, dgu_copy); });
        const double bwd_cache = us([&] { swiglu_backward_fused_gpu(dgu, dh, nullptr, s.rows, s.I, st, dgu_copy, cache); });
        const double rebuild = us([&] { swiglu_forward_fused_gpu(h, gu, s.rows, s.I, st); });
        const double rebuild_cache = us([&] { swiglu_forward_fused_gpu(h, nullptr, s.rows, s.I, st, {}, cache); });
        const Fp8Matrix cache2 = fp8(s.rows, 2 * s.I);
        auto reciprocal = [&] {
            swiglu_forward_reciprocal_kernel<<<kdetail::elementwise_blocks(n / 8, 256), 256, 0, st>>>(h, h_copy, cache2, gu, n / 8, s.I);
        };
        const double fwd_reciprocal = us(reciprocal);
        swiglu_forward_fused_gpu(h, gu, s.rows, s.I, st, h_copy, cache);
        CUDA_CHECK(cudaDeviceSynchronize());
        std::vector<uint8_t> exact(2 * n), candidate(2 * n);
        CUDA_CHECK(cudaMemcpy(exact.data(), cache.codes, 2 * n, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(candidate.data(), cache2.codes, 2 * n, cudaMemcpyDeviceToHost));
        size_t changed = 0;
        for (size_t i = 0; i < 2 * n; i++) changed += exact[i] != candidate[i];
        const double before = (fwd + bwd + rebuild) * s.per_step, after = (fwd_cache + bwd_cache + rebuild_cache) * s.per_step;
        before_total += before;
        after_total += after;
        printf("%-15s %9.1f %9.1f %9.1f %9.1f %9.1f %10.1f | %9.1f %9.1f | %9.1f %zu of %zu  (x%d a step)\n", s.name, fwd, fwd_cache, bwd,
               bwd_cache, rebuild, rebuild_cache, before, after, fwd_reciprocal, changed, 2 * n, s.per_step);
        for (void* p : {(void*)gu, (void*)h, (void*)dh, (void*)dgu, (void*)cache.codes, (void*)cache.scales, (void*)cache2.codes,
                        (void*)cache2.scales, (void*)h_copy.codes, (void*)h_copy.scales, (void*)dgu_copy.codes, (void*)dgu_copy.scales})
            CUDA_CHECK(cudaFree(p));
    }
    printf("a step of small at 16 x 1024: SwiGLU kernels %.0f us with bf16 gate_up kept, %.0f us with its E4M3 copy (%+.0f us)\n",
           before_total, after_total, after_total - before_total);
    return 0;
}
