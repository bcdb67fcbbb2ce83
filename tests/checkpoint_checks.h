// Collective checks of layer checkpoints, written once and run against every
// backend: with ranks as threads (test_checkpoint.cpp, comm::run_ranks) and
// over MPI (test_checkpoint_mpi.cpp, mpiexec, on sub-communicators of 1..P
// ranks). Each function is called by every rank of `comm` together and uses
// EXPECTs only, so that no rank leaves a collective sequence early.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/errors.h"
#include "layer_checks.h"
#include "moe_fixture.h"
#include "runtime/checkpoint.h"
#include "runtime/moe_layer.h"
#include "test_util.h"

namespace airmoe::test {

inline const runtime::Strategy kAllStrategies[] = {runtime::Strategy::kAir,
                                                   runtime::Strategy::kDenseReplicated,
                                                   runtime::Strategy::kDenseBroadcast};

// The data every checkpoint test uses (E = 601, d = 16, T = 97, C = 23).
inline const GlobalData& checkpoint_data() {
  static const GlobalData g = GlobalData::make();
  return g;
}

// A fresh directory under the system's temporary directory ("" if it cannot
// be made).
inline std::string make_scratch_dir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "airmoe-ckpt-XXXXXX").string();
  return mkdtemp(pattern.data()) ? pattern : std::string();
}

// A layer whose state is not what its constructor made: its centers moved
// (and, where the strategy syncs one, its codebook and lists with them) and
// its FFN parameters were changed by a function of the expert id, so the
// same layer results on any P.
inline std::unique_ptr<runtime::MoELayer> trained_layer(
    comm::Communicator& comm, const GlobalData& g, runtime::Strategy strategy,
    runtime::Activation activation = runtime::Activation::kGelu) {
  const runtime::PlacementPlan plan = runtime::plan_and_broadcast(
      comm, runtime::PlacementPolicy::kLocality, g.codebook, g.lists(), g.load);
  runtime::MoEConfig config = small_layer_config(g.data.tokens.cols());
  config.expert.activation = activation;
  auto layer = std::make_unique<runtime::MoELayer>(comm, strategy, config, g.codebook, g.assignment,
                                                   plan.placement, g.data.centers.view(), 123);
  Matrix centers = layer->local_centers();
  for (int64_t i = 0; i < centers.rows(); ++i)
    for (int64_t c = 0; c < centers.cols(); ++c)
      centers(i, c) += 0.2f * std::sin(static_cast<float>(layer->hosted()[i] * 7 + c));
  layer->set_local_centers(centers.view());
  if (strategy != runtime::Strategy::kDenseReplicated) layer->sync_codebook(1.0);
  const int64_t w = layer->config().expert.w1_size();
  for (int64_t i = 0; i < layer->experts().size(); ++i)
    for (int64_t j = 0; j < w; ++j)
      layer->experts().w1(i)[j] += 0.01f * std::cos(static_cast<float>(layer->hosted()[i] + j));
  return layer;
}

// A trained_layer (air or dense-broadcast) that routes with query-aware lists
// built from every rank's part of the tokens, under a selection bias: its
// lists overlap, its codebook is trained on the tokens.
inline std::unique_ptr<runtime::MoELayer> query_listed_layer(comm::Communicator& comm,
                                                             const GlobalData& g,
                                                             runtime::Strategy strategy) {
  auto layer = trained_layer(comm, g, strategy);
  const Matrix bias = random_matrix(g.data.centers.rows(), 1, 0.5, 4243);
  layer->set_bias(bias.view());
  QueryListOptions options;
  options.codewords = 6;
  options.list_length = 40;
  options.k = layer->config().k;
  options.kmeans_iterations = 3;
  layer->refresh_query_lists(g.tokens_of(comm.rank(), comm.size()), options);
  return layer;
}

// A layer's whole state and its forward on every token, gathered to every
// rank, keyed by global expert id.
struct LayerSnapshot {
  std::map<int32_t, std::vector<float>> experts;  // id -> W1 | W2 | center
  std::vector<float> codebook;
  std::vector<int32_t> assignment;
  std::vector<float> bias;              // [E] or empty
  std::vector<int64_t> query_offsets;   // [E + 1] or empty: no query lists
  std::vector<int32_t> query_lists;     // each expert's query lists
  std::vector<int32_t> routed_experts;  // [T, k]
  std::vector<int32_t> shortlist;       // [T], each token's shortlist size
  std::vector<float> gates;             // [T, k]
  std::vector<float> out;               // [T, d]
};

inline LayerSnapshot snapshot(comm::Communicator& comm, runtime::MoELayer& layer,
                              const GlobalData& g) {
  LayerSnapshot s;
  const int64_t w1 = layer.config().expert.w1_size(), w2 = layer.config().expert.w2_size();
  const int64_t d = layer.config().expert.dim;
  std::vector<float> mine;
  for (int64_t i = 0; i < layer.experts().size(); ++i) {
    mine.insert(mine.end(), layer.experts().w1(i), layer.experts().w1(i) + w1);
    mine.insert(mine.end(), layer.experts().w2(i), layer.experts().w2(i) + w2);
    mine.insert(mine.end(), layer.local_centers().row(i), layer.local_centers().row(i) + d);
  }
  const auto ids = comm::allgatherv_vector<int32_t>(comm, layer.hosted());
  const auto rows = comm::allgatherv_vector<float>(comm, mine);
  const size_t per = static_cast<size_t>(w1 + w2 + d);
  for (size_t i = 0; i < ids.size(); ++i)
    s.experts[ids[i]].assign(rows.begin() + i * per, rows.begin() + (i + 1) * per);
  const MatrixView cw = layer.codebook().codewords();
  s.codebook.assign(cw.data, cw.data + cw.rows * cw.cols);
  s.assignment = layer.lists().assignment();
  if (const TensorView b = layer.bias(); b.rows > 0)
    s.bias.assign(b.as<float>(), b.as<float>() + b.rows);
  if (const std::optional<QueryLists> q = layer.query_lists()) {
    s.query_offsets = q->membership.offsets;
    s.query_lists = q->membership.lists;
  }
  const runtime::ForwardResult fwd = layer.forward(g.tokens_of(comm.rank(), comm.size()));
  const Matrix& out = fwd.output;
  s.routed_experts = comm::allgatherv_vector<int32_t>(comm, fwd.handle.routes().experts);
  s.gates = comm::allgatherv_vector<float>(comm, fwd.handle.routes().gates);
  s.shortlist = comm::allgatherv_vector<int32_t>(comm, fwd.handle.routes().shortlist_size);
  s.out = comm::allgatherv_vector<float>(comm, std::span<const float>(out.data(), out.size()));
  return s;
}

// Parameters, codebook, lists and routes bit for bit; the output bit for bit
// when the placement is the saved one. Under another placement each rank
// sums a different subset of a token's k expert outputs before the combine
// adds the ranks' partial sums, so only the rounding may differ.
inline void expect_same_layer(const LayerSnapshot& saved, const LayerSnapshot& loaded,
                              bool same_placement, const std::string& where) {
  EXPECT_EQ(loaded.experts.size(), saved.experts.size()) << where;
  EXPECT_TRUE(loaded.experts == saved.experts) << where << ": parameters differ";
  EXPECT_EQ(loaded.codebook, saved.codebook) << where;
  EXPECT_EQ(loaded.assignment, saved.assignment) << where;
  EXPECT_EQ(loaded.bias, saved.bias) << where;
  EXPECT_EQ(loaded.query_offsets, saved.query_offsets) << where;
  EXPECT_EQ(loaded.query_lists, saved.query_lists) << where;
  EXPECT_EQ(loaded.routed_experts, saved.routed_experts) << where;
  EXPECT_EQ(loaded.gates, saved.gates) << where;
  EXPECT_EQ(loaded.shortlist, saved.shortlist) << where;
  ASSERT_EQ(loaded.out.size(), saved.out.size()) << where;
  if (same_placement) {
    EXPECT_EQ(loaded.out, saved.out) << where;
  } else {
    EXPECT_LE(rel_error(loaded.out.data(), saved.out.data(), saved.out.size()), 1e-6) << where;
  }
}

// Collective: saves `layer` and returns its snapshot.
inline LayerSnapshot save_and_snapshot(comm::Communicator& comm, runtime::MoELayer& layer,
                                       const GlobalData& g, const std::string& dir) {
  runtime::save_checkpoint(layer, dir);
  return snapshot(comm, layer, g);
}

// Collective: loads `dir` on this communicator and compares with `saved`
// (a checkpoint written at `saved_ranks`) on the ranks that have it (over
// MPI, the ranks that were in the saving communicator).
inline void check_loads_equal(comm::Communicator& comm, const GlobalData& g, const std::string& dir,
                              runtime::Strategy strategy, const LayerSnapshot* saved,
                              int saved_ranks) {
  const runtime::CheckpointManifest manifest = runtime::read_manifest(dir);
  EXPECT_EQ(manifest.ranks, saved_ranks);
  runtime::LoadOptions options;
  options.expect = manifest.layer;
  EXPECT_EQ(options.expect->strategy, strategy);
  std::unique_ptr<runtime::MoELayer> layer = runtime::load_checkpoint(comm, dir, options);
  const std::string where = std::string(runtime::to_string(strategy)) +
                            " saved at P=" + std::to_string(saved_ranks) +
                            ", loaded at P=" + std::to_string(comm.size());
  EXPECT_EQ(layer->strategy(), strategy) << where;
  const bool same_placement = comm.size() == saved_ranks;
  if (same_placement) {
    EXPECT_EQ(layer->placement().owners(), manifest.owners) << where;
  }
  const LayerSnapshot loaded = snapshot(comm, *layer, g);
  if (saved) expect_same_layer(*saved, loaded, same_placement, where);
}

// ------------------------------------------------------------ refusals --

// Every rank refuses together: an std::invalid_argument (UsageError where the
// rank found the fault, PeerError elsewhere) naming the file and the fault.
template <typename Call>
void expect_refused_together(Call&& call, const std::string& file, const std::string& fault) {
  try {
    call();
    ADD_FAILURE() << "expected a refusal naming '" << file << "' and '" << fault << "'";
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(file), std::string::npos) << msg;
    EXPECT_NE(msg.find(fault), std::string::npos) << msg;
  }
}

inline std::vector<char> file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

inline void put_file_bytes(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// One way to spoil a checkpoint (run on one rank, between barriers) and what
// the refusal must say.
struct Spoiler {
  const char* name;
  std::string file;   // the file the message must name
  std::string fault;  // what the message must say
  std::function<void()> spoil;
};

// `dir` holds a good checkpoint whose shard `q` exists; `other` one of
// another layer at the same P. Each spoiler is applied to a copy.
inline std::vector<Spoiler> spoilers(const std::string& dir, const std::string& other, int q) {
  const std::string manifest = runtime::manifest_path(dir), shard1 = runtime::shard_path(dir, q);
  auto edit = [](const std::string& path, auto&& change) {
    std::vector<char> bytes = file_bytes(path);
    change(bytes);
    put_file_bytes(path, bytes);
  };
  return {
      {"truncated shard", shard1, "truncated",
       [=] { edit(shard1, [](std::vector<char>& b) { b.resize(b.size() - 10); }); }},
      {"flipped byte", shard1, "corrupted",
       [=] { edit(shard1, [](std::vector<char>& b) { b[b.size() / 2] ^= 0x10; }); }},
      {"foreign manifest", manifest, "is not an airmoe checkpoint manifest",
       [=] {
         put_file_bytes(manifest, {'{', '"', 'k', '"', ':', '1', '}', '\n'});
       }},
      {"shard of another checkpoint", shard1, "does not belong to this checkpoint",
       [=] {
         std::filesystem::copy_file(runtime::shard_path(other, q), shard1,
                                    std::filesystem::copy_options::overwrite_existing);
       }},
      {"other version", manifest, "format version 4; this build reads versions 1 to 3",
       [=] { edit(manifest, [](std::vector<char>& b) { b[8] = 4; }); }},
      {"missing manifest", manifest, "No such file", [=] { std::filesystem::remove(manifest); }},
  };
}

// Collective: the last rank loads `other`, every other rank `dir` (another
// checkpoint: other weights, another E, another P; another working directory
// or node-local storage in a real job). Refused on every rank together before
// any rank builds a layer, which would otherwise crash or hang.
inline void expect_other_checkpoint_refused(comm::Communicator& comm, const std::string& dir,
                                            const std::string& other) {
  const std::string mine = comm.rank() == comm.size() - 1 ? other : dir;
  expect_refused_together(
      [&] { runtime::load_checkpoint(comm, mine); },
      "rank " + std::to_string(comm.size() - 1) + ": reads another checkpoint than rank 0",
      runtime::manifest_path(other));
}

// Collective: an empty directory argument, on every rank or on one (the
// others naming the checkpoint `dir`), is refused on every rank before
// anything is read or written.
inline void check_empty_paths_refused(comm::Communicator& comm, runtime::MoELayer& layer,
                                      const std::string& dir) {
  const std::string empty_message = "the directory argument dir is empty";
  expect_refused_together([&] { runtime::save_checkpoint(layer, ""); }, "rank 0", empty_message);
  expect_refused_together([&] { runtime::load_checkpoint(comm, ""); }, "rank 0", empty_message);
  const int last = comm.size() - 1;
  const std::string mine = comm.rank() == last ? std::string() : dir;
  expect_refused_together([&] { runtime::save_checkpoint(layer, mine); },
                          "rank " + std::to_string(last), empty_message);
  expect_refused_together([&] { runtime::load_checkpoint(comm, mine); },
                          "rank " + std::to_string(last), empty_message);
}

// Collective: every spoiled checkpoint is refused on every rank (the last
// rank's shard is the one spoiled, which with P >= 2 only that rank reads),
// and so is a good one whose layer is not the one the caller asks for.
inline void check_refusals(comm::Communicator& comm, const GlobalData& g, const std::string& base) {
  const std::string good = base + "/good", other = base + "/other", copy = base + "/spoiled";
  {
    auto layer = trained_layer(comm, g, runtime::Strategy::kAir);
    runtime::save_checkpoint(*layer, good);
    for (int64_t i = 0; i < layer->experts().size(); ++i) layer->experts().w2(i)[0] -= 1.0f;
    runtime::save_checkpoint(*layer, other);
  }
  for (const Spoiler& s : spoilers(copy, other, comm.size() - 1)) {
    if (comm.rank() == 0) {
      std::filesystem::remove_all(copy);
      std::filesystem::copy(good, copy);
      s.spoil();
    }
    comm.barrier();
    SCOPED_TRACE(s.name);
    expect_refused_together([&] { runtime::load_checkpoint(comm, copy); }, s.file, s.fault);
    comm.barrier();
  }
  runtime::LoadOptions options;
  options.expect = runtime::read_manifest(good).layer;
  options.expect->config.k = 5;
  expect_refused_together([&] { runtime::load_checkpoint(comm, good, options); },
                          runtime::manifest_path(good), "k = 4; the caller asks for k = 5");
  options.expect = runtime::read_manifest(good).layer;
  options.expect->strategy = runtime::Strategy::kDenseReplicated;
  expect_refused_together([&] { runtime::load_checkpoint(comm, good, options); },
                          runtime::manifest_path(good), "strategy = air");
  if (comm.size() > 1) expect_other_checkpoint_refused(comm, good, other);
}

// Collective: a save that fails midway -- after this rank's shard file on the
// last rank, or after the manifest on rank 0 -- or cannot start leaves the
// previous checkpoint loadable and equal to what it was, and no staging
// directory behind.
inline void check_failed_save_keeps_previous(comm::Communicator& comm, const GlobalData& g,
                                             const std::string& base) {
  const std::string dir = base + "/ckpt";
  auto layer = trained_layer(comm, g, runtime::Strategy::kAir);
  const LayerSnapshot before = save_and_snapshot(comm, *layer, g, dir);
  // The layer moves on; its next saves fail.
  for (int64_t i = 0; i < layer->experts().size(); ++i) layer->experts().w2(i)[0] += 1.0f;
  const int last = comm.size() - 1;
  const auto fail_on = [&](int rank, const std::string& suffix) {
    runtime::SaveOptions options;
    options.after_file = [&comm, rank, suffix](const std::string& path) {
      if (comm.rank() == rank && path.ends_with(suffix))
        throw std::runtime_error("injected failure after " + path);
    };
    return options;
  };
  expect_refused_together(
      [&] { runtime::save_checkpoint(*layer, dir, fail_on(last, runtime::shard_path("", last))); },
      "injected failure", "shard-");
  expect_refused_together(
      [&] { runtime::save_checkpoint(*layer, dir, fail_on(0, "manifest.airmoe")); },
      "injected failure", "manifest.airmoe");
  // The last rank's shard file is not where rank 0 looks (ranks that do not
  // share the file system), or not as it was written: refused before the
  // manifest makes it a checkpoint.
  const std::string last_shard = runtime::shard_path("", last);
  const auto spoil_on_last = [&](auto&& spoil) {
    runtime::SaveOptions options;
    options.after_file = [&comm, last, last_shard, spoil](const std::string& path) {
      if (comm.rank() == last && path.ends_with(last_shard)) spoil(path);
    };
    return options;
  };
  expect_refused_together(
      [&] {
        runtime::save_checkpoint(
            *layer, dir, spoil_on_last([](const std::string& p) { std::filesystem::remove(p); }));
      },
      last_shard, "is not there for rank 0");
  expect_refused_together(
      [&] {
        runtime::save_checkpoint(*layer, dir, spoil_on_last([](const std::string& p) {
          std::filesystem::resize_file(p, 20);
        }));
      },
      last_shard, "holds 20 bytes for rank 0");
  // A checkpoint path under a regular file cannot be created.
  const std::string blocker = base + "/not-a-directory";
  if (comm.rank() == 0) put_file_bytes(blocker, {'x'});
  comm.barrier();
  expect_refused_together([&] { runtime::save_checkpoint(*layer, blocker + "/ckpt"); }, blocker,
                          "cannot create");
  check_empty_paths_refused(comm, *layer, dir);
  comm.barrier();
  // Nothing but the checkpoint and the blocker: no staging directory left.
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(base))
    names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"ckpt", "not-a-directory"}));
  std::unique_ptr<runtime::MoELayer> loaded = runtime::load_checkpoint(comm, dir);
  expect_same_layer(before, snapshot(comm, *loaded, g), true, "after the failed saves");
}

}  // namespace airmoe::test
