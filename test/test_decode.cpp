// test_decode.cpp — CPU incremental decoding (decode.h): step-by-step logits equal
// the full-sequence forward at every position, the absorbed attention equals the
// expanded one, the cache holds (dc+dr) values per token and layer, and the cache
// refuses what it cannot hold. (sample_token's rules are tested in test_model.cpp.)
#include <doctest/doctest.h>

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
