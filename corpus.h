// corpus.h — the generated default corpus that ./train and data/prepare --default use when no text is given:
// English-like paragraphs from a small fixed-seed grammar — little stories, arithmetic, counting, dialogues
// and facts. The facts are consistent (sums are right, a bird can fly, a horse is bigger than a cat, the noun
// a story introduces comes back) so a small model has something to learn beyond word frequencies, and the
// combinations vary enough not to be memorised.
#pragma once

#include <algorithm>
#include <cstring>
#include <string>

#include "common.h"

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
