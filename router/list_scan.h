// The two stages of AIR routing as pieces of their own, so that they can run
// in different places: a token's home rank selects its probes against the
// replicated codebook, and the ranks that host the probed lists scan them
// (FAISS's quantizer / inverted lists / scanner split, and its
// search_preassigned, serve the same purpose). The stages themselves are
// ops (ops/ops.h select_probes, probe_pairs, scan_blocks, merge_topk); this
// header holds their host forms and the lists' layout on the ops' device.
#pragma once

#include <cstdint>
#include <vector>

#include "core/matrix.h"
#include "ops/boundary.h"
#include "router/codebook.h"
#include "router/inverted_lists.h"
#include "router/routes.h"

namespace airmoe::inline router {

// Stage 1: the codewords each token probes, CSR over tokens: the best
// `probes` by score (then lower index), extended in score order until their
// lists hold at least k experts. Requires tokens [T, codebook.dim()],
// 1 <= k <= experts and probes >= 1 (probes > C probes every list); throws
// UsageError otherwise. Runs on the codebook's ops.
struct ProbeSelection {
  std::vector<int64_t> offsets;         // [T + 1]
  std::vector<int32_t> codewords;       // probes, token after token
  std::vector<int32_t> shortlist_size;  // [T], experts in the probed lists
};
ProbeSelection select_probes(const Codebook& codebook, const InvertedLists& lists,
                             MatrixView tokens, int k, int probes);

// Each list's size, as select_probes reads them (i64 [C] on the ops' device).
Tensor list_sizes(const Compute& compute, const InvertedLists& lists);

// The lists as stage 2 scans them (ListBlocksView), built on the host and
// held on the ops' device: blocks of key rows, ids ascending within a block;
// plain lists are one block each, spilled lists one per segment
// (router/spilled_lists.h).
struct ListBlocks {
  Tensor block_offsets;       // i64 [S + 1]
  Tensor ids;                 // i32 [rows]
  Tensor keys;                // f32 [rows, d]
  Tensor list_blocks;         // i64 [C + 1]
  Tensor outranking_offsets;  // i64 [S + 1]
  Tensor outranking;          // i32

  ListBlocksView view() const {
    return {block_offsets, ids, keys, list_blocks, outranking_offsets, outranking};
  }
  int64_t blocks() const { return block_offsets.rows() - 1; }

  // The blocks of `offsets` (host, [S + 1]) over `ids`, each id's key row
  // written by center_of(e) (a host row); list c is blocks
  // list_blocks[c] .. list_blocks[c + 1].
  template <typename CenterOf>
  static ListBlocks make(const Compute& compute, const std::vector<int64_t>& offsets,
                         const std::vector<int32_t>& ids, int64_t dim, CenterOf center_of,
                         const std::vector<int64_t>& list_blocks,
                         const std::vector<int64_t>& outranking_offsets,
                         const std::vector<int32_t>& outranking);
  // Every list's members that `keep(expert)` accepts, one block per list.
  template <typename Keep, typename CenterOf>
  static ListBlocks build(const Compute& compute, const InvertedLists& lists, int64_t dim,
                          Keep keep, CenterOf center_of);
};

template <typename CenterOf>
ListBlocks ListBlocks::make(const Compute& compute, const std::vector<int64_t>& offsets,
                            const std::vector<int32_t>& ids, int64_t dim, CenterOf center_of,
                            const std::vector<int64_t>& list_blocks,
                            const std::vector<int64_t>& outranking_offsets,
                            const std::vector<int32_t>& outranking) {
  Tensor keys(host_allocator(), DType::kF32, static_cast<int64_t>(ids.size()), dim);
  for (size_t i = 0; i < ids.size(); ++i) {
    const float* src = center_of(ids[i]);
    std::copy(src, src + dim, keys.as<float>() + static_cast<int64_t>(i) * dim);
  }
  ListBlocks b;
  b.block_offsets = device_vector(compute, offsets);
  b.ids = device_vector(compute, ids);
  b.keys = to_device(compute, std::move(keys));  // the gathered rows themselves on the host
  b.list_blocks = device_vector(compute, list_blocks);
  b.outranking_offsets = device_vector(compute, outranking_offsets);
  b.outranking = device_vector(compute, outranking);
  return b;
}

template <typename Keep, typename CenterOf>
ListBlocks ListBlocks::build(const Compute& compute, const InvertedLists& lists, int64_t dim,
                             Keep keep, CenterOf center_of) {
  std::vector<int64_t> offsets(static_cast<size_t>(lists.lists() + 1), 0), list_blocks(offsets);
  std::vector<int32_t> ids;
  for (int64_t c = 0; c < lists.lists(); ++c) {
    for (int32_t e : lists.list(c))
      if (keep(e)) ids.push_back(e);
    offsets[c + 1] = static_cast<int64_t>(ids.size());
    list_blocks[c + 1] = c + 1;
  }
  const std::vector<int64_t> no_outranking(offsets.size(), 0);
  return make(compute, offsets, ids, dim, center_of, list_blocks, no_outranking, {});
}

}  // namespace airmoe::inline router
