// The host backends' expert FFN forward and backward, expert-centric: the
// (token, expert) pairs are grouped by expert and each group runs as two
// small GEMMs (SwiGLU's gate and up rows are one [2h, d] W1 block per
// expert, so its first GEMM is one too: ops/expert_ffn.h). Every GEMM is score_f32 (lane_dot's
// entries), so a pair's pre-activation, output, gate gradient and input gradient do not depend on
// which other pairs share its group, on the thread count or on how experts
// are sharded over ranks. Per-token sums (out, dx) are float additions in
// pair order; parameter gradients contract over an expert's pairs in pair
// order (the kernel set's contraction, lane_dot's order).
#include <omp.h>

#include <algorithm>
#include <string>

#include "ops/expert_ffn.h"
#include "ops/host/host_ops.h"
#include "ops/host/host_views.h"

namespace airmoe::inline ops::host {
namespace {

// Stable counting sort of pairs by key: each key's pairs in pair order.
struct Groups {
  std::vector<int64_t> offsets;  // [keys + 1]
  std::vector<int64_t> items;    // pair indices
  int64_t size(int64_t g) const { return offsets[g + 1] - offsets[g]; }
  const int64_t* of(int64_t g) const { return items.data() + offsets[g]; }
};

Groups group_pairs(int64_t keys, const Vec<const int32_t>& key) {
  Groups c;
  c.offsets.assign(static_cast<size_t>(keys) + 1, 0);
  for (int64_t i = 0; i < key.size; ++i) ++c.offsets[key[i] + 1];
  for (int64_t b = 0; b < keys; ++b) c.offsets[b + 1] += c.offsets[b];
  std::vector<int64_t> fill(c.offsets.begin(), c.offsets.end() - 1);
  c.items.resize(static_cast<size_t>(key.size));
  for (int64_t i = 0; i < key.size; ++i) c.items[fill[key[i]]++] = i;
  return c;
}

// Groups that hold at least one pair, ascending.
std::vector<int64_t> nonempty(const Groups& g) {
  std::vector<int64_t> out;
  for (size_t b = 0; b + 1 < g.offsets.size(); ++b)
    if (g.offsets[b + 1] > g.offsets[b]) out.push_back(static_cast<int64_t>(b));
  return out;
}

// Parallel over experts only when there are enough of them to keep every
// thread busy; otherwise one after another, and score_f32 parallelizes each
// GEMM. Both give the same bits.
bool parallel_over_experts(size_t active) {
  const int threads = omp_get_max_threads();
  return threads > 1 && !omp_in_parallel() && active >= 4 * static_cast<size_t>(threads);
}

// dst[t] += scale(p) * src row p for each pair p of token t, in pair order.
template <typename Scale>
void add_rows_by_token(const Groups& by_token, const Rows<const float>& src, int64_t d,
                       const Rows<float>& dst, Scale scale) {
  const int64_t rows = static_cast<int64_t>(by_token.offsets.size()) - 1;
  const bool parallel = !omp_in_parallel() &&
                        static_cast<double>(by_token.items.size()) * static_cast<double>(d) > 1e5;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t t = 0; t < rows; ++t) {
    float* o = dst.row(t);
    for (int64_t i = by_token.offsets[t]; i < by_token.offsets[t + 1]; ++i) {
      const int64_t p = by_token.items[i];
      const float g = scale(p);
      const float* y = src.row(p);
      for (int64_t c = 0; c < d; ++c) o[c] += g * y[c];
    }
  }
}

// out [cols, rows] = in [rows, cols] (rows ld apart) transposed.
void transpose(const float* in, int64_t ld, int64_t rows, int64_t cols, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[c * rows + r] = in[r * ld + c];
}

// The checked arguments both passes read.
struct ExpertArgs {
  int64_t experts, d, h, h1, pairs;  // h1: W1 rows per expert (w1_rows)
  Activation act;
  FloatRows w1, w2, x;
  Vec<const int32_t> token, local;
  Vec<const float> gate;

  ExpertArgs(const OpArgs& check, const ExpertWeightsView& w, TensorView x_view,
             const ExpertPairsView& p)
      : experts(w.experts),
        d(w.dim),
        h(w.hidden),
        h1(w1_rows(w.activation, w.hidden)),
        pairs(vector_size(p.token)),
        act(w.activation),
        w1(checked(check, w.w1, "weights.w1", w.experts * h1, w.dim)),
        w2(checked(check, w.w2, "weights.w2", w.experts * w.dim, w.hidden)),
        x(checked(check, x_view, "x", x_view.rows, w.dim)) {
    check.vector(p.token, "pairs.token", DType::kI32);
    check.vector(p.local, "pairs.local", DType::kI32, pairs);
    check.vector(p.gate, "pairs.gate", DType::kF32, pairs);
    token = Vec<const int32_t>(p.token);
    local = Vec<const int32_t>(p.local);
    gate = Vec<const float>(p.gate);
    for (int64_t i = 0; i < pairs; ++i)
      if (token[i] < 0 || token[i] >= x_view.rows || local[i] < 0 || local[i] >= experts)
        check.fail("pair " + std::to_string(i) + " names token " + std::to_string(token[i]) +
                   " and expert " + std::to_string(local[i]) + " of [" +
                   std::to_string(x_view.rows) + ", " + std::to_string(experts) + "]");
  }
  const float* w1_of(int64_t e) const { return w1.row(e * h1); }  // [h1, d]
  const float* w2_of(int64_t e) const { return w2.row(e * d); }   // [d, h]

 private:
  static const TensorView& checked(const OpArgs& check, const TensorView& v, const char* name,
                                   int64_t rows, int64_t cols) {
    check.float_dtype(v, name);
    check.shape(v, name, rows, cols);
    return v;
  }
};

}  // namespace

void HostOps::expert_forward(const ExpertWeightsView& weights, TensorView x, ExpertPairsView pairs,
                             TensorView out, ExpertCacheView cache, Stream) const {
  const OpArgs check = args("expert_forward");
  const ExpertArgs a(check, weights, x, pairs);
  const int64_t d = a.d, h = a.h, h1 = a.h1, n = a.pairs;
  check.matrix(out, "out", DType::kF32, x.rows, d);
  check.matrix(cache.pre, "cache.pre", DType::kF32, n, h1);
  check.matrix(cache.output, "cache.output", DType::kF32, n, d);
  if (n == 0) return;
  const Rows<float> pre(cache.pre), output(cache.output);

  const Groups by_expert = group_pairs(a.experts, a.local);
  const std::vector<int64_t> active = nonempty(by_expert);
  const int64_t na = static_cast<int64_t>(active.size());
#pragma omp parallel if (parallel_over_experts(active.size()))
  {
    std::vector<float> xb, pb, ab, yb;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < na; ++i) {
      const int64_t e = active[i];
      const int64_t* ps = by_expert.of(e);
      const int64_t m = by_expert.size(e);
      xb.resize(static_cast<size_t>(m * d));
      pb.resize(static_cast<size_t>(m * h1));
      ab.resize(static_cast<size_t>(m * h));
      yb.resize(static_cast<size_t>(m * d));
      for (int64_t r = 0; r < m; ++r) std::copy_n(a.x.row(a.token[ps[r]]), d, &xb[r * d]);
      score_f32(xb.data(), d, a.w1_of(e), a.w1.ld(), m, h1, d, pb.data(), h1);  // pre = X W1^T
      for (int64_t r = 0; r < m; ++r) {
        std::copy_n(&pb[r * h1], h1, pre.row(ps[r]));
        for (int64_t j = 0; j < h; ++j)
          ab[r * h + j] = static_cast<float>(hidden_value(a.act, &pb[r * h1], h, j));
      }
      score_f32(ab.data(), h, a.w2_of(e), a.w2.ld(), m, d, h, yb.data(), d);  // y = act(pre) W2^T
      for (int64_t r = 0; r < m; ++r) std::copy_n(&yb[r * d], d, output.row(ps[r]));
    }
  }

  const Groups by_token = group_pairs(x.rows, a.token);
  add_rows_by_token(by_token, Rows<const float>(cache.output), d, Rows<float>(out),
                    [&](int64_t p) { return a.gate[p]; });
}

namespace {

// Scratch of one expert's backward, reused by a thread across experts.
// u = gate * dy[token] (dL/dy of each pair), xs = x[token], act = the
// hidden units, da = u W2, dpre = da * their derivative (pre_grad_factor),
// all [pairs, cols]; w1t / w2t transposed weights.
struct BackwardScratch {
  std::vector<float> u, xs, act, da, dpre, dxs, w1t, w2t;
  void resize(int64_t m, int64_t d, int64_t h, int64_t h1) {
    u.resize(static_cast<size_t>(m * d));
    xs.resize(static_cast<size_t>(m * d));
    dxs.resize(static_cast<size_t>(m * d));
    act.resize(static_cast<size_t>(m * h));
    da.resize(static_cast<size_t>(m * h));
    dpre.resize(static_cast<size_t>(m * h1));
    w1t.resize(static_cast<size_t>(d * h1));
    w2t.resize(static_cast<size_t>(h * d));
  }
};

// What every expert group's backward reads and writes.
struct BackwardIo {
  const ExpertArgs& a;
  Rows<const float> pre, output;
  FloatRows dy;
  Vec<float> d_gate;
  float* dx_pair;  // [pairs, d]: each pair's FFN part of dx[token]
};

// Gathers u, xs and act of the group's pairs and sets their d_gate.
void gather_pairs(const BackwardIo& io, const int64_t* ps, int64_t m, BackwardScratch& s) {
  const int64_t d = io.a.d, h = io.a.h;
  for (int64_t r = 0; r < m; ++r) {
    const int64_t p = ps[r];
    const int32_t t = io.a.token[p];
    const float* dyt = io.dy.row(t);
    const float* y = io.output.row(p);
    const float gate = io.a.gate[p];
    double dg = 0.0;
    for (int64_t c = 0; c < d; ++c) {
      dg += static_cast<double>(dyt[c]) * static_cast<double>(y[c]);
      s.u[r * d + c] = gate * dyt[c];
    }
    io.d_gate[p] = static_cast<float>(dg);
    std::copy_n(io.a.x.row(t), d, &s.xs[r * d]);
    const float* pre = io.pre.row(p);
    for (int64_t j = 0; j < h; ++j)
      s.act[r * h + j] = static_cast<float>(hidden_value(io.a.act, pre, h, j));
  }
}

}  // namespace

TouchedExpertGrads HostOps::expert_backward(const ExpertWeightsView& weights, TensorView x,
                                            ExpertPairsView pairs, ExpertCacheView cache,
                                            TensorView dy, TensorView d_gate, TensorView dx,
                                            Stream) const {
  const OpArgs check = args("expert_backward");
  const ExpertArgs a(check, weights, x, pairs);
  const int64_t d = a.d, h = a.h, h1 = a.h1, n = a.pairs;
  check.matrix(cache.pre, "cache.pre", DType::kF32, n, h1);
  check.matrix(cache.output, "cache.output", DType::kF32, n, d);
  check.float_dtype(dy, "dy");
  check.shape(dy, "dy", x.rows, d);
  check.vector(d_gate, "d_gate", DType::kF32, n);
  check.matrix(dx, "dx", DType::kF32, x.rows, d);

  const Groups by_expert = group_pairs(a.experts, a.local);
  const std::vector<int64_t> active = nonempty(by_expert);
  const int64_t na = static_cast<int64_t>(active.size());
  TouchedExpertGrads grads;
  grads.count = na;
  grads.local = empty(DType::kI32, na, 1);
  grads.w1 = empty(DType::kF32, na * h1, d);
  grads.w2 = empty(DType::kF32, na * d, h);
  for (int64_t i = 0; i < na; ++i) grads.local.as<int32_t>()[i] = static_cast<int32_t>(active[i]);
  float* g1_all = grads.w1.as<float>();  // every entry written by the contractions
  float* g2_all = grads.w2.as<float>();
  if (n == 0) return grads;

  std::vector<float> dx_pair(static_cast<size_t>(n * d));
  const BackwardIo io{a,
                      Rows<const float>(cache.pre),
                      Rows<const float>(cache.output),
                      FloatRows(dy),
                      Vec<float>(d_gate),
                      dx_pair.data()};
#pragma omp parallel if (parallel_over_experts(active.size()))
  {
    BackwardScratch s;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < na; ++i) {
      const int64_t e = active[i];
      const int64_t* ps = by_expert.of(e);
      const int64_t m = by_expert.size(e);
      s.resize(m, d, h, h1);
      gather_pairs(io, ps, m, s);
      transpose(a.w2_of(e), a.w2.ld(), d, h, s.w2t.data());                // [h, d]
      score_f32(s.u.data(), d, s.w2t.data(), d, m, h, d, s.da.data(), h);  // da = u W2
      for (int64_t r = 0; r < m; ++r) {
        const float* pre = io.pre.row(ps[r]);
        for (int64_t j = 0; j < h1; ++j)
          s.dpre[r * h1 + j] =
              s.da[r * h + j % h] * static_cast<float>(pre_grad_factor(a.act, pre, h, j));
      }
      transpose(a.w1_of(e), a.w1.ld(), h1, d, s.w1t.data());                      // [d, h1]
      score_f32(s.dpre.data(), h1, s.w1t.data(), h1, m, d, h1, s.dxs.data(), d);  // dx = dpre W1
      for (int64_t r = 0; r < m; ++r) std::copy_n(&s.dxs[r * d], d, io.dx_pair + ps[r] * d);
      kernels_.contract(s.dpre.data(), h1, s.xs.data(), d, m,
                        g1_all + i * h1 * d);                                    // dW1 = dpre^T X
      kernels_.contract(s.u.data(), d, s.act.data(), h, m, g2_all + i * d * h);  // dW2 = U^T A
    }
  }

  const Groups by_token = group_pairs(x.rows, a.token);
  add_rows_by_token(by_token, Rows<const float>(dx_pair.data(), d), d, Rows<float>(dx),
                    [](int64_t) { return 1.0f; });
  return grads;
}

}  // namespace airmoe::inline ops::host
