// Layer checkpoints with ranks as threads: round trips between every P and
// P' in 1..4 for every strategy, each refusal, the failed save; and the file
// formats alone (tests/fuzz/ feeds the same decoders arbitrary bytes).
#include <gtest/gtest.h>
#include <sys/mount.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint_checks.h"
#include "comm/in_process.h"
#include "core/hash.h"
#include "ops/registry.h"

namespace airmoe {
namespace {

using runtime::Activation;
using runtime::Strategy;

// A fresh directory, removed at the end.
class ScratchDir {
 public:
  ScratchDir() : path_(test::make_scratch_dir()) {
    if (path_.empty()) throw std::runtime_error("cannot make a scratch directory");
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

class CheckpointRoundTrip : public ::testing::TestWithParam<Strategy> {};

TEST_P(CheckpointRoundTrip, SavedAtAnyPLoadsAtAnyPBitForBit) {
  const Strategy strategy = GetParam();
  const test::GlobalData& g = test::checkpoint_data();
  const ScratchDir scratch;
  for (int P = 1; P <= 4; ++P) {
    const std::string dir = scratch.path() + "/P" + std::to_string(P);
    test::LayerSnapshot saved;
    std::mutex mu;
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      auto layer = test::trained_layer(comm, g, strategy);
      test::LayerSnapshot s = test::save_and_snapshot(comm, *layer, g, dir);
      std::lock_guard<std::mutex> lock(mu);
      if (comm.rank() == 0) saved = std::move(s);
    });
    for (int P2 = 1; P2 <= 4; ++P2)
      comm::run_ranks(P2, [&](comm::Communicator& comm) {
        test::check_loads_equal(comm, g, dir, strategy, &saved, P);
      });
  }
}

INSTANTIATE_TEST_SUITE_P(EveryStrategy, CheckpointRoundTrip,
                         ::testing::Values(Strategy::kAir, Strategy::kDenseReplicated,
                                           Strategy::kDenseBroadcast),
                         [](const auto& info) {
                           std::string name = runtime::to_string(info.param);
                           std::erase(name, '-');
                           return name;
                         });

// Saves, at P = 2 and in every strategy, the layer that `make` builds on
// each rank, checks the manifest with `check_manifest(dir, saved)`, and
// loads it at P' = 1 and 3: bit for bit the saved layer.
template <typename Make, typename CheckManifest>
void round_trip_at_other_p(Make&& make, CheckManifest&& check_manifest) {
  const test::GlobalData& g = test::checkpoint_data();
  const ScratchDir scratch;
  for (const Strategy strategy : test::kAllStrategies) {
    const std::string dir = scratch.path() + "/" + runtime::to_string(strategy);
    test::LayerSnapshot saved;
    std::mutex mu;
    comm::run_ranks(2, [&](comm::Communicator& comm) {
      auto layer = make(comm, g, strategy);
      test::LayerSnapshot s = test::save_and_snapshot(comm, *layer, g, dir);
      std::lock_guard<std::mutex> lock(mu);
      if (comm.rank() == 0) saved = std::move(s);
    });
    check_manifest(runtime::read_manifest(dir), saved);
    for (const int P2 : {1, 3})
      comm::run_ranks(P2, [&](comm::Communicator& comm) {
        test::check_loads_equal(comm, g, dir, strategy, &saved, 2);
      });
  }
}

// SwiGLU experts (2h W1 rows each) saved at one P load at another bit for
// bit, on every strategy.
TEST(Checkpoint, SwigluLayerRoundTripsAtAnotherP) {
  round_trip_at_other_p(
      [](comm::Communicator& comm, const test::GlobalData& g, Strategy strategy) {
        return test::trained_layer(comm, g, strategy, Activation::kSwiglu);
      },
      [](const runtime::CheckpointManifest& m, const test::LayerSnapshot&) {
        EXPECT_EQ(m.layer.config.expert.activation, Activation::kSwiglu);
      });
}

// The selection bias is the layer's state: saved (manifest version 2) and
// set again on load at any P, so routes and outputs are the saved layer's.
TEST(Checkpoint, BiasedLayerRoundTripsAtAnotherP) {
  const Matrix bias = random_matrix(test::checkpoint_data().data.centers.rows(), 1, 1.0, 4242);
  round_trip_at_other_p(
      [&](comm::Communicator& comm, const test::GlobalData& g, Strategy strategy) {
        auto layer = test::trained_layer(comm, g, strategy);
        layer->set_bias(bias.view());
        return layer;
      },
      [&](const runtime::CheckpointManifest& m, const test::LayerSnapshot& saved) {
        ASSERT_EQ(saved.bias.size(), static_cast<size_t>(bias.rows()));
        EXPECT_EQ(m.bias, saved.bias);
      });
}

TEST(Checkpoint, ResavingReplacesThePreviousCheckpoint) {
  const test::GlobalData& g = test::checkpoint_data();
  const ScratchDir scratch;
  const std::string dir = scratch.path() + "/ckpt";
  comm::run_ranks(2, [&](comm::Communicator& comm) {
    auto layer = test::trained_layer(comm, g, Strategy::kAir);
    runtime::save_checkpoint(*layer, dir);
    for (int64_t i = 0; i < layer->experts().size(); ++i) layer->experts().w1(i)[0] = 42.0f;
    const test::LayerSnapshot second = test::save_and_snapshot(comm, *layer, g, dir);
    auto loaded = runtime::load_checkpoint(comm, dir);
    test::expect_same_layer(second, test::snapshot(comm, *loaded, g), true, "re-saved");
    EXPECT_FALSE(std::filesystem::exists(dir + ".saving"));
  });
}

// A mistyped path must not cost the user a directory: a save replaces only
// a checkpoint (or an empty directory).
TEST(Checkpoint, ADirectoryOfOtherFilesIsNeverReplaced) {
  const ScratchDir scratch;
  const std::string dir = scratch.path() + "/work";
  std::filesystem::create_directory(dir);
  test::put_file_bytes(dir + "/notes.txt", {'h', 'i'});
  comm::run_ranks(2, [&](comm::Communicator& comm) {
    auto layer = test::trained_layer(comm, test::checkpoint_data(), Strategy::kAir);
    test::expect_refused_together([&] { runtime::save_checkpoint(*layer, dir); }, dir,
                                  "holds other files and no checkpoint manifest");
  });
  EXPECT_EQ(test::file_bytes(dir + "/notes.txt"), (std::vector<char>{'h', 'i'}));
  EXPECT_FALSE(std::filesystem::exists(dir + ".saving"));
}

// Query-aware lists are the layer's state (manifest version 3): their
// token-trained codebook, overlapping lists and build options are saved, and
// the layer loaded at another P routes as the saved one, bit for bit (ids,
// gates, shortlist sizes). dense-replicated has no lists and saves none.
TEST(Checkpoint, QueryListedLayerRoundTripsAtAnotherP) {
  round_trip_at_other_p(
      [](comm::Communicator& comm, const test::GlobalData& g, Strategy strategy) {
        return strategy == Strategy::kDenseReplicated ? test::trained_layer(comm, g, strategy)
                                                      : test::query_listed_layer(comm, g, strategy);
      },
      [](const runtime::CheckpointManifest& m, const test::LayerSnapshot& saved) {
        ASSERT_EQ(m.query.has_value(), !saved.query_offsets.empty());
        if (!m.query) return;
        EXPECT_EQ(m.query->membership.offsets, saved.query_offsets);
        EXPECT_EQ(m.query->membership.lists, saved.query_lists);
        EXPECT_GT(m.query->membership.entries(), m.layer.experts);  // they overlap
        EXPECT_EQ(m.query->options.codewords, 6);
        EXPECT_EQ(m.query->options.list_length, 40);
        EXPECT_GT(m.query->build_flops, 0.0);
      });
}

// A query-listed layer loaded again keeps its build options and cost, and
// refuses a codebook sync as the saved one does.
TEST(Checkpoint, LoadedQueryListsKeepTheirOptions) {
  const test::GlobalData& g = test::checkpoint_data();
  const ScratchDir scratch;
  const std::string dir = scratch.path() + "/ckpt";
  double flops = 0.0;
  comm::run_ranks(2, [&](comm::Communicator& comm) {
    auto layer = test::query_listed_layer(comm, g, Strategy::kAir);
    runtime::save_checkpoint(*layer, dir);
    if (comm.rank() == 0) flops = layer->query_lists_build_flops();
  });
  comm::run_ranks(3, [&](comm::Communicator& comm) {
    auto layer = runtime::load_checkpoint(comm, dir);
    ASSERT_TRUE(layer->has_query_lists());
    const std::optional<QueryLists> q = layer->query_lists();
    EXPECT_EQ(q->options.k, 4);
    EXPECT_EQ(q->options.kmeans_iterations, 3);
    EXPECT_EQ(layer->query_lists_build_flops(), flops);
    test::expect_refused_together([&] { layer->sync_codebook(1.0); }, "rank 0",
                                  "call refresh_query_lists");
  });
}

// The names in `dir`, sorted.
std::vector<std::string> names_in(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// Saves a trained layer, whose FFN weights are shifted by `shift`, at P ranks
// into `dir`; returns its snapshot and the save's report.
std::pair<test::LayerSnapshot, runtime::SaveResult> save_at(
    int P, const std::string& dir, float shift, const runtime::SaveOptions& options = {},
    const test::GlobalData& g = test::checkpoint_data()) {
  test::LayerSnapshot saved;
  runtime::SaveResult result;
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    auto layer = test::trained_layer(comm, g, Strategy::kAir);
    for (int64_t i = 0; i < layer->experts().size(); ++i) layer->experts().w2(i)[0] += shift;
    runtime::SaveResult r = runtime::save_checkpoint(*layer, dir, options);
    test::LayerSnapshot s = test::snapshot(comm, *layer, g);
    if (comm.rank() == 0) saved = std::move(s), result = std::move(r);
  });
  return {std::move(saved), std::move(result)};
}

// Loads `dir` at P ranks and compares it with `saved`.
void expect_loads(int P, const std::string& dir, const test::LayerSnapshot& saved, int saved_ranks,
                  const std::string& where) {
  comm::run_ranks(P, [&](comm::Communicator& comm) {
    auto loaded = runtime::load_checkpoint(comm, dir);
    test::expect_same_layer(saved, test::snapshot(comm, *loaded, test::checkpoint_data()),
                            P == saved_ranks, where);
  });
}

// Files a user keeps beside the checkpoint's (an optimizer's state, notes)
// outlive every save; the previous checkpoint's own files do not.
TEST(Checkpoint, OtherFilesInACheckpointDirectoryAreKept) {
  const ScratchDir scratch;
  const std::string dir = scratch.path() + "/ckpt";
  save_at(3, dir, 0.0f);
  test::put_file_bytes(dir + "/optimizer.pt", {'o', 'p'});
  std::filesystem::create_directory(dir + "/notes");
  test::put_file_bytes(dir + "/notes/a.txt", {'n'});
  const auto [second, report] = save_at(2, dir, 1.0f);
  EXPECT_EQ(report.leftover, "");
  expect_loads(2, dir, second, 2, "re-saved beside other files");
  EXPECT_EQ(test::file_bytes(dir + "/optimizer.pt"), (std::vector<char>{'o', 'p'}));
  EXPECT_EQ(test::file_bytes(dir + "/notes/a.txt"), (std::vector<char>{'n'}));
  // shard-00002 was the previous checkpoint's: gone with it.
  EXPECT_EQ(names_in(dir), (std::vector<std::string>{"manifest.airmoe", "notes", "optimizer.pt",
                                                     "shard-00000.airmoe", "shard-00001.airmoe"}));
  EXPECT_EQ(names_in(scratch.path()), (std::vector<std::string>{"ckpt"}));
}

// Directories beside the checkpoint that older saves used (`dir`.previous,
// a stale `dir`.saving) are the user's: never read, removed or in the way.
TEST(Checkpoint, NothingBesideTheDirectoryIsTouched) {
  const ScratchDir scratch;
  const std::string dir = scratch.path() + "/ckpt";
  for (const char* beside : {".previous", ".saving"}) {
    std::filesystem::create_directory(dir + beside);
    test::put_file_bytes(dir + beside + "/keep", {'k'});
  }
  save_at(2, dir, 0.0f);
  const auto [second, report] = save_at(3, dir, 1.0f);
  EXPECT_EQ(report.leftover, "");
  expect_loads(3, dir, second, 3, "re-saved");
  for (const char* beside : {".previous", ".saving"})
    EXPECT_EQ(test::file_bytes(dir + beside + "/keep"), (std::vector<char>{'k'})) << beside;
  EXPECT_EQ(names_in(scratch.path()),
            (std::vector<std::string>{"ckpt", "ckpt.previous", "ckpt.saving"}));
}

// Where the directories cannot be swapped (EINVAL: a file system without
// RENAME_EXCHANGE; EBUSY: a mount point), the files replace the previous
// ones in place, the manifest last.
TEST(Checkpoint, WithoutAnExchangeTheFilesReplaceThePreviousOnesInPlace) {
  for (const int err : {EINVAL, EBUSY}) {
    const ScratchDir scratch;
    const std::string dir = scratch.path() + "/ckpt";
    std::filesystem::create_directory(dir + ".previous");
    test::put_file_bytes(dir + ".previous/keep", {'k'});
    runtime::SaveOptions no_exchange;
    no_exchange.exchange = [err](const std::string&, const std::string&) {
      errno = err;
      return -1;
    };
    save_at(3, dir, 0.0f, no_exchange);
    const auto [second, report] = save_at(2, dir, 1.0f, no_exchange);
    EXPECT_EQ(report.leftover, "");
    expect_loads(2, dir, second, 2, "re-saved in place");
    EXPECT_EQ(names_in(dir), (std::vector<std::string>{"manifest.airmoe", "shard-00000.airmoe",
                                                       "shard-00001.airmoe"}));
    EXPECT_EQ(test::file_bytes(dir + ".previous/keep"), (std::vector<char>{'k'}));
    EXPECT_EQ(names_in(scratch.path()), (std::vector<std::string>{"ckpt", "ckpt.previous"}));
  }
}

// The swapped-out previous checkpoint cannot be removed (here: a file that
// another process put into the directory during the save): it is reported
// and left under a name of its own, and the next save is not blocked.
TEST(Checkpoint, APreviousCheckpointThatCannotBeRemovedIsReportedAndNeverBlocks) {
  const ScratchDir scratch;
  const std::string dir = scratch.path() + "/ckpt";
  save_at(2, dir, 0.0f);
  runtime::SaveOptions late_file;
  late_file.after_file = [&](const std::string& path) {
    if (path.ends_with("manifest.airmoe")) test::put_file_bytes(dir + "/late.txt", {'l'});
  };
  const auto [second, report] = save_at(2, dir, 1.0f, late_file);
  EXPECT_NE(report.leftover.find("the previous checkpoint could not be removed"), std::string::npos)
      << report.leftover;
  expect_loads(2, dir, second, 2, "saved, previous left");
  std::vector<std::string> beside = names_in(scratch.path());
  ASSERT_EQ(beside.size(), 2u);
  EXPECT_NE(report.leftover.find(scratch.path() + "/" + beside[1]), std::string::npos)
      << report.leftover;
  EXPECT_EQ(names_in(scratch.path() + "/" + beside[1]), (std::vector<std::string>{"late.txt"}));
  const auto [third, report3] = save_at(3, dir, 2.0f);
  EXPECT_EQ(report3.leftover, "");
  expect_loads(3, dir, third, 3, "saved after the leftover");
}

// Every rank must read the same checkpoint: other weights, another E or
// another P on one rank is refused on every rank, in either order (not a
// crash, a hang, or a layer mixed from two checkpoints).
TEST(Checkpoint, RanksReadingOtherCheckpointsAreRefusedTogether) {
  const ScratchDir scratch;
  const std::string at2 = scratch.path() + "/P2", weights = scratch.path() + "/weights",
                    smaller = scratch.path() + "/E301", at1 = scratch.path() + "/P1",
                    at3 = scratch.path() + "/P3";
  save_at(2, at2, 0.0f);
  save_at(2, weights, 1.0f);
  save_at(2, smaller, 0.0f, {}, test::GlobalData::make(301, 16, 97, 17));
  save_at(1, at1, 0.0f);
  save_at(3, at3, 0.0f);
  for (const std::string& other : {weights, smaller, at1, at3}) {
    SCOPED_TRACE(other);
    comm::run_ranks(2, [&](comm::Communicator& comm) {
      test::expect_other_checkpoint_refused(comm, at2, other);
      test::expect_other_checkpoint_refused(comm, other, at2);
    });
  }
  comm::run_ranks(
      3, [&](comm::Communicator& comm) { test::expect_other_checkpoint_refused(comm, at3, at2); });
}

// A tmpfs mounted at `path` for the scope (needs CAP_SYS_ADMIN: root in
// the project's CI container).
class TmpfsMount {
 public:
  explicit TmpfsMount(const std::string& path) : path_(path) {
    std::filesystem::create_directory(path);
    if (::mount("airmoe-test", path.c_str(), "tmpfs", 0, "size=64m") != 0)
      error_ = std::strerror(errno);
  }
  ~TmpfsMount() {
    if (error_.empty()) ::umount2(path_.c_str(), MNT_DETACH);
  }
  const std::string& error() const { return error_; }

 private:
  std::string path_, error_;
};

// A volume mounted at the checkpoint path (a container's) cannot be renamed
// or swapped: the save writes into it in place, and touches nothing beside
// it -- not `dir`.previous, not a stale `dir`.saving that cannot be removed
// (here another mount point).
TEST(CheckpointMount, SavesIntoAMountPointInPlace) {
  const ScratchDir scratch;
  const std::string dir = scratch.path() + "/mnt";
  const TmpfsMount volume(dir), stale(dir + ".saving");
  if (!volume.error().empty() || !stale.error().empty())
    GTEST_SKIP() << "cannot mount a tmpfs (needs CAP_SYS_ADMIN): " << volume.error();
  std::filesystem::create_directory(dir + ".previous");
  test::put_file_bytes(dir + ".previous/keep", {'k'});
  test::put_file_bytes(dir + ".saving/keep", {'s'});
  const auto [first, report1] = save_at(3, dir, 0.0f);
  EXPECT_EQ(report1.leftover, "");
  expect_loads(2, dir, first, 3, "saved into a mount point");
  test::put_file_bytes(dir + "/optimizer.pt", {'o'});
  const auto [second, report2] = save_at(2, dir, 1.0f);
  EXPECT_EQ(report2.leftover, "");
  expect_loads(2, dir, second, 2, "re-saved into a mount point");
  EXPECT_EQ(names_in(dir), (std::vector<std::string>{"manifest.airmoe", "optimizer.pt",
                                                     "shard-00000.airmoe", "shard-00001.airmoe"}));
  EXPECT_EQ(test::file_bytes(dir + ".previous/keep"), (std::vector<char>{'k'}));
  EXPECT_EQ(test::file_bytes(dir + ".saving/keep"), (std::vector<char>{'s'}));
  EXPECT_EQ(names_in(scratch.path()),
            (std::vector<std::string>{"mnt", "mnt.previous", "mnt.saving"}));
}

// A fresh ext4 volume holds lost+found: the file system's, not a user's
// file, so the volume counts as empty.
TEST(CheckpointMount, AVolumesLostAndFoundIsNoUserFile) {
  const ScratchDir scratch;
  const std::string dir = scratch.path() + "/volume";
  const TmpfsMount volume(dir);
  if (!volume.error().empty())
    GTEST_SKIP() << "cannot mount a tmpfs (needs CAP_SYS_ADMIN): " << volume.error();
  std::filesystem::create_directory(dir + "/lost+found");
  const auto [saved, report] = save_at(2, dir, 0.0f);
  expect_loads(2, dir, saved, 2, "saved beside lost+found");
  EXPECT_EQ(names_in(dir), (std::vector<std::string>{"lost+found", "manifest.airmoe",
                                                     "shard-00000.airmoe", "shard-00001.airmoe"}));
}

TEST(Checkpoint, AnExplicitPolicyReplansAtTheSameP) {
  const test::GlobalData& g = test::checkpoint_data();
  const ScratchDir scratch;
  const std::string dir = scratch.path() + "/ckpt";
  test::LayerSnapshot saved;
  comm::run_ranks(3, [&](comm::Communicator& comm) {
    auto layer = test::trained_layer(comm, g, Strategy::kAir);
    test::LayerSnapshot s = test::save_and_snapshot(comm, *layer, g, dir);
    if (comm.rank() == 0) saved = std::move(s);
  });
  comm::run_ranks(3, [&](comm::Communicator& comm) {
    runtime::LoadOptions options;
    options.policy = runtime::PlacementPolicy::kRoundRobin;
    auto layer = runtime::load_checkpoint(comm, dir, options);
    for (int32_t e : layer->hosted()) EXPECT_EQ(e % 3, comm.rank());
    const test::LayerSnapshot loaded = test::snapshot(comm, *layer, g);
    test::expect_same_layer(saved, loaded, false, "round-robin at P=3");
  });
}

// A checkpoint loads onto another compute (LoadOptions::compute) and saves
// from it again, the same layer bit for bit both ways.
TEST(Checkpoint, LoadsOntoAndSavesFromAnotherCompute) {
  const test::GlobalData& g = test::checkpoint_data();
  const ScratchDir scratch;
  const std::string dir = scratch.path() + "/ckpt", again = scratch.path() + "/again";
  test::LayerSnapshot saved;
  comm::run_ranks(2, [&](comm::Communicator& comm) {
    auto layer = test::trained_layer(comm, g, Strategy::kDenseReplicated);
    test::LayerSnapshot s = test::save_and_snapshot(comm, *layer, g, dir);
    if (comm.rank() == 0) saved = std::move(s);
  });
  comm::run_ranks(2, [&](comm::Communicator& comm) {
    runtime::LoadOptions options;
    options.compute = Compute{&find_backend("device-emulated"), {}};
    auto layer = runtime::load_checkpoint(comm, dir, options);
    EXPECT_EQ(layer->compute().ops->name(), "device-emulated");
    test::expect_same_layer(saved, test::save_and_snapshot(comm, *layer, g, again), true,
                            "loaded onto device-emulated");
  });
  comm::run_ranks(2, [&](comm::Communicator& comm) {
    auto layer = runtime::load_checkpoint(comm, again);
    EXPECT_TRUE(is_host_backend(*layer->compute().ops));
    test::expect_same_layer(saved, test::snapshot(comm, *layer, g), true,
                            "saved from device-emulated");
  });
}

TEST(Checkpoint, SpoiledOrMismatchedCheckpointsAreRefusedOnEveryRank) {
  for (int P : {1, 3}) {
    const ScratchDir scratch;
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      test::check_refusals(comm, test::checkpoint_data(), scratch.path());
    });
  }
}

TEST(Checkpoint, FailedSaveLeavesThePreviousCheckpointIntact) {
  for (int P : {1, 3}) {
    const ScratchDir scratch;
    comm::run_ranks(P, [&](comm::Communicator& comm) {
      test::check_failed_save_keeps_previous(comm, test::checkpoint_data(), scratch.path());
    });
  }
}

// ------------------------------------------------------ the file formats --

runtime::CheckpointManifest small_manifest() {
  runtime::CheckpointManifest m;
  m.layer.strategy = Strategy::kDenseBroadcast;
  m.layer.config.k = 2;
  m.layer.config.probes = 1;
  m.layer.config.expert = {2, 1, runtime::Activation::kRelu};
  m.layer.experts = 3;
  m.layer.codewords = 2;
  m.ranks = 2;
  m.codebook = Matrix(2, 2);
  m.codebook(0, 0) = 1.0f;
  m.codebook(1, 1) = 1.0f;
  m.assignment = {0, 1, 1};
  m.owners = {1, 0, 1};
  m.shards = {{100, 7, 1}, {200, 9, 2}};
  return m;
}

// Re-seals a file after an edit, so that the decoder gets past the checksum.
void reseal(std::vector<char>& bytes) {
  const uint64_t h = fnv1a64(bytes.data(), bytes.size() - 8);
  std::memcpy(bytes.data() + bytes.size() - 8, &h, 8);
}

// Rewrites a manifest's format version (and its checksum).
void set_version(std::vector<char>& bytes, uint32_t version) {
  std::memcpy(bytes.data() + 8, &version, 4);
  reseal(bytes);
}

TEST(CheckpointFormat, ManifestRoundTrips) {
  const runtime::CheckpointManifest m = small_manifest();
  const runtime::CheckpointManifest back =
      runtime::decode_manifest(runtime::encode_manifest(m), "m");
  EXPECT_EQ(back.layer.strategy, m.layer.strategy);
  EXPECT_EQ(back.layer.config.k, 2);
  EXPECT_EQ(back.layer.config.expert.activation, runtime::Activation::kRelu);
  EXPECT_EQ(back.assignment, m.assignment);
  EXPECT_EQ(back.owners, m.owners);
  EXPECT_EQ(back.shards[1].checksum, 9u);
  EXPECT_EQ(std::vector<float>(back.codebook.data(), back.codebook.data() + 4),
            std::vector<float>(m.codebook.data(), m.codebook.data() + 4));
  EXPECT_TRUE(back.bias.empty());
  runtime::CheckpointManifest biased = small_manifest();
  biased.bias = {0.5f, -1.0f, 2.0f};
  EXPECT_EQ(runtime::decode_manifest(runtime::encode_manifest(biased), "m").bias, biased.bias);
}

// small_manifest with query lists: expert 0 in lists 0 then 1, expert 1 in
// 1, expert 2 in 1 then 0 (each one's first list its assignment).
runtime::CheckpointManifest query_manifest() {
  runtime::CheckpointManifest m = small_manifest();
  QueryLists q;
  q.options.codewords = 2;
  q.options.list_length = 2;
  q.options.k = 2;
  q.options.kmeans_iterations = 5;
  q.options.seed = 99;
  q.build_flops = 1234.5;
  q.membership.offsets = {0, 2, 3, 5};
  q.membership.lists = {0, 1, 1, 1, 0};
  q.membership.list_count = 2;
  m.query = std::move(q);
  return m;
}

// Byte offsets of query_manifest's file: the 80-byte header, 4 codebook
// floats, 3 lists, 3 owners, then the query section.
constexpr size_t kQueryFlag = 68, kQueryEntries = 72, kQuerySection = 80 + 16 + 12 + 12;
constexpr size_t kQueryK = kQuerySection + 8, kQueryFlops = kQuerySection + 24,
                 kQueryCounts = kQuerySection + 32, kQueryLists = kQueryCounts + 12;

TEST(CheckpointFormat, QueryListsRoundTrip) {
  const runtime::CheckpointManifest m = query_manifest();
  const runtime::CheckpointManifest back =
      runtime::decode_manifest(runtime::encode_manifest(m), "m");
  ASSERT_TRUE(back.query.has_value());
  EXPECT_EQ(back.query->options.codewords, 2);
  EXPECT_EQ(back.query->options.list_length, 2);
  EXPECT_EQ(back.query->options.k, 2);
  EXPECT_EQ(back.query->options.kmeans_iterations, 5);
  EXPECT_EQ(back.query->options.seed, 99u);
  EXPECT_EQ(back.query->build_flops, 1234.5);
  EXPECT_EQ(back.query->membership.offsets, m.query->membership.offsets);
  EXPECT_EQ(back.query->membership.lists, m.query->membership.lists);
  EXPECT_EQ(back.query->membership.list_count, 2);
  EXPECT_EQ(back.owners, m.owners);
  EXPECT_EQ(back.shards[1].checksum, 9u);
  EXPECT_EQ(runtime::encode_manifest(m).size(), kQueryLists + 20 + 2 * 24 + 8);
}

// A manifest of an older version: `fields` bytes of the newer header at
// `from` taken out, the version set to `version`.
std::vector<char> older_manifest(uint32_t version, size_t from, size_t fields) {
  std::vector<char> b = runtime::encode_manifest(small_manifest());
  b.erase(b.begin() + static_cast<std::ptrdiff_t>(from),
          b.begin() + static_cast<std::ptrdiff_t>(from + fields));
  set_version(b, version);
  return b;
}

// A version-1 manifest (no bias field in the header, no bias) still reads.
TEST(CheckpointFormat, VersionOneManifestStillReads) {
  // Without the version-2 bias flag and the version-3 query fields.
  const runtime::CheckpointManifest back = runtime::decode_manifest(older_manifest(1, 64, 16), "m");
  EXPECT_EQ(back.owners, small_manifest().owners);
  EXPECT_EQ(back.shards[1].checksum, 9u);
  EXPECT_TRUE(back.bias.empty());
  EXPECT_FALSE(back.query.has_value());
}

// A version-2 manifest (a bias flag, no query-list fields) still reads.
TEST(CheckpointFormat, VersionTwoManifestStillReads) {
  const runtime::CheckpointManifest back =
      runtime::decode_manifest(older_manifest(2, kQueryFlag, 12), "m");
  EXPECT_EQ(back.assignment, small_manifest().assignment);
  EXPECT_EQ(back.owners, small_manifest().owners);
  EXPECT_EQ(back.shards[1].checksum, 9u);
  EXPECT_TRUE(back.bias.empty());
  EXPECT_FALSE(back.query.has_value());
  // With a bias: the bias follows the owners, as in version 3.
  std::vector<char> biased = runtime::encode_manifest([] {
    runtime::CheckpointManifest m = small_manifest();
    m.bias = {0.5f, -1.0f, 2.0f};
    return m;
  }());
  biased.erase(biased.begin() + kQueryFlag, biased.begin() + kQueryFlag + 12);
  set_version(biased, 2);
  EXPECT_EQ(runtime::decode_manifest(biased, "m").bias, (std::vector<float>{0.5f, -1.0f, 2.0f}));
}

// A manifest of a version this build does not know is refused, naming it.
TEST(CheckpointFormat, AFutureVersionIsRefusedByNumber) {
  std::vector<char> b = runtime::encode_manifest(query_manifest());
  set_version(b, 4);
  AIRMOE_EXPECT_THROW_MSG(runtime::decode_manifest(b, "m"), UsageError,
                          "manifest 'm' has format version 4; this build reads versions 1 to 3");
}

// Every field of a malformed query-list section is refused by name.
TEST(CheckpointFormat, MalformedQueryListsAreRefusedByName) {
  const std::vector<char> good = runtime::encode_manifest(query_manifest());
  const auto with = [&](size_t at, auto value) {
    std::vector<char> b = good;
    std::memcpy(b.data() + at, &value, sizeof(value));
    reseal(b);
    return b;
  };
  const auto refused = [](const std::vector<char>& b, const std::string& message) {
    AIRMOE_EXPECT_THROW_MSG(runtime::decode_manifest(b, "m"), UsageError, message);
  };
  refused(with(kQueryFlag, uint32_t{2}), "manifest 'm': query lists = 2 is outside [0, 1]");
  refused(with(kQueryEntries, int64_t{2}), "query entries = 2 is outside [3, 6]");
  refused(with(kQueryEntries, int64_t{6}), "is truncated: its header promises");
  refused(with(kQueryFlag, uint32_t{0}), "query entries = 5 is outside [0, 0]");
  refused(with(kQuerySection, int64_t{0}), "query list length L = 0 is outside [1, 3]");
  refused(with(kQueryK, int32_t{4}), "query k = 4 is outside [1, 3]");
  refused(with(kQueryK + 4, int32_t{-1}), "query k-means iterations = -1 is outside");
  refused(with(kQueryFlops, std::nan("")), "query build flops = nan is not a finite count");
  refused(with(kQueryCounts + 4, int32_t{0}), "query list count of expert 1 = 0");
  refused(with(kQueryCounts + 4, int32_t{2}),
          "the query list counts add up to 6, the header says query entries = 5");
  refused(with(kQueryLists + 4, int32_t{2}),
          "manifest 'm': query lists: list segments: expert 0 is assigned to list 2, outside "
          "[0, 2)");
  refused(with(kQueryLists + 4, int32_t{0}),
          "query lists: list segments: expert 0 is in list 0 twice");
  refused(with(kQueryLists + 8, int32_t{0}), "expert 1 is in list 1, its first query list is 0");
  // Without a query flag a version-2 layout of the same bytes is too long.
  std::vector<char> v2 = good;
  set_version(v2, 2);
  refused(v2, "more than the");
}

TEST(CheckpointFormat, BadBiasIsRefusedByName) {
  runtime::CheckpointManifest m = small_manifest();
  m.bias = {0.5f, -1.0f, 2.0f};
  std::vector<char> b = runtime::encode_manifest(m);
  const float nan = std::nanf("");
  std::memcpy(b.data() + b.size() - 8 - 2 * 24 - 4, &nan, 4);  // expert 2's bias
  reseal(b);
  AIRMOE_EXPECT_THROW_MSG(runtime::decode_manifest(b, "m"), UsageError, "manifest 'm' bias");
  std::vector<char> flag = runtime::encode_manifest(small_manifest());
  const uint32_t two = 2;
  std::memcpy(flag.data() + 64, &two, 4);
  reseal(flag);
  AIRMOE_EXPECT_THROW_MSG(runtime::decode_manifest(flag, "m"), UsageError,
                          "bias = 2 is outside [0, 1]");
  // A bias flag without the bias: the size the header promises is not there.
  const uint32_t yes = 1;
  std::memcpy(flag.data() + 64, &yes, 4);
  reseal(flag);
  AIRMOE_EXPECT_THROW_MSG(runtime::decode_manifest(flag, "m"), UsageError, "is truncated");
}

TEST(CheckpointFormat, ManifestFieldsOutOfRangeAreRefusedByName) {
  const std::vector<char> good = runtime::encode_manifest(small_manifest());
  const auto with = [&](size_t at, int32_t value) {
    std::vector<char> b = good;
    std::memcpy(b.data() + at, &value, 4);
    reseal(b);
    return b;
  };
  // Offsets: strategy 12, k 16, probes 20, activation 40.
  AIRMOE_EXPECT_THROW_MSG(runtime::decode_manifest(with(12, 7), "m.airmoe"), UsageError,
                          "manifest 'm.airmoe': strategy = 7 is outside [0, 2]");
  AIRMOE_EXPECT_THROW_MSG(runtime::decode_manifest(with(16, 0), "m"), UsageError,
                          "k = 0 is outside [1, 3]");
  AIRMOE_EXPECT_THROW_MSG(runtime::decode_manifest(with(20, 3), "m"), UsageError,
                          "probes m = 3 is outside [1, 2]");
  AIRMOE_EXPECT_THROW_MSG(runtime::decode_manifest(with(40, -1), "m"), UsageError,
                          "activation = 4294967295 is outside [0, 3]");
  // The owner of expert 2 (after the 80-byte header, 4 codebook floats and 3 lists).
  const size_t owners = 80 + 16 + 12;
  AIRMOE_EXPECT_THROW_MSG(runtime::decode_manifest(with(owners + 8, 2), "m"), UsageError,
                          "expert 2 is owned by rank 2, outside [0, 2)");
  AIRMOE_EXPECT_THROW_MSG(runtime::decode_manifest(with(owners + 8, 0), "m"), UsageError,
                          "shard 0 is listed with 1 records, its owners give it 2");
}

// A shard file's header fields, no records yet.
runtime::ShardRecords shard_header(int32_t rank, int32_t ranks, int64_t dim, int64_t hidden) {
  runtime::ShardRecords s;
  s.rank = rank;
  s.ranks = ranks;
  s.dim = dim;
  s.hidden = hidden;
  return s;
}

TEST(CheckpointFormat, ShardRecordsMustAscend) {
  runtime::ShardRecords s = shard_header(1, 2, 2, 1);
  s.ids = {4, 9};
  s.w1.assign(4, 0.5f);
  s.w2.assign(4, -0.5f);
  s.centers = Matrix(2, 2, 1.0f);
  const std::vector<char> good = runtime::encode_shard(s);
  const runtime::ShardRecords back = runtime::decode_shard(good, "s", Activation::kGelu);
  EXPECT_EQ(back.ids, s.ids);
  EXPECT_EQ(back.w2, s.w2);
  std::vector<char> bad = good;
  const int32_t three = 3;
  std::memcpy(bad.data() + 44 + 4 + 4 * 6, &three, 4);  // the second record's id
  reseal(bad);
  AIRMOE_EXPECT_THROW_MSG(runtime::decode_shard(bad, "s", Activation::kGelu), UsageError,
                          "record 1 has expert id 3 after 4");
  AIRMOE_EXPECT_THROW_MSG(
      runtime::decode_shard(std::span<const char>(good).first(30), "s", Activation::kGelu),
      UsageError, "shard file 's' is truncated: 30 bytes");
}

// A SwiGLU shard's W1 holds 2h rows per expert (the manifest's activation
// says so): it round-trips, and read as a two-matrix FFN's it is refused.
TEST(CheckpointFormat, SwigluShardHoldsGateAndUpRows) {
  runtime::ShardRecords s = shard_header(0, 1, 3, 2);
  s.activation = Activation::kSwiglu;
  s.ids = {1, 5};
  for (int i = 0; i < 2 * 2 * 2 * 3; ++i) s.w1.push_back(0.25f * static_cast<float>(i));
  for (int i = 0; i < 2 * 3 * 2; ++i) s.w2.push_back(-0.5f * static_cast<float>(i));
  s.centers = Matrix(2, 3, 1.0f);
  const std::vector<char> bytes = runtime::encode_shard(s);
  const runtime::ShardRecords back = runtime::decode_shard(bytes, "s", Activation::kSwiglu);
  EXPECT_EQ(back.ids, s.ids);
  EXPECT_EQ(back.w1, s.w1);
  EXPECT_EQ(back.w2, s.w2);
  AIRMOE_EXPECT_THROW_MSG(runtime::decode_shard(bytes, "s", Activation::kSilu), UsageError,
                          "more than the");
}

// Normalizing a unit row again can move its last bits (this row's do), and
// so a route; a loaded codebook keeps the saved bits.
TEST(CheckpointFormat, CodebookIsKeptBitForBitWhereRenormalizingMovesIt) {
  const float x[4] = {0x1.395ec2p-5f, -0x1.0b54f2p+1f, 0x1.372cb4p-3f, 0x1.5e2db4p+0f};
  const Codebook once(MatrixView(x, 1, 4));
  const std::vector<float> unit(once.codewords().data, once.codewords().data + 4);
  const Codebook twice(once.codewords());
  EXPECT_NE(std::vector<float>(twice.codewords().data, twice.codewords().data + 4), unit);
  const Codebook kept = Codebook::from_unit_rows(once.codewords());
  EXPECT_EQ(std::vector<float>(kept.codewords().data, kept.codewords().data + 4), unit);
  const float two[4] = {2.0f, 0.0f, 0.0f, 0.0f};
  AIRMOE_EXPECT_THROW_MSG(Codebook::from_unit_rows(MatrixView(two, 1, 4)), UsageError,
                          "codewords row 0 has norm 2.000000, not 1");
}

}  // namespace
}  // namespace airmoe
