// cli.h — GNU-style long options for the binaries: "--name value" or "--name=value", flags without values,
// and one-line errors for unknown options and malformed numbers. Each binary walks its arguments like this:
//
//   CliParser cli{argc, argv};
//   while (cli_next(cli)) {
//       if (cli.name == "--steps") steps = cli_int(cli, 1, 1 << 30);
//       else if (cli.name == "--help") { print_usage(); return 0; }
//       else cli_unknown(cli);
//   }
#pragma once

#include <climits>
#include <cstdlib>
#include <string>

#include "common.h"

struct CliParser {
    int argc;
    char** argv;
    int i = 0;             // index of the current option
    std::string name;      // "--steps"
    std::string inline_value;
    bool has_inline_value = false;
    std::vector<std::string> positional;  // arguments that are not options, in order
};

// advances to the next option; false when none are left
inline bool cli_next(CliParser& p) {
    while (++p.i < p.argc) {
        std::string a = p.argv[p.i];
        if (a.size() < 3 || a.compare(0, 2, "--") != 0) {
            if (a.size() >= 2 && a[0] == '-' && a != "-") {
                if (a == "-h") {
                    p.name = "--help";
                    p.has_inline_value = false;
                    return true;
                }
                fail("unknown option '%s' (options are GNU-style --long-names; see --help)", a.c_str());
            }
            p.positional.push_back(a);
            continue;
        }
        size_t eq = a.find('=');
        p.has_inline_value = eq != std::string::npos;
        p.name = a.substr(0, eq);
        p.inline_value = p.has_inline_value ? a.substr(eq + 1) : "";
        return true;
    }
    return false;
}

// the option's value, from "--name=value" or the next argument
inline std::string cli_value(CliParser& p) {
    if (p.has_inline_value) return p.inline_value;
    if (p.i + 1 >= p.argc) fail("option %s needs a value", p.name.c_str());
    return p.argv[++p.i];
}

inline long long cli_int(CliParser& p, long long lo, long long hi) {
    std::string v = cli_value(p);
    char* end = nullptr;
    errno = 0;
    long long x = strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end || errno) fail("option %s: '%s' is not an integer", p.name.c_str(), v.c_str());
    if (x < lo || x > hi) fail("option %s: %lld is outside %lld..%lld", p.name.c_str(), x, lo, hi);
    return x;
}

inline double cli_float(CliParser& p, double lo, double hi) {
    std::string v = cli_value(p);
    char* end = nullptr;
    double x = strtod(v.c_str(), &end);
    if (v.empty() || *end || !std::isfinite(x)) fail("option %s: '%s' is not a number", p.name.c_str(), v.c_str());
    if (x < lo || x > hi) fail("option %s: %g is outside %g..%g", p.name.c_str(), x, lo, hi);
    return x;
}

// a flag must not be given a value; true, for `quiet = cli_flag(cli);`
inline bool cli_flag(CliParser& p) {
    if (p.has_inline_value) fail("option %s takes no value", p.name.c_str());
    return true;
}

// --help: prints the usage; returns run()'s exit status, 0
inline int cli_help(CliParser& p, const char* usage) {
    cli_flag(p);
    printf("%s", usage);
    return 0;
}

[[noreturn]] inline void cli_unknown(const CliParser& p) {
    fail("unknown option '%s' (see --help)", p.name.c_str());
}

// --device auto|cpu|gpu
inline std::string cli_device(CliParser& p) {
    std::string d = cli_value(p);
    if (d != "auto" && d != "cpu" && d != "gpu") fail("option %s: '%s' must be auto, cpu or gpu", p.name.c_str(), d.c_str());
    return d;
}

// Every binary's main(): runs run(argc, argv) and turns an exception into the
// one-line "error: ..." on stderr and exit status 1.
inline int cli_main(int (*run)(int, char**), int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {
        fflush(stdout);
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
