// The one test body of Communicator::exchange, run on every backend present
// (as router_checks.h is for the routers): in-process on host memory and on
// a device's memory (device-emulated here, cuda:0 on a GPU), MPI on host
// memory and staged MPI for device buffers (test_comm_mpi.cpp), NCCL at
// P = 1 on a GPU (test_exchange.cpp). Each check is collective, must be
// called by every rank of `c`, and uses gtest EXPECTs (never ASSERTs), so
// that no rank leaves a collective sequence early.
//
// `device` is where the buffers live: null for host buffers, else the
// backend whose allocator and copy ops they use. Every backend must give
// the same deliveries and the same meter; the control messages follow
// c.exchange_kind(), spelled out here by hand (not through exchange_rule.h,
// the code under test).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm_checks.h"
#include "core/errors.h"
#include "ops/device/emulated.h"
#include "test_util.h"

namespace airmoe::test {

// A buffer on `device` (host when null).
inline comm::ExchangeBuffer exchange_buffer(const Ops* device) {
  return device ? comm::ExchangeBuffer(*device) : comm::ExchangeBuffer();
}

// Segment q's bytes, read back to the host whatever the buffer's memory.
inline std::vector<char> read_segment(const comm::ExchangeBuffer& b, int q) {
  std::vector<char> out(static_cast<size_t>(b.bytes(q)));
  if (out.empty()) return out;
  if (b.ops() == nullptr) {
    const std::span<const char> s = b.segment(q);
    out.assign(s.begin(), s.end());
  } else {
    b.ops()->copy_bytes(out.data(), Device::host(), b.begin(q), b.device(), out.size(), Stream{});
  }
  return out;
}

// Fills send with `bytes[q]` pattern bytes for each rank q (salted by q).
inline void fill_exchange(comm::ExchangeBuffer& send, int r, const std::vector<int64_t>& bytes,
                          int salt) {
  send.reset(bytes);
  for (size_t q = 0; q < bytes.size(); ++q) {
    const std::vector<char> v = pattern_bytes(r, static_cast<size_t>(bytes[q]), salt + int(q));
    if (v.empty()) continue;
    const int p = static_cast<int>(q);
    if (send.ops() == nullptr)
      std::copy(v.begin(), v.end(), send.begin(p));
    else
      send.ops()->copy_bytes(send.begin(p), send.device(), v.data(), Device::host(), v.size(),
                             Stream{});
  }
  if (send.ops()) send.ops()->synchronize(Stream{});
}

// The sparse exchange's control messages, as a dissemination barrier sends
// them: one 0-byte message to rank + 1, + 2, + 4, ... below P.
inline std::vector<TrafficCounts> barrier_messages(int p, int self) {
  std::vector<TrafficCounts> v(static_cast<size_t>(p));
  for (int step = 1; step < p; step *= 2) v[static_cast<size_t>((self + step) % p)].messages += 1;
  return v;
}

// The control messages of `calls` exchanges under `phase` on c's kind:
// the barrier's (sparse) or one 8-byte count to every other rank
// (counts-first).
inline void expect_control(MeterTable& want, const Communicator& c, const std::string& phase,
                           int calls = 1) {
  const int p = c.size(), r = c.rank();
  std::vector<TrafficCounts> per_call;
  std::string suffix;
  if (c.exchange_kind() == comm::ExchangeKind::kSparse) {
    per_call = barrier_messages(p, r);
    suffix = ":barrier";
  } else {
    per_call = to_all_but(p, r, 8);
    suffix = ":counts";
  }
  std::vector<TrafficCounts>& row = want[phase + suffix];
  row.resize(static_cast<size_t>(p));
  for (int call = 0; call < calls; ++call)
    for (size_t q = 0; q < per_call.size(); ++q) row[q] += per_call[q];
}

// exchange(): segment p of send reaches rank p; recv's segments in rank
// order; empty segments and self-sends included; the buffers are reused (a
// second call with other sizes is right too); the meter holds the payload
// (self-sends and empty segments excluded) and the kind's control messages.
inline void check_exchange(Communicator& c, const Ops* device = nullptr) {
  const int p = c.size(), r = c.rank();
  c.meter().reset();
  comm::PhaseScope phase(c, "xchg");
  comm::ExchangeBuffer send = exchange_buffer(device), recv = exchange_buffer(device);
  std::vector<TrafficCounts> payload(static_cast<size_t>(p));
  for (int round = 0; round < 2; ++round) {
    auto size_of = [&](int from, int to) {
      return static_cast<int64_t>((from + 2 * to + round) % 4 == 0 ? 0 : (from + to + round) * 3);
    };
    std::vector<int64_t> bytes(static_cast<size_t>(p));
    for (int q = 0; q < p; ++q) bytes[q] = size_of(r, q);
    fill_exchange(send, r, bytes, round);
    c.exchange(send, recv);
    EXPECT_EQ(recv.ranks(), p) << c.backend() << " rank " << r;
    if (recv.ranks() != p) continue;
    EXPECT_EQ(recv.ops(), device) << "recv keeps its memory";
    for (int q = 0; q < p; ++q) {
      EXPECT_EQ(read_segment(recv, q),
                pattern_bytes(q, static_cast<size_t>(size_of(q, r)), r + round))
          << c.backend() << " on " << recv.where() << ": rank " << r << " from " << q;
      if (q != r && bytes[q] > 0) payload[static_cast<size_t>(q)] += {bytes[q], 1};
    }
  }
  MeterTable want;
  expect_control(want, c, "xchg", 2);
  bool any = false;
  for (const TrafficCounts& t : payload) any = any || t.messages > 0;
  if (any) want["xchg"] = payload;
  expect_meter(c, want);
}

// Most ranks send nothing: only rank 0 -> rank P - 1. Every other segment
// arrives empty, and the meter holds that one message (none to the ranks
// rank 0 does not talk to) and the kind's control messages.
inline void check_sparse_exchange(Communicator& c, const Ops* device = nullptr) {
  const int p = c.size(), r = c.rank(), last = p - 1;
  constexpr int64_t kBytes = 1000;
  c.meter().reset();
  comm::PhaseScope phase(c, "sparse");
  std::vector<int64_t> bytes(static_cast<size_t>(p), 0);
  if (r == 0) bytes[static_cast<size_t>(last)] = kBytes;
  comm::ExchangeBuffer send = exchange_buffer(device), recv = exchange_buffer(device);
  fill_exchange(send, r, bytes, 7);
  c.exchange(send, recv);
  EXPECT_EQ(recv.ranks(), p);
  if (recv.ranks() == p) {
    for (int q = 0; q < p; ++q) {
      const bool from_first = r == last && q == 0;
      EXPECT_EQ(read_segment(recv, q),
                from_first ? pattern_bytes(0, kBytes, 7 + last) : std::vector<char>{})
          << c.backend() << " rank " << r << " from " << q;
    }
  }
  MeterTable want;
  expect_control(want, c, "sparse");
  if (r == 0 && last != 0) {
    want["sparse"] = std::vector<TrafficCounts>(static_cast<size_t>(p));
    want["sparse"][static_cast<size_t>(last)] = {kBytes, 1};
  }
  expect_meter(c, want);
}

// Every segment empty on every rank: recv is P empty segments, and only the
// control messages are metered.
inline void check_empty_exchange(Communicator& c, const Ops* device = nullptr) {
  const int p = c.size();
  c.meter().reset();
  comm::PhaseScope phase(c, "empty");
  comm::ExchangeBuffer send = exchange_buffer(device), recv = exchange_buffer(device);
  fill_exchange(recv, c.rank(), std::vector<int64_t>(static_cast<size_t>(p), 5), 1);  // stale
  send.reset(p);
  c.exchange(send, recv);
  EXPECT_EQ(recv.ranks(), p);
  EXPECT_EQ(recv.total_bytes(), 0) << c.backend() << " rank " << c.rank();
  MeterTable want;
  expect_control(want, c, "empty");
  expect_meter(c, want);
}

// Two exchanges back to back under different phases, with different sizes
// and contents: neither's messages reach the other's receive buffers, and
// each is metered under its own phase.
inline void check_exchanges_do_not_mix(Communicator& c, const Ops* device = nullptr) {
  const int p = c.size(), r = c.rank();
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  c.meter().reset();
  comm::ExchangeBuffer send_a = exchange_buffer(device), recv_a = exchange_buffer(device);
  comm::ExchangeBuffer send_b = exchange_buffer(device), recv_b = exchange_buffer(device);
  std::vector<int64_t> a(static_cast<size_t>(p), 0), b(static_cast<size_t>(p), 0);
  a[static_cast<size_t>(next)] = 10 + r;
  b[static_cast<size_t>(prev)] = 20 + 2 * r;
  fill_exchange(send_a, r, a, 100);
  fill_exchange(send_b, r, b, 200);
  c.set_phase("first");
  c.exchange(send_a, recv_a);
  c.set_phase("second");
  c.exchange(send_b, recv_b);
  c.set_phase("default");
  for (int q = 0; q < p && recv_a.ranks() == p && recv_b.ranks() == p; ++q) {
    const std::vector<char> want_a =
        q == prev ? pattern_bytes(q, static_cast<size_t>(10 + q), 100 + r) : std::vector<char>{};
    const std::vector<char> want_b =
        q == next ? pattern_bytes(q, static_cast<size_t>(20 + 2 * q), 200 + r)
                  : std::vector<char>{};
    // With one rank, next == prev == r: its own segments, both present.
    EXPECT_EQ(read_segment(recv_a, q), want_a) << "rank " << r << " from " << q;
    EXPECT_EQ(read_segment(recv_b, q), want_b) << "rank " << r << " from " << q;
  }
  MeterTable want;
  expect_control(want, c, "first");
  expect_control(want, c, "second");
  if (p > 1) {
    want["first"] = std::vector<TrafficCounts>(static_cast<size_t>(p));
    want["first"][static_cast<size_t>(next)] = {10 + r, 1};
    want["second"] = std::vector<TrafficCounts>(static_cast<size_t>(p));
    want["second"][static_cast<size_t>(prev)] = {20 + 2 * r, 1};
  }
  expect_meter(c, want);
}

// Bad buffer pairs passed by every rank: each throws a UsageError naming
// its rank and the fault, nothing is metered, and the communicator stays
// usable.
inline void check_exchange_rejects_bad_buffers(Communicator& c, const Ops* device = nullptr) {
  const int p = c.size(), r = c.rank();
  const std::string rank = "exchange: rank " + std::to_string(r) + ": ";
  c.meter().reset();
  comm::ExchangeBuffer send = exchange_buffer(device), recv = exchange_buffer(device);
  send.reset(p + 1);
  AIRMOE_EXPECT_THROW_MSG(
      c.exchange(send, recv), UsageError,
      rank + "send has " + std::to_string(p + 1) + " segments for " + std::to_string(p) + " ranks");
  send.reset(p);
  AIRMOE_EXPECT_THROW_MSG(c.exchange(send, send), UsageError, rank + "send and recv are the same");
  // send and recv in different memory: this device's and the other kind.
  comm::ExchangeBuffer other =
      device ? comm::ExchangeBuffer() : comm::ExchangeBuffer(device_emulated_ops());
  AIRMOE_EXPECT_THROW_MSG(c.exchange(send, other), UsageError,
                          rank + "send is on " + send.where() + " but recv on " + other.where());
  EXPECT_EQ(c.meter().total(), TrafficCounts{}) << "a refused exchange sends nothing";
  check_sparse_exchange(c, device);
}

// One rank's bad buffers fail every rank, never a hang: that rank throws its
// UsageError, every other rank a PeerError naming it; then the next
// exchange works on every rank.
inline void check_failure_on_one_rank(Communicator& c, const Ops* device = nullptr) {
  const int p = c.size(), r = c.rank(), culprit = p - 1;
  comm::ExchangeBuffer send = exchange_buffer(device), recv = exchange_buffer(device);
  send.reset(r == culprit ? p + 2 : p);
  const std::string own = "exchange: rank " + std::to_string(culprit) + ": send has " +
                          std::to_string(p + 2) + " segments";
  if (r == culprit) {
    AIRMOE_EXPECT_THROW_MSG(c.exchange(send, recv), UsageError, own);
  } else {
    try {
      c.exchange(send, recv);
      ADD_FAILURE() << c.backend() << " rank " << r << ": rank " << culprit
                    << "'s failure did not reach this rank";
    } catch (const PeerError& e) {
      EXPECT_EQ(e.failed_rank(), culprit);
      const std::string msg = e.what();
      EXPECT_NE(msg.find("exchange: rank " + std::to_string(r) + ": aborted because rank " +
                         std::to_string(culprit) + " failed: " + own),
                std::string::npos)
          << msg;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "rank " << r << " threw the wrong exception type: " << e.what();
    }
  }
  check_exchange(c, device);
}

// Every check above, in order: what each backend's test runs.
inline void check_every_exchange(Communicator& c, const Ops* device = nullptr) {
  check_exchange(c, device);
  check_sparse_exchange(c, device);
  check_empty_exchange(c, device);
  check_exchanges_do_not_mix(c, device);
  check_exchange_rejects_bad_buffers(c, device);
  check_failure_on_one_rank(c, device);
}

}  // namespace airmoe::test
