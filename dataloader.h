// dataloader.h — llm.c token files (read, write, validate), the DataLoader that walks one or more of them in batches
// with exact resume, and dataset preparation (tokenizer + train.bin + val.bin from raw text). The default corpus is
// corpus.h.
//
// Token file: 256 int32 header, header[0] = magic, header[1] = version, header[2] = token count, then the tokens: magic
// 20240520 / version 1 stores uint16, magic 20240801 / version 7 stores uint32. Little-endian, as llm.c writes them and
// as the host is (x86, ARM; safetensors.h says so too), so a token is copied as the low bytes of an integer.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <glob.h>

#include "common.h"
#include "fileutil.h"
#include "tokenizer.h"

static const int TOKENS_MAGIC_U16 = 20240520;  // version 1
static const int TOKENS_MAGIC_U32 = 20240801;  // version 7
static const size_t TOKENS_HEADER_BYTES = 256 * sizeof(int32_t);

// Validates a header against the file's size; returns the token count and sets *bytes_per_token.
inline uint64_t token_file_check(const std::string& path, const int32_t* header, uint64_t file_size,
                                 int* bytes_per_token) {
    const char* p = path.c_str();
    if (header[0] == TOKENS_MAGIC_U16) {
        if (header[1] != 1) fail("%s: version %d does not match magic %d (expected 1)", p, header[1], header[0]);
        *bytes_per_token = 2;
    } else if (header[0] == TOKENS_MAGIC_U32) {
        if (header[1] != 7) fail("%s: version %d does not match magic %d (expected 7)", p, header[1], header[0]);
        *bytes_per_token = 4;
    } else {
        fail("%s: bad magic %d (expected %d or %d; not an llm.c token file?)", p, header[0], TOKENS_MAGIC_U16,
             TOKENS_MAGIC_U32);
    }
    if (header[2] < 0) fail("%s: negative token count %d in header", p, header[2]);
    uint64_t count = (uint64_t)header[2];
    uint64_t expect = TOKENS_HEADER_BYTES + count * (uint64_t)*bytes_per_token;
    if (file_size < expect)
        fail("%s: truncated: header says %llu tokens (%llu bytes) but the file has %llu bytes", p,
             (unsigned long long)count, (unsigned long long)expect, (unsigned long long)file_size);
    if (file_size > expect)
        fail("%s: has %llu extra bytes after its %llu tokens", p, (unsigned long long)(file_size - expect),
             (unsigned long long)count);
    return count;
}

// Reads only the header and the size, for listing shards without loading them.
inline uint64_t token_file_count(const std::string& path) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) fail("%s: cannot open (%s)", path.c_str(), strerror(errno));
    int32_t header[256];
    size_t got = fread(header, 1, TOKENS_HEADER_BYTES, f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    if (got < TOKENS_HEADER_BYTES)
        fail("%s: truncated: %zu bytes, shorter than the %zu-byte header", path.c_str(), got, TOKENS_HEADER_BYTES);
    int bpt;
    return token_file_check(path, header, (uint64_t)size, &bpt);
}

// vocab_size -1 skips the id check.
inline std::vector<int> read_token_file(const std::string& path, int vocab_size) {
    std::string data = read_file(path);
    if (data.size() < TOKENS_HEADER_BYTES)
        fail("%s: truncated: %zu bytes, shorter than the %zu-byte header", path.c_str(), data.size(),
             TOKENS_HEADER_BYTES);
    int32_t header[256];
    memcpy(header, data.data(), TOKENS_HEADER_BYTES);
    int bpt;
    uint64_t count = token_file_check(path, header, data.size(), &bpt);
    std::vector<int> tokens(count);
    const unsigned char* src = (const unsigned char*)data.data() + TOKENS_HEADER_BYTES;
    // an unsigned limit also catches uint32 ids that do not fit in an int
    uint64_t limit = vocab_size >= 0 ? (uint64_t)vocab_size : (uint64_t)INT32_MAX + 1;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t t = 0;
        memcpy(&t, src + bpt * i, bpt);
        if (t >= limit) {
            if (vocab_size >= 0)
                fail("%s: token %llu at position %llu is >= vocab_size %d", path.c_str(), (unsigned long long)t,
                     (unsigned long long)i, vocab_size);
            fail("%s: token %llu at position %llu does not fit in int32", path.c_str(), (unsigned long long)t,
                 (unsigned long long)i);
        }
        tokens[i] = (int)t;
    }
    return tokens;
}

// version 1 (uint16 tokens) or 7 (uint32 tokens); written atomically.
inline void write_token_file(const std::string& path, const std::vector<int>& tokens, int version) {
    if (version != 1 && version != 7) fail("%s: token file version must be 1 or 7, not %d", path.c_str(), version);
    if (tokens.size() > (size_t)INT32_MAX) fail("%s: %zu tokens do not fit one file (max %d)", path.c_str(), tokens.size(), INT32_MAX);
    int bpt = version == 1 ? 2 : 4;
    uint64_t limit = version == 1 ? 65536 : (uint64_t)INT32_MAX + 1;
    std::string data(TOKENS_HEADER_BYTES + tokens.size() * bpt, '\0');
    int32_t header[256] = {};
    header[0] = version == 1 ? TOKENS_MAGIC_U16 : TOKENS_MAGIC_U32;
    header[1] = version;
    header[2] = (int32_t)tokens.size();
    memcpy(&data[0], header, TOKENS_HEADER_BYTES);
    char* dst = &data[TOKENS_HEADER_BYTES];
    for (size_t i = 0; i < tokens.size(); i++) {
        if (tokens[i] < 0 || (uint64_t)tokens[i] >= limit)
            fail("%s: token %d at position %zu does not fit a version %d file", path.c_str(), tokens[i], i, version);
        memcpy(dst + bpt * i, &tokens[i], bpt);
    }
    write_file_atomic(path, data);
}

// ----------------------------------------------------------------------------
// DataLoader: the shards, concatenated in sorted order, form one cyclic token stream. A batch at offset p holds tokens
// p .. p+B*T (wrapping), inputs the first B*T and targets the last B*T; each call advances p by B*T per process. With
// several processes, rank r reads the batch at p + r*B*T. The whole state is p, so resume is exact. Only one shard is
// in memory at a time (llm.c's FineWeb shards are 100M tokens each); a shard's token ids are checked when it is read.

struct DataLoader {
    int B = 0, T = 0;
    int vocab_size = -1;
    int rank = 0, world = 1;
    std::vector<std::string> files;
    std::vector<uint64_t> starts;  // stream offset of each file's first token, then the total
    uint64_t total = 0;
    uint64_t pos = 0;              // stream offset of the next batch (shuffled: tokens read, never wrapped, so
                                   // that no batch repeats; the stream offset is pos % total)
    int loaded = -1;               // which file `tokens` holds
    std::vector<int> tokens;
    std::vector<int> window;       // the B*T+1 tokens of the current batch (shuffled: of one row)
    // false: each batch the next B*T tokens of the stream, as llm.c reads them. true: each row a window of T+1
    // tokens at a random offset in the file that holds pos (nanoGPT's sampling, kept within a shard so that a
    // glob of shards is still read one file at a time), drawn from (shuffle_key, pos, row): exact on resume.
    bool shuffle = false;
    uint64_t shuffle_key = 0;
};

inline void dataloader_load_file(DataLoader& dl, int file) {
    if (dl.loaded == file) return;
    dl.loaded = -1;
    dl.tokens = read_token_file(dl.files[file], dl.vocab_size);
    dl.loaded = file;
}

// The files a path or a glob pattern such as "data/fineweb_train_*.bin" names, sorted
// (glob's own order depends on the locale).
inline std::vector<std::string> glob_files(const std::string& pattern) {
    glob_t g;
    int rc = glob(pattern.c_str(), 0, nullptr, &g);
    if (rc == GLOB_NOMATCH) fail("%s: no such file (no file matches this path or pattern)", pattern.c_str());
    if (rc != 0) fail("%s: cannot list files (glob error %d)", pattern.c_str(), rc);
    std::vector<std::string> files(g.gl_pathv, g.gl_pathv + g.gl_pathc);
    globfree(&g);
    std::sort(files.begin(), files.end());
    return files;
}

// `pattern` as glob_files takes it.
inline void dataloader_open(DataLoader& dl, const std::string& pattern, int B, int T, int vocab_size,
                            int rank = 0, int world = 1) {
    if (B <= 0 || T <= 0) fail("%s: batch size B=%d and sequence length T=%d must be positive", pattern.c_str(), B, T);
    if (world <= 0 || rank < 0 || rank >= world) fail("%s: bad process rank %d of %d", pattern.c_str(), rank, world);
    dl = DataLoader{B, T, vocab_size, rank, world};
    dl.files = glob_files(pattern);
    for (const std::string& f : dl.files) {
        dl.starts.push_back(dl.total);
        dl.total += token_file_count(f);
    }
    dl.starts.push_back(dl.total);
    uint64_t need = (uint64_t)world * B * T + 1;
    if (dl.total < need)
        fail("%s: %llu tokens in %zu file(s), but B=%d T=%d%s needs at least %llu", pattern.c_str(),
             (unsigned long long)dl.total, dl.files.size(), B, T,
             world > 1 ? strfmt(" on %d processes", world).c_str() : "", (unsigned long long)need);
    dataloader_load_file(dl, 0);  // surface bad ids in a single-file dataset at once
}

// the file that holds stream offset at (< total)
inline int dataloader_file_at(const DataLoader& dl, uint64_t at) {
    return (int)(std::upper_bound(dl.starts.begin(), dl.starts.end(), at) - dl.starts.begin()) - 1;
}

// copies count tokens of the stream from offset at, wrapping at its end, into out
inline void dataloader_copy(DataLoader& dl, uint64_t at, size_t count, int* out) {
    size_t filled = 0;
    while (filled < count) {
        const int file = dataloader_file_at(dl, at);
        dataloader_load_file(dl, file);
        uint64_t take = std::min<uint64_t>(count - filled, dl.starts[file + 1] - at);
        memcpy(out + filled, dl.tokens.data() + (at - dl.starts[file]), take * sizeof(int));
        filled += take;
        at = (at + take) % dl.total;
    }
}

// Fills B*T inputs and their B*T next-token targets, then advances.
inline void dataloader_next(DataLoader& dl, std::vector<int>& inputs, std::vector<int>& targets) {
    const size_t n = (size_t)dl.B * dl.T;
    if (!dl.shuffle) {
        dl.window.resize(n + 1);
        dataloader_copy(dl, (dl.pos + (uint64_t)dl.rank * n) % dl.total, n + 1, dl.window.data());
        inputs.assign(dl.window.begin(), dl.window.end() - 1);
        targets.assign(dl.window.begin() + 1, dl.window.end());
    } else {
        const int file = dataloader_file_at(dl, dl.pos % dl.total);
        const uint64_t first = dl.starts[file], len = dl.starts[file + 1] - first;
        inputs.resize(n);
        targets.resize(n);
        dl.window.resize(dl.T + 1);
        for (int b = 0; b < dl.B; b++) {
            // a file shorter than a row starts it at the file's start, running on into the stream
            const uint64_t row = (uint64_t)dl.rank * dl.B + b, draw = rng_hash(dl.shuffle_key ^ mix64(dl.pos), row);
            dataloader_copy(dl, first + (len > (uint64_t)dl.T ? draw % (len - dl.T) : 0), dl.T + 1, dl.window.data());
            std::copy(dl.window.begin(), dl.window.end() - 1, inputs.begin() + (size_t)b * dl.T);
            std::copy(dl.window.begin() + 1, dl.window.end(), targets.begin() + (size_t)b * dl.T);
        }
    }
    dl.pos = dl.shuffle ? dl.pos + (uint64_t)dl.world * n : (dl.pos + (uint64_t)dl.world * n) % dl.total;
}

inline uint64_t dataloader_position(const DataLoader& dl) { return dl.pos; }

inline void dataloader_seek(DataLoader& dl, uint64_t pos) {
    if (!dl.shuffle && pos >= dl.total)
        fail("%s: data position %llu is past the end of its %llu tokens (a different dataset?)",
             dl.files.empty() ? "dataloader" : dl.files[0].c_str(), (unsigned long long)pos,
             (unsigned long long)dl.total);
    dl.pos = pos;
}

inline void dataloader_reset(DataLoader& dl) { dl.pos = 0; }

// ----------------------------------------------------------------------------
// dataset preparation

// Trains the tokenizer on the first (1 - val_fraction) of the bytes and writes
// out_dir/tokenizer.bin, train.bin and val.bin.
inline void prepare_dataset(const std::string& text, const std::string& out_dir, int vocab_size, double val_fraction) {
    if (!(val_fraction > 0 && val_fraction < 1)) fail("val_fraction %g must be between 0 and 1", val_fraction);
    size_t split = (size_t)((double)text.size() * (1 - val_fraction));
    if (split == 0 || split == text.size())
        fail("text of %zu bytes is too short to split into train and val at fraction %g", text.size(), val_fraction);
    make_dirs(out_dir);
    std::string train_text = text.substr(0, split), val_text = text.substr(split);

    double t0 = now_seconds();
    Tokenizer tok = tokenizer_train(train_text, vocab_size);
    std::string tok_path = out_dir + "/tokenizer.bin";
    tokenizer_save(tok, tok_path);
    printf("%s: vocab_size %d trained on %zu bytes in %.2fs%s\n", tok_path.c_str(), tok.vocab_size,
           train_text.size(), now_seconds() - t0,
           tok.vocab_size < vocab_size ? strfmt(" (asked for %d: the text has no more pairs to merge)", vocab_size).c_str() : "");
    fflush(stdout);

    int version = tok.vocab_size <= 65536 ? 1 : 7;
    const std::pair<const char*, const std::string*> parts[] = {{"train.bin", &train_text}, {"val.bin", &val_text}};
    for (const auto& part : parts) {
        t0 = now_seconds();
        std::vector<int> ids = tokenizer_encode(tok, *part.second);
        std::string path = out_dir + "/" + part.first;
        write_token_file(path, ids, version);
        printf("%s: %zu tokens from %zu bytes (%.2f bytes/token) in %.2fs\n", path.c_str(), ids.size(),
               part.second->size(), (double)part.second->size() / std::max<size_t>(ids.size(), 1),
               now_seconds() - t0);
        fflush(stdout);
    }
}
