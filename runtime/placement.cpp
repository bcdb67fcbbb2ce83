#include "runtime/placement.h"

#include <algorithm>
#include <string>

#include "core/checks.h"
#include "core/hash.h"

namespace airmoe::runtime {

Placement::Placement(int ranks, std::vector<int32_t> owner, const InvertedLists& lists)
    : ranks_(ranks), owner_(std::move(owner)) {
  if (ranks < 1) fail("placement: ranks = " + std::to_string(ranks) + " must be >= 1");
  if (static_cast<int64_t>(owner_.size()) != lists.experts())
    fail("placement: " + std::to_string(owner_.size()) + " owners for " +
         std::to_string(lists.experts()) + " experts");
  for (size_t e = 0; e < owner_.size(); ++e)
    if (owner_[e] < 0 || owner_[e] >= ranks)
      fail("placement: expert " + std::to_string(e) + " is owned by rank " +
           std::to_string(owner_[e]) + ", outside [0, " + std::to_string(ranks) + ")");
  refresh(lists);
}

void Placement::refresh(const InvertedLists& lists) {
  if (static_cast<int64_t>(owner_.size()) != lists.experts())
    fail("placement: the lists hold " + std::to_string(lists.experts()) +
         " experts, the placement " + std::to_string(owner_.size()));
  list_rank_offsets_.assign(static_cast<size_t>(lists.lists() + 1), 0);
  list_ranks_.clear();
  std::vector<char> hosts(static_cast<size_t>(ranks_));
  for (int64_t c = 0; c < lists.lists(); ++c) {
    std::fill(hosts.begin(), hosts.end(), 0);
    for (int32_t e : lists.list(c)) hosts[owner_[e]] = 1;
    for (int r = 0; r < ranks_; ++r)
      if (hosts[r]) list_ranks_.push_back(r);
    list_rank_offsets_[c + 1] = static_cast<int64_t>(list_ranks_.size());
  }
}

std::vector<int32_t> Placement::local_experts(int rank) const {
  std::vector<int32_t> out;
  for (size_t e = 0; e < owner_.size(); ++e)
    if (owner_[e] == rank) out.push_back(static_cast<int32_t>(e));
  return out;
}

std::vector<int64_t> Placement::experts_per_rank() const {
  std::vector<int64_t> n(static_cast<size_t>(ranks_), 0);
  for (int32_t r : owner_) ++n[r];
  return n;
}

uint64_t Placement::digest() const {
  return fnv1a64(owner_.data(), owner_.size() * sizeof(int32_t), fnv1a64(&ranks_, sizeof(ranks_)));
}

}  // namespace airmoe::runtime
