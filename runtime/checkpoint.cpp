// Saving and loading a layer's checkpoint across ranks: the files' bytes come
// from checkpoint_format.cpp, the directory on disk from checkpoint_dir.cpp;
// here are the collective phases, each checked on every rank together.
#include "runtime/checkpoint.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>

#include "core/checks.h"
#include "core/errors.h"
#include "core/hash.h"
#include "runtime/checkpoint_dir.h"

namespace airmoe::runtime {
namespace {

using checkpoint_dir::read_file;
using checkpoint_dir::write_file_durably;

std::string without_trailing_slash(std::string dir) {
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir;
}

// Empty is no directory: refused before anything is read or written
// (rather than staging './.saving' or reading '/manifest.airmoe').
void require_directory_argument(const std::string& dir) {
  if (dir.empty()) fail("checkpoint: the directory argument dir is empty");
}

// ------------------------------------------------------------------ save --

ShardRecords shard_of(MoELayer& layer) {
  ShardRecords s;
  s.rank = layer.communicator().rank();
  s.ranks = layer.communicator().size();
  s.dim = layer.config().expert.dim;
  s.hidden = layer.config().expert.hidden;
  s.activation = layer.config().expert.activation;
  s.ids = layer.hosted();
  // Read back from the experts' device (a copy on the host, as before).
  const ExpertWeightsView w = layer.experts().weights();
  s.w1 = host_vector<float>(layer.compute(), w.w1);
  s.w2 = host_vector<float>(layer.compute(), w.w2);
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
  if (const TensorView b = layer.bias(); b.rows > 0)
    m.bias.assign(b.as<float>(), b.as<float>() + b.rows);
  m.query = layer.query_lists();
  if (m.query) m.query->codebook = Codebook();  // it is m.codebook
  m.shards = std::move(shards);
  return m;
}

std::vector<ShardEntry> gather_entries(comm::Communicator& comm, const ShardEntry& mine) {
  std::vector<ShardEntry> all(static_cast<size_t>(comm.size()));
  comm::PhaseScope phase(comm, "checkpoint");
  comm.allgather(&mine, sizeof(mine), all.data());
  return all;
}

// Rank 0's path on every rank.
std::string broadcast_path(comm::Communicator& comm, const std::string& path) {
  std::vector<char> bytes(path.begin(), path.end());
  comm::PhaseScope phase(comm, "checkpoint");
  comm::broadcast_vector(comm, bytes, 0);
  return {bytes.begin(), bytes.end()};
}

// Rank 0 sees every rank's shard file as it was written before the manifest
// makes them a checkpoint: a rank that wrote into another directory of the
// same name (ranks that do not share the file system) fails the save here,
// not the next load.
void require_shards_written(const std::string& staging, const std::vector<ShardEntry>& entries) {
  for (size_t q = 0; q < entries.size(); ++q) {
    const std::string path = shard_path(staging, static_cast<int>(q));
    struct stat st {};
    const std::string rank = "rank " + std::to_string(q) + "'s shard file '" + path + "'";
    const std::string hint = ": do the ranks share the file system that holds the checkpoint?";
    if (::stat(path.c_str(), &st) != 0)
      fail("checkpoint: " + rank + " is not there for rank 0 (" + std::strerror(errno) + ")" +
           hint);
    if (static_cast<uint64_t>(st.st_size) != entries[q].bytes)
      fail("checkpoint: " + rank + " holds " + std::to_string(st.st_size) + " bytes for rank 0, " +
           "rank " + std::to_string(q) + " wrote " + std::to_string(entries[q].bytes) + hint);
  }
}

// ------------------------------------------------------------------ load --

// Ranks that read different manifests (another working directory, node-local
// storage holding another checkpoint) would build different layers and then
// hang or corrupt memory in the collectives that follow: they refuse
// together, before any rank acts on what it read.
void require_same_checkpoint(comm::Communicator& comm, uint64_t digest, const std::string& path) {
  uint64_t root_digest = digest;
  {
    comm::PhaseScope phase(comm, "checkpoint");
    comm.broadcast(&root_digest, sizeof(root_digest), 0);
  }
  std::string error;
  if (digest != root_digest) {
    char hashes[64];
    std::snprintf(hashes, sizeof(hashes), "%016llx, rank 0's to %016llx",
                  static_cast<unsigned long long>(digest),
                  static_cast<unsigned long long>(root_digest));
    error = "reads another checkpoint than rank 0 (its manifest '" + path + "' hashes to " +
            hashes + "): every rank must name the same checkpoint on a shared file system";
  }
  comm::raise_together(comm, error, "load checkpoint");
}

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
  ShardRecords s = decode_shard(bytes, path, m.layer.config.expert.activation);
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
  out.activation = m.layer.config.expert.activation;
  out.ids = hosted;
  const auto w1 = static_cast<size_t>(m.layer.config.expert.w1_size());
  const auto w2 = static_cast<size_t>(m.layer.config.expert.w2_size());
  out.w1.resize(hosted.size() * w1);
  out.w2.resize(hosted.size() * w2);
  out.centers = Matrix(static_cast<int64_t>(hosted.size()), out.dim);
  std::map<int, std::vector<size_t>> by_shard;  // shard -> indices into hosted
  for (size_t i = 0; i < hosted.size(); ++i) by_shard[m.owners[hosted[i]]].push_back(i);
  for (const auto& [q, indices] : by_shard) {
    const ShardRecords s = read_shard(dir, m, q);
    for (size_t i : indices) {
      const auto j = static_cast<size_t>(std::lower_bound(s.ids.begin(), s.ids.end(), hosted[i]) -
                                         s.ids.begin());
      std::copy_n(s.w1.data() + j * w1, w1, out.w1.data() + i * w1);
      std::copy_n(s.w2.data() + j * w2, w2, out.w2.data() + i * w2);
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

// dst = the host values `src` (as many), onto dst's device: a plain copy on
// the host backends.
void upload(const Compute& c, TensorView dst, const std::vector<float>& src) {
  if (src.empty()) return;
  c.ops->copy(
      dst,
      TensorView(const_cast<float*>(src.data()), DType::kF32, Device::host(), dst.rows, dst.cols),
      c.stream);
  c.ops->synchronize(c.stream);  // src may be freed on return
}

void install_parameters(MoELayer& layer, ShardRecords mine) {
  if (layer.hosted() != mine.ids)
    throw InternalError("load checkpoint: rank " + std::to_string(mine.rank) +
                        " read other experts than the layer hosts");
  const ExpertWeightsView w = layer.experts().weights();
  if (mine.w1.size() != static_cast<size_t>(w.w1.numel()) ||
      mine.w2.size() != static_cast<size_t>(w.w2.numel()))
    throw InternalError("load checkpoint: rank " + std::to_string(mine.rank) +
                        " read parameters of another shape than the layer's");
  upload(layer.compute(), w.w1, mine.w1);
  upload(layer.compute(), w.w2, mine.w2);
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

SaveResult save_checkpoint(MoELayer& layer, const std::string& dir_arg,
                           const SaveOptions& options) {
  comm::Communicator& comm = layer.communicator();
  const bool root = comm.rank() == 0;
  std::optional<checkpoint_dir::StagedSave> staged;  // rank 0's
  try {
    comm::check_together(comm, "save checkpoint", [&] {
      require_directory_argument(dir_arg);
      if (root) staged.emplace(without_trailing_slash(dir_arg));
    });
    const std::string staging = broadcast_path(comm, root ? staged->path() : "");
    ShardEntry mine;
    comm::check_together(comm, "save checkpoint",
                         [&] { mine = write_shard(layer, staging, options); });
    const std::vector<ShardEntry> entries = gather_entries(comm, mine);
    SaveResult result;
    // The manifest last: a staging directory without one is no checkpoint.
    comm::check_together(comm, "save checkpoint", [&] {
      if (!root) return;
      require_shards_written(staging, entries);
      write_file_durably(manifest_path(staging), encode_manifest(manifest_of(layer, entries)));
      if (options.after_file) options.after_file(manifest_path(staging));
      result.leftover = staged->publish(options.exchange ? options.exchange
                                                         : checkpoint_dir::exchange_directories);
    });
    return result;
  } catch (...) {
    // Every rank is past its writes (each phase ends on every rank
    // together). The previous checkpoint in `dir` is untouched unless an
    // in-place commit had begun, whose error says where the files are.
    if (staged) staged->discard();
    throw;
  }
}

std::unique_ptr<MoELayer> load_checkpoint(comm::Communicator& comm, const std::string& dir,
                                          const LoadOptions& options) {
  CheckpointManifest m;
  Codebook codebook;
  uint64_t digest = 0;
  comm::check_together(comm, "load checkpoint", [&] {
    require_directory_argument(dir);
    const std::vector<char> bytes = read_file(manifest_path(dir));
    m = decode_manifest(bytes, manifest_path(dir));
    digest = fnv1a64(bytes.data(), bytes.size());
  });
  require_same_checkpoint(comm, digest, manifest_path(dir));
  comm::check_together(comm, "load checkpoint", [&] {
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
  auto layer = std::make_unique<MoELayer>(comm, m.layer.strategy, m.layer.config,
                                          std::move(codebook), std::move(m.assignment),
                                          std::move(placement), centers.view(), 0, options.compute);
  install_parameters(*layer, std::move(mine));
  if (!m.bias.empty()) layer->set_bias(MatrixView(m.bias.data(), m.layer.experts, 1));
  if (m.query) {
    // The layer was built on the primary lists; it routes with all of them.
    m.query->codebook = layer->codebook();
    layer->set_query_lists(std::move(*m.query));
  }
  return layer;
}

}  // namespace airmoe::runtime
