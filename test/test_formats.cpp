// test_formats.cpp — the on-disk formats: the JSON parser, safetensors reading and
// writing (including damaged files), the atomic file and directory helpers, and
// config.json round trips and consistency checks.
#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <functional>

#include "config.h"
#include "fileutil.h"
#include "json.h"
#include "safetensors.h"

namespace {

// A fresh directory under /tmp, unique to this process and test, removed afterwards.
struct TempDir {
    std::string path;
    explicit TempDir(const char* tag) {
        path = strfmt("/tmp/dsv3_test_formats_%d_%s", (int)getpid(), tag);
        remove_tree(path);
        make_dirs(path);
    }
    ~TempDir() { remove_tree(path); }
    std::string file(const std::string& name) const { return path + "/" + name; }
};

// The message of the exception f throws, or "" when it does not throw.
std::string error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const std::exception& e) {
        return e.what();
    }
    return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string parse_error(const std::string& text) {
    JsonValue v;
    std::string err;
    bool ok = json_parse(text, v, err);
    CHECK_MESSAGE(!ok, "should not parse: ", text);
    return err;
}

JsonValue parse_ok(const std::string& text) {
    JsonValue v;
    std::string err;
    bool ok = json_parse(text, v, err);
    CHECK_MESSAGE(ok, text, " -> ", err);
    return v;
}

std::vector<float> random_values(size_t n, uint64_t key) {
    Rng rng{key, 0};
    std::vector<float> v(n);
    for (auto& x : v) {
        x = (float)rng.normal();
        if (x == 0) x = 1;
    }
    return v;
}

SafeTensor make_tensor(const std::string& name, const std::string& dtype, std::vector<int64_t> shape, uint64_t key) {
    size_t n = 1;
    for (int64_t d : shape) n *= (size_t)d;
    return SafeTensor{name, dtype, shape, random_values(n, key)};
}

// A safetensors file assembled by hand: header text (unpadded) and raw data bytes.
std::string raw_safetensors(const std::string& header, const std::string& data) {
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; i++) bytes[i] = (char)((uint64_t)header.size() >> (8 * i));
    return bytes + header + data;
}

std::string read_error(const TempDir& dir, const std::string& bytes) {
    std::string path = dir.file("bad.safetensors");
    write_file_atomic(path, bytes);
    std::string err = error_of([&] { safetensors_read(path); });
    CHECK_MESSAGE(contains(err, path), "message should name the file: ", err);
    return err;
}

void check_same_config(const Config& a, const Config& b) {
#define SAME(field) CHECK_MESSAGE(a.field == b.field, #field)
    SAME(vocab_size); SAME(hidden_size); SAME(intermediate_size); SAME(moe_intermediate_size);
    SAME(num_hidden_layers); SAME(num_attention_heads); SAME(q_lora_rank); SAME(kv_lora_rank);
    SAME(qk_nope_head_dim); SAME(qk_rope_head_dim); SAME(v_head_dim); SAME(n_routed_experts);
    SAME(n_shared_experts); SAME(num_experts_per_tok); SAME(n_group); SAME(topk_group);
    SAME(first_k_dense_replace); SAME(routed_scaling_factor); SAME(norm_topk_prob); SAME(scoring_func);
    SAME(rms_norm_eps); SAME(rope_theta); SAME(yarn); SAME(yarn_factor);
    SAME(yarn_original_max_position_embeddings); SAME(yarn_beta_fast); SAME(yarn_beta_slow);
    SAME(yarn_mscale); SAME(yarn_mscale_all_dim); SAME(max_position_embeddings); SAME(num_nextn_predict_layers);
#undef SAME
}

// config_to_json(c) with one line replaced (or removed when `with` is empty)
std::string edit_json(const std::string& json, const std::string& line_start, const std::string& with) {
    size_t at = json.find("\n  " + line_start);
    REQUIRE(at != std::string::npos);
    size_t end = json.find('\n', at + 1);
    return json.substr(0, at + 1) + (with.empty() ? "" : "  " + with + "\n") + json.substr(end + 1);
}

std::string config_error(const std::string& json) {
    return error_of([&] { config_from_json(json, "ckpt/config.json"); });
}

}  // namespace

// ----------------------------------------------------------------------------
// JSON

TEST_CASE("json: nested values keep their types and member order") {
    JsonValue v = parse_ok(R"( {"b": [1, -2.5, 3e2, 1E-3, 0, -0.0, true, false, null],
                               "a": {"x": {"y": []}, "s": "hi", "o": {}}} )");
    REQUIRE(v.type == JsonValue::Object);
    REQUIRE(v.members.size() == 2);
    CHECK(v.members[0].first == "b");
    CHECK(v.members[1].first == "a");
    const JsonValue* b = v.get("b");
    REQUIRE(b);
    REQUIRE(b->type == JsonValue::Array);
    REQUIRE(b->items.size() == 9);
    CHECK(b->items[0].number == 1);
    CHECK(b->items[1].number == -2.5);
    CHECK(b->items[2].number == 300);
    CHECK(b->items[3].number == 1e-3);
    CHECK(b->items[4].number == 0);
    CHECK(b->items[5].type == JsonValue::Number);
    CHECK((b->items[6].type == JsonValue::Bool && b->items[6].boolean));
    CHECK((b->items[7].type == JsonValue::Bool && !b->items[7].boolean));
    CHECK(b->items[8].type == JsonValue::Null);
    const JsonValue* a = v.get("a");
    REQUIRE(a);
    CHECK(a->get("x")->get("y")->type == JsonValue::Array);
    CHECK(a->get("x")->get("y")->items.empty());
    CHECK(a->get("s")->str == "hi");
    CHECK(a->get("o")->members.empty());
    CHECK(a->get("missing") == nullptr);
    CHECK(b->get("0") == nullptr);  // not an object
    CHECK(parse_ok("12345678901").number == 12345678901.0);
    CHECK(parse_ok(" \"x\" ").str == "x");
}

TEST_CASE("json: escapes and unicode decode to UTF-8") {
    CHECK(parse_ok(R"("q\"b\\s\/b\bf\fn\nr\rt\t")").str == "q\"b\\s/b\bf\fn\nr\rt\t");
    CHECK(parse_ok(R"("\u0041\u00e9\u20AC")").str == "A\xC3\xA9\xE2\x82\xAC");
    CHECK(parse_ok(R"("\uD83D\uDE00")").str == "\xF0\x9F\x98\x80");  // U+1F600 from a surrogate pair
    CHECK(parse_ok(R"("\u0000")").str == std::string(1, '\0'));
    CHECK(parse_ok("\"caf\xC3\xA9\"").str == "caf\xC3\xA9");  // raw UTF-8 passes through
    // json_quote round-trips every byte
    std::string all;
    for (int c = 1; c < 256; c++) all += (char)c;
    CHECK(parse_ok(json_quote(all)).str == all);
    CHECK(json_quote("a\"b\n\x01") == "\"a\\\"b\\n\\u0001\"");
}

TEST_CASE("json: errors say what and where") {
    std::string e = parse_error("{\"a\": 1,}");
    CHECK(contains(e, "trailing comma"));
    CHECK(contains(e, "line 1, column 8"));
    e = parse_error("[1, 2,\n]");
    CHECK(contains(e, "trailing comma"));
    CHECK(contains(e, "line 1, column 6"));
    e = parse_error("{\n  \"a\": \"abc");
    CHECK(contains(e, "unterminated string"));
    CHECK(contains(e, "line 2, column 8"));
    e = parse_error("{\"a\": 1} x");
    CHECK(contains(e, "after the JSON value"));
    CHECK(contains(e, "line 1, column 10"));
    e = parse_error("{\"a\":\n  tru}");
    CHECK(contains(e, "line 2, column 3"));
    e = parse_error("@");
    CHECK(contains(e, "unexpected '@'"));
    CHECK(contains(e, "line 1, column 1"));
    CHECK(contains(parse_error(""), "end of input"));
    CHECK(contains(parse_error("[1 2]"), "expected ',' or ']'"));
    CHECK(contains(parse_error("{1: 2}"), "expected a string key"));
    CHECK(contains(parse_error("{\"a\" 2}"), "expected ':'"));
    CHECK(contains(parse_error("{\"a\": 1, \"a\": 2}"), "duplicate key \"a\""));
    CHECK(contains(parse_error("\"a\nb\""), "control character"));
    CHECK(contains(parse_error(R"("\x")"), "invalid escape"));
    CHECK(contains(parse_error(R"("\u12G4")"), "hex digits"));
    CHECK(contains(parse_error(R"("\uD83D")"), "unpaired high surrogate"));
    CHECK(contains(parse_error(R"("\uD83D\u0041")"), "unpaired high surrogate"));
    CHECK(contains(parse_error(R"("\uDE00")"), "unpaired low surrogate"));
    for (const char* bad : {"01", "1.", ".5", "-", "1e", "1e+", "+1", "NaN", "Infinity", "0x10"})
        CHECK_MESSAGE(!parse_error(bad).empty(), bad);
    CHECK(contains(parse_error("1e999"), "out of range"));
    CHECK(contains(parse_error(std::string(300, '[') + std::string(300, ']')), "nesting deeper"));
    CHECK(parse_ok(std::string(200, '[') + std::string(200, ']')).type == JsonValue::Array);
}

// ----------------------------------------------------------------------------
// safetensors

TEST_CASE("safetensors: fp32 round trip is bit-exact, bf16 rounds to nearest even") {
    TempDir dir("roundtrip");
    std::vector<SafeTensor> ts = {
        make_tensor("model.embed_tokens.weight", "F32", {7, 5}, 1),
        make_tensor("model.layers.0.mlp.experts.3.gate_proj.weight", "BF16", {3, 4, 2}, 2),
        make_tensor("scalar", "F32", {}, 3),
        make_tensor("empty", "BF16", {0, 3}, 4),
        make_tensor("odd", "BF16", {3}, 5),  // 6 bytes: the next tensor starts unaligned
        make_tensor("lm_head.weight", "F32", {5, 7}, 6),
    };
    std::vector<std::pair<std::string, std::string>> meta = {{"format", "pt"}, {"note", "quote \" and \xC3\xA9"}};
    std::string path = dir.file("model.safetensors");
    safetensors_write(path, ts, meta);

    // the header is padded so the data starts 8-byte aligned
    std::string bytes = read_file(path);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | (unsigned char)bytes[i];
    CHECK(n % 8 == 0);
    CHECK(bytes[8] == '{');

    SafeTensorsFile f = safetensors_read(path);
    CHECK(f.path == path);
    CHECK(f.metadata == meta);
    REQUIRE(f.tensors.size() == ts.size());
    for (size_t i = 0; i < ts.size(); i++) {
        const SafeTensor& a = ts[i];
        const SafeTensor& b = f.tensors[i];
        CAPTURE(a.name);
        CHECK(b.name == a.name);
        CHECK(b.dtype == a.dtype);
        CHECK(b.shape == a.shape);
        REQUIRE(b.data.size() == a.data.size());
        for (size_t k = 0; k < a.data.size(); k++) {
            float want = a.dtype == "F32" ? a.data[k] : bf16_to_float(float_to_bf16(a.data[k]));
            CHECK(memcmp(&want, &b.data[k], 4) == 0);
        }
        CHECK(f.find(a.name) == &f.tensors[i]);
    }
    CHECK(f.find("nope") == nullptr);
    // rounding really happened: random normals are not bf16-representable
    CHECK(f.find("odd")->data[0] != ts[4].data[0]);
}

TEST_CASE("safetensors: thousands of tensors, no metadata") {
    TempDir dir("many");
    std::vector<SafeTensor> ts;
    for (int i = 0; i < 3000; i++) ts.push_back(make_tensor(strfmt("model.layers.%d.w", i), "F32", {2}, 100 + i));
    std::string path = dir.file("m.safetensors");
    safetensors_write(path, ts);
    SafeTensorsFile f = safetensors_read(path);
    CHECK(f.metadata.empty());
    REQUIRE(f.tensors.size() == 3000);
    const SafeTensor* t = f.find("model.layers.2999.w");
    REQUIRE(t);
    CHECK(t->data == ts[2999].data);
}

TEST_CASE("safetensors: a hand-written file with F16, header order unlike data order, no padding") {
    TempDir dir("f16");
    // F16 bit patterns and the floats they stand for
    const uint16_t h[] = {0x3C00, 0xC000, 0x3555, 0x0001, 0x03FF, 0x7BFF, 0x7C00, 0x8000};
    const float want[] = {1.0f, -2.0f, 0.333251953125f, 5.9604644775390625e-8f, 6.0975551605224609e-5f,
                          65504.0f, INFINITY, -0.0f};
    float f32[2] = {1.5f, -3.25f};
    uint16_t bf[1] = {float_to_bf16(0.15625f)};
    std::string data;
    data.append((const char*)f32, 8);                // "b" at [0, 8)
    data.append((const char*)h, sizeof(h));          // "a" at [8, 24)
    data.append((const char*)bf, 2);                 // "c" at [24, 26)
    std::string header = R"({"a":{"dtype":"F16","shape":[2,4],"data_offsets":[8,24]},)"
                         R"("c":{"dtype":"BF16","shape":[1],"data_offsets":[24,26]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("__metadata__":{"format":"pt"}})";
    std::string path = dir.file("h.safetensors");
    write_file_atomic(path, raw_safetensors(header, data));
    SafeTensorsFile f = safetensors_read(path);
    REQUIRE(f.tensors.size() == 3);
    CHECK(f.tensors[0].name == "a");
    CHECK(f.tensors[1].name == "c");
    CHECK(f.tensors[2].name == "b");
    CHECK(f.metadata.size() == 1);
    const SafeTensor* a = f.find("a");
    CHECK(a->dtype == "F16");
    CHECK(a->shape == std::vector<int64_t>{2, 4});
    for (int i = 0; i < 8; i++) CHECK(memcmp(&a->data[i], &want[i], 4) == 0);
    CHECK(f.find("b")->data == std::vector<float>{1.5f, -3.25f});
    CHECK(f.find("c")->data == std::vector<float>{0.15625f});
    CHECK(std::isnan(f16_to_float(0x7E00)));
}

TEST_CASE("safetensors: damaged files fail with a message naming the file") {
    TempDir dir("bad");
    const std::string f32x2 = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
    const std::string data8(8, '\x11');

    CHECK(contains(read_error(dir, "abc"), "too short"));
    std::string huge(8, '\0');
    huge[5] = 1;  // 2^40
    CHECK(contains(read_error(dir, huge + "{}"), "not sane"));
    std::string past = raw_safetensors(f32x2, data8);
    past[0] = (char)0xF0;  // header length 240 > file
    CHECK(contains(read_error(dir, past), "past the end of the file"));
    CHECK(contains(read_error(dir, raw_safetensors(f32x2, data8.substr(0, 5))), "truncated"));
    CHECK(contains(read_error(dir, raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[100,108]}})", data8)),
                   "run past the end of the data"));
    std::string e = read_error(dir, raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                                    R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                                    std::string(12, '\x11')));
    CHECK(contains(e, "'a' and 'b' overlap"));
    e = read_error(dir, raw_safetensors(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                                        std::string(12, '\x11')));
    CHECK(contains(e, "unused bytes 4..8"));
    CHECK(contains(read_error(dir, raw_safetensors(f32x2, data8 + "xyz")), "3 unused bytes after the last tensor"));
    e = read_error(dir, raw_safetensors(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data8));
    CHECK(contains(e, "tensor 'a'"));
    CHECK(contains(e, "needs 12"));
    e = read_error(dir, raw_safetensors(R"({"w.int":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", data8));
    CHECK(contains(e, "tensor 'w.int' has dtype I64"));
    CHECK(contains(read_error(dir, raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},})", data8)),
                   "invalid JSON header: trailing comma"));
    CHECK(contains(read_error(dir, raw_safetensors("[]", "")), "not a JSON object"));
    CHECK(contains(read_error(dir, raw_safetensors(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data8)),
                   "non-negative"));
    CHECK(contains(read_error(dir, raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", data8)),
                   "begin <= end"));
    CHECK(contains(read_error(dir, raw_safetensors(R"({"__metadata__":{"n":1}})", "")), "not a string"));
    e = error_of([&] { safetensors_read(dir.file("absent.safetensors")); });
    CHECK(contains(e, "absent.safetensors: cannot open"));
}

TEST_CASE("safetensors: take checks presence and shape; write refuses bad tensors") {
    TempDir dir("take");
    std::string path = dir.file("model.safetensors");
    safetensors_write(path, {make_tensor("model.norm.weight", "F32", {32}, 7)});
    SafeTensorsFile f = safetensors_read(path);
    std::vector<float> dst(32);
    safetensors_take(f, "model.norm.weight", {32}, dst.data());
    CHECK(dst == f.tensors[0].data);
    CHECK(error_of([&] { safetensors_take(f, "model.norm.weight", {64}, dst.data()); }) ==
          path + ": tensor 'model.norm.weight' has shape [32] but the config needs [64]");
    CHECK(error_of([&] { safetensors_take(f, "model.norm.weight", {4, 8}, dst.data()); }) ==
          path + ": tensor 'model.norm.weight' has shape [32] but the config needs [4, 8]");
    CHECK(error_of([&] { safetensors_take(f, "lm_head.weight", {32}, dst.data()); }) ==
          path + ": missing tensor 'lm_head.weight'");

    std::string out = dir.file("w.safetensors");
    SafeTensor t = make_tensor("x", "F32", {2, 3}, 8);
    t.data.pop_back();
    CHECK(contains(error_of([&] { safetensors_write(out, {t}); }), "has shape [2, 3] (6 values) but 5 values"));
    CHECK(contains(error_of([&] { safetensors_write(out, {make_tensor("x", "F16", {2}, 9)}); }), "dtype 'F16'"));
    CHECK(contains(error_of([&] { safetensors_write(out, {make_tensor("x", "F32", {1}, 1), make_tensor("x", "F32", {1}, 2)}); }),
                   "duplicate tensor name 'x'"));
    CHECK(!path_exists(out));
    CHECK(!path_exists(out + strfmt(".tmp-%d", (int)getpid())));
}

// ----------------------------------------------------------------------------
// files and directories

TEST_CASE("fileutil: atomic file write, read, mkdir -p, rm -rf") {
    TempDir dir("files");
    std::string nested = dir.file("a/b/c");
    make_dirs(nested);
    make_dirs(nested);  // already there is fine
    CHECK(path_exists(nested));
    std::string bytes = "hello\0world\n";
    bytes += std::string(100000, 'z');
    write_file_atomic(nested + "/f.bin", bytes);
    CHECK(read_file(nested + "/f.bin") == bytes);
    write_file_atomic(nested + "/f.bin", "short");
    CHECK(read_file(nested + "/f.bin") == "short");
    std::string e = error_of([&] { read_file(dir.file("missing.txt")); });
    CHECK(contains(e, "missing.txt: cannot open (No such file"));
    CHECK(contains(error_of([&] { make_dirs(nested + "/f.bin/x"); }), "cannot create directory"));
    remove_tree(dir.file("a"));
    CHECK(!path_exists(dir.file("a")));
    remove_tree(dir.file("a"));  // absent is fine
}

TEST_CASE("fileutil: atomic_dir commit replaces an existing directory and leaves nothing behind") {
    TempDir dir("atomic");
    std::string final_dir = dir.file("ckpt");
    for (int round = 0; round < 3; round++) {
        std::string tmp = atomic_dir_begin(final_dir);
        CHECK(path_exists(tmp));
        CHECK(tmp != final_dir);
        write_file_atomic(tmp + "/step.txt", std::to_string(round));
        write_file_atomic(tmp + strfmt("/only-%d", round), "x");
        atomic_dir_commit(tmp, final_dir + "/");
        CHECK(read_file(final_dir + "/step.txt") == std::to_string(round));
        CHECK(path_exists(final_dir + strfmt("/only-%d", round)));
        if (round > 0) CHECK(!path_exists(final_dir + strfmt("/only-%d", round - 1)));
        // the parent holds only the published directory: no temp or set-aside copies
        std::vector<std::string> entries;
        for (const auto& e : std::filesystem::directory_iterator(dir.path)) entries.push_back(e.path().filename().string());
        CHECK(entries == std::vector<std::string>{"ckpt"});
    }
}

TEST_CASE("fileutil: atomic_dir_recover finishes an interrupted commit and clears every temporary, old names included") {
    TempDir dir("recover");
    const std::string ckpt = dir.file("checkpoint");
    auto version = [&](const std::string& d, const char* v) {
        make_dirs(d);
        write_file_atomic(d + "/v.txt", v);
    };
    version(ckpt + ".tmp", "new");  // killed between the renames: the new version is complete
    version(ckpt + ".old", "previous");
    atomic_dir_recover(ckpt);
    CHECK(read_file(ckpt + "/v.txt") == "new");
    version(ckpt + ".tmp-123", "partial");  // an earlier version's names
    version(ckpt + ".old-456", "older");
    atomic_dir_recover(ckpt);
    CHECK(read_file(ckpt + "/v.txt") == "new");
    remove_tree(ckpt);
    version(ckpt + ".old-456", "previous");  // killed between an earlier version's renames
    atomic_dir_recover(ckpt);
    CHECK(read_file(ckpt + "/v.txt") == "previous");
    std::vector<std::string> entries;
    for (const auto& e : std::filesystem::directory_iterator(dir.path)) entries.push_back(e.path().filename().string());
    CHECK(entries == std::vector<std::string>{"checkpoint"});
}

// ----------------------------------------------------------------------------
// config.json

TEST_CASE("config: presets and a yarn config survive config.json") {
    Config yarn = config_preset("mini");
    yarn.yarn = true;
    yarn.yarn_factor = 4;
    yarn.yarn_original_max_position_embeddings = 256;
    yarn.yarn_beta_fast = 32;
    yarn.yarn_beta_slow = 1;
    yarn.yarn_mscale = 0.707f;
    yarn.yarn_mscale_all_dim = 0.707f;
    yarn.rope_theta = 50000;
    yarn.q_lora_rank = 0;
    yarn.scoring_func = SCORING_SOFTMAX;
    yarn.norm_topk_prob = false;
    yarn.rms_norm_eps = 1e-5f;
    std::vector<std::pair<std::string, Config>> cs = {
        {"tiny", config_preset("tiny")}, {"mini", config_preset("mini")}, {"small", config_preset("small")}, {"yarn", yarn}};
    for (const auto& nc : cs) {
        CAPTURE(nc.first);
        config_check(nc.second);
        std::string json = config_to_json(nc.second);
        parse_ok(json);  // valid JSON on its own
        check_same_config(config_from_json(json, "config.json"), nc.second);
    }
    // float fields stay floats when they hold whole numbers (transformers refuses
    // "routed_scaling_factor": 1); ints stay ints
    std::string mini = config_to_json(config_preset("mini")), y = config_to_json(yarn);
    CHECK(contains(mini, "\"routed_scaling_factor\": 1.0,"));
    CHECK(contains(mini, "\"rope_theta\": 10000.0,"));
    CHECK(contains(mini, "\"hidden_size\": 256,"));
    CHECK(contains(y, "\"factor\": 4.0,"));
    CHECK(contains(y, "\"beta_fast\": 32.0,"));
    CHECK(contains(y, "\"mscale\": 0.707000017,"));
    CHECK(json_float(1e-6f) == "9.99999997e-07");
    CHECK(json_float(2.5) == "2.5");
    CHECK(json_float(-3) == "-3.0");
    CHECK(contains(error_of([] { config_preset("huge"); }), "unknown preset 'huge'"));
}

TEST_CASE("config: the presets' default learning rates, ./train's when --lr is not given") {
    for (const char* name : {"tiny", "mini", "small"}) CHECK(preset_learning_rate(name) == DEFAULT_LEARNING_RATE);
    CHECK(DEFAULT_LEARNING_RATE == 3e-3f);
    CHECK(preset_learning_rate("medium") == 1e-3f);  // bench/RESULTS.md: 3e-3 spikes and ends 50% higher at 300 steps
}

TEST_CASE("config: transformers 5 rope_parameters and 4.x rope_scaling") {
    const std::string base = R"("vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "q_lora_rank": 48,
        "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 16, "n_shared_experts": 2, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "first_k_dense_replace": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": true, "scoring_func": "sigmoid",
        "rms_norm_eps": 1e-06, "max_position_embeddings": 4096, "num_nextn_predict_layers": 0,
        "tie_word_embeddings": false, "rope_interleave": true, "torch_dtype": "bfloat16", "hidden_act": "silu")";

    std::string v5 = "{" + base + R"(, "rope_parameters": {"rope_theta": 50000.0, "rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
        "mscale_all_dim": 1.0}})";
    Config c = config_from_json(v5, "v5/config.json");
    CHECK(c.hidden_size == 64);
    CHECK(c.q_lora_rank == 48);
    CHECK(c.n_routed_experts == 16);
    CHECK(c.first_k_dense_replace == 2);
    CHECK(c.routed_scaling_factor == 2.5f);
    CHECK(c.rope_theta == 50000.0f);
    CHECK(c.yarn);
    CHECK(c.yarn_factor == 4.0f);
    CHECK(c.yarn_original_max_position_embeddings == 1024);
    CHECK(c.yarn_mscale_all_dim == 1.0f);

    std::string v4 = "{" + base + R"(, "rope_theta": 10000, "q_lora_rank": null,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0}})";
    // q_lora_rank appears twice above, which strict JSON refuses; drop the first one
    std::string dup = "\"q_lora_rank\": 48,";
    v4.erase(v4.find(dup), dup.size());
    c = config_from_json(v4, "v4/config.json");
    CHECK(c.q_lora_rank == 0);
    CHECK(c.rope_theta == 10000.0f);
    CHECK(c.yarn);
    CHECK(c.yarn_factor == 40.0f);
    CHECK(c.yarn_original_max_position_embeddings == 4096);
    check_same_config(config_from_json(config_to_json(c), "again"), c);

    std::string plain = "{" + base + R"(, "rope_theta": 10000, "rope_scaling": null})";
    CHECK(!config_from_json(plain, "plain").yarn);
}

TEST_CASE("config: inconsistent or malformed configs fail clearly") {
    const std::string good = config_to_json(config_preset("tiny"));
    auto with = [&](const std::string& key, const std::string& line) { return config_error(edit_json(good, key, line)); };
    std::string e = with("\"num_experts_per_tok\"", "\"num_experts_per_tok\": 9,");
    CHECK(contains(e, "inconsistent config"));
    CHECK(contains(e, "num_experts_per_tok (top-k) exceeds n_routed_experts"));
    CHECK(contains(with("\"n_group\"", "\"n_group\": 3,"), "n_routed_experts must be divisible by n_group"));
    CHECK(contains(with("\"topk_group\"", "\"topk_group\": 5,"), "topk_group must be in 1..n_group"));
    CHECK(contains(with("\"qk_rope_head_dim\"", "\"qk_rope_head_dim\": 5,"), "qk_rope_head_dim must be positive and even"));
    e = with("\"hidden_size\"", "");
    CHECK(e == "ckpt/config.json: missing field \"hidden_size\"");
    e = with("\"hidden_size\"", "\"hidden_size\": \"32\",");
    CHECK(e == "ckpt/config.json: field \"hidden_size\" must be an integer");
    CHECK(contains(with("\"hidden_size\"", "\"hidden_size\": 32.5,"), "must be an integer"));
    CHECK(contains(with("\"norm_topk_prob\"", "\"norm_topk_prob\": 1,"), "must be true or false"));
    CHECK(contains(with("\"rms_norm_eps\"", "\"rms_norm_eps\": \"small\","), "\"rms_norm_eps\" must be a number"));
    CHECK(contains(with("\"scoring_func\"", "\"scoring_func\": \"relu\","), "scoring_func"));
    CHECK(contains(with("\"tie_word_embeddings\"", "\"tie_word_embeddings\": true,"), "tie_word_embeddings"));
    CHECK(contains(with("\"rope_scaling\"", "\"rope_scaling\": {\"rope_type\": \"linear\", \"factor\": 2},"),
                   "rope type \"linear\" is not supported"));
    // sizes that would exhaust memory or time, or overflow, are refused by name before anything is allocated
    // (issue 10: each of these once ran for a minute, died in bad_alloc or trained a wrapped shape)
    CHECK(contains(with("\"n_routed_experts\"", "\"n_routed_experts\": 100000000,"), "n_routed_experts must be at most 1024"));
    CHECK(contains(with("\"n_routed_experts\"", "\"n_routed_experts\": -4,"), "n_routed_experts must be >= 0"));
    CHECK(contains(with("\"num_hidden_layers\"", "\"num_hidden_layers\": 1000000000,"), "num_hidden_layers must be at most 256"));
    CHECK(contains(with("\"vocab_size\"", "\"vocab_size\": 2147483647,"), "vocab_size must be at most 16777216"));
    CHECK(contains(with("\"hidden_size\"", "\"hidden_size\": 1000000000,"), "hidden_size must be at most 65536"));
    const std::string wrapped = edit_json(edit_json(good, "\"n_shared_experts\"", "\"n_shared_experts\": 65537,"), "\"moe_intermediate_size\"",
                                          "\"moe_intermediate_size\": 65536,");  // 65537 x 65536 wrapped an int
    CHECK(contains(config_error(wrapped), "n_shared_experts must be at most 64"));
    Config huge = config_preset("tiny");
    huge.hidden_size = 65536, huge.moe_intermediate_size = 1 << 20, huge.n_routed_experts = 1024, huge.num_hidden_layers = 256;
    CHECK(contains(error_of([&] { config_check(huge); }), "parameters; at most 2^40"));
    // 1e39 is inf as a float
    CHECK(contains(with("\"routed_scaling_factor\"", "\"routed_scaling_factor\": 1e39,"), "routed_scaling_factor must be finite"));
    CHECK(contains(with("\"rope_theta\"", "\"rope_theta\": 1e39,"), "rope_theta must be finite"));
    CHECK(contains(with("\"rms_norm_eps\"", "\"rms_norm_eps\": 1e39,"), "rms_norm_eps must be below 1"));
    CHECK(contains(with("\"rope_scaling\"", "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 1e39},"),
                   "rope_scaling.factor must be finite"));
    e = config_error("{\"vocab_size\": 10,}");
    CHECK(contains(e, "ckpt/config.json: invalid JSON: trailing comma"));
    CHECK(contains(config_error("[]"), "expected a JSON object"));
}
