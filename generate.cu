// generate.cu — samples text (or raw token ids) from a checkpoint, streaming each
// token as it is produced.
//
//   ./generate --model runs/default --prompt "Once upon a time"
//   echo "Once upon a time" | ./generate --temperature 0
//   ./generate --model DIR --tokens "72 101 108" --max-new-tokens 20
//
// Today the model runs on the CPU reference (reference.h), which has no KV cache:
// every new token re-runs the forward pass over the whole context. That is fine
// for the small models and contexts this path is for; the GPU path (issue 3) will
// decode from a latent MLA cache.
#include <cstdio>
#include <string>
#include <vector>

#include <unistd.h>

#include "cli.h"
#include "common.h"
#include "fileutil.h"
#include "model.h"

static const char* USAGE =
    "usage: ./generate [--model DIR] [--prompt TEXT | --tokens \"IDS\"] [options]\n"
    "\n"
    "Continues a prompt with a trained model, printing each token as it is sampled.\n"
    "Without --prompt or --tokens the prompt is read from stdin (all of it, as is).\n"
    "\n"
    "  --model DIR            checkpoint directory (config.json + model.safetensors), or a\n"
    "                         training run directory holding checkpoint/ (default runs/default)\n"
    "  --prompt TEXT          the prompt, encoded with the checkpoint's tokenizer (bytes if none)\n"
    "  --tokens \"IDS\"         raw token ids in (space- or comma-separated), raw ids out;\n"
    "                         drives a checkpoint without a tokenizer\n"
    "  --max-new-tokens N     tokens to generate at most (default 200)\n"
    "  --temperature F        softmax temperature; 0 = greedy (default 0.8)\n"
    "  --top-k N              keep the N most likely tokens; 0 = off (default 0)\n"
    "  --top-p F              keep the smallest set of tokens with this much mass; 1 = off\n"
    "                         (default 0.95)\n"
    "  --seed N               sampling seed; the same seed gives the same output (default 1337)\n"
    "  --quiet                no statistics line on stderr\n"
    "  --device auto|cpu|gpu  where to run (default auto = cpu until the CUDA path exists)\n"
    "  --help                 show this help\n"
    "\n"
    "The prompt is printed first, then the continuation. Generation stops after\n"
    "--max-new-tokens, at the tokenizer's end-of-text token, or when the context\n"
    "(max_position_embeddings) is full. An empty prompt starts from token 10 ('\\n').\n"
    "Statistics (tokens, tokens/s, time to first token) go to stderr.\n";

// "1 2, 3" -> {1, 2, 3}; every id must be in 0..vocab_size-1
static std::vector<int> parse_token_ids(const std::string& text, int vocab_size) {
    std::vector<int> ids;
    size_t i = 0;
    while (i < text.size()) {
        char ch = text[i];
        if (ch == ' ' || ch == ',' || ch == '\t' || ch == '\n' || ch == '\r') {
            i++;
            continue;
        }
        size_t j = i;
        while (j < text.size() && !strchr(" ,\t\n\r", text[j])) j++;
        std::string word = text.substr(i, j - i);
        char* end = nullptr;
        errno = 0;
        long long v = strtoll(word.c_str(), &end, 10);
        if (*end || errno || word[0] == '+') fail("--tokens: '%s' is not a token id", word.c_str());
        if (v < 0 || v >= vocab_size)
            fail("--tokens: id %lld is outside the model's vocabulary (0..%d)", v, vocab_size - 1);
        ids.push_back((int)v);
        i = j;
    }
    return ids;
}

static std::string read_stdin() {
    if (isatty(fileno(stdin))) fprintf(stderr, "reading the prompt from stdin (end it with Ctrl-D; or pass --prompt TEXT)\n");
    std::string s;
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), stdin)) > 0) s.append(buf, n);
    if (ferror(stdin)) fail("stdin: read error");
    return s;
}

// writes one token: its bytes in text mode, its id in token mode
static void emit(const Model& m, bool token_mode, bool& first, int id) {
    if (token_mode) {
        printf(first ? "%d" : " %d", id);
    } else if (id < m.tokenizer.vocab_size) {
        const std::string& b = tokenizer_token_bytes(m.tokenizer, id);
        fwrite(b.data(), 1, b.size(), stdout);
    } else {
        fputs("\xEF\xBF\xBD", stdout);  // an id the tokenizer does not know: U+FFFD
    }
    first = false;
}

static int run(int argc, char** argv) {
    std::string model_dir = "runs/default", prompt, tokens_arg, device = "auto";
    bool has_model = false, has_prompt = false, has_tokens = false, quiet = false;
    long long max_new = 200;
    unsigned long long seed = 1337;
    SamplingOptions so;
    so.temperature = 0.8f;
    so.top_k = 0;
    so.top_p = 0.95f;

    CliParser cli{argc, argv};
    while (cli_next(cli)) {
        if (cli.name == "--help") {
            cli_flag(cli);
            printf("%s", USAGE);
            return 0;
        } else if (cli.name == "--model") {
            model_dir = cli_value(cli);
            has_model = true;
        } else if (cli.name == "--prompt") {
            prompt = cli_value(cli);
            has_prompt = true;
        } else if (cli.name == "--tokens") {
            tokens_arg = cli_value(cli);
            has_tokens = true;
        } else if (cli.name == "--max-new-tokens") {
            max_new = cli_int(cli, 0, 1LL << 40);
        } else if (cli.name == "--temperature") {
            so.temperature = (float)cli_float(cli, 0, 1000);
        } else if (cli.name == "--top-k") {
            so.top_k = (int)cli_int(cli, 0, INT32_MAX);
        } else if (cli.name == "--top-p") {
            so.top_p = (float)cli_float(cli, 0, 1);
        } else if (cli.name == "--seed") {
            seed = (unsigned long long)cli_int(cli, 0, LLONG_MAX);
        } else if (cli.name == "--quiet") {
            cli_flag(cli);
            quiet = true;
        } else if (cli.name == "--device") {
            device = cli_device(cli);
        } else {
            cli_unknown(cli);
        }
    }
    if (!cli.positional.empty()) fail("unexpected argument '%s' (see --help)", cli.positional[0].c_str());
    if (has_prompt && has_tokens) fail("give --prompt TEXT or --tokens \"IDS\", not both");
    if (device == "gpu") fail("--device gpu: the CUDA path is not built yet; use --device cpu (or auto)");

    Model m;
    model_load(m, model_resolve_dir(model_dir, !has_model), nullptr);
    const int V = m.ref.cfg.vocab_size, context = m.ref.cfg.max_position_embeddings;
    const bool token_mode = has_tokens;

    std::vector<int> ids;
    if (token_mode) {
        ids = parse_token_ids(tokens_arg, V);
    } else {
        if (!has_prompt) prompt = read_stdin();
        ids = tokenizer_encode(m.tokenizer, prompt);
        for (size_t i = 0; i < ids.size(); i++)
            if (ids[i] >= V)
                fail("prompt: token %d at position %zu is outside the model's vocabulary (%d); the checkpoint needs a "
                     "tokenizer.bin that matches it",
                     ids[i], i, V);
    }
    if ((long long)ids.size() > context) fail("prompt is %zu tokens but the model's context is %d", ids.size(), context);
    bool first = true;
    if (ids.empty()) {
        if (V <= 10) fail("an empty prompt starts from token 10 ('\\n'), but the vocabulary has only %d tokens", V);
        ids.push_back(10);  // the start token is context only; it is not printed
    } else if (token_mode) {
        for (int id : ids) emit(m, true, first, id);
    } else {
        fwrite(prompt.data(), 1, prompt.size(), stdout);
    }
    fflush(stdout);

    Rng rng{(uint64_t)seed, 0};
    const int eot = m.tokenizer.eot_id;
    long long generated = 0;
    double t0 = now_seconds(), first_token_s = 0;
    bool context_full = false, end_of_text = false;
    while (generated < max_new) {
        if ((long long)ids.size() >= context) {
            context_full = true;
            break;
        }
        const std::vector<float>& logits = model_logits(m, ids);
        const float* last = logits.data() + (ids.size() - 1) * (size_t)V;
        int next = sample_token(last, V, so, rng.uniform());
        if (generated == 0) first_token_s = now_seconds() - t0;
        generated++;
        ids.push_back(next);
        if (next == eot) {
            if (token_mode) emit(m, true, first, next);  // text mode does not print "<|endoftext|>"
            end_of_text = true;
            break;
        }
        emit(m, token_mode, first, next);
        fflush(stdout);
    }
    double elapsed = now_seconds() - t0;
    putchar('\n');
    fflush(stdout);
    if (context_full) fprintf(stderr, "stopped: the context is full (%d tokens, max_position_embeddings)\n", context);
    if (!quiet)
        fprintf(stderr, "generated %lld tokens in %.2f s on the cpu: %.1f tokens/s, time to first token %.3f s%s\n", generated,
                elapsed, elapsed > 0 ? generated / elapsed : 0.0, first_token_s, end_of_text ? " (stopped at end of text)" : "");
    return 0;
}

int main(int argc, char** argv) {
    return cli_main(run, argc, argv);
}
