// rope_bench.cu — a candidate for mla.cuh's RoPE kernel, measured against it before it replaces it.
//
// The step profile at small 16 x 1024 (bench/RESULTS.md, session 12) gives rope_kernel 0.66 ms a step over 24 calls,
// 27 us a call for the 25 MB it moves (q_pe of 12 heads and the shared k_pe, read and written): about 1 TB/s. It runs
// one thread per rotated pair, with two 2-byte loads and stores and 64-bit divisions to find its pair. The candidate
// runs one thread per 16-byte pack (4 pairs) with 32-bit index math, where every piece starts on 8 elements.
// Prediction: about 3x (27 -> 9 us a call at small's shape, 0.45 ms saved a step).
//
//   make dev/rope_bench && ./dev/rope_bench      (on the device machine; exits 1 on a mismatch)
//
// For small's and medium's shapes it rotates the same q and kv_a both ways, forward and backward, checks that the
// candidate writes the same bits, and prints both kernels' times with the bandwidth they reach.
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
        const bool same = memcmp(a.data(), b.data(), nq * sizeof(bf16)) == 0 && memcmp(ka.data(), kb.data(), nkv * sizeof(bf16)) == 0;
        ok = ok && same;
        // one rotation reads and writes q_pe of every head and k_pe once
        const double gb = 2.0 * N * (s.H + 1) * s.dr * sizeof(bf16) / 1e9;
        const float t0 = time_us(now), t1 = time_us(cand);
        printf("%s N %d H %d dr %d %s: now %.1f us (%.0f GB/s), candidate %.1f us (%.0f GB/s), %.2fx, %s\n", s.name, N, s.H, s.dr,
               backward ? "backward" : "forward", t0, gb / (t0 * 1e-6), t1, gb / (t1 * 1e-6), t0 / t1, same ? "same bits" : "DIFFERENT");
    }
    for (void* p : {(void*)q_now, (void*)q_new, (void*)kv_now, (void*)kv_new, (void*)rope.cs}) cudaFree(p);
    return ok;
}

}  // namespace

int main() {
    bool ok = true;
    for (const Shape& s : {Shape{"small", 16, 1024}, Shape{"medium", 8, 1024}}) ok = run(s) && ok;
    printf("%s\n", ok ? "RoPE candidate: all checks passed" : "RoPE candidate: MISMATCH");
    return ok ? 0 : 1;
}
