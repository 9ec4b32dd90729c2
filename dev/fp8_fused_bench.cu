// fp8_fused_bench.cu — candidates for issue 9's fused quantization, measured against the two passes they would
// replace before either goes into kernels.cuh: RMSNorm and SwiGLU that write, beside their bf16 output, its E4M3
// codes and 1 x 128 scales, so that the FP8 Linear reading that output (q_a and kv_a after the input norm, q_b and
// kv_b after the latent norms, gate_up after the post-attention norm, down after SwiGLU) skips fp8_quantize_gpu.
//
// bench/RESULTS.md's FP8 table: that separate pass costs 23 us per Linear at small's widths (N = 16384, C = 768)
// and 74 us for the dense down projection's 3072-wide input, about what the FP8 GEMM saves over bf16's. The fused
// kernels write 1 byte more per element and read nothing more. Prediction: each fused kernel costs its plain
// kernel's time plus 10-20%, so the pair now (kernel + quantization) runs 1.5-1.8x slower than the fused one, and a
// small FP8 step saves about 2.5 ms of 63 (from 0.96x BF16 to about 1.0x).
//
//   make dev/fp8_fused_bench && ./dev/fp8_fused_bench      (on the device machine)
//
// Checks, for each width: the fused kernel's bf16 output equals kernels.cuh's bit for bit (the same arithmetic in
// the same order), and its codes and scales equal fp8_quantize_gpu's of that output bit for bit. Widths are
// multiples of 128, as every FP8 Linear's input is (fp8.cuh).
#include <cstdio>
#include <cstring>

#include "dev/timing.cuh"
#include "kernels.cuh"

namespace {

// The amax of a 1 x 128 tile held by 16 consecutive lanes (8 values each), every lane of the half-warp getting
// it; then the lane's codes, and the tile's scale from its first lane. All 32 lanes of the warp must call it.
__device__ inline void quantize_tile8(const Fp8Matrix& q, int row, int col, const float (&y)[8], bool active) {
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; k++) amax = fmaxf(amax, fabsf(y[k]));
    for (int o = 8; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (!active) return;
    const float scale = amax / FP8_E4M3_MAX;
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) lo |= (uint32_t)fp8_quantize(y[k], scale) << 8 * k, hi |= (uint32_t)fp8_quantize(y[k + 4], scale) << 8 * k;
    *(uint2*)(q.codes + (size_t)row * q.cols + col) = make_uint2(lo, hi);
    if (threadIdx.x % 16 == 0) q.scales[fp8_scale_index(row, col / FP8_TILE, q.rows, q.cols, 1)] = scale;
}

// kernels.cuh's rmsnorm_residual_forward_kernel (VEC 8, fp32 residual) with q [N, C] written too. The output loop
// runs the same number of times on every thread, so that whole warps reach the shuffles.
__global__ void rmsnorm_fp8_forward_kernel(float* residual_out, bf16* out, Fp8Matrix q, float* rstd, const float* residual_in,
                                           const bf16* branch, const bf16* weight, int C, float eps) {
    extern __shared__ float xs[];  // [C]
    const size_t base = (size_t)blockIdx.x * C;
    float ss = 0.0f;
    for (int i = threadIdx.x * 8; i < C; i += blockDim.x * 8) {
        float x[8] = {};
        if (residual_in) kdetail::load_bf16<8>(x, residual_in + base + i);
        if (branch) {
            float b[8];
            kdetail::load_bf16<8>(b, branch + base + i);
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] += b[k];
        }
        if (residual_out) kdetail::store_bf16<8>(residual_out + base + i, x);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            xs[i + k] = x[k];
            ss += x[k] * x[k];
        }
    }
    ss = block_sum(ss);
    const float r = 1.0f / sqrtf(ss / C + eps);
    if (rstd && threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int i0 = 0; i0 < C; i0 += blockDim.x * 8) {
        const int i = i0 + threadIdx.x * 8;
        const bool active = i < C;
        float y[8] = {};
        if (active) {
            float w[8];
            kdetail::load_bf16<8>(w, weight + i);
#pragma unroll
            for (int k = 0; k < 8; k++) y[k] = __bfloat162float(__float2bfloat16(w[k] * (xs[i + k] * r)));  // the stored bf16 value
            kdetail::store_bf16<8>(out + base + i, y);
        }
        quantize_tile8(q, blockIdx.x, active ? i : 0, y, active);
    }
}

// kernels.cuh's swiglu_forward_kernel (VEC 8) with q [rows, I] written too: pack p holds columns 8p..8p+7 of the
// row-major [rows, I] output, so 16 consecutive packs are one 1 x 128 tile (I % 128 == 0). Whole warps run each
// round of the grid-stride loop.
__global__ void swiglu_fp8_forward_kernel(bf16* hidden, Fp8Matrix q, const bf16* gate, const bf16* up, size_t packs, long long I, long long ld) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t p0 = (size_t)blockIdx.x * blockDim.x; p0 < packs; p0 += stride) {
        const size_t p = p0 + threadIdx.x;
        const bool active = p < packs;
        const size_t e = active ? p * 8 : 0, row = e / I, col = e % I, in = row * ld + col;
        float h[8] = {};
        if (active) {
            float g[8], u[8];
            kdetail::load_bf16<8>(g, gate + in);
            kdetail::load_bf16<8>(u, up + in);
#pragma unroll
            for (int k = 0; k < 8; k++) h[k] = __bfloat162float(__float2bfloat16(g[k] * swiglu_sigmoid(g[k]) * u[k]));
            kdetail::store_bf16<8>(hidden + e, h);
        }
        quantize_tile8(q, (int)row, (int)col, h, active);
    }
}

template <typename T>
void fill(T* p, size_t n, uint64_t key, float scale) {
    std::vector<float> h(n);
    for (size_t i = 0; i < n; i++) h[i] = scale * (2 * rng_uniform(key, i) - 1);
    to_device(p, h.data(), n);
}

// bytes of two device arrays equal
bool same_bytes(const void* a, const void* b, size_t bytes) {
    std::vector<char> x(bytes), y(bytes);
    CUDA_CHECK(cudaMemcpy(x.data(), a, bytes, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(y.data(), b, bytes, cudaMemcpyDeviceToHost));
    return std::memcmp(x.data(), y.data(), bytes) == 0;
}

// an Fp8Matrix [rows, cols] in 1 x 128 tiles on the device
Fp8Matrix fp8_alloc(int rows, int cols) {
    return Fp8Matrix{device_alloc<uint8_t>((size_t)rows * cols, "bench"), device_alloc<float>(fp8_scale_count(rows, cols, 1), "bench"), rows,
                     cols, 1};
}

bool same_fp8(const Fp8Matrix& a, const Fp8Matrix& b) {
    return same_bytes(a.codes, b.codes, (size_t)a.rows * a.cols) && same_bytes(a.scales, b.scales, fp8_scale_count(a.rows, a.cols, 1) * 4);
}

void free_all(std::initializer_list<void*> ps) {
    for (void* p : ps) cudaFree(p);
}

// the residual stream's norm (fp32 residual + bf16 branch -> bf16 out), then its FP8 copy
void compare_rmsnorm(int N, int C) {
    const size_t n = (size_t)N * C;
    float *res_in = device_alloc<float>(n, "bench"), *res_a = device_alloc<float>(n, "bench"), *res_b = device_alloc<float>(n, "bench");
    float *rstd_a = device_alloc<float>(N, "bench"), *rstd_b = device_alloc<float>(N, "bench");
    bf16 *branch = device_alloc<bf16>(n, "bench"), *w = device_alloc<bf16>(C, "bench"), *out_a = device_alloc<bf16>(n, "bench"),
         *out_b = device_alloc<bf16>(n, "bench");
    Fp8Matrix qa = fp8_alloc(N, C), qb = fp8_alloc(N, C);
    fill(res_in, n, 1, 2.0f);
    fill(branch, n, 2, 1.0f);
    fill(w, C, 3, 1.0f);
    auto now = [&] {
        rmsnorm_residual_forward_gpu<float>(res_a, out_a, rstd_a, res_in, branch, w, N, C, 1e-6f, 0);
        fp8_quantize_gpu(qa, out_a, C, 0);
    };
    auto fused = [&] {
        rmsnorm_fp8_forward_kernel<<<N, kdetail::row_threads(C / 8, 512), C * sizeof(float)>>>(res_b, out_b, qb, rstd_b, res_in, branch, w, C,
                                                                                                1e-6f);
        CUDA_LAUNCH_CHECK();
    };
    now();
    fused();
    CUDA_CHECK(cudaDeviceSynchronize());
    const bool same_out = same_bytes(out_a, out_b, n * sizeof(bf16)) && same_bytes(res_a, res_b, n * sizeof(float)) &&
                          same_bytes(rstd_a, rstd_b, N * sizeof(float));
    const bool same_q = same_fp8(qa, qb);
    const float t_norm = time_us([&] { rmsnorm_residual_forward_gpu<float>(res_a, out_a, rstd_a, res_in, branch, w, N, C, 1e-6f, 0); });
    const float t_now = time_us(now), t_fused = time_us(fused);
    printf("rmsnorm N %d C %d: outputs %s, fp8 %s | norm %.1f us, norm + quantize %.1f us, fused %.1f us: %.2fx\n", N, C,
           same_out ? "identical" : "DIFFER", same_q ? "identical" : "DIFFER", t_norm, t_now, t_fused, t_now / t_fused);
    free_all({res_in, res_a, res_b, rstd_a, rstd_b, branch, w, out_a, out_b, qa.codes, qa.scales, qb.codes, qb.scales});
}

// SwiGLU on the fused gate/up GEMM's output [N, 2I] (gate in the first I columns), then its FP8 copy
void compare_swiglu(int N, int I) {
    const size_t n = (size_t)N * I;
    bf16 *gate_up = device_alloc<bf16>(2 * n, "bench"), *h_a = device_alloc<bf16>(n, "bench"), *h_b = device_alloc<bf16>(n, "bench");
    Fp8Matrix qa = fp8_alloc(N, I), qb = fp8_alloc(N, I);
    fill(gate_up, 2 * n, 4, 3.0f);
    auto now = [&] {
        kdetail::swiglu_forward_launch(h_a, gate_up, gate_up + I, n, I, 2 * I, 0);
        fp8_quantize_gpu(qa, h_a, I, 0);
    };
    auto fused = [&] {
        swiglu_fp8_forward_kernel<<<kdetail::elementwise_blocks(n / 8, 256), 256>>>(h_b, qb, gate_up, gate_up + I, n / 8, I, 2 * I);
        CUDA_LAUNCH_CHECK();
    };
    now();
    fused();
    CUDA_CHECK(cudaDeviceSynchronize());
    const bool same_out = same_bytes(h_a, h_b, n * sizeof(bf16)), same_q = same_fp8(qa, qb);
    const float t_plain = time_us([&] { kdetail::swiglu_forward_launch(h_a, gate_up, gate_up + I, n, I, 2 * I, 0); });
    const float t_now = time_us(now), t_fused = time_us(fused);
    printf("swiglu N %d I %d: outputs %s, fp8 %s | swiglu %.1f us, swiglu + quantize %.1f us, fused %.1f us: %.2fx\n", N, I,
           same_out ? "identical" : "DIFFER", same_q ? "identical" : "DIFFER", t_plain, t_now, t_fused, t_now / t_fused);
    free_all({gate_up, h_a, h_b, qa.codes, qa.scales, qb.codes, qb.scales});
}

}  // namespace

int main() {
    // small at 16 x 1024: hidden 768, the latent (512) and q_lora (384) widths, the dense FFN (3072) and the shared
    // expert (768); medium at 8 x 1024: hidden 2048 and its dense FFN (8192)
    compare_rmsnorm(16384, 768);
    compare_rmsnorm(16384, 512);
    compare_rmsnorm(16384, 384);
    compare_rmsnorm(8192, 2048);
    compare_swiglu(16384, 3072);
    compare_swiglu(16384, 768);
    compare_swiglu(8192, 8192);
    return 0;
}
