// common.h — small utilities shared by every file: error reporting, string formatting, a counter-based random number
// generator, bf16 conversion, timing.
//
// Library code never exits: bad input throws std::runtime_error with a one-line message that names the file/flag and
// the problem. Each binary's main() catches it, prints "error: <message>" and exits with status 1.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

// printf-style formatting into a std::string
inline std::string vstrfmt(const char* fmt, va_list args) {
    va_list copy;
    va_copy(copy, args);
    int n = vsnprintf(nullptr, 0, fmt, copy);
    va_end(copy);
    std::string s(n > 0 ? n : 0, '\0');
    if (n > 0) vsnprintf(&s[0], n + 1, fmt, args);
    return s;
}

inline std::string strfmt(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::string s = vstrfmt(fmt, args);
    va_end(args);
    return s;
}

// throws std::runtime_error with a printf-style message
[[noreturn]] inline void fail(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::string s = vstrfmt(fmt, args);
    va_end(args);
    throw std::runtime_error(s);
}

// a tensor shape as "[2, 3]"
inline std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// the machine's physical memory, for refusing a model or a batch that cannot fit before allocating it
inline double host_memory_bytes() { return (double)sysconf(_SC_PHYS_PAGES) * sysconf(_SC_PAGE_SIZE); }

// Functions marked HD run on the host and, compiled by nvcc, on the device too, so
// the CPU reference and the kernels draw the same random numbers.
#ifdef __CUDACC__
#define HD __host__ __device__
#else
#define HD
#endif

// ----------------------------------------------------------------------------
// Counter-based RNG. A pure function of (key, counter), so any element of a random stream can be drawn in any
// order, on any thread or device, and a run can resume from a step number alone. SplitMix64's finaliser is a
// good enough mixer for initialisation, dropout masks and sampling.

HD inline uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

HD inline uint64_t rng_hash(uint64_t key, uint64_t counter) { return mix64(mix64(key) ^ counter); }

// uniform in [0, 1) with 24 random bits
HD inline float rng_uniform(uint64_t key, uint64_t counter) {
    return (float)(rng_hash(key, counter) >> 40) * (1.0f / 16777216.0f);
}

// standard normal by Box-Muller from two counters
inline double rng_normal(uint64_t key, uint64_t counter) {
    double u1 = ((rng_hash(key, 2 * counter) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (rng_hash(key, 2 * counter + 1) >> 11) * (1.0 / 9007199254740992.0);
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

// A sequential stream on top of the counter RNG, for host-side sampling.
struct Rng {
    uint64_t key;
    uint64_t counter;
    float uniform() { return rng_uniform(key, counter++); }
    double normal() { return rng_normal(key, counter++); }
};

// ----------------------------------------------------------------------------
// bf16 <-> fp32 (round to nearest even; NaN stays NaN)

inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// ----------------------------------------------------------------------------

inline double now_seconds() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

inline bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
