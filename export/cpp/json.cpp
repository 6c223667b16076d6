#include "json.h"

#include <charconv>
#include <cmath>
#include <system_error>

namespace fastjanus::json {

namespace {

// Deep enough for any manifest, shallow enough that hostile nesting cannot overflow the stack.
constexpr int kMaxDepth = 200;

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value document() {
    skip_ws();
    Value v = value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  const std::string& s_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < pos_ && i < s_.size(); ++i) {
      if (s_[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    throw ParseError(what + " at line " + std::to_string(line) + ", column " + std::to_string(col));
  }

  bool at_end() const { return pos_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[pos_]; }

  void skip_ws() {
    while (!at_end() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }

  void expect_word(const char* word) {
    for (const char* p = word; *p; ++p, ++pos_) {
      if (at_end() || s_[pos_] != *p) fail(std::string("invalid literal (expected '") + word + "')");
    }
  }

  Value value(int depth) {
    if (depth > kMaxDepth) fail("nesting too deep");
    Value v;
    switch (peek()) {
      case '{': object(v, depth); break;
      case '[': array(v, depth); break;
      case '"':
        v.type = Value::Type::String;
        v.string = string();
        break;
      case 't':
        expect_word("true");
        v.type = Value::Type::Bool;
        v.boolean = true;
        break;
      case 'f':
        expect_word("false");
        v.type = Value::Type::Bool;
        break;
      case 'n': expect_word("null"); break;
      case '\0':
        if (at_end()) fail("unexpected end of input");
        fail("unexpected character");
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) {
          number(v);
        } else {
          fail(std::string("unexpected character '") + peek() + "'");
        }
    }
    return v;
  }

  void object(Value& v, int depth) {
    v.type = Value::Type::Object;
    ++pos_;  // '{'
    skip_ws();
    if (peek() == '}') {
      ++pos_;
      return;
    }
    for (;;) {
      skip_ws();
      if (peek() != '"') fail("expected a string key");
      std::string key = string();
      for (const auto& kv : v.object) {
        if (kv.first == key) fail("duplicate key \"" + key + "\"");
      }
      skip_ws();
      if (peek() != ':') fail("expected ':'");
      ++pos_;
      skip_ws();
      Value item = value(depth + 1);
      v.object.emplace_back(std::move(key), std::move(item));
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        return;
      }
      fail("expected ',' or '}'");
    }
  }

  void array(Value& v, int depth) {
    v.type = Value::Type::Array;
    ++pos_;  // '['
    skip_ws();
    if (peek() == ']') {
      ++pos_;
      return;
    }
    for (;;) {
      skip_ws();
      v.array.push_back(value(depth + 1));
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        return;
      }
      fail("expected ',' or ']'");
    }
  }

  unsigned hex4() {
    unsigned u = 0;
    for (int i = 0; i < 4; ++i, ++pos_) {
      char c = peek();
      u <<= 4;
      if (c >= '0' && c <= '9') {
        u |= unsigned(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        u |= unsigned(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        u |= unsigned(c - 'A' + 10);
      } else {
        fail("invalid \\u escape (expected 4 hex digits)");
      }
    }
    return u;
  }

  static void put_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  std::string string() {
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (at_end()) fail("unterminated string");
      char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) {
        --pos_;
        fail("control character in a string (must be escaped)");
      }
      if (c != '\\') {
        out += c;  // UTF-8 bytes pass through unchanged
        continue;
      }
      if (at_end()) fail("unterminated string");
      char e = s_[pos_++];
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
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            // a high surrogate must be followed by an escaped low one; together they are one code point
            if (peek() != '\\' || pos_ + 1 >= s_.size() || s_[pos_ + 1] != 'u') fail("unpaired surrogate in \\u escape");
            pos_ += 2;
            unsigned lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("invalid low surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("unpaired surrogate in \\u escape");
          }
          put_utf8(out, cp);
          break;
        }
        default:
          --pos_;
          fail(std::string("invalid escape '\\") + e + "'");
      }
    }
  }

  void number(Value& v) {
    // Check the JSON grammar first: from_chars alone would accept forms JSON forbids (leading zeros, "1.").
    const size_t start = pos_;
    bool integral = true;
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++pos_;
    } else {
      fail("invalid number");
    }
    if (peek() == '.') {
      integral = false;
      ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) fail("invalid number (digits must follow '.')");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    if (peek() == 'e' || peek() == 'E') {
      integral = false;
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) fail("invalid number (digits must follow the exponent)");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    const char* b = s_.data() + start;
    const char* e = s_.data() + pos_;
    v.type = Value::Type::Number;
    // from_chars is locale-independent, unlike strtod
    auto r = std::from_chars(b, e, v.number);
    if (r.ec == std::errc::result_out_of_range) {
      v.number = (*b == '-') ? -HUGE_VAL : HUGE_VAL;
    } else if (r.ec != std::errc() || r.ptr != e) {
      pos_ = start;
      fail("invalid number");
    }
    if (integral) {
      int64_t i = 0;
      auto ri = std::from_chars(b, e, i);
      if (ri.ec == std::errc() && ri.ptr == e) {
        v.is_integer = true;
        v.integer = i;
      }
    }
  }
};

}  // namespace

const Value* Value::find(const std::string& key) const {
  if (type != Type::Object) return nullptr;
  for (const auto& kv : object) {
    if (kv.first == key) return &kv.second;
  }
  return nullptr;
}

Value parse(const std::string& text) { return Parser(text).document(); }

const char* type_name(Value::Type t) {
  switch (t) {
    case Value::Type::Null: return "null";
    case Value::Type::Bool: return "a boolean";
    case Value::Type::Number: return "a number";
    case Value::Type::String: return "a string";
    case Value::Type::Array: return "an array";
    case Value::Type::Object: return "an object";
  }
  return "?";
}

}  // namespace fastjanus::json
