// What airmoe_bench writes, and how it shows a figure that does not exist.
// Result files (--json, --csv) and the routes folder (--save-routes) are
// bench/output_file.h's: checked when the run starts, written whole when it
// ends.
#pragma once

#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>
#include <string>

#include "bench/output_file.h"

namespace airmoe::bench {

// The value of an option that names a path. An empty value ("--json ''") is
// refused when the command line is parsed ("--json: the path is empty"),
// not taken for "no file".
boost::program_options::typed_value<std::string>* path_value(std::string* target,
                                                             const std::string& option);

// a / b, or null where b is 0: a ratio to nothing (no dense-replicated row,
// no bytes at P = 1) is no figure, and the JSON says so.
nlohmann::json ratio_or_null(double a, double b);

// A figure for a table: `value` printed with `format` (one double), or "-"
// where it is null.
std::string cell(const nlohmann::json& value, const char* format);

}  // namespace airmoe::bench
