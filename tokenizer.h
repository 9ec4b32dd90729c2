// tokenizer.h — byte-level BPE: training on raw text, encoding, decoding, and the tokenizer.bin file. Ids 0..255 are
// always the raw bytes, so any byte string (invalid UTF-8 and NUL included) round-trips. A trained vocabulary reserves
// id 256 for "<|endoftext|>" and numbers its merges from 257; a pure byte vocabulary (256) has neither.
//
// Text is first cut into chunks (a word, a number or a punctuation run with the single space before it; a run of other
// whitespace; a run of newlines) and merges never cross a chunk boundary, so tokens stay word-like and encoding can
// cache whole chunks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <queue>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common.h"
#include "fileutil.h"

static const int TOKENIZER_MAGIC = 20250519;
static const int TOKENIZER_VERSION = 1;
static const char* const TOKENIZER_EOT_TEXT = "<|endoftext|>";
// the longest token a merge may make: a bound on what a damaged or hostile tokenizer.bin can make us build
// (each merge could double the longest token), far past what BPE learns from text
constexpr size_t TOKENIZER_MAX_TOKEN_BYTES = 256;
// Longer runs are cut into pieces of this many bytes, which bounds the cost of
// training and encoding on text without spaces (base64, DNA, binary data).
static const int TOKENIZER_MAX_CHUNK = 64;

struct Tokenizer {
    int vocab_size = 256;
    int eot_id = -1;                          // -1 when none
    std::vector<std::pair<int, int>> merges;  // merge i creates token first_merge_id()+i
    // derived by tokenizer_build_tables
    std::vector<std::string> token_bytes;     // the bytes each id decodes to
    std::unordered_map<uint64_t, int> rank;   // pair key -> merge index

    int first_merge_id() const { return eot_id >= 0 ? eot_id + 1 : 256; }
};

inline uint64_t tokenizer_pair_key(int a, int b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }

// Checks the invariants and fills the decode table and the merge ranks. `where` names the source in error messages.
inline void tokenizer_build_tables(Tokenizer& tok, const std::string& where) {
    if (tok.vocab_size == 256) {
        if (tok.eot_id != -1 || !tok.merges.empty())
            fail("%s: a 256-token vocabulary is bytes only (no end-of-text token, no merges)", where.c_str());
    } else {
        if (tok.eot_id != 256) fail("%s: eot_id is %d, expected 256", where.c_str(), tok.eot_id);
        if ((int64_t)tok.merges.size() != (int64_t)tok.vocab_size - 257)
            fail("%s: vocab_size %d needs %d merges but there are %zu", where.c_str(), tok.vocab_size,
                 tok.vocab_size - 257, tok.merges.size());
    }
    tok.token_bytes.assign(tok.vocab_size, std::string());
    for (int i = 0; i < 256; i++) tok.token_bytes[i] = std::string(1, (char)i);
    if (tok.eot_id >= 0) tok.token_bytes[tok.eot_id] = TOKENIZER_EOT_TEXT;
    tok.rank.clear();
    int first = tok.first_merge_id();
    for (size_t i = 0; i < tok.merges.size(); i++) {
        int a = tok.merges[i].first, b = tok.merges[i].second;
        int id = first + (int)i;
        if (a < 0 || b < 0 || a >= id || b >= id || a == tok.eot_id || b == tok.eot_id)
            fail("%s: merge %zu (%d, %d) uses an id that is out of range for token %d", where.c_str(), i, a, b, id);
        if (!tok.rank.emplace(tokenizer_pair_key(a, b), (int)i).second)
            fail("%s: merge %zu (%d, %d) repeats an earlier merge", where.c_str(), i, a, b);
        if (tok.token_bytes[a].size() + tok.token_bytes[b].size() > TOKENIZER_MAX_TOKEN_BYTES)
            fail("%s: merge %zu makes a token of %zu bytes (at most %zu)", where.c_str(), i,
                 tok.token_bytes[a].size() + tok.token_bytes[b].size(), TOKENIZER_MAX_TOKEN_BYTES);
        tok.token_bytes[id] = tok.token_bytes[a] + tok.token_bytes[b];
    }
}

inline Tokenizer tokenizer_bytes() {
    Tokenizer tok;
    tokenizer_build_tables(tok, "byte tokenizer");
    return tok;
}

// ----------------------------------------------------------------------------
// pre-splitting

// The first three classes take a leading space (tokenizer_split relies on the order).
enum { CHARCLASS_LETTER, CHARCLASS_DIGIT, CHARCLASS_PUNCT, CHARCLASS_SPACE, CHARCLASS_NEWLINE };

inline int tokenizer_char_class(unsigned char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80) return CHARCLASS_LETTER;  // UTF-8 stays in words
    if (c >= '0' && c <= '9') return CHARCLASS_DIGIT;
    if (c == '\n') return CHARCLASS_NEWLINE;
    if (c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f') return CHARCLASS_SPACE;
    return CHARCLASS_PUNCT;
}

// Calls fn(offset, length) for each chunk of text, in order, covering every byte.
template <typename Fn>
inline void tokenizer_split(const std::string& text, Fn fn) {
    const unsigned char* s = (const unsigned char*)text.data();
    size_t n = text.size();
    // a space followed by a word, number or punctuation run joins that run
    auto space_joins = [&](size_t i) {
        return s[i] == ' ' && i + 1 < n && tokenizer_char_class(s[i + 1]) <= CHARCLASS_PUNCT;
    };
    size_t i = 0;
    while (i < n) {
        size_t start = i;
        int cls;
        if (space_joins(i)) {
            i++;
            cls = tokenizer_char_class(s[i]);
        } else {
            cls = tokenizer_char_class(s[i]);
        }
        i++;
        while (i < n && i - start < (size_t)TOKENIZER_MAX_CHUNK && tokenizer_char_class(s[i]) == cls &&
               !(cls == CHARCLASS_SPACE && space_joins(i)))
            i++;
        fn(start, i - start);
    }
}

// Replaces each (a, b) in sym with id, scanning left to right, so "aaa" with (a, a) becomes (id, a).
inline void tokenizer_merge_pair(std::vector<int>& sym, int a, int b, int id) {
    size_t out = 0;
    for (size_t i = 0; i < sym.size(); i++) {
        if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b) {
            sym[out++] = id;
            i++;
        } else {
            sym[out++] = sym[i];
        }
    }
    sym.resize(out);
}

// ----------------------------------------------------------------------------
// training

// Greedy BPE over the unique chunks. Pair counts are kept incrementally: a merge only revisits the chunks
// that contain its pair (found through `where`), and the best pair comes from a max-heap whose stale entries
// are skipped when popped. Ties go to the smallest (first, second) pair so training is deterministic. Stops
// early, with a smaller vocab_size, if every chunk has become one token.
inline Tokenizer tokenizer_train(const std::string& text, int vocab_size) {
    if (vocab_size == 256) return tokenizer_bytes();
    if (vocab_size < 258)
        fail("tokenizer vocab_size %d: must be 256 (bytes) or at least 258 (bytes, end-of-text and merges)",
             vocab_size);
    Tokenizer tok;
    tok.eot_id = 256;

    std::unordered_map<std::string, int64_t> chunk_count;
    tokenizer_split(text, [&](size_t off, size_t len) { chunk_count[text.substr(off, len)]++; });
    std::vector<std::vector<int>> words;
    std::vector<int64_t> freq;
    words.reserve(chunk_count.size());
    for (const auto& kv : chunk_count) {
        words.emplace_back(kv.first.begin(), kv.first.end());
        for (int& c : words.back()) c &= 0xff;  // char may be signed
        freq.push_back(kv.second);
    }

    std::unordered_map<uint64_t, int64_t> pair_count;
    std::unordered_map<uint64_t, std::vector<int>> where;  // pair -> words that contained it
    for (size_t w = 0; w < words.size(); w++) {
        const std::vector<int>& sym = words[w];
        for (size_t i = 0; i + 1 < sym.size(); i++) {
            uint64_t key = tokenizer_pair_key(sym[i], sym[i + 1]);
            pair_count[key] += freq[w];
            std::vector<int>& list = where[key];
            if (list.empty() || list.back() != (int)w) list.push_back((int)w);
        }
    }
    struct Entry {
        int64_t count;
        uint64_t key;
        bool operator<(const Entry& o) const { return count != o.count ? count < o.count : key > o.key; }
    };
    std::priority_queue<Entry> heap;
    for (const auto& kv : pair_count) heap.push({kv.second, kv.first});

    std::vector<uint64_t> touched;
    std::vector<size_t> length(257, 1);  // each token's bytes (the end-of-text token is never merged)
    for (int id = 257; id < vocab_size; id++) {
        Entry best = {0, 0};
        while (!heap.empty()) {
            Entry e = heap.top();
            heap.pop();
            auto it = pair_count.find(e.key);
            if (it != pair_count.end() && it->second == e.count &&
                length[e.key >> 32] + length[(uint32_t)e.key] <= TOKENIZER_MAX_TOKEN_BYTES) {
                best = e;
                break;
            }
        }
        if (best.count == 0) break;
        int a = (int)(best.key >> 32), b = (int)(uint32_t)best.key;
        tok.merges.push_back({a, b});
        length.push_back(length[a] + length[b]);

        touched.clear();
        std::vector<int> list = std::move(where[best.key]);
        where.erase(best.key);
        for (int w : list) {
            std::vector<int>& sym = words[w];
            bool has = false;
            for (size_t i = 0; i + 1 < sym.size() && !has; i++) has = sym[i] == a && sym[i + 1] == b;
            if (!has) continue;  // an earlier merge already consumed the pair here
            // Words are short, so drop all of this word's pairs, merge, and add them back.
            for (size_t i = 0; i + 1 < sym.size(); i++) {
                uint64_t key = tokenizer_pair_key(sym[i], sym[i + 1]);
                pair_count[key] -= freq[w];
                touched.push_back(key);
            }
            tokenizer_merge_pair(sym, a, b, id);
            for (size_t i = 0; i + 1 < sym.size(); i++) {
                uint64_t key = tokenizer_pair_key(sym[i], sym[i + 1]);
                pair_count[key] += freq[w];
                touched.push_back(key);
                if (sym[i] == id || sym[i + 1] == id) {
                    // only pairs with the new id are new to this word
                    std::vector<int>& l = where[key];
                    if (l.empty() || l.back() != w) l.push_back(w);
                }
            }
        }
        std::sort(touched.begin(), touched.end());
        touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
        for (uint64_t key : touched) {
            auto it = pair_count.find(key);
            if (it->second == 0) pair_count.erase(it);
            else heap.push({it->second, key});
        }
    }
    tok.vocab_size = 257 + (int)tok.merges.size();
    tokenizer_build_tables(tok, "trained tokenizer");
    return tok;
}

// ----------------------------------------------------------------------------
// encoding and decoding

// GPT-2 style: within a chunk, repeatedly apply the lowest-ranked merge present
// (all its occurrences, left to right) until none applies.
inline void tokenizer_encode_chunk(const Tokenizer& tok, const unsigned char* s, size_t n, std::vector<int>& out) {
    std::vector<int> sym(s, s + n);
    while (sym.size() >= 2) {
        int best = -1;
        for (size_t i = 0; i + 1 < sym.size(); i++) {
            auto it = tok.rank.find(tokenizer_pair_key(sym[i], sym[i + 1]));
            if (it != tok.rank.end() && (best < 0 || it->second < best)) best = it->second;
        }
        if (best < 0) break;
        int a = tok.merges[best].first, b = tok.merges[best].second, id = tok.first_merge_id() + best;
        tokenizer_merge_pair(sym, a, b, id);
    }
    out.insert(out.end(), sym.begin(), sym.end());
}

// Plain bytes in, ids out. The text "<|endoftext|>" is encoded as ordinary bytes;
// callers that want the end-of-text token append eot_id themselves.
inline std::vector<int> tokenizer_encode(const Tokenizer& tok, const std::string& text) {
    std::vector<int> out;
    out.reserve(text.size() / 2 + 16);
    const unsigned char* s = (const unsigned char*)text.data();
    if (tok.merges.empty()) {
        out.assign(s, s + text.size());
        return out;
    }
    std::unordered_map<std::string, std::vector<int>> cache;  // chunk -> ids; text repeats its words
    std::vector<int> ids;
    tokenizer_split(text, [&](size_t off, size_t len) {
        std::string chunk = text.substr(off, len);
        auto it = cache.find(chunk);
        if (it == cache.end()) {
            ids.clear();
            tokenizer_encode_chunk(tok, s + off, len, ids);
            it = cache.emplace(std::move(chunk), ids).first;
        }
        out.insert(out.end(), it->second.begin(), it->second.end());
    });
    return out;
}

inline const std::string& tokenizer_token_bytes(const Tokenizer& tok, int id) {
    if (id < 0 || id >= tok.vocab_size) fail("token id %d is out of range for vocab_size %d", id, tok.vocab_size);
    return tok.token_bytes[id];
}

inline std::string tokenizer_decode(const Tokenizer& tok, const int* ids, size_t n) {
    std::string s;
    for (size_t i = 0; i < n; i++) s += tokenizer_token_bytes(tok, ids[i]);
    return s;
}

// ----------------------------------------------------------------------------
// tokenizer.bin: int32 magic, version, vocab_size, eot_id, merge count, then
// merge count pairs of int32 (first, second). Little-endian, like llm.c's files.

inline void tokenizer_save(const Tokenizer& tok, const std::string& path) {
    std::vector<int32_t> data = {TOKENIZER_MAGIC, TOKENIZER_VERSION, tok.vocab_size, tok.eot_id,
                                 (int32_t)tok.merges.size()};
    for (const auto& m : tok.merges) data.insert(data.end(), {m.first, m.second});
    write_file_atomic(path, std::string((const char*)data.data(), data.size() * sizeof(int32_t)));
}

inline Tokenizer tokenizer_load(const std::string& path) {
    std::string data = read_file(path);
    const size_t header = 5 * sizeof(int32_t);
    if (data.size() < header) fail("%s: truncated tokenizer file (%zu bytes)", path.c_str(), data.size());
    int32_t h[5];
    memcpy(h, data.data(), header);
    if (h[0] != TOKENIZER_MAGIC) fail("%s: bad magic %d (expected %d, not a tokenizer.bin?)", path.c_str(), h[0], TOKENIZER_MAGIC);
    if (h[1] != TOKENIZER_VERSION) fail("%s: unsupported tokenizer version %d (expected %d)", path.c_str(), h[1], TOKENIZER_VERSION);
    if (h[4] < 0) fail("%s: negative merge count %d", path.c_str(), h[4]);
    size_t expect = header + (size_t)h[4] * 2 * sizeof(int32_t);
    if (data.size() < expect)
        fail("%s: truncated: %d merges need %zu bytes but the file has %zu", path.c_str(), h[4], expect, data.size());
    if (data.size() > expect) fail("%s: has %zu extra bytes after %d merges", path.c_str(), data.size() - expect, h[4]);
    Tokenizer tok{h[2], h[3]};  // vocab_size, eot_id
    std::vector<int32_t> m(2 * (size_t)h[4]);
    if (!m.empty()) memcpy(m.data(), data.data() + header, m.size() * sizeof(int32_t));
    for (size_t i = 0; i < (size_t)h[4]; i++) tok.merges.push_back({m[2 * i], m[2 * i + 1]});
    tokenizer_build_tables(tok, path);
    return tok;
}
