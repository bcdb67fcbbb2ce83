#include "runtime/wire.h"

#include <algorithm>

namespace airmoe::runtime::wire {

Outbox scoring_requests(const Placement& placement, const std::vector<int64_t>& probe_offsets,
                        const std::vector<int32_t>& probes, MatrixView tokens, int ranks) {
  const int64_t T = tokens.rows, d = tokens.cols;
  Outbox box;
  box.send.resize(static_cast<size_t>(ranks));
  box.target_offsets.assign(static_cast<size_t>(T + 1), 0);
  std::vector<std::vector<int32_t>> per_rank(static_cast<size_t>(ranks));
  std::vector<int32_t> touched;
  for (int64_t t = 0; t < T; ++t) {
    touched.clear();
    for (int64_t p = probe_offsets[t]; p < probe_offsets[t + 1]; ++p)
      for (int32_t rank : placement.list_ranks(probes[p])) {
        if (per_rank[rank].empty()) touched.push_back(rank);
        per_rank[rank].push_back(probes[p]);
      }
    std::sort(touched.begin(), touched.end());
    for (int32_t rank : touched) {
      box.targets.push_back(rank);
      const int32_t header[2] = {static_cast<int32_t>(t),
                                 static_cast<int32_t>(per_rank[rank].size())};
      put(box.send[rank], header, 2);
      put(box.send[rank], per_rank[rank].data(), per_rank[rank].size());
      put(box.send[rank], tokens.row(t), static_cast<size_t>(d));
      per_rank[rank].clear();
    }
    box.target_offsets[t + 1] = static_cast<int64_t>(box.targets.size());
  }
  return box;
}

Outbox expert_dispatch(const Placement& placement, const Routes& routes, MatrixView tokens,
                       bool ship_vectors, int ranks) {
  const int64_t T = routes.tokens, d = tokens.cols;
  const int k = routes.k;
  Outbox box;
  box.send.resize(static_cast<size_t>(ranks));
  box.target_offsets.assign(static_cast<size_t>(T + 1), 0);
  std::vector<std::pair<int32_t, int32_t>> owner_slot(static_cast<size_t>(k));
  for (int64_t t = 0; t < T; ++t) {
    const int32_t* e = routes.experts_of(t);
    const float* g = routes.gates_of(t);
    for (int j = 0; j < k; ++j) owner_slot[j] = {placement.owner(e[j]), j};
    // By rank, then slot: prefix sums over a sorted list, no atomics.
    std::sort(owner_slot.begin(), owner_slot.end());
    for (int j = 0; j < k;) {
      const int32_t rank = owner_slot[j].first;
      int n = 0;
      while (j + n < k && owner_slot[j + n].first == rank) ++n;
      box.targets.push_back(rank);
      const int32_t header[2] = {static_cast<int32_t>(t), n};
      put(box.send[rank], header, 2);
      for (int s = j; s < j + n; ++s) {
        const int32_t slot = owner_slot[s].second;
        box.slots.push_back(slot);
        put(box.send[rank], e + slot, 1);
        put(box.send[rank], g + slot, 1);
      }
      if (ship_vectors) put(box.send[rank], tokens.row(t), static_cast<size_t>(d));
      box.slot_offsets.push_back(static_cast<int64_t>(box.slots.size()));
      j += n;
    }
    box.target_offsets[t + 1] = static_cast<int64_t>(box.targets.size());
  }
  return box;
}

}  // namespace airmoe::runtime::wire
