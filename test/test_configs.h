// test_configs.h — what the model-level test suites share: the tiny preset in
// three variants that between them take every MLA and routing branch, the
// dense-routing form the GPU-vs-CPU comparisons of whole models use, the random
// weights they run on, the relative error they measure, their temporary files,
// and the statistics of the sampling tests.
#pragma once

#include <unistd.h>

#include <cmath>

#include "config.h"
#include "dataloader.h"
#include "decode.h"
#include "fileutil.h"
#include "reference.h"

// 0: q_lora, sigmoid scores in 4 groups (top-3 within 2 groups), norm_topk_prob;
// 1: plain q_proj, softmax scores, one group, no normalisation of the top-k;
// 2: variant 0 with YaRN (factor 4 over 16 original positions, mscale 0.707,
//    mscale_all_dim 1)
inline Config tiny_variant(int variant, int vocab_size) {
    Config c = config_preset("tiny");
    c.vocab_size = vocab_size;
    if (variant == 1) {
        c.q_lora_rank = 0;
        c.scoring_func = SCORING_SOFTMAX;
        c.n_group = 1;
        c.topk_group = 1;
        c.norm_topk_prob = false;
    }
    if (variant == 2) {
        c.yarn = true;
        c.yarn_factor = 4;
        c.yarn_original_max_position_embeddings = 16;
        c.yarn_mscale = 0.707f;
        c.yarn_mscale_all_dim = 1;
    }
    return c;
}

// a tiny variant with the MTP module
inline Config tiny_mtp(int variant, int vocab_size) {
    Config c = tiny_variant(variant, vocab_size);
    c.num_nextn_predict_layers = 1;
    return c;
}

// Every expert chosen for every token (4 experts, 2 groups where there are groups).
// bf16 router logits move near-tie choices of sparse routing, a jump no tolerance
// can bound; routed densely, the model is continuous in its inputs, yet every MoE
// kernel (router, permutation, grouped GEMMs, combine) still runs. Sparse routing
// decisions are checked exactly, on fp32 logits, in gpu_moe.cu.
inline Config dense_routing(Config c) {
    c.moe_intermediate_size = 16;
    c.n_routed_experts = 4;
    c.num_experts_per_tok = 4;
    if (c.n_group > 1) c.n_group = 2, c.topk_group = 2;
    return c;
}

// For FP8 (fp8.cuh): every width a multiple of 16, as cuBLASLt's FP8 GEMMs need,
// with whole and partial 128-wide tiles (hidden 160 = 128 + 32); dense routing
inline Config fp8_test_config(int vocab_size) {
    Config c = dense_routing(tiny_variant(0, vocab_size));
    c.hidden_size = 160;
    c.intermediate_size = 144;
    c.q_lora_rank = 48;
    c.kv_lora_rank = 32;
    c.qk_nope_head_dim = 16;
    c.qk_rope_head_dim = 16;
    c.v_head_dim = 16;
    return c;
}

// Weights with O(1) activations, non-unit norm weights and a non-zero routing bias:
// HF's init (std 0.02, unit norms) would make attention nearly uniform and hide
// errors. bf16_exact rounds every trainable weight to a bf16 value, so the CPU and
// GPU paths start from the very same weights.
template <typename T>
void randomise_weights(RefModel<T>& m, uint64_t seed, bool bf16_exact) {
    for (const TensorSpec& s : m.layout.tensors) {
        const double scale = s.shape.size() == 2 ? 1.7 / std::sqrt((double)s.shape[1]) : 0.2;
        for (size_t i = 0; i < s.numel; i++) {
            const double r = 2 * rng_uniform(seed + s.offset, i) - 1;
            T v = (T)(scale * r);
            if (s.kind == TENSOR_NO_DECAY) v += 1;
            if (s.kind == TENSOR_BUFFER) v = (T)(0.02 * r);
            else if (bf16_exact) v = (T)bf16_to_float(float_to_bf16((float)v));
            m.params[s.offset + i] = v;
        }
    }
}

// ||a - b|| / ||b|| over n values; infinite when a holds a NaN or an infinity
template <typename T>
double rel_error(const T* a, const T* b, size_t n) {
    double diff = 0, ref = 0;
    for (size_t i = 0; i < n; i++) {
        diff += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        ref += (double)b[i] * b[i];
    }
    if (!std::isfinite(diff)) return INFINITY;
    return ref > 0 ? std::sqrt(diff / ref) : std::sqrt(diff);
}

// The exact distribution of the first three tokens after a prompt under plain sampling, p(t1) p(t2|t1)
// p(t3|t1,t2), over the V^3 cells (t1 * V + t2) * V + t3, from the CPU reference's decoder
inline std::vector<double> three_token_distribution(RefModel<float>& m, const std::vector<int>& prompt, const SamplingOptions& so) {
    const int V = m.cfg.vocab_size, L = (int)prompt.size();
    std::vector<double> exact((size_t)V * V * V, 0), p1, p2, p3;
    DecodeState<float> s;
    decode_init(s, m.cfg, L + 3);
    for (int id : prompt) decode_step(m, s, id);
    sampling_probs(p1, s.logits.data(), V, so);
    for (int a = 0; a < V; a++) {
        if (p1[a] == 0) continue;
        s.len = L;
        sampling_probs(p2, decode_step(m, s, a).data(), V, so);
        for (int b = 0; b < V; b++) {
            if (p2[b] == 0) continue;
            s.len = L + 1;
            sampling_probs(p3, decode_step(m, s, b).data(), V, so);
            for (int c = 0; c < V; c++) exact[((size_t)a * V + b) * V + c] = p1[a] * p2[b] * p3[c];
        }
    }
    return exact;
}

// Pearson's chi-square of counts (N draws) against N * exact; cells expected fewer than 5 times are pooled
// into one, as the approximation asks. cells: the cells it sums; impossible: draws in cells of probability 0.
inline double chi_square(const std::vector<double>& count, const std::vector<double>& exact, int N, int& cells, double& impossible) {
    double chi2 = 0, pooled_count = 0, pooled_exact = 0;
    cells = 0;
    impossible = 0;
    for (size_t k = 0; k < exact.size(); k++) {
        if (exact[k] == 0) {
            impossible += count[k];
        } else if (N * exact[k] < 5) {
            pooled_count += count[k];
            pooled_exact += exact[k];
        } else {
            chi2 += (count[k] - N * exact[k]) * (count[k] - N * exact[k]) / (N * exact[k]);
            cells++;
        }
    }
    if (pooled_exact > 0) {
        chi2 += (pooled_count - N * pooled_exact) * (pooled_count - N * pooled_exact) / (N * pooled_exact);
        cells++;
    }
    return chi2;
}

// an empty directory /tmp/dsv3_<suite>_<pid>_<name> for one test's files (remove_tree it at the end)
inline std::string test_dir(const char* suite, const char* name) {
    std::string d = strfmt("/tmp/dsv3_%s_%d_%s", suite, (int)getpid(), name);
    remove_tree(d);
    make_dirs(d);
    return d;
}

// dir/tokens.bin, n tokens below vocab: a short repeating pattern, every fifth token random (from key), so a
// model has something to learn in a few steps
inline std::string patterned_token_file(const std::string& dir, int n, int vocab, uint64_t key) {
    std::vector<int> t(n);
    for (int i = 0; i < n; i++) t[i] = (i % 5 == 2) ? (int)(rng_hash(key, i) % vocab) : (i * 7) % 13 + 3;
    std::string path = dir + "/tokens.bin";
    write_token_file(path, t, 1);
    return path;
}
