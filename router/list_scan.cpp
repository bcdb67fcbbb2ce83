#include "router/list_scan.h"

#include <algorithm>
#include <numeric>

#include "core/checks.h"
#include "core/parallel_errors.h"
#include "ops/topk.h"
#include "router/scoring.h"

namespace airmoe::inline router {
namespace {

constexpr int64_t kQueriesPerTask = 64;

void probes_for_token(const float* s, int64_t C, int probes, int k, const InvertedLists& lists,
                      std::vector<int32_t>& order, std::vector<int32_t>& out) {
  out.clear();
  int64_t members = 0;
  if (static_cast<int64_t>(probes) * 8 < C) {
    std::vector<float> z(static_cast<size_t>(probes));
    out.resize(static_cast<size_t>(probes));
    TopK top(probes, z.data(), out.data());
    for (int64_t c = 0; c < C; ++c) top.push_ascending(s[c], static_cast<int32_t>(c));
    for (int32_t c : out) members += lists.list_size(c);
    if (members >= k) return;
  }
  // Many probes, or the shortlist came up short: rank every codeword.
  order.resize(static_cast<size_t>(C));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [s](int32_t a, int32_t b) { return ranks_before(s[a], a, s[b], b); });
  out.clear();
  members = 0;
  for (int64_t i = 0; i < C && (i < probes || members < k); ++i) {
    out.push_back(order[i]);
    members += lists.list_size(order[i]);
  }
}

void check_probe_args(const Codebook& codebook, const InvertedLists& lists, MatrixView tokens,
                      int k, int probes) {
  if (lists.lists() != codebook.size())
    fail("select_probes: the inverted lists have " + std::to_string(lists.lists()) +
         " lists, the codebook " + std::to_string(codebook.size()) + " codewords");
  require_cols(tokens, codebook.dim(), "tokens");
  require_in_range(k, 1, lists.experts(), "k");
  // More probes than codewords probes every list (load estimates ask for a
  // fixed m whatever C); fewer than one selects nothing and is an error.
  if (probes < 1) fail("probes m = " + std::to_string(probes) + " must be >= 1");
}

void check_scan_args(const ListBlocks& blocks, MatrixView queries, const ScanPairs& pairs, int k) {
  if (pairs.query.size() != pairs.list.size())
    fail("scan_lists: pairs hold " + std::to_string(pairs.query.size()) + " queries and " +
         std::to_string(pairs.list.size()) + " lists");
  if (k < 1) fail("scan_lists: k = " + std::to_string(k) + " must be >= 1");
  if (blocks.centers.rows() > 0) require_cols(queries, blocks.centers.cols(), "queries");
  for (size_t p = 0; p < pairs.list.size(); ++p) {
    if (pairs.list[p] < 0 || pairs.list[p] >= blocks.lists())
      fail("scan_lists: pair " + std::to_string(p) + " names list " +
           std::to_string(pairs.list[p]) + ", outside [0, " + std::to_string(blocks.lists()) + ")");
    if (pairs.query[p] < 0 || pairs.query[p] >= queries.rows)
      fail("scan_lists: pair " + std::to_string(p) + " names query " +
           std::to_string(pairs.query[p]) + ", outside [0, " + std::to_string(queries.rows) + ")");
  }
}

}  // namespace

ProbeSelection select_probes(const Codebook& codebook, const InvertedLists& lists,
                             MatrixView tokens, int k, int probes) {
  check_probe_args(codebook, lists, tokens, k, probes);
  const int64_t T = tokens.rows, C = codebook.size(), d = codebook.dim();
  ProbeSelection sel;
  sel.offsets.assign(static_cast<size_t>(T + 1), 0);
  sel.shortlist_size.assign(static_cast<size_t>(T), 0);
  std::vector<std::vector<int32_t>> chosen(static_cast<size_t>(T));
  const int64_t block = std::max<int64_t>(3, (int64_t{4} << 20) / C);
  std::vector<float> scores(static_cast<size_t>(std::min(block, T) * C));
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t n = std::min(block, T - t0);
    score_nt(tokens.row(t0), tokens.cols, codebook.codewords().data, d, n, C, d, scores.data(), C);
    ParallelErrors errors;  // allocations may throw
#pragma omp parallel
    {
      std::vector<int32_t> order;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i)
        errors.run([&] {
          probes_for_token(scores.data() + i * C, C, probes, k, lists, order, chosen[t0 + i]);
        });
    }
    errors.rethrow();
  }
  for (int64_t t = 0; t < T; ++t)
    sel.offsets[t + 1] = sel.offsets[t] + static_cast<int64_t>(chosen[t].size());
  sel.codewords.resize(static_cast<size_t>(sel.offsets[T]));
  for (int64_t t = 0; t < T; ++t) {
    std::copy(chosen[t].begin(), chosen[t].end(), sel.codewords.begin() + sel.offsets[t]);
    int64_t members = 0;
    for (int32_t c : chosen[t]) members += lists.list_size(c);
    sel.shortlist_size[t] = static_cast<int32_t>(members);
  }
  return sel;
}

void scan_lists(const ListBlocks& blocks, MatrixView queries, const ScanPairs& pairs, int k,
                std::vector<float>& out_logits, std::vector<int32_t>& out_ids,
                std::vector<LogSumExp>* out_lse) {
  check_scan_args(blocks, queries, pairs, k);
  const int64_t P = static_cast<int64_t>(pairs.list.size()), C = blocks.lists();
  const int64_t d = queries.cols;
  out_logits.resize(static_cast<size_t>(P * k));
  out_ids.resize(static_cast<size_t>(P * k));
  if (out_lse) out_lse->assign(static_cast<size_t>(P), LogSumExp{});
  for (int64_t p = 0; p < P; ++p)  // pairs on empty blocks keep empty slots
    TopK(k, out_logits.data() + p * k, out_ids.data() + p * k);

  // Group pairs by list with a counting sort in pair order: no atomics, the
  // same grouping whatever the thread count.
  std::vector<int64_t> group_offsets(static_cast<size_t>(C + 1), 0);
  for (int32_t c : pairs.list) ++group_offsets[c + 1];
  for (int64_t c = 0; c < C; ++c) group_offsets[c + 1] += group_offsets[c];
  std::vector<int64_t> group(static_cast<size_t>(P));
  {
    std::vector<int64_t> next(group_offsets.begin(), group_offsets.end() - 1);
    for (int64_t p = 0; p < P; ++p) group[next[pairs.list[p]]++] = p;
  }
  struct Task {
    int32_t list;
    int64_t begin, end;  // into group
  };
  std::vector<Task> tasks;
  for (int64_t c = 0; c < C; ++c) {
    if (blocks.size(c) == 0) continue;
    for (int64_t b = group_offsets[c]; b < group_offsets[c + 1]; b += kQueriesPerTask)
      tasks.push_back(
          {static_cast<int32_t>(c), b, std::min(b + kQueriesPerTask, group_offsets[c + 1])});
  }

  ParallelErrors errors;  // buffer allocations may throw
#pragma omp parallel
  {
    std::vector<float> xbuf, zbuf;
    const bool ready = errors.run([&] { xbuf.resize(static_cast<size_t>(kQueriesPerTask * d)); });
#pragma omp for schedule(dynamic, 1)
    for (size_t ti = 0; ti < tasks.size(); ++ti) {
      if (!ready) continue;
      errors.run([&] {
        const Task& task = tasks[ti];
        const int64_t n = task.end - task.begin;
        const int64_t first = blocks.offsets[task.list], L = blocks.size(task.list);
        const int32_t* ids = blocks.ids.data() + first;
        for (int64_t i = 0; i < n; ++i)
          std::copy_n(queries.row(pairs.query[group[task.begin + i]]), d, xbuf.data() + i * d);
        zbuf.resize(static_cast<size_t>(n * L));
        score_nt(xbuf.data(), d, blocks.centers.row(first), d, n, L, d, zbuf.data(), L);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t p = group[task.begin + i];
          const float* z = zbuf.data() + i * L;
          TopK top(k, out_logits.data() + p * k, out_ids.data() + p * k);
          for (int64_t j = 0; j < L; ++j) top.push_ascending(z[j], ids[j]);
          if (out_lse)
            for (int64_t j = 0; j < L; ++j) (*out_lse)[p].add(z[j]);
        }
      });
    }
  }
  errors.rethrow();
}

}  // namespace airmoe::inline router
