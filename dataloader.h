// dataloader.h — llm.c token files (read, write, validate), the DataLoader that
// walks one or more of them in batches with exact resume, dataset preparation
// (tokenizer + train.bin + val.bin from raw text), and the generated default corpus.
//
// Token file: 256 int32 header, header[0] = magic, header[1] = version, header[2] =
// token count, then the tokens: magic 20240520 / version 1 stores uint16, magic
// 20240801 / version 7 stores uint32. Little-endian, as llm.c writes them.
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

// Validates a header against the file's size; returns the token count and sets
// *bytes_per_token.
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
        uint64_t t;
        if (bpt == 2) {
            uint16_t v;
            memcpy(&v, src + 2 * i, 2);
            t = v;
        } else {
            uint32_t v;
            memcpy(&v, src + 4 * i, 4);
            t = v;
        }
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
        if (bpt == 2) {
            uint16_t v = (uint16_t)tokens[i];
            memcpy(dst + 2 * i, &v, 2);
        } else {
            uint32_t v = (uint32_t)tokens[i];
            memcpy(dst + 4 * i, &v, 4);
        }
    }
    write_file_atomic(path, data);
}

// ----------------------------------------------------------------------------
// DataLoader: the shards, concatenated in sorted order, form one cyclic token
// stream. A batch at offset p holds tokens p .. p+B*T (wrapping), inputs the first
// B*T and targets the last B*T; each call advances p by B*T per process. With
// several processes, rank r reads the batch at p + r*B*T. The whole state is p,
// so resume is exact. Only one shard is in memory at a time (llm.c's FineWeb
// shards are 100M tokens each); a shard's token ids are checked when it is read.

struct DataLoader {
    int B = 0, T = 0;
    int vocab_size = -1;
    int rank = 0, world = 1;
    std::vector<std::string> files;
    std::vector<uint64_t> starts;  // stream offset of each file's first token, then the total
    uint64_t total = 0;
    uint64_t pos = 0;              // stream offset of the next batch
    int loaded = -1;               // which file `tokens` holds
    std::vector<int> tokens;
    std::vector<int> window;       // the B*T+1 tokens of the current batch
};

inline void dataloader_load_file(DataLoader& dl, int file) {
    if (dl.loaded == file) return;
    dl.loaded = -1;
    dl.tokens = read_token_file(dl.files[file], dl.vocab_size);
    dl.loaded = file;
}

// `pattern` is a path or a glob pattern such as "data/fineweb_train_*.bin".
inline void dataloader_open(DataLoader& dl, const std::string& pattern, int B, int T, int vocab_size,
                            int rank = 0, int world = 1) {
    if (B <= 0 || T <= 0) fail("%s: batch size B=%d and sequence length T=%d must be positive", pattern.c_str(), B, T);
    if (world <= 0 || rank < 0 || rank >= world) fail("%s: bad process rank %d of %d", pattern.c_str(), rank, world);
    dl = DataLoader();
    dl.B = B;
    dl.T = T;
    dl.vocab_size = vocab_size;
    dl.rank = rank;
    dl.world = world;
    glob_t g;
    int rc = glob(pattern.c_str(), 0, nullptr, &g);
    if (rc == GLOB_NOMATCH) fail("%s: no such file (no file matches this path or pattern)", pattern.c_str());
    if (rc != 0) fail("%s: cannot list files (glob error %d)", pattern.c_str(), rc);
    for (size_t i = 0; i < g.gl_pathc; i++) dl.files.push_back(g.gl_pathv[i]);
    globfree(&g);
    std::sort(dl.files.begin(), dl.files.end());  // glob's order depends on the locale
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

// Fills B*T inputs and their B*T next-token targets, then advances.
inline void dataloader_next(DataLoader& dl, std::vector<int>& inputs, std::vector<int>& targets) {
    size_t n = (size_t)dl.B * dl.T;
    dl.window.resize(n + 1);
    uint64_t at = (dl.pos + (uint64_t)dl.rank * n) % dl.total;
    size_t filled = 0;
    while (filled < n + 1) {
        int file = (int)(std::upper_bound(dl.starts.begin(), dl.starts.end(), at) - dl.starts.begin()) - 1;
        dataloader_load_file(dl, file);
        uint64_t take = std::min<uint64_t>(n + 1 - filled, dl.starts[file + 1] - at);
        memcpy(dl.window.data() + filled, dl.tokens.data() + (at - dl.starts[file]), take * sizeof(int));
        filled += take;
        at = (at + take) % dl.total;
    }
    inputs.assign(dl.window.begin(), dl.window.end() - 1);
    targets.assign(dl.window.begin() + 1, dl.window.end());
    dl.pos = (dl.pos + (uint64_t)dl.world * n) % dl.total;
}

inline uint64_t dataloader_position(const DataLoader& dl) { return dl.pos; }

inline void dataloader_seek(DataLoader& dl, uint64_t pos) {
    if (pos >= dl.total)
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

// ----------------------------------------------------------------------------
// The default corpus: English-like paragraphs from a small fixed-seed grammar —
// little stories, arithmetic, counting, dialogues and facts. The facts are
// consistent (sums are right, a bird can fly, a horse is bigger than a cat, the
// noun a story introduces comes back) so a small model has something to learn
// beyond word frequencies, and the combinations vary enough not to be memorised.

struct CorpusGen {
    Rng rng;
    std::string out;

    int below(int n) { return std::min(n - 1, (int)(rng.uniform() * n)); }
    bool chance(float p) { return rng.uniform() < p; }
    template <size_t N>
    const char* pick(const char* const (&list)[N]) { return list[below((int)N)]; }
};

static const char* const CORPUS_NUMBERS[] = {
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"};
static const char* const CORPUS_SHE[] = {"Anna", "Clara", "Ella", "Grace", "Iris", "Kate", "Lena", "Mia", "Nora", "Olga",
                                         "Rosa", "Sara", "Tina", "Vera", "Zoe", "Maya", "Lucy", "Emma", "Hana", "Julia"};
static const char* const CORPUS_HE[] = {"Ben", "David", "Felix", "Hugo", "Jonas", "Leo", "Max", "Noah", "Omar", "Paul",
                                        "Sam", "Tom", "Victor", "Yuri", "Adam", "Carl", "Ivan", "Kai", "Liam", "Oscar"};
static const char* const CORPUS_OBJECTS[] = {
    "apple", "book", "lamp", "box", "boat", "hat", "key", "cup", "ball", "kite", "map", "coin", "shell", "bottle",
    "basket", "letter", "candle", "drum", "flute", "clock", "ring", "stone", "feather", "blanket", "bell", "brush",
    "jar", "ladder", "rope", "wheel", "shoe", "spoon", "bowl", "chair", "umbrella", "mirror", "pencil", "bicycle",
    "scarf", "teapot", "compass", "lantern", "violin", "puzzle", "envelope", "button", "glove", "notebook"};
static const char* const CORPUS_ADJECTIVES[] = {
    "small", "big", "red", "blue", "green", "old", "new", "heavy", "light", "shiny", "broken", "round", "tiny",
    "yellow", "wooden", "soft", "warm", "cold", "strange", "beautiful", "dusty", "bright", "dark", "quiet",
    "orange", "empty", "golden", "silver", "purple", "ancient", "little", "simple", "funny", "lovely"};
static const char* const CORPUS_PLACES[] = {
    "in the garden", "by the river", "near the old mill", "at the market", "under the bridge", "on the hill",
    "in the forest", "behind the school", "at the harbor", "in the kitchen", "on the roof", "next to the well",
    "in the library", "at the station", "on the beach", "in the cellar", "under the table", "in the attic",
    "near the lake", "at the bakery", "in the park", "on the farm", "by the fountain", "in the meadow"};
static const char* const CORPUS_TOWNS[] = {
    "a small town", "a quiet village", "a big city", "a house by the sea", "a farm in the valley",
    "an old castle", "a cabin in the mountains", "a narrow street near the port", "a yellow house on a hill"};
static const char* const CORPUS_WHEN[] = {"morning", "evening", "day", "night", "week", "Sunday", "Monday",
                                         "Saturday", "summer", "winter", "spring", "autumn"};
static const char* const CORPUS_ACTIVITIES[] = {
    "walked", "sang", "read", "slept", "worked", "played", "waited", "danced", "rested", "wrote",
    "painted", "ran", "swam", "cooked", "fished", "studied", "sat quietly", "looked at the clouds"};
static const char* const CORPUS_FOUND[] = {"found", "saw", "picked up", "noticed", "bought", "discovered", "dug up",
                                          "was given"};
static const char* const CORPUS_REACTIONS[] = {
    "smiled", "laughed", "took it home", "showed it to everyone", "wrote a letter about it", "kept it safe",
    "cleaned it carefully", "put it on a shelf", "told a friend about it", "wanted to keep it"};
static const char* const CORPUS_ENDINGS[] = {
    "was very happy", "felt proud", "went home", "went to bed early", "sang a song", "made some tea",
    "called a friend", "had a long nap", "ate some soup", "looked at the stars"};
static const char* const CORPUS_FOODS[] = {"soup", "bread", "cheese", "rice", "fish", "apples", "cake", "tea",
                                          "coffee", "honey", "carrots", "pears", "milk", "noodles", "beans"};
static const char* const CORPUS_DAYS[] = {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"};
static const char* const CORPUS_MONTHS[] = {"January", "February", "March", "April", "May", "June", "July",
                                           "August", "September", "October", "November", "December"};
static const char* const CORPUS_COLORED[][2] = {
    {"sky", "blue"}, {"grass", "green"}, {"snow", "white"}, {"sun", "yellow"}, {"coal", "black"},
    {"tomato", "red"}, {"banana", "yellow"}, {"leaf", "green"}, {"cloud", "white"}, {"ocean", "blue"},
    {"strawberry", "red"}, {"crow", "black"}, {"lemon", "yellow"}, {"milk", "white"}, {"cherry", "red"},
    {"frog", "green"}, {"carrot", "orange"}, {"plum", "purple"}};
// animals from smallest to largest, with what each can do
static const char* const CORPUS_ABILITIES[] = {"fly", "swim", "run", "climb", "jump", "sing", "dig"};
static const struct { const char* name; unsigned can; } CORPUS_ANIMALS[] = {
    {"ant", 1u << 6 | 1u << 3}, {"bee", 1u << 0}, {"mouse", 1u << 2 | 1u << 3 | 1u << 6},
    {"frog", 1u << 1 | 1u << 4}, {"bird", 1u << 0 | 1u << 5 | 1u << 4}, {"rabbit", 1u << 2 | 1u << 4 | 1u << 6},
    {"duck", 1u << 0 | 1u << 1}, {"cat", 1u << 2 | 1u << 3 | 1u << 4}, {"fox", 1u << 2 | 1u << 6 | 1u << 1},
    {"dog", 1u << 2 | 1u << 1 | 1u << 6 | 1u << 4}, {"goat", 1u << 2 | 1u << 3 | 1u << 4},
    {"horse", 1u << 2 | 1u << 4 | 1u << 1}, {"bear", 1u << 3 | 1u << 1 | 1u << 2},
    {"elephant", 1u << 1 | 1u << 2}, {"whale", 1u << 1 | 1u << 5}};
static const int CORPUS_NUM_ANIMALS = (int)(sizeof(CORPUS_ANIMALS) / sizeof(CORPUS_ANIMALS[0]));

inline std::string corpus_cap(std::string s) {
    if (!s.empty() && s[0] >= 'a' && s[0] <= 'z') s[0] = (char)(s[0] - 'a' + 'A');
    return s;
}

inline std::string corpus_a(const std::string& word) {
    return (strchr("aeiou", word[0]) ? "an " : "a ") + word;
}

inline std::string corpus_plural(const std::string& word) {
    bool es = ends_with(word, "s") || ends_with(word, "x") || ends_with(word, "sh") || ends_with(word, "ch");
    return word + (es ? "es" : "s");
}

inline void corpus_story(CorpusGen& g) {
    bool she = g.chance(0.5f);
    std::string name = she ? g.pick(CORPUS_SHE) : g.pick(CORPUS_HE);
    std::string pro = she ? "she" : "he", friend_name = g.chance(0.5f) ? g.pick(CORPUS_SHE) : g.pick(CORPUS_HE);
    if (friend_name == name) friend_name = she ? "Ben" : "Anna";
    std::string obj = g.pick(CORPUS_OBJECTS), adj = g.pick(CORPUS_ADJECTIVES);
    g.out += strfmt("%s lived in %s. ", name.c_str(), g.pick(CORPUS_TOWNS));
    if (g.chance(0.7f))
        g.out += strfmt("Every %s, %s %s %s. ", g.pick(CORPUS_WHEN), pro.c_str(), g.pick(CORPUS_ACTIVITIES),
                        g.pick(CORPUS_PLACES));
    g.out += strfmt("One day, %s %s %s %s %s. ", pro.c_str(), g.pick(CORPUS_FOUND), corpus_a(adj).c_str(),
                    obj.c_str(), g.pick(CORPUS_PLACES));
    if (g.chance(0.6f))
        g.out += strfmt("The %s was %s, so %s %s. ", obj.c_str(), g.pick(CORPUS_ADJECTIVES), pro.c_str(),
                        g.pick(CORPUS_REACTIONS));
    if (g.chance(0.5f)) {
        g.out += strfmt("Then %s gave the %s %s to %s. ", pro.c_str(), adj.c_str(), obj.c_str(), friend_name.c_str());
        g.out += strfmt("%s said, \"Thank you, %s!\" ", friend_name.c_str(), name.c_str());
    }
    g.out += strfmt("In the end, %s %s.", name.c_str(), g.pick(CORPUS_ENDINGS));
}

inline std::string corpus_sum(CorpusGen& g, bool capital) {
    int kind = g.below(3), a, b, c;
    const char* op;
    if (kind == 0) {
        a = g.below(21), b = g.below(21 - a), c = a + b, op = "plus";
    } else if (kind == 1) {
        a = g.below(21), b = g.below(a + 1), c = a - b, op = "minus";
    } else {
        a = 1 + g.below(10), b = g.below(20 / a + 1), c = a * b, op = "times";
    }
    std::string first = capital ? corpus_cap(CORPUS_NUMBERS[a]) : CORPUS_NUMBERS[a];
    return strfmt("%s %s %s is %s", first.c_str(), op, CORPUS_NUMBERS[b], CORPUS_NUMBERS[c]);
}

inline void corpus_arithmetic(CorpusGen& g) {
    int n = 3 + g.below(5);
    for (int i = 0; i < n; i++) {
        if (i) g.out += " ";
        if (g.chance(0.3f)) {
            int kind = g.below(3), a = g.below(100), b = g.below(100);
            if (kind == 0) g.out += strfmt("%d + %d = %d.", a, b, a + b);
            else if (kind == 1) g.out += strfmt("%d - %d = %d.", std::max(a, b), std::min(a, b), std::max(a, b) - std::min(a, b));
            else g.out += strfmt("%d * %d = %d.", a % 13, b % 13, (a % 13) * (b % 13));
        } else {
            g.out += corpus_sum(g, true) + ".";
        }
    }
}

inline void corpus_counting(CorpusGen& g) {
    int kind = g.below(4);
    if (kind <= 1) {
        int len = 3 + g.below(8), lo = g.below(21 - len + 1), hi = lo + len - 1;
        bool down = kind == 1;
        g.out += down ? strfmt("Counting down from %s to %s: ", CORPUS_NUMBERS[hi], CORPUS_NUMBERS[lo])
                      : strfmt("Let us count from %s to %s: ", CORPUS_NUMBERS[lo], CORPUS_NUMBERS[hi]);
        for (int i = 0; i < len; i++) {
            g.out += (i ? ", " : "");
            g.out += CORPUS_NUMBERS[down ? hi - i : lo + i];
        }
        g.out += ".";
    } else {
        bool days = kind == 2;
        const char* const* list = days ? CORPUS_DAYS : CORPUS_MONTHS;
        int n = days ? 7 : 12, i = g.below(n);
        g.out += strfmt("After %s comes %s. Before %s comes %s. ", list[i], list[(i + 1) % n], list[i],
                        list[(i + n - 1) % n]);
        g.out += days ? "The days of the week are " : "The months of the year are ";
        for (int k = 0; k < n; k++) g.out += strfmt("%s%s", k == 0 ? "" : k == n - 1 ? " and " : ", ", list[k]);
        g.out += ".";
    }
}

inline void corpus_dialogue(CorpusGen& g) {
    std::string a = g.chance(0.5f) ? g.pick(CORPUS_SHE) : g.pick(CORPUS_HE);
    std::string b = g.chance(0.5f) ? g.pick(CORPUS_SHE) : g.pick(CORPUS_HE);
    if (a == b) b = a == "Tom" ? "Sara" : "Tom";
    const char* A = a.c_str();
    const char* B = b.c_str();
    g.out += strfmt("%s: Hello, %s. How are you?\n%s: I am fine, thank you, %s.\n", A, B, B, A);
    int n = 1 + g.below(4);
    for (int i = 0; i < n; i++) {
        int kind = g.below(6);
        if (kind == 0) {
            const char* obj = g.pick(CORPUS_OBJECTS);
            g.out += strfmt("%s: Where is the %s?\n%s: The %s is %s.\n", A, obj, B, obj, g.pick(CORPUS_PLACES));
        } else if (kind == 1) {
            int k = g.below((int)(sizeof(CORPUS_COLORED) / sizeof(CORPUS_COLORED[0])));
            const char* thing = CORPUS_COLORED[k][0];
            g.out += strfmt("%s: What color is the %s?\n%s: The %s is %s.\n", A, thing, B, thing, CORPUS_COLORED[k][1]);
        } else if (kind == 2) {
            std::string objs = corpus_plural(g.pick(CORPUS_OBJECTS));
            int k = 2 + g.below(19);
            g.out += strfmt("%s: How many %s do you have?\n%s: I have %s %s.\n", A, objs.c_str(), B, CORPUS_NUMBERS[k],
                            objs.c_str());
        } else if (kind == 3) {
            std::string q = corpus_sum(g, false);
            size_t is = q.rfind(" is ");
            g.out += strfmt("%s: What is %s?\n%s: %s.\n", A, q.substr(0, is).c_str(), B, corpus_cap(q).c_str());
        } else if (kind == 4) {
            const char* food = g.pick(CORPUS_FOODS);
            g.out += g.chance(0.5f) ? strfmt("%s: Do you like %s?\n%s: Yes, I like %s.\n", A, food, B, food)
                                    : strfmt("%s: Do you like %s?\n%s: No, I do not like %s.\n", A, food, B, food);
        } else {
            int k = g.below(CORPUS_NUM_ANIMALS), ab = g.below(7);
            std::string animal = corpus_a(CORPUS_ANIMALS[k].name);
            bool can = CORPUS_ANIMALS[k].can >> ab & 1;
            g.out += strfmt("%s: Can %s %s?\n%s: %s, %s %s %s.\n", A, animal.c_str(), CORPUS_ABILITIES[ab], B,
                            can ? "Yes" : "No", animal.c_str(), can ? "can" : "cannot", CORPUS_ABILITIES[ab]);
        }
    }
    g.out += g.chance(0.5f) ? strfmt("%s: Goodbye, %s!\n%s: See you %s, %s!", A, B, B,
                                     g.chance(0.5f) ? "tomorrow" : "soon", A)
                            : strfmt("%s: Goodbye, %s!\n%s: See you on %s, %s!", A, B, B, g.pick(CORPUS_DAYS), A);
}

inline void corpus_facts(CorpusGen& g) {
    int n = 3 + g.below(4);
    for (int i = 0; i < n; i++) {
        if (i) g.out += " ";
        int kind = g.below(4);
        if (kind == 0) {
            int k = g.below(CORPUS_NUM_ANIMALS), ab = g.below(7);
            bool can = CORPUS_ANIMALS[k].can >> ab & 1;
            g.out += strfmt("%s %s %s.", corpus_cap(corpus_a(CORPUS_ANIMALS[k].name)).c_str(), can ? "can" : "cannot",
                            CORPUS_ABILITIES[ab]);
        } else if (kind == 1) {
            int x = g.below(CORPUS_NUM_ANIMALS), y = g.below(CORPUS_NUM_ANIMALS - 1);
            if (y >= x) y++;
            g.out += strfmt("%s is %s than %s.", corpus_cap(corpus_a(CORPUS_ANIMALS[x].name)).c_str(),
                            x > y ? "bigger" : "smaller", corpus_a(CORPUS_ANIMALS[y].name).c_str());
        } else if (kind == 2) {
            int k = g.below((int)(sizeof(CORPUS_COLORED) / sizeof(CORPUS_COLORED[0])));
            g.out += strfmt("The %s is %s.", CORPUS_COLORED[k][0], CORPUS_COLORED[k][1]);
        } else {
            std::string w = g.pick(CORPUS_OBJECTS), spelled;
            for (size_t c = 0; c < w.size(); c++) spelled += (c ? "-" : "") + w.substr(c, 1);
            g.out += strfmt("The word %s is spelled %s.", w.c_str(), spelled.c_str());
        }
    }
}

// Exactly `bytes` bytes (the last paragraph is cut off), the same on every call.
inline std::string default_corpus(size_t bytes) {
    CorpusGen g = {{20240520, 0}, std::string()};
    g.out.reserve(bytes + 1024);
    while (g.out.size() < bytes) {
        int kind = g.below(10);
        if (kind < 4) corpus_story(g);
        else if (kind < 6) corpus_dialogue(g);
        else if (kind < 7) corpus_arithmetic(g);
        else if (kind < 8) corpus_counting(g);
        else corpus_facts(g);
        g.out += "\n\n";
    }
    g.out.resize(bytes);
    return g.out;
}
