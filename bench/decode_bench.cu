// decode_bench.cu — times GPU generation (decode.h) on a checkpoint: prefill
// tokens/s, time to first token, and decode tokens/s for a batch of random
// prompts, greedy, every sequence generating exactly --new-tokens tokens (no
// end-of-text stop). Each run copies the sampled tokens back after every step, as
// ./generate does to stream them. One warm-up run (module loading, cuBLASLt
// heuristics, graph capture) is not counted; the medians over --runs are printed
// as one JSON line. bench/generate_bench.sh runs it beside bench/hf_generate.py.
// With --speculative (a checkpoint with the MTP module) the steps are self-speculative
// ones, which take one or two tokens per sequence, and the drafts' acceptance is
// printed too; otherwise the bytes a step must read (decode_step_bytes) and the bandwidth that achieves.
//
//   bench/decode_bench --model DIR --batch 1 --prompt-len 128 --new-tokens 128 --runs 5
#include <algorithm>
#include <cstdio>

#include "cli.h"
#include "decode.h"

static const char* USAGE =
    "usage: bench/decode_bench --model DIR [--batch B] [--prompt-len P] [--new-tokens N] [--runs R] [--no-graph]\n"
    "                          [--speculative]\n"
    "\n"
    "Times prefill, time to first token and decode on the GPU for B random prompts of P\n"
    "tokens, N new tokens each (greedy); prints the medians over R runs as JSON.\n"
    "  defaults: --batch 1 --prompt-len 128 --new-tokens 128 --runs 5; --no-graph steps\n"
    "  without the CUDA graph; --speculative drafts with the checkpoint's MTP module\n";

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

static int run(int argc, char** argv) {
    std::string model_dir;
    int batch = 1, prompt_len = 128, new_tokens = 128, runs = 5;
    bool graph = true, speculative = false;
    CliParser cli{argc, argv};
    while (cli_next(cli)) {
        if (cli.name == "--help") {
            cli_flag(cli);
            printf("%s", USAGE);
            return 0;
        } else if (cli.name == "--model") model_dir = cli_value(cli);
        else if (cli.name == "--batch") batch = (int)cli_int(cli, 1, 4096);
        else if (cli.name == "--prompt-len") prompt_len = (int)cli_int(cli, 1, 1 << 20);
        else if (cli.name == "--new-tokens") new_tokens = (int)cli_int(cli, 1, 1 << 20);
        else if (cli.name == "--runs") runs = (int)cli_int(cli, 1, 1000);
        else if (cli.name == "--no-graph") {
            cli_flag(cli);
            graph = false;
        } else if (cli.name == "--speculative") {
            speculative = cli_flag(cli);
        } else cli_unknown(cli);
    }
    if (model_dir.empty()) fail("--model DIR is required (see --help)");
    if (!gpu_available()) fail("no CUDA device is available");
    Model m;
    model_load(m, model_resolve_dir(model_dir, false), nullptr);
    const Config& c = m.ref.cfg;
    if (prompt_len + new_tokens > c.max_position_embeddings)
        fail("--prompt-len %d + --new-tokens %d exceed the context (%d)", prompt_len, new_tokens, c.max_position_embeddings);
    GpuDecoder* d = decoder_create(m, batch, prompt_len + new_tokens, prompt_len, speculative);
    SamplingOptions greedy;
    greedy.temperature = 0;
    std::vector<double> prefill_s, ttft_s, decode_s;
    long long drafted = 0, accepted = 0;  // over the timed runs
    for (int r = 0; r <= runs; r++) {
        std::vector<std::vector<int>> prompts(batch, std::vector<int>(prompt_len));
        for (int b = 0; b < batch; b++)
            for (int t = 0; t < prompt_len; t++) prompts[b][t] = (int)(rng_hash(1000 + r, (uint64_t)b * prompt_len + t) % c.vocab_size);
        CUDA_CHECK(cudaDeviceSynchronize());
        const double t0 = now_seconds();
        decoder_prefill(*d, prompts);  // ends with a stream synchronisation
        const double t1 = now_seconds();
        decoder_sample(*d, greedy, 0);
        decoder_tokens(*d);
        const double t2 = now_seconds();
        std::vector<int> have(batch, 1);  // tokens each sequence has; the first came from the prefill
        for (bool more = new_tokens > 1; more;) {
            decoder_step(*d, greedy, 0, graph);
            const int* count = nullptr;
            if (speculative) decoder_speculative_tokens(*d, &count);
            else decoder_tokens(*d);
            more = false;
            for (int b = 0; b < batch; b++) {
                if (have[b] >= new_tokens) continue;
                const int took = count ? count[b] : 1;
                if (r > 0 && count) {  // the timed runs' drafts
                    drafted++;
                    accepted += took == 2;
                }
                have[b] += took;
                if (have[b] >= new_tokens) decoder_set_active(*d, b, false);
                else more = true;
            }
        }
        const double t3 = now_seconds();
        if (r == 0) continue;  // warm-up
        prefill_s.push_back(t1 - t0);
        ttft_s.push_back(t2 - t0);
        decode_s.push_back(t3 - t2);
    }
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    const double decode_tok_s = new_tokens > 1 ? (double)batch * (new_tokens - 1) / median(decode_s) : 0;
    // a plain step's bytes at the run's mean cache length over its time: the bandwidth decode achieves
    // (decode_step_bytes; a speculative step runs two rows a sequence and the MTP block, so it reports acceptance instead)
    const double step_s = median(decode_s) / std::max(1, new_tokens - 1);
    const double step_bytes = decode_step_bytes(c, m.ref.layout, batch, prompt_len + new_tokens / 2.0);
    const std::string spec = speculative ? strfmt(", \"speculative\": true, \"drafts_accepted\": %.4f", drafted ? (double)accepted / drafted : 0.0)
                                         : strfmt(", \"step_bytes\": %.0f, \"achieved_gb_s\": %.1f", step_bytes, step_bytes / step_s / 1e9);
    printf("{\"card\": \"%s\", \"batch\": %d, \"prompt_len\": %d, \"new_tokens\": %d, \"graph\": %s, \"runs\": %d, "
           "\"prefill_tok_s\": %.1f, \"ttft_s\": %.6f, \"decode_tok_s\": %.1f, \"decode_token_ms\": %.4f, "
           "\"kv_bytes_per_token\": %zu, \"kv_bytes_per_token_formula\": %zu, \"mha_bytes_per_token\": %zu%s}\n",
           prop.name, batch, prompt_len, new_tokens, graph ? "true" : "false", runs, (double)batch * prompt_len / median(prefill_s),
           median(ttft_s), decode_tok_s, 1e3 * step_s, decoder_cache_bytes_per_token(*d),
           kv_latent_bytes_per_token(c), kv_mha_bytes_per_token(c), spec.c_str());
    decoder_free(d);
    return 0;
}

int main(int argc, char** argv) {
    return cli_main(run, argc, argv);
}
