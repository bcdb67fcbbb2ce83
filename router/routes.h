// What a router returns, how gates are formed from logits, and the gradient
// of the gates — shared by every router so that their outputs agree bit for
// bit whenever they chose the same experts.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/matrix.h"
#include "core/tensor.h"
#include "ops/boundary.h"
#include "ops/log_sum_exp.h"
#include "ops/ops.h"

namespace airmoe::inline router {

enum class GateMode {
  kChosen,     // softmax over the k chosen logits (the default)
  kShortlist,  // exp(z) / sum of exp over every expert the router scored
  kSigmoid,    // sigmoid(z) over the k chosen, renormalized to sum 1
};

const char* to_string(GateMode mode);
GateMode gate_mode_from_string(const std::string& name);
// What the mode's gates are a softmax of (kSigmoid: the log-sigmoids).
GateFunction gate_function(GateMode mode);

// A selection bias b (f32 [E, 1] on the ops' device) from `bias`: E
// entries ([E], [E, 1] or [1, E]; f32 or bf16; on the host or the ops'
// device), every one finite ("bias has 5 entries, expected E = 8", "bias
// entry 3 is nan"). Routers select by z + b and form the gates from z
// (DeepSeek-V3's auxiliary-loss-free balancing); the bias takes no gradient
// and changes nothing else a router holds (set_bias is a copy and a check).
Tensor checked_bias(const Compute& compute, TensorView bias, int64_t experts);
// A host vector as a bias view, [n, 1].
TensorView bias_view(std::span<const float> bias);

// Routing of T tokens to k experts each; row t holds token t's experts, best
// first (higher logit, then lower expert id).
struct Routes {
  int64_t tokens = 0;
  int k = 0;
  GateMode gate_mode = GateMode::kChosen;
  std::vector<int32_t> experts;         // [T, k]
  std::vector<float> gates;             // [T, k]
  std::vector<float> logits;            // [T, k], <w_e, h>
  std::vector<double> log_normalizer;   // [T], log of the softmax denominator
  std::vector<int32_t> shortlist_size;  // [T], experts scored exactly per token
  // AIR only: the codewords each token probed, CSR over tokens.
  std::vector<int64_t> probe_offsets;  // [T + 1]
  std::vector<int32_t> probed_codewords;
  // The distributed router with request keys only (router/request_keys.h):
  // each token's shortlisted experts that may be in its top-k, ascending,
  // CSR over tokens; its scoring requests go only to their owners. Empty:
  // to every rank hosting a segment of a probed list.
  std::vector<int64_t> contender_offsets;  // [T + 1]
  std::vector<int32_t> contenders;

  const int32_t* experts_of(int64_t t) const { return experts.data() + t * k; }
  const float* gates_of(int64_t t) const { return gates.data() + t * k; }
};

Routes make_routes(int64_t tokens, int k, GateMode mode);

// gates[t, j] = exp(u[t, j] - log_normalizer[t]) for every token (u: the
// logits, or their log-sigmoids with kSigmoid). With kChosen and kSigmoid,
// the normalizer is first computed from the k chosen (the ops'
// finalize_gates on the routes' host memory).
void finalize_gates(Routes& routes, const Compute& compute = host_compute());

// Routes on the ops' device: what the routers' TensorView API returns, the
// fields of Routes as tensors (to_host() is the Routes).
struct DeviceRoutes {
  int64_t tokens = 0;
  int k = 0;
  GateMode gate_mode = GateMode::kChosen;
  Tensor experts;         // i32 [T, k]
  Tensor gates;           // f32 [T, k]
  Tensor logits;          // f32 [T, k]
  Tensor log_normalizer;  // f64 [T, 1]
  Tensor shortlist_size;  // i32 [T, 1]
  // AIR only (else empty): the codewords each token probed, CSR over tokens.
  Tensor probe_offsets;     // i64 [T + 1, 1]
  Tensor probed_codewords;  // i32 [probe_offsets[T], 1]

  bool has_probes() const { return probe_offsets.rows() == tokens + 1; }
  TopKView top_k() const { return {logits, experts, {}}; }
  Routes to_host(const Compute& compute) const;
};
// T x k routes of the ops' device, contents undefined.
DeviceRoutes make_device_routes(const Compute& compute, int64_t tokens, int k, GateMode mode);
DeviceRoutes to_device(const Compute& compute, const Routes& routes);

// Gradient of the gates with respect to a parameter row set: the rows hit,
// ascending, and dL/d(row) for each.
struct SparseRowGrad {
  std::vector<int32_t> rows;
  Matrix values;  // [rows.size(), width]
};
SparseRowGrad to_host(const Compute& compute, const RowGrads& grads);
RowGrads to_device(const Compute& compute, const SparseRowGrad& grads);
// The rows of `grads` and every row of `hit` they lack, with zero values:
// where a caller lists the rows its contributions hit, zero coefficients
// included (the ops' sum lists only rows with a nonzero one).
SparseRowGrad with_rows_hit(SparseRowGrad grads, std::vector<int32_t> hit);

struct RouterGradients {
  Matrix d_tokens;          // [T, d]
  SparseRowGrad d_centers;  // rows of the centers matrix W [E, d]
};

struct DeviceRouterGradients {
  Tensor d_tokens;     // f32 [T, d]
  RowGrads d_centers;  // rows of the centers matrix W [E, d]
  RouterGradients to_host(const Compute& compute) const;
};

// The tokens a router's TensorView API takes: on the ops' device, f32 or
// bf16, `dim` columns ("<what> has D columns, expected N").
void require_rows_of(const Compute& compute, TensorView m, int64_t dim, const char* what);
// Every entry of m finite ("<what> row R column C is nan") and, against keys
// of norm at most key_norm_bound, no row whose logits overflow float32
// (core/checks.h require_finite_logits); returns the largest row norm.
double require_finite_rows(const Compute& compute, TensorView m, const char* what,
                           double key_norm_bound = 0.0);

// Shared argument checks of route(): tokens [T, d] finite, 1 <= k <= E, and
// no token whose logits could overflow float32 against keys of norm at most
// key_norm_bound (require_finite_logits): finite inputs give finite gates.
void check_route_args(const Compute& compute, TensorView tokens, int64_t dim, int k,
                      int64_t experts, double key_norm_bound);
void check_route_args(MatrixView tokens, int64_t dim, int k, int64_t experts,
                      double key_norm_bound);

// Validates d_gates against routes and tokens: [T, k], finite.
void check_gate_grads(const Compute& compute, const DeviceRoutes& routes, TensorView tokens,
                      TensorView d_gates);

// Backward of the gates for routers whose logit is z_e = <w_e, h>, on the
// ops:
//   dL/dz_s = p_s ([s chosen] dL/dg_s - sum_j g_j dL/dg_j) for s in the
//   normalizing set (the chosen k, or with kShortlist the whole shortlist),
//   p_s = exp(z_s - log_normalizer); with kSigmoid, p_s = g_s and the
//   factor sigmoid(-z_s) (d log sigmoid(z) / dz);
// then dL/dh = sum_s dz_s w_s (double, in normalizing-set order) and dL/dw_s
// = sum_t dz_{t,s} h_t (double, token order). `keys` holds expert e's row
// at row e; with kShortlist, `shortlist` lists each token's normalizing set,
// token after token (its logits are rescored).
struct ShortlistEntries {
  std::vector<int32_t> token;
  std::vector<int32_t> expert;
};
DeviceRouterGradients center_router_backward(const Compute& compute, TensorView tokens,
                                             const DeviceRoutes& routes, TensorView d_gates,
                                             TensorView keys, const ShortlistEntries* shortlist);

}  // namespace airmoe::inline router
