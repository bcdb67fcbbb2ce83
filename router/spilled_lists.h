// Spilled inverted lists: each expert sits in its primary list and in
// `spills` more, chosen as ScaNN's SOAR does (Sun et al., NeurIPS 2023): a
// spill goes to the codeword whose residual is least aligned with the
// residuals of the expert's earlier assignments, so that a token the primary
// list scores badly for (its direction correlates with the primary residual)
// is likely to find the expert through the spill list.
//
// Probing two lists that share an expert must not score it twice. So each
// list is cut into segments by the lists that outrank it for the segment's
// members (an expert's primary list outranks its first spill, which outranks
// its second): a token scans a segment only if it probes none of the lists
// that outrank it. The segments are stage 2's blocks, so every probed expert
// enters the token's top-k and shortlist exactly once. (The host backend
// scores a list's segments in one GEMM over the rows they span: the logits
// of segments a token skips inside that span are computed and dropped.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "core/matrix.h"
#include "router/codebook.h"
#include "router/list_scan.h"

namespace airmoe::inline router {

struct SpillOptions {
  int spills = 0;       // extra lists per expert (0: plain lists)
  double lambda = 1.0;  // SOAR weight of the residual alignment penalty
  // Most spilled entries a list takes (0: no cap); a spill whose best list is
  // full goes to its next best list with room.
  int64_t cap = 0;
};

// The spill lists of every row ([n, spills] row-major, each different from
// the row's primary and earlier spills): codeword c minimizes the SOAR loss
//   ||x - mu_c||^2 + lambda * sum_j <r_j, x - mu_c>^2 / ||r_j||^2
// over the row's earlier assignments j (r_j = x - mu_j), ties to lower c.
// `unit_rows` are unit norm; `primary[i]` is row i's primary codeword.
// Scored on the codebook's ops.
std::vector<int32_t> soar_spills(const Codebook& codebook, TensorView unit_rows,
                                 const std::vector<int32_t>& primary, const SpillOptions& options);

// Each expert's lists (CSR: expert e's are lists_of[offsets[e] ..
// offsets[e + 1])) are at least one, in [0, lists) and all different, or a
// UsageError names the expert (what ListSegments requires; a checkpoint's
// reader checks the same).
void check_memberships(const std::vector<int64_t>& offsets, const std::vector<int32_t>& lists_of,
                       int64_t lists);

class ListSegments;

// A token's probed lists as bits: for_each_scanned's scratch. It marks the
// probes and clears them again on the way out (an exception included), so
// one scratch serves token after token.
class ProbedLists {
 public:
  bool has(int32_t c) const { return (bits_[static_cast<size_t>(c) >> 6] >> (c & 63)) & 1; }

 private:
  friend class ListSegments;
  // Marks `probes`, each in [0, lists) or a UsageError names it.
  void mark(std::span<const int32_t> probes, int64_t lists);
  void clear(std::span<const int32_t> probes);
  std::vector<uint64_t> bits_;
};

class ListSegments {
 public:
  ListSegments() = default;
  // lists_of: [E, per_expert] row-major (per_expert 1 to 8), each expert's
  // lists in priority order (primary first), all different, in [0, lists).
  ListSegments(const std::vector<int32_t>& lists_of, int per_expert, int64_t lists);
  // Any number of lists per expert (query-aware lists, router/query_lists.h):
  // expert e's lists are lists_of[offsets[e] .. offsets[e + 1]), at least one,
  // in priority order. An expert in n lists adds n (n - 1) / 2 outranking
  // entries (each entry is outranked by the lists before it).
  ListSegments(const std::vector<int64_t>& offsets, const std::vector<int32_t>& lists_of,
               int64_t lists);

  int64_t lists() const { return static_cast<int64_t>(list_segments_.size()) - 1; }
  int64_t segments() const { return static_cast<int64_t>(segment_offsets_.size()) - 1; }
  int64_t entries() const { return static_cast<int64_t>(ids_.size()); }
  // Entries of list c: its own experts and those spilled into it.
  int64_t list_size(int64_t c) const {
    return segment_offsets_[list_segments_[c + 1]] - segment_offsets_[list_segments_[c]];
  }
  int64_t max_list_size() const;
  int64_t segment_size(int64_t s) const { return segment_offsets_[s + 1] - segment_offsets_[s]; }
  std::span<const int32_t> members(int64_t s) const {
    return {ids_.data() + segment_offsets_[s], static_cast<size_t>(segment_size(s))};
  }
  // The lists that outrank list c for segment s's members.
  std::span<const int32_t> outranked_by(int64_t s) const {
    return {outranking_.data() + outranking_offsets_[s],
            static_cast<size_t>(outranking_offsets_[s + 1] - outranking_offsets_[s])};
  }

  // visit(s) for every segment a token probing `probes` scans, in probe
  // order: each expert of the probed lists lies in exactly one of them.
  template <typename Visit>
  void for_each_scanned(std::span<const int32_t> probes, ProbedLists& scratch, Visit visit) const;

  // The segments as stage 2's blocks on the ops' device: segment s is
  // block s; center_of(e) gives expert e's (host) row.
  template <typename CenterOf>
  ListBlocks blocks(const Compute& compute, int64_t dim, CenterOf center_of) const;
  // The same segments holding only the members keep(e) accepts (a rank's
  // share of replicated lists; a segment may become empty): the outranking
  // stays, so a token still scans each kept expert of its probes once.
  template <typename Keep, typename CenterOf>
  ListBlocks blocks(const Compute& compute, int64_t dim, Keep keep, CenterOf center_of) const;

 private:
  std::vector<int64_t> list_segments_{0};       // [C + 1]: list c's segments
  std::vector<int64_t> segment_offsets_{0};     // [S + 1] into ids_
  std::vector<int32_t> ids_;                    // members, segment after segment, ids ascending
  std::vector<int64_t> outranking_offsets_{0};  // [S + 1] into outranking_
  std::vector<int32_t> outranking_;
};

template <typename Visit>
void ListSegments::for_each_scanned(std::span<const int32_t> probes, ProbedLists& scratch,
                                    Visit visit) const {
  scratch.mark(probes, lists());
  struct Clear {
    ProbedLists& scratch;
    std::span<const int32_t> probes;
    ~Clear() { scratch.clear(probes); }
  } clear{scratch, probes};
  for (int32_t c : probes)
    for (int64_t s = list_segments_[c]; s < list_segments_[c + 1]; ++s) {
      const auto above = outranked_by(s);
      if (std::none_of(above.begin(), above.end(), [&](int32_t a) { return scratch.has(a); }))
        visit(s);
    }
}

template <typename CenterOf>
ListBlocks ListSegments::blocks(const Compute& compute, int64_t dim, CenterOf center_of) const {
  return ListBlocks::make(compute, segment_offsets_, ids_, dim, center_of, list_segments_,
                          outranking_offsets_, outranking_);
}

template <typename Keep, typename CenterOf>
ListBlocks ListSegments::blocks(const Compute& compute, int64_t dim, Keep keep,
                                CenterOf center_of) const {
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> ids;
  for (int64_t s = 0; s < segments(); ++s) {
    for (int32_t e : members(s))
      if (keep(e)) ids.push_back(e);
    offsets.push_back(static_cast<int64_t>(ids.size()));
  }
  return ListBlocks::make(compute, offsets, ids, dim, center_of, list_segments_,
                          outranking_offsets_, outranking_);
}

}  // namespace airmoe::inline router
