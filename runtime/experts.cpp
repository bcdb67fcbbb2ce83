// Expert shard: validation, seeded initialization, and the expert-centric
// forward and backward passes, which are the ops' (ops/ops.h
// expert_forward, expert_backward): every GEMM is lane_dot's, so a pair's
// pre-activation, output, gate gradient and input gradient do not depend on
// which other pairs were grouped with it, on the thread count or on how
// experts are sharded over ranks. Per-token sums (out, dx) are float
// additions in pair order, so calling forward on pairs A then on pairs B
// gives the same bits as one call on A followed by B. Parameter gradients
// contract over an expert's pairs in pair order.
#include "runtime/experts.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "core/checks.h"
#include "core/splitmix.h"

namespace airmoe::runtime {
namespace {

// One SplitMix64 sequence per (seed, expert, matrix).
SplitMix64 expert_sequence(uint64_t seed, int32_t id, uint64_t which) {
  const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(id)) << 2) | which;
  return SplitMix64{splitmix64_mix(splitmix64_mix(seed + 0x632BE59BD9B4E019ull) ^
                                   splitmix64_mix(key + 0x9E3779B97F4A7C15ull))};
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

// Host values (a vector, HostFloats) as a [n, 1] tensor view (read or
// written by the ops).
template <typename Values>
TensorView host_vector_view(const Values& v, DType dtype) {
  return TensorView(
      const_cast<std::remove_const_t<std::remove_pointer_t<decltype(v.data())>>*>(v.data()), dtype,
      Device::host(), static_cast<int64_t>(v.size()), 1);
}

void require_dim(const ExpertShard& shard, int64_t cols, const char* fn) {
  if (cols != shard.config().dim)
    fail(std::string("ExpertShard::") + fn + ": x has " + std::to_string(cols) +
         " columns, expected " + std::to_string(shard.config().dim));
}

}  // namespace

HostFloats::HostFloats(const std::vector<float>& values)
    : values_(host_allocator(), DType::kF32, static_cast<int64_t>(values.size()), 1) {
  std::copy(values.begin(), values.end(), data());
}

HostFloats::HostFloats(Tensor host) : values_(std::move(host)) {
  if (values_.dtype() != DType::kF32 || !values_.device().is_host())
    fail("HostFloats: a host f32 tensor is needed");
}

HostFloats::HostFloats(const HostFloats& other)
    : values_(host_allocator(), DType::kF32, other.values_.rows(), other.values_.cols()) {
  std::copy(other.begin(), other.end(), data());
}

HostFloats& HostFloats::operator=(const HostFloats& other) {
  if (this != &other) *this = HostFloats(other);
  return *this;
}

bool HostFloats::operator==(const HostFloats& other) const {
  return std::equal(begin(), end(), other.begin(), other.end());
}

ExpertShard::ExpertShard(ExpertConfig config, std::vector<int32_t> ids, Compute compute)
    : config_(config), compute_(compute), ids_(std::move(ids)) {
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
  if (config_.hidden > INT64_MAX / 2 / config_.dim)
    fail("ExpertShard: d = " + std::to_string(config_.dim) +
         ", h = " + std::to_string(config_.hidden) + " overflow");
  const int64_t per = config_.w1_size();  // >= w2_size
  if (per > INT64_MAX / std::max<int64_t>(1, size()))
    fail("ExpertShard: " + std::to_string(size()) + " experts of " + std::to_string(per) +
         " parameters overflow");
  w1_ = compute_.ops->empty(DType::kF32, size() * config_.w1_rows(), config_.dim);
  w2_ = compute_.ops->empty(DType::kF32, size() * config_.dim, config_.hidden);
  compute_.ops->fill(w1_, 0.0, compute_.stream);
  compute_.ops->fill(w2_, 0.0, compute_.stream);
}

ExpertShard ExpertShard::random(ExpertConfig config, std::vector<int32_t> ids, uint64_t seed,
                                Compute compute) {
  ExpertShard host(config, std::move(ids));  // drawn on the host, then moved to the device
  const int64_t d = config.dim, h = config.hidden, w1_size = config.w1_size();
  const double s1 = 1.0 / std::sqrt(static_cast<double>(d));
  const double s2 = 1.0 / std::sqrt(static_cast<double>(h));
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < host.size(); ++e) {
    SplitMix64 a = expert_sequence(seed, host.ids_[e], 1);
    float* w1 = host.w1(e);
    for (int64_t i = 0; i < w1_size; ++i) w1[i] = static_cast<float>(s1 * a.normal());
    SplitMix64 b = expert_sequence(seed, host.ids_[e], 2);
    float* w2 = host.w2(e);
    for (int64_t i = 0; i < d * h; ++i) w2[i] = static_cast<float>(s2 * b.normal());
  }
  ExpertShard out;
  out.config_ = config;
  out.compute_ = compute;
  out.ids_ = host.ids_;
  out.w1_ = to_device(compute, std::move(host.w1_));
  out.w2_ = to_device(compute, std::move(host.w2_));
  return out;
}

ExpertShard::ExpertShard(const ExpertShard& other)
    : config_(other.config_), compute_(other.compute_), ids_(other.ids_) {
  w1_ = compute_.ops->empty(DType::kF32, other.w1_.rows(), other.w1_.cols());
  w2_ = compute_.ops->empty(DType::kF32, other.w2_.rows(), other.w2_.cols());
  compute_.ops->copy(w1_, other.w1_, compute_.stream);
  compute_.ops->copy(w2_, other.w2_, compute_.stream);
}

ExpertShard& ExpertShard::operator=(const ExpertShard& other) {
  if (this != &other) *this = ExpertShard(other);
  return *this;
}

float* ExpertShard::host_w1() const {
  if (!compute_.ops->device().is_host())
    fail("ExpertShard: the parameters live on " + to_string(compute_.ops->device()) +
         "; read them through weights()");
  return w1_.as<float>();
}

float* ExpertShard::host_w2() const {
  host_w1();  // the same check
  return w2_.as<float>();
}

int64_t ExpertShard::index_of(int32_t expert) const {
  const auto it = std::lower_bound(ids_.begin(), ids_.end(), expert);
  if (it == ids_.end() || *it != expert) return -1;
  return static_cast<int64_t>(it - ids_.begin());
}

ExpertWeightsView ExpertShard::weights() const {
  return {w1_, w2_, size(), config_.dim, config_.hidden, config_.activation};
}

std::vector<int32_t> ExpertShard::global_ids(const TouchedExpertGrads& touched) const {
  std::vector<int32_t> ids;
  if (touched.count == 0) return ids;
  const OnHost local(compute_, touched.local);
  for (int64_t i = 0; i < touched.count; ++i) ids.push_back(ids_[local.as<int32_t>()[i]]);
  return ids;
}

DenseExpertGrads ExpertShard::zero_grads() const {
  DenseExpertGrads g;
  g.w1.assign(w1_entries(), 0.0f);
  g.w2.assign(w2_entries(), 0.0f);
  return g;
}

DeviceExpertPairs ExpertShard::device_pairs(const ExpertPairs& pairs, int64_t x_rows,
                                            int64_t x_cols, const char* fn) const {
  const std::string where = std::string("ExpertShard::") + fn + ": ";
  if (pairs.expert.size() != pairs.token.size() || pairs.gate.size() != pairs.token.size())
    fail(where + "pairs have " + std::to_string(pairs.token.size()) + " tokens, " +
         std::to_string(pairs.expert.size()) + " experts and " + std::to_string(pairs.gate.size()) +
         " gates; the sizes must be equal");
  require_dim(*this, x_cols, fn);
  std::vector<int32_t> local(pairs.size());
  for (size_t p = 0; p < pairs.size(); ++p) {
    const int32_t t = pairs.token[p];
    if (t < 0 || t >= x_rows)
      fail(where + "pair " + std::to_string(p) + " token row " + std::to_string(t) +
           " is out of range [0, " + std::to_string(x_rows) + ")");
    const int64_t e = index_of(pairs.expert[p]);
    if (e < 0)
      fail(where + "expert " + std::to_string(pairs.expert[p]) +
           " is not hosted by this shard (pair " + std::to_string(p) + ")");
    const float g = pairs.gate[p];
    if (!std::isfinite(g))
      fail(where + "pair " + std::to_string(p) + " gate is " +
           (std::isnan(g) ? "nan" : (g > 0 ? "+inf" : "-inf")));
    local[p] = static_cast<int32_t>(e);
  }
  return {device_vector(compute_, pairs.token), device_vector(compute_, local),
          device_vector(compute_, pairs.gate)};
}

ExpertCache ExpertShard::forward(MatrixView x, const ExpertPairs& pairs, Matrix& out) const {
  const DeviceExpertPairs p = device_pairs(pairs, x.rows, x.cols, "forward");
  require_shape(out.rows(), out.cols(), x.rows, config_.dim, "ExpertShard::forward: out");
  const auto n = static_cast<int64_t>(pairs.size());
  ExpertCache cache{Matrix(n, config_.w1_rows()), Matrix(n, config_.dim)};
  if (n == 0) return cache;
  StagedOut pre(compute_, cache.pre.view()), output(compute_, cache.output.view());
  StagedOut sums(compute_, out.view(), /*initialized=*/true);
  compute_.ops->expert_forward(weights(), Staged(compute_, x), p.view(), sums, {pre, output},
                               compute_.stream);
  pre.finish();
  output.finish();
  sums.finish();
  return cache;
}

DeviceExpertCache ExpertShard::forward(TensorView x, const DeviceExpertPairs& pairs,
                                       TensorView out) const {
  require_dim(*this, x.cols, "forward");
  const int64_t n = pairs.token.rows();
  DeviceExpertCache cache{compute_.ops->empty(DType::kF32, n, config_.w1_rows()),
                          compute_.ops->empty(DType::kF32, n, config_.dim)};
  compute_.ops->expert_forward(weights(), x, pairs.view(), out, cache.view(), compute_.stream);
  return cache;
}

SparseExpertGrads ExpertShard::backward(MatrixView x, const ExpertPairs& pairs,
                                        const ExpertCache& cache, MatrixView dy,
                                        std::vector<float>& d_gate, Matrix& dx) const {
  const DeviceExpertPairs p = device_pairs(pairs, x.rows, x.cols, "backward");
  const int64_t d = config_.dim, h1 = config_.w1_rows();
  const auto n = static_cast<int64_t>(pairs.size());
  require_shape(dy.rows, dy.cols, x.rows, d, "ExpertShard::backward: dy");
  require_shape(dx.rows(), dx.cols(), x.rows, d, "ExpertShard::backward: dx");
  require_shape(cache.pre.rows(), cache.pre.cols(), n, h1,
                "ExpertShard::backward: cache.pre (not from forward on these pairs?)");
  require_shape(cache.output.rows(), cache.output.cols(), n, d,
                "ExpertShard::backward: cache.output (not from forward on these pairs?)");
  require_finite(dy, "ExpertShard::backward: dy");
  d_gate.assign(static_cast<size_t>(n), 0.0f);
  SparseExpertGrads grads;
  if (n == 0) return grads;
  StagedOut gate_grads(compute_, host_vector_view(d_gate, DType::kF32));
  StagedOut input_grads(compute_, dx.view(), /*initialized=*/true);
  TouchedExpertGrads touched = compute_.ops->expert_backward(
      weights(), Staged(compute_, x), p.view(),
      {Staged(compute_, cache.pre.view()), Staged(compute_, cache.output.view())},
      Staged(compute_, dy), gate_grads, input_grads, compute_.stream);
  gate_grads.finish();
  input_grads.finish();
  grads.ids = global_ids(touched);
  // The touched experts' rows as the ops left them (no copy on the host).
  grads.w1 = HostFloats(to_host_tensor(compute_, std::move(touched.w1)));
  grads.w2 = HostFloats(to_host_tensor(compute_, std::move(touched.w2)));
  return grads;
}

TouchedExpertGrads ExpertShard::backward(TensorView x, const DeviceExpertPairs& pairs,
                                         const DeviceExpertCache& cache, TensorView dy,
                                         TensorView d_gate, TensorView dx) const {
  require_dim(*this, x.cols, "backward");
  return compute_.ops->expert_backward(weights(), x, pairs.view(), cache.view(), dy, d_gate, dx,
                                       compute_.stream);
}

void ExpertShard::backward(MatrixView x, const ExpertPairs& pairs, const ExpertCache& cache,
                           MatrixView dy, std::vector<float>& d_gate, Matrix& dx,
                           DenseExpertGrads& grads) const {
  if (grads.w1.empty() && grads.w2.empty()) grads = zero_grads();
  check_dense(grads, "backward");
  const SparseExpertGrads touched = backward(x, pairs, cache, dy, d_gate, dx);
  const int64_t w1 = config_.w1_size(), w2 = config_.w2_size();
  const Ops& host = host_ops();  // the dense gradients are host vectors
  for (int64_t i = 0; i < touched.size(); ++i) {
    const int64_t e = index_of(touched.ids[i]);
    host.add_scaled(host_vector_view(grads.w1, DType::kF32).row_range(e * w1, w1),
                    host_vector_view(touched.w1, DType::kF32).row_range(i * w1, w1), 1.0f, {});
    host.add_scaled(host_vector_view(grads.w2, DType::kF32).row_range(e * w2, w2),
                    host_vector_view(touched.w2, DType::kF32).row_range(i * w2, w2), 1.0f, {});
  }
}

DenseExpertGrads ExpertShard::to_dense(const SparseExpertGrads& grads) const {
  const std::vector<int64_t> local = check_sparse(grads, "to_dense");
  const int64_t w1 = config_.w1_size(), w2 = config_.w2_size();
  DenseExpertGrads dense = zero_grads();
  for (size_t i = 0; i < local.size(); ++i) {
    std::copy_n(grads.w1.data() + i * w1, w1, dense.w1.data() + local[i] * w1);
    std::copy_n(grads.w2.data() + i * w2, w2, dense.w2.data() + local[i] * w2);
  }
  return dense;
}

void ExpertShard::apply(const SparseExpertGrads& grads, float scale) {
  const std::vector<int64_t> local = check_sparse(grads, "apply");
  const int64_t h = config_.hidden, d = config_.dim, h1 = config_.w1_rows();
  const Staged g1(compute_, TensorView(const_cast<float*>(grads.w1.data()), DType::kF32,
                                       Device::host(), static_cast<int64_t>(local.size()) * h1, d));
  const Staged g2(compute_, TensorView(const_cast<float*>(grads.w2.data()), DType::kF32,
                                       Device::host(), static_cast<int64_t>(local.size()) * d, h));
  for (size_t i = 0; i < local.size(); ++i) {
    const auto at = static_cast<int64_t>(i);
    compute_.ops->add_scaled(w1_.view().row_range(local[i] * h1, h1),
                             g1.view().row_range(at * h1, h1), scale, compute_.stream);
    compute_.ops->add_scaled(w2_.view().row_range(local[i] * d, d), g2.view().row_range(at * d, d),
                             scale, compute_.stream);
  }
}

void ExpertShard::apply(const DenseExpertGrads& grads, float scale) {
  check_dense(grads, "apply");
  const int64_t h = config_.hidden, d = config_.dim, h1 = config_.w1_rows();
  compute_.ops->add_scaled(
      w1_,
      Staged(compute_, TensorView(const_cast<float*>(grads.w1.data()), DType::kF32, Device::host(),
                                  size() * h1, d)),
      scale, compute_.stream);
  compute_.ops->add_scaled(w2_,
                           Staged(compute_, TensorView(const_cast<float*>(grads.w2.data()),
                                                       DType::kF32, Device::host(), size() * d, h)),
                           scale, compute_.stream);
}

void ExpertShard::check_dense(const DenseExpertGrads& grads, const char* fn) const {
  if (grads.w1.size() != w1_entries() || grads.w2.size() != w2_entries())
    fail(std::string("ExpertShard::") + fn + ": grads have " + std::to_string(grads.w1.size()) +
         " and " + std::to_string(grads.w2.size()) + " entries, expected " +
         std::to_string(w1_entries()) + " and " + std::to_string(w2_entries()) +
         " (use zero_grads())");
}

std::vector<int64_t> ExpertShard::check_sparse(const SparseExpertGrads& grads,
                                               const char* fn) const {
  const std::string where = std::string("ExpertShard::") + fn + ": ";
  const size_t n = grads.ids.size();
  const auto want1 = n * static_cast<size_t>(config_.w1_size());
  const auto want2 = n * static_cast<size_t>(config_.w2_size());
  if (grads.w1.size() != want1 || grads.w2.size() != want2)
    fail(where + "grads of " + std::to_string(n) + " experts have " +
         std::to_string(grads.w1.size()) + " and " + std::to_string(grads.w2.size()) +
         " entries, expected " + std::to_string(want1) + " and " + std::to_string(want2));
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
