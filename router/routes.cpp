#include "router/routes.h"

#include <algorithm>
#include <string>

#include "core/checks.h"

namespace airmoe::inline router {

const char* to_string(GateMode mode) {
  switch (mode) {
    case GateMode::kChosen:
      return "chosen";
    case GateMode::kShortlist:
      return "shortlist";
    case GateMode::kSigmoid:
      return "sigmoid";
  }
  return "unknown";
}

GateMode gate_mode_from_string(const std::string& name) {
  if (name == "chosen") return GateMode::kChosen;
  if (name == "shortlist") return GateMode::kShortlist;
  if (name == "sigmoid") return GateMode::kSigmoid;
  fail("gate mode '" + name + "' is unknown (expected 'chosen', 'shortlist' or 'sigmoid')");
}

GateFunction gate_function(GateMode mode) {
  return mode == GateMode::kSigmoid ? GateFunction::kSigmoid : GateFunction::kSoftmax;
}

Tensor checked_bias(const Compute& compute, TensorView bias, int64_t experts) {
  const bool vector = bias.cols == 1 || bias.rows == 1;
  const int64_t n = bias.cols == 1 ? bias.rows : bias.cols;
  if (!vector || n != experts)
    fail("bias has " +
         (vector ? std::to_string(n) + " entries"
                 : "shape [" + std::to_string(bias.rows) + ", " + std::to_string(bias.cols) + "]") +
         ", expected E = " + std::to_string(experts));
  if (bias.dtype != DType::kF32 && bias.dtype != DType::kBF16)
    fail(std::string("bias is ") + to_string(bias.dtype) + ", expected f32 or bf16");
  if (bias.device != Device::host() && bias.device != compute.ops->device())
    fail("bias is on " + to_string(bias.device) + ", the router's ops (" + compute.ops->name() +
         ") on " + to_string(compute.ops->device()));
  Tensor b = compute.ops->empty(DType::kF32, experts, 1);
  const TensorView column =
      bias.cols == 1 ? bias : TensorView(bias.data, bias.dtype, bias.device, experts, 1, /*ld=*/1);
  compute.ops->copy(b, column, compute.stream);
  const RowCheck c = compute.ops->check_rows(b, 0.0, compute.stream);
  if (c.nonfinite_row >= 0)
    fail("bias entry " + std::to_string(c.nonfinite_row) + " is " +
         std::to_string(c.nonfinite_value));
  return b;
}

TensorView bias_view(std::span<const float> bias) {
  return TensorView(const_cast<float*>(bias.data()), DType::kF32, Device::host(),
                    static_cast<int64_t>(bias.size()), 1);
}

Routes make_routes(int64_t tokens, int k, GateMode mode) {
  Routes r;
  r.tokens = tokens;
  r.k = k;
  r.gate_mode = mode;
  const auto n = static_cast<size_t>(tokens * k);
  r.experts.assign(n, -1);
  r.gates.assign(n, 0.0f);
  r.logits.assign(n, 0.0f);
  r.log_normalizer.assign(static_cast<size_t>(tokens), 0.0);
  r.shortlist_size.assign(static_cast<size_t>(tokens), 0);
  return r;
}

namespace {

template <typename T>
TensorView host_view(std::vector<T>& v, DType dtype, int64_t rows, int64_t cols) {
  return TensorView(v.data(), dtype, Device::host(), rows, cols);
}

template <typename T>
TensorView host_view(const std::vector<T>& v, DType dtype, int64_t rows, int64_t cols) {
  return host_view(const_cast<std::vector<T>&>(v), dtype, rows, cols);
}

}  // namespace

void finalize_gates(Routes& r, const Compute& compute) {
  const int64_t T = r.tokens;
  StagedOut gates(compute, host_view(r.gates, DType::kF32, T, r.k));
  StagedOut norm(compute, host_view(r.log_normalizer, DType::kF64, T, 1),
                 /*initialized=*/r.gate_mode == GateMode::kShortlist);
  const Staged logits(compute, host_view(r.logits, DType::kF32, T, r.k));
  if (r.gate_mode != GateMode::kShortlist) {
    compute.ops->finalize_gates(logits, TensorView(), norm, gates, gate_function(r.gate_mode),
                                compute.stream);
  } else {
    // The normalizer is given: as (max, sum) pairs it is (value, 1) exactly
    // when max + log(1) = value, which adds +0 to it.
    std::vector<double> lse(static_cast<size_t>(2 * T));
    for (int64_t t = 0; t < T; ++t) {
      lse[2 * t] = r.log_normalizer[t];
      lse[2 * t + 1] = 1.0;
    }
    const Staged pairs(compute, host_view(lse, DType::kF64, T, 2));
    compute.ops->finalize_gates(logits, pairs, norm, gates, GateFunction::kSoftmax, compute.stream);
  }
  gates.finish();
  norm.finish();
}

DeviceRoutes make_device_routes(const Compute& compute, int64_t tokens, int k, GateMode mode) {
  const Ops& ops = *compute.ops;
  DeviceRoutes r;
  r.tokens = tokens;
  r.k = k;
  r.gate_mode = mode;
  r.experts = ops.empty(DType::kI32, tokens, k);
  r.gates = ops.empty(DType::kF32, tokens, k);
  r.logits = ops.empty(DType::kF32, tokens, k);
  r.log_normalizer = ops.empty(DType::kF64, tokens, 1);
  r.shortlist_size = ops.empty(DType::kI32, tokens, 1);
  return r;
}

Routes DeviceRoutes::to_host(const Compute& compute) const {
  Routes r = make_routes(tokens, k, gate_mode);
  const Ops& ops = *compute.ops;
  ops.copy(host_view(r.experts, DType::kI32, tokens, k), experts, compute.stream);
  ops.copy(host_view(r.gates, DType::kF32, tokens, k), gates, compute.stream);
  ops.copy(host_view(r.logits, DType::kF32, tokens, k), logits, compute.stream);
  ops.copy(host_view(r.log_normalizer, DType::kF64, tokens, 1), log_normalizer, compute.stream);
  ops.copy(host_view(r.shortlist_size, DType::kI32, tokens, 1), shortlist_size, compute.stream);
  if (has_probes()) {
    r.probe_offsets = host_vector<int64_t>(compute, probe_offsets);
    r.probed_codewords = host_vector<int32_t>(compute, probed_codewords);
  }
  ops.synchronize(compute.stream);
  return r;
}

DeviceRoutes to_device(const Compute& compute, const Routes& r) {
  const int64_t T = r.tokens;
  DeviceRoutes d = make_device_routes(compute, T, r.k, r.gate_mode);
  const Ops& ops = *compute.ops;
  ops.copy(d.experts, host_view(r.experts, DType::kI32, T, r.k), compute.stream);
  ops.copy(d.gates, host_view(r.gates, DType::kF32, T, r.k), compute.stream);
  ops.copy(d.logits, host_view(r.logits, DType::kF32, T, r.k), compute.stream);
  ops.copy(d.log_normalizer, host_view(r.log_normalizer, DType::kF64, T, 1), compute.stream);
  ops.copy(d.shortlist_size, host_view(r.shortlist_size, DType::kI32, T, 1), compute.stream);
  if (r.probe_offsets.size() == static_cast<size_t>(T + 1)) {
    d.probe_offsets = device_vector(compute, r.probe_offsets);
    d.probed_codewords = device_vector(compute, r.probed_codewords);
  }
  return d;
}

SparseRowGrad to_host(const Compute& compute, const RowGrads& g) {
  SparseRowGrad out;
  out.rows = host_vector<int32_t>(compute, g.rows);
  out.values = Matrix(g.count, g.values.cols());
  compute.ops->copy(host_view(out.values.storage(), DType::kF32, g.count, g.values.cols()),
                    g.values, compute.stream);
  compute.ops->synchronize(compute.stream);
  return out;
}

RowGrads to_device(const Compute& compute, const SparseRowGrad& grads) {
  RowGrads out;
  out.count = static_cast<int64_t>(grads.rows.size());
  out.rows = device_vector(compute, grads.rows);
  out.values = compute.ops->empty(DType::kF32, grads.values.rows(), grads.values.cols());
  compute.ops->copy(out.values, grads.values.view(), compute.stream);
  compute.ops->synchronize(compute.stream);
  return out;
}

SparseRowGrad with_rows_hit(SparseRowGrad grads, std::vector<int32_t> hit) {
  std::sort(hit.begin(), hit.end());
  hit.erase(std::unique(hit.begin(), hit.end()), hit.end());
  if (hit.size() == grads.rows.size()) return grads;  // the op listed every row
  const int64_t width = grads.values.cols();
  SparseRowGrad out;
  out.rows = hit;
  out.values = Matrix(static_cast<int64_t>(hit.size()), width);  // zeros
  size_t from = 0;
  for (size_t i = 0; i < hit.size() && from < grads.rows.size(); ++i)
    if (grads.rows[from] == hit[i]) {
      std::copy_n(grads.values.row(static_cast<int64_t>(from)), width,
                  out.values.row(static_cast<int64_t>(i)));
      ++from;
    }
  return out;
}

RouterGradients DeviceRouterGradients::to_host(const Compute& compute) const {
  RouterGradients g;
  g.d_tokens = Matrix(d_tokens.rows(), d_tokens.cols());
  compute.ops->copy(host_view(g.d_tokens.storage(), DType::kF32, d_tokens.rows(), d_tokens.cols()),
                    d_tokens, compute.stream);
  g.d_centers = router::to_host(compute, d_centers);
  return g;
}

// ---- checks -------------------------------------------------------------

void require_rows_of(const Compute& compute, TensorView m, int64_t dim, const char* what) {
  if (m.device != compute.ops->device())
    fail(std::string(what) + " are on " + to_string(m.device) + ", the router's ops (" +
         compute.ops->name() + ") on " + to_string(compute.ops->device()));
  if (m.dtype != DType::kF32 && m.dtype != DType::kBF16)
    fail(std::string(what) + " are " + to_string(m.dtype) + ", expected f32 or bf16");
  if (m.cols != dim)
    fail(std::string(what) + " has " + std::to_string(m.cols) + " columns, expected " +
         std::to_string(dim));
}

double require_finite_rows(const Compute& compute, TensorView m, const char* what,
                           double key_norm_bound) {
  const RowCheck c = compute.ops->check_rows(m, key_norm_bound, compute.stream);
  if (c.nonfinite_row >= 0)
    fail_nonfinite(what, c.nonfinite_row, c.nonfinite_col, c.nonfinite_value);
  if (c.overflow_row >= 0)
    fail_logit_overflow(what, c.overflow_row, c.overflow_norm, key_norm_bound);
  return c.max_norm;
}

void check_route_args(const Compute& compute, TensorView tokens, int64_t dim, int k,
                      int64_t experts, double key_norm_bound) {
  require_rows_of(compute, tokens, dim, "tokens");
  require_in_range(k, 1, experts, "k");
  require_finite_rows(compute, tokens, "tokens", key_norm_bound);
}

void check_route_args(MatrixView tokens, int64_t dim, int k, int64_t experts,
                      double key_norm_bound) {
  check_route_args(host_compute(), tokens, dim, k, experts, key_norm_bound);
}

void check_gate_grads(const Compute& compute, const DeviceRoutes& routes, TensorView tokens,
                      TensorView d_gates) {
  if (tokens.rows != routes.tokens)
    fail("backward: tokens has " + std::to_string(tokens.rows) + " rows but the routes hold " +
         std::to_string(routes.tokens));
  if (d_gates.rows != routes.tokens || d_gates.cols != routes.k)
    fail("backward: d_gates is [" + std::to_string(d_gates.rows) + ", " +
         std::to_string(d_gates.cols) + "], expected [" + std::to_string(routes.tokens) + ", " +
         std::to_string(routes.k) + "]");
  if (d_gates.device != compute.ops->device())
    fail("backward: d_gates are on " + to_string(d_gates.device) + ", the router's ops on " +
         to_string(compute.ops->device()));
  require_finite_rows(compute, d_gates, "d_gates");
}

// ---- backward -----------------------------------------------------------

DeviceRouterGradients center_router_backward(const Compute& compute, TensorView tokens,
                                             const DeviceRoutes& routes, TensorView d_gates,
                                             TensorView keys, const ShortlistEntries* shortlist) {
  check_gate_grads(compute, routes, tokens, d_gates);
  const Ops& ops = *compute.ops;
  const int64_t T = routes.tokens, k = routes.k;
  // The normalizing set: each token's chosen experts with their logits, or
  // its shortlist, rescored.
  Tensor token, expert, z;
  TensorView experts_of, z_of;
  if (routes.gate_mode != GateMode::kShortlist) {
    std::vector<int32_t> t_of(static_cast<size_t>(T * k));
    for (int64_t i = 0; i < T * k; ++i) t_of[i] = static_cast<int32_t>(i / k);
    token = device_vector(compute, t_of);
    experts_of = TensorView(routes.experts.view().data, DType::kI32, ops.device(), T * k, 1);
    z_of = TensorView(routes.logits.view().data, DType::kF32, ops.device(), T * k, 1);
  } else {
    if (shortlist == nullptr) fail("backward: shortlist gates need the shortlist");
    token = device_vector(compute, shortlist->token);
    expert = device_vector(compute, shortlist->expert);
    z = ops.empty(DType::kF32, token.rows(), 1);
    ops.score_pairs(tokens, keys, token, expert, z, compute.stream);
    experts_of = expert;
    z_of = z;
  }
  const Tensor coef = ops.empty(DType::kF64, token.rows(), 1);
  ops.logit_grads(token, experts_of, z_of, routes.experts, routes.gates, d_gates,
                  routes.log_normalizer, coef, gate_function(routes.gate_mode), compute.stream);
  DeviceRouterGradients g;
  g.d_tokens = ops.empty(DType::kF32, T, tokens.cols);
  g.d_centers =
      ops.accumulate_row_grads(tokens, keys, {token, experts_of, coef}, g.d_tokens, compute.stream);
  return g;
}

}  // namespace airmoe::inline router
