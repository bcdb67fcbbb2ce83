// A seeded generator of trained-router-like data: expert centers gathered
// around a number of directions on the sphere with varying norms, and tokens
// drawn near experts. Within a cluster, experts spread along a few latent
// directions (trained weights have a low intrinsic dimension), so "near" is
// meaningful: a token's exact top-k are its expert's neighbours on that
// manifold, and the codebook cuts each manifold into several lists. The wider
// the spread and the higher the latent dimension, the more a token's top-k
// straddles list boundaries and the more probes AIR needs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/matrix.h"

namespace airmoe::inline core {

struct SyntheticConfig {
  int64_t experts = 65536;
  int64_t dim = 512;
  int64_t tokens = 4096;
  int64_t clusters = 64;       // directions the experts gather around
  int64_t latent_dim = 8;      // dimension of each cluster's manifold
  double expert_spread = 1.0;  // offset along the manifold, relative to the unit direction
  double token_spread = 0.2;  // a token's offset (on the manifold) from the expert it is drawn from
  double noise = 0.1;         // isotropic noise on every center and token
  double norm_spread = 0.25;  // log-normal sigma of the center norms
  double token_scale = 8.0;   // token norm: sets how peaked the softmax is
  uint64_t seed = 42;
};

// "default" or "hard" (the top-8 of most tokens straddles several lists).
SyntheticConfig synthetic_preset(const std::string& name);

struct SyntheticData {
  Matrix centers;  // [E, d]
  Matrix tokens;   // [T, d]
};

SyntheticData make_synthetic(const SyntheticConfig& config);

// The expert side of a synthetic data set, kept to draw tokens from: token t
// (a global index) comes from its own seeded stream, so tokens(first, count)
// equals rows [first, first + count) of make_synthetic's tokens for any
// config.tokens, and a rank can draw its own batch without the others'.
class SyntheticGenerator {
 public:
  explicit SyntheticGenerator(const SyntheticConfig& config);
  const Matrix& centers() const { return centers_; }
  Matrix tokens(int64_t first, int64_t count) const;

 private:
  SyntheticConfig cfg_;
  std::vector<Matrix> bases_;        // each cluster's manifold
  std::vector<int32_t> cluster_of_;  // per expert
  Matrix unit_;                      // normalized centers, tokens are drawn near them
  Matrix centers_;
};

// Gaussian [rows, cols] matrix scaled by `scale`, seeded; for product keys
// and tests.
Matrix random_matrix(int64_t rows, int64_t cols, double scale, uint64_t seed);

}  // namespace airmoe::inline core
