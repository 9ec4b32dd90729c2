// generate.cu — samples text (or raw token ids) from a checkpoint: one prompt, streamed token by token, or a
// batch of prompts from a file, one per line.
//
//   ./generate --model runs/default --prompt "Once upon a time"
//   echo "Once upon a time" | ./generate --temperature 0
//   ./generate --model DIR --tokens "72 101 108" --max-new-tokens 20
//   ./generate --model DIR --prompts-file prompts.txt --max-new-tokens 100
//   ./generate --model DIR --prompts-file prompts.txt --jsonl   # one JSON object per prompt
//
// On the GPU (the default when one is present) the prompts are prefilled with the training forward kernels
// and decoded one token per sequence per step with the absorbed MLA form over the latent KV cache, sampled on
// the GPU (decode.cuh); the step replays as a CUDA graph. On the CPU the reference decodes with the same
// latent cache (decode.h) and model.cu's sample_token. With a checkpoint that has the MTP module both decode
// self-speculatively (decode.h speculative_step: the module drafts a token, the main model verifies it, on the
// GPU both positions in one pass), with the same output distribution and, greedy, the same tokens. Either way
// sequence i of a batch draws its coins from the counter RNG keyed by seed + i, so a fixed seed repeats
// (speculative sampling draws other coins than plain).
#include <algorithm>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "cli.h"
#include "common.h"
#include "decode.h"
#include "fileutil.h"
#include "json.h"
#include "model.h"

static const char* USAGE =
    "usage: ./generate [--model DIR] [--prompt TEXT | --tokens \"IDS\" | --prompts-file FILE] [options]\n"
    "\n"
    "Continues a prompt with a trained model, printing each token as it is sampled.\n"
    "Without --prompt, --tokens or --prompts-file the prompt is read from stdin (all of\n"
    "it, as is).\n"
    "\n"
    "  --model DIR            checkpoint directory (config.json + model.safetensors), or a\n"
    "                         training run directory holding checkpoint/ (default runs/default)\n"
    "  --prompt TEXT          the prompt, encoded with the checkpoint's tokenizer (bytes if none)\n"
    "  --tokens \"IDS\"         raw token ids in (space- or comma-separated), raw ids out;\n"
    "                         drives a checkpoint without a tokenizer\n"
    "  --prompts-file FILE    a batch: one prompt per line, generated together; each output\n"
    "                         is printed at the end as \"[i] prompt+continuation\" (i from 0)\n"
    "  --jsonl                print no stream but, at the end, one JSON object per prompt\n"
    "                         per line: index, prompt, completion (strings; id arrays with\n"
    "                         --tokens; invalid UTF-8 as U+FFFD), prompt_tokens,\n"
    "                         completion_tokens, stop (max_new_tokens | end_of_text |\n"
    "                         context_full), elapsed_s and time_to_first_token_s (the\n"
    "                         whole batch's)\n"
    "  --max-new-tokens N     tokens to generate per prompt at most (default 200)\n"
    "  --temperature F        softmax temperature; 0 = greedy (default 0.8)\n"
    "  --top-k N              keep the N most likely tokens; 0 = off (default 0)\n"
    "  --top-p F              keep the smallest set of tokens with this much mass; 1 = off\n"
    "                         (default 0.95)\n"
    "  --seed N               sampling seed; the same seed gives the same output; prompt i\n"
    "                         of a batch uses seed + i (default 1337)\n"
    "  --quiet                no statistics line (and no CPU note) on stderr\n"
    "  --device auto|cpu|gpu  where to run (default auto: the GPU when one is present)\n"
    "  --speculative          self-speculative decoding with the checkpoint's MTP module: it\n"
    "                         drafts the next token, the main model verifies it; the output\n"
    "                         follows the main model's distribution exactly (greedy: the same\n"
    "                         tokens). On by default when the checkpoint has the module\n"
    "  --no-speculative       plain decoding, one main-model step per token\n"
    "  --help                 show this help\n"
    "\n"
    "The prompt is printed first, then the continuation. A sequence stops after\n"
    "--max-new-tokens, at the tokenizer's end-of-text token, or when the context\n"
    "(max_position_embeddings) is full. An empty prompt starts from token 10 ('\\n').\n"
    "Statistics (tokens, tokens/s, time to first token, the drafts' acceptance rate) go\n"
    "to stderr.\n";

// "1 2, 3" -> {1, 2, 3}; every id must be in 0..vocab_size-1
static std::vector<int> parse_token_ids(const std::string& text, int vocab_size) {
    const char* separators = " ,\t\n\r";
    std::vector<int> ids;
    for (size_t i = text.find_first_not_of(separators); i != std::string::npos; i = text.find_first_not_of(separators, i)) {
        const size_t j = std::min(text.find_first_of(separators, i), text.size());
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

// the bytes of one token; an id the tokenizer does not know is U+FFFD
static std::string token_text(const Model& m, int id) {
    return id < m.tokenizer.vocab_size ? tokenizer_token_bytes(m.tokenizer, id) : "\xEF\xBF\xBD";
}

// writes one token: its bytes in text mode, its id in token mode
static void emit(const Model& m, bool token_mode, bool& first, int id) {
    if (token_mode) {
        printf(first ? "%d" : " %d", id);
    } else {
        std::string b = token_text(m, id);
        fwrite(b.data(), 1, b.size(), stdout);
    }
    first = false;
}

// s as valid UTF-8, for JSON readers: a byte-level model can stop inside a character. Each broken sequence (the longest
// start of a valid one, or a stray byte) becomes one U+FFFD, as Unicode recommends and Python's errors="replace" does.
static std::string valid_utf8(const std::string& s) {
    std::string out;
    for (size_t i = 0; i < s.size();) {
        unsigned char c = (unsigned char)s[i];
        int len = c < 0x80 ? 1 : c >= 0xc2 && c < 0xe0 ? 2 : c >= 0xe0 && c < 0xf0 ? 3 : c >= 0xf0 && c < 0xf5 ? 4 : 0;
        // the second byte's range rules out overlong forms, surrogates and code points past U+10FFFF
        unsigned lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80, hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
        int k = 1;
        for (; k < len && i + k < s.size(); k++) {
            unsigned b = (unsigned char)s[i + k];
            if (k == 1 ? b < lo || b > hi : (b & 0xc0) != 0x80) break;
        }
        out += k == len ? s.substr(i, len) : "\xEF\xBF\xBD";
        i += k;
    }
    return out;
}

static std::string json_ids(const std::vector<int>& ids) {
    std::string s;
    for (int id : ids) s += strfmt(s.empty() ? "%d" : ", %d", id);
    return "[" + s + "]";
}

// One sequence of the batch as the host tracks it
struct Sequence {
    std::string text;          // the prompt as given (text mode)
    std::vector<int> ids;      // prompt + generated
    std::vector<int> out;      // the generated tokens (end-of-text included)
    bool printed_prompt = true;  // false when the prompt is the start token alone
    bool done = false, context_full = false, end_of_text = false;
};

static std::vector<std::string> read_lines(const std::string& path) {
    std::istringstream text(read_file(path));
    std::vector<std::string> lines;
    for (std::string line; std::getline(text, line);) {
        if (!line.empty() && line.back() == '\r') line.pop_back();
        lines.push_back(line);
    }
    if (lines.empty()) fail("%s: no prompts (the file is empty)", path.c_str());
    return lines;
}

static int run(int argc, char** argv) {
    std::string model_dir = "runs/default", prompt, tokens_arg, prompts_file, device = "auto";
    bool has_model = false, has_prompt = false, has_tokens = false, quiet = false, jsonl = false;
    int speculative = -1;  // -1: on when the checkpoint has the MTP module
    long long max_new = 200;
    unsigned long long seed = 1337;
    SamplingOptions sampling{0.8f, 0, 0.95f};  // temperature, top_k, top_p

    CliParser cli{argc, argv};
    while (cli_next(cli)) {
        if (cli.name == "--help") {
            return cli_help(cli, USAGE);
        } else if (cli.name == "--model") {
            model_dir = cli_value(cli);
            has_model = true;
        } else if (cli.name == "--prompt") {
            prompt = cli_value(cli);
            has_prompt = true;
        } else if (cli.name == "--tokens") {
            tokens_arg = cli_value(cli);
            has_tokens = true;
        } else if (cli.name == "--prompts-file") {
            prompts_file = cli_value(cli);
        } else if (cli.name == "--jsonl") {
            jsonl = cli_flag(cli);
        } else if (cli.name == "--max-new-tokens") {
            max_new = cli_int(cli, 0, 1LL << 40);
        } else if (cli.name == "--temperature") {
            sampling.temperature = (float)cli_float(cli, 0, 1000);
        } else if (cli.name == "--top-k") {
            sampling.top_k = (int)cli_int(cli, 0, INT32_MAX);
        } else if (cli.name == "--top-p") {
            sampling.top_p = (float)cli_float(cli, 0, 1);
        } else if (cli.name == "--seed") {
            seed = (unsigned long long)cli_int(cli, 0, LLONG_MAX);
        } else if (cli.name == "--quiet") {
            quiet = cli_flag(cli);
        } else if (cli.name == "--device") {
            device = cli_device(cli);
        } else if (cli.name == "--speculative") {
            speculative = cli_flag(cli);
        } else if (cli.name == "--no-speculative") {
            speculative = !cli_flag(cli);
        } else {
            cli_unknown(cli);
        }
    }
    if (!cli.positional.empty()) fail("unexpected argument '%s' (see --help)", cli.positional[0].c_str());
    if (has_prompt + has_tokens + !prompts_file.empty() > 1) fail("give one of --prompt TEXT, --tokens \"IDS\" or --prompts-file FILE");
    const bool gpu = device == "gpu" || (device == "auto" && gpu_available());
    if (device == "gpu" && !gpu_available()) fail("--device gpu: no CUDA device is available");

    Model m;
    model_load(m, model_resolve_dir(model_dir, !has_model), nullptr);
    const int V = m.ref.cfg.vocab_size, context = m.ref.cfg.max_position_embeddings;
    const bool token_mode = has_tokens;
    const bool has_mtp = m.ref.cfg.num_nextn_predict_layers > 0;
    if (speculative == 1 && !has_mtp) fail("--speculative: the checkpoint has no MTP module (num_nextn_predict_layers is 0)");
    const bool spec = speculative != 0 && has_mtp;

    // the prompts, as token ids
    std::vector<Sequence> seqs;
    if (token_mode) {
        seqs.push_back({});
        seqs[0].ids = parse_token_ids(tokens_arg, V);
    } else {
        std::vector<std::string> texts;
        if (!prompts_file.empty()) texts = read_lines(prompts_file);
        else texts.push_back(has_prompt ? prompt : read_stdin());
        for (size_t i = 0; i < texts.size(); i++) {
            std::string where = prompts_file.empty() ? "prompt" : strfmt("%s: line %zu", prompts_file.c_str(), i + 1);
            Sequence s;
            s.text = texts[i];
            s.ids = tokenizer_encode(m.tokenizer, s.text);
            for (size_t j = 0; j < s.ids.size(); j++)
                if (s.ids[j] >= V)
                    fail("%s: token %d at position %zu is outside the model's vocabulary (%d); the checkpoint needs a "
                         "tokenizer.bin that matches it",
                         where.c_str(), s.ids[j], j, V);
            seqs.push_back(s);
        }
    }
    for (size_t i = 0; i < seqs.size(); i++) {
        Sequence& s = seqs[i];
        std::string where = prompts_file.empty() ? "prompt" : strfmt("%s: line %zu: prompt", prompts_file.c_str(), i + 1);
        if ((long long)s.ids.size() > context)
            fail("%s is %zu tokens but the model's context is %d", where.c_str(), s.ids.size(), context);
        if (s.ids.empty()) {
            if (V <= 10) fail("an empty prompt starts from token 10 ('\\n'), but the vocabulary has only %d tokens", V);
            s.ids.push_back(10);  // the start token is context only; it is not printed
            s.printed_prompt = false;
        }
    }
    if (!gpu && device == "auto" && !quiet)
        fprintf(stderr, "note: no GPU found, so this is the slow CPU reference path (200 tokens of the mini preset take "
                        "about a second on 2 idle cores; the line at the end gives this run's speed)\n");
    const int n = (int)seqs.size();
    const bool stream = n == 1 && !jsonl;
    bool first_stream = true;  // no space before the first id printed
    if (stream && seqs[0].printed_prompt) {
        if (token_mode)
            for (int id : seqs[0].ids) emit(m, true, first_stream, id);
        else
            fwrite(seqs[0].text.data(), 1, seqs[0].text.size(), stdout);
    }
    fflush(stdout);

    int max_prompt = 0, prompt_tokens = 0;
    for (const Sequence& s : seqs) {
        max_prompt = std::max(max_prompt, (int)s.ids.size());
        prompt_tokens += (int)s.ids.size();
    }
    const int max_len = (int)std::min<long long>(context, max_prompt + max_new);
    // the CPU decoders' latent caches, before they are allocated: a batch that cannot fit is refused by its size
    // (the GPU decoder's allocation names the device memory it lacks)
    const Config& c = m.ref.cfg;
    const double cache_bytes = (double)n * max_len * kv_latent_bytes_per_token(c, sizeof(float)), host_bytes = host_memory_bytes();
    if (!gpu && cache_bytes > host_bytes)
        fail("%d prompts of up to %d tokens need %.1f GiB of latent cache; this machine has %.1f GiB (fewer prompts or "
             "--max-new-tokens)", n, max_len, cache_bytes / (1 << 30), host_bytes / (1 << 30));
    const int eot = m.tokenizer.eot_id;
    long long generated = 0;
    double t0 = now_seconds(), first_token_s = 0;

    // the decoder: GPU (decode.cuh) or CPU (decode.h), one sequence per batch row
    GpuDecoder* dec = nullptr;
    std::vector<DecodeState<float>> cpu(gpu ? 0 : n);
    std::vector<Rng> rng(n);
    std::vector<std::vector<int>> fresh(n);  // the tokens each sequence took in the last step (two after an accepted draft)
    SpeculativeStats spec_stats;
    auto sample_cpu = [&](int b, const std::vector<float>& logits) { fresh[b] = {sample_token(logits.data(), V, sampling, rng[b].uniform())}; };
    if (max_new > 0) {
        if (gpu) {
            dec = decoder_create(m, n, max_len, max_prompt, spec);
            t0 = now_seconds();  // the model upload is not part of time to first token
            std::vector<std::vector<int>> prompts;
            for (const Sequence& s : seqs) prompts.push_back(s.ids);
            decoder_prefill(*dec, prompts);
            decoder_sample(*dec, sampling, seed);
            const int* tok = decoder_tokens(*dec);
            for (int b = 0; b < n; b++) fresh[b] = {tok[b]};
        } else {
            for (int b = 0; b < n; b++) {
                rng[b] = Rng{(uint64_t)seed + b, 0};
                decode_init(cpu[b], m.ref.cfg, max_len);
                if (spec) {
                    sample_cpu(b, speculative_prefill(m.ref, cpu[b], seqs[b].ids));
                    continue;
                }
                const std::vector<float>* logits = nullptr;
                for (int id : seqs[b].ids) logits = &decode_step(m.ref, cpu[b], id);
                sample_cpu(b, *logits);
            }
        }
        first_token_s = now_seconds() - t0;
    }
    // a sequence can take another token while it is shorter than the context
    for (Sequence& s : seqs) {
        s.done = max_new == 0 || (int)s.ids.size() >= context;
        s.context_full = max_new > 0 && s.done;
    }
    for (int active = n; active > 0;) {
        for (int b = 0; b < n; b++) {
            Sequence& s = seqs[b];
            for (int id : fresh[b]) {
                if (s.done) break;
                generated++;
                s.ids.push_back(id);
                s.out.push_back(id);
                if (stream && (id != eot || token_mode)) {  // text mode does not print "<|endoftext|>"
                    emit(m, token_mode, first_stream, id);
                    fflush(stdout);
                }
                if (id == eot) s.end_of_text = true;
                else if ((int)s.ids.size() >= context) s.context_full = true;
                s.done = s.end_of_text || s.context_full || (long long)s.out.size() >= max_new;
                if (s.done && dec) decoder_set_active(*dec, b, false);
            }
        }
        active = 0;
        for (const Sequence& s : seqs) active += !s.done;
        if (active == 0) break;
        if (dec) {
            decoder_step(*dec, sampling, seed, true);
            const int *tok = nullptr, *count = nullptr;
            if (spec) tok = decoder_speculative_tokens(*dec, &count);
            else tok = decoder_tokens(*dec);
            for (int b = 0; b < n; b++) {
                if (seqs[b].done) continue;
                if (!spec) {
                    fresh[b] = {tok[b]};
                    continue;
                }
                fresh[b].assign(tok + 2 * b, tok + 2 * b + count[b]);
                spec_stats.drafted++;
                spec_stats.accepted += count[b] == 2;
            }
        } else {
            for (int b = 0; b < n; b++) {
                if (seqs[b].done) continue;
                const int x = fresh[b].back();  // the last token taken, not yet in the cache
                if (!spec) {
                    sample_cpu(b, decode_step(m.ref, cpu[b], x));
                    continue;
                }
                fresh[b].clear();
                speculative_step(m.ref, cpu[b], x, sampling, rng[b], fresh[b], spec_stats);
            }
        }
    }
    double elapsed = now_seconds() - t0;
    if (dec) decoder_free(dec);
    model_free_gpu(m);
    if (stream) {
        putchar('\n');
    } else if (jsonl) {
        for (int b = 0; b < n; b++) {
            const Sequence& s = seqs[b];
            const size_t given = s.printed_prompt ? s.ids.size() - s.out.size() : 0;  // not the start token
            std::string prompt_json, completion_json, completion;
            if (token_mode) {
                prompt_json = json_ids(std::vector<int>(s.ids.begin(), s.ids.begin() + given));
                completion_json = json_ids(s.out);
            } else {
                for (int id : s.out)
                    if (id != eot) completion += token_text(m, id);
                prompt_json = json_quote(valid_utf8(s.text));
                completion_json = json_quote(valid_utf8(completion));
            }
            const char* stop = s.end_of_text ? "end_of_text" : s.context_full ? "context_full" : "max_new_tokens";
            printf("{\"index\": %d, \"prompt\": %s, \"completion\": %s, \"prompt_tokens\": %zu, \"completion_tokens\": %zu, "
                   "\"stop\": \"%s\", \"elapsed_s\": %.4f, \"time_to_first_token_s\": %.4f}\n",
                   b, prompt_json.c_str(), completion_json.c_str(), given, s.out.size(), stop, elapsed, first_token_s);
        }
    } else {
        for (int b = 0; b < n; b++) {
            const Sequence& s = seqs[b];
            printf("[%d] ", b);
            fwrite(s.text.data(), 1, s.text.size(), stdout);
            bool first = false;
            for (int id : s.out)
                if (id != eot) emit(m, false, first, id);
            putchar('\n');
        }
    }
    fflush(stdout);
    const int full = (int)std::count_if(seqs.begin(), seqs.end(), [](const Sequence& s) { return s.context_full; });
    const int ended = (int)std::count_if(seqs.begin(), seqs.end(), [](const Sequence& s) { return s.end_of_text; });
    if (full)
        fprintf(stderr, "stopped: the context is full (%d tokens, max_position_embeddings)%s\n", context,
                n > 1 ? strfmt(" for %d of %d sequences", full, n).c_str() : "");
    if (!quiet) {
        std::string why = ended == 0 ? "" : n == 1 ? " (stopped at end of text)" : strfmt(" (%d stopped at end of text)", ended);
        if (spec)
            why += strfmt(", speculative: %.1f%% of %lld drafts accepted", spec_stats.drafted ? 100.0 * spec_stats.accepted / spec_stats.drafted : 0.0,
                          spec_stats.drafted);
        fprintf(stderr,
                "generated %lld tokens%s in %.2f s on the %s: %.1f tokens/s, time to first token %.3f s (prefill of %d prompt "
                "tokens)%s\n",
                generated, n > 1 ? strfmt(" for %d prompts", n).c_str() : "", elapsed, gpu ? "gpu" : "cpu",
                elapsed > 0 ? generated / elapsed : 0.0, first_token_s, prompt_tokens, why.c_str());
    }
    return 0;
}

int main(int argc, char** argv) {
    return cli_main(run, argc, argv);
}
