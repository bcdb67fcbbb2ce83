#include "core/npy.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace airmoe::inline core {
namespace {

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw std::runtime_error("npy file '" + path + "': " + what);
}

// The header dict as the NPY format specifies it: a Python literal dict
// with exactly the keys 'descr' (a string), 'fortran_order' (True or False)
// and 'shape' (a tuple of non-negative decimal ints, a trailing comma allowed).
std::string quoted(const std::string& text) {
  std::string out(1, '\'');
  out += text;
  out += '\'';
  return out;
}

struct NpyHeader {
  std::string descr;  // without quotes; empty when the key is missing
  bool has_order = false, fortran_order = false;
  bool has_shape = false;
  std::vector<int64_t> shape;
  std::string shape_text;  // as written, for messages
};

class HeaderParser {
 public:
  HeaderParser(const std::string& path, const std::string& text) : path_(path), s_(text) {}

  NpyHeader parse() {
    NpyHeader h;
    expect('{', "the header does not start with '{'");
    while (true) {
      skip_spaces();
      if (peek() == '}') break;
      const std::string key = quoted_string("a quoted key");
      expect(':', "no ':' after key '" + key + "'");
      if (key == "descr") {
        h.descr = quoted_string("a quoted dtype after 'descr'");
      } else if (key == "fortran_order") {
        h.has_order = true;
        h.fortran_order = boolean();
      } else if (key == "shape") {
        h.has_shape = true;
        shape(h);
      } else {
        bad(path_, "unexpected key '" + key + "' in the header");
      }
      skip_spaces();
      if (peek() == ',') {
        ++at_;
        continue;
      }
      if (peek() != '}') bad(path_, "expected ',' or '}' after the value of '" + key + "'");
    }
    ++at_;
    skip_spaces();
    if (at_ != s_.size()) bad(path_, "unexpected text after the header dict");
    return h;
  }

 private:
  char peek() const { return at_ < s_.size() ? s_[at_] : '\0'; }
  void skip_spaces() {
    while (at_ < s_.size() && (s_[at_] == ' ' || s_[at_] == '\n' || s_[at_] == '\t')) ++at_;
  }
  void expect(char c, const std::string& what) {
    skip_spaces();
    if (peek() != c) bad(path_, what);
    ++at_;
  }
  // The raw text of a value, up to the next ',', ')' or '}': what a message quotes.
  std::string token() {
    skip_spaces();
    const size_t begin = at_;
    while (at_ < s_.size() && s_[at_] != ',' && s_[at_] != ')' && s_[at_] != '}') ++at_;
    size_t end = at_;
    while (end > begin && s_[end - 1] == ' ') --end;
    return s_.substr(begin, end - begin);
  }
  std::string quoted_string(const char* what) {
    skip_spaces();
    const char quote = peek();
    if (quote != '\'' && quote != '"') bad(path_, std::string("header: expected ") + what);
    const size_t close = s_.find(quote, at_ + 1);
    if (close == std::string::npos) bad(path_, "header: unterminated string");
    std::string out = s_.substr(at_ + 1, close - at_ - 1);
    at_ = close + 1;
    return out;
  }
  bool boolean() {
    const std::string value = token();
    if (value == "True") return true;
    if (value == "False") return false;
    bad(path_, "fortran_order must be True or False, got " + (value.empty() ? "nothing" : value));
  }
  void shape(NpyHeader& h) {
    skip_spaces();
    const size_t open = at_;
    if (peek() != '(') bad(path_, "shape must be a tuple, got " + token());
    ++at_;
    while (true) {
      skip_spaces();
      if (peek() == ')') break;
      h.shape.push_back(dimension(token()));
      skip_spaces();
      if (peek() == ',') {
        ++at_;
        continue;
      }
      if (peek() != ')') bad(path_, "shape has no closing ')'");
    }
    ++at_;
    h.shape_text = s_.substr(open, at_ - open);
  }
  int64_t dimension(const std::string& entry) {
    if (entry.empty() || entry.find_first_not_of("0123456789") != std::string::npos)
      bad(path_, "shape entry '" + entry + "' is not a non-negative integer");
    int64_t v = 0;
    for (const char ch : entry) {
      const int digit = ch - '0';
      if (v > (INT64_MAX - digit) / 10) bad(path_, "shape entry '" + entry + "' is too large");
      v = v * 10 + digit;
    }
    return v;
  }

  const std::string& path_;
  const std::string& s_;
  size_t at_ = 0;
};

template <typename T>
void write_any(const std::string& path, const char* descr, const T* data, int64_t rows,
               int64_t cols) {
  std::ostringstream dict;
  dict << "{'descr': '" << descr << "', 'fortran_order': False, 'shape': (" << rows << ", " << cols
       << "), }";
  std::string header = dict.str();
  // Pad with spaces so the data starts on a 64-byte boundary, newline last.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("npy file '" + path + "': cannot open for writing");
  const char magic[] = "\x93NUMPY\x01\x00";
  out.write(magic, 8);
  const auto len = static_cast<uint16_t>(header.size());
  const char len_bytes[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  out.write(len_bytes, 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(data),
            static_cast<std::streamsize>(rows * cols * static_cast<int64_t>(sizeof(T))));
  if (!out) throw std::runtime_error("npy file '" + path + "': write failed");
}

}  // namespace

Matrix read_npy_matrix(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) bad(path, "cannot open");
  const int64_t file_size = static_cast<int64_t>(in.tellg());
  in.seekg(0);
  char pre[10];
  if (file_size < 10 || !in.read(pre, 10)) bad(path, "too short to be a .npy file");
  if (std::memcmp(pre, "\x93NUMPY", 6) != 0) bad(path, "no .npy magic string");
  const int major = static_cast<unsigned char>(pre[6]);
  int64_t header_len = 0, prefix = 10;
  if (major == 1) {
    header_len = static_cast<unsigned char>(pre[8]) | (static_cast<unsigned char>(pre[9]) << 8);
  } else if (major == 2 || major == 3) {
    char more[2];
    if (!in.read(more, 2)) bad(path, "truncated header");
    header_len = static_cast<int64_t>(static_cast<unsigned char>(pre[8])) |
                 (static_cast<int64_t>(static_cast<unsigned char>(pre[9])) << 8) |
                 (static_cast<int64_t>(static_cast<unsigned char>(more[0])) << 16) |
                 (static_cast<int64_t>(static_cast<unsigned char>(more[1])) << 24);
    prefix = 12;
  } else {
    bad(path, "unsupported format version " + std::to_string(major));
  }
  if (prefix + header_len > file_size) bad(path, "truncated header");
  std::string header(static_cast<size_t>(header_len), '\0');
  in.read(header.data(), header_len);

  const NpyHeader h = HeaderParser(path, header).parse();
  if (h.descr != "<f4")
    bad(path, "dtype " + (h.descr.empty() ? std::string("(missing)") : quoted(h.descr)) +
                  " is not float32 ('<f4'); convert with arr.astype(np.float32)");
  if (!h.has_order) bad(path, "header has no fortran_order");
  if (h.fortran_order)
    bad(path, "array is in Fortran order; save np.ascontiguousarray(arr) instead");
  if (!h.has_shape) bad(path, "header has no shape");
  const std::string& shape = h.shape_text;
  if (h.shape.size() != 2)
    bad(path, "array has " + std::to_string(h.shape.size()) + " dimensions " + shape +
                  ", expected 2 (rows, columns)");
  const int64_t rows = h.shape[0], cols = h.shape[1];
  // A matrix without columns routes nothing but would still be looped over
  // row by row: refuse it here, where the file is named.
  if (cols == 0) bad(path, "shape " + shape + " has no columns");
  if (rows > INT64_MAX / 4 / cols) bad(path, "shape " + shape + " is too large");
  const int64_t expected = rows * cols * 4;
  const int64_t available = file_size - prefix - header_len;
  if (available < expected)
    bad(path, "truncated: shape " + shape + " needs " + std::to_string(expected) +
                  " data bytes, the file holds " + std::to_string(available));
  if (available > expected)
    bad(path, std::to_string(available - expected) + " bytes beyond the data of shape " + shape);
  Matrix m(rows, cols);
  if (expected > 0 && !in.read(reinterpret_cast<char*>(m.data()), expected))
    bad(path, "read failed");
  return m;
}

void write_npy(const std::string& path, const float* data, int64_t rows, int64_t cols) {
  write_any(path, "<f4", data, rows, cols);
}

void write_npy(const std::string& path, const int32_t* data, int64_t rows, int64_t cols) {
  write_any(path, "<i4", data, rows, cols);
}

}  // namespace airmoe::inline core
