#include "bench/output_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "bench/progress.h"
#include "core/checks.h"

namespace fs = std::filesystem;

namespace airmoe::bench {
namespace {

[[noreturn]] void refuse(const std::string& option, const std::string& path,
                         const std::string& why) {
  fail(option + " " + path + ": " + why);
}

// The file a write to `path` replaces: a symbolic link's target, so that the
// link stays a link.
fs::path replaced_file(const std::string& path) {
  std::error_code ec;
  const fs::path target = fs::canonical(path, ec);
  return ec ? fs::path(path) : target;
}

fs::path temporary_beside(const fs::path& file) {
  return fs::path(file.string() + "." + std::to_string(::getpid()) + ".tmp");
}

// Creates `temp`, which must not exist (O_EXCL: never another file, never
// through a link), with the permissions a new file gets, or those of
// `file` where it exists. Returns the descriptor, or -1 with errno set.
int create_temporary(const fs::path& temp, const fs::path& file) {
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  struct stat old {};
  if (fd >= 0 && ::stat(file.c_str(), &old) == 0) ::fchmod(fd, old.st_mode & 07777);
  return fd;
}

// Writes all of `text` to `fd` and closes it; false with errno set on error.
bool write_and_close(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int saved = errno;
      ::close(fd);
      errno = saved;
      return false;
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int saved = errno;
    ::close(fd);
    errno = saved;
    return false;
  }
  return ::close(fd) == 0;
}

bool same_file(const std::string& a, const std::string& b) {
  std::error_code ec;
  if (fs::equivalent(a, b, ec)) return true;  // both exist: one inode (hard links too)
  std::error_code ec_a, ec_b;
  const fs::path ra = fs::weakly_canonical(a, ec_a), rb = fs::weakly_canonical(b, ec_b);
  if (ec_a || ec_b) return fs::absolute(a).lexically_normal() == fs::absolute(b).lexically_normal();
  return ra == rb;
}

}  // namespace

void require_apart(const NamedPath& output, const std::vector<NamedPath>& others) {
  for (const NamedPath& other : others)
    if (!output.path.empty() && !other.path.empty() && same_file(output.path, other.path))
      refuse(output.option, output.path,
             "the same file as " + other.option + " " + other.path +
                 " (a result file must not overwrite an input or another result)");
}

OutputFile::OutputFile(const std::string& path, const std::string& option,
                       const std::vector<NamedPath>& apart)
    : path_(path), option_(option) {
  if (path_.empty()) return;
  require_apart({option_, path_}, apart);
  const fs::path file = replaced_file(path_);
  std::error_code ec;
  if (fs::is_directory(file, ec)) refuse(option_, path_, "is a directory");
  const bool exists = fs::exists(file, ec);
  // A probe beside the file, removed at once: the folder takes a new file
  // (finish() writes one there), and nothing at `path` is touched.
  const fs::path probe = temporary_beside(file);
  const int fd = create_temporary(probe, file);
  if (fd < 0 || (exists && ::access(file.c_str(), W_OK) != 0)) {
    const int saved = errno;
    if (fd >= 0) ::close(fd), ::unlink(probe.c_str());
    refuse(option_, path_, std::string("cannot open for writing: ") + std::strerror(saved));
  }
  ::close(fd);
  ::unlink(probe.c_str());
}

void OutputFile::finish() {
  if (!wanted()) return;
  const fs::path file = replaced_file(path_);
  const fs::path temp = temporary_beside(file);
  const int fd = create_temporary(temp, file);
  if (fd < 0 || !write_and_close(fd, text_.str()) || ::rename(temp.c_str(), file.c_str()) != 0) {
    const int saved = errno;
    if (fd >= 0) ::unlink(temp.c_str());
    refuse(option_, path_, std::string("write failed: ") + std::strerror(saved));
  }
  progress("wrote %s", path_.c_str());
}

void require_writable_folder(const std::string& folder, const std::string& option) {
  std::error_code ec;
  const fs::path wanted = fs::absolute(folder).lexically_normal();
  if (fs::exists(wanted, ec) && !fs::is_directory(wanted, ec))
    refuse(option, folder, "exists and is not a folder");
  // The nearest part of the path that exists: the run makes the rest.
  fs::path existing = wanted;
  while (!fs::exists(existing, ec) && existing.has_relative_path())
    existing = existing.parent_path();
  if (!fs::is_directory(existing, ec))
    refuse(option, folder, "'" + existing.string() + "' is not a folder");
  if (::access(existing.c_str(), W_OK | X_OK) != 0)
    refuse(option, folder, "cannot write in '" + existing.string() + "': " + std::strerror(errno));
}

}  // namespace airmoe::bench
