#include "bench_output.h"

#include <cstdio>

#include "core/checks.h"

namespace airmoe::bench {

boost::program_options::typed_value<std::string>* path_value(std::string* target,
                                                             const std::string& option) {
  return boost::program_options::value(target)->notifier([option](const std::string& path) {
    if (path.empty()) fail(option + ": the path is empty");
  });
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
