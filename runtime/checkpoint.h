// Checkpoints of an MoE layer: its configuration, codebook, lists (query-aware
// ones too), selection bias and placement, and every expert's FFN parameters
// and router center, keyed by global expert id, so that a checkpoint written
// at P ranks loads at any P'.
// The format (docs/checkpoints.md): a directory holding a manifest and one
// shard file per writing rank, little-endian, each file with a magic, a format
// version and a trailing FNV-1a 64 checksum (core/hash.h).
//
// save_checkpoint and load_checkpoint are collectives. A file that is
// missing, truncated, corrupted, from another checkpoint or of another format
// version is refused on every rank together, naming the file and what is
// wrong, and so are ranks that read different checkpoints. A save writes into
// a fresh staging directory and publishes it only once every file is written
// and synced, so a failed save leaves the previous checkpoint as it was
// (runtime/checkpoint_dir.h).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/matrix.h"
#include "router/query_lists.h"
#include "runtime/coordinator.h"
#include "runtime/moe_layer.h"

namespace airmoe::runtime {

// The manifest's newest format version (2 adds the selection bias, 3 the
// query-aware lists; manifests of versions 1 and 2, which have none, are
// still read) and the shard files' version.
inline constexpr uint32_t kManifestVersion = 3;
inline constexpr uint32_t kOldestManifestVersion = 1;
inline constexpr uint32_t kShardVersion = 1;

// The layer a checkpoint holds, as a caller may require it.
struct CheckpointConfig {
  Strategy strategy = Strategy::kAir;
  MoEConfig config;
  int64_t experts = 0;    // E
  int64_t codewords = 0;  // C
};

// The manifest's record of one shard file.
struct ShardEntry {
  uint64_t bytes = 0;
  uint64_t checksum = 0;  // the file's trailing checksum
  int64_t records = 0;
};

struct CheckpointManifest {
  CheckpointConfig layer;
  int32_t ranks = 0;                // P the checkpoint was written at
  Matrix codebook;                  // [C, d], unit rows, bit for bit
  std::vector<int32_t> assignment;  // [E], each expert's list
  std::vector<int32_t> owners;      // [E], the rank (of P) whose shard holds it
  std::vector<float> bias;          // [E] selection bias (MoELayer::set_bias), or empty: none
  // The query-aware lists the layer routes with (MoELayer::refresh_query_lists),
  // or none. Their codebook is `codebook` (the layer routes with the
  // token-trained one in place of the centers'), each expert's first list is
  // its `assignment`; query->codebook is left empty here.
  std::optional<QueryLists> query;
  std::vector<ShardEntry> shards;  // [P]
};

// One shard file's records: expert ids ascending; per id, W1 [w1_rows, d]
// (SwiGLU: gate rows, then up rows), W2 [d, h] and the center [d], in id
// order. The activation is the manifest's (it sets W1's rows), not a field
// of the shard file.
struct ShardRecords {
  int32_t rank = 0, ranks = 0;
  int64_t dim = 0, hidden = 0;
  Activation activation = Activation::kGelu;
  std::vector<int32_t> ids;
  std::vector<float> w1, w2;
  Matrix centers;
};

// The file formats in memory, no I/O. decode_* refuse anything but a
// well-formed file of a format version this build reads with a UsageError that names
// `name` and what is wrong (the fuzzed readers, tests/fuzz/).
std::vector<char> encode_manifest(const CheckpointManifest& manifest);
CheckpointManifest decode_manifest(std::span<const char> bytes, const std::string& name);
std::vector<char> encode_shard(const ShardRecords& shard);
// `activation`: the manifest's, which says how many rows each W1 holds.
ShardRecords decode_shard(std::span<const char> bytes, const std::string& name,
                          Activation activation);

std::string manifest_path(const std::string& dir);
std::string shard_path(const std::string& dir, int rank);

// This rank's reading of a checkpoint's manifest (not a collective).
CheckpointManifest read_manifest(const std::string& dir);

struct SaveOptions {
  // Called with each file's path once the file is written and synced; a
  // throw fails the save there (how the tests inject a failure midway).
  std::function<void(const std::string& path)> after_file;
  // Swaps the staged directory with the previous checkpoint's atomically;
  // returns 0, or -1 with errno set. Unset: renameat2(RENAME_EXCHANGE). The
  // tests inject the failure of a file system without it.
  std::function<int(const std::string& staged, const std::string& dir)> exchange;
};

// What a save that succeeded reports.
struct SaveResult {
  // "" or, on rank 0, where the previous checkpoint was left because it
  // could not be removed, and why (it never blocks a later save).
  std::string leftover;
};

// Collective: writes `layer` into the directory `dir` (the one rank 0 names),
// replacing the checkpoint there only once the whole new one is written.
// Other files in `dir` are kept; nothing beside it is touched.
SaveResult save_checkpoint(MoELayer& layer, const std::string& dir,
                           const SaveOptions& options = {});

struct LoadOptions {
  // When set, the checkpoint must hold exactly this layer, or it is refused.
  std::optional<CheckpointConfig> expect;
  // When set, the coordinator plans the placement with this policy. When
  // not, a checkpoint loaded at the P it was written at keeps its placement,
  // and at another P the coordinator plans by lists (PlacementPolicy::kList)
  // with a load of one token per list.
  std::optional<PlacementPolicy> policy;
  // Where the loaded layer's experts and vectors live (MoELayer's compute);
  // the checkpoint's parameters are copied there.
  Compute compute = host_compute();
};

// Collective: the layer the checkpoint in `dir` holds, on this
// communicator's ranks; each rank reads the records of the experts it hosts
// from whichever shard files hold them. Every rank must read the same
// manifest (the same bytes), or every rank refuses together.
std::unique_ptr<MoELayer> load_checkpoint(comm::Communicator& comm, const std::string& dir,
                                          const LoadOptions& options = {});

}  // namespace airmoe::runtime
