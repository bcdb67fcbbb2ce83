#include "bench/json_writer.h"

#include <cmath>
#include <cstdio>

#include "core/errors.h"

namespace airmoe::bench {

std::string JsonWriter::quoted(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char esc[8];
          std::snprintf(esc, sizeof esc, "\\u%04x", static_cast<unsigned>(c));
          out += esc;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

void JsonWriter::item(const char* key) {
  if (!open_.empty()) {
    out_ << (first_ ? "\n" : ",\n") << std::string(2 * open_.size(), ' ');
    if (open_.back() == '{') out_ << quoted(key ? key : "") << ": ";
  }
  first_ = false;
}

JsonWriter& JsonWriter::raw(const char* key, const std::string& text) {
  item(key);
  out_ << text;
  return *this;
}

JsonWriter& JsonWriter::open(const char* key, char bracket) {
  item(key);
  out_ << bracket;
  open_.push_back(bracket);
  first_ = true;
  return *this;
}

JsonWriter& JsonWriter::close(char bracket) {
  if (open_.empty() || open_.back() != bracket)
    throw InternalError("JsonWriter: closing a bracket that is not open");
  open_.pop_back();
  if (!first_) out_ << "\n" << std::string(2 * open_.size(), ' ');
  out_ << (bracket == '{' ? '}' : ']');
  first_ = false;
  return *this;
}

JsonWriter& JsonWriter::begin_object(const char* key) {
  return open(key, '{');
}
JsonWriter& JsonWriter::end_object() {
  return close('{');
}
JsonWriter& JsonWriter::begin_array(const char* key) {
  return open(key, '[');
}
JsonWriter& JsonWriter::end_array() {
  return close('[');
}

JsonWriter& JsonWriter::value(const char* key, double v) {
  if (!std::isfinite(v)) return null(key);
  char text[32];
  std::snprintf(text, sizeof text, "%.17g", v);
  return raw(key, text);
}

JsonWriter& JsonWriter::value(const char* key, int64_t v) {
  return raw(key, std::to_string(v));
}
JsonWriter& JsonWriter::value(const char* key, bool v) {
  return raw(key, v ? "true" : "false");
}
JsonWriter& JsonWriter::value(const char* key, const std::string& v) {
  return raw(key, quoted(v));
}
JsonWriter& JsonWriter::null(const char* key) {
  return raw(key, "null");
}

JsonWriter& JsonWriter::array(const char* key, const std::vector<double>& v) {
  begin_array(key);
  for (double x : v) value(nullptr, x);
  return end_array();
}

void JsonWriter::finish() {
  if (!open_.empty()) throw InternalError("JsonWriter: the document has open brackets");
  out_ << "\n";
}

}  // namespace airmoe::bench
