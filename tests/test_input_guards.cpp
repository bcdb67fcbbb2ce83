// Issue 13: inputs that used to crash, hang, or give silent NaNs now give a
// clear error: probe counts and k at the public entries of router/,
// exceptions inside OpenMP regions, thread counts, logits that overflow
// float32, and expert counts beyond 32-bit ids.
#include <gtest/gtest.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/in_process.h"
#include "core/checks.h"
#include "core/errors.h"
#include "core/parallel_errors.h"
#include "core/synthetic.h"
#include "core/threads.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "router/list_scan.h"
#include "router/product_key_router.h"
#include "runtime_fixture.h"
#include "test_util.h"

namespace airmoe {
namespace {

SyntheticData small_data(int64_t E = 64, int64_t d = 8, int64_t T = 16) {
  SyntheticConfig cfg = synthetic_preset("default");
  cfg.experts = E;
  cfg.dim = d;
  cfg.tokens = T;
  cfg.seed = 5;
  return make_synthetic(cfg);
}

TEST(InputGuards, SelectProbesRefusesNonPositiveProbesAndK) {
  const SyntheticData data = small_data();
  const AirRouter air(data.centers.view(), AirConfig{8, 3, 1, 0});
  const MatrixView tokens = data.tokens.view();
  for (int m : {0, -1, -100000}) {
    SCOPED_TRACE(m);
    AIRMOE_EXPECT_THROW_MSG(select_probes(air.codebook(), air.lists(), tokens, 2, m), UsageError,
                            "probes m = " + std::to_string(m) + " must be >= 1");
  }
  AIRMOE_EXPECT_THROW_MSG(select_probes(air.codebook(), air.lists(), tokens, 0, 2), UsageError,
                          "k = 0 is outside [1, 64]");
  AIRMOE_EXPECT_THROW_MSG(select_probes(air.codebook(), air.lists(), tokens, 65, 2), UsageError,
                          "k = 65");
  const Matrix narrow(3, 7);
  AIRMOE_EXPECT_THROW_MSG(select_probes(air.codebook(), air.lists(), narrow.view(), 2, 2),
                          UsageError, "tokens has 7 columns, expected 8");
  // More probes than codewords probes every list, as load estimates rely on.
  const ProbeSelection all = select_probes(air.codebook(), air.lists(), tokens, 2, 100);
  EXPECT_EQ(all.offsets.back(), tokens.rows * 8);
}

// The list scan (Ops::scan_blocks) refuses pairs outside its blocks or
// queries, k < 1 and mismatched pair vectors, naming the op and the pair.
// (Plain lists: list c is block c, so a pair's run is one block.)
TEST(InputGuards, ScanBlocksRefusesBadPairsAndK) {
  const SyntheticData data = small_data();
  const AirRouter air(data.centers.view(), AirConfig{8, 3, 1, 0});
  const Compute c = host_compute();
  const ListBlocks blocks = ListBlocks::build(
      c, air.lists(), air.dim(), [](int32_t) { return true; },
      [&](int32_t e) { return air.centers().row(e); });
  const auto scan = [&](std::vector<int32_t> query, std::vector<int32_t> block, int k) {
    const Tensor z = c.ops->empty(DType::kF32, static_cast<int64_t>(query.size()), std::max(k, 1));
    const Tensor ids =
        c.ops->empty(DType::kI32, static_cast<int64_t>(query.size()), std::max(k, 1));
    std::vector<int32_t> block_end(block.size());
    for (size_t p = 0; p < block.size(); ++p) block_end[p] = block[p] + 1;
    c.ops->scan_blocks(blocks.view(), data.tokens.view(), device_vector(c, query),
                       device_vector(c, block), device_vector(c, block_end), k, {z, ids, {}},
                       c.stream);
  };
  AIRMOE_EXPECT_THROW_MSG(scan({0, 1}, {0, 8}, 2), UsageError,
                          "scan_blocks: pair 1 names block 8, outside [0, 8)");
  AIRMOE_EXPECT_THROW_MSG(scan({0, 16}, {0, 1}, 2), UsageError,
                          "pair 1 names query 16, outside [0, 16)");
  AIRMOE_EXPECT_THROW_MSG(scan({0, 1}, {0, 1}, 0), UsageError, "k = 0 must be >= 1");
  AIRMOE_EXPECT_THROW_MSG(scan({0}, {0, 1}, 2), UsageError, "block is [2, 1] i32");
  EXPECT_NO_THROW(scan({0, 1}, {0, 1}, 2));
}

TEST(InputGuards, ParallelErrorsRethrowsAfterTheRegion) {
  test::ThreadGuard guard;
  set_num_threads(2);
  ParallelErrors errors;
  std::atomic<int> ran{0};
#pragma omp parallel for
  for (int i = 0; i < 64; ++i)
    errors.run([&] {
      ++ran;
      if (i == 7) throw UsageError("item 7 failed");
    });
  EXPECT_EQ(ran.load(), 64);  // the other items still ran
  AIRMOE_EXPECT_THROW_MSG(errors.rethrow(), UsageError, "item 7 failed");
  ParallelErrors none;
  EXPECT_NO_THROW(none.rethrow());
}

TEST(InputGuards, ThreadCountIsBounded) {
  test::ThreadGuard guard;
  AIRMOE_EXPECT_THROW_MSG(set_num_threads(100000), UsageError,
                          "set_num_threads: n must be <= 1024, got 100000");
  AIRMOE_EXPECT_THROW_MSG(set_num_threads(30000), UsageError, "got 30000");
  AIRMOE_EXPECT_THROW_MSG(set_num_threads(-1), UsageError, "n must be >= 1, got -1");
  EXPECT_NO_THROW(set_num_threads(kMaxThreads));
}

// Finite inputs whose logits overflow float32 used to give NaN gates with
// success; every router (and so every front end) now names the row.
TEST(InputGuards, OverflowingLogitsAreRefusedByEveryRouter) {
  const SyntheticData data = small_data();
  Matrix tokens = test::copy_matrix(data.tokens.view());
  tokens(3, 0) = 3e38f;
  const DenseRouter dense(data.centers.view());
  const AirRouter air(data.centers.view(), AirConfig{8, 3, 1, 0});
  const ProductKeyRouter pk(random_matrix(8, 4, 0.5, 1), random_matrix(8, 4, 0.5, 2));
  const char* needle = "tokens row 3: logits overflow float32 (|h| = 3e+38";
  AIRMOE_EXPECT_THROW_MSG(dense.route(tokens.view(), 2), UsageError, needle);
  AIRMOE_EXPECT_THROW_MSG(dense.route(tokens.view(), 2, GateMode::kShortlist), UsageError, needle);
  AIRMOE_EXPECT_THROW_MSG(air.route(tokens.view(), 2, 2), UsageError, needle);
  AIRMOE_EXPECT_THROW_MSG(air.route(tokens.view(), 2, 8, GateMode::kShortlist), UsageError, needle);
  AIRMOE_EXPECT_THROW_MSG(pk.route(tokens.view(), 2), UsageError, needle);

  // Moderate tokens against centers so large that <w, h> overflows.
  Matrix big = test::copy_matrix(data.centers.view());
  for (size_t i = 0; i < big.size(); ++i) big.data()[i] *= 6.7e35f;
  Matrix moderate = test::copy_matrix(data.tokens.view());
  for (size_t i = 0; i < moderate.size(); ++i) moderate.data()[i] *= 1e3f;
  const DenseRouter big_dense(big.view());
  AIRMOE_EXPECT_THROW_MSG(big_dense.route(moderate.view(), 2), UsageError,
                          "tokens row 0: logits overflow float32");
  const AirRouter big_air(big.view(), AirConfig{8, 3, 1, 0});
  AIRMOE_EXPECT_THROW_MSG(big_air.route(moderate.view(), 2, 2), UsageError,
                          "tokens row 0: logits overflow float32");
  // Large but safe: the gates stay finite and the routes are the dense ones.
  Matrix large = test::copy_matrix(data.centers.view());
  for (size_t i = 0; i < large.size(); ++i) large.data()[i] *= 1e30f;
  const Routes exact = DenseRouter(large.view()).route(data.tokens.view(), 2);
  for (float g : exact.gates) EXPECT_TRUE(std::isfinite(g));
  const Routes via_air =
      AirRouter(large.view(), AirConfig{8, 3, 1, 0}).route(data.tokens.view(), 2, 8);
  EXPECT_EQ(via_air.experts, exact.experts);
}

TEST(InputGuards, RequireFiniteLogitsBoundary) {
  Matrix row(1, 1);
  row(0, 0) = 1e19f;
  EXPECT_NO_THROW(require_finite_logits(row.view(), 1e19, "h"));  // 1e38 < FLT_MAX / 2
  AIRMOE_EXPECT_THROW_MSG(require_finite_logits(row.view(), 1e20, "h"), UsageError,
                          "h row 0: logits overflow float32");
}

// The distributed router refuses the overflowing token on its home rank, on
// every rank together: no rank is left waiting in an exchange.
TEST(InputGuards, DistributedRouterRefusesOverflowTogether) {
  const test::GlobalData g = test::GlobalData::make(/*E=*/40, /*d=*/5, /*T=*/9, /*C=*/4, 3);
  std::vector<std::string> caught(3);
  comm::run_ranks(3, [&](comm::Communicator& comm) {
    runtime::DistributedRouter router = g.make_router(comm, runtime::PlacementPolicy::kLocality);
    Matrix mine = test::copy_matrix(g.tokens_of(comm.rank(), 3));
    if (comm.rank() == 1) mine(0, 2) = -3e38f;
    try {
      router.route_batch(mine.view(), 3, 2);
    } catch (const UsageError& e) {
      caught[comm.rank()] = std::string("usage: ") + e.what();
    } catch (const PeerError& e) {
      caught[comm.rank()] = std::string("peer: ") + e.what();
    }
  });
  EXPECT_NE(caught[1].find("usage: "), std::string::npos) << caught[1];
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_NE(caught[rank].find("tokens row 0: logits overflow float32"), std::string::npos)
        << caught[rank];
  }
  EXPECT_NE(caught[0].find("peer: "), std::string::npos) << caught[0];
}

// 2^31 experts would overflow the int32 expert ids: refused before any row
// is read (the view points at one float).
TEST(InputGuards, ExpertCountsBeyondInt32AreRefused) {
  const float one = 1.0f;
  const MatrixView huge(&one, int64_t{1} << 31, 1);
  AIRMOE_EXPECT_THROW_MSG(DenseRouter{huge}, UsageError, "expert ids are 32-bit");
  AIRMOE_EXPECT_THROW_MSG(AirRouter(huge, AirConfig{4, 1, 1, 0}), UsageError,
                          "expert ids are 32-bit");
  AIRMOE_EXPECT_THROW_MSG(require_expert_count(int64_t{1} << 31, "E"), UsageError,
                          "E = 2147483648 is too many: expert ids are 32-bit");
  EXPECT_NO_THROW(require_expert_count(INT32_MAX, "E"));
}

}  // namespace
}  // namespace airmoe
