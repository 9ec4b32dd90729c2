// test_data.cpp — tests for tokenizer.h, dataloader.h and corpus.h: BPE training,
// encoding and the tokenizer file; llm.c token files and their errors; DataLoader
// batches, wrap-around, shards and exact resume; dataset preparation; the default
// corpus.
#include <doctest/doctest.h>

#include <filesystem>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

#include "corpus.h"
#include "dataloader.h"
#include "fileutil.h"
#include "tokenizer.h"

namespace {

// One scratch directory per test process, removed at exit.
struct ScratchDir {
    std::string path = strfmt("/tmp/dsv3_test_data_%d", (int)getpid());
    ScratchDir() { make_dirs(path); }
    ~ScratchDir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
};

std::string scratch(const std::string& name) {
    static ScratchDir dir;
    return dir.path + "/" + name;
}

// The message of the std::runtime_error that fn throws, or "" if it throws none.
std::string error_of(const std::function<void()>& fn) {
    try {
        fn();
    } catch (const std::runtime_error& e) {
        return e.what();
    }
    return "";
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string random_bytes(Rng& rng, size_t n) {
    std::string s(n, '\0');
    for (char& c : s) c = (char)(int)(rng.uniform() * 256);
    return s;
}

// Shared across tests so the corpus tokenizer is trained once.
const Tokenizer& corpus_tokenizer() {
    static Tokenizer tok = tokenizer_train(default_corpus(200000), 600);
    return tok;
}

}  // namespace

// ----------------------------------------------------------------------------
// tokenizer

TEST_CASE("byte tokenizer maps bytes to ids one to one") {
    Tokenizer tok = tokenizer_bytes();
    CHECK(tok.vocab_size == 256);
    CHECK(tok.eot_id == -1);
    std::string s("a\0\xff\x80 z", 6);
    std::vector<int> ids = tokenizer_encode(tok, s);
    CHECK(ids == std::vector<int>({'a', 0, 255, 128, ' ', 'z'}));
    CHECK(tokenizer_decode(tok, ids.data(), ids.size()) == s);
    CHECK(tokenizer_train("anything", 256).merges.empty());
}

TEST_CASE("trained tokenizer: layout, compression and determinism") {
    const Tokenizer& tok = corpus_tokenizer();
    CHECK(tok.vocab_size == 600);
    CHECK(tok.eot_id == 256);
    CHECK(tok.first_merge_id() == 257);
    CHECK(tok.merges.size() == 600 - 257);
    CHECK(tokenizer_token_bytes(tok, 256) == "<|endoftext|>");
    CHECK(tokenizer_token_bytes(tok, 'q') == "q");
    CHECK(has(error_of([&] { tokenizer_token_bytes(tok, 600); }), "out of range"));
    CHECK(has(error_of([&] { tokenizer_token_bytes(tok, -1); }), "out of range"));

    std::string text = default_corpus(50000);
    std::vector<int> ids = tokenizer_encode(tok, text);
    CHECK(ids.size() * 2 < text.size());  // merges really compress
    CHECK(tokenizer_decode(tok, ids.data(), ids.size()) == text);

    Tokenizer again = tokenizer_train(default_corpus(200000), 600);
    CHECK(again.merges == tok.merges);
    CHECK(tokenizer_train("hello hello world", 258).merges == tokenizer_train("hello hello world", 258).merges);
}

TEST_CASE("trained tokenizer picks the most frequent pair, ties to the smallest ids") {
    // chunks "ab", " ab" x2, " cd" x3: (a,b), (' ',c) and (c,d) all occur 3 times and
    // (' ',c) has the smallest ids; then (' 'c, d) ties with (a,b), which is smaller
    Tokenizer tok = tokenizer_train("ab ab ab cd cd cd", 260);
    REQUIRE(tok.merges.size() == 3);
    CHECK(tok.merges[0] == std::make_pair((int)' ', (int)'c'));
    CHECK(tok.merges[1] == std::make_pair((int)'a', (int)'b'));
    CHECK(tok.merges[2] == std::make_pair(257, (int)'d'));
    // merges never cross a chunk boundary, so a tiny text runs out of pairs early
    Tokenizer small = tokenizer_train("aa", 1000);
    CHECK(small.vocab_size == 258);
    CHECK(small.merges == std::vector<std::pair<int, int>>{{'a', 'a'}});
}

TEST_CASE("tokenizer rejects vocabulary sizes it cannot build") {
    for (int v : {0, 100, 255, 257})
        CHECK(has(error_of([&] { tokenizer_train("some text", v); }), strfmt("vocab_size %d", v)));
}

TEST_CASE("every byte string round-trips through a trained tokenizer") {
    const Tokenizer& tok = corpus_tokenizer();
    std::string corpus = default_corpus(20000);
    Rng rng = {7, 0};
    for (int trial = 0; trial < 300; trial++) {
        std::string s;
        int parts = 1 + (int)(rng.uniform() * 6);
        for (int p = 0; p < parts; p++) {
            size_t n = (size_t)(rng.uniform() * 120);
            if (rng.uniform() < 0.5f) {
                size_t at = (size_t)(rng.uniform() * (corpus.size() - n));
                s += corpus.substr(at, n);
            } else {
                s += random_bytes(rng, n);
            }
        }
        std::vector<int> ids = tokenizer_encode(tok, s);
        for (int id : ids) {
            REQUIRE(id >= 0);
            REQUIRE(id < tok.vocab_size);
            REQUIRE(id != tok.eot_id);
        }
        REQUIRE(tokenizer_decode(tok, ids.data(), ids.size()) == s);
    }
    // special cases: empty, NUL runs, long runs without spaces, the EOT text itself
    for (const std::string& s : {std::string(), std::string(100, '\0'), std::string(1000, 'a'),
                                 std::string(5000, '7'), std::string("<|endoftext|>"), std::string("\xc3\xa9t\xc3\xa9 \xff\xfe")}) {
        std::vector<int> ids = tokenizer_encode(tok, s);
        CHECK(tokenizer_decode(tok, ids.data(), ids.size()) == s);
    }
    // the literal text is not the end-of-text token
    std::vector<int> ids = tokenizer_encode(tok, "<|endoftext|>");
    CHECK(std::find(ids.begin(), ids.end(), tok.eot_id) == ids.end());
}

TEST_CASE("a tokenizer trained on random bytes still round-trips") {
    Rng rng = {11, 0};
    std::string text = random_bytes(rng, 20000);
    Tokenizer tok = tokenizer_train(text, 400);
    std::string other = random_bytes(rng, 5000);
    std::vector<int> ids = tokenizer_encode(tok, other);
    CHECK(tokenizer_decode(tok, ids.data(), ids.size()) == other);
    ids = tokenizer_encode(tok, text);
    CHECK(ids.size() < text.size());
    CHECK(tokenizer_decode(tok, ids.data(), ids.size()) == text);
}

TEST_CASE("tokenizer save and load give identical encodings") {
    const Tokenizer& tok = corpus_tokenizer();
    std::string path = scratch("tok.bin");
    tokenizer_save(tok, path);
    Tokenizer back = tokenizer_load(path);
    CHECK(back.vocab_size == tok.vocab_size);
    CHECK(back.eot_id == tok.eot_id);
    CHECK(back.merges == tok.merges);
    std::string text = default_corpus(30000);
    CHECK(tokenizer_encode(back, text) == tokenizer_encode(tok, text));

    std::string bytes_path = scratch("tok_bytes.bin");
    tokenizer_save(tokenizer_bytes(), bytes_path);
    Tokenizer b = tokenizer_load(bytes_path);
    CHECK(b.vocab_size == 256);
    CHECK(b.eot_id == -1);
}

TEST_CASE("bad tokenizer files are refused with the file name") {
    const Tokenizer& tok = corpus_tokenizer();
    std::string good_path = scratch("tok_good.bin");
    tokenizer_save(tok, good_path);
    std::string good = read_file(good_path);
    std::string path = scratch("tok_bad.bin");
    auto load_error = [&](const std::string& data) {
        write_file_atomic(path, data);
        return error_of([&] { tokenizer_load(path); });
    };
    auto set_int = [](std::string data, size_t index, int32_t v) {
        memcpy(&data[index * 4], &v, 4);
        return data;
    };

    std::string e = load_error(set_int(good, 0, 12345));
    CHECK(has(e, path));
    CHECK(has(e, "magic"));
    e = load_error(set_int(good, 1, 99));
    CHECK(has(e, path));
    CHECK(has(e, "version"));
    e = load_error(good.substr(0, good.size() - 4));
    CHECK(has(e, path));
    CHECK(has(e, "truncated"));
    e = load_error(good.substr(0, 10));
    CHECK(has(e, "truncated"));
    e = load_error(good + "xyz");
    CHECK(has(e, path));
    CHECK(has(e, "3 extra bytes"));
    e = load_error(set_int(good, 5 + 2 * 10, 257 + 10));  // merge 10 uses its own id
    CHECK(has(e, path));
    CHECK(has(e, "merge 10"));
    e = load_error(set_int(good, 5 + 2 * 3 + 1, 256));  // merging the end-of-text token
    CHECK(has(e, "merge 3"));
    e = load_error(set_int(good, 5 + 1, -5));
    CHECK(has(e, "merge 0"));
    e = load_error(set_int(good, 2, 700));  // vocab_size disagrees with the merge count
    CHECK(has(e, path));
    CHECK(has(e, "vocab_size 700"));
    e = load_error(set_int(good, 3, -1));
    CHECK(has(e, "eot_id"));
    CHECK(has(error_of([&] { tokenizer_load(scratch("no_such_tokenizer.bin")); }), "no_such_tokenizer.bin: cannot open"));

    // 348 bytes whose 41 merges each double the last token (2^42 bytes at the end) are refused at merge 7,
    // the first to pass 256 bytes, instead of growing until memory runs out
    std::vector<int32_t> doubling = {TOKENIZER_MAGIC, TOKENIZER_VERSION, 257 + 41, 256, 41};
    for (int i = 0; i < 41; i++) doubling.insert(doubling.end(), {i == 0 ? 'a' : 256 + i, i == 0 ? 'a' : 256 + i});
    e = load_error(std::string((const char*)doubling.data(), doubling.size() * 4));
    CHECK(doubling.size() * 4 == 348);
    CHECK(has(e, path));
    CHECK(has(e, "merge 8 makes a token of 512 bytes (at most 256)"));
}

// ----------------------------------------------------------------------------
// token files

TEST_CASE("token files of version 1 and 7 round-trip") {
    std::vector<int> small = {0, 1, 65535, 42, 7, 300};
    std::string p1 = scratch("v1.bin");
    write_token_file(p1, small, 1);
    CHECK(read_file(p1).size() == 1024 + 2 * small.size());
    CHECK(read_token_file(p1, 65536) == small);
    CHECK(read_token_file(p1, -1) == small);

    std::vector<int> big = {70000, 0, 2000000000, 5};
    std::string p7 = scratch("v7.bin");
    write_token_file(p7, big, 7);
    CHECK(read_file(p7).size() == 1024 + 4 * big.size());
    CHECK(read_token_file(p7, -1) == big);

    std::string pe = scratch("empty.bin");
    write_token_file(pe, {}, 1);
    CHECK(read_token_file(pe, 10).empty());

    CHECK(has(error_of([&] { write_token_file(scratch("x.bin"), {70000}, 1); }), "does not fit a version 1 file"));
    CHECK(has(error_of([&] { write_token_file(scratch("x.bin"), {-1}, 7); }), "does not fit"));
    CHECK(has(error_of([&] { write_token_file(scratch("x.bin"), {1}, 3); }), "version must be 1 or 7"));
}

TEST_CASE("bad token files are refused with the file name") {
    std::vector<int> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 70000};
    std::string good_path = scratch("tokens_good.bin");
    write_token_file(good_path, tokens, 7);
    std::string good = read_file(good_path);
    std::string path = scratch("tokens_bad.bin");
    auto read_error = [&](const std::string& data, int vocab) {
        write_file_atomic(path, data);
        return error_of([&] { read_token_file(path, vocab); });
    };

    std::string e = read_error("BAD!" + good.substr(4), -1);
    CHECK(has(e, path));
    CHECK(has(e, "bad magic"));
    std::string wrong_version = good;
    wrong_version[4] = 1;  // version 1 with the uint32 magic
    e = read_error(wrong_version, -1);
    CHECK(has(e, path));
    CHECK(has(e, "version 1"));
    e = read_error(good.substr(0, good.size() - 3), -1);
    CHECK(has(e, path));
    CHECK(has(e, "truncated"));
    e = read_error(good.substr(0, 100), -1);
    CHECK(has(e, path));
    CHECK(has(e, "truncated"));
    e = read_error(good + std::string(6, '\0'), -1);
    CHECK(has(e, path));
    CHECK(has(e, "has 6 extra bytes"));
    e = read_error(good, 1024);
    CHECK(e == path + ": token 70000 at position 12 is >= vocab_size 1024");
    CHECK(has(error_of([&] { read_token_file(scratch("missing.bin"), -1); }), "missing.bin: cannot open"));
}

// ----------------------------------------------------------------------------
// DataLoader

namespace {

std::vector<int> test_tokens(int n, int offset) {
    std::vector<int> t(n);
    for (int i = 0; i < n; i++) t[i] = (offset + i * 7) % 1000;
    return t;
}

// Checks a batch against the stream `all` read from offset `start`, wrapping.
void check_batch(const std::vector<int>& all, uint64_t start, const std::vector<int>& in, const std::vector<int>& tg) {
    for (size_t i = 0; i < in.size(); i++) {
        REQUIRE(in[i] == all[(start + i) % all.size()]);
        REQUIRE(tg[i] == all[(start + i + 1) % all.size()]);
    }
}

}  // namespace

TEST_CASE("DataLoader batches are the tokens shifted by one, wrapping at the end") {
    std::vector<int> all = test_tokens(50, 3);
    std::string path = scratch("dl_single.bin");
    write_token_file(path, all, 1);
    DataLoader dl;
    dataloader_open(dl, path, 2, 8, 1000);
    std::vector<int> in, tg;
    for (int k = 0; k < 12; k++) {  // 12 * 16 tokens wraps around the 50 several times
        CHECK(dataloader_position(dl) == (uint64_t)(16 * k) % 50);
        dataloader_next(dl, in, tg);
        REQUIRE(in.size() == 16);
        REQUIRE(tg.size() == 16);
        check_batch(all, (uint64_t)(16 * k) % 50, in, tg);
    }
    dataloader_reset(dl);
    dataloader_next(dl, in, tg);
    check_batch(all, 0, in, tg);
}

TEST_CASE("DataLoader position and seek resume exactly") {
    std::vector<int> all = test_tokens(1000, 0);
    std::string path = scratch("dl_resume.bin");
    write_token_file(path, all, 7);
    DataLoader a;
    dataloader_open(a, path, 3, 16, 1000);
    std::vector<int> in, tg, in2, tg2;
    for (int k = 0; k < 25; k++) dataloader_next(a, in, tg);
    uint64_t pos = dataloader_position(a);
    DataLoader b;
    dataloader_open(b, path, 3, 16, 1000);
    dataloader_seek(b, pos);
    for (int k = 0; k < 10; k++) {
        dataloader_next(a, in, tg);
        dataloader_next(b, in2, tg2);
        REQUIRE(in == in2);
        REQUIRE(tg == tg2);
    }
    CHECK(has(error_of([&] { dataloader_seek(b, 1000); }), "past the end"));
}

TEST_CASE("DataLoader walks a glob of shards as one stream") {
    std::vector<int> s0 = test_tokens(40, 1), s1 = test_tokens(33, 500);
    std::string dir = scratch("shards");
    make_dirs(dir);
    // written out of order and in different versions; the loader sorts names
    write_token_file(dir + "/part_001.bin", s1, 7);
    write_token_file(dir + "/part_000.bin", s0, 1);
    std::vector<int> all = s0;
    all.insert(all.end(), s1.begin(), s1.end());
    DataLoader dl;
    dataloader_open(dl, dir + "/part_*.bin", 2, 10, 1000);
    CHECK(dl.files.size() == 2);
    CHECK(dl.total == 73);
    std::vector<int> in, tg;
    for (int k = 0; k < 15; k++) {
        dataloader_next(dl, in, tg);
        check_batch(all, (uint64_t)(20 * k) % 73, in, tg);
    }
    // two processes: rank 1 reads the batch after rank 0's, both advance by 2*B*T
    DataLoader r0, r1;
    dataloader_open(r0, dir + "/part_*.bin", 1, 10, 1000, 0, 2);
    dataloader_open(r1, dir + "/part_*.bin", 1, 10, 1000, 1, 2);
    for (int k = 0; k < 6; k++) {
        dataloader_next(r0, in, tg);
        check_batch(all, (uint64_t)(20 * k) % 73, in, tg);
        dataloader_next(r1, in, tg);
        check_batch(all, (uint64_t)(20 * k + 10) % 73, in, tg);
    }
}

// --shuffle: each row T+1 consecutive tokens of the shard that holds the position, at offsets that vary from row
// to row and step to step; the same key and position give the same batch (resume), another key or rank another
TEST_CASE("a shuffled DataLoader reads each row at a random offset within the shard being read, exactly again on resume") {
    const int B = 4, T = 10;
    std::vector<std::vector<int>> shards = {test_tokens(300, 1), test_tokens(200, 3)};
    std::string dir = scratch("shuffled");
    make_dirs(dir);
    write_token_file(dir + "/part_000.bin", shards[0], 7);
    write_token_file(dir + "/part_001.bin", shards[1], 1);
    auto open = [&](uint64_t key, int rank) {
        DataLoader dl;
        dataloader_open(dl, dir + "/part_*.bin", B, T, 1000, rank, 2);
        dl.shuffle = true;
        dl.shuffle_key = key;
        return dl;
    };
    DataLoader dl = open(99, 0);
    std::set<std::pair<int, int>> offsets;  // (shard, offset) of every row read
    std::vector<int> in, tg;
    for (int k = 0; k < 40; k++) {
        const int shard = dataloader_position(dl) % 500 < 300 ? 0 : 1;
        dataloader_next(dl, in, tg);
        REQUIRE(in.size() == (size_t)B * T);
        REQUIRE(tg.size() == (size_t)B * T);
        const std::vector<int>& all = shards[shard];
        for (int b = 0; b < B; b++) {
            // the shard's tokens are distinct, so the row's first token says where it starts
            const int at = (int)(std::find(all.begin(), all.end(), in[b * T]) - all.begin());
            REQUIRE(at + T < (int)all.size());
            for (int t = 0; t < T; t++) {
                REQUIRE(in[b * T + t] == all[at + t]);
                REQUIRE(tg[b * T + t] == all[at + t + 1]);
            }
            offsets.insert({shard, at});
        }
    }
    // 160 rows over the 290 + 190 possible starts (the 40 positions repeat after 25 steps, the draws do not)
    CHECK(offsets.size() > 110);
    CHECK(offsets.begin()->first == 0);
    CHECK(offsets.rbegin()->first == 1);

    const uint64_t pos = dataloader_position(dl);
    DataLoader again = open(99, 0), other_key = open(100, 0), rank1 = open(99, 1);
    for (DataLoader* d : {&again, &other_key, &rank1}) dataloader_seek(*d, pos);
    std::vector<int> in2, tg2;
    dataloader_next(dl, in, tg);
    dataloader_next(again, in2, tg2);
    CHECK(in == in2);
    CHECK(tg == tg2);
    dataloader_next(other_key, in2, tg2);
    CHECK(in != in2);
    dataloader_next(rank1, in2, tg2);
    CHECK(in != in2);
}

TEST_CASE("DataLoader refuses what it cannot serve") {
    std::string path = scratch("dl_small.bin");
    write_token_file(path, test_tokens(16, 900), 1);  // ids from 900 up, wrapping at 1000
    DataLoader dl;
    std::string e = error_of([&] { dataloader_open(dl, path, 2, 8, 1000); });
    CHECK(has(e, path));
    CHECK(has(e, "16 tokens"));
    CHECK(has(e, "at least 17"));
    dataloader_open(dl, path, 3, 5, 1000);  // 16 = 3*5+1 is just enough
    e = error_of([&] { dataloader_open(dl, scratch("nothing_*.bin"), 1, 4, 1000); });
    CHECK(has(e, "nothing_*.bin"));
    CHECK(has(e, "no such file"));
    e = error_of([&] { dataloader_open(dl, path, 1, 4, 500); });
    CHECK(has(e, path));
    CHECK(has(e, ">= vocab_size 500"));
    CHECK(has(error_of([&] { dataloader_open(dl, path, 0, 4, 1000); }), "must be positive"));
}

// ----------------------------------------------------------------------------
// dataset preparation and the default corpus

TEST_CASE("prepare_dataset writes a tokenizer and token files that load back") {
    std::string text = default_corpus(60000);
    std::string dir = scratch("prepared/nested");
    prepare_dataset(text, dir, 400, 0.1);
    size_t split = (size_t)(text.size() * (1 - 0.1));
    Tokenizer tok = tokenizer_load(dir + "/tokenizer.bin");
    CHECK(tok.vocab_size == 400);
    std::vector<int> train = read_token_file(dir + "/train.bin", tok.vocab_size);
    std::vector<int> val = read_token_file(dir + "/val.bin", tok.vocab_size);
    CHECK(tokenizer_decode(tok, train.data(), train.size()) == text.substr(0, split));
    CHECK(tokenizer_decode(tok, val.data(), val.size()) == text.substr(split));
    CHECK(train.size() < split * 3 / 4);
    // the tokenizer saw only the training part
    CHECK(tok.merges == tokenizer_train(text.substr(0, split), 400).merges);

    std::string bytes_dir = scratch("prepared_bytes");
    prepare_dataset(text, bytes_dir, 256, 0.5);
    std::vector<int> bytes = read_token_file(bytes_dir + "/train.bin", 256);
    CHECK(bytes == std::vector<int>(text.begin(), text.begin() + 30000));

    CHECK(has(error_of([&] { prepare_dataset(text, dir, 400, 1.0); }), "val_fraction"));
    CHECK(has(error_of([&] { prepare_dataset("x", dir, 400, 0.1); }), "too short"));
}

TEST_CASE("default corpus is deterministic, sized exactly, and varied") {
    std::string a = default_corpus(100000), b = default_corpus(100000);
    CHECK(a == b);
    CHECK(a.size() == 100000);
    CHECK(default_corpus(5000) == a.substr(0, 5000));
    CHECK(has(a, " plus "));
    CHECK(has(a, "\n\n"));
    CHECK(has(a, "Hello, "));
    // plenty of distinct paragraphs: not a handful repeated
    std::vector<std::string> paragraphs;
    for (size_t at = 0, end; (end = a.find("\n\n", at)) != std::string::npos; at = end + 2)
        paragraphs.push_back(a.substr(at, end - at));
    size_t n = paragraphs.size();
    std::sort(paragraphs.begin(), paragraphs.end());
    paragraphs.erase(std::unique(paragraphs.begin(), paragraphs.end()), paragraphs.end());
    CHECK(n > 200);
    CHECK(paragraphs.size() > n * 9 / 10);
}
