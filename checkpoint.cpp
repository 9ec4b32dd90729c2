// checkpoint.cpp — model_save / model_load of model.h: a checkpoint directory with config.json (Hugging Face
// names), model.safetensors (HF tensor names, fp32 or bf16), tokenizer.bin (absent for the byte tokenizer),
// and for exact resume optimizer.safetensors (the AdamW moments) and trainer_state.json, written to a
// temporary directory and renamed into place, so a kill never leaves half of one.
#include "fileutil.h"
#include "model.h"
#include "safetensors.h"


static std::vector<SafeTensor> tensors_of(const ParamLayout& L, const float* data, const std::string& prefix, const char* dtype) {
    std::vector<SafeTensor> out;
    for (const TensorSpec& s : L.tensors) {
        // the correction bias steers routing by tiny steps: never round it to bf16
        const char* d = s.kind == TENSOR_BUFFER ? "F32" : dtype;
        out.push_back({prefix + s.name, d, s.shape, std::vector<float>(data + s.offset, data + s.offset + s.numel)});
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
    s += strfmt("  \"dropout\": %.9g,\n  \"balance_alpha\": %.9g,\n  \"fp8\": %s,\n", o.dropout, o.balance_alpha, o.fp8 ? "true" : "false");
    s += strfmt("  \"lr\": %.9g,\n  \"min_lr_fraction\": %.9g,\n  \"warmup_steps\": %d,\n  \"total_steps\": %d,\n", o.optim.lr,
                o.optim.min_lr_fraction, o.optim.warmup_steps, o.optim.total_steps);
    s += strfmt("  \"beta1\": %.9g,\n  \"beta2\": %.9g,\n  \"eps\": %.9g,\n  \"weight_decay\": %.9g,\n", o.optim.beta1, o.optim.beta2,
                o.optim.eps, o.optim.weight_decay);
    s += strfmt("  \"grad_clip\": %.9g,\n  \"bias_update_speed\": %.9g\n}\n", o.optim.grad_clip, o.optim.bias_update_speed);
    return s;
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
    st.step = (int)num("step");
    st.data_position = whole("data_position");
    const JsonValue* best = root.get("best_val_loss");
    st.best_val_loss = best && best->type == JsonValue::Number ? best->number : INFINITY;
    o.seed = whole("seed");
    o.batch_size = (int)num("batch_size");
    o.seq_len = (int)num("seq_len");
    o.grad_accum = (int)num("grad_accum");
    o.dropout = (float)num("dropout");
    o.balance_alpha = (float)num("balance_alpha");
    const JsonValue* fp8 = root.get("fp8");  // absent in checkpoints from before FP8: bf16
    if (fp8 && fp8->type != JsonValue::Bool) fail("%s: field \"fp8\" must be true or false", where.c_str());
    o.fp8 = fp8 && fp8->boolean;
    o.optim.lr = (float)num("lr");
    o.optim.min_lr_fraction = (float)num("min_lr_fraction");
    o.optim.warmup_steps = (int)num("warmup_steps");
    o.optim.total_steps = (int)num("total_steps");
    o.optim.beta1 = (float)num("beta1");
    o.optim.beta2 = (float)num("beta2");
    o.optim.eps = (float)num("eps");
    o.optim.weight_decay = (float)num("weight_decay");
    o.optim.grad_clip = (float)num("grad_clip");
    o.optim.bias_update_speed = (float)num("bias_update_speed");
    if (st.step < 0 || o.batch_size < 1 || o.seq_len < 1 || o.grad_accum < 1) fail("%s: inconsistent training state", where.c_str());
    return st;
}

void model_save(Model& m, const std::string& dir, const TrainState* state, bool bf16) {
    model_sync_host(m);
    std::string tmp = atomic_dir_begin(dir);
    write_file_atomic(tmp + "/config.json", config_to_json(m.ref.cfg));
    safetensors_write(tmp + "/model.safetensors", tensors_of(m.ref.layout, m.ref.params.data(), "", bf16 ? "BF16" : "F32"),
                      {{"format", "pt"}});
    // no file stands for the byte tokenizer, so byte-level models of any vocab size load
    if (!m.tokenizer.merges.empty()) tokenizer_save(m.tokenizer, tmp + "/tokenizer.bin");
    if (state) {
        std::vector<SafeTensor> moments = tensors_of(m.ref.layout, m.adam_m.data(), "exp_avg.", "F32");
        std::vector<SafeTensor> second = tensors_of(m.ref.layout, m.adam_v.data(), "exp_avg_sq.", "F32");
        moments.insert(moments.end(), second.begin(), second.end());
        safetensors_write(tmp + "/optimizer.safetensors", moments);
        write_file_atomic(tmp + "/trainer_state.json", state_to_json(*state));
    }
    atomic_dir_commit(tmp, dir);
}

bool checkpoint_has_state(const std::string& dir) {
    return path_exists(dir + "/trainer_state.json") && path_exists(dir + "/optimizer.safetensors");
}

// copies every tensor of the layout from f into dst, refusing missing, mis-shaped and unexpected tensors
static void take_all(const SafeTensorsFile& f, const ParamLayout& L, float* dst) {
    for (const TensorSpec& s : L.tensors) safetensors_take(f, s.name, s.shape, dst + s.offset);
    for (const SafeTensor& t : f.tensors)
        if (!L.index.count(t.name)) fail("%s: unexpected tensor '%s' (not part of this config)", f.path.c_str(), t.name.c_str());
}

void model_load(Model& m, const std::string& dir, TrainState* state) {
    if (!path_exists(dir)) fail("%s: checkpoint directory does not exist", dir.c_str());
    std::string config_path = dir + "/config.json";
    Config c = config_from_json(read_file(config_path), config_path);
    model_create(m, c, 0);
    SafeTensorsFile weights = safetensors_read(dir + "/model.safetensors");
    take_all(weights, m.ref.layout, m.ref.params.data());
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
    std::string state_path = dir + "/trainer_state.json";
    *state = state_from_json(read_file(state_path), state_path);
    SafeTensorsFile opt = safetensors_read(dir + "/optimizer.safetensors");
    for (const TensorSpec& s : m.ref.layout.tensors) {
        safetensors_take(opt, "exp_avg." + s.name, s.shape, m.adam_m.data() + s.offset);
        safetensors_take(opt, "exp_avg_sq." + s.name, s.shape, m.adam_v.data() + s.offset);
    }
}

std::string model_resolve_dir(const std::string& dir, bool is_default) {
    if (path_exists(dir + "/config.json")) return dir;
    if (path_exists(dir + "/checkpoint/config.json")) return dir + "/checkpoint";
    if (!path_exists(dir))
        fail("%s: model directory does not exist%s", dir.c_str(), is_default ? " (train one with ./train, or pass --model DIR)" : "");
    fail("%s: not a checkpoint directory (no config.json, and no checkpoint/config.json)", dir.c_str());
}

