#include "router/codebook.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>

#include "core/checks.h"
#include "router/routes.h"

namespace airmoe::inline router {
namespace {

// out = rows / |rows| on the ops (rows and out on their device), or the
// error naming the first non-finite entry or zero row.
void normalize_into(const Compute& compute, TensorView rows, TensorView out, const char* what) {
  require_finite_rows(compute, rows, what);
  const int64_t zero = compute.ops->normalize_rows(rows, out, compute.stream);
  if (zero >= 0) fail(std::string(what) + " row " + std::to_string(zero) + " has zero norm");
}

void require_width(TensorView rows, int64_t dim, const char* what) {
  if (rows.cols != dim)
    fail(std::string(what) + " has " + std::to_string(rows.cols) + " columns, expected " +
         std::to_string(dim));
}

}  // namespace

Matrix normalize_rows(MatrixView rows, const char* what) {
  Matrix out(rows.rows, rows.cols);
  normalize_into(host_compute(), rows, out.view(), what);
  return out;
}

Tensor normalize_rows(const Compute& compute, TensorView rows, const char* what) {
  const Staged in(compute, rows);
  Tensor out = compute.ops->empty(DType::kF32, rows.rows, rows.cols);
  normalize_into(compute, in, out, what);
  return out;
}

Codebook::Codebook(MatrixView codewords, Compute compute)
    : compute_(compute), codewords_(normalize_rows(compute, codewords, "codewords")) {
  if (codewords.rows < 1) fail("codebook needs at least one codeword");
}

Codebook Codebook::from_unit_rows(MatrixView unit_codewords, Compute compute) {
  if (unit_codewords.rows < 1) fail("codebook needs at least one codeword");
  require_finite(unit_codewords, "codewords");
  for (int64_t r = 0; r < unit_codewords.rows; ++r) {
    double norm2 = 0.0;
    for (int64_t c = 0; c < unit_codewords.cols; ++c)
      norm2 += static_cast<double>(unit_codewords(r, c)) * unit_codewords(r, c);
    if (std::abs(std::sqrt(norm2) - 1.0) > 1e-3)
      fail("codewords row " + std::to_string(r) + " has norm " + std::to_string(std::sqrt(norm2)) +
           ", not 1");
  }
  Codebook out;
  out.compute_ = compute;
  out.codewords_ = compute.ops->empty(DType::kF32, unit_codewords.rows, unit_codewords.cols);
  compute.ops->copy(out.codewords_, unit_codewords, compute.stream);
  return out;
}

Codebook::Codebook(const Codebook& other)
    : compute_(other.compute_),
      codewords_(other.compute_.ops->empty(DType::kF32, other.size(), other.dim())) {
  compute_.ops->copy(codewords_, other.codewords_, compute_.stream);
}

Codebook& Codebook::operator=(const Codebook& other) {
  if (this != &other) *this = Codebook(other);
  return *this;
}

std::vector<int32_t> Codebook::assign(TensorView unit_rows) const {
  require_width(unit_rows, dim(), "rows to assign");
  const int64_t n = unit_rows.rows;
  const Tensor best = compute_.ops->empty(DType::kI32, n, 1);
  const Tensor score = compute_.ops->empty(DType::kF32, n, 1);
  compute_.ops->nearest(Staged(compute_, unit_rows), codewords_, best, score, compute_.stream);
  return host_vector<int32_t>(compute_, best);
}

std::vector<int32_t> Codebook::assign_capped(TensorView unit_rows, int64_t cap) const {
  require_width(unit_rows, dim(), "rows to assign");
  const int64_t n = unit_rows.rows, C = size();
  if (cap <= 0) return assign(unit_rows);
  if (cap * C < n)
    fail("list cap " + std::to_string(cap) + " x " + std::to_string(C) + " lists cannot hold " +
         std::to_string(n) + " experts");
  const Staged rows(compute_, unit_rows);
  const Tensor best_t = compute_.ops->empty(DType::kI32, n, 1);
  const Tensor score_t = compute_.ops->empty(DType::kF32, n, 1);
  compute_.ops->nearest(rows, codewords_, best_t, score_t, compute_.stream);
  const std::vector<int32_t> best = host_vector<int32_t>(compute_, best_t);
  const std::vector<float> best_score = host_vector<float>(compute_, score_t);
  std::vector<int32_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return best_score[a] > best_score[b] || (best_score[a] == best_score[b] && a < b);
  });
  std::vector<int64_t> fill(static_cast<size_t>(C), 0);
  std::vector<int32_t> out(static_cast<size_t>(n));
  std::vector<float> scores(static_cast<size_t>(C));
  std::vector<int32_t> pref(static_cast<size_t>(C));
  for (int32_t e : order) {
    int32_t c = best[e];
    if (fill[c] >= cap) {
      // Rare: rank every codeword for this expert and take the best with room.
      score_to_host(compute_, rows.view().row_range(e, 1), codewords_, scores.data());
      std::iota(pref.begin(), pref.end(), 0);
      std::sort(pref.begin(), pref.end(), [&](int32_t a, int32_t b) {
        return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
      });
      for (int32_t p : pref)
        if (fill[p] < cap) {
          c = p;
          break;
        }
    }
    out[e] = c;
    ++fill[c];
  }
  return out;
}

KMeansStats Codebook::compute_stats(TensorView unit_rows, const int32_t* expert_ids) const {
  require_width(unit_rows, dim(), "rows for k-means stats");
  const TensorView ids = expert_ids ? TensorView(const_cast<int32_t*>(expert_ids), DType::kI32,
                                                 Device::host(), unit_rows.rows, 1)
                                    : TensorView();
  return compute_.ops->kmeans_stats(Staged(compute_, unit_rows), codewords_, Staged(compute_, ids),
                                    compute_.stream);
}

int64_t Codebook::apply(const KMeansStats& stats, double step, const RowLookup& unit_row_of) {
  const int64_t C = size(), d = dim();
  if (stats.codewords != C || stats.dim != d)
    fail("k-means stats are [" + std::to_string(stats.codewords) + ", " +
         std::to_string(stats.dim) + "] but the codebook is [" + std::to_string(C) + ", " +
         std::to_string(d) + "]");
  if (!(step > 0.0 && step <= 1.0))
    fail("codebook update step = " + std::to_string(step) + " is outside (0, 1]");
  // The update runs on the host, on a copy of the codewords.
  Matrix cw(C, d);
  const TensorView host = cw.view();
  compute_.ops->copy(host, codewords_, compute_.stream);
  compute_.ops->synchronize(compute_.stream);
  std::vector<double> v(static_cast<size_t>(d));
  for (int64_t c = 0; c < C; ++c) {
    if (stats.counts[c] == 0) continue;
    const int64_t* s = stats.sums.data() + c * d;
    double n2 = 0.0;
    for (int64_t j = 0; j < d; ++j) n2 += static_cast<double>(s[j]) * static_cast<double>(s[j]);
    if (n2 == 0.0) continue;  // members cancel exactly: keep the codeword
    const double inv = 1.0 / std::sqrt(n2);
    double m2 = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      v[j] = (1.0 - step) * cw(c, j) + step * (static_cast<double>(s[j]) * inv);
      m2 += v[j] * v[j];
    }
    if (m2 == 0.0) continue;
    const double minv = 1.0 / std::sqrt(m2);
    for (int64_t j = 0; j < d; ++j) cw(c, j) = static_cast<float>(v[j] * minv);
  }

  const std::vector<Repair> repairs = plan_repairs(stats);
  for (const Repair& r : repairs) unit_row_of(r.expert, cw.row(r.codeword));
  compute_.ops->copy(codewords_, host, compute_.stream);
  return static_cast<int64_t>(repairs.size());
}

std::vector<Codebook::Repair> Codebook::plan_repairs(const KMeansStats& stats) {
  // The i-th empty codeword (by index) splits the i-th largest cluster (by
  // count, then index) by moving onto its farthest member.
  std::vector<int32_t> empties, donors;
  for (int64_t c = 0; c < stats.codewords; ++c) {
    if (stats.counts[c] == 0) empties.push_back(static_cast<int32_t>(c));
    if (stats.counts[c] >= 2) donors.push_back(static_cast<int32_t>(c));
  }
  std::sort(donors.begin(), donors.end(), [&](int32_t a, int32_t b) {
    return stats.counts[a] > stats.counts[b] || (stats.counts[a] == stats.counts[b] && a < b);
  });
  std::vector<Repair> out;
  for (size_t i = 0; i < std::min(empties.size(), donors.size()); ++i)
    out.push_back({empties[i], stats.farthest_expert[donors[i]]});
  return out;
}

namespace {

// k-means++ on the sphere (distance 1 - cos) over the rows of `pts` (on the
// host, and `pts_dev` on the ops' device): C seeds, the first and each next
// drawn with probability proportional to its distance to the seeds so far.
Matrix kmeans_pp_seeds(const Compute& compute, const Matrix& pts, TensorView pts_dev, int64_t C,
                       std::mt19937_64& rng) {
  const int64_t n = pts.rows(), d = pts.cols();
  Matrix seeds(C, d);
  std::vector<float> best_cos(static_cast<size_t>(n), -2.0f);
  std::vector<float> cos_new(static_cast<size_t>(n));
  std::vector<char> taken(static_cast<size_t>(n), 0);
  int64_t pick = std::uniform_int_distribution<int64_t>(0, n - 1)(rng);
  for (int64_t c = 0; c < C; ++c) {
    std::copy_n(pts.row(pick), d, seeds.row(c));
    taken[pick] = 1;
    if (c + 1 == C) break;
    score_to_host(compute, pts_dev, TensorView(seeds.view()).row_range(c, 1), cos_new.data());
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      best_cos[i] = std::max(best_cos[i], cos_new[i]);
      total += std::max(0.0, 1.0 - static_cast<double>(best_cos[i]));
    }
    pick = -1;
    if (total > 0.0) {
      const double u = std::uniform_real_distribution<double>(0.0, total)(rng);
      double acc = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        acc += std::max(0.0, 1.0 - static_cast<double>(best_cos[i]));
        if (acc > u && !taken[i]) {
          pick = i;
          break;
        }
      }
    }
    if (pick < 0)  // every point coincides with a seed (or rounding): next untaken
      for (int64_t i = 0; i < n && pick < 0; ++i)
        if (!taken[i]) pick = i;
  }
  return seeds;
}

}  // namespace

Matrix kmeans_seeds(const Compute& compute, int64_t n, const KMeansOptions& options,
                    const SampleRows& rows_at) {
  // k-means++ seeding over a seeded sample of at most 8 C points: seeding is
  // C sequential passes, so its sample stays small.
  std::mt19937_64 rng(options.seed);
  const int64_t sample_size = std::min(n, 8 * options.codewords);
  std::vector<int32_t> sample(static_cast<size_t>(n));
  std::iota(sample.begin(), sample.end(), 0);
  if (sample_size < n) {
    for (int64_t i = 0; i < sample_size; ++i) {
      std::uniform_int_distribution<int64_t> pick(i, n - 1);
      std::swap(sample[i], sample[pick(rng)]);
    }
    sample.resize(static_cast<size_t>(sample_size));
    std::sort(sample.begin(), sample.end());
  }
  const Matrix pts = rows_at(sample);
  if (pts.rows() != sample_size)
    fail("kmeans_seeds: " + std::to_string(pts.rows()) + " sampled rows for " +
         std::to_string(sample_size) + " indices");
  const Staged pts_dev(compute, pts.view());
  return kmeans_pp_seeds(compute, pts, pts_dev, options.codewords, rng);
}

Codebook train_codebook(MatrixView centers, const KMeansOptions& options, KMeansReport* report,
                        Compute compute) {
  const int64_t E = centers.rows, C = options.codewords;
  if (E < 1) fail("train_codebook: no expert centers");
  require_expert_count(E, "train_codebook: centers rows E");
  if (C < 1 || C > E)
    fail("number of codewords C = " + std::to_string(C) +
         " is outside [1, E = " + std::to_string(E) + "]");
  if (options.iterations < 0) fail("k-means iterations must be >= 0");
  const Tensor unit = normalize_rows(compute, centers, "centers");
  const OnHost unit_host(compute, unit);
  const int64_t d = centers.cols;
  const float* unit_rows = unit_host.as<float>();
  const Matrix seeds = kmeans_seeds(compute, E, options, [&](const std::vector<int32_t>& rows) {
    Matrix pts(static_cast<int64_t>(rows.size()), d);
    for (size_t i = 0; i < rows.size(); ++i)
      std::copy_n(unit_rows + static_cast<int64_t>(rows[i]) * d, d,
                  pts.row(static_cast<int64_t>(i)));
    return pts;
  });

  Codebook cb(seeds.view(), compute);
  auto lookup = [&](int32_t e, float* out) { std::copy_n(unit_rows + e * d, d, out); };
  for (int it = 0; it < options.iterations; ++it) {
    const KMeansStats stats = cb.compute_stats(unit);
    if (report) report->objective.push_back(stats.mean_objective());
    const int64_t repaired = cb.apply(stats, 1.0, lookup);
    if (report) report->repaired += repaired;
  }
  return cb;
}

void adaptive_update(Codebook& codebook, MatrixView centers, double step, int updates) {
  require_cols(centers, codebook.dim(), "centers");
  const Tensor unit = normalize_rows(codebook.compute(), centers, "centers");
  const OnHost unit_host(codebook.compute(), unit);
  const int64_t d = centers.cols;
  auto lookup = [&](int32_t e, float* out) {
    std::copy_n(unit_host.as<float>() + static_cast<int64_t>(e) * d, d, out);
  };
  for (int u = 0; u < updates; ++u) codebook.apply(codebook.compute_stats(unit), step, lookup);
}

}  // namespace airmoe::inline router
