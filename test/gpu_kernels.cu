// gpu_kernels.cu — every kernel of kernels.cuh against its reference.h function (run
// in double on the same bf16-rounded inputs), on fresh random inputs, with outputs
// poisoned (0xFF bytes: NaN in bf16 and fp32) first so an element the kernel forgot
// shows up. Relative error ||gpu - ref|| / ||ref||: < 1e-5 for fp32 paths, < 8e-3
// for bf16 outputs (bf16 rounding alone gives ~2e-3). Exact where the math allows it
// (copies, dropout masks, the residual sum, AdamW given the same norm), odd sizes
// (C = 37, V = 1001, N = 13) for the scalar paths and multiples of 8 for the vector
// paths, and bit-identical reruns for every reduction. Needs a GPU (make test-gpu).
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>

#include "dist.h"
#include "kernels.cuh"
#include "reference.h"

namespace {

void require_gpu() {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    REQUIRE_MESSAGE((err == cudaSuccess && n > 0), "the GPU tests need a CUDA device");
}

// a device array freed at scope exit
template <typename T>
struct Dev {
    T* p = nullptr;
    size_t n = 0;
    explicit Dev(size_t count) : p(device_alloc<T>(count, "test buffer")), n(count) {}
    ~Dev() { cudaFree(p); }
    Dev(const Dev&) = delete;
    Dev& operator=(const Dev&) = delete;
    void poison() { CUDA_CHECK(cudaMemset(p, 0xFF, n * sizeof(T))); }  // NaN as bf16 and as fp32
    void set_raw(const std::vector<T>& v) { CUDA_CHECK(cudaMemcpy(p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice)); }
    std::vector<T> raw() const {
        std::vector<T> v(n);
        CUDA_CHECK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
        return v;
    }
    void set(const std::vector<float>& v) { to_device(p, v.data(), n); }  // converts to T
    std::vector<float> get() const { return to_host(p, n); }
};

float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

// values in [-scale, scale] (never 0), rounded to bf16 so that the GPU and the
// reference read the same numbers
std::vector<float> rand_bf16(size_t n, uint64_t key, float scale = 1.0f, float offset = 0.0f) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) {
        float x = scale * (2.0f * rng_uniform(key, i) - 1.0f);
        if (x == 0) x = 0.5f * scale;
        v[i] = round_bf16(offset + x);
    }
    return v;
}

std::vector<float> rand_f32(size_t n, uint64_t key, float scale = 1.0f) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) {
        float x = scale * (2.0f * rng_uniform(key, i) - 1.0f);
        v[i] = x == 0 ? 0.5f * scale : x;
    }
    return v;
}

std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

double rel_error(const std::vector<float>& got, const std::vector<double>& ref) {
    REQUIRE(got.size() == ref.size());
    double diff = 0, norm = 0;
    for (size_t i = 0; i < got.size(); i++) {
        diff += ((double)got[i] - ref[i]) * ((double)got[i] - ref[i]);
        norm += ref[i] * ref[i];
    }
    return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

bool all_finite(const std::vector<float>& v) {
    for (float x : v)
        if (!std::isfinite(x)) return false;
    return true;
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

void report(const std::string& what, double err) { printf("  [gpu_kernels] %-64s %.3e\n", what.c_str(), err); }

struct Stream {
    cudaStream_t s;
    Stream() { CUDA_CHECK(cudaStreamCreate(&s)); }
    ~Stream() { cudaStreamDestroy(s); }
    void sync() { CUDA_CHECK(cudaStreamSynchronize(s)); }
};

}  // namespace

// ----------------------------------------------------------------------------

TEST_CASE("gpu: embedding forward copies rows; backward matches the reference and is deterministic") {
    require_gpu();
    Stream st;
    struct Shape {
        int N, D, V;
    };
    // odd sizes (scalar path), a vector path, long runs of one token crossing the
    // 64-entry chunks, a single token everywhere, a single row
    for (Shape sh : {Shape{13, 37, 1001}, Shape{300, 256, 1001}, Shape{4099, 37, 50}, Shape{2000, 64, 3}, Shape{777, 40, 1}, Shape{1, 8, 5}}) {
        const int N = sh.N, D = sh.D, V = sh.V;
        CAPTURE(N);
        CAPTURE(D);
        CAPTURE(V);
        const uint64_t key = 1000 + N + D + V;
        std::vector<int> tokens(N);
        for (int n = 0; n < N; n++) tokens[n] = (int)(rng_hash(key, n) % V);
        std::vector<float> wte = rand_bf16((size_t)V * D, key + 1), dout = rand_bf16((size_t)N * D, key + 2);
        std::vector<float> dwte0 = rand_f32((size_t)V * D, key + 3);
        Dev<int> d_tokens(N);
        d_tokens.set_raw(tokens);
        Dev<bf16> d_wte((size_t)V * D), d_out((size_t)N * D), d_dout((size_t)N * D);
        d_wte.set(wte);
        d_dout.set(dout);

        // forward: an exact copy
        d_out.poison();
        embedding_forward_gpu(d_out.p, d_tokens.p, d_wte.p, N, D, st.s);
        st.sync();
        std::vector<float> out_ref((size_t)N * D);
        embedding_forward(out_ref.data(), tokens.data(), wte.data(), N, D);
        CHECK(d_out.get() == out_ref);

        // backward, twice from the same start: bit-identical
        std::vector<double> dwte_ref = to_double(dwte0);
        embedding_backward(dwte_ref.data(), to_double(dout).data(), tokens.data(), N, D);
        const size_t scratch_bytes = embedding_backward_scratch_bytes(N, D, V);
        Dev<char> scratch(scratch_bytes);
        Dev<float> d_dwte((size_t)V * D);
        std::vector<float> first;
        for (int run = 0; run < 2; run++) {
            scratch.poison();
            d_dwte.set(dwte0);
            embedding_backward_gpu(d_dwte.p, d_dout.p, d_tokens.p, N, D, V, scratch.p, scratch_bytes, st.s);
            st.sync();
            std::vector<float> got = d_dwte.get();
            if (run == 0) {
                first = got;
                CHECK(all_finite(got));
                const double err = rel_error(got, dwte_ref);
                report(strfmt("embedding backward dwte N=%d D=%d V=%d", N, D, V), err);
                CHECK(err < 1e-5);
                // rows of tokens that never occur are untouched
                std::vector<bool> seen(V, false);
                for (int t : tokens) seen[t] = true;
                bool untouched = true;
                for (int v = 0; v < V; v++)
                    if (!seen[v])
                        for (int d = 0; d < D; d++) untouched &= got[(size_t)v * D + d] == dwte0[(size_t)v * D + d];
                CHECK(untouched);
            } else {
                CHECK(same_bits(got, first));
            }
        }
    }
}

TEST_CASE("gpu: rmsnorm fused with the residual add matches the reference") {
    require_gpu();
    Stream st;
    const float eps = 1e-6f;
    for (auto sh : {std::pair{13, 37}, std::pair{64, 1024}, std::pair{7, 8192}, std::pair{5, 8191}}) {
        const int N = sh.first, C = sh.second;
        CAPTURE(N);
        CAPTURE(C);
        const uint64_t key = 2000 + N * 7 + C;
        const size_t NC = (size_t)N * C;
        std::vector<float> a = rand_bf16(NC, key, 2.0f), b = rand_bf16(NC, key + 1, 1.0f), w = rand_bf16(C, key + 2, 0.5f, 1.0f);
        Dev<bf16> d_a(NC), d_b(NC), d_w(C), d_res(NC), d_out(NC);
        Dev<float> d_rstd(N);
        d_b.set(b);
        d_w.set(w);
        // mode 0: residual_out separate; 1: no branch (plain RMSNorm, no residual_out);
        // 2: residual_out aliases residual_in (h += branch in place)
        for (int mode = 0; mode < 3; mode++) {
            CAPTURE(mode);
            d_a.set(a);
            d_res.poison();
            d_out.poison();
            d_rstd.poison();
            std::vector<float> x(NC);
            for (size_t i = 0; i < NC; i++) x[i] = mode == 1 ? a[i] : round_bf16(a[i] + b[i]);
            bf16* res_out = mode == 0 ? d_res.p : mode == 1 ? nullptr : d_a.p;
            rmsnorm_residual_forward_gpu(res_out, d_out.p, d_rstd.p, d_a.p, mode == 1 ? nullptr : d_b.p, d_w.p, N, C, eps, st.s);
            st.sync();
            if (mode == 0) CHECK(d_res.get() == x);  // the bf16 sum is exact
            if (mode == 2) CHECK(d_a.get() == x);
            std::vector<double> out_ref(NC), rstd_ref(N);
            rmsnorm_forward(out_ref.data(), rstd_ref.data(), to_double(x).data(), to_double(w).data(), N, C, eps);
            std::vector<float> out = d_out.get(), rstd = d_rstd.get();
            CHECK(all_finite(out));
            CHECK(all_finite(rstd));
            const double e_out = rel_error(out, out_ref), e_rstd = rel_error(rstd, rstd_ref);
            report(strfmt("rmsnorm forward out  N=%d C=%d mode=%d (bf16)", N, C, mode), e_out);
            report(strfmt("rmsnorm forward rstd N=%d C=%d mode=%d (fp32)", N, C, mode), e_rstd);
            CHECK(e_out < 8e-3);
            CHECK(e_rstd < 1e-5);
        }
        // the model's residual stream, fp32 and not rounded after the add; mode 1 has no
        // residual_in (layer 0: the stream starts as the embedding)
        const std::vector<float> a32 = rand_f32(NC, key + 3, 2.0f);
        for (int mode = 0; mode < 2; mode++) {
            CAPTURE(mode);
            Dev<float> d_a32(NC), d_res32(NC);
            d_a32.set(a32);
            d_res32.poison();
            d_out.poison();
            d_rstd.poison();
            std::vector<float> x(NC);
            for (size_t i = 0; i < NC; i++) x[i] = mode == 0 ? a32[i] + b[i] : b[i];
            rmsnorm_residual_forward_gpu<float>(d_res32.p, d_out.p, d_rstd.p, mode == 0 ? d_a32.p : nullptr, d_b.p, d_w.p, N, C, eps, st.s);
            st.sync();
            CHECK(d_res32.get() == x);
            std::vector<double> out_ref(NC), rstd_ref(N);
            rmsnorm_forward(out_ref.data(), rstd_ref.data(), to_double(x).data(), to_double(w).data(), N, C, eps);
            const double e_out = rel_error(d_out.get(), out_ref), e_rstd = rel_error(d_rstd.get(), rstd_ref);
            report(strfmt("rmsnorm forward out  N=%d C=%d fp32 residual mode=%d (bf16)", N, C, mode), e_out);
            CHECK(e_out < 8e-3);
            CHECK(e_rstd < 1e-5);
        }
    }
}

TEST_CASE("gpu: rmsnorm backward matches the reference; dweight and dinp are deterministic") {
    require_gpu();
    Stream st;
    const float eps = 1e-6f;
    // widths for each of the warp kernel's register chunks (40, 384, 520, 1024; 9 rows a block at N = 4500 and
    // 5000, more than a block's warps), and the block kernel's (37, 8191: element loads; 8192: 16-byte packs)
    for (auto sh : {std::pair{13, 37}, std::pair{4500, 40}, std::pair{700, 384}, std::pair{5000, 520}, std::pair{64, 1024},
                    std::pair{600, 8192}, std::pair{9, 8191}}) {
        const int N = sh.first, C = sh.second;
        CAPTURE(N);
        CAPTURE(C);
        const uint64_t key = 3000 + N * 7 + C;
        const size_t NC = (size_t)N * C;
        std::vector<float> inp = rand_bf16(NC, key, 2.0f), dout = rand_bf16(NC, key + 1), w = rand_bf16(C, key + 2, 0.5f, 1.0f);
        std::vector<float> dres = rand_bf16(NC, key + 3), dw0 = rand_f32(C, key + 4);
        // rstd as the forward would save it (fp32)
        std::vector<double> tmp(NC), rstd_d(N);
        rmsnorm_forward(tmp.data(), rstd_d.data(), to_double(inp).data(), to_double(w).data(), N, C, eps);
        std::vector<float> rstd(rstd_d.begin(), rstd_d.end());
        Dev<bf16> d_inp(NC), d_dout(NC), d_w(C), d_dres(NC), d_dinp(NC);
        Dev<float> d_rstd(N), d_dw(C);
        d_inp.set(inp);
        d_dout.set(dout);
        d_w.set(w);
        d_rstd.set(rstd);
        const size_t scratch_bytes = rmsnorm_backward_scratch_bytes(N, C);
        Dev<char> scratch(scratch_bytes);
        // mode 0: dresidual separate; 1: no dresidual; 2: dinp aliases dresidual
        std::vector<float> first_dinp, first_dw;
        for (int mode = 0; mode < 4; mode++) {
            const int m = mode == 3 ? 0 : mode;  // mode 3 reruns mode 0 for determinism
            CAPTURE(mode);
            scratch.poison();
            d_dw.set(dw0);
            d_dinp.poison();
            d_dres.set(dres);
            if (m == 2) d_dinp.set(dres);
            const bf16* dresidual = m == 0 ? d_dres.p : m == 1 ? nullptr : d_dinp.p;
            rmsnorm_backward_gpu(d_dinp.p, d_dw.p, dresidual, d_dout.p, d_inp.p, d_w.p, d_rstd.p, N, C, scratch.p, scratch_bytes, st.s);
            st.sync();
            std::vector<float> dinp = d_dinp.get(), dw = d_dw.get();
            if (mode == 3) {
                CHECK(same_bits(dinp, first_dinp));
                CHECK(same_bits(dw, first_dw));
                continue;
            }
            if (mode == 0) {
                first_dinp = dinp;
                first_dw = dw;
            }
            std::vector<double> dinp_ref(NC), dw_ref = to_double(dw0), dres_ref = to_double(dres);
            rmsnorm_backward(dinp_ref.data(), dw_ref.data(), m != 1 ? dres_ref.data() : nullptr, to_double(dout).data(), to_double(inp).data(), to_double(w).data(),
                             to_double(rstd).data(), N, C);
            CHECK(all_finite(dinp));
            CHECK(all_finite(dw));
            const double e_dinp = rel_error(dinp, dinp_ref), e_dw = rel_error(dw, dw_ref);
            report(strfmt("rmsnorm backward dinp    N=%d C=%d mode=%d (bf16)", N, C, m), e_dinp);
            report(strfmt("rmsnorm backward dweight N=%d C=%d mode=%d (fp32)", N, C, m), e_dw);
            CHECK(e_dinp < 8e-3);
            CHECK(e_dw < 1e-5);
        }
        // the residual stream's norms: fp32 input, fp32 gradient stream in and out
        Dev<float> d_inp32(NC), d_dres32(NC), d_dinp32(NC);
        d_inp32.set(inp);
        d_dres32.set(dres);
        d_dinp32.poison();
        d_dw.set(dw0);
        rmsnorm_backward_gpu(d_dinp32.p, d_dw.p, d_dres32.p, d_dout.p, d_inp32.p, d_w.p, d_rstd.p, N, C, scratch.p, scratch_bytes, st.s);
        st.sync();
        std::vector<double> dinp_ref(NC), dw_ref = to_double(dw0), dres_ref = to_double(dres);
        rmsnorm_backward(dinp_ref.data(), dw_ref.data(), dres_ref.data(), to_double(dout).data(), to_double(inp).data(), to_double(w).data(),
                         to_double(rstd).data(), N, C);
        const double e_dinp = rel_error(d_dinp32.get(), dinp_ref), e_dw = rel_error(d_dw.get(), dw_ref);
        report(strfmt("rmsnorm backward dinp    N=%d C=%d fp32 input and stream", N, C), e_dinp);
        CHECK(e_dinp < 1e-5);
        CHECK(e_dw < 1e-5);
    }
}

TEST_CASE("gpu: swiglu on the fused [n, 2I] layout matches the reference ffn") {
    require_gpu();
    Stream st;
    for (auto sh : {std::pair{13, 37}, std::pair{32, 256}, std::pair{3, 8}}) {
        const int n = sh.first, I = sh.second;
        CAPTURE(n);
        CAPTURE(I);
        const uint64_t key = 4000 + n * 7 + I;
        const int D = 2 * I;
        const size_t nI = (size_t)n * I;
        // The reference is reference.h's ffn with selector weights: x = gate_up [n, 2I],
        // W_gate = [1 0], W_up = [0 1], W_down = [1; 0], so ffn's gate/up are x's two
        // halves, its hidden is the SwiGLU, and its backward's dx is [dgate | dup].
        std::vector<float> gate_up = rand_bf16((size_t)n * D, key, 3.0f), dhidden = rand_bf16(nI, key + 1);
        std::vector<double> wgu((size_t)2 * I * D, 0), wd((size_t)D * I, 0);  // [W_gate; W_up]
        for (int j = 0; j < I; j++) {
            wgu[(size_t)j * D + j] = 1;
            wgu[(size_t)(I + j) * D + I + j] = 1;
            wd[(size_t)j * I + j] = 1;
        }
        std::vector<double> x = to_double(gate_up), out((size_t)n * D);
        FfnActs<double> acts;
        const FfnWeights<double> w{{wgu.data(), I, D}, {wgu.data() + (size_t)I * D, I, D}, {wd.data(), D, I}};
        ffn_forward(w, out.data(), x.data(), n, acts);
        std::vector<double> dout((size_t)n * D, 0), dx((size_t)n * D, 0), dwgu(wgu.size(), 0), dwd(wd.size(), 0);
        for (int r = 0; r < n; r++)
            for (int j = 0; j < I; j++) dout[(size_t)r * D + j] = dhidden[(size_t)r * I + j];
        const FfnWeights<double> dw{{dwgu.data(), I, D}, {dwgu.data() + (size_t)I * D, I, D}, {dwd.data(), D, I}};
        ffn_backward(w, dw, dx.data(), dout.data(), x.data(), n, acts, false);
        std::vector<double> dgate_ref(nI), dup_ref(nI);
        for (int r = 0; r < n; r++)
            for (int j = 0; j < I; j++) {
                dgate_ref[(size_t)r * I + j] = dx[(size_t)r * D + j];
                dup_ref[(size_t)r * I + j] = dx[(size_t)r * D + I + j];
            }

        Dev<bf16> d_hidden(nI), d_dh(nI), d_gu((size_t)n * D), d_dgu((size_t)n * D);
        d_dh.set(dhidden);
        d_gu.set(gate_up);
        d_hidden.poison();
        swiglu_forward_fused_gpu(d_hidden.p, d_gu.p, n, I, st.s);
        d_dgu.poison();
        swiglu_backward_fused_gpu(d_dgu.p, d_dh.p, d_gu.p, n, I, st.s);
        st.sync();
        std::vector<float> hidden = d_hidden.get(), dgu = d_dgu.get(), dgate(nI), dup(nI);
        for (int r = 0; r < n; r++)
            for (int j = 0; j < I; j++) {
                dgate[(size_t)r * I + j] = dgu[(size_t)r * D + j];
                dup[(size_t)r * I + j] = dgu[(size_t)r * D + I + j];
            }
        CHECK(all_finite(hidden));
        CHECK(all_finite(dgate));
        CHECK(all_finite(dup));
        double e_h = rel_error(hidden, acts.hidden), e_dg = rel_error(dgate, dgate_ref), e_du = rel_error(dup, dup_ref);
        report(strfmt("swiglu forward  hidden n=%d I=%d (bf16)", n, I), e_h);
        report(strfmt("swiglu backward dgate  n=%d I=%d (bf16)", n, I), e_dg);
        report(strfmt("swiglu backward dup    n=%d I=%d (bf16)", n, I), e_du);
        CHECK(e_h < 8e-3);
        CHECK(e_dg < 8e-3);
        CHECK(e_du < 8e-3);

        // in place, as the backward may run it: dgate_up overwrites gate_up
        swiglu_backward_fused_gpu(d_gu.p, d_dh.p, d_gu.p, n, I, st.s);
        st.sync();
        CHECK(d_gu.get() == dgu);
    }
}

TEST_CASE("gpu: dropout masks equal the CPU's bit for bit, forward and backward") {
    require_gpu();
    Stream st;
    for (size_t n : {(size_t)1001, (size_t)4096}) {
        for (float p : {0.1f, 0.5f}) {
            CAPTURE(n);
            CAPTURE(p);
            const uint64_t key = mix64(5000 + n) ^ (uint64_t)(p * 100);
            std::vector<float> x = rand_bf16(n, key + 1), dx = rand_bf16(n, key + 2);
            std::vector<float> expect = x, mask(n);
            dropout_forward(expect.data(), mask.data(), n, p, key);  // reference.h, in float
            for (float& v : expect) v = round_bf16(v);
            std::vector<float> dexpect(n);
            for (size_t i = 0; i < n; i++) dexpect[i] = round_bf16(dx[i] * mask[i]);
            size_t zeros = 0;
            for (float m : mask) zeros += m == 0;
            CHECK(zeros > 0);
            CHECK(zeros < n);
            // backward as the model runs it: from the fp32 residual gradient to bf16
            Dev<bf16> d_x(n), d_dx(n);
            Dev<float> d_dres(n);
            d_x.set(x);
            d_dres.set(dx);
            dropout_forward_gpu(d_x.p, n, p, key, st.s);
            dropout_to_bf16_gpu(d_dx.p, d_dres.p, n, p, key, st.s);
            st.sync();
            CHECK(d_x.get() == expect);
            CHECK(d_dx.get() == dexpect);
            // p = 0 leaves x alone
            d_x.set(x);
            dropout_forward_gpu(d_x.p, n, 0.0f, key, st.s);
            st.sync();
            CHECK(d_x.get() == x);
        }
    }
}

TEST_CASE("gpu: fused softmax cross-entropy matches the reference, with ignored targets") {
    require_gpu();
    Stream st;
    struct Case {
        int N, V;
        bool device_scale;
        bool all_ignored;
    };
    for (Case cs : {Case{13, 1001, false, false}, Case{16, 50304, true, false}, Case{8, 131072, true, false}, Case{3, 64, true, true}}) {
        const int N = cs.N, V = cs.V;
        CAPTURE(N);
        CAPTURE(V);
        const uint64_t key = 6000 + N + V;
        const float dloss = 0.5f;
        std::vector<float> logits = rand_bf16((size_t)N * V, key, 8.0f);
        std::vector<int> targets(N);
        int count = 0;
        for (int r = 0; r < N; r++) {
            targets[r] = (cs.all_ignored || r % 4 == 1) ? -1 : (int)(rng_hash(key + 1, r) % V);
            count += targets[r] >= 0;
        }
        // reference: per-row losses (one row at a time), the mean, dlogits
        std::vector<double> z = to_double(logits), probs((size_t)N * V), loss_ref(N, 0.0), dlogits_ref((size_t)N * V, 0.0);
        const double mean_ref = crossentropy_forward(probs.data(), z.data(), targets.data(), N, V);
        for (int r = 0; r < N; r++) {
            std::vector<double> p_row(V);
            loss_ref[r] = crossentropy_forward(p_row.data(), z.data() + (size_t)r * V, &targets[r], 1, V);
        }
        crossentropy_backward(dlogits_ref.data(), probs.data(), targets.data(), N, V, (double)dloss);

        Dev<bf16> d_logits((size_t)N * V);
        Dev<int> d_targets(N);
        Dev<float> d_losses(N), d_scale(1), d_mean(1), d_losses2(N);
        d_targets.set_raw(targets);
        std::vector<float> first;
        for (int run = 0; run < 2; run++) {
            d_logits.set(logits);
            d_losses.poison();
            d_scale.poison();
            if (cs.device_scale) {
                crossentropy_scale_gpu(d_scale.p, d_targets.p, N, dloss, st.s);
                crossentropy_forward_backward_gpu(d_losses.p, d_logits.p, d_targets.p, N, V, 1.0f, d_scale.p, st.s);
            } else {
                crossentropy_forward_backward_gpu(d_losses.p, d_logits.p, d_targets.p, N, V, count ? dloss / count : 0.0f, nullptr, st.s);
            }
            st.sync();
            std::vector<float> dlogits = d_logits.get(), losses = d_losses.get();
            if (run == 1) {
                CHECK(same_bits(dlogits, first));
                continue;
            }
            first = dlogits;
            CHECK(all_finite(dlogits));
            CHECK(all_finite(losses));
            bool ignored_zero = true;
            for (int r = 0; r < N; r++)
                if (targets[r] < 0) {
                    ignored_zero &= losses[r] == 0.0f;
                    for (int i = 0; i < V; i++) ignored_zero &= dlogits[(size_t)r * V + i] == 0.0f;
                }
            CHECK(ignored_zero);
            if (!cs.all_ignored) {
                const double e_loss = rel_error(losses, loss_ref), e_dl = rel_error(dlogits, dlogits_ref);
                report(strfmt("cross-entropy losses  N=%d V=%d (fp32)", N, V), e_loss);
                report(strfmt("cross-entropy dlogits N=%d V=%d (bf16)", N, V), e_dl);
                CHECK(e_loss < 1e-5);
                CHECK(e_dl < 8e-3);
            }
            // the mean on the device, then accumulated with a multiplier
            d_mean.poison();
            mean_loss_gpu(d_mean.p, d_losses.p, d_targets.p, N, 1.0f, false, st.s);
            st.sync();
            const float mean = d_mean.get()[0];
            if (cs.all_ignored) {
                CHECK(mean == 0.0f);
            } else {
                const double e_mean = std::fabs(mean - mean_ref) / std::fabs(mean_ref);
                report(strfmt("cross-entropy mean loss N=%d V=%d (fp32)", N, V), e_mean);
                CHECK(e_mean < 1e-5);
            }
            mean_loss_gpu(d_mean.p, d_losses.p, d_targets.p, N, 0.5f, true, st.s);
            st.sync();
            CHECK(d_mean.get()[0] == doctest::Approx(1.5 * mean).epsilon(1e-6));
            // forward only: the same losses, bit for bit, and the logits untouched
            d_logits.set(logits);
            d_losses2.poison();
            crossentropy_forward_gpu(d_losses2.p, d_logits.p, d_targets.p, N, V, st.s);
            st.sync();
            CHECK(same_bits(d_losses2.get(), losses));
            CHECK(d_logits.get() == logits);
        }
    }
}

// Timing, not a check: skipped by default; run with  --no-skip -tc="*timing*". The logits become dlogits in place,
// so the runs after the first read dlogits: the same traffic, and the same work but for the max's moves.
TEST_CASE("gpu: cross-entropy timing" * doctest::skip()) {
    require_gpu();
    struct Shape {
        int N, V;
        const char* what;
    };
    for (const Shape& s : {Shape{16384, 32768, "small at 16 x 1024"}, Shape{32768, 1024, "mini at 64 x 512"},
                           Shape{2048, 129280, "DeepSeek-V3's vocabulary"}}) {
        Dev<bf16> d_logits((size_t)s.N * s.V);
        Dev<int> d_targets(s.N);
        Dev<float> d_losses(s.N);
        d_logits.set(rand_bf16(d_logits.n, 7, 3.0f));
        std::vector<int> targets(s.N);
        for (int r = 0; r < s.N; r++) targets[r] = (int)(rng_hash(8, r) % s.V);
        d_targets.set_raw(targets);
        const float ms = gpu_median_ms([&] {
            crossentropy_forward_backward_gpu(d_losses.p, d_logits.p, d_targets.p, s.N, s.V, 1.0f / s.N, nullptr, 0);
        });
        const double bytes = 2.0 * d_logits.n * sizeof(bf16);  // one read and one write of the logits
        printf("cross-entropy timing N=%d V=%d (%s): %.3f ms (%.2f TB/s for one read and one write)\n", s.N, s.V, s.what, ms,
               bytes / (ms * 1e-3) / 1e12);
    }
}

TEST_CASE("gpu: grad norm skips buffers and is deterministic; AdamW matches the reference bit for bit") {
    require_gpu();
    Stream st;
    for (const char* preset : {"tiny", "mini"}) {
        for (int max_len : {100, PARAM_CHUNK}) {
            CAPTURE(preset);
            CAPTURE(max_len);
            const Config c = config_preset(preset);
            const ParamLayout L = param_layout(c);
            const size_t n = L.total;
            const uint64_t key = 7000 + n + max_len;
            std::vector<float> grads = rand_f32(n, key), params = rand_f32(n, key + 1, 0.1f), m = rand_f32(n, key + 2, 0.01f), v(n);
            for (size_t i = 0; i < n; i++) v[i] = 1e-4f * (rng_uniform(key + 3, i) + 0.01f);
            for (const TensorSpec& s : L.tensors)  // a buffer's "gradient" must not count
                if (s.kind == TENSOR_BUFFER)
                    for (size_t i = 0; i < s.numel; i++) grads[s.offset + i] = 1e6f;
            const std::vector<ParamChunk> chunks = param_chunks(L, max_len);
            ParamChunk* d_chunks = param_chunks_upload(chunks);
            const int nc = (int)chunks.size();
            Dev<float> d_grads(n), d_norm2(1), d_params(n), d_m(n), d_v(n);
            Dev<bf16> d_p16(n);
            d_grads.set_raw(grads);
            const size_t scratch_bytes = grad_norm_scratch_bytes(nc);
            Dev<char> scratch(scratch_bytes);

            // grad norm, twice: bit-identical
            std::vector<float> norm2(2);
            for (int run = 0; run < 2; run++) {
                scratch.poison();
                d_norm2.poison();
                grad_norm_squared_gpu(d_norm2.p, d_grads.p, d_chunks, nc, scratch.p, scratch_bytes, st.s);
                st.sync();
                norm2[run] = d_norm2.get()[0];
            }
            CHECK(same_bits(std::vector<float>{norm2[0]}, std::vector<float>{norm2[1]}));
            const double norm_ref = grad_norm(L, grads.data());
            const double e_norm = std::fabs(std::sqrt((double)norm2[0]) - norm_ref) / norm_ref;
            report(strfmt("grad norm %s (%zu params, %d chunks) (fp32)", preset, n, nc), e_norm);
            CHECK(e_norm < 1e-5);

            // AdamW: clipping active, off, and inactive; first step and a later one
            struct Run {
                float clip;
                int step;
            };
            for (Run r : {Run{1.0f, 1}, Run{0.0f, 10}, Run{1e9f, 3}}) {
                CAPTURE(r.clip);
                CAPTURE(r.step);
                OptimOptions o;
                o.grad_clip = r.clip;
                const float lr = 3e-3f;
                d_params.set_raw(params);
                d_m.set_raw(m);
                d_v.set_raw(v);
                d_p16.poison();
                adamw_gpu(d_params.p, d_p16.p, d_grads.p, d_m.p, d_v.p, d_chunks, nc, lr, o.beta1, o.beta2, o.eps, o.weight_decay, r.step,
                          d_norm2.p, o.grad_clip, st.s);
                st.sync();
                std::vector<float> p_ref = params, m_ref = m, v_ref = v;
                // the reference given the norm the GPU computed
                adamw_update(L, p_ref.data(), grads.data(), m_ref.data(), v_ref.data(), o, lr, r.step, std::sqrt((double)norm2[0]));
                std::vector<float> p_gpu = d_params.raw(), m_gpu = d_m.raw(), v_gpu = d_v.raw();
                const double e_p = rel_error(p_gpu, to_double(p_ref)), e_m = rel_error(m_gpu, to_double(m_ref)),
                             e_v = rel_error(v_gpu, to_double(v_ref));
                report(strfmt("adamw %s chunks=%d clip=%g step=%d params (fp32)", preset, nc, r.clip, r.step), e_p);
                report(strfmt("adamw %s chunks=%d clip=%g step=%d m (fp32)", preset, nc, r.clip, r.step), e_m);
                report(strfmt("adamw %s chunks=%d clip=%g step=%d v (fp32)", preset, nc, r.clip, r.step), e_v);
                CHECK(e_p < 1e-5);
                CHECK(e_m < 1e-5);
                CHECK(e_v < 1e-5);
                // float math as the reference's, so bit for bit (buffers untouched in both)
                CHECK(same_bits(p_gpu, p_ref));
                CHECK(same_bits(m_gpu, m_ref));
                CHECK(same_bits(v_gpu, v_ref));
                // the bf16 working copy of every trained element; buffers stay poisoned
                std::vector<bf16> p16 = d_p16.raw();
                bool copy_ok = true;
                for (const ParamChunk& ch : chunks)
                    for (int j = 0; j < ch.len; j++) {
                        uint16_t bits;
                        std::memcpy(&bits, &p16[ch.begin + j], 2);
                        copy_ok &= bits == float_to_bf16(p_ref[ch.begin + j]);
                    }
                CHECK(copy_ok);
                for (const TensorSpec& s : L.tensors)
                    if (s.kind == TENSOR_BUFFER)
                        for (size_t i = 0; i < s.numel; i++) {
                            uint16_t bits;
                            std::memcpy(&bits, &p16[s.offset + i], 2);
                            CHECK(bits == 0xFFFF);
                        }
            }
            cudaFree(d_chunks);
        }
    }
}

TEST_CASE("gpu: AdamW on ZeRO-1 shards (each rank's moments only) equals AdamW on the whole vector, bit for bit") {
    require_gpu();
    Stream st;
    const Config c = config_preset("tiny");
    const ParamLayout L = param_layout(c);
    const int world = 3;
    const ZeroPlan plan = zero_plan(L, c.num_hidden_layers, world, 4096);
    const size_t n = plan.padded;  // the flat arrays as the GPU pads them
    const uint64_t key = 7100;
    std::vector<float> grads = rand_f32(n, key), params = rand_f32(n, key + 1, 0.1f), m = rand_f32(n, key + 2, 0.01f), v(n);
    for (size_t i = 0; i < n; i++) v[i] = 1e-4f * (rng_uniform(key + 3, i) + 0.01f);
    const std::vector<ParamChunk> all = param_chunks(L, 1000);  // chunks that the slices cut through
    OptimOptions o;
    const float lr = 3e-3f;
    const int step = 4;
    Dev<float> d_grads(n), d_norm2(1), d_params(n), d_m(n), d_v(n);
    Dev<bf16> d_p16(n);
    d_grads.set_raw(grads);
    d_norm2.set_raw({4.0f});  // norm 2 > clip 1: the clipping scale is in play

    ParamChunk* d_all = param_chunks_upload(all);
    d_params.set_raw(params);
    d_m.set_raw(m);
    d_v.set_raw(v);
    d_p16.poison();
    adamw_gpu(d_params.p, d_p16.p, d_grads.p, d_m.p, d_v.p, d_all, (int)all.size(), lr, o.beta1, o.beta2, o.eps, o.weight_decay, step,
              d_norm2.p, o.grad_clip, st.s);
    st.sync();
    CUDA_CHECK(cudaFree(d_all));
    const std::vector<float> p_full = d_params.raw(), m_full = d_m.raw(), v_full = d_v.raw();
    const std::vector<bf16> p16_full = d_p16.raw();

    size_t updated = 0;
    for (int r = 0; r < world; r++) {
        CAPTURE(r);
        const std::vector<ParamChunk> mine = zero_rank_chunks(all, plan, r);
        // the rank's moments: its slice of every bucket, one after another
        std::vector<float> m_r(plan.shard), v_r(plan.shard);
        for (const GradBucket& b : plan.buckets) {
            const size_t slice = b.len / world, lo = b.begin + r * slice;
            for (size_t j = 0; j < slice; j++) m_r[b.state + j] = m[lo + j], v_r[b.state + j] = v[lo + j];
        }
        Dev<float> d_mr(plan.shard), d_vr(plan.shard);
        d_mr.set_raw(m_r);
        d_vr.set_raw(v_r);
        d_params.set_raw(params);
        d_p16.poison();
        ParamChunk* d_mine = param_chunks_upload(mine);
        adamw_gpu(d_params.p, d_p16.p, d_grads.p, d_mr.p, d_vr.p, d_mine, (int)mine.size(), lr, o.beta1, o.beta2, o.eps, o.weight_decay,
                  step, d_norm2.p, o.grad_clip, st.s);
        st.sync();
        CUDA_CHECK(cudaFree(d_mine));
        const std::vector<float> p_r = d_params.raw(), mr = d_mr.raw(), vr = d_vr.raw();
        const std::vector<bf16> p16_r = d_p16.raw();
        bool same = true;
        for (const ParamChunk& ch : mine)
            for (int j = 0; j < ch.len; j++) {
                const size_t i = ch.begin + j, k = ch.state + j;
                same &= std::memcmp(&p_r[i], &p_full[i], 4) == 0 && std::memcmp(&mr[k], &m_full[i], 4) == 0 &&
                        std::memcmp(&vr[k], &v_full[i], 4) == 0 && std::memcmp(&p16_r[i], &p16_full[i], 2) == 0;
                updated++;
            }
        CHECK(same);
    }
    size_t trained = 0;
    for (const ParamChunk& ch : all) trained += ch.len;
    CHECK(updated == trained);
}

TEST_CASE("gpu: expert bias update matches the reference") {
    require_gpu();
    Stream st;
    const float gamma = 1e-3f;
    for (int E : {8, 256}) {
        CAPTURE(E);
        Config c = config_preset("tiny");
        c.n_routed_experts = E;
        const ParamLayout L = param_layout(c);
        std::vector<float> params = rand_f32(L.total, 8000 + E, 0.1f);
        std::vector<std::vector<int64_t>> load(c.num_hidden_layers, std::vector<int64_t>(E, 0));
        std::vector<size_t> offsets;
        std::vector<int64_t> load64;
        std::vector<int> load32;
        for (int l = 0; l < c.num_hidden_layers; l++) {
            if (!c.is_moe_layer(l)) continue;
            for (int e = 0; e < E; e++) {
                // first MoE layer: groups of four loads {4, 4 + d, 4, 4 - d} (mean
                // exactly 4: some biases stay, some go up, some down); the last:
                // every load equals the mean (no change)
                const int d = 1 + (int)(rng_hash(8100 + E, e / 4) % 4);
                if (offsets.empty()) load[l][e] = e % 2 == 0 ? 4 : e % 4 == 1 ? 4 + d : 4 - d;
                else load[l][e] = 7;
            }
            offsets.push_back(L.offset_of(strfmt("model.layers.%d.mlp.gate.e_score_correction_bias", l)));
            for (int e = 0; e < E; e++) {
                load64.push_back(load[l][e]);
                load32.push_back((int)load[l][e]);
            }
        }
        const int layers = (int)offsets.size();
        REQUIRE(layers == 2);
        std::vector<float> ref = params;
        expert_bias_update(c, bind_weights(c, L, ref.data()), load, gamma);
        // every layer at once, int64 loads
        Dev<float> d_params(L.total);
        Dev<size_t> d_offsets(layers);
        Dev<int64_t> d_load64(load64.size());
        Dev<int> d_load32(load32.size());
        d_offsets.set_raw(offsets);
        d_load64.set_raw(load64);
        d_load32.set_raw(load32);
        d_params.set_raw(params);
        expert_bias_update_gpu(d_params.p, d_offsets.p, d_load64.p, layers, E, gamma, nullptr, st.s);
        st.sync();
        std::vector<float> got = d_params.raw();
        report(strfmt("expert bias update E=%d (fp32)", E), rel_error(got, to_double(ref)));
        CHECK(same_bits(got, ref));
        // int loads, as the training step counts them
        d_params.set_raw(params);
        expert_bias_update_gpu(d_params.p, d_offsets.p, d_load32.p, layers, E, gamma, nullptr, st.s);
        st.sync();
        CHECK(same_bits(d_params.raw(), ref));
        // the test really moved some biases up, some down and left some alone
        int up = 0, down = 0, same = 0;
        for (size_t i = 0; i < ref.size(); i++) {
            up += ref[i] > params[i];
            down += ref[i] < params[i];
        }
        for (int e = 0; e < E; e++) same += ref[offsets[0] + e] == params[offsets[0] + e];
        CHECK(up > 0);
        CHECK(down > 0);
        CHECK(same > 0);
    }
}

TEST_CASE("gpu: float_to_bf16 rounds to nearest even like the host") {
    require_gpu();
    Stream st;
    const size_t n = 1001;
    std::vector<float> x(n);
    for (size_t i = 0; i < n; i++) x[i] = (2.0f * rng_uniform(9000, i) - 1.0f) * std::ldexp(1.0f, (int)(rng_hash(9001, i) % 60) - 30);
    // exact ties (to even), overflow to inf, subnormals
    const float special[] = {1.0f + 1.0f / 256, 1.0f + 3.0f / 256, -1.0f - 1.0f / 256, 3.3e38f, -3.39e38f, 1e-39f, -2e-40f, 0.0f, -0.0f};
    for (size_t i = 0; i < sizeof(special) / sizeof(float); i++) x[i] = special[i];
    Dev<float> d_x(n);
    Dev<bf16> d_y(n);
    d_x.set_raw(x);
    d_y.poison();
    float_to_bf16_gpu(d_y.p, d_x.p, n, st.s);
    st.sync();
    std::vector<bf16> y = d_y.raw();
    int mismatches = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t bits;
        std::memcpy(&bits, &y[i], 2);
        mismatches += bits != float_to_bf16(x[i]);
    }
    CHECK(mismatches == 0);
}

TEST_CASE("gpu: the decoding step's GEMV matches the reference, and a row's result does not depend on the rows beside it") {
    require_gpu();
    Stream st;
    // 16-byte packs (IN % 8 == 0) and element loads (IN = 37); OUT not a multiple of the block's 8 warps
    for (auto sh : {std::pair{768, 44}, std::pair{37, 29}, std::pair{96, 1000}}) {
        const int IN = sh.first, OUT = sh.second;
        CAPTURE(IN);
        const uint64_t key = 9000 + IN + OUT;
        const std::vector<float> x = rand_bf16((size_t)GEMV_MAX_ROWS * IN, key), w = rand_bf16((size_t)OUT * IN, key + 1);
        Dev<bf16> d_x(x.size()), d_w(w.size()), d_out((size_t)GEMV_MAX_ROWS * OUT);
        Dev<float> d_out32((size_t)GEMV_MAX_ROWS * OUT), d_alone(OUT);
        d_x.set(x);
        d_w.set(w);
        for (int R : {1, 3, GEMV_MAX_ROWS}) {
            CAPTURE(R);
            d_out.poison();
            d_out32.poison();
            gemv_forward_gpu(d_out.p, d_x.p, d_w.p, R, IN, OUT, st.s);
            gemv_forward_gpu(d_out32.p, d_x.p, d_w.p, R, IN, OUT, st.s);
            st.sync();
            std::vector<double> ref((size_t)R * OUT, 0.0);
            for (int r = 0; r < R; r++)
                for (int c = 0; c < OUT; c++)
                    for (int i = 0; i < IN; i++) ref[(size_t)r * OUT + c] += (double)x[(size_t)r * IN + i] * w[(size_t)c * IN + i];
            std::vector<float> out = d_out.get(), out32 = d_out32.get();
            out.resize((size_t)R * OUT);
            out32.resize((size_t)R * OUT);
            const double e16 = rel_error(out, ref), e32 = rel_error(out32, ref);
            report(strfmt("gemv R=%d IN=%d OUT=%d bf16 out", R, IN, OUT), e16);
            report(strfmt("gemv R=%d IN=%d OUT=%d fp32 out", R, IN, OUT), e32);
            CHECK(e16 < 4e-3);  // one bf16 rounding
            CHECK(e32 < 1e-5);  // fp32 sums of exact bf16 products
            // each row alone gives the same bits as in the batch
            for (int r = 0; r < R; r++) {
                gemv_forward_gpu(d_alone.p, d_x.p + (size_t)r * IN, d_w.p, 1, IN, OUT, st.s);
                st.sync();
                const std::vector<float> alone = d_alone.get();
                CHECK(same_bits(alone, std::vector<float>(out32.begin() + (size_t)r * OUT, out32.begin() + (size_t)(r + 1) * OUT)));
            }
        }
    }
}

// how many elements of got lie further than a bf16 rounding (2^-8 relative, either way) from want
size_t beyond_a_rounding(const std::vector<float>& got, const std::vector<float>& want) {
    size_t n = 0;
    for (size_t i = 0; i < want.size(); i++) n += std::fabs(got[i] - want[i]) > std::ldexp(std::fabs(want[i]), -7);
    return n;
}

TEST_CASE("gpu: the decoding GEMV's folded norm, second weight and residual add match the kernels they replace") {
    require_gpu();
    Stream st;
    const float eps = 1e-6f;
    for (auto sh : {std::pair{768, 44}, std::pair{37, 29}}) {
        const int IN = sh.first, OUT = sh.second, OUT2 = 13;
        CAPTURE(IN);
        const uint64_t key = 9100 + IN;
        const std::vector<float> res = rand_f32((size_t)GEMV_MAX_ROWS * IN, key, 3.0f), xb = rand_bf16((size_t)GEMV_MAX_ROWS * IN, key + 1, 2.0f);
        const std::vector<float> g = rand_bf16(IN, key + 2, 0.3f, 1.0f), w = rand_bf16((size_t)OUT * IN, key + 3, 0.1f);
        const std::vector<float> w2 = rand_bf16((size_t)OUT2 * IN, key + 4, 0.1f);
        Dev<float> d_res(res.size()), d_sum(res.size()), d_res_out((size_t)GEMV_MAX_ROWS * OUT), d_alone(OUT);
        Dev<bf16> d_xb(xb.size()), d_g(IN), d_w(w.size()), d_w2(w2.size()), d_xn(res.size()), d_normed(res.size());
        Dev<bf16> d_out((size_t)GEMV_MAX_ROWS * OUT), d_out2((size_t)GEMV_MAX_ROWS * OUT2), d_ref((size_t)GEMV_MAX_ROWS * OUT);
        Dev<bf16> d_ref2((size_t)GEMV_MAX_ROWS * OUT2);
        d_res.set(res);
        d_xb.set(xb);
        d_g.set(g);
        d_w.set(w);
        d_w2.set(w2);
        for (int R : {1, 3, GEMV_MAX_ROWS}) {
            CAPTURE(R);
            const size_t n = (size_t)R * IN;
            // the norm of the fp32 residual stream, two Linears on it in one launch: the normed input within a rounding
            // of the norm kernel's (its rstd sums the squares in another order), and each output the plain GEMV's bits
            // on that input
            for (bool from_bf16 : {false, true}) {
                CAPTURE(from_bf16);
                d_normed.poison();
                d_out.poison();
                d_out2.poison();
                GemvExtra<bf16> e;
                e.norm = d_g.p;
                e.eps = eps;
                e.normed = d_normed.p;
                if (!from_bf16) {
                    e.out2 = d_out2.p;
                    e.w2 = d_w2.p;
                    e.out2_cols = OUT2;
                    gemv_forward_gpu(d_out.p, d_res.p, d_w.p, R, IN, OUT, st.s, e);
                    rmsnorm_residual_forward_gpu<float>(nullptr, d_xn.p, nullptr, d_res.p, nullptr, d_g.p, R, IN, eps, st.s);
                } else {
                    gemv_forward_gpu(d_out.p, d_xb.p, d_w.p, R, IN, OUT, st.s, e);
                    rmsnorm_residual_forward_gpu<bf16>(nullptr, d_xn.p, nullptr, d_xb.p, nullptr, d_g.p, R, IN, eps, st.s);
                }
                gemv_forward_gpu(d_ref.p, d_normed.p, d_w.p, R, IN, OUT, st.s);
                gemv_forward_gpu(d_ref2.p, d_normed.p, d_w2.p, R, IN, OUT2, st.s);
                st.sync();
                std::vector<float> normed = d_normed.get(), xn = d_xn.get(), out = d_out.get(), ref = d_ref.get();
                normed.resize(n);
                xn.resize(n);
                out.resize((size_t)R * OUT);
                ref.resize((size_t)R * OUT);
                CHECK(all_finite(normed));
                CHECK(beyond_a_rounding(normed, xn) == 0);
                CHECK(same_bits(out, ref));
                if (!from_bf16) {
                    std::vector<float> out2 = d_out2.get(), ref2 = d_ref2.get();
                    out2.resize((size_t)R * OUT2);
                    ref2.resize((size_t)R * OUT2);
                    CHECK(same_bits(out2, ref2));
                }
            }
            // each row's norm alone gives the same bits as in the batch
            GemvExtra<float> e32;
            e32.norm = d_g.p;
            e32.eps = eps;
            gemv_forward_gpu(d_res_out.p, d_res.p, d_w.p, R, IN, OUT, st.s, e32);
            st.sync();
            const std::vector<float> batch = d_res_out.get();
            for (int r = 0; r < R; r++) {
                gemv_forward_gpu(d_alone.p, d_res.p + (size_t)r * IN, d_w.p, 1, IN, OUT, st.s, e32);
                st.sync();
                CHECK(same_bits(d_alone.get(), std::vector<float>(batch.begin() + (size_t)r * OUT, batch.begin() + (size_t)(r + 1) * OUT)));
            }
            // the residual add: res + bf16(x @ W^T), as the norm kernel's add of the bf16 output would make it
            d_sum.set(res);
            gemv_residual_add_gpu(d_sum.p, d_xb.p, d_w.p, R, IN, OUT, st.s);
            gemv_forward_gpu(d_ref.p, d_xb.p, d_w.p, R, IN, OUT, st.s);
            st.sync();
            const std::vector<float> sum = d_sum.get(), plain = d_ref.get();
            size_t differ = 0;
            for (int r = 0; r < R; r++)
                for (int c = 0; c < OUT; c++) differ += sum[(size_t)r * OUT + c] != res[(size_t)r * OUT + c] + plain[(size_t)r * OUT + c];
            CHECK(differ == 0);
        }
    }
}
