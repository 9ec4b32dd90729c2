// rmsnorm_copy_bench.cu — a candidate for the backward's residual-stream norm, measured against what runs now
// before it replaces it.
//
// In the block backward (model.cu) every RMSNorm backward of the residual stream, which writes the fp32 residual
// gradient, is followed by dropout_to_bf16_gpu reading that gradient back to make the bf16 (and dropped) copy the
// next branch's backward takes: 25 calls a step at small 16 x 1024, 0.46 ms (bench/RESULTS.md, session 12). The
// candidate writes the copy from registers in the norm's own kernel (kernels.cuh rmsnorm_backward_warp_kernel
// plus one bf16 store, the mask drawn as dropout_kernel draws it), saving the 50 MB fp32 read and a launch.
// Prediction: about 12 us saved a call, 0.3 ms a step.
//
//   make dev/rmsnorm_copy_bench && ./dev/rmsnorm_copy_bench      (on the device machine; exits 1 on a mismatch)
//
// At small's and medium's widths, with and without dropout, it checks that the candidate writes the same fp32
// gradient, bf16 copy and dweight bits as the pair, and prints both times.
#include <cstdio>

#include "dev/timing.cuh"
#include "kernels.cuh"

namespace {

// kernels.cuh rmsnorm_backward_warp_kernel with G = X = float, writing dinp_copy = bf16(dinp * mask) beside dinp,
// the mask of dropout_kernel (rng_uniform(key, i) < p: 0, else 1 / (1 - p); p = 0: none)
template <int CHUNKS>
__global__ void __launch_bounds__(RMSNORM_WARPS * 32)
    rmsnorm_backward_copy_kernel(float* dinp, bf16* dinp_copy, float* dweight_partial, const float* dresidual, const bf16* dout,
                                 const float* inp, const bf16* weight, const float* rstd, int N, int C, int rows_per_block, float p,
                                 float scale, uint64_t key) {
    __shared__ float dw_warps[RMSNORM_WARPS][CHUNKS * 256];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float w[CHUNKS][8], dw[CHUNKS][8] = {};
#pragma unroll
    for (int c = 0; c < CHUNKS; c++)
        if (c * 256 + lane * 8 < C) kdetail::load_bf16<8>(w[c], weight + c * 256 + lane * 8);
    const int row0 = blockIdx.x * rows_per_block, row1 = min(N, row0 + rows_per_block);
    for (int row = row0 + warp; row < row1; row += RMSNORM_WARPS) {
        const size_t base = (size_t)row * C;
        float dy[CHUNKS][8], x[CHUNKS][8];
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            const int i = c * 256 + lane * 8;
            if (i >= C) continue;
            kdetail::load_bf16<8>(dy[c], dout + base + i);
            kdetail::load_bf16<8>(x[c], inp + base + i);
#pragma unroll
            for (int k = 0; k < 8; k++) s += w[c][k] * dy[c][k] * x[c][k];
        }
        const float r = rstd[row], kk = r * r * r * warp_sum(s) / C;
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            const int i = c * 256 + lane * 8;
            if (i >= C) continue;
            float dx[8], copy[8];
            if (dresidual) kdetail::load_bf16<8>(dx, dresidual + base + i);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float g = r * w[c][k] * dy[c][k] - kk * x[c][k];
                dx[k] = dresidual ? dx[k] + g : g;
                dw[c][k] += dy[c][k] * x[c][k] * r;
                copy[k] = p > 0 ? dx[k] * (rng_uniform(key, base + i + k) < p ? 0.0f : scale) : dx[k];
            }
            kdetail::store_bf16<8>(dinp + base + i, dx);
            kdetail::store_bf16<8>(dinp_copy + base + i, copy);
        }
    }
#pragma unroll
    for (int c = 0; c < CHUNKS; c++)
        if (c * 256 + lane * 8 < C)
#pragma unroll
            for (int k = 0; k < 8; k++) dw_warps[warp][c * 256 + lane * 8 + k] = dw[c][k];
    __syncthreads();
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float total = 0.0f;
        for (int v = 0; v < RMSNORM_WARPS; v++) total += dw_warps[v][i];
        dweight_partial[(size_t)blockIdx.x * C + i] = total;
    }
}

template <typename T>
bool same_bits(const T* a, const T* b, size_t n) {
    std::vector<T> x(n), y(n);
    CUDA_CHECK(cudaMemcpy(x.data(), a, n * sizeof(T), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(y.data(), b, n * sizeof(T), cudaMemcpyDeviceToHost));
    return memcmp(x.data(), y.data(), n * sizeof(T)) == 0;
}

template <int CHUNKS>
bool run(int N, int C, float p) {
    const size_t n = (size_t)N * C, scratch_bytes = rmsnorm_backward_scratch_bytes(N, C);
    auto fill = [](auto* dst, size_t count, uint64_t key, float lo, float hi) {
        std::vector<float> h(count);
        for (size_t i = 0; i < count; i++) h[i] = lo + (hi - lo) * rng_uniform(key, i);
        to_device(dst, h.data(), count);
    };
    float *inp = device_alloc<float>(n, "bench"), *dres0 = device_alloc<float>(n, "bench"), *rstd = device_alloc<float>(N, "bench");
    bf16 *dout = device_alloc<bf16>(n, "bench"), *w = device_alloc<bf16>(C, "bench");
    float *dres_now = device_alloc<float>(n, "bench"), *dres_new = device_alloc<float>(n, "bench");
    bf16 *copy_now = device_alloc<bf16>(n, "bench"), *copy_new = device_alloc<bf16>(n, "bench");
    float *dw_now = device_alloc<float>(C, "bench"), *dw_new = device_alloc<float>(C, "bench");
    float* scratch = (float*)device_alloc<char>(scratch_bytes, "bench");
    fill(inp, n, 1, -2, 2);
    fill(dres0, n, 2, -1, 1);
    fill(rstd, N, 3, 0.5f, 1.5f);
    fill(dout, n, 4, -1, 1);
    fill(w, C, 5, 0.5f, 1.5f);
    const uint64_t key = 77;
    const float scale = (float)(1.0 / (1.0 - p));
    int rpb = 0;
    const int blocks = rmsnorm_backward_blocks(N, &rpb);
    auto reset = [&] {
        CUDA_CHECK(cudaMemcpy(dres_now, dres0, n * sizeof(float), cudaMemcpyDeviceToDevice));
        CUDA_CHECK(cudaMemcpy(dres_new, dres0, n * sizeof(float), cudaMemcpyDeviceToDevice));
        CUDA_CHECK(cudaMemset(dw_now, 0, C * sizeof(float)));
        CUDA_CHECK(cudaMemset(dw_new, 0, C * sizeof(float)));
    };
    // in place on the residual gradient, as model.cu runs it
    auto now = [&] {
        rmsnorm_backward_gpu<float, float>(dres_now, dw_now, dres_now, dout, inp, w, rstd, N, C, scratch, scratch_bytes, 0);
        dropout_to_bf16_gpu(copy_now, dres_now, n, p, key, 0);
    };
    auto cand = [&] {
        rmsnorm_backward_copy_kernel<CHUNKS>
            <<<blocks, RMSNORM_WARPS * 32>>>(dres_new, copy_new, scratch, dres_new, dout, inp, w, rstd, N, C, rpb, p, scale, key);
        CUDA_LAUNCH_CHECK();
        rmsnorm_dweight_reduce_kernel<<<ceil_div(C, 32), dim3(32, 32)>>>(dw_new, scratch, blocks, C);
        CUDA_LAUNCH_CHECK();
    };
    reset();
    now();
    cand();
    const bool ok = same_bits(dres_now, dres_new, n) && same_bits(copy_now, copy_new, n) && same_bits(dw_now, dw_new, C);
    const float t0 = time_us(now), t1 = time_us(cand);
    printf("N %d C %d dropout %g: norm + copy %.1f us, candidate %.1f us, %.2fx, %s\n", N, C, p, t0, t1, t0 / t1,
           ok ? "same bits" : "DIFFERENT");
    for (void* q : {(void*)inp, (void*)dres0, (void*)rstd, (void*)dout, (void*)w, (void*)dres_now, (void*)dres_new, (void*)copy_now,
                    (void*)copy_new, (void*)dw_now, (void*)dw_new, (void*)scratch})
        cudaFree(q);
    return ok;
}

}  // namespace

int main() {
    bool ok = true;
    for (float p : {0.0f, 0.1f}) {
        ok = run<3>(16384, 768, p) && ok;  // small at 16 x 1024
        ok = run<4>(8192, 1024, p) && ok;  // a 1,024-wide model; medium's 2,048 keeps the block kernel
    }
    printf("%s\n", ok ? "RMSNorm copy candidate: all checks passed" : "RMSNorm copy candidate: MISMATCH");
    return ok ? 0 : 1;
}
