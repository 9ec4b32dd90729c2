// decode_norm_gemv.cu — candidates for a decoding step of a few rows (decode.cu), checked against what runs now and
// timed before they replace it. The batch-1 step of `small` runs 184 kernels (bench/RESULTS.md, session 13); 37 of
// them are RMSNorms (3.3 us each in the cold profile) whose outputs only GEMVs read.
//
//   norm_gemv: gemv_forward_gpu with the RMSNorm of its input folded in. Each warp computes its rows' rstd itself (a
//     row of the fp32 residual stream is 3 KB at small's width, read from L2 by every warp) and normalises the
//     elements as it multiplies them, rounding each to bf16 as the norm's output is rounded. Where two Linears read
//     one norm (q_a and kv_a), one launch covers both.
//   gemv_residual: the GEMV whose output joins the fp32 residual stream, res += bf16(x @ W^T). Each warp owns its
//     (row, column), so the add needs no pass of its own and the next norm_gemv reads res as it is.
//
// Both repeat gemv_kernel's loop (kernels.cuh) with a prologue or an epilogue of their own, to be measured apart from
// it; if they pay, they go in as those options of gemv_kernel, not as kernels beside it.
//
// In the step they would take out a MoE layer's three RMSNorm launches and the q_a/kv_a pair's second GEMV: 4 of its
// 15 launches, 48 a step (moe_decode_up_kernel would fold the post-attention norm in the same way as the router's
// GEMV here). Prediction: 0.12-0.15 ms of the 0.867 ms step, if a launch in the graph costs about 3 us.
//
//   make dev/decode_norm_gemv && ./dev/decode_norm_gemv      (on the device machine; exits 1 on a mismatch)
//
// At small's shapes, for 1 and 2 rows, it checks each candidate against the kernels it replaces: gemv_residual bit
// for bit; norm_gemv within a bf16 rounding of the outputs (its rstd sums the squares in another order, so a normed
// element can round the other way), with the count of outputs that differ. Then it times a step's 12 layers of each
// sequence, now and candidate, the median of 20 calls. Written in session 13 and not yet run: the session's device
// time was spent.
#include <cstdio>
#include <functional>

#include "kernels.cuh"

namespace {

constexpr int ROWS_MAX = GEMV_MAX_ROWS;

// out1 [R, OUT1] and out2 [R, OUT2] = normed(x) @ W1^T and @ W2^T (out2 and W2 may be absent: OUT2 = 0), where
// normed(x)[r, i] = bf16(g[i] * (x[r, i] * rstd_r)), rstd_r = 1 / sqrt(mean over i of x[r, i]^2 + eps), as
// rmsnorm_residual_forward_kernel computes it. X: float (the residual stream) or bf16. IN % 8 == 0, 16-byte rows.
template <typename X, typename Out>
__global__ void __launch_bounds__(256) norm_gemv_kernel(Out* out1, Out* out2, const X* x, const bf16* g, const bf16* W1, const bf16* W2,
                                                        int R, int IN, int OUT1, int OUT2, float eps) {
    const int c = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32), lane = threadIdx.x % 32;
    if (c >= OUT1 + OUT2) return;
    const bool first = c < OUT1;
    const bf16* w = first ? W1 + (size_t)c * IN : W2 + (size_t)(c - OUT1) * IN;
    float rstd[ROWS_MAX], acc[ROWS_MAX] = {};
#pragma unroll
    for (int r = 0; r < ROWS_MAX; r++) {
        if (r >= R) break;
        float ss = 0;
        for (int i = lane * 8; i < IN; i += 32 * 8) {
            float v[8];
            kdetail::load_bf16<8>(v, x + (size_t)r * IN + i);
#pragma unroll
            for (int k = 0; k < 8; k++) ss += v[k] * v[k];
        }
        rstd[r] = 1.0f / sqrtf(warp_sum(ss) / IN + eps);
    }
    for (int i = lane * 8; i < IN; i += 32 * 8) {
        float gv[8], wv[8];
        kdetail::load_bf16<8>(gv, g + i);
        kdetail::load_bf16<8>(wv, w + i);
#pragma unroll
        for (int r = 0; r < ROWS_MAX; r++) {
            if (r >= R) break;
            float v[8];
            kdetail::load_bf16<8>(v, x + (size_t)r * IN + i);
#pragma unroll
            for (int k = 0; k < 8; k++) acc[r] += __bfloat162float(__float2bfloat16(gv[k] * (v[k] * rstd[r]))) * wv[k];
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS_MAX; r++) {
        if (r >= R) break;
        const float sum = warp_sum(acc[r]);
        if (lane == 0) {
            if (first) out1[(size_t)r * OUT1 + c] = (Out)sum;
            else out2[(size_t)r * OUT2 + c - OUT1] = (Out)sum;
        }
    }
}

// res [R, OUT] += bf16(x [R, IN] @ W^T): gemv_kernel's sums, added where rmsnorm_residual_forward_kernel adds a branch
__global__ void __launch_bounds__(256) gemv_residual_kernel(float* res, const bf16* x, const bf16* W, int R, int IN, int OUT) {
    const int c = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32), lane = threadIdx.x % 32;
    if (c >= OUT) return;
    float acc[ROWS_MAX] = {};
    for (int i = lane * 8; i < IN; i += 32 * 8) {
        float wv[8];
        kdetail::load_bf16<8>(wv, W + (size_t)c * IN + i);
#pragma unroll
        for (int r = 0; r < ROWS_MAX; r++) {
            if (r >= R) break;
            float v[8];
            kdetail::load_bf16<8>(v, x + (size_t)r * IN + i);
#pragma unroll
            for (int k = 0; k < 8; k++) acc[r] += wv[k] * v[k];
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS_MAX; r++) {
        if (r >= R) break;
        const float sum = warp_sum(acc[r]);
        if (lane == 0) res[(size_t)r * OUT + c] += __bfloat162float(__float2bfloat16(sum));
    }
}

template <typename X, typename Out>
void norm_gemv(Out* out1, Out* out2, const X* x, const bf16* g, const bf16* W1, const bf16* W2, int R, int IN, int OUT1, int OUT2) {
    norm_gemv_kernel<X, Out><<<ceil_div((long long)(OUT1 + OUT2) * 32, 256), 256>>>(out1, out2, x, g, W1, W2, R, IN, OUT1, OUT2, 1e-6f);
    CUDA_LAUNCH_CHECK();
}

void gemv_residual(float* res, const bf16* x, const bf16* W, int R, int IN, int OUT) {
    gemv_residual_kernel<<<ceil_div((long long)OUT * 32, 256), 256>>>(res, x, W, R, IN, OUT);
    CUDA_LAUNCH_CHECK();
}

template <typename T>
T* random_device(size_t n, uint64_t key, float lo, float hi) {
    std::vector<float> h(n);
    for (size_t i = 0; i < n; i++) h[i] = lo + (hi - lo) * rng_uniform(key, i);
    T* d = device_alloc<T>(n, "bench");
    to_device(d, h.data(), n);
    return d;
}

// how many of n outputs differ, and whether any by more than a bf16 rounding of the larger (2^-8 relative)
template <typename T>
bool compare(const char* what, const T* a, const T* b, size_t n, bool exact) {
    const std::vector<float> x = to_host(a, n), y = to_host(b, n);
    size_t differ = 0, beyond = 0;
    for (size_t i = 0; i < n; i++) {
        differ += x[i] != y[i];
        beyond += std::fabs(x[i] - y[i]) > std::ldexp(std::max(std::fabs(x[i]), std::fabs(y[i])), -8);
    }
    const bool ok = exact ? differ == 0 : beyond == 0;
    printf("  %-58s %zu of %zu differ%s%s\n", what, differ, n, beyond ? ", some by more than a rounding" : "", ok ? "" : "  MISMATCH");
    return ok;
}

float step_us(const std::function<void()>& layer) {
    return 1e3f * gpu_median_ms([&] { for (int l = 0; l < 12; l++) layer(); }, 20);
}

bool run(int R) {
    const Config c = config_preset("small");
    const int D = c.hidden_size, qr = c.q_lora_rank, kv = c.kv_lora_rank + c.qk_rope_head_dim, H = c.num_attention_heads;
    const int qb = H * c.qk_head_dim(), E = c.n_routed_experts, O = H * c.v_head_dim;
    printf("small, %d row%s:\n", R, R > 1 ? "s" : "");
    float* res = random_device<float>((size_t)R * D, 1, -3, 3);
    bf16 *g = random_device<bf16>(D, 2, 0.5f, 1.5f), *gq = random_device<bf16>(qr, 3, 0.5f, 1.5f);
    bf16 *w_qa = random_device<bf16>((size_t)qr * D, 4, -0.05f, 0.05f), *w_kv = random_device<bf16>((size_t)kv * D, 5, -0.05f, 0.05f);
    bf16 *w_qb = random_device<bf16>((size_t)qb * qr, 6, -0.05f, 0.05f), *w_o = random_device<bf16>((size_t)D * O, 7, -0.05f, 0.05f);
    bf16* w_router = random_device<bf16>((size_t)E * D, 8, -0.05f, 0.05f);
    bf16 *qa = random_device<bf16>((size_t)R * qr, 9, -2, 2), *o = random_device<bf16>((size_t)R * O, 10, -1, 1);
    bf16 *xn = device_alloc<bf16>((size_t)R * D, "bench"), *qa_norm = device_alloc<bf16>((size_t)R * qr, "bench");
    bf16 *branch = device_alloc<bf16>((size_t)R * D, "bench");
    bf16 *qa_now = device_alloc<bf16>((size_t)R * qr, "bench"), *kv_now = device_alloc<bf16>((size_t)R * kv, "bench");
    bf16 *qa_new = device_alloc<bf16>((size_t)R * qr, "bench"), *kv_new = device_alloc<bf16>((size_t)R * kv, "bench");
    bf16 *q_now = device_alloc<bf16>((size_t)R * qb, "bench"), *q_new = device_alloc<bf16>((size_t)R * qb, "bench");
    float *res_now = device_alloc<float>((size_t)R * D, "bench"), *res_new = device_alloc<float>((size_t)R * D, "bench");
    float *logits_now = device_alloc<float>((size_t)R * E, "bench"), *logits_new = device_alloc<float>((size_t)R * E, "bench");
    bool ok = true;

    // the block's input norm and the q_a / kv_a pair
    auto attn_in_now = [&] {
        rmsnorm_residual_forward_gpu<float>(nullptr, xn, nullptr, res, nullptr, g, R, D, 1e-6f, 0);
        gemv_forward_gpu(qa_now, xn, w_qa, R, D, qr, 0);
        gemv_forward_gpu(kv_now, xn, w_kv, R, D, kv, 0);
    };
    auto attn_in_new = [&] { norm_gemv(qa_new, kv_new, res, g, w_qa, w_kv, R, D, qr, kv); };
    attn_in_now();
    attn_in_new();
    ok = compare("norm + q_a and kv_a GEMVs, q_a", qa_now, qa_new, (size_t)R * qr, false) && ok;
    ok = compare("norm + q_a and kv_a GEMVs, kv_a", kv_now, kv_new, (size_t)R * kv, false) && ok;

    // q_a's norm and q_b
    auto qb_now = [&] {
        rmsnorm_residual_forward_gpu<bf16>(nullptr, qa_norm, nullptr, qa, nullptr, gq, R, qr, 1e-6f, 0);
        gemv_forward_gpu(q_now, qa_norm, w_qb, R, qr, qb, 0);
    };
    auto qb_new = [&] { norm_gemv<bf16, bf16>(q_new, nullptr, qa, gq, w_qb, nullptr, R, qr, qb, 0); };
    qb_now();
    qb_new();
    ok = compare("q_a norm + q_b GEMV", q_now, q_new, (size_t)R * qb, false) && ok;

    // o_proj joining the stream, then the post-attention norm and the router's fp32 logits
    auto reset = [&] {
        CUDA_CHECK(cudaMemcpy(res_now, res, (size_t)R * D * sizeof(float), cudaMemcpyDeviceToDevice));
        CUDA_CHECK(cudaMemcpy(res_new, res, (size_t)R * D * sizeof(float), cudaMemcpyDeviceToDevice));
    };
    auto post_now = [&] {
        gemv_forward_gpu(branch, o, w_o, R, O, D, 0);
        rmsnorm_residual_forward_gpu<float>(res_now, xn, nullptr, res_now, branch, g, R, D, 1e-6f, 0);
        gemv_forward_gpu(logits_now, xn, w_router, R, D, E, 0);
    };
    auto post_new = [&] {
        gemv_residual(res_new, o, w_o, R, O, D);
        norm_gemv<float, float>(logits_new, nullptr, res_new, g, w_router, nullptr, R, D, E, 0);
    };
    reset();
    post_now();
    post_new();
    ok = compare("o_proj joining the residual stream, the stream", res_now, res_new, (size_t)R * D, true) && ok;
    ok = compare("then norm + router GEMV, the logits", logits_now, logits_new, (size_t)R * E, false) && ok;

    // (timed without the reset: the stream's values only grow by what each add brings)
    const float t[3][2] = {{step_us(attn_in_now), step_us(attn_in_new)}, {step_us(qb_now), step_us(qb_new)}, {step_us(post_now), step_us(post_new)}};
    const char* names[3] = {"input norm, q_a, kv_a", "q_a norm, q_b", "o_proj, post norm, router"};
    for (int i = 0; i < 3; i++)
        printf("  12 layers of %-28s now %7.1f us, candidate %7.1f us (%.2fx)\n", names[i], t[i][0], t[i][1], t[i][0] / t[i][1]);
    for (void* p : {(void*)res, (void*)g, (void*)gq, (void*)w_qa, (void*)w_kv, (void*)w_qb, (void*)w_o, (void*)w_router, (void*)qa, (void*)o,
                    (void*)xn, (void*)qa_norm, (void*)branch, (void*)qa_now, (void*)kv_now, (void*)qa_new, (void*)kv_new, (void*)q_now,
                    (void*)q_new, (void*)res_now, (void*)res_new, (void*)logits_now, (void*)logits_new})
        cudaFree(p);
    return ok;
}

}  // namespace

int main() {
    bool ok = true;
    for (int R : {1, 2}) ok = run(R) && ok;
    printf("%s\n", ok ? "decode norm-GEMV candidates: all checks passed" : "decode norm-GEMV candidates: MISMATCH");
    return ok ? 0 : 1;
}
