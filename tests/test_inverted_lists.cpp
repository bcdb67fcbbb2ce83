// InvertedLists: CSR layout over an assignment.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <stdexcept>
#include <vector>

#include "router/inverted_lists.h"
#include "test_util.h"

namespace airmoe {
namespace {

void expect_valid_csr(const InvertedLists& lists, const std::vector<int32_t>& assignment,
                      int64_t C) {
  const int64_t E = static_cast<int64_t>(assignment.size());
  ASSERT_EQ(lists.lists(), C);
  ASSERT_EQ(lists.experts(), E);
  const auto& off = lists.offsets();
  ASSERT_EQ(static_cast<int64_t>(off.size()), C + 1);
  EXPECT_EQ(off.front(), 0);
  EXPECT_EQ(off.back(), E);
  EXPECT_EQ(lists.assignment(), assignment);
  std::vector<int> seen(static_cast<size_t>(E), 0);
  int64_t largest = 0;
  for (int64_t c = 0; c < C; ++c) {
    ASSERT_LE(off[c], off[c + 1]);
    EXPECT_EQ(lists.list_offset(c), off[c]);
    EXPECT_EQ(lists.list_size(c), off[c + 1] - off[c]);
    largest = std::max(largest, lists.list_size(c));
    const auto members = lists.list(c);
    ASSERT_EQ(static_cast<int64_t>(members.size()), lists.list_size(c));
    for (size_t i = 0; i < members.size(); ++i) {
      const int32_t e = members[i];
      ASSERT_GE(e, 0);
      ASSERT_LT(e, E);
      ++seen[e];
      EXPECT_EQ(assignment[e], c) << "expert " << e << " is in the wrong list";
      if (i > 0) {
        EXPECT_LT(members[i - 1], e) << "list " << c << " is not sorted by id";
      }
      EXPECT_EQ(lists.position()[e], off[c] + static_cast<int64_t>(i));
      EXPECT_EQ(lists.ids()[lists.position()[e]], e);
    }
  }
  for (int64_t e = 0; e < E; ++e) EXPECT_EQ(seen[e], 1) << "expert " << e;
  EXPECT_EQ(lists.max_list_size(), largest);
}

TEST(InvertedLists, CsrOfRandomAssignments) {
  std::mt19937 rng(3);
  for (const int64_t C : {1, 2, 7, 64}) {
    for (const int64_t E : {1, 10, 999}) {
      SCOPED_TRACE("C=" + std::to_string(C) + " E=" + std::to_string(E));
      std::vector<int32_t> a(static_cast<size_t>(E));
      for (auto& x : a) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(C));
      expect_valid_csr(InvertedLists(a, C), a, C);
    }
  }
}

TEST(InvertedLists, HandBuiltExample) {
  const std::vector<int32_t> a = {2, 0, 2, 3, 0, 2};  // list 1 is empty
  const InvertedLists lists(a, 4);
  expect_valid_csr(lists, a, 4);
  EXPECT_EQ(lists.offsets(), (std::vector<int64_t>{0, 2, 2, 5, 6}));
  EXPECT_EQ(lists.ids(), (std::vector<int32_t>{1, 4, 0, 2, 5, 3}));
  EXPECT_EQ(lists.list_size(1), 0);
  EXPECT_TRUE(lists.list(1).empty());
  EXPECT_EQ(lists.max_list_size(), 3);
}

TEST(InvertedLists, EmptyAssignment) {
  const InvertedLists lists(std::vector<int32_t>{}, 3);
  EXPECT_EQ(lists.lists(), 3);
  EXPECT_EQ(lists.experts(), 0);
  EXPECT_EQ(lists.max_list_size(), 0);
  const InvertedLists def;
  EXPECT_EQ(def.lists(), 0);
  EXPECT_EQ(def.experts(), 0);
}

TEST(InvertedLists, OutOfRangeAssignmentThrows) {
  AIRMOE_EXPECT_THROW_MSG(InvertedLists({0, 1, 4}, 4), std::invalid_argument,
                          "expert 2 is assigned to list 4");
  AIRMOE_EXPECT_THROW_MSG(InvertedLists({0, -1, 1}, 4), std::invalid_argument,
                          "expert 1 is assigned to list -1");
  AIRMOE_EXPECT_THROW_MSG(InvertedLists({0}, 0), std::invalid_argument, "at least one list");
}

}  // namespace
}  // namespace airmoe
