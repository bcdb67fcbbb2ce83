#include "router/query_lists.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "core/checks.h"

namespace airmoe::inline router {

PickCounts::PickCounts(int64_t codewords, int64_t experts)
    : codewords_(codewords), experts_(experts) {
  if (codewords < 1 || experts < 1)
    fail("pick counts need at least one codeword and one expert, got C = " +
         std::to_string(codewords) + ", E = " + std::to_string(experts));
  counts_.assign(static_cast<size_t>(codewords * experts), 0);
}

PickCounts& PickCounts::operator+=(const PickCounts& other) {
  if (other.codewords_ != codewords_ || other.experts_ != experts_)
    fail("pick counts: cannot add [" + std::to_string(other.codewords_) + ", " +
         std::to_string(other.experts_) + "] counts to [" + std::to_string(codewords_) + ", " +
         std::to_string(experts_) + "] ones");
  for (size_t i = 0; i < counts_.size(); ++i) counts_[i] += other.counts_[i];
  return *this;
}

namespace {

// C codewords need as many sample tokens.
void check_codewords(int64_t codewords, int64_t tokens) {
  if (codewords < 1 || codewords > tokens)
    fail("query lists: C = " + std::to_string(codewords) + " codewords need between 1 and the " +
         std::to_string(tokens) + " sample tokens");
}

// The sample checks train_codebook and the dense router would make too, but
// worded for the sample ("query lists: sample tokens row 3 column 0 is nan").
void check_sample(MatrixView tokens) {
  if (tokens.rows < 1) fail("query lists: the sample has no tokens");
  check_sample_rows(tokens);
}

}  // namespace

void check_sample_rows(MatrixView tokens) {
  require_finite(tokens, "query lists: sample tokens");
  for (int64_t t = 0; t < tokens.rows; ++t) {
    const float* row = tokens.row(t);
    if (std::all_of(row, row + tokens.cols, [](float x) { return x == 0.0f; }))
      fail("query lists: sample tokens row " + std::to_string(t) +
           " has zero norm (the codebook is spherical)");
  }
}

void check_query_options(const QueryListOptions& o, int64_t experts, int64_t tokens) {
  require_in_range(o.k, 1, experts, "query lists: k");
  require_in_range(o.list_length, 1, experts, "query lists: list length L");
  check_codewords(o.codewords, tokens);
  if (o.kmeans_iterations < 0) fail("query lists: k-means iterations must be >= 0");
}

Codebook train_query_codebook(MatrixView tokens, const QueryListOptions& options, Compute compute) {
  check_sample(tokens);
  check_codewords(options.codewords, tokens.rows);
  return train_codebook(tokens, {options.codewords, options.kmeans_iterations, options.seed},
                        nullptr, compute);
}

PickCounts count_picks(const Codebook& codebook, const DenseRouter& exact, MatrixView tokens,
                       int k) {
  if (tokens.rows == 0)  // an empty part of a split sample counts nothing
    return PickCounts(codebook.size(), exact.experts());
  require_cols(tokens, codebook.dim(), "query lists: sample tokens");
  return count_routed_picks(codebook, tokens, exact.route(tokens, k), exact.experts());
}

PickCounts count_routed_picks(const Codebook& codebook, MatrixView tokens, const Routes& exact,
                              int64_t experts) {
  PickCounts counts(codebook.size(), experts);
  if (tokens.rows == 0) return counts;
  require_cols(tokens, codebook.dim(), "query lists: sample tokens");
  if (exact.tokens != tokens.rows)
    fail("query lists: routes of " + std::to_string(exact.tokens) + " tokens for " +
         std::to_string(tokens.rows) + " sample tokens");
  const std::vector<int32_t> nearest =
      codebook.assign(normalize_rows(codebook.compute(), tokens, "query lists: sample tokens"));
  for (int64_t t = 0; t < tokens.rows; ++t)
    for (int j = 0; j < exact.k; ++j)
      ++counts.data()[nearest[t] * experts + exact.experts_of(t)[j]];
  return counts;
}

ListMembership lists_from_counts(const PickCounts& counts, int64_t list_length,
                                 const std::vector<int32_t>& home) {
  const int64_t C = counts.codewords(), E = counts.experts();
  require_in_range(list_length, 1, E, "query lists: list length L");
  if (static_cast<int64_t>(home.size()) != E)
    fail("query lists: " + std::to_string(home.size()) +
         " home lists for E = " + std::to_string(E) + " experts");
  // picked[e]: the (count, list) of every list that took expert e.
  std::vector<std::vector<std::pair<int64_t, int32_t>>> picked(static_cast<size_t>(E));
  std::vector<int32_t> order;
  for (int64_t c = 0; c < C; ++c) {
    order.clear();
    for (int64_t e = 0; e < E; ++e)
      if (counts.at(c, e) > 0) order.push_back(static_cast<int32_t>(e));
    const auto more_picked = [&](int32_t a, int32_t b) {
      return counts.at(c, a) > counts.at(c, b) || (counts.at(c, a) == counts.at(c, b) && a < b);
    };
    const size_t keep = std::min(order.size(), static_cast<size_t>(list_length));
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), more_picked);
    for (size_t i = 0; i < keep; ++i)
      picked[order[i]].push_back({counts.at(c, order[i]), static_cast<int32_t>(c)});
  }
  ListMembership m;
  m.list_count = C;
  m.offsets.assign(1, 0);
  for (int64_t e = 0; e < E; ++e) {
    auto& mine = picked[e];
    if (mine.empty()) {
      if (home[e] < 0 || home[e] >= C)
        fail("query lists: expert " + std::to_string(e) + " has home list " +
             std::to_string(home[e]) + ", outside [0, " + std::to_string(C) + ")");
      mine.push_back({0, home[e]});
    }
    std::sort(mine.begin(), mine.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    for (const auto& [count, c] : mine) m.lists.push_back(c);
    m.offsets.push_back(static_cast<int64_t>(m.lists.size()));
  }
  return m;
}

double query_lists_build_flops(int64_t tokens, int64_t experts, int64_t dim,
                               const QueryListOptions& o) {
  const double T = static_cast<double>(tokens), d = static_cast<double>(dim),
               C = static_cast<double>(o.codewords);
  const double seeding = 2.0 * d * static_cast<double>(std::min(tokens, 8 * o.codewords)) *
                         static_cast<double>(std::max<int64_t>(o.codewords - 1, 0));
  const double lloyd = 2.0 * T * C * d * static_cast<double>(o.kmeans_iterations);
  const double assignment = 2.0 * T * C * d;
  const double exact_routing = 2.0 * T * static_cast<double>(experts) * d;
  return seeding + lloyd + assignment + exact_routing;
}

QueryLists build_query_lists(MatrixView centers, TensorView bias, MatrixView tokens,
                             const QueryListOptions& options, Compute compute) {
  check_sample(tokens);
  check_query_options(options, centers.rows, tokens.rows);
  require_cols(tokens, centers.cols, "query lists: sample tokens");
  DenseRouter exact(centers, compute);
  if (!bias.empty()) exact.set_bias(bias);
  QueryLists q{options, train_query_codebook(tokens, options, compute), {}, 0.0};
  const PickCounts counts = count_picks(q.codebook, exact, tokens, options.k);
  const std::vector<int32_t> home = q.codebook.assign(normalize_rows(compute, centers, "centers"));
  q.membership = lists_from_counts(counts, options.list_length, home);
  q.build_flops = query_lists_build_flops(tokens.rows, centers.rows, centers.cols, options);
  return q;
}

}  // namespace airmoe::inline router
