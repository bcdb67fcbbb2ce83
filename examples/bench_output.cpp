#include "bench_output.h"

#include <cstdio>
#include <filesystem>

#include "core/checks.h"
#include "core/npy.h"

namespace airmoe::bench {

boost::program_options::typed_value<std::string>* path_value(std::string* target,
                                                             const std::string& option) {
  return boost::program_options::value(target)->notifier([option](const std::string& path) {
    if (path.empty()) fail(option + ": the path is empty");
  });
}

namespace {

template <typename T>
void save_in(const std::string& option, const std::string& dir, const std::string& file,
             const T* data, int64_t rows, int64_t cols) {
  try {
    std::filesystem::create_directories(dir);
    write_npy(dir + "/" + file, data, rows, cols);
  } catch (const std::exception& e) {
    fail(option + " " + dir + ": " + e.what());
  }
}

}  // namespace

void save_npy_in(const std::string& option, const std::string& dir, const std::string& file,
                 const float* data, int64_t rows, int64_t cols) {
  save_in(option, dir, file, data, rows, cols);
}
void save_npy_in(const std::string& option, const std::string& dir, const std::string& file,
                 const int32_t* data, int64_t rows, int64_t cols) {
  save_in(option, dir, file, data, rows, cols);
}

nlohmann::json ratio_or_null(double a, double b) {
  return b > 0.0 ? nlohmann::json(a / b) : nlohmann::json(nullptr);
}

std::string cell(const nlohmann::json& value, const char* format) {
  if (value.is_null()) return "-";
  char text[64];
  std::snprintf(text, sizeof text, format, value.get<double>());
  return text;
}

}  // namespace airmoe::bench
