// gpu_moe.cu — the MoE kernels of moe.cuh against the CPU reference (reference.h,
// run in double on the same bf16-rounded / fp32 inputs): router forward and
// backward (routing decisions identical, fp32 values < 1e-5 relative), balance
// loss, the permutation, gather / combine / scatter, the grouped GEMMs (experts
// with 0 and 1 rows, tile-unaligned counts, both load paths), a whole MoE layer
// forward and backward on the tiny preset and its variants, and determinism.
// Every output is poisoned first (0xFF bytes: NaN / -1) and checked to be written.
// Relative error is ||gpu - ref|| / ||ref||; measured values are printed.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <type_traits>

#include "moe.cuh"
#include "reference.h"

namespace {

// a device buffer that frees itself
template <typename T>
struct Dev {
    T* p = nullptr;
    size_t n = 0;
    explicit Dev(size_t count, const char* what = "test buffer") : p(device_alloc<T>(count, what)), n(count) {}
    ~Dev() { cudaFree(p); }
    Dev(const Dev&) = delete;
    Dev& operator=(const Dev&) = delete;
    operator T*() const { return p; }
    void poison() { CUDA_CHECK(cudaMemset(p, 0xFF, n * sizeof(T) + (n == 0))); }
    void zero() { CUDA_CHECK(cudaMemset(p, 0, n * sizeof(T) + (n == 0))); }
    template <typename H>
    void upload(const std::vector<H>& h) {
        REQUIRE(h.size() == n);
        if constexpr (std::is_same<T, int>::value) CUDA_CHECK(cudaMemcpy(p, h.data(), n * sizeof(int), cudaMemcpyHostToDevice));
        else to_device(p, h.data(), n);
    }
    std::vector<float> download() const { return to_host(p, n); }
};

std::vector<int> download_ints(const int* p, size_t n) {
    std::vector<int> h(n);
    CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(int), cudaMemcpyDeviceToHost));
    return h;
}

template <typename T>
std::vector<T> download_raw(const T* p, size_t n) {
    std::vector<T> h(n);
    CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

// fresh non-zero random values: scale * N(0, 1)
std::vector<double> randn(size_t n, uint64_t key, double scale = 1.0) {
    std::vector<double> v(n);
    for (size_t i = 0; i < n; i++) {
        v[i] = scale * rng_normal(key, i);
        if (v[i] == 0) v[i] = scale * 1e-3;
    }
    return v;
}

// rounds to what the device sees: bf16 or fp32
std::vector<double> round_bf16(std::vector<double> v) {
    for (double& x : v) x = (double)(float)__float2bfloat16((float)x);
    return v;
}
std::vector<double> round_f32(std::vector<double> v) {
    for (double& x : v) x = (double)(float)x;
    return v;
}

double rel_err(const std::vector<float>& gpu, const std::vector<double>& ref) {
    REQUIRE(gpu.size() == ref.size());
    double d = 0, r = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        d += ((double)gpu[i] - ref[i]) * ((double)gpu[i] - ref[i]);
        r += ref[i] * ref[i];
    }
    return r > 0 ? std::sqrt(d / r) : std::sqrt(d);
}

// measured errors go to stdout (doctest prints MESSAGE only in some modes)
void report(const std::string& line) {
    printf("%s\n", line.c_str());
    fflush(stdout);
}

bool all_finite(const std::vector<float>& v) {
    for (float x : v)
        if (!std::isfinite(x)) return false;
    return true;
}

bool bit_equal(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// the CPU reference's router on given logits: hidden_size = E and an identity router matrix
RouterActs<double> reference_router(const Config& c, const std::vector<double>& logits, const std::vector<double>& bias, int N) {
    const int E = c.n_routed_experts;
    Config ci = c;
    ci.hidden_size = E;
    std::vector<double> eye((size_t)E * E, 0.0), z((size_t)N * E);
    for (int e = 0; e < E; e++) eye[(size_t)e * E + e] = 1.0;
    RouterActs<double> ra;
    router_forward(ci, z.data(), logits.data(), eye.data(), bias.data(), N, ra);
    return ra;
}

// ----------------------------------------------------------------------------
// router

void check_router(Config c, int N, uint64_t seed, bool extra) {
    config_check(c);
    const int E = c.n_routed_experts, K = c.num_experts_per_tok;
    auto logits = round_f32(randn((size_t)N * E, seed, c.scoring_func == SCORING_SOFTMAX ? 2.0 : 1.5));
    auto bias = round_f32(randn(E, seed + 1, 0.1));
    RouterActs<double> ra = reference_router(c, logits, bias, N);

    Dev<float> d_logits((size_t)N * E), d_bias(E), d_scores((size_t)N * E), d_gate((size_t)N * K);
    Dev<int> d_expert((size_t)N * K), d_load(E);
    d_logits.upload(logits);
    d_bias.upload(bias);
    d_scores.poison();
    d_gate.poison();
    d_expert.poison();
    std::vector<int> load0(E, 5);  // load accumulates
    d_load.upload(load0);
    router_forward_gpu(d_scores, d_expert, d_gate, d_load, d_logits, d_bias, c, N, 0);
    CUDA_CHECK(cudaDeviceSynchronize());

    auto scores = d_scores.download(), gate = d_gate.download();
    auto expert = download_ints(d_expert, (size_t)N * K), load = download_ints(d_load, E);
    CHECK(all_finite(scores));
    CHECK(all_finite(gate));
    CHECK(expert == ra.expert);
    std::vector<int> want_load(E, 5);
    for (int x : ra.expert) want_load[x]++;
    CHECK(load == want_load);
    const double es = rel_err(scores, ra.scores), eg = rel_err(gate, ra.gate);
    CHECK(es < 1e-5);
    CHECK(eg < 1e-5);

    // backward, on the GPU's (identical) routing
    auto dgate = round_f32(randn((size_t)N * K, seed + 2));
    auto dextra = round_f32(randn((size_t)N * E, seed + 3, 0.3));
    std::vector<double> dlogits_ref((size_t)N * E);
    router_backward(c, dlogits_ref.data(), dgate.data(), extra ? dextra.data() : nullptr, ra, N);
    Dev<float> d_dgate((size_t)N * K), d_dextra((size_t)N * E), d_dlogits((size_t)N * E);
    d_dgate.upload(dgate);
    d_dextra.upload(dextra);
    d_dlogits.poison();
    router_backward_gpu(d_dlogits, d_dgate, extra ? d_dextra.p : nullptr, d_scores, d_expert, c, N, 0);
    CUDA_CHECK(cudaDeviceSynchronize());
    auto dlogits = d_dlogits.download();
    CHECK(all_finite(dlogits));
    const double ed = rel_err(dlogits, dlogits_ref);
    CHECK(ed < 1e-5);
    report(strfmt("router E=%d K=%d G=%d/%d %s norm=%d N=%d: scores %.2e gate %.2e dlogits %.2e", E, K, c.n_group, c.topk_group,
                   c.scoring_func == SCORING_SOFTMAX ? "softmax" : "sigmoid", (int)c.norm_topk_prob, N, es, eg, ed));
}

Config tiny() { return config_preset("tiny"); }

}  // namespace

TEST_CASE("moe router forward/backward match the reference") {
    Config c = tiny();
    check_router(c, 300, 11, false);
    check_router(c, 300, 12, true);
    Config s = tiny();
    s.scoring_func = SCORING_SOFTMAX;
    check_router(s, 257, 13, true);
    Config g1 = tiny();
    g1.n_group = 1;
    g1.topk_group = 1;
    check_router(g1, 200, 14, true);
    Config nn = tiny();
    nn.norm_topk_prob = false;
    check_router(nn, 200, 15, true);
    // DeepSeek-V3's routing shape: 256 experts, 8 groups, 4 kept, top-8
    Config big = tiny();
    big.n_routed_experts = 256;
    big.num_experts_per_tok = 8;
    big.n_group = 8;
    big.topk_group = 4;
    check_router(big, 2048, 16, true);
    big.scoring_func = SCORING_SOFTMAX;
    check_router(big, 1024, 17, false);
    // E not a multiple of 32, groups straddling lanes
    Config odd = tiny();
    odd.n_routed_experts = 48;
    odd.num_experts_per_tok = 5;
    odd.n_group = 4;
    odd.topk_group = 2;
    check_router(odd, 777, 18, true);
    odd.n_group = 1;
    odd.topk_group = 1;
    odd.norm_topk_prob = false;
    check_router(odd, 333, 19, false);
}

// ----------------------------------------------------------------------------
// balance loss

namespace {
void check_balance(Config c, int B, int T, uint64_t seed) {
    const int E = c.n_routed_experts, K = c.num_experts_per_tok, N = B * T;
    auto logits = round_f32(randn((size_t)N * E, seed, 1.5));
    auto bias = round_f32(randn(E, seed + 1, 0.1));
    RouterActs<double> ra = reference_router(c, logits, bias, N);
    ra.scores = round_f32(ra.scores);  // the device gets fp32 scores
    const double alpha = 0.01, dloss = 1.3;
    const double loss_ref = balance_loss_forward(c, ra, B, T, alpha);
    std::vector<double> ds_ref((size_t)N * E);
    balance_loss_backward(c, ds_ref.data(), ra, B, T, alpha, dloss);

    Dev<float> d_scores((size_t)N * E), d_loss(1), d_frac((size_t)B * E), d_seq(B), d_ds((size_t)N * E);
    Dev<int> d_expert((size_t)N * K);
    d_scores.upload(ra.scores);
    d_expert.upload(ra.expert);
    d_loss.poison();
    d_frac.poison();
    d_ds.poison();
    balance_loss_forward_gpu(d_loss, d_frac, d_seq, d_scores, d_expert, B, T, E, K, (float)alpha, false, 0);
    balance_loss_backward_gpu(d_ds, d_frac, d_scores, B, T, E, (float)alpha, (float)dloss, 0);
    CUDA_CHECK(cudaDeviceSynchronize());
    const float loss = d_loss.download()[0];
    auto ds = d_ds.download();
    CHECK(std::isfinite(loss));
    CHECK(all_finite(ds));
    const double el = std::fabs(loss - loss_ref) / std::fabs(loss_ref), ed = rel_err(ds, ds_ref);
    CHECK(el < 1e-5);
    CHECK(ed < 1e-5);
    // deterministic, and accumulating adds the same value again
    balance_loss_forward_gpu(d_loss, d_frac, d_seq, d_scores, d_expert, B, T, E, K, (float)alpha, true, 0);
    CHECK(d_loss.download()[0] == 2 * loss);
    report(strfmt("balance loss E=%d K=%d B=%d T=%d: loss %.2e dscores %.2e", E, K, B, T, el, ed));
}
}  // namespace

TEST_CASE("moe balance loss forward/backward match the reference") {
    check_balance(tiny(), 3, 37, 21);
    Config big = tiny();
    big.n_routed_experts = 256;
    big.num_experts_per_tok = 8;
    big.n_group = 8;
    big.topk_group = 4;
    check_balance(big, 4, 512, 22);
}

// ----------------------------------------------------------------------------
// permutation

namespace {
void check_permute(int S, int E, uint64_t seed) {
    std::vector<int> expert(S);
    for (int i = 0; i < S; i++) {
        int e = (int)(rng_hash(seed, i) % (uint64_t)E);
        if (E > 2 && e == 1) e = 0;  // expert 1 gets no rows
        expert[i] = e;
    }
    // reference: rows of each expert in ascending slot order
    std::vector<int> offsets(E + 1, 0), slot_row(S), row_slot(S);
    for (int x : expert) offsets[x + 1]++;
    for (int e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    std::vector<int> next(offsets.begin(), offsets.end() - 1);
    for (int i = 0; i < S; i++) {
        slot_row[i] = next[expert[i]]++;
        row_slot[slot_row[i]] = i;
    }
    Dev<int> d_expert(S), d_offsets(E + 1), d_slot_row(S), d_row_slot(S), d_scratch(moe_permute_scratch_ints(S, E));
    d_expert.upload(expert);
    for (int rep = 0; rep < 2; rep++) {
        d_offsets.poison();
        d_slot_row.poison();
        d_row_slot.poison();
        d_scratch.poison();
        moe_permute_gpu(d_offsets, d_slot_row, d_row_slot, d_scratch, d_expert, S, E, 0);
        CUDA_CHECK(cudaDeviceSynchronize());
        CHECK(download_ints(d_offsets, E + 1) == offsets);
        CHECK(download_ints(d_slot_row, S) == slot_row);
        CHECK(download_ints(d_row_slot, S) == row_slot);
    }
}
}  // namespace

TEST_CASE("moe permutation by expert is stable and exact") {
    check_permute(30, 8, 31);
    check_permute(5000, 3, 32);
    check_permute(2048 * 3 + 17, 64, 33);
    check_permute(131072 * 8, 256, 34);  // 1M slots
    check_permute(96, 256, 35);          // more experts than slots
}

// ----------------------------------------------------------------------------
// gather, combine, scatter

namespace {
void check_gather_combine(int N, int K, int D, int E, uint64_t seed) {
    const int S = N * K;
    std::vector<int> expert(S);
    for (int i = 0; i < S; i++) expert[i] = (int)(rng_hash(seed, i) % (uint64_t)E);
    Dev<int> d_expert(S), d_offsets(E + 1), d_slot_row(S), d_row_slot(S), d_scratch(moe_permute_scratch_ints(S, E));
    d_expert.upload(expert);
    moe_permute_gpu(d_offsets, d_slot_row, d_row_slot, d_scratch, d_expert, S, E, 0);
    auto slot_row = download_ints(d_slot_row, S), row_slot = download_ints(d_row_slot, S);

    auto u = round_bf16(randn((size_t)N * D, seed + 1));
    auto y = round_bf16(randn((size_t)S * D, seed + 2));
    auto shared = round_bf16(randn((size_t)N * D, seed + 3));
    auto gate = round_f32(randn((size_t)S, seed + 4, 0.5));
    auto dout = round_bf16(randn((size_t)N * D, seed + 5));
    auto dx = round_bf16(randn((size_t)S * D, seed + 6));
    auto du0 = round_bf16(randn((size_t)N * D, seed + 7));

    Dev<bf16> d_u((size_t)N * D), d_x((size_t)S * D), d_y((size_t)S * D), d_sh((size_t)N * D), d_out((size_t)N * D),
        d_dout((size_t)N * D), d_dy((size_t)S * D), d_dx((size_t)S * D), d_du((size_t)N * D);
    Dev<float> d_gate(S), d_dgate(S);
    d_u.upload(u);
    d_y.upload(y);
    d_sh.upload(shared);
    d_gate.upload(gate);
    d_dout.upload(dout);
    d_dx.upload(dx);
    d_x.poison();
    d_out.poison();
    d_dy.poison();
    d_dgate.poison();
    moe_gather_gpu(d_x, d_u, d_row_slot, N, K, D, 0);
    moe_combine_forward_gpu(d_out, d_y, d_gate, d_slot_row, d_sh, N, K, D, 0);
    moe_combine_backward_gpu(d_dy, d_dgate, d_dout, d_y, d_gate, d_slot_row, N, K, D, 0);
    CUDA_CHECK(cudaDeviceSynchronize());

    std::vector<double> x_ref((size_t)S * D), out_ref((size_t)N * D, 0), dy_ref((size_t)S * D), dgate_ref(S), du_ref = du0;
    for (int r = 0; r < S; r++)
        for (int i = 0; i < D; i++) x_ref[(size_t)r * D + i] = u[(size_t)(row_slot[r] / K) * D + i];
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            const int slot = n * K + k, row = slot_row[slot];
            double dot = 0;
            for (int i = 0; i < D; i++) {
                out_ref[(size_t)n * D + i] += gate[slot] * y[(size_t)row * D + i];
                dy_ref[(size_t)row * D + i] = gate[slot] * dout[(size_t)n * D + i];
                dot += dout[(size_t)n * D + i] * y[(size_t)row * D + i];
                du_ref[(size_t)n * D + i] += dx[(size_t)row * D + i];
            }
            dgate_ref[slot] = dot;
        }
    for (size_t i = 0; i < out_ref.size(); i++) out_ref[i] += shared[i];

    auto xs = d_x.download();
    CHECK(rel_err(xs, x_ref) == 0.0);  // a copy
    auto out = d_out.download(), dy = d_dy.download(), dgate = d_dgate.download();
    CHECK(all_finite(out));
    CHECK(all_finite(dy));
    CHECK(all_finite(dgate));
    const double eo = rel_err(out, out_ref), ey = rel_err(dy, dy_ref), eg = rel_err(dgate, dgate_ref);
    CHECK(eo < 2e-2);
    CHECK(ey < 2e-2);
    CHECK(eg < 1e-5);  // fp32 dot of bf16 values

    // scatter: overwrite, then accumulate onto du0
    d_du.poison();
    moe_scatter_backward_gpu(d_du, d_dx, d_slot_row, N, K, D, false, 0);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<double> du_only(du_ref.size());
    for (size_t i = 0; i < du_ref.size(); i++) du_only[i] = du_ref[i] - du0[i];
    auto du1 = d_du.download();
    CHECK(all_finite(du1));
    const double es1 = rel_err(du1, du_only);
    CHECK(es1 < 2e-2);
    d_du.upload(du0);
    moe_scatter_backward_gpu(d_du, d_dx, d_slot_row, N, K, D, true, 0);
    CUDA_CHECK(cudaDeviceSynchronize());
    const double es2 = rel_err(d_du.download(), du_ref);
    CHECK(es2 < 2e-2);
    report(strfmt("gather/combine N=%d K=%d D=%d: out %.2e dy %.2e dgate %.2e du %.2e / %.2e (accumulated)", N, K, D, eo, ey, eg,
                   es1, es2));
}
}  // namespace

TEST_CASE("moe gather / combine / scatter match the reference") {
    check_gather_combine(100, 3, 40, 8, 41);   // 16-byte path
    check_gather_combine(77, 2, 12, 5, 42);    // D not a multiple of 8
    check_gather_combine(64, 8, 264, 32, 43);  // several vectors per lane
}

// ----------------------------------------------------------------------------
// grouped GEMM

namespace {
struct GemmResult {
    std::vector<float> out, dx, dw;
};

// counts per expert; w_stride/dw_stride are the expert strides (>= OC*C)
void check_grouped_gemm(const std::vector<int>& counts, int C, int OC, size_t w_stride, size_t dw_stride, uint64_t seed) {
    const int E = (int)counts.size();
    std::vector<int> offsets(E + 1, 0);
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    const int S = offsets[E];
    auto x = round_bf16(randn((size_t)S * C, seed));
    auto w = round_bf16(randn((size_t)E * w_stride, seed + 1, 1.0 / std::sqrt((double)C)));
    auto dout = round_bf16(randn((size_t)S * OC, seed + 2));
    auto dw0 = round_f32(randn((size_t)E * dw_stride, seed + 3, 0.5));

    std::vector<double> out_ref((size_t)S * OC, 0), dx_ref((size_t)S * C, 0), dw_inc((size_t)E * dw_stride, 0);
    for (int e = 0; e < E; e++) {
        const double* W = &w[(size_t)e * w_stride];
        for (int r = offsets[e]; r < offsets[e + 1]; r++) {
            for (int o = 0; o < OC; o++) {
                double s = 0;
                for (int c = 0; c < C; c++) s += x[(size_t)r * C + c] * W[(size_t)o * C + c];
                out_ref[(size_t)r * OC + o] = s;
                const double d = dout[(size_t)r * OC + o];
                for (int c = 0; c < C; c++) {
                    dx_ref[(size_t)r * C + c] += d * W[(size_t)o * C + c];
                    dw_inc[(size_t)e * dw_stride + (size_t)o * C + c] += d * x[(size_t)r * C + c];
                }
            }
        }
    }

    Dev<bf16> d_x((size_t)S * C), d_w((size_t)E * w_stride), d_dout((size_t)S * OC), d_out((size_t)S * OC), d_dx((size_t)S * C);
    Dev<float> d_dw((size_t)E * dw_stride);
    Dev<int> d_offsets(E + 1);
    d_x.upload(x);
    d_w.upload(w);
    d_dout.upload(dout);
    d_offsets.upload(offsets);

    // Hopper's wgmma kernels where the build has them (the default: forward and backward-input fed by TMA, the weight
    // gradient by cp.async), and the mma.sync kernel
    for (bool wgmma : {true, false}) {
        GemmResult runs[2];
        for (int rep = 0; rep < 2; rep++) {
            d_out.poison();
            d_dx.poison();
            d_dw.upload(dw0);
            grouped_gemm_forward_gpu(d_out, d_x, d_w, w_stride, d_offsets, S, E, C, OC, 0, wgmma);
            grouped_gemm_backward_input_gpu(d_dx, d_dout, d_w, w_stride, d_offsets, S, E, C, OC, 0, wgmma);
            grouped_gemm_backward_weight_gpu(d_dw, dw_stride, d_dout, d_x, d_offsets, S, E, C, OC, 0, wgmma);
            CUDA_CHECK(cudaDeviceSynchronize());
            runs[rep] = {d_out.download(), d_dx.download(), d_dw.download()};
        }
        const GemmResult& g = runs[0];
        CHECK(all_finite(g.out));
        CHECK(all_finite(g.dx));
        CHECK(bit_equal(runs[0].dw, runs[1].dw));
        CHECK(bit_equal(runs[0].dx, runs[1].dx));
        CHECK(bit_equal(runs[0].out, runs[1].out));

        // dW: compare the increment over the matrices; elements outside them (the
        // stride gap) and the matrices of experts with no rows must be untouched
        std::vector<float> inc;
        std::vector<double> inc_ref;
        bool untouched = true;
        for (int e = 0; e < E; e++)
            for (size_t i = 0; i < dw_stride; i++) {
                const size_t j = (size_t)e * dw_stride + i;
                if (i < (size_t)OC * C && counts[e] > 0) {
                    inc.push_back((float)((double)g.dw[j] - dw0[j]));
                    inc_ref.push_back(dw_inc[j]);
                } else if (g.dw[j] != (float)dw0[j]) {
                    untouched = false;
                }
            }
        CHECK(untouched);
        const double eo = rel_err(g.out, out_ref), ex = rel_err(g.dx, dx_ref), ew = rel_err(inc, inc_ref);
        CHECK(eo < 2e-2);
        CHECK(ex < 2e-2);
        CHECK(ew < 1e-5);  // fp32 output of exact bf16 products
        std::string cs;
        for (int cnt : counts) cs += strfmt("%d ", cnt);
        report(strfmt("grouped GEMM (%s) C=%d OC=%d rows [%s]: out %.2e dx %.2e dW %.2e (fp32)", wgmma ? "wgmma where built" : "mma.sync", C,
                      OC, cs.c_str(), eo, ex, ew));
    }
}
}  // namespace

TEST_CASE("moe grouped GEMM forward/backward match a per-expert matmul") {
    const std::vector<int> counts = {0, 1, 37, 128, 300, 129, 0, 5};
    check_grouped_gemm(counts, 96, 72, 96 * 72 + 16, 96 * 72 + 8, 51);    // 16-byte path, strided experts
    check_grouped_gemm(counts, 12, 20, 12 * 20, 12 * 20, 52);             // scalar path (tiny's I = 12)
    check_grouped_gemm(counts, 264, 136, 264 * 136, 264 * 136, 53);       // several tiles in C and OC
    check_grouped_gemm({1}, 32, 8, 32 * 8, 32 * 8, 54);                   // one row, one expert
    check_grouped_gemm({0, 0, 250, 0}, 40, 24, 40 * 24 + 3, 40 * 24, 55);  // odd stride: scalar path
    check_grouped_gemm({300, 0, 77, 129, 1, 640}, 192, 264, 192 * 264, 192 * 264, 56);  // several 64-wide k slices
}

// ----------------------------------------------------------------------------
// a whole MoE layer, moe_forward_gpu / moe_backward_gpu (the kernels above plus
// cuBLASLt for the shared expert and the router projection), against moe_forward /
// moe_backward

namespace {
struct LayerGpuResult {
    std::vector<float> out, du, dexperts, drouter, dshared;
    std::vector<int> expert;
};

void check_layer(Config c, int B, int T, float balance_alpha, uint64_t seed) {
    config_check(c);
    const int N = B * T, D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.moe_intermediate_size;
    const int SI = c.n_shared_experts * I, S = N * K;
    const size_t XS = (size_t)3 * I * D;  // one expert's gate, up, down
    REQUIRE(c.n_shared_experts > 0);

    // parameters, bf16-rounded, in the model's layout
    auto router = round_bf16(randn((size_t)E * D, seed, 1.0 / std::sqrt((double)D)));
    auto bias = round_f32(randn(E, seed + 1, 0.05));
    std::vector<double> experts = round_bf16(randn((size_t)E * XS, seed + 2, 1.0 / std::sqrt((double)D)));
    for (int e = 0; e < E; e++)  // down_proj has fan-in I
        for (size_t i = 2 * (size_t)I * D; i < XS; i++) experts[e * XS + i] *= std::sqrt((double)D / I);
    auto shared = round_bf16(randn((size_t)3 * SI * D, seed + 3, 1.0 / std::sqrt((double)D)));
    auto u = round_bf16(randn((size_t)N * D, seed + 4));
    auto dout = round_bf16(randn((size_t)N * D, seed + 5));

    // the weights bound as bind_weights binds a model's: experts at a fixed stride,
    // up_proj right after gate_proj
    auto moe_weights = [&](auto* router_w, auto* bias_w, auto* experts_w, auto* shared_w) {
        using T = std::remove_pointer_t<decltype(router_w)>;
        MoeWeights<T> w;
        w.router = {router_w, E, D};
        w.bias = bias_w;
        w.experts = {{experts_w, I, D}, {experts_w + (size_t)I * D, I, D}, {experts_w + 2 * (size_t)I * D, D, I}};
        w.expert_stride = XS;
        w.shared = {{shared_w, SI, D}, {shared_w + (size_t)SI * D, SI, D}, {shared_w + 2 * (size_t)SI * D, D, SI}};
        return w;
    };

    // reference
    std::vector<double> g_router((size_t)E * D, 0), g_bias(E, 0), g_experts(experts.size(), 0), g_shared(shared.size(), 0);
    const MoeWeights<double> w = moe_weights(router.data(), bias.data(), experts.data(), shared.data());
    const MoeWeights<double> gw = moe_weights(g_router.data(), g_bias.data(), g_experts.data(), g_shared.data());
    MoeActs<double> acts;
    std::vector<double> out_ref((size_t)N * D), du_ref((size_t)N * D, 0), dsb;
    moe_forward(c, w, out_ref.data(), u.data(), N, acts);
    if (balance_alpha > 0) {
        dsb.resize((size_t)N * E);
        balance_loss_backward(c, dsb.data(), acts.router, B, T, balance_alpha, 1.0);
    }
    moe_backward(c, w, gw, du_ref.data(), dout.data(), u.data(), N, acts, balance_alpha > 0 ? dsb.data() : nullptr);

    // device: moe_forward_gpu / moe_backward_gpu, as the model and the decoder run them
    GpuContext ctx;
    matmul_init(ctx.mm);
    Dev<bf16> d_router((size_t)E * D), d_experts(experts.size()), d_shared(shared.size()), d_u((size_t)N * D), d_dout((size_t)N * D);
    Dev<float> d_bias(E);
    d_router.upload(router);
    d_bias.upload(bias);
    d_experts.upload(experts);
    d_shared.upload(shared);
    d_u.upload(u);
    d_dout.upload(dout);
    Dev<float> d_logits((size_t)N * E), d_scores((size_t)N * E), d_gate(S), d_dgate(S), d_dlogits((size_t)N * E),
        d_dsb((size_t)N * E), d_frac((size_t)B * E), d_seq(B), d_loss(1);
    Dev<int> d_expert(S), d_load(E), d_offsets(E + 1), d_slot_row(S), d_row_slot(S), d_scratch(moe_permute_scratch_ints(S, E));
    Dev<bf16> d_x((size_t)S * D), d_gu((size_t)S * 2 * I), d_h((size_t)S * I), d_y((size_t)S * D), d_gus((size_t)N * 2 * SI),
        d_hs((size_t)N * SI), d_sout((size_t)N * D), d_out((size_t)N * D);
    Dev<bf16> d_dy((size_t)S * D), d_dh((size_t)S * I), d_dgu((size_t)S * 2 * I), d_dx((size_t)S * D), d_du((size_t)N * D),
        d_dlogits_bf((size_t)N * E), d_dhs((size_t)N * SI), d_dgus((size_t)N * 2 * SI);
    Dev<float> d_gexperts(experts.size()), d_grouter((size_t)E * D), d_gshared(shared.size());
    const MoeWeights<bf16> w16 = moe_weights(d_router.p, (bf16*)nullptr, d_experts.p, d_shared.p);
    const MoeWeights<float> g32 = moe_weights(d_grouter.p, (float*)nullptr, d_gexperts.p, d_gshared.p);
    MoeActsGpu a{};
    a.router_logits = d_logits;
    a.scores = d_scores;
    a.gate = d_gate;
    a.expert = d_expert;
    a.offsets = d_offsets;
    a.slot_row = d_slot_row;
    a.row_slot = d_row_slot;
    a.gu_sorted = d_gu;
    a.y_sorted = d_y;
    a.shared = {d_gus, d_hs, d_dgus, d_dhs};
    a.x_sorted = d_x;
    a.hidden = d_h;
    a.shared_out = d_sout;
    a.permute_scratch = d_scratch;
    a.dy_sorted = d_dy;
    a.dh_sorted = d_dh;
    a.dgu_sorted = d_dgu;
    a.dx_sorted = d_dx;
    a.router_dlogits16 = d_dlogits_bf;
    a.dgate = d_dgate;
    a.router_dlogits = d_dlogits;

    auto run = [&]() {
        for (Dev<float>* b : {&d_logits, &d_scores, &d_gate, &d_dgate, &d_dlogits, &d_dsb}) b->poison();
        for (Dev<int>* b : {&d_expert, &d_offsets, &d_slot_row, &d_row_slot}) b->poison();
        for (Dev<bf16>* b : {&d_x, &d_gu, &d_h, &d_y, &d_gus, &d_hs, &d_sout, &d_out, &d_dy, &d_dh, &d_dgu, &d_dx, &d_du,
                             &d_dlogits_bf, &d_dhs, &d_dgus})
            b->poison();
        d_load.zero();
        d_gexperts.zero();
        d_grouter.zero();
        d_gshared.zero();
        moe_forward_gpu(c, w16, d_bias, d_out, d_u, N, a, d_load, ctx);
        if (balance_alpha > 0) {
            balance_loss_forward_gpu(d_loss, d_frac, d_seq, d_scores, d_expert, B, T, E, K, balance_alpha, false, 0);
            balance_loss_backward_gpu(d_dsb, d_frac, d_scores, B, T, E, balance_alpha, 1.0f, 0);
        }
        moe_backward_gpu(c, w16, g32, d_du, d_dout, d_u, N, a, balance_alpha > 0 ? d_dsb.p : nullptr, ctx);
        CUDA_CHECK(cudaDeviceSynchronize());
        LayerGpuResult r;
        r.out = d_out.download();
        r.du = d_du.download();
        r.dexperts = d_gexperts.download();
        r.drouter = d_grouter.download();
        r.dshared = d_gshared.download();
        r.expert = download_ints(d_expert, S);
        return r;
    };
    LayerGpuResult r1 = run(), r2 = run();
    // (the decoding form below writes the router's buffers again)
    const double e_scores = rel_err(d_scores.download(), acts.router.scores);
    const double e_gate = rel_err(d_gate.download(), acts.router.gate);

    // the decoding form on the first R tokens: the same router and roundings, so the outputs equal moe_forward_gpu's
    // but where a dot product's fp32 order flips a bf16 rounding. It adds the output into a residual stream: from zero
    // first, so the stream is the output; then from a random stream whose RMSNorm it takes as u itself, checked
    // against the norm kernel and then, bit for bit, against the same layer fed that u.
    std::vector<double> decode_errors;
    for (int R : {1, std::min(N, GEMV_MAX_ROWS)}) {
        Dev<bf16> d_hidden((size_t)R * (K * I + SI)), d_un((size_t)R * D), d_un_ref((size_t)R * D), d_norm(D);
        Dev<float> d_res((size_t)R * D), d_res2((size_t)R * D), d_res0((size_t)R * D);
        d_hidden.poison();
        d_expert.poison();
        d_res.zero();
        moe_decode_forward_gpu(c, w16, d_bias, d_res, d_u, nullptr, R, a, d_hidden, ctx);
        CUDA_CHECK(cudaDeviceSynchronize());
        const std::vector<float> dec = d_res.download();
        const std::vector<float> full(r1.out.begin(), r1.out.begin() + (size_t)R * D);
        const std::vector<double> ref(out_ref.begin(), out_ref.begin() + (size_t)R * D);
        CHECK(all_finite(dec));
        CHECK(download_ints(d_expert, R * K) == std::vector<int>(acts.router.expert.begin(), acts.router.expert.begin() + R * K));
        const double e_full = rel_err(dec, std::vector<double>(full.begin(), full.end())), e_ref = rel_err(dec, ref);
        CHECK(e_full < 4e-3);  // a bf16 rounding (2^-8) at most, over the whole output
        CHECK(e_ref < 2e-2);
        decode_errors.push_back(e_full);

        const std::vector<double> res0 = round_f32(randn((size_t)R * D, seed + 40 + R, 3.0));
        std::vector<double> norm = randn(D, seed + 50, 0.3);
        for (double& g : norm) g += 1.0;
        d_res0.upload(res0);
        d_res.upload(res0);
        d_norm.upload(round_bf16(norm));
        rmsnorm_residual_forward_gpu<float>(nullptr, d_un_ref, nullptr, d_res0, nullptr, d_norm, R, D, c.rms_norm_eps, 0);
        moe_decode_forward_gpu(c, w16, d_bias, d_res, d_un, d_norm, R, a, d_hidden, ctx);
        d_res2.zero();
        moe_decode_forward_gpu(c, w16, d_bias, d_res2, d_un, nullptr, R, a, d_hidden, ctx);
        CUDA_CHECK(cudaDeviceSynchronize());
        const std::vector<float> un = d_un.download(), un_ref = d_un_ref.download(), res = d_res.download(), out = d_res2.download();
        size_t beyond = 0;  // its rstd sums the squares in another order: a normed element may round the other way
        for (size_t i = 0; i < un.size(); i++) beyond += std::fabs(un[i] - un_ref[i]) > std::ldexp(std::fabs(un_ref[i]), -7);
        CHECK(beyond == 0);
        size_t differ = 0;
        for (size_t i = 0; i < res.size(); i++) differ += res[i] != (float)res0[i] + out[i];
        CHECK(differ == 0);
    }
    matmul_free(ctx.mm);

    CHECK(r1.expert == acts.router.expert);
    auto load = download_ints(d_load, E);
    std::vector<int> want_load(E, 0);
    for (int x : acts.router.expert) want_load[x]++;
    CHECK(load == want_load);
    CHECK(e_scores < 1e-5);
    CHECK(e_gate < 1e-5);
    for (auto* v : {&r1.out, &r1.du, &r1.dexperts, &r1.drouter, &r1.dshared}) CHECK(all_finite(*v));
    const double eo = rel_err(r1.out, out_ref), edu = rel_err(r1.du, du_ref), eex = rel_err(r1.dexperts, g_experts),
                 er = rel_err(r1.drouter, g_router), esh = rel_err(r1.dshared, g_shared);
    CHECK(eo < 2e-2);
    CHECK(edu < 2e-2);
    CHECK(eex < 2e-2);
    CHECK(er < 2e-2);
    CHECK(esh < 2e-2);
    // determinism: the second run is bit-identical
    CHECK(bit_equal(r1.out, r2.out));
    CHECK(bit_equal(r1.du, r2.du));
    CHECK(bit_equal(r1.dexperts, r2.dexperts));
    CHECK(bit_equal(r1.drouter, r2.drouter));
    CHECK(bit_equal(r1.dshared, r2.dshared));
    report(strfmt("MoE layer D=%d E=%d K=%d I=%d G=%d/%d %s norm=%d balance=%g N=%d: scores %.2e gate %.2e out %.2e du %.2e "
                   "dW_experts %.2e dW_router %.2e dW_shared %.2e",
                   D, E, K, I, c.n_group, c.topk_group, c.scoring_func == SCORING_SOFTMAX ? "softmax" : "sigmoid",
                   (int)c.norm_topk_prob, balance_alpha, N, e_scores, e_gate, eo, edu, eex, er, esh));
    report(strfmt("MoE decoding form, 1 and %d tokens: out against moe_forward_gpu's %.2e, %.2e", std::min(N, GEMV_MAX_ROWS),
                  decode_errors[0], decode_errors[1]));
}
}  // namespace

TEST_CASE("moe layer forward/backward (kernels + cuBLASLt) match moe_forward/moe_backward") {
    check_layer(tiny(), 2, 48, 0.0f, 61);
    check_layer(tiny(), 2, 48, 0.01f, 62);  // with the balance loss's gradient
    Config s = tiny();
    s.scoring_func = SCORING_SOFTMAX;
    check_layer(s, 2, 48, 0.0f, 63);
    Config g1 = tiny();
    g1.n_group = 1;
    g1.topk_group = 1;
    check_layer(g1, 3, 40, 0.0f, 64);
    Config nn = tiny();
    nn.norm_topk_prob = false;
    check_layer(nn, 2, 48, 0.0f, 65);
    // aligned sizes: the 16-byte paths throughout, two shared experts
    Config a = tiny();
    a.hidden_size = 64;
    a.moe_intermediate_size = 32;
    a.n_shared_experts = 2;
    a.n_routed_experts = 16;
    a.num_experts_per_tok = 4;
    check_layer(a, 4, 100, 0.01f, 66);
}

// ----------------------------------------------------------------------------
// timing (skipped by default; run with -ns -tc="moe timing")

namespace {
struct Timer {
    // the median of 10 timed runs (cuda_common.cuh gpu_median_ms), printed with TFLOP/s when flops > 0
    float time(const std::string& name, double flops, const std::function<void()>& f) {
        const float med = gpu_median_ms(f);
        if (flops > 0) printf("timing %-60s %8.3f ms %7.1f TFLOP/s\n", name.c_str(), med, flops / (med * 1e-3) / 1e12);
        else printf("timing %-60s %8.3f ms\n", name.c_str(), med);
        fflush(stdout);
        return med;
    }
};

struct GemmBench {
    int S, C, OC, E;
    Dev<int>& offsets;
    Dev<bf16>&x, &w, &out, &dout, &dx;
    Dev<float>& dw;
    GemmResult ref[2];  // each kernel's default config: [0] mma.sync, [1] wgmma
};

GemmResult run_grouped_gemm(GemmBench& b, bool wgmma) {
    b.dw.zero();
    grouped_gemm_forward_gpu(b.out, b.x, b.w, (size_t)b.OC * b.C, b.offsets, b.S, b.E, b.C, b.OC, 0, wgmma);
    grouped_gemm_backward_input_gpu(b.dx, b.dout, b.w, (size_t)b.OC * b.C, b.offsets, b.S, b.E, b.C, b.OC, 0, wgmma);
    grouped_gemm_backward_weight_gpu(b.dw, (size_t)b.OC * b.C, b.dout, b.x, b.offsets, b.S, b.E, b.C, b.OC, 0, wgmma);
    CUDA_CHECK(cudaDeviceSynchronize());
    return {b.out.download(), b.dx.download(), b.dw.download()};
}

// times one tile config of one kernel and checks it is bit-identical to that kernel's default config
template <int BN, int BK, int ST>
void bench_config(Timer& timer, GemmBench& b, bool wgmma) {
    const double fl = 2.0 * b.S * b.C * b.OC;
    // wgmma: forward and backward-input run the TMA kernel whatever ST is; ST is the weight gradient's
    const std::string cfg = wgmma ? strfmt("wgmma (fwd, dgrad on TMA) stages=%d", ST) : strfmt("mma.sync BN=%d BK=%d stages=%d", BN, BK, ST);
    timer.time("fwd   " + cfg, fl, [&] { grouped_gemm_forward_gpu<BN, BK, ST>(b.out, b.x, b.w, (size_t)b.OC * b.C, b.offsets, b.S, b.E, b.C, b.OC, 0, wgmma); });
    timer.time("dgrad " + cfg, fl, [&] { grouped_gemm_backward_input_gpu<BN, BK, ST>(b.dx, b.dout, b.w, (size_t)b.OC * b.C, b.offsets, b.S, b.E, b.C, b.OC, 0, wgmma); });
    timer.time("wgrad " + cfg, fl, [&] { grouped_gemm_backward_weight_gpu<BN, BK, ST>(b.dw, (size_t)b.OC * b.C, b.dout, b.x, b.offsets, b.S, b.E, b.C, b.OC, 0, wgmma); });
    b.dw.zero();
    grouped_gemm_backward_weight_gpu<BN, BK, ST>(b.dw, (size_t)b.OC * b.C, b.dout, b.x, b.offsets, b.S, b.E, b.C, b.OC, 0, wgmma);
    CUDA_CHECK(cudaDeviceSynchronize());
    const GemmResult& ref = b.ref[wgmma];
    const bool same = bit_equal(b.out.download(), ref.out) && bit_equal(b.dx.download(), ref.dx) && bit_equal(b.dw.download(), ref.dw);
    CHECK(same);
    if (!same) printf("  config %s differs from the default\n", cfg.c_str());
}

void bench_grouped_gemm(Timer& timer, int S, int C, int OC, int E) {
    printf("grouped GEMM rows=%d C=%d OC=%d E=%d (equal counts)\n", S, C, OC, E);
    std::vector<int> offsets(E + 1);
    for (int e = 0; e <= E; e++) offsets[e] = (int)((long long)e * S / E);
    Dev<int> d_offsets(E + 1);
    d_offsets.upload(offsets);
    Dev<bf16> d_x((size_t)S * C), d_w((size_t)E * OC * C), d_out((size_t)S * OC), d_dout((size_t)S * OC), d_dx((size_t)S * C);
    Dev<float> d_dw((size_t)E * OC * C);
    d_x.upload(round_bf16(randn((size_t)S * C, 71)));
    d_w.upload(round_bf16(randn((size_t)E * OC * C, 72, 0.03)));
    d_dout.upload(round_bf16(randn((size_t)S * OC, 73)));
    GemmBench b{S, C, OC, E, d_offsets, d_x, d_w, d_out, d_dout, d_dx, d_dw, {}};
    b.ref[0] = run_grouped_gemm(b, false);
    b.ref[1] = run_grouped_gemm(b, true);
    // the two kernels agree to bf16 rounding of the outputs (their k16 sums round differently)
    auto widen = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
    const double eo = rel_err(b.ref[1].out, widen(b.ref[0].out)), ew = rel_err(b.ref[1].dw, widen(b.ref[0].dw));
    printf("wgmma vs mma.sync: out %.2e dW %.2e\n", eo, ew);
    CHECK(eo < 1e-2);
    CHECK(ew < 1e-5);
    bench_config<128, 32, 4>(timer, b, false);
    bench_config<128, 64, 3>(timer, b, false);
    bench_config<128, 64, 4>(timer, b, false);
    bench_config<64, 64, 4>(timer, b, false);
    bench_config<64, 32, 4>(timer, b, false);
    bench_config<128, 64, 3>(timer, b, true);
    bench_config<128, 64, 4>(timer, b, true);
    // peers: cuBLASLt, one dense GEMM of the same size and one launch per expert
    Matmul mm;
    matmul_init(mm);
    const double fl = 2.0 * S * C * OC;
    const int R = S / E;
    timer.time("cuBLASLt one dense GEMM [rows,C] x [OC,C]^T", fl, [&] { matmul(mm, d_out, d_x, d_w, S, OC, C, false, true, 0.0f, false, 0); });
    timer.time("cuBLASLt fwd, one launch per expert", fl, [&] {
        for (int e = 0; e < E; e++)
            matmul(mm, d_out.p + (size_t)e * R * OC, d_x.p + (size_t)e * R * C, d_w.p + (size_t)e * OC * C, R, OC, C, false, true, 0.0f, false, 0);
    });
    timer.time("cuBLASLt dgrad, one launch per expert", fl, [&] {
        for (int e = 0; e < E; e++)
            matmul(mm, d_dx.p + (size_t)e * R * C, d_dout.p + (size_t)e * R * OC, d_w.p + (size_t)e * OC * C, R, C, OC, false, false, 0.0f, false, 0);
    });
    timer.time("cuBLASLt wgrad (fp32 +=), one launch per expert", fl, [&] {
        for (int e = 0; e < E; e++)
            matmul(mm, d_dw.p + (size_t)e * OC * C, d_dout.p + (size_t)e * R * OC, d_x.p + (size_t)e * R * C, OC, C, R, true, false, 1.0f, true, 0);
    });
    matmul_free(mm);
}
}  // namespace

TEST_CASE("moe timing" * doctest::skip()) {
    Timer timer;
    bench_grouped_gemm(timer, 32768, 768, 768, 8);
    bench_grouped_gemm(timer, 32768, 768, 1536, 8);  // the fused gate|up projection of the small preset
    // routing pieces at N = 32768 tokens
    const int N = 32768;
    for (int big = 0; big < 2; big++) {
        Config c = tiny();
        if (big) {  // DeepSeek-V3's routing shape
            c.n_routed_experts = 256;
            c.num_experts_per_tok = 8;
            c.n_group = 8;
            c.topk_group = 4;
        } else {  // the small preset's
            c.n_routed_experts = 8;
            c.num_experts_per_tok = 2;
        }
        const int E = c.n_routed_experts, K = c.num_experts_per_tok;
        Dev<float> d_logits((size_t)N * E), d_scores((size_t)N * E), d_gate((size_t)N * K), d_bias(E), d_dlogits((size_t)N * E);
        Dev<int> d_expert((size_t)N * K), d_load(E), d_off(E + 1), d_sr((size_t)N * K), d_rs((size_t)N * K),
            d_scr(moe_permute_scratch_ints(N * K, E));
        d_logits.upload(round_f32(randn((size_t)N * E, 74)));
        d_bias.upload(round_f32(randn(E, 75, 0.05)));
        d_load.zero();
        const std::string shape = strfmt("N=%d E=%d K=%d G=%d/%d", N, E, K, c.n_group, c.topk_group);
        timer.time("router_forward " + shape, 0, [&] { router_forward_gpu(d_scores, d_expert, d_gate, d_load, d_logits, d_bias, c, N, 0); });
        timer.time("router_backward " + shape, 0, [&] { router_backward_gpu(d_dlogits, d_gate, nullptr, d_scores, d_expert, c, N, 0); });
        timer.time("moe_permute " + shape, 0, [&] { moe_permute_gpu(d_off, d_sr, d_rs, d_scr, d_expert, N * K, E, 0); });
    }
}
