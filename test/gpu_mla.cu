// gpu_mla.cu — GPU checks of mla.cuh against reference.h: RoPE (plain and YaRN),
// the K/V assembly, flash attention forward (out, lse) and backward (dq, dk, dv)
// over several shapes, determinism (also replayed from a CUDA graph), causality,
// and the whole MLA layer (mla_forward_gpu / mla_backward_gpu) with its projections.
// Inputs are fresh random values rounded to bf16; the reference runs in double on
// the same values; outputs are poisoned (NaN) first so unwritten elements show.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdio>

#include "mla.cuh"
#include "reference.h"
#include "test_configs.h"

namespace {

// random values in [-scale, scale], rounded to bf16 so host and device see the same numbers
std::vector<float> random_bf16(size_t n, uint64_t key, float scale = 1.0f) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) {
        float x = scale * (2.0f * rng_uniform(key, i) - 1.0f);
        if (x == 0.0f) x = 1e-3f;  // non-zero
        v[i] = bf16_to_float(float_to_bf16(x));
    }
    return v;
}

std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

template <typename T>
struct DeviceBuffer {
    T* p = nullptr;
    size_t n = 0;
    explicit DeviceBuffer(size_t count) : n(count) { p = device_alloc<T>(count, "test buffer"); }
    ~DeviceBuffer() { cudaFree(p); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    void poison() { CUDA_CHECK(cudaMemset(p, 0xFF, n * sizeof(T))); }  // bf16 0xFFFF and fp32 0xFFFFFFFF are NaN
    void upload(const std::vector<float>& v) {
        REQUIRE(v.size() == n);
        to_device(p, v.data(), n);
    }
    std::vector<float> download() const {
        CUDA_CHECK(cudaDeviceSynchronize());
        return to_host(p, n);
    }
    std::vector<uint8_t> bytes() const {
        CUDA_CHECK(cudaDeviceSynchronize());
        std::vector<uint8_t> b(n * sizeof(T));
        CUDA_CHECK(cudaMemcpy(b.data(), p, b.size(), cudaMemcpyDeviceToHost));
        return b;
    }
};

// ||gpu - ref|| / ||ref||
double rel_error(const std::vector<float>& gpu, const std::vector<double>& ref) {
    REQUIRE(gpu.size() == ref.size());
    double d = 0, r = 0;
    for (size_t i = 0; i < gpu.size(); i++) {
        d += (gpu[i] - ref[i]) * (gpu[i] - ref[i]);
        r += ref[i] * ref[i];
    }
    return r > 0 ? std::sqrt(d / r) : std::sqrt(d);
}

size_t count_nonfinite(const std::vector<float>& v) {
    size_t c = 0;
    for (float x : v) c += !std::isfinite(x);
    return c;
}

Config mla_config(int H, int dn, int dr, int dv, int dc, int yarn_variant) {
    Config c;
    c.num_attention_heads = H;
    c.qk_nope_head_dim = dn;
    c.qk_rope_head_dim = dr;
    c.v_head_dim = dv;
    c.kv_lora_rank = dc;
    if (yarn_variant) {
        c.yarn = true;
        c.yarn_factor = 4.0f;
        c.yarn_original_max_position_embeddings = 32;
        c.yarn_beta_fast = 32.0f;
        c.yarn_beta_slow = 1.0f;
        c.yarn_mscale = yarn_variant == 1 ? 1.0f : 0.0f;            // variant 2: attention factor != 1
        c.yarn_mscale_all_dim = yarn_variant == 1 ? 0.707f : 0.0f;  // variant 1: softmax scale changes too
    }
    return c;
}

const char* yarn_name(int v) { return v == 0 ? "plain" : v == 1 ? "yarn(mscale, mscale_all_dim)" : "yarn(attention factor)"; }

// Reference attention in double: out [B,T,H,dv], lse [B,H,T], and the backward.
struct AttRef {
    std::vector<double> out, lse, dq, dk, dv;
};

AttRef attention_reference(const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
                           const std::vector<double>& dout, int B, int T, int H, int dqk, int dv, double scale, AttentionDropout drop) {
    AttRef r;
    const size_t N = (size_t)B * T;
    std::vector<double> att((size_t)B * H * T * T);
    r.out.resize(N * H * dv);
    attention_forward(r.out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, dqk, dv, scale, drop);
    r.lse.resize((size_t)B * H * T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                std::vector<double> s(t + 1);
                double mx = -INFINITY;
                for (int j = 0; j <= t; j++) {
                    s[j] = scale * dot(&q[(((size_t)b * T + t) * H + h) * dqk], &k[(((size_t)b * T + j) * H + h) * dqk], dqk);
                    mx = std::max(mx, s[j]);
                }
                double sum = 0;
                for (int j = 0; j <= t; j++) sum += std::exp(s[j] - mx);
                r.lse[((size_t)b * H + h) * T + t] = mx + std::log(sum);
            }
    r.dq.assign(N * H * dqk, 0.0);
    r.dk.assign(N * H * dqk, 0.0);
    r.dv.assign(N * H * dv, 0.0);
    attention_backward(r.dq.data(), r.dk.data(), r.dv.data(), dout.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, dqk,
                       dv, scale, drop);
    return r;
}

}  // namespace

TEST_CASE("GPU RoPE forward and backward match the reference (plain and YaRN)") {
    struct Shape {
        int B, T, H, dn, dr, dc, pos0;
    };
    const Shape shapes[] = {{2, 37, 3, 16, 8, 24, 0}, {1, 5, 2, 8, 4, 12, 0}, {1, 4, 2, 64, 32, 64, 20}};
    for (int variant = 0; variant < 3; variant++)
        for (const Shape& s : shapes) {
            const int N = s.B * s.T, dqk = s.dn + s.dr;
            Config c = mla_config(s.H, s.dn, s.dr, 16, s.dc, variant);
            const RopeTable table = rope_build(c, 64);
            RopeGpu rope = rope_table_upload(table);
            for (int backward = 0; backward < 2; backward++) {
                CAPTURE(variant);
                CAPTURE(backward);
                CAPTURE(s.T);
                auto q = random_bf16((size_t)N * s.H * dqk, 100 + backward), kv = random_bf16((size_t)N * (s.dc + s.dr), 200 + backward);
                DeviceBuffer<bf16> dq(q.size()), dkv(kv.size());
                dq.upload(q);
                dkv.upload(kv);
                if (backward) rope_backward_gpu(dq.p, dkv.p, rope, N, s.T, s.H, s.dn, s.dc, s.pos0, 0);
                else rope_forward_gpu(dq.p, dkv.p, rope, N, s.T, s.H, s.dn, s.dc, s.pos0, 0);
                auto gq = dq.download(), gkv = dkv.download();
                auto rq = to_double(q), rkv = to_double(kv);
                for (int n = 0; n < N; n++) {
                    const int pos = s.pos0 + n % s.T;
                    for (int h = 0; h < s.H; h++) {
                        double* x = &rq[((size_t)n * s.H + h) * dqk + s.dn];
                        backward ? rope_backward(x, pos, table) : rope_forward(x, pos, table);
                    }
                    double* x = &rkv[(size_t)n * (s.dc + s.dr) + s.dc];
                    backward ? rope_backward(x, pos, table) : rope_forward(x, pos, table);
                }
                // the columns outside q_pe / k_pe are untouched, bit for bit
                size_t moved = 0;
                for (int n = 0; n < N; n++) {
                    for (int h = 0; h < s.H; h++)
                        for (int i = 0; i < s.dn; i++) moved += gq[((size_t)n * s.H + h) * dqk + i] != q[((size_t)n * s.H + h) * dqk + i];
                    for (int i = 0; i < s.dc; i++) moved += gkv[(size_t)n * (s.dc + s.dr) + i] != kv[(size_t)n * (s.dc + s.dr) + i];
                }
                CHECK(moved == 0);
                const double eq = rel_error(gq, rq), ekv = rel_error(gkv, rkv);
                printf("rope %-8s %-28s B=%d T=%d H=%d dn=%d dr=%d dc=%d pos0=%d: rel err q %.2e kv_a %.2e\n",
                       backward ? "backward" : "forward", yarn_name(variant), s.B, s.T, s.H, s.dn, s.dr, s.dc, s.pos0, eq, ekv);
                CHECK(eq < 2e-2);
                CHECK(ekv < 2e-2);
            }
            rope_table_free(rope);
        }
}

TEST_CASE("GPU MLA K/V assembly forward and backward match the reference") {
    struct Shape {
        int N, H, dn, dr, dv, dc;
    };
    const Shape shapes[] = {{70, 3, 32, 16, 24, 48}, {9, 2, 8, 4, 6, 12}, {5, 1, 128, 64, 128, 512}};
    for (const Shape& s : shapes) {
        CAPTURE(s.N);
        CAPTURE(s.dn);
        const int N = s.N, H = s.H, dn = s.dn, dr = s.dr, dv = s.dv, dc = s.dc, dqk = dn + dr;
        // forward: pure copies, so exact
        auto kv_b = random_bf16((size_t)N * H * (dn + dv), 1), kv_a = random_bf16((size_t)N * (dc + dr), 2);
        DeviceBuffer<bf16> d_kv_b(kv_b.size()), d_kv_a(kv_a.size()), d_k((size_t)N * H * dqk), d_v((size_t)N * H * dv);
        d_kv_b.upload(kv_b);
        d_kv_a.upload(kv_a);
        d_k.poison();
        d_v.poison();
        mla_assemble_kv_gpu(d_k.p, d_v.p, d_kv_b.p, d_kv_a.p, N, H, dn, dr, dv, dc, 0);
        auto k = d_k.download(), v = d_v.download();
        size_t wrong = 0;
        for (int n = 0; n < N; n++)
            for (int h = 0; h < H; h++) {
                const size_t nh = (size_t)n * H + h;
                for (int i = 0; i < dn; i++) wrong += k[nh * dqk + i] != kv_b[nh * (dn + dv) + i];
                for (int i = 0; i < dr; i++) wrong += k[nh * dqk + dn + i] != kv_a[(size_t)n * (dc + dr) + dc + i];
                for (int i = 0; i < dv; i++) wrong += v[nh * dv + i] != kv_b[nh * (dn + dv) + dn + i];
            }
        CHECK(wrong == 0);

        // backward: copies exact, the k_pe gradient a sum over heads
        auto dk = random_bf16((size_t)N * H * dqk, 3), dvv = random_bf16((size_t)N * H * dv, 4);
        auto latent = random_bf16((size_t)N * (dc + dr), 5);  // columns [0, dc) must survive
        DeviceBuffer<bf16> d_dk(dk.size()), d_dv(dvv.size()), d_dkv_b(kv_b.size()), d_dkv_a(kv_a.size());
        d_dk.upload(dk);
        d_dv.upload(dvv);
        d_dkv_b.poison();
        d_dkv_a.upload(latent);
        for (int n = 0; n < N; n++)  // poison the k_pe columns
            CUDA_CHECK(cudaMemset(d_dkv_a.p + (size_t)n * (dc + dr) + dc, 0xFF, dr * sizeof(bf16)));
        mla_assemble_kv_backward_gpu(d_dkv_b.p, d_dkv_a.p, d_dk.p, d_dv.p, N, H, dn, dr, dv, dc, 0);
        auto dkv_b = d_dkv_b.download(), dkv_a = d_dkv_a.download();
        wrong = 0;
        std::vector<double> ref_pe((size_t)N * dr, 0.0);
        std::vector<float> got_pe((size_t)N * dr);
        for (int n = 0; n < N; n++) {
            for (int h = 0; h < H; h++) {
                const size_t nh = (size_t)n * H + h;
                for (int i = 0; i < dn; i++) wrong += dkv_b[nh * (dn + dv) + i] != dk[nh * dqk + i];
                for (int i = 0; i < dv; i++) wrong += dkv_b[nh * (dn + dv) + dn + i] != dvv[nh * dv + i];
                for (int i = 0; i < dr; i++) ref_pe[(size_t)n * dr + i] += dk[nh * dqk + dn + i];
            }
            for (int i = 0; i < dc; i++) wrong += dkv_a[(size_t)n * (dc + dr) + i] != latent[(size_t)n * (dc + dr) + i];
            for (int i = 0; i < dr; i++) got_pe[(size_t)n * dr + i] = dkv_a[(size_t)n * (dc + dr) + dc + i];
        }
        CHECK(wrong == 0);
        CHECK(count_nonfinite(got_pe) == 0);
        const double e = rel_error(got_pe, ref_pe);
        printf("assembly N=%d H=%d dn=%d dr=%d dv=%d dc=%d: copies exact, k_pe grad rel err %.2e\n", N, H, dn, dr, dv, dc, e);
        CHECK(e < 2e-2);
    }
}

TEST_CASE("GPU flash attention forward and backward match the reference, with and without dropout on the probabilities") {
    struct Shape {
        int B, T, H, dqk, dv;
    };
    const Shape shapes[] = {
        {1, 1, 1, 24, 16},     // T = 1, H = 1
        {2, 77, 3, 24, 16},    // T not a multiple of the tile, B > 1
        {1, 64, 2, 32, 32},    // exactly one tile
        {1, 130, 2, 96, 64},   // the presets' head sizes, 3 tiles with a ragged tail
        {1, 130, 2, 80, 48},   // sizes off the exact-size kernels, in the 128 and 64 buckets
        {2, 100, 2, 192, 128}, // DeepSeek-V3's head sizes
        {1, 150, 1, 256, 256}, // the largest head sizes
        {1, 65, 1, 40, 72},    // dv > dqk, sizes not multiples of 32
        {1, 70, 2, 12, 6},     // the tiny preset: sizes not multiples of 8 (element-load path)
        {1, 513, 2, 96, 64},   // many tiles: the prefetch pipelines run 9 deep, 1-row tail
        {2, 300, 4, 192, 128}, // DeepSeek-V3's head sizes, more tiles
        {1, 2100, 1, 96, 64},  // past ATTENTION_KEEP_DS_MAX_T: dQ recomputes S and dP instead of reading the kept dS
    };
    static_assert(2100 > mla_detail::ATTENTION_KEEP_DS_MAX_T, "a shape must take the recomputing dQ kernel");
    for (const AttentionDropout drop : {AttentionDropout{}, AttentionDropout{0.2f, 1234}}) {
        for (const Shape& s : shapes) {
            CAPTURE(drop.p);
            const int B = s.B, T = s.T, H = s.H, dqk = s.dqk, dv = s.dv;
            CAPTURE(B);
            CAPTURE(T);
            CAPTURE(H);
            CAPTURE(dqk);
            CAPTURE(dv);
            const size_t N = (size_t)B * T;
            const double scale = 1.0 / std::sqrt((double)dqk);
            auto q = random_bf16(N * H * dqk, 11, 2.0f), k = random_bf16(N * H * dqk, 12, 2.0f), v = random_bf16(N * H * dv, 13);
            auto dout = random_bf16(N * H * dv, 14);
            DeviceBuffer<bf16> d_q(q.size()), d_k(k.size()), d_v(v.size()), d_dout(dout.size());
            DeviceBuffer<bf16> d_out(N * H * dv), d_dq(q.size()), d_dk(k.size()), d_dv(v.size());
            DeviceBuffer<float> d_lse((size_t)B * H * T), d_scratch(attention_backward_scratch_floats(B, T, H));
            d_q.upload(q);
            d_k.upload(k);
            d_v.upload(v);
            d_dout.upload(dout);
            d_out.poison();
            d_lse.poison();
            d_dq.poison();
            d_dk.poison();
            d_dv.poison();
            d_scratch.poison();
            attention_forward_gpu(d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, B, T, H, dqk, dv, (float)scale, 0, drop);
            attention_backward_gpu(d_dq.p, d_dk.p, d_dv.p, d_dout.p, d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, B, T, H, dqk, dv, (float)scale,
                                   d_scratch.p, 0, drop);
            auto out = d_out.download(), lse = d_lse.download(), dq = d_dq.download(), dk = d_dk.download(), dvv = d_dv.download();
            CHECK(count_nonfinite(out) == 0);
            CHECK(count_nonfinite(lse) == 0);
            CHECK(count_nonfinite(dq) == 0);
            CHECK(count_nonfinite(dk) == 0);
            CHECK(count_nonfinite(dvv) == 0);

            AttRef ref = attention_reference(to_double(q), to_double(k), to_double(v), to_double(dout), B, T, H, dqk, dv, scale, drop);
            const double e_out = rel_error(out, ref.out), e_lse = rel_error(lse, ref.lse), e_dq = rel_error(dq, ref.dq),
                         e_dk = rel_error(dk, ref.dk), e_dv = rel_error(dvv, ref.dv);
            printf("attention B=%d T=%d H=%d dqk=%d dv=%d dropout %g: rel err out %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n", B, T, H,
                   dqk, dv, drop.p, e_out, e_lse, e_dq, e_dk, e_dv);
            CHECK(e_out < 2e-2);
            CHECK(e_lse < 1e-5);  // fp32 path
            CHECK(e_dq < 2e-2);
            CHECK(e_dk < 2e-2);
            CHECK(e_dv < 2e-2);

            // determinism: a second forward and backward (into re-poisoned buffers) are bit-identical
            auto out_bytes = d_out.bytes(), lse_bytes = d_lse.bytes(), dq_bytes = d_dq.bytes(), dk_bytes = d_dk.bytes(),
                 dv_bytes = d_dv.bytes();
            d_out.poison();
            d_lse.poison();
            d_dq.poison();
            d_dk.poison();
            d_dv.poison();
            attention_forward_gpu(d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, B, T, H, dqk, dv, (float)scale, 0, drop);
            attention_backward_gpu(d_dq.p, d_dk.p, d_dv.p, d_dout.p, d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, B, T, H, dqk, dv, (float)scale,
                                   d_scratch.p, 0, drop);
            CHECK(d_out.bytes() == out_bytes);
            CHECK(d_lse.bytes() == lse_bytes);
            CHECK(d_dq.bytes() == dq_bytes);
            CHECK(d_dk.bytes() == dk_bytes);
            CHECK(d_dv.bytes() == dv_bytes);

            // the same calls captured into a CUDA graph and replayed give the same bits
            cudaStream_t stream;
            CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
            cudaGraph_t graph;
            cudaGraphExec_t exec;
            CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
            attention_forward_gpu(d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, B, T, H, dqk, dv, (float)scale, stream, drop);
            attention_backward_gpu(d_dq.p, d_dk.p, d_dv.p, d_dout.p, d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, B, T, H, dqk, dv, (float)scale,
                                   d_scratch.p, stream, drop);
            CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
            CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
            d_out.poison();
            d_lse.poison();
            d_dq.poison();
            d_dk.poison();
            d_dv.poison();
            CUDA_CHECK(cudaDeviceSynchronize());  // the poisoning ran on the legacy stream, which `stream` does not wait for
            CUDA_CHECK(cudaGraphLaunch(exec, stream));
            CUDA_CHECK(cudaStreamSynchronize(stream));
            CHECK(d_out.bytes() == out_bytes);
            CHECK(d_lse.bytes() == lse_bytes);
            CHECK(d_dq.bytes() == dq_bytes);
            CHECK(d_dk.bytes() == dk_bytes);
            CHECK(d_dv.bytes() == dv_bytes);
            CUDA_CHECK(cudaGraphExecDestroy(exec));
            CUDA_CHECK(cudaGraphDestroy(graph));
            CUDA_CHECK(cudaStreamDestroy(stream));
        }
    }
}

TEST_CASE("GPU flash attention is causal") {
    const int B = 2, T = 100, H = 2, dqk = 96, dv = 64, t0 = 57;
    const size_t N = (size_t)B * T;
    const float scale = 1.0f / std::sqrt((float)dqk);
    auto q = random_bf16(N * H * dqk, 21, 2.0f), k = random_bf16(N * H * dqk, 22, 2.0f), v = random_bf16(N * H * dv, 23);
    auto dout = random_bf16(N * H * dv, 24);
    DeviceBuffer<bf16> d_q(q.size()), d_k(k.size()), d_v(v.size()), d_dout(dout.size());
    DeviceBuffer<bf16> d_out(N * H * dv), d_dq(q.size()), d_dk(k.size()), d_dv(v.size());
    DeviceBuffer<float> d_lse((size_t)B * H * T), d_scratch(attention_backward_scratch_floats(B, T, H));
    d_q.upload(q);
    d_dout.upload(dout);
    auto run = [&](const std::vector<float>& kk, const std::vector<float>& vv, std::vector<float>& out, std::vector<float>& dq) {
        d_k.upload(kk);
        d_v.upload(vv);
        d_out.poison();
        d_dq.poison();
        attention_forward_gpu(d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, B, T, H, dqk, dv, scale, 0);
        attention_backward_gpu(d_dq.p, d_dk.p, d_dv.p, d_dout.p, d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, B, T, H, dqk, dv, scale,
                               d_scratch.p, 0);
        out = d_out.download();
        dq = d_dq.download();
    };
    std::vector<float> out1, dq1, out2, dq2;
    run(k, v, out1, dq1);
    auto k2 = k, v2 = v;  // change key and value at position t0 of every sequence and head
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            for (int i = 0; i < dqk; i++) k2[(((size_t)b * T + t0) * H + h) * dqk + i] *= -1.5f;
            for (int i = 0; i < dv; i++) v2[(((size_t)b * T + t0) * H + h) * dv + i] += 1.0f;
        }
    run(k2, v2, out2, dq2);
    size_t before_changed = 0, at_changed = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
                const size_t ro = (((size_t)b * T + t) * H + h) * dv, rq = (((size_t)b * T + t) * H + h) * dqk;
                size_t diff = 0;
                for (int i = 0; i < dv; i++) diff += memcmp(&out1[ro + i], &out2[ro + i], sizeof(float)) != 0;
                for (int i = 0; i < dqk; i++) diff += memcmp(&dq1[rq + i], &dq2[rq + i], sizeof(float)) != 0;
                if (t < t0) before_changed += diff;
                if (t == t0) at_changed += diff;
            }
    CHECK(before_changed == 0);  // out and dq before t0 bit-identical
    CHECK(at_changed > 0);       // ...and the change is seen at t0
}

namespace {

// One MLA layer, mla_forward_gpu / mla_backward_gpu as the model runs them, against
// mla_forward / mla_backward in double on the same bf16 weights (layer 0 of a
// model with randomised weights) and inputs: out, dx and every weight gradient.
void check_mla_layer(const Config& c, int B, int T, uint64_t seed, AttentionDropout drop = {}) {
    const int N = B * T, D = c.hidden_size, H = c.num_attention_heads, qr = c.q_lora_rank, dc = c.kv_lora_rank;
    const int dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
    RefModel<double> m;
    ref_init(m, c);
    randomise_weights(m, seed, true);
    auto x = random_bf16((size_t)N * D, seed + 1, 1.5f), dout = random_bf16((size_t)N * D, seed + 2);
    MlaActs<double> acts;
    std::vector<double> out_ref((size_t)N * D), dx_ref((size_t)N * D, 0.0);
    mla_forward(c, m.w.layers[0].attn, m.rope, out_ref.data(), to_double(x).data(), B, T, acts, drop);
    mla_backward(c, m.w.layers[0].attn, m.g.layers[0].attn, m.rope, dx_ref.data(), to_double(dout).data(), to_double(x).data(), B, T, acts);

    const size_t P = m.layout.total;
    DeviceBuffer<bf16> d_params(P), d_x(x.size()), d_dout(dout.size()), d_out((size_t)N * D), d_dx((size_t)N * D);
    DeviceBuffer<float> d_grads(P);
    d_params.upload(std::vector<float>(m.params.begin(), m.params.end()));
    d_x.upload(x);
    d_dout.upload(dout);
    CUDA_CHECK(cudaMemset(d_grads.p, 0, P * sizeof(float)));
    d_out.poison();
    d_dx.poison();
    const MlaWeights<bf16> w = bind_weights(c, m.layout, d_params.p).layers[0].attn;
    const MlaWeights<float> dw = bind_weights(c, m.layout, d_grads.p).layers[0].attn;
    DeviceArena arena;
    MlaActsGpu a = mla_layer_alloc(arena, c, N, mla_shared_alloc(arena, c, N, true));
    GpuContext ctx;
    matmul_init(ctx.mm);
    ctx.scratch_bytes = std::max(attention_backward_scratch_floats(B, T, H) * sizeof(float), rmsnorm_backward_scratch_bytes(N, std::max(dc, qr)));
    ctx.scratch = arena_alloc<char>(arena, ctx.scratch_bytes, "test scratch");
    RopeGpu rope = rope_table_upload(m.rope);
    mla_forward_gpu(c, w, rope, d_out.p, d_x.p, B, T, a, ctx, drop);
    mla_backward_gpu(c, w, dw, rope, d_dx.p, d_dout.p, d_x.p, B, T, a, ctx);
    auto out = d_out.download(), dx = d_dx.download(), grads = d_grads.download();

    CHECK(count_nonfinite(out) == 0);
    CHECK(count_nonfinite(dx) == 0);
    const double e_out = rel_error(out, out_ref), e_dx = rel_error(dx, dx_ref);
    std::string line = strfmt("MLA layer q_lora=%d yarn=%d B=%d T=%d H=%d dn=%d dr=%d dv=%d dc=%d dropout %g: out %.2e dx %.2e", qr,
                              (int)c.yarn, B, T, H, dn, dr, dv, dc, drop.p, e_out, e_dx);
    CHECK(e_out < 2e-2);
    CHECK(e_dx < 2e-2);
    for (const TensorSpec& s : m.layout.tensors) {
        if (s.name.rfind("model.layers.0.self_attn.", 0) != 0) continue;
        std::vector<float> g(grads.begin() + s.offset, grads.begin() + s.offset + s.numel);
        std::vector<double> ref(m.grads.begin() + s.offset, m.grads.begin() + s.offset + s.numel);
        const double e = rel_error(g, ref);
        line += strfmt(" d%s %.2e", s.name.c_str() + strlen("model.layers.0.self_attn."), e);
        CAPTURE(s.name);
        CHECK(count_nonfinite(g) == 0);
        CHECK(e < 2e-2);
    }
    printf("%s\n", line.c_str());
    rope_table_free(rope);
    matmul_free(ctx.mm);
    arena_free(arena);
}

}  // namespace

TEST_CASE("GPU MLA layer (mla_forward_gpu / mla_backward_gpu) matches mla_forward / mla_backward") {
    check_mla_layer(tiny_variant(2, 61), 2, 40, 31);  // q_lora and YaRN
    Config long_context = tiny_variant(2, 61);
    long_context.max_position_embeddings = 128;
    check_mla_layer(long_context, 2, 70, 34, AttentionDropout{0.3f, 7});  // dropout on the probabilities, 2 tiles
    check_mla_layer(tiny_variant(1, 61), 3, 33, 32);  // plain q_proj
    Config wide = tiny_variant(0, 61);                // 16-byte paths: every width a multiple of 8
    wide.hidden_size = 64;
    wide.num_attention_heads = 3;
    wide.q_lora_rank = 24;
    wide.kv_lora_rank = 48;
    wide.qk_nope_head_dim = 32;
    wide.qk_rope_head_dim = 16;
    wide.v_head_dim = 32;
    wide.max_position_embeddings = 128;
    check_mla_layer(wide, 2, 70, 33);
}

// Timing, not a check: skipped by default; run with  --no-skip -tc="*timing*"
TEST_CASE("GPU flash attention timing" * doctest::skip()) {
    struct Shape {
        int B, T, H, dqk, dv;
    };
    for (const Shape& s : {Shape{8, 1024, 16, 192, 128}, Shape{8, 1024, 12, 96, 64}}) {
        const int B = s.B, T = s.T, H = s.H, dqk = s.dqk, dv = s.dv;
        const size_t N = (size_t)B * T;
        DeviceBuffer<bf16> d_q(N * H * dqk), d_k(N * H * dqk), d_v(N * H * dv), d_dout(N * H * dv), d_out(N * H * dv);
        DeviceBuffer<bf16> d_dq(N * H * dqk), d_dk(N * H * dqk), d_dv(N * H * dv);
        DeviceBuffer<float> d_lse((size_t)B * H * T), d_scratch(attention_backward_scratch_floats(B, T, H));
        d_q.upload(random_bf16(d_q.n, 41, 2.0f));
        d_k.upload(random_bf16(d_k.n, 42, 2.0f));
        d_v.upload(random_bf16(d_v.n, 43));
        d_dout.upload(random_bf16(d_dout.n, 44));
        const float scale = 1.0f / std::sqrt((float)dqk);
        const double fwd = gpu_median_ms([&] { attention_forward_gpu(d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, B, T, H, dqk, dv, scale, 0); });
        const double bwd = gpu_median_ms([&] {
            attention_backward_gpu(d_dq.p, d_dk.p, d_dv.p, d_dout.p, d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, B, T, H, dqk, dv, scale,
                                   d_scratch.p, 0);
        });
        // the backward's main kernels on their own (D from the run above stays in scratch): dK/dV without and with
        // keeping dS, dQ recomputing S and dP, dQ from the kept dS
        bf16* ds = reinterpret_cast<bf16*>(d_scratch.p + mla_detail::d_floats(B, T, H));
        const double t_dkdv = gpu_median_ms([&] {
            mla_detail::backward_dkdv(d_dk.p, d_dv.p, nullptr, d_q.p, d_k.p, d_v.p, d_dout.p, d_lse.p, d_scratch.p, B, T, H, dqk, dv, scale,
                                      mla_detail::dropout_args({}), 0);
        });
        const double t_dkdv_ds = gpu_median_ms([&] {
            mla_detail::backward_dkdv(d_dk.p, d_dv.p, ds, d_q.p, d_k.p, d_v.p, d_dout.p, d_lse.p, d_scratch.p, B, T, H, dqk, dv, scale,
                                      mla_detail::dropout_args({}), 0);
        });
        const double t_dq = gpu_median_ms([&] {
            mla_detail::backward_dq(d_dq.p, d_q.p, d_k.p, d_v.p, d_dout.p, d_lse.p, d_scratch.p, B, T, H, dqk, dv, scale,
                                    mla_detail::dropout_args({}), 0);
        });
        const double t_dq_ds = gpu_median_ms([&] { mla_detail::backward_dq_from_ds(d_dq.p, ds, d_k.p, B, T, H, dqk, dv, scale, 0); });
        printf("  backward split: dK/dV kernel %.3f ms (keeping dS %.3f), dQ kernel recomputing %.3f ms, from dS %.3f ms\n", t_dkdv,
               t_dkdv_ds, t_dq, t_dq_ds);
        // causal FLOPs: pairs (t, j <= t); forward QK^T + PV, backward QK^T + dO V^T + P^T dO + dS^T Q + dS K
        const double pairs = (double)B * H * T * (T + 1) / 2;
        const double f_fwd = 2 * pairs * (dqk + dv), f_bwd = 2 * pairs * (3 * dqk + 2 * dv);
        printf("attention timing B=%d T=%d H=%d dqk=%d dv=%d: forward %.3f ms (%.1f TFLOP/s), backward %.3f ms (%.1f TFLOP/s)\n", B, T,
               H, dqk, dv, fwd, f_fwd / fwd * 1e-9, bwd, f_bwd / bwd * 1e-9);
    }
}
