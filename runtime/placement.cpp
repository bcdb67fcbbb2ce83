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
  std::vector<char> hosts(static_cast<size_t>(lists.lists() * ranks_), 0);
  for (int64_t c = 0; c < lists.lists(); ++c)
    for (int32_t e : lists.list(c)) hosts[c * ranks_ + owner_[e]] = 1;
  set_list_ranks(lists.lists(), hosts);
}

void Placement::refresh(const ListMembership& membership) {
  if (static_cast<int64_t>(owner_.size()) != membership.experts())
    fail("placement: the query lists hold " + std::to_string(membership.experts()) +
         " experts, the placement " + std::to_string(owner_.size()));
  std::vector<char> hosts(static_cast<size_t>(membership.list_count * ranks_), 0);
  for (int64_t e = 0; e < membership.experts(); ++e)
    for (int64_t i = membership.offsets[e]; i < membership.offsets[e + 1]; ++i)
      hosts[membership.lists[i] * ranks_ + owner_[e]] = 1;
  set_list_ranks(membership.list_count, hosts);
}

void Placement::set_list_ranks(int64_t lists, const std::vector<char>& hosts) {
  list_rank_offsets_.assign(static_cast<size_t>(lists + 1), 0);
  list_ranks_.clear();
  for (int64_t c = 0; c < lists; ++c) {
    for (int r = 0; r < ranks_; ++r)
      if (hosts[c * ranks_ + r]) list_ranks_.push_back(r);
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

std::vector<int32_t> Placement::experts_in_rank_order() const {
  std::vector<int64_t> at(static_cast<size_t>(ranks_) + 1, 0);
  for (int32_t r : owner_) ++at[r + 1];
  for (int r = 0; r < ranks_; ++r) at[r + 1] += at[r];
  std::vector<int32_t> out(owner_.size());
  for (size_t e = 0; e < owner_.size(); ++e) out[at[owner_[e]]++] = static_cast<int32_t>(e);
  return out;
}

uint64_t Placement::digest() const {
  return fnv1a64(owner_.data(), owner_.size() * sizeof(int32_t), fnv1a64(&ranks_, sizeof(ranks_)));
}

}  // namespace airmoe::runtime
