// train.cu — the trainer: reads llm.c token files, trains a DeepSeek-V3-style model
// (MLA + DeepSeekMoE) with AdamW, warmup + cosine, clipping and gradient
// accumulation, and keeps a run directory with a resumable checkpoint, a per-step
// metrics log and a loss-curve picture (SVG, drawn by chart.h, no external tools).
//
//   ./train                                   # the generated default data, mini preset
//   ./train --data data/shakespeare --preset small --steps 5000 --out runs/shk
//   ./train --out runs/shk --resume --steps 8000
//   ./train --preset small --batch-size 16 --seq-len 1024 --gpus 8   # data parallel on 8 GPUs of this host
//
// The run directory (--out):
//   checkpoint/   config.json, model.safetensors, tokenizer.bin (none for bytes),
//                 optimizer.safetensors, trainer_state.json (model_save; replaced
//                 atomically at every save)
//   metrics.csv   step,loss,val_loss,lr,grad_norm,tokens_per_sec (one line per step)
//   loss.svg      train and val loss against step
//
// The model runs on the GPU when there is one (model.cu), else on the CPU reference; on several GPUs, one process
// per GPU, data parallel with ZeRO-1 (dist.h). Every rank computes the same numbers (the group's loss, norm and
// expert loads); only rank 0 prints and writes the run directory.
#include <algorithm>
#include <cerrno>
#include <climits>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include <omp.h>
#include <unistd.h>

#include "chart.h"
#include "cli.h"
#include "common.h"
#include "config.h"
#include "corpus.h"
#include "dataloader.h"
#include "fileutil.h"
#include "model.h"
#include "tokenizer.h"

static const char* USAGE =
    "usage: ./train [options]\n"
    "\n"
    "Trains a small DeepSeek-V3-style model (MLA attention, DeepSeekMoE) on llm.c token\n"
    "files. With no options it trains the 'mini' preset on the generated default\n"
    "dataset in data/default (created on first use, no network needed).\n"
    "\n"
    "Data\n"
    "  --data DIR              prepared dataset: DIR/train.bin, DIR/val.bin, DIR/tokenizer.bin\n"
    "                          (make one with: data/prepare --input FILE --out DIR --vocab N)\n"
    "                          default data/default, generated when missing\n"
    "  --train-data PATTERN    llm.c token file(s) to train on, a path or a glob such as\n"
    "                          'fineweb_train_*.bin'; replaces DIR/train.bin\n"
    "  --val-data PATTERN      token file(s) for validation; replaces DIR/val.bin. With\n"
    "                          --train-data but neither --val-data nor --data there is no\n"
    "                          validation. The tokenizer is DIR/tokenizer.bin; with\n"
    "                          --train-data, only when --data is given too; else raw\n"
    "                          bytes (ids 0..255)\n"
    "\n"
    "Model\n"
    "  --preset NAME           tiny | mini | small | medium (default mini)\n"
    "  --config FILE           a Hugging Face config.json; replaces --preset (its\n"
    "                          vocab_size is kept)\n"
    "  --vocab-size N          the model's vocabulary (default: the tokenizer's size for a\n"
    "                          preset); every token id in the data must be below it\n"
    "  --mtp                   add DeepSeek-V3's multi-token-prediction module to the preset\n"
    "                          or config (num_nextn_predict_layers 1): one more block that\n"
    "                          predicts the token after next from the main model's output\n"
    "                          and the next token's embedding; generate drafts with it\n"
    "\n"
    "Run directory\n"
    "  --out DIR               default runs/default; holds checkpoint/ (config.json,\n"
    "                          model.safetensors, tokenizer.bin unless bytes,\n"
    "                          optimizer.safetensors, trainer_state.json), metrics.csv\n"
    "                          and loss.svg\n"
    "  --resume                continue exactly from DIR/checkpoint: weights, optimizer\n"
    "                          moments, step, data position, every training option and\n"
    "                          the run's data, logging and saving options come from the\n"
    "                          checkpoint. Given again, these change: --steps, --data,\n"
    "                          --train-data, --val-data (the same tokens expected),\n"
    "                          --val-every, --val-tokens, --save-every, --sample-every,\n"
    "                          --sample-tokens, --save-dtype, --device, --no-cuda-graph,\n"
    "                          --grad-accum and the options of several GPUs (below);\n"
    "                          any other option is refused. metrics.csv lines after the\n"
    "                          checkpoint's step are dropped. A resumed run prints the\n"
    "                          same losses as one that was never stopped, as long as the\n"
    "                          learning-rate schedule is the same (e.g. stopped by Ctrl-C,\n"
    "                          or --steps unchanged, or the first part within --warmup)\n"
    "  --overwrite             start afresh even though DIR/checkpoint exists (without it\n"
    "                          train refuses, so that no checkpoint is lost by accident)\n"
    "\n"
    "Optimisation\n"
    "  --steps N               optimizer steps; the cosine schedule ends here (default 200)\n"
    "  --batch-size B          sequences per micro-batch (default 8)\n"
    "  --seq-len T             tokens per sequence, <= max_position_embeddings (default 64)\n"
    "  --grad-accum K          micro-batches per step; tokens/step = B*T*K (default 1)\n"
    "  --lr X                  peak learning rate (default 3e-3; 1e-3 for the medium preset)\n"
    "  --min-lr-fraction F     cosine decays to lr*F (default 0.1)\n"
    "  --warmup N              linear warmup steps (default 20)\n"
    "  --weight-decay X        AdamW decay of the matrices, not the norms (default 0.1)\n"
    "  --grad-clip X           global gradient-norm clip, 0 = off (default 1.0)\n"
    "  --beta1 X, --beta2 X    AdamW betas (default 0.9, 0.95)\n"
    "  --dropout P             after the embedding, attention and FFN outputs (default 0)\n"
    "  --attn-dropout P        on the attention probabilities, as nanoGPT's attn_dropout\n"
    "                          (default 0)\n"
    "  --shuffle               each sequence of a batch a window at a random offset (as\n"
    "                          nanoGPT samples; drawn from the seed and the step, within\n"
    "                          the shard being read); default: consecutive windows in\n"
    "                          order, as llm.c reads them\n"
    "  --balance-alpha X       sequence-wise MoE balance loss weight, 0 = off (default 1e-4)\n"
    "  --bias-update-speed X   aux-loss-free expert-bias step gamma, 0 = off (default 1e-3)\n"
    "  --mtp-lambda X          weight of the MTP module's loss when the model has one:\n"
    "                          loss = main + X * mtp (default 0.3, DeepSeek-V3's)\n"
    "  --seed N                weight init, dropout and sampling seed (default 1337)\n"
    "  --fp8                   DeepSeek-V3's FP8 training: the attention and FFN GEMMs in\n"
    "                          E4M3 with 1x128 / 128x128 scales (GPU: sm_90, CUDA 12.9+;\n"
    "                          the CPU emulates it, slowly); forward and input gradients,\n"
    "                          the weight gradients and routed experts stay bf16; every\n"
    "                          SwiGLU input is kept for the backward in E4M3\n"
    "  --fp8-wgrad             with --fp8, the weight gradients in E4M3 too: DeepSeek-V3's\n"
    "                          whole recipe, slower here (bench/RESULTS.md)\n"
    "\n"
    "Logging and checkpoints\n"
    "  --val-every N           val loss and expert load every N steps and at the end;\n"
    "                          0 = only at the end (default 50)\n"
    "  --val-tokens N          evaluate the first N tokens of the validation split only\n"
    "                          (default 0: all of it; the val loss is over the whole split)\n"
    "  --save-every N          checkpoint every N steps and at the end; 0 = only at the\n"
    "                          end (default 100)\n"
    "  --sample-every N        print a sample every N steps and at the end; 0 = off\n"
    "                          (default 100). Prompt: the first 8 val tokens;\n"
    "                          temperature 0.8, top-k 40, a fixed seed\n"
    "  --sample-tokens N       tokens per sample (default 48)\n"
    "  --save-dtype fp32|bf16|fp8  weights in the checkpoint (default fp32; bf16 halves\n"
    "                          model.safetensors, fp8 is DeepSeek-V3's FP8 format, E4M3\n"
    "                          in 128x128 blocks with weight_scale_inv; neither is an\n"
    "                          exact resume point)\n"
    "  --device auto|cpu|gpu   auto = the GPU when one is present (default auto)\n"
    "  --no-cuda-graph         GPU: launch every kernel of a step one by one instead of\n"
    "                          replaying the step as a CUDA graph (for profiling, comparisons)\n"
    "  --help                  show this help\n"
    "\n"
    "Several GPUs (data parallel, ZeRO-1: each process runs its own micro-batches, so\n"
    "tokens/step = processes x B x T x K; a checkpoint resumes on any number of GPUs)\n"
    "  --gpus N                N processes on this host's first N GPUs, forked by train\n"
    "  --num-processes N       this process is one of N started by a launcher (Slurm,\n"
    "  --process-rank R        one per GPU, node by node), rank R in 0..N-1; rank 0 hands\n"
    "  --init-dir DIR          out the NCCL id through DIR, a directory every rank reads\n"
    "                          (a shared file system across nodes; one per run)\n"
    "  --nccl-timeout S        a rank that waits on the others for S seconds stops with an\n"
    "                          error (a rank died or hung; default 600; longer than a save)\n"
    "  A build with USE_MPI=1 also starts under mpirun -np N ./train ...\n"
    "  On resume --grad-accum may change too (keep processes x grad-accum to keep the run)\n"
    "\n"
    "Ctrl-C (SIGINT) or SIGTERM: the current step finishes, the checkpoint is saved and\n"
    "train exits with status 130. A step with a NaN or infinite loss or gradient skips\n"
    "its update and says so; the third in a row stops the run with status 1, leaving\n"
    "the last good checkpoint untouched. Errors print one line,\n"
    "'error: ...', and exit with status 1.\n";

// ----------------------------------------------------------------------------
// Options

struct Args {
    std::string data_dir = "data/default";
    bool data_given = false;
    std::string train_pattern, val_pattern;
    std::string preset = "mini";
    bool preset_given = false;
    std::string config_path;
    int vocab_size = 0;  // 0 = from the tokenizer (preset) or the config file
    bool mtp = false;    // num_nextn_predict_layers = 1 on the preset or config
    std::string out_dir = "runs/default";
    bool resume = false, overwrite = false;
    int steps = 200;
    bool steps_given = false;
    TrainOptions opt;
    int val_every = 50;
    int val_tokens = 0;  // 0: the whole validation split
    int save_every = 100;
    int sample_every = 100;
    int sample_tokens = 48;
    std::string save_dtype = "fp32";  // as --save-dtype names it
    std::string device = "auto";
    bool cuda_graph = true;
    bool grad_accum_given = false, lr_given = false;
    int gpus = 0;     // --gpus: fork this many ranks
    DistGroup dist;   // --num-processes, --process-rank, --init-dir, --nccl-timeout
    std::vector<std::string> fixed_on_resume;  // options given that a resumed run takes from its checkpoint
};

static bool parse_args(int argc, char** argv, Args& a) {
    a.opt.batch_size = 8;
    a.opt.seq_len = 64;
    a.opt.grad_accum = 1;
    a.opt.dropout = 0;
    a.opt.balance_alpha = 1e-4f;
    a.opt.seed = 1337;
    a.opt.optim.lr = DEFAULT_LEARNING_RATE;  // a preset's own below, once the preset is known
    a.opt.optim.min_lr_fraction = 0.1f;
    a.opt.optim.warmup_steps = 20;
    a.opt.optim.weight_decay = 0.1f;
    a.opt.optim.grad_clip = 1.0f;
    a.opt.optim.beta1 = 0.9f;
    a.opt.optim.beta2 = 0.95f;
    a.opt.optim.bias_update_speed = 1e-3f;

    const int BIG = 1 << 30;
    CliParser cli{argc, argv};
    while (cli_next(cli)) {
        const std::string& n = cli.name;
        bool fixed = true;  // the option is part of the checkpoint's training state
        if (n == "--help") {
            cli_flag(cli);
            printf("%s", USAGE);
            return false;
        } else if (n == "--data") {
            a.data_dir = strip_trailing_slashes(cli_value(cli));
            a.data_given = true;
            fixed = false;
        } else if (n == "--train-data") {
            a.train_pattern = cli_value(cli);
            fixed = false;
        } else if (n == "--val-data") {
            a.val_pattern = cli_value(cli);
            fixed = false;
        } else if (n == "--preset") {
            a.preset = cli_value(cli);
            a.preset_given = true;
            config_preset(a.preset);  // an unknown name fails here, naming the choices
        } else if (n == "--config") {
            a.config_path = cli_value(cli);
        } else if (n == "--vocab-size") {
            a.vocab_size = (int)cli_int(cli, 1, INT32_MAX);
        } else if (n == "--mtp") {
            cli_flag(cli);
            a.mtp = true;
        } else if (n == "--out") {
            a.out_dir = strip_trailing_slashes(cli_value(cli));
            fixed = false;
        } else if (n == "--resume") {
            cli_flag(cli);
            a.resume = true;
            fixed = false;
        } else if (n == "--overwrite") {
            cli_flag(cli);
            a.overwrite = true;
            fixed = false;
        } else if (n == "--steps") {
            a.steps = (int)cli_int(cli, 1, BIG);
            a.steps_given = true;
            fixed = false;
        } else if (n == "--batch-size") {
            a.opt.batch_size = (int)cli_int(cli, 1, 1 << 16);
        } else if (n == "--seq-len") {
            a.opt.seq_len = (int)cli_int(cli, 1, 1 << 20);
        } else if (n == "--grad-accum") {
            a.opt.grad_accum = (int)cli_int(cli, 1, 1 << 16);
            a.grad_accum_given = true;
            fixed = false;  // a resumed run may change it, to keep processes x grad-accum on another GPU count
        } else if (n == "--lr") {
            a.opt.optim.lr = (float)cli_float(cli, 0, 10);
            a.lr_given = true;
        } else if (n == "--min-lr-fraction") {
            a.opt.optim.min_lr_fraction = (float)cli_float(cli, 0, 1);
        } else if (n == "--warmup") {
            a.opt.optim.warmup_steps = (int)cli_int(cli, 0, BIG);
        } else if (n == "--weight-decay") {
            a.opt.optim.weight_decay = (float)cli_float(cli, 0, 10);
        } else if (n == "--grad-clip") {
            a.opt.optim.grad_clip = (float)cli_float(cli, 0, 1e6);
        } else if (n == "--beta1") {
            a.opt.optim.beta1 = (float)cli_float(cli, 0, 0.99999);
        } else if (n == "--beta2") {
            a.opt.optim.beta2 = (float)cli_float(cli, 0, 0.99999);
        } else if (n == "--dropout") {
            a.opt.dropout = (float)cli_float(cli, 0, 0.99);
        } else if (n == "--attn-dropout") {
            a.opt.attn_dropout = (float)cli_float(cli, 0, 0.99);
        } else if (n == "--shuffle") {
            cli_flag(cli);
            a.opt.shuffle = true;
        } else if (n == "--fp8") {
            cli_flag(cli);
            a.opt.fp8 = true;
        } else if (n == "--fp8-wgrad") {
            cli_flag(cli);
            a.opt.fp8_wgrad = true;
        } else if (n == "--balance-alpha") {
            a.opt.balance_alpha = (float)cli_float(cli, 0, 10);
        } else if (n == "--bias-update-speed") {
            a.opt.optim.bias_update_speed = (float)cli_float(cli, 0, 1);
        } else if (n == "--mtp-lambda") {
            a.opt.mtp_lambda = (float)cli_float(cli, 0, 10);
        } else if (n == "--seed") {
            a.opt.seed = (uint64_t)cli_int(cli, 0, LLONG_MAX);
        } else if (n == "--val-every") {
            a.val_every = (int)cli_int(cli, 0, BIG);
            fixed = false;
        } else if (n == "--val-tokens") {
            a.val_tokens = (int)cli_int(cli, 0, INT32_MAX);
            if (a.val_tokens == 1) fail("--val-tokens: 1 token predicts nothing; give 0 (all) or at least 2");
            fixed = false;
        } else if (n == "--save-every") {
            a.save_every = (int)cli_int(cli, 0, BIG);
            fixed = false;
        } else if (n == "--sample-every") {
            a.sample_every = (int)cli_int(cli, 0, BIG);
            fixed = false;
        } else if (n == "--sample-tokens") {
            a.sample_tokens = (int)cli_int(cli, 1, 1 << 20);
            fixed = false;
        } else if (n == "--save-dtype") {
            std::string v = cli_value(cli);
            if (v != "fp32" && v != "bf16" && v != "fp8") fail("option --save-dtype: '%s' is not fp32, bf16 or fp8", v.c_str());
            a.save_dtype = v;
            fixed = false;
        } else if (n == "--device") {
            a.device = cli_device(cli);
            fixed = false;
        } else if (n == "--no-cuda-graph") {
            cli_flag(cli);
            a.cuda_graph = false;
            fixed = false;
        } else if (n == "--gpus") {
            a.gpus = (int)cli_int(cli, 1, 1024);
            fixed = false;
        } else if (n == "--num-processes") {
            a.dist.world = (int)cli_int(cli, 1, 1 << 20);
            fixed = false;
        } else if (n == "--process-rank") {
            a.dist.rank = (int)cli_int(cli, 0, (1 << 20) - 1);
            fixed = false;
        } else if (n == "--init-dir") {
            a.dist.init_dir = strip_trailing_slashes(cli_value(cli));
            fixed = false;
        } else if (n == "--nccl-timeout") {
            a.dist.timeout = cli_float(cli, 1, 1e7);
            fixed = false;
        } else {
            cli_unknown(cli);
        }
        if (fixed) a.fixed_on_resume.push_back(n);
    }
    if (!cli.positional.empty()) fail("unexpected argument '%s' (options are --long-names; see --help)", cli.positional[0].c_str());
    if (a.preset_given && !a.config_path.empty()) fail("give --preset or --config, not both");
    if (!a.lr_given && a.config_path.empty()) a.opt.optim.lr = preset_learning_rate(a.preset);
    if (a.resume && a.overwrite) fail("--resume and --overwrite contradict each other");
    if (a.opt.fp8_wgrad && !a.opt.fp8) fail("--fp8-wgrad needs --fp8");
    if (a.gpus > 0 && a.dist.world > 1) fail("give --gpus or --num-processes, not both");
    if (a.dist.rank >= a.dist.world) fail("--process-rank %d: must be below --num-processes %d", a.dist.rank, a.dist.world);
    return true;
}

// updates skipped in a row (a NaN or inf gradient each) that stop the run
static const int MAX_SKIPPED_STEPS = 3;

// ----------------------------------------------------------------------------
// Small formatting helpers

static std::string fmt_count(double n) {
    if (n >= 1e9) return strfmt("%.2fB", n / 1e9);
    if (n >= 1e6) return strfmt("%.2fM", n / 1e6);
    if (n >= 1e3) return strfmt("%.1fK", n / 1e3);
    return strfmt("%.0f", n);
}

static std::string fmt_duration(double s) {
    if (!std::isfinite(s) || s < 0) return "?";
    long t = (long)(s + 0.5);
    if (t < 60) return strfmt("%lds", t);
    if (t < 3600) return strfmt("%ldm%02lds", t / 60, t % 60);
    return strfmt("%ldh%02ldm", t / 3600, (t % 3600) / 60);
}

// Sample text for a terminal: printable ASCII, tabs and complete UTF-8 sequences as
// they are, newlines as a new line with `indent`, every other byte as \xNN.
static std::string printable(const std::string& s, const std::string& indent) {
    std::string out;
    for (size_t i = 0; i < s.size();) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\n') {
            out += "\n" + indent;
            i++;
            continue;
        }
        if ((c >= 0x20 && c < 0x7f) || c == '\t') {
            out += (char)c;
            i++;
            continue;
        }
        int len = c >= 0xf0 && c < 0xf5 ? 4 : c >= 0xe0 && c < 0xf0 ? 3 : c >= 0xc2 && c < 0xe0 ? 2 : 0;
        bool ok = len > 0 && i + len <= s.size();
        for (int k = 1; ok && k < len; k++) ok = ((unsigned char)s[i + k] & 0xc0) == 0x80;
        if (ok) {
            out += s.substr(i, len);
            i += len;
        } else {
            out += strfmt("\\x%02x", c);
            i++;
        }
    }
    return out;
}

static std::string decode(const Tokenizer& tok, const std::vector<int>& ids) {
    std::string s;
    for (int id : ids) s += id >= 0 && id < tok.vocab_size ? tok.token_bytes[id] : strfmt("<%d>", id);
    return s;
}

// ----------------------------------------------------------------------------
// metrics.csv

static const char* METRICS_HEADER = "step,loss,val_loss,lr,grad_norm,tokens_per_sec";

// Keeps the lines of steps <= keep_through (the resumed checkpoint's step), rewrites
// the file with them, and returns them for the loss curve.
static std::vector<LossPoint> metrics_truncate(const std::string& path, int keep_through) {
    std::vector<LossPoint> rows;
    std::string kept = std::string(METRICS_HEADER) + "\n";
    if (path_exists(path)) {
        std::string text = read_file(path);
        size_t at = 0;
        while (at < text.size()) {
            size_t end = text.find('\n', at);
            if (end == std::string::npos) end = text.size();  // a last line cut short by a crash is dropped below
            std::string line = text.substr(at, end - at);
            bool complete = end < text.size();
            at = end + 1;
            std::vector<std::string> f;
            for (size_t b = 0, e; b <= line.size(); b = e + 1) {
                e = line.find(',', b);
                if (e == std::string::npos) e = line.size();
                f.push_back(line.substr(b, e - b));
            }
            char* num_end = nullptr;
            long step = f[0].empty() ? 0 : strtol(f[0].c_str(), &num_end, 10);
            if (!complete || f.size() < 3 || !num_end || *num_end) continue;  // the header, or a line cut short by a crash
            if (step < 1 || step > keep_through) continue;
            kept += line + "\n";
            rows.push_back({(int)step, strtod(f[1].c_str(), nullptr), f[2].empty() ? NAN : strtod(f[2].c_str(), nullptr)});
        }
    }
    write_file_atomic(path, kept);
    return rows;
}

// ----------------------------------------------------------------------------
// Data

static bool dataset_complete(const std::string& dir) {
    return path_exists(dir + "/train.bin") && path_exists(dir + "/val.bin") && path_exists(dir + "/tokenizer.bin");
}

// The first `limit` tokens of the files, every id checked against vocab_size;
// *total gets the token count of all the files.
static std::vector<int> read_val_tokens(const std::string& pattern, int vocab_size, size_t limit, uint64_t* total) {
    std::vector<int> out;
    *total = 0;
    for (const std::string& f : glob_files(pattern)) {
        uint64_t n = token_file_count(f);
        *total += n;
        if (out.size() < limit && n > 0) {
            std::vector<int> t = read_token_file(f, vocab_size);
            out.insert(out.end(), t.begin(), t.begin() + std::min<size_t>(t.size(), limit - out.size()));
        }
    }
    if (out.size() < 2) fail("%s: validation needs at least 2 tokens, the file(s) have %zu", pattern.c_str(), out.size());
    return out;
}

// ----------------------------------------------------------------------------
// Sampling

static std::vector<int> sample(Model& m, const std::vector<int>& prompt, int n, uint64_t seed) {
    const int V = m.ref.cfg.vocab_size, ctx_max = m.ref.cfg.max_position_embeddings;
    SamplingOptions sampling;
    sampling.temperature = 0.8f;
    sampling.top_k = 40;
    Rng rng{mix64(seed ^ 0x73616d706c65ull), 0};  // the same draws at every sample, so samples compare
    std::vector<int> toks = prompt, ctx;
    for (int i = 0; i < n; i++) {
        size_t from = toks.size() > (size_t)ctx_max ? toks.size() - ctx_max : 0;
        ctx.assign(toks.begin() + from, toks.end());
        const std::vector<float>& logits = model_logits(m, ctx);
        toks.push_back(sample_token(logits.data() + (ctx.size() - 1) * (size_t)V, V, sampling, rng.uniform()));
    }
    return std::vector<int>(toks.begin() + prompt.size(), toks.end());
}

// ----------------------------------------------------------------------------
// Ctrl-C

static volatile sig_atomic_t g_stop_signal = 0;

static void on_stop_signal(int sig) {
    g_stop_signal = sig;
    static const char msg[] = "\n(stopping after this step to save a checkpoint; press Ctrl-C again to quit at once)\n";
    ssize_t ignored = write(STDERR_FILENO, msg, sizeof(msg) - 1);
    (void)ignored;
}

static void install_stop_handlers() {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESETHAND;  // a second signal takes the default action: quit at once
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
}

// ----------------------------------------------------------------------------

// what a resumed run takes from its checkpoint besides the training options: the data, logging and saving
// options, as the command-line words that set them
static std::vector<std::string> run_options(const Args& a) {
    std::vector<std::string> words = {"--val-every", std::to_string(a.val_every), "--val-tokens",
                                      std::to_string(a.val_tokens), "--save-every", std::to_string(a.save_every), "--sample-every",
                                      std::to_string(a.sample_every), "--sample-tokens", std::to_string(a.sample_tokens), "--save-dtype",
                                      a.save_dtype};
    if (a.data_given) words.insert(words.end(), {"--data", a.data_dir});
    if (!a.train_pattern.empty()) words.insert(words.end(), {"--train-data", a.train_pattern});
    if (!a.val_pattern.empty()) words.insert(words.end(), {"--val-data", a.val_pattern});
    return words;
}

// Runs f on rank 0 (the run directory's files) and lets every rank learn whether it failed, so that none goes
// on to wait for a rank that has stopped.
template <typename F>
static void on_root(const DistGroup& g, F f) {
    std::string error;
    if (g.rank == 0) {
        try {
            f();
        } catch (const std::exception& e) {
            error = e.what();
            if (error.empty()) error = "failed";
        }
    }
    if (dist_any(g, !error.empty())) fail("%s", g.rank == 0 ? error.c_str() : "rank 0 stopped (its error says why)");
}

static int train(Args& a);

static int run(int argc, char** argv) {
    Args a;
    if (!parse_args(argc, argv, a)) return 0;
    if (a.resume && checkpoint_has_state(a.out_dir + "/checkpoint")) {
        // the checkpoint's run options first, so that the ones given again on this command line win
        const std::vector<std::string> recorded = checkpoint_state(a.out_dir + "/checkpoint").run_options;
        std::vector<char*> words = {argv[0]};
        for (const std::string& w : recorded) words.push_back(const_cast<char*>(w.c_str()));
        words.insert(words.end(), argv + 1, argv + argc);
        a = Args();
        parse_args((int)words.size(), words.data(), a);
    }
    if ((a.gpus > 1 || a.dist.world > 1) && a.device == "cpu") fail("several processes train on GPUs only, not with --device cpu");
    // several GPUs: the ranks are forked before any CUDA call (a CUDA context does not survive a fork)
    if (a.gpus > 1) {
        const int status = dist_launch(a.gpus, a.dist);
        if (status >= 0) return status;
    }
#ifdef USE_MPI
    else if (a.dist.world == 1) dist_from_mpi(a.dist);
#endif
    if (a.dist.world == 1) return train(a);
    if (a.dist.rank > 0 && !freopen("/dev/null", "w", stdout)) fail("rank %d: cannot silence stdout", a.dist.rank);
    try {
        dist_init(a.dist);
        dist_check_same(a.dist, dist_options_hash(argc, argv), "options (every rank needs the same command line but for --process-rank)");
        const int status = train(a);
        dist_free(a.dist);
        return status;
    } catch (const std::exception& e) {
        dist_free(a.dist, true);
        fail("rank %d of %d: %s", a.dist.rank, a.dist.world, e.what());
    }
}

static int train(Args& a) {
    const DistGroup& dist = a.dist;
    if (a.device == "gpu" && !gpu_available()) fail("--device gpu: no CUDA device is available (use --device cpu or auto)");
    if (a.resume && !a.fixed_on_resume.empty())
        fail("%s cannot be used with --resume: a resumed run keeps the checkpoint's model and training options "
             "(see --resume in --help for what may change)", a.fixed_on_resume[0].c_str());

    const std::string ckpt = a.out_dir + "/checkpoint";
    const std::string metrics_path = a.out_dir + "/metrics.csv", svg_path = a.out_dir + "/loss.svg";
    // the run directory, once the inputs are known to be good: locked for this run, a save that a kill
    // interrupted finished or undone, then the checkpoint there must be what the options say
    // (rank 0's; the others wait for it, so that they read a checkpoint that it has recovered)
    auto claim_run_dir = [&]() {
        on_root(dist, [&] {
            make_dirs(a.out_dir);
            lock_or_fail(a.out_dir + "/.lock", strfmt("--out %s is in use by another ./train", a.out_dir.c_str()).c_str());
            atomic_dir_recover(ckpt);
            if (a.resume && !checkpoint_has_state(ckpt))
                fail("--resume: %s has no resumable checkpoint (%s)", a.out_dir.c_str(),
                     path_exists(ckpt) ? "no trainer_state.json / optimizer.safetensors in checkpoint/" : "no checkpoint/ directory");
            if (!a.resume && !a.overwrite && path_exists(ckpt))
                fail("--out %s already holds a checkpoint: pass --resume to continue it, --overwrite to start afresh, "
                     "or another --out", a.out_dir.c_str());
        });
    };

    // the data files
    const bool default_data = a.data_dir == "data/default";
    if (a.train_pattern.empty() || (a.val_pattern.empty() && a.data_given)) {
        // decided together: a rank that looks while rank 0 writes the files must not decide otherwise
        if (dist_any(dist, default_data && !dataset_complete(a.data_dir))) {
            on_root(dist, [&] {
                printf("data/default is missing: generating the default dataset (1 MiB of generated English-like text, "
                       "BPE vocab 1024, 10%% val)\n");
                fflush(stdout);
                prepare_dataset(default_corpus(1 << 20), a.data_dir, 1024, 0.1);
            });
        } else if (!path_exists(a.data_dir)) {
            fail("--data %s: no such directory (make one with data/prepare --input FILE --out %s)", a.data_dir.c_str(),
                 a.data_dir.c_str());
        }
    }
    std::string train_pattern = a.train_pattern.empty() ? a.data_dir + "/train.bin" : a.train_pattern;
    std::string val_pattern = a.val_pattern;
    if (val_pattern.empty() && (a.train_pattern.empty() || a.data_given)) val_pattern = a.data_dir + "/val.bin";
    if (a.train_pattern.empty() && !path_exists(train_pattern))
        fail("--data %s: %s is missing (make a dataset with data/prepare --input FILE --out %s)", a.data_dir.c_str(),
             train_pattern.c_str(), a.data_dir.c_str());
    if (a.val_pattern.empty() && !val_pattern.empty() && !path_exists(val_pattern))
        fail("--data %s: %s is missing (pass --val-data, or make the dataset with data/prepare)", a.data_dir.c_str(),
             val_pattern.c_str());

    // the model: from the checkpoint, or fresh from a preset / config.json
    Model m;
    TrainState st;
    int last_saved = -1;  // the step of the last good checkpoint in ckpt (-1: none of this run)
    if (a.resume) {
        claim_run_dir();
        model_load(m, ckpt, &st);
        if (a.steps_given) st.options.optim.total_steps = a.steps;
        if (a.grad_accum_given) st.options.grad_accum = a.opt.grad_accum;
        a.steps = st.options.optim.total_steps;
        if (a.steps <= st.step)
            fail("--resume: the checkpoint is already at step %d of %d; pass --steps N with N > %d to train further",
                 st.step, a.steps, st.step);
        last_saved = st.step;
    } else {
        std::string tok_path = a.data_dir + "/tokenizer.bin";
        bool has_tok = path_exists(tok_path) && (a.train_pattern.empty() || a.data_given);
        Tokenizer tok = has_tok ? tokenizer_load(tok_path) : tokenizer_bytes();
        Config c;
        if (a.config_path.empty()) {
            c = config_preset(a.preset);
            c.vocab_size = tok.vocab_size;
        } else {
            try {
                c = config_from_json(read_file(a.config_path), a.config_path);
            } catch (const std::exception& e) {
                std::string msg = e.what();
                if (msg.compare(0, a.config_path.size(), a.config_path) == 0) throw;
                fail("%s: %s", a.config_path.c_str(), msg.c_str());
            }
        }
        if (a.vocab_size > 0) c.vocab_size = a.vocab_size;
        if (a.mtp) c.num_nextn_predict_layers = 1;
        if (c.vocab_size < tok.vocab_size)
            fail("%s %d is smaller than the tokenizer's %d tokens (%s)",
                 a.vocab_size > 0 ? "--vocab-size" : strfmt("%s: vocab_size", a.config_path.c_str()).c_str(), c.vocab_size,
                 tok.vocab_size, has_tok ? tok_path.c_str() : "the byte tokenizer");
        config_check(c);
        st.options = a.opt;
        st.options.optim.total_steps = a.steps;
        if (st.options.seq_len > c.max_position_embeddings)
            fail("--seq-len %d exceeds the model's context, max_position_embeddings %d", st.options.seq_len,
                 c.max_position_embeddings);
        claim_run_dir();
        model_create(m, c, st.options.seed);
        m.tokenizer = tok;
    }
    TrainOptions& o = st.options;
    o.cuda_graph = a.cuda_graph;
    const Config& c = m.ref.cfg;
    if (o.seq_len > c.max_position_embeddings)
        fail("%s: seq_len %d exceeds max_position_embeddings %d", ckpt.c_str(), o.seq_len, c.max_position_embeddings);

    const bool use_gpu = a.device == "gpu" || (a.device == "auto" && gpu_available()) || dist.world > 1;
    if (o.fp8) ref_enable_fp8(m.ref, o.fp8_wgrad);
    if (use_gpu) model_to_gpu(m, o.batch_size, o.seq_len, false, dist);
    std::string device_desc = use_gpu ? strfmt("gpu (%.1f MiB of device memory)", model_gpu_bytes(m) / 1048576.0)
                                      : strfmt("cpu (%d threads)", omp_get_max_threads());
    if (dist.world > 1) device_desc = strfmt("%d processes, each on a ", dist.world) + device_desc + ", ZeRO-1";

    DataLoader loader;
    dataloader_open(loader, train_pattern, o.batch_size, o.seq_len, c.vocab_size, dist.rank, dist.world);
    loader.shuffle = o.shuffle;
    loader.shuffle_key = mix64(o.seed ^ 0x73687566666c65ull);
    if (a.resume) dataloader_seek(loader, st.data_position);
    // ranks that read different checkpoints or data (an --out or a data path that is not on a file system every
    // node sees) would train different models
    dist_check_same(dist, dist_hash(config_to_json(c) + strfmt("|%d|%llu|%llu", st.step, (unsigned long long)st.data_position,
                                                               (unsigned long long)loader.total)),
                    "models or data (every rank must read the same checkpoint and token files)");
    std::vector<int> val_tokens;
    uint64_t val_total = 0;
    if (!val_pattern.empty())
        val_tokens = read_val_tokens(val_pattern, c.vocab_size, a.val_tokens > 0 ? (size_t)a.val_tokens : SIZE_MAX, &val_total);

    // the header
    size_t params = 0, inactive = 0;
    for (const TensorSpec& t : m.ref.layout.tensors)
        if (t.kind != TENSOR_BUFFER) params += t.numel;
    int moe_layers = 0, moe_blocks = 0;  // MoE layers of the main model; MoE blocks, the MTP module's included
    for (int l = 0; l < c.total_layers(); l++) {
        moe_layers += c.is_moe_layer(l) && l < c.num_hidden_layers;
        moe_blocks += c.is_moe_layer(l);
    }
    if (moe_blocks)
        inactive = (size_t)moe_blocks * (c.n_routed_experts - c.num_experts_per_tok) * 3 * (size_t)c.moe_intermediate_size *
                   c.hidden_size;
    const long long tokens_per_step = (long long)dist.world * o.batch_size * o.seq_len * o.grad_accum;
    std::string arch = a.resume ? "checkpoint " + ckpt : a.config_path.empty() ? "preset " + a.preset : "config " + a.config_path;
    printf("model: %s | %d layers, d_model %d, %d heads, kv_lora_rank %d", arch.c_str(), c.num_hidden_layers,
           c.hidden_size, c.num_attention_heads, c.kv_lora_rank);
    if (moe_layers)
        printf(", %d experts top-%d (+%d shared) in %d MoE layers", c.n_routed_experts, c.num_experts_per_tok,
               c.n_shared_experts, moe_layers);
    printf(", vocab %d%s | %s params, %s active per token\n", c.vocab_size,
           c.num_nextn_predict_layers ? strfmt(" | MTP module (lambda %g)", o.mtp_lambda).c_str() : "",
           fmt_count((double)params).c_str(), fmt_count((double)(params - inactive)).c_str());
    printf("data: train %s (%s tokens)", train_pattern.c_str(), fmt_count((double)loader.total).c_str());
    if (val_tokens.empty()) printf(" | no validation data\n");
    else if (val_tokens.size() < val_total)
        printf(" | val %s (%s tokens; the first %zu evaluated, --val-tokens)\n", val_pattern.c_str(), fmt_count((double)val_total).c_str(),
               val_tokens.size());
    else printf(" | val %s (%s tokens, all evaluated)\n", val_pattern.c_str(), fmt_count((double)val_total).c_str());
    // a val loss over part of the split says so wherever it is printed
    const std::string val_name = val_tokens.size() < val_total ? strfmt("val loss (first %zu tokens)", val_tokens.size()) : "val loss";
    printf("training: %d steps of %s%d x %d x %d = %lld tokens%s | lr %g, warmup %d, cosine to %g | device %s\n", a.steps,
           dist.world > 1 ? strfmt("%d x ", dist.world).c_str() : "", o.batch_size, o.seq_len, o.grad_accum, tokens_per_step,
           o.shuffle ? " (windows at random offsets)" : "", o.optim.lr,
           o.optim.warmup_steps,
           o.optim.lr * o.optim.min_lr_fraction,
           device_desc.c_str());
    if (o.fp8)  // a projection with a side not a multiple of 16 stays in bf16 (for_each_fp8_linear)
        printf("fp8: %zu projections run their forward and input-gradient GEMMs in E4M3, their weight gradients in %s%s\n",
               m.ref.fp8.size(), o.fp8_wgrad ? "E4M3 too" : "bf16", m.ref.fp8.empty() ? "" : "; the SwiGLU inputs are kept in E4M3");
    if (a.resume) printf("resuming from %s at step %d\n", ckpt.c_str(), st.step);
    if (!use_gpu && a.device == "auto")
        printf("note: no GPU found, so this is the slow CPU reference path (the default run takes about 3.5 minutes on 2 "
               "cores; each step line's eta is this run's estimate)\n");
    fflush(stdout);

    // the run's files (rank 0's)
    std::vector<LossPoint> history;
    FILE* metrics = nullptr;
    on_root(dist, [&] {
        if (a.resume) history = metrics_truncate(metrics_path, st.step);
        else write_file_atomic(metrics_path, std::string(METRICS_HEADER) + "\n");
        metrics = fopen(metrics_path.c_str(), "ab");
        if (!metrics) fail("%s: cannot open for appending (%s)", metrics_path.c_str(), strerror(errno));
    });
    struct Closer {
        FILE* f;
        ~Closer() {
            if (f) fclose(f);
        }
    } closer{metrics};

    const std::string title = "dsv3 training loss — " + a.out_dir;
    std::vector<int> prompt(val_tokens.empty() ? loader.tokens.begin() : val_tokens.begin(),
                            (val_tokens.empty() ? loader.tokens.begin() : val_tokens.begin()) +
                                std::min<size_t>(8, val_tokens.empty() ? loader.tokens.size() : val_tokens.size()));
    double last_val = NAN;

    // every rank gathers its shard of the optimizer state (model_sync_host); rank 0 writes
    auto save = [&](int step) {
        double t0 = now_seconds();
        st.step = step;
        st.data_position = dataloader_position(loader);
        st.run_options = run_options(a);
        model_sync_host(m);
        on_root(dist, [&] { model_save(m, ckpt, &st, a.save_dtype == "fp32" ? "F32" : a.save_dtype == "bf16" ? "BF16" : "F8_E4M3"); });
        dist_heartbeat();
        last_saved = step;
        printf("checkpoint: step %d saved to %s (%.2fs)\n", step, ckpt.c_str(), now_seconds() - t0);
        fflush(stdout);
    };

    install_stop_handlers();
    const int width = std::max(4, (int)strlen(strfmt("%d", a.steps).c_str()) + 1);
    const double t_begin = now_seconds();
    double ema_step = 0;
    const int first = st.step;
    int skipped_in_a_row = 0;
    for (int step = first; step < a.steps; step++) {
        double t0 = now_seconds();
        StepStats s = model_train_step(m, loader, o, step);
        double dt = now_seconds() - t0;
        dist_heartbeat();
        // the ranks stop together: a signal that reached one of them stops all at this step
        bool stop = dist_any(dist, g_stop_signal != 0);
        const int done = step + 1;
        // a NaN or inf gradient skipped the update (model_train_step); a few in a row stop the run
        skipped_in_a_row = std::isfinite(s.grad_norm) ? 0 : skipped_in_a_row + 1;
        const std::string what = !std::isfinite(s.loss) ? strfmt("loss is %s", std::isnan(s.loss) ? "NaN" : "inf")
                                                         : strfmt("gradient norm is %s", std::isnan(s.grad_norm) ? "NaN" : "inf");
        st.step = done;
        st.data_position = dataloader_position(loader);
        ema_step = step == first ? dt : 0.9 * ema_step + 0.1 * dt;
        printf("step %*d/%d | loss %.4f%s | lr %.2e | norm %.4f | %.0f tok/s | eta %s%s\n", width, done, a.steps, s.loss,
               c.num_nextn_predict_layers ? strfmt(" | mtp %.4f", s.mtp_loss).c_str() : "", s.lr, s.grad_norm, tokens_per_step / dt,
               fmt_duration(ema_step * (a.steps - done)).c_str(), skipped_in_a_row ? (" | " + what + ": update skipped").c_str() : "");
        if (skipped_in_a_row == MAX_SKIPPED_STEPS) {
            const std::string good = last_saved >= 0 ? strfmt("the last good checkpoint is %s (step %d)", ckpt.c_str(), last_saved)
                                                     : "no checkpoint was saved by this run";
            fail("%s at step %d: %d updates skipped in a row; %s", what.c_str(), done, MAX_SKIPPED_STEPS, good.c_str());
        }

        const bool last = done == a.steps;
        double val = NAN;
        if (!val_tokens.empty() && !stop && (last || (a.val_every > 0 && done % a.val_every == 0))) {
            val = model_eval_loss(m, val_tokens, o.seq_len, o.batch_size);  // on every rank: the same number
            dist_heartbeat();
            last_val = val;
            if (val < st.best_val_loss) st.best_val_loss = val;
            printf("%s %.4f (best %.4f)\n", val_name.c_str(), val, st.best_val_loss);
            // expert utilisation since the last report: the fraction of tokens routed to each expert
            if (moe_blocks) {
                printf("expert load (fraction of tokens per expert; balanced = %.3f):\n",
                       (double)c.num_experts_per_tok / c.n_routed_experts);
                for (int l = 0; l < c.total_layers(); l++) {
                    if (!c.is_moe_layer(l)) continue;
                    std::vector<int64_t>& load = m.expert_load[l];
                    int64_t sum = 0, lo = INT64_MAX, hi = 0;
                    for (int64_t x : load) sum += x, lo = std::min(lo, x), hi = std::max(hi, x);
                    double tokens = (double)sum / c.num_experts_per_tok;
                    std::string line = l < c.num_hidden_layers ? strfmt("  layer %2d:", l) : strfmt("  mtp %2d:  ", l);
                    for (int64_t x : load) line += strfmt(" %.3f", tokens > 0 ? x / tokens : 0.0);
                    if (lo > 0) line += strfmt(" | max/min %.2f", (double)hi / lo);
                    else line += " | max/min inf";
                    printf("%s\n", line.c_str());
                    std::fill(load.begin(), load.end(), 0);
                }
            }
        }
        stop = dist_any(dist, stop || g_stop_signal != 0);  // a signal during the evaluation
        on_root(dist, [&] {
            fprintf(metrics, "%d,%.9g,%s,%.6g,%.6g,%.1f\n", done, s.loss, std::isfinite(val) ? strfmt("%.9g", val).c_str() : "",
                    s.lr, s.grad_norm, tokens_per_step / dt);
            fflush(metrics);
            history.push_back({done, s.loss, val});
            if (std::isfinite(val) || last || stop) write_loss_svg(svg_path, history, title);
        });

        // on every rank, like the evaluation: a prompt longer than the batch syncs the weights, a collective
        if (a.sample_every > 0 && !stop && (last || done % a.sample_every == 0) && !prompt.empty()) {
            std::vector<int> text = prompt, out = sample(m, prompt, a.sample_tokens, o.seed);
            text.insert(text.end(), out.begin(), out.end());
            printf("sample at step %d (%zu prompt tokens, then temperature 0.8, top-k 40):\n  | %s\n", done, prompt.size(),
                   printable(decode(m.tokenizer, text), "  | ").c_str());
        }
        fflush(stdout);

        // a signal that came during the evaluation or the sample stops the run here too
        stop = dist_any(dist, stop || g_stop_signal != 0);
        if (last || stop || (a.save_every > 0 && done % a.save_every == 0)) save(done);
        if (stop) {
            printf("interrupted: saved checkpoint at step %d to %s\n", done, ckpt.c_str());
            fflush(stdout);
            model_free_gpu(m);
            return 130;
        }
    }

    printf("done: %d steps in %s", a.steps - first, fmt_duration(now_seconds() - t_begin).c_str());
    if (!val_tokens.empty()) printf(" | final %s %.4f, best %.4f", val_name.c_str(), last_val, st.best_val_loss);
    printf(" | checkpoint %s | metrics %s | curve %s\n", ckpt.c_str(), metrics_path.c_str(), svg_path.c_str());
    model_free_gpu(m);
    return 0;
}

int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    return cli_main(run, argc, argv);
}
