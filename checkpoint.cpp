// checkpoint.cpp — model_save / model_load of model.h: a checkpoint directory with config.json (Hugging Face
// names), model.safetensors (HF tensor names, fp32, bf16, or DeepSeek-V3's FP8: the layers' projection weights
// as E4M3 in 128 x 128 blocks, each with its fp32 weight_scale_inv), tokenizer.bin (absent for the byte tokenizer),
// and for exact resume optimizer.safetensors (the AdamW moments) and trainer_state.json, written to a
// temporary directory and renamed into place, so a kill never leaves half of one.
#include <set>

#include "fileutil.h"
#include "model.h"
#include "safetensors.h"

// What DeepSeek-V3's FP8 checkpoints store in E4M3: every projection weight of the
// layers (attention, dense FFN, experts, the MTP module's block); not the router,
// embedding, head or norms, nor the MTP module's eh_proj (released in bf16, and read
// as a plain Linear by the engines that serve it).
static bool fp8_stored(const TensorSpec& s) {
    return s.shape.size() == 2 && s.name.rfind("model.layers.", 0) == 0 && !ends_with(s.name, "mlp.gate.weight") &&
           !ends_with(s.name, "eh_proj.weight");
}

// weight_scale_inv [ceil(out/128), ceil(in/128)] of an FP8-stored weight
static std::vector<int64_t> scale_shape(const TensorSpec& s) { return {(s.shape[0] + 127) / 128, (s.shape[1] + 127) / 128}; }

// dtype "F8_E4M3": the FP8-stored weights as E4M3 codes (their decoded values) plus
// "<name>_scale_inv", everything else in fp32
static std::vector<SafeTensor> tensors_of(const ParamLayout& L, const float* data, const std::string& prefix, const char* dtype) {
    std::vector<SafeTensor> out;
    const bool fp8 = std::string(dtype) == "F8_E4M3";
    for (const TensorSpec& s : L.tensors) {
        const float* x = data + s.offset;
        if (fp8 && fp8_stored(s)) {
            const int rows = (int)s.shape[0], cols = (int)s.shape[1];
            Fp8HostMatrix q(rows, cols, FP8_TILE);
            fp8_quantize_host(q.m, x);
            SafeTensor w{prefix + s.name, dtype, s.shape, std::vector<float>(s.numel)}, scale{w.name + "_scale_inv", "F32", scale_shape(s), {}};
            for (size_t i = 0; i < s.numel; i++) w.data[i] = fp8_decode(q.codes[i], FP8_E4M3);
            for (int r = 0; r < rows; r += FP8_TILE)
                for (int c = 0; c < cols; c += FP8_TILE) scale.data.push_back(fp8_scale_of(q.m, r, c));
            out.push_back(std::move(w));
            out.push_back(std::move(scale));
            continue;
        }
        // the correction bias steers routing by tiny steps: never round it to bf16
        const char* d = s.kind == TENSOR_BUFFER || fp8 ? "F32" : dtype;
        out.push_back({prefix + s.name, d, s.shape, std::vector<float>(x, x + s.numel)});
    }
    return out;
}

static std::string state_to_json(const TrainState& st) {
    const TrainOptions& o = st.options;
    std::string s = "{\n";
    s += strfmt("  \"step\": %d,\n  \"data_position\": %llu,\n", st.step, (unsigned long long)st.data_position);
    s += std::isfinite(st.best_val_loss) ? strfmt("  \"best_val_loss\": %.17g,\n", st.best_val_loss) : "  \"best_val_loss\": null,\n";
    s += strfmt("  \"seed\": %llu,\n  \"batch_size\": %d,\n  \"seq_len\": %d,\n  \"grad_accum\": %d,\n", (unsigned long long)o.seed,
                o.batch_size, o.seq_len, o.grad_accum);
    s += strfmt("  \"dropout\": %.9g,\n  \"attn_dropout\": %.9g,\n  \"balance_alpha\": %.9g,\n  \"fp8\": %s,\n  \"fp8_wgrad\": %s,\n",
                o.dropout, o.attn_dropout, o.balance_alpha, o.fp8 ? "true" : "false", o.fp8_wgrad ? "true" : "false");
    s += strfmt("  \"mtp_lambda\": %.9g,\n  \"shuffle\": %s,\n", o.mtp_lambda, o.shuffle ? "true" : "false");
    s += strfmt("  \"lr\": %.9g,\n  \"min_lr_fraction\": %.9g,\n  \"warmup_steps\": %d,\n  \"total_steps\": %d,\n", o.optim.lr,
                o.optim.min_lr_fraction, o.optim.warmup_steps, o.optim.total_steps);
    s += strfmt("  \"beta1\": %.9g,\n  \"beta2\": %.9g,\n  \"eps\": %.9g,\n  \"weight_decay\": %.9g,\n", o.optim.beta1, o.optim.beta2,
                o.optim.eps, o.optim.weight_decay);
    s += strfmt("  \"grad_clip\": %.9g,\n  \"bias_update_speed\": %.9g,\n", o.optim.grad_clip, o.optim.bias_update_speed);
    s += "  \"run_options\": [";
    for (size_t i = 0; i < st.run_options.size(); i++) s += (i ? ", " : "") + json_quote(st.run_options[i]);
    return s + "]\n}\n";
}

static TrainState state_from_json(const std::string& text, const std::string& where) {
    JsonValue root;
    std::string err;
    if (!json_parse(text, root, err)) fail("%s: invalid JSON: %s", where.c_str(), err.c_str());
    auto num = [&](const char* key) {
        const JsonValue* v = root.get(key);
        if (!v || v->type != JsonValue::Number) fail("%s: missing or non-numeric field \"%s\"", where.c_str(), key);
        return v->number;
    };
    // checked as the command line checks them: an edited state must not start a step that never ends
    auto in = [&](const char* key, double lo, double hi) {
        const double v = num(key);
        if (!(v >= lo && v <= hi)) fail("%s: field \"%s\" is %.10g, outside [%g, %g]", where.c_str(), key, v, lo, hi);
        return v;
    };
    auto whole_in = [&](const char* key, double lo, double hi) {
        const double v = in(key, lo, hi);
        if (v != std::floor(v)) fail("%s: field \"%s\" must be a whole number, got %.10g", where.c_str(), key, v);
        return (int)v;
    };
    // the seed and the data position are 64-bit counters: read from the digits, not
    // through a double, which holds only 53 bits
    auto whole = [&](const char* key) {
        num(key);
        const std::string& digits = root.get(key)->str;
        uint64_t v = 0;
        bool ok = !digits.empty() && digits.find_first_not_of("0123456789") == std::string::npos;
        for (char d : digits) ok = ok && !__builtin_mul_overflow(v, 10, &v) && !__builtin_add_overflow(v, (uint64_t)(d - '0'), &v);
        if (!ok) fail("%s: field \"%s\" must be a whole number below 2^64, got %s", where.c_str(), key, digits.c_str());
        return v;
    };
    TrainState st;
    TrainOptions& o = st.options;
    st.step = whole_in("step", 0, 1 << 30);
    st.data_position = whole("data_position");
    const JsonValue* best = root.get("best_val_loss");
    st.best_val_loss = best && best->type == JsonValue::Number ? best->number : INFINITY;
    o.seed = whole("seed");
    o.batch_size = whole_in("batch_size", 1, 1 << 16);
    o.seq_len = whole_in("seq_len", 1, 1 << 20);
    o.grad_accum = whole_in("grad_accum", 1, 1 << 16);
    o.dropout = (float)in("dropout", 0, 0.99);
    if (root.get("attn_dropout")) o.attn_dropout = (float)in("attn_dropout", 0, 0.99);  // absent in checkpoints from before it: off
    o.balance_alpha = (float)in("balance_alpha", 0, 10);
    auto flag = [&](const char* key) {  // absent in checkpoints from before the option: false
        const JsonValue* v = root.get(key);
        if (v && v->type != JsonValue::Bool) fail("%s: field \"%s\" must be true or false", where.c_str(), key);
        return v && v->boolean;
    };
    o.fp8 = flag("fp8");
    o.fp8_wgrad = flag("fp8_wgrad");
    if (o.fp8_wgrad && !o.fp8) fail("%s: \"fp8_wgrad\" is true but \"fp8\" is not", where.c_str());
    o.shuffle = flag("shuffle");
    if (root.get("mtp_lambda")) o.mtp_lambda = (float)in("mtp_lambda", 0, 10);  // absent in checkpoints from before MTP
    o.optim.lr = (float)in("lr", 0, 10);
    o.optim.min_lr_fraction = (float)in("min_lr_fraction", 0, 1);
    o.optim.warmup_steps = whole_in("warmup_steps", 0, 1 << 30);
    o.optim.total_steps = whole_in("total_steps", 1, 1 << 30);
    o.optim.beta1 = (float)in("beta1", 0, 0.99999);
    o.optim.beta2 = (float)in("beta2", 0, 0.99999);
    o.optim.eps = (float)in("eps", 1e-30, 10);
    o.optim.weight_decay = (float)in("weight_decay", 0, 10);
    o.optim.grad_clip = (float)in("grad_clip", 0, 1e6);
    o.optim.bias_update_speed = (float)in("bias_update_speed", 0, 1);
    if (const JsonValue* run = root.get("run_options")) {  // absent in checkpoints from before it was recorded
        if (run->type != JsonValue::Array) fail("%s: field \"run_options\" must be an array of strings", where.c_str());
        for (const JsonValue& v : run->items) {
            if (v.type != JsonValue::String) fail("%s: field \"run_options\" must be an array of strings", where.c_str());
            st.run_options.push_back(v.str);
        }
    }
    return st;
}

static void write_checkpoint(Model& m, const std::string& tmp, const TrainState* state, const char* dtype) {
    Config c = m.ref.cfg;
    c.fp8_weights = std::string(dtype) == "F8_E4M3";
    write_file_atomic(tmp + "/config.json", config_to_json(c));
    std::vector<SafeTensor> weights = tensors_of(m.ref.layout, m.ref.params.data(), "", dtype);
    for (const auto& link : mtp_shared_tensors(c)) {  // {the copy's name, the parameter's}
        SafeTensor t = *std::find_if(weights.begin(), weights.end(), [&](const SafeTensor& x) { return x.name == link.second; });
        t.name = link.first;
        weights.push_back(std::move(t));
    }
    safetensors_write(tmp + "/model.safetensors", weights, {{"format", "pt"}});
    // no file stands for the byte tokenizer, so byte-level models of any vocab size load
    if (!m.tokenizer.merges.empty()) tokenizer_save(m.tokenizer, tmp + "/tokenizer.bin");
    if (state) {
        std::vector<SafeTensor> moments = tensors_of(m.ref.layout, m.adam_m.data(), "exp_avg.", "F32");
        std::vector<SafeTensor> second = tensors_of(m.ref.layout, m.adam_v.data(), "exp_avg_sq.", "F32");
        moments.insert(moments.end(), second.begin(), second.end());
        safetensors_write(tmp + "/optimizer.safetensors", moments);
        write_file_atomic(tmp + "/trainer_state.json", state_to_json(*state));
    }
}

void model_save(Model& m, const std::string& dir, const TrainState* state, const char* dtype) {
    model_sync_host(m);
    std::string tmp = atomic_dir_begin(dir);
    try {
        write_checkpoint(m, tmp, state, dtype);
    } catch (...) {  // a full disk, say: no partial temporary stays behind
        remove_tree(tmp);
        throw;
    }
    atomic_dir_commit(tmp, dir);
}

TrainState checkpoint_state(const std::string& dir) {
    const std::string path = atomic_dir_readable(dir) + "/trainer_state.json";
    return state_from_json(read_file(path), path);
}

bool checkpoint_has_state(const std::string& dir_given) {
    const std::string dir = atomic_dir_readable(dir_given);
    return path_exists(dir + "/trainer_state.json") && path_exists(dir + "/optimizer.safetensors");
}

// copies every tensor of the layout from f into dst, refusing missing, mis-shaped and unexpected tensors;
// fp8: E4M3 weights are dequantized with their weight_scale_inv blocks, as DeepSeek's weight_dequant does.
// The MTP module's copies of the shared embedding and head may be absent; present, they must equal them.
static void take_all(const SafeTensorsFile& f, const Config& c, const ParamLayout& L, float* dst, bool fp8) {
    for (const TensorSpec& s : L.tensors) {
        safetensors_take(f, s.name, s.shape, dst + s.offset);
        const SafeTensor* t = f.find(s.name);
        if (t->dtype != "F8_E4M3") continue;
        if (!fp8) fail("%s: tensor '%s' is F8_E4M3 but config.json has no FP8 quantization_config", f.path.c_str(), s.name.c_str());
        const std::string scale_name = s.name + "_scale_inv";
        const int64_t cols = s.shape[1], scale_cols = scale_shape(s)[1];
        std::vector<float> scale(scale_shape(s)[0] * scale_cols);
        safetensors_take(f, scale_name, scale_shape(s), scale.data());
        for (size_t i = 0; i < s.numel; i++) dst[s.offset + i] *= scale[i / cols / 128 * scale_cols + i % cols / 128];
    }
    for (const TensorSpec& s : L.tensors)  // a NaN or inf weight would only show as garbage text later
        for (size_t i = 0; i < s.numel; i++)
            if (!std::isfinite(dst[s.offset + i]))
                fail("%s: tensor '%s' holds %g at index %zu: not a usable weight", f.path.c_str(), s.name.c_str(), dst[s.offset + i], i);
    std::set<std::string> copies;
    for (const auto& [copy, shared] : mtp_shared_tensors(c)) {
        copies.insert(copy);
        const SafeTensor* t = f.find(copy);
        if (!t) continue;
        const TensorSpec& s = L.tensors[L.index.at(shared)];
        std::vector<float> values(s.numel);
        safetensors_take(f, copy, s.shape, values.data());
        if (!std::equal(values.begin(), values.end(), dst + s.offset))
            fail("%s: tensor '%s' differs from '%s'; the MTP module shares the main model's (DeepSeek-V3 §2.2)", f.path.c_str(),
                 copy.c_str(), shared.c_str());
    }
    for (const SafeTensor& t : f.tensors) {  // a scale belongs to an E4M3 weight of the layout
        const size_t n = t.name.size();
        const SafeTensor* w = n > 10 && t.name.compare(n - 10, 10, "_scale_inv") == 0 ? f.find(t.name.substr(0, n - 10)) : nullptr;
        if (!L.index.count(t.name) && !copies.count(t.name) && !(w && w->dtype == "F8_E4M3"))
            fail("%s: unexpected tensor '%s' (not part of this config)", f.path.c_str(), t.name.c_str());
    }
}

void model_load(Model& m, const std::string& dir_given, TrainState* state) {
    const std::string dir = atomic_dir_readable(dir_given);  // mid-save: the previous version
    if (!path_exists(dir)) fail("%s: checkpoint directory does not exist", dir.c_str());
    std::string config_path = dir + "/config.json";
    Config c = config_from_json(read_file(config_path), config_path);
    SafeTensorsFile weights = safetensors_read(dir + "/model.safetensors");
    // transformers' DeepseekV3ForCausalLM keeps num_nextn_predict_layers from DeepSeek-V3's config.json but
    // neither loads nor saves the module: what it saved is the main model alone
    if (c.num_nextn_predict_layers > 0 && !weights.find(strfmt("model.layers.%d.eh_proj.weight", c.num_hidden_layers)))
        c.num_nextn_predict_layers = 0;
    model_create(m, c, 0);
    take_all(weights, c, m.ref.layout, m.ref.params.data(), c.fp8_weights);
    std::string tok_path = dir + "/tokenizer.bin";
    if (path_exists(tok_path)) {
        m.tokenizer = tokenizer_load(tok_path);
        if (m.tokenizer.vocab_size > c.vocab_size)
            fail("%s: tokenizer has %d tokens but the model's vocab_size is %d", tok_path.c_str(), m.tokenizer.vocab_size, c.vocab_size);
    }
    if (!state) {
        // inference needs no optimizer moments: give their memory back
        std::vector<float>().swap(m.adam_m);
        std::vector<float>().swap(m.adam_v);
        return;
    }
    if (!checkpoint_has_state(dir)) fail("%s: no training state (trainer_state.json, optimizer.safetensors) to resume from", dir.c_str());
    *state = checkpoint_state(dir);
    SafeTensorsFile opt = safetensors_read(dir + "/optimizer.safetensors");
    for (const TensorSpec& s : m.ref.layout.tensors) {
        safetensors_take(opt, "exp_avg." + s.name, s.shape, m.adam_m.data() + s.offset);
        safetensors_take(opt, "exp_avg_sq." + s.name, s.shape, m.adam_v.data() + s.offset);
    }
}

std::string model_resolve_dir(const std::string& dir, bool is_default) {
    if (path_exists(dir + "/config.json")) return dir;
    if (path_exists(atomic_dir_readable(dir + "/checkpoint") + "/config.json")) return dir + "/checkpoint";
    if (!path_exists(dir))
        fail("%s: model directory does not exist%s", dir.c_str(), is_default ? " (train one with ./train, or pass --model DIR)" : "");
    fail("%s: not a checkpoint directory (no config.json, and no checkpoint/config.json)", dir.c_str());
}

