// Expert shard: validation, seeded initialization, and the expert-centric
// forward and backward passes.
//
// Every GEMM goes through score_nt, whose entry (i, j) depends only on row i
// of A and row j of B. So a pair's pre-activation, output, gate gradient and
// input gradient do not depend on which other pairs were grouped with it, on
// the thread count or on how experts are sharded over ranks. Per-token sums
// (out, dx) are plain float additions in pair order, so calling forward on
// pairs A then on pairs B gives the same bits as one call on A followed by B.
// Parameter gradients contract over an expert's pairs in pair order.
#include "runtime/experts.h"

#include <omp.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "core/checks.h"
#include "router/scoring.h"

namespace airmoe::runtime {
namespace {

// SplitMix64 finalizer and stream; one stream per (seed, expert, matrix).
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Stream {
  uint64_t state;
  uint64_t next() { return mix64(state += 0x9E3779B97F4A7C15ull); }
  double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53; }
  double normal() {  // Box-Muller, one value per call
    const double u = uniform(), v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }
};

Stream expert_stream(uint64_t seed, int32_t id, uint64_t which) {
  const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(id)) << 2) | which;
  return Stream{mix64(mix64(seed + 0x632BE59BD9B4E019ull) ^ mix64(key + 0x9E3779B97F4A7C15ull))};
}

std::string shape_str(int64_t r, int64_t c) {
  // Appended piecewise: "[" + std::to_string(...) trips GCC 12's -Wrestrict.
  std::string s = "[";
  s += std::to_string(r);
  s += ", ";
  s += std::to_string(c);
  s += "]";
  return s;
}

void require_shape(int64_t rows, int64_t cols, int64_t want_rows, int64_t want_cols,
                   const char* what) {
  if (rows != want_rows || cols != want_cols)
    fail(std::string(what) + " has shape " + shape_str(rows, cols) + ", expected " +
         shape_str(want_rows, want_cols));
}

// Validates the pairs against x and the shard; returns each pair's local
// expert index.
std::vector<int32_t> check_pairs(const ExpertShard& shard, MatrixView x, const ExpertPairs& pairs,
                                 const char* fn) {
  const std::string where = std::string("ExpertShard::") + fn + ": ";
  if (pairs.expert.size() != pairs.token.size() || pairs.gate.size() != pairs.token.size())
    fail(where + "pairs have " + std::to_string(pairs.token.size()) + " tokens, " +
         std::to_string(pairs.expert.size()) + " experts and " + std::to_string(pairs.gate.size()) +
         " gates; the sizes must be equal");
  if (x.cols != shard.config().dim)
    fail(where + "x has " + std::to_string(x.cols) + " columns, expected " +
         std::to_string(shard.config().dim));
  std::vector<int32_t> local(pairs.size());
  for (size_t p = 0; p < pairs.size(); ++p) {
    const int32_t t = pairs.token[p];
    if (t < 0 || t >= x.rows)
      fail(where + "pair " + std::to_string(p) + " token row " + std::to_string(t) +
           " is out of range [0, " + std::to_string(x.rows) + ")");
    const int64_t e = shard.index_of(pairs.expert[p]);
    if (e < 0)
      fail(where + "expert " + std::to_string(pairs.expert[p]) +
           " is not hosted by this shard (pair " + std::to_string(p) + ")");
    const float g = pairs.gate[p];
    if (!std::isfinite(g))
      fail(where + "pair " + std::to_string(p) + " gate is " +
           (std::isnan(g) ? "nan" : (g > 0 ? "+inf" : "-inf")));
    local[p] = static_cast<int32_t>(e);
  }
  return local;
}

// Stable counting sort of items 0..n-1 by key in [0, buckets): CSR offsets
// [buckets + 1] and the items, each bucket in item order.
struct Csr {
  std::vector<int64_t> offsets;
  std::vector<int64_t> items;
};

template <typename Key>
Csr bucket(int64_t buckets, size_t n, Key key) {
  Csr c;
  c.offsets.assign(static_cast<size_t>(buckets) + 1, 0);
  for (size_t i = 0; i < n; ++i) ++c.offsets[key(i) + 1];
  for (int64_t b = 0; b < buckets; ++b) c.offsets[b + 1] += c.offsets[b];
  std::vector<int64_t> fill(c.offsets.begin(), c.offsets.end() - 1);
  c.items.resize(n);
  for (size_t i = 0; i < n; ++i) c.items[fill[key(i)]++] = static_cast<int64_t>(i);
  return c;
}

// Buckets that hold at least one item.
std::vector<int64_t> nonempty(const Csr& c) {
  std::vector<int64_t> out;
  for (size_t b = 0; b + 1 < c.offsets.size(); ++b)
    if (c.offsets[b + 1] > c.offsets[b]) out.push_back(static_cast<int64_t>(b));
  return out;
}

// Parallel over experts only when there are enough of them to keep every
// thread busy; otherwise run them one after another and let score_nt
// parallelize each GEMM. Both give the same bits.
bool parallel_over_experts(size_t active) {
  const int threads = omp_get_max_threads();
  return threads > 1 && !omp_in_parallel() && active >= 4 * static_cast<size_t>(threads);
}

// dst[i] += src rows in CSR order: row t of dst gets, in order, the rows
// `by_token.items[offsets[t] .. offsets[t+1])` of src scaled by scale(p).
template <typename Scale>
void accumulate_rows(const Csr& by_token, const Matrix& src, Matrix& dst, Scale scale) {
  const int64_t rows = dst.rows(), d = dst.cols();
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

// dst[i] += scale * src[i]: one rounded multiply, then one rounded add.
void add_scaled(const float* src, int64_t n, float scale, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] += scale * src[i];
}

// out [cols, rows] = in [rows, cols] transposed.
void transpose(const float* in, int64_t rows, int64_t cols, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[c * rows + r] = in[r * cols + c];
}

// The lane structure of score_nt's dot products (router/scoring.cpp): lane l
// sums the products of depth index r = l, l + 8, ... with fused
// multiply-adds, lanes past a partial last block of eight add 0 * 0 (which
// turns -0 into +0), and the eight lanes meet in a fixed tree. contract_pairs
// keeps that structure for every output entry but runs eight entries at
// once, its lanes in registers, so a parameter gradient contracted over an
// expert's few pairs has the bits score_nt gives on transposed copies
// without score_nt's one horizontal sum per entry.
constexpr int kLanes = 8;

float lane_tree(const float* l) {
  const float t0 = l[0] + l[4], t1 = l[1] + l[5], t2 = l[2] + l[6], t3 = l[3] + l[7];
  return (t0 + t2) + (t1 + t3);
}

// out[j] += the lane-ordered sum over r < m of a[r * lda] * b[r * nb + j],
// one entry at a time (the portable path and the columns past a multiple of
// eight).
void contract_entries(const float* a, int64_t lda, const float* b, int64_t nb, int64_t m,
                      int64_t j0, int64_t j1, float* out) {
  for (int64_t j = j0; j < j1; ++j) {
    float lane[kLanes] = {};
    for (int64_t r = 0; r < m; ++r)
      lane[r % kLanes] = std::fma(a[r * lda], b[r * nb + j], lane[r % kLanes]);
    if (m % kLanes != 0)
      for (int64_t l = m % kLanes; l < kLanes; ++l) lane[l] += 0.0f;
    out[j] += lane_tree(lane);
  }
}

#if defined(__x86_64__) || defined(__i386__)
bool has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

__attribute__((target("avx2,fma"))) void contract_avx2(const float* a, int64_t na, const float* b,
                                                       int64_t nb, int64_t m, float* out) {
  const int64_t tail = m % kLanes, nv = nb - nb % kLanes;
  for (int64_t i = 0; i < na; ++i) {
    float* o = out + i * nb;
    for (int64_t j = 0; j < nv; j += kLanes) {
      __m256 acc[kLanes];
      for (int l = 0; l < kLanes; ++l) acc[l] = _mm256_setzero_ps();
      for (int64_t r0 = 0; r0 < m; r0 += kLanes)
        for (int l = 0; l < kLanes; ++l)
          if (r0 + l < m)
            acc[l] = _mm256_fmadd_ps(_mm256_set1_ps(a[(r0 + l) * na + i]),
                                     _mm256_loadu_ps(b + (r0 + l) * nb + j), acc[l]);
      if (tail != 0)
        for (int l = 0; l < kLanes; ++l)
          if (l >= tail) acc[l] = _mm256_add_ps(acc[l], _mm256_setzero_ps());
      const __m256 t0 = _mm256_add_ps(acc[0], acc[4]), t1 = _mm256_add_ps(acc[1], acc[5]);
      const __m256 t2 = _mm256_add_ps(acc[2], acc[6]), t3 = _mm256_add_ps(acc[3], acc[7]);
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(t0, t2), _mm256_add_ps(t1, t3));
      _mm256_storeu_ps(o + j, _mm256_add_ps(_mm256_loadu_ps(o + j), sum));
    }
    contract_entries(a + i, na, b, nb, m, nv, nb, o);
  }
}
#endif

// out[i, j] += sum over r < m of a[r, i] * b[r, j]  (a: [m, na], b: [m, nb],
// out: [na, nb]), each sum in score_nt's lane order.
void contract_pairs(const float* a, int64_t na, const float* b, int64_t nb, int64_t m, float* out) {
#if defined(__x86_64__) || defined(__i386__)
  if (has_avx2_fma()) return contract_avx2(a, na, b, nb, m, out);
#endif
  for (int64_t i = 0; i < na; ++i) contract_entries(a + i, na, b, nb, m, 0, nb, out + i * nb);
}

// Scratch of one expert's backward, reused by a thread across experts.
// u = gate * dy[token] (dL/dy of each pair), xs = x[token], a = act(pre),
// dpre = (u W2) * act'(pre), all [pairs, cols]; w1t / w2t transposed weights.
struct BackwardScratch {
  std::vector<float> u, xs, a, dpre, dxs, w1t, w2t;
  void resize(int64_t m, int64_t d, int64_t h) {
    u.resize(static_cast<size_t>(m * d));
    xs.resize(static_cast<size_t>(m * d));
    dxs.resize(static_cast<size_t>(m * d));
    a.resize(static_cast<size_t>(m * h));
    dpre.resize(static_cast<size_t>(m * h));
    w1t.resize(static_cast<size_t>(d * h));
    w2t.resize(static_cast<size_t>(h * d));
  }
};

// One expert's pairs ps[0..m) as seen by its backward.
struct ExpertGroup {
  int64_t local;      // index in the shard
  const int64_t* ps;  // pair indices, ascending
  int64_t m;
};

// What every group's backward reads.
struct BackwardInputs {
  const ExpertShard& shard;
  MatrixView x;
  const ExpertPairs& pairs;
  const ExpertCache& cache;
  MatrixView dy;
};

// Gathers u, xs and a of the group's pairs and sets their d_gate.
void gather_pairs(const BackwardInputs& in, const ExpertGroup& g, BackwardScratch& s,
                  std::vector<float>& d_gate) {
  const int64_t d = in.shard.config().dim, h = in.shard.config().hidden;
  const Activation act = in.shard.config().activation;
  for (int64_t r = 0; r < g.m; ++r) {
    const int64_t p = g.ps[r];
    const int32_t t = in.pairs.token[p];
    const float* dyt = in.dy.row(t);
    const float* y = in.cache.output.row(p);
    const float gate = in.pairs.gate[p];
    double dg = 0.0;
    for (int64_t c = 0; c < d; ++c) {
      dg += static_cast<double>(dyt[c]) * static_cast<double>(y[c]);
      s.u[r * d + c] = gate * dyt[c];
    }
    d_gate[p] = static_cast<float>(dg);
    std::copy_n(in.x.row(t), d, &s.xs[r * d]);
    const float* pre = in.cache.pre.row(p);
    for (int64_t j = 0; j < h; ++j) s.a[r * h + j] = static_cast<float>(act_value(act, pre[j]));
  }
}

// One expert's pairs: their d_gate and rows of dx_pair, and the expert's
// parameter gradients added to g1 [h, d] and g2 [d, h]. The GEMMs over the
// pairs' rows are score_nt's; the contractions over the pairs are
// contract_pairs (a handful of pairs per expert is the common case).
void backward_group(const BackwardInputs& in, const ExpertGroup& g, BackwardScratch& s,
                    std::vector<float>& d_gate, Matrix& dx_pair, float* g1, float* g2) {
  const int64_t d = in.shard.config().dim, h = in.shard.config().hidden, m = g.m;
  const Activation act = in.shard.config().activation;
  s.resize(m, d, h);
  gather_pairs(in, g, s, d_gate);
  transpose(in.shard.w2(g.local), d, h, s.w2t.data());                  // [h, d]
  score_nt(s.u.data(), d, s.w2t.data(), d, m, h, d, s.dpre.data(), h);  // da = u W2
  for (int64_t r = 0; r < m; ++r) {
    const float* pre = in.cache.pre.row(g.ps[r]);
    for (int64_t j = 0; j < h; ++j) s.dpre[r * h + j] *= static_cast<float>(act_grad(act, pre[j]));
  }
  transpose(in.shard.w1(g.local), h, d, s.w1t.data());                    // [d, h]
  score_nt(s.dpre.data(), h, s.w1t.data(), h, m, d, h, s.dxs.data(), d);  // dx = dpre W1
  for (int64_t r = 0; r < m; ++r) std::copy_n(&s.dxs[r * d], d, dx_pair.row(g.ps[r]));
  contract_pairs(s.dpre.data(), h, s.xs.data(), d, m, g1);  // dW1 = dpre^T X
  contract_pairs(s.u.data(), d, s.a.data(), h, m, g2);      // dW2 = U^T A
}

}  // namespace

ExpertShard::ExpertShard(ExpertConfig config, std::vector<int32_t> ids)
    : config_(config), ids_(std::move(ids)) {
  if (config_.dim < 1) fail("ExpertShard: dim = " + std::to_string(config_.dim) + " must be >= 1");
  if (config_.hidden < 1)
    fail("ExpertShard: hidden = " + std::to_string(config_.hidden) + " must be >= 1");
  for (size_t i = 0; i < ids_.size(); ++i) {
    if (ids_[i] < 0)
      fail("ExpertShard: expert id " + std::to_string(ids_[i]) + " (ids[" + std::to_string(i) +
           "]) is negative");
    if (i > 0 && ids_[i] <= ids_[i - 1])
      fail("ExpertShard: expert ids must be ascending and distinct, but ids[" + std::to_string(i) +
           "] = " + std::to_string(ids_[i]) + " follows " + std::to_string(ids_[i - 1]));
  }
  const int64_t per = config_.dim * config_.hidden;
  if (per > INT64_MAX / std::max<int64_t>(1, size()))
    fail("ExpertShard: " + std::to_string(size()) + " experts of " + std::to_string(per) +
         " parameters overflow");
  w1_.assign(static_cast<size_t>(size() * per), 0.0f);
  w2_.assign(static_cast<size_t>(size() * per), 0.0f);
}

ExpertShard ExpertShard::random(ExpertConfig config, std::vector<int32_t> ids, uint64_t seed) {
  ExpertShard s(config, std::move(ids));
  const int64_t d = config.dim, h = config.hidden;
  const double s1 = 1.0 / std::sqrt(static_cast<double>(d));
  const double s2 = 1.0 / std::sqrt(static_cast<double>(h));
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < s.size(); ++e) {
    Stream a = expert_stream(seed, s.ids_[e], 1);
    float* w1 = s.w1(e);
    for (int64_t i = 0; i < h * d; ++i) w1[i] = static_cast<float>(s1 * a.normal());
    Stream b = expert_stream(seed, s.ids_[e], 2);
    float* w2 = s.w2(e);
    for (int64_t i = 0; i < d * h; ++i) w2[i] = static_cast<float>(s2 * b.normal());
  }
  return s;
}

int64_t ExpertShard::index_of(int32_t expert) const {
  const auto it = std::lower_bound(ids_.begin(), ids_.end(), expert);
  if (it == ids_.end() || *it != expert) return -1;
  return static_cast<int64_t>(it - ids_.begin());
}

ExpertGrads ExpertShard::zero_grads() const {
  ExpertGrads g;
  g.w1.assign(w1_.size(), 0.0f);
  g.w2.assign(w2_.size(), 0.0f);
  return g;
}

ExpertCache ExpertShard::forward(MatrixView x, const ExpertPairs& pairs, Matrix& out) const {
  const std::vector<int32_t> local = check_pairs(*this, x, pairs, "forward");
  require_shape(out.rows(), out.cols(), x.rows, config_.dim, "ExpertShard::forward: out");
  const int64_t d = config_.dim, h = config_.hidden;
  const size_t n = pairs.size();
  ExpertCache cache{Matrix(static_cast<int64_t>(n), h), Matrix(static_cast<int64_t>(n), d)};
  if (n == 0) return cache;

  const Csr by_expert = bucket(size(), n, [&](size_t p) { return local[p]; });
  const std::vector<int64_t> active = nonempty(by_expert);
  const int64_t na = static_cast<int64_t>(active.size());
  const Activation act = config_.activation;
#pragma omp parallel if (parallel_over_experts(active.size()))
  {
    std::vector<float> xb, pb, yb;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < na; ++i) {
      const int64_t e = active[i];
      const int64_t* ps = by_expert.items.data() + by_expert.offsets[e];
      const int64_t m = by_expert.offsets[e + 1] - by_expert.offsets[e];
      xb.resize(static_cast<size_t>(m * d));
      pb.resize(static_cast<size_t>(m * h));
      yb.resize(static_cast<size_t>(m * d));
      for (int64_t r = 0; r < m; ++r) std::copy_n(x.row(pairs.token[ps[r]]), d, &xb[r * d]);
      score_nt(xb.data(), d, w1(e), d, m, h, d, pb.data(), h);  // pre = X W1^T
      for (int64_t r = 0; r < m; ++r) {
        std::copy_n(&pb[r * h], h, cache.pre.row(ps[r]));
        for (int64_t j = 0; j < h; ++j)
          pb[r * h + j] = static_cast<float>(act_value(act, pb[r * h + j]));
      }
      score_nt(pb.data(), h, w2(e), h, m, d, h, yb.data(), d);  // y = act(pre) W2^T
      for (int64_t r = 0; r < m; ++r) std::copy_n(&yb[r * d], d, cache.output.row(ps[r]));
    }
  }

  const Csr by_token = bucket(x.rows, n, [&](size_t p) { return pairs.token[p]; });
  accumulate_rows(by_token, cache.output, out, [&](int64_t p) { return pairs.gate[p]; });
  return cache;
}

ExpertGradients ExpertShard::backward(MatrixView x, const ExpertPairs& pairs,
                                      const ExpertCache& cache, MatrixView dy,
                                      std::vector<float>& d_gate, Matrix& dx) const {
  const std::vector<int32_t> local = check_pairs(*this, x, pairs, "backward");
  const int64_t d = config_.dim, h = config_.hidden;
  const size_t n = pairs.size();
  const int64_t ni = static_cast<int64_t>(n);
  require_shape(dy.rows, dy.cols, x.rows, d, "ExpertShard::backward: dy");
  require_shape(dx.rows(), dx.cols(), x.rows, d, "ExpertShard::backward: dx");
  require_shape(cache.pre.rows(), cache.pre.cols(), ni, h,
                "ExpertShard::backward: cache.pre (not from forward on these pairs?)");
  require_shape(cache.output.rows(), cache.output.cols(), ni, d,
                "ExpertShard::backward: cache.output (not from forward on these pairs?)");
  require_finite(dy, "ExpertShard::backward: dy");
  d_gate.assign(n, 0.0f);
  ExpertGradients grads;
  if (n == 0) return grads;

  const Csr by_expert = bucket(size(), n, [&](size_t p) { return local[p]; });
  const std::vector<int64_t> active = nonempty(by_expert);
  const int64_t na = static_cast<int64_t>(active.size());
  grads.ids.resize(active.size());
  for (int64_t i = 0; i < na; ++i) grads.ids[i] = ids_[active[i]];
  grads.w1.assign(static_cast<size_t>(na * h * d), 0.0f);
  grads.w2.assign(static_cast<size_t>(na * d * h), 0.0f);
  const BackwardInputs in{*this, x, pairs, cache, dy};
  Matrix dx_pair(ni, d);  // each pair's contribution to dx[token]
#pragma omp parallel if (parallel_over_experts(active.size()))
  {
    BackwardScratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < na; ++i) {
      const int64_t e = active[i];
      const ExpertGroup g{e, by_expert.items.data() + by_expert.offsets[e],
                          by_expert.offsets[e + 1] - by_expert.offsets[e]};
      backward_group(in, g, scratch, d_gate, dx_pair, grads.w1.data() + i * h * d,
                     grads.w2.data() + i * d * h);
    }
  }

  const Csr by_token = bucket(x.rows, n, [&](size_t p) { return pairs.token[p]; });
  accumulate_rows(by_token, dx_pair, dx, [](int64_t) { return 1.0f; });
  return grads;
}

void ExpertShard::backward(MatrixView x, const ExpertPairs& pairs, const ExpertCache& cache,
                           MatrixView dy, std::vector<float>& d_gate, Matrix& dx,
                           ExpertGrads& grads) const {
  if (grads.w1.empty() && grads.w2.empty()) grads = zero_grads();
  check_dense(grads, "backward");
  const ExpertGradients touched = backward(x, pairs, cache, dy, d_gate, dx);
  const int64_t w = config_.dim * config_.hidden;
  for (int64_t i = 0; i < touched.size(); ++i) {
    const int64_t e = index_of(touched.ids[i]);
    add_scaled(touched.w1.data() + i * w, w, 1.0f, grads.w1.data() + e * w);
    add_scaled(touched.w2.data() + i * w, w, 1.0f, grads.w2.data() + e * w);
  }
}

ExpertGrads ExpertShard::to_dense(const ExpertGradients& grads) const {
  const std::vector<int64_t> local = check_sparse(grads, "to_dense");
  const int64_t w = config_.dim * config_.hidden;
  ExpertGrads dense = zero_grads();
  for (size_t i = 0; i < local.size(); ++i) {
    std::copy_n(grads.w1.data() + i * w, w, dense.w1.data() + local[i] * w);
    std::copy_n(grads.w2.data() + i * w, w, dense.w2.data() + local[i] * w);
  }
  return dense;
}

void ExpertShard::apply(const ExpertGradients& grads, float scale) {
  const std::vector<int64_t> local = check_sparse(grads, "apply");
  const int64_t w = config_.dim * config_.hidden;
  for (size_t i = 0; i < local.size(); ++i) {
    add_scaled(grads.w1.data() + i * w, w, scale, w1(local[i]));
    add_scaled(grads.w2.data() + i * w, w, scale, w2(local[i]));
  }
}

void ExpertShard::apply(const ExpertGrads& grads, float scale) {
  check_dense(grads, "apply");
  add_scaled(grads.w1.data(), static_cast<int64_t>(w1_.size()), scale, w1_.data());
  add_scaled(grads.w2.data(), static_cast<int64_t>(w2_.size()), scale, w2_.data());
}

void ExpertShard::check_dense(const ExpertGrads& grads, const char* fn) const {
  if (grads.w1.size() != w1_.size() || grads.w2.size() != w2_.size())
    fail(std::string("ExpertShard::") + fn + ": grads have " + std::to_string(grads.w1.size()) +
         " and " + std::to_string(grads.w2.size()) + " entries, expected " +
         std::to_string(w1_.size()) + " and " + std::to_string(w2_.size()) + " (use zero_grads())");
}

std::vector<int64_t> ExpertShard::check_sparse(const ExpertGradients& grads, const char* fn) const {
  const std::string where = std::string("ExpertShard::") + fn + ": ";
  const size_t want = grads.ids.size() * static_cast<size_t>(config_.dim * config_.hidden);
  if (grads.w1.size() != want || grads.w2.size() != want)
    fail(where + "grads of " + std::to_string(grads.ids.size()) + " experts have " +
         std::to_string(grads.w1.size()) + " and " + std::to_string(grads.w2.size()) +
         " entries, expected " + std::to_string(want) + " each");
  std::vector<int64_t> local(grads.ids.size());
  for (size_t i = 0; i < grads.ids.size(); ++i) {
    if (i > 0 && grads.ids[i] <= grads.ids[i - 1])
      fail(where + "grads ids must be ascending and distinct, but ids[" + std::to_string(i) +
           "] = " + std::to_string(grads.ids[i]) + " follows " + std::to_string(grads.ids[i - 1]));
    local[i] = index_of(grads.ids[i]);
    if (local[i] < 0)
      fail(where + "grads ids[" + std::to_string(i) + "] = expert " + std::to_string(grads.ids[i]) +
           " is not hosted by this shard");
  }
  return local;
}

}  // namespace airmoe::runtime
