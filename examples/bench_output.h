// What airmoe_bench writes, and how it shows a figure that does not exist.
//
// Result files (--json, --csv) and the routes folder (--save-routes) are
// checked when the run starts, so that a bad path fails at once rather than
// after a long benchmark, and a result file is written only when the run
// ends, whole (a temporary beside it, renamed over it): a failed or
// interrupted run leaves an earlier run's results as they were.
#pragma once

#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace airmoe::bench {

// The path an option names: {"--tokens", "t.npy"}.
struct NamedPath {
  std::string option, path;
};

// The value of an option that names a path. An empty value ("--json ''") is
// refused when the command line is parsed ("--json: the path is empty"),
// not taken for "no file".
boost::program_options::typed_value<std::string>* path_value(std::string* target,
                                                             const std::string& option);

// Refuses `output` if it names the same file as one of `others` (the run's
// inputs, or its other outputs), compared by resolved path and by inode:
// "--json t.npy: the same file as --tokens ./t.npy". Empty paths are skipped.
void require_apart(const NamedPath& output, const std::vector<NamedPath>& others);

// A result file. Constructing one checks the path, touching no file there:
// "--json /x/y.json: cannot open for writing: No such file or directory",
// "... : is a directory", or require_apart's error against `apart`. What is
// written to stream() is kept in memory until finish(). An empty path, or
// none, is no file: wanted() is false (path_value refuses an empty one given
// on the command line).
class OutputFile {
 public:
  OutputFile() = default;
  OutputFile(const std::string& path, const std::string& option,
             const std::vector<NamedPath>& apart = {});
  bool wanted() const { return !path_.empty(); }
  std::ostream& stream() { return text_; }
  // Writes the text to a temporary beside the file (a symbolic link's
  // target), renames it over the file and reports "wrote <path>"; throws,
  // naming the option, if that fails, leaving the file as it was.
  void finish();

 private:
  std::string path_, option_;
  std::ostringstream text_;
};

// --save-routes: the folder must be one the run can make and write in (the
// missing part of the path is made when the routes are saved):
// "--save-routes r.npy: exists and is not a folder", "... : cannot write in
// '/ro': Read-only file system".
void require_writable_folder(const std::string& folder, const std::string& option);

// a / b, or null where b is 0: a ratio to nothing (no dense-replicated row,
// no bytes at P = 1) is no figure, and the JSON says so.
nlohmann::json ratio_or_null(double a, double b);

// A figure for a table: `value` printed with `format` (one double), or "-"
// where it is null.
std::string cell(const nlohmann::json& value, const char* format);

}  // namespace airmoe::bench
