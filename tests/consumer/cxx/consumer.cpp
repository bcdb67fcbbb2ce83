// Uses the installed C++ libraries: routes synthetic tokens with AIR probing
// every list and with the dense router, which must agree bit for bit, places
// the experts on 4 ranks with the runtime's coordinator, and opens the MPI
// communicator (one process, no mpiexec).
#include <cstdio>
#include <cstring>
#include <memory>

#include "comm/mpi_communicator.h"
#include "core/synthetic.h"
#include "core/version.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "runtime/coordinator.h"

int main(int argc, char** argv) {
  using namespace airmoe;
  comm::MpiSession session(&argc, &argv);
  const std::unique_ptr<comm::MpiCommunicator> world = comm::world_communicator();
  if (world->size() != 1) {
    std::fprintf(stderr, "consumer_cxx: %d MPI ranks, expected 1\n", world->size());
    return 1;
  }
  static_assert(AIRMOE_VERSION >= 100, "version macros come from the installed headers");
  SyntheticConfig config;
  config.experts = 512;
  config.dim = 32;
  config.tokens = 64;
  const SyntheticData data = make_synthetic(config);
  const AirRouter air(data.centers.view(), AirConfig{16, 5, 1});
  const DenseRouter dense(data.centers.view());
  const Routes a = air.route(data.tokens.view(), 4, 16);
  const Routes b = dense.route(data.tokens.view(), 4);
  if (a.experts != b.experts || std::memcmp(a.gates.data(), b.gates.data(), a.gates.size() * 4)) {
    std::fprintf(stderr, "consumer_cxx: AIR with m = C differs from dense routing\n");
    return 1;
  }
  const runtime::PlacementPlan plan =
      runtime::plan_placement(runtime::PlacementPolicy::kList, 4, air.codebook(), air.lists(),
                              std::vector<double>(static_cast<size_t>(air.codewords()), 1.0));
  std::printf("consumer_cxx: airmoe %s, %lld tokens routed, 4 ranks host %lld experts\n",
              AIRMOE_VERSION_STRING, static_cast<long long>(a.tokens),
              static_cast<long long>(plan.placement.experts()));
  return 0;
}
