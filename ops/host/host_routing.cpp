// The host backends' routing ops: dense and product-key top-k, AIR's two
// stages (probe selection, the grouped list scan) and the merge, the gates,
// and the router backward.
#include <omp.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <span>

#include "core/parallel_errors.h"
#include "ops/gate_function.h"
#include "ops/host/grouping.h"
#include "ops/host/host_ops.h"
#include "ops/host/host_views.h"
#include "ops/log_sum_exp.h"
#include "ops/topk.h"

namespace airmoe::inline ops::host {
namespace {

// Logits compared at once by push_prefiltered (a batch).
constexpr int64_t kBatch = 16;

// Bit r set where z[r] > worst (with `ties`: z[r] >= worst), for r < kBatch;
// false for a NaN either side.
uint32_t reaching_worst(const float* z, float worst, bool ties) {
#if defined(__SSE2__)
  const __m128 w = _mm_set1_ps(worst);
  uint32_t bits = 0;
  for (int q = 0; q < kBatch / 4; ++q) {
    const __m128 x = _mm_loadu_ps(z + 4 * q);
    const __m128 hit = ties ? _mm_cmpge_ps(x, w) : _mm_cmpgt_ps(x, w);
    bits |= static_cast<uint32_t>(_mm_movemask_ps(hit)) << (4 * q);
  }
  return bits;
#else
  uint32_t bits = 0;
  for (int r = 0; r < kBatch; ++r)
    bits |= static_cast<uint32_t>(ties ? z[r] >= worst : z[r] > worst) << r;
  return bits;
#endif
}

// How a run of logits is pushed: ids increasing (TopK::push_ascending), in
// any order (push), or in any order with an id possibly pushed before
// (push_unique: an expert scored in two probed lists).
enum class Ids { kAscending, kAnyOrder, kRepeated };

// The pushes of kIds for z[j], id_of(j), j < n, with the same result, for a
// top-k of `k` slots ranked by z itself (no bias). Once the slots are full,
// each batch of 16 logits is compared with the worst slot at once (a
// vectorized compare into a bit mask), and only those that reach it are
// pushed: the worst slot only rises while the batch is pushed, so the push
// would have turned every other one away (a NaN included). With ids in any
// order a logit equal to the worst slot's is pushed too: a lower id
// outranks it.
template <Ids kIds, typename IdOf>
void push_prefiltered(TopK& top, int k, const float* z, int64_t n, IdOf id_of) {
  const auto push = [&](int64_t j) {
    if constexpr (kIds == Ids::kAscending)
      top.push_ascending(z[j], id_of(j));
    else if constexpr (kIds == Ids::kAnyOrder)
      top.push(z[j], id_of(j));
    else
      top.push_unique(z[j], id_of(j));
  };
  int64_t j = 0;
  for (; j < n && top.size() < k; ++j) push(j);
  for (; j + kBatch <= n; j += kBatch)
    for (uint32_t hit = reaching_worst(z + j, top.worst(), kIds != Ids::kAscending); hit != 0;
         hit &= hit - 1)
      push(j + __builtin_ctz(hit));
  for (; j < n; ++j) push(j);
}

// The [rows, k] outputs of a top-k op, its optional (max, sum) pairs and
// its optional selection bias (`experts` entries where known, else -1).
struct TopKOut {
  Rows<float> logits;
  Rows<int32_t> ids;
  Rows<double> lse;
  bool with_lse = false;
  const float* bias = nullptr;
  int64_t bias_size = -1;

  TopKOut(const OpArgs& check, const TopKView& v, int64_t rows, int k, const char* what,
          int64_t experts = -1)
      : logits(checked(check, v.logits, rows, k, DType::kF32, what)),
        ids(checked(check, v.ids, rows, k, DType::kI32, what)),
        with_lse(!v.lse.empty()) {
    if (with_lse) lse = Rows<double>(checked(check, v.lse, rows, 2, DType::kF64, what));
    bias_size = check.bias(v.bias, (std::string(what) + ".bias").c_str(), experts);
    if (bias_size >= 0) bias = static_cast<const float*>(v.bias.data);
  }
  TopK top(int64_t r, int k) const { return TopK(k, logits.row(r), ids.row(r), bias); }
  // push_prefiltered<kIds>'s pushes: with a bias entry by entry, else
  // prefiltered by batches.
  template <Ids kIds, typename IdOf>
  void push(TopK& top, int k, const float* z, int64_t n, IdOf id_of) const {
    if (bias == nullptr) return push_prefiltered<kIds>(top, k, z, n, id_of);
    for (int64_t j = 0; j < n; ++j)
      if constexpr (kIds == Ids::kAscending)
        top.push_ascending(z[j], id_of(j));
      else if constexpr (kIds == Ids::kAnyOrder)
        top.push(z[j], id_of(j));
      else
        top.push_unique(z[j], id_of(j));
  }
  // Every id id_of(0 .. n) a bias entry (id -1, an empty slot, allowed
  // where `empty_ok`).
  template <typename IdOf>
  void check_bias_ids(const OpArgs& check, IdOf id_of, int64_t n, const char* what,
                      bool empty_ok) const {
    if (!bias) return;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t id = id_of(i);
      if ((id < 0 && !(empty_ok && id == -1)) || id >= bias_size)
        check.fail(std::string(what) + " entry " + std::to_string(i) + " names bias entry " +
                   std::to_string(id) + ", outside [0, " + std::to_string(bias_size) + ")");
    }
  }
  void set_lse(int64_t r, const LogSumExp& l) const {
    lse.row(r)[0] = l.max;
    lse.row(r)[1] = l.sum;
  }
  LogSumExp get_lse(int64_t r) const { return LogSumExp{lse.row(r)[0], lse.row(r)[1]}; }

 private:
  static const TensorView& checked(const OpArgs& check, const TensorView& v, int64_t rows,
                                   int64_t cols, DType dtype, const char* what) {
    const std::string name = std::string(what) + (dtype == DType::kF32   ? ".logits"
                                                  : dtype == DType::kI32 ? ".ids"
                                                                         : ".lse");
    check.matrix(v, name.c_str(), dtype, rows, cols);
    return v;
  }
};

void check_k(const OpArgs& check, int k) {
  check.at_least(k, 1, "k");
}

void check_same_cols(const OpArgs& check, const TensorView& a, const char* an, const TensorView& b,
                     const char* bn) {
  if (a.cols != b.cols)
    check.fail(std::string(an) + " has " + std::to_string(a.cols) + " columns, " + bn + " " +
               std::to_string(b.cols));
}

// A token's probes: the best `probes` codewords by score s (then lower
// index), extended in score order until their lists hold k experts.
// `order` and `z` are scratch.
void probes_for_token(const float* s, int64_t C, int probes, int k, const Vec<const int64_t>& sizes,
                      std::vector<int32_t>& order, std::vector<float>& z,
                      std::vector<int32_t>& out) {
  out.clear();
  int64_t members = 0;
  if (static_cast<int64_t>(probes) * 8 < C) {
    z.resize(static_cast<size_t>(probes));
    out.resize(static_cast<size_t>(probes));
    TopK top(probes, z.data(), out.data());
    push_prefiltered<Ids::kAscending>(top, probes, s, C,
                                      [](int64_t c) { return static_cast<int32_t>(c); });
    for (int32_t c : out) members += sizes[c];
    if (members >= k) return;
  }
  // Many probes, or the shortlist came up short (small lists): rank the
  // codewords in order, only as far as needed. ranks_before is a total
  // order, so a sorted prefix is the full ranking's prefix; it doubles until
  // it reaches the probes and k experts (a short list rarely needs more
  // than a few extra probes, and a full sort of C was most of the op).
  const auto before = [s](int32_t a, int32_t b) { return ranks_before(s[a], a, s[b], b); };
  const auto more = [&](int64_t i) { return i < probes || members < k; };
  out.clear();
  members = 0;
  order.resize(static_cast<size_t>(C));
  for (int64_t i = 0, want = std::min(C, 2 * int64_t{probes});; want = std::min(C, 2 * want)) {
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + want, order.end(), before);
    for (; i < want && more(i); ++i) {
      out.push_back(order[i]);
      members += sizes[order[i]];
    }
    if (i < want || want == C || !more(i)) return;
  }
}

// Rows of values of varying length, filled in parallel: each row is
// appended to the buffer of the thread that writes it, then read back in
// row order. This replaced a vector per row, whose allocations cost more
// than the work on lists cut into many blocks.
template <typename T>
class RaggedRows {
 public:
  // Construct outside the parallel region that fills it.
  explicit RaggedRows(int64_t rows)
      : where_(static_cast<size_t>(rows)), buffers_(static_cast<size_t>(omp_get_max_threads())) {}
  // Row r is `values` (called once per row, by the thread that owns it).
  void set(int64_t r, const std::vector<T>& values) {
    const int thread = omp_get_thread_num();
    std::vector<T>& buffer = buffers_[static_cast<size_t>(thread)];
    where_[r] = {thread, static_cast<int64_t>(buffer.size()), static_cast<int64_t>(values.size())};
    buffer.insert(buffer.end(), values.begin(), values.end());
  }
  std::span<const T> row(int64_t r) const {
    const Where& w = where_[r];
    return {buffers_[static_cast<size_t>(w.thread)].data() + w.begin, static_cast<size_t>(w.size)};
  }
  // The rows' CSR offsets, i64 [rows + 1]; `count` gets the last.
  Tensor offsets(const Ops& ops, int64_t& count) const {
    const auto rows = static_cast<int64_t>(where_.size());
    Tensor offsets = ops.empty(DType::kI64, rows + 1, 1);
    int64_t* off = offsets.as<int64_t>();
    off[0] = 0;
    for (int64_t r = 0; r < rows; ++r) off[r + 1] = off[r] + where_[r].size;
    count = off[rows];
    return offsets;
  }

 private:
  struct Where {
    int thread = 0;
    int64_t begin = 0, size = 0;
  };
  std::vector<Where> where_;
  std::vector<std::vector<T>> buffers_;
};

}  // namespace

// ---- dense and product keys -----------------------------------------------

void HostOps::dense_topk(TensorView tokens, TensorView keys, int k, TopKView out, Stream) const {
  const OpArgs check = args("dense_topk");
  check.float_dtype(tokens, "tokens");
  check.float_dtype(keys, "keys");
  check_same_cols(check, tokens, "tokens", keys, "keys");
  check_k(check, k);
  const int64_t T = tokens.rows, E = keys.rows;
  const TopKOut o(check, out, T, k, "out", E);
  if (T == 0) return;
  const RowScores scores(*this, tokens, keys);
  // Score a block of tokens against all keys, then select per row: the block
  // is sized so its logits (about 16 MiB) stay far below T x E.
  const int64_t block =
      std::clamp<int64_t>((int64_t{4} << 20) / std::max<int64_t>(E, 1) / 3 * 3, 3, 384);
  std::vector<float> logits(static_cast<size_t>(std::min(block, T) * E));
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t n = std::min(block, T - t0);
    scores(t0, n, logits.data(), E);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = t0 + i;
      const float* z = logits.data() + i * E;
      TopK top = o.top(t, k);
      o.push<Ids::kAscending>(top, k, z, E, [](int64_t e) { return static_cast<int32_t>(e); });
      if (o.with_lse) {
        LogSumExp lse;
        for (int64_t e = 0; e < E; ++e) lse.add(z[e]);
        o.set_lse(t, lse);
      }
    }
  }
}

void HostOps::product_topk(TensorView tokens, TensorView keys1, TensorView keys2, int k,
                           TopKView out, Stream) const {
  const OpArgs check = args("product_topk");
  check.float_dtype(tokens, "tokens");
  check.float_dtype(keys1, "keys1");
  check.float_dtype(keys2, "keys2");
  check_k(check, k);
  if (keys1.rows != keys2.rows)
    check.fail("keys1 has " + std::to_string(keys1.rows) + " rows, keys2 " +
               std::to_string(keys2.rows));
  if (tokens.cols != keys1.cols + keys2.cols)
    check.fail("tokens has " + std::to_string(tokens.cols) + " columns, the keys' halves " +
               std::to_string(keys1.cols) + " + " + std::to_string(keys2.cols));
  if (!out.lse.empty()) check.fail("out.lse must be empty: product keys gate over the chosen k");
  const int64_t T = tokens.rows, n = keys1.rows, d1 = keys1.cols, d2 = keys2.cols;
  const TopKOut o(check, out, T, k, "out", n * n);
  if (T == 0) return;
  const int kh = static_cast<int>(std::min<int64_t>(k, n));
  const FloatRows h(tokens), w1(keys1), w2(keys2);
  const int64_t block = 1024;
  std::vector<float> s1(static_cast<size_t>(std::min(block, T) * n));
  std::vector<float> s2(s1.size());
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t m = std::min(block, T - t0);
    score_f32(h.row(t0), h.ld(), w1.data(), w1.ld(), m, n, d1, s1.data(), n);
    score_f32(h.row(t0) + d1, h.ld(), w2.data(), w2.ld(), m, n, d2, s2.data(), n);
    ParallelErrors errors;  // buffer allocations may throw
#pragma omp parallel
    {
      std::vector<float> z1, z2;
      std::vector<int32_t> i1, i2;
      const bool ready = errors.run([&] {
        z1.resize(static_cast<size_t>(kh));
        z2.resize(static_cast<size_t>(kh));
        i1.resize(static_cast<size_t>(kh));
        i2.resize(static_cast<size_t>(kh));
      });
#pragma omp for schedule(static)
      for (int64_t i = 0; i < m; ++i) {
        if (!ready) continue;
        TopK top1(kh, z1.data(), i1.data()), top2(kh, z2.data(), i2.data());
        for (int64_t j = 0; j < n; ++j) {
          top1.push_ascending(s1[i * n + j], static_cast<int32_t>(j));
          top2.push_ascending(s2[i * n + j], static_cast<int32_t>(j));
        }
        TopK top = o.top(t0 + i, k);
        for (int a = 0; a < kh; ++a)
          for (int b = 0; b < kh; ++b)
            top.push(z1[a] + z2[b], static_cast<int32_t>(i1[a] * n + i2[b]));
      }
    }
    errors.rethrow();
  }
}

// ---- AIR: probes, pairs, scan, merge ------------------------------------

ProbeSet HostOps::select_probes(TensorView tokens, TensorView codewords, TensorView list_sizes,
                                int probes, int k, Stream) const {
  const OpArgs check = args("select_probes");
  check.float_dtype(tokens, "tokens");
  check.float_dtype(codewords, "codewords");
  check_same_cols(check, tokens, "tokens", codewords, "codewords");
  check.at_least(codewords.rows, 1, "codewords rows");
  check.vector(list_sizes, "list_sizes", DType::kI64, codewords.rows);
  check.at_least(probes, 1, "probes");
  check_k(check, k);
  const int64_t T = tokens.rows, C = codewords.rows, d = codewords.cols;
  const Vec<const int64_t> sizes(list_sizes);
  const FloatRows h(tokens), cw(codewords);
  RaggedRows<int32_t> chosen(T);
  const int64_t block = std::max<int64_t>(3, (int64_t{4} << 20) / C);
  std::vector<float> scores(static_cast<size_t>(std::min(block, T) * C));
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t n = std::min(block, T - t0);
    score_f32(h.row(t0), h.ld(), cw.data(), cw.ld(), n, C, d, scores.data(), C);
    ParallelErrors errors;  // allocations may throw
#pragma omp parallel
    {
      std::vector<int32_t> order, picked;
      std::vector<float> picked_scores;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i)
        errors.run([&] {
          probes_for_token(scores.data() + i * C, C, probes, k, sizes, order, picked_scores,
                           picked);
          chosen.set(t0 + i, picked);
        });
    }
    errors.rethrow();
  }
  ProbeSet out;
  out.offsets = chosen.offsets(*this, out.count);
  out.codewords = empty(DType::kI32, out.count, 1);
  int32_t* codes = out.codewords.as<int32_t>();
  for (int64_t t = 0; t < T; ++t)
    codes = std::copy(chosen.row(t).begin(), chosen.row(t).end(), codes);
  out.shortlist_size = empty(DType::kI32, T, 1);
  int32_t* shortlist = out.shortlist_size.as<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    int64_t members = 0;
    for (int32_t c : chosen.row(t)) members += sizes[c];
    shortlist[t] = static_cast<int32_t>(members);
  }
  return out;
}

namespace {

// offsets[0 .. n] start at 0 and never decrease (OpArgs::offsets).
void require_ranges(const OpArgs& check, const Vec<const int64_t>& offsets, int64_t n,
                    const char* name, const char* what) {
  int64_t bad = offsets[0] != 0 ? 0 : -1;
  for (int64_t i = 1; i <= n && bad < 0; ++i)
    if (offsets[i] < offsets[i - 1]) bad = i;
  check.offsets(name, bad, bad < 0 ? 0 : offsets[bad], what);
}

// The list blocks as host vectors.
struct HostLists {
  Vec<const int64_t> block_offsets, list_blocks, outranking_offsets;
  Vec<const int32_t> ids, outranking;
  int64_t blocks = 0, lists = 0;

  HostLists(const OpArgs& check, const ListBlocksView& v) {
    check.vector(v.block_offsets, "lists.block_offsets", DType::kI64);
    check.vector(v.list_blocks, "lists.list_blocks", DType::kI64);
    blocks = vector_size(v.block_offsets) - 1;
    lists = vector_size(v.list_blocks) - 1;
    if (blocks < 0 || lists < 0) check.fail("lists.block_offsets and lists.list_blocks need a row");
    check.vector(v.outranking_offsets, "lists.outranking_offsets", DType::kI64, blocks + 1);
    if (!v.outranking.empty()) check.vector(v.outranking, "lists.outranking", DType::kI32);
    block_offsets = Vec<const int64_t>(v.block_offsets);
    list_blocks = Vec<const int64_t>(v.list_blocks);
    outranking_offsets = Vec<const int64_t>(v.outranking_offsets);
    outranking = Vec<const int32_t>(v.outranking);
    require_ranges(check, block_offsets, blocks, "lists.block_offsets", "rows");
    require_ranges(check, list_blocks, lists, "lists.list_blocks", "blocks");
    check.list_blocks_end(list_blocks[lists], blocks);
    require_ranges(check, outranking_offsets, blocks, "lists.outranking_offsets",
                   "outranking lists");
    const int64_t outranked = outranking_offsets[blocks];
    if (outranked > 0) check.vector(v.outranking, "lists.outranking", DType::kI32, outranked);
    for (int64_t i = 0; i < outranked; ++i)
      if (outranking[i] < 0 || outranking[i] >= lists)
        check.fail("lists.outranking entry " + std::to_string(i) + " names list " +
                   std::to_string(outranking[i]) + ", outside [0, " + std::to_string(lists) + ")");
    const int64_t rows = block_offsets[blocks];
    if (rows > 0) {
      check.vector(v.ids, "lists.ids", DType::kI32, rows);
      check.float_dtype(v.keys, "lists.keys");
      check.shape(v.keys, "lists.keys", rows, v.keys.cols);
    }
    ids = Vec<const int32_t>(v.ids);
  }
  int64_t block_size(int64_t s) const { return block_offsets[s + 1] - block_offsets[s]; }
};

}  // namespace

namespace {

// A run of consecutive blocks of one list: blocks begin .. end - 1.
struct BlockRun {
  int32_t begin, end;
};

// One token's pairs (as runs, in probe order) and its shortlist size, from
// its probes marked in `probed` (bits by list).
struct TokenRuns {
  const HostLists& l;
  ScanUnit unit;
  const std::vector<uint64_t>& probed;

  // A block is scanned unless the token probes a list that outranks it
  // (that list scores the block's experts already). Without branches on the
  // probes: which blocks they skip is as good as random.
  bool outranked(int64_t s) const {
    uint64_t seen = 0;
    for (int64_t j = l.outranking_offsets[s]; j < l.outranking_offsets[s + 1]; ++j) {
      const int32_t a = l.outranking[j];
      seen |= probed[a >> 6] >> (a & 63);
    }
    return (seen & 1) != 0;
  }
  int64_t rows(int64_t first, int64_t end) const {
    return l.block_offsets[end] - l.block_offsets[first];
  }
  // The experts of blocks first .. end - 1 no other probed list outranks.
  int64_t distinct_rows(int64_t first, int64_t end) const {
    int64_t members = 0;
    for (int64_t s = first; s < end; ++s) members += outranked(s) ? 0 : l.block_size(s);
    return members;
  }
  // List c's runs appended to `runs`; returns its experts no other probed
  // list outranks.
  int64_t add_list(int32_t c, std::vector<BlockRun>& runs) const {
    const int64_t first = l.list_blocks[c], end = l.list_blocks[c + 1];
    if (unit == ScanUnit::kLists) {
      if (end > first) runs.push_back({static_cast<int32_t>(first), static_cast<int32_t>(end)});
      return distinct_rows(first, end);
    }
    int64_t members = 0;
    int64_t open = -1;  // the first block of the run being extended
    for (int64_t s = first; s <= end; ++s) {
      const bool scanned = s < end && !outranked(s);
      if (scanned && open < 0) open = s;
      if (scanned || open < 0) continue;
      members += rows(open, s);
      runs.push_back({static_cast<int32_t>(open), static_cast<int32_t>(s)});
      open = -1;
    }
    return members;
  }
};

}  // namespace

PairSet HostOps::probe_pairs(const ListBlocksView& lists, const ProbeSet& probes, ScanUnit unit,
                             Stream) const {
  const OpArgs check = args("probe_pairs");
  const HostLists l(check, lists);
  const int64_t T = probes.offsets.rows() - 1;
  if (T < 0) check.fail("probes.offsets needs T + 1 rows");
  const int64_t* offsets = probes.offsets.as<int64_t>();
  const int32_t* codewords = probes.codewords.as<int32_t>();
  for (int64_t i = 0; i < probes.count; ++i)
    if (codewords[i] < 0 || codewords[i] >= l.lists)
      check.fail("probe " + std::to_string(i) + " names list " + std::to_string(codewords[i]) +
                 ", outside [0, " + std::to_string(l.lists) + ")");
  RaggedRows<BlockRun> scanned(T);
  PairSet out;
  out.shortlist_size = empty(DType::kI32, T, 1);
  int32_t* shortlist = out.shortlist_size.as<int32_t>();
  ParallelErrors errors;  // allocations may throw
#pragma omp parallel
  {
    // The token's probed lists as bits (set, used, cleared per token): a
    // query-aware list's blocks have a handful of outranking lists each.
    std::vector<uint64_t> probed;
    std::vector<BlockRun> runs;
    const bool ready = errors.run([&] { probed.assign(static_cast<size_t>(l.lists / 64 + 1), 0); });
    const TokenRuns token_runs{l, unit, probed};
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      if (!ready) continue;
      errors.run([&] {
        for (int64_t i = offsets[t]; i < offsets[t + 1]; ++i)
          probed[codewords[i] >> 6] |= uint64_t{1} << (codewords[i] & 63);
        runs.clear();
        int64_t members = 0;
        for (int64_t i = offsets[t]; i < offsets[t + 1]; ++i)
          members += token_runs.add_list(codewords[i], runs);
        scanned.set(t, runs);
        shortlist[t] = static_cast<int32_t>(members);
        for (int64_t i = offsets[t]; i < offsets[t + 1]; ++i) probed[codewords[i] >> 6] = 0;
      });
    }
  }
  errors.rethrow();
  out.offsets = scanned.offsets(*this, out.count);
  out.query = empty(DType::kI32, out.count, 1);
  out.block = empty(DType::kI32, out.count, 1);
  out.block_end = empty(DType::kI32, out.count, 1);
  int32_t *query = out.query.as<int32_t>(), *block = out.block.as<int32_t>(),
          *block_end = out.block_end.as<int32_t>();
  int64_t p = 0;
  for (int64_t t = 0; t < T; ++t)
    for (const BlockRun& run : scanned.row(t)) {
      query[p] = static_cast<int32_t>(t);
      block[p] = run.begin;
      block_end[p++] = run.end;
    }
  return out;
}

namespace {

constexpr int64_t kQueriesPerTask = 64;

// scan_blocks' pairs as host vectors.
struct PairArgs {
  Vec<const int32_t> query, block, block_end;
  int64_t size = 0;
  // The rows of pair p's blocks: [first_row(p), end_row(p)).
  int64_t first_row(const HostLists& l, int64_t p) const { return l.block_offsets[block[p]]; }
  int64_t end_row(const HostLists& l, int64_t p) const { return l.block_offsets[block_end[p]]; }
  // Pairs p0 .. p1 - 1, as pairs 0 .. p1 - p0 - 1.
  PairArgs range(int64_t p0, int64_t p1) const {
    const auto from = [&](Vec<const int32_t> v) {
      v.data += p0 * v.stride;
      v.size = p1 - p0;
      return v;
    };
    return {from(query), from(block), from(block_end), p1 - p0};
  }
};

// The list of each block.
std::vector<int32_t> list_of_blocks(const HostLists& l) {
  std::vector<int32_t> list_of(static_cast<size_t>(l.blocks));
  for (int64_t c = 0; c < l.lists; ++c)
    std::fill(list_of.begin() + l.list_blocks[c], list_of.begin() + l.list_blocks[c + 1], c);
  return list_of;
}

// A pair naming a block or a query out of range, or blocks that are not a
// run of one list's, is refused by name.
void check_pairs(const OpArgs& check, const HostLists& l, const std::vector<int32_t>& list_of,
                 const PairArgs& pairs, int64_t query_rows) {
  for (int64_t p = 0; p < pairs.size; ++p) {
    const int32_t b = pairs.block[p], e = pairs.block_end[p], q = pairs.query[p];
    if (b < 0 || b >= l.blocks)
      check.fail("pair " + std::to_string(p) + " names block " + std::to_string(b) +
                 ", outside [0, " + std::to_string(l.blocks) + ")");
    if (e <= b || e > l.blocks || list_of[e - 1] != list_of[b]) check.bad_run(p, b, e, l.blocks);
    if (q < 0 || q >= query_rows)
      check.fail("pair " + std::to_string(p) + " names query " + std::to_string(q) +
                 ", outside [0, " + std::to_string(query_rows) + ")");
  }
}

// scan_blocks' work, grouped so that one GEMM serves many pairs. A group is
// a stretch of consecutive pairs of one query in one list (probe_pairs
// writes each token's pairs list by list, so a group is one probed list);
// groups are ordered by list and, inside a list, by query (group order
// breaks ties), and a task is up to kQueriesPerTask queries of a list
// against the rows their pairs span (a list's blocks are consecutive rows).
// Lists cut into many small blocks (spilled and query-aware lists) thus cost
// one GEMM per task rather than one per block, and only groups are
// reordered: a group's pairs are read and written in place, in sequence.
// Rows a query's pairs skip inside the span are scored and unused. Every
// logit is lane_dot of its two rows, so the grouping changes no bit.
struct ScanPlan {
  struct Group {
    int64_t begin, end;  // pairs
    int32_t query, list;
  };
  struct Task {
    int64_t first_group, end_group;  // groups[first_group .. end_group)
    int64_t begin, end;              // key rows
  };
  std::vector<Group> groups;
  std::vector<Task> tasks;
};

// The pairs' groups in pair order (pairs check_pairs accepted).
std::vector<ScanPlan::Group> find_groups(const std::vector<int32_t>& list_of,
                                         const PairArgs& pairs) {
  std::vector<ScanPlan::Group> groups;
  for (int64_t p = 0; p < pairs.size; ++p) {
    const int32_t q = pairs.query[p], c = list_of[pairs.block[p]];
    if (!groups.empty() && groups.back().query == q && groups.back().list == c)
      groups.back().end = p + 1;
    else
      groups.push_back({p, p + 1, q, c});
  }
  return groups;
}

// Cuts each list's groups (by query) into tasks of up to kQueriesPerTask
// queries, each spanning the rows of its groups' pairs.
void cut_tasks(const HostLists& l, const PairArgs& pairs, ScanPlan& plan) {
  ScanPlan::Task task{};
  int64_t queries = 0;
  const auto groups = static_cast<int64_t>(plan.groups.size());
  for (int64_t r = 0; r < groups; ++r) {
    const ScanPlan::Group& group = plan.groups[r];
    const bool new_list = r == 0 || group.list != plan.groups[r - 1].list;
    const bool new_query = new_list || group.query != plan.groups[r - 1].query;
    if (new_list || (new_query && queries == kQueriesPerTask)) {
      if (r > 0) plan.tasks.push_back(task);
      task = {r, r, std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min()};
      queries = 0;
    }
    queries += new_query;
    task.end_group = r + 1;
    for (int64_t p = group.begin; p < group.end; ++p) {
      task.begin = std::min(task.begin, pairs.first_row(l, p));
      task.end = std::max(task.end, pairs.end_row(l, p));
    }
  }
  if (groups > 0) plan.tasks.push_back(task);
}

ScanPlan plan_scan(const HostLists& l, const std::vector<int32_t>& list_of, const PairArgs& pairs) {
  const std::vector<ScanPlan::Group> groups = find_groups(list_of, pairs);
  const Csr by_list = bucket(l.lists, static_cast<int64_t>(groups.size()),
                             [&](int64_t r) { return groups[r].list; });
  ScanPlan plan;
  plan.groups.reserve(groups.size());
  for (int64_t r : by_list.items) plan.groups.push_back(groups[r]);
  const auto by_query = [](const ScanPlan::Group& a, const ScanPlan::Group& b) {
    return a.query < b.query;
  };
  for (int64_t c = 0; c < l.lists; ++c) {  // groups come token by token: mostly sorted already
    const auto begin = plan.groups.begin() + by_list.offsets[c];
    const auto end = plan.groups.begin() + by_list.offsets[c + 1];
    if (!std::is_sorted(begin, end, by_query)) std::stable_sort(begin, end, by_query);
  }
  cut_tasks(l, pairs, plan);
  return plan;
}

// Every pair's logits, list by list: visit(p, z, L) gets pair p's L
// logits (valid during the call), on the thread that scored them.
template <typename Visit>
void score_runs(const HostOps& ops, const ScanPlan& plan, const HostLists& l, const PairArgs& pairs,
                TensorView queries, const FloatRows& keys, Visit visit) {
  const int64_t d = queries.cols;
  ParallelErrors errors;  // buffer allocations may throw
#pragma omp parallel
  {
    std::vector<float> xbuf, zbuf;
    const bool ready = errors.run([&] { xbuf.resize(static_cast<size_t>(kQueriesPerTask * d)); });
#pragma omp for schedule(dynamic, 1)
    for (size_t ti = 0; ti < plan.tasks.size(); ++ti) {
      if (!ready) continue;
      errors.run([&] {
        const ScanPlan::Task& task = plan.tasks[ti];
        const int64_t width = task.end - task.begin;
        // The task's queries, one GEMM row each (consecutive groups may share one).
        int64_t n = 0;
        for (int64_t r = task.first_group; r < task.end_group; ++r)
          if (r == task.first_group || plan.groups[r].query != plan.groups[r - 1].query)
            load_row(queries, plan.groups[r].query, xbuf.data() + n++ * d);
        zbuf.resize(static_cast<size_t>(n * width));
        if (width > 0)
          ops.score_f32(xbuf.data(), d, keys.row(task.begin), keys.ld(), n, width, d, zbuf.data(),
                        width);
        for (int64_t r = task.first_group, i = -1; r < task.end_group; ++r) {
          if (r == task.first_group || plan.groups[r].query != plan.groups[r - 1].query) ++i;
          for (int64_t p = plan.groups[r].begin; p < plan.groups[r].end; ++p) {
            const int64_t first = pairs.first_row(l, p);
            visit(p, zbuf.data() + i * width + (first - task.begin), pairs.end_row(l, p) - first);
          }
        }
      });
    }
  }
  errors.rethrow();
}

// The arguments scan_blocks and scan_topk share, checked.
struct ScanArgs {
  HostLists l;
  PairArgs pairs;
  std::vector<int32_t> list_of;

  ScanArgs(const OpArgs& check, const ListBlocksView& lists, TensorView queries, TensorView query,
           TensorView block, TensorView block_end, int k)
      : l(check, lists) {
    check.float_dtype(queries, "queries");
    check_k(check, k);
    check.vector(query, "query", DType::kI32);
    const int64_t P = vector_size(query);
    check.vector(block, "block", DType::kI32, P);
    check.vector(block_end, "block_end", DType::kI32, P);
    pairs = {Vec<const int32_t>(query), Vec<const int32_t>(block), Vec<const int32_t>(block_end),
             P};
    list_of = list_of_blocks(l);
    check_pairs(check, l, list_of, pairs, queries.rows);
    if (rows() > 0) check_same_cols(check, queries, "queries", lists.keys, "lists.keys");
  }
  int64_t rows() const { return l.block_offsets[l.blocks]; }
};

}  // namespace

void HostOps::scan_blocks(const ListBlocksView& lists, TensorView queries, TensorView query,
                          TensorView block, TensorView block_end, int k, TopKView out,
                          Stream) const {
  const OpArgs check = args("scan_blocks");
  const ScanArgs a(check, lists, queries, query, block, block_end, k);
  const HostLists& l = a.l;
  const TopKOut o(check, out, a.pairs.size, k, "out");
  o.check_bias_ids(
      check, [&](int64_t i) { return l.ids[i]; }, l.block_offsets[l.blocks], "lists.ids", false);
  if (a.pairs.size == 0) return;
  const FloatRows keys(a.rows() > 0 ? lists.keys : TensorView{});
  const ScanPlan plan = plan_scan(l, a.list_of, a.pairs);
  score_runs(*this, plan, l, a.pairs, queries, keys, [&](int64_t p, const float* z, int64_t L) {
    const int64_t first = a.pairs.first_row(l, p);
    TopK top = o.top(p, k);
    // Ids ascend within a block, not across a run's blocks.
    o.push<Ids::kAnyOrder>(top, k, z, L, [&](int64_t j) { return l.ids[first + j]; });
    if (o.with_lse) {
      LogSumExp lse;
      for (int64_t j = 0; j < L; ++j) lse.add(z[j]);
      o.set_lse(p, lse);
    }
  });
}

namespace {

// Logits scan_topk holds at once: tokens are taken in chunks whose pairs
// fit, each chunk scored list by list, then selected token by token. A
// chunk holds kScanTopKLogits (4 MiB, about twice a core's L2 on the
// machines measured: on query lists 16 MiB ran 1.1-1.2x slower), or more
// where a list would otherwise get fewer than kQueriesPerTask tokens on
// average (the GEMM's batch: on wide keys, d = 512 with 1,065 rows per
// token, 1M-logit chunks ran 0.65x as fast), up to kScanTopKMaxLogits
// (64 MiB).
constexpr int64_t kScanTopKLogits = int64_t{1} << 20;
constexpr int64_t kScanTopKMaxLogits = int64_t{1} << 24;

// Where each pair's logits start when all are held at once: pair p's rows
// are logits [at[p], at[p + 1]), and at[size] is all of them. Computed once
// per call; a chunk's pairs p0 .. p1 then start at at[p] - at[p0].
std::vector<int64_t> pair_logit_offsets(const HostLists& l, const PairArgs& pairs) {
  std::vector<int64_t> at(static_cast<size_t>(pairs.size) + 1, 0);
  for (int64_t p = 0; p < pairs.size; ++p)
    at[p + 1] = at[p] + pairs.end_row(l, p) - pairs.first_row(l, p);
  return at;
}

// A chunk's logits (above) for the T tokens of `pairs`, whose rows are
// `rows` in all.
int64_t chunk_logits(const HostLists& l, const PairArgs& pairs, int64_t rows, int64_t T) {
  if (pairs.size == 0) return kScanTopKLogits;
  // Tokens for kQueriesPerTask per list, at the mean pairs per token.
  const double tokens = static_cast<double>(kQueriesPerTask) * static_cast<double>(l.lists) *
                        static_cast<double>(T) / static_cast<double>(pairs.size);
  const double logits = tokens * static_cast<double>(rows) / static_cast<double>(T);
  return std::clamp(static_cast<int64_t>(logits), kScanTopKLogits, kScanTopKMaxLogits);
}

// `count` floats of the calling thread's buffer for scan_topk's logits,
// kept between calls and grown to powers of two, so that a call pays no
// allocation and its pages fault in once. Not zeroed: only the pages a call
// writes become resident.
float* logits_buffer(int64_t count) {
  thread_local std::unique_ptr<float[]> data;
  thread_local int64_t capacity = 0;
  if (count > capacity) {
    capacity = static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(count)));
    data.reset();
    data = std::make_unique_for_overwrite<float[]>(static_cast<size_t>(capacity));
  }
  return data.get();
}

// The end t1 of the chunk of tokens that starts at t0: as many as the rows
// of their pairs (pairs off[t] .. off[t + 1] of token t, logits at `at`)
// fit `budget`, and at least one.
int64_t chunk_end(const Vec<const int64_t>& off, const std::vector<int64_t>& at, int64_t budget,
                  int64_t t0, int64_t T) {
  const int64_t start = at[off[t0]];
  int64_t t1 = t0 + 1;
  while (t1 < T && at[off[t1 + 1]] - start <= budget) ++t1;
  return t1;
}

// Token t's top-k over the rows of its pairs, each id once (pair p's
// logits at z_of(p)), and with o.lse each pair's log-sum-exp merged in
// pair order.
template <typename ZOf>
void select_token(const TopKOut& o, const HostLists& l, const PairArgs& pairs,
                  const Vec<const int64_t>& off, int64_t t, int k, ZOf z_of) {
  TopK top = o.top(t, k);
  LogSumExp lse;
  for (int64_t p = off[t]; p < off[t + 1]; ++p) {
    const float* z = z_of(p);
    const int64_t first = pairs.first_row(l, p), L = pairs.end_row(l, p) - first;
    o.push<Ids::kRepeated>(top, k, z, L, [&](int64_t j) { return l.ids[first + j]; });
    if (o.with_lse) {
      LogSumExp pair;
      for (int64_t j = 0; j < L; ++j) pair.add(z[j]);
      lse.merge(pair);
    }
  }
  if (o.with_lse) o.set_lse(t, lse);
}

}  // namespace

void HostOps::scan_topk(const ListBlocksView& lists, TensorView queries, const PairSet& ps, int k,
                        TopKView out, Stream) const {
  const OpArgs check = args("scan_topk");
  const ScanArgs a(check, lists, queries, ps.query, ps.block, ps.block_end, k);
  const HostLists& l = a.l;
  check.vector(ps.offsets, "pairs.offsets", DType::kI64);
  const int64_t T = vector_size(ps.offsets) - 1;
  if (T < 0) check.fail("pairs.offsets needs T + 1 entries");
  const Vec<const int64_t> off(ps.offsets);
  for (int64_t t = 0; t < T; ++t)
    if (off[t] > off[t + 1] || off[t] < 0 || off[t + 1] > a.pairs.size)
      check.fail("pairs.offsets[" + std::to_string(t) + " .. " + std::to_string(t + 1) +
                 "] is not a range of the " + std::to_string(a.pairs.size) + " pairs");
  const TopKOut o(check, out, T, k, "out");
  o.check_bias_ids(
      check, [&](int64_t i) { return l.ids[i]; }, l.block_offsets[l.blocks], "lists.ids", false);
  const FloatRows keys(a.rows() > 0 ? lists.keys : TensorView{});
  const std::vector<int64_t> at = pair_logit_offsets(l, a.pairs);
  const int64_t budget = chunk_logits(l, a.pairs, at.back(), T);
  for (int64_t t0 = 0, t1; t0 < T; t0 = t1) {
    t1 = chunk_end(off, at, budget, t0, T);
    const int64_t p0 = off[t0], p1 = off[t1], start = at[p0];
    const PairArgs chunk = a.pairs.range(p0, p1);
    float* logits = logits_buffer(std::max(budget, at[p1] - start));
    score_runs(*this, plan_scan(l, a.list_of, chunk), l, chunk, queries, keys,
               [&](int64_t i, const float* z, int64_t L) {
                 std::copy_n(z, L, logits + (at[p0 + i] - start));
               });
#pragma omp parallel for schedule(static)
    for (int64_t t = t0; t < t1; ++t)
      select_token(o, l, a.pairs, off, t, k, [&](int64_t p) { return logits + (at[p] - start); });
  }
}

void HostOps::merge_topk(TopKView candidates, TensorView offsets, int k, TopKView out,
                         Stream) const {
  const OpArgs check = args("merge_topk");
  check_k(check, k);
  check.vector(offsets, "offsets", DType::kI64);
  const int64_t T = vector_size(offsets) - 1;
  if (T < 0) check.fail("offsets needs T + 1 entries");
  const Vec<const int64_t> off(offsets);
  const int64_t pairs = candidates.ids.rows, width = candidates.ids.cols;
  const TopKOut c(check, candidates, pairs, static_cast<int>(width), "candidates");
  if (c.with_lse != !out.lse.empty())
    check.fail("candidates.lse and out.lse must be given together");
  const TopKOut o(check, out, T, k, "out");
  o.check_bias_ids(
      check, [&](int64_t i) { return c.ids.row(i / width)[i % width]; }, pairs * width,
      "candidates.ids", true);
  for (int64_t t = 0; t < T; ++t)
    if (off[t] > off[t + 1] || off[t] < 0 || off[t + 1] > pairs)
      check.fail("offsets[" + std::to_string(t) + " .. " + std::to_string(t + 1) +
                 "] is not a range of the " + std::to_string(pairs) + " candidate rows");
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    TopK top = o.top(t, k);
    LogSumExp lse;
    for (int64_t p = off[t]; p < off[t + 1]; ++p) {
      const float* z = c.logits.row(p);
      const int32_t* id = c.ids.row(p);
      for (int64_t j = 0; j < width && id[j] >= 0; ++j) top.push_unique(z[j], id[j]);
      if (o.with_lse) lse.merge(c.get_lse(p));
    }
    if (o.with_lse) o.set_lse(t, lse);
  }
}

void HostOps::finalize_gates(TensorView logits, TensorView lse, TensorView log_normalizer,
                             TensorView gates, GateFunction fn, Stream) const {
  const OpArgs check = args("finalize_gates");
  check.dtype(logits, "logits", {DType::kF32});
  const int64_t T = logits.rows;
  const int k = static_cast<int>(logits.cols);
  check.vector(log_normalizer, "log_normalizer", DType::kF64, T);
  check.matrix(gates, "gates", DType::kF32, T, k);
  const bool shortlist = !lse.empty();
  if (shortlist) check.matrix(lse, "lse", DType::kF64, T, 2);
  if (shortlist && fn != GateFunction::kSoftmax)
    check.fail("lse must be empty for sigmoid gates (they normalize over the chosen experts)");
  const Rows<const float> z_rows(logits);
  const Rows<float> g_rows(gates);
  const Rows<const double> lse_rows(lse);
  const Vec<double> norm(log_normalizer);
#pragma omp parallel for schedule(static) if (T > 256)
  for (int64_t t = 0; t < T; ++t) {
    const float* z = z_rows.row(t);
    LogSumExp l;
    if (shortlist) {
      l = LogSumExp{lse_rows.row(t)[0], lse_rows.row(t)[1]};
    } else {
      for (int j = 0; j < k; ++j) l.add(gate_input(fn, z[j]));
    }
    norm[t] = l.value();
    float* g = g_rows.row(t);
    for (int j = 0; j < k; ++j) g[j] = static_cast<float>(std::exp(gate_input(fn, z[j]) - norm[t]));
  }
}

// ---- router backward ----------------------------------------------------

void HostOps::logit_grads(TensorView token, TensorView expert, TensorView z, TensorView chosen_ids,
                          TensorView gates, TensorView d_gates, TensorView log_normalizer,
                          TensorView coef, GateFunction fn, Stream) const {
  const OpArgs check = args("logit_grads");
  check.vector(token, "token", DType::kI32);
  const int64_t N = vector_size(token);
  check.vector(expert, "expert", DType::kI32, N);
  check.vector(z, "z", DType::kF32, N);
  check.vector(coef, "coef", DType::kF64, N);
  check.dtype(chosen_ids, "chosen_ids", {DType::kI32});
  const int64_t T = chosen_ids.rows;
  const int k = static_cast<int>(chosen_ids.cols);
  check.matrix(gates, "gates", DType::kF32, T, k);
  check.float_dtype(d_gates, "d_gates");
  check.shape(d_gates, "d_gates", T, k);
  check.vector(log_normalizer, "log_normalizer", DType::kF64, T);
  const Vec<const int32_t> tok(token), exp_id(expert);
  const Vec<const float> zv(z);
  const Vec<double> out(coef);
  const Vec<const double> norm(log_normalizer);
  const Rows<const int32_t> chosen(chosen_ids);
  const Rows<const float> g(gates);
  const FloatRows dg(d_gates);
  for (int64_t i = 0; i < N; ++i)
    if (tok[i] < 0 || tok[i] >= T)
      check.fail("entry " + std::to_string(i) + " names token " + std::to_string(tok[i]) +
                 ", outside [0, " + std::to_string(T) + ")");
#pragma omp parallel for schedule(static) if (N > 4096)
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = tok[i];
    const int32_t e = exp_id[i];
    double weighted = 0.0;  // sum_j g_j dL/dg_j
    double own = 0.0;       // dL/dg of e where e is chosen
    for (int j = 0; j < k; ++j) {
      weighted += static_cast<double>(g.row(t)[j]) * dg.row(t)[j];
      if (chosen.row(t)[j] == e) own = dg.row(t)[j];
    }
    const double p = std::exp(gate_input(fn, zv[i]) - norm[t]);
    out[i] = p * (own - weighted) * gate_input_slope(fn, zv[i]);
  }
}

namespace {

// out[j] = the sum over the contributions items[0 .. n) of coef * src row
// (double, in item order), rounded once; acc is scratch of width doubles.
template <typename RowOf>
void sum_rows(std::vector<double>& acc, const int64_t* items, int64_t n,
              const Vec<const double>& coef, RowOf row_of, float* out) {
  std::fill(acc.begin(), acc.end(), 0.0);
  const auto width = static_cast<int64_t>(acc.size());
  for (int64_t i = 0; i < n; ++i) {
    const float* x = row_of(items[i]);
    for (int64_t j = 0; j < width; ++j) acc[j] += coef[items[i]] * x[j];
  }
  for (int64_t j = 0; j < width; ++j) out[j] = static_cast<float>(acc[j]);
}

// sum_rows for every group of a CSR (offsets [groups + 1] into items), in
// parallel; out(g) is group g's output row.
template <typename RowOf, typename Out>
void sum_groups(const std::vector<int64_t>& offsets, const std::vector<int64_t>& items,
                const Vec<const double>& coef, int64_t width, RowOf row_of, Out out) {
  const auto groups = static_cast<int64_t>(offsets.size()) - 1;
  ParallelErrors errors;  // the accumulators may fail to allocate
#pragma omp parallel
  {
    std::vector<double> acc;
    const bool ready = errors.run([&] { acc.resize(static_cast<size_t>(width)); });
#pragma omp for schedule(dynamic, 8)
    for (int64_t g = 0; g < groups; ++g)
      if (ready)
        sum_rows(acc, items.data() + offsets[g], offsets[g + 1] - offsets[g], coef, row_of, out(g));
  }
  errors.rethrow();
}

}  // namespace

RowGrads HostOps::accumulate_row_grads(TensorView tokens, TensorView keys,
                                       RowContributionsView contributions, TensorView d_tokens,
                                       Stream) const {
  const OpArgs check = args("accumulate_row_grads");
  check.float_dtype(tokens, "tokens");
  check.float_dtype(keys, "keys");
  check_same_cols(check, tokens, "tokens", keys, "keys");
  const int64_t T = tokens.rows, width = tokens.cols, R = keys.rows;
  const bool token_grads = !d_tokens.empty();  // empty: the key gradients alone
  if (token_grads) check.matrix(d_tokens, "d_tokens", DType::kF32, T, width);
  check.vector(contributions.token, "contributions.token", DType::kI32);
  const int64_t N = vector_size(contributions.token);
  check.vector(contributions.row, "contributions.row", DType::kI32, N);
  check.vector(contributions.coef, "contributions.coef", DType::kF64, N);
  const Vec<const int32_t> tok(contributions.token), row(contributions.row);
  const Vec<const double> coef(contributions.coef);
  for (int64_t i = 0; i < N; ++i)
    if (tok[i] < 0 || tok[i] >= T || row[i] < 0 || row[i] >= R)
      check.fail("contribution " + std::to_string(i) + " names token " + std::to_string(tok[i]) +
                 " and row " + std::to_string(row[i]) + " of [" + std::to_string(T) + ", " +
                 std::to_string(R) + "]");
  const FloatRows h(tokens), w(keys);

  // Each token's contributions in contribution order; zero coefficients
  // contribute nothing, and their rows are not listed.
  std::vector<int64_t> live;
  live.reserve(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i)
    if (coef[i] != 0.0) live.push_back(i);
  const int64_t n_live = static_cast<int64_t>(live.size());
  Csr by_token = bucket(T, n_live, [&](int64_t i) { return tok[live[i]]; });
  for (int64_t& item : by_token.items) item = live[item];
  if (token_grads) {
    const Rows<float> dh(d_tokens);
    sum_groups(
        by_token.offsets, by_token.items, coef, width, [&](int64_t c) { return w.row(row[c]); },
        [&](int64_t t) { return dh.row(t); });
  }

  // Each key row's contributions in token order (then contribution order),
  // in double: deterministic whatever order they were produced in. A
  // counting sort over the rows where they are few enough, else a stable
  // sort: the same order.
  Csr by_row;
  if (R <= 8 * n_live + 1024) {
    by_row = bucket(R, n_live, [&](int64_t i) { return row[by_token.items[i]]; });
    for (int64_t& item : by_row.items) item = by_token.items[item];
  } else {
    by_row.items = by_token.items;
    std::stable_sort(by_row.items.begin(), by_row.items.end(),
                     [&](int64_t a, int64_t b) { return row[a] < row[b]; });
    by_row.offsets.push_back(0);
    for (int64_t i = 1; i <= n_live; ++i)
      if (i == n_live || row[by_row.items[i]] != row[by_row.items[i - 1]])
        by_row.offsets.push_back(i);
    if (n_live == 0) by_row.offsets.assign(1, 0);
  }
  // The rows hit, and their groups.
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> hit;
  for (size_t g = 0; g + 1 < by_row.offsets.size(); ++g)
    if (by_row.offsets[g + 1] > by_row.offsets[g]) {
      hit.push_back(row[by_row.items[by_row.offsets[g]]]);
      offsets.push_back(by_row.offsets[g + 1]);
    }
  RowGrads out;
  out.count = static_cast<int64_t>(hit.size());
  out.rows = empty(DType::kI32, out.count, 1);
  std::copy(hit.begin(), hit.end(), out.rows.as<int32_t>());
  out.values = empty(DType::kF32, out.count, width);
  float* values = out.values.as<float>();
  sum_groups(
      offsets, by_row.items, coef, width, [&](int64_t c) { return h.row(tok[c]); },
      [&](int64_t r) { return values + r * width; });
  return out;
}

}  // namespace airmoe::inline ops::host
