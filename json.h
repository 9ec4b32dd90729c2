// json.h — a small strict JSON (RFC 8259) parser and a string quoter, enough for config.json, tokenizer files
// and safetensors headers.
//
// Strict means: no comments, no trailing commas, no leading zeros, no NaN/Infinity, no raw control characters
// in strings, no unpaired surrogates, no duplicate keys, nothing but whitespace after the value. Errors say
// where (line and column, both from 1, columns in bytes) and what.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "common.h"

struct JsonValue {
    enum Type { Null, Bool, Number, String, Array, Object } type = Null;
    bool boolean = false;
    double number = 0;
    std::string str;  // a String's text; a Number's text as written (exact past 2^53)
    std::vector<JsonValue> items;                               // Array
    std::vector<std::pair<std::string, JsonValue>> members;     // Object, in file order
    const JsonValue* get(const std::string& key) const;         // nullptr when absent or not an object
};

// Linear: objects read this way are small. Callers with thousands of keys (the
// safetensors header) build their own index over `members`.
inline const JsonValue* JsonValue::get(const std::string& key) const {
    if (type != Object) return nullptr;
    for (const auto& m : members)
        if (m.first == key) return &m.second;
    return nullptr;
}

// A float field: %.9g (round-trips a float), with ".0" kept on whole numbers, because readers with typed
// configs (transformers' strict dataclasses) refuse an integer where a float belongs.
inline std::string json_float(double v) {
    std::string s = strfmt("%.9g", v);
    if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
    return s;
}

// A JSON string literal for s. Bytes >= 0x80 pass through, so UTF-8 stays UTF-8.
inline std::string json_quote(const std::string& s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) out += strfmt("\\u%04x", c);
                else out += (char)c;
        }
    }
    return out + "\"";
}

// ----------------------------------------------------------------------------
// parser internals

// Deep enough for any real file, shallow enough that recursion cannot overflow the stack.
constexpr int JSON_MAX_DEPTH = 256;

struct JsonParser {
    const std::string& text;
    size_t pos = 0;
    std::string error;  // first error wins; empty while parsing succeeds
    size_t error_pos = 0;
};

inline bool json_error(JsonParser& p, size_t at, const std::string& what) {
    if (p.error.empty()) {
        p.error = what;
        p.error_pos = at;
    }
    return false;
}

inline void json_skip_ws(JsonParser& p) { p.pos = std::min(p.text.find_first_not_of(" \t\n\r", p.pos), p.text.size()); }

// names a byte for error messages
inline std::string json_describe(const JsonParser& p, size_t at) {
    if (at >= p.text.size()) return "end of input";
    unsigned char c = (unsigned char)p.text[at];
    if (c >= 0x20 && c < 0x7f) return strfmt("'%c'", c);
    return strfmt("byte 0x%02x", c);
}

inline bool json_literal(JsonParser& p, const char* word) {
    size_t n = strlen(word);
    if (p.text.compare(p.pos, n, word) != 0) return json_error(p, p.pos, "unexpected " + json_describe(p, p.pos));
    p.pos += n;
    return true;
}

inline bool json_number(JsonParser& p, double& out) {
    const std::string& t = p.text;
    size_t start = p.pos, i = p.pos;
    auto digit = [&](size_t k) { return k < t.size() && t[k] >= '0' && t[k] <= '9'; };
    if (i < t.size() && t[i] == '-') i++;
    if (!digit(i)) return json_error(p, i, "invalid number: expected a digit, got " + json_describe(p, i));
    if (t[i] == '0') {
        i++;
        if (digit(i)) return json_error(p, start, "invalid number: leading zeros are not allowed");
    } else {
        while (digit(i)) i++;
    }
    if (i < t.size() && t[i] == '.') {
        i++;
        if (!digit(i)) return json_error(p, i, "invalid number: expected a digit after '.'");
        while (digit(i)) i++;
    }
    if (i < t.size() && (t[i] == 'e' || t[i] == 'E')) {
        i++;
        if (i < t.size() && (t[i] == '+' || t[i] == '-')) i++;
        if (!digit(i)) return json_error(p, i, "invalid number: expected a digit in the exponent");
        while (digit(i)) i++;
    }
    // the grammar above already matched, so strtod consumes exactly this token
    std::string token = t.substr(start, i - start);
    errno = 0;
    out = std::strtod(token.c_str(), nullptr);
    if (errno == ERANGE && std::isinf(out)) return json_error(p, start, "number " + token + " is out of range");
    p.pos = i;
    return true;
}

inline void json_append_utf8(std::string& s, uint32_t cp) {
    if (cp < 0x80) {
        s += (char)cp;
    } else if (cp < 0x800) {
        s += (char)(0xC0 | (cp >> 6));
        s += (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        s += (char)(0xE0 | (cp >> 12));
        s += (char)(0x80 | ((cp >> 6) & 0x3F));
        s += (char)(0x80 | (cp & 0x3F));
    } else {
        s += (char)(0xF0 | (cp >> 18));
        s += (char)(0x80 | ((cp >> 12) & 0x3F));
        s += (char)(0x80 | ((cp >> 6) & 0x3F));
        s += (char)(0x80 | (cp & 0x3F));
    }
}

// reads the 4 hex digits after "\u" at p.pos
inline bool json_hex4(JsonParser& p, uint32_t& out) {
    out = 0;
    for (int k = 0; k < 4; k++) {
        size_t at = p.pos + k;
        char c = at < p.text.size() ? p.text[at] : 0;
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (v < 0) return json_error(p, at, "invalid \\u escape: expected 4 hex digits");
        out = out * 16 + (uint32_t)v;
    }
    p.pos += 4;
    return true;
}

// p.pos is at the opening quote
inline bool json_string(JsonParser& p, std::string& out) {
    const std::string& t = p.text;
    size_t open = p.pos++;
    out.clear();
    while (true) {
        if (p.pos >= t.size()) return json_error(p, open, "unterminated string");
        unsigned char c = (unsigned char)t[p.pos];
        if (c == '"') {
            p.pos++;
            return true;
        }
        if (c < 0x20) return json_error(p, p.pos, strfmt("raw control character 0x%02x in string (use an escape)", c));
        if (c != '\\') {
            out += (char)c;
            p.pos++;
            continue;
        }
        size_t esc = p.pos++;
        if (p.pos >= t.size()) return json_error(p, open, "unterminated string");
        char e = t[p.pos++];
        switch (e) {
            case '"': out += '"'; break;
            case '\\': out += '\\'; break;
            case '/': out += '/'; break;
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'u': {
                uint32_t cp;
                if (!json_hex4(p, cp)) return false;
                if (cp >= 0xDC00 && cp <= 0xDFFF) return json_error(p, esc, "unpaired low surrogate in \\u escape");
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    // a high surrogate must be followed by an escaped low surrogate
                    if (t.compare(p.pos, 2, "\\u") != 0) return json_error(p, esc, "unpaired high surrogate in \\u escape");
                    p.pos += 2;
                    uint32_t lo;
                    if (!json_hex4(p, lo)) return false;
                    if (lo < 0xDC00 || lo > 0xDFFF) return json_error(p, esc, "unpaired high surrogate in \\u escape");
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                json_append_utf8(out, cp);
                break;
            }
            default: return json_error(p, esc, "invalid escape " + json_describe(p, esc + 1) + " after '\\'");
        }
    }
}

inline bool json_value(JsonParser& p, JsonValue& out, int depth);

// p.pos is at '[' or '{'
inline bool json_container(JsonParser& p, JsonValue& out, int depth) {
    bool is_object = p.text[p.pos] == '{';
    char close = is_object ? '}' : ']';
    if (depth >= JSON_MAX_DEPTH) return json_error(p, p.pos, strfmt("nesting deeper than %d levels", JSON_MAX_DEPTH));
    out.type = is_object ? JsonValue::Object : JsonValue::Array;
    p.pos++;
    json_skip_ws(p);
    if (p.pos < p.text.size() && p.text[p.pos] == close) {
        p.pos++;
        return true;
    }
    std::unordered_set<std::string> keys;
    while (true) {
        if (is_object) {
            if (p.pos >= p.text.size() || p.text[p.pos] != '"')
                return json_error(p, p.pos, "expected a string key, got " + json_describe(p, p.pos));
            size_t key_pos = p.pos;
            std::string key;
            if (!json_string(p, key)) return false;
            if (!keys.insert(key).second) return json_error(p, key_pos, "duplicate key " + json_quote(key));
            json_skip_ws(p);
            if (p.pos >= p.text.size() || p.text[p.pos] != ':')
                return json_error(p, p.pos, "expected ':' after object key, got " + json_describe(p, p.pos));
            p.pos++;
            out.members.emplace_back(std::move(key), JsonValue());
            if (!json_value(p, out.members.back().second, depth + 1)) return false;
        } else {
            out.items.emplace_back();
            if (!json_value(p, out.items.back(), depth + 1)) return false;
        }
        json_skip_ws(p);
        if (p.pos < p.text.size() && p.text[p.pos] == close) {
            p.pos++;
            return true;
        }
        if (p.pos >= p.text.size() || p.text[p.pos] != ',')
            return json_error(p, p.pos, strfmt("expected ',' or '%c', got ", close) + json_describe(p, p.pos));
        size_t comma = p.pos++;
        json_skip_ws(p);
        if (p.pos < p.text.size() && p.text[p.pos] == close)
            return json_error(p, comma, strfmt("trailing comma before '%c'", close));
    }
}

inline bool json_value(JsonParser& p, JsonValue& out, int depth) {
    json_skip_ws(p);
    out = JsonValue();
    if (p.pos >= p.text.size()) return json_error(p, p.pos, "unexpected end of input, expected a value");
    char c = p.text[p.pos];
    switch (c) {
        case '{':
        case '[': return json_container(p, out, depth);
        case '"': out.type = JsonValue::String; return json_string(p, out.str);
        case 't': out.type = JsonValue::Bool; out.boolean = true; return json_literal(p, "true");
        case 'f': out.type = JsonValue::Bool; out.boolean = false; return json_literal(p, "false");
        case 'n': out.type = JsonValue::Null; return json_literal(p, "null");
        default:
            if (c == '-' || (c >= '0' && c <= '9')) {
                out.type = JsonValue::Number;
                const size_t start = p.pos;
                if (!json_number(p, out.number)) return false;
                out.str = p.text.substr(start, p.pos - start);
                return true;
            }
            return json_error(p, p.pos, "unexpected " + json_describe(p, p.pos) + ", expected a value");
    }
}

// ----------------------------------------------------------------------------

// Parses all of `text` into `out`. On failure returns false and sets `error` to
// "<what> at line L, column C"; `out` is then unspecified.
inline bool json_parse(const std::string& text, JsonValue& out, std::string& error) {
    JsonParser p{text, 0, "", 0};
    bool ok = json_value(p, out, 0);
    if (ok) {
        json_skip_ws(p);
        if (p.pos < text.size()) ok = json_error(p, p.pos, "unexpected " + json_describe(p, p.pos) + " after the JSON value");
    }
    if (ok) return true;
    size_t line = 1, line_start = 0;
    for (size_t i = 0; i < p.error_pos && i < text.size(); i++)
        if (text[i] == '\n') line++, line_start = i + 1;
    error = strfmt("%s at line %zu, column %zu", p.error.c_str(), line, p.error_pos - line_start + 1);
    return false;
}
