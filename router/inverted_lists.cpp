#include "router/inverted_lists.h"

#include <algorithm>
#include <string>

#include "core/checks.h"

namespace airmoe::inline router {

InvertedLists::InvertedLists(const std::vector<int32_t>& assignment, int64_t lists)
    : assignment_(assignment) {
  if (lists < 1) fail("inverted lists: need at least one list, got " + std::to_string(lists));
  offsets_.assign(static_cast<size_t>(lists + 1), 0);
  for (size_t e = 0; e < assignment.size(); ++e) {
    const int32_t c = assignment[e];
    if (c < 0 || c >= lists)
      fail("inverted lists: expert " + std::to_string(e) + " is assigned to list " +
           std::to_string(c) + ", outside [0, " + std::to_string(lists) + ")");
    ++offsets_[c + 1];
  }
  for (int64_t c = 0; c < lists; ++c) offsets_[c + 1] += offsets_[c];
  // Counting sort in expert order: each list ends up sorted by id.
  ids_.resize(assignment.size());
  position_.resize(assignment.size());
  std::vector<int64_t> next(offsets_.begin(), offsets_.end() - 1);
  for (size_t e = 0; e < assignment.size(); ++e) {
    const int64_t at = next[assignment[e]]++;
    ids_[at] = static_cast<int32_t>(e);
    position_[e] = at;
  }
}

int64_t InvertedLists::max_list_size() const {
  int64_t m = 0;
  for (int64_t c = 0; c < lists(); ++c) m = std::max(m, list_size(c));
  return m;
}

}  // namespace airmoe::inline router
