// Layer checkpoints over real MPI. A job of N ranks saves on the first P
// ranks and loads on the first P' ranks (sub-communicators), for every pair
// with max(P, P') = N: the entries mpi_P1 .. mpi_P4 together cover every
// pair in 1..4.
#include <gtest/gtest.h>
#include <mpi.h>

#include <filesystem>
#include <memory>
#include <optional>
#include <span>

#include "checkpoint_checks.h"
#include "comm/mpi_communicator.h"

namespace airmoe {
namespace {

using runtime::Strategy;

// A fresh directory that rank 0 made, the same path on every rank (the ranks
// share the file system), removed at the end.
class SharedScratchDir {
 public:
  explicit SharedScratchDir(comm::Communicator& comm) : comm_(comm) {
    std::vector<char> path;
    if (comm.rank() == 0) {
      const std::string made = test::make_scratch_dir();
      path.assign(made.begin(), made.end());
    }
    comm::broadcast_vector(comm, path, 0);
    path_.assign(path.begin(), path.end());
  }
  ~SharedScratchDir() {
    comm_.barrier();
    std::error_code ec;
    if (comm_.rank() == 0) std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  comm::Communicator& comm_;
  std::string path_;
};

// The first n ranks of the world as their own communicator; null on the
// other ranks. Collective over the world.
std::unique_ptr<comm::MpiCommunicator> first_ranks(int n) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm sub = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, rank < n ? 0 : MPI_UNDEFINED, rank, &sub);
  if (sub == MPI_COMM_NULL) return nullptr;
  auto out = std::make_unique<comm::MpiCommunicator>(sub);  // it dups `sub`
  MPI_Comm_free(&sub);
  return out;
}

// Saves on the first P ranks (a layer with query lists when `query_lists`);
// returns the snapshot on those ranks.
std::optional<test::LayerSnapshot> save_on(int P, Strategy strategy, const std::string& dir,
                                           const test::GlobalData& g = test::checkpoint_data(),
                                           bool query_lists = false) {
  std::unique_ptr<comm::MpiCommunicator> comm = first_ranks(P);
  if (!comm) return std::nullopt;
  auto layer = query_lists ? test::query_listed_layer(*comm, g, strategy)
                           : test::trained_layer(*comm, g, strategy);
  return test::save_and_snapshot(*comm, *layer, g, dir);
}

void load_on(int P, Strategy strategy, const std::string& dir,
             const std::optional<test::LayerSnapshot>& saved, int saved_ranks) {
  std::unique_ptr<comm::MpiCommunicator> comm = first_ranks(P);
  if (!comm) return;
  test::check_loads_equal(*comm, test::checkpoint_data(), dir, strategy, saved ? &*saved : nullptr,
                          saved_ranks);
}

// Saves at this job's size N and loads at every P <= N, then saves at every
// P < N and loads at N.
void round_trips(std::span<const Strategy> strategies, bool query_lists) {
  comm::MpiCommunicator world(MPI_COMM_WORLD);
  const SharedScratchDir scratch(world);
  const int N = world.size();
  const test::GlobalData& g = test::checkpoint_data();
  for (Strategy strategy : strategies) {
    const std::string full = scratch.path() + "/" + runtime::to_string(strategy) + "-N";
    const std::optional<test::LayerSnapshot> at_n = save_on(N, strategy, full, g, query_lists);
    for (int P = 1; P <= N; ++P) load_on(P, strategy, full, at_n, N);
    for (int P = 1; P < N; ++P) {
      const std::string dir =
          scratch.path() + "/" + runtime::to_string(strategy) + "-" + std::to_string(P);
      const std::optional<test::LayerSnapshot> saved = save_on(P, strategy, dir, g, query_lists);
      load_on(N, strategy, dir, saved, P);
    }
  }
}

TEST(MpiCheckpoint, RoundTripsBetweenThisJobsSizeAndEverySmallerOne) {
  round_trips(test::kAllStrategies, false);
}

// Query-aware lists (air, dense-broadcast) route bit for bit after a load
// at any P.
TEST(MpiCheckpoint, QueryListsRoundTripBetweenThisJobsSizeAndEverySmallerOne) {
  const Strategy with_lists[] = {Strategy::kAir, Strategy::kDenseBroadcast};
  round_trips(with_lists, true);
}

TEST(MpiCheckpoint, SpoiledOrMismatchedCheckpointsAreRefusedOnEveryRank) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  const SharedScratchDir scratch(comm);
  test::check_refusals(comm, test::checkpoint_data(), scratch.path());
}

// A rank that reads another checkpoint -- one of another P, another E --
// (another working directory, node-local storage) fails every rank together.
TEST(MpiCheckpoint, RanksReadingOtherCheckpointsAreRefusedTogether) {
  comm::MpiCommunicator world(MPI_COMM_WORLD);
  const int N = world.size();
  if (N < 2) GTEST_SKIP() << "needs 2 ranks or more";
  const SharedScratchDir scratch(world);
  const std::string here = scratch.path() + "/N", fewer = scratch.path() + "/N-1",
                    smaller = scratch.path() + "/E301";
  save_on(N, Strategy::kAir, here);
  save_on(N - 1, Strategy::kAir, fewer);
  save_on(N, Strategy::kAir, smaller, test::GlobalData::make(301, 16, 97, 17));
  for (const std::string& other : {fewer, smaller}) {
    SCOPED_TRACE(other);
    test::expect_other_checkpoint_refused(world, here, other);
    test::expect_other_checkpoint_refused(world, other, here);
  }
}

TEST(MpiCheckpoint, FailedSaveLeavesThePreviousCheckpointIntact) {
  comm::MpiCommunicator comm(MPI_COMM_WORLD);
  const SharedScratchDir scratch(comm);
  test::check_failed_save_keeps_previous(comm, test::checkpoint_data(), scratch.path());
}

}  // namespace
}  // namespace airmoe
