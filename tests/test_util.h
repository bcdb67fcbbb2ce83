// Helpers shared by the test files: double-precision reference routing,
// small matrix utilities and a thread-count guard.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <numeric>
#include <string>
#include <vector>

#include "core/matrix.h"
#include "core/synthetic.h"
#include "core/threads.h"
#include "router/routes.h"

namespace airmoe::test {

// Seeded clustered data (5 clusters on 3-dimensional manifolds): small
// routers whose routes are spread over several lists.
inline SyntheticData clustered_data(int64_t E, int64_t d, int64_t T, uint64_t seed) {
  SyntheticConfig cfg;
  cfg.experts = E;
  cfg.dim = d;
  cfg.tokens = T;
  cfg.clusters = 5;
  cfg.latent_dim = 3;
  cfg.seed = seed;
  return make_synthetic(cfg);
}

// Exact inner product in double (each float product is exact in double).
inline double dot_double(const float* a, const float* b, int64_t k) {
  double s = 0.0;
  for (int64_t i = 0; i < k; ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}

// Ranking of the references: higher logit first, then lower id.
inline std::vector<int32_t> rank_desc(const std::vector<double>& z) {
  std::vector<int32_t> order(z.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); });
  return order;
}

struct RefRoutes {
  int64_t tokens = 0;
  int k = 0;
  std::vector<int32_t> experts;  // [T, k]
  std::vector<double> gates;     // [T, k]
};

// Naive routing from double logits: top-k (ties to the lower id), softmax in
// double over the chosen k (kChosen) or over every expert (kShortlist).
// logits(t) must return the E logits of token t.
template <typename LogitsFn>
RefRoutes reference_routes(int64_t T, int64_t E, int k, GateMode mode, LogitsFn logits) {
  RefRoutes r;
  r.tokens = T;
  r.k = k;
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<double> z = logits(t);
    EXPECT_EQ(static_cast<int64_t>(z.size()), E);
    const std::vector<int32_t> order = rank_desc(z);
    const double top = z[order[0]];
    double den = 0.0;
    if (mode == GateMode::kChosen) {
      for (int j = 0; j < k; ++j) den += std::exp(z[order[j]] - top);
    } else {
      for (double v : z) den += std::exp(v - top);
    }
    for (int j = 0; j < k; ++j) {
      r.experts.push_back(order[j]);
      r.gates.push_back(std::exp(z[order[j]] - top) / den);
    }
  }
  return r;
}

// Reference routing of tokens [T, d] against centers [E, d].
inline RefRoutes reference_dense(MatrixView tokens, MatrixView centers, int k, GateMode mode) {
  return reference_routes(tokens.rows, centers.rows, k, mode, [&](int64_t t) {
    std::vector<double> z(static_cast<size_t>(centers.rows));
    for (int64_t e = 0; e < centers.rows; ++e)
      z[e] = dot_double(tokens.row(t), centers.row(e), tokens.cols);
    return z;
  });
}

// Experts equal, gates within `tol` (absolute).
inline void expect_matches_reference(const Routes& got, const RefRoutes& ref, double tol) {
  ASSERT_EQ(got.tokens, ref.tokens);
  ASSERT_EQ(got.k, ref.k);
  EXPECT_EQ(got.experts, ref.experts);
  ASSERT_EQ(got.gates.size(), ref.gates.size());
  for (size_t i = 0; i < got.gates.size(); ++i)
    EXPECT_NEAR(got.gates[i], ref.gates[i], tol) << "entry " << i;
}

// Rows `rows` of m, in the given order.
inline Matrix gather_rows(MatrixView m, const std::vector<int64_t>& rows) {
  Matrix out(static_cast<int64_t>(rows.size()), m.cols);
  for (size_t i = 0; i < rows.size(); ++i)
    std::copy_n(m.row(rows[i]), m.cols, out.row(static_cast<int64_t>(i)));
  return out;
}

// The entries of m, row-major.
inline std::vector<float> values(MatrixView m) {
  return std::vector<float>(m.data, m.data + m.rows * m.cols);
}

inline Matrix copy_matrix(MatrixView m) {
  Matrix out(m.rows, m.cols);
  std::copy_n(m.data, m.rows * m.cols, out.data());
  return out;
}

// Row t of m as a one-row view.
inline MatrixView row_view(MatrixView m, int64_t t) {
  return {m.row(t), 1, m.cols};
}

// Restores the library's thread count when it goes out of scope.
class ThreadGuard {
 public:
  ThreadGuard() : saved_(num_threads()) {}
  ~ThreadGuard() { set_num_threads(saved_); }
  ThreadGuard(const ThreadGuard&) = delete;
  ThreadGuard& operator=(const ThreadGuard&) = delete;

 private:
  int saved_;
};

// A fresh directory under the system temp dir, removed on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = "airmoe_test_" + tag;
    if (info) name += std::string("_") + info->test_suite_name() + "_" + info->name();
    for (char& c : name)
      if (c == '/') c = '_';
    path_ = std::filesystem::temp_directory_path() / name;
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// EXPECT_THROW plus a check that the message contains `needle`.
#define AIRMOE_EXPECT_THROW_MSG(stmt, exc, needle)                          \
  do {                                                                      \
    bool airmoe_thrown_ = false;                                            \
    try {                                                                   \
      stmt;                                                                 \
    } catch (const exc& e) {                                                \
      airmoe_thrown_ = true;                                                \
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)      \
          << "message '" << e.what() << "' lacks '" << (needle) << "'";     \
    } catch (const std::exception& e) {                                     \
      ADD_FAILURE() << "threw the wrong exception type: " << e.what();      \
      airmoe_thrown_ = true;                                                \
    }                                                                       \
    if (!airmoe_thrown_) ADD_FAILURE() << "expected " #exc " from: " #stmt; \
  } while (0)

}  // namespace airmoe::test
