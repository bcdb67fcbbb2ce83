#include "core/npy.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace airmoe {
namespace {

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw std::runtime_error("npy file '" + path + "': " + what);
}

std::string dict_value(const std::string& header, const std::string& key) {
  const auto at = header.find("'" + key + "'");
  if (at == std::string::npos) return "";
  auto colon = header.find(':', at);
  if (colon == std::string::npos) return "";
  ++colon;
  while (colon < header.size() && header[colon] == ' ') ++colon;
  if (colon < header.size() && header[colon] == '(') {
    const auto close = header.find(')', colon);
    return close == std::string::npos ? "" : header.substr(colon, close - colon + 1);
  }
  const auto end = header.find_first_of(",}", colon);
  return header.substr(colon, end == std::string::npos ? std::string::npos : end - colon);
}

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

  const std::string descr = dict_value(header, "descr");
  if (descr != "'<f4'")
    bad(path, "dtype " + (descr.empty() ? std::string("(missing)") : descr) +
                  " is not float32 ('<f4'); convert with arr.astype(np.float32)");
  const std::string order = dict_value(header, "fortran_order");
  if (order != "False")
    bad(path, "array is in Fortran order; save np.ascontiguousarray(arr) instead");
  const std::string shape = dict_value(header, "shape");
  if (shape.empty()) bad(path, "header has no shape");
  std::vector<int64_t> dims;
  for (size_t i = 0; i < shape.size();) {
    if (shape[i] < '0' || shape[i] > '9') {
      ++i;
      continue;
    }
    int64_t v = 0;
    for (; i < shape.size() && shape[i] >= '0' && shape[i] <= '9'; ++i) {
      const int digit = shape[i] - '0';
      if (v > (INT64_MAX - digit) / 10) bad(path, "shape " + shape + " is too large");
      v = v * 10 + digit;
    }
    dims.push_back(v);
  }
  if (dims.size() != 2)
    bad(path, "array has " + std::to_string(dims.size()) + " dimensions " + shape +
                  ", expected 2 (rows, columns)");
  const int64_t rows = dims[0], cols = dims[1];
  if (cols > 0 && rows > INT64_MAX / 4 / cols) bad(path, "shape " + shape + " is too large");
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

}  // namespace airmoe
