// ref_dump.cu — a dev tool for the PyTorch comparisons (dev/hf_compare.py): trains
// a checkpoint for a few steps on a token file, on the CPU reference or on the GPU,
// through the same public API as ./train (model.h), and writes what it computed so
// the script can set it beside transformers' numbers.
//
//   dev/ref_dump --model DIR --tokens FILE.bin --batch-size B --seq-len T
//                --out OUT.safetensors [--steps N] [--device cpu|gpu] [optimizer flags]
//
// Batches are what ./train's DataLoader reads: batch s holds the tokens
// [s*B*T, (s+1)*B*T] of the file, row b the inputs [b*T, b*T+T) and as targets
// each input's next token, so N steps need N*B*T+1 tokens. OUT holds
//   "logits" [B, T, V]     of the first batch, before any step
//   "loss" [1], "grad.<HF name>"   the first step's loss and gradients
//   "losses", "grad_norms", "lrs" [N]   every step's loss (before its update),
//                          gradient norm (before clipping) and learning rate
// Unlike ./train, the balance loss, the expert-bias update and dropout default to
// off, which is what transformers' DeepseekV3ForCausalLM trains with.
#include <cstdio>

#include "cli.h"
#include "model.h"
#include "safetensors.h"

static const char* USAGE =
    "usage: dev/ref_dump --model DIR --tokens FILE.bin --batch-size B --seq-len T --out OUT.safetensors [options]\n"
    "\n"
    "Trains the checkpoint DIR for --steps steps on the token file (batch s = its tokens\n"
    "[s*B*T, (s+1)*B*T], as ./train reads them) and writes the first batch's logits, the\n"
    "first step's loss and gradients, and every step's loss, gradient norm and learning\n"
    "rate to OUT. Nothing is saved back to DIR.\n"
    "\n"
    "  --steps N               optimizer steps (default 1)\n"
    "  --device cpu|gpu        the CPU reference (fp32) or the CUDA path (bf16) (default cpu)\n"
    "  --lr X                  peak learning rate (default 1e-3)\n"
    "  --warmup N              linear warmup steps, then cosine to lr/10 at the last step (default 0)\n"
    "  --weight-decay X        AdamW weight decay of the matrices (default 0.1); betas 0.9/0.95, eps 1e-8\n"
    "  --grad-clip X           global gradient-norm clip, 0 = off (default 1)\n"
    "  --balance-alpha X       sequence-wise balance loss weight (default 0 = off)\n"
    "  --bias-update-speed X   aux-loss-free expert-bias step gamma (default 0 = off)\n"
    "  --help                  show this help\n";

static int run(int argc, char** argv) {
    std::string model_dir, tokens_path, out_path, device = "cpu";
    TrainOptions o;
    o.grad_accum = 1;
    o.dropout = 0;
    o.balance_alpha = 0;
    o.optim.bias_update_speed = 0;
    o.optim.warmup_steps = 0;
    o.batch_size = 0;
    o.seq_len = 0;
    int steps = 1;
    CliParser cli{argc, argv};
    while (cli_next(cli)) {
        if (cli.name == "--help") {
            cli_flag(cli);
            printf("%s", USAGE);
            return 0;
        } else if (cli.name == "--model") {
            model_dir = cli_value(cli);
        } else if (cli.name == "--tokens") {
            tokens_path = cli_value(cli);
        } else if (cli.name == "--out") {
            out_path = cli_value(cli);
        } else if (cli.name == "--batch-size") {
            o.batch_size = (int)cli_int(cli, 1, 1 << 20);
        } else if (cli.name == "--seq-len") {
            o.seq_len = (int)cli_int(cli, 1, 1 << 20);
        } else if (cli.name == "--steps") {
            steps = (int)cli_int(cli, 1, 1 << 20);
        } else if (cli.name == "--device") {
            device = cli_device(cli);
            if (device == "auto") fail("option --device: say cpu or gpu (the comparison must know which path it gets)");
        } else if (cli.name == "--lr") {
            o.optim.lr = (float)cli_float(cli, 0, 10);
        } else if (cli.name == "--warmup") {
            o.optim.warmup_steps = (int)cli_int(cli, 0, 1 << 20);
        } else if (cli.name == "--weight-decay") {
            o.optim.weight_decay = (float)cli_float(cli, 0, 10);
        } else if (cli.name == "--grad-clip") {
            o.optim.grad_clip = (float)cli_float(cli, 0, 1e9);
        } else if (cli.name == "--balance-alpha") {
            o.balance_alpha = (float)cli_float(cli, 0, 10);
        } else if (cli.name == "--bias-update-speed") {
            o.optim.bias_update_speed = (float)cli_float(cli, 0, 10);
        } else {
            cli_unknown(cli);
        }
    }
    if (!cli.positional.empty()) fail("unexpected argument '%s' (see --help)", cli.positional[0].c_str());
    if (model_dir.empty() || tokens_path.empty() || out_path.empty() || !o.batch_size || !o.seq_len)
        fail("--model, --tokens, --batch-size, --seq-len and --out are required (see --help)");
    o.optim.total_steps = steps;  // as ./train: the cosine ends at the last step

    Model m;
    model_load(m, model_dir, nullptr);
    // a fresh optimizer, as the PyTorch side starts with (model_load without a state keeps no moments)
    m.adam_m.assign(m.ref.layout.total, 0.0f);
    m.adam_v.assign(m.ref.layout.total, 0.0f);
    const Config& c = m.ref.cfg;
    const int B = o.batch_size, T = o.seq_len, V = c.vocab_size;
    if (T > c.max_position_embeddings) fail("--seq-len %d exceeds the model's context %d", T, c.max_position_embeddings);
    std::vector<int> tokens = read_token_file(tokens_path, V);
    const size_t need = (size_t)steps * B * T + 1;
    if (tokens.size() < need) fail("%s: %zu tokens, but %d steps of %d x %d need %zu", tokens_path.c_str(), tokens.size(), steps, B, T, need);
    DataLoader loader;
    dataloader_open(loader, tokens_path, B, T, V);
    if (device == "gpu") model_to_gpu(m, B, T);

    // the first batch's logits, row by row, before the first update
    std::vector<float> logits((size_t)B * T * V);
    for (int b = 0; b < B; b++) {
        std::vector<int> row(tokens.begin() + (size_t)b * T, tokens.begin() + (size_t)(b + 1) * T);
        const std::vector<float>& l = model_logits(m, row);
        std::copy(l.begin(), l.end(), logits.begin() + (size_t)b * T * V);
    }
    std::vector<float> losses, norms, lrs, first_grads;
    for (int step = 0; step < steps; step++) {
        StepStats s = model_train_step(m, loader, o, step);
        if (step == 0) {
            model_sync_host(m);  // the GPU's gradients into m.ref.grads
            first_grads = m.ref.grads;
        }
        losses.push_back(s.loss);
        norms.push_back((float)s.grad_norm);
        lrs.push_back(s.lr);
        printf("step %d: loss %.9g, grad norm %.6g, lr %.6g\n", step, s.loss, s.grad_norm, s.lr);
    }

    std::vector<SafeTensor> out;
    out.push_back({"logits", "F32", {B, T, V}, logits});
    out.push_back({"loss", "F32", {1}, {losses[0]}});
    out.push_back({"losses", "F32", {steps}, losses});
    out.push_back({"grad_norms", "F32", {steps}, norms});
    out.push_back({"lrs", "F32", {steps}, lrs});
    for (const TensorSpec& s : m.ref.layout.tensors) {
        if (s.kind == TENSOR_BUFFER) continue;
        out.push_back({"grad." + s.name, "F32", s.shape,
                       std::vector<float>(first_grads.begin() + s.offset, first_grads.begin() + s.offset + s.numel)});
    }
    safetensors_write(out_path, out);
    if (device == "gpu") model_free_gpu(m);
    return 0;
}

int main(int argc, char** argv) {
    return cli_main(run, argc, argv);
}
