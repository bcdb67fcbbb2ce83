// The scoring op (Ops::score), on every backend: every entry depends only on
// its two rows (shape-invariant, bit for bit), is symmetric in them, and
// agrees with a double-precision dot product.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "backend_params.h"
#include "core/synthetic.h"
#include "ops/boundary.h"
#include "test_util.h"

namespace airmoe {
namespace {

using test::dot_double;
using test::gather_rows;

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

class Scoring : public test::BackendTest {
 protected:
  // c = a · bᵀ on the backend, c [m, n] on the host.
  void score_into(TensorView a, TensorView b, float* c) const { score_to_host(compute(), a, b, c); }
  std::vector<float> score(MatrixView a, MatrixView b) const {
    std::vector<float> c(static_cast<size_t>(a.rows * b.rows));
    score_into(a, b, c.data());
    return c;
  }
};

// A large (multi-threaded) product, then random gathered sub-batches of
// every small shape: each entry must be the same bits as in the big batch and
// as the one-pair product.
TEST_P(Scoring, ShapeInvariantBitForBit) {
  struct Shape {
    int64_t m, n, k;
  };
  // The first two exceed the kernel's multi-threading threshold (m n k > 4e6).
  for (const Shape s : {Shape{257, 301, 67}, Shape{64, 1000, 512}, Shape{13, 29, 1},
                        Shape{7, 11, 9}, Shape{40, 33, 130}}) {
    SCOPED_TRACE("m=" + std::to_string(s.m) + " n=" + std::to_string(s.n) +
                 " k=" + std::to_string(s.k));
    const Matrix a = random_matrix(s.m, s.k, 1.0, 11 + s.k);
    const Matrix b = random_matrix(s.n, s.k, 1.0, 23 + s.k);
    const std::vector<float> big = score(a.view(), b.view());

    // Every entry equals the one-pair product, in both argument orders.
    const std::vector<float> swapped = score(b.view(), a.view());
    int64_t mismatches = 0;
    for (int64_t i = 0; i < s.m; ++i)
      for (int64_t j = 0; j < s.n; ++j) {
        const float one = score(MatrixView(a.row(i), 1, s.k), MatrixView(b.row(j), 1, s.k)).front();
        if (bits(one) != bits(big[i * s.n + j]) || bits(swapped[j * s.m + i]) != bits(one))
          ++mismatches;
      }
    EXPECT_EQ(mismatches, 0);

    // Gathered sub-batches of sizes 1..7 x 1..9 in random row order.
    std::mt19937_64 rng(s.m * 1000 + s.n);
    for (int trial = 0; trial < 40; ++trial) {
      const int64_t mm = 1 + static_cast<int64_t>(rng() % 7);
      const int64_t nn = 1 + static_cast<int64_t>(rng() % 9);
      std::vector<int64_t> ri(static_cast<size_t>(mm)), rj(static_cast<size_t>(nn));
      for (auto& x : ri) x = static_cast<int64_t>(rng() % static_cast<uint64_t>(s.m));
      for (auto& x : rj) x = static_cast<int64_t>(rng() % static_cast<uint64_t>(s.n));
      const Matrix sa = gather_rows(a.view(), ri);
      const Matrix sb = gather_rows(b.view(), rj);
      const std::vector<float> small = score(sa.view(), sb.view());
      for (int64_t i = 0; i < mm; ++i)
        for (int64_t j = 0; j < nn; ++j)
          ASSERT_EQ(bits(small[i * nn + j]), bits(big[ri[i] * s.n + rj[j]]))
              << "entry (" << ri[i] << ", " << rj[j] << ") in a " << mm << "x" << nn << " batch";
    }
  }
}

// Leading dimensions larger than k and an output stride larger than n: the
// same bits as the packed product.
TEST_P(Scoring, StridedOperandsGiveTheSameBits) {
  const int64_t m = 19, n = 23, k = 37, lda = 41, ldb = 50, ldc = 31;
  const Matrix pa = random_matrix(m, lda, 1.0, 5);
  const Matrix pb = random_matrix(n, ldb, 1.0, 6);
  Matrix a(m, k), b(n, k);
  for (int64_t i = 0; i < m; ++i) std::copy_n(pa.row(i), k, a.row(i));
  for (int64_t j = 0; j < n; ++j) std::copy_n(pb.row(j), k, b.row(j));
  const std::vector<float> packed = score(a.view(), b.view());
  std::vector<float> strided(static_cast<size_t>(m * ldc), -7.0f);
  StagedOut c(compute(), TensorView(strided.data(), DType::kF32, Device::host(), m, n, ldc),
              /*initialized=*/true);
  ops().score(Staged(compute(), TensorView(pa.view()).block(0, m, 0, k)),
              Staged(compute(), TensorView(pb.view()).block(0, n, 0, k)), c, {});
  c.finish();
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j)
      ASSERT_EQ(bits(strided[i * ldc + j]), bits(packed[i * n + j])) << i << "," << j;
    for (int64_t j = n; j < ldc; ++j) EXPECT_EQ(strided[i * ldc + j], -7.0f) << "padding written";
  }
}

// |float - double| <= 1e-5 * sum |a_i b_i|: the honest relative bound when
// the dot product may cancel; and plain relative 1e-5 on positive data.
TEST_P(Scoring, AgreesWithDoublePrecision) {
  for (const int64_t k : {1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 512, 1000}) {
    SCOPED_TRACE("k=" + std::to_string(k));
    const int64_t m = 9, n = 14;
    const Matrix a = random_matrix(m, k, 1.0, 100 + k);
    const Matrix b = random_matrix(n, k, 2.5, 200 + k);
    std::vector<float> c = score(a.view(), b.view());
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double mag = 0.0;
        for (int64_t p = 0; p < k; ++p) mag += std::fabs(double(a(i, p)) * double(b(j, p)));
        const double ref = dot_double(a.row(i), b.row(j), k);
        EXPECT_LE(std::fabs(c[i * n + j] - ref), 1e-5 * mag) << i << "," << j;
      }

    Matrix pa(m, k), pb(n, k);
    for (int64_t i = 0; i < m * k; ++i) pa.data()[i] = std::fabs(a.data()[i]) + 0.01f;
    for (int64_t i = 0; i < n * k; ++i) pb.data()[i] = std::fabs(b.data()[i]) + 0.01f;
    c = score(pa.view(), pb.view());
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const double ref = dot_double(pa.row(i), pb.row(j), k);
        EXPECT_LE(std::fabs(c[i * n + j] - ref), 1e-5 * ref) << i << "," << j;
      }
  }
}

TEST_P(Scoring, ExactOnSmallIntegers) {
  // Small integers: every partial sum is exact in float, so the result is.
  const int64_t k = 21;
  Matrix a(2, k), b(3, k);
  for (int64_t p = 0; p < k; ++p) {
    a(0, p) = static_cast<float>(p % 5 - 2);
    a(1, p) = static_cast<float>(p);
    b(0, p) = 1.0f;
    b(1, p) = static_cast<float>(3 - p % 7);
    b(2, p) = 0.0f;
  }
  const std::vector<float> c = score(a.view(), b.view());
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t j = 0; j < 3; ++j)
      EXPECT_EQ(c[i * 3 + j], static_cast<float>(dot_double(a.row(i), b.row(j), k)));
  EXPECT_EQ(c[1 * 3 + 0], 210.0f);  // 0 + 1 + ... + 20
  EXPECT_EQ(c[0 * 3 + 2], 0.0f);
}

TEST_P(Scoring, EmptyShapesWriteNothing) {
  const Matrix a = random_matrix(3, 4, 1.0, 1);
  std::vector<float> c(4, 42.0f);
  score_into(TensorView(a.view()).row_range(0, 0), a.view(), c.data());
  score_into(a.view(), TensorView(a.view()).row_range(0, 0), c.data());
  for (float v : c) EXPECT_EQ(v, 42.0f);
}

// k = 0: an empty sum is zero.
TEST_P(Scoring, ZeroDepthIsZero) {
  const Matrix a(2, 0), b(3, 0);
  std::vector<float> c(6, 5.0f);
  score_into(a.view(), b.view(), c.data());
  for (float v : c) EXPECT_EQ(v, 0.0f);
}

// Floats that end where an unreadable page begins: a store that touches
// anything past the last one faults.
class GuardedFloats {
 public:
  explicit GuardedFloats(int64_t n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = static_cast<size_t>(n) * sizeof(float);
    length_ = ((bytes + page - 1) / page + 1) * page;
    void* p = mmap(nullptr, length_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base_ = static_cast<char*>(p);
    mprotect(base_ + length_ - page, page, PROT_NONE);
    data_ = reinterpret_cast<float*>(base_ + length_ - page - bytes);
  }
  ~GuardedFloats() { munmap(base_, length_); }
  GuardedFloats(const GuardedFloats&) = delete;
  GuardedFloats& operator=(const GuardedFloats&) = delete;
  float* data() const { return data_; }

 private:
  char* base_ = nullptr;
  size_t length_ = 0;
  float* data_ = nullptr;
};

// Every tile shape's last row, its columns a part of a tile's, stores nothing
// past the output's end, for float32 and bf16 rows: an output whose last row
// ended just before an unmapped page made the AVX-512 kernel fault (its
// masked store of the odd rows did not suppress faults on masked lanes).
TEST_P(Scoring, StoresNothingPastTheOutput) {
  const auto bf16_of = [](const Matrix& m) {
    std::vector<uint16_t> out(static_cast<size_t>(m.rows() * m.cols()));
    for (size_t i = 0; i < out.size(); ++i) {
      uint32_t u;
      std::memcpy(&u, m.view().data + i, sizeof u);
      out[i] = static_cast<uint16_t>(u >> 16);  // truncation: any bf16 values do
    }
    return out;
  };
  for (int64_t m = 1; m <= 13; ++m)
    for (int64_t n : {1, 7, 8, 9, 15, 16, 17, 33})
      for (int64_t k : {1, 9, 130}) {
        SCOPED_TRACE("m=" + std::to_string(m) + " n=" + std::to_string(n) +
                     " k=" + std::to_string(k));
        const Matrix a = random_matrix(m, k, 1.0, 5), b = random_matrix(n, k, 1.0, 6);
        const std::vector<float> want = score(a.view(), b.view());
        const GuardedFloats c(m * n);
        score_into(a.view(), b.view(), c.data());
        EXPECT_EQ(0, std::memcmp(c.data(), want.data(), want.size() * sizeof(float)));
        std::vector<uint16_t> a16 = bf16_of(a), b16 = bf16_of(b);
        score_into(TensorView(a16.data(), DType::kBF16, Device::host(), m, k),
                   TensorView(b16.data(), DType::kBF16, Device::host(), n, k), c.data());
      }
}

AIRMOE_INSTANTIATE_BACKENDS(Scoring);

}  // namespace
}  // namespace airmoe
