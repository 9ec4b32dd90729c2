// safetensors.h — reading and writing Hugging Face's safetensors format, the weight file of a checkpoint.
//
// Layout: 8-byte little-endian header length N, N bytes of JSON header
//   {"__metadata__": {"k": "v", ...},
//    "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
// then the data buffer; offsets are relative to the buffer's start. Like the reference writer we pad the
// header with spaces to a multiple of 8 bytes so the buffer starts aligned. Reading checks everything a
// damaged or foreign file can get wrong before touching the data, and converts every tensor to fp32.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <sys/stat.h>

#include "common.h"
#include "fileutil.h"
#include "fp8.cuh"
#include "json.h"

// Tensor bytes are copied to and from memory as they are, which is right only on a
// little-endian host (x86, ARM as configured everywhere CUDA runs).
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.h assumes a little-endian host"
#endif

struct SafeTensor {
    std::string name;
    std::string dtype;           // "F32", "BF16" or "F8_E4M3" (the values must be E4M3's); also "F16" when read
    std::vector<int64_t> shape;
    std::vector<float> data;     // values converted to fp32
};

struct SafeTensorsFile {
    std::string path;
    std::vector<SafeTensor> tensors;                              // in header order
    std::vector<std::pair<std::string, std::string>> metadata;    // "__metadata__", in header order
    std::unordered_map<std::string, size_t> index;                // name -> tensors[i]; built by safetensors_read
    const SafeTensor* find(const std::string& name) const {
        auto it = index.find(name);
        return it == index.end() ? nullptr : &tensors[it->second];
    }
};

// The reference implementation refuses larger headers; one bigger than this is a
// corrupt length field, not a real header, and must not make us allocate gigabytes.
constexpr uint64_t SAFETENSORS_MAX_HEADER = 100000000;

// bytes per element, 0 for dtypes we cannot convert
inline int safetensors_dtype_size(const std::string& dtype) {
    if (dtype == "F32") return 4;
    if (dtype == "BF16" || dtype == "F16") return 2;
    if (dtype == "F8_E4M3") return 1;
    return 0;
}

// IEEE half -> float, exactly (every half is representable as a float)
inline float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {  // zero or subnormal: mant * 2^-24
        float f = std::ldexp((float)mant, -24);
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {  // inf or NaN
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// ----------------------------------------------------------------------------
// writing

// Writes tensors in the given order, each as F32 (bit-exact) or BF16 (round to
// nearest even), atomically: a crash leaves the old file or the new, never a mix.
inline void safetensors_write(const std::string& path, const std::vector<SafeTensor>& tensors,
                              const std::vector<std::pair<std::string, std::string>>& metadata = {}) {
    std::string header = "{";
    if (!metadata.empty()) {
        std::unordered_set<std::string> keys;
        header += "\"__metadata__\":{";
        for (size_t i = 0; i < metadata.size(); i++) {
            if (!keys.insert(metadata[i].first).second)
                fail("%s: duplicate metadata key '%s'", path.c_str(), metadata[i].first.c_str());
            header += (i ? "," : "") + json_quote(metadata[i].first) + ":" + json_quote(metadata[i].second);
        }
        header += "}";
    }
    std::unordered_set<std::string> names;
    uint64_t offset = 0;
    for (const SafeTensor& t : tensors) {
        const char* name = t.name.c_str();
        if (t.name == "__metadata__") fail("%s: '__metadata__' is reserved and cannot name a tensor", path.c_str());
        if (!names.insert(t.name).second) fail("%s: duplicate tensor name '%s'", path.c_str(), name);
        if (t.dtype != "F32" && t.dtype != "BF16" && t.dtype != "F8_E4M3")
            fail("%s: tensor '%s' has dtype '%s' (can write F32, BF16 or F8_E4M3)", path.c_str(), name, t.dtype.c_str());
        uint64_t numel = 1;
        for (int64_t d : t.shape) {
            if (d < 0) fail("%s: tensor '%s' has negative shape %s", path.c_str(), name, shape_str(t.shape).c_str());
            numel *= (uint64_t)d;
        }
        if (numel != t.data.size())
            fail("%s: tensor '%s' has shape %s (%llu values) but %zu values", path.c_str(), name,
                 shape_str(t.shape).c_str(), (unsigned long long)numel, t.data.size());
        uint64_t nbytes = numel * safetensors_dtype_size(t.dtype);
        std::string shape = "[";
        for (size_t i = 0; i < t.shape.size(); i++) shape += (i ? "," : "") + std::to_string(t.shape[i]);
        shape += "]";
        header += (header.size() > 1 ? "," : "") + json_quote(t.name) + ":{\"dtype\":\"" + t.dtype +
                  "\",\"shape\":" + shape + ",\"data_offsets\":[" + std::to_string(offset) + "," +
                  std::to_string(offset + nbytes) + "]}";
        offset += nbytes;
    }
    header += "}";
    header.append((8 - header.size() % 8) % 8, ' ');

    std::string tmp;
    FILE* f = atomic_file_open(path, tmp);
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)header.size() >> (8 * i));
    atomic_file_write(f, tmp, len, 8);
    atomic_file_write(f, tmp, header.data(), header.size());
    std::vector<uint16_t> buf;
    for (const SafeTensor& t : tensors) {
        if (t.dtype == "F32") {
            atomic_file_write(f, tmp, t.data.data(), t.data.size() * sizeof(float));
            continue;
        }
        if (t.dtype == "F8_E4M3") {
            std::vector<uint8_t> codes(t.data.size());
            for (size_t i = 0; i < codes.size(); i++) codes[i] = fp8_encode(t.data[i], FP8_E4M3);
            atomic_file_write(f, tmp, codes.data(), codes.size());
            continue;
        }
        // convert in chunks so a big embedding does not need a second full copy
        const size_t chunk = 1 << 16;
        for (size_t i = 0; i < t.data.size(); i += chunk) {
            size_t n = std::min(chunk, t.data.size() - i);
            buf.resize(n);
            for (size_t k = 0; k < n; k++) buf[k] = float_to_bf16(t.data[i + k]);
            atomic_file_write(f, tmp, buf.data(), n * sizeof(uint16_t));
        }
    }
    atomic_file_close(f, tmp, path);
}

// ----------------------------------------------------------------------------
// reading

// a non-negative integer that a double holds exactly
inline bool safetensors_uint(const JsonValue& v, uint64_t& out) {
    if (v.type != JsonValue::Number || v.number < 0 || v.number > 9007199254740992.0 || v.number != std::floor(v.number))
        return false;
    out = (uint64_t)v.number;
    return true;
}

inline void safetensors_read_exact(FILE* f, const std::string& path, void* dst, size_t n) {
    if (n > 0 && fread(dst, 1, n, f) != n) {
        int err = errno;
        bool eof = feof(f);
        fclose(f);
        if (eof) fail("%s: unexpected end of file", path.c_str());
        fail("%s: read error (%s)", path.c_str(), strerror(err));
    }
}

inline SafeTensorsFile safetensors_read(const std::string& path) {
    const char* p = path.c_str();
    SafeTensorsFile out;
    out.path = path;
    FILE* f = fopen(p, "rb");
    if (!f) fail("%s: cannot open (%s)", p, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        int err = errno;
        fclose(f);
        fail("%s: cannot stat (%s)", p, strerror(err));
    }
    uint64_t file_size = (uint64_t)st.st_size;
    auto bad = [&](const std::string& what) {
        fclose(f);
        fail("%s: %s", p, what.c_str());
    };
    if (file_size < 8) bad(strfmt("file is %llu bytes, too short for a safetensors header", (unsigned long long)file_size));
    unsigned char len[8];
    safetensors_read_exact(f, path, len, 8);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | len[i];
    if (n > SAFETENSORS_MAX_HEADER)
        bad(strfmt("header length %llu is not sane (limit %llu; not a safetensors file?)", (unsigned long long)n,
                   (unsigned long long)SAFETENSORS_MAX_HEADER));
    if (n > file_size - 8)
        bad(strfmt("header length %llu runs past the end of the file (%llu bytes)", (unsigned long long)n,
                   (unsigned long long)file_size));
    std::string text(n, '\0');
    safetensors_read_exact(f, path, &text[0], n);
    uint64_t buffer_size = file_size - 8 - n;

    JsonValue root;
    std::string err;
    if (!json_parse(text, root, err)) bad("invalid JSON header: " + err);
    if (root.type != JsonValue::Object) bad("header is not a JSON object");

    struct Span {
        uint64_t begin, end;
        size_t tensor;
    };
    std::vector<Span> spans;
    for (const auto& m : root.members) {
        const std::string& name = m.first;
        const JsonValue& v = m.second;
        const char* nm = name.c_str();
        if (name == "__metadata__") {
            if (v.type != JsonValue::Object) bad("__metadata__ is not an object");
            for (const auto& kv : v.members) {
                if (kv.second.type != JsonValue::String) bad("__metadata__ value '" + kv.first + "' is not a string");
                out.metadata.emplace_back(kv.first, kv.second.str);
            }
            continue;
        }
        if (v.type != JsonValue::Object) bad(strfmt("tensor '%s': header entry is not an object", nm));
        const JsonValue* dtype = v.get("dtype");
        const JsonValue* shape = v.get("shape");
        const JsonValue* offsets = v.get("data_offsets");
        if (!dtype || dtype->type != JsonValue::String) bad(strfmt("tensor '%s': missing or non-string dtype", nm));
        if (!shape || shape->type != JsonValue::Array) bad(strfmt("tensor '%s': missing or non-array shape", nm));
        if (!offsets || offsets->type != JsonValue::Array || offsets->items.size() != 2)
            bad(strfmt("tensor '%s': data_offsets must be [begin, end]", nm));
        int elem = safetensors_dtype_size(dtype->str);
        if (elem == 0)
            bad(strfmt("tensor '%s' has dtype %s; only F32, BF16, F16 and F8_E4M3 are supported", nm, dtype->str.c_str()));
        SafeTensor t;
        t.name = name;
        t.dtype = dtype->str;
        uint64_t numel = 1;
        for (const JsonValue& d : shape->items) {
            uint64_t dim;
            // the bound keeps numel * elem from overflowing 64 bits
            if (!safetensors_uint(d, dim)) bad(strfmt("tensor '%s': shape entries must be non-negative integers", nm));
            if (dim != 0 && numel > (1ull << 60) / dim) bad(strfmt("tensor '%s': shape is impossibly large", nm));
            numel *= dim;
            t.shape.push_back((int64_t)dim);
        }
        Span s;
        if (!safetensors_uint(offsets->items[0], s.begin) || !safetensors_uint(offsets->items[1], s.end) || s.begin > s.end)
            bad(strfmt("tensor '%s': data_offsets must be non-negative integers with begin <= end", nm));
        if (s.end - s.begin != numel * elem)
            bad(strfmt("tensor '%s': data_offsets span %llu bytes but shape %s of %s needs %llu", nm,
                       (unsigned long long)(s.end - s.begin), shape_str(t.shape).c_str(), t.dtype.c_str(),
                       (unsigned long long)(numel * elem)));
        if (s.end > buffer_size)
            bad(strfmt("tensor '%s': data_offsets [%llu, %llu] run past the end of the data (%llu bytes): "
                       "file truncated or offsets wrong", nm, (unsigned long long)s.begin, (unsigned long long)s.end,
                       (unsigned long long)buffer_size));
        s.tensor = out.tensors.size();
        out.index[name] = out.tensors.size();
        out.tensors.push_back(std::move(t));
        spans.push_back(s);
    }

    // the tensors must tile the buffer exactly: no overlap, no gap, nothing after
    std::sort(spans.begin(), spans.end(),
              [](const Span& a, const Span& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
    uint64_t expect = 0;
    for (size_t i = 0; i < spans.size(); i++) {
        const char* nm = out.tensors[spans[i].tensor].name.c_str();
        if (spans[i].begin < expect)
            bad(strfmt("tensors '%s' and '%s' overlap in the data buffer",
                       out.tensors[spans[i - 1].tensor].name.c_str(), nm));
        if (spans[i].begin > expect)
            bad(strfmt("unused bytes %llu..%llu in the data buffer before tensor '%s'", (unsigned long long)expect,
                       (unsigned long long)spans[i].begin, nm));
        expect = spans[i].end;
    }
    if (expect != buffer_size)
        bad(strfmt("%llu unused bytes after the last tensor", (unsigned long long)(buffer_size - expect)));

    // spans are now in file order, so the data is read front to back
    std::vector<uint16_t> half;
    for (const Span& s : spans) {
        SafeTensor& t = out.tensors[s.tensor];
        size_t nbytes = s.end - s.begin;
        if (t.dtype == "F32") {
            t.data.resize(nbytes / 4);
            safetensors_read_exact(f, path, t.data.data(), nbytes);
            continue;
        }
        if (t.dtype == "F8_E4M3") {
            std::vector<uint8_t> codes(nbytes);
            safetensors_read_exact(f, path, codes.data(), nbytes);
            t.data.resize(nbytes);
            for (size_t i = 0; i < nbytes; i++) t.data[i] = fp8_decode(codes[i], FP8_E4M3);
            continue;
        }
        half.resize(nbytes / 2);
        t.data.resize(nbytes / 2);
        safetensors_read_exact(f, path, half.data(), nbytes);
        bool bf16 = t.dtype == "BF16";
        for (size_t i = 0; i < half.size(); i++) t.data[i] = bf16 ? bf16_to_float(half[i]) : f16_to_float(half[i]);
    }
    fclose(f);
    return out;
}

// Copies tensor `name` into dst after checking that it exists and has exactly `shape`.
inline void safetensors_take(const SafeTensorsFile& f, const std::string& name, const std::vector<int64_t>& shape,
                             float* dst) {
    const SafeTensor* t = f.find(name);
    if (!t) fail("%s: missing tensor '%s'", f.path.c_str(), name.c_str());
    if (t->shape != shape)
        fail("%s: tensor '%s' has shape %s but the config needs %s", f.path.c_str(), name.c_str(),
             shape_str(t->shape).c_str(), shape_str(shape).c_str());
    std::copy(t->data.begin(), t->data.end(), dst);
}
