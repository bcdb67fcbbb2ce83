// Per-rank traffic of the MoE layer's strategies for P up to thousands of
// ranks, in one process: the same placement, the same routes (routing does
// not depend on P), and the same send-buffer builders (runtime/wire.h) as a
// real job, with the communicator's metering rules (comm/exchange_rule.h)
// applied to them instead of sending. A test holds it equal to the meter of
// real runs.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "comm/exchange_rule.h"
#include "core/matrix.h"
#include "router/routes.h"
#include "runtime/moe_layer.h"
#include "runtime/placement.h"

namespace airmoe::runtime {

// `exchange` is the kind of all-to-all the layer's phases (requests ...
// grad_combine) go through: what the communicator of the run being
// predicted performs (Communicator::exchange_kind(): kSparse on the
// in-process and MPI backends, kCountsFirst on NCCL). Its control messages
// (comm/exchange_rule.h) are counted with the payload.

struct SimulatedTraffic {
  int ranks = 0;  // P
  // The ranks whose traffic `sent` holds, entry by entry: all P ranks in a
  // full simulation, the sampled ranks in simulate_sample().
  std::vector<int> rank_ids;
  bool sampled = false;
  // phase -> what each entry's rank sends in it (bytes, messages), over all
  // peers; with the control phases (":counts" or ":barrier").
  std::map<std::string, std::vector<comm::TrafficCounts>> sent;
  double mean_ranks_per_token = 0.0;  // ranks a token's scoring requests reach (air, broadcast)

  comm::TrafficCounts total(const std::string& phase) const;  // over the entries
  int64_t max_rank_bytes(const std::string& phase) const;
};

// routes: every token's routes in global token order (with probes for kAir
// and kDenseBroadcast); tokens [T, d]: the home of token t is the rank of its
// contiguous block, as in the real runs. With `backward`, the backward
// phases are counted too. wire_dtype: the layer's (MoEConfig::wire_dtype),
// the element type of the token vectors on the wire.
SimulatedTraffic simulate_traffic(Strategy strategy, const Placement& placement,
                                  const Routes& routes, MatrixView tokens, bool backward,
                                  comm::ExchangeKind exchange, DType wire_dtype);

// One sampled rank's own batch of tokens, routed (with probes for kAir and
// kDenseBroadcast). Only the routes and the model dimension matter to the
// traffic, not the token values.
struct RankBlock {
  int rank = 0;
  const Routes* routes = nullptr;
};

// Weak scaling without P ranks' tokens: the traffic of the sampled ranks
// only, each from its own block. Each entry counts the traffic its rank's
// tokens cause: what it sends in the phases that leave home (requests,
// dispatch, grad_dispatch, grad_logits) and what the others send it in the
// phases that return home (replies, combine, grad_gates, grad_combine),
// plus its own control messages. Summed over all P ranks this equals the
// full simulation's total per phase (every message is caused by exactly one
// home), so the sample's mean estimates the mean bytes a rank sends; with
// every rank sampled the totals are equal exactly (a test holds them so).
SimulatedTraffic simulate_sample(Strategy strategy, const Placement& placement,
                                 std::span<const RankBlock> blocks, int64_t dim, bool backward,
                                 comm::ExchangeKind exchange, DType wire_dtype);

// Rows [begin, end) of routes (probes rebased), for a rank's block of tokens.
Routes slice_routes(const Routes& routes, int64_t begin, int64_t end);

}  // namespace airmoe::runtime
