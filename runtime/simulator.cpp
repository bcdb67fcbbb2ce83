#include "runtime/simulator.h"

#include <algorithm>

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
    s.probes.assign(r.probes.begin() + base, r.probes.begin() + r.probe_offsets[end]);
  }
  return s;
}

SimulatedTraffic simulate_traffic(Strategy strategy, const Placement& placement,
                                  const Routes& routes, MatrixView tokens, bool backward) {
  const int P = placement.ranks();
  const int64_t T = routes.tokens, d = tokens.cols;
  SimulatedTraffic sim;
  sim.ranks = P;
  auto phase = [&](const std::string& name) -> std::vector<comm::TrafficCounts>& {
    auto& v = sim.sent[name];
    v.resize(static_cast<size_t>(P));
    return v;
  };
  // One all-to-all-v in `name`: every rank tells every other rank its count.
  auto alltoallv = [&](const std::string& name) {
    auto& counts = phase(name + comm::kCountsSuffix);
    for (int r = 0; r < P; ++r) counts[r] += {comm::kCountBytes * (P - 1), P - 1};
    return &phase(name);
  };
  // A payload message r -> q, if any bytes (self-sends stay local).
  auto send = [&](std::vector<comm::TrafficCounts>* v, int from, int to, int64_t bytes) {
    if (from != to && bytes > 0) (*v)[from] += {bytes, 1};
  };

  const bool scored = strategy != Strategy::kDenseReplicated;
  std::vector<comm::TrafficCounts>*requests = nullptr, *replies = nullptr;
  if (scored) {
    requests = alltoallv("requests");
    replies = alltoallv("replies");
  }
  auto* dispatch = alltoallv("dispatch");
  auto* combine = alltoallv("combine");
  std::vector<comm::TrafficCounts>*grad_dispatch = nullptr, *grad_gates = nullptr,
  *grad_logits = nullptr, *grad_combine = nullptr;
  if (backward) {
    grad_dispatch = alltoallv("grad_dispatch");
    grad_gates = alltoallv("grad_gates");
    grad_logits = alltoallv("grad_logits");
    grad_combine = alltoallv("grad_combine");
  }

  double reached = 0.0;
  std::vector<int64_t> records(static_cast<size_t>(P)), pairs(static_cast<size_t>(P));
  for (int home = 0; home < P; ++home) {
    const int64_t b = T * home / P, e = T * (home + 1) / P;
    const MatrixView block(tokens.row(b), e - b, d);
    const Routes mine = slice_routes(routes, b, e);
    if (scored) {
      const wire::Outbox out =
          wire::scoring_requests(placement, mine.probe_offsets, mine.probes, block, P);
      std::fill(records.begin(), records.end(), 0);
      for (int32_t q : out.targets) ++records[q];
      reached += static_cast<double>(out.targets.size());
      for (int q = 0; q < P; ++q) {
        send(requests, home, q, out.send.bytes(q));
        send(replies, q, home, records[q] * wire::reply_bytes(routes.k));
      }
    }
    const wire::Outbox out =
        wire::expert_dispatch(placement, mine, block, strategy == Strategy::kDenseReplicated, P);
    std::fill(records.begin(), records.end(), 0);
    std::fill(pairs.begin(), pairs.end(), 0);
    for (size_t i = 0; i < out.targets.size(); ++i) {
      ++records[out.targets[i]];
      pairs[out.targets[i]] += out.slot_offsets[i + 1] - out.slot_offsets[i];
    }
    for (int q = 0; q < P; ++q) {
      send(dispatch, home, q, out.send.bytes(q));
      send(combine, q, home, records[q] * wire::vector_bytes(d));
      if (!backward) continue;
      send(grad_dispatch, home, q, records[q] * wire::vector_bytes(d));
      send(grad_gates, q, home, wire::per_pair_bytes(pairs[q]));
      send(grad_logits, home, q, wire::per_pair_bytes(pairs[q]));
      send(grad_combine, q, home, records[q] * wire::vector_bytes(d));
    }
  }
  sim.mean_ranks_per_token = T > 0 ? reached / static_cast<double>(T) : 0.0;
  return sim;
}

}  // namespace airmoe::runtime
