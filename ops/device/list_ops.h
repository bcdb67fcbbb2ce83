// AIR's two stages in the device composition: select_probes (stage 1),
// probe_pairs (the blocks each token scans) and scan_blocks (stage 2).
// Outputs whose size depends on the data are written in two passes: a count
// per token, an exclusive scan, the total brought to the host once, then
// the write pass into tensors of that size.
#pragma once

#include <thrust/fill.h>
#include <thrust/for_each.h>
#include <thrust/scan.h>
#include <thrust/sort.h>
#include <thrust/transform_reduce.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/device/exec.h"
#include "ops/device/scoring_ops.h"
#include "ops/device/topk_ops.h"
#include "ops/op_args.h"
#include "ops/ops.h"

namespace airmoe::inline ops::device {

// counts[0 .. n) -> their exclusive prefix sums in counts[0 .. n]; returns
// the total (on the host).
template <typename X>
int64_t exclusive_offsets(const X& x, int64_t* counts, int64_t n) {
  thrust::fill_n(x.policy(), counts + n, 1, int64_t{0});
  thrust::exclusive_scan(x.policy(), counts, counts + n + 1, counts);
  return value_at(x, counts + n);
}

// ---- select_probes ----------------------------------------------------------

// Sort key of (token i of a block, codeword c): token ascending, then score
// descending; a stable sort keeps equal scores in codeword order, so each
// token's row ranks its codewords as ranks_before does.
struct ProbeSortKey {
  Rows<const float> z;
  int64_t codewords;
  uint64_t* keys;
  int32_t* ranked;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t i = e / codewords, c = e % codewords;
    keys[e] = (static_cast<uint64_t>(i) << 32) | descending_key(z(i, c));
    ranked[e] = static_cast<int32_t>(c);
  }
};

// How many codewords token i probes: its best `probes`, then more in rank
// order until their lists hold k experts (or every list is probed).
struct ProbeCount {
  const int32_t* ranked;  // [rows, C]
  int64_t codewords;
  int64_t probes;
  int64_t k;
  Vec<const int64_t> list_sizes;
  int64_t* counts;
  Vec<int32_t> shortlist_size;
  int64_t row0;
  AIRMOE_HD void operator()(int64_t i) const {
    const int32_t* order = ranked + i * codewords;
    int64_t n = 0, members = 0;
    while (n < codewords && (n < probes || members < k)) members += list_sizes[order[n++]];
    counts[i] = n;
    shortlist_size[row0 + i] = static_cast<int32_t>(members);
  }
};

struct ProbeWrite {
  const int32_t* ranked;
  int64_t codewords;
  const int64_t* local_offsets;
  int32_t* out;
  AIRMOE_HD void operator()(int64_t i) const {
    const int64_t n = local_offsets[i + 1] - local_offsets[i];
    for (int64_t q = 0; q < n; ++q) out[local_offsets[i] + q] = ranked[i * codewords + q];
  }
};

struct ShiftOffsets {
  const int64_t* local;
  int64_t base;
  int64_t* out;
  AIRMOE_HD void operator()(int64_t i) const { out[i] = base + local[i]; }
};

// One block of tokens' probes: their offsets (shifted by `base`) into
// ps.offsets and their codewords into a piece of their own.
template <typename X>
struct ProbeBlocks {
  const X& x;
  TensorView codewords;
  Vec<const int64_t> list_sizes;
  int64_t probes, k;
  ProbeSet& ps;
  Scratch<float, X> z;
  Scratch<uint64_t, X> keys;
  Scratch<int32_t, X> ranked;
  Scratch<int64_t, X> local;

  Scratch<int32_t, X> select(TensorView tokens, int64_t t0, int64_t base) {
    const int64_t n = tokens.rows, C = codewords.rows;
    score_into(x, tokens, codewords, Rows<float>{z.get(), C});
    thrust::for_each(x.policy(), count_from(0), count_from(n * C),
                     ProbeSortKey{{z.get(), C}, C, keys.get(), ranked.get()});
    thrust::stable_sort_by_key(x.policy(), keys.get(), keys.get() + n * C, ranked.get());
    thrust::for_each(x.policy(), count_from(0), count_from(n),
                     ProbeCount{ranked.get(), C, probes, k, list_sizes, local.get(),
                                vec_of<int32_t>(ps.shortlist_size.view()), t0});
    const int64_t total = exclusive_offsets(x, local.get(), n);
    thrust::for_each(x.policy(), count_from(0), count_from(n),
                     ShiftOffsets{local.get(), base, ps.offsets.as<int64_t>() + t0});
    Scratch<int32_t, X> piece(x, total);
    thrust::for_each(x.policy(), count_from(0), count_from(n),
                     ProbeWrite{ranked.get(), C, local.get(), piece.get()});
    return piece;
  }
};

template <typename X>
ProbeSet select_probes(const X& x, const OpArgs& args, TensorView tokens, TensorView codewords,
                       TensorView list_sizes, int probes, int k) {
  check_codebook_args(args, tokens, codewords);
  const int64_t T = tokens.rows, C = codewords.rows;
  args.vector(list_sizes, "list_sizes", DType::kI64, C);
  args.at_least(probes, 1, "probes");
  args.at_least(k, 1, "k");
  ProbeSet ps;
  ps.offsets = Tensor(x.allocator(), DType::kI64, T + 1, 1);
  ps.shortlist_size = Tensor(x.allocator(), DType::kI32, T, 1);
  const int64_t block = std::max<int64_t>(1, kScoreBudget / C), rows = std::min(block, T);
  ProbeBlocks<X> blocks{x,
                        codewords,
                        vec_of<const int64_t>(list_sizes),
                        probes,
                        k,
                        ps,
                        Scratch<float, X>(x, rows * C),
                        Scratch<uint64_t, X>(x, rows * C),
                        Scratch<int32_t, X>(x, rows * C),
                        Scratch<int64_t, X>(x, rows + 1)};
  std::vector<Scratch<int32_t, X>> pieces;
  int64_t count = 0;
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    pieces.push_back(blocks.select(tokens.row_range(t0, std::min(block, T - t0)), t0, count));
    count += pieces.back().size();
  }
  from_host(x, ps.offsets.as<int64_t>() + T, std::vector<int64_t>{count});
  ps.count = count;
  ps.codewords = Tensor(x.allocator(), DType::kI32, count, 1);
  int64_t at = 0;
  for (const auto& piece : pieces) {
    if (piece.size() > 0)
      x.copy_bytes(ps.codewords.as<int32_t>() + at, 0, piece.get(), 0,
                   static_cast<size_t>(piece.size()) * sizeof(int32_t), 1);
    at += piece.size();
  }
  return ps;
}

// ---- probe_pairs ------------------------------------------------------------

// Each token's probes as sort keys (token << 32 | codeword), so that a
// sorted copy answers "does token t probe list c" by binary search.
struct ProbeKeys {
  const int64_t* offsets;
  const int32_t* codewords;
  uint64_t* keys;
  AIRMOE_HD void operator()(int64_t t) const {
    for (int64_t q = offsets[t]; q < offsets[t + 1]; ++q)
      keys[q] = (static_cast<uint64_t>(t) << 32) | static_cast<uint32_t>(codewords[q]);
  }
};

// The blocks token t scans, in probe order: every block of each probed
// list, but a segment of a spilled list only if the token probes none of
// the lists that outrank it (router/spilled_lists.h); with `whole_lists`
// (ScanUnit::kLists), each probed list's blocks in one run.
struct ScannedBlocks {
  const int64_t* probe_offsets;
  const int32_t* probed_codewords;
  Vec<const int64_t> list_blocks;
  Vec<const int64_t> block_offsets;
  Vec<const int64_t> outranking_offsets;
  Vec<const int32_t> outranking;
  const uint64_t* sorted_probes;  // null: no block is outranked
  bool whole_lists;

  AIRMOE_HD bool probed(int64_t t, int32_t c) const {
    const uint64_t key = (static_cast<uint64_t>(t) << 32) | static_cast<uint32_t>(c);
    int64_t lo = probe_offsets[t], hi = probe_offsets[t + 1];
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (sorted_probes[mid] < key)
        lo = mid + 1;
      else
        hi = mid;
    }
    return lo < probe_offsets[t + 1] && sorted_probes[lo] == key;
  }
  AIRMOE_HD bool outranked(int64_t t, int64_t s) const {
    if (!sorted_probes) return false;
    for (int64_t a = outranking_offsets[s]; a < outranking_offsets[s + 1]; ++a)
      if (probed(t, outranking[a])) return true;
    return false;
  }
  // v(first, end, rows) for each run (blocks first .. end - 1) with the
  // `rows` experts of it that no other probed list outranks.
  template <typename Visit>
  AIRMOE_HD void visit(int64_t t, Visit& v) const {
    for (int64_t q = probe_offsets[t]; q < probe_offsets[t + 1]; ++q) {
      const int32_t c = probed_codewords[q];
      int64_t first = -1;   // the open run's first block
      int64_t members = 0;  // with whole_lists, the list's
      for (int64_t s = list_blocks[c]; s <= list_blocks[c + 1]; ++s) {
        const bool scanned = s < list_blocks[c + 1] && !outranked(t, s);
        if (scanned && first < 0) first = s;
        if (!scanned && first >= 0) {
          const int64_t rows = block_offsets[s] - block_offsets[first];
          if (whole_lists)
            members += rows;
          else
            v(first, s, rows);
          first = -1;
        }
      }
      if (whole_lists && list_blocks[c + 1] > list_blocks[c])
        v(list_blocks[c], list_blocks[c + 1], members);
    }
  }
};

struct PairCount {
  ScannedBlocks blocks;
  int64_t* counts;
  int32_t* shortlist_size;
  AIRMOE_HD void operator()(int64_t t) const {
    int64_t n = 0, members = 0;
    auto count = [&](int64_t, int64_t, int64_t rows) {
      ++n;
      members += rows;
    };
    blocks.visit(t, count);
    counts[t] = n;
    shortlist_size[t] = static_cast<int32_t>(members);
  }
};

struct PairWrite {
  ScannedBlocks blocks;
  const int64_t* offsets;
  int32_t* query;
  int32_t* block;
  int32_t* block_end;
  AIRMOE_HD void operator()(int64_t t) const {
    int64_t at = offsets[t];
    auto write = [&](int64_t first, int64_t end, int64_t) {
      query[at] = static_cast<int32_t>(t);
      block[at] = static_cast<int32_t>(first);
      block_end[at++] = static_cast<int32_t>(end);
    };
    blocks.visit(t, write);
  }
};

// Entry i of offsets [n + 1] breaks the ranges: entry 0 is not 0, or an
// entry is below the one before.
struct BadOffset {
  Vec<const int64_t> offsets;
  AIRMOE_HD bool operator()(int64_t i) const {
    return i == 0 ? offsets[0] != 0 : offsets[i] < offsets[i - 1];
  }
};

template <typename X>
void check_offsets(const X& x, const OpArgs& args, const TensorView& v, int64_t n, const char* name,
                   const char* what) {
  const Vec<const int64_t> offsets = vec_of<const int64_t>(v);
  const int64_t bad = first_where(x, n + 1, BadOffset{offsets});
  args.offsets(name, bad, bad < 0 ? 0 : value_at(x, &offsets[bad]), what);
}

// The lists' structure: S blocks over C lists, after the checks every
// backend makes (the row count is read from the device).
struct ListShape {
  int64_t blocks, lists;
};

template <typename X>
ListShape check_lists(const X& x, const OpArgs& args, const ListBlocksView& lists) {
  args.vector(lists.block_offsets, "lists.block_offsets", DType::kI64);
  args.vector(lists.list_blocks, "lists.list_blocks", DType::kI64);
  const ListShape shape{vector_size(lists.block_offsets) - 1, vector_size(lists.list_blocks) - 1};
  if (shape.blocks < 0 || shape.lists < 0)
    args.fail("lists.block_offsets and lists.list_blocks need a row");
  args.vector(lists.outranking_offsets, "lists.outranking_offsets", DType::kI64, shape.blocks + 1);
  check_offsets(x, args, lists.block_offsets, shape.blocks, "lists.block_offsets", "rows");
  check_offsets(x, args, lists.list_blocks, shape.lists, "lists.list_blocks", "blocks");
  args.list_blocks_end(value_at(x, &vec_of<const int64_t>(lists.list_blocks)[shape.lists]),
                       shape.blocks);
  check_offsets(x, args, lists.outranking_offsets, shape.blocks, "lists.outranking_offsets",
                "outranking lists");
  const int64_t outranked =
      value_at(x, &vec_of<const int64_t>(lists.outranking_offsets)[shape.blocks]);
  if (outranked > 0) {
    args.vector(lists.outranking, "lists.outranking", DType::kI32, outranked);
    check_indices(x, args, "lists.outranking entry", "list", lists.outranking, shape.lists);
  }
  const int64_t rows = value_at(x, &vec_of<const int64_t>(lists.block_offsets)[shape.blocks]);
  if (rows > 0) {
    args.vector(lists.ids, "lists.ids", DType::kI32, rows);
    args.float_dtype(lists.keys, "lists.keys");
    args.shape(lists.keys, "lists.keys", rows, lists.keys.cols);
  }
  return shape;
}

template <typename X>
PairSet probe_pairs(const X& x, const OpArgs& args, const ListBlocksView& lists,
                    const ProbeSet& probes, ScanUnit unit) {
  const ListShape shape = check_lists(x, args, lists);
  const int64_t T = probes.offsets.rows() - 1;
  if (T < 0) args.fail("probes.offsets needs T + 1 rows");
  args.vector(probes.offsets.view(), "probes.offsets", DType::kI64);
  args.vector(probes.codewords.view(), "probes.codewords", DType::kI32, probes.count);
  check_indices(x, args, "probe", "list", probes.codewords.view(), shape.lists);
  const bool spilled = !lists.outranking.empty() && probes.count > 0;
  Scratch<uint64_t, X> sorted(x, spilled ? probes.count : 0);
  const int64_t* probe_offsets = probes.offsets.as<int64_t>();
  if (spilled) {
    thrust::for_each(x.policy(), count_from(0), count_from(T),
                     ProbeKeys{probe_offsets, probes.codewords.as<int32_t>(), sorted.get()});
    thrust::sort(x.policy(), sorted.get(), sorted.get() + probes.count);
  }
  const ScannedBlocks scanned{
      probe_offsets,
      probes.codewords.as<int32_t>(),
      vec_of<const int64_t>(lists.list_blocks),
      vec_of<const int64_t>(lists.block_offsets),
      spilled ? vec_of<const int64_t>(lists.outranking_offsets) : Vec<const int64_t>{},
      spilled ? vec_of<const int32_t>(lists.outranking) : Vec<const int32_t>{},
      spilled ? sorted.get() : nullptr,
      unit == ScanUnit::kLists};
  PairSet out;
  out.offsets = Tensor(x.allocator(), DType::kI64, T + 1, 1);
  out.shortlist_size = Tensor(x.allocator(), DType::kI32, T, 1);
  int64_t* offsets = out.offsets.as<int64_t>();
  thrust::for_each(x.policy(), count_from(0), count_from(T),
                   PairCount{scanned, offsets, out.shortlist_size.as<int32_t>()});
  out.count = exclusive_offsets(x, offsets, T);
  out.query = Tensor(x.allocator(), DType::kI32, out.count, 1);
  out.block = Tensor(x.allocator(), DType::kI32, out.count, 1);
  out.block_end = Tensor(x.allocator(), DType::kI32, out.count, 1);
  thrust::for_each(x.policy(), count_from(0), count_from(T),
                   PairWrite{scanned, offsets, out.query.as<int32_t>(), out.block.as<int32_t>(),
                             out.block_end.as<int32_t>()});
  return out;
}

// ---- scan_blocks ------------------------------------------------------------

// Pair p's rows: its blocks block[p] .. block_end[p] - 1 are consecutive, so
// their rows are too.
struct PairRows {
  Vec<const int32_t> block, block_end;
  Vec<const int64_t> block_offsets;
  AIRMOE_HD int64_t first(int64_t p) const { return block_offsets[block[p]]; }
  AIRMOE_HD int64_t size(int64_t p) const { return block_offsets[block_end[p]] - first(p); }
  AIRMOE_HD int64_t operator()(int64_t p) const { return size(p); }
};

// The last i in [0, n) with offsets[i] <= x, for ascending offsets with
// offsets[0] <= x < offsets[n] (a range's index from one of its entries).
template <typename Offsets>
AIRMOE_HD int64_t last_at_most(const Offsets& offsets, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n;  // offsets[lo] <= x < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= x)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// Pair p is refused when its blocks are not a run of one list: block_end
// outside (block, S], or the last block in another list than the first.
struct BadRun {
  Vec<const int32_t> block, block_end;
  Vec<const int64_t> list_blocks;
  int64_t blocks, lists;
  AIRMOE_HD bool operator()(int64_t p) const {
    if (block_end[p] <= block[p] || block_end[p] > blocks) return true;
    // The lists whose blocks hold the first and the last block.
    return last_at_most(list_blocks, lists, block[p]) !=
           last_at_most(list_blocks, lists, block_end[p] - 1);
  }
};

// Pairs q0 .. q0 + nq of the grouped order: where each one's logits start in
// the chunk's logit buffer (its rows, before the scan).
struct PairLength {
  const int64_t* items;
  int64_t q0;
  PairRows rows;
  int64_t* zoff;
  AIRMOE_HD void operator()(int64_t q) const { zoff[q] = rows.size(items[q0 + q]); }
};

// The pair whose logits hold entry e: the last q with zoff[q] <= e.
AIRMOE_HD inline int64_t pair_of_entry(const int64_t* zoff, int64_t nq, int64_t e) {
  return last_at_most(zoff, nq, e);
}

// One logit of a chunk: (pair, member) -> lane_dot(query, member's key).
template <typename Q, typename K>
struct MemberScore {
  Rows<const Q> queries;
  Rows<const K> keys;
  Vec<const int32_t> query;
  PairRows rows;
  const int64_t* items;
  int64_t q0;
  const int64_t* zoff;
  int64_t nq;
  float* z;
  int64_t depth;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t q = pair_of_entry(zoff, nq, e);
    const int64_t p = items[q0 + q];
    const int64_t row = rows.first(p) + (e - zoff[q]);
    z[e] = lane_dot(queries.row(query[p]), keys.row(row), depth);
  }
};

// A pair's top-k over its rows' logits (ids ascend within a block, not
// across a run's blocks) and their log-sum-exp, into the pair's own row.
struct SelectPair {
  const float* z;
  const int64_t* zoff;
  const int64_t* items;
  int64_t q0;
  PairRows rows;
  Vec<const int32_t> ids;
  TopKRows out;
  int k;
  AIRMOE_HD void operator()(int64_t q) const {
    const int64_t p = items[q0 + q];
    const int64_t first = rows.first(p);
    TopK top = out.top(p, k);
    LogSumExp lse;
    for (int64_t j = 0; j < zoff[q + 1] - zoff[q]; ++j) {
      const float zj = z[zoff[q] + j];
      top.push(zj, ids[first + j]);
      if (out.lse.data) lse.add(zj);
    }
    if (out.lse.data) out.put_lse(p, lse);
  }
};

// Pairs are taken in order of first block (a stable sort, so the grouping
// never depends on timing) and in chunks whose logits fit kScoreBudget:
// every (pair, member) logit of a chunk in parallel, then one thread per
// pair selects.
template <typename X>
void scan_blocks(const X& x, const OpArgs& args, const ListBlocksView& lists, TensorView queries,
                 TensorView query, TensorView block, TensorView block_end, int k, TopKView out) {
  const ListShape shape = check_lists(x, args, lists);
  const int64_t S = shape.blocks;
  args.float_dtype(queries, "queries");
  args.at_least(k, 1, "k");
  args.vector(query, "query", DType::kI32);
  const int64_t P = vector_size(query);
  args.vector(block, "block", DType::kI32, P);
  args.vector(block_end, "block_end", DType::kI32, P);
  const int64_t bias = check_topk_view(args, out, "out", P, k, true);
  if (P == 0) return;
  if (bias >= 0 && lists.keys.rows > 0)  // check_lists: then ids has keys.rows entries
    check_indices(x, args, "lists.ids entry", "bias entry", lists.ids, bias);
  check_indices(x, args, "pair", "block", block, S);
  const Vec<const int32_t> blk = vec_of<const int32_t>(block),
                           blk_end = vec_of<const int32_t>(block_end);
  const int64_t bad = first_where(
      x, P, BadRun{blk, blk_end, vec_of<const int64_t>(lists.list_blocks), S, shape.lists});
  if (bad >= 0) args.bad_run(bad, value_at(x, &blk[bad]), value_at(x, &blk_end[bad]), S);
  check_indices(x, args, "pair", "query", query, queries.rows);
  if (lists.keys.rows > 0 && queries.cols != lists.keys.cols)
    args.fail("queries have " + std::to_string(queries.cols) + " columns and lists.keys " +
              std::to_string(lists.keys.cols));
  const PairRows rows{blk, blk_end, vec_of<const int64_t>(lists.block_offsets)};
  const Grouping<X> g = group_by(x, P, S, ReadKey{blk});
  const int64_t widest =
      thrust::transform_reduce(x.policy(), count_from(0), count_from(P), rows, int64_t{0}, Max64{});
  const int64_t per_chunk = std::max<int64_t>(1, kScoreBudget / std::max<int64_t>(widest, 1));
  const int64_t chunk = std::min(per_chunk, P);
  Scratch<float, X> z(x, chunk * widest);
  Scratch<int64_t, X> zoff(x, chunk + 1);
  for (int64_t q0 = 0; q0 < P; q0 += chunk) {
    const int64_t nq = std::min(chunk, P - q0);
    thrust::for_each(x.policy(), count_from(0), count_from(nq),
                     PairLength{g.items.get(), q0, rows, zoff.get()});
    const int64_t entries = exclusive_offsets(x, zoff.get(), nq);
    with_float_types(queries, lists.keys, [&](auto tq, auto tk) {
      using Q = decltype(tq);
      using K = decltype(tk);
      thrust::for_each(x.policy(), count_from(0), count_from(entries),
                       MemberScore<Q, K>{rows_of<const Q>(queries), rows_of<const K>(lists.keys),
                                         vec_of<const int32_t>(query), rows, g.items.get(), q0,
                                         zoff.get(), nq, z.get(), queries.cols});
    });
    thrust::for_each(x.policy(), count_from(0), count_from(nq),
                     SelectPair{z.get(), zoff.get(), g.items.get(), q0, rows,
                                vec_of<const int32_t>(lists.ids), topk_rows(out), k});
  }
}

// ---- scan_topk --------------------------------------------------------------

// scan_blocks into one candidate row per pair, then merge_topk's selection
// (a thread per pair and a thread per token already: a shared threshold
// would serialize a token's pairs). The offsets and `out` are checked here,
// once, before the scan.
template <typename X>
void scan_topk(const X& x, const OpArgs& args, const ListBlocksView& lists, TensorView queries,
               const PairSet& pairs, int k, TopKView out) {
  args.at_least(k, 1, "k");
  args.vector(pairs.query.view(), "query", DType::kI32);
  const int64_t P = vector_size(pairs.query.view());
  args.vector(pairs.offsets.view(), "pairs.offsets", DType::kI64);
  const int64_t T = vector_size(pairs.offsets.view()) - 1;
  if (T < 0) args.fail("pairs.offsets needs T + 1 entries");
  const int64_t bad = first_where(x, T, BadRange{vec_of<const int64_t>(pairs.offsets.view()), P});
  if (bad >= 0)
    args.fail("pairs.offsets[" + std::to_string(bad) + " .. " + std::to_string(bad + 1) +
              "] is not a range of the " + std::to_string(P) + " pairs");
  check_topk_view(args, out, "out", T, k, true);
  const bool lse = !out.lse.empty();
  const Tensor z(x.allocator(), DType::kF32, P, k);
  const Tensor id(x.allocator(), DType::kI32, P, k);
  const Tensor pair_lse = lse ? Tensor(x.allocator(), DType::kF64, P, 2) : Tensor();
  scan_blocks(x, args, lists, queries, pairs.query, pairs.block, pairs.block_end, k,
              {z, id, pair_lse, out.bias});
  merge_checked_topk(x, {z, id, pair_lse, {}}, pairs.offsets, T, k, out);
}

}  // namespace airmoe::inline ops::device
