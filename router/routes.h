// What a router returns, how gates are formed from logits, and the gradient
// of the gates — shared by every router so that their outputs agree bit for
// bit whenever they chose the same experts.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/matrix.h"
#include "ops/log_sum_exp.h"

namespace airmoe::inline router {

enum class GateMode {
  kChosen,     // softmax over the k chosen logits (the default)
  kShortlist,  // exp(z) / sum of exp over every expert the router scored
};

const char* to_string(GateMode mode);
GateMode gate_mode_from_string(const std::string& name);

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
  std::vector<int32_t> probes;

  const int32_t* experts_of(int64_t t) const { return experts.data() + t * k; }
  const float* gates_of(int64_t t) const { return gates.data() + t * k; }
};

Routes make_routes(int64_t tokens, int k, GateMode mode);

// gates[t, j] = exp(logits[t, j] - log_normalizer[t]) for every token. With
// kChosen, the normalizer is first computed from the k chosen logits.
void finalize_gates(Routes& routes);

// Gradient of the gates with respect to a parameter row set: the rows hit,
// ascending, and dL/d(row) for each.
struct SparseRowGrad {
  std::vector<int32_t> rows;
  Matrix values;  // [rows.size(), width]
};

struct RouterGradients {
  Matrix d_tokens;          // [T, d]
  SparseRowGrad d_centers;  // rows of the centers matrix W [E, d]
};

// Sum, for each distinct row r, of coef * x[token] over the (row, token,
// coef) triples, in token order and in double: deterministic whatever order
// the triples were produced in.
struct RowContribution {
  int32_t row;
  int32_t token;
  double coef;
};
SparseRowGrad accumulate_rows(std::vector<RowContribution>& contributions, const float* x,
                              int64_t ldx, int64_t width);

// Backward of the gates for routers whose logit is z_e = <w_e, h>.
//   dL/dz_s = p_s ([s chosen] dL/dg_s - sum_j g_j dL/dg_j) for s in the
//   normalizing set (the chosen k, or with kShortlist the whole shortlist),
//   p_s = exp(z_s - log_normalizer).
// `center(e)` returns expert e's row; `shortlist(t, visit)` calls visit(e) for
// every expert of token t's shortlist (used only with kShortlist).
using CenterLookup = std::function<const float*(int32_t)>;
using ShortlistVisitor = std::function<void(int64_t, const std::function<void(int32_t)>&)>;
RouterGradients center_router_backward(MatrixView tokens, const Routes& routes, MatrixView d_gates,
                                       const CenterLookup& center,
                                       const ShortlistVisitor& shortlist);

// Validates d_gates against routes: shape [T, k] and finite.
void check_gate_grads(const Routes& routes, MatrixView tokens, MatrixView d_gates);

}  // namespace airmoe::inline router
