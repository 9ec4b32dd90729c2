// make_seeds.cpp — the fuzzers' seed corpus, written by the project's own writers: valid inputs of every kind
// each parser reads (configs of every preset, with YaRN and FP8; safetensors in F32, BF16 and F8_E4M3 with
// metadata; token files of both versions; a trained tokenizer), so that mutation starts from the real formats.
//
//   test/fuzz/make_seeds DIR      writes DIR/{json,config,safetensors,tokens,tokenizer}/...
#include <string>

#include "config.h"
#include "dataloader.h"
#include "fileutil.h"
#include "safetensors.h"
#include "tokenizer.h"

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: test/fuzz/make_seeds DIR\n");
        return 1;
    }
    const std::string dir = argv[1];
    try {
        for (const char* parser : {"json", "config", "safetensors", "tokens", "tokenizer"}) make_dirs(dir + "/" + parser);
        Config yarn = config_preset("tiny"), fp8 = config_preset("small");
        yarn.yarn = true, yarn.yarn_factor = 4, yarn.yarn_original_max_position_embeddings = 16;
        fp8.fp8_weights = true;
        const std::pair<const char*, Config> configs[] = {{"tiny", config_preset("tiny")}, {"mini", config_preset("mini")},
                                                          {"medium", config_preset("medium")}, {"yarn", yarn}, {"fp8", fp8}};
        for (const auto& [name, c] : configs) {
            write_file_atomic(dir + "/config/" + name + ".json", config_to_json(c));
            write_file_atomic(dir + "/json/" + name + ".json", config_to_json(c));
        }
        write_file_atomic(dir + "/json/values.json", "{\"a\": [1, -2.5e-3, true, false, null, \"\\u00e9\\n\"], \"b\": {\"c\": []}}");

        std::vector<SafeTensor> tensors = {{"w.f32", "F32", {2, 3}, {1, -2, 3.5f, 0, 1e-30f, -7}},
                                           {"w.bf16", "BF16", {4}, {0.5f, -1, 2, 3}},
                                           {"w.f8", "F8_E4M3", {2, 2}, {1, -448, 0.5f, 0}},
                                           {"w.f8_scale_inv", "F32", {1, 1}, {0.25f}}};
        safetensors_write(dir + "/safetensors/mixed.safetensors", tensors, {{"format", "pt"}});
        safetensors_write(dir + "/safetensors/empty.safetensors", {});

        std::vector<int> ids;
        for (int i = 0; i < 300; i++) ids.push_back((i * 37) % 1000);
        write_token_file(dir + "/tokens/v1.bin", ids, 1);
        write_token_file(dir + "/tokens/v7.bin", ids, 7);

        std::string text;
        for (int i = 0; i < 200; i++) text += strfmt("the quick brown fox %d jumps over the lazy dog. ", i);
        tokenizer_save(tokenizer_train(text, 300), dir + "/tokenizer/trained.bin");
        tokenizer_save(tokenizer_bytes(), dir + "/tokenizer/bytes.bin");
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
