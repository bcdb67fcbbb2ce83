// One test body per op of ops/ops.h, run on every backend (backend_params.h)
// and compared with host-portable, as ggml's test-backend-ops does: the
// inputs are built on the host, copied to the backend's device, the op runs
// there, and its results come back to be compared. Host twins and
// device-emulated agree bit for bit; cuda bit for bit where only +, *, fma
// and sqrt are involved, and within kTranscendentalTol where exp, log or erf
// are (libm differs from CUDA's). bf16 inputs, ties, empty inputs and strided
// views are covered; host-portable itself is checked against lane_dot.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "backend_params.h"
#include "core/errors.h"
#include "ops/bf16.h"
#include "ops/gate_function.h"
#include "ops/lane_dot.h"
#include "ops/log_sum_exp.h"
#include "ops/ops.h"
#include "ops/topk.h"

namespace airmoe {
namespace {

using test::BackendTest;

// Relative to the largest magnitude of the reference: where cuda's exp, log
// and erf may differ from libm's by an ulp or two.
constexpr double kTranscendentalTol = 1e-5;

// ---- host tensors -------------------------------------------------------

Tensor host_tensor(DType dtype, int64_t rows, int64_t cols) {
  return Tensor(host_allocator(), dtype, rows, cols);
}

template <typename T>
Tensor host_of(DType dtype, int64_t rows, int64_t cols, const std::vector<T>& values) {
  Tensor t = host_tensor(dtype, rows, cols);
  EXPECT_EQ(values.size(), static_cast<size_t>(rows * cols));
  if (!values.empty()) std::memcpy(t.view().data, values.data(), values.size() * sizeof(T));
  return t;
}

Tensor ints(const std::vector<int32_t>& v) {
  return host_of(DType::kI32, static_cast<int64_t>(v.size()), 1, v);
}
Tensor longs(const std::vector<int64_t>& v) {
  return host_of(DType::kI64, static_cast<int64_t>(v.size()), 1, v);
}
Tensor floats(const std::vector<float>& v) {
  return host_of(DType::kF32, static_cast<int64_t>(v.size()), 1, v);
}

// Gaussian entries, seeded.
Tensor random_f32(int64_t rows, int64_t cols, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<float> v(static_cast<size_t>(rows * cols));
  for (float& x : v) x = static_cast<float>(normal(rng));
  return host_of(DType::kF32, rows, cols, v);
}

// The bf16 tensor of a host f32 one (round to nearest even).
Tensor to_bf16(const Tensor& f32) {
  Tensor out = host_tensor(DType::kBF16, f32.rows(), f32.cols());
  const float* src = f32.as<float>();
  uint16_t* dst = out.as<uint16_t>();
  for (int64_t i = 0; i < f32.rows() * f32.cols(); ++i) dst[i] = narrow_bf16(src[i]);
  return out;
}

// The f32 tensor a bf16 one widens to (exact).
Tensor widened(const Tensor& bf16) {
  Tensor out = host_tensor(DType::kF32, bf16.rows(), bf16.cols());
  for (int64_t i = 0; i < bf16.rows() * bf16.cols(); ++i)
    out.as<float>()[i] = widen_bf16(bf16.as<uint16_t>()[i]);
  return out;
}

// A vector of results (Tensors are move-only: no initializer list).
template <typename... T>
std::vector<Tensor> results(T&&... t) {
  std::vector<Tensor> v;
  (v.push_back(std::forward<T>(t)), ...);
  return v;
}

template <typename T>
std::vector<T> values_of(const Tensor& t) {
  std::vector<T> v(static_cast<size_t>(t.rows() * t.cols()));
  if (!v.empty()) std::memcpy(v.data(), t.view().data, v.size() * sizeof(T));
  return v;
}

// ---- one backend's copies -------------------------------------------------

// Host inputs copied to a backend's device, outputs allocated there, and
// results brought back; keeps every device tensor alive until it goes.
class OnDevice {
 public:
  explicit OnDevice(const Ops& ops) : ops_(ops) {}

  TensorView put(const Tensor& host) {
    kept_.push_back(ops_.empty(host.dtype(), host.rows(), host.cols()));
    ops_.copy(kept_.back(), host, {});
    return kept_.back();
  }
  // The same values as a strided view: `pad` unused columns on each side.
  TensorView put_strided(const Tensor& host, int64_t pad) {
    kept_.push_back(ops_.empty(host.dtype(), host.rows(), host.cols() + 2 * pad));
    ops_.fill(kept_.back(), 7.0, {});
    const TensorView inner = kept_.back().view().block(0, host.rows(), pad, host.cols());
    ops_.copy(inner, host, {});
    return inner;
  }
  // An output, filled with `value` so that an entry the op leaves shows.
  TensorView out(DType dtype, int64_t rows, int64_t cols, double value = -12345.0) {
    kept_.push_back(ops_.empty(dtype, rows, cols));
    ops_.fill(kept_.back(), value, {});
    return kept_.back();
  }
  Tensor get(TensorView device) const {
    Tensor host = host_tensor(device.dtype, device.rows, device.cols);
    ops_.copy(host, device, {});
    ops_.synchronize({});
    return host;
  }
  const Ops& ops() const { return ops_; }

 private:
  const Ops& ops_;
  std::vector<Tensor> kept_;
};

// ---- comparisons ----------------------------------------------------------

void expect_bits(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.dtype(), want.dtype()) << what;
  ASSERT_EQ(got.rows(), want.rows()) << what;
  ASSERT_EQ(got.cols(), want.cols()) << what;
  const size_t bytes = static_cast<size_t>(got.rows() * got.cols()) * dtype_size(got.dtype());
  if (bytes == 0) return;
  const auto* a = static_cast<const unsigned char*>(got.view().data);
  const auto* b = static_cast<const unsigned char*>(want.view().data);
  const size_t es = dtype_size(got.dtype());
  for (size_t i = 0; i < bytes; i += es)
    if (std::memcmp(a + i, b + i, es) != 0) {
      ADD_FAILURE() << what << ": entry " << i / es << " differs in its bits";
      return;
    }
}

double as_double(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::kF32:
      return t.as<float>()[i];
    case DType::kF64:
      return t.as<double>()[i];
    case DType::kBF16:
      return widen_bf16(t.as<uint16_t>()[i]);
    case DType::kI32:
      return t.as<int32_t>()[i];
    case DType::kI64:
      return static_cast<double>(t.as<int64_t>()[i]);
  }
  return 0.0;
}

void expect_close(const Tensor& got, const Tensor& want, double rel, const std::string& what) {
  ASSERT_EQ(got.rows(), want.rows()) << what;
  ASSERT_EQ(got.cols(), want.cols()) << what;
  const int64_t n = got.rows() * got.cols();
  double scale = 1e-30, diff = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double a = as_double(got, i), b = as_double(want, i);
    if (std::isinf(b) || std::isnan(b)) {
      EXPECT_EQ(std::memcmp(&a, &b, sizeof a), 0) << what << ": entry " << i;
      continue;
    }
    scale = std::max(scale, std::abs(b));
    diff = std::max(diff, std::abs(a - b));
  }
  EXPECT_LE(diff / scale, rel) << what;
}

// A UsageError whose message holds `part`.
void expect_refused(const std::function<void()>& call, const std::string& part) {
  try {
    call();
    ADD_FAILURE() << "accepted: " << part;
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

// ---- the fixture ----------------------------------------------------------

class OpsTest : public BackendTest {
 protected:
  // Bit for bit; for values derived from exp, log or erf, within
  // kTranscendentalTol on cuda.
  void expect_same(const Tensor& got, const Tensor& want, const std::string& what,
                   bool transcendental = false) const {
    if (transcendental && !libm_bits())
      expect_close(got, want, kTranscendentalTol, what);
    else
      expect_bits(got, want, what + " on " + ops().name());
  }
  // run(ops) returns its results on the host; every backend's equal the
  // reference's (`transcendental[i]`: result i may differ on cuda).
  template <typename Run>
  void compare(Run run, const std::vector<bool>& transcendental = {}) const {
    const std::vector<Tensor> want = run(ref());
    const std::vector<Tensor> got = run(ops());
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i)
      expect_same(got[i], want[i], "result " + std::to_string(i),
                  i < transcendental.size() && transcendental[i]);
  }
};

// ---- memory -----------------------------------------------------------------

TEST_P(OpsTest, CopyConvertsAndFills) {
  Tensor x = random_f32(5, 11, 1, 3.0);
  x.as<float>()[3] = std::numeric_limits<float>::quiet_NaN();
  x.as<float>()[4] = -std::numeric_limits<float>::infinity();
  x.as<float>()[5] = 1.00390625f;  // bf16 tie: rounds to even (1.0)
  x.as<float>()[6] = 1.01171875f;  // bf16 tie: rounds to even (1.015625)
  compare([&](const Ops& o) {
    OnDevice dev(o);
    const TensorView f32 = dev.put_strided(x, 3);
    const TensorView bf16 = dev.out(DType::kBF16, 5, 11);
    o.copy(bf16, f32, {});  // f32 -> bf16 on the device
    const TensorView back = dev.out(DType::kF32, 5, 11);
    o.copy(back, bf16, {});  // bf16 -> f32
    const TensorView filled = dev.out(DType::kI64, 3, 2);
    o.fill(filled, 42.0, {});
    const TensorView half = dev.out(DType::kF64, 4, 3);
    o.fill(half.block(1, 2, 1, 2), -0.5, {});  // a strided block only
    return results(dev.get(bf16), dev.get(back), dev.get(filled), dev.get(half));
  });
  // The reference itself: round to nearest even, NaN stays NaN.
  const Tensor bf = to_bf16(x);
  EXPECT_EQ(bf.as<uint16_t>()[5], 0x3f80);
  EXPECT_EQ(bf.as<uint16_t>()[6], 0x3f82);
  EXPECT_TRUE(std::isnan(widen_bf16(bf.as<uint16_t>()[3])));
  // Empty copies are no-ops; mismatched shapes and dtypes are refused.
  OnDevice dev(ops());
  const Tensor none = host_tensor(DType::kF32, 0, 4);
  EXPECT_NO_THROW(ops().copy(dev.out(DType::kF32, 0, 4), none, {}));
  EXPECT_THROW(ops().copy(dev.out(DType::kF32, 2, 4), random_f32(2, 5, 1), {}), UsageError);
  EXPECT_THROW(ops().copy(dev.out(DType::kI32, 2, 4), random_f32(2, 4, 1), {}), UsageError);
}

// Raw bytes of any length (comm/'s exchange buffers): host -> device,
// device -> device, device -> host, through staging memory on the host.
TEST_P(OpsTest, CopyBytesMovesRawBytes) {
  const Ops& o = ops();
  std::vector<char> src(13);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<char>(i * 37 + 5);
  Buffer a(o.allocator(), 16), b(o.allocator(), 16);
  Buffer staging(o.staging_allocator(), 13);
  EXPECT_TRUE(staging.device().is_host()) << "staging memory is host memory";
  o.copy_bytes(a.data(), o.device(), src.data(), Device::host(), 13, {});
  o.copy_bytes(static_cast<char*>(b.data()) + 3, o.device(), a.data(), o.device(), 13, {});
  o.copy_bytes(staging.data(), Device::host(), static_cast<char*>(b.data()) + 3, o.device(), 13,
               {});
  std::vector<char> back(13);
  std::memcpy(back.data(), staging.data(), 13);
  EXPECT_EQ(back, src) << o.name();
  EXPECT_NO_THROW(o.copy_bytes(nullptr, Device::host(), nullptr, o.device(), 0, {}));
  const Device elsewhere = Device::cuda(o.device().is_host() ? 0 : o.device().index + 1);
  const std::pair<std::function<void()>, std::string> refused[] = {
      {[&] { o.copy_bytes(nullptr, o.device(), src.data(), Device::host(), 4, {}); },
       o.name() + " copy_bytes: null dst for 4 bytes"},
      {[&] { o.copy_bytes(back.data(), Device::host(), a.data(), elsewhere, 4, {}); },
       o.name() + " copy_bytes: src is on " + to_string(elsewhere)}};
  for (const auto& [call, needle] : refused) {
    try {
      call();
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const UsageError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  }
}

TEST_P(OpsTest, CheckRowsFindsNonFiniteAndOverflow) {
  Tensor m = random_f32(7, 9, 2);
  const auto check = [&](const Ops& o, const Tensor& t, double bound) {
    OnDevice dev(o);
    return o.check_rows(dev.put_strided(t, 1), bound, {});
  };
  const auto same = [&](const Tensor& t, double bound) {
    const RowCheck want = check(ref(), t, bound), got = check(ops(), t, bound);
    EXPECT_EQ(got.nonfinite_row, want.nonfinite_row);
    EXPECT_EQ(got.nonfinite_col, want.nonfinite_col);
    EXPECT_EQ(got.overflow_row, want.overflow_row);
    EXPECT_EQ(got.overflow_norm, want.overflow_norm);
    EXPECT_EQ(got.max_norm, want.max_norm);
    return want;
  };
  RowCheck r = same(m, 1.0);
  EXPECT_EQ(r.nonfinite_row, -1);
  EXPECT_EQ(r.overflow_row, -1);
  double max_norm = 0.0;
  for (int64_t i = 0; i < 7; ++i) {
    double s = 0.0;
    for (int64_t c = 0; c < 9; ++c)
      s += static_cast<double>(m.as<float>()[i * 9 + c]) * m.as<float>()[i * 9 + c];
    max_norm = std::max(max_norm, std::sqrt(s));
  }
  EXPECT_EQ(r.max_norm, max_norm);
  // Overflow: row 4 scaled so |h| * bound exceeds FLT_MAX / 2.
  for (int64_t c = 0; c < 9; ++c) m.as<float>()[4 * 9 + c] *= 1e37f;
  r = same(m, 1e3);
  EXPECT_EQ(r.overflow_row, 4);
  // Non-finite entries: the first in row-major order; bf16 alike.
  m.as<float>()[5 * 9 + 2] = std::numeric_limits<float>::infinity();
  m.as<float>()[2 * 9 + 7] = std::numeric_limits<float>::quiet_NaN();
  r = same(m, 1.0);
  EXPECT_EQ(r.nonfinite_row, 2);
  EXPECT_EQ(r.nonfinite_col, 7);
  r = same(to_bf16(m), 1.0);
  EXPECT_EQ(r.nonfinite_row, 2);
  EXPECT_EQ(same(host_tensor(DType::kF32, 0, 3), 1.0).nonfinite_row, -1);
}

// ---- scoring ----------------------------------------------------------------

TEST_P(OpsTest, ScoreIsLaneDotOfEveryPair) {
  struct Shape {
    int64_t m, n, k;
  };
  // k a multiple of 8 and not (and of 16 and not); k < 8; tiles with
  // partial edges (AVX2 3 x 4, AVX-512 6 x 8: m = 13, 11, n = 17, 9); k = 0;
  // empty sides; several blocks of rows and of keys, on threads (300 x 70 x
  // 1000: the AVX-512 set's blocks are 262 rows by 32 keys there).
  for (const Shape s : {Shape{7, 13, 16}, Shape{10, 9, 37}, Shape{1, 1, 5}, Shape{4, 6, 0},
                        Shape{0, 5, 8}, Shape{3, 0, 8}, Shape{50, 70, 200}, Shape{13, 17, 3},
                        Shape{11, 16, 24}, Shape{2, 8, 7}, Shape{12, 9, 1}, Shape{300, 70, 1000}}) {
    const Tensor a = random_f32(s.m, s.k, 10 + s.k), b = random_f32(s.n, s.k, 20 + s.k);
    const auto run = [&](const Ops& o, const Tensor& ha, const Tensor& hb, int64_t pad) {
      OnDevice dev(o);
      const TensorView c = dev.out(DType::kF32, s.m, s.n + 2 * pad).block(0, s.m, pad, s.n);
      o.score(pad ? dev.put_strided(ha, pad) : dev.put(ha),
              pad ? dev.put_strided(hb, pad) : dev.put(hb), c, {});
      return results(dev.get(c));
    };
    compare([&](const Ops& o) { return run(o, a, b, 0); });
    compare([&](const Ops& o) { return run(o, a, b, 2); });  // strided a, b and c
    // bf16 inputs score like their f32 widening.
    const Tensor a16 = to_bf16(a), b16 = to_bf16(b);
    const Tensor want = std::move(run(ref(), widened(a16), widened(b16), 0)[0]);
    expect_bits(run(ops(), a16, b16, 1)[0], want, "bf16 score");
    expect_bits(run(ops(), a16, widened(b16), 0)[0], want, "bf16 x f32 score");
    // The reference is lane_dot, entry by entry.
    const Tensor c = std::move(run(ref(), a, b, 0)[0]);
    for (int64_t i = 0; i < s.m; ++i)
      for (int64_t j = 0; j < s.n; ++j) {
        const float z = lane_dot(a.as<float>() + i * s.k, b.as<float>() + j * s.k, s.k);
        ASSERT_EQ(std::memcmp(&z, c.as<float>() + i * s.n + j, 4), 0) << i << ", " << j;
      }
  }
}

// bf16 x bf16 scores keep lane_dot's bits (of the widened rows) where a
// bf16 dot-product instruction would not: a denormal entry (AVX512-BF16
// reads it as zero), products and lane sums that underflow (flushed there),
// an Inf; and rows of +-2^-51 (products 2^-102, still normal).
TEST_P(OpsTest, Bf16ScoreKeepsLaneDotBitsForTinyAndHugeEntries) {
  const int64_t m = 6, n = 16, k = 40;
  for (int plant = 0; plant < 4; ++plant) {
    Tensor a = random_f32(m, k, 7), b = random_f32(n, k, 8);
    float* pa = a.as<float>();
    float* pb = b.as<float>();
    const auto tiny_row = [&](float* row, int exponent) {
      for (int64_t i = 0; i < k; ++i) row[i] = std::ldexp(i % 3 == 0 ? -1.0f : 1.0f, exponent);
    };
    switch (plant) {
      case 0:  // a denormal entry times a large one: a normal product
        pa[1 * k + 3] = std::ldexp(1.0f, -130);
        pb[2 * k + 3] = std::ldexp(1.0f, 100);
        break;
      case 1:  // products of 2^-140 and their lane sums: denormal
        tiny_row(pa + 2 * k, -70);
        tiny_row(pb + 5 * k, -70);
        break;
      case 2:
        pb[4 * k + 7] = std::numeric_limits<float>::infinity();
        break;
      default:
        tiny_row(pa, -51);
        tiny_row(pb + 3 * k, -51);
        break;
    }
    const Tensor a16 = to_bf16(a), b16 = to_bf16(b);
    compare([&](const Ops& o) {
      OnDevice dev(o);
      const TensorView c = dev.out(DType::kF32, m, n);
      o.score(dev.put(a16), dev.put(b16), c, {});
      return results(dev.get(c));
    });
  }
}

TEST_P(OpsTest, ScorePairsEqualsScore) {
  const Tensor a = random_f32(9, 21, 3), b = random_f32(12, 21, 4);
  const Tensor ar = ints({0, 8, 3, 3, 5}), br = ints({11, 0, 3, 7, 5});
  compare([&](const Ops& o) {
    OnDevice dev(o);
    const TensorView c = dev.out(DType::kF32, 5, 1);
    o.score_pairs(dev.put_strided(a, 1), dev.put(to_bf16(b)), dev.put(ar), dev.put(br), c, {});
    const TensorView full = dev.out(DType::kF32, 9, 12);
    o.score(dev.put(a), dev.put(to_bf16(b)), full, {});
    return results(dev.get(c), dev.get(full));
  });
  // Each pair's logit is that entry of the full product.
  OnDevice dev(ops());
  const TensorView c = dev.out(DType::kF32, 5, 1);
  const TensorView full = dev.out(DType::kF32, 9, 12);
  ops().score_pairs(dev.put(a), dev.put(b), dev.put(ar), dev.put(br), c, {});
  ops().score(dev.put(a), dev.put(b), full, {});
  const std::vector<float> pairs = values_of<float>(dev.get(c)),
                           all = values_of<float>(dev.get(full));
  for (size_t p = 0; p < pairs.size(); ++p)
    EXPECT_EQ(pairs[p], all[ar.as<int32_t>()[p] * 12 + br.as<int32_t>()[p]]) << "pair " << p;
}

// ---- rows of the sphere and the codebook --------------------------------

TEST_P(OpsTest, NormalizeRowsAndNearest) {
  Tensor rows = random_f32(40, 13, 5);
  Tensor codewords = random_f32(6, 13, 6);
  // A duplicated codeword: equal scores go to the lower index.
  std::memcpy(codewords.as<float>() + 4 * 13, codewords.as<float>() + 1 * 13, 13 * 4);
  compare([&](const Ops& o) {
    OnDevice dev(o);
    const TensorView unit = dev.out(DType::kF32, 40, 13);
    EXPECT_EQ(o.normalize_rows(dev.put_strided(rows, 2), unit, {}), -1);
    const TensorView unit_cw = dev.out(DType::kF32, 6, 13);
    EXPECT_EQ(o.normalize_rows(dev.put(codewords), unit_cw, {}), -1);
    const TensorView best = dev.out(DType::kI32, 40, 1), score = dev.out(DType::kF32, 40, 1);
    o.nearest(unit, unit_cw, best, score, {});
    const TensorView unit16 = dev.out(DType::kBF16, 40, 13);
    o.normalize_rows(dev.put(to_bf16(rows)), unit16, {});
    const TensorView best16 = dev.out(DType::kI32, 40, 1), score16 = dev.out(DType::kF32, 40, 1);
    o.nearest(unit16, unit_cw, best16, score16, {});
    return results(dev.get(unit), dev.get(unit_cw), dev.get(best), dev.get(score), dev.get(unit16),
                   dev.get(best16));
  });
  OnDevice dev(ops());
  // Every row that picked codeword 1 or 4 picked 1.
  const TensorView unit_cw = dev.out(DType::kF32, 6, 13);
  ops().normalize_rows(dev.put(codewords), unit_cw, {});
  const TensorView best = dev.out(DType::kI32, 6, 1);
  ops().nearest(unit_cw, unit_cw, best, dev.out(DType::kF32, 6, 1), {});
  EXPECT_EQ(values_of<int32_t>(dev.get(best)), (std::vector<int32_t>{0, 1, 2, 3, 1, 5}));
  // The first zero row is reported.
  for (int64_t c = 0; c < 13; ++c)
    rows.as<float>()[17 * 13 + c] = rows.as<float>()[30 * 13 + c] = 0;
  EXPECT_EQ(ops().normalize_rows(dev.put(rows), dev.out(DType::kF32, 40, 13), {}), 17);
}

TEST_P(OpsTest, KMeansStatsAreExactAndSplitFree) {
  const Tensor rows = random_f32(101, 19, 7), cw = random_f32(8, 19, 8);
  std::vector<int32_t> id(101);
  for (int32_t i = 0; i < 101; ++i) id[i] = 1000 - 3 * i;
  const auto stats = [&](const Ops& o, int64_t r0, int64_t n, bool bf16) {
    OnDevice dev(o);
    const TensorView unit = dev.out(DType::kF32, 101, 19), unit_cw = dev.out(DType::kF32, 8, 19);
    o.normalize_rows(bf16 ? dev.put(to_bf16(rows)) : dev.put(rows), unit, {});
    o.normalize_rows(dev.put(cw), unit_cw, {});
    const Tensor ids = ints(std::vector<int32_t>(id.begin() + r0, id.begin() + r0 + n));
    return o.kmeans_stats(unit.row_range(r0, n), unit_cw, dev.put(ids), {});
  };
  const auto expect_equal = [](const KMeansStats& a, const KMeansStats& b) {
    EXPECT_EQ(a.sums, b.sums);
    EXPECT_EQ(a.counts, b.counts);
    EXPECT_EQ(a.objective, b.objective);
    EXPECT_EQ(a.farthest_cos, b.farthest_cos);
    EXPECT_EQ(a.farthest_expert, b.farthest_expert);
  };
  for (bool bf16 : {false, true}) {
    const KMeansStats want = stats(ref(), 0, 101, bf16);
    expect_equal(stats(ops(), 0, 101, bf16), want);
    KMeansStats parts = stats(ops(), 0, 40, bf16);
    parts += stats(ops(), 40, 61, bf16);
    expect_equal(parts, want);  // any split adds up to the same bits
    EXPECT_EQ(want.experts(), 101);
  }
  // Without ids, a row's id is its index.
  OnDevice dev(ops());
  const TensorView unit = dev.out(DType::kF32, 101, 19), unit_cw = dev.out(DType::kF32, 8, 19);
  ops().normalize_rows(dev.put(rows), unit, {});
  ops().normalize_rows(dev.put(cw), unit_cw, {});
  const KMeansStats s = ops().kmeans_stats(unit, unit_cw, TensorView(), {});
  for (int32_t e : s.farthest_expert) EXPECT_LT(e, 101);
}

// ---- routing ------------------------------------------------------------

// Keys with duplicated rows: equal logits, ranked by the lower id.
Tensor keys_with_ties(int64_t E, int64_t d, uint64_t seed) {
  Tensor keys = random_f32(E, d, seed);
  for (int64_t e = 3; e < E; e += 4)
    std::memcpy(keys.as<float>() + e * d, keys.as<float>() + (e - 2) * d, d * 4);
  return keys;
}

// dense_topk's ids on `o` equal the first k of every expert sorted by
// ranks_before on o's own scores.
void expect_sorted_top(const Ops& o, const Tensor& tokens, const Tensor& keys, int k) {
  const int64_t T = tokens.rows(), E = keys.rows();
  OnDevice dev(o);
  const TopKView out{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k), {}};
  o.dense_topk(dev.put(tokens), dev.put(keys), k, out, {});
  const TensorView all = dev.out(DType::kF32, T, E);
  o.score(dev.put(tokens), dev.put(keys), all, {});
  const std::vector<float> z = values_of<float>(dev.get(all));
  const std::vector<int32_t> ids = values_of<int32_t>(dev.get(out.ids));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> order(E);
    for (int32_t e = 0; e < E; ++e) order[e] = e;
    std::sort(order.begin(), order.end(),
              [&](int32_t a, int32_t b) { return ranks_before(z[t * E + a], a, z[t * E + b], b); });
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + t * k, ids.begin() + (t + 1) * k),
              std::vector<int32_t>(order.begin(), order.begin() + std::min<int64_t>(k, E)))
        << "token " << t << ", k " << k;
  }
}

TEST_P(OpsTest, DenseTopKRanksTiesByLowerId) {
  const int64_t E = 57, d = 11, T = 30;
  const Tensor keys = keys_with_ties(E, d, 9), tokens = random_f32(T, d, 10);
  for (int k : {1, 4, 57}) {
    compare(
        [&](const Ops& o) {
          OnDevice dev(o);
          const TopKView out{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k),
                             dev.out(DType::kF64, T, 2)};
          o.dense_topk(dev.put_strided(tokens, 1), dev.put(keys), k, out, {});
          const TopKView bf{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k), {}};
          o.dense_topk(dev.put(to_bf16(tokens)), dev.put(to_bf16(keys)), k, bf, {});
          return results(dev.get(out.logits), dev.get(out.ids), dev.get(out.lse),
                         dev.get(bf.logits), dev.get(bf.ids));
        },
        {false, false, true});
  }
  // Against a plain sort of the scores; tied keys appear lower id first.
  expect_sorted_top(ops(), tokens, keys, 8);
  OnDevice dev(ops());
  // No tokens: nothing to do.
  EXPECT_NO_THROW(ops().dense_topk(dev.out(DType::kF32, 0, d), dev.put(keys), 3,
                                   {dev.out(DType::kF32, 0, 3), dev.out(DType::kI32, 0, 3), {}},
                                   {}));
}

// The host top-k passes over runs of 16 logits that cannot enter it: with
// five distinct keys repeated, every logit ties with others in its run and
// in the runs before it, and the best ones recur in every run.
TEST_P(OpsTest, DenseTopKOverRunsOfTiedLogits) {
  const int64_t E = 16 * 6 + 5, d = 9, T = 12;
  const Tensor distinct = random_f32(5, d, 31), tokens = random_f32(T, d, 32);
  Tensor keys = random_f32(E, d, 33);
  for (int64_t e = 0; e < E; ++e)
    std::memcpy(keys.as<float>() + e * d, distinct.as<float>() + (e % 5) * d, d * 4);
  for (int k : {1, 7, 16, 40, 101}) expect_sorted_top(ops(), tokens, keys, k);
}

TEST_P(OpsTest, ProductTopK) {
  const int64_t n = 9, d1 = 6, d2 = 7, T = 25;
  const Tensor k1 = keys_with_ties(n, d1, 11), k2 = random_f32(n, d2, 12),
               tokens = random_f32(T, d1 + d2, 13);
  for (int k : {1, 5, 12}) {  // k > n: the halves' top-k is all of n
    compare([&](const Ops& o) {
      OnDevice dev(o);
      const TopKView out{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k), {}};
      o.product_topk(dev.put_strided(tokens, 2), dev.put(k1), dev.put(to_bf16(k2)), k, out, {});
      return results(dev.get(out.logits), dev.get(out.ids));
    });
  }
}

// A small inverted index: codewords, list sizes, and lists cut into blocks
// the way spilled lists are (router/spilled_lists.h): list c's blocks,
// each block's members, and the lists that outrank it.
struct Index {
  Tensor codewords;   // [C, d]
  Tensor list_sizes;  // i64 [C]
  Tensor block_offsets, ids, keys, list_blocks, outranking_offsets, outranking;

  ListBlocksView on(OnDevice& dev) const {
    return {dev.put(block_offsets),
            dev.put(ids),
            dev.put(keys),
            dev.put(list_blocks),
            dev.put(outranking_offsets),
            outranking.rows() ? dev.put(outranking) : TensorView()};
  }
};

// 5 lists over 30 experts of width d: list c holds experts e with e % 5 ==
// c (block 2c; list 2 has none, so block 4 is empty, unless `list_2_holds`)
// and a spill of the experts below 10 of list (c + 1) % 5 (block 2c + 1,
// outranked by that list, the spilled experts' primary). With list 2 empty,
// experts 2 and 7 sit only in list 1's spill, outranked by a list that
// lacks them: a malformed layout the ops must still scan as told.
Index small_index(int64_t d, uint64_t seed, bool list_2_holds = false) {
  const int64_t C = 5;
  const Tensor centers = keys_with_ties(30, d, seed);
  std::vector<int64_t> block_offsets{0}, list_blocks{0}, outranking_offsets{0};
  std::vector<int32_t> ids, outranking;
  for (int64_t c = 0; c < C; ++c) {
    for (int32_t e = 0; e < 30; ++e)
      if (e % C == c && (c != 2 || list_2_holds)) ids.push_back(e);
    block_offsets.push_back(static_cast<int64_t>(ids.size()));
    outranking_offsets.push_back(static_cast<int64_t>(outranking.size()));
    for (int32_t e = 0; e < 10; ++e)
      if (e % C == (c + 1) % C) ids.push_back(e);
    block_offsets.push_back(static_cast<int64_t>(ids.size()));
    outranking.push_back(static_cast<int32_t>((c + 1) % C));
    outranking_offsets.push_back(static_cast<int64_t>(outranking.size()));
    list_blocks.push_back(2 * c + 2);
  }
  Index x;
  x.codewords = random_f32(C, d, seed + 1);
  std::vector<int64_t> sizes;
  for (int64_t c = 0; c < C; ++c) sizes.push_back(block_offsets[2 * c + 2] - block_offsets[2 * c]);
  x.list_sizes = longs(sizes);
  x.block_offsets = longs(block_offsets);
  x.ids = ints(ids);
  x.keys = host_tensor(DType::kF32, static_cast<int64_t>(ids.size()), d);
  for (size_t i = 0; i < ids.size(); ++i)
    std::memcpy(x.keys.as<float>() + i * d, centers.as<float>() + ids[i] * d, d * 4);
  x.list_blocks = longs(list_blocks);
  x.outranking_offsets = longs(outranking_offsets);
  x.outranking = ints(outranking);
  return x;
}

std::vector<Tensor> probe_set(const OnDevice& dev, const ProbeSet& p) {
  return results(dev.get(p.offsets), dev.get(p.codewords), dev.get(p.shortlist_size));
}

TEST_P(OpsTest, SelectProbesExtendsShortLists) {
  const int64_t d = 12, T = 33;
  const Index index = small_index(d, 14);
  const Tensor tokens = random_f32(T, d, 15);
  // probes = 1 with k = 9 needs two lists or more; probes > C probes all.
  for (auto [probes, k] : {std::pair{1, 1}, std::pair{1, 9}, std::pair{2, 4}, std::pair{7, 2}}) {
    compare([&](const Ops& o) {
      OnDevice dev(o);
      const ProbeSet p = o.select_probes(dev.put_strided(tokens, 1), dev.put(index.codewords),
                                         dev.put(index.list_sizes), probes, k, {});
      std::vector<Tensor> out = probe_set(dev, p);
      out.push_back(longs({p.count}));
      const ProbeSet p16 = o.select_probes(dev.put(to_bf16(tokens)), dev.put(index.codewords),
                                           dev.put(index.list_sizes), probes, k, {});
      for (Tensor& t : probe_set(dev, p16)) out.push_back(std::move(t));
      return out;
    });
  }
  OnDevice dev(ops());
  const ProbeSet none = ops().select_probes(dev.out(DType::kF32, 0, d), dev.put(index.codewords),
                                            dev.put(index.list_sizes), 2, 3, {});
  EXPECT_EQ(none.count, 0);
}

TEST_P(OpsTest, ProbePairsSkipOutrankedBlocks) {
  const int64_t d = 8;
  const Index index = small_index(d, 16);
  // Token 0 probes list 1 then 0: list 0's spill block (experts of list 1)
  // is skipped; token 1 probes 4 alone; token 2 nothing; token 3 all.
  const Tensor offsets = longs({0, 2, 3, 3, 8}), codewords = ints({1, 0, 4, 3, 1, 0, 2, 4});
  const auto run_unit = [&](const Ops& o, ScanUnit unit) {
    OnDevice dev(o);
    ProbeSet probes;
    probes.offsets = o.empty(DType::kI64, 5, 1);
    probes.codewords = o.empty(DType::kI32, 8, 1);
    probes.shortlist_size = o.empty(DType::kI32, 4, 1);
    probes.count = 8;
    o.copy(probes.offsets, offsets, {});
    o.copy(probes.codewords, codewords, {});
    const PairSet p = o.probe_pairs(index.on(dev), probes, unit, {});
    return results(dev.get(p.query), dev.get(p.block), dev.get(p.block_end), dev.get(p.offsets),
                   dev.get(p.shortlist_size), longs({p.count}));
  };
  for (ScanUnit unit : {ScanUnit::kSegments, ScanUnit::kLists})
    compare([&](const Ops& o) { return run_unit(o, unit); });
  // Consecutive scanned blocks of a list make one pair: token 0 scans list
  // 1's blocks 2 and 3 as one run; token 3 probes every list, so each list's
  // spill block is outranked and its own block is a run alone.
  const std::vector<Tensor> got = run_unit(ops(), ScanUnit::kSegments);
  EXPECT_EQ(values_of<int32_t>(got[1]), (std::vector<int32_t>{2, 0, 8, 6, 2, 0, 4, 8}));
  EXPECT_EQ(values_of<int32_t>(got[2]), (std::vector<int32_t>{4, 1, 10, 7, 3, 1, 5, 9}));
  EXPECT_EQ(values_of<int32_t>(got[0]), (std::vector<int32_t>{0, 0, 1, 3, 3, 3, 3, 3}));
  EXPECT_EQ(values_of<int64_t>(got[3]), (std::vector<int64_t>{0, 2, 3, 3, 8}));
  // kLists: one pair per probed list, both its blocks; the shortlist still
  // counts each expert once (token 0: list 1's 8 + list 0's 6 without the
  // spill of list 1's experts, which list 1 scores).
  const std::vector<Tensor> whole = run_unit(ops(), ScanUnit::kLists);
  EXPECT_EQ(values_of<int32_t>(whole[1]), (std::vector<int32_t>{2, 0, 8, 6, 2, 0, 4, 8}));
  EXPECT_EQ(values_of<int32_t>(whole[2]), (std::vector<int32_t>{4, 2, 10, 8, 4, 2, 6, 10}));
  EXPECT_EQ(values_of<int32_t>(whole[0]), (std::vector<int32_t>{0, 0, 1, 3, 3, 3, 3, 3}));
  EXPECT_EQ(values_of<int64_t>(whole[3]), (std::vector<int64_t>{0, 2, 3, 3, 8}));
  EXPECT_EQ(values_of<int32_t>(whole[4]), values_of<int32_t>(got[4]));
  EXPECT_EQ(values_of<int32_t>(whole[4]), (std::vector<int32_t>{14, 8, 0, 24}));
}

// Scanning whole lists scores an expert of two probed lists twice; the
// merge keeps it once, so the routes equal those of the segment runs, in
// which each expert is scored once (on a well-formed layout: every expert
// in the list that outranks its spill).
TEST_P(OpsTest, ScanningWholeListsEqualsScanningSegments) {
  const int64_t d = 9, T = 40;
  const Index index = small_index(d, 21, true);
  const Tensor tokens = random_f32(T, d, 22);
  for (int k : {1, 4, 8})
    for (int probes : {1, 2, 5}) {
      const auto route = [&](const Ops& o, ScanUnit unit) {
        OnDevice dev(o);
        const ListBlocksView lists = index.on(dev);
        const TensorView x = dev.put(tokens);
        const ProbeSet sel =
            o.select_probes(x, dev.put(index.codewords), dev.put(index.list_sizes), probes, k, {});
        const PairSet p = o.probe_pairs(lists, sel, unit, {});
        const TopKView cand{dev.out(DType::kF32, p.count, k), dev.out(DType::kI32, p.count, k), {}};
        o.scan_blocks(lists, x, p.query, p.block, p.block_end, k, cand, {});
        const TopKView merged{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k), {}};
        o.merge_topk(cand, p.offsets, k, merged, {});
        const TopKView fused{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k), {}};
        o.scan_topk(lists, x, p, k, fused, {});
        return results(dev.get(merged.logits), dev.get(merged.ids), dev.get(p.shortlist_size),
                       dev.get(fused.logits), dev.get(fused.ids));
      };
      const std::vector<Tensor> segments = route(ops(), ScanUnit::kSegments);
      const std::vector<Tensor> lists = route(ops(), ScanUnit::kLists);
      const auto what = [&](size_t i) {
        return "result " + std::to_string(i) + ", k " + std::to_string(k) + ", probes " +
               std::to_string(probes) + " on " + ops().name();
      };
      for (size_t i = 0; i < segments.size(); ++i) expect_bits(lists[i], segments[i], what(i));
      for (size_t i = 0; i < 2; ++i) expect_bits(lists[3 + i], segments[i], what(3 + i));
      compare([&](const Ops& o) { return route(o, ScanUnit::kLists); });
    }
}

// Pairs on the ops' device: the hand-made runs of ScanBlocksAndMerge.
PairSet pair_set(const Ops& o, const Tensor& query, const Tensor& block, const Tensor& block_end,
                 const Tensor& offsets) {
  PairSet p;
  p.count = query.rows();
  p.query = o.empty(DType::kI32, p.count, 1);
  p.block = o.empty(DType::kI32, p.count, 1);
  p.block_end = o.empty(DType::kI32, p.count, 1);
  p.offsets = o.empty(DType::kI64, offsets.rows(), 1);
  o.copy(p.query, query, {});
  o.copy(p.block, block, {});
  o.copy(p.block_end, block_end, {});
  o.copy(p.offsets, offsets, {});
  return p;
}

// scan_topk is scan_blocks then merge_topk, bit for bit, on every backend:
// runs of blocks, an empty block, a token without pairs, an expert met
// twice (token 0: block 1 in two pairs; tokens 3 and 4: an expert in a
// spill and in its own list), pairs of one token scored against other
// queries where their experts differ (tokens 2 and 5); with and without the
// log-sum-exp and a bias. Bad pairs and offsets are refused by name.
TEST_P(OpsTest, ScanTopKEqualsScanThenMerge) {
  const int64_t d = 10, R = 7;
  const Index index = small_index(d, 17);
  const Tensor queries = random_f32(R, d, 18), bias = random_f32(30, 1, 112, 3.0);
  const Tensor query = ints({0, 0, 0, 0, 1, 4, 4, 3, 3, 6, 0, 2});
  const Tensor block = ints({1, 0, 9, 2, 4, 5, 6, 7, 8, 3, 9, 1});
  const Tensor block_end = ints({2, 2, 10, 4, 5, 6, 8, 8, 10, 4, 10, 2});
  const Tensor offsets = longs({0, 3, 3, 5, 7, 9, 12});
  for (int k : {1, 3, 8})
    for (bool with_lse : {false, true})
      for (bool with_bias : {false, true}) {
        const auto run = [&](const Ops& o) {
          OnDevice dev(o);
          const ListBlocksView lists = index.on(dev);
          const TensorView x = dev.put(queries), b = with_bias ? dev.put(bias) : TensorView{};
          const auto lse = [&](int64_t rows) {
            return with_lse ? dev.out(DType::kF64, rows, 2) : TensorView{};
          };
          const TopKView cand{dev.out(DType::kF32, 12, k), dev.out(DType::kI32, 12, k), lse(12), b};
          o.scan_blocks(lists, x, dev.put(query), dev.put(block), dev.put(block_end), k, cand, {});
          const TopKView merged{dev.out(DType::kF32, 6, k), dev.out(DType::kI32, 6, k), lse(6), b};
          o.merge_topk(cand, dev.put(offsets), k, merged, {});
          const TopKView fused{dev.out(DType::kF32, 6, k), dev.out(DType::kI32, 6, k), lse(6), b};
          o.scan_topk(lists, x, pair_set(o, query, block, block_end, offsets), k, fused, {});
          std::vector<Tensor> out = results(dev.get(merged.logits), dev.get(merged.ids),
                                            dev.get(fused.logits), dev.get(fused.ids));
          if (with_lse) {
            out.push_back(dev.get(merged.lse));
            out.push_back(dev.get(fused.lse));
          }
          return out;
        };
        compare(run, {false, false, false, false, true, true});
        const std::vector<Tensor> got = run(ops());
        const std::string what = "k " + std::to_string(k) + (with_lse ? ", lse" : "") +
                                 (with_bias ? ", bias" : "") + " on " + ops().name();
        expect_bits(got[2], got[0], "logits, " + what);
        expect_bits(got[3], got[1], "ids, " + what);
        if (with_lse) expect_bits(got[5], got[4], "lse, " + what);
      }
  OnDevice dev(ops());
  const TopKView out{dev.out(DType::kF32, 6, 3), dev.out(DType::kI32, 6, 3), {}};
  const auto refused = [&](const Tensor& blk, const Tensor& off, const std::string& part) {
    expect_refused(
        [&] {
          ops().scan_topk(index.on(dev), dev.put(queries),
                          pair_set(ops(), query, blk, block_end, off), 3, out, {});
        },
        part);
  };
  refused(block, longs({0, 3, 3, 5, 7, 13, 12}), "pairs.offsets[4 .. 5]");
  refused(ints({1, 0, 9, 2, 4, 5, 6, 7, 8, 3, 10, 1}), offsets, "pair 10 names block 10");
  refused(block, longs({0, 3, 3, 5}), "out");
}

// The host holds 1M logits of scan_topk at once where that gives every list
// 64 tokens (five lists here) and takes the tokens in chunks beyond that:
// 150,000 tokens probing every list (40 rows each) take six chunks, with the
// bits of the two ops.
TEST_P(OpsTest, ScanTopKAcrossChunks) {
  const int64_t d = 4, T = 150000;
  const int k = 4;
  const Index index = small_index(d, 31, true);
  const Tensor tokens = random_f32(T, d, 32);
  OnDevice dev(ops());
  const ListBlocksView lists = index.on(dev);
  const TensorView x = dev.put(tokens);
  const ProbeSet sel =
      ops().select_probes(x, dev.put(index.codewords), dev.put(index.list_sizes), 5, k, {});
  const PairSet p = ops().probe_pairs(lists, sel, ScanUnit::kLists, {});
  const std::vector<int64_t> sizes = values_of<int64_t>(index.list_sizes);
  ASSERT_GT(T * std::accumulate(sizes.begin(), sizes.end(), int64_t{0}), int64_t{5} << 20);
  const TopKView cand{dev.out(DType::kF32, p.count, k), dev.out(DType::kI32, p.count, k),
                      dev.out(DType::kF64, p.count, 2)};
  ops().scan_blocks(lists, x, p.query, p.block, p.block_end, k, cand, {});
  const TopKView merged{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k),
                        dev.out(DType::kF64, T, 2)};
  ops().merge_topk(cand, p.offsets, k, merged, {});
  const TopKView fused{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k),
                       dev.out(DType::kF64, T, 2)};
  ops().scan_topk(lists, x, p, k, fused, {});
  expect_bits(dev.get(fused.logits), dev.get(merged.logits), "logits on " + ops().name());
  expect_bits(dev.get(fused.ids), dev.get(merged.ids), "ids on " + ops().name());
  expect_bits(dev.get(fused.lse), dev.get(merged.lse), "lse on " + ops().name());
}

// merge_topk takes an id once: a later copy is skipped, whether it would
// enter ahead of the held one, tie with it or fill an empty slot.
TEST_P(OpsTest, MergeKeepsEachIdOnce) {
  // Three candidate rows of three: (5, 7) (3, 4) (2, 9) | (5, 7) (3, 4) empty
  // | (4, 1) (2, 9) (1, 8).
  const Tensor z =
      host_of(DType::kF32, 3, 3, std::vector<float>{5, 3, 2, 5, 3, -INFINITY, 4, 2, 1});
  const Tensor id = host_of(DType::kI32, 3, 3, std::vector<int32_t>{7, 4, 9, 7, 4, -1, 1, 9, 8});
  for (int k : {2, 3, 5})
    compare([&](const Ops& o) {
      OnDevice dev(o);
      const TopKView cand{dev.put(z), dev.put(id), {}};
      const TopKView merged{dev.out(DType::kF32, 1, k), dev.out(DType::kI32, 1, k), {}};
      o.merge_topk(cand, dev.put(longs({0, 3})), k, merged, {});
      return results(dev.get(merged.logits), dev.get(merged.ids));
    });
  OnDevice dev(ops());
  const TopKView cand{dev.put(z), dev.put(id), {}};
  const TopKView merged{dev.out(DType::kF32, 1, 5), dev.out(DType::kI32, 1, 5), {}};
  ops().merge_topk(cand, dev.put(longs({0, 3})), 5, merged, {});
  EXPECT_EQ(values_of<int32_t>(dev.get(merged.ids)), (std::vector<int32_t>{7, 1, 4, 9, 8}));
  EXPECT_EQ(values_of<float>(dev.get(merged.logits)), (std::vector<float>{5, 4, 3, 2, 1}));
}

TEST_P(OpsTest, ScanBlocksAndMerge) {
  const int64_t d = 10, R = 7;
  const Index index = small_index(d, 17);
  const Tensor queries = random_f32(R, d, 18);
  // Pairs in no block order, every block at least once (block 4 is empty);
  // five pairs are runs of both blocks of their list.
  const Tensor query = ints({3, 0, 6, 0, 1, 2, 4, 5, 3, 6, 0, 2});
  const Tensor block = ints({1, 0, 9, 2, 4, 5, 6, 7, 8, 3, 9, 1});
  const Tensor block_end = ints({2, 2, 10, 4, 5, 6, 8, 8, 10, 4, 10, 2});
  const Tensor offsets = longs({0, 3, 3, 5, 7, 9, 12});  // 6 tokens over the 12 pairs
  for (int k : {1, 3, 8}) {
    compare(
        [&](const Ops& o) {
          OnDevice dev(o);
          const ListBlocksView lists = index.on(dev);
          const TopKView cand{dev.out(DType::kF32, 12, k), dev.out(DType::kI32, 12, k),
                              dev.out(DType::kF64, 12, 2)};
          o.scan_blocks(lists, dev.put_strided(queries, 1), dev.put(query), dev.put(block),
                        dev.put(block_end), k, cand, {});
          const TopKView merged{dev.out(DType::kF32, 6, k), dev.out(DType::kI32, 6, k),
                                dev.out(DType::kF64, 6, 2)};
          o.merge_topk(cand, dev.put(offsets), k, merged, {});
          const TopKView plain{dev.out(DType::kF32, 12, k), dev.out(DType::kI32, 12, k), {}};
          o.scan_blocks(lists, dev.put(to_bf16(queries)), dev.put(query), dev.put(block),
                        dev.put(block_end), k, plain, {});
          return results(dev.get(cand.logits), dev.get(cand.ids), dev.get(cand.lse),
                         dev.get(merged.logits), dev.get(merged.ids), dev.get(merged.lse),
                         dev.get(plain.logits), dev.get(plain.ids));
        },
        {false, false, true, false, false, true});
  }
  // A pair's top-k is the top-k of its query against its blocks alone; the
  // lse covers every row of them, added in order.
  OnDevice dev(ops());
  const int k = 3;
  const TopKView cand{dev.out(DType::kF32, 12, k), dev.out(DType::kI32, 12, k),
                      dev.out(DType::kF64, 12, 2)};
  ops().scan_blocks(index.on(dev), dev.put(queries), dev.put(query), dev.put(block),
                    dev.put(block_end), k, cand, {});
  const std::vector<int32_t> ids = values_of<int32_t>(dev.get(cand.ids));
  const std::vector<float> z = values_of<float>(dev.get(cand.logits));
  const std::vector<double> lse = values_of<double>(dev.get(cand.lse));
  const int64_t* bo = index.block_offsets.as<int64_t>();
  for (int64_t p = 0; p < 12; ++p) {
    const int64_t q = query.as<int32_t>()[p], b = block.as<int32_t>()[p],
                  e = block_end.as<int32_t>()[p];
    std::vector<float> zs(k);
    std::vector<int32_t> is(k);
    TopK top(k, zs.data(), is.data());
    LogSumExp l;
    for (int64_t r = bo[b]; r < bo[e]; ++r) {
      const float s = lane_dot(queries.as<float>() + q * d, index.keys.as<float>() + r * d, d);
      top.push(s, index.ids.as<int32_t>()[r]);
      l.add(s);
    }
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + p * k, ids.begin() + (p + 1) * k), is) << p;
    EXPECT_EQ(std::vector<float>(z.begin() + p * k, z.begin() + (p + 1) * k), zs) << p;
    if (libm_bits()) {
      EXPECT_EQ(lse[2 * p + 1], l.sum) << p;
    }
  }
}

TEST_P(OpsTest, FinalizeGates) {
  const int64_t T = 300;  // above the host's parallel threshold
  for (int k : {1, 4}) {
    Tensor logits = random_f32(T, k, 19, 4.0);
    // Rows sorted best first, as routes are.
    for (int64_t t = 0; t < T; ++t)
      std::sort(logits.as<float>() + t * k, logits.as<float>() + (t + 1) * k, std::greater<>());
    std::vector<double> lse;
    for (int64_t t = 0; t < T; ++t) {
      lse.push_back(logits.as<float>()[t * k]);
      lse.push_back(1.0 + 0.25 * static_cast<double>(t % 7));
    }
    const Tensor lse_t = host_of(DType::kF64, T, 2, lse);
    compare(
        [&](const Ops& o) {
          OnDevice dev(o);
          const TensorView norm = dev.out(DType::kF64, T, 1), gates = dev.out(DType::kF32, T, k);
          o.finalize_gates(dev.put_strided(logits, 1), TensorView(), norm, gates,
                           GateFunction::kSoftmax, {});
          const TensorView norm2 = dev.out(DType::kF64, T, 1), gates2 = dev.out(DType::kF32, T, k);
          o.finalize_gates(dev.put(logits), dev.put(lse_t), norm2, gates2, GateFunction::kSoftmax,
                           {});
          return results(dev.get(norm), dev.get(gates), dev.get(norm2), dev.get(gates2));
        },
        {true, true, true, true});
  }
  // Chosen gates of a row sum to 1.
  OnDevice dev(ops());
  const Tensor logits = host_of(DType::kF32, 1, 4, std::vector<float>{2.0f, 1.0f, 0.5f, -1.0f});
  const TensorView gates = dev.out(DType::kF32, 1, 4);
  ops().finalize_gates(dev.put(logits), TensorView(), dev.out(DType::kF64, 1, 1), gates,
                       GateFunction::kSoftmax, {});
  const std::vector<float> g = values_of<float>(dev.get(gates));
  EXPECT_NEAR(g[0] + g[1] + g[2] + g[3], 1.0, 1e-6);
  EXPECT_GT(g[0], g[1]);
}

TEST_P(OpsTest, LogitGradsAndRowGrads) {
  const int64_t T = 20, d = 9, E = 15;
  const int k = 3;
  const Tensor tokens = random_f32(T, d, 20), keys = random_f32(E, d, 21);
  // The normalizing set of token t: its chosen experts (t, t+1, t+2) mod E
  // and, for even t, two more; one zero coefficient.
  std::vector<int32_t> chosen, token, expert;
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) chosen.push_back(static_cast<int32_t>((t + j) % E));
  for (int32_t t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      token.push_back(t);
      expert.push_back(chosen[t * k + j]);
    }
    if (t % 2 == 0)
      for (int32_t e : {(t + 5) % 15, (t + 9) % 15}) {
        token.push_back(t);
        expert.push_back(e);
      }
  }
  const int64_t N = static_cast<int64_t>(token.size());
  const Tensor chosen_t = host_of(DType::kI32, T, k, chosen), token_t = ints(token),
               expert_t = ints(expert);
  const Tensor gates = random_f32(T, k, 22, 0.3), d_gates = random_f32(T, k, 23),
               norm = host_of(DType::kF64, T, 1, std::vector<double>(T, 1.5));
  Tensor z = random_f32(N, 1, 24);
  compare(
      [&](const Ops& o) {
        OnDevice dev(o);
        const TensorView coef = dev.out(DType::kF64, N, 1);
        o.logit_grads(dev.put(token_t), dev.put(expert_t), dev.put(z), dev.put(chosen_t),
                      dev.put(gates), dev.put(to_bf16(d_gates)), dev.put(norm), coef,
                      GateFunction::kSoftmax, {});
        return results(dev.get(coef));
      },
      {true});
  // Row gradients from fixed coefficients (no transcendentals: exact
  // everywhere), with a zero coefficient and repeated rows.
  std::vector<double> coefs;
  for (int64_t i = 0; i < N; ++i)
    coefs.push_back(i == 4 ? 0.0 : 0.125 * static_cast<double>(i % 9) - 0.5);
  const Tensor coef_t = host_of(DType::kF64, N, 1, coefs);
  const auto run = [&](const Ops& o) {
    OnDevice dev(o);
    const TensorView dh = dev.out(DType::kF32, T, d);
    const RowGrads g =
        o.accumulate_row_grads(dev.put_strided(tokens, 1), dev.put(to_bf16(keys)),
                               {dev.put(token_t), dev.put(expert_t), dev.put(coef_t)}, dh, {});
    return results(dev.get(dh), dev.get(g.rows), dev.get(g.values), longs({g.count}));
  };
  compare(run);
  // Against a direct double sum; zero coefficients list no row.
  const std::vector<Tensor> got = run(ops());
  const Tensor k16 = widened(to_bf16(keys));
  std::vector<double> dh(T * d, 0.0);
  std::map<int32_t, std::vector<double>> dk;
  for (int64_t i = 0; i < N; ++i) {
    if (coefs[i] == 0.0) continue;
    for (int64_t c = 0; c < d; ++c) {
      dh[token[i] * d + c] += coefs[i] * k16.as<float>()[expert[i] * d + c];
      dk[expert[i]].resize(d);
      dk[expert[i]][c] += coefs[i] * tokens.as<float>()[token[i] * d + c];
    }
  }
  for (int64_t i = 0; i < T * d; ++i) EXPECT_EQ(got[0].as<float>()[i], static_cast<float>(dh[i]));
  ASSERT_EQ(got[3].as<int64_t>()[0], static_cast<int64_t>(dk.size()));
  int64_t r = 0;
  for (const auto& [row, v] : dk) {
    EXPECT_EQ(got[1].as<int32_t>()[r], row);
    for (int64_t c = 0; c < d; ++c)
      EXPECT_EQ(got[2].as<float>()[r * d + c], static_cast<float>(v[c]));
    ++r;
  }
}

// The key gradients sum each row's contributions in token order, in double:
// they do not depend on the order the contributions come in, nor on whether
// d_tokens is asked for; few rows or many (a counting sort on the host, or
// a sort).
TEST_P(OpsTest, RowGradsDoNotDependOnContributionOrder) {
  for (const int64_t R : {int64_t{13}, int64_t{20000}}) {
    SCOPED_TRACE("rows " + std::to_string(R));
    const int64_t T = 50, width = 9;
    const Tensor x = random_f32(T, width, 3), keys = random_f32(R, width, 4);
    std::mt19937_64 rng(4);
    std::vector<int32_t> token, row;
    std::vector<double> coef;
    for (int32_t t = 0; t < T; ++t)
      for (int j = 0; j < 4; ++j) {
        token.push_back(t);
        row.push_back(static_cast<int32_t>(rng() % 13));
        coef.push_back(std::ldexp(static_cast<double>(rng() % 2001) - 1000.0, -7));
      }
    std::vector<size_t> perm(token.size());
    for (size_t i = 0; i < perm.size(); ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int32_t> token2, row2;
    std::vector<double> coef2;
    for (size_t i : perm) {
      token2.push_back(token[i]);
      row2.push_back(row[i]);
      coef2.push_back(coef[i]);
    }
    const auto key_grads = [&](const std::vector<int32_t>& t, const std::vector<int32_t>& r,
                               const std::vector<double>& c, bool token_grads) {
      OnDevice dev(ops());
      const RowGrads g = ops().accumulate_row_grads(
          dev.put(x), dev.put(keys),
          {dev.put(ints(t)), dev.put(ints(r)),
           dev.put(host_of(DType::kF64, static_cast<int64_t>(c.size()), 1, c))},
          token_grads ? dev.out(DType::kF32, T, width) : TensorView(), {});
      return results(dev.get(g.rows), dev.get(g.values));
    };
    const std::vector<Tensor> a = key_grads(token, row, coef, true);
    for (const std::vector<Tensor>& b :
         {key_grads(token2, row2, coef2, true), key_grads(token, row, coef, false)}) {
      expect_bits(b[0], a[0], "rows");
      expect_bits(b[1], a[1], "values");
    }
    const std::vector<int32_t> rows = values_of<int32_t>(a[0]);
    EXPECT_TRUE(std::is_sorted(rows.begin(), rows.end()));
    for (size_t i = 0; i < rows.size(); ++i)
      for (int64_t c = 0; c < width; ++c) {
        double s = 0.0;
        for (size_t n = 0; n < token.size(); ++n)
          if (row[n] == rows[i]) s += coef[n] * x.as<float>()[token[n] * width + c];
        EXPECT_NEAR(a[1].as<float>()[i * width + c], s, 1e-5 * (1.0 + std::fabs(s)));
      }
    // No contributions: no rows.
    EXPECT_EQ(key_grads({}, {}, {}, true)[0].rows(), 0);
  }
}

// ---- experts ------------------------------------------------------------------

struct ExpertInputs {
  int64_t experts, d, h, tokens;
  Activation act;
  Tensor w1, w2, x, dy, token, local, gate;

  ExpertInputs(int64_t experts, int64_t d, int64_t h, int64_t tokens, int64_t pairs, Activation act,
               uint64_t seed)
      : experts(experts), d(d), h(h), tokens(tokens), act(act) {
    w1 = random_f32(experts * w1_rows(act, h), d, seed, 0.5);
    w2 = random_f32(experts * d, h, seed + 1, 0.5);
    x = random_f32(tokens, d, seed + 2);
    dy = random_f32(tokens, d, seed + 3);
    std::mt19937_64 rng(seed + 4);
    std::vector<int32_t> t, l;
    std::vector<float> g;
    for (int64_t p = 0; p < pairs; ++p) {
      t.push_back(static_cast<int32_t>(rng() % tokens));
      l.push_back(static_cast<int32_t>(rng() % experts));
      g.push_back(static_cast<float>(rng() % 100) / 100.0f);
    }
    token = ints(t);
    local = ints(l);
    gate = floats(g);
  }
  int64_t pairs() const { return token.rows(); }
};

TEST_P(OpsTest, ExpertForwardAndBackward) {
  // h = 1 and wider; d a multiple of 8 (and 16) and not; enough experts to run them
  // on threads; no pairs; bf16 weights and inputs.
  struct Case {
    int64_t experts, d, h, tokens, pairs;
    Activation act;
    bool bf16;
  };
  for (const Case c : {Case{6, 16, 3, 10, 25, Activation::kGelu, false},
                       Case{40, 13, 1, 30, 90, Activation::kRelu, false},
                       Case{9, 24, 11, 12, 40, Activation::kSilu, true},
                       Case{7, 12, 5, 9, 30, Activation::kSwiglu, false},
                       Case{40, 9, 2, 30, 100, Activation::kSwiglu, true},
                       Case{4, 8, 2, 5, 0, Activation::kGelu, false},
                       // contractions 37 and 19 wide (16-wide registers and a rest)
                       Case{5, 37, 19, 20, 60, Activation::kRelu, false}}) {
    const ExpertInputs in(c.experts, c.d, c.h, c.tokens, c.pairs, c.act, 30 + c.d);
    const bool exact = c.act == Activation::kRelu;
    const int64_t P = in.pairs();
    compare(
        [&](const Ops& o) {
          OnDevice dev(o);
          const ExpertWeightsView w{c.bf16 ? dev.put(to_bf16(in.w1)) : dev.put_strided(in.w1, 1),
                                    c.bf16 ? dev.put(to_bf16(in.w2)) : dev.put(in.w2),
                                    c.experts,
                                    c.d,
                                    c.h,
                                    c.act};
          const TensorView x = c.bf16 ? dev.put(to_bf16(in.x)) : dev.put(in.x);
          const ExpertPairsView pairs{dev.put(in.token), dev.put(in.local), dev.put(in.gate)};
          const TensorView out = dev.out(DType::kF32, c.tokens, c.d, 0.25);  // earlier sums
          const ExpertCacheView cache{dev.out(DType::kF32, P, w1_rows(c.act, c.h)),
                                      dev.out(DType::kF32, P, c.d)};
          o.expert_forward(w, x, pairs, out, cache, {});
          const TensorView d_gate = dev.out(DType::kF32, P, 1);
          const TensorView dx = dev.out(DType::kF32, c.tokens, c.d, 0.0);
          const TouchedExpertGrads g =
              o.expert_backward(w, x, pairs, cache, dev.put(in.dy), d_gate, dx, {});
          return results(dev.get(cache.pre), dev.get(cache.output), dev.get(out), dev.get(d_gate),
                         dev.get(dx), dev.get(g.local), dev.get(g.w1), dev.get(g.w2),
                         longs({g.count}));
        },
        {false, !exact, !exact, !exact, !exact, false, !exact, !exact});
  }
}

TEST_P(OpsTest, ExpertForwardIsTheFfnOfEachPair) {
  const ExpertInputs in(5, 11, 4, 6, 14, Activation::kSilu, 50);
  OnDevice dev(ops());
  const TensorView out = dev.out(DType::kF32, 6, 11, 0.0);
  const ExpertCacheView cache{dev.out(DType::kF32, 14, 4), dev.out(DType::kF32, 14, 11)};
  ops().expert_forward({dev.put(in.w1), dev.put(in.w2), 5, 11, 4, Activation::kSilu}, dev.put(in.x),
                       {dev.put(in.token), dev.put(in.local), dev.put(in.gate)}, out, cache, {});
  const Tensor pre = dev.get(cache.pre), y = dev.get(cache.output), o = dev.get(out);
  std::vector<double> sum(6 * 11, 0.0);
  for (int64_t p = 0; p < 14; ++p) {
    const int64_t t = in.token.as<int32_t>()[p], e = in.local.as<int32_t>()[p];
    std::vector<float> a(4);
    for (int64_t j = 0; j < 4; ++j) {
      const float z = lane_dot(in.x.as<float>() + t * 11, in.w1.as<float>() + (e * 4 + j) * 11, 11);
      EXPECT_EQ(pre.as<float>()[p * 4 + j], z);
      a[j] = static_cast<float>(act_value(Activation::kSilu, z));
    }
    for (int64_t c = 0; c < 11; ++c) {
      const float v = lane_dot(a.data(), in.w2.as<float>() + (e * 11 + c) * 4, 4);
      if (libm_bits()) {
        EXPECT_EQ(y.as<float>()[p * 11 + c], v);
      }
      sum[t * 11 + c] += static_cast<double>(in.gate.as<float>()[p]) * v;
    }
  }
  for (int64_t i = 0; i < 6 * 11; ++i) EXPECT_NEAR(o.as<float>()[i], sum[i], 1e-5);
}

// SwiGLU in double: L = sum dy . out with out[t] = sum of gate * W2
// (silu(G x) * (U x)) over t's pairs. The ops' output against it, and every
// gradient (gate, up and down rows, x, the gates) against central finite
// differences of it.
struct SwigluReference {
  const ExpertInputs& in;
  std::vector<double> w1, w2, x, gate;
  explicit SwigluReference(const ExpertInputs& inputs) : in(inputs) {
    const auto widen = [](const Tensor& t) {
      const float* v = t.as<float>();
      return std::vector<double>(v, v + t.rows() * t.cols());
    };
    w1 = widen(in.w1);
    w2 = widen(in.w2);
    x = widen(in.x);
    gate = widen(in.gate);
  }
  std::vector<double> out() const {
    const int64_t d = in.d, h = in.h;
    std::vector<double> o(static_cast<size_t>(in.tokens * d), 0.0);
    for (int64_t p = 0; p < in.pairs(); ++p) {
      const int64_t t = in.token.as<int32_t>()[p], e = in.local.as<int32_t>()[p];
      std::vector<double> a(static_cast<size_t>(h));
      for (int64_t j = 0; j < h; ++j) {
        double g = 0.0, u = 0.0;
        for (int64_t c = 0; c < d; ++c) {
          g += w1[(e * 2 * h + j) * d + c] * x[t * d + c];
          u += w1[(e * 2 * h + h + j) * d + c] * x[t * d + c];
        }
        a[j] = g / (1.0 + std::exp(-g)) * u;
      }
      for (int64_t c = 0; c < d; ++c) {
        double y = 0.0;
        for (int64_t j = 0; j < h; ++j) y += w2[(e * d + c) * h + j] * a[j];
        o[t * d + c] += gate[p] * y;
      }
    }
    return o;
  }
  double loss() const {
    const std::vector<double> o = out();
    double l = 0.0;
    for (size_t i = 0; i < o.size(); ++i) l += static_cast<double>(in.dy.as<float>()[i]) * o[i];
    return l;
  }
  // dL/dv[i] by central differences.
  double slope(std::vector<double>& v, size_t i) {
    const double eps = 1e-5, keep = v[i];
    v[i] = keep + eps;
    const double up = loss();
    v[i] = keep - eps;
    const double down = loss();
    v[i] = keep;
    return (up - down) / (2 * eps);
  }
};

TEST_P(OpsTest, SwigluMatchesADoubleReferenceAndFiniteDifferences) {
  const int64_t E = 3, d = 5, h = 3, T = 4;
  const ExpertInputs in(E, d, h, T, 9, Activation::kSwiglu, 77);
  OnDevice dev(ops());
  const ExpertWeightsView w{dev.put(in.w1), dev.put(in.w2), E, d, h, Activation::kSwiglu};
  const ExpertPairsView pairs{dev.put(in.token), dev.put(in.local), dev.put(in.gate)};
  const TensorView x = dev.put(in.x), out = dev.out(DType::kF32, T, d, 0.0);
  const int64_t P = in.pairs();
  const ExpertCacheView cache{dev.out(DType::kF32, P, 2 * h), dev.out(DType::kF32, P, d)};
  ops().expert_forward(w, x, pairs, out, cache, {});
  const TensorView d_gate = dev.out(DType::kF32, P, 1), dx = dev.out(DType::kF32, T, d, 0.0);
  const TouchedExpertGrads g =
      ops().expert_backward(w, x, pairs, cache, dev.put(in.dy), d_gate, dx, {});
  SwigluReference ref(in);
  const Tensor o = dev.get(out);
  const std::vector<double> want = ref.out();
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_NEAR(o.as<float>()[i], want[i], 1e-5 * (1.0 + std::fabs(want[i]))) << "out " << i;
  const auto near = [](double got, double slope, const std::string& what) {
    EXPECT_NEAR(got, slope, 1e-4 * (1.0 + std::fabs(slope))) << what;
  };
  const Tensor gx = dev.get(dx), gg = dev.get(d_gate);
  for (size_t i = 0; i < ref.x.size(); ++i)
    near(gx.as<float>()[i], ref.slope(ref.x, i), "dx " + std::to_string(i));
  for (size_t p = 0; p < ref.gate.size(); ++p)
    near(gg.as<float>()[p], ref.slope(ref.gate, p), "d_gate " + std::to_string(p));
  const Tensor local = dev.get(g.local), g1 = dev.get(g.w1), g2 = dev.get(g.w2);
  ASSERT_GE(g.count, 2);
  for (int64_t i = 0; i < g.count; ++i) {
    const int64_t e = local.as<int32_t>()[i];
    for (int64_t r = 0; r < 2 * h * d; ++r)  // gate rows, then up rows
      near(g1.as<float>()[i * 2 * h * d + r], ref.slope(ref.w1, e * 2 * h * d + r),
           "d" + std::string(r < h * d ? "gate" : "up") + " of expert " + std::to_string(e));
    for (int64_t r = 0; r < d * h; ++r)
      near(g2.as<float>()[i * d * h + r], ref.slope(ref.w2, e * d * h + r),
           "ddown of expert " + std::to_string(e));
  }
}

TEST_P(OpsTest, AddScaledIsMultiplyThenAdd) {
  const Tensor dst = random_f32(6, 10, 60), src = random_f32(6, 10, 61);
  compare([&](const Ops& o) {
    OnDevice dev(o);
    const TensorView a = dev.put_strided(dst, 1);
    o.add_scaled(a, dev.put(src), -0.375f, {});
    const TensorView zero = dev.put(dst);
    o.add_scaled(zero, dev.out(DType::kF32, 6, 10, 0.0), -0.5f, {});  // untouched entries stay
    return results(dev.get(a), dev.get(zero));
  });
  OnDevice dev(ops());
  const TensorView a = dev.put(dst);
  ops().add_scaled(a, dev.put(src), 0.75f, {});
  const Tensor got = dev.get(a);
  for (int64_t i = 0; i < 60; ++i) {
    const float p = 0.75f * src.as<float>()[i];
    EXPECT_EQ(got.as<float>()[i], dst.as<float>()[i] + p);
  }
}

// ---- rows (gather_rows, sum_rows, add_scaled_rows) --------------------------
//
// Each op against a plain loop in ops/ops.h's order, bit for bit on every
// backend. The entries' magnitudes spread over 2^-10 .. 2^10 so that another
// summation order, or an fma, changes bits; some are -0.0. Each body runs a
// small case and one large enough for the host's threads (worth_threads in
// ops/host/host_rows.cpp).

// Gaussian entries times 2^k, k uniform in [-10, 10]; every seventh -0.0.
Tensor spread_f32(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_int_distribution<int> exponent(-10, 10);
  std::vector<float> v(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < v.size(); ++i)
    v[i] = i % 7 == 3 ? -0.0f : std::ldexp(static_cast<float>(normal(rng)), exponent(rng));
  return host_of(DType::kF32, rows, cols, v);
}

// n ids uniform in [0, limit), seeded.
std::vector<int32_t> random_ids(int64_t n, int32_t limit, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> id(0, limit - 1);
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int32_t& x : v) x = id(rng);
  return v;
}

// A host tensor's copy (Tensors are move-only).
Tensor copy_of(const Tensor& t) {
  Tensor out = host_tensor(t.dtype(), t.rows(), t.cols());
  const size_t bytes = static_cast<size_t>(t.rows() * t.cols()) * dtype_size(t.dtype());
  if (bytes > 0) std::memcpy(out.view().data, t.view().data, bytes);
  return out;
}

// Entry (r, c) of a contiguous f32 or bf16 host tensor, widened exactly.
float entry_of(const Tensor& t, int64_t r, int64_t c) {
  const int64_t i = r * t.cols() + c;
  return t.dtype() == DType::kBF16 ? widen_bf16(t.as<uint16_t>()[i]) : t.as<float>()[i];
}

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// The small and the large case: (rows of src, cols, ids).
struct RowCase {
  int64_t src_rows, cols, n;
};
const RowCase kRowCases[] = {{9, 13, 23}, {300, 40, 2000}};

TEST_P(OpsTest, GatherRowsCopiesOrRoundsAsCopy) {
  for (const RowCase& rc : kRowCases) {
    Tensor f32 = spread_f32(rc.src_rows, rc.cols, 200 + rc.n);
    // Ties of bf16 rounding: 1 + 2^-8 to even (1), 1 + 3 * 2^-8 up (1 + 2^-6).
    f32.as<float>()[0] = 1.0f + 0x1p-8f;
    f32.as<float>()[1] = 1.0f + 0x3p-8f;
    // A signalling NaN: an f32 or a bf16 one keeps its bits where the dtype
    // stays; f32 -> bf16 makes it quiet, as copy() does.
    const uint32_t snan32 = 0x7F800001u;
    std::memcpy(f32.as<float>() + 2, &snan32, sizeof snan32);
    std::vector<int32_t> rows = random_ids(rc.n, static_cast<int32_t>(rc.src_rows), 300 + rc.n);
    rows[0] = rows[2] = 0;  // repeated, and the row with the ties
    for (DType sd : {DType::kF32, DType::kBF16})
      for (DType dd : {DType::kF32, DType::kBF16}) {
        Tensor src = sd == DType::kBF16 ? to_bf16(f32) : copy_of(f32);
        if (sd == DType::kBF16) src.as<uint16_t>()[2] = 0x7F81u;  // signalling
        // The reference: the rows themselves, then copy()'s conversion.
        Tensor same = host_tensor(sd, rc.n, rc.cols);
        const size_t row_bytes = static_cast<size_t>(rc.cols) * dtype_size(sd);
        for (int64_t i = 0; i < rc.n; ++i)
          std::memcpy(static_cast<char*>(same.view().data) + i * row_bytes,
                      static_cast<const char*>(src.view().data) + rows[i] * row_bytes, row_bytes);
        const Tensor want = sd == dd             ? std::move(same)
                            : dd == DType::kBF16 ? to_bf16(same)
                                                 : widened(same);
        OnDevice dev(ops());
        const TensorView dst = dev.out(dd, rc.n, rc.cols + 2).block(0, rc.n, 1, rc.cols);
        ops().gather_rows(dev.put_strided(src, 1), dev.put(ints(rows)), dst, {});
        const std::string what = "gather_rows " + std::string(to_string(sd)) + " -> " +
                                 to_string(dd) + ", " + std::to_string(rc.n) + " rows";
        const Tensor got = dev.get(dst);
        expect_same(got, want, what);
      }
    // f32 -> bf16 rounds to nearest even (checked without the helpers above).
    OnDevice dev(ops());
    const TensorView dst = dev.out(DType::kBF16, rc.n, rc.cols);
    ops().gather_rows(dev.put(f32), dev.put(ints(rows)), dst, {});
    const Tensor got = dev.get(dst);
    EXPECT_EQ(got.as<uint16_t>()[0], 0x3F80u) << "1 + 2^-8 on " << ops().name();
    EXPECT_EQ(got.as<uint16_t>()[1], 0x3F82u) << "1 + 3 * 2^-8 on " << ops().name();
  }
}

TEST_P(OpsTest, SumRowsAddsEachGroupInOrderFromPlusZero) {
  for (const RowCase& rc : kRowCases) {
    Tensor f32 = spread_f32(rc.src_rows, rc.cols, 400 + rc.n);
    for (int64_t c = 0; c < rc.cols; ++c) f32.as<float>()[5 * rc.cols + c] = -0.0f;
    std::vector<int32_t> rows = random_ids(rc.n, static_cast<int32_t>(rc.src_rows), 500 + rc.n);
    rows[4] = 5;  // group 2 below: the -0.0 row alone
    // Groups from offset 1 on: [1, 4), empty, [4, 5), [5, 10), empty, then
    // groups of 1 .. 7 rows up to the last id.
    std::vector<int64_t> offsets{1, 4, 4, 5, 10, 10};
    for (int64_t size = 1; offsets.back() + size <= rc.n; size = size % 7 + 1)
      offsets.push_back(offsets.back() + size);
    const int64_t G = static_cast<int64_t>(offsets.size()) - 1;
    for (DType sd : {DType::kF32, DType::kBF16}) {
      const Tensor src = sd == DType::kBF16 ? to_bf16(f32) : copy_of(f32);
      Tensor want = host_tensor(DType::kF32, G, rc.cols);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < rc.cols; ++c) {
          float sum = 0.0f;
          for (int64_t j = offsets[g]; j < offsets[g + 1]; ++j)
            sum = sum + entry_of(src, rows[j], c);
          want.as<float>()[g * rc.cols + c] = sum;
        }
      OnDevice dev(ops());
      const TensorView dst = dev.out(DType::kF32, G, rc.cols);
      ops().sum_rows(dev.put_strided(src, 2), dev.put(ints(rows)), dev.put(longs(offsets)), dst,
                     {});
      const Tensor got = dev.get(dst);
      expect_same(
          got, want,
          "sum_rows of " + std::string(to_string(sd)) + ", " + std::to_string(G) + " groups");
      for (int64_t g : {1, 2, 4})  // empty, the lone -0.0 row, empty: +0.0
        for (int64_t c = 0; c < rc.cols; ++c)
          EXPECT_EQ(bits_of(got.as<float>()[g * rc.cols + c]), 0u) << "group " << g;
    }
  }
}

TEST_P(OpsTest, AddScaledRowsAddsEachDstRowsPairsInOrder) {
  for (const RowCase& rc : kRowCases) {
    const int64_t dst_rows_n = rc.n / 8 + 3;  // the last one no pair names
    const Tensor dst0 = spread_f32(dst_rows_n, rc.cols, 600 + rc.n);
    const Tensor f32 = spread_f32(rc.src_rows, rc.cols, 700 + rc.n);
    const Tensor scale = spread_f32(rc.n, 1, 800 + rc.n);  // -0.0 among them
    const std::vector<int32_t> dst_rows =
        random_ids(rc.n, static_cast<int32_t>(dst_rows_n - 1), 900 + rc.n);
    const std::vector<int32_t> src_rows =
        random_ids(rc.n, static_cast<int32_t>(rc.src_rows), 1000 + rc.n);
    for (DType sd : {DType::kF32, DType::kBF16}) {
      const Tensor src = sd == DType::kBF16 ? to_bf16(f32) : copy_of(f32);
      Tensor want = host_tensor(DType::kF32, dst_rows_n, rc.cols);
      std::memcpy(want.as<float>(), dst0.as<float>(), sizeof(float) * dst_rows_n * rc.cols);
      for (int64_t p = 0; p < rc.n; ++p)
        for (int64_t c = 0; c < rc.cols; ++c) {
          const float product = scale.as<float>()[p] * entry_of(src, src_rows[p], c);
          float& d = want.as<float>()[dst_rows[p] * rc.cols + c];
          d = d + product;
        }
      OnDevice dev(ops());
      const TensorView dst = dev.put_strided(dst0, 1);
      ops().add_scaled_rows(dst, dev.put(ints(dst_rows)), dev.put_strided(src, 3),
                            dev.put(ints(src_rows)), dev.put(scale), {});
      expect_same(dev.get(dst), want,
                  "add_scaled_rows of " + std::string(to_string(sd)) + ", " + std::to_string(rc.n) +
                      " pairs");
    }
  }
}

TEST_P(OpsTest, RowOpsRefuseBadArgumentsByName) {
  OnDevice dev(ops());
  const TensorView src = dev.put(random_f32(5, 4, 1100));
  const TensorView dst = dev.put(random_f32(3, 4, 1101));
  const std::string name = ops().name();
  expect_refused(
      [&] {
        ops().gather_rows(src, dev.put(ints({0, 5, 1})), dst, {});
      },
      name + " gather_rows: rows[1] = 5 is outside [0, 5)");
  expect_refused(
      [&] {
        ops().gather_rows(src, dev.put(ints({0, 1, -1})), dst, {});
      },
      "gather_rows: rows[2] = -1");
  expect_refused(
      [&] {
        ops().gather_rows(src, dev.put(longs({0, 1, 2})), dst, {});
      },
      "gather_rows: rows is");
  expect_refused(
      [&] {
        ops().gather_rows(src, dev.put(ints({0, 1})), dst, {});
      },
      "gather_rows: dst is [3, 4]");
  expect_refused(
      [&] {
        ops().gather_rows(dev.put(ints({1, 2})), dev.put(ints({0})), dst, {});
      },
      "gather_rows: src is");

  const TensorView rows = dev.put(ints({4, 0, 1, 2}));
  const auto sum = [&](const std::vector<int64_t>& offsets) {
    ops().sum_rows(src, rows, dev.put(longs(offsets)),
                   dev.out(DType::kF32, std::max<int64_t>(0, std::ssize(offsets) - 1), 4), {});
  };
  expect_refused(
      [&] {
        sum({0, 3, 2, 4});
      },
      name + " sum_rows: offsets[1] .. offsets[2] = 3 .. 2 is not a range");
  expect_refused([&] { sum({0, 5}); }, "sum_rows: offsets[0] .. offsets[1] = 0 .. 5");
  expect_refused([&] { sum({-1, 2}); }, "sum_rows: offsets[0] .. offsets[1] = -1 .. 2");
  expect_refused([&] { sum({}); }, "sum_rows: offsets");
  expect_refused(
      [&] {
        ops().sum_rows(src, dev.put(ints({0, 7})), dev.put(longs({0, 1})),
                       dev.out(DType::kF32, 1, 4), {});
      },
      "sum_rows: rows[1] = 7 is outside [0, 5)");
  expect_refused(
      [&] {
        ops().sum_rows(src, rows, dev.put(longs({0, 4})), dev.out(DType::kBF16, 1, 4), {});
      },
      "sum_rows: dst is");

  // Refused before anything is written: dst keeps its values.
  const Tensor before = dev.get(dst);
  const auto add = [&](const std::vector<int32_t>& d, const std::vector<int32_t>& s, TensorView x,
                       const std::vector<float>& scale) {
    ops().add_scaled_rows(dst, dev.put(ints(d)), x, dev.put(ints(s)), dev.put(floats(scale)), {});
  };
  expect_refused(
      [&] {
        add({0, 2, 3}, {0, 1, 2}, src, {1, 1, 1});
      },
      name + " add_scaled_rows: dst_rows[2] = 3 is outside [0, 3)");
  expect_refused(
      [&] {
        add({0, 2, 1}, {-3, 1, 2}, src, {1, 1, 1});
      },
      "add_scaled_rows: src_rows[0] = -3 is outside [0, 5)");
  expect_refused([&] { add({0, 2, 1}, {0, 1}, src, {1, 1, 1}); }, "add_scaled_rows: src_rows is");
  expect_refused([&] { add({0, 2, 1}, {0, 1, 2}, src, {1, 1}); }, "add_scaled_rows: scale is");
  expect_refused([&] { add({0}, {0}, dev.put(random_f32(5, 3, 1102)), {1}); },
                 "add_scaled_rows: src has 3 columns, dst 4");
  expect_refused(
      [&] {
        ops().add_scaled_rows(dev.out(DType::kBF16, 3, 4), dev.put(ints({0})), src,
                              dev.put(ints({0})), dev.put(floats({1})), {});
      },
      "add_scaled_rows: dst is");
  expect_bits(dev.get(dst), before, "dst after refused add_scaled_rows");
}

// ---- bad arguments ----------------------------------------------------------

TEST_P(OpsTest, WrongShapesAndDtypesAreNamed) {
  OnDevice dev(ops());
  const TensorView a = dev.put(random_f32(3, 4, 70)), b = dev.put(random_f32(5, 4, 71));
  try {
    ops().score(a, b, dev.out(DType::kF32, 3, 4), {});
    ADD_FAILURE() << "a wrong c shape was accepted";
  } catch (const UsageError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(ops().name() + " score: c is [3, 4]"), std::string::npos) << msg;
  }
  EXPECT_THROW(ops().score(dev.put(ints({1, 2})), b, dev.out(DType::kF32, 2, 5), {}), UsageError);
  EXPECT_THROW(
      ops().dense_topk(a, b, 0, {dev.out(DType::kF32, 3, 1), dev.out(DType::kI32, 3, 1), {}}, {}),
      UsageError);
  EXPECT_THROW(ops().normalize_rows(a, dev.out(DType::kF32, 2, 4), {}), UsageError);
}

// ---- sizes that cross the device composition's blocks and chunks -----------
//
// The device backends score at most 2^22 logits at a time (ops/device/
// topk_ops.h kScoreBudget) and select dense top-k in chunks of 1,024 keys;
// these cases cross those boundaries, with ties, empty blocks, k larger than
// a block, tokens without pairs and codewords without members. Under
// AIRMOE_TEST_SMALL (scripts/gpu_check.sh's compute-sanitizer pass) they
// shrink to a size that still has several chunks but one block.

bool small_sizes() {
  return std::getenv("AIRMOE_TEST_SMALL") != nullptr;
}

TEST_P(OpsTest, DenseTopKAcrossBlocksAndChunks) {
  const int64_t E = small_sizes() ? 2500 : 4500, d = 6, T = small_sizes() ? 40 : 1000;
  const Tensor keys = keys_with_ties(E, d, 80), tokens = random_f32(T, d, 81);
  const int k = 10;
  compare(
      [&](const Ops& o) {
        OnDevice dev(o);
        const TopKView out{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k),
                           dev.out(DType::kF64, T, 2)};
        o.dense_topk(dev.put(tokens), dev.put(keys), k, out, {});
        return results(dev.get(out.logits), dev.get(out.ids), dev.get(out.lse));
      },
      {false, false, true});
}

TEST_P(OpsTest, SelectProbesAcrossBlocks) {
  const int64_t C = small_sizes() ? 300 : 2100, d = 5, T = small_sizes() ? 50 : 2100;
  const Tensor tokens = random_f32(T, d, 82), codewords = random_f32(C, d, 83);
  // Lists of 0 to 3 experts: k = 40 needs many more lists than `probes`.
  std::vector<int64_t> sizes(C);
  for (int64_t c = 0; c < C; ++c) sizes[c] = (c * 7919) % 4;
  const Tensor list_sizes = longs(sizes);
  for (auto [probes, k] : {std::pair{3, 40}, std::pair{16, 1}}) {
    compare([&](const Ops& o) {
      OnDevice dev(o);
      const ProbeSet p =
          o.select_probes(dev.put(tokens), dev.put(codewords), dev.put(list_sizes), probes, k, {});
      std::vector<Tensor> out = probe_set(dev, p);
      out.push_back(longs({p.count}));
      return out;
    });
  }
  // More probes than lists: every token probes every list, best first.
  const Tensor few = random_f32(7, d, 84);
  compare([&](const Ops& o) {
    OnDevice dev(o);
    const ProbeSet p = o.select_probes(dev.put(few), dev.put(codewords), dev.put(list_sizes),
                                       static_cast<int>(C) + 5, 2, {});
    EXPECT_EQ(p.count, 7 * C);
    return probe_set(dev, p);
  });
}

TEST_P(OpsTest, ScanBlocksAcrossChunksAndMerge) {
  // 60 blocks of 0 to 4,400 keys (every fifth empty) in 20 lists, pairs in
  // random order;
  // k = 12 exceeds the smallest blocks. The widest block holds 4,400 keys,
  // so about 950 pairs fit a chunk of 2^22 logits: 3 chunks.
  const int64_t S = 60, d = 4, R = 300, P = small_sizes() ? 200 : 2500, T = 400;
  const int64_t widest = small_sizes() ? 300 : 4400;
  std::mt19937_64 rng(85);
  std::vector<int64_t> block_offsets{0}, list_blocks{0}, no_outranking(S + 1, 0);
  std::vector<int32_t> ids;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t size = s % 5 == 0 ? 0 : s == 7 ? widest : static_cast<int64_t>(rng() % 40);
    for (int64_t j = 0; j < size; ++j) ids.push_back(static_cast<int32_t>(3 * ids.size() + s % 3));
    block_offsets.push_back(static_cast<int64_t>(ids.size()));
    // Three blocks per list: the host scans a list's blocks in one GEMM over
    // the rows its pairs span, each pair taking its own block's slice.
    if ((s + 1) % 3 == 0) list_blocks.push_back(s + 1);
  }
  const Tensor keys = keys_with_ties(static_cast<int64_t>(ids.size()), d, 86);
  const Tensor queries = random_f32(R, d, 87);
  std::vector<int32_t> query(P), block(P), block_end(P);
  for (int64_t p = 0; p < P; ++p) {
    query[p] = static_cast<int32_t>(rng() % R);
    block[p] = static_cast<int32_t>(p % 3 == 0 ? 7 : rng() % S);
    // Every fourth pair runs to its list's last block.
    block_end[p] = p % 4 == 1 ? (block[p] / 3 + 1) * 3 : block[p] + 1;
  }
  // Tokens own consecutive pairs; every tenth token owns none.
  std::vector<int64_t> offsets{0};
  for (int64_t t = 0; t < T; ++t)
    offsets.push_back(t == T - 1 ? P : std::min<int64_t>(P, offsets.back() + (t % 10 ? 7 : 0)));
  const Tensor bo = longs(block_offsets), lb = longs(list_blocks), oo = longs(no_outranking),
               id_t = ints(ids), q_t = ints(query), b_t = ints(block), e_t = ints(block_end),
               off_t = longs(offsets);
  const int k = 12;
  compare(
      [&](const Ops& o) {
        OnDevice dev(o);
        const ListBlocksView lists{dev.put(bo), dev.put(id_t), dev.put(keys),
                                   dev.put(lb), dev.put(oo),   TensorView()};
        const TopKView cand{dev.out(DType::kF32, P, k), dev.out(DType::kI32, P, k),
                            dev.out(DType::kF64, P, 2)};
        o.scan_blocks(lists, dev.put(queries), dev.put(q_t), dev.put(b_t), dev.put(e_t), k, cand,
                      {});
        const TopKView merged{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k),
                              dev.out(DType::kF64, T, 2)};
        o.merge_topk(cand, dev.put(off_t), k, merged, {});
        return results(dev.get(cand.logits), dev.get(cand.ids), dev.get(cand.lse),
                       dev.get(merged.logits), dev.get(merged.ids), dev.get(merged.lse));
      },
      {false, false, true, false, false, true});
}

TEST_P(OpsTest, KMeansStatsWithEmptyCodewords) {
  // 3,000 rows near 5 of 40 codewords: most codewords have no member.
  const int64_t n = small_sizes() ? 300 : 3000, d = 7, C = 40;
  const Tensor centers = random_f32(5, d, 88);
  Tensor rows = random_f32(n, d, 89, 0.05);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; ++c)
      rows.as<float>()[r * d + c] += centers.as<float>()[(r % 5) * d + c];
  Tensor codewords = random_f32(C, d, 90);
  for (int64_t c = 0; c < 5; ++c)
    std::memcpy(codewords.as<float>() + c * d, centers.as<float>() + c * d, d * 4);
  const auto stats = [&](const Ops& o) {
    OnDevice dev(o);
    const TensorView unit = dev.out(DType::kF32, n, d), unit_cw = dev.out(DType::kF32, C, d);
    o.normalize_rows(dev.put(rows), unit, {});
    o.normalize_rows(dev.put(codewords), unit_cw, {});
    return o.kmeans_stats(unit, unit_cw, TensorView(), {});
  };
  const KMeansStats want = stats(ref()), got = stats(ops());
  EXPECT_EQ(got.sums, want.sums);
  EXPECT_EQ(got.counts, want.counts);
  EXPECT_EQ(got.objective, want.objective);
  EXPECT_EQ(got.farthest_cos, want.farthest_cos);
  EXPECT_EQ(got.farthest_expert, want.farthest_expert);
  EXPECT_GT(std::count(want.counts.begin(), want.counts.end(), 0), 20);
}

TEST_P(OpsTest, RowGradsWithoutLiveContributions) {
  const Tensor tokens = random_f32(6, 5, 91), keys = random_f32(4, 5, 92);
  const Tensor token = ints({0, 3, 5}), row = ints({1, 1, 2}),
               zeros = host_of(DType::kF64, 3, 1, std::vector<double>(3, 0.0));
  compare([&](const Ops& o) {
    OnDevice dev(o);
    const TensorView dh = dev.out(DType::kF32, 6, 5);
    const RowGrads g = o.accumulate_row_grads(
        dev.put(tokens), dev.put(keys), {dev.put(token), dev.put(row), dev.put(zeros)}, dh, {});
    EXPECT_EQ(g.count, 0);
    const TensorView dh0 = dev.out(DType::kF32, 6, 5);
    const RowGrads none = o.accumulate_row_grads(
        dev.put(tokens), dev.put(keys),
        {dev.out(DType::kI32, 0, 1), dev.out(DType::kI32, 0, 1), dev.out(DType::kF64, 0, 1)}, dh0,
        {});
    EXPECT_EQ(none.count, 0);
    return results(dev.get(dh), dev.get(dh0));
  });
}

TEST_P(OpsTest, ExpertsWithOneCrowdedExpert) {
  // 600 pairs, four in five on expert 0; bf16 weights; GELU.
  const int64_t experts = 3, d = 9, h = 5, tokens = 50, P = small_sizes() ? 60 : 600;
  ExpertInputs in(experts, d, h, tokens, P, Activation::kGelu, 93);
  for (int64_t p = 0; p < P; ++p)
    if (p % 5) in.local.as<int32_t>()[p] = 0;
  compare(
      [&](const Ops& o) {
        OnDevice dev(o);
        const ExpertWeightsView w{dev.put(to_bf16(in.w1)), dev.put(to_bf16(in.w2)), experts, d, h,
                                  Activation::kGelu};
        const ExpertPairsView pairs{dev.put(in.token), dev.put(in.local), dev.put(in.gate)};
        const TensorView out = dev.out(DType::kF32, tokens, d, 0.0);
        const ExpertCacheView cache{dev.out(DType::kF32, P, h), dev.out(DType::kF32, P, d)};
        o.expert_forward(w, dev.put(in.x), pairs, out, cache, {});
        const TensorView d_gate = dev.out(DType::kF32, P, 1);
        const TensorView dx = dev.out(DType::kF32, tokens, d, 0.0);
        const TouchedExpertGrads g =
            o.expert_backward(w, dev.put(in.x), pairs, cache, dev.put(in.dy), d_gate, dx, {});
        return results(dev.get(cache.pre), dev.get(out), dev.get(d_gate), dev.get(dx),
                       dev.get(g.local), dev.get(g.w1), dev.get(g.w2));
      },
      {false, true, true, true, false, true, true});
}

TEST_P(OpsTest, NoTokensNoPairsNoWork) {
  OnDevice dev(ops());
  const Index index = small_index(4, 94);
  const TensorView none_f = dev.out(DType::kF32, 0, 4);
  EXPECT_NO_THROW(ops().product_topk(
      dev.out(DType::kF32, 0, 7), dev.put(random_f32(3, 3, 95)), dev.put(random_f32(3, 4, 96)), 2,
      {dev.out(DType::kF32, 0, 2), dev.out(DType::kI32, 0, 2), {}}, {}));
  ProbeSet probes;
  probes.offsets = ops().empty(DType::kI64, 1, 1);
  ops().fill(probes.offsets, 0.0, {});
  probes.codewords = ops().empty(DType::kI32, 0, 1);
  probes.shortlist_size = ops().empty(DType::kI32, 0, 1);
  const PairSet pairs = ops().probe_pairs(index.on(dev), probes, ScanUnit::kLists, {});
  EXPECT_EQ(pairs.count, 0);
  EXPECT_EQ(values_of<int64_t>(dev.get(pairs.offsets)), std::vector<int64_t>{0});
  const TensorView no_pairs = dev.out(DType::kI32, 0, 1);
  EXPECT_NO_THROW(ops().scan_blocks(index.on(dev), none_f, no_pairs, no_pairs, no_pairs, 3,
                                    {dev.out(DType::kF32, 0, 3), dev.out(DType::kI32, 0, 3), {}},
                                    {}));
  // Tokens whose offsets hold no pair get empty rows: id -1, logit -inf.
  const TopKView merged{dev.out(DType::kF32, 2, 3), dev.out(DType::kI32, 2, 3), {}};
  ops().merge_topk({dev.out(DType::kF32, 0, 3), dev.out(DType::kI32, 0, 3), {}},
                   dev.put(longs({0, 0, 0})), 3, merged, {});
  EXPECT_EQ(values_of<int32_t>(dev.get(merged.ids)), std::vector<int32_t>(6, -1));
  EXPECT_NO_THROW(ops().finalize_gates(none_f, TensorView(), dev.out(DType::kF64, 0, 1),
                                       dev.out(DType::kF32, 0, 4), GateFunction::kSoftmax, {}));
  EXPECT_NO_THROW(ops().logit_grads(no_pairs, no_pairs, dev.out(DType::kF32, 0, 1),
                                    dev.out(DType::kI32, 2, 3), dev.out(DType::kF32, 2, 3),
                                    dev.out(DType::kF32, 2, 3), dev.out(DType::kF64, 2, 1),
                                    dev.out(DType::kF64, 0, 1), GateFunction::kSoftmax, {}));
}

TEST_P(OpsTest, BadIndicesAreRefusedBeforeAnyRead) {
  // An index past its tensor is a UsageError naming the entry on every
  // backend; on a GPU it would otherwise read out of bounds.
  OnDevice dev(ops());
  const TensorView a = dev.put(random_f32(3, 4, 97)), b = dev.put(random_f32(5, 4, 98));
  try {
    ops().score_pairs(a, b, dev.put(ints({0, 1, 3})), dev.put(ints({0, 4, 1})),
                      dev.out(DType::kF32, 3, 1), {});
    ADD_FAILURE() << "a row index past a was accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("pair 2"), std::string::npos) << e.what();
  }
  const Index index = small_index(4, 99);
  const TopKView out{dev.out(DType::kF32, 2, 3), dev.out(DType::kI32, 2, 3), {}};
  EXPECT_THROW(
      ops().scan_blocks(index.on(dev), dev.put(random_f32(2, 4, 100)), dev.put(ints({0, 1})),
                        dev.put(ints({3, 10})), dev.put(ints({4, 11})), 3, out, {}),
      UsageError);  // block 10 of 10
  EXPECT_THROW(
      ops().scan_blocks(index.on(dev), dev.put(random_f32(2, 4, 100)), dev.put(ints({0, 2})),
                        dev.put(ints({3, 1})), dev.put(ints({4, 2})), 3, out, {}),
      UsageError);  // query 2 of 2
  // A pair's blocks must be a run of one list's (list c holds blocks 2c and
  // 2c + 1): none, past the last block, or across two lists.
  for (auto [end, part] :
       {std::pair{1, "pair 1 names blocks 1 .. 1"}, std::pair{11, "pair 1 names blocks 1 .. 11"},
        std::pair{3, "pair 1 names blocks 1 .. 3 (block .. block_end)"}})
    expect_refused(
        [&] {
          ops().scan_blocks(index.on(dev), dev.put(random_f32(2, 4, 100)), dev.put(ints({0, 1})),
                            dev.put(ints({0, 1})), dev.put(ints({2, end})), 3, out, {});
        },
        part);
  EXPECT_THROW(ops().merge_topk(out, dev.put(longs({0, 3})), 3, out, {}), UsageError);
  const ExpertInputs in(2, 8, 2, 4, 3, Activation::kRelu, 101);
  EXPECT_THROW(ops().expert_forward({dev.put(in.w1), dev.put(in.w2), 2, 8, 2, Activation::kRelu},
                                    dev.put(in.x),
                                    {dev.put(in.token), dev.put(ints({0, 2, 1})), dev.put(in.gate)},
                                    dev.out(DType::kF32, 4, 8),
                                    {dev.out(DType::kF32, 3, 2), dev.out(DType::kF32, 3, 8)}, {}),
               UsageError);  // expert 2 of 2
}

TEST_P(OpsTest, MalformedListsAreRefusedByName) {
  // The lists' own structure is checked before any read, on every backend:
  // ranges that start at 0 and never go back, blocks that all belong to a
  // list, outranking entries that name lists (small_index: 5 lists, 10 blocks).
  const auto refused = [&](Tensor Index::*field, Tensor value, const std::string& part) {
    Index index = small_index(4, 102);
    index.*field = std::move(value);
    OnDevice dev(ops());
    const TopKView out{dev.out(DType::kF32, 2, 3), dev.out(DType::kI32, 2, 3), {}};
    expect_refused(
        [&] {
          ops().scan_blocks(index.on(dev), dev.put(random_f32(2, 4, 103)), dev.put(ints({0, 1})),
                            dev.put(ints({0, 3})), dev.put(ints({1, 4})), 3, out, {});
        },
        part);
    ProbeSet probes;
    probes.offsets = ops().empty(DType::kI64, 2, 1);
    probes.codewords = ops().empty(DType::kI32, 1, 1);
    probes.count = 1;
    ops().copy(probes.offsets, longs({0, 1}), {});
    ops().copy(probes.codewords, ints({1}), {});
    expect_refused([&] { ops().probe_pairs(index.on(dev), probes, ScanUnit::kSegments, {}); },
                   part);
  };
  refused(&Index::list_blocks, longs({0, 2, 1, 6, 8, 10}),
          "lists.list_blocks[2] = 1 is below entry 1");
  refused(&Index::list_blocks, longs({0, 2, 4, 6, 8, 8}), "lists.list_blocks ends at 8");
  refused(&Index::block_offsets, longs({1, 6, 8, 14, 16, 16, 18, 24, 26, 32, 34}),
          "lists.block_offsets[0] = 1 must be 0");
  refused(&Index::outranking, ints({1, 2, 7, 4, 0}), "lists.outranking entry 2 names list 7");
}

// ---- selection bias and sigmoid gates --------------------------------------

// A bias over E experts that keeps keys_with_ties' ties (e and e - 2 for
// e = 3, 7, ...): those experts tie in z + b too.
Tensor bias_with_ties(int64_t E, uint64_t seed, double scale) {
  Tensor b = random_f32(E, 1, seed, scale);
  for (int64_t e = 3; e < E; e += 4) b.as<float>()[e] = b.as<float>()[e - 2];
  return b;
}

// Token t's best k of `candidates` (expert ids) by z + b, then lower id.
std::vector<int32_t> biased_reference(const std::vector<int32_t>& candidates,
                                      const std::function<float(int32_t)>& z, const float* bias,
                                      int k) {
  std::vector<int32_t> order = candidates;
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return ranks_before(z(a) + bias[a], a, z(b) + bias[b], b);
  });
  order.resize(static_cast<size_t>(k));
  return order;
}

TEST_P(OpsTest, BiasedTopKSelectsByBiasedScoreAndKeepsLogits) {
  const int64_t E = 57, d = 11, T = 30;
  const Tensor keys = keys_with_ties(E, d, 9), tokens = random_f32(T, d, 10);
  const Tensor bias = bias_with_ties(E, 110, 3.0);
  for (int k : {1, 4, 57}) {
    compare(
        [&](const Ops& o) {
          OnDevice dev(o);
          const TopKView out{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k),
                             dev.out(DType::kF64, T, 2), dev.put(bias)};
          o.dense_topk(dev.put_strided(tokens, 1), dev.put(keys), k, out, {});
          return results(dev.get(out.logits), dev.get(out.ids), dev.get(out.lse));
        },
        {false, false, true});
  }
  OnDevice dev(ops());
  const int k = 8;
  const TopKView plain{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k),
                       dev.out(DType::kF64, T, 2)};
  const TopKView biased{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k),
                        dev.out(DType::kF64, T, 2), dev.put(bias)};
  ops().dense_topk(dev.put(tokens), dev.put(keys), k, plain, {});
  ops().dense_topk(dev.put(tokens), dev.put(keys), k, biased, {});
  const TensorView all = dev.out(DType::kF32, T, E);
  ops().score(dev.put(tokens), dev.put(keys), all, {});
  const std::vector<float> z = values_of<float>(dev.get(all));
  const std::vector<int32_t> ids = values_of<int32_t>(dev.get(biased.ids));
  const std::vector<float> logits = values_of<float>(dev.get(biased.logits));
  std::vector<int32_t> every(E);
  for (int32_t e = 0; e < E; ++e) every[e] = e;
  int changed = 0;
  for (int64_t t = 0; t < T; ++t) {
    const auto z_of = [&](int32_t e) { return z[t * E + e]; };
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + t * k, ids.begin() + (t + 1) * k),
              biased_reference(every, z_of, bias.as<float>(), k))
        << "token " << t;
    for (int j = 0; j < k; ++j)  // the unbiased logit of each chosen expert
      EXPECT_EQ(logits[t * k + j], z_of(ids[t * k + j])) << "token " << t;
    changed += values_of<int32_t>(dev.get(plain.ids))[t * k] != ids[t * k];
  }
  EXPECT_GT(changed, 0) << "the bias changed no token's best expert: the test tests nothing";
  // The log-sum-exp is over the unbiased logits: the same bits as without a bias.
  expect_bits(dev.get(biased.lse), dev.get(plain.lse), "lse with a bias");
}

TEST_P(OpsTest, BiasedProductTopKRanksTheSubKeyGrid) {
  const int64_t n = 9, d1 = 6, d2 = 7, T = 25;
  const Tensor k1 = keys_with_ties(n, d1, 11), k2 = random_f32(n, d2, 12),
               tokens = random_f32(T, d1 + d2, 13), bias = random_f32(n * n, 1, 111, 3.0);
  for (int k : {1, 5, 12}) {
    compare([&](const Ops& o) {
      OnDevice dev(o);
      const TopKView out{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k), {}, dev.put(bias)};
      o.product_topk(dev.put(tokens), dev.put(k1), dev.put(k2), k, out, {});
      return results(dev.get(out.logits), dev.get(out.ids));
    });
  }
  // The bias re-ranks the grid of each half's unbiased top min(k, n).
  OnDevice dev(ops());
  const int k = 4;
  const TopKView out{dev.out(DType::kF32, T, k), dev.out(DType::kI32, T, k), {}, dev.put(bias)};
  ops().product_topk(dev.put(tokens), dev.put(k1), dev.put(k2), k, out, {});
  const TensorView s1 = dev.out(DType::kF32, T, n), s2 = dev.out(DType::kF32, T, n);
  ops().score(dev.put(tokens).block(0, T, 0, d1), dev.put(k1), s1, {});
  ops().score(dev.put(tokens).block(0, T, d1, d2), dev.put(k2), s2, {});
  const std::vector<float> z1 = values_of<float>(dev.get(s1)), z2 = values_of<float>(dev.get(s2));
  const std::vector<int32_t> ids = values_of<int32_t>(dev.get(out.ids));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> h1(n), h2(n);
    for (int32_t j = 0; j < n; ++j) h1[j] = h2[j] = j;
    const auto half_top = [&](std::vector<int32_t>& h, const std::vector<float>& s) {
      std::sort(h.begin(), h.end(), [&](int32_t a, int32_t b) {
        return ranks_before(s[t * n + a], a, s[t * n + b], b);
      });
      h.resize(k);
    };
    half_top(h1, z1);
    half_top(h2, z2);
    std::vector<int32_t> grid;
    for (int32_t a : h1)
      for (int32_t b : h2) grid.push_back(static_cast<int32_t>(a * n + b));
    const auto z_of = [&](int32_t e) { return z1[t * n + e / n] + z2[t * n + e % n]; };
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + t * k, ids.begin() + (t + 1) * k),
              biased_reference(grid, z_of, bias.as<float>(), k))
        << "token " << t;
  }
}

TEST_P(OpsTest, BiasedScanAndMergeSelectByBiasedScore) {
  const int64_t d = 10, R = 3;
  const Index index = small_index(d, 17);
  const Tensor queries = random_f32(R, d, 18), bias = random_f32(30, 1, 112, 3.0);
  // Primary blocks of lists 0, 1, 3, 4, and token 1's run over list 1's
  // primary and spill blocks (experts 1, 6, .., 26 then 2, 7: ids that do
  // not ascend across the run), so a token's experts are distinct.
  const Tensor query = ints({0, 0, 1, 1, 1, 2}), block = ints({0, 6, 2, 6, 8, 8});
  const Tensor block_end = ints({1, 7, 4, 7, 9, 9});
  const Tensor offsets = longs({0, 2, 5, 6});
  for (int k : {1, 3, 6}) {
    compare(
        [&](const Ops& o) {
          OnDevice dev(o);
          const TensorView b = dev.put(bias);
          const TopKView cand{dev.out(DType::kF32, 6, k), dev.out(DType::kI32, 6, k),
                              dev.out(DType::kF64, 6, 2), b};
          o.scan_blocks(index.on(dev), dev.put(queries), dev.put(query), dev.put(block),
                        dev.put(block_end), k, cand, {});
          const TopKView merged{dev.out(DType::kF32, 3, k), dev.out(DType::kI32, 3, k),
                                dev.out(DType::kF64, 3, 2), b};
          o.merge_topk(cand, dev.put(offsets), k, merged, {});
          return results(dev.get(cand.logits), dev.get(cand.ids), dev.get(cand.lse),
                         dev.get(merged.logits), dev.get(merged.ids), dev.get(merged.lse));
        },
        {false, false, true, false, false, true});
  }
  OnDevice dev(ops());
  const int k = 3;
  const TensorView b = dev.put(bias);
  const TopKView cand{dev.out(DType::kF32, 6, k), dev.out(DType::kI32, 6, k), {}, b};
  ops().scan_blocks(index.on(dev), dev.put(queries), dev.put(query), dev.put(block),
                    dev.put(block_end), k, cand, {});
  const TopKView merged{dev.out(DType::kF32, 3, k), dev.out(DType::kI32, 3, k), {}, b};
  ops().merge_topk(cand, dev.put(offsets), k, merged, {});
  const std::vector<int32_t> ids = values_of<int32_t>(dev.get(merged.ids));
  const std::vector<float> logits = values_of<float>(dev.get(merged.logits));
  const int64_t* bo = index.block_offsets.as<int64_t>();
  for (int64_t t = 0; t < 3; ++t) {
    std::vector<int32_t> experts;
    std::map<int32_t, float> z;
    for (int64_t p = offsets.as<int64_t>()[t]; p < offsets.as<int64_t>()[t + 1]; ++p) {
      const int64_t s = block.as<int32_t>()[p], s_end = block_end.as<int32_t>()[p];
      for (int64_t r = bo[s]; r < bo[s_end]; ++r) {
        const int32_t e = index.ids.as<int32_t>()[r];
        experts.push_back(e);
        z[e] = lane_dot(queries.as<float>() + t * d, index.keys.as<float>() + r * d, d);
      }
    }
    const std::vector<int32_t> want = biased_reference(
        experts, [&](int32_t e) { return z[e]; }, bias.as<float>(), k);
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + t * k, ids.begin() + (t + 1) * k), want) << t;
    for (int j = 0; j < k; ++j) EXPECT_EQ(logits[t * k + j], z[want[j]]) << t;
  }
}

TEST_P(OpsTest, BadBiasIsRefusedByName) {
  OnDevice dev(ops());
  const int64_t E = 6, d = 4;
  const TensorView tokens = dev.put(random_f32(2, d, 113)), keys = dev.put(random_f32(E, d, 114));
  const auto topk = [&](TensorView bias) {
    return TopKView{dev.out(DType::kF32, 2, 2), dev.out(DType::kI32, 2, 2), {}, bias};
  };
  expect_refused(
      [&] { ops().dense_topk(tokens, keys, 2, topk(dev.out(DType::kF32, E - 1, 1)), {}); },
      "out.bias");
  expect_refused([&] { ops().dense_topk(tokens, keys, 2, topk(dev.out(DType::kF64, E, 1)), {}); },
                 "out.bias");
  expect_refused(
      [&] {
        ops().dense_topk(tokens, keys, 2, topk(dev.out(DType::kF32, E, 3).block(0, E, 1, 1)), {});
      },
      "contiguous");
  // Scan: a list member past the bias; merge: a candidate past it.
  const Index index = small_index(d, 99);
  expect_refused(
      [&] {
        ops().scan_blocks(index.on(dev), tokens, dev.put(ints({0, 1})), dev.put(ints({0, 2})),
                          dev.put(ints({1, 3})), 2, topk(dev.out(DType::kF32, 20, 1)), {});
      },
      "lists.ids entry");
  const TopKView cand{dev.put(floats({1.0f, 0.5f})), dev.put(ints({3, 7})), {}};
  expect_refused(
      [&] {
        ops().merge_topk(cand, dev.put(longs({0, 2})), 1,
                         {dev.out(DType::kF32, 1, 1),
                          dev.out(DType::kI32, 1, 1),
                          {},
                          dev.out(DType::kF32, 7, 1)},
                         {});
      },
      "candidates.ids entry 1 names bias entry 7");
  // Sigmoid gates normalize over the chosen experts: no shortlist lse.
  expect_refused(
      [&] {
        ops().finalize_gates(dev.put(floats({1.0f, 0.5f})), dev.out(DType::kF64, 2, 2),
                             dev.out(DType::kF64, 2, 1), dev.out(DType::kF32, 2, 1),
                             GateFunction::kSigmoid, {});
      },
      "lse must be empty for sigmoid gates");
}

TEST_P(OpsTest, SigmoidGatesAndLogitGrads) {
  const int64_t T = 300;  // above the host's parallel threshold
  const int k = 4;
  Tensor logits = random_f32(T, k, 115, 4.0);
  for (int j = 0; j < k; ++j) logits.as<float>()[7 * k + j] = -800.0f - j;  // sigmoid underflows
  for (int64_t t = 0; t < T; ++t)
    std::sort(logits.as<float>() + t * k, logits.as<float>() + (t + 1) * k, std::greater<>());
  std::vector<int32_t> chosen, token;
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      chosen.push_back(static_cast<int32_t>((t + j) % 50));
      token.push_back(static_cast<int32_t>(t));
    }
  const Tensor chosen_t = host_of(DType::kI32, T, k, chosen), token_t = ints(token),
               d_gates = random_f32(T, k, 116);
  const Tensor z_flat = host_of(DType::kF32, T * k, 1, values_of<float>(logits));
  const auto run = [&](const Ops& o) {
    OnDevice dev(o);
    const TensorView norm = dev.out(DType::kF64, T, 1), gates = dev.out(DType::kF32, T, k);
    o.finalize_gates(dev.put(logits), TensorView(), norm, gates, GateFunction::kSigmoid, {});
    const TensorView coef = dev.out(DType::kF64, T * k, 1);
    o.logit_grads(dev.put(token_t), dev.put(ints(chosen)), dev.put(z_flat), dev.put(chosen_t),
                  gates, dev.put(d_gates), norm, coef, GateFunction::kSigmoid, {});
    return results(dev.get(norm), dev.get(gates), dev.get(coef));
  };
  compare(run, {true, true, true});
  // Against long double: g = sigmoid(z) / sum sigmoid, dz_i = g_i (dg_i -
  // sum_j g_j dg_j) (1 - sigmoid(z_i)), the sum over the float gates the
  // op is given (as the routes hold them).
  const std::vector<Tensor> got = run(ops());
  const float* z = logits.as<float>();
  const float* dg = d_gates.as<float>();
  for (int64_t t = 0; t < T; ++t) {
    long double s[8], sum = 0.0L, weighted = 0.0L;
    for (int j = 0; j < k; ++j)
      sum += (s[j] = 1.0L / (1.0L + std::exp(-(long double)z[t * k + j])));
    for (int j = 0; j < k; ++j)
      weighted += got[1].as<float>()[t * k + j] * (long double)dg[t * k + j];
    double total = 0.0;
    for (int j = 0; j < k; ++j) {
      const long double g = s[j] / sum;
      const float got_g = got[1].as<float>()[t * k + j];
      EXPECT_NEAR(got_g, static_cast<double>(g), 1e-6 * static_cast<double>(g) + 1e-30)
          << "token " << t;
      total += got_g;
      const long double dz = g * (dg[t * k + j] - weighted) * (1.0L - s[j]);
      EXPECT_NEAR(got[2].as<double>()[t * k + j], static_cast<double>(dz),
                  1e-6 * std::abs(static_cast<double>(dz)) + 1e-12)
          << "token " << t;
    }
    EXPECT_NEAR(total, 1.0, 1e-6) << "token " << t;
    EXPECT_NEAR(got[0].as<double>()[t], std::log(static_cast<double>(sum)),
                1e-9 * std::abs(std::log(static_cast<double>(sum))) + 1e-12)
        << "token " << t;
  }
}

TEST(Registry, NamesAndReasons) {
  EXPECT_EQ(&find_backend("host"), &host_ops());
  EXPECT_EQ(find_backend("host-portable").name(), "host-portable");
  const std::vector<const Ops*> all = backends();
  ASSERT_FALSE(all.empty());
  EXPECT_EQ(all.front(), &host_ops());  // the fastest host twin first
  for (const Ops* o : all) EXPECT_EQ(&find_backend(o->name()), o);
#if defined(__x86_64__) || defined(__i386__)
  // Every kernel set the CPU runs is registered, the widest first.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw");
  if (avx512) {
    EXPECT_EQ(host_ops().name(), "host-avx512");
    EXPECT_EQ(find_backend("host-avx2").name(), "host-avx2");
  } else if (avx2) {
    EXPECT_EQ(host_ops().name(), "host-avx2");
    EXPECT_THROW(find_backend("host-avx512"), UsageError);
  }
#endif
  try {
    find_backend("tpu");
    ADD_FAILURE() << "an unknown backend was found";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("'tpu'"), std::string::npos) << e.what();
  }
  if (!cuda_unavailable_reason().empty()) {
    EXPECT_THROW(find_backend("cuda:0"), UsageError);
  }
}

AIRMOE_INSTANTIATE_BACKENDS(OpsTest);

}  // namespace
}  // namespace airmoe
