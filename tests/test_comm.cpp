// comm/ over the in-process backend (ranks as threads): the collectives'
// results, the traffic meter's exact per-phase, per-peer counts, the config
// check, and failure handling (a failing rank aborts the others, no hang).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "comm/in_process.h"
#include "comm/traffic_meter.h"
#include "exchange_checks.h"
#include "test_util.h"

namespace airmoe::test {
namespace {

using comm::Communicator;
using comm::InProcessCommunicator;
using comm::InProcessWorld;
using comm::RankAborted;
using comm::run_ranks;
using comm::TrafficCounts;
using comm::TrafficMeter;

// ------------------------------------------------------------ meter ------

TEST(CommTrafficMeter, RecordsPerPhaseAndPeer) {
  TrafficMeter m(3);
  EXPECT_EQ(m.peers(), 3);
  m.record("b", 2, 10);
  m.record("a", 1, 4);
  m.record("b", 2, 6);
  m.record("b", 0, 0);
  EXPECT_EQ(m.sent("b", 2), (TrafficCounts{16, 2}));
  EXPECT_EQ(m.sent("b", 0), (TrafficCounts{0, 1}));
  EXPECT_EQ(m.sent("b", 1), TrafficCounts{});
  EXPECT_EQ(m.sent("b"), (TrafficCounts{16, 3}));
  EXPECT_EQ(m.sent("a"), (TrafficCounts{4, 1}));
  EXPECT_EQ(m.sent("missing"), TrafficCounts{});
  EXPECT_EQ(m.sent("missing", 1), TrafficCounts{});
  EXPECT_EQ(m.total(), (TrafficCounts{20, 4}));
  EXPECT_EQ(m.phases(), (std::vector<std::string>{"a", "b"}));
  ASSERT_EQ(m.table().at("a").size(), 3u);
  EXPECT_EQ(m.table().at("a")[1], (TrafficCounts{4, 1}));
  m.reset();
  EXPECT_EQ(m.total(), TrafficCounts{});
  EXPECT_TRUE(m.phases().empty());
  EXPECT_EQ(m.peers(), 3);
}

TEST(CommTrafficMeter, RejectsBadArguments) {
  TrafficMeter m(2);
  AIRMOE_EXPECT_THROW_MSG(m.record("x", 2, 1), std::out_of_range, "peer 2 out of range [0, 2)");
  AIRMOE_EXPECT_THROW_MSG(m.record("x", -1, 1), std::out_of_range, "peer -1");
  AIRMOE_EXPECT_THROW_MSG(m.record("x", 0, -3), std::invalid_argument, "negative byte count -3");
  AIRMOE_EXPECT_THROW_MSG(m.sent("x", 5), std::out_of_range, "peer 5");
  AIRMOE_EXPECT_THROW_MSG(TrafficMeter(0), std::invalid_argument, "peers must be >= 1");
  EXPECT_EQ(m.total(), TrafficCounts{});
}

// -------------------------------------------- collectives, P = 1 .. 4 ------

class InProcessComm : public ::testing::TestWithParam<int> {
 protected:
  void run(void (*check)(Communicator&)) {
    const int p = GetParam();
    std::atomic<int> ran{0};
    run_ranks(p, [&](Communicator& c) {
      EXPECT_EQ(c.size(), p);
      EXPECT_STREQ(c.backend(), "in-process");
      check(c);
      ++ran;
    });
    EXPECT_EQ(ran.load(), p);
  }
};

TEST_P(InProcessComm, Identity) {
  run(check_identity);
}
TEST_P(InProcessComm, Broadcast) {
  run(check_broadcast);
}
TEST_P(InProcessComm, Allgather) {
  run(check_allgather);
}
TEST_P(InProcessComm, Allgatherv) {
  run(check_allgatherv);
}
TEST_P(InProcessComm, Allreduce) {
  run(check_allreduce);
}
TEST_P(InProcessComm, Barrier) {
  run(check_barrier);
}
TEST_P(InProcessComm, PhaseScopeAndReset) {
  run(check_phase_scope);
}
TEST_P(InProcessComm, RequireSameConfig) {
  run(check_same_config);
}
TEST_P(InProcessComm, CheckTogetherTellsUsageFromPeerErrors) {
  run(check_raise_together_types);
}

TEST_P(InProcessComm, RanksAreDistinct) {
  const int p = GetParam();
  std::mutex mu;
  std::vector<int> seen;
  run_ranks(p, [&](Communicator& c) {
    std::lock_guard<std::mutex> lock(mu);
    seen.push_back(c.rank());
  });
  std::sort(seen.begin(), seen.end());
  std::vector<int> want(static_cast<size_t>(p));
  for (int i = 0; i < p; ++i) want[static_cast<size_t>(i)] = i;
  EXPECT_EQ(seen, want);
}

// Many back-to-back collectives of mixed kinds: the slots and the two-phase
// barrier must never let a fast rank overwrite what a slow one still reads.
TEST_P(InProcessComm, ManyCollectivesInARow) {
  const int p = GetParam();
  run_ranks(p, [&](Communicator& c) {
    const int r = c.rank();
    comm::ExchangeBuffer send, recv;
    for (int it = 0; it < 200; ++it) {
      int64_t v = r + it;
      c.allreduce_sum(&v, 1);
      EXPECT_EQ(v, static_cast<int64_t>(p) * (p - 1) / 2 + static_cast<int64_t>(p) * it);
      std::vector<int64_t> bytes(static_cast<size_t>(p));
      for (int q = 0; q < p; ++q) bytes[q] = (q + it) % 3;
      fill_exchange(send, r + it, bytes, 0);
      c.exchange(send, recv);
      for (int q = 0; q < p; ++q) {
        const std::span<const char> got = recv.segment(q);
        EXPECT_EQ(std::vector<char>(got.begin(), got.end()),
                  pattern_bytes(q + it, static_cast<size_t>((r + it) % 3), r));
      }
      int32_t b = r == it % p ? it : -1;
      c.broadcast(&b, sizeof(b), it % p);
      EXPECT_EQ(b, it);
    }
  });
}

// Failure handling needs at least two ranks.
class InProcessCommFailure : public ::testing::TestWithParam<int> {};

TEST_P(InProcessCommFailure, FailingRankAbortsTheOthers) {
  const int p = GetParam();
  const int culprit = p - 1;
  std::mutex mu;
  std::vector<std::string> messages(static_cast<size_t>(p));
  const auto start = std::chrono::steady_clock::now();
  AIRMOE_EXPECT_THROW_MSG(run_ranks(p,
                                    [&](Communicator& c) {
                                      if (c.rank() == culprit) {
                                        // Let the others block in the barrier first.
                                        std::this_thread::sleep_for(std::chrono::milliseconds(20));
                                        throw std::logic_error("boom");
                                      }
                                      try {
                                        c.barrier();
                                      } catch (const RankAborted& e) {
                                        std::lock_guard<std::mutex> lock(mu);
                                        messages[static_cast<size_t>(c.rank())] = e.what();
                                        throw;
                                      }
                                    }),
                          std::logic_error, "boom");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 10.0);
  for (int r = 0; r < culprit; ++r)
    EXPECT_EQ(messages[static_cast<size_t>(r)], "in-process rank " + std::to_string(r) +
                                                    ": aborted because rank " +
                                                    std::to_string(culprit) + " failed: boom");
}

TEST_P(InProcessCommFailure, FailureDuringExchangeAbortsTheOthers) {
  const int p = GetParam();
  const int culprit = 0;
  std::atomic<int> aborted{0};
  AIRMOE_EXPECT_THROW_MSG(run_ranks(p,
                                    [&](Communicator& c) {
                                      comm::ExchangeBuffer send, recv;
                                      send.reset(c.size());
                                      if (c.rank() == culprit) {
                                        std::this_thread::sleep_for(std::chrono::milliseconds(20));
                                        throw std::logic_error("bad segment");
                                      }
                                      try {
                                        c.exchange(send, recv);
                                      } catch (const RankAborted& e) {
                                        EXPECT_NE(std::string(e.what()).find(
                                                      "aborted because rank 0 failed: bad segment"),
                                                  std::string::npos);
                                        ++aborted;
                                        throw;
                                      }
                                    }),
                          std::logic_error, "bad segment");
  EXPECT_EQ(aborted.load(), p - 1);
}

TEST_P(InProcessCommFailure, RankEnteringAfterAbortFailsToo) {
  const int p = GetParam();
  std::atomic<int> aborted{0};
  EXPECT_THROW(run_ranks(p,
                         [&](Communicator& c) {
                           if (c.rank() == 0) throw std::runtime_error("early failure");
                           std::this_thread::sleep_for(std::chrono::milliseconds(30));
                           try {
                             std::vector<int64_t> v{1, 2};
                             c.allreduce_sum(v.data(), v.size());
                           } catch (const RankAborted& e) {
                             EXPECT_NE(std::string(e.what()).find(
                                           "aborted because rank 0 failed: early failure"),
                                       std::string::npos)
                                 << e.what();
                             ++aborted;
                             throw;
                           }
                         }),
               std::runtime_error);
  EXPECT_EQ(aborted.load(), p - 1);
}

TEST_P(InProcessCommFailure, RankReturningEarlyAbortsTheOthers) {
  const int p = GetParam();
  // Rank 0 skips the barrier everyone else calls: without the exit check the
  // others would wait forever.
  AIRMOE_EXPECT_THROW_MSG(run_ranks(p,
                                    [](Communicator& c) {
                                      if (c.rank() != 0) c.barrier();
                                    }),
                          RankAborted, "aborted because rank 0 failed: it returned from its body");
}

TEST_P(InProcessCommFailure, MismatchedCollectivesThrowOnEveryRank) {
  const int p = GetParam();
  std::atomic<int> caught{0};
  EXPECT_THROW(
      run_ranks(p,
                [&](Communicator& c) {
                  try {
                    if (c.rank() == 1) {
                      int64_t v = 0;
                      c.allreduce_sum(&v, 1);
                    } else {
                      c.barrier();
                    }
                  } catch (const std::runtime_error& e) {
                    EXPECT_NE(std::string(e.what()).find("collective mismatch"), std::string::npos)
                        << e.what();
                    ++caught;
                    throw;
                  }
                }),
      std::runtime_error);
  EXPECT_EQ(caught.load(), p);
}

TEST_P(InProcessCommFailure, InconsistentArgumentsThrowOnEveryRank) {
  const int p = GetParam();
  // Different roots.
  AIRMOE_EXPECT_THROW_MSG(run_ranks(p,
                                    [](Communicator& c) {
                                      char b[4] = {};
                                      c.broadcast(b, sizeof(b), c.rank() == 1 ? 1 : 0);
                                    }),
                          std::runtime_error,
                          "broadcast: rank 1 passed root 1 but rank 0 passed root 0");
  // Different sizes.
  AIRMOE_EXPECT_THROW_MSG(run_ranks(p,
                                    [](Communicator& c) {
                                      std::vector<char> send(c.rank() == 1 ? 3 : 2);
                                      std::vector<char> recv(send.size() * 4);
                                      c.allgather(send.data(), send.size(), recv.data());
                                    }),
                          std::runtime_error,
                          "allgather: rank 1 passed size 3 but rank 0 passed size 2");
}

TEST_P(InProcessComm, BadArgumentsThrow) {
  const int p = GetParam();
  AIRMOE_EXPECT_THROW_MSG(
      run_ranks(p,
                [p](Communicator& c) {
                  char b = 0;
                  c.broadcast(&b, 1, p);
                }),
      std::runtime_error,
      "broadcast: root " + std::to_string(p) + " out of range [0, " + std::to_string(p) + ")");
}

std::string param_name(const ::testing::TestParamInfo<int>& info) {
  std::string name = "P";  // not "P" + ...: GCC 12's -Wrestrict
  name += std::to_string(info.param);
  return name;
}

INSTANTIATE_TEST_SUITE_P(P, InProcessComm, ::testing::Values(1, 2, 3, 4), param_name);
INSTANTIATE_TEST_SUITE_P(P, InProcessCommFailure, ::testing::Values(2, 3, 4), param_name);

// ------------------------------------------------------- world, runner -----

TEST(CommInProcess, RejectsBadWorlds) {
  AIRMOE_EXPECT_THROW_MSG(run_ranks(0, [](Communicator&) {}), std::invalid_argument,
                          "size must be >= 1");
  auto world = std::make_shared<InProcessWorld>(2);
  AIRMOE_EXPECT_THROW_MSG(InProcessCommunicator(world, 2), std::out_of_range,
                          "rank 2 out of range [0, 2)");
  AIRMOE_EXPECT_THROW_MSG(InProcessCommunicator(nullptr, 0), std::invalid_argument, "null world");
}

// A caller may run its own threads over a world instead of run_ranks.
TEST(CommInProcess, OwnThreadsOverAWorld) {
  auto world = std::make_shared<InProcessWorld>(3);
  std::vector<int64_t> results(3);
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r)
    threads.emplace_back([&, r] {
      InProcessCommunicator c(world, r);
      int64_t v = 10 * (r + 1);
      c.allreduce_sum(&v, 1);
      results[static_cast<size_t>(r)] = v;
    });
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(results, (std::vector<int64_t>{60, 60, 60}));
  EXPECT_FALSE(world->aborted());
}

// The lowest rank that failed by itself is rethrown, with its type.
TEST(CommInProcess, RethrowsLowestGenuineFailure) {
  try {
    run_ranks(4, [](Communicator& c) {
      if (c.rank() == 3) throw std::out_of_range("rank three");
      if (c.rank() == 2) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        throw std::invalid_argument("rank two");
      }
      c.barrier();  // ranks 0 and 1: aborted
    });
    ADD_FAILURE() << "run_ranks did not throw";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "rank two");
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception: " << e.what();
  }
}

}  // namespace
}  // namespace airmoe::test
