// Result files of the benchmark programs, written whole at the end: the
// path is checked when the run starts, so that a bad path fails at once
// rather than after a long benchmark, and the file is written only when the
// run ends (a temporary beside it, renamed over it), so a failed or
// interrupted run leaves an earlier run's results as they were and makes no
// file where there was none. No dependency beyond the C++ library and POSIX:
// the in-process layer benchmark uses it in the builds without Boost.
#pragma once

#include <sstream>
#include <string>
#include <vector>

namespace airmoe::bench {

// The path an option names: {"--tokens", "t.npy"}.
struct NamedPath {
  std::string option, path;
};

// Refuses `output` if it names the same file as one of `others` (the run's
// inputs, or its other outputs), compared by resolved path and by inode:
// "--json t.npy: the same file as --tokens ./t.npy". Empty paths are skipped.
void require_apart(const NamedPath& output, const std::vector<NamedPath>& others);

// A result file. Constructing one checks the path, touching no file there:
// "--json /x/y.json: cannot open for writing: No such file or directory",
// "... : is a directory", or require_apart's error against `apart`. What is
// written to stream() is kept in memory until finish(). An empty path, or
// none, is no file: wanted() is false (the front ends refuse an empty one
// given on the command line).
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

}  // namespace airmoe::bench
