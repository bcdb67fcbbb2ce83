// The checkpoint directory on disk (checkpoint_dir.h): durable writes, the
// staging directory, and the two ways a save publishes it.
#include "runtime/checkpoint_dir.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "core/checks.h"

namespace airmoe::runtime::checkpoint_dir {
namespace {

namespace fs = std::filesystem;

constexpr const char* kManifestName = "manifest.airmoe";
// A staging directory beside the checkpoint directory, and one inside it.
constexpr const char* kSiblingStaging = ".saving-";
constexpr const char* kInnerStaging = "/.airmoe-saving-";

[[noreturn]] void fail_errno(const std::string& doing, const std::string& path) {
  fail("checkpoint: cannot " + doing + " '" + path + "': " + std::strerror(errno));
}

// The same, for a failed call on an open file: closes it, keeping the errno.
[[noreturn]] void fail_errno_closing(int fd, const std::string& doing, const std::string& path) {
  const int err = errno;
  ::close(fd);
  errno = err;
  fail_errno(doing, path);
}

void sync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail_errno("open directory", dir);
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) fail_errno("sync directory", dir);
}

std::string parent_of(const std::string& path) {
  const fs::path parent = fs::path(path).parent_path();
  return parent.empty() ? "." : parent.string();
}

// The names in `dir`, sorted (so that every failure names the same file).
std::vector<std::string> entries(const std::string& dir) {
  std::error_code ec;
  std::vector<std::string> names;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    names.push_back(it->path().filename().string());
  if (ec) fail("checkpoint: cannot list '" + dir + "': " + ec.message());
  std::sort(names.begin(), names.end());
  return names;
}

// The checkpoint's own files in `dir`, the manifest first or last.
std::vector<std::string> checkpoint_files(const std::string& dir, bool manifest_first) {
  std::vector<std::string> names = entries(dir);
  std::erase_if(names, [](const std::string& n) { return !is_checkpoint_file(n); });
  std::stable_partition(names.begin(), names.end(), [&](const std::string& n) {
    return (n == kManifestName) == manifest_first;
  });
  return names;
}

// A volume mounted at the checkpoint path cannot be renamed: a save writes
// into it in place.
bool is_mount_root(const std::string& dir) {
  struct statx sx {};
  if (::statx(AT_FDCWD, dir.c_str(), 0, STATX_BASIC_STATS, &sx) == 0 &&
      (sx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) != 0)
    return (sx.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0;
  // Kernels before 5.8: a mount of another file system has another device.
  struct stat here {
  }, parent{};
  return ::stat(dir.c_str(), &here) == 0 && ::stat((dir + "/..").c_str(), &parent) == 0 &&
         here.st_dev != parent.st_dev;
}

// A save replaces `dir` only when it holds a checkpoint (or nothing): never
// a directory of other files that a mistyped path names. A mount point's
// lost+found is the file system's, not a user's file.
void require_replaceable(const std::string& dir, bool mount_root) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) return;  // to be created
    fail_errno("inspect", dir);
  }
  if (!S_ISDIR(st.st_mode)) fail("checkpoint: '" + dir + "' exists and is not a directory");
  if (::access((dir + "/" + kManifestName).c_str(), F_OK) == 0) return;
  for (const std::string& name : entries(dir))
    if (!(mount_root && name == "lost+found"))
      fail("checkpoint: '" + dir + "' holds other files and no checkpoint manifest; refusing to " +
           "write a checkpoint into it");
}

bool holds_other_files(const std::string& dir) {
  const std::vector<std::string> names = entries(dir);
  return std::any_of(names.begin(), names.end(),
                     [](const std::string& n) { return !is_checkpoint_file(n); });
}

// Absolute, symbolic links resolved (a link to a checkpoint directory saves
// into the directory, not over the link), no trailing separator.
std::string resolved(const std::string& dir) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(dir), ec);
  if (ec) fail("checkpoint: cannot resolve the path '" + dir + "': " + ec.message());
  if (!p.has_filename()) p = p.parent_path();
  return p.string();
}

std::string random_suffix() {
  static constexpr char kDigits[] = "abcdefghijklmnopqrstuvwxyz0123456789";
  std::random_device device;
  std::string s(8, ' ');
  for (char& c : s) c = kDigits[device() % (sizeof(kDigits) - 1)];
  return s;
}

// A directory of a name nothing else has: `prefix` and a random suffix.
std::string make_unique_directory(const std::string& prefix) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    const std::string path = prefix + random_suffix();
    if (::mkdir(path.c_str(), 0777) == 0) return path;
    if (errno != EEXIST) fail_errno("create", path);
  }
  fail("checkpoint: cannot find a free name '" + prefix + "*' for the staging directory");
}

void move_files(const std::vector<std::string>& names, const std::string& from,
                const std::string& to) {
  for (const std::string& name : names)
    if (::rename((from + "/" + name).c_str(), (to + "/" + name).c_str()) != 0)
      fail_errno("move '" + from + "/" + name + "' to", to + "/" + name);
}

// Removes the checkpoint files in `dir`, then `dir`; "" when that worked,
// else what is left where, and why.
std::string remove_checkpoint_directory(const std::string& dir) {
  std::string why;
  try {
    for (const std::string& name : checkpoint_files(dir, true))
      if (::unlink((dir + "/" + name).c_str()) != 0) fail_errno("remove", dir + "/" + name);
    if (::rmdir(dir.c_str()) != 0) fail_errno("remove", dir);
    return "";
  } catch (const std::exception& e) {
    why = e.what();
  }
  return "the previous checkpoint could not be removed and is left in '" + dir + "' (" + why + ")";
}

}  // namespace

std::vector<char> read_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_errno("open", path);
  std::vector<char> bytes;
  char chunk[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail_errno_closing(fd, "read", path);
    if (n == 0) break;
    bytes.insert(bytes.end(), chunk, chunk + n);
  }
  ::close(fd);
  return bytes;
}

void write_file_durably(const std::string& path, const std::vector<char>& bytes) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail_errno("create", tmp);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail_errno_closing(fd, "write", tmp);
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) fail_errno_closing(fd, "sync", tmp);
  if (::close(fd) != 0) fail_errno("close", tmp);
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail_errno("rename into place", path);
  sync_directory(parent_of(path));
}

bool is_checkpoint_file(const std::string& name) {
  if (name == kManifestName) return true;
  const std::string head = "shard-", tail = ".airmoe";
  if (name.size() < head.size() + 5 + tail.size() || !name.starts_with(head) ||
      !name.ends_with(tail))
    return false;
  return std::all_of(name.begin() + static_cast<std::ptrdiff_t>(head.size()),
                     name.end() - static_cast<std::ptrdiff_t>(tail.size()),
                     [](char c) { return c >= '0' && c <= '9'; });
}

int exchange_directories(const std::string& staged, const std::string& dir) {
  return ::renameat2(AT_FDCWD, staged.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE);
}

StagedSave::StagedSave(const std::string& dir) : dir_(resolved(dir)) {
  struct stat st {};
  const bool exists = ::stat(dir_.c_str(), &st) == 0;
  const bool mount_root = exists && is_mount_root(dir_);
  require_replaceable(dir_, mount_root);
  in_place_ = exists && (mount_root || holds_other_files(dir_));
  if (in_place_) {
    staging_ = make_unique_directory(dir_ + kInnerStaging);
    return;
  }
  std::error_code ec;
  fs::create_directories(parent_of(dir_), ec);
  if (ec) fail("checkpoint: cannot create '" + parent_of(dir_) + "': " + ec.message());
  staging_ = make_unique_directory(dir_ + kSiblingStaging);
}

std::string StagedSave::publish(const Exchange& exchange) {
  if (in_place_) return commit_in_place();
  struct stat st {};
  if (::stat(dir_.c_str(), &st) != 0) {
    if (errno != ENOENT) fail_errno("inspect", dir_);
    if (::rename(staging_.c_str(), dir_.c_str()) != 0) fail_errno("rename into place", dir_);
    committing_ = true;
    sync_directory(parent_of(dir_));
    return "";
  }
  // The directory keeps its permissions (best effort: the files are what
  // matters).
  (void)::chmod(staging_.c_str(), st.st_mode & 07777);
  if (exchange(staging_, dir_) == 0) {
    committing_ = true;  // staging_ holds the previous checkpoint now
    sync_directory(parent_of(dir_));
    return remove_checkpoint_directory(staging_);
  }
  // No exchange here (EINVAL: the file system lacks it; EBUSY: a mount point
  // that was not recognized): the staged files go into the directory and
  // replace the old ones in place.
  const std::string exchange_error = std::strerror(errno);
  const std::string inside =
      dir_ + kInnerStaging + staging_.substr(dir_.size() + std::strlen(kSiblingStaging));
  if (::rename(staging_.c_str(), inside.c_str()) != 0)
    fail("checkpoint: cannot swap '" + dir_ + "' with the staged checkpoint (" + exchange_error +
         ") nor move '" + staging_ + "' into it (" + std::strerror(errno) + ")");
  staging_ = inside;
  in_place_ = true;
  return commit_in_place();
}

// The previous checkpoint's files go aside into the staging directory (the
// manifest first: from then on the directory holds no checkpoint), then the
// new ones into the directory (the manifest last). A reader sees the old
// checkpoint, none, or the new one; a mix is refused by the shard checksums.
std::string StagedSave::commit_in_place() {
  const std::string previous = staging_ + "/previous";
  if (::mkdir(previous.c_str(), 0777) != 0) fail_errno("create", previous);
  committing_ = true;
  try {
    move_files(checkpoint_files(dir_, true), dir_, previous);
    sync_directory(dir_);
    move_files(checkpoint_files(staging_, false), staging_, dir_);
    sync_directory(dir_);
  } catch (const std::exception& e) {
    fail(std::string(e.what()) + "; the save stopped while replacing the files of '" + dir_ +
         "': the previous checkpoint's files are in '" + previous + "', the new one's in '" +
         staging_ + "'");
  }
  std::string left = remove_checkpoint_directory(previous);
  if (left.empty() && ::rmdir(staging_.c_str()) != 0)
    left = "the save's staging directory '" + staging_ + "' could not be removed (" +
           std::strerror(errno) + ")";
  return left;
}

void StagedSave::discard() noexcept {
  if (committing_) return;
  std::error_code ec;
  fs::remove_all(staging_, ec);  // only what this save wrote
}

}  // namespace airmoe::runtime::checkpoint_dir
