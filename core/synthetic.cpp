#include "core/synthetic.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/checks.h"
#include "core/splitmix.h"

namespace airmoe::inline core {
namespace {

// One independent sequence per (kind, row), so the data does not depend on
// the thread count.
SplitMix64 row_sequence(uint64_t seed, uint64_t kind, uint64_t row) {
  SplitMix64 s{seed * 0x100000001B3ull ^ (kind << 56) ^ row};
  s.next();
  return s;
}

// out = scale * normalize(base + basis^T z spread / sqrt(r) + noise * n / sqrt(d)),
// z ~ N(0, I_r), n ~ N(0, I_d): a step along the cluster's manifold plus a
// little isotropic noise.
void perturb(const float* base, const Matrix& basis, double spread, double noise, double scale,
             SplitMix64& s, float* out) {
  const int64_t d = basis.cols(), r = basis.rows();
  std::vector<double> v(base, base + d);
  for (int64_t i = 0; i < r; ++i) {
    const double z = s.normal() * spread / std::sqrt(static_cast<double>(r));
    const float* b = basis.row(i);
    for (int64_t c = 0; c < d; ++c) v[c] += z * b[c];
  }
  const double per = noise / std::sqrt(static_cast<double>(d));
  double n2 = 0.0;
  for (int64_t c = 0; c < d; ++c) {
    v[c] += per * s.normal();
    n2 += v[c] * v[c];
  }
  const double inv = scale / std::sqrt(n2);
  for (int64_t c = 0; c < d; ++c) out[c] = static_cast<float>(v[c] * inv);
}

}  // namespace

SyntheticConfig synthetic_preset(const std::string& name) {
  SyntheticConfig c;
  if (name == "default") return c;
  if (name == "hard") {
    c.clusters = 16;
    c.latent_dim = 32;
    c.expert_spread = 1.5;
    c.token_spread = 0.3;
    return c;
  }
  fail("synthetic preset '" + name + "' is unknown (expected 'default' or 'hard')");
}

Matrix random_matrix(int64_t rows, int64_t cols, double scale, uint64_t seed) {
  Matrix m(rows, cols);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    SplitMix64 s = row_sequence(seed, 1, static_cast<uint64_t>(r));
    for (int64_t c = 0; c < cols; ++c) m(r, c) = static_cast<float>(scale * s.normal());
  }
  return m;
}

SyntheticGenerator::SyntheticGenerator(const SyntheticConfig& cfg) : cfg_(cfg) {
  if (cfg.experts < 1 || cfg.dim < 1 || cfg.tokens < 0 || cfg.clusters < 1)
    fail("synthetic: need experts >= 1, dim >= 1, tokens >= 0, clusters >= 1");
  const int64_t d = cfg.dim;
  // Cluster directions: normalized Gaussian vectors.
  Matrix dirs(cfg.clusters, d);
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < cfg.clusters; ++g) {
    SplitMix64 s = row_sequence(cfg.seed, 2, static_cast<uint64_t>(g));
    for (int64_t c = 0; c < d; ++c) dirs(g, c) = static_cast<float>(s.normal());
    double n2 = 0.0;
    for (int64_t c = 0; c < d; ++c) n2 += static_cast<double>(dirs(g, c)) * dirs(g, c);
    for (int64_t c = 0; c < d; ++c) dirs(g, c) = static_cast<float>(dirs(g, c) / std::sqrt(n2));
  }
  // Each cluster's manifold: latent_dim Gaussian directions of unit norm
  // (nearly orthogonal to each other and to the cluster direction at large d).
  const int64_t r = std::max<int64_t>(cfg.latent_dim, 0);
  bases_.resize(static_cast<size_t>(cfg.clusters));
  for (int64_t g = 0; g < cfg.clusters; ++g)
    bases_[g] = random_matrix(r, d, 1.0 / std::sqrt(static_cast<double>(d)),
                              cfg.seed * 1000003ull + static_cast<uint64_t>(g));
  centers_ = Matrix(cfg.experts, d);
  cluster_of_.resize(static_cast<size_t>(cfg.experts));
  unit_ = Matrix(cfg.experts, d);
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < cfg.experts; ++e) {
    SplitMix64 s = row_sequence(cfg.seed, 3, static_cast<uint64_t>(e));
    const int64_t g = static_cast<int64_t>(s.next() % static_cast<uint64_t>(cfg.clusters));
    cluster_of_[e] = static_cast<int32_t>(g);
    perturb(dirs.row(g), bases_[g], cfg.expert_spread, cfg.noise, 1.0, s, unit_.row(e));
    const double norm = std::exp(cfg.norm_spread * s.normal());
    for (int64_t c = 0; c < d; ++c) centers_(e, c) = static_cast<float>(unit_(e, c) * norm);
  }
}

Matrix SyntheticGenerator::tokens(int64_t first, int64_t count) const {
  if (first < 0 || count < 0)
    fail("synthetic tokens: need first >= 0 and count >= 0, got " + std::to_string(first) + ", " +
         std::to_string(count));
  Matrix out(count, cfg_.dim);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    SplitMix64 s = row_sequence(cfg_.seed, 4, static_cast<uint64_t>(first + i));
    const int64_t e = static_cast<int64_t>(s.next() % static_cast<uint64_t>(cfg_.experts));
    perturb(unit_.row(e), bases_[cluster_of_[e]], cfg_.token_spread, cfg_.noise, cfg_.token_scale,
            s, out.row(i));
  }
  return out;
}

SyntheticData make_synthetic(const SyntheticConfig& cfg) {
  SyntheticGenerator gen(cfg);
  return {gen.centers(), gen.tokens(0, cfg.tokens)};
}

}  // namespace airmoe::inline core
