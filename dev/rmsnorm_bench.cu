// rmsnorm_bench.cu — a candidate for kernels.cuh's RMSNorm, measured against it before it replaces it.
//
// The step profile at small 16 x 1024 (bench/RESULTS.md) gives RMSNorm 8.8% of the step, about twice what its
// bytes take at HBM speed. Its kernels run one block per row (96 threads at C = 768), and the backward walks
// its 32 rows a block one after another with two block-wide barriers each. The candidate gives each row one
// warp: the row lives in the lane's registers (C <= 1024, a multiple of 8: 8 consecutive columns a lane per
// 256), one shuffle reduction and no barrier per row, and in the backward each lane sums dweight for its own
// columns over its rows, the block's warps then adding theirs in order (deterministic, as now).
// Prediction: backward about 2x faster, forward 1.3x; RMSNorm from 8.8% of the step to about 5%.
//
//   make dev/rmsnorm_bench && ./dev/rmsnorm_bench      (on the device machine)
//
// For each width of small and medium it checks the candidate against kernels.cuh (outputs within one bf16
// rounding, the reductions being ordered differently; dweight to fp32 summation order) and prints both
// kernels' times and the bandwidth they reach.
#include <cstdio>

#include "dev/timing.cuh"
#include "kernels.cuh"

namespace {

constexpr int WARPS = 8;  // rows in flight per block

// residual_out = residual_in + branch; out = weight * residual_out * rstd (kernels.cuh's contract). One warp a row.
template <int CHUNKS, typename R>
__global__ void __launch_bounds__(WARPS * 32) rmsnorm_forward_warp_kernel(R* residual_out, bf16* out, float* rstd, const R* residual_in,
                                                                          const bf16* branch, const bf16* weight, int N, int C,
                                                                          float eps) {
    const int lane = threadIdx.x % 32, row = blockIdx.x * WARPS + threadIdx.x / 32;
    if (row >= N) return;
    const size_t base = (size_t)row * C;
    float x[CHUNKS][8];
    float ss = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        const int i = c * 256 + lane * 8;
        if (i >= C) continue;
#pragma unroll
        for (int k = 0; k < 8; k++) x[c][k] = 0.0f;
        if (residual_in) kdetail::load_bf16<8>(x[c], residual_in + base + i);
        if (branch) {
            float b[8];
            kdetail::load_bf16<8>(b, branch + base + i);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                x[c][k] += b[k];
                if constexpr (std::is_same<R, bf16>::value) x[c][k] = __bfloat162float(__float2bfloat16(x[c][k]));
            }
        }
        if (residual_out) kdetail::store_bf16<8>(residual_out + base + i, x[c]);
#pragma unroll
        for (int k = 0; k < 8; k++) ss += x[c][k] * x[c][k];
    }
    const float r = 1.0f / sqrtf(warp_sum(ss) / C + eps);
    if (rstd && lane == 0) rstd[row] = r;
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        const int i = c * 256 + lane * 8;
        if (i >= C) continue;
        float w[8], y[8];
        kdetail::load_bf16<8>(w, weight + i);
#pragma unroll
        for (int k = 0; k < 8; k++) y[k] = w[k] * (x[c][k] * r);
        kdetail::store_bf16<8>(out + base + i, y);
    }
}

// dinp = dresidual + r w dy - r^3/C x sum_j(w_j dy_j x_j); block b's dweight partial over rows
// [b*rows_per_block, ...), its warps taking every WARPS-th row and adding their sums in warp order
template <int CHUNKS, typename G, typename X>
__global__ void __launch_bounds__(WARPS * 32) rmsnorm_backward_warp_kernel(G* dinp, float* dweight_partial, const G* dresidual,
                                                                           const bf16* dout, const X* inp, const bf16* weight,
                                                                           const float* rstd, int N, int C, int rows_per_block) {
    __shared__ float dw_warps[WARPS][1024];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float w[CHUNKS][8], dw[CHUNKS][8] = {};
#pragma unroll
    for (int c = 0; c < CHUNKS; c++)
        if (c * 256 + lane * 8 < C) kdetail::load_bf16<8>(w[c], weight + c * 256 + lane * 8);
    const int row0 = blockIdx.x * rows_per_block, row1 = min(N, row0 + rows_per_block);
    for (int row = row0 + warp; row < row1; row += WARPS) {
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
            float dx[8];
            if (dresidual) kdetail::load_bf16<8>(dx, dresidual + base + i);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float g = r * w[c][k] * dy[c][k] - kk * x[c][k];
                dx[k] = dresidual ? dx[k] + g : g;
                dw[c][k] += dy[c][k] * x[c][k] * r;
            }
            kdetail::store_bf16<8>(dinp + base + i, dx);
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
        for (int v = 0; v < WARPS; v++) total += dw_warps[v][i];
        dweight_partial[(size_t)blockIdx.x * C + i] = total;
    }
}

template <int CHUNKS>
void forward_candidate(float* res_out, bf16* out, float* rstd, const float* res_in, const bf16* branch, const bf16* weight, int N, int C) {
    rmsnorm_forward_warp_kernel<CHUNKS, float><<<ceil_div(N, WARPS), WARPS * 32>>>(res_out, out, rstd, res_in, branch, weight, N, C, 1e-6f);
    CUDA_LAUNCH_CHECK();
}

// the same row ranges as kernels.cuh (rmsnorm_backward_blocks), so the same scratch and reduce serve
template <int CHUNKS>
void backward_candidate(float* dinp, float* dweight, float* partial, const float* dres, const bf16* dout, const float* inp,
                        const bf16* weight, const float* rstd, int N, int C) {
    int rpb = 0;
    const int blocks = rmsnorm_backward_blocks(N, &rpb);
    rmsnorm_backward_warp_kernel<CHUNKS, float, float><<<blocks, WARPS * 32>>>(dinp, partial, dres, dout, inp, weight, rstd, N, C, rpb);
    CUDA_LAUNCH_CHECK();
    rmsnorm_dweight_reduce_kernel<<<ceil_div(C, 32), dim3(32, 32)>>>(dweight, partial, blocks, C);
    CUDA_LAUNCH_CHECK();
}

// the largest difference of two device arrays, relative to the largest magnitude of the first
template <typename T>
double rel_diff(const T* a, const T* b, size_t n) {
    const std::vector<float> x = to_host(a, n), y = to_host(b, n);
    double d = 0, m = 0;
    for (size_t i = 0; i < n; i++) d = std::max(d, (double)std::fabs(x[i] - y[i])), m = std::max(m, (double)std::fabs(x[i]));
    return d / m;
}

// the residual-stream norm of a layer (fp32 residual, bf16 branch), forward and backward, both ways
template <int CHUNKS>
void compare(int N, int C) {
    auto fill = [](auto* p, size_t n, uint64_t key, float scale) {
        std::vector<float> h(n);
        for (size_t i = 0; i < n; i++) h[i] = scale * (2 * rng_uniform(key, i) - 1);
        to_device(p, h.data(), n);
    };
    const size_t n = (size_t)N * C;
    float *res_in = device_alloc<float>(n, "bench"), *res_a = device_alloc<float>(n, "bench"), *res_b = device_alloc<float>(n, "bench");
    bf16 *branch = device_alloc<bf16>(n, "bench"), *w = device_alloc<bf16>(C, "bench"), *out_a = device_alloc<bf16>(n, "bench"),
         *out_b = device_alloc<bf16>(n, "bench"), *dout = device_alloc<bf16>(n, "bench");
    float *rstd_a = device_alloc<float>(N, "bench"), *rstd_b = device_alloc<float>(N, "bench"), *dres = device_alloc<float>(n, "bench");
    float *din_a = device_alloc<float>(n, "bench"), *din_b = device_alloc<float>(n, "bench"), *dw_a = device_alloc<float>(C, "bench"),
          *dw_b = device_alloc<float>(C, "bench");
    const size_t scratch_bytes = rmsnorm_backward_scratch_bytes(N, C);
    float* scratch = (float*)device_alloc<char>(scratch_bytes, "bench");
    fill(res_in, n, 1, 2.0f);
    fill(branch, n, 2, 1.0f);
    fill(w, C, 3, 1.0f);
    fill(dout, n, 4, 1.0f);
    fill(dres, n, 5, 0.5f);

    auto fwd_now = [&] { rmsnorm_residual_forward_gpu<float>(res_a, out_a, rstd_a, res_in, branch, w, N, C, 1e-6f, 0); };
    auto fwd_new = [&] { forward_candidate<CHUNKS>(res_b, out_b, rstd_b, res_in, branch, w, N, C); };
    fwd_now();
    fwd_new();
    CUDA_CHECK(cudaMemset(dw_a, 0, C * sizeof(float)));
    CUDA_CHECK(cudaMemset(dw_b, 0, C * sizeof(float)));
    auto bwd_now = [&] { rmsnorm_backward_gpu<float, float>(din_a, dw_a, dres, dout, res_a, w, rstd_a, N, C, scratch, scratch_bytes, 0); };
    auto bwd_new = [&] { backward_candidate<CHUNKS>(din_b, dw_b, scratch, dres, dout, res_b, w, rstd_b, N, C); };
    bwd_now();
    bwd_new();
    CUDA_CHECK(cudaDeviceSynchronize());
    printf("N %d C %d: differences (relative to the largest value) residual %.1e out %.1e rstd %.1e dinp %.1e dweight %.1e\n", N, C,
           rel_diff(res_a, res_b, n), rel_diff(out_a, out_b, n), rel_diff(rstd_a, rstd_b, N), rel_diff(din_a, din_b, n),
           rel_diff(dw_a, dw_b, C));
    // bytes: forward reads the fp32 residual and bf16 branch, writes both outputs; backward reads dout, the
    // fp32 input and residual gradient, writes the fp32 gradient
    const double fwd_bytes = n * (4.0 + 2 + 4 + 2), bwd_bytes = n * (2.0 + 4 + 4 + 4);
    const float f0 = time_us(fwd_now), f1 = time_us(fwd_new), b0 = time_us(bwd_now), b1 = time_us(bwd_new);
    printf("  forward  now %7.1f us (%5.0f GB/s)  candidate %7.1f us (%5.0f GB/s)  %.2fx\n", f0, fwd_bytes / f0 / 1e3, f1,
           fwd_bytes / f1 / 1e3, f0 / f1);
    printf("  backward now %7.1f us (%5.0f GB/s)  candidate %7.1f us (%5.0f GB/s)  %.2fx\n", b0, bwd_bytes / b0 / 1e3, b1,
           bwd_bytes / b1 / 1e3, b0 / b1);
    for (void* p : {(void*)res_in, (void*)res_a, (void*)res_b, (void*)branch, (void*)w, (void*)out_a, (void*)out_b, (void*)dout,
                    (void*)rstd_a, (void*)rstd_b, (void*)dres, (void*)din_a, (void*)din_b, (void*)dw_a, (void*)dw_b, (void*)scratch})
        cudaFree(p);
}

}  // namespace

int main() {
    // small: hidden 768, and the widths of its latent (512) and q_lora (384) norms, here in the residual stream's
    // fp32 form; medium's 2048 needs more registers than a lane holds, so it would keep the block kernel
    compare<3>(16384, 768);
    compare<2>(16384, 512);
    compare<2>(16384, 384);
    compare<4>(65536, 1024);
    return 0;
}
