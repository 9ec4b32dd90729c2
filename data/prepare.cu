// prepare.cu — the data/prepare tool: trains a byte-level BPE tokenizer on a text file (or on the generated
// default corpus) and writes DIR/tokenizer.bin, DIR/train.bin and DIR/val.bin in llm.c's token format.
#include <cstdint>
#include <cstdio>
#include <string>

#include "cli.h"
#include "common.h"
#include "corpus.h"
#include "dataloader.h"
#include "fileutil.h"
#include "tokenizer.h"

static const char* USAGE =
    "usage: data/prepare --input FILE --out DIR [--vocab N] [--val-fraction F]\n"
    "       data/prepare --default --out DIR [--vocab N] [--val-fraction F]\n"
    "\n"
    "Trains a byte-level BPE tokenizer on the first (1 - F) of the text's bytes and\n"
    "writes DIR/tokenizer.bin, DIR/train.bin (that part) and DIR/val.bin (the rest).\n"
    "\n"
    "  --input FILE        raw text (any bytes)\n"
    "  --default           use the built-in generated corpus (about 1 MB)\n"
    "  --out DIR           output directory, created if missing\n"
    "  --vocab N           vocabulary size: 256 = plain bytes (default), or >= 258\n"
    "  --val-fraction F    share of the text, from the end, kept for validation (default 0.1)\n"
    "  --help              show this help\n";

static int run(int argc, char** argv) {
    std::string input, out_dir;
    bool use_default = false;
    int vocab = 256;
    double val_fraction = 0.1;
    CliParser cli{argc, argv};
    while (cli_next(cli)) {
        if (cli.name == "--help") {
            printf("%s", USAGE);
            return 0;
        } else if (cli.name == "--input") {
            input = cli_value(cli);
        } else if (cli.name == "--out") {
            out_dir = cli_value(cli);
        } else if (cli.name == "--vocab") {
            vocab = (int)cli_int(cli, 256, INT32_MAX);
        } else if (cli.name == "--val-fraction") {
            val_fraction = cli_float(cli, 0, 1);
        } else if (cli.name == "--default") {
            use_default = cli_flag(cli);
        } else {
            cli_unknown(cli);
        }
    }
    if (!cli.positional.empty()) fail("unexpected argument '%s' (see --help)", cli.positional[0].c_str());
    if (use_default == !input.empty()) fail("give exactly one of --input FILE and --default (see --help)");
    if (out_dir.empty()) fail("--out DIR is required (see --help)");
    if (vocab != 256 && vocab < 258) fail("--vocab %d: must be 256 (bytes) or at least 258", vocab);
    if (!(val_fraction > 0 && val_fraction < 1)) fail("--val-fraction %g: must be between 0 and 1", val_fraction);

    std::string text;
    if (use_default) {
        text = default_corpus(1 << 20);
        printf("default corpus: %zu bytes\n", text.size());
    } else {
        text = read_file(input);
        printf("%s: %zu bytes\n", input.c_str(), text.size());
    }
    prepare_dataset(text, out_dir, vocab, val_fraction);
    return 0;
}

int main(int argc, char** argv) {
    return cli_main(run, argc, argv);
}
