#include "router/request_keys.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "core/errors.h"
#include "core/parallel_errors.h"
#include "ops/boundary.h"

namespace airmoe::inline router {

namespace {

// x as a float no smaller than x.
float rounded_up(double x) {
  const auto f = static_cast<float>(x);
  return static_cast<double>(f) >= x ? f : std::nextafter(f, std::numeric_limits<float>::max());
}

}  // namespace

void check_request_key_bits(int bits, const std::string& argument) {
  if (bits < 2 || bits > 16)
    throw UsageError(argument + " = " + std::to_string(bits) +
                     ": request keys take 2 to 16 bits per entry");
}

QuantizedKeys::QuantizedKeys(int bits_, int64_t dim_, int64_t rows)
    : bits(bits_),
      dim(dim_),
      q8(bits_ <= 8 ? static_cast<size_t>(rows * dim_) : 0),
      q16(bits_ > 8 ? static_cast<size_t>(rows * dim_) : 0),
      scale(static_cast<size_t>(rows)),
      error(static_cast<size_t>(rows)),
      error_max(static_cast<size_t>(rows)),
      norm(static_cast<size_t>(rows)) {}

const char* QuantizedKeys::codes_of(int64_t e) const {
  return bits <= 8 ? reinterpret_cast<const char*>(q8.data() + e * dim)
                   : reinterpret_cast<const char*>(q16.data() + e * dim);
}

char* QuantizedKeys::codes_of(int64_t e) {
  return const_cast<char*>(static_cast<const QuantizedKeys&>(*this).codes_of(e));
}

QuantizedKeys quantize_keys(MatrixView centers, int bits) {
  check_request_key_bits(bits);
  const int64_t n = centers.rows, d = centers.cols;
  const int levels = (1 << (bits - 1)) - 1;
  QuantizedKeys k(bits, d, n);
  for (int64_t e = 0; e < n; ++e) {
    const float* w = centers.row(e);
    float largest = 0.0f;
    for (int64_t i = 0; i < d; ++i) largest = std::max(largest, std::fabs(w[i]));
    const float s = largest / static_cast<float>(levels);
    double err2 = 0.0, err_max = 0.0, norm2 = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      const float r = s > 0.0f ? std::nearbyint(w[i] / s) : 0.0f;
      const auto code = static_cast<int32_t>(
          std::clamp(r, static_cast<float>(-levels), static_cast<float>(levels)));
      if (bits <= 8)
        k.q8[static_cast<size_t>(e * d + i)] = static_cast<int8_t>(code);
      else
        k.q16[static_cast<size_t>(e * d + i)] = static_cast<int16_t>(code);
      const double err = static_cast<double>(w[i]) - static_cast<double>(s) * code;
      err2 += err * err;
      err_max = std::max(err_max, std::fabs(err));
      norm2 += static_cast<double>(w[i]) * w[i];
    }
    k.scale[e] = s;
    // The square roots' own rounding (a few ulps of double) is far inside
    // the float rounding up.
    k.error[e] = rounded_up(std::sqrt(err2));
    k.error_max[e] = rounded_up(err_max);
    k.norm[e] = rounded_up(std::sqrt(norm2));
  }
  return k;
}

float drift_norm(const float* a, const float* b, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double diff = static_cast<double>(a[i]) - b[i];
    sum += diff * diff;
  }
  return rounded_up(std::sqrt(sum) * (1.0 + 1e-12));
}

RequestKeys::RequestKeys(QuantizedKeys keys) : keys_(std::move(keys)) {}

void RequestKeys::set_drift(std::vector<float> drift) {
  if (static_cast<int64_t>(drift.size()) != experts())
    throw InternalError("request keys: drift of " + std::to_string(drift.size()) +
                        " experts, the keys hold " + std::to_string(experts()));
  for (float x : drift)
    if (!(x >= 0.0f) || !std::isfinite(x))
      throw InternalError("request keys: a drift of " + std::to_string(x));
  drift_ = std::move(drift);
}

// Every (token, candidate) of the shortlists, in token order (a token's
// groups in its order, each group's members in theirs), with the bounds
// upper >= z + b >= lower of the candidate's score as any backend computes
// it in float32.
struct RequestKeys::Bounds {
  std::vector<int64_t> offsets;  // [T + 1]
  std::vector<int32_t> ids;
  std::vector<double> upper, lower;
};

namespace {

// |h|₁ and |h|₂ of every token, rounded up (1 + 1e-12 covers the double
// sums' own rounding).
void token_norms(MatrixView tokens, std::vector<double>& h1, std::vector<double>& h2) {
  h1.assign(static_cast<size_t>(tokens.rows), 0.0);
  h2.assign(static_cast<size_t>(tokens.rows), 0.0);
  for (int64_t t = 0; t < tokens.rows; ++t) {
    const float* h = tokens.row(t);
    for (int64_t i = 0; i < tokens.cols; ++i) {
      h1[t] += std::fabs(h[i]);
      h2[t] += static_cast<double>(h[i]) * h[i];
    }
    h1[t] *= 1.0 + 1e-12;
    h2[t] = std::sqrt(h2[t]) * (1.0 + 1e-12);
  }
}

// The (token, group) pairs laid out twice: where each pair's candidates go
// in token order, and the pairs of each group together (one GEMM each).
struct PairPlan {
  std::vector<int64_t> candidate_offsets;  // [T + 1]
  std::vector<int64_t> base;               // per pair: its first candidate
  std::vector<int32_t> token;              // per pair
  std::vector<int64_t> group_offsets;      // [G + 1] into by_group
  std::vector<int64_t> by_group;           // pairs, group after group
  int32_t groups() const { return static_cast<int32_t>(group_offsets.size()) - 1; }
};

PairPlan plan_pairs(int64_t T, const TokenGroups& groups,
                    const std::function<std::span<const int32_t>(int32_t)>& members) {
  const auto pairs = groups.ids.size();
  PairPlan plan{std::vector<int64_t>(static_cast<size_t>(T + 1), 0),
                std::vector<int64_t>(pairs),
                std::vector<int32_t>(pairs),
                {},
                std::vector<int64_t>(pairs)};
  int32_t group_count = 0;
  for (int64_t t = 0; t < T; ++t) {
    int64_t at = plan.candidate_offsets[t];
    for (int64_t p = groups.offsets[t]; p < groups.offsets[t + 1]; ++p) {
      plan.base[p] = at;
      plan.token[p] = static_cast<int32_t>(t);
      at += static_cast<int64_t>(members(groups.ids[p]).size());
      group_count = std::max(group_count, groups.ids[p] + 1);
    }
    plan.candidate_offsets[t + 1] = at;
  }
  plan.group_offsets.assign(static_cast<size_t>(group_count) + 1, 0);
  for (int32_t g : groups.ids) ++plan.group_offsets[g + 1];
  for (int32_t g = 0; g < group_count; ++g) plan.group_offsets[g + 1] += plan.group_offsets[g];
  std::vector<int64_t> fill(plan.group_offsets);
  for (size_t p = 0; p < pairs; ++p) plan.by_group[fill[groups.ids[p]]++] = static_cast<int64_t>(p);
  return plan;
}

// Rows `ids` of the keys widened to float32, s_e q_e, into w [ids, dim].
void widen_keys(const QuantizedKeys& keys, std::span<const int32_t> ids, std::vector<float>& w) {
  const int64_t d = keys.dim;
  w.resize(ids.size() * static_cast<size_t>(d));
  for (size_t j = 0; j < ids.size(); ++j)
    for (int64_t i = 0; i < d; ++i)
      w[j * d + i] = keys.scale[ids[j]] * static_cast<float>(keys.code(ids[j], i));
}

}  // namespace

// β_e (with the drift) plus the float32 slack, around z + b.
void RequestKeys::bound(double z, double h1, double h2, int32_t e, std::span<const float> bias,
                        double& upper, double& lower) const {
  constexpr double u = 0x1p-24;  // float32's unit roundoff
  // γ of float32 sums of d + 2 terms: the exact scan's rounding and the
  // approximate score's (its keys widened to s_e q_e in float32 first),
  // each at most γ |h|₂ |key|₂ whatever the order.
  const double n = static_cast<double>(keys_.dim + 2), gamma = n * u / (1.0 - n * u);
  const double b = bias.empty() ? 0.0 : bias[e];
  // The center moved by at most δ_e since its key was made: |h|₂ δ_e more,
  // and the scan's rounding is of the moved center's norm.
  const double drift = drift_.empty() ? 0.0 : drift_[e];
  const double beta = std::min(h1 * keys_.error_max[e], h2 * keys_.error[e]) + h2 * drift;
  const double norm = static_cast<double>(keys_.norm[e]) + drift;
  const double w_hat = static_cast<double>(keys_.norm[e]) + keys_.error[e];
  const double slack =
      2.0 * gamma * h2 * (norm + w_hat) + 4.0 * u * (std::fabs(z) + std::fabs(b) + beta);
  upper = z + b + beta + slack;
  lower = z + b - beta - slack;
}

RequestKeys::Bounds RequestKeys::bound_groups(
    MatrixView tokens, std::span<const float> bias, const TokenGroups& groups,
    const std::function<std::span<const int32_t>(int32_t)>& members) const {
  const int64_t d = keys_.dim;
  const PairPlan plan = plan_pairs(tokens.rows, groups, members);
  const auto n = static_cast<size_t>(plan.candidate_offsets.back());
  Bounds b{plan.candidate_offsets, std::vector<int32_t>(n), std::vector<double>(n),
           std::vector<double>(n)};
  std::vector<double> h1, h2;
  token_norms(tokens, h1, h2);
  ParallelErrors errors;  // allocations and the callback may throw
  // Each group once: its keys widened, scored against its tokens at once.
#pragma omp parallel
  {
    std::vector<float> w, h, z;
#pragma omp for schedule(dynamic)
    for (int32_t g = 0; g < plan.groups(); ++g) {
      errors.run([&] {
        const int64_t first = plan.group_offsets[g], rows = plan.group_offsets[g + 1] - first;
        const std::span<const int32_t> ids = rows > 0 ? members(g) : std::span<const int32_t>();
        const auto m = static_cast<int64_t>(ids.size());
        if (m == 0) return;
        widen_keys(keys_, ids, w);
        h.resize(static_cast<size_t>(rows * d));
        for (int64_t r = 0; r < rows; ++r)
          std::copy_n(tokens.row(plan.token[plan.by_group[first + r]]), d, h.data() + r * d);
        z.resize(static_cast<size_t>(rows * m));
        score_to_host(host_compute(), TensorView(h.data(), DType::kF32, Device::host(), rows, d),
                      TensorView(w.data(), DType::kF32, Device::host(), m, d), z.data());
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t p = plan.by_group[first + r], t = plan.token[p];
          for (int64_t j = 0; j < m; ++j) {
            const auto at = static_cast<size_t>(plan.base[p] + j);
            b.ids[at] = ids[j];
            bound(z[r * m + j], h1[t], h2[t], ids[j], bias, b.upper[at], b.lower[at]);
          }
        }
      });
    }
  }
  errors.rethrow();
  return b;
}

Contenders RequestKeys::contenders(
    MatrixView tokens, int k, std::span<const float> bias, const TokenGroups& groups,
    const std::function<std::span<const int32_t>(int32_t)>& members) const {
  const Bounds b = bound_groups(tokens, bias, groups, members);
  Contenders out;
  std::vector<char> seen(static_cast<size_t>(experts()), 0);
  std::vector<int64_t> distinct;
  std::vector<double> lower;
  for (int64_t t = 0; t < tokens.rows; ++t) {
    distinct.clear();
    lower.clear();
    for (int64_t i = b.offsets[t]; i < b.offsets[t + 1]; ++i) {
      if (seen[b.ids[i]]) continue;  // either occurrence's bounds hold
      seen[b.ids[i]] = 1;
      distinct.push_back(i);
      lower.push_back(b.lower[i]);
    }
    double kth = -std::numeric_limits<double>::infinity();
    if (lower.size() >= static_cast<size_t>(k)) {
      std::nth_element(lower.begin(), lower.begin() + (k - 1), lower.end(), std::greater<>());
      kth = lower[static_cast<size_t>(k - 1)];
    }
    const size_t first = out.ids.size();
    for (int64_t i : distinct) {
      seen[b.ids[i]] = 0;
      if (b.upper[i] >= kth) out.ids.push_back(b.ids[i]);
    }
    std::sort(out.ids.begin() + static_cast<std::ptrdiff_t>(first), out.ids.end());
    out.offsets.push_back(static_cast<int64_t>(out.ids.size()));
  }
  return out;
}

void set_contenders(Routes& routes, MatrixView tokens, const RequestKeys& keys,
                    const InvertedLists& lists, std::span<const float> bias) {
  TokenGroups probed{routes.probe_offsets, routes.probed_codewords};
  Contenders found =
      keys.contenders(tokens, routes.k, bias, probed, [&](int32_t c) { return lists.list(c); });
  routes.contender_offsets = std::move(found.offsets);
  routes.contenders = std::move(found.ids);
}

}  // namespace airmoe::inline router
