// The coordinator: rank 0 decides which rank hosts each expert and
// broadcasts the decision, so that every rank routes with the same
// Placement.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "router/codebook.h"
#include "router/inverted_lists.h"
#include "runtime/placement.h"

namespace airmoe::runtime {

enum class PlacementPolicy {
  kRoundRobin,  // expert e on rank e mod P: the naive baseline
  kList,        // whole lists, longest-processing-time greedy by load
  kLocality,    // lists near each other on the sphere on the same rank
};
const char* to_string(PlacementPolicy policy);
PlacementPolicy placement_policy_from_string(const std::string& name);

struct PlacementPlan {
  Placement placement;
  PlacementPolicy policy = PlacementPolicy::kRoundRobin;
  std::vector<double> rank_load;  // [P], estimated scoring work per rank
  double imbalance = 1.0;         // max / mean of rank_load
};

// Estimated scoring work per list: (tokens probing it + 1) x its size, from
// the probe counts of a sample of tokens (the +1 keeps unprobed lists from
// costing nothing: their experts still take memory and updates).
std::vector<double> list_load(const InvertedLists& lists, const std::vector<int32_t>& probed);

// A pure function of its inputs: the same plan on every rank that calls it.
// A list whose load exceeds one rank's share is split across ranks.
PlacementPlan plan_placement(PlacementPolicy policy, int ranks, const Codebook& codebook,
                             const InvertedLists& lists, const std::vector<double>& load);

// Collective: rank 0 plans from its inputs, every rank receives the owners
// and derives the same Placement from its own (replicated) lists.
PlacementPlan plan_and_broadcast(comm::Communicator& comm, PlacementPolicy policy,
                                 const Codebook& codebook, const InvertedLists& lists,
                                 const std::vector<double>& load);

}  // namespace airmoe::runtime
