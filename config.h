// config.h — the model's architecture, named with Hugging Face's config.json field names (DeepseekV3Config),
// the named presets, consistency checks, and reading and writing config.json.
//
// How the seed's knobs map onto these fields:
//   d_model -> hidden_size, num_heads -> num_attention_heads,
//   d_latent -> kv_lora_rank, rope_dim -> qk_rope_head_dim,
//   layer_norm_epsilon -> rms_norm_eps,
//   d_ff -> intermediate_size (the dense FFN of the first first_k_dense_replace
//           layers) and moe_intermediate_size = d_ff / 4 (each routed expert and
//           each shared expert), so a token's active FFN width with top-2 routing
//           and one shared expert is 3/4 of the dense layer's,
//   num_experts -> n_routed_experts, top_k -> num_experts_per_tok.
// Training-only knobs (dropout, balance-loss weight, bias update speed) are not architecture and live in the
// trainer's options.
#pragma once

#include <array>
#include <string>
#include <utility>

#include "common.h"
#include "json.h"

enum ScoringFunc { SCORING_SIGMOID = 0, SCORING_SOFTMAX = 1 };

struct Config {
    int vocab_size = 1024;
    int hidden_size = 256;
    int intermediate_size = 1024;      // dense FFN width
    int moe_intermediate_size = 256;   // width of each routed and shared expert
    int num_hidden_layers = 4;
    int num_attention_heads = 4;
    int q_lora_rank = 0;               // 0 = plain q_proj
    int kv_lora_rank = 64;             // dc
    int qk_nope_head_dim = 64;         // dn
    int qk_rope_head_dim = 32;         // dr
    int v_head_dim = 64;               // dv
    int n_routed_experts = 4;
    int n_shared_experts = 1;
    int num_experts_per_tok = 2;
    int n_group = 1;
    int topk_group = 1;
    int first_k_dense_replace = 1;
    float routed_scaling_factor = 1.0f;
    bool norm_topk_prob = true;
    int scoring_func = SCORING_SIGMOID;
    float rms_norm_eps = 1e-6f;
    float rope_theta = 10000.0f;
    // rope_scaling of type "yarn"; absent when yarn is false
    bool yarn = false;
    float yarn_factor = 1.0f;
    int yarn_original_max_position_embeddings = 0;
    float yarn_beta_fast = 32.0f;
    float yarn_beta_slow = 1.0f;
    float yarn_mscale = 0.0f;          // 0 = absent, as transformers treats it
    float yarn_mscale_all_dim = 0.0f;  // 0 = absent
    int max_position_embeddings = 1024;
    int num_nextn_predict_layers = 0;  // 1: the multi-token-prediction module (depth 1), its block at index num_hidden_layers
    // quantization_config of DeepSeek-V3's FP8 checkpoints: the layers' projection weights
    // stored as E4M3 in 128 x 128 blocks, each with a fp32 weight_scale_inv (checkpoint.cpp)
    bool fp8_weights = false;

    int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
    // the rule of HF's DeepseekV3 for every block, the MTP module's (layer num_hidden_layers) included
    bool is_moe_layer(int layer) const { return n_routed_experts > 0 && layer >= first_k_dense_replace; }
    // the main layers, then the MTP module's block
    int total_layers() const { return num_hidden_layers + num_nextn_predict_layers; }
};

// The preset names are "tiny" (tests), "mini" (the seed's create_mini_model), "small"
// (the seed's DeepSeekV3Mini) and "medium" (2.4B parameters, 32 experts: hidden 2048,
// where FP8's GEMMs have room to pay; AdamW state and all fit one H200). Throws on an
// unknown name.
inline Config config_preset(const std::string& name) {
    Config c;  // the defaults above are "mini"
    if (name == "mini") return c;
    const int column = name == "tiny" ? 0 : name == "small" ? 1 : name == "medium" ? 2 : -1;
    if (column < 0) fail("unknown preset '%s' (choose tiny, mini, small or medium)", name.c_str());
    const std::pair<int Config::*, std::array<int, 3>> sizes[] = {
        // field                                 tiny  small  medium
        {&Config::vocab_size,                   {61, 32768, 32768}},
        {&Config::hidden_size,                  {32,   768,  2048}},
        {&Config::intermediate_size,            {48,  3072,  8192}},
        {&Config::moe_intermediate_size,        {12,   768,   768}},
        {&Config::num_hidden_layers,            { 3,    12,    14}},
        {&Config::num_attention_heads,          { 2,    12,    16}},
        {&Config::q_lora_rank,                  {16,   384,   768}},
        {&Config::kv_lora_rank,                 {12,   512,   512}},
        {&Config::qk_nope_head_dim,             { 8,    64,   128}},
        {&Config::qk_rope_head_dim,             { 4,    32,    64}},
        {&Config::v_head_dim,                   { 6,    64,   128}},
        {&Config::n_routed_experts,             { 8,     8,    32}},
        {&Config::n_shared_experts,             { 1,     1,     1}},
        {&Config::num_experts_per_tok,          { 3,     2,     4}},
        {&Config::n_group,                      { 4,     4,     4}},
        {&Config::topk_group,                   { 2,     2,     2}},
        {&Config::first_k_dense_replace,        { 1,     1,     1}},
        {&Config::max_position_embeddings,      {64,  2048,  4096}},
    };
    for (const auto& [field, values] : sizes) c.*field = values[column];
    if (name == "tiny") c.routed_scaling_factor = 2.5f;
    return c;
}

// The peak learning rate ./train uses with a preset when --lr is not given. 3e-3 suits tiny to small; medium
// spikes there (gradient norm 70 at step 2) and ends 300 steps of the default corpus at a validation loss of
// 1.05, against 0.70 at 1e-3 (bench/RESULTS.md, H200).
constexpr float DEFAULT_LEARNING_RATE = 3e-3f;
inline float preset_learning_rate(const std::string& name) { return name == "medium" ? 1e-3f : DEFAULT_LEARNING_RATE; }

// Refuses configurations the model cannot run, naming the offending fields.
inline void config_check(const Config& c) {
    auto need = [](bool ok, const char* what) {
        if (!ok) fail("inconsistent config: %s", what);
    };
    // upper bounds far past any model this code can train, so that sizes computed from them fit 64 bits and
    // a damaged or hostile config.json is refused here rather than by an allocation that exhausts memory
    const std::pair<int, const char*> limits[] = {
        {c.vocab_size <= (1 << 24), "vocab_size must be at most 16777216"},
        {c.hidden_size <= 65536, "hidden_size must be at most 65536"},
        {c.intermediate_size <= (1 << 20), "intermediate_size must be at most 1048576"},
        {c.moe_intermediate_size <= (1 << 20), "moe_intermediate_size must be at most 1048576"},
        {c.num_hidden_layers <= 256, "num_hidden_layers must be at most 256"},
        {c.num_attention_heads <= 1024, "num_attention_heads must be at most 1024"},
        {c.q_lora_rank <= 65536 && c.kv_lora_rank <= 65536, "q_lora_rank and kv_lora_rank must be at most 65536"},
        {c.qk_nope_head_dim <= 4096 && c.qk_rope_head_dim <= 4096 && c.v_head_dim <= 4096, "head dimensions must be at most 4096"},
        {c.n_routed_experts <= 1024, "n_routed_experts must be at most 1024"},
        {c.n_shared_experts <= 64, "n_shared_experts must be at most 64"},
        {c.max_position_embeddings <= (1 << 22), "max_position_embeddings must be at most 4194304"},
    };
    for (const auto& [ok, what] : limits) need(ok, what);
    need(std::isfinite(c.routed_scaling_factor) && c.routed_scaling_factor > 0, "routed_scaling_factor must be finite and positive");
    need(std::isfinite(c.rope_theta), "rope_theta must be finite");
    need(c.rms_norm_eps < 1, "rms_norm_eps must be below 1");
    need(c.vocab_size > 0, "vocab_size must be positive");
    need(c.hidden_size > 0, "hidden_size must be positive");
    need(c.n_routed_experts >= 0, "n_routed_experts must be >= 0");
    need(c.num_hidden_layers > 0, "num_hidden_layers must be positive");
    need(c.num_attention_heads > 0, "num_attention_heads must be positive");
    need(c.q_lora_rank >= 0, "q_lora_rank must be 0 (plain q_proj) or positive");
    need(c.kv_lora_rank > 0, "kv_lora_rank must be positive");
    need(c.qk_nope_head_dim > 0, "qk_nope_head_dim must be positive");
    need(c.qk_rope_head_dim > 0 && c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be positive and even");
    need(c.v_head_dim > 0, "v_head_dim must be positive");
    need(c.max_position_embeddings > 0, "max_position_embeddings must be positive");
    need(c.rms_norm_eps > 0, "rms_norm_eps must be positive");
    need(c.rope_theta > 1, "rope_theta must be greater than 1");
    need(c.first_k_dense_replace >= 0, "first_k_dense_replace must be >= 0");
    need(c.num_nextn_predict_layers == 0 || c.num_nextn_predict_layers == 1,
         "num_nextn_predict_layers must be 0 or 1 (one multi-token-prediction module, depth 1)");
    bool any_dense = c.n_routed_experts == 0 || c.first_k_dense_replace > 0;
    if (any_dense) need(c.intermediate_size > 0, "intermediate_size must be positive");
    if (c.n_routed_experts > 0 && c.first_k_dense_replace < c.total_layers()) {
        need(c.moe_intermediate_size > 0, "moe_intermediate_size must be positive");
        need(c.n_shared_experts >= 0, "n_shared_experts must be >= 0");
        need(c.num_experts_per_tok > 0, "num_experts_per_tok must be positive");
        need(c.num_experts_per_tok <= c.n_routed_experts, "num_experts_per_tok (top-k) exceeds n_routed_experts");
        need(c.n_group > 0 && c.n_routed_experts % c.n_group == 0, "n_routed_experts must be divisible by n_group");
        need(c.topk_group > 0 && c.topk_group <= c.n_group, "topk_group must be in 1..n_group");
        if (c.n_group > 1) need(c.n_routed_experts / c.n_group >= 2, "each expert group needs at least 2 experts (group score = sum of its top 2)");
        need(c.num_experts_per_tok <= c.topk_group * (c.n_routed_experts / c.n_group),
             "num_experts_per_tok exceeds the experts in topk_group groups");
        need(c.scoring_func == SCORING_SIGMOID || c.scoring_func == SCORING_SOFTMAX, "scoring_func must be sigmoid or softmax");
    }
    // the parameter count, in double so that nothing overflows: at most 2^40 (a trillion)
    const double D = c.hidden_size, H = c.num_attention_heads, E = c.n_routed_experts, MI = c.moe_intermediate_size;
    const double attention = (c.q_lora_rank > 0 ? D * c.q_lora_rank + (double)c.q_lora_rank * H * c.qk_head_dim() : D * H * c.qk_head_dim()) +
                             D * (c.kv_lora_rank + c.qk_rope_head_dim) + (double)c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) +
                             H * c.v_head_dim * D;
    double params = 2.0 * c.vocab_size * D;
    for (int l = 0; l < c.total_layers(); l++)
        params += attention + (c.is_moe_layer(l) ? E * D + 3 * MI * D * (E + c.n_shared_experts) : 3.0 * c.intermediate_size * D);
    params += c.num_nextn_predict_layers * 2.0 * D * D;  // the MTP module's eh_proj
    if (params > 1099511627776.0) fail("inconsistent config: %.3g parameters; at most 2^40", params);
    if (c.yarn) {
        need(c.yarn_factor >= 1 && std::isfinite(c.yarn_factor), "rope_scaling.factor must be finite and >= 1");
        need(std::isfinite(c.yarn_beta_fast) && std::isfinite(c.yarn_mscale) && std::isfinite(c.yarn_mscale_all_dim),
             "rope_scaling's beta_fast, mscale and mscale_all_dim must be finite");
        need(c.yarn_original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings must be positive");
        need(c.yarn_beta_fast > c.yarn_beta_slow && c.yarn_beta_slow > 0, "rope_scaling needs beta_fast > beta_slow > 0");
    }
}

// ----------------------------------------------------------------------------
// config.json

inline std::string config_to_json(const Config& c) {
    std::string s = "{\n";
    s += "  \"architectures\": [\"DeepseekV3ForCausalLM\"],\n";
    s += "  \"model_type\": \"deepseek_v3\",\n";
    s += strfmt("  \"vocab_size\": %d,\n", c.vocab_size);
    s += strfmt("  \"hidden_size\": %d,\n", c.hidden_size);
    s += strfmt("  \"intermediate_size\": %d,\n", c.intermediate_size);
    s += strfmt("  \"moe_intermediate_size\": %d,\n", c.moe_intermediate_size);
    s += strfmt("  \"num_hidden_layers\": %d,\n", c.num_hidden_layers);
    s += strfmt("  \"num_attention_heads\": %d,\n", c.num_attention_heads);
    s += strfmt("  \"num_key_value_heads\": %d,\n", c.num_attention_heads);
    if (c.q_lora_rank > 0) s += strfmt("  \"q_lora_rank\": %d,\n", c.q_lora_rank);
    else s += "  \"q_lora_rank\": null,\n";
    s += strfmt("  \"kv_lora_rank\": %d,\n", c.kv_lora_rank);
    s += strfmt("  \"qk_nope_head_dim\": %d,\n", c.qk_nope_head_dim);
    s += strfmt("  \"qk_rope_head_dim\": %d,\n", c.qk_rope_head_dim);
    s += strfmt("  \"v_head_dim\": %d,\n", c.v_head_dim);
    s += strfmt("  \"head_dim\": %d,\n", c.qk_rope_head_dim);
    s += strfmt("  \"n_routed_experts\": %d,\n", c.n_routed_experts);
    s += strfmt("  \"n_shared_experts\": %d,\n", c.n_shared_experts);
    s += strfmt("  \"num_experts_per_tok\": %d,\n", c.num_experts_per_tok);
    s += strfmt("  \"n_group\": %d,\n", c.n_group);
    s += strfmt("  \"topk_group\": %d,\n", c.topk_group);
    s += strfmt("  \"first_k_dense_replace\": %d,\n", c.first_k_dense_replace);
    s += "  \"routed_scaling_factor\": " + json_float(c.routed_scaling_factor) + ",\n";
    s += strfmt("  \"norm_topk_prob\": %s,\n", c.norm_topk_prob ? "true" : "false");
    s += strfmt("  \"scoring_func\": \"%s\",\n", c.scoring_func == SCORING_SIGMOID ? "sigmoid" : "softmax");
    s += "  \"topk_method\": \"noaux_tc\",\n";
    s += "  \"hidden_act\": \"silu\",\n";
    s += "  \"rms_norm_eps\": " + json_float(c.rms_norm_eps) + ",\n";
    s += "  \"rope_theta\": " + json_float(c.rope_theta) + ",\n";
    s += "  \"rope_interleave\": true,\n";
    if (c.yarn) {
        s += "  \"rope_scaling\": {\"type\": \"yarn\", \"rope_type\": \"yarn\", \"factor\": " + json_float(c.yarn_factor) +
             strfmt(", \"original_max_position_embeddings\": %d, ", c.yarn_original_max_position_embeddings) +
             "\"beta_fast\": " + json_float(c.yarn_beta_fast) + ", \"beta_slow\": " + json_float(c.yarn_beta_slow) +
             ", \"mscale\": " + json_float(c.yarn_mscale) + ", \"mscale_all_dim\": " + json_float(c.yarn_mscale_all_dim) + "},\n";
    } else {
        s += "  \"rope_scaling\": null,\n";
    }
    s += strfmt("  \"max_position_embeddings\": %d,\n", c.max_position_embeddings);
    s += "  \"attention_bias\": false,\n";
    s += "  \"attention_dropout\": 0.0,\n";
    s += "  \"tie_word_embeddings\": false,\n";
    s += strfmt("  \"num_nextn_predict_layers\": %d,\n", c.num_nextn_predict_layers);
    s += "  \"initializer_range\": 0.02,\n";
    if (c.fp8_weights)
        s += "  \"quantization_config\": {\"quant_method\": \"fp8\", \"fmt\": \"e4m3\", \"activation_scheme\": \"dynamic\", "
             "\"weight_block_size\": [128, 128]},\n";
    s += "  \"torch_dtype\": \"float32\"\n";
    s += "}\n";
    return s;
}

// Reads a config.json written by us or by transformers (4.x "rope_scaling" or 5.x
// "rope_parameters"). `where` names the file in error messages.
inline Config config_from_json(const std::string& text, const std::string& where) {
    JsonValue root;
    std::string err;
    if (!json_parse(text, root, err)) fail("%s: invalid JSON: %s", where.c_str(), err.c_str());
    if (root.type != JsonValue::Object) fail("%s: expected a JSON object", where.c_str());
    Config c;
    auto get_int = [&](const char* key, int& out, bool required) {
        const JsonValue* v = root.get(key);
        if (!v || v->type == JsonValue::Null) {
            if (required) fail("%s: missing field \"%s\"", where.c_str(), key);
            return;
        }
        if (v->type != JsonValue::Number || !(v->number >= -2147483648.0 && v->number <= 2147483647.0) ||
            v->number != std::floor(v->number))
            fail("%s: field \"%s\" must be an integer", where.c_str(), key);
        out = (int)v->number;
    };
    auto get_float = [&](const JsonValue& obj, const char* key, float& out) {
        const JsonValue* v = obj.get(key);
        if (!v || v->type == JsonValue::Null) return;
        if (v->type != JsonValue::Number) fail("%s: field \"%s\" must be a number", where.c_str(), key);
        out = (float)v->number;
    };
    auto get_bool = [&](const char* key, bool& out) {
        const JsonValue* v = root.get(key);
        if (!v || v->type == JsonValue::Null) return;
        if (v->type != JsonValue::Bool) fail("%s: field \"%s\" must be true or false", where.c_str(), key);
        out = v->boolean;
    };
    get_int("vocab_size", c.vocab_size, true);
    get_int("hidden_size", c.hidden_size, true);
    get_int("intermediate_size", c.intermediate_size, true);
    get_int("moe_intermediate_size", c.moe_intermediate_size, true);
    get_int("num_hidden_layers", c.num_hidden_layers, true);
    get_int("num_attention_heads", c.num_attention_heads, true);
    c.q_lora_rank = 0;
    get_int("q_lora_rank", c.q_lora_rank, false);
    get_int("kv_lora_rank", c.kv_lora_rank, true);
    get_int("qk_nope_head_dim", c.qk_nope_head_dim, true);
    get_int("qk_rope_head_dim", c.qk_rope_head_dim, true);
    get_int("v_head_dim", c.v_head_dim, true);
    get_int("n_routed_experts", c.n_routed_experts, false);
    get_int("n_shared_experts", c.n_shared_experts, false);
    get_int("num_experts_per_tok", c.num_experts_per_tok, false);
    get_int("n_group", c.n_group, false);
    get_int("topk_group", c.topk_group, false);
    get_int("first_k_dense_replace", c.first_k_dense_replace, false);
    get_int("max_position_embeddings", c.max_position_embeddings, false);
    get_int("num_nextn_predict_layers", c.num_nextn_predict_layers, false);
    get_float(root, "routed_scaling_factor", c.routed_scaling_factor);
    get_float(root, "rms_norm_eps", c.rms_norm_eps);
    get_float(root, "rope_theta", c.rope_theta);
    get_bool("norm_topk_prob", c.norm_topk_prob);
    bool tied = false;
    get_bool("tie_word_embeddings", tied);
    if (tied) fail("%s: tie_word_embeddings=true is not supported (DeepSeek-V3 unties the head)", where.c_str());
    if (const JsonValue* v = root.get("scoring_func")) {
        if (v->type != JsonValue::String || (v->str != "sigmoid" && v->str != "softmax"))
            fail("%s: scoring_func must be \"sigmoid\" or \"softmax\"", where.c_str());
        c.scoring_func = v->str == "sigmoid" ? SCORING_SIGMOID : SCORING_SOFTMAX;
    }
    if (const JsonValue* q = root.get("quantization_config"); q && q->type != JsonValue::Null) {
        auto is = [&](const char* key, const char* value) {
            const JsonValue* v = q->get(key);
            return v && v->type == JsonValue::String && v->str == value;
        };
        const JsonValue* block = q->get("weight_block_size");
        const bool blocks_128 = block && block->type == JsonValue::Array && block->items.size() == 2 &&
                                block->items[0].type == JsonValue::Number && block->items[0].number == 128 &&
                                block->items[1].type == JsonValue::Number && block->items[1].number == 128;
        if (!is("quant_method", "fp8") || !is("fmt", "e4m3") || !blocks_128)
            fail("%s: quantization_config: only DeepSeek-V3's FP8 is supported (quant_method \"fp8\", fmt \"e4m3\", weight_block_size [128, 128])",
                 where.c_str());
        c.fp8_weights = true;
    }
    bool interleave = true;
    get_bool("rope_interleave", interleave);
    if (!interleave) fail("%s: rope_interleave=false is not supported", where.c_str());

    // transformers 5 folds rope_theta and rope_scaling into rope_parameters
    const JsonValue* rope = root.get("rope_scaling");
    if (!rope || rope->type == JsonValue::Null) rope = root.get("rope_parameters");
    if (rope && rope->type == JsonValue::Object) {
        get_float(*rope, "rope_theta", c.rope_theta);
        const JsonValue* type = rope->get("rope_type");
        if (!type) type = rope->get("type");
        std::string kind = type && type->type == JsonValue::String ? type->str : "default";
        if (kind == "yarn") {
            c.yarn = true;
            get_float(*rope, "factor", c.yarn_factor);
            float orig = (float)c.max_position_embeddings;
            get_float(*rope, "original_max_position_embeddings", orig);
            if (orig != std::floor(orig) || orig < 1 || orig > 1e9)
                fail("%s: rope original_max_position_embeddings must be a positive integer", where.c_str());
            c.yarn_original_max_position_embeddings = (int)orig;
            get_float(*rope, "beta_fast", c.yarn_beta_fast);
            get_float(*rope, "beta_slow", c.yarn_beta_slow);
            get_float(*rope, "mscale", c.yarn_mscale);
            get_float(*rope, "mscale_all_dim", c.yarn_mscale_all_dim);
        } else if (kind != "default") {
            fail("%s: rope type \"%s\" is not supported (only yarn)", where.c_str(), kind.c_str());
        }
    } else if (rope && rope->type != JsonValue::Null) {
        fail("%s: rope_scaling must be an object or null", where.c_str());
    }
    config_check(c);
    return c;
}
