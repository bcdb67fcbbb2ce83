// comm/ over real MPI (MPI_COMM_WORLD, run by CTest under mpiexec with 1 to 4
// ranks): the same collective and meter checks as the in-process tests, plus
// what only MPI has: construction from a program's own communicator, MPI
// errors turned into exceptions, and messages split into pieces.
#include <gtest/gtest.h>
#include <mpi.h>

#include <climits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/mpi_communicator.h"
#include "exchange_checks.h"
#include "test_util.h"

namespace airmoe::test {
namespace {

using comm::MpiCommunicator;
using comm::TrafficCounts;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int world_size() {
  int p = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

TEST(MpiComm, Identity) {
  auto c = comm::world_communicator();
  EXPECT_STREQ(c->backend(), "mpi");
  EXPECT_EQ(c->rank(), world_rank());
  EXPECT_EQ(c->size(), world_size());
  EXPECT_EQ(c->max_message_bytes(), INT_MAX);
  // A private duplicate: congruent with, but not, MPI_COMM_WORLD.
  EXPECT_NE(c->comm(), MPI_COMM_WORLD);
  int cmp = MPI_UNEQUAL;
  MPI_Comm_compare(c->comm(), MPI_COMM_WORLD, &cmp);
  EXPECT_EQ(cmp, MPI_CONGRUENT);
  check_identity(*c);
}

TEST(MpiComm, Broadcast) {
  check_broadcast(*comm::world_communicator());
}
TEST(MpiComm, Allgather) {
  check_allgather(*comm::world_communicator());
}
TEST(MpiComm, Allgatherv) {
  check_allgatherv(*comm::world_communicator());
}
TEST(MpiComm, Allreduce) {
  check_allreduce(*comm::world_communicator());
}
TEST(MpiComm, Barrier) {
  check_barrier(*comm::world_communicator());
}
TEST(MpiComm, PhaseScopeAndReset) {
  check_phase_scope(*comm::world_communicator());
}
TEST(MpiComm, RequireSameConfig) {
  check_same_config(*comm::world_communicator());
}
// The shared exchange body (exchange_checks.h) on host buffers, then on
// device buffers (device-emulated's memory here; staged through host
// memory, since MPI moves host memory only).
TEST(MpiComm, ExchangeOnHostBuffers) {
  auto c = comm::world_communicator();
  EXPECT_EQ(c->exchange_kind(), comm::ExchangeKind::kSparse);
  check_every_exchange(*c);
}
TEST(MpiComm, StagedExchangeOnDeviceBuffers) {
  check_every_exchange(*comm::world_communicator(), &device_emulated_ops());
}
TEST(MpiComm, BackToBackExchangesDoNotMix) {
  auto c = comm::world_communicator();
  for (int repeat = 0; repeat < 20; ++repeat) check_exchanges_do_not_mix(*c);
  for (int repeat = 0; repeat < 5; ++repeat) check_exchanges_do_not_mix(*c, &device_emulated_ops());
}
// Exchange segments above max_message_bytes travel in pieces, reassembled in
// order; the meter still counts one message per segment.
TEST(MpiComm, ExchangeSplitsLargeSegments) {
  auto c = comm::world_communicator();
  c->set_max_message_bytes(7);
  check_exchange(*c);
  check_sparse_exchange(*c);
  check_exchanges_do_not_mix(*c);
  check_exchange(*c, &device_emulated_ops());
  check_failure_on_one_rank(*c);
}
TEST(MpiComm, CheckTogetherTellsUsageFromPeerErrors) {
  check_raise_together_types(*comm::world_communicator());
}

// Messages above max_message_bytes travel in pieces; results and the meter
// (logical traffic: one message per peer) are unchanged.
TEST(MpiComm, SplitsLargeMessages) {
  auto c = comm::world_communicator();
  AIRMOE_EXPECT_THROW_MSG(c->set_max_message_bytes(0), std::invalid_argument,
                          "not in [1, INT_MAX]");
  c->set_max_message_bytes(7);
  EXPECT_EQ(c->max_message_bytes(), 7);
  check_broadcast(*c);
  check_allreduce(*c);
  check_exchange(*c);

  const int p = c->size(), r = c->rank();
  c->meter().reset();
  c->set_phase("big");
  std::vector<int64_t> bytes(static_cast<size_t>(p));
  for (int q = 0; q < p; ++q) bytes[q] = 50 + 7 * q;
  comm::ExchangeBuffer send, recv;
  fill_exchange(send, r, bytes, 6);
  c->exchange(send, recv);
  for (int q = 0; q < p; ++q) {
    const std::span<const char> got = recv.segment(q);
    EXPECT_EQ(std::vector<char>(got.begin(), got.end()), pattern_bytes(q, 50 + 7 * r, 6 + r))
        << "from " << q;
  }
  std::vector<TrafficCounts> payload(static_cast<size_t>(p));
  for (int q = 0; q < p; ++q)
    if (q != r) payload[static_cast<size_t>(q)] = {50 + 7 * q, 1};
  MeterTable want{{"big:barrier", barrier_messages(p, r)}};
  if (p > 1) want["big"] = payload;
  expect_meter(*c, want);
  c->set_phase("default");
}

// A program hands us its own communicator: a split of the world, ranks in
// reverse order. Ours is a duplicate; theirs stays usable after ours is gone.
TEST(MpiComm, FromUserCommunicator) {
  const int wr = world_rank(), wp = world_size();
  MPI_Comm mine = MPI_COMM_NULL;
  ASSERT_EQ(MPI_Comm_split(MPI_COMM_WORLD, wr % 2, wp - wr, &mine), MPI_SUCCESS);
  const int color_size = (wp - wr % 2 + 1) / 2;
  {
    MpiCommunicator c(mine);
    EXPECT_EQ(c.size(), color_size);
    // Keys wp - wr: the highest world rank of the color is rank 0.
    int expected_rank = 0;
    for (int q = wr + 2; q < wp; q += 2) ++expected_rank;
    EXPECT_EQ(c.rank(), expected_rank);
    int cmp = MPI_UNEQUAL;
    MPI_Comm_compare(c.comm(), mine, &cmp);
    EXPECT_EQ(cmp, MPI_CONGRUENT);

    int64_t w = wr;
    std::vector<int64_t> all(static_cast<size_t>(c.size()));
    c.allgather(&w, sizeof(w), all.data());
    for (int i = 0; i < c.size(); ++i)
      EXPECT_EQ(all[static_cast<size_t>(i)], wr % 2 + 2 * (color_size - 1 - i));
    check_exchange(c);
    check_allreduce(c);
    check_same_config(c);
  }
  EXPECT_EQ(MPI_Barrier(mine), MPI_SUCCESS);
  int sum = 0, one = 1;
  EXPECT_EQ(MPI_Allreduce(&one, &sum, 1, MPI_INT, MPI_SUM, mine), MPI_SUCCESS);
  EXPECT_EQ(sum, color_size);
  MPI_Comm_free(&mine);
}

// Every rank makes the same invalid call, so the error path cannot leave a
// rank waiting for another; the communicator stays usable afterwards.
TEST(MpiComm, MpiErrorBecomesException) {
  auto c = comm::world_communicator();
  c->meter().reset();
  char buf[4] = {1, 2, 3, 4};
  const int bad_root = c->size() + 3;
  AIRMOE_EXPECT_THROW_MSG(c->broadcast(buf, sizeof(buf), bad_root), std::runtime_error,
                          "MPI rank " + std::to_string(c->rank()) + " of " +
                              std::to_string(c->size()) + ": MPI_Bcast failed: ");
  EXPECT_EQ(c->meter().total(), TrafficCounts{});  // nothing was sent
  c->barrier();
  int64_t v = 1;
  c->allreduce_sum(&v, 1);
  EXPECT_EQ(v, c->size());
  // Argument checks that every rank fails alike.
  comm::ExchangeBuffer send, recv;
  send.reset(c->size() + 1);
  AIRMOE_EXPECT_THROW_MSG(c->exchange(send, recv), UsageError, "send has");
}

TEST(MpiComm, RefusesBadConstruction) {
  AIRMOE_EXPECT_THROW_MSG(MpiCommunicator c(MPI_COMM_NULL), std::invalid_argument, "MPI_COMM_NULL");
}

TEST(MpiComm, SessionIsReentrant) {
  // MPI is already initialized by main's session: a nested one neither
  // re-initializes nor finalizes.
  {
    comm::MpiSession nested;
    EXPECT_FALSE(nested.initialized_here());
    EXPECT_GE(nested.thread_level(), MPI_THREAD_FUNNELED);
  }
  int finalized = 1;
  MPI_Finalized(&finalized);
  EXPECT_EQ(finalized, 0);
  comm::world_communicator()->barrier();
}

}  // namespace
}  // namespace airmoe::test
