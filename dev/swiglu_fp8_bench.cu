// dev/swiglu_fp8_bench.cu — what keeping the SwiGLU inputs as E4M3 copies (FfnActsGpu::gate_up_fp8) costs a
// step of FP8 training, kernel by kernel, at small's shapes: the forward writing the copy beside hidden's, and the
// backward's recomputation and gradient reading it, against the same kernels on the bf16 gate_up that FP8 training
// kept before. FP8 training's step went from 0.986x to 0.964x BF16's with the copies (bench/RESULTS.md, session 15).
//
//   make dev/swiglu_fp8_bench && ./dev/swiglu_fp8_bench
#include <cstdio>
#include <vector>

#include "cuda_common.cuh"
#include "kernels.cuh"

struct Shape {
    const char* name;
    int rows, I, per_step;  // rows [rows, 2I] of gate_up; how many such FFNs a step of small at 16 x 1024 runs
    bool copies;            // hidden's copy and dgate_up's are written (dense and shared FFNs: FP8 Linears read them)
};

int main() {
    const Shape shapes[] = {{"dense FFN", 16384, 3072, 1, true}, {"shared experts", 16384, 768, 11, true}, {"routed experts", 32768, 768, 11, false}};
    cudaStream_t st = 0;
    double before_total = 0, after_total = 0;
    printf("%-15s %9s %9s %9s %9s %9s %10s | %9s %9s  (us)\n", "FFN", "fwd", "fwd E4M3", "bwd", "bwd E4M3", "rebuild", "rebld E4M3", "before",
           "after");
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
        const double before = (fwd + bwd + rebuild) * s.per_step, after = (fwd_cache + bwd_cache + rebuild_cache) * s.per_step;
        before_total += before;
        after_total += after;
        printf("%-15s %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f | %9.1f %9.1f  (x%d a step)\n", s.name, fwd, fwd_cache, bwd, bwd_cache, rebuild,
               rebuild_cache, before, after, s.per_step);
        for (void* p : {(void*)gu, (void*)h, (void*)dh, (void*)dgu, (void*)cache.codes, (void*)cache.scales, (void*)h_copy.codes,
                        (void*)h_copy.scales, (void*)dgu_copy.codes, (void*)dgu_copy.scales})
            CUDA_CHECK(cudaFree(p));
    }
    printf("a step of small at 16 x 1024: SwiGLU kernels %.0f us with bf16 gate_up kept, %.0f us with its E4M3 copy (%+.0f us)\n",
           before_total, after_total, after_total - before_total);
    return 0;
}
