#include "router/spilled_lists.h"

#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "core/checks.h"

namespace airmoe::inline router {
namespace {

constexpr int64_t kSpillChunk = 4096;  // rows scored against the codebook at a time
constexpr int kMaxListsPerExpert = 8;

// SOAR loss of every codeword for one unit row x with codeword scores s
// (s[c] = <x, mu_c>), given the codewords it already sits in (`taken`):
//   ||x - mu_c||^2 + lambda sum_t <x - mu_t, x - mu_c>^2 / ||x - mu_t||^2,
// with ||x - mu_c||^2 = 2 - 2 s[c] and <x - mu_t, x - mu_c> =
// 1 - s[c] - s[t] + <mu_t, mu_c>. Taken codewords get +inf.
void soar_losses(const float* s, const std::vector<float>& gram, int64_t C,
                 std::span<const int32_t> taken, double lambda, std::vector<double>& loss) {
  loss.resize(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) loss[c] = 2.0 - 2.0 * s[c];
  for (int32_t t : taken) {
    const double residual2 = 2.0 - 2.0 * s[t];
    if (residual2 < 1e-12) continue;  // x is its codeword: no direction to avoid
    const float* g = gram.data() + static_cast<int64_t>(t) * C;
    for (int64_t c = 0; c < C; ++c) {
      const double dot = 1.0 - s[c] - s[t] + g[c];
      loss[c] += lambda * dot * dot / residual2;
    }
  }
  for (int32_t t : taken) loss[t] = std::numeric_limits<double>::infinity();
}

int32_t argmin(const std::vector<double>& loss) {
  return static_cast<int32_t>(std::min_element(loss.begin(), loss.end()) - loss.begin());
}

struct SpillRound {
  const Codebook& codebook;
  TensorView rows;  // on the codebook's ops' device
  const std::vector<float>& gram;
  double lambda;
  int per_row;                  // lists per row in `taken`
  std::vector<int32_t>& taken;  // [n, per_row]: primary, then spills so far
  int round;                    // this round fills column round + 1

  std::span<const int32_t> taken_of(int64_t i) const {
    return {taken.data() + i * per_row, static_cast<size_t>(round + 1)};
  }
  // Each row's best codeword and its loss.
  void best(std::vector<int32_t>& arg, std::vector<double>& value) const {
    const int64_t n = rows.rows, C = codebook.size();
    arg.resize(static_cast<size_t>(n));
    value.resize(static_cast<size_t>(n));
    std::vector<float> scores(static_cast<size_t>(std::min(n, kSpillChunk) * C));
    for (int64_t r0 = 0; r0 < n; r0 += kSpillChunk) {
      const int64_t m = std::min(kSpillChunk, n - r0);
      score_to_host(codebook.compute(), rows.row_range(r0, m), codebook.tensor(), scores.data());
#pragma omp parallel
      {
        std::vector<double> loss;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i) {
          soar_losses(scores.data() + i * C, gram, C, taken_of(r0 + i), lambda, loss);
          arg[r0 + i] = argmin(loss);
          value[r0 + i] = loss[arg[r0 + i]];
        }
      }
    }
  }
  // Row i's codewords by loss (then lower index), best first.
  std::vector<int32_t> ranked(int64_t i) const {
    const int64_t C = codebook.size();
    std::vector<float> s(static_cast<size_t>(C));
    score_to_host(codebook.compute(), rows.row_range(i, 1), codebook.tensor(), s.data());
    std::vector<double> loss;
    soar_losses(s.data(), gram, C, taken_of(i), lambda, loss);
    std::vector<int32_t> order(static_cast<size_t>(C));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return loss[a] < loss[b]; });
    return order;
  }
  // Rows in order of their best loss take their best list; a row whose best
  // list already holds `cap` spilled entries takes its next best with room.
  void place(int64_t cap, std::vector<int64_t>& fill) {
    std::vector<int32_t> arg;
    std::vector<double> value;
    best(arg, value);
    const int64_t n = rows.rows;
    std::vector<int32_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    if (cap > 0)
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return value[a] < value[b]; });
    for (int32_t i : order) {
      int32_t c = arg[i];
      if (cap > 0 && fill[c] >= cap) {
        const std::span<const int32_t> own = taken_of(i);
        for (int32_t p : ranked(i))
          if (fill[p] < cap && std::find(own.begin(), own.end(), p) == own.end()) {
            c = p;
            break;
          }
      }
      taken[static_cast<int64_t>(i) * per_row + round + 1] = c;
      ++fill[c];
    }
  }
};

void check_spill_options(const Codebook& codebook, int64_t n, size_t primaries,
                         const SpillOptions& o) {
  const int64_t C = codebook.size();
  if (static_cast<int64_t>(primaries) != n)
    fail("spill: " + std::to_string(primaries) + " primary lists for " + std::to_string(n) +
         " rows");
  if (o.spills < 0 || o.spills >= kMaxListsPerExpert || o.spills >= C)
    fail("spills must be in [0, min(" + std::to_string(kMaxListsPerExpert - 1) +
         ", C - 1 = " + std::to_string(C - 1) + ")], got " + std::to_string(o.spills));
  if (!(o.lambda >= 0.0) || !std::isfinite(o.lambda))
    fail("spill lambda must be finite and >= 0, got " + std::to_string(o.lambda));
  if (o.cap < 0) fail("spill cap must be >= 0 (0: no cap), got " + std::to_string(o.cap));
  // A row's last spill has C - spills lists to choose from, and the others'
  // spills take at most n * spills - 1 slots.
  if (o.cap > 0 && o.cap * (C - o.spills) < n * o.spills)
    fail("spill cap " + std::to_string(o.cap) + " x " + std::to_string(C - o.spills) +
         " lists cannot hold " + std::to_string(n) + " x " + std::to_string(o.spills) +
         " spilled entries");
}

// The offsets of `entries` lists in rows of `per_expert` (1 to
// kMaxListsPerExpert: SOAR's bound on a row's lists).
std::vector<int64_t> fixed_offsets(size_t entries, int per_expert) {
  if (per_expert < 1 || per_expert > kMaxListsPerExpert ||
      entries % static_cast<size_t>(per_expert) != 0)
    fail("list segments: " + std::to_string(entries) + " entries do not make rows of " +
         std::to_string(per_expert) + " lists (1 to " + std::to_string(kMaxListsPerExpert) + ")");
  const int64_t E = static_cast<int64_t>(entries) / per_expert;
  std::vector<int64_t> offsets(static_cast<size_t>(E + 1));
  for (int64_t e = 0; e <= E; ++e) offsets[e] = e * per_expert;
  return offsets;
}

}  // namespace

std::vector<int32_t> soar_spills(const Codebook& codebook, TensorView unit_rows,
                                 const std::vector<int32_t>& primary, const SpillOptions& options) {
  if (unit_rows.cols != codebook.dim())
    fail("rows to spill has " + std::to_string(unit_rows.cols) + " columns, expected " +
         std::to_string(codebook.dim()));
  const int64_t n = unit_rows.rows, C = codebook.size();
  check_spill_options(codebook, n, primary.size(), options);
  for (int64_t i = 0; i < n; ++i)
    if (primary[i] < 0 || primary[i] >= C)
      fail("spill: row " + std::to_string(i) + " has primary list " + std::to_string(primary[i]) +
           ", outside [0, " + std::to_string(C) + ")");
  const int per_row = 1 + options.spills;
  std::vector<int32_t> taken(static_cast<size_t>(n * per_row), -1);
  for (int64_t i = 0; i < n; ++i) taken[i * per_row] = primary[i];
  std::vector<float> gram(static_cast<size_t>(C * C));
  score_to_host(codebook.compute(), codebook.tensor(), codebook.tensor(), gram.data());
  const Staged rows(codebook.compute(), unit_rows);
  std::vector<int64_t> fill(static_cast<size_t>(C), 0);
  for (int round = 0; round < options.spills; ++round)
    SpillRound{codebook, rows, gram, options.lambda, per_row, taken, round}.place(options.cap,
                                                                                  fill);
  std::vector<int32_t> out(static_cast<size_t>(n * options.spills));
  for (int64_t i = 0; i < n; ++i)
    std::copy_n(taken.begin() + i * per_row + 1, options.spills, out.begin() + i * options.spills);
  return out;
}

ListSegments::ListSegments(const std::vector<int32_t>& lists_of, int per_expert, int64_t lists)
    : ListSegments(fixed_offsets(lists_of.size(), per_expert), lists_of, lists) {}

void ProbedLists::mark(std::span<const int32_t> probes, int64_t lists) {
  if (bits_.size() < static_cast<size_t>(lists / 64 + 1))
    bits_.resize(static_cast<size_t>(lists / 64 + 1));
  for (size_t i = 0; i < probes.size(); ++i) {
    const int32_t c = probes[i];
    if (c < 0 || c >= lists) {
      clear(probes.first(i));
      fail("probe " + std::to_string(i) + " names list " + std::to_string(c) + ", outside [0, " +
           std::to_string(lists) + ")");
    }
    bits_[static_cast<size_t>(c) >> 6] |= uint64_t{1} << (c & 63);
  }
}

void ProbedLists::clear(std::span<const int32_t> probes) {
  for (int32_t c : probes) bits_[static_cast<size_t>(c) >> 6] = 0;
}

void check_memberships(const std::vector<int64_t>& offsets, const std::vector<int32_t>& lists_of,
                       int64_t lists) {
  if (lists < 1) fail("list segments: need at least one list, got " + std::to_string(lists));
  if (offsets.empty() || offsets.front() != 0 ||
      offsets.back() != static_cast<int64_t>(lists_of.size()))
    fail("list segments: the offsets must run from 0 to the " + std::to_string(lists_of.size()) +
         " entries");
  std::vector<int32_t> sorted;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    if (offsets[e + 1] <= offsets[e])
      fail("list segments: expert " + std::to_string(e) + " is in no list");
    // Before any entry is read: a later offset may not fall back into range.
    if (offsets[e + 1] > offsets.back())
      fail("list segments: expert " + std::to_string(e) + "'s lists end at entry " +
           std::to_string(offsets[e + 1]) + ", past the " + std::to_string(lists_of.size()) +
           " entries");
    sorted.assign(lists_of.begin() + offsets[e], lists_of.begin() + offsets[e + 1]);
    for (int32_t c : sorted)
      if (c < 0 || c >= lists)
        fail("list segments: expert " + std::to_string(e) + " is assigned to list " +
             std::to_string(c) + ", outside [0, " + std::to_string(lists) + ")");
    std::sort(sorted.begin(), sorted.end());
    const auto twice = std::adjacent_find(sorted.begin(), sorted.end());
    if (twice != sorted.end())
      fail("list segments: expert " + std::to_string(e) + " is in list " + std::to_string(*twice) +
           " twice");
  }
}

ListSegments::ListSegments(const std::vector<int64_t>& offsets,
                           const std::vector<int32_t>& lists_of, int64_t lists) {
  check_memberships(offsets, lists_of, lists);
  // One entry per (expert, rank); its key is the sorted lists that outrank
  // it (key_offsets: entry i's key is keys[key_offsets[i] ..
  // key_offsets[i + 1])). Entries are grouped by (list, rank, key), ids
  // ascending within.
  const size_t n = lists_of.size();
  std::vector<int32_t> rank(n), expert(n);
  std::vector<int64_t> key_offsets(n + 1, 0);
  for (size_t e = 0; e + 1 < offsets.size(); ++e)
    for (int64_t i = offsets[e]; i < offsets[e + 1]; ++i) {
      rank[i] = static_cast<int32_t>(i - offsets[e]);
      expert[i] = static_cast<int32_t>(e);
      key_offsets[i + 1] = key_offsets[i] + rank[i];
    }
  std::vector<int32_t> keys(static_cast<size_t>(key_offsets[n]));
  for (size_t i = 0; i < n; ++i) {
    int32_t* k = keys.data() + key_offsets[i];
    std::copy_n(lists_of.begin() + offsets[expert[i]], rank[i], k);
    std::sort(k, k + rank[i]);
  }
  const auto key_of = [&](size_t i) {
    return std::span<const int32_t>(keys.data() + key_offsets[i], static_cast<size_t>(rank[i]));
  };
  const auto group_less = [&](size_t a, size_t b) {
    if (lists_of[a] != lists_of[b]) return lists_of[a] < lists_of[b];
    if (rank[a] != rank[b]) return rank[a] < rank[b];
    const auto ka = key_of(a), kb = key_of(b);
    return std::lexicographical_compare(ka.begin(), ka.end(), kb.begin(), kb.end());
  };
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (group_less(a, b) || group_less(b, a)) return group_less(a, b);
    return expert[a] < expert[b];
  });

  list_segments_.assign(static_cast<size_t>(lists + 1), 0);
  ids_.reserve(n);
  for (size_t j = 0; j < n; ++j) {
    const size_t i = order[j];
    if (j == 0 || group_less(order[j - 1], i)) {  // a new segment
      if (!ids_.empty()) segment_offsets_.push_back(static_cast<int64_t>(ids_.size()));
      const auto k = key_of(i);
      outranking_.insert(outranking_.end(), k.begin(), k.end());
      outranking_offsets_.push_back(static_cast<int64_t>(outranking_.size()));
      ++list_segments_[lists_of[i] + 1];
    }
    ids_.push_back(expert[i]);
  }
  if (!ids_.empty()) segment_offsets_.push_back(static_cast<int64_t>(ids_.size()));
  for (int64_t c = 0; c < lists; ++c) list_segments_[c + 1] += list_segments_[c];
}

int64_t ListSegments::max_list_size() const {
  int64_t m = 0;
  for (int64_t c = 0; c < lists(); ++c) m = std::max(m, list_size(c));
  return m;
}

}  // namespace airmoe::inline router
