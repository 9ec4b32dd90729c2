// validate.cu — checks a model from the outside. Two modes:
//
// Loss mode (--model DIR --data FILE): the mean next-token loss over an llm.c token file, over consecutive
// non-overlapping windows of --seq-len tokens (default: the run's training seq_len from trainer_state.json,
// else the context), so any checkpoint can be compared with another implementation on the same tokens.
//
//   ./validate --model runs/default --data data/default/val.bin
//   loss 1.143516593 over 32899 predictions (seq_len 64, the training length; cpu)
//
// With the MTP module it adds the module's loss and how often its drafts would be accepted in self-speculative
// decoding (model.h MtpEval), the numbers `generate` gets from the module.
//
// Integration checks (everything else; the seed's checks) on a checkpoint or on fresh random weights of a
// preset; one function each, returning a CheckResult:
//   1. forward          logits have shape [B, T, V] and are all finite
//   2. gradient flow    one forward + backward: every trainable tensor's gradient is finite and every non-expert
//                       tensor's non-zero (routed experts that got no token are listed idle); the first 10 tensors'
//                       gradient norm, NaN/inf flags and shape
//   3. expert balance   per MoE layer over --batches batches: load per expert, variance of load/mean load, max/min
//                       ratio; balanced when the mean variance < 0.3 and every ratio < 5
//   4. memory           for L = 64, 128, 256, 512, ... up to the context (a context under 512: its 1/8, 1/4, 1/2 and
//                       whole) a decoder of capacity L runs a forward at its last position; its cache plus activations
//                       (the CPU decoder's heap bytes; on a GPU also the GPU decoder's device bytes), per token, and
//                       each step's memory ratio over its length ratio, < 1.5 (linear growth gives < 1, a T x T score
//                       matrix 2). And the latent cache's bytes per token, measured = formula, against an MHA cache's
//   5. GPU vs CPU       on a GPU: batch 0 on the CUDA path (bf16) against the CPU reference (fp32): the loss within
//                       2e-2 relative, the logits within twice what bf16 weights alone change (or 2 x 2e-2)
//   6. FP8 (--fp8)      the E4M3/E5M2 converter's round trip of every code; the worst 128 x 128 tile's quantization
//                       error over the FP8 Linears' weights (< 2^-4, E4M3's step); batch 0 with the FP8 GEMMs against
//                       the model's own precision, on the CPU (emulated) and on a GPU: loss within 1e-2, logits 0.1
// With --fp8 the loss mode and checks 1-5 run the FP8 GEMMs as ./train --fp8 does.
// Each says on stderr when it starts (small takes minutes on a CPU). The table prints each result as it
// comes, then "passed x of y" and the issues found; --json prints one object {"model", "data", ..., "checks":
// [{"name", "passed", "skipped", "numbers", "tables", "notes", "issues"}], "summary"}. The exit status is 1
// when a check finds an issue. Without a GPU (or with --device cpu) the GPU parts are skipped.
//
// Batches come from --data; else, for a training run (trainer_state.json), from data/default/val.bin when
// that dataset's tokenizer is the model's (train does not record its data path); else random tokens, far from
// what a trained model knows (the default run's expert loads: max/min 7.5 on them, 1.7 on its text).
#include <malloc.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cli.h"
#include "common.h"
#include "fileutil.h"
#include "decode.h"
#include "model.h"

static const char* USAGE =
    "usage: ./validate [--model DIR | --preset NAME] [--data FILE] [options]\n"
    "\n"
    "With --model and --data: prints the mean next-token loss over the token file\n"
    "(consecutive non-overlapping windows of --seq-len tokens; the last, partial window\n"
    "is used as it is), and for a model with the MTP module its loss and the share of its\n"
    "drafts the main model would accept. Otherwise runs the integration checks (forward, gradient flow,\n"
    "expert utilisation, memory, and on a GPU the GPU path against the CPU reference),\n"
    "prints each result, then 'passed x of y' and the issues found, and exits non-zero\n"
    "when a check finds one.\n"
    "\n"
    "  --model DIR            checkpoint directory, or a training run directory holding\n"
    "                         checkpoint/ (default runs/default)\n"
    "  --preset NAME          fresh random weights of a preset instead: tiny, mini, small or medium\n"
    "  --seed N               seed of the preset's weights and of the random token batches\n"
    "                         (default 1337)\n"
    "  --data FILE            llm.c token file (.bin); the checks draw their batches from it.\n"
    "                         Without it the checks of a training run use data/default/val.bin\n"
    "                         when its tokenizer is the model's, else random tokens\n"
    "  --checks               run the integration checks even with --model and --data\n"
    "  --seq-len N            window length; loss mode default: the run's training seq_len\n"
    "                         (trainer_state.json), else the model's context\n"
    "                         (max_position_embeddings); checks default: min(64, context).\n"
    "                         The output says which\n"
    "  --batch-size N         sequences per forward pass (default 4 for the checks, 1 for the loss)\n"
    "  --batches N            batches for the expert utilisation check (default 8)\n"
    "  --json                 one JSON object on stdout instead of the table\n"
    "  --fp8                  run the FP8 GEMMs (as ./train --fp8; the CPU emulates them) and\n"
    "                         add the FP8 checks: converter, tile quantization, FP8 vs not\n"
    "  --device auto|cpu|gpu  auto (default): the loss on the GPU and the GPU checks when a\n"
    "                         GPU is present; cpu: the CPU reference only, GPU checks skipped\n"
    "  --help                 show this help\n";

// JSON has no inf or nan: they become null
static std::string jnum(double x) { return std::isfinite(x) ? strfmt("%.9g", x) : "null"; }

// x with `digits` significant digits in fixed notation, trailing zeros kept
// (2.345678912 rather than %g's 2.34567891), so the precision is visible
static std::string fixed_significant(double x, int digits) {
    if (!std::isfinite(x)) return strfmt("%g", x);
    int magnitude = x == 0 ? 0 : (int)std::floor(std::log10(std::fabs(x)));
    int decimals = std::min(std::max(digits - 1 - magnitude, 0), 17);
    return strfmt("%.*f", decimals, x);
}

// a number as the table shows it: whole numbers (counts, bytes) in full, others to 6 digits
static std::string num(double x) {
    return std::isfinite(x) && x == std::floor(x) && std::fabs(x) < 1e15 ? strfmt("%.0f", x) : strfmt("%.6g", x);
}

// seconds since t0, to the millisecond
static double seconds_since(double t0) { return std::round((now_seconds() - t0) * 1000) / 1000; }

// ----------------------------------------------------------------------------
// loss mode

static int run_loss(Model& m, const std::string& data_path, int seq_len, const std::string& seq_len_from, int batch_size,
                    bool use_gpu, bool json) {
    std::vector<int> tokens = read_token_file(data_path, m.ref.cfg.vocab_size);
    if (tokens.size() < 2) fail("%s: needs at least 2 tokens to predict one, has %zu", data_path.c_str(), tokens.size());
    if (use_gpu) model_to_gpu(m, batch_size, seq_len);
    MtpEval mtp;
    const bool has_mtp = m.ref.cfg.num_nextn_predict_layers > 0;
    double loss = model_eval_loss(m, tokens, seq_len, batch_size, &mtp);
    size_t predictions = tokens.size() - 1;
    const char* device = use_gpu ? "gpu" : "cpu";
    if (json) {
        std::string mtp_json = has_mtp ? strfmt(", \"mtp_loss\": %.17g, \"mtp_predictions\": %lld, \"mtp_accepted_sampled\": %.17g, "
                                                "\"mtp_accepted_greedy\": %.17g", mtp.loss, mtp.predictions, mtp.accepted_sampled, mtp.accepted_greedy)
                                       : "";
        printf("{\"loss\": %.17g, \"predictions\": %zu, \"seq_len\": %d, \"seq_len_from\": %s, \"device\": \"%s\"%s}\n", loss,
               predictions, seq_len, json_quote(seq_len_from).c_str(), device, mtp_json.c_str());
    } else {
        printf("loss %s over %zu predictions (seq_len %d, %s; %s)\n", fixed_significant(loss, 10).c_str(), predictions, seq_len,
               seq_len_from.c_str(), device);
        if (has_mtp)
            printf("mtp loss %s over %lld predictions (the token after next); drafts accepted: %.2f%% sampled (temperature 1), "
                   "%.2f%% greedy\n", fixed_significant(mtp.loss, 10).c_str(), mtp.predictions, 100 * mtp.accepted_sampled,
                   100 * mtp.accepted_greedy);
    }
    model_free_gpu(m);
    return std::isfinite(loss) && (!has_mtp || std::isfinite(mtp.loss)) ? 0 : 1;
}

// ----------------------------------------------------------------------------
// A check's result: one record that both the table and --json print.

struct Table {
    std::string name;                             // e.g. "layers"
    std::vector<std::string> columns;
    std::vector<std::vector<std::string>> rows;   // cells as the table shows them: a number,
                                                  // a [list], true/false, "" (none) or a name
};

struct CheckResult {
    std::string name, title;                      // "gradient_flow" (JSON), "gradient flow" (table)
    std::string skipped;                          // why it did not run; "" = it ran
    std::vector<std::pair<std::string, double>> numbers;
    std::vector<Table> tables;
    std::vector<std::string> notes;               // what was measured, how it is judged
    std::vector<std::string> issues;              // what failed, with its numbers
    bool passed() const { return skipped.empty() && issues.empty(); }
};

// The batches of the checks: B sequences of T tokens from the token file, or random
struct BatchSource {
    const std::vector<int>* data = nullptr;  // token file, or null for random tokens
    uint64_t key = 0;
    int B = 0, T = 0, V = 0;

    // batch b: inputs [B*T] and their next tokens; from the file, consecutive windows that wrap around at its end
    void get(int b, std::vector<int>& inputs, std::vector<int>& targets) const {
        const size_t n = (size_t)B * T;
        std::vector<int> seq(n + 1);
        if (data) {
            const size_t size = data->size();
            size_t start = ((size_t)b * n) % size;
            for (size_t i = 0; i <= n; i++) seq[i] = (*data)[(start + i) % size];
        } else {
            for (size_t i = 0; i <= n; i++) seq[i] = (int)(rng_hash(key, (uint64_t)b * (n + 1) + i) % (uint64_t)V);
        }
        inputs.assign(seq.begin(), seq.end() - 1);
        targets.assign(seq.begin() + 1, seq.end());
    }
};

// the CPU reference's forward on batch b, with targets (returns the loss: the main model's, plus mtp_lambda
// times the MTP module's when the model has one)
static float forward_batch(RefModel<float>& r, const BatchSource& src, int b, float mtp_lambda = 0) {
    std::vector<int> inputs, targets;
    src.get(b, inputs, targets);
    StepOptions opt;
    opt.mtp_lambda = mtp_lambda;
    return ref_forward(r, inputs.data(), targets.data(), src.B, src.T, opt);
}

// ----------------------------------------------------------------------------
// 1. forward

static CheckResult check_forward(Model& m, const BatchSource& src) {
    RefModel<float>& r = m.ref;
    const int B = src.B, T = src.T, V = r.cfg.vocab_size;
    CheckResult c{"forward", "forward"};
    const double t0 = now_seconds();
    const float loss = forward_batch(r, src, 0);
    size_t nonfinite = 0;
    for (float x : r.logits) nonfinite += !std::isfinite(x);
    const std::string shape = strfmt("[%d, %d, %zu]", r.B, r.Tlen, r.B && r.Tlen ? r.logits.size() / ((size_t)r.B * r.Tlen) : (size_t)0);
    const std::string expected = strfmt("[%d, %d, %d]", B, T, V);
    c.numbers = {{"batch_size", B}, {"seq_len", T}, {"vocab_size", V}, {"nonfinite_logits", (double)nonfinite},
                 {"loss", loss}, {"ln_vocab_size", std::log((double)V)}, {"seconds", seconds_since(t0)}};
    c.notes.push_back("batch 0 on the cpu reference: logits shape " + shape + ", expected " + expected);
    if (shape != expected) c.issues.push_back("logits have shape " + shape + ", expected " + expected);
    if (nonfinite) c.issues.push_back(strfmt("%zu of %zu logits are not finite", nonfinite, r.logits.size()));
    if (!std::isfinite(loss)) c.issues.push_back(strfmt("the loss is %g", loss));
    return c;
}

// ----------------------------------------------------------------------------
// 2. gradient flow

static bool is_routed_expert_tensor(const std::string& name, int* layer, int* expert) {
    // model.layers.L.mlp.experts.E.<proj>.weight
    return sscanf(name.c_str(), "model.layers.%d.mlp.experts.%d.", layer, expert) == 2;
}

static const size_t GRADIENT_TABLE_ROWS = 10;  // tensors listed with their gradient norm

static CheckResult check_gradient_flow(Model& m, const BatchSource& src) {
    RefModel<float>& r = m.ref;
    const Config& cfg = r.cfg;
    CheckResult c{"gradient_flow", "gradient flow"};
    const double t0 = now_seconds();
    forward_batch(r, src, 0, TrainOptions().mtp_lambda);  // training's weight: the MTP module's tensors get gradients too
    std::fill(r.grads.begin(), r.grads.end(), 0.0f);
    ref_backward(r, 1.0f);
    // with one expert per token and normalised gates every gate is exactly 1, so
    // the router gets no gradient from the loss: that is the model, not a bug
    const bool router_frozen = cfg.num_experts_per_tok == 1 && cfg.norm_topk_prob;
    Table first{"tensors", {"tensor", "shape", "grad_norm", "nan", "inf"}};
    size_t trainable = 0, with_grad = 0, nonfinite = 0;
    std::vector<std::string> idle;
    for (const TensorSpec& s : r.layout.tensors) {
        if (s.kind == TENSOR_BUFFER) continue;
        size_t nans = 0, infs = 0;
        double sq = 0;
        const float* g = r.grads.data() + s.offset;
        for (size_t i = 0; i < s.numel; i++) {
            nans += std::isnan(g[i]);
            infs += std::isinf(g[i]);
            sq += (double)g[i] * g[i];
        }
        const bool nonzero = sq > 0 || nans || infs;
        trainable++;
        with_grad += nonzero;
        if (first.rows.size() < GRADIENT_TABLE_ROWS) {
            first.rows.push_back({s.name, shape_str(s.shape), strfmt("%.4g", std::sqrt(sq)), nans ? "true" : "false", infs ? "true" : "false"});
        }
        if (nans || infs) nonfinite++, c.issues.push_back(strfmt("non-finite gradient: %s (%zu NaN, %zu inf)", s.name.c_str(), nans, infs));
        int layer, expert;
        if (is_routed_expert_tensor(s.name, &layer, &expert)) {
            const int64_t tokens = r.expert_load[layer][expert];
            if (!nonzero && tokens > 0)
                c.issues.push_back(strfmt("no gradient although the expert got %lld tokens: %s", (long long)tokens, s.name.c_str()));
            else if (!nonzero && (idle.empty() || idle.back() != strfmt("layer %d expert %d", layer, expert)))
                idle.push_back(strfmt("layer %d expert %d", layer, expert));
        } else if (!nonzero && !(router_frozen && ends_with(s.name, ".mlp.gate.weight"))) {
            c.issues.push_back("no gradient: " + s.name);
        }
    }
    c.numbers = {{"trainable_tensors", (double)trainable}, {"tensors_with_gradient", (double)with_grad},
                 {"coverage", trainable ? (double)with_grad / trainable : 1.0}, {"nonfinite_tensors", (double)nonfinite},
                 {"seconds", seconds_since(t0)}};
    c.notes.push_back("one forward + backward of batch 0 on the cpu reference; the first tensors' gradients:");
    c.tables.push_back(first);
    if (router_frozen) c.notes.push_back("top-1 routing with norm_topk_prob: every gate is 1, so the routers get no gradient");
    if (!idle.empty()) {
        std::string list;
        for (const std::string& e : idle) list += (list.empty() ? "" : ", ") + e;
        c.notes.push_back("idle routed experts (no token in this batch, so no gradient; not a failure): " + list);
    }
    return c;
}

// ----------------------------------------------------------------------------
// 3. expert utilisation

static const double BALANCE_VARIANCE = 0.3, BALANCE_RATIO = 5;

static CheckResult check_expert_utilisation(Model& m, const BatchSource& src, int batches) {
    RefModel<float>& r = m.ref;
    const Config& cfg = r.cfg;
    const int L = cfg.num_hidden_layers, E = cfg.n_routed_experts;
    CheckResult c{"expert_utilisation", "expert utilisation"};
    std::vector<int> moe_layers;
    for (int l = 0; l < L; l++)
        if (cfg.is_moe_layer(l)) moe_layers.push_back(l);
    if (moe_layers.empty()) {
        c.notes.push_back("no MoE layers");
        return c;
    }
    const double t0 = now_seconds();
    std::vector<std::vector<int64_t>> load(L, std::vector<int64_t>(E, 0));
    for (int b = 0; b < batches; b++) {
        forward_batch(r, src, b);
        for (int l : moe_layers)
            for (int e = 0; e < E; e++) load[l][e] += r.expert_load[l][e];
    }
    Table layers{"layers", {"layer", "load_percent", "variance", "max_min_ratio", "idle"}};
    double mean_variance = 0, worst_ratio = 0;
    for (int l : moe_layers) {
        int64_t total = 0, mx = 0, mn = INT64_MAX;
        for (int64_t x : load[l]) total += x, mx = std::max(mx, x), mn = std::min(mn, x);
        const double mean = (double)total / E;
        double variance = 0;
        int idle = 0;
        std::string loads;
        for (int e = 0; e < E; e++) {
            const double rel = mean > 0 ? load[l][e] / mean - 1 : 0;
            variance += rel * rel / E;
            idle += load[l][e] == 0;
            loads += strfmt("%s%.1f", e ? ", " : "", total ? 100.0 * load[l][e] / total : 0.0);
        }
        const double ratio = mn > 0 ? (double)mx / mn : INFINITY;
        mean_variance += variance / moe_layers.size();
        worst_ratio = std::max(worst_ratio, ratio);
        layers.rows.push_back({std::to_string(l), "[" + loads + "]", strfmt("%.4f", variance), strfmt("%.3f", ratio), std::to_string(idle)});
        if (!(ratio < BALANCE_RATIO))
            c.issues.push_back(strfmt("unbalanced expert load in layer %d: max/min ratio %.3g >= %g (loads %.2f%% .. %.2f%% over %d tokens, %d idle)",
                                      l, ratio, BALANCE_RATIO, total ? 100.0 * mn / total : 0.0, total ? 100.0 * mx / total : 0.0,
                                      batches * src.B * src.T, idle));
    }
    if (!(mean_variance < BALANCE_VARIANCE))
        c.issues.push_back(strfmt("unbalanced expert load: mean variance of load/mean %.4f >= %g over %zu MoE layers", mean_variance,
                                  BALANCE_VARIANCE, moe_layers.size()));
    c.numbers = {{"batches", batches}, {"tokens_per_batch", src.B * src.T}, {"moe_layers", (double)moe_layers.size()},
                 {"mean_variance", mean_variance}, {"worst_max_min_ratio", worst_ratio}, {"variance_threshold", BALANCE_VARIANCE},
                 {"ratio_threshold", BALANCE_RATIO}, {"seconds", seconds_since(t0)}};
    c.notes.push_back(strfmt("tokens routed to each expert over %d batches; balanced when the mean variance < %g and every max/min ratio < %g",
                             batches, BALANCE_VARIANCE, BALANCE_RATIO));
    c.tables.push_back(layers);
    return c;
}

// ----------------------------------------------------------------------------
// 4. memory

static const double LINEAR_GROWTH = 1.5;  // memory ratio over length ratio, see check_memory

// 64, 128, 256, 512, doubling up to the context; a context under 512 is measured
// at its 1/8, 1/4, 1/2 and whole instead, so that growth is still seen
static std::vector<int> memory_lengths(int context) {
    std::vector<int> lengths;
    if (context >= 512) {
        for (long long len = 64; len <= context; len *= 2) lengths.push_back((int)len);
    } else {
        for (int div : {8, 4, 2, 1})
            if (context / div >= 1 && (lengths.empty() || context / div > lengths.back())) lengths.push_back(context / div);
    }
    return lengths;
}

// the heap bytes this process has in use: glibc's count over all its arenas, large (mmapped) blocks included
static size_t heap_bytes() {
#if __GLIBC__ > 2 || __GLIBC_MINOR__ >= 33
    struct mallinfo2 mi = mallinfo2();
#else
    struct mallinfo mi = mallinfo();  // an older glibc: int counts, exact below 2 GiB
#endif
    return (size_t)mi.uordblks + (size_t)mi.hblkhd;
}

// The CPU decoder's memory at capacity len, its cache and activation buffers as the heap counts them, after a forward
// at its last position (len - 1) over the whole cache. The memory does not depend on what the cache holds, so its first
// len - 1 rows stay zero instead of being filled by len - 1 steps (minutes for the small preset on a CPU).
static size_t cpu_decoder_bytes(RefModel<float>& r, int len, size_t& cache_bytes_per_token) {
    const size_t before = heap_bytes();
    DecodeState<float> s;
    decode_init(s, r.cfg, len);
    s.len = len - 1;
    decode_step(r, s, 0);
    const size_t after = heap_bytes();
    cache_bytes_per_token = decode_cache_bytes_per_token(s);
    return after > before ? after - before : 0;
}

// The GPU decoder's device bytes at capacity len (its own count: the cache and the
// step's buffers; the weights are the model's), after a forward at every position:
// a 1-token prompt, then len - 1 steps (decoder_free waits for them, and checks).
static size_t gpu_decoder_bytes(Model& m, int len, size_t& cache_bytes_per_token) {
    GpuDecoder* d = decoder_create(m, 1, len, 1);
    decoder_prefill(*d, std::vector<std::vector<int>>(1, std::vector<int>{0}));
    for (int pos = 1; pos < len; pos++) decoder_forward(*d);
    const size_t bytes = decoder_device_bytes(*d);
    cache_bytes_per_token = decoder_cache_bytes_per_token(*d);
    decoder_free(d);
    return bytes;
}

// One decoder's memory at each length, into t's columns WHO_*, judged into c; its
// cache's bytes per token must be the latent formula's for its values' size.
static void add_decoder(CheckResult& c, Table& t, const std::string& who, const std::vector<int>& lengths,
                        const std::vector<size_t>& bytes, size_t cache_per_token, size_t formula) {
    double worst = 0;
    for (size_t i = 0; i < lengths.size(); i++) {
        std::string growth;  // none for the first length
        if (i > 0) {
            const double g = ((double)bytes[i] / bytes[i - 1]) / ((double)lengths[i] / lengths[i - 1]);
            worst = std::max(worst, g);
            growth = strfmt("%.3f", g);
            if (!(g < LINEAR_GROWTH))
                c.issues.push_back(strfmt("the %s decoder's memory grows faster than the length: %d -> %d tokens takes %zu -> %zu bytes, "
                                          "memory ratio over length ratio %.3f >= %g", who.c_str(), lengths[i - 1], lengths[i],
                                          bytes[i - 1], bytes[i], g, LINEAR_GROWTH));
        }
        t.rows[i].insert(t.rows[i].end(), {num((double)bytes[i]), strfmt("%.1f", (double)bytes[i] / lengths[i]), growth});
    }
    for (const char* col : {"_bytes", "_bytes_per_token", "_growth"}) t.columns.push_back(who + col);
    c.numbers.push_back({who + "_worst_growth", worst});
    c.numbers.push_back({who + "_cache_bytes_per_token", (double)cache_per_token});
    if (cache_per_token != formula)
        c.issues.push_back(strfmt("the %s decoder's cache takes %zu B per token; the formula says %zu", who.c_str(), cache_per_token, formula));
}

static CheckResult check_memory(Model& m, bool gpu, const std::string& gpu_skipped) {
    const Config& cfg = m.ref.cfg;
    CheckResult c{"memory", "memory"};
    const double t0 = now_seconds();
    const std::vector<int> lengths = memory_lengths(cfg.max_position_embeddings);
    // the MLA point: the latent cache against a standard (MHA) cache of the same model, bf16
    const double mla = (double)kv_latent_bytes_per_token(cfg), mha = (double)kv_mha_bytes_per_token(cfg);
    c.numbers = {{"mla_cache_bytes_per_token", mla}, {"mha_cache_bytes_per_token", mha}, {"mha_over_mla", mha / mla}};
    c.notes.push_back(strfmt("per token (bf16): MLA latent cache %.0f B = 2*(kv_lora_rank %d + qk_rope_head_dim %d)*%d layers", mla,
                             cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_hidden_layers));
    c.notes.push_back(strfmt("per token (bf16): MHA cache %.0f B = 2*(%d heads*(%d+%d) + %d heads*%d)*%d layers; %.2fx the MLA cache", mha,
                             cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.num_attention_heads,
                             cfg.v_head_dim, cfg.num_hidden_layers, mha / mla));
    c.notes.push_back("a decoder of capacity seq_len runs a forward at its last position; its cache plus activations are counted");
    c.notes.push_back(strfmt("growth = memory ratio over length ratio from the length before, linear (or better) when < %g", LINEAR_GROWTH));
    c.notes.push_back("the decoders cache fp32 values on the CPU, bf16 on the GPU");
    Table t{"lengths", {"seq_len", "mla_cache_bytes", "mha_cache_bytes"}};
    for (int len : lengths) t.rows.push_back({std::to_string(len), num(mla * len), num(mha * len)});

    std::vector<size_t> cpu(lengths.size());
    size_t cache_per_token = 0;
    // once unrecorded first, so that what a first decode allocates for good (OpenMP's
    // threads, say) is not charged to the first length
    cpu_decoder_bytes(m.ref, lengths[0], cache_per_token);
    for (size_t i = 0; i < lengths.size(); i++) cpu[i] = cpu_decoder_bytes(m.ref, lengths[i], cache_per_token);
    add_decoder(c, t, "cpu", lengths, cpu, cache_per_token, kv_latent_bytes_per_token(cfg, sizeof(float)));
    if (gpu) {
        std::vector<size_t> dev(lengths.size());
        for (size_t i = 0; i < lengths.size(); i++) dev[i] = gpu_decoder_bytes(m, lengths[i], cache_per_token);
        model_free_gpu(m);
        add_decoder(c, t, "gpu", lengths, dev, cache_per_token, kv_latent_bytes_per_token(cfg));
    } else {
        c.notes.push_back("GPU decoder: skipped (" + gpu_skipped + ")");
    }
    c.numbers.push_back({"growth_threshold", LINEAR_GROWTH});
    c.numbers.push_back({"seconds", seconds_since(t0)});
    c.tables.push_back(t);
    return c;
}

// ----------------------------------------------------------------------------
// 5. GPU vs CPU

// bf16 against the fp32 reference, relative: SPEC §6's bf16 bound. It holds for the
// loss; for the logits see check_gpu_vs_cpu.
static const double GPU_TOLERANCE = 2e-2;

static double rel_error(const float* x, const float* ref, size_t n) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < n; i++) {
        diff += ((double)x[i] - ref[i]) * ((double)x[i] - ref[i]);
        norm += (double)ref[i] * ref[i];
    }
    return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// Batch 0 on the CUDA path against the CPU reference's logits and loss.
//
// The whole model's logits are further off than one kernel's output: bf16 rounding adds up over the layers, and it
// flips expert choices at near ties, each flip a jump for that token. What bf16 alone costs on this checkpoint is
// measured on the CPU: the reference again with its weights rounded to bf16 (as the GPU's are). The GPU, which rounds
// its activations too, passes within twice the larger of that and 2e-2. (transformers under bf16 autocast is 1.6-2.1e-2
// off a float64 truth on 3 layers, weights rounded and activations too: dev/hf_compare.py, check 3.)
static CheckResult check_gpu_vs_cpu(Model& m, const BatchSource& src) {
    RefModel<float>& r = m.ref;
    const int B = src.B, T = src.T, V = r.cfg.vocab_size;
    CheckResult c{"gpu_vs_cpu", "GPU vs CPU"};
    const double t0 = now_seconds();
    std::vector<int> inputs, targets;
    src.get(0, inputs, targets);
    const double loss_cpu = forward_batch(r, src, 0);
    const std::vector<float> cpu_logits = r.logits;
    const std::vector<float> params = r.params;
    for (const TensorSpec& s : r.layout.tensors)
        if (s.kind != TENSOR_BUFFER)  // the routing bias stays fp32 on the GPU too
            for (size_t i = s.offset; i < s.offset + s.numel; i++) r.params[i] = bf16_to_float(float_to_bf16(params[i]));
    forward_batch(r, src, 0);
    const double bf16_weights_error = rel_error(r.logits.data(), cpu_logits.data(), cpu_logits.size());
    const double logits_bound = 2 * std::max(bf16_weights_error, GPU_TOLERANCE);
    r.params = params;

    std::vector<int> stream = inputs;
    stream.push_back(targets.back());  // B consecutive windows of T predictions: batch 0
    model_to_gpu(m, B, T);
    const double loss_gpu = model_eval_loss(m, stream, T, B);
    std::vector<float> gpu_logits(cpu_logits.size());
    for (int b = 0; b < B; b++) {
        const std::vector<float>& row = model_logits(m, std::vector<int>(inputs.begin() + (size_t)b * T, inputs.begin() + (size_t)(b + 1) * T));
        std::copy(row.begin(), row.end(), gpu_logits.begin() + (size_t)b * T * V);
    }
    model_free_gpu(m);
    const double logits_error = rel_error(gpu_logits.data(), cpu_logits.data(), cpu_logits.size());
    size_t same = 0;
    for (size_t t = 0; t < (size_t)B * T; t++) {
        const float *g = gpu_logits.data() + t * V, *p = cpu_logits.data() + t * V;
        same += std::max_element(g, g + V) - g == std::max_element(p, p + V) - p;
    }
    const double loss_error = std::fabs(loss_gpu - loss_cpu) / std::fabs(loss_cpu);
    c.numbers = {{"logits_rel_error", logits_error}, {"bf16_weights_rel_error", bf16_weights_error}, {"logits_bound", logits_bound},
                 {"loss_cpu", loss_cpu}, {"loss_gpu", loss_gpu}, {"loss_rel_error", loss_error}, {"loss_tolerance", GPU_TOLERANCE},
                 {"top1_agreement", (double)same / ((size_t)B * T)}, {"seconds", seconds_since(t0)}};
    c.notes.push_back(strfmt("batch 0 on the CUDA path (bf16) against the CPU reference (fp32); the logits' bound is 2 x max(the "
                             "error of bf16 weights alone on the CPU, %g)", GPU_TOLERANCE));
    if (!(logits_error < logits_bound))
        c.issues.push_back(strfmt("GPU logits differ from the CPU reference's by %.3e (relative), bound %.3e", logits_error, logits_bound));
    if (!(loss_error < GPU_TOLERANCE))
        c.issues.push_back(strfmt("GPU loss %.6f vs CPU %.6f: %.3e relative, bound %g", loss_gpu, loss_cpu, loss_error, GPU_TOLERANCE));
    return c;
}

// ----------------------------------------------------------------------------
// 6. FP8

static const double FP8_LOSS_TOLERANCE = 1e-2, FP8_LOGITS_TOLERANCE = 0.1;

// batch 0's loss and logits on the CPU with and without the emulated FP8 GEMMs; on a GPU also the loss of each
static CheckResult check_fp8(Model& m, const BatchSource& src, bool gpu) {
    RefModel<float>& r = m.ref;
    CheckResult c{"fp8", "FP8"};
    const double t0 = now_seconds();
    // every code decodes to a value that encodes back to it; NaNs give the canonical NaN, and E5M2's infinities
    // saturate to the largest finite value, as the saturating conversion does
    size_t round_trip_errors = 0;
    for (Fp8Format f : {FP8_E4M3, FP8_E5M2})
        for (int code = 0; code < 256; code++) {
            const float v = fp8_decode((uint8_t)code, f);
            const int want = std::isnan(v) ? fp8_spec(f).nan_code : std::isinf(v) ? (code & 0x80) | fp8_spec(f).max_code : code;
            round_trip_errors += fp8_encode(v, f) != want;
        }
    double worst_tile = 0;  // relative rms error of a weight tile's dequantized values
    std::string worst_tile_of;
    for_each_fp8_linear(r.w, [&](const Linear<float>& l, const Fp8Weight*) {
        Fp8HostMatrix q(l.out, l.in, FP8_TILE);
        fp8_quantize_host(q.m, l.w);
        for (int r0 = 0; r0 < l.out; r0 += FP8_TILE)
            for (int c0 = 0; c0 < l.in; c0 += FP8_TILE) {
                double diff = 0, norm = 0;
                for (int i = r0; i < std::min(r0 + FP8_TILE, l.out); i++)
                    for (int j = c0; j < std::min(c0 + FP8_TILE, l.in); j++) {
                        const size_t at = (size_t)i * l.in + j;
                        const double x = l.w[at], back = (double)fp8_decode(q.codes[at], FP8_E4M3) * fp8_scale_of(q.m, i, j);
                        diff += (back - x) * (back - x), norm += x * x;
                    }
                const double e = norm > 0 ? std::sqrt(diff / norm) : 0;
                if (e > worst_tile) worst_tile = e, worst_tile_of = strfmt("a [%d, %d] weight, tile at (%d, %d)", l.out, l.in, r0, c0);
            }
    });
    ref_disable_fp8(r);  // --fp8 turned it on; it is on again when this returns
    const double loss = forward_batch(r, src, 0);
    const std::vector<float> logits = r.logits;
    ref_enable_fp8(r);
    const double loss8 = forward_batch(r, src, 0), logits_error = rel_error(r.logits.data(), logits.data(), logits.size());
    const double loss_error = std::fabs(loss8 - loss) / std::fabs(loss);
    c.numbers = {{"round_trip_errors", (double)round_trip_errors}, {"worst_tile_rel_error", worst_tile}, {"loss_cpu", loss},
                 {"loss_cpu_fp8", loss8}, {"loss_rel_error", loss_error}, {"logits_rel_error", logits_error}};
    if (gpu) {
        std::vector<int> inputs, targets;
        src.get(0, inputs, targets);
        inputs.push_back(targets.back());
        double gpu_loss[2];
        for (int fp8 = 0; fp8 < 2; fp8++) {
            if (fp8) ref_enable_fp8(r);
            else ref_disable_fp8(r);
            model_to_gpu(m, src.B, src.T, true);
            gpu_loss[fp8] = model_eval_loss(m, inputs, src.T, src.B);
            model_free_gpu(m);
        }
        const double gpu_error = std::fabs(gpu_loss[1] - gpu_loss[0]) / std::fabs(gpu_loss[0]);
        c.numbers.insert(c.numbers.end(), {{"loss_gpu", gpu_loss[0]}, {"loss_gpu_fp8", gpu_loss[1]}, {"loss_gpu_rel_error", gpu_error}});
        if (!(gpu_error < FP8_LOSS_TOLERANCE))
            c.issues.push_back(strfmt("GPU: the FP8 loss %.6f is %.3e (relative) from the bf16 loss %.6f, bound %g", gpu_loss[1], gpu_error,
                                      gpu_loss[0], FP8_LOSS_TOLERANCE));
    }
    c.numbers.push_back({"seconds", seconds_since(t0)});
    c.notes.push_back("the weights' worst tile: " + (worst_tile_of.empty() ? std::string("none") : worst_tile_of));
    c.notes.push_back(strfmt("batch 0 with the FP8 GEMMs against the model's own precision: the loss within %g, the logits within %g "
                             "(relative; E4M3 costs about 3.5%% per GEMM)", FP8_LOSS_TOLERANCE, FP8_LOGITS_TOLERANCE));
    if (round_trip_errors) c.issues.push_back(strfmt("%zu FP8 codes do not survive decode + encode", round_trip_errors));
    if (!(worst_tile < 0.0625)) c.issues.push_back(strfmt("a weight tile quantizes with %.3e relative error, over E4M3's 2^-4", worst_tile));
    if (!(loss_error < FP8_LOSS_TOLERANCE))
        c.issues.push_back(strfmt("the FP8 loss %.6f is %.3e (relative) from %.6f, bound %g", loss8, loss_error, loss, FP8_LOSS_TOLERANCE));
    if (!(logits_error < FP8_LOGITS_TOLERANCE))
        c.issues.push_back(strfmt("FP8 logits differ by %.3e (relative), bound %g", logits_error, FP8_LOGITS_TOLERANCE));
    return c;
}

// ----------------------------------------------------------------------------
// printing a CheckResult: the table and the JSON

static void print_text(const CheckResult& c, int index) {
    const std::string head = strfmt("%d. %s", index, c.title.c_str());
    printf("\n%-64s%s\n", head.c_str(), !c.skipped.empty() ? "SKIPPED" : c.passed() ? "PASS" : "FAIL");
    if (!c.skipped.empty()) printf("   skipped (%s)\n", c.skipped.c_str());
    std::string line;  // the numbers, "key value", a few to a line
    for (const auto& [key, value] : c.numbers) {
        const std::string item = key + " " + num(value);
        if (!line.empty() && line.size() + item.size() > 96) printf("   %s\n", line.c_str()), line.clear();
        line += (line.empty() ? "" : ", ") + item;
    }
    if (!line.empty()) printf("   %s\n", line.c_str());
    for (const std::string& n : c.notes) printf("   %s\n", n.c_str());
    for (const Table& t : c.tables) {
        std::vector<size_t> width(t.columns.size());
        for (size_t j = 0; j < t.columns.size(); j++) {
            width[j] = t.columns[j].size();
            for (const auto& row : t.rows) width[j] = std::max(width[j], row[j].size());
        }
        auto print_row = [&](const std::vector<std::string>& row) {
            printf("  ");
            for (size_t j = 0; j < row.size(); j++)  // the first column (a name) to the left, numbers to the right
                printf(j == 0 ? " %-*s" : "  %*s", (int)width[j], row[j].empty() ? "-" : row[j].c_str());
            printf("\n");
        };
        print_row(t.columns);
        for (const auto& row : t.rows) print_row(row);
    }
    for (const std::string& i : c.issues) printf("   ISSUE: %s\n", i.c_str());
    fflush(stdout);
}

// a table cell as JSON: numbers, [lists] and true/false as they are, "" or a
// non-finite number as null, anything else a string
static std::string json_cell(const std::string& s) {
    if (s.empty() || s == "inf" || s == "-inf" || s == "nan") return "null";
    if (s == "true" || s == "false" || s[0] == '[') return s;
    char* end = nullptr;
    std::strtod(s.c_str(), &end);
    return *end == 0 ? s : json_quote(s);
}

static std::string json_list(const std::vector<std::string>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); i++) s += (i ? ", " : "") + json_quote(v[i]);
    return s + "]";
}

static std::string to_json(const CheckResult& c) {
    std::string s = "{\"name\": " + json_quote(c.name) + ", \"passed\": " + (!c.skipped.empty() ? "null" : c.passed() ? "true" : "false");
    s += ", \"skipped\": " + (c.skipped.empty() ? "null" : json_quote(c.skipped)) + ", \"numbers\": {";
    for (size_t i = 0; i < c.numbers.size(); i++) s += (i ? ", " : "") + json_quote(c.numbers[i].first) + ": " + jnum(c.numbers[i].second);
    s += "}, \"tables\": {";
    for (size_t k = 0; k < c.tables.size(); k++) {
        const Table& t = c.tables[k];
        s += (k ? ", " : "") + json_quote(t.name) + ": [";
        for (size_t i = 0; i < t.rows.size(); i++) {
            s += i ? ", {" : "{";
            for (size_t j = 0; j < t.columns.size(); j++) s += (j ? ", " : "") + json_quote(t.columns[j]) + ": " + json_cell(t.rows[i][j]);
            s += "}";
        }
        s += "]";
    }
    return s + "}, \"notes\": " + json_list(c.notes) + ", \"issues\": " + json_list(c.issues) + "}";
}

// ----------------------------------------------------------------------------
// integration checks

// gpu_skipped: why the GPU parts do not run ("" = they run)
static int run_checks(Model& m, const std::string& model_name, const std::vector<int>& data, const std::string& data_name, int T,
                      int B, int batches, uint64_t seed, const std::string& gpu_skipped, bool fp8, bool json) {
    const Config& cfg = m.ref.cfg;
    const bool gpu = gpu_skipped.empty();
    const BatchSource src{data.empty() ? nullptr : &data, mix64(seed ^ 0x7a11d47eull), B, T, cfg.vocab_size};
    int moe_layers = 0;
    for (int l = 0; l < cfg.num_hidden_layers; l++) moe_layers += cfg.is_moe_layer(l);
    if (!json) {
        printf("model: %s\n", model_name.c_str());
        printf("  %d layers (%d MoE), hidden %d, %d heads, vocab %d, context %d, %d routed experts (top-%d), %d shared; %zu parameters\n",
               cfg.num_hidden_layers, moe_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size, cfg.max_position_embeddings,
               cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts, m.ref.layout.total);
        printf("  batches of %d x %d tokens from %s\n", B, T, data_name.c_str());
        printf("  checks on the cpu reference; GPU parts %s\n", gpu ? "on the gpu" : ("skipped (" + gpu_skipped + ")").c_str());
        fflush(stdout);
    }

    std::vector<CheckResult> results;
    auto start = [&](const char* what) { fprintf(stderr, "validate: %zu/%d %s ...\n", results.size() + 1, fp8 ? 6 : 5, what); };
    auto done = [&](const CheckResult& c) {
        results.push_back(c);
        if (!json) print_text(c, (int)results.size());
    };
    start("forward: batch 0 on the cpu reference");
    done(check_forward(m, src));
    start("gradient flow: forward + backward of batch 0");
    done(check_gradient_flow(m, src));
    start("expert utilisation: a forward of each batch");
    done(check_expert_utilisation(m, src, batches));
    start("memory: a decoder at each length");
    done(check_memory(m, gpu, gpu_skipped));
    start(gpu ? "GPU vs CPU: batch 0 on both" : "GPU vs CPU: skipped");
    done(gpu ? check_gpu_vs_cpu(m, src) : CheckResult{"gpu_vs_cpu", "GPU vs CPU", gpu_skipped});
    if (fp8) {
        start("FP8: converter, tiles, batch 0 with and without the FP8 GEMMs");
        done(check_fp8(m, src, gpu));
    }

    int passed = 0, ran = 0;
    std::vector<std::string> issues, skipped;
    for (const CheckResult& c : results) {
        if (!c.skipped.empty()) {
            skipped.push_back(c.title + ": " + c.skipped);
            continue;
        }
        ran++;
        passed += c.passed();
        for (const std::string& i : c.issues) issues.push_back(c.title + ": " + i);
    }
    if (json) {
        std::string s = "{\"model\": " + json_quote(model_name) + ", \"data\": " + json_quote(data_name);
        s += strfmt(", \"batch_size\": %d, \"seq_len\": %d, \"parameters\": %zu, \"checks\": [", B, T, m.ref.layout.total);
        for (size_t i = 0; i < results.size(); i++) s += (i ? ", " : "") + to_json(results[i]);
        s += strfmt("], \"summary\": {\"passed\": %d, \"of\": %d, \"all_passed\": %s", passed, ran, passed == ran ? "true" : "false");
        s += ", \"skipped\": " + json_list(skipped) + ", \"issues\": " + json_list(issues) + "}}";
        printf("%s\n", s.c_str());
    } else {
        printf("\npassed %d of %d checks", passed, ran);
        for (size_t i = 0; i < skipped.size(); i++) printf("%s%s", i ? "; " : " (skipped: ", skipped[i].c_str());
        printf("%s\n", skipped.empty() ? "" : ")");
        printf(issues.empty() ? "no issues found\n" : "issues found:\n");
        for (const std::string& i : issues) printf("  %s\n", i.c_str());
    }
    return passed == ran ? 0 : 1;
}

// ----------------------------------------------------------------------------

// The checks' batches: --data; else, for a training run, its validation data, whose path train does not record:
// data/default/val.bin (where ./train trains by default) when that dataset's tokenizer is the model's, so that the same
// ids mean the same text; else random tokens (data stays empty). Returns what the output calls them.
static std::string checks_data(const Model& m, std::string path, bool training_run, uint64_t seed, std::vector<int>& data) {
    std::string name = path;
    if (path.empty() && training_run) {
        const std::string dir = "data/default", tok_path = dir + "/tokenizer.bin";
        const bool has_val = path_exists(dir + "/val.bin");
        const Tokenizer t = has_val && path_exists(tok_path) ? tokenizer_load(tok_path) : tokenizer_bytes();
        if (!has_val || t.vocab_size != m.tokenizer.vocab_size || t.eot_id != m.tokenizer.eot_id || t.merges != m.tokenizer.merges)
            return strfmt("random tokens (seed %llu): the run does not record its data, and %s/val.bin is missing or has another "
                          "tokenizer", (unsigned long long)seed, dir.c_str());
        path = dir + "/val.bin";
        name = path + " (the default dataset, whose tokenizer is the model's; the run does not record its data)";
    }
    if (path.empty()) return strfmt("random tokens (seed %llu)", (unsigned long long)seed);
    data = read_token_file(path, m.ref.cfg.vocab_size);
    if (data.size() < 2) fail("%s: needs at least 2 tokens, has %zu", path.c_str(), data.size());
    return name;
}

static int run(int argc, char** argv) {
    std::string model_dir = "runs/default", preset, data_path, device = "auto";
    bool has_model = false, json = false, force_checks = false, fp8 = false;
    long long seq_len = 0, batch_size = 0, batches = 8;
    unsigned long long seed = 1337;
    CliParser cli{argc, argv};
    while (cli_next(cli)) {
        if (cli.name == "--help") {
            return cli_help(cli, USAGE);
        } else if (cli.name == "--model") {
            model_dir = cli_value(cli);
            has_model = true;
        } else if (cli.name == "--preset") {
            preset = cli_value(cli);
            config_preset(preset);  // refuses an unknown name before anything runs
        } else if (cli.name == "--data") {
            data_path = cli_value(cli);
        } else if (cli.name == "--seq-len") {
            seq_len = cli_int(cli, 1, INT32_MAX);
        } else if (cli.name == "--batch-size") {
            batch_size = cli_int(cli, 1, 1 << 20);
        } else if (cli.name == "--batches") {
            batches = cli_int(cli, 1, 1 << 20);
        } else if (cli.name == "--seed") {
            seed = (unsigned long long)cli_int(cli, 0, LLONG_MAX);
        } else if (cli.name == "--json") {
            json = cli_flag(cli);
        } else if (cli.name == "--checks") {
            force_checks = cli_flag(cli);
        } else if (cli.name == "--fp8") {
            fp8 = cli_flag(cli);
        } else if (cli.name == "--device") {
            device = cli_device(cli);
        } else {
            cli_unknown(cli);
        }
    }
    if (!cli.positional.empty()) fail("unexpected argument '%s' (see --help)", cli.positional[0].c_str());
    if (has_model && !preset.empty()) fail("give --model DIR or --preset NAME, not both");
    if (device == "gpu" && !gpu_available()) fail("--device gpu: no CUDA device is available (use --device cpu or auto)");
    const bool use_gpu = device == "gpu" || (device == "auto" && gpu_available());

    Model m;
    std::string model_name;
    int train_seq_len = 0;  // the length the run trained at; 0 = not a training run
    if (!preset.empty()) {
        model_create(m, config_preset(preset), seed);
        model_name = strfmt("preset %s, fresh weights (seed %llu)", preset.c_str(), (unsigned long long)seed);
    } else {
        std::string dir = model_resolve_dir(model_dir, !has_model);
        TrainState st;
        const bool trained = checkpoint_has_state(dir);
        model_load(m, dir, trained ? &st : nullptr);
        std::vector<float>().swap(m.adam_m);  // the checks need no optimizer moments
        std::vector<float>().swap(m.adam_v);
        if (trained) train_seq_len = st.options.seq_len;
        model_name = dir;
    }
    if (fp8) ref_enable_fp8(m.ref);
    const int context = m.ref.cfg.max_position_embeddings;
    if (seq_len > context) fail("--seq-len %lld exceeds the model's context (max_position_embeddings %d)", seq_len, context);

    if (preset.empty() && !data_path.empty() && !force_checks) {
        std::string from = "--seq-len";
        if (!seq_len) {
            seq_len = train_seq_len ? std::min(train_seq_len, context) : context;
            from = train_seq_len ? "the training length" : "the context";
        }
        return run_loss(m, data_path, (int)seq_len, from, batch_size ? (int)batch_size : 1, use_gpu, json);
    }

    std::vector<int> data;
    const std::string data_name = checks_data(m, data_path, train_seq_len > 0, seed, data);
    return run_checks(m, model_name, data, data_name, seq_len ? (int)seq_len : std::min(64, context), batch_size ? (int)batch_size : 4,
                      (int)batches, seed, use_gpu ? "" : device == "cpu" ? "--device cpu" : "no CUDA device", fp8, json);
}

int main(int argc, char** argv) {
    return cli_main(run, argc, argv);
}
