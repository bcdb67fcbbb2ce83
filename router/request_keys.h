// Low-bit copies of every expert's key, so that a home rank can prove most
// of a token's shortlist out of its exact top-k before it asks the ranks
// that hold those experts (the distributed router's scoring requests go
// only to the owners of what is left: its "contenders").
//
// Expert e's key w_e is kept as ŵ_e = s_e q_e, q_e in [-(2^(b-1) - 1),
// 2^(b-1) - 1]^d (b = 2 to 16 bits, in one byte up to 8 bits and two
// above; one scale per expert). For a token h the
// approximate score h·ŵ_e is within
//   β_e = min(|h|₁ · max_i |w_ei - ŵ_ei|, |h|₂ · |w_e - ŵ_e|₂)
// of h·w_e, and a slack covers the float32 rounding of both the exact score
// (however the scan sums it) and the approximate one. An expert whose upper
// bound is below the k-th largest lower bound over the shortlist cannot be in
// its exact top-k: its score, as any backend computes it, is strictly below
// the k-th, so dropping it changes no route, no logit and no tie.
//
// Keys go stale as training moves the centers. Rather than quantize and
// replicate every key again after each step, the holder may give each
// expert its drift δ_e ≥ |w_e - w_e'|₂ since the keys were made from w_e':
// the bound adds |h|₂ · δ_e, and stays certain.
//
// The keys depend only on the centers and the bits, never on the ranks: the
// contenders are the same for any P. No MPI here (the distributed router
// gathers the rows, runtime/).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "core/matrix.h"
#include "router/inverted_lists.h"
#include "router/routes.h"

namespace airmoe::inline router {

// Int32 ids per token, CSR over tokens.
struct IdsPerToken {
  std::vector<int64_t> offsets{0};  // [T + 1]
  std::vector<int32_t> ids;
  std::span<const int32_t> of(int64_t t) const {
    return {ids.data() + offsets[t], static_cast<size_t>(offsets[t + 1] - offsets[t])};
  }
};
// For every token, the shortlisted experts that may be in its exact top-k,
// ascending.
using Contenders = IdsPerToken;
// A token's shortlist as groups of experts (its probed lists, or the
// segments of query lists it scans).
using TokenGroups = IdsPerToken;

// How a holder of request keys kept them current: full gathers (the first
// one included) and drift-only updates since the keys were turned on.
struct RequestKeyCounts {
  int64_t gathers = 0;
  int64_t drift_updates = 0;
};

// Rows of quantized keys: what one rank contributes and what every rank
// ends up holding for all E experts.
struct QuantizedKeys {
  int bits = 0;
  int64_t dim = 0;
  std::vector<int8_t> q8;        // [n, dim]: the codes, with bits <= 8
  std::vector<int16_t> q16;      // [n, dim]: the codes, with bits > 8
  std::vector<float> scale;      // [n]: s_e
  std::vector<float> error;      // [n]: |w_e - ŵ_e|₂, rounded up
  std::vector<float> error_max;  // [n]: its largest entry, rounded up
  std::vector<float> norm;       // [n]: |w_e|₂, rounded up

  // n rows of zeros.
  QuantizedKeys(int bits, int64_t dim, int64_t rows);
  QuantizedKeys() = default;
  int64_t rows() const { return static_cast<int64_t>(scale.size()); }
  int code_bytes() const { return bits <= 8 ? 1 : 2; }
  int32_t code(int64_t e, int64_t i) const {
    return bits <= 8 ? q8[e * dim + i] : q16[e * dim + i];
  }
  // Row e's codes as bytes (code_bytes() * dim of them), to send or receive.
  const char* codes_of(int64_t e) const;
  char* codes_of(int64_t e);
};

// Refuses bits outside [2, 16] (UsageError naming `argument`).
void check_request_key_bits(int bits, const std::string& argument = "request key bits");
// The rows of `centers`, each quantized on its own (the same bits whatever
// rows it is given with).
QuantizedKeys quantize_keys(MatrixView centers, int bits);
// |a - b|₂ over n entries, rounded up to a float: an expert's drift.
float drift_norm(const float* a, const float* b, int64_t n);

class RequestKeys {
 public:
  RequestKeys() = default;
  // All E experts' keys, row e expert e.
  explicit RequestKeys(QuantizedKeys keys);
  RequestKeys(MatrixView centers, int bits) : RequestKeys(quantize_keys(centers, bits)) {}

  bool empty() const { return keys_.rows() == 0; }
  int bits() const { return keys_.bits; }
  int64_t experts() const { return keys_.rows(); }
  int64_t dim() const { return keys_.dim; }
  // What a rank holds: the codes and five floats per expert (the drift).
  int64_t bytes() const { return experts() * (dim() * keys_.code_bytes() + 20); }
  const QuantizedKeys& keys() const { return keys_; }

  // Each expert's drift since its key was made (E entries, finite, >= 0);
  // the keys themselves stay. Replaces the previous drift.
  void set_drift(std::vector<float> drift);
  const std::vector<float>& drift() const { return drift_; }  // empty: none

  // Every token's contenders for the top-k by z + b (bias: E entries, or
  // empty). A token's shortlist is the experts of its groups (probed lists,
  // or the segments of query lists): groups.of(t) names them, members(g)
  // gives group g's experts. An expert in several of a token's groups counts
  // once. Fewer than k distinct candidates: all are kept. Each group's keys
  // are scored against all the tokens that name it at once (a GEMM of the
  // host ops: keys widened to float32 block by block).
  Contenders contenders(MatrixView tokens, int k, std::span<const float> bias,
                        const TokenGroups& groups,
                        const std::function<std::span<const int32_t>(int32_t)>& members) const;

 private:
  // Bounds of every (token, candidate) in token order; see request_keys.cpp.
  struct Bounds;
  void bound(double z, double h1, double h2, int32_t e, std::span<const float> bias, double& upper,
             double& lower) const;
  Bounds bound_groups(MatrixView tokens, std::span<const float> bias, const TokenGroups& groups,
                      const std::function<std::span<const int32_t>(int32_t)>& members) const;
  QuantizedKeys keys_;
  std::vector<float> drift_;  // [E] or empty
};

// Token t's probed codewords in `routes`.
inline std::span<const int32_t> probed_of(const Routes& routes, int64_t t) {
  return {routes.probed_codewords.data() + routes.probe_offsets[t],
          static_cast<size_t>(routes.probe_offsets[t + 1] - routes.probe_offsets[t])};
}

// Sets the contenders of AIR routes over plain lists (a token's shortlist:
// the members of its probed lists), for the top-k by z + b (bias: E
// entries, or empty).
void set_contenders(Routes& routes, MatrixView tokens, const RequestKeys& keys,
                    const InvertedLists& lists, std::span<const float> bias = {});

}  // namespace airmoe::inline router
