// Launched by scripts/check_failure.sh bad-token-midstep under mpiexec: the
// MoE layer (strategy given as argv[1], default air) runs forward + backward
// for 5 steps; at step 3 the last rank's last token holds a NaN. Every rank
// prints one line per step: "rank R step S ok", or the error it caught and its
// type. The layer must raise on every rank together in step 3 (UsageError on
// the rank with the bad token, PeerError naming that rank elsewhere) and keep
// working in steps 4 and 5. airmoe_bench cannot do this: it checks its tokens
// against an exact reference before any step runs.
#include <cmath>
#include <cstdio>
#include <string>

#include "comm/mpi_communicator.h"
#include "core/errors.h"
#include "runtime/moe_layer.h"
#include "runtime_fixture.h"

namespace {

using namespace airmoe;

constexpr int kSteps = 5;
constexpr int kBadStep = 3;

// One step's outcome, as the line the script reads.
std::string step(runtime::MoELayer& layer, MatrixView tokens, MatrixView d_out) {
  try {
    runtime::ForwardResult fwd = layer.forward(tokens);
    layer.backward(fwd.handle, d_out);
    return "ok";
  } catch (const PeerError& e) {
    return "PeerError (failed rank " + std::to_string(e.failed_rank()) + "): " + e.what();
  } catch (const UsageError& e) {
    return std::string("UsageError: ") + e.what();
  }
}

int run(comm::Communicator& comm, runtime::Strategy strategy) {
  const int P = comm.size(), me = comm.rank();
  const test::GlobalData g = test::GlobalData::make();
  const runtime::PlacementPlan plan = runtime::plan_and_broadcast(
      comm, runtime::PlacementPolicy::kLocality, g.codebook, g.lists(), g.load);
  runtime::MoEConfig cfg;
  cfg.k = 4;
  cfg.probes = 3;
  cfg.expert = {g.data.centers.cols(), 8, runtime::Activation::kGelu};
  runtime::MoELayer layer(comm, strategy, cfg, g.codebook, g.assignment, plan.placement,
                          g.data.centers.view(), /*expert_seed=*/7);
  const MatrixView mine = g.tokens_of(me, P);
  const Matrix d_out(mine.rows, mine.cols, 0.5f);
  for (int s = 1; s <= kSteps; ++s) {
    Matrix tokens(mine.rows, mine.cols);
    std::copy_n(mine.data, mine.rows * mine.cols, tokens.data());
    if (s == kBadStep && me == P - 1) tokens(mine.rows - 1, 0) = std::nanf("");
    const std::string outcome = step(layer, tokens.view(), d_out.view());
    std::printf("rank %d step %d %s\n", me, s, outcome.c_str());
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  comm::MpiSession session(&argc, &argv);
  auto world = comm::world_communicator();
  return run(*world, runtime::strategy_from_string(argc > 1 ? argv[1] : "air"));
}
