// What airmoe_bench writes, and how it shows a figure that does not exist.
// Result files (--json, --csv) and the routes folder (--save-routes) are
// bench/output_file.h's: checked when the run starts, written whole when it
// ends.
#pragma once

#include <boost/program_options.hpp>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "bench/output_file.h"

namespace airmoe::bench {

// The value of an option that names a path. An empty value ("--json ''") is
// refused when the command line is parsed ("--json: the path is empty"),
// not taken for "no file".
boost::program_options::typed_value<std::string>* path_value(std::string* target,
                                                             const std::string& option);

// Writes a matrix as DIR/FILE (.npy) into the folder an option names
// (--save-routes, --save-data; checked when the run started), making the
// folder first; an error names the option: "--save-data d: ...".
void save_npy_in(const std::string& option, const std::string& dir, const std::string& file,
                 const float* data, int64_t rows, int64_t cols);
void save_npy_in(const std::string& option, const std::string& dir, const std::string& file,
                 const int32_t* data, int64_t rows, int64_t cols);

// a / b, or null where b is 0: a ratio to nothing (no dense-replicated row,
// no bytes at P = 1) is no figure, and the JSON says so.
nlohmann::json ratio_or_null(double a, double b);

// A figure for a table: `value` printed with `format` (one double), or "-"
// where it is null.
std::string cell(const nlohmann::json& value, const char* format);

}  // namespace airmoe::bench
