// mla_kernels_bench.cu — candidates for two of mla.cuh's memory-bound kernels, measured against them before they
// replace them. The step profile at small 16 x 1024 (bench/RESULTS.md, session 12) has both far from HBM speed:
//
//   rope_kernel: 0.66 ms a step over 24 calls, 27 us for the 25 MB a call moves (q_pe of 12 heads and the shared
//     k_pe, read and written), about 1 TB/s. It runs one thread per rotated pair, with two 2-byte loads and stores
//     and 64-bit divisions to find its pair. The candidate runs one thread per 16-byte pack (4 pairs) with 32-bit
//     index math, where every piece starts on 8 elements. Prediction: about 3x, 0.45 ms saved a step.
//   attention_backward_preprocess_kernel (D = rowsum(dO * O)): 0.56 ms over 12 calls, 47 us for the 50 MB a call
//     reads, about 1 TB/s. It gives each row of 64 a warp, two 2-byte loads a lane per tensor. The candidate gives a
//     row 8 lanes with 16-byte loads (4 rows a warp). Prediction: about 3x, 0.38 ms saved a step.
//
//   make dev/mla_kernels_bench && ./dev/mla_kernels_bench      (on the device machine; exits 1 on a mismatch)
//
// For small's and medium's shapes it runs each pair on the same inputs, checks the candidate (RoPE: the same bits
// but for FMA contraction, forward and backward; D: within fp32 summation-order rounding) and prints both
// kernels' times and bandwidth.
#include <cstdio>

#include "dev/timing.cuh"
#include "mla.cuh"

namespace {

// rope_kernel's contract, for dn, dr and dc multiples of 8 and 16-byte aligned q and kv_a
template <bool BACKWARD>
__global__ void rope_pack_kernel(bf16* q, bf16* kv_a, const float2* __restrict__ cs, int N, int T, int H, int dn, int dr, int dc,
                                 int pos0) {
    const int packs = dr / 8, per_token = (H + 1) * packs;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * per_token) return;
    const int n = idx / per_token, h = idx % per_token / packs, p = idx % packs;
    bf16* x = h < H ? (q ? q + ((size_t)n * H + h) * (dn + dr) + dn : nullptr) : (kv_a ? kv_a + (size_t)n * (dc + dr) + dc : nullptr);
    if (!x) return;
    x += p * 8;
    float v[8];
    kdetail::load_bf16<8>(v, x);
    const float2* r = cs + (size_t)(pos0 + n % T) * (dr / 2) + p * 4;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const float c = r[k].x, s = BACKWARD ? -r[k].y : r[k].y, x0 = v[2 * k], x1 = v[2 * k + 1];
        v[2 * k] = x0 * c - x1 * s;
        v[2 * k + 1] = x1 * c + x0 * s;
    }
    kdetail::store_bf16<8>(x, v);
}

// D [B, H, T] = rowsum(dout * out) as attention_backward_preprocess_kernel, for dv a multiple of 8: 8 lanes a row,
// each summing its packs, then a fixed shuffle tree over the 8
__global__ void preprocess_pack_kernel(float* __restrict__ D, const bf16* __restrict__ dout, const bf16* __restrict__ out, int B, int T,
                                       int H, int dv) {
    const long long rows = (long long)B * T * H, row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 8;
    const int lane = threadIdx.x % 8;
    float s = 0.0f;
    if (row < rows)
        for (int i = lane * 8; i < dv; i += 64) {
            float a[8], b[8];
            kdetail::load_bf16<8>(a, dout + row * dv + i);
            kdetail::load_bf16<8>(b, out + row * dv + i);
#pragma unroll
            for (int k = 0; k < 8; k++) s += a[k] * b[k];
        }
    for (int offset = 4; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);  // every lane takes part
    if (lane == 0 && row < rows) {
        const int h = (int)(row % H);
        const long long bt = row / H;
        const int t = (int)(bt % T), b = (int)(bt / T);
        D[((long long)b * H + h) * T + t] = s;
    }
}

void rope_candidate(bf16* q, bf16* kv_a, const RopeGpu& rope, int N, int T, int H, int dn, int dc, bool backward) {
    const int total = N * (H + 1) * (rope.dim / 8), threads = 256;
    auto kernel = backward ? rope_pack_kernel<true> : rope_pack_kernel<false>;
    kernel<<<ceil_div(total, threads), threads>>>(q, kv_a, rope.cs, N, T, H, dn, rope.dim, dc, 0);
    CUDA_LAUNCH_CHECK();
}

// one preset's q and kv_a for B sequences of T tokens
struct Shape {
    const char* preset;
    int B, T;
};

bool run(const Shape& shape) {
    const Config c = config_preset(shape.preset);
    struct {
        const char* name;
        int T, H, dn, dr, dc;
    } s = {shape.preset, shape.T, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank};
    const RopeGpu rope = rope_table_upload(rope_build(c, c.max_position_embeddings));
    const int N = shape.B * shape.T;
    const size_t nq = (size_t)N * s.H * (s.dn + s.dr), nkv = (size_t)N * (s.dc + s.dr);
    std::vector<bf16> hq(nq), hkv(nkv);
    for (size_t i = 0; i < nq; i++) hq[i] = __float2bfloat16(2 * rng_uniform(1, i) - 1);
    for (size_t i = 0; i < nkv; i++) hkv[i] = __float2bfloat16(2 * rng_uniform(2, i) - 1);
    bf16 *q_now = device_alloc<bf16>(nq, "bench"), *q_new = device_alloc<bf16>(nq, "bench");
    bf16 *kv_now = device_alloc<bf16>(nkv, "bench"), *kv_new = device_alloc<bf16>(nkv, "bench");
    bool ok = true;
    for (bool backward : {false, true}) {
        for (bf16* q : {q_now, q_new}) CUDA_CHECK(cudaMemcpy(q, hq.data(), nq * sizeof(bf16), cudaMemcpyHostToDevice));
        for (bf16* kv : {kv_now, kv_new}) CUDA_CHECK(cudaMemcpy(kv, hkv.data(), nkv * sizeof(bf16), cudaMemcpyHostToDevice));
        auto now = [&] { rope_launch(q_now, kv_now, rope, N, s.T, s.H, s.dn, s.dc, 0, backward, 0); };
        auto cand = [&] { rope_candidate(q_new, kv_new, rope, N, s.T, s.H, s.dn, s.dc, backward); };
        now();
        cand();
        std::vector<bf16> a(nq), b(nq), ka(nkv), kb(nkv);
        CUDA_CHECK(cudaMemcpy(a.data(), q_now, nq * sizeof(bf16), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(b.data(), q_new, nq * sizeof(bf16), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(ka.data(), kv_now, nkv * sizeof(bf16), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(kb.data(), kv_new, nkv * sizeof(bf16), cudaMemcpyDeviceToHost));
        // the same products in the same order; the compiler may still contract them into FMAs differently, which
        // moves a result by one bf16 rounding at most
        a.insert(a.end(), ka.begin(), ka.end());
        b.insert(b.end(), kb.begin(), kb.end());
        size_t differ = 0, beyond = 0;
        for (size_t i = 0; i < a.size(); i++) {
            const float x = __bfloat162float(a[i]), y = __bfloat162float(b[i]);
            differ += x != y;
            beyond += std::fabs(x - y) > std::ldexp(std::max(std::fabs(x), std::fabs(y)), -7);
        }
        ok = ok && beyond == 0;
        const std::string same = differ == 0 ? "same bits" : strfmt("%zu differ%s", differ, beyond ? ", some by more than a rounding" : "");
        // one rotation reads and writes q_pe of every head and k_pe once
        const double gb = 2.0 * N * (s.H + 1) * s.dr * sizeof(bf16) / 1e9;
        const float t0 = time_us(now), t1 = time_us(cand);
        printf("%s N %d H %d dr %d %s: now %.1f us (%.0f GB/s), candidate %.1f us (%.0f GB/s), %.2fx, %s\n", s.name, N, s.H, s.dr,
               backward ? "backward" : "forward", t0, gb / (t0 * 1e-6), t1, gb / (t1 * 1e-6), t0 / t1, same.c_str());
    }
    for (void* p : {(void*)q_now, (void*)q_new, (void*)kv_now, (void*)kv_new, (void*)rope.cs}) cudaFree(p);

    // D over the attention output of the same tokens: dv = v_head_dim
    const int dv = c.v_head_dim;
    const size_t no = (size_t)N * s.H * dv, nd = (size_t)N * s.H;
    std::vector<bf16> ho(no), hdo(no);
    for (size_t i = 0; i < no; i++) {
        ho[i] = __float2bfloat16(2 * rng_uniform(3, i) - 1);
        hdo[i] = __float2bfloat16(2 * rng_uniform(4, i) - 1);
    }
    bf16 *o = device_alloc<bf16>(no, "bench"), *d_o = device_alloc<bf16>(no, "bench");
    float *D_now = device_alloc<float>(nd, "bench"), *D_new = device_alloc<float>(nd, "bench");
    CUDA_CHECK(cudaMemcpy(o, ho.data(), no * sizeof(bf16), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d_o, hdo.data(), no * sizeof(bf16), cudaMemcpyHostToDevice));
    const int B = shape.B, T = shape.T, H = s.H;
    auto now = [&] {
        attention_backward_preprocess_kernel<<<(int)((nd + 7) / 8), 256>>>(D_now, d_o, o, B, T, H, dv);
        CUDA_LAUNCH_CHECK();
    };
    auto cand = [&] {
        preprocess_pack_kernel<<<ceil_div((long long)nd * 8, 256), 256>>>(D_new, d_o, o, B, T, H, dv);
        CUDA_LAUNCH_CHECK();
    };
    now();
    cand();
    std::vector<float> a(nd), b(nd);
    CUDA_CHECK(cudaMemcpy(a.data(), D_now, nd * sizeof(float), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(b.data(), D_new, nd * sizeof(float), cudaMemcpyDeviceToHost));
    // each sum adds dv products of magnitude <= 1, so each order's rounding is within dv * dv * 2^-24 of the exact
    // sum; a lost or doubled pack would be off by about 0.1
    double worst = 0;
    for (size_t i = 0; i < nd; i++) worst = std::max(worst, (double)std::fabs(a[i] - b[i]));
    const bool close = worst <= 2.0 * dv * dv * 6e-8;
    ok = ok && close;
    const double gb = 2.0 * no * sizeof(bf16) / 1e9;
    const float t0 = time_us(now), t1 = time_us(cand);
    printf("%s D over N %d H %d dv %d: now %.1f us (%.0f GB/s), candidate %.1f us (%.0f GB/s), %.2fx, largest difference %.1e%s\n",
           s.name, N, H, dv, t0, gb / (t0 * 1e-6), t1, gb / (t1 * 1e-6), t0 / t1, worst, close ? "" : " TOO LARGE");
    for (void* p : {(void*)o, (void*)d_o, (void*)D_now, (void*)D_new}) cudaFree(p);
    return ok;
}

}  // namespace

int main() {
    bool ok = true;
    for (const Shape& s : {Shape{"small", 16, 1024}, Shape{"medium", 8, 1024}}) ok = run(s) && ok;
    printf("%s\n", ok ? "MLA kernel candidates: all checks passed" : "MLA kernel candidates: MISMATCH");
    return ok ? 0 : 1;
}
