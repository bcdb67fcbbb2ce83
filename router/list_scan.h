// The two stages of AIR routing as pieces of their own, so that they can run
// in different places: a token's home rank selects its probes against the
// replicated codebook, and the ranks that host the probed lists scan them
// (FAISS's quantizer / inverted lists / scanner split, and its
// search_preassigned, serve the same purpose).
#pragma once

#include <cstdint>
#include <vector>

#include "core/matrix.h"
#include "router/codebook.h"
#include "router/inverted_lists.h"
#include "router/routes.h"

namespace airmoe::inline router {

// Stage 1: the codewords each token probes, CSR over tokens: the best
// `probes` by score (then lower index), extended in score order until their
// lists hold at least k experts. Requires tokens [T, codebook.dim()],
// 1 <= k <= experts and probes >= 1 (probes > C probes every list); throws
// UsageError otherwise.
struct ProbeSelection {
  std::vector<int64_t> offsets;         // [T + 1]
  std::vector<int32_t> codewords;       // probes, token after token
  std::vector<int32_t> shortlist_size;  // [T], experts in the probed lists
};
ProbeSelection select_probes(const Codebook& codebook, const InvertedLists& lists,
                             MatrixView tokens, int k, int probes);

// Centers stored list after list, so each list (or a rank's share of it) is
// one contiguous block for the block GEMM. Within a list, ids ascend.
struct ListBlocks {
  std::vector<int64_t> offsets;  // [C + 1]
  std::vector<int32_t> ids;      // expert id of each row
  Matrix centers;                // [rows, d]

  int64_t lists() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t size(int64_t c) const { return offsets[c + 1] - offsets[c]; }
  // Every list's members that `keep(expert)` accepts; center_of(e) gives
  // expert e's row.
  template <typename Keep, typename CenterOf>
  static ListBlocks build(const InvertedLists& lists, int64_t dim, Keep keep, CenterOf center_of);
};

// Stage 2: for each (query, list) pair, the top-k of the query against the
// list's block, written to that pair's own k slots (logit, id), best first,
// empty slots id -1; with lse, also the log-sum-exp over the whole block.
// Pairs are grouped by list and scored in blocks of up to 64 queries: one
// GEMM per block instead of one scan per query.
struct ScanPairs {
  std::vector<int32_t> query;  // row of `queries`
  std::vector<int32_t> list;   // list id
};
void scan_lists(const ListBlocks& blocks, MatrixView queries, const ScanPairs& pairs, int k,
                std::vector<float>& out_logits, std::vector<int32_t>& out_ids,
                std::vector<LogSumExp>* out_lse);

template <typename Keep, typename CenterOf>
ListBlocks ListBlocks::build(const InvertedLists& lists, int64_t dim, Keep keep,
                             CenterOf center_of) {
  ListBlocks b;
  b.offsets.assign(static_cast<size_t>(lists.lists() + 1), 0);
  for (int64_t c = 0; c < lists.lists(); ++c) {
    for (int32_t e : lists.list(c))
      if (keep(e)) b.ids.push_back(e);
    b.offsets[c + 1] = static_cast<int64_t>(b.ids.size());
  }
  b.centers = Matrix(static_cast<int64_t>(b.ids.size()), dim);
  for (size_t i = 0; i < b.ids.size(); ++i) {
    const float* src = center_of(b.ids[i]);
    std::copy(src, src + dim, b.centers.row(static_cast<int64_t>(i)));
  }
  return b;
}

}  // namespace airmoe::inline router
