#include "router/codebook.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>

#include "core/checks.h"
#include "core/parallel_errors.h"
#include "router/scoring.h"

namespace airmoe::inline router {
namespace {

constexpr int64_t kAssignChunk = 2048;

// Best codeword and its score for each row, scored in chunks of rows so the
// score buffer stays small whatever E is.
void nearest(MatrixView codewords, MatrixView rows, std::vector<int32_t>& best,
             std::vector<float>& best_score) {
  const int64_t C = codewords.rows;
  best.assign(static_cast<size_t>(rows.rows), 0);
  best_score.assign(static_cast<size_t>(rows.rows), 0.0f);
  std::vector<float> scores(static_cast<size_t>(std::min(rows.rows, kAssignChunk) * C));
  for (int64_t r0 = 0; r0 < rows.rows; r0 += kAssignChunk) {
    const int64_t n = std::min(kAssignChunk, rows.rows - r0);
    score_nt(rows.row(r0), rows.cols, codewords.data, codewords.cols, n, C, rows.cols,
             scores.data(), C);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float* s = scores.data() + i * C;
      int32_t arg = 0;
      for (int64_t c = 1; c < C; ++c)
        if (s[c] > s[arg]) arg = static_cast<int32_t>(c);
      best[r0 + i] = arg;
      best_score[r0 + i] = s[arg];
    }
  }
}

}  // namespace

Matrix normalize_rows(MatrixView rows, const char* what) {
  require_finite(rows, what);
  Matrix out(rows.rows, rows.cols);
  int64_t zero_row = -1;
#pragma omp parallel for schedule(static) reduction(max : zero_row)
  for (int64_t r = 0; r < rows.rows; ++r) {
    const float* x = rows.row(r);
    double norm2 = 0.0;
    for (int64_t c = 0; c < rows.cols; ++c) norm2 += static_cast<double>(x[c]) * x[c];
    if (norm2 == 0.0) {
      zero_row = std::max(zero_row, r);
      continue;
    }
    const double inv = 1.0 / std::sqrt(norm2);
    for (int64_t c = 0; c < rows.cols; ++c) out(r, c) = static_cast<float>(x[c] * inv);
  }
  if (zero_row >= 0) {
    // Report the first zero row, not the last, for a stable message.
    for (int64_t r = 0; r < rows.rows; ++r) {
      bool zero = true;
      for (int64_t c = 0; c < rows.cols && zero; ++c) zero = rows(r, c) == 0.0f;
      if (zero) fail(std::string(what) + " row " + std::to_string(r) + " has zero norm");
    }
  }
  return out;
}

Codebook::Codebook(MatrixView codewords) : codewords_(normalize_rows(codewords, "codewords")) {
  if (codewords.rows < 1) fail("codebook needs at least one codeword");
}

Codebook Codebook::from_unit_rows(MatrixView unit_codewords) {
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
  out.codewords_ = Matrix(unit_codewords.rows, unit_codewords.cols);
  std::copy_n(unit_codewords.data, unit_codewords.rows * unit_codewords.cols,
              out.codewords_.data());
  return out;
}

std::vector<int32_t> Codebook::assign(MatrixView unit_rows) const {
  require_cols(unit_rows, dim(), "rows to assign");
  std::vector<int32_t> best;
  std::vector<float> score;
  nearest(codewords_.view(), unit_rows, best, score);
  return best;
}

std::vector<int32_t> Codebook::assign_capped(MatrixView unit_rows, int64_t cap) const {
  require_cols(unit_rows, dim(), "rows to assign");
  const int64_t n = unit_rows.rows, C = size();
  if (cap <= 0) return assign(unit_rows);
  if (cap * C < n)
    fail("list cap " + std::to_string(cap) + " x " + std::to_string(C) + " lists cannot hold " +
         std::to_string(n) + " experts");
  std::vector<int32_t> best;
  std::vector<float> best_score;
  nearest(codewords_.view(), unit_rows, best, best_score);
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
      score_nt(unit_rows.row(e), dim(), codewords_.data(), dim(), 1, C, dim(), scores.data(), C);
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

KMeansStats Codebook::compute_stats(MatrixView unit_rows, const int32_t* expert_ids) const {
  require_cols(unit_rows, dim(), "rows for k-means stats");
  const int64_t C = size(), d = dim();
  std::vector<int32_t> best;
  std::vector<float> score;
  nearest(codewords_.view(), unit_rows, best, score);
  KMeansStats total(C, d);
  // Integer sums: per-thread partials can be added in any order.
  ParallelErrors errors;  // the partials' allocation may throw
#pragma omp parallel
  {
    KMeansStats part;
    const bool ready = errors.run([&] { part = KMeansStats(C, d); });
#pragma omp for schedule(static)
    for (int64_t r = 0; r < unit_rows.rows; ++r) {
      if (!ready) continue;
      const int32_t c = best[r];
      const int32_t id = expert_ids ? expert_ids[r] : static_cast<int32_t>(r);
      const float* x = unit_rows.row(r);
      int64_t* s = part.sums.data() + c * d;
      for (int64_t j = 0; j < d; ++j) s[j] += to_fixed(x[j]);
      part.counts[c] += 1;
      const int64_t cf = to_fixed(score[r]);
      part.objective += cf;
      if (farther_member(cf, id, part.farthest_cos[c], part.farthest_expert[c])) {
        part.farthest_cos[c] = cf;
        part.farthest_expert[c] = id;
      }
    }
    if (ready) {
#pragma omp critical
      total += part;
    }
  }
  errors.rethrow();
  return total;
}

int64_t Codebook::apply(const KMeansStats& stats, double step, const RowLookup& unit_row_of) {
  const int64_t C = size(), d = dim();
  if (stats.codewords != C || stats.dim != d)
    fail("k-means stats are [" + std::to_string(stats.codewords) + ", " +
         std::to_string(stats.dim) + "] but the codebook is [" + std::to_string(C) + ", " +
         std::to_string(d) + "]");
  if (!(step > 0.0 && step <= 1.0))
    fail("codebook update step = " + std::to_string(step) + " is outside (0, 1]");
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
      v[j] = (1.0 - step) * codewords_(c, j) + step * (static_cast<double>(s[j]) * inv);
      m2 += v[j] * v[j];
    }
    if (m2 == 0.0) continue;
    const double minv = 1.0 / std::sqrt(m2);
    for (int64_t j = 0; j < d; ++j) codewords_(c, j) = static_cast<float>(v[j] * minv);
  }

  const std::vector<Repair> repairs = plan_repairs(stats);
  for (const Repair& r : repairs) unit_row_of(r.expert, codewords_.row(r.codeword));
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

Codebook train_codebook(MatrixView centers, const KMeansOptions& options, KMeansReport* report) {
  const int64_t E = centers.rows, C = options.codewords;
  if (E < 1) fail("train_codebook: no expert centers");
  require_expert_count(E, "train_codebook: centers rows E");
  if (C < 1 || C > E)
    fail("number of codewords C = " + std::to_string(C) +
         " is outside [1, E = " + std::to_string(E) + "]");
  if (options.iterations < 0) fail("k-means iterations must be >= 0");
  const Matrix unit = normalize_rows(centers, "centers");
  const int64_t d = unit.cols();

  // k-means++ on the sphere (distance 1 - cos) over a seeded sample of at most
  // 8 C points: seeding is C sequential passes, so its sample stays small.
  std::mt19937_64 rng(options.seed);
  const int64_t sample_size = std::min(E, 8 * C);
  std::vector<int32_t> sample(static_cast<size_t>(E));
  std::iota(sample.begin(), sample.end(), 0);
  if (sample_size < E) {
    for (int64_t i = 0; i < sample_size; ++i) {
      std::uniform_int_distribution<int64_t> pick(i, E - 1);
      std::swap(sample[i], sample[pick(rng)]);
    }
    sample.resize(static_cast<size_t>(sample_size));
    std::sort(sample.begin(), sample.end());
  }
  Matrix pts(sample_size, d);
  for (int64_t i = 0; i < sample_size; ++i) std::copy_n(unit.row(sample[i]), d, pts.row(i));

  Matrix seeds(C, d);
  std::vector<float> best_cos(static_cast<size_t>(sample_size), -2.0f);
  std::vector<float> cos_new(static_cast<size_t>(sample_size));
  std::vector<char> taken(static_cast<size_t>(sample_size), 0);
  int64_t pick = std::uniform_int_distribution<int64_t>(0, sample_size - 1)(rng);
  for (int64_t c = 0; c < C; ++c) {
    std::copy_n(pts.row(pick), d, seeds.row(c));
    taken[pick] = 1;
    if (c + 1 == C) break;
    score_nt(pts.data(), d, seeds.row(c), d, sample_size, 1, d, cos_new.data(), 1);
    double total = 0.0;
    for (int64_t i = 0; i < sample_size; ++i) {
      best_cos[i] = std::max(best_cos[i], cos_new[i]);
      total += std::max(0.0, 1.0 - static_cast<double>(best_cos[i]));
    }
    pick = -1;
    if (total > 0.0) {
      const double u = std::uniform_real_distribution<double>(0.0, total)(rng);
      double acc = 0.0;
      for (int64_t i = 0; i < sample_size; ++i) {
        acc += std::max(0.0, 1.0 - static_cast<double>(best_cos[i]));
        if (acc > u && !taken[i]) {
          pick = i;
          break;
        }
      }
    }
    if (pick < 0)  // every point coincides with a seed (or rounding): next untaken
      for (int64_t i = 0; i < sample_size && pick < 0; ++i)
        if (!taken[i]) pick = i;
  }

  Codebook cb(seeds.view());
  auto lookup = [&](int32_t e, float* out) { std::copy_n(unit.row(e), d, out); };
  for (int it = 0; it < options.iterations; ++it) {
    const KMeansStats stats = cb.compute_stats(unit.view());
    if (report) report->objective.push_back(stats.mean_objective());
    const int64_t repaired = cb.apply(stats, 1.0, lookup);
    if (report) report->repaired += repaired;
  }
  return cb;
}

void adaptive_update(Codebook& codebook, MatrixView centers, double step, int updates) {
  require_cols(centers, codebook.dim(), "centers");
  const Matrix unit = normalize_rows(centers, "centers");
  auto lookup = [&](int32_t e, float* out) { std::copy_n(unit.row(e), unit.cols(), out); };
  for (int u = 0; u < updates; ++u)
    codebook.apply(codebook.compute_stats(unit.view()), step, lookup);
}

}  // namespace airmoe::inline router
