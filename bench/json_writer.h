// A small JSON writer for the programs that must build without a JSON
// package (the CUDA build has none): objects, arrays, strings, numbers,
// booleans and null, indented by two spaces. Non-finite numbers are written
// as null (JSON has no NaN or infinity).
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

namespace airmoe::bench {

class JsonWriter {
 public:
  explicit JsonWriter(std::ostream& out) : out_(out) {}

  // `key` names the member inside an object; nullptr inside an array or at
  // the top.
  JsonWriter& begin_object(const char* key = nullptr);
  JsonWriter& end_object();
  JsonWriter& begin_array(const char* key = nullptr);
  JsonWriter& end_array();

  JsonWriter& value(const char* key, double v);
  JsonWriter& value(const char* key, int64_t v);
  JsonWriter& value(const char* key, int v) { return value(key, static_cast<int64_t>(v)); }
  JsonWriter& value(const char* key, bool v);
  JsonWriter& value(const char* key, const std::string& v);
  JsonWriter& value(const char* key, const char* v) { return value(key, std::string(v)); }
  JsonWriter& null(const char* key);
  JsonWriter& array(const char* key, const std::vector<double>& v);

  // Ends the document with a newline; throws if an object or array is open.
  void finish();

  // `s` as a JSON string literal, quotes included.
  static std::string quoted(const std::string& s);

 private:
  // The separator, indentation and key of the next item.
  void item(const char* key);
  JsonWriter& raw(const char* key, const std::string& text);
  JsonWriter& open(const char* key, char bracket);
  JsonWriter& close(char bracket);

  std::ostream& out_;
  std::vector<char> open_;  // the brackets still open
  bool first_ = true;       // no item yet in the innermost open bracket
};

}  // namespace airmoe::bench
