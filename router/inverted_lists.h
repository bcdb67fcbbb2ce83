// Inverted lists in CSR form: list c holds the experts assigned to codeword c,
// in increasing expert id.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace airmoe::inline router {

class InvertedLists {
 public:
  InvertedLists() = default;
  // assignment[e] is expert e's list, in [0, lists).
  InvertedLists(const std::vector<int32_t>& assignment, int64_t lists);

  int64_t lists() const { return static_cast<int64_t>(offsets_.size()) - 1; }
  int64_t experts() const { return static_cast<int64_t>(ids_.size()); }
  int64_t list_size(int64_t c) const { return offsets_[c + 1] - offsets_[c]; }
  int64_t list_offset(int64_t c) const { return offsets_[c]; }
  std::span<const int32_t> list(int64_t c) const {
    return {ids_.data() + offsets_[c], static_cast<size_t>(list_size(c))};
  }
  int64_t max_list_size() const;

  const std::vector<int64_t>& offsets() const { return offsets_; }  // [C + 1]
  const std::vector<int32_t>& ids() const { return ids_; }          // [E], list after list
  // position()[e]: where expert e sits in ids().
  const std::vector<int64_t>& position() const { return position_; }
  const std::vector<int32_t>& assignment() const { return assignment_; }

 private:
  std::vector<int64_t> offsets_{0};
  std::vector<int32_t> ids_;
  std::vector<int64_t> position_;
  std::vector<int32_t> assignment_;
};

}  // namespace airmoe::inline router
