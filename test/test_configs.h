// test_configs.h — model configurations shared by the test suites: the tiny preset
// in three variants that between them take every MLA and routing branch, and the
// dense-routing form the GPU-vs-CPU comparisons of whole models use.
#pragma once

#include "config.h"

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
