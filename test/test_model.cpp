// test_model.cpp — the model as the binaries use it: checkpoints round-trip
// bit-exactly (FP8 ones to their quantization) and refuse damaged ones, training resumes exactly, the loss falls,
// and sampling keeps the tokens it should.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cfloat>
#include <set>

#include "fileutil.h"
#include "model.h"
#include "safetensors.h"
#include "test_configs.h"

namespace {

std::string temp_dir(const char* name) { return test_dir("test_model", name); }

// a token file of n tokens with some structure (a repeating phrase plus noise)
std::string structured_tokens(const std::string& dir, int n, int vocab) {
    std::vector<int> t(n);
    for (int i = 0; i < n; i++) t[i] = (i % 7 == 3) ? (int)(rng_hash(5, i) % vocab) : (i * 3) % 11 + 1;
    std::string path = dir + "/train.bin";
    write_token_file(path, t, 1);
    return path;
}

TrainOptions tiny_options() {
    TrainOptions o;
    o.batch_size = 2;
    o.seq_len = 8;
    o.grad_accum = 2;
    o.dropout = 0.1f;
    o.optim.lr = 3e-3f;
    o.optim.warmup_steps = 2;
    o.optim.total_steps = 8;
    return o;
}

}  // namespace

TEST_CASE("checkpoint round trip is bit-exact, including the optimizer state") {
    std::string dir = temp_dir("roundtrip");
    Config c = config_preset("tiny");
    Model m;
    model_create(m, c, 42);
    for (const TensorSpec& s : m.ref.layout.tensors)
        for (size_t i = s.offset; i < s.offset + s.numel; i++) {
            m.adam_m[i] = rng_uniform(1, i) - 0.5f;
            m.adam_v[i] = rng_uniform(2, i);
        }
    float* bias = m.ref.params.data() + m.ref.layout.offset_of("model.layers.1.mlp.gate.e_score_correction_bias");
    bias[3] = 0.0123f;
    TrainState st;
    st.step = 17;
    st.data_position = (1ull << 60) + 4242;  // past 2^53: a double would round it
    st.best_val_loss = 1.25;
    st.options = tiny_options();
    st.options.seed = (1ull << 62) + 1;
    st.options.attn_dropout = 0.05f;
    model_save(m, dir + "/ckpt", &st, "F32");
    Model back;
    TrainState st2;
    model_load(back, dir + "/ckpt", &st2);
    CHECK(back.ref.params == m.ref.params);
    CHECK(back.adam_m == m.adam_m);
    CHECK(back.adam_v == m.adam_v);
    CHECK(st2.step == 17);
    CHECK(st2.data_position == (1ull << 60) + 4242);
    CHECK(st2.options.seed == (1ull << 62) + 1);
    // a damaged counter is a one-line error, not a rounded value
    const std::string state_path = dir + "/ckpt/trainer_state.json", good = read_file(state_path);
    for (const char* bad : {"18446744073709551616", "-3", "1.5", "1e3"}) {
        std::string text = good;
        const size_t at = text.find("\"seed\": ") + 8;
        text.replace(at, text.find(',', at) - at, bad);
        write_file_atomic(state_path, text);
        CAPTURE(bad);
        CHECK_THROWS_WITH_AS(model_load(back, dir + "/ckpt", &st2), doctest::Contains("\"seed\" must be a whole number below 2^64"),
                             std::runtime_error);
    }
    // edited options are checked as the command line checks them (issue 10: lr -1, dropout 5, a step that never
    // ends, a fractional step were all accepted)
    struct Edit {
        const char *field, *value, *want;
    };
    for (Edit e : {Edit{"lr", "-1", "\"lr\" is -1, outside [0, 10]"}, Edit{"dropout", "5", "\"dropout\" is 5, outside [0, 0.99]"},
                   Edit{"attn_dropout", "5", "\"attn_dropout\" is 5, outside [0, 0.99]"},
                   Edit{"grad_accum", "2147483647", "\"grad_accum\" is 2147483647, outside [1, 65536]"},
                   Edit{"step", "1.5", "\"step\" must be a whole number, got 1.5"}, Edit{"eps", "0", "\"eps\" is 0, outside"},
                   Edit{"fp8_wgrad", "true", "\"fp8_wgrad\" is true but \"fp8\" is not"}}) {
        std::string text = good;
        const std::string key = strfmt("\"%s\": ", e.field);
        const size_t at = text.find(key) + key.size();
        text.replace(at, text.find_first_of(",\n", at) - at, e.value);
        write_file_atomic(state_path, text);
        CAPTURE(e.field);
        CHECK_THROWS_WITH_AS(model_load(back, dir + "/ckpt", &st2), doctest::Contains(e.want), std::runtime_error);
    }
    write_file_atomic(state_path, good);
    CHECK(st2.best_val_loss == 1.25);
    CHECK(st2.options.grad_accum == 2);
    CHECK(st2.options.dropout == doctest::Approx(0.1f));
    CHECK(st2.options.attn_dropout == doctest::Approx(0.05f));
    CHECK(config_to_json(back.ref.cfg) == config_to_json(c));

    // bf16 weights round to bf16, except the routing bias, which stays fp32
    model_save(m, dir + "/ckpt16", nullptr, "BF16");
    Model half;
    model_load(half, dir + "/ckpt16", nullptr);
    size_t mismatched = 0;
    for (const TensorSpec& s : m.ref.layout.tensors)
        for (size_t i = s.offset; i < s.offset + s.numel; i++)
            mismatched += half.ref.params[i] != (s.kind == TENSOR_BUFFER ? m.ref.params[i] : bf16_to_float(float_to_bf16(m.ref.params[i])));
    CHECK(mismatched == 0);
    CHECK(half.ref.params[m.ref.layout.offset_of("model.layers.1.mlp.gate.e_score_correction_bias") + 3] == 0.0123f);
    CHECK_THROWS_WITH_AS(model_load(half, dir + "/ckpt16", &st2), doctest::Contains("no training state"), std::runtime_error);
    remove_tree(dir);
}

TEST_CASE("FP8 checkpoints in DeepSeek-V3's format: E4M3 blocks with weight_scale_inv, loaded dequantized; damaged ones refused") {
    std::string dir = temp_dir("fp8");
    Config c = config_preset("tiny");
    c.hidden_size = 160;  // whole and partial 128 x 128 blocks
    Model m;
    model_create(m, c, 3);
    for (size_t i = 0; i < m.ref.params.size(); i++) m.ref.params[i] *= 1.0f + 0.5f * (float)rng_normal(9, i);  // uneven blocks
    model_save(m, dir + "/ckpt", nullptr, "F8_E4M3");
    CHECK(read_file(dir + "/ckpt/config.json").find("\"quantization_config\": {\"quant_method\": \"fp8\", \"fmt\": \"e4m3\"") !=
          std::string::npos);
    const SafeTensorsFile f = safetensors_read(dir + "/ckpt/model.safetensors");
    const std::string q = "model.layers.0.self_attn.q_a_proj.weight", router = "model.layers.1.mlp.gate.weight";
    CHECK(f.find(q)->dtype == "F8_E4M3");
    CHECK(f.find(q + "_scale_inv")->shape == std::vector<int64_t>{1, 2});  // [16, 160] in blocks of 128
    CHECK(f.find("model.layers.1.mlp.experts.7.down_proj.weight")->dtype == "F8_E4M3");
    for (const std::string& plain : {router, std::string("model.embed_tokens.weight"), std::string("lm_head.weight")}) {
        CHECK(f.find(plain)->dtype == "F32");
        CHECK(f.find(plain + "_scale_inv") == nullptr);
    }
    // loaded: each E4M3 weight is exactly its 128 x 128 quantization dequantized, the rest exact
    Model back;
    model_load(back, dir + "/ckpt", nullptr);
    CHECK(back.ref.cfg.fp8_weights);
    size_t mismatched = 0, quantized = 0;
    for (const TensorSpec& s : m.ref.layout.tensors) {
        const float* want = m.ref.params.data() + s.offset;
        std::vector<float> dequantized(want, want + s.numel);
        if (f.find(s.name)->dtype == "F8_E4M3") {
            Fp8HostMatrix h((int)s.shape[0], (int)s.shape[1], 128);
            fp8_quantize_host(h.m, want);
            for (size_t i = 0; i < s.numel; i++)
                dequantized[i] = fp8_decode(h.codes[i], FP8_E4M3) * fp8_scale_of(h.m, (int)(i / s.shape[1]), (int)(i % s.shape[1]));
            quantized += s.numel;
        }
        for (size_t i = 0; i < s.numel; i++) mismatched += back.ref.params[s.offset + i] != dequantized[i];
    }
    CHECK(mismatched == 0);
    CHECK(quantized > m.ref.params.size() / 2);
    // saved again in fp32, the config no longer claims FP8
    model_save(back, dir + "/again", nullptr, "F32");
    CHECK(read_file(dir + "/again/config.json").find("quantization_config") == std::string::npos);

    Model x;
    const std::string config = read_file(dir + "/ckpt/config.json");
    std::string other = config;
    other.replace(other.find("\"fp8\""), 5, "\"int8\"");
    write_file_atomic(dir + "/ckpt/config.json", other);
    CHECK_THROWS_WITH_AS(model_load(x, dir + "/ckpt", nullptr), doctest::Contains("quantization_config: only DeepSeek-V3's FP8"), std::runtime_error);
    write_file_atomic(dir + "/ckpt/config.json", config_to_json(c));  // no quantization_config
    CHECK_THROWS_WITH_AS(model_load(x, dir + "/ckpt", nullptr), doctest::Contains("is F8_E4M3 but config.json has no FP8"), std::runtime_error);
    write_file_atomic(dir + "/ckpt/config.json", config);
    std::vector<SafeTensor> tensors = f.tensors;
    for (SafeTensor& t : tensors)
        if (t.name == q + "_scale_inv") t.shape = {2, 1};
    safetensors_write(dir + "/ckpt/model.safetensors", tensors);
    CHECK_THROWS_WITH_AS(model_load(x, dir + "/ckpt", nullptr), doctest::Contains(("'" + q + "_scale_inv' has shape [2, 1]").c_str()), std::runtime_error);
    tensors.erase(std::find_if(tensors.begin(), tensors.end(), [&](const SafeTensor& t) { return t.name == q + "_scale_inv"; }));
    safetensors_write(dir + "/ckpt/model.safetensors", tensors);
    CHECK_THROWS_WITH_AS(model_load(x, dir + "/ckpt", nullptr), doctest::Contains(("missing tensor '" + q + "_scale_inv'").c_str()), std::runtime_error);
    remove_tree(dir);
}

TEST_CASE("a model larger than the host's memory is refused with the size it needs, before allocating") {
    Config c = config_preset("tiny");  // 200 billion parameters: 3.3 TB of fp32 weights, gradients and moments
    c.hidden_size = 16384, c.intermediate_size = 65536, c.num_hidden_layers = 64, c.n_routed_experts = 0;
    Model m;
    CHECK_THROWS_WITH_AS(model_create(m, c, 1), doctest::Contains("GiB of host memory"), std::runtime_error);
}

TEST_CASE("damaged checkpoints are refused with a message naming the file") {
    std::string dir = temp_dir("damaged");
    Config c = config_preset("tiny");
    Model m;
    model_create(m, c, 3);
    model_save(m, dir + "/ok", nullptr, "F32");
    Model x;
    CHECK_THROWS_WITH_AS(model_load(x, dir + "/absent", nullptr), doctest::Contains("does not exist"), std::runtime_error);

    // a config with one more layer than the weights hold: a missing tensor
    Config bigger = c;
    bigger.num_hidden_layers = 4;
    write_file_atomic(dir + "/ok/config.json", config_to_json(bigger));
    CHECK_THROWS_WITH_AS(model_load(x, dir + "/ok", nullptr), doctest::Contains("missing tensor 'model.layers.3."), std::runtime_error);

    // a wider model: mis-shaped tensors
    Config wider = c;
    wider.hidden_size = 40;
    write_file_atomic(dir + "/ok/config.json", config_to_json(wider));
    CHECK_THROWS_WITH_AS(model_load(x, dir + "/ok", nullptr), doctest::Contains("has shape"), std::runtime_error);

    // fewer layers: tensors the config does not know
    Config fewer = c;
    fewer.num_hidden_layers = 2;
    write_file_atomic(dir + "/ok/config.json", config_to_json(fewer));
    CHECK_THROWS_WITH_AS(model_load(x, dir + "/ok", nullptr), doctest::Contains("unexpected tensor"), std::runtime_error);

    // an inconsistent config
    std::string bad = config_to_json(c);
    size_t at = bad.find("\"num_experts_per_tok\": 3");
    REQUIRE(at != std::string::npos);
    bad.replace(at, 24, "\"num_experts_per_tok\": 9");
    write_file_atomic(dir + "/ok/config.json", bad);
    CHECK_THROWS_WITH_AS(model_load(x, dir + "/ok", nullptr), doctest::Contains("num_experts_per_tok"), std::runtime_error);

    // a NaN or an infinity in a weight (issue 10: generate printed NUL bytes and exited 0)
    write_file_atomic(dir + "/ok/config.json", config_to_json(c));
    std::string weights = read_file(dir + "/ok/model.safetensors");
    for (float v : {NAN, INFINITY}) {
        SafeTensorsFile f = safetensors_read(dir + "/ok/model.safetensors");
        for (SafeTensor& t : f.tensors)
            if (t.name == "model.layers.2.self_attn.o_proj.weight") t.data[5] = v;
        safetensors_write(dir + "/ok/model.safetensors", f.tensors);
        CHECK_THROWS_WITH_AS(model_load(x, dir + "/ok", nullptr), doctest::Contains("tensor 'model.layers.2.self_attn.o_proj.weight' holds"),
                             std::runtime_error);
    }
    std::vector<float> logits = {0.5f, NAN, 1.0f};
    CHECK_THROWS_WITH_AS(sample_token(logits.data(), 3, SamplingOptions{}, 0.5f), doctest::Contains("logits are not finite"), std::runtime_error);

    // truncated weights
    write_file_atomic(dir + "/ok/model.safetensors", weights.substr(0, weights.size() / 2));
    CHECK_THROWS_WITH_AS(model_load(x, dir + "/ok", nullptr), doctest::Contains("model.safetensors"), std::runtime_error);
    remove_tree(dir);
}

TEST_CASE("training: the loss falls, and a resumed run repeats the uninterrupted one exactly") {
    std::string dir = temp_dir("resume");
    Config c = config_preset("tiny");
    std::string data = structured_tokens(dir, 4000, c.vocab_size);
    TrainOptions o = tiny_options();

    auto run = [&](Model& m, DataLoader& dl, int from, int to, std::vector<float>& losses) {
        for (int step = from; step < to; step++) losses.push_back(model_train_step(m, dl, o, step).loss);
    };
    Model straight;
    model_create(straight, c, 7);
    DataLoader dl;
    dataloader_open(dl, data, o.batch_size, o.seq_len, c.vocab_size);
    std::vector<float> expected;
    run(straight, dl, 0, 8, expected);

    Model first;
    model_create(first, c, 7);
    DataLoader dl1;
    dataloader_open(dl1, data, o.batch_size, o.seq_len, c.vocab_size);
    std::vector<float> got;
    run(first, dl1, 0, 4, got);
    TrainState st;
    st.step = 4;
    st.data_position = dataloader_position(dl1);
    st.options = o;
    model_save(first, dir + "/ckpt", &st, "F32");

    Model resumed;
    TrainState back;
    model_load(resumed, dir + "/ckpt", &back);
    DataLoader dl2;
    dataloader_open(dl2, data, o.batch_size, o.seq_len, c.vocab_size);
    dataloader_seek(dl2, back.data_position);
    run(resumed, dl2, back.step, 8, got);
    REQUIRE(got.size() == expected.size());
    for (size_t i = 0; i < got.size(); i++) CHECK(got[i] == expected[i]);  // bit-identical
    CHECK(resumed.ref.params == straight.ref.params);

    // keep training the structured data: the loss must fall well below its start
    o.optim.total_steps = 60;
    std::vector<float> more;
    run(straight, dl, 8, 60, more);
    CHECK(more.back() < 0.7f * expected.front());
    // the aux-loss-free update moved the routing biases
    const float* bias = straight.ref.params.data() + straight.ref.layout.offset_of("model.layers.1.mlp.gate.e_score_correction_bias");
    double moved = 0;
    for (int e = 0; e < c.n_routed_experts; e++) moved += std::fabs(bias[e]);
    CHECK(moved > 0);
    remove_tree(dir);
}

TEST_CASE("training: attention dropout reaches the step, another loss than without it and the same on a rerun") {
    std::string dir = temp_dir("attn_dropout");
    Config c = config_preset("tiny");
    std::string data = structured_tokens(dir, 4000, c.vocab_size);
    auto first_loss = [&](float attn_dropout) {
        TrainOptions o = tiny_options();
        o.dropout = 0;
        o.attn_dropout = attn_dropout;
        Model m;
        model_create(m, c, 7);
        DataLoader dl;
        dataloader_open(dl, data, o.batch_size, o.seq_len, c.vocab_size);
        return model_train_step(m, dl, o, 0).loss;
    };
    const float plain = first_loss(0), dropped = first_loss(0.3f);
    CHECK(dropped != plain);
    CHECK(first_loss(0.3f) == dropped);
    remove_tree(dir);
}

TEST_CASE("training: a step whose gradient is not finite leaves the weights and AdamW's moments as they were") {
    std::string dir = temp_dir("nan");
    Config c = config_preset("tiny");
    std::string data = structured_tokens(dir, 4000, c.vocab_size);
    TrainOptions o = tiny_options();
    o.dropout = 0;
    Model m;
    model_create(m, c, 7);
    m.ref.params[m.ref.layout.offset_of("lm_head.weight")] = FLT_MAX;  // finite, but its logits overflow
    const std::vector<float> params = m.ref.params, moments = m.adam_m;
    DataLoader dl;
    dataloader_open(dl, data, o.batch_size, o.seq_len, c.vocab_size);
    const StepStats s = model_train_step(m, dl, o, 0);
    CHECK(!std::isfinite(s.grad_norm));
    CHECK(m.ref.params == params);
    CHECK(m.adam_m == moments);
    remove_tree(dir);
}

TEST_CASE("evaluation: windows cover every prediction once, and agree with a direct forward") {
    Config c = config_preset("tiny");
    Model m;
    model_create(m, c, 9);
    std::vector<int> tokens(53);
    for (size_t i = 0; i < tokens.size(); i++) tokens[i] = (int)(rng_hash(11, i) % c.vocab_size);
    // 52 predictions in windows of 16: three full (batched) windows and one of 4
    double loss = model_eval_loss(m, tokens, 16, 2);
    double total = 0;
    for (int start = 0; start < 52; start += 16) {
        int len = std::min(16, 52 - start);
        std::vector<int> in(tokens.begin() + start, tokens.begin() + start + len);
        std::vector<int> tg(tokens.begin() + start + 1, tokens.begin() + start + 1 + len);
        total += ref_forward(m.ref, in.data(), tg.data(), 1, len, StepOptions{}) * len;
    }
    CHECK(loss == doctest::Approx(total / 52).epsilon(1e-6));
    CHECK(loss == doctest::Approx(std::log((double)c.vocab_size)).epsilon(0.05));  // untrained: near uniform
}

TEST_CASE("sampling: greedy, top-k, top-p and a fixed coin") {
    const int V = 10;
    float logits[V] = {0.1f, 2.0f, -1.0f, 1.5f, 0.3f, 3.0f, -0.5f, 0.0f, 1.0f, 2.5f};
    SamplingOptions greedy;
    greedy.temperature = 0;
    CHECK(sample_token(logits, V, greedy, 0.99f) == 5);

    SamplingOptions k3;
    k3.top_k = 3;
    std::set<int> seen;
    for (int i = 0; i < 1000; i++) seen.insert(sample_token(logits, V, k3, i / 1000.0f));
    CHECK(seen == std::set<int>{5, 9, 1});

    // top-p: the smallest set of most likely tokens with mass >= p
    SamplingOptions p;
    p.top_p = 0.6f;
    double z = 0;
    for (float l : logits) z += std::exp(l);
    double p5 = std::exp(3.0) / z, p9 = std::exp(2.5) / z;
    REQUIRE(p5 < 0.6);
    REQUIRE(p5 + p9 >= 0.6);  // so exactly {5, 9}
    seen.clear();
    for (int i = 0; i < 1000; i++) seen.insert(sample_token(logits, V, p, i / 1000.0f));
    CHECK(seen == std::set<int>{5, 9});

    // low temperature approaches argmax; the same coin repeats the same token
    SamplingOptions cold;
    cold.temperature = 0.01f;
    for (int i = 0; i < 100; i++) CHECK(sample_token(logits, V, cold, i / 100.0f) == 5);
    SamplingOptions warm;
    CHECK(sample_token(logits, V, warm, 0.37f) == sample_token(logits, V, warm, 0.37f));
}

TEST_CASE("MTP checkpoints: DeepSeek-V3's names and num_nextn_predict_layers 1, a bit-exact round trip, the shared copies checked") {
    std::string dir = temp_dir("mtp");
    Config c = config_preset("tiny");
    c.num_nextn_predict_layers = 1;
    Model m;
    model_create(m, c, 21);
    for (const TensorSpec& s : m.ref.layout.tensors)
        for (size_t i = s.offset; i < s.offset + s.numel; i++) {
            m.ref.params[i] += 0.01f * (float)rng_normal(22, i);  // norms off 1, the routing biases off 0
            m.adam_m[i] = rng_uniform(23, i) - 0.5f;
            m.adam_v[i] = rng_uniform(24, i);
        }
    TrainState st;
    st.step = 3;
    st.options = tiny_options();
    st.options.mtp_lambda = 0.7f;
    model_save(m, dir + "/ckpt", &st, "F32");
    CHECK(read_file(dir + "/ckpt/config.json").find("\"num_nextn_predict_layers\": 1,") != std::string::npos);
    const SafeTensorsFile f = safetensors_read(dir + "/ckpt/model.safetensors");
    const int D = c.hidden_size;
    const std::pair<const char*, std::vector<int64_t>> expected[] = {
        {"model.layers.3.enorm.weight", {D}},
        {"model.layers.3.hnorm.weight", {D}},
        {"model.layers.3.eh_proj.weight", {D, 2 * D}},
        {"model.layers.3.input_layernorm.weight", {D}},
        {"model.layers.3.self_attn.q_a_proj.weight", {c.q_lora_rank, D}},
        {"model.layers.3.self_attn.kv_b_proj.weight", {c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}},
        {"model.layers.3.post_attention_layernorm.weight", {D}},
        {"model.layers.3.mlp.gate.e_score_correction_bias", {c.n_routed_experts}},
        {"model.layers.3.mlp.experts.7.down_proj.weight", {D, c.moe_intermediate_size}},
        {"model.layers.3.mlp.shared_experts.up_proj.weight", {c.moe_intermediate_size, D}},
        {"model.layers.3.shared_head.norm.weight", {D}},
        {"model.layers.3.shared_head.head.weight", {c.vocab_size, D}},
        {"model.layers.3.embed_tokens.weight", {c.vocab_size, D}},
    };
    for (const auto& entry : expected) {
        const std::string& name = entry.first;
        CAPTURE(name);
        REQUIRE(f.find(name));
        CHECK(f.find(name)->shape == entry.second);
    }
    CHECK(f.tensors.size() == m.ref.layout.tensors.size() + 2);
    CHECK(f.find("model.layers.3.shared_head.head.weight")->data == f.find("lm_head.weight")->data);
    CHECK(f.find("model.layers.3.embed_tokens.weight")->data == f.find("model.embed_tokens.weight")->data);

    Model back;
    TrainState st2;
    model_load(back, dir + "/ckpt", &st2);
    CHECK(back.ref.cfg.num_nextn_predict_layers == 1);
    CHECK(back.ref.params == m.ref.params);
    CHECK(back.adam_m == m.adam_m);
    CHECK(back.adam_v == m.adam_v);
    CHECK(st2.options.mtp_lambda == 0.7f);

    // a copy that differs from the shared tensor is refused: training would silently drop it
    std::vector<SafeTensor> tensors = f.tensors;
    for (SafeTensor& t : tensors)
        if (t.name == "model.layers.3.shared_head.head.weight") t.data[4] += 1;
    safetensors_write(dir + "/ckpt/model.safetensors", tensors);
    CHECK_THROWS_WITH_AS(model_load(back, dir + "/ckpt", nullptr),
                         doctest::Contains("'model.layers.3.shared_head.head.weight' differs from 'lm_head.weight'"), std::runtime_error);
    // without the copies (other writers may leave them out) it loads the same
    tensors = f.tensors;
    tensors.erase(std::remove_if(tensors.begin(), tensors.end(), [](const SafeTensor& t) {
                      return t.name == "model.layers.3.shared_head.head.weight" || t.name == "model.layers.3.embed_tokens.weight";
                  }), tensors.end());
    safetensors_write(dir + "/ckpt/model.safetensors", tensors);
    model_load(back, dir + "/ckpt", nullptr);
    CHECK(back.ref.params == m.ref.params);
    // a part of the module missing is a damaged checkpoint
    std::vector<SafeTensor> partial = tensors;
    partial.erase(std::remove_if(partial.begin(), partial.end(), [](const SafeTensor& t) { return t.name == "model.layers.3.hnorm.weight"; }),
                  partial.end());
    safetensors_write(dir + "/ckpt/model.safetensors", partial);
    CHECK_THROWS_WITH_AS(model_load(back, dir + "/ckpt", nullptr), doctest::Contains("missing tensor 'model.layers.3.hnorm.weight'"),
                         std::runtime_error);
    // the whole module missing, as transformers saves DeepSeek-V3 (it keeps num_nextn_predict_layers): the main model
    std::vector<SafeTensor> main_only;
    for (const SafeTensor& t : tensors)
        if (t.name.rfind("model.layers.3.", 0) != 0) main_only.push_back(t);
    safetensors_write(dir + "/ckpt/model.safetensors", main_only);
    Model plain;
    model_load(plain, dir + "/ckpt", nullptr);
    CHECK(plain.ref.cfg.num_nextn_predict_layers == 0);
    REQUIRE(plain.ref.params.size() < m.ref.params.size());
    CHECK(std::equal(plain.ref.params.begin(), plain.ref.params.end(), m.ref.params.begin()));

    // FP8: the module's block in E4M3 like every layer; eh_proj, the copies of the embedding and head not
    model_save(m, dir + "/fp8", nullptr, "F8_E4M3");
    const SafeTensorsFile q = safetensors_read(dir + "/fp8/model.safetensors");
    CHECK(q.find("model.layers.3.self_attn.q_a_proj.weight")->dtype == "F8_E4M3");
    CHECK(q.find("model.layers.3.mlp.experts.0.gate_proj.weight")->dtype == "F8_E4M3");
    for (const char* plain_name : {"model.layers.3.eh_proj.weight", "model.layers.3.shared_head.head.weight", "model.layers.3.embed_tokens.weight"}) {
        CAPTURE(plain_name);
        CHECK(q.find(plain_name)->dtype == "F32");
        CHECK(q.find(std::string(plain_name) + "_scale_inv") == nullptr);
    }
    Model back8;
    model_load(back8, dir + "/fp8", nullptr);
    CHECK(back8.ref.cfg.num_nextn_predict_layers == 1);
    remove_tree(dir);
}

TEST_CASE("training with the MTP module: both losses fall, and the module's routing bias moves") {
    std::string dir = temp_dir("mtp_train");
    Config c = config_preset("tiny");
    c.num_nextn_predict_layers = 1;
    std::string data = structured_tokens(dir, 4000, c.vocab_size);
    TrainOptions o = tiny_options();
    o.dropout = 0;
    o.optim.total_steps = 60;
    Model m;
    model_create(m, c, 7);
    DataLoader dl;
    dataloader_open(dl, data, o.batch_size, o.seq_len, c.vocab_size);
    std::vector<StepStats> stats;
    for (int step = 0; step < 60; step++) stats.push_back(model_train_step(m, dl, o, step));
    CHECK(stats.front().mtp_loss > 0);
    CHECK(stats.back().loss < 0.7f * stats.front().loss);
    CHECK(stats.back().mtp_loss < 0.8f * stats.front().mtp_loss);
    const float* bias = m.ref.params.data() + m.ref.layout.offset_of("model.layers.3.mlp.gate.e_score_correction_bias");
    double moved = 0;
    for (int e = 0; e < c.n_routed_experts; e++) moved += std::fabs(bias[e]);
    CHECK(moved > 0);
    int64_t routed = 0;
    for (int64_t x : m.expert_load[3]) routed += x;
    CHECK(routed == 60LL * o.grad_accum * o.batch_size * o.seq_len * c.num_experts_per_tok);
    remove_tree(dir);
}
