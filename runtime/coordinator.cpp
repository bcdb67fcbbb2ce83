#include "runtime/coordinator.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

#include "core/checks.h"
#include "core/errors.h"

namespace airmoe::runtime {
namespace {

// Per-expert share of its list's load.
std::vector<double> expert_load(const InvertedLists& lists, const std::vector<double>& load) {
  std::vector<double> w(static_cast<size_t>(lists.experts()), 0.0);
  for (int64_t c = 0; c < lists.lists(); ++c) {
    const int64_t n = lists.list_size(c);
    for (int32_t e : lists.list(c)) w[e] = load[c] / static_cast<double>(n);
  }
  return w;
}

std::vector<int32_t> round_robin(const InvertedLists& lists, int P) {
  std::vector<int32_t> owner(static_cast<size_t>(lists.experts()));
  for (size_t e = 0; e < owner.size(); ++e) owner[e] = static_cast<int32_t>(e % P);
  return owner;
}

// Longest-processing-time greedy over whole lists; a list heavier than one
// rank's share is cut into that many contiguous pieces first.
std::vector<int32_t> by_list(const InvertedLists& lists, const std::vector<double>& w, int P) {
  struct Item {
    double load;
    int64_t list, begin, end;  // members [begin, end) of the list
  };
  const double total = std::accumulate(w.begin(), w.end(), 0.0);
  const double share = total / P;
  std::vector<Item> items;
  for (int64_t c = 0; c < lists.lists(); ++c) {
    const auto members = lists.list(c);
    const int64_t n = static_cast<int64_t>(members.size());
    if (n == 0) continue;
    double load = 0.0;
    for (int32_t e : members) load += w[e];
    const int64_t pieces =
        std::clamp<int64_t>(static_cast<int64_t>(std::ceil(load / share - 1e-9)), 1, n);
    for (int64_t p = 0; p < pieces; ++p) {
      const int64_t b = n * p / pieces, e = n * (p + 1) / pieces;
      double l = 0.0;
      for (int64_t i = b; i < e; ++i) l += w[members[i]];
      items.push_back({l, c, b, e});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.load > b.load; });
  std::vector<double> rank_load(static_cast<size_t>(P), 0.0);
  std::vector<int32_t> owner(static_cast<size_t>(lists.experts()), 0);
  for (const Item& it : items) {
    const int r =
        static_cast<int>(std::min_element(rank_load.begin(), rank_load.end()) - rank_load.begin());
    rank_load[r] += it.load;
    const auto members = lists.list(it.list);
    for (int64_t i = it.begin; i < it.end; ++i) owner[members[i]] = r;
  }
  return owner;
}

// Lists ordered by a nearest-neighbour chain over the codewords (each step
// to the closest unvisited codeword), then the chain cut into P pieces of
// equal load: neighbouring codewords, which a token tends to probe together,
// land on the same rank.
std::vector<int32_t> by_locality(const Codebook& codebook, const InvertedLists& lists,
                                 const std::vector<double>& w, int P) {
  const int64_t C = codebook.size();
  std::vector<float> gram(static_cast<size_t>(C * C));
  score_to_host(codebook.compute(), codebook.tensor(), codebook.tensor(), gram.data());
  std::vector<char> visited(static_cast<size_t>(C), 0);
  std::vector<int32_t> chain;
  int32_t cur = 0;
  for (int64_t step = 0; step < C; ++step) {
    chain.push_back(cur);
    visited[cur] = 1;
    int32_t next = -1;
    for (int64_t j = 0; j < C; ++j)
      if (!visited[j] && (next < 0 || gram[cur * C + j] > gram[cur * C + next]))
        next = static_cast<int32_t>(j);
    if (next < 0) break;
    cur = next;
  }
  const double total = std::accumulate(w.begin(), w.end(), 0.0);
  const double share = total / P;
  std::vector<int32_t> owner(static_cast<size_t>(lists.experts()), 0);
  double cum = 0.0;
  for (int32_t c : chain)
    for (int32_t e : lists.list(c)) {
      const int r = share > 0 ? static_cast<int>((cum + 0.5 * w[e]) / share) : 0;
      owner[e] = std::min(r, P - 1);
      cum += w[e];
    }
  return owner;
}

PlacementPlan finish(PlacementPolicy policy, int P, std::vector<int32_t> owner,
                     const InvertedLists& lists, const std::vector<double>& w) {
  PlacementPlan plan;
  plan.policy = policy;
  plan.rank_load.assign(static_cast<size_t>(P), 0.0);
  for (size_t e = 0; e < owner.size(); ++e) plan.rank_load[owner[e]] += w[e];
  const double mean = std::accumulate(plan.rank_load.begin(), plan.rank_load.end(), 0.0) / P;
  plan.imbalance =
      mean > 0 ? *std::max_element(plan.rank_load.begin(), plan.rank_load.end()) / mean : 1.0;
  plan.placement = Placement(P, std::move(owner), lists);
  return plan;
}

}  // namespace

const char* to_string(PlacementPolicy p) {
  switch (p) {
    case PlacementPolicy::kRoundRobin:
      return "round-robin";
    case PlacementPolicy::kList:
      return "list";
    case PlacementPolicy::kLocality:
      return "locality";
  }
  return "?";
}

PlacementPolicy placement_policy_from_string(const std::string& name) {
  if (name == "round-robin") return PlacementPolicy::kRoundRobin;
  if (name == "list") return PlacementPolicy::kList;
  if (name == "locality") return PlacementPolicy::kLocality;
  fail("placement policy '" + name + "' is unknown (expected round-robin, list or locality)");
}

std::vector<double> list_load(const InvertedLists& lists, const std::vector<int32_t>& probed) {
  std::vector<double> hits(static_cast<size_t>(lists.lists()), 0.0);
  for (int32_t c : probed) {
    if (c < 0 || c >= lists.lists())
      fail("list_load: probed codeword " + std::to_string(c) + " is outside [0, " +
           std::to_string(lists.lists()) + ")");
    hits[c] += 1.0;
  }
  std::vector<double> load(hits.size());
  for (size_t c = 0; c < hits.size(); ++c)
    load[c] = (hits[c] + 1.0) * static_cast<double>(lists.list_size(static_cast<int64_t>(c)));
  return load;
}

PlacementPlan plan_placement(PlacementPolicy policy, int ranks, const Codebook& codebook,
                             const InvertedLists& lists, const std::vector<double>& load) {
  if (ranks < 1) fail("plan_placement: ranks = " + std::to_string(ranks) + " must be >= 1");
  if (static_cast<int64_t>(load.size()) != lists.lists())
    fail("plan_placement: " + std::to_string(load.size()) + " list loads for " +
         std::to_string(lists.lists()) + " lists");
  if (codebook.size() != lists.lists())
    fail("plan_placement: codebook of " + std::to_string(codebook.size()) + " codewords for " +
         std::to_string(lists.lists()) + " lists");
  for (size_t c = 0; c < load.size(); ++c)
    if (!(load[c] >= 0.0) || !std::isfinite(load[c]))
      fail("plan_placement: load of list " + std::to_string(c) + " is not a finite value >= 0");
  const std::vector<double> w = expert_load(lists, load);
  switch (policy) {
    case PlacementPolicy::kRoundRobin:
      return finish(policy, ranks, round_robin(lists, ranks), lists, w);
    case PlacementPolicy::kList:
      return finish(policy, ranks, by_list(lists, w, ranks), lists, w);
    case PlacementPolicy::kLocality:
      return finish(policy, ranks, by_locality(codebook, lists, w, ranks), lists, w);
  }
  fail("plan_placement: unknown policy");
}

PlacementPlan plan_and_broadcast(comm::Communicator& comm, PlacementPolicy policy,
                                 const Codebook& codebook, const InvertedLists& lists,
                                 const std::vector<double>& load) {
  comm::PhaseScope phase(comm, "placement");
  PlacementPlan plan;
  std::string error;
  if (comm.rank() == 0) {
    try {
      plan = plan_placement(policy, comm.size(), codebook, lists, load);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  // A planning error on rank 0 is every rank's error: no rank is left waiting.
  std::vector<char> message(error.begin(), error.end());
  comm::broadcast_vector(comm, message, 0);
  if (!message.empty()) {
    const std::string text = "coordinator (rank 0): " + std::string(message.begin(), message.end());
    if (comm.rank() == 0) throw JointUsageError(text);
    throw PeerError(text, 0);
  }
  std::vector<int32_t> owner = plan.placement.owners();
  comm::broadcast_vector(comm, owner, 0);
  comm::broadcast_vector(comm, plan.rank_load, 0);
  comm.broadcast(&plan.imbalance, sizeof(plan.imbalance), 0);
  plan.policy = policy;
  plan.placement = Placement(comm.size(), std::move(owner), lists);
  return plan;
}

}  // namespace airmoe::runtime
