// The top-k ops of the device composition: dense_topk, product_topk,
// merge_topk and finalize_gates. Selection runs one thread per row (or per
// row and chunk of keys) with ops/topk.h's TopK, so the ranking and its tie
// rule are the host's; log-sum-exps add in the host's order.
#pragma once

#include <thrust/for_each.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ops/device/exec.h"
#include "ops/device/scoring_ops.h"
#include "ops/gate_function.h"
#include "ops/log_sum_exp.h"
#include "ops/op_args.h"
#include "ops/ops.h"
#include "ops/topk.h"

namespace airmoe::inline ops::device {

// Logits a scratch buffer holds at most (16 MiB): bounds the token blocks
// that dense, product-key and probe scoring score at once.
constexpr int64_t kScoreBudget = int64_t{1} << 22;
// Keys one thread selects from in dense_topk before the per-token merge.
constexpr int64_t kSelectChunk = 1024;

// The rows of a TopKView as functors write them; lse.data is null when the
// view has no log-sum-exp, bias null when it has no selection bias.
struct TopKRows {
  Rows<float> logits;
  Rows<int32_t> ids;
  Rows<double> lse;
  const float* bias = nullptr;

  AIRMOE_HD TopK top(int64_t r, int k) const { return TopK(k, logits.row(r), ids.row(r), bias); }

  AIRMOE_HD void put_lse(int64_t r, const LogSumExp& l) const {
    lse(r, 0) = l.max;
    lse(r, 1) = l.sum;
  }
  AIRMOE_HD LogSumExp get_lse(int64_t r) const {
    LogSumExp l;
    l.max = lse(r, 0);
    l.sum = lse(r, 1);
    return l;
  }
};

inline TopKRows topk_rows(const TopKView& v) {
  return {rows_of<float>(v.logits), rows_of<int32_t>(v.ids),
          v.lse.empty() ? Rows<double>{} : rows_of<double>(v.lse),
          v.bias.empty() ? nullptr : static_cast<const float*>(v.bias.data)};
}

// out's logits f32 and ids i32 [rows, cols]; its lse f64 [rows, 2] when
// present (and `lse` allows one); its bias (`experts` entries where known).
// Returns the bias's size, or -1 for none.
inline int64_t check_topk_view(const OpArgs& args, const TopKView& v, const char* name,
                               int64_t rows, int64_t cols, bool lse, int64_t experts = -1) {
  const std::string n(name);
  args.matrix(v.logits, (n + ".logits").c_str(), DType::kF32, rows, cols);
  args.matrix(v.ids, (n + ".ids").c_str(), DType::kI32, rows, cols);
  const int64_t bias = args.bias(v.bias, (n + ".bias").c_str(), experts);
  if (v.lse.empty()) return bias;
  if (!lse) args.fail(n + ".lse must be empty");
  args.matrix(v.lse, (n + ".lse").c_str(), DType::kF64, rows, 2);
  return bias;
}

// Whether entry i of a [rows, cols] id matrix is no expert of a bias of
// `limit` entries (-1, an empty slot, is allowed).
struct BadBiasId {
  Rows<const int32_t> ids;
  int64_t cols;
  int64_t limit;
  AIRMOE_HD bool operator()(int64_t i) const {
    const int32_t id = ids(i / cols, i % cols);
    return id < -1 || id >= limit;
  }
};

// Row r's top-k over candidate rows begin(r) .. end(r) (each best first,
// id -1 past its end), in that order, and their merged log-sum-exp.
struct MergeRows {
  TopKRows cand;
  int64_t cand_k;
  Vec<const int64_t> offsets;  // data == nullptr: rows r * per_row ..
  int64_t per_row;
  TopKRows out;
  int64_t out_row0;  // out row of r = 0
  int k;
  AIRMOE_HD void operator()(int64_t r) const {
    const int64_t begin = offsets.data ? offsets[r] : r * per_row;
    const int64_t end = offsets.data ? offsets[r + 1] : (r + 1) * per_row;
    const int64_t o = out_row0 + r;
    TopK top = out.top(o, k);
    LogSumExp lse;
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t j = 0; j < cand_k && cand.ids(p, j) >= 0; ++j)
        top.push_unique(cand.logits(p, j), cand.ids(p, j));
      if (out.lse.data) lse.merge(cand.get_lse(p));
    }
    if (out.lse.data) out.put_lse(o, lse);
  }
};

// Whether offsets[t] .. offsets[t + 1] is not a range of the candidate rows.
struct BadRange {
  Vec<const int64_t> offsets;
  int64_t rows;
  AIRMOE_HD bool operator()(int64_t t) const {
    return offsets[t] < 0 || offsets[t] > offsets[t + 1] || offsets[t + 1] > rows;
  }
};

// merge_topk's selection, on views and T + 1 offsets its caller has
// checked (scan_topk checks its own before it scans).
template <typename X>
void merge_checked_topk(const X& x, TopKView candidates, TensorView offsets, int64_t T, int k,
                        TopKView out) {
  if (T == 0) return;
  thrust::for_each(x.policy(), count_from(0), count_from(T),
                   MergeRows{topk_rows(candidates), candidates.ids.cols,
                             vec_of<const int64_t>(offsets), 0, topk_rows(out), 0, k});
}

template <typename X>
void merge_topk(const X& x, const OpArgs& args, TopKView candidates, TensorView offsets, int k,
                TopKView out) {
  args.at_least(k, 1, "k");
  args.vector(offsets, "offsets", DType::kI64);
  const int64_t T = vector_size(offsets) - 1;
  if (T < 0) args.fail("offsets needs T + 1 entries");
  const int64_t pairs = candidates.ids.rows;
  check_topk_view(args, candidates, "candidates", pairs, candidates.ids.cols, true);
  if (candidates.lse.empty() != out.lse.empty())
    args.fail("candidates.lse and out.lse must be given together");
  const int64_t bias = check_topk_view(args, out, "out", T, k, true);
  if (bias >= 0 && pairs > 0 && candidates.ids.cols > 0) {
    const Rows<const int32_t> ids = rows_of<const int32_t>(candidates.ids);
    const int64_t cols = candidates.ids.cols;
    const int64_t i = first_where(x, pairs * cols, BadBiasId{ids, cols, bias});
    if (i >= 0)
      args.fail("candidates.ids entry " + std::to_string(i) + " names bias entry " +
                std::to_string(value_at(x, &ids(i / cols, i % cols))) + ", outside [0, " +
                std::to_string(bias) + ")");
  }
  const int64_t bad = first_where(x, T, BadRange{vec_of<const int64_t>(offsets), pairs});
  if (bad >= 0)
    args.fail("offsets[" + std::to_string(bad) + " .. " + std::to_string(bad + 1) +
              "] is not a range of the " + std::to_string(pairs) + " candidate rows");
  merge_checked_topk(x, candidates, offsets, T, k, out);
}

// ---- dense_topk -------------------------------------------------------------

// Row i's top-k over keys [h * chunk, (h + 1) * chunk) of a logit block,
// e = i * chunks + h, into candidate row e.
struct ChunkTopK {
  Rows<const float> z;
  int64_t keys;
  int64_t chunk;
  int64_t chunks;
  TopKRows cand;
  int k;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t i = e / chunks, j0 = (e % chunks) * chunk;
    const int64_t j1 = j0 + chunk < keys ? j0 + chunk : keys;
    TopK top = cand.top(e, k);
    for (int64_t j = j0; j < j1; ++j) top.push_ascending(z(i, j), static_cast<int32_t>(j));
  }
};

// The log-sum-exp of row i of a logit block, keys in order (the host's).
struct RowLogSumExp {
  Rows<const float> z;
  int64_t keys;
  TopKRows out;
  int64_t out_row0;
  AIRMOE_HD void operator()(int64_t i) const {
    LogSumExp l;
    for (int64_t j = 0; j < keys; ++j) l.add(z(i, j));
    out.put_lse(out_row0 + i, l);
  }
};

template <typename X>
void dense_topk(const X& x, const OpArgs& args, TensorView tokens, TensorView keys, int k,
                TopKView out) {
  args.float_dtype(tokens, "tokens");
  args.float_dtype(keys, "keys");
  if (tokens.cols != keys.cols)
    args.fail("tokens have " + std::to_string(tokens.cols) + " columns and keys " +
              std::to_string(keys.cols));
  args.at_least(k, 1, "k");
  const int64_t T = tokens.rows, E = keys.rows;
  check_topk_view(args, out, "out", T, k, true, E);
  if (T == 0) return;
  const int64_t block = std::max<int64_t>(1, kScoreBudget / std::max<int64_t>(E, 1));
  const int64_t chunks = (E + kSelectChunk - 1) / kSelectChunk;
  const int64_t rows = std::min(block, T);
  Scratch<float, X> z(x, rows * E), cand_z(x, rows * chunks * k);
  Scratch<int32_t, X> cand_id(x, rows * chunks * k);
  TopKRows out_rows = topk_rows(out);
  const TopKRows cand{{cand_z.get(), k}, {cand_id.get(), k}, {}, out_rows.bias};
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t n = std::min(block, T - t0);
    const Rows<float> zr{z.get(), E};
    score_into(x, tokens.row_range(t0, n), keys, zr);
    const Rows<const float> zc{z.get(), E};
    thrust::for_each(x.policy(), count_from(0), count_from(n * chunks),
                     ChunkTopK{zc, E, kSelectChunk, chunks, cand, k});
    TopKRows no_lse = out_rows;
    no_lse.lse = {};
    thrust::for_each(x.policy(), count_from(0), count_from(n),
                     MergeRows{cand, k, {}, chunks, no_lse, t0, k});
    if (out_rows.lse.data)
      thrust::for_each(x.policy(), count_from(0), count_from(n), RowLogSumExp{zc, E, out_rows, t0});
  }
}

// ---- product_topk -----------------------------------------------------------

// Token i's top-kh of each half's logits (ids ascending), then the top-k of
// the kh x kh sums, expert id a * n + b.
struct ProductTopK {
  Rows<const float> s1, s2;  // [rows, n]
  int64_t n;
  int kh;
  Rows<float> half_z;      // [rows, 2 kh]
  Rows<int32_t> half_ids;  // [rows, 2 kh]
  TopKRows out;
  int64_t out_row0;
  int k;
  AIRMOE_HD void operator()(int64_t i) const {
    float* z1 = half_z.row(i);
    float* z2 = z1 + kh;
    int32_t* i1 = half_ids.row(i);
    int32_t* i2 = i1 + kh;
    TopK top1(kh, z1, i1), top2(kh, z2, i2);
    for (int64_t j = 0; j < n; ++j) {
      top1.push_ascending(s1(i, j), static_cast<int32_t>(j));
      top2.push_ascending(s2(i, j), static_cast<int32_t>(j));
    }
    TopK top = out.top(out_row0 + i, k);
    for (int a = 0; a < kh; ++a)
      for (int b = 0; b < kh; ++b) top.push(z1[a] + z2[b], static_cast<int32_t>(i1[a] * n + i2[b]));
  }
};

template <typename X>
void product_topk(const X& x, const OpArgs& args, TensorView tokens, TensorView keys1,
                  TensorView keys2, int k, TopKView out) {
  args.float_dtype(tokens, "tokens");
  args.float_dtype(keys1, "keys1");
  args.float_dtype(keys2, "keys2");
  const int64_t n = keys1.rows, d1 = keys1.cols, d2 = keys2.cols, T = tokens.rows;
  args.at_least(n, 1, "keys1 rows");
  if (keys2.rows != n)
    args.fail("keys1 has " + std::to_string(n) + " rows and keys2 " + std::to_string(keys2.rows));
  if (tokens.cols != d1 + d2)
    args.fail("tokens have " + std::to_string(tokens.cols) + " columns, expected " +
              std::to_string(d1) + " + " + std::to_string(d2));
  args.at_least(k, 1, "k");
  check_topk_view(args, out, "out", T, k, false, n * n);
  if (T == 0) return;
  const int kh = static_cast<int>(std::min<int64_t>(k, n));
  const int64_t block = std::max<int64_t>(1, kScoreBudget / (2 * n));
  const int64_t rows = std::min(block, T);
  Scratch<float, X> s1(x, rows * n), s2(x, rows * n), half_z(x, rows * 2 * kh);
  Scratch<int32_t, X> half_ids(x, rows * 2 * kh);
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t m = std::min(block, T - t0);
    score_into(x, tokens.block(t0, m, 0, d1), keys1, Rows<float>{s1.get(), n});
    score_into(x, tokens.block(t0, m, d1, d2), keys2, Rows<float>{s2.get(), n});
    thrust::for_each(x.policy(), count_from(0), count_from(m),
                     ProductTopK{{s1.get(), n},
                                 {s2.get(), n},
                                 n,
                                 kh,
                                 {half_z.get(), 2 * kh},
                                 {half_ids.get(), 2 * kh},
                                 topk_rows(out),
                                 t0,
                                 k});
  }
}

// ---- finalize_gates ---------------------------------------------------------

// log_normalizer[t] from the row's (max, sum) where lse is given (the
// shortlist's normalizer), else the log-sum-exp of its k gate inputs u (the
// logits, or their log-sigmoids); then gates = exp(u - log_normalizer) in
// double, rounded once.
struct TokenGates {
  Rows<const float> logits;
  Rows<const double> lse;  // data == nullptr: the chosen k's softmax
  Vec<double> log_normalizer;
  Rows<float> gates;
  int64_t k;
  GateFunction fn;
  AIRMOE_HD void operator()(int64_t t) const {
    LogSumExp l;
    if (lse.data) {
      l.max = lse(t, 0);
      l.sum = lse(t, 1);
    } else {
      for (int64_t j = 0; j < k; ++j) l.add(gate_input(fn, logits(t, j)));
    }
    log_normalizer[t] = l.value();
    for (int64_t j = 0; j < k; ++j)
      gates(t, j) = static_cast<float>(std::exp(gate_input(fn, logits(t, j)) - log_normalizer[t]));
  }
};

template <typename X>
void finalize_gates(const X& x, const OpArgs& args, TensorView logits, TensorView lse,
                    TensorView log_normalizer, TensorView gates, GateFunction fn) {
  args.dtype(logits, "logits", {DType::kF32});
  const int64_t T = logits.rows, k = logits.cols;
  args.vector(log_normalizer, "log_normalizer", DType::kF64, T);
  args.matrix(gates, "gates", DType::kF32, T, k);
  if (!lse.empty()) args.matrix(lse, "lse", DType::kF64, T, 2);
  if (!lse.empty() && fn != GateFunction::kSoftmax)
    args.fail("lse must be empty for sigmoid gates (they normalize over the chosen experts)");
  if (T == 0) return;
  thrust::for_each(x.policy(), count_from(0), count_from(T),
                   TokenGates{rows_of<const float>(logits),
                              lse.empty() ? Rows<const double>{} : rows_of<const double>(lse),
                              vec_of<double>(log_normalizer), rows_of<float>(gates), k, fn});
}

}  // namespace airmoe::inline ops::device
