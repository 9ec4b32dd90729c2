// crossentropy_bench.cu — a candidate for kernels.cuh's fused softmax + cross-entropy + dlogits, measured against it
// before it replaces it.
//
// The step profile at small 16 x 1024 (bench/RESULTS.md, "Where the module's time goes") gives the cross-entropy
// 1.25 ms a head pass over N x V = 16384 x 32768 bf16 logits, where one read and one write of them take 0.45 ms at
// the H200's 4.8 TB/s. kernels.cuh's kernel reads each row twice (the online max and sum, then the write pass) and
// pays a data-dependent branch per element in the first. The candidate reads the row once into registers (16-byte
// packs kept as bf16, PACKS of them a thread, pack p of thread t at columns (p x THREADS + t) x 8), takes the thread's max, then
// its sum of exp(x - max) (one exp an element, no branch), combines the block's (max, sum) pairs as now, and writes
// dlogits from the registers. Prediction: about 0.5 ms at small's shape, saving 0.75 ms a head pass (1.4% of the
// plain step, 1.5 ms of the MTP step).
//
//   make dev/crossentropy_bench && ./dev/crossentropy_bench      (on the device machine; exits 1 on a mismatch)
//
// For each shape (small's, mini's, DeepSeek-V3's vocabulary of 129,280) it runs both kernels on the same logits
// with some targets ignored (-1), checks the candidate's losses (the sums run in another order: within 1e-5
// relative) and dlogits (within one bf16 rounding of kernels.cuh's), and prints both kernels' times for each block
// size that fits the row in registers, with the bandwidth they reach (one read and one write of the logits).
#include <cstdio>

#include "dev/timing.cuh"
#include "kernels.cuh"

namespace {

// a 16-byte pack of 8 bf16 as floats
__device__ inline void unpack8(const uint4& raw, float (&x)[8]) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[k]));
        x[2 * k] = f.x, x[2 * k + 1] = f.y;
    }
}

// losses[row], and logits[row, :] -> dlogits in place, as kernels.cuh's crossentropy_kernel<8, true>. The row stays
// in bf16 packs (4 registers each); nothing spills up to 16 packs a thread at 256 threads, 8 at 512 and 4 at 1024
// (ptxas -v), so small's 32,768 columns fit every block size here and DeepSeek-V3's 129,280 spill some.
template <int THREADS, int PACKS>
__global__ void __launch_bounds__(THREADS)
    crossentropy_rows_kernel(float* losses, bf16* logits, const int* targets, int V, float dloss_scale, const float* dloss_scale_dev) {
    const int row = blockIdx.x;
    bf16* z = logits + (size_t)row * V;
    const int target = targets[row];
    const float zt = target >= 0 ? __bfloat162float(z[target]) : 0.0f;  // read before block_maxsum's barriers
    uint4 raw[PACKS];
    float m = -INFINITY;
#pragma unroll
    for (int p = 0; p < PACKS; p++) {
        const int i = (p * THREADS + threadIdx.x) * 8;
        if (i < V) {
            raw[p] = *reinterpret_cast<const uint4*>(z + i);
            float x[8];
            unpack8(raw[p], x);
#pragma unroll
            for (int k = 0; k < 8; k++) m = fmaxf(m, x[k]);
        }
    }
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < PACKS; p++) {
        if ((p * THREADS + threadIdx.x) * 8 < V) {
            float x[8];
            unpack8(raw[p], x);
#pragma unroll
            for (int k = 0; k < 8; k++) s += expf(x[k] - m);
        }
    }
    const kdetail::MaxSum ms = kdetail::block_maxsum({m, s});
    if (threadIdx.x == 0) losses[row] = target >= 0 ? -((zt - ms.m) - logf(ms.s)) : 0.0f;
    const float scale = target < 0 ? 0.0f : dloss_scale * (dloss_scale_dev ? *dloss_scale_dev : 1.0f);
#pragma unroll
    for (int p = 0; p < PACKS; p++) {
        const int i = (p * THREADS + threadIdx.x) * 8;
        if (i < V) {
            float x[8];
            unpack8(raw[p], x);
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] = scale * (expf(x[k] - ms.m) / ms.s - (i + k == target ? 1.0f : 0.0f));
            kdetail::store_bf16<8>(z + i, x);
        }
    }
}

// the candidate at THREADS a row, with the fewest packs a thread that hold the row; false where none does
template <int THREADS>
bool crossentropy_rows(float* losses, bf16* logits, const int* targets, int N, int V, float dloss_scale) {
    const int packs = ceil_div(ceil_div(V, 8), THREADS);
    if (V % 8 || packs > 16) return false;
    auto launch = [&](auto kernel) { kernel<<<N, THREADS>>>(losses, logits, targets, V, dloss_scale, nullptr); };
    if (packs <= 1) launch(crossentropy_rows_kernel<THREADS, 1>);
    else if (packs <= 2) launch(crossentropy_rows_kernel<THREADS, 2>);
    else if (packs <= 4) launch(crossentropy_rows_kernel<THREADS, 4>);
    else if (packs <= 8) launch(crossentropy_rows_kernel<THREADS, 8>);
    else launch(crossentropy_rows_kernel<THREADS, 16>);
    CUDA_LAUNCH_CHECK();
    return true;
}

bool check(int N, int V) {
    const size_t n = (size_t)N * V;
    std::vector<float> h(n);
    for (size_t i = 0; i < n; i++) h[i] = 6.0f * rng_uniform(31, i) - 3.0f;  // logits of a partly trained model's spread
    std::vector<int> targets(N);
    for (int r = 0; r < N; r++) targets[r] = r % 17 == 5 ? -1 : (int)(rng_uniform(32, r) * V) % V;
    bf16 *base = device_alloc<bf16>(n, "bench"), *now = device_alloc<bf16>(n, "bench"), *cand = device_alloc<bf16>(n, "bench");
    float *loss_now = device_alloc<float>(N, "bench"), *loss_cand = device_alloc<float>(N, "bench");
    int* d_targets = device_alloc<int>(N, "bench");
    to_device(base, h.data(), n);
    to_device(d_targets, targets.data(), N);
    const float scale = 1.0f / N;
    CUDA_CHECK(cudaMemcpy(now, base, n * sizeof(bf16), cudaMemcpyDeviceToDevice));
    crossentropy_forward_backward_gpu(loss_now, now, d_targets, N, V, scale, nullptr, 0);
    const std::vector<float> l0 = to_host(loss_now, N), d0 = to_host(now, n);

    bool ok = true;
    printf("N %d x V %d: kernels.cuh %.1f us", N, V, time_us([&] { crossentropy_forward_backward_gpu(loss_now, now, d_targets, N, V, scale, nullptr, 0); }));
    const double gb = 2.0 * n * sizeof(bf16) / 1e9;
    auto try_threads = [&](int threads, auto run) {
        CUDA_CHECK(cudaMemcpy(cand, base, n * sizeof(bf16), cudaMemcpyDeviceToDevice));
        if (!run()) return;
        const std::vector<float> l1 = to_host(loss_cand, N), d1 = to_host(cand, n);
        double loss_err = 0, grad_err = 0;
        for (int r = 0; r < N; r++) loss_err = std::max(loss_err, std::fabs((double)l1[r] - l0[r]) / std::max(1e-30, std::fabs((double)l0[r])));
        for (size_t i = 0; i < n; i++)  // in bf16 spacings of kernels.cuh's value (at most 2^-7 of it): 1 = one rounding apart
            if (d1[i] != d0[i]) grad_err = std::max(grad_err, std::fabs((double)d1[i] - d0[i]) / (std::fabs((double)d0[i]) / 128));
        const float us = time_us([&] { run(); });
        printf(" | %d threads %.1f us (%.0f GB/s; losses %.1e, dlogits %.2f roundings)", threads, us, gb / (us * 1e-6), loss_err, grad_err);
        ok &= loss_err < 1e-5 && grad_err <= 1.0;
    };
    try_threads(256, [&] { return crossentropy_rows<256>(loss_cand, cand, d_targets, N, V, scale); });
    try_threads(512, [&] { return crossentropy_rows<512>(loss_cand, cand, d_targets, N, V, scale); });
    try_threads(1024, [&] { return crossentropy_rows<1024>(loss_cand, cand, d_targets, N, V, scale); });
    printf("\n");
    for (void* p : {(void*)base, (void*)now, (void*)cand, (void*)loss_now, (void*)loss_cand, (void*)d_targets}) CUDA_CHECK(cudaFree(p));
    return ok;
}

}  // namespace

int main() {
    bool ok = true;
    ok &= check(16384, 32768);  // small at 16 x 1024
    ok &= check(32768, 1024);   // mini at 64 x 512
    ok &= check(2048, 129280);  // DeepSeek-V3's vocabulary
    printf("%s\n", ok ? "cross-entropy candidate: all checks passed" : "cross-entropy candidate: MISMATCH");
    return ok ? 0 : 1;
}
