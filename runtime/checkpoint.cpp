// Saving and loading a layer's checkpoint across ranks: the files' bytes come
// from checkpoint_format.cpp; here are the durable writes, the staging
// directory, and the collective phases, each checked on every rank together.
#include "runtime/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>

#include "core/checks.h"
#include "core/errors.h"

namespace airmoe::runtime {
namespace {

namespace fs = std::filesystem;

std::string without_trailing_slash(std::string dir) {
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir;
}

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

void sync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail_errno("open directory", dir);
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) fail_errno("sync directory", dir);
}

// A temporary file, synced, then renamed over `path`: a reader sees the old
// file or the whole new one, never a part.
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
  sync_directory(fs::path(path).parent_path().string());
}

// A stale staging directory is a save that failed or was killed midway.
void fresh_directory(const std::string& dir) {
  std::error_code ec;
  if (fs::exists(dir, ec)) fs::remove_all(dir, ec);
  if (ec) fail("checkpoint: cannot remove the stale '" + dir + "': " + ec.message());
  fs::create_directories(dir, ec);
  if (ec) fail("checkpoint: cannot create '" + dir + "': " + ec.message());
}

// A save replaces `dir` only when it holds a checkpoint (or nothing): never
// a directory of other files that a mistyped path names.
void require_replaceable(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return;
  if (!fs::is_directory(dir, ec)) fail("checkpoint: '" + dir + "' exists and is not a directory");
  if (!fs::is_empty(dir, ec) && !fs::exists(manifest_path(dir), ec))
    fail("checkpoint: '" + dir + "' holds other files and no checkpoint manifest; refusing to " +
         "replace it");
}

// The staging directory becomes `dir`; a previous checkpoint there is
// replaced in one step where the file system can swap two directories
// atomically (Linux renameat2), else in two renames.
void publish(const std::string& staging, const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    if (::rename(staging.c_str(), dir.c_str()) != 0) fail_errno("rename into place", dir);
  } else if (::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(staging, ec);  // the previous checkpoint, swapped out
  } else {
    const std::string previous = dir + ".previous";
    fs::remove_all(previous, ec);
    if (::rename(dir.c_str(), previous.c_str()) != 0) fail_errno("move aside", dir);
    if (::rename(staging.c_str(), dir.c_str()) != 0) fail_errno("rename into place", dir);
    fs::remove_all(previous, ec);
  }
  const fs::path parent = fs::path(dir).parent_path();
  sync_directory(parent.empty() ? "." : parent.string());
}

// ------------------------------------------------------------------ save --

ShardRecords shard_of(MoELayer& layer) {
  ShardRecords s;
  s.rank = layer.communicator().rank();
  s.ranks = layer.communicator().size();
  s.dim = layer.config().expert.dim;
  s.hidden = layer.config().expert.hidden;
  s.ids = layer.hosted();
  const auto w1 = layer.experts().w1_data(), w2 = layer.experts().w2_data();
  s.w1.assign(w1.begin(), w1.end());
  s.w2.assign(w2.begin(), w2.end());
  s.centers = layer.local_centers();
  return s;
}

ShardEntry write_shard(MoELayer& layer, const std::string& staging, const SaveOptions& options) {
  const std::vector<char> bytes = encode_shard(shard_of(layer));
  const std::string path = shard_path(staging, layer.communicator().rank());
  write_file_durably(path, bytes);
  if (options.after_file) options.after_file(path);
  ShardEntry entry;
  entry.bytes = bytes.size();
  std::memcpy(&entry.checksum, bytes.data() + bytes.size() - sizeof(entry.checksum),
              sizeof(entry.checksum));
  entry.records = static_cast<int64_t>(layer.hosted().size());
  return entry;
}

CheckpointManifest manifest_of(const MoELayer& layer, std::vector<ShardEntry> shards) {
  CheckpointManifest m;
  m.layer = {layer.strategy(), layer.config(), layer.placement().experts(),
             layer.codebook().size()};
  m.ranks = static_cast<int32_t>(shards.size());
  const MatrixView cw = layer.codebook().codewords();
  m.codebook = Matrix(cw.rows, cw.cols);
  std::copy_n(cw.data, cw.rows * cw.cols, m.codebook.data());
  m.assignment = layer.lists().assignment();
  m.owners = layer.placement().owners();
  m.shards = std::move(shards);
  return m;
}

std::vector<ShardEntry> gather_entries(comm::Communicator& comm, const ShardEntry& mine) {
  std::vector<ShardEntry> all(static_cast<size_t>(comm.size()));
  comm::PhaseScope phase(comm, "checkpoint");
  comm.allgather(&mine, sizeof(mine), all.data());
  return all;
}

// ------------------------------------------------------------------ load --

void require_same(const std::string& field, const std::string& held, const std::string& asked,
                  const std::string& path) {
  if (held != asked)
    fail("checkpoint manifest '" + path + "' holds a layer with " + field + " = " + held +
         "; the caller asks for " + field + " = " + asked);
}

void require_config(const CheckpointConfig& held, const CheckpointConfig& asked,
                    const std::string& path) {
  const auto s = [](auto v) { return std::to_string(v); };
  require_same("strategy", to_string(held.strategy), to_string(asked.strategy), path);
  require_same("E", s(held.experts), s(asked.experts), path);
  require_same("C", s(held.codewords), s(asked.codewords), path);
  require_same("k", s(held.config.k), s(asked.config.k), path);
  require_same("probes m", s(held.config.probes), s(asked.config.probes), path);
  require_same("d", s(held.config.expert.dim), s(asked.config.expert.dim), path);
  require_same("h", s(held.config.expert.hidden), s(asked.config.expert.hidden), path);
  require_same("activation", to_string(held.config.expert.activation),
               to_string(asked.config.expert.activation), path);
}

Codebook checked_codebook(const CheckpointManifest& m, const std::string& path) {
  try {
    return Codebook::from_unit_rows(m.codebook.view());
  } catch (const UsageError& e) {
    fail("checkpoint manifest '" + path + "': " + e.what());
  }
}

Placement placement_for(comm::Communicator& comm, const CheckpointManifest& m,
                        const Codebook& codebook, const InvertedLists& lists,
                        const std::optional<PlacementPolicy>& policy) {
  if (!policy && m.ranks == comm.size()) return Placement(m.ranks, m.owners, lists);
  const std::vector<double> load = list_load(lists, {});
  return plan_and_broadcast(comm, policy.value_or(PlacementPolicy::kList), codebook, lists, load)
      .placement;
}

// A shard file, whole and as the manifest recorded it.
ShardRecords read_shard(const std::string& dir, const CheckpointManifest& m, int q) {
  const std::string path = shard_path(dir, q);
  const std::vector<char> bytes = read_file(path);
  ShardRecords s = decode_shard(bytes, path);
  const ShardEntry& entry = m.shards[q];
  uint64_t checksum = 0;
  std::memcpy(&checksum, bytes.data() + bytes.size() - sizeof(checksum), sizeof(checksum));
  if (bytes.size() != entry.bytes || checksum != entry.checksum)
    fail("shard file '" + path +
         "' does not belong to this checkpoint: " + std::to_string(bytes.size()) +
         " bytes with checksum " + std::to_string(checksum) + ", the manifest lists " +
         std::to_string(entry.bytes) + " bytes with checksum " + std::to_string(entry.checksum));
  std::vector<int32_t> owned;
  for (size_t e = 0; e < m.owners.size(); ++e)
    if (m.owners[e] == q) owned.push_back(static_cast<int32_t>(e));
  if (s.rank != q || s.ranks != m.ranks || s.dim != m.layer.config.expert.dim ||
      s.hidden != m.layer.config.expert.hidden || s.ids != owned)
    fail("shard file '" + path + "' does not match the manifest (rank, P, d, h or expert ids)");
  return s;
}

// The records of `hosted` (ascending), read from the shard files that hold
// them, each file once.
ShardRecords read_hosted(const std::string& dir, const CheckpointManifest& m,
                         const std::vector<int32_t>& hosted, int rank, int ranks) {
  ShardRecords out;
  out.rank = rank;
  out.ranks = ranks;
  out.dim = m.layer.config.expert.dim;
  out.hidden = m.layer.config.expert.hidden;
  out.ids = hosted;
  const auto w = static_cast<size_t>(out.dim * out.hidden);
  out.w1.resize(hosted.size() * w);
  out.w2.resize(hosted.size() * w);
  out.centers = Matrix(static_cast<int64_t>(hosted.size()), out.dim);
  std::map<int, std::vector<size_t>> by_shard;  // shard -> indices into hosted
  for (size_t i = 0; i < hosted.size(); ++i) by_shard[m.owners[hosted[i]]].push_back(i);
  for (const auto& [q, indices] : by_shard) {
    const ShardRecords s = read_shard(dir, m, q);
    for (size_t i : indices) {
      const auto j = static_cast<size_t>(std::lower_bound(s.ids.begin(), s.ids.end(), hosted[i]) -
                                         s.ids.begin());
      std::copy_n(s.w1.data() + j * w, w, out.w1.data() + i * w);
      std::copy_n(s.w2.data() + j * w, w, out.w2.data() + i * w);
      std::copy_n(s.centers.row(static_cast<int64_t>(j)), out.dim,
                  out.centers.row(static_cast<int64_t>(i)));
    }
  }
  return out;
}

// Every expert's center on every rank, as the layer's constructor takes them.
Matrix gather_centers(comm::Communicator& comm, const ShardRecords& mine, int64_t experts) {
  std::vector<int32_t> ids;
  std::vector<float> rows;
  {
    comm::PhaseScope phase(comm, "checkpoint");
    ids = comm::allgatherv_vector<int32_t>(comm, mine.ids);
    rows = comm::allgatherv_vector<float>(
        comm, std::span<const float>(mine.centers.data(), mine.centers.size()));
  }
  Matrix all(experts, mine.dim);
  for (size_t i = 0; i < ids.size(); ++i)
    std::copy_n(rows.data() + i * static_cast<size_t>(mine.dim), mine.dim, all.row(ids[i]));
  return all;
}

void install_parameters(MoELayer& layer, ShardRecords mine) {
  if (layer.hosted() != mine.ids)
    throw InternalError("load checkpoint: rank " + std::to_string(mine.rank) +
                        " read other experts than the layer hosts");
  const auto w1 = layer.experts().w1_data(), w2 = layer.experts().w2_data();
  if (mine.w1.size() != w1.size() || mine.w2.size() != w2.size())
    throw InternalError("load checkpoint: rank " + std::to_string(mine.rank) +
                        " read parameters of another shape than the layer's");
  std::copy(mine.w1.begin(), mine.w1.end(), w1.begin());
  std::copy(mine.w2.begin(), mine.w2.end(), w2.begin());
}

}  // namespace

std::string manifest_path(const std::string& dir) {
  return without_trailing_slash(dir) + "/manifest.airmoe";
}

std::string shard_path(const std::string& dir, int rank) {
  char name[32];
  std::snprintf(name, sizeof(name), "/shard-%05d.airmoe", rank);
  return without_trailing_slash(dir) + name;
}

CheckpointManifest read_manifest(const std::string& dir) {
  const std::string path = manifest_path(dir);
  return decode_manifest(read_file(path), path);
}

void save_checkpoint(MoELayer& layer, const std::string& dir_arg, const SaveOptions& options) {
  comm::Communicator& comm = layer.communicator();
  const std::string dir = without_trailing_slash(dir_arg);
  const std::string staging = dir + ".saving";
  const bool root = comm.rank() == 0;
  try {
    comm::check_together(comm, "save checkpoint", [&] {
      if (!root) return;
      require_replaceable(dir);
      fresh_directory(staging);
    });
    ShardEntry mine;
    comm::check_together(comm, "save checkpoint",
                         [&] { mine = write_shard(layer, staging, options); });
    const CheckpointManifest manifest = manifest_of(layer, gather_entries(comm, mine));
    // The manifest last: a staging directory without one is no checkpoint.
    comm::check_together(comm, "save checkpoint", [&] {
      if (!root) return;
      write_file_durably(manifest_path(staging), encode_manifest(manifest));
      if (options.after_file) options.after_file(manifest_path(staging));
      publish(staging, dir);
    });
  } catch (...) {
    // Every rank is past its writes (each phase ends on every rank
    // together); the previous checkpoint in `dir` was never touched.
    std::error_code ec;
    if (root) fs::remove_all(staging, ec);
    throw;
  }
}

std::unique_ptr<MoELayer> load_checkpoint(comm::Communicator& comm, const std::string& dir,
                                          const LoadOptions& options) {
  CheckpointManifest m;
  Codebook codebook;
  comm::check_together(comm, "load checkpoint", [&] {
    m = read_manifest(dir);
    if (options.expect) require_config(m.layer, *options.expect, manifest_path(dir));
    codebook = checked_codebook(m, manifest_path(dir));
  });
  const InvertedLists lists(m.assignment, m.layer.codewords);
  Placement placement = placement_for(comm, m, codebook, lists, options.policy);
  ShardRecords mine;
  comm::check_together(comm, "load checkpoint", [&] {
    mine = read_hosted(dir, m, placement.local_experts(comm.rank()), comm.rank(), comm.size());
  });
  const Matrix centers = gather_centers(comm, mine, m.layer.experts);
  auto layer =
      std::make_unique<MoELayer>(comm, m.layer.strategy, m.layer.config, std::move(codebook),
                                 std::move(m.assignment), std::move(placement), centers.view(), 0);
  install_parameters(*layer, std::move(mine));
  return layer;
}

}  // namespace airmoe::runtime
