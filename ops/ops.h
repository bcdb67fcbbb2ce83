// The compute layer: every kernel the routers, the codebook and the experts
// run, behind one interface, with one implementation per backend (ggml's
// backend split; FAISS's GPU index against its CPU twin):
//   host-avx512, host-avx2,   the host kernels (ops/host/), OpenMP; they
//   host-portable             differ only in the SIMD of the scoring and
//                             contraction kernels and give the same bits
//   device-emulated           the device composition (ops/device/: Thrust
//                             algorithms and per-element functors) run on
//                             the CPU, so that everything but the CUDA calls
//                             themselves is tested on any machine
//   cuda                      the same composition compiled by nvcc on a
//                             CUDA stream (ops/cuda/), built with
//                             -DAIRMOE_WITH_CUDA=ON
// Routers, codebook and expert shard hold a Compute (ops + stream) from
// their construction and never branch on the device: the CPU test suite
// runs the very composition the GPU runs.
//
// The numeric contract, the same on every backend:
//   * every inner product (logits, probe scores, expert GEMMs, their
//     gradients) is lane_dot's (ops/lane_dot.h): 8 fused-multiply-add lanes
//     over the depth in order, then a fixed tree. An entry depends only on
//     its two rows, never on the batch, the tile, the thread count or the
//     rank. bf16 inputs are widened exactly to float32 first.
//   * top-k ranks a higher logit first, equal logits to the lower id
//     (ops/topk.h); sums whose order could vary (per-token output rows,
//     gradient rows) run in a stated order, in float or double as stated.
//   * host backends agree bit for bit; the device backends agree with the
//     host bit for bit where only +, *, fma and sqrt are involved, and
//     within a stated tolerance where exp, log or erf are (libm differs).
//
// All tensors an op reads or writes live on the op's device (device());
// copy() is the one op that also reaches host memory. Argument checks that
// name user input (shapes, finite values, ids in range) are the callers';
// ops check only their own preconditions and throw UsageError naming the op
// and the argument. Ops that run on a stream may return before their
// results are ready; synchronize() or an op returning host data waits.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "ops/expert_ffn.h"
#include "ops/gate_function.h"
#include "ops/kmeans_stats.h"

namespace airmoe::inline ops {

// A CUDA stream (cudaStream_t) on the cuda backend, nullptr for the legacy
// default stream; ignored by the host and emulated backends. Named for what
// it is on a GPU: nothing else in airmoe may be called a stream.
struct Stream {
  void* handle = nullptr;
};

// What check_rows found in a float matrix (f32 or bf16): the first
// non-finite entry in row-major order, the first row whose logits against
// keys of norm at most `key_norm_bound` could overflow float32
// (|row| * bound > FLT_MAX / 2, core/checks.h require_finite_logits), and
// the largest row norm. Norms are sums of squares in double, then sqrt.
struct RowCheck {
  int64_t nonfinite_row = -1;  // -1: every entry finite
  int64_t nonfinite_col = -1;
  float nonfinite_value = 0.0f;
  int64_t overflow_row = -1;  // -1: none (only meaningful when all finite)
  double overflow_norm = 0.0;
  double max_norm = 0.0;
};

// Stage 1's result for a batch: CSR over tokens of the probed codewords,
// best first. Tensors on the ops' device; `count` = offsets[T] on the host.
struct ProbeSet {
  Tensor offsets;         // i64 [T + 1, 1]
  Tensor codewords;       // i32 [count, 1]
  Tensor shortlist_size;  // i32 [T, 1]: members of the probed primary lists
  int64_t count = 0;
};

// The inverted lists as stage 2 scans them, on the ops' device: blocks of
// key rows (one per list, or per segment with spilled lists), ids ascending
// within a block. With spilled lists, segment s is skipped by a token that
// probes any of outranking[outranking_offsets[s] .. outranking_offsets[s+1]),
// so each probed expert is scored once (router/spilled_lists.h).
struct ListBlocksView {
  TensorView block_offsets;       // i64 [S + 1]: rows of block s
  TensorView ids;                 // i32 [rows]: expert id of each row
  TensorView keys;                // f32 or bf16 [rows, d]
  TensorView list_blocks;         // i64 [C + 1]: blocks of list c
  TensorView outranking_offsets;  // i64 [S + 1]; all zero for plain lists
  TensorView outranking;          // i32 [.]
};

// What one pair of stage 2 covers where a token probes lists that share
// experts (spilled and query-aware lists; plain lists give the same pairs
// either way).
enum class ScanUnit {
  // Runs of the segments no other probed list outranks: each probed expert
  // is scored in exactly one pair, as a shortlist's log-sum-exp needs.
  kSegments,
  // Every block of a probed list in one pair: an expert in several probed
  // lists is scored in each of them (merge_topk and scan_topk keep it
  // once). A token then has one pair per list, not one per run of
  // segments, which on the host costs less than the experts it scores twice
  // (docs/routing.md, the third pass).
  kLists,
};

// Stage 2's work: the pairs to scan, token after token, each token's range
// of pairs, and its shortlist size (distinct experts scored). A pair is a
// token and a run of consecutive blocks of one list, blocks block ..
// block_end - 1: their rows are consecutive too.
struct PairSet {
  Tensor query;           // i32 [count]: token row
  Tensor block;           // i32 [count]: the run's first block
  Tensor block_end;       // i32 [count]: one past its last block
  Tensor offsets;         // i64 [T + 1]
  Tensor shortlist_size;  // i32 [T]
  int64_t count = 0;
};

// A top-k result in caller memory: [rows, k] logits (f32) and ids (i32),
// best first, empty slots id -1 and logit -inf; with `lse` non-empty (f64
// [rows, 2]: max, sum of exp(z - max)), the log-sum-exp over every entry
// the row saw (ops/log_sum_exp.h), else nothing is written there.
// With `bias` non-empty (f32 [E], contiguous, by expert id: a selection
// bias), rows rank by the selection score z + bias[id] (one float addition,
// ops/topk.h) while `logits` and `lse` keep the unbiased z; every id the op
// ranks must lie in [0, E). The top-k ops read the bias of their output
// view (merge_topk: of `out`; its candidates must have been selected with
// the same bias).
struct TopKView {
  TensorView logits;
  TensorView ids;
  TensorView lse;
  TensorView bias = {};
};

// The weights of a shard's experts, local index i = 0..experts-1:
// w1 [experts * h1, dim] (expert i's W1 is rows i*h1 ..; h1 = w1_rows:
// hidden, or 2 hidden for SwiGLU, its gate rows then its up rows,
// ops/expert_ffn.h), w2 [experts * dim, hidden]; f32 or bf16.
struct ExpertWeightsView {
  TensorView w1;
  TensorView w2;
  int64_t experts = 0;
  int64_t dim = 0;
  int64_t hidden = 0;
  Activation activation = Activation::kGelu;
};

// (token, local expert, gate) triples: out[token] += gate * FFN_e(x[token]).
struct ExpertPairsView {
  TensorView token;  // i32 [P]: row of x / out
  TensorView local;  // i32 [P]: local expert index, in [0, experts)
  TensorView gate;   // f32 [P]
};

// Per-pair intermediates of expert_forward, read by expert_backward.
struct ExpertCacheView {
  TensorView pre;     // f32 [P, h1]: W1 x (SwiGLU: gate then up)
  TensorView output;  // f32 [P, dim]: FFN(x), before the gate
};

// Parameter gradients of the experts a backward touched: ascending local
// indices, and their rows in the weights' layout (f32). Tensors on the ops'
// device, `count` on the host.
struct TouchedExpertGrads {
  Tensor local;  // i32 [count]
  Tensor w1;     // f32 [count * h1, dim]
  Tensor w2;     // f32 [count * dim, hidden]
  int64_t count = 0;
};

// Sparse rows of a parameter's gradient: ascending row ids and their values
// (f32), `count` on the host (router/routes.h SparseRowGrad is the host form).
struct RowGrads {
  Tensor rows;    // i32 [count]
  Tensor values;  // f32 [count, width]
  int64_t count = 0;
};

// (token, key row, coefficient) contributions to a router's gradients:
//   d_tokens[token] += coef * keys[row]     (double, contribution order)
//   d_keys[row]     += coef * tokens[token] (double, token order)
struct RowContributionsView {
  TensorView token;  // i32 [N]
  TensorView row;    // i32 [N]
  TensorView coef;   // f64 [N]
};

class Ops {
 public:
  Ops() = default;
  Ops(const Ops&) = delete;
  Ops& operator=(const Ops&) = delete;
  virtual ~Ops() = default;

  // ---- identity and memory -------------------------------------------
  virtual std::string name()
      const = 0;  // "host-avx512", "host-avx2", "host-portable", "device-emulated", "cuda:0"
  virtual Device device() const = 0;
  virtual Allocator& allocator() const = 0;
  virtual void synchronize(Stream stream) const = 0;
  // A new contiguous tensor on this device (contents undefined).
  Tensor empty(DType dtype, int64_t rows, int64_t cols) const {
    return Tensor(allocator(), dtype, rows, cols);
  }
  // dst = src, same shape; each on the host or on this device; the same
  // dtype, or f32 <-> bf16 (round to nearest even; NaN stays NaN).
  virtual void copy(TensorView dst, TensorView src, Stream stream) const = 0;
  // `bytes` raw bytes from src to dst, each on the host or on this device
  // (named by src_device / dst_device), no conversion: the byte form of
  // copy(), for buffers that hold no one dtype (comm/'s exchange buffers).
  // Like copy(), it returns with host dst ready; device dst is
  // stream-ordered.
  virtual void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device,
                          size_t bytes, Stream stream) const = 0;
  // Host memory for staging this device's data through host transports
  // (comm/: the staged MPI exchange): page-locked on cuda (cudaMallocHost,
  // so copies from and to it run as DMA), the host allocator elsewhere.
  virtual Allocator& staging_allocator() const = 0;
  // Every entry of dst (any dtype) set to `value` converted to the dtype.
  virtual void fill(TensorView dst, double value, Stream stream) const = 0;

  // ---- checks -----------------------------------------------------------
  virtual RowCheck check_rows(TensorView m, double key_norm_bound, Stream stream) const = 0;

  // ---- scoring ----------------------------------------------------------
  // c[i, j] = lane_dot(a row i, b row j) over a.cols (== b.cols) for
  // i < a.rows, j < b.rows; a, b f32 or bf16, c f32 [a.rows, b.rows].
  virtual void score(TensorView a, TensorView b, TensorView c, Stream stream) const = 0;
  // c[p] = lane_dot(a row a_rows[p], b row b_rows[p]) for each pair p: the
  // logits of a handful of (token, key) pairs (rescoring, shortlist gates).
  virtual void score_pairs(TensorView a, TensorView b, TensorView a_rows, TensorView b_rows,
                           TensorView c, Stream stream) const = 0;

  // ---- rows of the sphere and the codebook ------------------------------
  // out[r] = rows[r] / |rows[r]| (norm in double, rounded once); returns the
  // first row of zero norm (then out is undefined), or -1.
  virtual int64_t normalize_rows(TensorView rows, TensorView out, Stream stream) const = 0;
  // Nearest codeword of each unit row: highest score, then lower index.
  // best i32 [n], best_score f32 [n].
  virtual void nearest(TensorView unit_rows, TensorView codewords, TensorView best,
                       TensorView best_score, Stream stream) const = 0;
  // k-means statistics of one assignment pass (ops/kmeans_stats.h), in
  // fixed point, so any split of the rows adds up to the same bits. `ids`
  // (i32 [n]) gives each row's global expert id; empty: the row index.
  virtual KMeansStats kmeans_stats(TensorView unit_rows, TensorView codewords, TensorView ids,
                                   Stream stream) const = 0;

  // ---- routing ----------------------------------------------------------
  // Dense routing: each token's top-k over every key (expert id = key row),
  // without a [T, E] buffer; with out.lse, the log-sum-exp over all keys.
  virtual void dense_topk(TensorView tokens, TensorView keys, int k, TopKView out,
                          Stream stream) const = 0;
  // Product keys: token t's top-k over experts i * n + j with logit
  // <keys1_i, t[:d1]> + <keys2_j, t[d1:]>, from the top min(k, n) of each
  // half (the exact top-k lies within them). out.lse must be empty.
  virtual void product_topk(TensorView tokens, TensorView keys1, TensorView keys2, int k,
                            TopKView out, Stream stream) const = 0;
  // Stage 1: each token's `probes` best codewords (higher score, then lower
  // index), extended in score order until their lists (list_sizes, i64
  // [C]) hold at least k experts; probes > C probes every list.
  virtual ProbeSet select_probes(TensorView tokens, TensorView codewords, TensorView list_sizes,
                                 int probes, int k, Stream stream) const = 0;
  // The blocks each token scans for its probes, in probe order, as runs.
  // kSegments: each probed expert in exactly one of them, one pair for each
  // stretch of consecutive scanned blocks of a probed list (a plain list is
  // one block, so one pair; a token probing one query-aware list scans all
  // of its segments in one pair). kLists: one pair per probed list that has
  // blocks, all of them. The shortlist size is the distinct experts either
  // way.
  virtual PairSet probe_pairs(const ListBlocksView& lists, const ProbeSet& probes, ScanUnit unit,
                              Stream stream) const = 0;
  // Stage 2: for each pair p, the top-k of query `query[p]` against the rows
  // of blocks block[p] .. block_end[p] - 1 (consecutive blocks of one list),
  // into row p of out ([pairs, k]); with out.lse, their log-sum-exp, added
  // row by row in order. Pairs are grouped (by first block, or on the host
  // by list and token; stable, so the grouping does not depend on threads)
  // and scored group by group; every logit is lane_dot of its two rows, so
  // the result does not depend on the grouping.
  virtual void scan_blocks(const ListBlocksView& lists, TensorView queries, TensorView query,
                           TensorView block, TensorView block_end, int k, TopKView out,
                           Stream stream) const = 0;
  // scan_blocks then merge_topk as one op, with the same result bits: per
  // token t, the top-k over the rows of its pairs pairs.offsets[t] ..
  // pairs.offsets[t + 1], each scored against its pair's query, each id
  // once, into row t of out ([T, k], T = pairs.offsets rows - 1); with
  // out.lse, each pair's log-sum-exp added row by row along it and merged
  // in pair order. (An id met twice must have the same logit both times,
  // as it has where a token's pairs share its query: otherwise which copy
  // stays may differ from the two ops'.) The
  // host scores each list once for many tokens, as scan_blocks does, and
  // then selects token by token with one threshold across all its pairs
  // instead of one top-k per pair (a pair of a spilled or query-aware list
  // rarely fills k slots before its rows run out); the device backends
  // compose the two ops.
  virtual void scan_topk(const ListBlocksView& lists, TensorView queries, const PairSet& pairs,
                         int k, TopKView out, Stream stream) const = 0;
  // Per token t, the top-k over its candidates, rows offsets[t] ..
  // offsets[t+1] of `candidates` ([pairs, k] with id -1 past the end), in
  // that order, each id once (a later entry of an id already held is
  // skipped: ScanUnit::kLists scores an expert once per probed list); with
  // candidates.lse, out.lse is their merged log-sum-exp.
  virtual void merge_topk(TopKView candidates, TensorView offsets, int k, TopKView out,
                          Stream stream) const = 0;
  // gates[t, j] = exp(u[t, j] - log_normalizer[t]) (double, rounded once)
  // with u = the logit (kSoftmax) or its log-sigmoid (kSigmoid, in double);
  // log_normalizer[t] (f64 [T]) first set from `lse` (f64 [T, 2],
  // ops/log_sum_exp.h: max + log(sum)) where it is given (the shortlist's
  // normalizer, as dense_topk or merge_topk left it; kSoftmax only), else
  // to the log-sum-exp of the row's k values u (the chosen experts).
  // (Changed from a `bool chosen` flag: a shortlist normalizer exists on the
  // device only as the (max, sum) pairs of the top-k ops.)
  virtual void finalize_gates(TensorView logits, TensorView lse, TensorView log_normalizer,
                              TensorView gates, GateFunction fn, Stream stream) const = 0;

  // ---- router backward --------------------------------------------------
  // dL/dz for each (token, expert) of a token's normalizing set:
  //   coef[i] = p_i ([expert[i] chosen] dL/dg - sum_j g_j dL/dg_j) * s_i,
  //   p_i = exp(u_i - log_normalizer[token[i]])
  // with u_i, s_i = z[i], 1 (kSoftmax) or log sigmoid(z[i]), sigmoid(-z[i])
  // (kSigmoid: d log sigmoid(z) / dz), where chosen ids / gates / d_gates
  // are the routes' [T, k] rows.
  virtual void logit_grads(TensorView token, TensorView expert, TensorView z, TensorView chosen_ids,
                           TensorView gates, TensorView d_gates, TensorView log_normalizer,
                           TensorView coef, GateFunction fn, Stream stream) const = 0;
  // d_tokens (f32 [T, width], overwritten; or an empty view: the key
  // gradients alone) and the sparse key gradients of the contributions; zero
  // coefficients contribute nothing (a row only they name is not listed).
  virtual RowGrads accumulate_row_grads(TensorView tokens, TensorView keys,
                                        RowContributionsView contributions, TensorView d_tokens,
                                        Stream stream) const = 0;

  // ---- experts ------------------------------------------------------------
  // out[token] += gate * FFN(x[token]) for every pair, each token's pairs
  // added in pair order (float); the cache gets every pair's pre-activation
  // and FFN output. x, out [N, dim].
  virtual void expert_forward(const ExpertWeightsView& weights, TensorView x, ExpertPairsView pairs,
                              TensorView out, ExpertCacheView cache, Stream stream) const = 0;
  // d_gate[p] = <dy[token_p], FFN(x)_p> (double, rounded once); dx[token] +=
  // the gate-weighted input gradient (pair order); returns the parameter
  // gradients of the touched experts (contracted over each expert's pairs
  // in pair order, lane_dot's order).
  virtual TouchedExpertGrads expert_backward(const ExpertWeightsView& weights, TensorView x,
                                             ExpertPairsView pairs, ExpertCacheView cache,
                                             TensorView dy, TensorView d_gate, TensorView dx,
                                             Stream stream) const = 0;
  // dst[i] += scale * src[i]: one rounded multiply, then one rounded add
  // (no fma), so a descent step leaves untouched (zero-gradient) entries as
  // they were.
  virtual void add_scaled(TensorView dst, TensorView src, float scale, Stream stream) const = 0;

  // ---- rows (the layer's gathers and per-token sums) -----------------------
  // dst[i] = src[rows[i]] for every i < rows.rows (rows i32 [n], each in
  // [0, src.rows)); src and dst f32 or bf16 with equal cols, dst [n, cols];
  // a dtype change rounds as copy() does. The layer packs dispatched token
  // vectors and gradient rows into wire order with it.
  virtual void gather_rows(TensorView src, TensorView rows, TensorView dst,
                           Stream stream) const = 0;
  // dst[g] (f32 [G, cols], overwritten) = +0.0f plus, in order, the rows
  // src[rows[j]] for j in offsets[g] .. offsets[g + 1] (src f32 or bf16,
  // widened exactly; float additions; rows i32, offsets i64 [G + 1]). The
  // explicit +0.0f start is a zeroed accumulator's: a group of one -0.0
  // row sums to +0.0, and an empty group to zeros. The combine sums each
  // token's partial outputs in ascending rank order with it.
  virtual void sum_rows(TensorView src, TensorView rows, TensorView offsets, TensorView dst,
                        Stream stream) const = 0;
  // For p = 0, 1, ... in order: dst[dst_rows[p]] += scale[p] * src[src_rows[p]],
  // each entry one rounded multiply, then one rounded add (no fma); dst f32,
  // src f32 or bf16 (widened exactly), scale f32 [n], row ids i32 [n]. Pairs
  // naming the same dst row add in pair order (a device backend may run
  // distinct dst rows in parallel, never one row's pairs out of order).
  virtual void add_scaled_rows(TensorView dst, TensorView dst_rows, TensorView src,
                               TensorView src_rows, TensorView scale, Stream stream) const = 0;
};

// What the routers, the codebook and the expert shard are built with.
struct Compute {
  const Ops* ops = nullptr;
  Stream stream;
};

}  // namespace airmoe::inline ops
