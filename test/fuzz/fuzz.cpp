// fuzz.cpp — libFuzzer harnesses for every parser of untrusted input: the JSON reader, config.json, the
// safetensors header and offsets, llm.c token files and tokenizer.bin. `make fuzz` builds it once per parser
// (-DFUZZ_JSON, FUZZ_CONFIG, FUZZ_SAFETENSORS, FUZZ_TOKENS, FUZZ_TOKENIZER) with clang's libFuzzer,
// AddressSanitizer and UBSan, and runs each from the seeds in test/fuzz/seeds/<parser>. A parser may refuse
// its input with the project's one-line error (std::runtime_error); anything else is a finding: a crash, a
// sanitizer report, another exception (std::bad_alloc: an input that exhausts memory), or memory past
// -rss_limit_mb.
#include <cstdint>
#include <cstdio>
#include <string>

#include <unistd.h>

#include "config.h"
#include "dataloader.h"
#include "json.h"
#include "safetensors.h"
#include "tokenizer.h"

// the parsers of files read a path: each input goes to one file per process, in memory where /dev/shm exists
static const std::string& scratch_path() {
    static const std::string path = strfmt("%s/dsv3_fuzz_%d", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", (int)getpid());
    return path;
}

static const std::string& scratch_file(const uint8_t* data, size_t size) {
    FILE* f = fopen(scratch_path().c_str(), "wb");
    if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0) abort();
    return scratch_path();
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    try {
#if defined(FUZZ_JSON)
        JsonValue v;
        std::string err;
        if (json_parse(std::string((const char*)data, size), v, err)) json_quote(v.str);
#elif defined(FUZZ_CONFIG)
        const Config c = config_from_json(std::string((const char*)data, size), "config.json");
        config_to_json(c);
#elif defined(FUZZ_SAFETENSORS)
        safetensors_read(scratch_file(data, size));
#elif defined(FUZZ_TOKENS)
        read_token_file(scratch_file(data, size), 1 << 16);
#elif defined(FUZZ_TOKENIZER)
        const Tokenizer t = tokenizer_load(scratch_file(data, size));
        const std::vector<int> ids = tokenizer_encode(t, "the quick brown fox, 1234 <|endoftext|> \xe2\x82\xac\xff");
        tokenizer_decode(t, ids.data(), ids.size());
#else
#error "define one of FUZZ_JSON, FUZZ_CONFIG, FUZZ_SAFETENSORS, FUZZ_TOKENS, FUZZ_TOKENIZER"
#endif
    } catch (const std::runtime_error&) {
    }
    return 0;
}
