// Which rank hosts each expert, and so each inverted list's per-rank
// segments. Every rank holds the same Placement: the coordinator computes the
// owners and broadcasts them, and each rank derives the segments from its
// replicated inverted lists.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "router/inverted_lists.h"
#include "router/query_lists.h"

namespace airmoe::runtime {

class Placement {
 public:
  Placement() = default;
  // owner[e] in [0, ranks) for every expert of `lists`.
  Placement(int ranks, std::vector<int32_t> owner, const InvertedLists& lists);

  int ranks() const { return ranks_; }
  int64_t experts() const { return static_cast<int64_t>(owner_.size()); }
  int32_t owner(int32_t expert) const { return owner_[expert]; }
  const std::vector<int32_t>& owners() const { return owner_; }

  // The ranks that host at least one member of list c (its segments), ascending.
  std::span<const int32_t> list_ranks(int64_t c) const {
    return {list_ranks_.data() + list_rank_offsets_[c],
            static_cast<size_t>(list_rank_offsets_[c + 1] - list_rank_offsets_[c])};
  }
  // Experts hosted by `rank`, ascending.
  std::vector<int32_t> local_experts(int rank) const;
  std::vector<int64_t> experts_per_rank() const;
  // Every expert, rank after rank, each rank's ascending: local_experts(0),
  // local_experts(1), ... in one O(E + P) pass (what an all-gather of
  // per-expert values in local order concatenates).
  std::vector<int32_t> experts_in_rank_order() const;

  // The lists changed (a codebook update): recompute the segments; owners,
  // and so expert parameters, stay where they are.
  void refresh(const InvertedLists& lists);
  // Overlapping lists (query lists): list c's segments are on the owners of
  // every expert that sits in it, in any of its lists.
  void refresh(const ListMembership& membership);

  // A digest of the owners, for checking that ranks agree.
  uint64_t digest() const;

 private:
  int ranks_ = 0;
  std::vector<int32_t> owner_;
  // The ranks hosting list c: those with hosts[c * ranks + r] set.
  void set_list_ranks(int64_t lists, const std::vector<char>& hosts);

  std::vector<int64_t> list_rank_offsets_;  // [C + 1]
  std::vector<int32_t> list_ranks_;
};

}  // namespace airmoe::runtime
