#include "runtime/simulator.h"

#include <algorithm>
#include <array>

#include "comm/traffic_meter.h"
#include "runtime/wire.h"

namespace airmoe::runtime {

comm::TrafficCounts SimulatedTraffic::total(const std::string& phase) const {
  comm::TrafficCounts c;
  const auto it = sent.find(phase);
  if (it != sent.end())
    for (const auto& v : it->second) c += v;
  return c;
}

int64_t SimulatedTraffic::max_rank_bytes(const std::string& phase) const {
  int64_t m = 0;
  const auto it = sent.find(phase);
  if (it != sent.end())
    for (const auto& v : it->second) m = std::max(m, v.bytes);
  return m;
}

Routes slice_routes(const Routes& r, int64_t begin, int64_t end) {
  Routes s = make_routes(end - begin, r.k, r.gate_mode);
  std::copy(r.experts.begin() + begin * r.k, r.experts.begin() + end * r.k, s.experts.begin());
  std::copy(r.gates.begin() + begin * r.k, r.gates.begin() + end * r.k, s.gates.begin());
  std::copy(r.logits.begin() + begin * r.k, r.logits.begin() + end * r.k, s.logits.begin());
  if (!r.probe_offsets.empty()) {
    s.probe_offsets.assign(static_cast<size_t>(end - begin + 1), 0);
    const int64_t base = r.probe_offsets[begin];
    for (int64_t t = begin; t <= end; ++t) s.probe_offsets[t - begin] = r.probe_offsets[t] - base;
    s.probed_codewords.assign(r.probed_codewords.begin() + base,
                              r.probed_codewords.begin() + r.probe_offsets[end]);
  }
  if (!r.contender_offsets.empty()) {
    const int64_t base = r.contender_offsets[begin];
    for (int64_t t = begin; t <= end; ++t)
      s.contender_offsets.push_back(r.contender_offsets[t] - base);
    s.contenders.assign(r.contenders.begin() + base,
                        r.contenders.begin() + r.contender_offsets[end]);
  }
  return s;
}

namespace {

// The layer's all-to-alls, in the order a step runs them.
enum Phase {
  kRequests,
  kReplies,
  kDispatch,
  kCombine,
  kGradDispatch,
  kGradGates,
  kGradLogits,
  kGradCombine,
  kPhaseCount
};
constexpr std::array<const char*, kPhaseCount> kPhaseNames = {
    "requests",      "replies",    "dispatch",    "combine",
    "grad_dispatch", "grad_gates", "grad_logits", "grad_combine"};

bool runs(Phase phase, Strategy strategy, bool backward) {
  if (phase == kRequests || phase == kReplies) return strategy != Strategy::kDenseReplicated;
  return phase < kGradDispatch || backward;
}

// What the tokens of one home put on the wire, per peer, counted from the
// message sizes of runtime/wire.h without building the buffers (a dense
// broadcast at P = 4,096 would build gigabytes).
struct HomeSegments {
  std::vector<int64_t> request_bytes, request_records;  // scoring requests to q
  std::vector<int64_t> dispatch_records;                // expert dispatch to q: its records
  std::vector<int64_t> dispatch_pairs;                  // (token, expert) pairs served by q
};

void count_requests(const Placement& placement, const Routes& mine, int64_t d, HomeSegments& h) {
  wire::RequestTargets targets(placement, mine);
  for (int64_t t = 0; t < mine.tokens; ++t)
    for (int32_t rank : targets.of(t)) {
      const auto codewords = static_cast<int64_t>(targets.codewords(rank).size());
      h.request_bytes[rank] += wire::request_record_bytes(codewords, d);
      ++h.request_records[rank];
    }
}

void count_dispatch(const Placement& placement, const Routes& mine, HomeSegments& h) {
  std::vector<int32_t> owners(static_cast<size_t>(mine.k));
  for (int64_t t = 0; t < mine.tokens; ++t) {
    const int32_t* e = mine.experts_of(t);
    for (int j = 0; j < mine.k; ++j) owners[j] = placement.owner(e[j]);
    std::sort(owners.begin(), owners.end());
    for (int j = 0; j < mine.k;) {
      const int32_t rank = owners[j];
      int n = 0;
      while (j + n < mine.k && owners[j + n] == rank) ++n;
      ++h.dispatch_records[rank];
      h.dispatch_pairs[rank] += n;
      j += n;
    }
  }
}

// Calls move(phase, from, to, bytes) once per (phase, peer) for the segments
// the tokens of `home` (its block, routed as `mine`) put in flight, self
// segments included. Returns the ranks its tokens' scoring requests reach.
template <typename Move>
int64_t home_traffic(Strategy strategy, const Placement& placement, int home, const Routes& mine,
                     int64_t d, bool backward, DType wire_dtype, Move&& move) {
  const auto P = static_cast<size_t>(placement.ranks());
  HomeSegments h{std::vector<int64_t>(P, 0), std::vector<int64_t>(P, 0), std::vector<int64_t>(P, 0),
                 std::vector<int64_t>(P, 0)};
  const bool scored = strategy != Strategy::kDenseReplicated;
  if (scored) count_requests(placement, mine, d, h);
  count_dispatch(placement, mine, h);
  int64_t reached = 0;
  for (int q = 0; q < static_cast<int>(P); ++q) {
    reached += h.request_records[q];
    if (scored) {
      move(kRequests, home, q, h.request_bytes[q]);
      move(kReplies, q, home, h.request_records[q] * wire::reply_bytes(mine.k));
    }
    const int64_t vectors = h.dispatch_records[q] * wire::vector_bytes(d, wire_dtype);
    move(kDispatch, home, q,
         wire::dispatch_message_bytes(h.dispatch_records[q], h.dispatch_pairs[q], d,
                                      /*ship_vectors=*/!scored, wire_dtype));
    move(kCombine, q, home, vectors);
    if (!backward) continue;
    move(kGradDispatch, home, q, vectors);
    move(kGradGates, q, home, wire::per_pair_bytes(h.dispatch_pairs[q]));
    move(kGradLogits, home, q, wire::per_pair_bytes(h.dispatch_pairs[q]));
    move(kGradCombine, q, home, vectors);
  }
  return reached;
}

// The per-entry tables of the phases `strategy` runs, control phases
// filled (each entry's rank sends the same control traffic per call).
struct PhaseTables {
  std::array<std::vector<comm::TrafficCounts>*, kPhaseCount> payload{};
};

PhaseTables make_tables(SimulatedTraffic& sim, Strategy strategy, bool backward,
                        comm::ExchangeKind exchange) {
  const size_t entries = sim.rank_ids.size();
  const comm::TrafficCounts control = comm::control_traffic(exchange, sim.ranks);
  PhaseTables tables;
  for (int ph = 0; ph < kPhaseCount; ++ph) {
    if (!runs(static_cast<Phase>(ph), strategy, backward)) continue;
    const std::string name = kPhaseNames[ph];
    sim.sent[name + comm::control_suffix(exchange)].assign(entries, control);
    auto& payload = sim.sent[name];
    payload.assign(entries, {});
    tables.payload[ph] = &payload;
  }
  return tables;
}

}  // namespace

SimulatedTraffic simulate_traffic(Strategy strategy, const Placement& placement,
                                  const Routes& routes, MatrixView tokens, bool backward,
                                  comm::ExchangeKind exchange, DType wire_dtype) {
  const int P = placement.ranks();
  const int64_t T = routes.tokens, d = tokens.cols;
  SimulatedTraffic sim;
  sim.ranks = P;
  for (int r = 0; r < P; ++r) sim.rank_ids.push_back(r);
  const PhaseTables tables = make_tables(sim, strategy, backward, exchange);
  // Every message is counted on the rank that sends it.
  auto move = [&](Phase ph, int from, int to, int64_t bytes) {
    if (comm::is_payload_message(from, to, bytes)) (*tables.payload[ph])[from] += {bytes, 1};
  };
  int64_t reached = 0;
  for (int home = 0; home < P; ++home) {
    const int64_t b = T * home / P, e = T * (home + 1) / P;
    reached += home_traffic(strategy, placement, home, slice_routes(routes, b, e), d, backward,
                            wire_dtype, move);
  }
  sim.mean_ranks_per_token = T > 0 ? static_cast<double>(reached) / static_cast<double>(T) : 0.0;
  return sim;
}

SimulatedTraffic simulate_sample(Strategy strategy, const Placement& placement,
                                 std::span<const RankBlock> blocks, int64_t dim, bool backward,
                                 comm::ExchangeKind exchange, DType wire_dtype) {
  SimulatedTraffic sim;
  sim.ranks = placement.ranks();
  sim.sampled = true;
  for (const RankBlock& block : blocks) sim.rank_ids.push_back(block.rank);
  const PhaseTables tables = make_tables(sim, strategy, backward, exchange);
  int64_t reached = 0, tokens = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    // Every message is counted on the home whose tokens caused it.
    auto move = [&](Phase ph, int from, int to, int64_t bytes) {
      if (comm::is_payload_message(from, to, bytes)) (*tables.payload[ph])[i] += {bytes, 1};
    };
    reached += home_traffic(strategy, placement, blocks[i].rank, *blocks[i].routes, dim, backward,
                            wire_dtype, move);
    tokens += blocks[i].routes->tokens;
  }
  sim.mean_ranks_per_token =
      tokens > 0 ? static_cast<double>(reached) / static_cast<double>(tokens) : 0.0;
  return sim;
}

}  // namespace airmoe::runtime
