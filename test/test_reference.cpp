// test_reference.cpp — gradient checks of every CPU reference layer and of the
// whole model: the manual backward against central finite differences in double
// precision (relative error < 1e-6), plus the model's invariants and the optimizer.
#include <doctest/doctest.h>

#include <functional>
#include <set>

#include "reference.h"

namespace {

// fresh non-zero random values in [-scale, scale] (the key picks the stream)
std::vector<double> random_vector(size_t n, uint64_t key, double scale = 1.0) {
    std::vector<double> v(n);
    for (size_t i = 0; i < n; i++) v[i] = scale * (2.0 * rng_uniform(key, i) - 1.0);
    return v;
}

// ||analytic - numeric|| / ||numeric|| over up to max_checks entries of x, where
// numeric is the central difference of loss() with step h. Where the true gradient
// is zero (an expert no token chose) it returns ||analytic||, which must be ~0 too.
double gradient_error(const std::function<double()>& loss, double* x, const double* analytic, size_t n, size_t max_checks = 300,
                      double h = 1e-5) {
    double diff = 0, ref = 0;
    size_t stride = std::max<size_t>(1, n / max_checks);
    for (size_t i = (n > max_checks ? 7 % stride : 0); i < n; i += stride) {
        double saved = x[i];
        x[i] = saved + h;
        double lp = loss();
        x[i] = saved - h;
        double lm = loss();
        x[i] = saved;
        double numeric = (lp - lm) / (2 * h);
        diff += (analytic[i] - numeric) * (analytic[i] - numeric);
        ref += numeric * numeric;
    }
    return ref > 0 ? std::sqrt(diff / ref) : std::sqrt(diff);
}

double weighted_sum(const std::vector<double>& out, const std::vector<double>& w) {
    double s = 0;
    for (size_t i = 0; i < out.size(); i++) s += out[i] * w[i];
    return s;
}

Config tiny_config() {
    Config c = config_preset("tiny");
    c.rms_norm_eps = 1e-6f;
    return c;
}

}  // namespace

TEST_CASE("matmul backward matches finite differences") {
    const int N = 5, C = 7, OC = 3;
    auto x = random_vector(N * C, 1), w = random_vector(OC * C, 2), dout = random_vector(N * OC, 3);
    std::vector<double> out(N * OC), dx(N * C, 0), dw(OC * C, 0);
    auto loss = [&]() {
        matmul_forward(out.data(), x.data(), w.data(), N, C, OC);
        return weighted_sum(out, dout);
    };
    matmul_backward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), N, C, OC, false);
    CHECK(gradient_error(loss, x.data(), dx.data(), x.size()) < 1e-6);
    CHECK(gradient_error(loss, w.data(), dw.data(), w.size()) < 1e-6);
    // the gradient rule: the input gradient is written (or added to with accumulate),
    // the weight gradient is always added to
    std::vector<double> dx2(dx.size(), 5.0), dw2 = dw;
    matmul_backward(dx2.data(), dw2.data(), dout.data(), x.data(), w.data(), N, C, OC, false);
    for (size_t i = 0; i < dx.size(); i++) CHECK(dx2[i] == doctest::Approx(dx[i]));
    for (size_t i = 0; i < dw.size(); i++) CHECK(dw2[i] == doctest::Approx(2 * dw[i]));
    matmul_backward(dx2.data(), dw2.data(), dout.data(), x.data(), w.data(), N, C, OC, true);
    for (size_t i = 0; i < dx.size(); i++) CHECK(dx2[i] == doctest::Approx(2 * dx[i]));
}

TEST_CASE("embedding backward matches finite differences") {
    const int N = 6, D = 4, V = 5;
    int tokens[N] = {3, 1, 3, 0, 4, 3};
    auto wte = random_vector(V * D, 4), dout = random_vector(N * D, 5);
    std::vector<double> out(N * D), dwte(V * D, 0);
    auto loss = [&]() {
        embedding_forward(out.data(), tokens, wte.data(), N, D);
        return weighted_sum(out, dout);
    };
    embedding_backward(dwte.data(), dout.data(), tokens, N, D);
    CHECK(gradient_error(loss, wte.data(), dwte.data(), wte.size()) < 1e-6);
    for (int i = 0; i < D; i++) CHECK(dwte[2 * D + i] == 0);  // token 2 never appears
}

TEST_CASE("rmsnorm backward matches finite differences; unit weight gives unit RMS") {
    const int N = 4, C = 9;
    auto x = random_vector(N * C, 6, 3.0), w = random_vector(C, 7), dout = random_vector(N * C, 8);
    std::vector<double> out(N * C), rstd(N), dx(N * C, 0), dw(C, 0);
    auto loss = [&]() {
        rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-6f);
        return weighted_sum(out, dout);
    };
    loss();
    rmsnorm_backward(dx.data(), dw.data(), (const double*)nullptr, dout.data(), x.data(), w.data(), rstd.data(), N, C);
    CHECK(gradient_error(loss, x.data(), dx.data(), x.size()) < 1e-6);
    CHECK(gradient_error(loss, w.data(), dw.data(), w.size()) < 1e-6);

    std::vector<double> ones(C, 1.0);
    rmsnorm_forward(out.data(), rstd.data(), x.data(), ones.data(), N, C, 1e-12f);
    for (int n = 0; n < N; n++) {
        double ms = 0;
        for (int i = 0; i < C; i++) ms += out[n * C + i] * out[n * C + i];
        CHECK(std::sqrt(ms / C) == doctest::Approx(1.0).epsilon(1e-9));
    }
}

TEST_CASE("rope: rotation preserves norms, relative positions, and its backward is the transpose") {
    for (bool yarn : {false, true}) {
        Config c = tiny_config();
        c.qk_rope_head_dim = 8;
        if (yarn) {
            c.yarn = true;
            c.yarn_factor = 4;
            c.yarn_original_max_position_embeddings = 16;
            c.yarn_mscale = 1;
            c.yarn_mscale_all_dim = 1;
        }
        RopeTable r = rope_build(c, 32);
        auto q = random_vector(8, 9), k = random_vector(8, 10), dout = random_vector(8, 11);
        // <R(p) q, R(p+d) k> depends on d only
        auto rotated_dot = [&](int p, int d) {
            std::vector<double> a = q, b = k;
            rope_forward(a.data(), p, r);
            rope_forward(b.data(), p + d, r);
            return dot(a.data(), b.data(), 8);
        };
        CHECK(rotated_dot(3, 5) == doctest::Approx(rotated_dot(11, 5)).epsilon(1e-12));
        std::vector<double> x = q, dx = dout;
        auto loss = [&]() {
            std::vector<double> y = x;
            rope_forward(y.data(), 13, r);
            return weighted_sum(y, dout);
        };
        rope_backward(dx.data(), 13, r);
        CHECK(gradient_error(loss, x.data(), dx.data(), 8) < 1e-6);
        if (!yarn) {
            std::vector<double> y = q;
            rope_forward(y.data(), 7, r);
            CHECK(dot(y.data(), y.data(), 8) == doctest::Approx(dot(q.data(), q.data(), 8)).epsilon(1e-12));
        }
    }
}

TEST_CASE("causal attention backward matches finite differences, with and without dropout on the probabilities") {
    const int B = 2, T = 5, H = 3, dqk = 6, dv = 4;
    for (AttentionDropout drop : {AttentionDropout{}, AttentionDropout{0.3f, 91}}) {
        CAPTURE(drop.p);
        auto q = random_vector(B * T * H * dqk, 12), k = random_vector(B * T * H * dqk, 13), v = random_vector(B * T * H * dv, 14);
        auto dout = random_vector(B * T * H * dv, 15);
        std::vector<double> out(B * T * H * dv), att(B * H * T * T), dq(q.size(), 0), dk(k.size(), 0), dvv(v.size(), 0);
        auto loss = [&]() {
            attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, dqk, dv, 0.37, drop);
            return weighted_sum(out, dout);
        };
        loss();
        attention_backward(dq.data(), dk.data(), dvv.data(), dout.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, dqk, dv, 0.37,
                           drop);
        CHECK(gradient_error(loss, q.data(), dq.data(), q.size()) < 1e-6);
        CHECK(gradient_error(loss, k.data(), dk.data(), k.size()) < 1e-6);
        CHECK(gradient_error(loss, v.data(), dvv.data(), v.size()) < 1e-6);
    }
}

TEST_CASE("attention dropout drops a share p of each query's probabilities and scales the rest by 1/(1-p)") {
    // v_j = the one-hot e_j (dv = T) makes out_t the row of dropped probabilities itself: out_tj = p_tj m_tj
    const int B = 2, T = 64, H = 2, dqk = 8;
    const float p = 0.25f;
    auto q = random_vector(B * T * H * dqk, 16), k = random_vector(B * T * H * dqk, 17);
    std::vector<double> v((size_t)B * T * H * T, 0.0), out(v.size()), plain(v.size()), att((size_t)B * H * T * T);
    for (int b = 0; b < B; b++)
        for (int j = 0; j < T; j++)
            for (int h = 0; h < H; h++) v[(((size_t)b * T + j) * H + h) * T + j] = 1.0;
    attention_forward(plain.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, dqk, T, 0.4);
    attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, dqk, T, 0.4, AttentionDropout{p, 5});
    int dropped = 0, kept = 0, wrong = 0;
    for (size_t i = 0; i < out.size(); i++) {
        const size_t t = i / T / H % T, j = i % T;
        if (j > t) continue;  // causal: no probability there
        if (out[i] == 0) {
            dropped++;
        } else {
            kept++;
            wrong += std::fabs(out[i] - plain[i] / (1.0 - p)) > 1e-12 * plain[i] / (1.0 - p);
        }
    }
    CHECK(wrong == 0);
    // 8320 pairs: a binomial share with sd 0.0047
    CHECK(std::fabs((double)dropped / (dropped + kept) - p) < 0.03);
    // another key draws another mask
    std::vector<double> other(v.size());
    attention_forward(other.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, dqk, T, 0.4, AttentionDropout{p, 6});
    CHECK(other != out);
}

// the model's parameters and gradients for one config, with a random init that
// also randomises norm weights and biases (unit weights would hide mistakes)
RefModel<double> random_model(const Config& c, uint64_t seed) {
    RefModel<double> m;
    ref_init(m, c);
    for (size_t i = 0; i < m.params.size(); i++) m.params[i] = 0.3 * (2.0 * rng_uniform(seed, i) - 1.0);
    for (const TensorSpec& s : m.layout.tensors)
        if (s.kind == TENSOR_NO_DECAY)
            for (size_t i = 0; i < s.numel; i++) m.params[s.offset + i] += 1.0;
    return m;
}

// every trainable tensor of the model, checked by central differences
void check_all_gradients(RefModel<double>& m, const std::function<double()>& loss, size_t per_tensor) {
    for (const TensorSpec& s : m.layout.tensors) {
        if (s.kind == TENSOR_BUFFER) continue;
        CAPTURE(s.name);
        double err = gradient_error(loss, m.params.data() + s.offset, m.grads.data() + s.offset, s.numel, per_tensor);
        CHECK(err < 1e-6);
    }
}

TEST_CASE("MLA backward matches finite differences (q_lora on/off, YaRN on/off)") {
    for (int variant = 0; variant < 3; variant++) {
        Config c = tiny_config();
        if (variant == 1) c.q_lora_rank = 0;
        if (variant == 2) {
            c.yarn = true;
            c.yarn_factor = 8;
            c.yarn_original_max_position_embeddings = 4;
            c.yarn_mscale = 0.707f;
            c.yarn_mscale_all_dim = 1.0f;
        }
        CAPTURE(variant);
        RefModel<double> m = random_model(c, 20 + variant);
        const int B = 2, T = 6, N = B * T, D = c.hidden_size;
        auto x = random_vector(N * D, 30 + variant), dout = random_vector(N * D, 40 + variant);
        std::vector<double> out(N * D), dx(N * D, 0);
        MlaActs<double> acts;
        auto loss = [&]() {
            mla_forward(c, m.w.layers[0].attn, m.rope, out.data(), x.data(), B, T, acts);
            return weighted_sum(out, dout);
        };
        loss();
        mla_backward(c, m.w.layers[0].attn, m.g.layers[0].attn, m.rope, dx.data(), dout.data(), x.data(), B, T, acts);
        CHECK(gradient_error(loss, x.data(), dx.data(), x.size()) < 1e-6);
        for (const TensorSpec& s : m.layout.tensors) {
            if (s.name.rfind("model.layers.0.self_attn.", 0) != 0) continue;
            CAPTURE(s.name);
            CHECK(gradient_error(loss, m.params.data() + s.offset, m.grads.data() + s.offset, s.numel, 60) < 1e-6);
        }
    }
}

TEST_CASE("SwiGLU FFN backward matches finite differences") {
    const int n = 5, D = 6, I = 7;
    // gate and up in one array, up after gate, as the parameter layout has them
    auto x = random_vector(n * D, 50, 2.0), wgu = random_vector(2 * I * D, 51), wd = random_vector(D * I, 53);
    auto dout = random_vector(n * D, 54);
    std::vector<double> out(n * D), dx(n * D, 0), dwgu(2 * I * D, 0), dwd(D * I, 0);
    const FfnWeights<double> w{{wgu.data(), I, D}, {wgu.data() + I * D, I, D}, {wd.data(), D, I}};
    const FfnWeights<double> dw{{dwgu.data(), I, D}, {dwgu.data() + I * D, I, D}, {dwd.data(), D, I}};
    FfnActs<double> acts;
    auto loss = [&]() {
        ffn_forward(w, out.data(), x.data(), n, acts);
        return weighted_sum(out, dout);
    };
    loss();
    ffn_backward(w, dw, dx.data(), dout.data(), x.data(), n, acts, false);
    CHECK(gradient_error(loss, x.data(), dx.data(), x.size()) < 1e-6);
    CHECK(gradient_error(loss, wgu.data(), dwgu.data(), wgu.size()) < 1e-6);
    CHECK(gradient_error(loss, wd.data(), dwd.data(), wd.size()) < 1e-6);
}

TEST_CASE("MoE layer backward matches finite differences across routing variants") {
    struct Variant {
        int scoring, n_group, topk_group;
        bool norm;
        float alpha;
    };
    const Variant variants[] = {{SCORING_SIGMOID, 4, 2, true, 0}, {SCORING_SIGMOID, 1, 1, false, 0}, {SCORING_SOFTMAX, 2, 1, true, 0.3f},
                                {SCORING_SOFTMAX, 1, 1, false, 0}, {SCORING_SIGMOID, 4, 2, true, 0.3f}};
    int index = 0;
    for (const Variant& v : variants) {
        CAPTURE(index);
        Config c = tiny_config();
        c.scoring_func = v.scoring;
        c.n_group = v.n_group;
        c.topk_group = v.topk_group;
        c.norm_topk_prob = v.norm;
        RefModel<double> m = random_model(c, 60 + index);
        const int B = 2, T = 5, N = B * T, D = c.hidden_size;
        auto u = random_vector(N * D, 70 + index, 2.0), dout = random_vector(N * D, 80 + index);
        std::vector<double> out(N * D), du(N * D, 0);
        MoeActs<double> acts;
        const int layer = 1;
        auto loss = [&]() {
            moe_forward(c, m.w.layers[layer].moe, out.data(), u.data(), N, acts);
            double l = weighted_sum(out, dout);
            if (v.alpha > 0) l += balance_loss_forward(c, acts.router, B, T, v.alpha);
            return l;
        };
        loss();
        std::vector<double> dscores;
        if (v.alpha > 0) {
            dscores.resize((size_t)N * c.n_routed_experts);
            balance_loss_backward(c, dscores.data(), acts.router, B, T, v.alpha, 1.0);
        }
        moe_backward(c, m.w.layers[layer].moe, m.g.layers[layer].moe, du.data(), dout.data(), u.data(), N, acts, dscores.empty() ? nullptr : dscores.data());
        int used = 0;
        for (const auto& rows : acts.rows) used += !rows.empty();
        CHECK(used > c.num_experts_per_tok);  // the check must exercise several experts
        CHECK(gradient_error(loss, u.data(), du.data(), u.size()) < 1e-6);
        for (const TensorSpec& s : m.layout.tensors) {
            if (s.name.rfind("model.layers.1.mlp.", 0) != 0 || s.kind == TENSOR_BUFFER) continue;
            CAPTURE(s.name);
            CHECK(gradient_error(loss, m.params.data() + s.offset, m.grads.data() + s.offset, s.numel, 40) < 1e-6);
        }
        index++;
    }
}

TEST_CASE("routing picks exactly k distinct experts from at most topk_group groups, honouring the bias") {
    Config c = tiny_config();  // 8 experts, 4 groups of 2, keep 2 groups, top-3
    RefModel<double> m = random_model(c, 90);
    const int N = 64, D = c.hidden_size, E = c.n_routed_experts, K = c.num_experts_per_tok, per_group = E / c.n_group;
    auto u = random_vector(N * D, 91, 2.0);
    std::vector<double> logits(N * E);
    RouterActs<double> acts;
    router_forward(c, logits.data(), u.data(), m.w.layers[1].moe.router.w, m.w.layers[1].moe.bias, N, acts);
    for (int n = 0; n < N; n++) {
        std::set<int> experts, groups;
        double gate_sum = 0;
        for (int k = 0; k < K; k++) {
            experts.insert(acts.expert[n * K + k]);
            groups.insert(acts.expert[n * K + k] / per_group);
            gate_sum += acts.gate[n * K + k];
        }
        CHECK(experts.size() == (size_t)K);
        CHECK(groups.size() <= (size_t)c.topk_group);
        CHECK(gate_sum == doctest::Approx(c.routed_scaling_factor).epsilon(1e-12));  // norm_topk_prob
    }
    // a large bias on one expert makes every token pick it, with its unbiased score as gate
    std::vector<double> bias(E, 0.0);
    bias[5] = 100;
    router_forward(c, logits.data(), u.data(), m.w.layers[1].moe.router.w, bias.data(), N, acts);
    for (int n = 0; n < N; n++) CHECK(acts.expert[n * K] == 5);
}

TEST_CASE("cross-entropy backward matches finite differences and ignores negative targets") {
    const int N = 6, V = 11;
    auto logits = random_vector(N * V, 100, 3.0);
    int targets[N] = {3, 10, -1, 0, 7, 3};
    std::vector<double> probs(N * V), dlogits(N * V, 9.0);  // written, not added to
    auto loss = [&]() { return crossentropy_forward(probs.data(), logits.data(), targets, N, V); };
    loss();
    crossentropy_backward(dlogits.data(), probs.data(), targets, N, V, 1.0);
    CHECK(gradient_error(loss, logits.data(), dlogits.data(), logits.size()) < 1e-6);
    for (int i = 0; i < V; i++) CHECK(dlogits[2 * V + i] == 0);
}

TEST_CASE("whole model backward matches finite differences") {
    struct Variant {
        int q_lora;
        bool yarn;
        float dropout, alpha;
        int first_dense;
        float attn_dropout;
    };
    const Variant variants[] = {{16, false, 0, 0, 1, 0}, {0, true, 0.25f, 0.1f, 1, 0}, {16, false, 0, 0.2f, 0, 0}, {16, false, 0.1f, 0, 1, 0.3f}};
    int index = 0;
    for (const Variant& v : variants) {
        CAPTURE(index);
        Config c = tiny_config();
        c.q_lora_rank = v.q_lora;
        c.first_k_dense_replace = v.first_dense;
        if (v.yarn) {
            c.yarn = true;
            c.yarn_factor = 4;
            c.yarn_original_max_position_embeddings = 8;
            c.yarn_mscale = 1;
            c.yarn_mscale_all_dim = 1;
        }
        RefModel<double> m = random_model(c, 110 + index);
        const int B = 2, T = 7, N = B * T;
        std::vector<int> inputs(N), targets(N);
        for (int n = 0; n < N; n++) {
            inputs[n] = (int)(rng_hash(120 + index, n) % c.vocab_size);
            targets[n] = (int)(rng_hash(130 + index, n) % c.vocab_size);
        }
        StepOptions opt;
        opt.dropout = v.dropout;
        opt.attn_dropout = v.attn_dropout;
        opt.balance_alpha = v.alpha;
        opt.dropout_key = 77;
        auto loss = [&]() { return (double)ref_forward(m, inputs.data(), targets.data(), B, T, opt); };
        double l0 = loss();
        CHECK(std::isfinite(l0));
        CHECK(l0 > 0);
        std::fill(m.grads.begin(), m.grads.end(), 0.0);
        ref_backward(m);
        check_all_gradients(m, loss, 12);
        index++;
    }
}

TEST_CASE("a future token never changes an earlier position's logits") {
    Config c = tiny_config();
    RefModel<double> m = random_model(c, 140);
    const int T = 9, V = c.vocab_size;
    std::vector<int> a(T), b(T);
    for (int t = 0; t < T; t++) a[t] = b[t] = (int)(rng_hash(141, t) % V);
    b[6] = (a[6] + 1) % V;
    ref_forward(m, a.data(), nullptr, 1, T, StepOptions{});
    std::vector<double> la = m.logits;
    ref_forward(m, b.data(), nullptr, 1, T, StepOptions{});
    for (int i = 0; i < 6 * V; i++) REQUIRE(la[i] == m.logits[i]);
    double changed = 0;
    for (int i = 6 * V; i < T * V; i++) changed += std::fabs(la[i] - m.logits[i]);
    CHECK(changed > 1e-6);
}

TEST_CASE("gradient accumulation over two half batches equals the full batch") {
    Config c = tiny_config();
    RefModel<double> m = random_model(c, 150);
    const int B = 4, T = 6, N = B * T;
    std::vector<int> inputs(N), targets(N);
    for (int n = 0; n < N; n++) {
        inputs[n] = (int)(rng_hash(151, n) % c.vocab_size);
        targets[n] = (int)(rng_hash(152, n) % c.vocab_size);
    }
    ref_forward(m, inputs.data(), targets.data(), B, T, StepOptions{});
    std::fill(m.grads.begin(), m.grads.end(), 0.0);
    ref_backward(m);
    std::vector<double> full = m.grads;
    std::fill(m.grads.begin(), m.grads.end(), 0.0);
    for (int half = 0; half < 2; half++) {
        ref_forward(m, inputs.data() + half * N / 2, targets.data() + half * N / 2, B / 2, T, StepOptions{});
        ref_backward(m, 0.5);
    }
    double diff = 0, ref = 0;
    for (size_t i = 0; i < full.size(); i++) {
        diff += (full[i] - m.grads[i]) * (full[i] - m.grads[i]);
        ref += full[i] * full[i];
    }
    CHECK(std::sqrt(diff / ref) < 1e-12);
}

TEST_CASE("AdamW, clipping, schedule and the expert bias update") {
    Config c = tiny_config();
    RefModel<double> m = random_model(c, 160);
    auto g = random_vector(m.layout.total, 161);
    std::vector<float> mom(m.layout.total, 0), var(m.layout.total, 0);
    std::vector<double> before = m.params;
    OptimOptions o;
    o.grad_clip = 0.5f;
    double norm = grad_norm(m.layout, g.data());
    adamw_update(m.layout, m.params.data(), g.data(), mom.data(), var.data(), o, 0.01f, 1, norm);
    const double scale = 0.5 / norm;
    for (const TensorSpec& s : m.layout.tensors) {
        size_t i = s.offset + s.numel / 2;
        CAPTURE(s.name);
        if (s.kind == TENSOR_BUFFER) {
            CHECK(m.params[i] == before[i]);
            continue;
        }
        // first step: mhat = g, vhat = g^2, so the update is lr * (sign(g) + wd * p)
        double gs = g[i] * scale, wd = s.kind == TENSOR_DECAY ? o.weight_decay : 0;
        double expected = before[i] - 0.01 * (gs / (std::fabs(gs) + o.eps) + wd * before[i]);
        CHECK(m.params[i] == doctest::Approx(expected).epsilon(1e-5));
    }
    o.lr = 1.0f;
    o.warmup_steps = 10;
    o.total_steps = 110;
    o.min_lr_fraction = 0.1f;
    CHECK(learning_rate(o, 0) == doctest::Approx(0.1));
    CHECK(learning_rate(o, 9) == doctest::Approx(1.0));
    CHECK(learning_rate(o, 60) == doctest::Approx(0.55));
    CHECK(learning_rate(o, 110) == doctest::Approx(0.1));

    std::vector<std::vector<int64_t>> load(c.num_hidden_layers, std::vector<int64_t>(c.n_routed_experts, 4));
    load[1][0] = 12;  // overloaded: its bias goes down
    load[1][3] = 0;   // idle: its bias goes up
    const double* bias = m.w.layers[1].moe.bias;
    std::vector<double> b0(bias, bias + c.n_routed_experts);
    expert_bias_update(c, m.w, load, 0.001f);
    CHECK(bias[0] == doctest::Approx(b0[0] - 0.001));
    CHECK(bias[3] == doctest::Approx(b0[3] + 0.001));
    CHECK(bias[1] == doctest::Approx(b0[1] + 0.001));  // mean load is 4.5, so 4 is under it
}

// ----------------------------------------------------------------------------
// The multi-token-prediction module (num_nextn_predict_layers = 1)

Config mtp_config(bool moe_block) {
    Config c = tiny_config();
    c.num_nextn_predict_layers = 1;
    if (!moe_block) {  // layer 3, the module's block, is dense when first_k_dense_replace passes it
        c.first_k_dense_replace = 4;
        c.q_lora_rank = 0;
    }
    return c;
}

TEST_CASE("MTP module backward matches finite differences: its every tensor, the shared embedding and head, and its input") {
    for (bool moe : {true, false}) {
        CAPTURE(moe);
        Config c = mtp_config(moe);
        RefModel<double> m = random_model(c, 170 + moe);
        REQUIRE(c.is_moe_layer(c.num_hidden_layers) == moe);
        const int B = 2, T = 6, N = B * T, D = c.hidden_size;
        auto h = random_vector(N * D, 171, 2.0), dh0 = random_vector(N * D, 172);
        std::vector<int> targets(N);
        for (int n = 0; n < N; n++) targets[n] = (int)(rng_hash(173 + moe, n) % c.vocab_size);
        targets[3] = -1;  // ignored: no embedding there, and positions 2 and 3 predict nothing
        StepOptions opt;
        opt.dropout = moe ? 0.25f : 0.0f;
        opt.balance_alpha = moe ? 0.2f : 0.0f;
        opt.dropout_key = 174;
        MtpActs<double> acts;
        auto loss = [&]() { return (double)mtp_forward(c, m.w, m.rope, h.data(), targets.data(), B, T, opt, acts); };
        const double l0 = loss();
        CHECK(std::isfinite(l0));
        CHECK(acts.loss > 0);
        if (moe) CHECK(acts.balance > 0);
        int predictions = 0;
        for (int t : acts.targets) predictions += t >= 0;
        CHECK(predictions == N - B - 2);  // each row's last position, and the two around the ignored target
        // dh is added to (the main head's gradient is there already); weight gradients too
        std::fill(m.grads.begin(), m.grads.end(), 0.0);
        std::vector<double> dh = dh0;
        mtp_backward(c, m.w, m.g, m.rope, dh.data(), h.data(), B, T, opt, acts, 1.0);
        for (int i = 0; i < N * D; i++) dh[i] -= dh0[i];
        CHECK(gradient_error(loss, h.data(), dh.data(), h.size()) < 1e-6);
        int checked = 0;
        for (const TensorSpec& s : m.layout.tensors) {
            const bool module = s.name.rfind("model.layers.3.", 0) == 0;
            if (s.kind == TENSOR_BUFFER || !(module || s.name == "model.embed_tokens.weight" || s.name == "lm_head.weight")) continue;
            CAPTURE(s.name);
            CHECK(gradient_error(loss, m.params.data() + s.offset, m.grads.data() + s.offset, s.numel, 40) < 1e-6);
            checked++;
        }
        CHECK(checked > (moe ? 40 : 12));
        // the embedding gradient reaches exactly the rows of the known next tokens, but for those only at a
        // row's last position, which predicts nothing and which no earlier position attends to (unless the
        // balance loss, over every position's routing, reaches it)
        std::set<int> used;
        for (int n = 0; n < N; n++)
            if (targets[n] >= 0 && (n % T < T - 1 || opt.balance_alpha > 0)) used.insert(targets[n]);
        for (int v = 0; v < c.vocab_size; v++) {
            double sq = 0;
            for (int i = 0; i < D; i++) sq += m.grads[m.layout.offset_of("model.embed_tokens.weight") + (size_t)v * D + i] *
                                              m.grads[m.layout.offset_of("model.embed_tokens.weight") + (size_t)v * D + i];
            CAPTURE(v);
            CHECK((sq > 0) == (used.count(v) > 0));
        }
    }
}

TEST_CASE("whole model with the MTP module backward matches finite differences") {
    struct Variant {
        bool moe;
        float dropout, alpha, lambda, attn_dropout;
    };
    const Variant variants[] = {{true, 0.25f, 0.1f, 0.3f, 0.2f}, {false, 0, 0, 0.7f, 0}};
    int index = 0;
    for (const Variant& v : variants) {
        CAPTURE(index);
        Config c = mtp_config(v.moe);
        RefModel<double> m = random_model(c, 180 + index);
        const int B = 2, T = 7, N = B * T;
        std::vector<int> inputs(N), targets(N);
        for (int n = 0; n < N; n++) {
            inputs[n] = (int)(rng_hash(181 + index, n) % c.vocab_size);
            targets[n] = (int)(rng_hash(182 + index, n) % c.vocab_size);
        }
        StepOptions opt;
        opt.dropout = v.dropout;
        opt.attn_dropout = v.attn_dropout;
        opt.balance_alpha = v.alpha;
        opt.mtp_lambda = v.lambda;
        opt.dropout_key = 78;
        auto loss = [&]() { return (double)ref_forward(m, inputs.data(), targets.data(), B, T, opt); };
        const double l0 = loss();
        CHECK(l0 == doctest::Approx(m.ce_loss + m.balance_loss + v.lambda * m.mtp_loss).epsilon(1e-14));
        CHECK(m.mtp_loss > 0);
        std::fill(m.grads.begin(), m.grads.end(), 0.0);
        ref_backward(m);
        check_all_gradients(m, loss, 12);
        index++;
    }
}

TEST_CASE("MTP: lambda = 0 is the model without the module; any lambda leaves the main loss and logits as they are") {
    Config c = tiny_config(), cm = mtp_config(true);
    RefModel<double> plain = random_model(c, 190), with = random_model(cm, 190);
    // the module's tensors follow the main model's, whose offsets (and so random values) stay the same
    REQUIRE(with.layout.total > plain.layout.total);
    REQUIRE(std::equal(plain.params.begin(), plain.params.end(), with.params.begin()));
    const int B = 2, T = 8, N = B * T;
    std::vector<int> inputs(N), targets(N);
    for (int n = 0; n < N; n++) {
        inputs[n] = (int)(rng_hash(191, n) % c.vocab_size);
        targets[n] = (int)(rng_hash(192, n) % c.vocab_size);
    }
    StepOptions opt;
    opt.dropout = 0.2f;
    opt.balance_alpha = 0.1f;
    opt.dropout_key = 193;
    const double l_plain = ref_forward(plain, inputs.data(), targets.data(), B, T, opt);
    std::fill(plain.grads.begin(), plain.grads.end(), 0.0);
    ref_backward(plain);
    const double l_zero = ref_forward(with, inputs.data(), targets.data(), B, T, opt);
    std::fill(with.grads.begin(), with.grads.end(), 0.0);
    ref_backward(with);
    CHECK(l_zero == l_plain);
    CHECK(with.mtp_loss > 0);  // computed, weighted by 0
    CHECK(std::equal(plain.grads.begin(), plain.grads.end(), with.grads.begin()));
    double module_grads = 0;
    for (size_t i = plain.layout.total; i < with.layout.total; i++) module_grads += std::fabs(with.grads[i]);
    CHECK(module_grads == 0);

    opt.mtp_lambda = 0.3f;
    const double l_mtp = ref_forward(with, inputs.data(), targets.data(), B, T, opt);
    CHECK(with.ce_loss == plain.ce_loss);
    CHECK(with.logits == plain.logits);
    CHECK(l_mtp > l_plain);
    CHECK(l_mtp == doctest::Approx(l_plain + opt.mtp_lambda * (with.mtp_loss + with.mtp.balance)).epsilon(1e-14));
    std::fill(with.grads.begin(), with.grads.end(), 0.0);
    ref_backward(with);
    module_grads = 0;
    for (size_t i = plain.layout.total; i < with.layout.total; i++) module_grads += std::fabs(with.grads[i]);
    CHECK(module_grads > 0);
}

TEST_CASE("MTP: a prediction at position i sees tokens up to t_{i+1} only") {
    Config c = mtp_config(true);
    RefModel<double> m = random_model(c, 200);
    const int T = 9, V = c.vocab_size;
    std::vector<int> inputs(T), targets(T);
    for (int t = 0; t < T; t++) inputs[t] = (int)(rng_hash(201, t) % V);
    for (int t = 0; t < T; t++) targets[t] = t + 1 < T ? inputs[t + 1] : (int)(rng_hash(202, t) % V);
    StepOptions opt;
    opt.mtp_lambda = 0.3f;
    ref_forward(m, inputs.data(), targets.data(), 1, T, opt);
    const std::vector<double> before = m.mtp.logits;
    // t_6 changes: it is the input at 6 and the target at 5, so predictions at 0..4 stay
    inputs[6] = (inputs[6] + 1) % V;
    targets[5] = inputs[6];
    ref_forward(m, inputs.data(), targets.data(), 1, T, opt);
    for (int i = 0; i < 5 * V; i++) REQUIRE(before[i] == m.mtp.logits[i]);
    double changed = 0;
    for (int i = 5 * V; i < T * V; i++) changed += std::fabs(before[i] - m.mtp.logits[i]);
    CHECK(changed > 1e-6);
}

TEST_CASE("the expert bias update moves the MTP block's routing bias like a main layer's") {
    Config c = mtp_config(true);
    RefModel<double> m = random_model(c, 210);
    std::vector<std::vector<int64_t>> load(c.total_layers(), std::vector<int64_t>(c.n_routed_experts, 4));
    load[3][2] = 20;
    const double* bias = m.w.mtp.block.moe.bias;
    REQUIRE(bias == m.params.data() + m.layout.offset_of("model.layers.3.mlp.gate.e_score_correction_bias"));
    std::vector<double> b0(bias, bias + c.n_routed_experts);
    expert_bias_update(c, m.w, load, 0.01f);
    CHECK(bias[2] == doctest::Approx(b0[2] - 0.01));
    CHECK(bias[0] == doctest::Approx(b0[0] + 0.01));
}

TEST_CASE("MTP: eh_proj's first D columns read the next token's embedding, the last D the main model's output") {
    Config c = mtp_config(true);
    const int B = 1, T = 6, N = B * T, D = c.hidden_size;
    std::vector<int> targets(N), other(N);
    for (int n = 0; n < N; n++) {
        targets[n] = (int)(rng_hash(220, n) % c.vocab_size);
        other[n] = (targets[n] + 1 + n) % c.vocab_size;
    }
    auto h = random_vector(N * D, 221, 2.0), h2 = random_vector(N * D, 222, 2.0);
    for (int half = 0; half < 2; half++) {
        CAPTURE(half);
        RefModel<double> m = random_model(c, 223);
        double* w = m.w.mtp.eh_proj.w;
        for (int o = 0; o < D; o++) std::fill_n(w + (size_t)o * 2 * D + (half == 0 ? D : 0), D, 0.0);  // keep one half
        MtpActs<double> a;
        mtp_forward(c, m.w, m.rope, h.data(), targets.data(), B, T, StepOptions{}, a);
        const std::vector<double> base = a.logits;
        // half 0 reads only the embedding: another h changes nothing, other tokens do; half 1 the reverse
        mtp_forward(c, m.w, m.rope, h2.data(), targets.data(), B, T, StepOptions{}, a);
        CHECK((a.logits == base) == (half == 0));
        mtp_forward(c, m.w, m.rope, h.data(), other.data(), B, T, StepOptions{}, a);
        CHECK((a.logits == base) == (half == 1));
    }
}
