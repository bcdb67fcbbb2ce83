// The exchange test body (exchange_checks.h) on the backends of this
// process: in-process ranks (threads) on host buffers, on device-emulated's
// buffers and on cuda:0's (P = 1..4 ranks sharing one device, device to
// device), and NCCL at P = 1 (one rank per GPU is all one GPU allows).
// The MPI and staged MPI runs are in test_comm_mpi.cpp. Cases on a GPU
// carry "cuda" in their names (CTest label `gpu`) and report themselves
// skipped, with the reason, where no GPU or no NCCL build is.
#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <tuple>

#include "comm/communicator.h"
#include "comm/in_process.h"
#include "exchange_checks.h"
#include "ops/registry.h"
#include "test_util.h"

#ifdef AIRMOE_WITH_NCCL
#include "comm/nccl_communicator.h"
#endif

namespace airmoe::test {
namespace {

using comm::Communicator;

// "host" (host buffers), or a compute backend's name: where the buffers live.
std::vector<std::string> memories() {
  std::vector<std::string> names{"host", "device-emulated", "cuda"};
  for (const Ops* ops : backends())
    if (ops->name().rfind("cuda", 0) == 0) names.back() = ops->name();
  return names;
}

// The device whose buffers `memory` names: null for "host"; skips the test
// (with the reason) where it is a GPU this machine lacks.
const Ops* device_or_skip(const std::string& memory) {
  if (memory == "host") return nullptr;
  if (memory == "cuda") {
    const std::string why = cuda_unavailable_reason();
    throw std::runtime_error("no cuda backend here: " + (why.empty() ? "none registered" : why));
  }
  return &find_backend(memory);
}

class InProcessExchange : public ::testing::TestWithParam<std::tuple<std::string, int>> {
 protected:
  void SetUp() override {
    try {
      device_ = device_or_skip(std::get<0>(GetParam()));
    } catch (const std::runtime_error& e) {
      GTEST_SKIP() << e.what();
    }
  }
  const Ops* device_ = nullptr;
};

TEST_P(InProcessExchange, EveryCheck) {
  const int p = std::get<1>(GetParam());
  std::atomic<int> ran{0};
  comm::run_ranks(p, [&](Communicator& c) {
    EXPECT_EQ(c.exchange_kind(), comm::ExchangeKind::kSparse);
    check_every_exchange(c, device_);
    ++ran;
  });
  EXPECT_EQ(ran.load(), p);
}

// A rank's stream is the one its copies run on: another stream handle
// changes nothing on backends without streams, and on cuda the copies are
// ordered on it and complete before exchange returns.
TEST_P(InProcessExchange, ManyExchangesInARow) {
  const int p = std::get<1>(GetParam());
  comm::run_ranks(p, [&](Communicator& c) {
    const int r = c.rank();
    comm::ExchangeBuffer send = exchange_buffer(device_), recv = exchange_buffer(device_);
    for (int it = 0; it < 50; ++it) {
      std::vector<int64_t> bytes(static_cast<size_t>(p));
      for (int q = 0; q < p; ++q) bytes[q] = (q + it) % 5 * 11;
      fill_exchange(send, r + it, bytes, 0);
      c.exchange(send, recv, Stream{});
      for (int q = 0; q < p && recv.ranks() == p; ++q)
        EXPECT_EQ(read_segment(recv, q),
                  pattern_bytes(q + it, static_cast<size_t>((r + it) % 5 * 11), r))
            << "iteration " << it << " rank " << r << " from " << q;
    }
  });
}

std::string memory_name(const ::testing::TestParamInfo<std::tuple<std::string, int>>& info) {
  std::string s = std::get<0>(info.param);
  for (char& ch : s)
    if (ch == '-' || ch == ':') ch = '_';
  return s + "_P" + std::to_string(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(Memory, InProcessExchange,
                         ::testing::Combine(::testing::ValuesIn(memories()),
                                            ::testing::Values(1, 2, 3, 4)),
                         memory_name);

// The staged path (device buffers over a backend that moves host memory
// only) is MPI's; here the in-process backend moves device buffers itself,
// so a device buffer's recv stays on the device.
TEST(InProcessExchangeOnDevice, RecvStaysOnTheDevice) {
  comm::run_ranks(2, [](Communicator& c) {
    comm::ExchangeBuffer send(device_emulated_ops()), recv(device_emulated_ops());
    fill_exchange(send, c.rank(), {3, 4}, 0);
    c.exchange(send, recv);
    EXPECT_EQ(recv.ops(), &device_emulated_ops());
    EXPECT_EQ(recv.where(), "device-emulated");
    EXPECT_EQ(read_segment(recv, 1 - c.rank()),
              pattern_bytes(1 - c.rank(), 3 + c.rank(), c.rank()));
  });
}

// ---------------------------------------------------------------- NCCL ---

// NCCL at P = 1 (the one rank one GPU allows), set up from a communicator
// (rank 0's unique id broadcast through it): the same body, counts first.
TEST(NcclExchange, OneRank_cuda) {
#ifndef AIRMOE_WITH_NCCL
  GTEST_SKIP() << "this build has no NCCL backend (a CUDA build finds NCCL: "
                  "-DAIRMOE_WITH_CUDA=ON with nccl.h and libnccl)";
#else
  const std::string why = cuda_unavailable_reason();
  if (!why.empty()) GTEST_SKIP() << "no cuda backend here: " << why;
  const std::string name = "cuda:0";  // a name, not a temporary: GCC 13's -Wdangling-reference
  const Ops& gpu = find_backend(name);
  comm::run_ranks(1, [&](Communicator& host) {
    comm::NcclCommunicator nccl(host, gpu);
    EXPECT_STREQ(nccl.backend(), "nccl");
    EXPECT_EQ(nccl.exchange_kind(), comm::ExchangeKind::kCountsFirst);
    check_every_exchange(nccl, &gpu);
    check_broadcast(nccl);
    check_allgather(nccl);
    check_allgatherv(nccl);
    check_allreduce(nccl);
    check_barrier(nccl);
    // Host buffers: NCCL moves GPU memory only; refused, naming the rank.
    comm::ExchangeBuffer send, recv;
    send.reset(1);
    AIRMOE_EXPECT_THROW_MSG(nccl.exchange(send, recv), UsageError,
                            "exchange: rank 0: nccl moves cuda:0 memory, send is on host");
  });
#endif
}

}  // namespace
}  // namespace airmoe::test
