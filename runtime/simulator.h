// Per-rank traffic of the MoE layer's strategies for P up to thousands of
// ranks, in one process: the same placement, the same routes (routing does
// not depend on P), and the same send-buffer builders (runtime/wire.h) as a
// real job, with the communicator's metering rules applied to them instead
// of sending. A test holds it equal to the meter of real runs.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/matrix.h"
#include "router/routes.h"
#include "runtime/moe_layer.h"
#include "runtime/placement.h"

namespace airmoe::runtime {

struct SimulatedTraffic {
  int ranks = 0;
  // phase -> what each rank sends in it (bytes, messages), over all peers.
  std::map<std::string, std::vector<comm::TrafficCounts>> sent;
  double mean_ranks_per_token = 0.0;  // ranks a token's scoring requests reach (air, broadcast)

  comm::TrafficCounts total(const std::string& phase) const;
  int64_t max_rank_bytes(const std::string& phase) const;
};

// routes: every token's routes in global token order (with probes for kAir
// and kDenseBroadcast); tokens [T, d]: the home of token t is the rank of its
// contiguous block, as in the real runs. With `backward`, the backward
// phases are counted too.
SimulatedTraffic simulate_traffic(Strategy strategy, const Placement& placement,
                                  const Routes& routes, MatrixView tokens, bool backward);

// Rows [begin, end) of routes (probes rebased), for a rank's block of tokens.
Routes slice_routes(const Routes& routes, int64_t begin, int64_t end);

}  // namespace airmoe::runtime
