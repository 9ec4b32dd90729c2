// gpu_decode.cu — GPU generation (decode.cuh) against the references: prefill +
// step-by-step decode logits against the CPU full forward and the GPU full forward
// at every position, the flash-decoding kernel against a double-precision
// reference over a long cache split across blocks, the sampling rules (greedy,
// top-k, top-p, seed), the CUDA-graph step against the plain one, and self-speculative
// decoding with the MTP module: greedy output equal to plain greedy's, sampled output
// following the main model's distribution (chi-square against the CPU reference).
// Random non-zero inputs; outputs poisoned (NaN) before each kernel runs.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <numeric>

#include "decode.cuh"
#include "decode.h"
#include "test_configs.h"

namespace {

std::vector<float> random_values(size_t n, uint64_t key, float scale, bool bf16_round) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) {
        float x = scale * (2.0f * rng_uniform(key, i) - 1.0f);
        if (x == 0.0f) x = 1e-3f;
        v[i] = bf16_round ? bf16_to_float(float_to_bf16(x)) : x;
    }
    return v;
}

// Decodes B sequences side by side (prompts of 5, 11, 17, 23, 4, 10, ... tokens, then teacher-forced tokens up to
// T = 40) and measures the logits at every predicted position against the CPU reference's full forward and the GPU
// training forward, as relative errors over the whole [positions, V] tensor (SPEC 6). The row count picks the
// step's form: the fused GEMVs, the training form's GEMMs, and from 16 rows flash decoding 16 heads a block.
struct DecodeErrors {
    double vs_cpu, vs_full, full_vs_cpu, worst_position;
};

DecodeErrors decode_errors(int variant, int B) {
    Model m;
    model_create(m, dense_routing(tiny_variant(variant, 96)), 1);
    randomise_weights(m.ref, 50 + variant, true);
    const int V = m.ref.cfg.vocab_size, T = 40;
    std::vector<int> prompt_len(B);
    std::vector<std::vector<int>> seq(B, std::vector<int>(T)), prompts(B);
    for (int b = 0; b < B; b++) {
        prompt_len[b] = 3 + (6 * b + 2) % 25;
        for (int t = 0; t < T; t++) seq[b][t] = (int)(rng_hash(90 + 7 * b + variant, t) % V);
        prompts[b].assign(seq[b].begin(), seq[b].begin() + prompt_len[b]);
    }
    std::vector<std::vector<float>> cpu(B), gpu_full(B);
    for (int b = 0; b < B; b++) {
        ref_forward(m.ref, seq[b].data(), nullptr, 1, T, StepOptions{});
        cpu[b] = m.ref.logits;
    }
    GpuDecoder* d = decoder_create(m, B, T, T);  // prompts up to T: the full forward fits the buffers
    for (int b = 0; b < B; b++) gpu_full[b] = model_logits(m, seq[b]);
    decoder_prefill(*d, prompts);
    // every predicted position of every sequence, gathered as [positions, V]
    std::vector<float> dec_all, cpu_all, full_all;
    double worst = 0;
    // step s feeds token prompt_len[b] + s - 1 of each sequence (the logits after
    // prefill are those of the last prompt token); a sequence that reaches T stops
    for (int s = 0;; s++) {
        std::vector<float> logits = to_host(d->logits, (size_t)B * V);
        bool any = false;
        for (int b = 0; b < B; b++) {
            const int t = prompt_len[b] + s - 1;  // the position these logits predict from
            if (t >= T) continue;
            any = true;
            dec_all.insert(dec_all.end(), &logits[(size_t)b * V], &logits[(size_t)(b + 1) * V]);
            cpu_all.insert(cpu_all.end(), &cpu[b][(size_t)t * V], &cpu[b][(size_t)(t + 1) * V]);
            full_all.insert(full_all.end(), &gpu_full[b][(size_t)t * V], &gpu_full[b][(size_t)(t + 1) * V]);
            worst = std::max(worst, rel_error(&logits[(size_t)b * V], &cpu[b][(size_t)t * V], V));
        }
        if (!any) break;
        std::vector<int> next(B);
        for (int b = 0; b < B; b++) {
            const int t = prompt_len[b] + s;
            next[b] = seq[b][std::min(t, T - 1)];
            if (t == T) decoder_set_active(*d, b, false);  // its cache is full
        }
        CUDA_CHECK(cudaMemcpy(d->tokens, next.data(), B * sizeof(int), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemset(d->logits, 0xFF, (size_t)B * V * sizeof(bf16)));  // poison
        decoder_forward(*d);
        CUDA_CHECK(cudaStreamSynchronize(m.gpu->ctx.stream));
    }
    size_t positions = 0;
    for (int b = 0; b < B; b++) positions += T - prompt_len[b] + 1;
    REQUIRE(dec_all.size() == positions * V);
    // relative error over the whole logits tensor (SPEC 6); the GPU training
    // forward's own error against the CPU is the bf16 baseline
    const double vs_cpu = rel_error(dec_all.data(), cpu_all.data(), dec_all.size());
    const double vs_full = rel_error(dec_all.data(), full_all.data(), dec_all.size());
    const double full_vs_cpu = rel_error(full_all.data(), cpu_all.data(), dec_all.size());
    MESSAGE("variant " << variant << ", " << B << " sequences: decode vs CPU full forward " << vs_cpu << ", vs GPU full forward " << vs_full
                       << " (GPU full forward vs CPU " << full_vs_cpu << "; worst single position vs CPU " << worst << ")");
    decoder_free(d);
    model_free_gpu(m);
    return {vs_cpu, vs_full, full_vs_cpu, worst};
}

}  // namespace

// Both GPU paths are held to the exact logits of the CPU full forward: the decode
// (latent cache, absorbed attention) and, as its bf16 baseline, the training
// forward. The two bf16 paths round at different places, so their distance from
// each other is only reported.
TEST_CASE("GPU decode: prefill + step-by-step logits equal the CPU full forward at every position") {
    for (int variant = 0; variant < 3; variant++)
        for (int B : {2, 6, 16}) {
            CAPTURE(variant);
            CAPTURE(B);
            const DecodeErrors e = decode_errors(variant, B);
            CHECK(e.vs_cpu < 2e-2);
            CHECK(e.full_vs_cpu < 2e-2);
        }
}

namespace {

using FlashDecode = void (*)(float*, float*, float2*, int*, const float*, const bf16*, const DecodeRows&, int, int, int, int, int, float,
                            cudaStream_t);

// Flash decoding (one of decode.cuh's two kernels) of B rows of H heads (latent dc, rope dr) over caches of max_len
// rows, the rows' last positions `last`, against a double-precision reference, split `splits` ways; a second call must
// give the same bits.
void check_flash_decode(FlashDecode flash_decode, const char* name, int B, int H, int dc, int dr, int max_len, const std::vector<int>& last,
                        std::initializer_list<int> split_counts) {
    const int width = dc + dr;
    const float scale = 0.11f;
    std::vector<float> qlat = random_values((size_t)B * H * width, 1, 1.0f, false);
    std::vector<float> cache = random_values((size_t)B * max_len * width, 2, 1.0f, true);
    std::vector<bf16> cache16(cache.size());
    for (size_t i = 0; i < cache.size(); i++) cache16[i] = __float2bfloat16(cache[i]);
    // double reference
    std::vector<double> ref((size_t)B * H * dc, 0);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const float* q = &qlat[((size_t)b * H + h) * width];
            std::vector<double> p(last[b] + 1);
            double mx = -INFINITY, sum = 0;
            for (int t = 0; t <= last[b]; t++) {
                double s = 0;
                for (int j = 0; j < width; j++) s += (double)q[j] * cache[((size_t)b * max_len + t) * width + j];
                mx = std::max(mx, p[t] = s * scale);
            }
            for (double& x : p) sum += (x = std::exp(x - mx));
            for (int t = 0; t <= last[b]; t++)
                for (int j = 0; j < dc; j++) ref[((size_t)b * H + h) * dc + j] += p[t] / sum * cache[((size_t)b * max_len + t) * width + j];
        }
    const int max_splits = std::max(split_counts);
    float* d_q = device_alloc<float>(qlat.size(), "test");
    float* d_out = device_alloc<float>(ref.size(), "test");
    float* d_acc = device_alloc<float>((size_t)B * H * max_splits * dc, "test");
    float2* d_ml = device_alloc<float2>((size_t)B * H * max_splits, "test");
    bf16* d_cache = device_alloc<bf16>(cache16.size(), "test");
    int* d_pos = device_alloc<int>(B, "test");
    int* d_done = device_alloc<int>((size_t)B * H, "test");
    CUDA_CHECK(cudaMemset(d_done, 0, (size_t)B * H * sizeof(int)));
    CUDA_CHECK(cudaMemcpy(d_q, qlat.data(), qlat.size() * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d_cache, cache16.data(), cache16.size() * sizeof(bf16), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d_pos, last.data(), B * sizeof(int), cudaMemcpyHostToDevice));
    std::vector<float> ref32(ref.begin(), ref.end());
    for (int splits : split_counts) {
        CAPTURE(splits);
        std::vector<float> first;
        for (int call = 0; call < 2; call++) {  // the second call finds the merge's counters as the first left them
            CUDA_CHECK(cudaMemset(d_out, 0xFF, ref.size() * sizeof(float)));
            flash_decode(d_out, d_acc, d_ml, d_done, d_q, d_cache, DecodeRows{d_pos, B, 0, max_len}, B, H, dc, dr, splits, scale, 0);
            std::vector<float> out = to_host(d_out, ref.size());
            if (call == 1) {
                CHECK(memcmp(out.data(), first.data(), out.size() * sizeof(float)) == 0);
                break;
            }
            first = out;
            const double err = rel_error(out.data(), ref32.data(), out.size());
            MESSAGE("flash decoding, " << std::string(name) << ", " << H << " heads, dc " << dc << ", dr " << dr << ", " << splits << " splits: relative error " << err);
            CHECK(err < 1e-5);
        }
    }
    for (void* p : std::initializer_list<void*>{d_done, d_q, d_out, d_acc, d_ml, d_cache, d_pos}) cudaFree(p);
}

}  // namespace

// Both kernels, to fp32 accuracy: 16 heads a block runs on tensor cores with each fp32 operand as two bf16 terms.
TEST_CASE("GPU decode: flash decoding over a long cache split across blocks equals the reference") {
    for (auto [flash_decode, name] : {std::pair<FlashDecode, const char*>{flash_decode_head_gpu, "one head a block"},
                                      {flash_decode_group_gpu, "16 heads a block"}}) {
        check_flash_decode(flash_decode, name, 3, 5, 512, 64, 1100, {1099, 517, 0}, {1, 7, 16});
        // (16 heads a block: two head groups, the second partial; rows of 42 elements, not a multiple of 16 bytes)
        check_flash_decode(flash_decode, name, 2, 20, 36, 6, 300, {299, 70}, {1, 3});
    }
}

TEST_CASE("GPU sampling: greedy, top-k, top-p and a fixed seed") {
    const int B = 4, V = 3000;
    // logits on a coarse grid, so ties at the top-k / top-p thresholds happen
    std::vector<float> z((size_t)B * V);
    for (size_t i = 0; i < z.size(); i++) z[i] = bf16_to_float(float_to_bf16(std::round(8 * (2 * rng_uniform(11, i) - 1) * 4) / 4));
    std::vector<bf16> z16(z.size());
    for (size_t i = 0; i < z.size(); i++) z16[i] = __float2bfloat16(z[i]);
    bf16* d_z = device_alloc<bf16>(z.size(), "test");
    int *d_tok = device_alloc<int>(B, "test"), *d_gen = device_alloc<int>(B, "test");
    float* d_kept = device_alloc<float>(z.size(), "test");
    CUDA_CHECK(cudaMemcpy(d_z, z16.data(), z16.size() * sizeof(bf16), cudaMemcpyHostToDevice));
    auto run = [&](const SamplingOptions& so, uint64_t seed, std::vector<float>& kept) {
        CUDA_CHECK(cudaMemset(d_gen, 0, B * sizeof(int)));
        CUDA_CHECK(cudaMemset(d_tok, 0xFF, B * sizeof(int)));
        CUDA_CHECK(cudaMemset(d_kept, 0xFF, z.size() * sizeof(float)));
        sample_gpu(d_tok, d_gen, d_kept, d_z, nullptr, B, V, so, seed, 0);
        kept = to_host(d_kept, z.size());
        std::vector<int> tok(B);
        CUDA_CHECK(cudaMemcpy(tok.data(), d_tok, B * sizeof(int), cudaMemcpyDeviceToHost));
        return tok;
    };
    // the CPU's order: larger logits first, lower ids first among equals
    auto order_of = [&](int b) {
        std::vector<int> o(V);
        std::iota(o.begin(), o.end(), 0);
        std::stable_sort(o.begin(), o.end(), [&](int x, int y) { return z[(size_t)b * V + x] > z[(size_t)b * V + y]; });
        return o;
    };
    std::vector<float> kept;

    SamplingOptions greedy;
    greedy.temperature = 0;
    std::vector<int> tok = run(greedy, 1, kept);
    for (int b = 0; b < B; b++) CHECK(tok[b] == order_of(b)[0]);

    for (float temperature : {1.0f, 0.5f})
        for (int top_k : {0, 1, 7, 40})
            for (float top_p : {1.0f, 0.9f, 0.3f}) {
                CAPTURE(temperature);
                CAPTURE(top_k);
                CAPTURE(top_p);
                SamplingOptions so;
                so.temperature = temperature;
                so.top_k = top_k;
                so.top_p = top_p;
                tok = run(so, 5, kept);
                for (int b = 0; b < B; b++) {
                    // the expected kept set and probabilities, in double
                    std::vector<int> o = order_of(b);
                    const int k = top_k > 0 ? top_k : V;
                    std::vector<double> w(k);
                    double sum = 0;
                    for (int i = 0; i < k; i++) sum += (w[i] = std::exp((z[(size_t)b * V + o[i]] - z[(size_t)b * V + o[0]]) / temperature));
                    int keep = k;
                    if (top_p < 1) {
                        double mass = 0;
                        keep = 0;
                        while (keep < k && mass < top_p * sum) mass += w[keep++];
                        sum = mass;
                    }
                    std::vector<double> expect(V, 0);
                    for (int i = 0; i < keep; i++) expect[o[i]] = w[i] / sum;
                    int kept_count = 0, wrong = 0;
                    double err = 0;
                    for (int i = 0; i < V; i++) {
                        const float p = kept[(size_t)b * V + i];
                        kept_count += p > 0;
                        wrong += (p > 0) != (expect[i] > 0);
                        err = std::max(err, std::fabs(p - expect[i]));
                    }
                    CHECK(kept_count == keep);
                    CHECK(wrong == 0);
                    CHECK(err < 1e-5);
                    CHECK(expect[tok[b]] > 0);
                }
            }

    // a fixed seed repeats; another seed draws differently somewhere
    SamplingOptions so;
    so.temperature = 1;
    std::vector<int> a = run(so, 42, kept), a2 = run(so, 42, kept), c = run(so, 43, kept);
    CHECK(a == a2);
    CHECK(a != c);
    // the draws follow the probabilities: row 0 at top-k 3, drawn by 4000 rows of one launch (each row's own
    // random stream), a launch rather than 4000 so that the sanitizers get through it
    so.top_k = 3;
    run(so, 9, kept);
    const int draws = 4000;
    std::vector<bf16> rows((size_t)draws * V);
    for (int r = 0; r < draws; r++) std::copy(z16.begin(), z16.begin() + V, rows.begin() + (size_t)r * V);
    bf16* d_rows = device_alloc<bf16>(rows.size(), "test");
    int *d_draws = device_alloc<int>(draws, "test"), *d_draws_gen = device_alloc<int>(draws, "test");
    CUDA_CHECK(cudaMemcpy(d_rows, rows.data(), rows.size() * sizeof(bf16), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemset(d_draws_gen, 0, draws * sizeof(int)));
    sample_gpu(d_draws, d_draws_gen, nullptr, d_rows, nullptr, draws, V, so, 9, 0);
    std::map<int, int> count;
    for (float t : to_host(d_draws, draws)) count[(int)t]++;
    CHECK(count.size() == 3);
    for (auto& kv : count) {
        CAPTURE(kv.first);
        CHECK(std::fabs(kv.second / (double)draws - kept[kv.first]) < 0.03);
    }
    cudaFree(d_rows);
    cudaFree(d_draws);
    cudaFree(d_draws_gen);
    cudaFree(d_z);
    cudaFree(d_tok);
    cudaFree(d_gen);
    cudaFree(d_kept);
}

TEST_CASE("GPU decode: the CUDA-graph step equals the plain step, with sparse routing and batch stops") {
    Config c = config_preset("tiny");
    c.vocab_size = 96;
    Model m;
    model_create(m, c, 1);
    randomise_weights(m.ref, 77, true);
    const std::vector<std::vector<int>> prompts = {{1, 2, 3}, {4, 5, 6, 7, 8, 9}, {10}};
    SamplingOptions so;
    so.temperature = 0.9f;
    so.top_k = 20;
    so.top_p = 0.95f;
    std::vector<std::vector<int>> out[2];
    for (int graph = 0; graph < 2; graph++) {
        GpuDecoder* d = decoder_create(m, 4, 32, 8);  // one row left unused
        decoder_prefill(*d, prompts);
        out[graph].assign(3, {});
        decoder_sample(*d, so, 123);
        for (int s = 0; s < 20; s++) {
            const int* tok = decoder_tokens(*d);
            for (int b = 0; b < 3; b++) {
                if (out[graph][b].size() == 12 + 2 * (size_t)b) continue;  // stopped
                CHECK(tok[b] >= 0);
                CHECK(tok[b] < c.vocab_size);
                out[graph][b].push_back(tok[b]);
                if (out[graph][b].size() == 12 + 2 * (size_t)b) decoder_set_active(*d, b, false);
            }
            decoder_step(*d, so, 123, graph == 1);
        }
        decoder_free(d);
        model_free_gpu(m);
    }
    CHECK(out[0] == out[1]);
    for (int b = 0; b < 3; b++) CHECK(out[0][b].size() == 12 + 2 * (size_t)b);
}

namespace {

// n tokens per prompt from a decoder on the GPU (graph steps), plain or speculative; stats counts the drafts
std::vector<std::vector<int>> gpu_generate(Model& m, const std::vector<std::vector<int>>& prompts, int n, const SamplingOptions& so,
                                           uint64_t seed, bool speculative, SpeculativeStats& stats) {
    const int B = (int)prompts.size();
    size_t longest = 0;
    for (const std::vector<int>& p : prompts) longest = std::max(longest, p.size());
    GpuDecoder* d = decoder_create(m, B, (int)longest + n, (int)longest, speculative);
    decoder_prefill(*d, prompts);
    decoder_sample(*d, so, seed);
    std::vector<std::vector<int>> out(B);
    int running = B;
    // sequence b takes k tokens; once it has n, it stops
    auto take = [&](int b, const int* t, int k) {
        out[b].insert(out[b].end(), t, t + k);
        if ((int)out[b].size() < n) return;
        decoder_set_active(*d, b, false);
        running--;
    };
    const int* tok = decoder_tokens(*d);
    for (int b = 0; b < B; b++) take(b, tok + b, 1);
    while (running > 0) {
        decoder_step(*d, so, seed, true);
        const int* count = nullptr;
        tok = speculative ? decoder_speculative_tokens(*d, &count) : decoder_tokens(*d);
        for (int b = 0; b < B; b++) {
            if ((int)out[b].size() >= n) continue;
            if (!speculative) {
                take(b, tok + b, 1);
                continue;
            }
            stats.drafted++;
            stats.accepted += count[b] == 2;
            take(b, tok + 2 * b, count[b]);
        }
    }
    decoder_free(d);
    for (std::vector<int>& o : out) o.resize(n);
    return out;
}

}  // namespace

// A vocabulary of 5, so that the random MTP module's drafts are accepted often enough to take both branches;
// prompts of 1 token (both MTP rows at position 0) to 10, and caches just long enough (the last steps clamp). One
// test case per model variant, so that test/sanitize_gpu.sh runs them side by side.
static void check_speculative_greedy(int variant) {
    SamplingOptions greedy;
    greedy.temperature = 0;
    Model m;
    model_create(m, tiny_mtp(variant, 5), 1);
    randomise_weights(m.ref, 300 + variant, true);
    std::vector<std::vector<int>> prompts;
    for (int k = 0; k < 4; k++) {
        prompts.push_back({});
        for (int t = 0; t < 1 + 3 * k; t++) prompts.back().push_back((int)(rng_hash(50 + k, t) % 5));
    }
    SpeculativeStats stats, unused;
    const std::vector<std::vector<int>> plain = gpu_generate(m, prompts, 30, greedy, 1, false, unused);
    CHECK(gpu_generate(m, prompts, 30, greedy, 1, true, stats) == plain);
    for (int k = 0; k < 4; k++) CHECK(gpu_generate(m, {prompts[k]}, 30, greedy, 1, true, stats)[0] == plain[k]);
    model_free_gpu(m);
    MESSAGE("greedy on the GPU, variant " << variant << ": " << stats.accepted << " of " << stats.drafted << " drafts accepted");
    CHECK(stats.accepted > 0);
    CHECK(stats.accepted < stats.drafted);
}

TEST_CASE("GPU speculative decoding, q_lora, sigmoid groups: greedy gives plain greedy's tokens, batched and alone, to a full cache") {
    check_speculative_greedy(0);
}

TEST_CASE("GPU speculative decoding, q_proj, softmax: greedy gives plain greedy's tokens, batched and alone, to a full cache") {
    check_speculative_greedy(1);
}

TEST_CASE("GPU speculative decoding, YaRN: greedy gives plain greedy's tokens, batched and alone, to a full cache") {
    check_speculative_greedy(2);
}

// As test_decode.cpp's CPU test: the exact distribution of the first three tokens after a prompt under plain
// sampling, from the CPU reference, against N speculative samples drawn on the GPU, a batch of sequences with
// one prompt and seeds of their own. Pearson's chi-square over the V^3 = 125 cells; 4.8 sd above its mean is a
// chance well under 1e-4 for a correct sampler, while always taking the draft gives a chi-square in the
// thousands. bf16 moves the probabilities by about 1%, which adds about N * 1e-4 = 2 to the chi-square. Their
// 20000 draws take too long under compute-sanitizer, which runs the next test case's small batch instead
// (test/sanitize_gpu.sh skips the suite "statistical").
static void check_speculative_distribution(const SamplingOptions& so) {
    const int V = 5, N = 20000, batch = 10000;
    Model m;
    model_create(m, tiny_mtp(0, V), 1);
    randomise_weights(m.ref, 400, true);
    const std::vector<int> prompt = {1, 4, 2};
    const std::vector<double> exact = three_token_distribution(m.ref, prompt, so);
    std::vector<double> count(exact.size(), 0);
    SpeculativeStats stats;
    for (int round = 0; round < N / batch; round++) {
        const std::vector<std::vector<int>> t =
            gpu_generate(m, std::vector<std::vector<int>>(batch, prompt), 3, so, 100000 * (uint64_t)(round + 1), true, stats);
        for (const std::vector<int>& x : t) count[((size_t)x[0] * V + x[1]) * V + x[2]]++;
    }
    int cells = 0;
    double impossible = 0;
    const double chi2 = chi_square(count, exact, N, cells, impossible);
    CHECK(impossible == 0);  // no token outside top-k / top-p
    MESSAGE("GPU, temperature " << so.temperature << ": chi-square " << chi2 << " over " << cells << " cells, " << stats.accepted << " of "
                                << stats.drafted << " drafts accepted");
    CHECK(stats.accepted > 0);
    CHECK(stats.accepted < stats.drafted);
    CHECK(chi2 < cells - 1 + 4.8 * std::sqrt(2.0 * (cells - 1)));
    model_free_gpu(m);
}

TEST_CASE("GPU speculative sampling follows the main model's distribution (temperature 1)" * doctest::test_suite("statistical")) {
    check_speculative_distribution(SamplingOptions{1.0f, 0, 1.0f});
}

TEST_CASE("GPU speculative sampling follows the main model's distribution (temperature 0.7, top-k 4, top-p 0.9)" *
          doctest::test_suite("statistical")) {
    check_speculative_distribution(SamplingOptions{0.7f, 4, 0.9f});
}

// The same kernels at a sanitizer's size: 64 sequences, every token inside top-k / top-p, and the same tokens
// again from the same seed
TEST_CASE("GPU speculative sampling of a small batch: tokens within top-k and top-p, the same from the same seed") {
    const int V = 5, batch = 64;
    const SamplingOptions so{0.7f, 4, 0.9f};
    Model m;
    model_create(m, tiny_mtp(0, V), 1);
    randomise_weights(m.ref, 400, true);
    const std::vector<int> prompt = {1, 4, 2};
    const std::vector<double> exact = three_token_distribution(m.ref, prompt, so);
    SpeculativeStats stats, again;
    const std::vector<std::vector<int>> t = gpu_generate(m, std::vector<std::vector<int>>(batch, prompt), 3, so, 11, true, stats);
    CHECK(gpu_generate(m, std::vector<std::vector<int>>(batch, prompt), 3, so, 11, true, again) == t);
    int outside = 0;
    for (const std::vector<int>& x : t) outside += exact[((size_t)x[0] * V + x[1]) * V + x[2]] == 0;
    CHECK(outside == 0);
    MESSAGE("a small batch: " << stats.accepted << " of " << stats.drafted << " drafts accepted");
    CHECK(stats.accepted > 0);
    CHECK(stats.accepted < stats.drafted);
    model_free_gpu(m);
}
