// test_decode.cpp — CPU incremental decoding (decode.h): step-by-step logits equal
// the full-sequence forward at every position (the MTP module's too), the absorbed
// attention equals the expanded one, the cache holds (dc+dr) values per token and
// layer, the cache refuses what it cannot hold, and self-speculative decoding gives
// plain greedy's tokens and plain sampling's distribution. (sample_token's rules are
// tested in test_model.cpp.)
#include <doctest/doctest.h>
#include <omp.h>

#include "decode.h"
#include "model.h"
#include "test_configs.h"

TEST_CASE("decode: step-by-step logits equal the full forward at every position") {
    for (int variant = 0; variant < 3; variant++) {
        CAPTURE(variant);
        RefModel<float> m;
        ref_init(m, tiny_variant(variant, 80));
        randomise_weights(m, 100 + variant, false);
        const int T = 40, V = m.cfg.vocab_size;
        std::vector<int> tokens(T);
        for (int t = 0; t < T; t++) tokens[t] = (int)(rng_hash(7 + variant, t) % V);
        ref_forward(m, tokens.data(), nullptr, 1, T, StepOptions{});
        const std::vector<float> full = m.logits;
        DecodeState<float> s;
        decode_init(s, m.cfg, T);
        double worst = 0;
        for (int t = 0; t < T; t++) {
            const std::vector<float>& step = decode_step(m, s, tokens[t]);
            worst = std::max(worst, rel_error(step.data(), full.data() + (size_t)t * V, V));
        }
        CHECK(s.len == T);
        MESSAGE("variant " << variant << ": worst relative error over " << T << " positions " << worst);
        CHECK(worst < 1e-5);
    }
}

TEST_CASE("decode: absorbed attention equals the expanded form") {
    // double, so the two orders of summation agree to rounding
    const int H = 3, dn = 5, dr = 4, dv = 6, dc = 7, len = 9, width = dc + dr;
    const double scale = 0.37;
    std::vector<double> q((size_t)H * (dn + dr)), cache((size_t)len * width), w((size_t)H * (dn + dv) * dc);
    for (size_t i = 0; i < q.size(); i++) q[i] = 2 * rng_uniform(1, i) - 1;
    for (size_t i = 0; i < cache.size(); i++) cache[i] = 2 * rng_uniform(2, i) - 1;
    for (size_t i = 0; i < w.size(); i++) w[i] = 2 * rng_uniform(3, i) - 1;
    std::vector<double> absorbed((size_t)H * dv, NAN);
    mla_absorbed_attention(absorbed.data(), q.data(), cache.data(), len, w.data(), H, dn, dr, dv, dc, scale);

    // expanded: per head k_t = [W_UK c_t; k_pe_t], v_t = W_UV c_t, then attention
    std::vector<double> k((size_t)len * H * (dn + dr)), v((size_t)len * H * dv), att((size_t)H * len * len), expanded((size_t)len * H * dv);
    for (int t = 0; t < len; t++)
        for (int h = 0; h < H; h++) {
            const double* c = &cache[(size_t)t * width];
            const double* w_uk = &w[(size_t)h * (dn + dv) * dc];
            for (int i = 0; i < dn; i++) k[((size_t)t * H + h) * (dn + dr) + i] = dot(w_uk + (size_t)i * dc, c, dc);
            for (int i = 0; i < dr; i++) k[((size_t)t * H + h) * (dn + dr) + dn + i] = c[dc + i];
            for (int i = 0; i < dv; i++) v[((size_t)t * H + h) * dv + i] = dot(w_uk + (size_t)(dn + i) * dc, c, dc);
        }
    // the query is the last of len positions (causal attention sees them all)
    std::vector<double> qs((size_t)len * H * (dn + dr), 0);
    std::copy(q.begin(), q.end(), qs.begin() + (size_t)(len - 1) * H * (dn + dr));
    attention_forward(expanded.data(), att.data(), qs.data(), k.data(), v.data(), 1, len, H, dn + dr, dv, scale);
    const double err = rel_error(absorbed.data(), expanded.data() + (size_t)(len - 1) * H * dv, (size_t)H * dv);
    MESSAGE("absorbed vs expanded relative error " << err);
    CHECK(err < 1e-13);
}

TEST_CASE("decode: KV-cache bytes per token") {
    const Config c = config_preset("small");
    // bf16: 2 * (kv_lora_rank 512 + qk_rope_head_dim 32) * 12 layers
    CHECK(kv_latent_bytes_per_token(c) == 2u * (512 + 32) * 12);
    // MHA: 2 bytes * 12 heads * (qk_head_dim 96 + v_head_dim 64) * 12 layers
    CHECK(kv_mha_bytes_per_token(c) == 2u * 12 * (96 + 64) * 12);
    // the CPU cache really holds that many fp32 values per token
    const Config t = tiny_variant(0, 80);
    DecodeState<float> s;
    decode_init(s, t, 16);
    CHECK(decode_cache_bytes_per_token(s) == kv_latent_bytes_per_token(t, sizeof(float)));
}

// decode_step_bytes against counts made from the config: the routed experts a batch reaches, the embedding rows,
// the cache, and the MTP module left out (the layout of the same model without it)
TEST_CASE("decode: the bytes a plain decode step reads") {
    Config c = config_preset("small");
    c.num_nextn_predict_layers = 1;
    const ParamLayout L = param_layout(c);
    Config main = c;
    main.num_nextn_predict_layers = 0;
    double main_params = 0;
    for (const TensorSpec& t : param_layout(main).tensors)
        if (t.kind != TENSOR_BUFFER) main_params += t.numel;
    const int E = c.n_routed_experts, K = c.num_experts_per_tok, D = c.hidden_size;
    const double experts = (double)(c.num_hidden_layers - c.first_k_dense_replace) * E * 3 * D * c.moe_intermediate_size;
    // batch E / K = 4 rows reach every expert: each main-model weight once, the embedding's 4 rows
    const double all = decode_step_bytes(c, L, E / K, 0);
    CHECK(all == 2 * (main_params - (double)(c.vocab_size - E / K) * D));
    CHECK(decode_step_bytes(c, L, 64, 0) == all + 2.0 * (64 - E / K) * D);
    // one row reaches K of the E experts of each MoE layer
    CHECK(decode_step_bytes(c, L, 1, 0) == doctest::Approx(all - 2 * (1 - (double)K / E) * experts - 2.0 * (E / K - 1) * D).epsilon(1e-12));
    // and each sequence reads its latent cache: 2 bytes x (512 + 32) x 12 layers a token
    CHECK(decode_step_bytes(c, L, 3, 100) - decode_step_bytes(c, L, 3, 0) == 3 * 100.0 * 2 * (512 + 32) * 12);
}

TEST_CASE("decode: greedy generation from the cache equals argmax of the full forward") {
    RefModel<float> m;
    ref_init(m, tiny_variant(0, 80));
    randomise_weights(m, 7, false);
    std::vector<int> ids = {3, 14, 15, 9, 26};
    DecodeState<float> s;
    decode_init(s, m.cfg, 20);
    const std::vector<float>* logits = nullptr;
    for (int id : ids) logits = &decode_step(m, s, id);
    SamplingOptions greedy;
    greedy.temperature = 0;
    for (int step = 0; step < 10; step++) {
        const int next = sample_token(logits->data(), m.cfg.vocab_size, greedy, 0.5f);
        ref_forward(m, ids.data(), nullptr, 1, (int)ids.size(), StepOptions{});
        const float* last = m.logits.data() + (ids.size() - 1) * (size_t)m.cfg.vocab_size;
        CHECK(next == (int)(std::max_element(last, last + m.cfg.vocab_size) - last));
        ids.push_back(next);
        logits = &decode_step(m, s, next);
    }
}

TEST_CASE("decode: refuses a full cache, a bad token and a cache beyond the context") {
    RefModel<float> m;
    ref_init(m, tiny_variant(0, 80));
    randomise_weights(m, 3, false);
    DecodeState<float> s;
    decode_init(s, m.cfg, 2);
    decode_step(m, s, 1);
    decode_step(m, s, 2);
    CHECK_THROWS_WITH(decode_step(m, s, 3), doctest::Contains("cache is full"));
    DecodeState<float> s2;
    decode_init(s2, m.cfg, 2);
    CHECK_THROWS_WITH(decode_step(m, s2, m.cfg.vocab_size), doctest::Contains("outside the vocabulary"));
    CHECK_THROWS_WITH(decode_init(s2, m.cfg, m.cfg.max_position_embeddings + 1), doctest::Contains("max_position_embeddings"));
}

TEST_CASE("decode: step-by-step MTP logits equal mtp_forward at every position") {
    for (int variant = 0; variant < 3; variant++) {
        CAPTURE(variant);
        RefModel<float> m;
        ref_init(m, tiny_mtp(variant, 80));
        randomise_weights(m, 200 + variant, false);
        const int T = 40, V = m.cfg.vocab_size;
        std::vector<int> tokens(T), targets(T, -1);
        for (int t = 0; t < T; t++) tokens[t] = (int)(rng_hash(9 + variant, t) % V);
        for (int t = 0; t + 1 < T; t++) targets[t] = tokens[t + 1];
        ref_forward(m, tokens.data(), targets.data(), 1, T, StepOptions{});
        const std::vector<float> full = m.mtp.logits;  // row t: from h_t and token t+1
        DecodeState<float> s;
        decode_init(s, m.cfg, T);
        double worst = 0;
        for (int t = 0; t + 1 < T; t++) {
            decode_step(m, s, tokens[t]);
            const std::vector<float>& step = mtp_decode_step(m, s, s.hn.data(), tokens[t + 1]);
            worst = std::max(worst, rel_error(step.data(), full.data() + (size_t)t * V, V));
        }
        CHECK(s.mtp_len == T - 1);
        MESSAGE("variant " << variant << ": worst relative error of the MTP logits over " << T - 1 << " positions " << worst);
        CHECK(worst < 1e-5);
    }
}

TEST_CASE("decode: the MTP acceptance model_eval_loss reports is what the decoders see, position by position") {
    // at each position the decoder's draft distribution q (mtp_decode_step) and the main model's next one p
    // (decode_step): sum_x min(p, q) and the agreement of their arg-maxes, averaged, against MtpEval over the
    // same tokens as one window (two rows, so the rows' ends are skipped)
    const int V = 7, T = 24;
    Model m;
    model_create(m, tiny_mtp(0, V), 1);
    randomise_weights(m.ref, 500, false);
    std::vector<int> tokens(2 * T + 1);
    for (size_t i = 0; i < tokens.size(); i++) tokens[i] = (int)(rng_hash(501, i) % V);
    MtpEval eval;
    const double loss = model_eval_loss(m, tokens, T, 2, &eval);
    double sampled = 0, greedy = 0, mtp_loss = 0;
    int count = 0;
    for (int row = 0; row < 2; row++) {
        DecodeState<float> s;
        decode_init(s, m.ref.cfg, T);
        std::vector<float> q(V);
        for (int t = 0; t < T; t++) {
            const int* in = tokens.data() + row * T;
            const std::vector<float> p = decode_step(m.ref, s, in[t]);
            if (t > 0) {  // q (from position t - 1) against p at t
                std::vector<double> pp, qq;
                sampling_probs(pp, p.data(), V, SamplingOptions{1.0f, 0, 1.0f});
                sampling_probs(qq, q.data(), V, SamplingOptions{1.0f, 0, 1.0f});
                for (int i = 0; i < V; i++) sampled += std::min(pp[i], qq[i]);
                greedy += std::max_element(p.begin(), p.end()) - p.begin() == std::max_element(q.begin(), q.end()) - q.begin();
                mtp_loss -= std::log(qq[in[t + 1]]);
                count++;
            }
            if (t + 1 < T) q = mtp_decode_step(m.ref, s, s.hn.data(), in[t + 1]);
        }
    }
    MESSAGE("loss " << loss << ", mtp loss " << eval.loss << " (decoders " << mtp_loss / count << "), accepted sampled " << eval.accepted_sampled
                    << " (" << sampled / count << "), greedy " << eval.accepted_greedy << " (" << greedy / count << ")");
    CHECK(eval.predictions == count);
    CHECK(count == 2 * (T - 1));
    CHECK(std::fabs(eval.loss - mtp_loss / count) < 1e-5 * eval.loss);
    CHECK(std::fabs(eval.accepted_sampled - sampled / count) < 1e-5);
    CHECK(eval.accepted_greedy == greedy / count);
    CHECK(eval.accepted_sampled > 0);
    CHECK(eval.accepted_sampled < 1);
}

TEST_CASE("mtp_acceptance: the overlap of two distributions and the agreement of their arg-maxes, by hand") {
    // a row of 3 positions, V = 3: position 0 drafts against the main model at 1, position 1 against 2; position 2
    // has no target. Softmaxes given directly (probs) beside logits whose arg-maxes are the same.
    const float probs[9] = {0.2f, 0.5f, 0.3f, 0.6f, 0.3f, 0.1f, 0.1f, 0.1f, 0.8f};
    const float mtp_probs[9] = {0.7f, 0.2f, 0.1f, 0.3f, 0.3f, 0.4f, 1, 0, 0};
    const int mtp_targets[3] = {2, 0, -1};
    double sampled = 0, greedy = 0;
    const int n = mtp_acceptance(probs, mtp_probs, probs, mtp_probs, mtp_targets, 3, 3, sampled, greedy);
    CHECK(n == 2);
    // min(p1, q0) = 0.6 + 0.2 + 0.1; min(p2, q1) = 0.1 + 0.1 + 0.4
    CHECK(sampled == doctest::Approx(0.9 + 0.6).epsilon(1e-6));
    CHECK(greedy == 2);  // argmax q0 = 0 = argmax p1; argmax q1 = 2 = argmax p2
}

// plain decoding: prompt, then n tokens sampled from the main model with sample_token
static std::vector<int> plain_generate(RefModel<float>& m, const std::vector<int>& prompt, int n, const SamplingOptions& so, Rng rng) {
    DecodeState<float> s;
    decode_init(s, m.cfg, (int)prompt.size() + n);
    const std::vector<float>* logits = nullptr;
    for (int id : prompt) logits = &decode_step(m, s, id);
    std::vector<int> out;
    for (int i = 0; i < n; i++) {
        out.push_back(sample_token(logits->data(), m.cfg.vocab_size, so, rng.uniform()));
        if (i + 1 < n) logits = &decode_step(m, s, out.back());
    }
    return out;
}

// speculative decoding from a prefilled state: n tokens (the first from the prefill's logits)
static std::vector<int> speculative_generate(RefModel<float>& m, DecodeState<float> s, int n, const SamplingOptions& so, Rng rng,
                                             SpeculativeStats& stats) {
    std::vector<double> p;
    sampling_probs(p, s.logits.data(), m.cfg.vocab_size, so);
    std::vector<int> out = {sample_probs(p, rng.uniform())};
    while ((int)out.size() < n) speculative_step(m, s, out.back(), so, rng, out, stats);
    out.resize(n);
    return out;
}

TEST_CASE("decode: greedy speculative decoding gives plain greedy's tokens") {
    // a vocabulary of 5, so that the random MTP module's drafts are accepted often enough to take both branches
    SamplingOptions greedy;
    greedy.temperature = 0;
    SpeculativeStats stats;
    for (int variant = 0; variant < 3; variant++) {
        RefModel<float> m;
        ref_init(m, tiny_mtp(variant, 5));
        randomise_weights(m, 300 + variant, false);
        for (int k = 0; k < 4; k++) {
            CAPTURE(variant);
            CAPTURE(k);
            std::vector<int> prompt;
            for (int t = 0; t < 1 + 3 * k; t++) prompt.push_back((int)(rng_hash(50 + k, t) % 5));
            const int n = 30;
            // the smallest cache that holds n tokens (the last is never fed back), so the last steps have no room to
            // verify two positions and take the plain step
            DecodeState<float> s;
            decode_init(s, m.cfg, (int)prompt.size() + n - 1);
            speculative_prefill(m, s, prompt);
            CHECK(speculative_generate(m, s, n, greedy, Rng{1, 0}, stats) == plain_generate(m, prompt, n, greedy, Rng{1, 0}));
        }
    }
    MESSAGE("greedy: " << stats.accepted << " of " << stats.drafted << " drafts accepted");
    CHECK(stats.accepted > 0);
    CHECK(stats.accepted < stats.drafted);
}

TEST_CASE("decode: speculative sampling follows the main model's distribution") {
    // The exact distribution of the first three tokens after a prompt under plain sampling, p(t1) p(t2|t1) p(t3|t1,t2),
    // against N speculative samples: t1 comes from the prefill, t2 from the first draft (accepted or resampled), t3 from
    // the token after an acceptance or from the second draft. Pearson's chi-square over the V^3 = 125 cells (at temperature 1) has
    // 124 degrees of freedom (mean 124, sd 15.7); 200 is 4.8 sd out, a chance well under 1e-4 for a correct sampler,
    // while a sampler that always took the draft gives t2 the MTP module's distribution and a chi-square in the
    // thousands. The seeds are fixed, so the test repeats.
    const int V = 5, N = 20000;
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);  // the tiny model's steps are shorter than handing work to other threads
    RefModel<float> m;
    ref_init(m, tiny_mtp(0, V));
    randomise_weights(m, 400, false);
    const std::vector<int> prompt = {1, 4, 2};
    for (const SamplingOptions& so : {SamplingOptions{1.0f, 0, 1.0f}, SamplingOptions{0.7f, 4, 0.9f}}) {
        CAPTURE(so.temperature);
        const std::vector<double> exact = three_token_distribution(m, prompt, so);
        DecodeState<float> pre;
        decode_init(pre, m.cfg, (int)prompt.size() + 4);
        speculative_prefill(m, pre, prompt);
        std::vector<double> count(exact.size(), 0);
        SpeculativeStats stats;
        for (int i = 0; i < N; i++) {
            const std::vector<int> t = speculative_generate(m, pre, 3, so, Rng{7, (uint64_t)i * 16}, stats);
            count[((size_t)t[0] * V + t[1]) * V + t[2]]++;
        }
        int cells = 0;
        double impossible = 0, tv = 0;
        const double chi2 = chi_square(count, exact, N, cells, impossible);
        for (size_t k = 0; k < exact.size(); k++) tv += 0.5 * std::fabs(count[k] / N - exact[k]);
        CHECK(impossible == 0);  // no token outside top-k / top-p
        MESSAGE("temperature " << so.temperature << ": chi-square " << chi2 << " over " << cells << " cells, total variation " << tv
                               << ", " << stats.accepted << " of " << stats.drafted << " drafts accepted");
        CHECK(stats.accepted > 0);
        CHECK(stats.accepted < stats.drafted);
        CHECK(chi2 < cells - 1 + 4.8 * std::sqrt(2.0 * (cells - 1)));
    }
    omp_set_num_threads(threads);
}
