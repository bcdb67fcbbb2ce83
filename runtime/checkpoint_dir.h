// A checkpoint directory on disk: the files' durable writes, and rank 0's
// side of a save -- where the files are staged and how a finished staging
// directory becomes the checkpoint (docs/checkpoints.md, "Writing
// atomically"). No collectives here: runtime/checkpoint.cpp runs the phases.
//
// A save removes only what it made itself and the files of the checkpoint it
// replaces (manifest.airmoe and shard-NNNNN.airmoe): never another file in
// the directory, nor anything beside it.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace airmoe::runtime::checkpoint_dir {

std::vector<char> read_file(const std::string& path);

// A temporary file, synced, then renamed over `path`: a reader sees the old
// file or the whole new one, never a part.
void write_file_durably(const std::string& path, const std::vector<char>& bytes);

// True for the names of a checkpoint's own files.
bool is_checkpoint_file(const std::string& name);

// Swaps two directories atomically; returns 0, or -1 with errno set.
using Exchange = std::function<int(const std::string& staged, const std::string& dir)>;

// Linux renameat2(RENAME_EXCHANGE).
int exchange_directories(const std::string& staged, const std::string& dir);

// One save's staging directory and how it becomes the checkpoint. Where the
// checkpoint directory holds a checkpoint and nothing else, the staging
// directory is its sibling and is swapped with it in one atomic exchange.
// Where the directory cannot be swapped (a mount point, a file system
// without the exchange) or holds other files too, the staging directory is
// inside it and the files replace the old ones in place, the manifest last.
class StagedSave {
 public:
  // Refuses a `dir` that a save must not replace (a file; a directory of
  // other files and no manifest) and makes a fresh staging directory.
  explicit StagedSave(const std::string& dir);

  // Where every rank writes its files.
  const std::string& path() const { return staging_; }

  // Every file is in path(): makes them the checkpoint in the directory.
  // Returns "" or, when the previous checkpoint could not be removed, where
  // it was left and why (the new checkpoint is in place then).
  std::string publish(const Exchange& exchange);

  // A failed save: removes the staging directory, unless the files had begun
  // to replace the previous ones (publish's error says where they are then).
  void discard() noexcept;

 private:
  std::string commit_in_place();

  std::string dir_;      // the checkpoint directory, absolute
  std::string staging_;  // made by this save
  bool in_place_ = false;
  bool committing_ = false;
};

}  // namespace airmoe::runtime::checkpoint_dir
