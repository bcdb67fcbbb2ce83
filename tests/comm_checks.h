// Collective checks shared by the in-process tests (test_comm.cpp) and the MPI
// tests (test_comm_mpi.cpp): each function is itself collective, must be
// called by every rank of `c`, and checks the results and the meter against
// the contract in comm/communicator.h with gtest EXPECTs (never ASSERTs, so
// that no rank leaves a collective sequence early).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/errors.h"

namespace airmoe::test {

using comm::Communicator;
using comm::TrafficCounts;

// Per phase, the expected counts for each peer (missing phases: all zero).
using MeterTable = std::map<std::string, std::vector<TrafficCounts>>;

inline char pattern(int rank, size_t i, int salt) {
  return static_cast<char>((rank * 31 + static_cast<int>(i) * 7 + salt * 13) & 0x7f);
}

inline std::vector<char> pattern_bytes(int rank, size_t n, int salt) {
  std::vector<char> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(pattern(rank, i, salt));
  return v;
}

inline std::string describe(const TrafficCounts& c) {
  return "{bytes " + std::to_string(c.bytes) + ", messages " + std::to_string(c.messages) + "}";
}

// The meter holds exactly `expected`: same counts for every phase and peer.
inline void expect_meter(const Communicator& c, const MeterTable& expected) {
  const int p = c.size();
  std::set<std::string> phases;
  for (const auto& e : expected) phases.insert(e.first);
  for (const auto& e : c.meter().table()) phases.insert(e.first);
  for (const std::string& phase : phases) {
    auto it = expected.find(phase);
    for (int q = 0; q < p; ++q) {
      TrafficCounts want;
      if (it != expected.end()) want = it->second.at(static_cast<size_t>(q));
      const TrafficCounts got = c.meter().sent(phase, q);
      EXPECT_EQ(got, want) << c.backend() << " rank " << c.rank() << " of " << p << ", phase '"
                           << phase << "', peer " << q << ": got " << describe(got) << ", expected "
                           << describe(want);
    }
  }
}

// Counts for one message of `bytes` to every peer but `self`.
inline std::vector<TrafficCounts> to_all_but(int p, int self, int64_t bytes, int64_t messages = 1) {
  std::vector<TrafficCounts> v(static_cast<size_t>(p));
  for (int q = 0; q < p; ++q)
    if (q != self) v[static_cast<size_t>(q)] = {bytes * messages, messages};
  return v;
}

inline void check_identity(Communicator& c) {
  EXPECT_GE(c.rank(), 0);
  EXPECT_LT(c.rank(), c.size());
  EXPECT_EQ(c.meter().peers(), c.size());
  EXPECT_EQ(c.phase(), "default");
}

inline void check_broadcast(Communicator& c) {
  const int p = c.size(), r = c.rank();
  c.meter().reset();
  c.set_phase("bcast");
  constexpr size_t kBytes = 13;
  for (int root = 0; root < p; ++root) {
    std::vector<char> buf =
        r == root ? pattern_bytes(root, kBytes, 1) : std::vector<char>(kBytes, 'x');
    c.broadcast(buf.data(), kBytes, root);
    EXPECT_EQ(buf, pattern_bytes(root, kBytes, 1)) << "rank " << r << ", root " << root;
  }
  // Zero bytes: still one (empty) message from the root to every other rank.
  c.set_phase("bcast0");
  c.broadcast(nullptr, 0, p - 1);
  // Typed helper: a length, then the data.
  c.set_phase("bcast_vector");
  std::vector<int32_t> v;
  if (r == 0) v = {7, -1, 1 << 30, 42, 5};
  comm::broadcast_vector(c, v, 0);
  EXPECT_EQ(v, (std::vector<int32_t>{7, -1, 1 << 30, 42, 5}));
  MeterTable want{{"bcast", to_all_but(p, r, kBytes)}};
  if (r == p - 1) want["bcast0"] = to_all_but(p, r, 0);
  if (r == 0) {
    want["bcast_vector"] = to_all_but(p, r, 0);
    for (int q = 1; q < p; ++q) want["bcast_vector"][static_cast<size_t>(q)] = {8 + 5 * 4, 2};
  }
  expect_meter(c, want);
}

inline void check_allgather(Communicator& c) {
  const int p = c.size(), r = c.rank();
  c.meter().reset();
  c.set_phase("ag");
  constexpr size_t kBytes = 5;
  const std::vector<char> mine = pattern_bytes(r, kBytes, 2);
  std::vector<char> all(kBytes * static_cast<size_t>(p), 'x');
  c.allgather(mine.data(), kBytes, all.data());
  for (int q = 0; q < p; ++q) {
    const std::vector<char> got(all.begin() + q * kBytes, all.begin() + (q + 1) * kBytes);
    EXPECT_EQ(got, pattern_bytes(q, kBytes, 2)) << "rank " << r << ", block " << q;
  }
  // In place: send is this rank's block of recv.
  std::vector<int64_t> ids(static_cast<size_t>(p), -1);
  ids[static_cast<size_t>(r)] = 100 + r;
  c.allgather(&ids[static_cast<size_t>(r)], sizeof(int64_t), ids.data());
  for (int q = 0; q < p; ++q) EXPECT_EQ(ids[static_cast<size_t>(q)], 100 + q);
  std::vector<TrafficCounts> per_peer = to_all_but(p, r, 0);
  for (int q = 0; q < p; ++q)
    if (q != r) per_peer[static_cast<size_t>(q)] = {kBytes + sizeof(int64_t), 2};
  expect_meter(c, {{"ag", per_peer}});
}

inline size_t agv_bytes(int rank) {
  return rank % 2 == 1 ? 0 : 4 + 3 * static_cast<size_t>(rank);
}

inline void check_allgatherv(Communicator& c) {
  const int p = c.size(), r = c.rank();
  c.meter().reset();
  c.set_phase("agv");
  const std::vector<char> mine = pattern_bytes(r, agv_bytes(r), 3);
  std::vector<int64_t> counts{-5};
  const std::vector<char> all = c.allgatherv(mine.data(), mine.size(), counts);
  std::vector<char> want;
  std::vector<int64_t> want_counts;
  for (int q = 0; q < p; ++q) {
    const std::vector<char> b = pattern_bytes(q, agv_bytes(q), 3);
    want.insert(want.end(), b.begin(), b.end());
    want_counts.push_back(static_cast<int64_t>(b.size()));
  }
  EXPECT_EQ(all, want) << "rank " << r;
  EXPECT_EQ(counts, want_counts) << "rank " << r;

  // Every rank empty.
  c.set_phase("agv_empty");
  const std::vector<char> none = c.allgatherv(nullptr, 0, counts);
  EXPECT_TRUE(none.empty());
  EXPECT_EQ(counts, std::vector<int64_t>(static_cast<size_t>(p), 0));

  // Typed helper: rank q contributes q + 1 doubles.
  c.set_phase("agv_vector");
  std::vector<double> vals(static_cast<size_t>(r + 1));
  for (int i = 0; i <= r; ++i) vals[static_cast<size_t>(i)] = r + 0.25 * i;
  const std::vector<double> got = comm::allgatherv_vector<double>(c, vals);
  std::vector<double> expected_vals;
  for (int q = 0; q < p; ++q)
    for (int i = 0; i <= q; ++i) expected_vals.push_back(q + 0.25 * i);
  EXPECT_EQ(got, expected_vals);

  expect_meter(c, {{"agv", to_all_but(p, r, static_cast<int64_t>(agv_bytes(r)))},
                   {"agv_empty", to_all_but(p, r, 0)},
                   {"agv_vector", to_all_but(p, r, 8 * (r + 1))}});
}

// The ring's record: 2 (P - 1) messages of ceil(bytes / P) to rank + 1.
inline std::vector<TrafficCounts> ring(int p, int r, int64_t bytes, int calls = 1) {
  std::vector<TrafficCounts> v(static_cast<size_t>(p));
  if (p > 1) {
    const int64_t chunk = (bytes + p - 1) / p;
    const int64_t messages = 2 * (p - 1) * static_cast<int64_t>(calls);
    v[static_cast<size_t>((r + 1) % p)] = {chunk * messages, messages};
  }
  return v;
}

inline void check_allreduce(Communicator& c) {
  const int p = c.size(), r = c.rank();
  c.meter().reset();
  c.set_phase("sum");
  constexpr size_t kN = 5;
  std::vector<int64_t> s(kN);
  for (size_t i = 0; i < kN; ++i) s[i] = (int64_t{1} << 40) * (r + 1) - static_cast<int64_t>(i) * r;
  c.allreduce_sum(s.data(), kN);
  for (size_t i = 0; i < kN; ++i) {
    int64_t want = 0;
    for (int q = 0; q < p; ++q) want += (int64_t{1} << 40) * (q + 1) - static_cast<int64_t>(i) * q;
    EXPECT_EQ(s[i], want) << "rank " << r << ", element " << i;
  }
  c.set_phase("minmax");
  constexpr size_t kD = 7;
  std::vector<double> mx(kD), mn(kD);
  auto value = [](int q, size_t i) {
    return (q - 1.5) * (static_cast<double>(i) - 2.75) + 0.125 * q;
  };
  for (size_t i = 0; i < kD; ++i) mx[i] = mn[i] = value(r, i);
  c.allreduce_max(mx.data(), kD);
  c.allreduce_min(mn.data(), kD);
  for (size_t i = 0; i < kD; ++i) {
    double want_max = value(0, i), want_min = value(0, i);
    for (int q = 1; q < p; ++q) {
      want_max = std::max(want_max, value(q, i));
      want_min = std::min(want_min, value(q, i));
    }
    EXPECT_EQ(mx[i], want_max) << "rank " << r << ", element " << i;
    EXPECT_EQ(mn[i], want_min) << "rank " << r << ", element " << i;
  }
  expect_meter(c, {{"sum", ring(p, r, kN * 8)}, {"minmax", ring(p, r, kD * 8, 2)}});
}

inline void check_barrier(Communicator& c) {
  c.meter().reset();
  for (int i = 0; i < 3; ++i) c.barrier();
  EXPECT_EQ(c.meter().total(), TrafficCounts{});  // a barrier carries no data
  EXPECT_TRUE(c.meter().phases().empty());
}

inline void check_phase_scope(Communicator& c) {
  const int p = c.size(), r = c.rank();
  c.meter().reset();
  c.set_phase("outer");
  const int64_t one = 1;
  std::vector<int64_t> all(static_cast<size_t>(p));
  {
    comm::PhaseScope scope(c, "inner");
    EXPECT_EQ(c.phase(), "inner");
    {
      comm::PhaseScope nested(c, "nested");
      c.allgather(&one, sizeof(one), all.data());
    }
    EXPECT_EQ(c.phase(), "inner");
    c.allgather(&one, sizeof(one), all.data());
  }
  EXPECT_EQ(c.phase(), "outer");
  try {
    comm::PhaseScope scope(c, "throwing");
    throw std::runtime_error("unwind");
  } catch (const std::runtime_error&) {
  }
  EXPECT_EQ(c.phase(), "outer");
  c.allgather(&one, sizeof(one), all.data());
  expect_meter(c, {{"nested", to_all_but(p, r, 8)},
                   {"inner", to_all_but(p, r, 8)},
                   {"outer", to_all_but(p, r, 8)}});
  EXPECT_EQ(c.meter().phases(), (p > 1 ? std::vector<std::string>{"inner", "nested", "outer"}
                                       : std::vector<std::string>{}));
  c.meter().reset();
  EXPECT_EQ(c.meter().total(), TrafficCounts{});
  EXPECT_TRUE(c.meter().phases().empty());
  EXPECT_EQ(c.meter().sent("outer", 0), TrafficCounts{});
  c.set_phase("default");
}

inline void check_same_config(Communicator& c) {
  const int p = c.size(), r = c.rank();
  EXPECT_NO_THROW(comm::require_same_config(c, "E=64 d=32 k=2", "router"));
  if (p == 1) return;
  // The last rank differs.
  std::string msg;
  try {
    comm::require_same_config(c, r == p - 1 ? "E=64 d=32 k=3" : "E=64 d=32 k=2", "router");
  } catch (const std::runtime_error& e) {
    msg = e.what();
  }
  EXPECT_EQ(msg, "configuration mismatch (router): rank " + std::to_string(p - 1) +
                     " differs from rank 0")
      << "rank " << r;
  // Every odd rank differs (several ranks named), including from each other.
  msg.clear();
  try {
    comm::require_same_config(c, r % 2 ? "odd " + std::to_string(r) : "even", "codebook");
  } catch (const std::runtime_error& e) {
    msg = e.what();
  }
  std::string want = "configuration mismatch (codebook): rank";
  if (p >= 4)
    want += "s 1, 3 differ from rank 0";
  else
    want += " 1 differs from rank 0";
  EXPECT_EQ(msg, want) << "rank " << r;
}

// check_together: the failing rank throws UsageError, every other rank a
// PeerError naming it; the lowest failing rank's message wins everywhere.
inline void check_raise_together_types(Communicator& c) {
  const int p = c.size(), r = c.rank();
  EXPECT_NO_THROW(comm::check_together(c, "nothing wrong", [] {}));
  const int bad = p - 1;
  std::string msg, kind;
  int named = -1;
  try {
    comm::check_together(c, "layer", [&] {
      if (r == bad) throw std::invalid_argument("tokens row 3 is nan");
    });
  } catch (const PeerError& e) {
    kind = "peer";
    msg = e.what();
    named = e.failed_rank();
  } catch (const UsageError& e) {
    kind = "usage";
    msg = e.what();
  }
  EXPECT_EQ(kind, r == bad ? "usage" : "peer") << "rank " << r;
  EXPECT_EQ(msg, "layer: rank " + std::to_string(bad) + ": tokens row 3 is nan") << "rank " << r;
  if (r != bad) {
    EXPECT_EQ(named, bad) << "rank " << r;
  }
  // Several failing ranks: each throws UsageError with the lowest one's message.
  msg.clear();
  kind.clear();
  try {
    comm::check_together(c, "set-up", [&] {
      if (r % 2 == 1 || p == 1) throw std::runtime_error("rank " + std::to_string(r) + " broke");
    });
  } catch (const PeerError& e) {
    kind = "peer";
    msg = e.what();
  } catch (const UsageError& e) {
    kind = "usage";
    msg = e.what();
  }
  const int lowest = p == 1 ? 0 : 1;
  EXPECT_EQ(kind, (r % 2 == 1 || p == 1) ? "usage" : "peer") << "rank " << r;
  EXPECT_EQ(
      msg, "set-up: rank " + std::to_string(lowest) + ": rank " + std::to_string(lowest) + " broke")
      << "rank " << r;
}

}  // namespace airmoe::test
