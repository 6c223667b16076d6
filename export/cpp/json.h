// A small JSON reader for manifest.json (no third-party JSON library is available to the runner).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fastjanus::json {

struct ParseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  // Integral literals (no fraction or exponent) that fit int64 are also kept exactly: ids and sizes must not
  // pass through a double.
  bool is_integer = false;
  int64_t integer = 0;
  std::string string;
  std::vector<Value> array;
  std::vector<std::pair<std::string, Value>> object;  // file order; duplicate keys are a parse error

  bool is_object() const { return type == Type::Object; }
  bool is_string() const { return type == Type::String; }
  bool is_number() const { return type == Type::Number; }
  // nullptr when this is not an object or has no such key
  const Value* find(const std::string& key) const;
};

// Parses a whole document (surrounding whitespace allowed, nothing else). Throws ParseError naming the line
// and column.
Value parse(const std::string& text);

const char* type_name(Value::Type t);

}  // namespace fastjanus::json
