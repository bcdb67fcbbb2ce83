// score, score_pairs, normalize_rows, nearest and kmeans_stats of the device
// composition: one thread per output entry (or row), each inner product
// lane_dot's.
#pragma once

#include <thrust/for_each.h>
#include <thrust/transform_reduce.h>

#include <cmath>
#include <cstdint>

#include "ops/device/exec.h"
#include "ops/device/memory_ops.h"
#include "ops/kmeans_stats.h"
#include "ops/op_args.h"
#include "ops/ops.h"

namespace airmoe::inline ops::device {

// c(i, j) = lane_dot(a row i, b row j) for the n columns of c.
template <typename A, typename B>
struct ScoreEntry {
  Rows<const A> a;
  Rows<const B> b;
  Rows<float> c;
  int64_t n;
  int64_t depth;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t i = e / n, j = e % n;
    c(i, j) = lane_dot(a.row(i), b.row(j), depth);
  }
};

// The [a.rows, b.rows] logits of a against b into c (checked by the caller).
template <typename X>
void score_into(const X& x, TensorView a, TensorView b, Rows<float> c) {
  if (a.rows == 0 || b.rows == 0) return;
  with_float_types(a, b, [&](auto ta, auto tb) {
    using A = decltype(ta);
    using B = decltype(tb);
    thrust::for_each(x.policy(), count_from(0), count_from(a.rows * b.rows),
                     ScoreEntry<A, B>{rows_of<const A>(a), rows_of<const B>(b), c, b.rows, a.cols});
  });
}

template <typename X>
void score(const X& x, const OpArgs& args, TensorView a, TensorView b, TensorView c) {
  args.float_dtype(a, "a");
  args.float_dtype(b, "b");
  if (a.cols != b.cols)
    args.fail("a has " + std::to_string(a.cols) + " columns and b " + std::to_string(b.cols));
  args.matrix(c, "c", DType::kF32, a.rows, b.rows);
  score_into(x, a, b, rows_of<float>(c));
}

template <typename A, typename B>
struct PairScore {
  Rows<const A> a;
  Rows<const B> b;
  Vec<const int32_t> a_rows, b_rows;
  Vec<float> c;
  int64_t depth;
  AIRMOE_HD void operator()(int64_t p) const {
    c[p] = lane_dot(a.row(a_rows[p]), b.row(b_rows[p]), depth);
  }
};

template <typename X>
void score_pairs(const X& x, const OpArgs& args, TensorView a, TensorView b, TensorView a_rows,
                 TensorView b_rows, TensorView c) {
  args.float_dtype(a, "a");
  args.float_dtype(b, "b");
  if (a.cols != b.cols)
    args.fail("a has " + std::to_string(a.cols) + " columns and b " + std::to_string(b.cols));
  args.vector(a_rows, "a_rows", DType::kI32);
  const int64_t n = vector_size(a_rows);
  args.vector(b_rows, "b_rows", DType::kI32, n);
  args.vector(c, "c", DType::kF32, n);
  if (n == 0) return;
  check_indices(x, args, "pair", "a row", a_rows, a.rows);
  check_indices(x, args, "pair", "b row", b_rows, b.rows);
  with_float_types(a, b, [&](auto ta, auto tb) {
    using A = decltype(ta);
    using B = decltype(tb);
    thrust::for_each(
        x.policy(), count_from(0), count_from(n),
        PairScore<A, B>{rows_of<const A>(a), rows_of<const B>(b), vec_of<const int32_t>(a_rows),
                        vec_of<const int32_t>(b_rows), vec_of<float>(c), a.cols});
  });
}

// Writes row r divided by its norm (sum of squares in double, then one
// rounding per entry); returns r if the row has zero norm, else kNoRow. It
// only writes its own row, so running it twice is harmless.
template <typename S, typename D>
struct NormalizeRow {
  Rows<const S> in;
  Rows<D> out;
  int64_t cols;
  AIRMOE_HD int64_t operator()(int64_t r) const {
    double norm2 = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const float v = load_float(in.row(r), c);
      norm2 += static_cast<double>(v) * v;
    }
    if (norm2 == 0.0) return r;
    const double inv = 1.0 / std::sqrt(norm2);
    for (int64_t c = 0; c < cols; ++c)
      store_float(out.row(r), c, static_cast<float>(load_float(in.row(r), c) * inv));
    return kNoRow;
  }
};

template <typename X>
int64_t normalize_rows(const X& x, const OpArgs& args, TensorView rows, TensorView out) {
  args.float_dtype(rows, "rows");
  args.float_dtype(out, "out");
  args.shape(out, "out", rows.rows, rows.cols);
  const int64_t zero = with_float_types(rows, out, [&](auto ts, auto td) {
    using S = decltype(ts);
    using D = decltype(td);
    return thrust::transform_reduce(
        x.policy(), count_from(0), count_from(rows.rows),
        NormalizeRow<S, D>{rows_of<const S>(rows), rows_of<D>(out), rows.cols}, kNoRow, Min64{});
  });
  return zero == kNoRow ? -1 : zero;
}

// Each row's best codeword: the highest score, the lower index on ties (the
// first maximum, as the host scans).
template <typename A, typename B>
struct NearestOfRow {
  Rows<const A> rows;
  Rows<const B> codewords;
  int64_t count;  // codewords
  int64_t depth;
  Vec<int32_t> best;
  Vec<float> best_score;
  AIRMOE_HD void operator()(int64_t r) const {
    int32_t arg = 0;
    float top = lane_dot(rows.row(r), codewords.row(0), depth);
    for (int64_t c = 1; c < count; ++c) {
      const float s = lane_dot(rows.row(r), codewords.row(c), depth);
      if (s > top) {
        top = s;
        arg = static_cast<int32_t>(c);
      }
    }
    best[r] = arg;
    best_score[r] = top;
  }
};

template <typename X>
void nearest_into(const X& x, TensorView rows, TensorView codewords, Vec<int32_t> best,
                  Vec<float> best_score) {
  if (rows.rows == 0) return;
  with_float_types(rows, codewords, [&](auto ta, auto tb) {
    using A = decltype(ta);
    using B = decltype(tb);
    thrust::for_each(x.policy(), count_from(0), count_from(rows.rows),
                     NearestOfRow<A, B>{rows_of<const A>(rows), rows_of<const B>(codewords),
                                        codewords.rows, rows.cols, best, best_score});
  });
}

inline void check_codebook_args(const OpArgs& args, TensorView rows, TensorView codewords) {
  args.float_dtype(rows, "unit_rows");
  args.float_dtype(codewords, "codewords");
  args.at_least(codewords.rows, 1, "codewords rows");
  if (rows.cols != codewords.cols)
    args.fail("unit_rows has " + std::to_string(rows.cols) + " columns and codewords " +
              std::to_string(codewords.cols));
}

template <typename X>
void nearest(const X& x, const OpArgs& args, TensorView unit_rows, TensorView codewords,
             TensorView best, TensorView best_score) {
  check_codebook_args(args, unit_rows, codewords);
  args.vector(best, "best", DType::kI32, unit_rows.rows);
  args.vector(best_score, "best_score", DType::kF32, unit_rows.rows);
  nearest_into(x, unit_rows, codewords, vec_of<int32_t>(best), vec_of<float>(best_score));
}

// ---- kmeans_stats ------------------------------------------------------------

// sums(c, j): the fixed-point sum of column j over codeword c's members.
template <typename T>
struct MemberColumnSum {
  Rows<const T> rows;
  const int64_t* members;  // rows, codeword after codeword
  const int64_t* offsets;  // [C + 1]
  int64_t dim;
  int64_t* sums;  // [C, dim]
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t c = e / dim, j = e % dim;
    int64_t s = 0;
    for (int64_t q = offsets[c]; q < offsets[c + 1]; ++q)
      s += to_fixed(load_float(rows.row(members[q]), j));
    sums[e] = s;
  }
};

// Per codeword: its member count, the fixed-point sum of their cosines, and
// the farthest member (lowest cosine, then lower expert id).
struct CodewordSummary {
  const int64_t* members;
  const int64_t* offsets;
  const float* cosine;       // [n], each row's best score
  Vec<const int32_t> ids;    // data == nullptr: the row index
  int64_t* counts;           // [C]
  int64_t* objective;        // [C]
  int64_t* farthest_cos;     // [C]
  int32_t* farthest_expert;  // [C]
  AIRMOE_HD void operator()(int64_t c) const {
    int64_t total = 0, far = INT64_MAX;
    int32_t far_id = -1;
    for (int64_t q = offsets[c]; q < offsets[c + 1]; ++q) {
      const int64_t r = members[q];
      const int64_t cf = to_fixed(cosine[r]);
      const int32_t id = ids.data ? ids[r] : static_cast<int32_t>(r);
      total += cf;
      if (farther_member(cf, id, far, far_id)) {
        far = cf;
        far_id = id;
      }
    }
    counts[c] = offsets[c + 1] - offsets[c];
    objective[c] = total;
    farthest_cos[c] = far;
    farthest_expert[c] = far_id;
  }
};

template <typename X>
KMeansStats kmeans_stats(const X& x, const OpArgs& args, TensorView unit_rows, TensorView codewords,
                         TensorView ids) {
  check_codebook_args(args, unit_rows, codewords);
  const int64_t n = unit_rows.rows, C = codewords.rows, d = codewords.cols;
  if (!ids.empty()) args.vector(ids, "ids", DType::kI32, n);
  Scratch<int32_t, X> best(x, n);
  Scratch<float, X> cosine(x, n);
  nearest_into(x, unit_rows, codewords, Vec<int32_t>{best.get(), 1}, Vec<float>{cosine.get(), 1});
  const Grouping<X> g = group_by(x, n, C, ReadKey{Vec<const int32_t>{best.get(), 1}});

  Scratch<int64_t, X> sums(x, C * d), counts(x, C), objective(x, C), far_cos(x, C);
  Scratch<int32_t, X> far_id(x, C);
  with_float_type(unit_rows, [&](auto tr) {
    using T = decltype(tr);
    thrust::for_each(x.policy(), count_from(0), count_from(C * d),
                     MemberColumnSum<T>{rows_of<const T>(unit_rows), g.items.get(), g.offsets.get(),
                                        d, sums.get()});
  });
  const Vec<const int32_t> id_vec = ids.empty() ? Vec<const int32_t>{} : vec_of<const int32_t>(ids);
  thrust::for_each(x.policy(), count_from(0), count_from(C),
                   CodewordSummary{g.items.get(), g.offsets.get(), cosine.get(), id_vec,
                                   counts.get(), objective.get(), far_cos.get(), far_id.get()});

  KMeansStats out(C, d);
  out.sums = to_host(x, sums.get(), C * d);
  out.counts = to_host(x, counts.get(), C);
  out.farthest_cos = to_host(x, far_cos.get(), C);
  out.farthest_expert = to_host(x, far_id.get(), C);
  for (int64_t v : to_host(x, objective.get(), C)) out.objective += v;  // exact: integers
  return out;
}

}  // namespace airmoe::inline ops::device
