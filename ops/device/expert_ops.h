// The expert FFN forward and backward in the device composition. Each
// per-pair product (pre-activation, output, input gradient) is one thread per
// entry with lane_dot, so it does not depend on the other pairs; the sums
// over pairs (out and dx rows per token, parameter gradients per expert) run
// over groups formed by a stable sort, in pair order. A gated FFN (SwiGLU)
// has h1 = 2h W1 rows per expert (ops/expert_ffn.h): the pre-activations and
// their gradients are h1 wide, the hidden units h.
#pragma once

#include <thrust/copy.h>
#include <thrust/for_each.h>

#include <cstdint>

#include "ops/device/exec.h"
#include "ops/device/row_ops.h"
#include "ops/expert_ffn.h"
#include "ops/op_args.h"
#include "ops/ops.h"

namespace airmoe::inline ops::device {

struct PairRefs {
  Vec<const int32_t> token, local;
  Vec<const float> gate;
};

// One layer of each pair's FFN: out(p, j) = <in row of p, row j of the
// pair's expert in w> (w holds `width` rows per expert): the
// pre-activations (in = x, its row the pair's token) and the outputs (in =
// the activations, its row the pair itself).
template <typename I, typename W>
struct ExpertLayer {
  Rows<const I> in;
  Vec<const int32_t> in_row;  // data == nullptr: row p
  Rows<const W> w;
  Vec<const int32_t> local;
  Rows<float> out;
  int64_t width, depth;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t p = e / width, j = e % width;
    const int64_t r = in_row.data ? in_row[p] : p;
    out(p, j) = lane_dot(in.row(r), w.row(local[p] * width + j), depth);
  }
};

// a(q, j) = hidden unit j of the q-th pair p of `items` (null: p = q).
struct Activate {
  Rows<const float> pre;
  Activation activation;
  const int64_t* items;
  float* a;
  int64_t hidden;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t q = e / hidden, j = e % hidden, p = items ? items[q] : q;
    a[e] = static_cast<float>(hidden_value(activation, pre.row(p), hidden, j));
  }
};

inline PairRefs pair_refs(const ExpertPairsView& pairs) {
  return {vec_of<const int32_t>(pairs.token), vec_of<const int32_t>(pairs.local),
          vec_of<const float>(pairs.gate)};
}

// The arguments every expert op shares; returns the number of pairs.
template <typename X>
int64_t check_expert_args(const X& ex, const OpArgs& args, const ExpertWeightsView& w, TensorView x,
                          const ExpertPairsView& pairs, const ExpertCacheView& cache) {
  args.at_least(w.dim, 1, "weights.dim");
  args.at_least(w.hidden, 1, "weights.hidden");
  args.at_least(w.experts, 0, "weights.experts");
  args.float_dtype(w.w1, "weights.w1");
  args.float_dtype(w.w2, "weights.w2");
  args.shape(w.w1, "weights.w1", w.experts * w1_rows(w.activation, w.hidden), w.dim);
  args.shape(w.w2, "weights.w2", w.experts * w.dim, w.hidden);
  args.float_dtype(x, "x");
  args.shape(x, "x", x.rows, w.dim);
  args.vector(pairs.token, "pairs.token", DType::kI32);
  const int64_t P = vector_size(pairs.token);
  args.vector(pairs.local, "pairs.local", DType::kI32, P);
  args.vector(pairs.gate, "pairs.gate", DType::kF32, P);
  args.matrix(cache.pre, "cache.pre", DType::kF32, P, w1_rows(w.activation, w.hidden));
  args.matrix(cache.output, "cache.output", DType::kF32, P, w.dim);
  check_indices(ex, args, "pair", "token", pairs.token, x.rows);
  check_indices(ex, args, "pair", "expert", pairs.local, w.experts);
  return P;
}

// out(t) += the rows of src of token t's pairs (times their gates), in pair
// order (row_ops.h).
template <typename X>
void accumulate_by_token(const X& x, TensorView out, const ExpertPairsView& pairs, int64_t P,
                         Rows<const float> src, Vec<const float> gate) {
  add_rows_in_pair_order(x, out, pairs.token, P, Vec<const int32_t>{}, src, gate);
}

template <typename X>
void expert_forward(const X& x, const OpArgs& args, const ExpertWeightsView& w, TensorView xin,
                    ExpertPairsView pairs, TensorView out, ExpertCacheView cache) {
  const int64_t P = check_expert_args(x, args, w, xin, pairs, cache);
  args.matrix(out, "out", DType::kF32, xin.rows, w.dim);
  if (P == 0) return;
  const int64_t d = w.dim, h = w.hidden, h1 = w1_rows(w.activation, h);
  const PairRefs refs = pair_refs(pairs);
  with_float_types(xin, w.w1, [&](auto tx, auto tw) {
    using XT = decltype(tx);
    using W = decltype(tw);
    thrust::for_each(x.policy(), count_from(0), count_from(P * h1),
                     ExpertLayer<XT, W>{rows_of<const XT>(xin), refs.token, rows_of<const W>(w.w1),
                                        refs.local, rows_of<float>(cache.pre), h1, d});
  });
  Scratch<float, X> a(x, P * h);
  thrust::for_each(x.policy(), count_from(0), count_from(P * h),
                   Activate{rows_of<const float>(cache.pre), w.activation, nullptr, a.get(), h});
  with_float_type(w.w2, [&](auto tw) {
    using W = decltype(tw);
    thrust::for_each(x.policy(), count_from(0), count_from(P * d),
                     ExpertLayer<float, W>{{a.get(), h},
                                           {},
                                           rows_of<const W>(w.w2),
                                           refs.local,
                                           rows_of<float>(cache.output),
                                           d,
                                           h});
  });
  accumulate_by_token(x, out, pairs, P, rows_of<const float>(cache.output), refs.gate);
}

// ---- expert_backward ---------------------------------------------------------

// Rows of the q-th pair in expert order: u = gate * dy[token], xs = x[token].
template <typename XT, typename Y>
struct GatherPairRows {
  PairRefs pairs;
  Rows<const XT> x;
  Rows<const Y> dy;
  const int64_t* items;
  float* u;
  float* xs;
  int64_t dim;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t q = e / dim, c = e % dim, p = items[q], t = pairs.token[p];
    u[e] = pairs.gate[p] * load_float(dy.row(t), c);
    xs[e] = load_float(x.row(t), c);
  }
};

// dpre(q, j) = <u_q, column j mod h of the expert's W2> * pre_grad_factor
// (j < h1; a gated unit's da is computed once for its gate and once for its
// up entry, the same bits).
template <typename W>
struct PreGrad {
  const float* u;
  Rows<const W> w2;
  Rows<const float> pre;
  PairRefs pairs;
  const int64_t* items;
  Activation activation;
  float* dpre;
  int64_t dim, hidden, h1;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t q = e / h1, j = e % h1, p = items[q];
    const float da =
        lane_dot(u + q * dim, 1, w2.row(pairs.local[p] * dim) + j % hidden, w2.ld, dim);
    dpre[e] = da * static_cast<float>(pre_grad_factor(activation, pre.row(p), hidden, j));
  }
};

// dx_pair(p, c) = <dpre_q, column c of the expert's W1> (h1 deep).
template <typename W>
struct InputGrad {
  const float* dpre;
  Rows<const W> w1;
  PairRefs pairs;
  const int64_t* items;
  Rows<float> dx_pair;
  int64_t dim, h1;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t q = e / dim, c = e % dim, p = items[q];
    dx_pair(p, c) = lane_dot(dpre + q * h1, 1, w1.row(pairs.local[p] * h1) + c, w1.ld, h1);
  }
};

// d_gate[p] = <dy[token], FFN(x)_p> in double, rounded once.
template <typename Y>
struct GateGrad {
  PairRefs pairs;
  Rows<const Y> dy;
  Rows<const float> output;
  Vec<float> d_gate;
  int64_t dim;
  AIRMOE_HD void operator()(int64_t p) const {
    double s = 0.0;
    for (int64_t c = 0; c < dim; ++c)
      s += static_cast<double>(load_float(dy.row(pairs.token[p]), c)) *
           static_cast<double>(output(p, c));
    d_gate[p] = static_cast<float>(s);
  }
};

// Parameter gradient entry (r, s) of touched expert i: the lane-ordered sum
// over the expert's pairs (contiguous in expert order) of lhs(q, r) *
// rhs(q, s), added to zero as the host's contraction adds it.
struct ParamGrad {
  const int32_t* touched;
  const int64_t* offsets;  // [experts + 1], expert order
  const float* lhs;
  int64_t lhs_cols;
  const float* rhs;
  int64_t rhs_cols;
  Rows<float> out;  // [touched * lhs_cols, rhs_cols]
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t per = lhs_cols * rhs_cols, i = e / per, r = (e % per) / rhs_cols;
    const int64_t s = e % rhs_cols, first = offsets[touched[i]];
    const int64_t m = offsets[touched[i] + 1] - first;
    out(i * lhs_cols + r, s) = 0.0f + lane_dot(lhs + first * lhs_cols + r, lhs_cols,
                                               rhs + first * rhs_cols + s, rhs_cols, m);
  }
};

struct HasMembers {
  const int64_t* offsets;
  AIRMOE_HD bool operator()(int64_t e) const { return offsets[e + 1] > offsets[e]; }
};

// What the backward computes per pair in expert order, and the expert groups.
template <typename X>
struct ExpertBackwardScratch {
  Grouping<X> by_expert;
  Scratch<float, X> u, xs, a, dpre, dx_pair;
};

template <typename X>
void pair_grads(const X& x, const ExpertWeightsView& w, TensorView xin, const PairRefs& refs,
                const ExpertCacheView& cache, TensorView dy, int64_t P,
                ExpertBackwardScratch<X>& s) {
  const int64_t d = w.dim, h = w.hidden, h1 = w1_rows(w.activation, h);
  const int64_t* items = s.by_expert.items.get();
  with_float_types(xin, dy, [&](auto tx, auto ty) {
    using XT = decltype(tx);
    using Y = decltype(ty);
    thrust::for_each(x.policy(), count_from(0), count_from(P * d),
                     GatherPairRows<XT, Y>{refs, rows_of<const XT>(xin), rows_of<const Y>(dy),
                                           items, s.u.get(), s.xs.get(), d});
  });
  thrust::for_each(x.policy(), count_from(0), count_from(P * h),
                   Activate{rows_of<const float>(cache.pre), w.activation, items, s.a.get(), h});
  with_float_types(w.w1, w.w2, [&](auto t1, auto t2) {
    using W1 = decltype(t1);
    using W2 = decltype(t2);
    thrust::for_each(
        x.policy(), count_from(0), count_from(P * h1),
        PreGrad<W2>{s.u.get(), rows_of<const W2>(w.w2), rows_of<const float>(cache.pre), refs,
                    items, w.activation, s.dpre.get(), d, h, h1});
    thrust::for_each(x.policy(), count_from(0), count_from(P * d),
                     InputGrad<W1>{s.dpre.get(), rows_of<const W1>(w.w1), refs, items,
                                   Rows<float>{s.dx_pair.get(), d}, d, h1});
  });
}

template <typename X>
TouchedExpertGrads touched_grads(const X& x, const ExpertWeightsView& w,
                                 const ExpertBackwardScratch<X>& s) {
  const int64_t d = w.dim, h = w.hidden, h1 = w1_rows(w.activation, h);
  const int64_t* offsets = s.by_expert.offsets.get();
  Scratch<int32_t, X> touched(x, w.experts);
  const int64_t count = w.experts == 0
                            ? 0
                            : thrust::copy_if(x.policy(), count_from(0), count_from(w.experts),
                                              touched.get(), HasMembers{offsets}) -
                                  touched.get();
  TouchedExpertGrads g;
  g.count = count;
  g.local = Tensor(x.allocator(), DType::kI32, count, 1);
  g.w1 = Tensor(x.allocator(), DType::kF32, count * h1, d);
  g.w2 = Tensor(x.allocator(), DType::kF32, count * d, h);
  if (count == 0) return g;
  thrust::copy_n(x.policy(), touched.get(), count, g.local.as<int32_t>());
  thrust::for_each(x.policy(), count_from(0), count_from(count * h1 * d),
                   ParamGrad{touched.get(), offsets, s.dpre.get(), h1, s.xs.get(), d,
                             rows_of<float>(g.w1.view())});
  thrust::for_each(
      x.policy(), count_from(0), count_from(count * d * h),
      ParamGrad{touched.get(), offsets, s.u.get(), d, s.a.get(), h, rows_of<float>(g.w2.view())});
  return g;
}

template <typename X>
TouchedExpertGrads expert_backward(const X& x, const OpArgs& args, const ExpertWeightsView& w,
                                   TensorView xin, ExpertPairsView pairs, ExpertCacheView cache,
                                   TensorView dy, TensorView d_gate, TensorView dx) {
  const int64_t P = check_expert_args(x, args, w, xin, pairs, cache);
  args.float_dtype(dy, "dy");
  args.shape(dy, "dy", xin.rows, w.dim);
  args.vector(d_gate, "d_gate", DType::kF32, P);
  args.matrix(dx, "dx", DType::kF32, xin.rows, w.dim);
  const int64_t d = w.dim, h = w.hidden;
  const PairRefs refs = pair_refs(pairs);
  ExpertBackwardScratch<X> s{group_by(x, P, w.experts, ReadKey{refs.local}),
                             Scratch<float, X>(x, P * d),
                             Scratch<float, X>(x, P * d),
                             Scratch<float, X>(x, P * h),
                             Scratch<float, X>(x, P * w1_rows(w.activation, h)),
                             Scratch<float, X>(x, P * d)};
  if (P > 0) {
    pair_grads(x, w, xin, refs, cache, dy, P, s);
    with_float_type(dy, [&](auto ty) {
      using Y = decltype(ty);
      thrust::for_each(x.policy(), count_from(0), count_from(P),
                       GateGrad<Y>{refs, rows_of<const Y>(dy), rows_of<const float>(cache.output),
                                   vec_of<float>(d_gate), d});
    });
    accumulate_by_token(x, dx, pairs, P, Rows<const float>{s.dx_pair.get(), d}, {});
  }
  return touched_grads(x, w, s);
}

}  // namespace airmoe::inline ops::device
