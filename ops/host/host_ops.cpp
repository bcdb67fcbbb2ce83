// The host backends' memory, checks, scoring and codebook ops.
#include "ops/host/host_ops.h"

#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstring>

#include "core/parallel_errors.h"
#include "ops/bf16.h"
#include "ops/host/host_views.h"

namespace airmoe::inline ops::host {

// ---- views ------------------------------------------------------------

FloatRows::FloatRows(const TensorView& v) : ld_(v.ld) {
  if (v.empty()) return;
  if (v.dtype == DType::kF32) {
    data_ = v.as<const float>();
    return;
  }
  const uint16_t* src = v.as<const uint16_t>();  // throws for a non-float dtype
  widened_.resize(static_cast<size_t>(v.rows * v.cols));
  for (int64_t r = 0; r < v.rows; ++r)
    for (int64_t c = 0; c < v.cols; ++c) widened_[r * v.cols + c] = widen_bf16(src[r * v.ld + c]);
  data_ = widened_.data();
  ld_ = v.cols;
}

void load_row(const TensorView& v, int64_t r, float* out) {
  if (v.dtype == DType::kF32) {
    std::copy_n(v.as<const float>() + r * v.ld, v.cols, out);
    return;
  }
  const uint16_t* src = v.as<const uint16_t>() + r * v.ld;
  for (int64_t c = 0; c < v.cols; ++c) out[c] = widen_bf16(src[c]);
}

// ---- memory -------------------------------------------------------------

namespace {

template <typename D, typename S>
void convert_rows(const TensorView& dst, const TensorView& src) {
  const Rows<D> d(dst);
  const Rows<const S> s(src);
  for (int64_t r = 0; r < dst.rows; ++r)
    for (int64_t c = 0; c < dst.cols; ++c) store_float(d.row(r), c, load_float(s.row(r), c));
}

template <typename T>
void fill_rows(const TensorView& dst, T value) {
  const Rows<T> d(dst);
  for (int64_t r = 0; r < dst.rows; ++r) std::fill_n(d.row(r), dst.cols, value);
}

}  // namespace

void HostOps::copy_bytes(void* dst, Device dst_device, const void* src, Device src_device,
                         size_t bytes, Stream) const {
  const OpArgs a = args("copy_bytes");
  if (!dst_device.is_host()) a.fail("dst is on " + to_string(dst_device) + ", not the host");
  if (!src_device.is_host()) a.fail("src is on " + to_string(src_device) + ", not the host");
  if (bytes == 0) return;
  if (dst == nullptr || src == nullptr)
    a.fail("null " + std::string(dst == nullptr ? "dst" : "src") + " for " + std::to_string(bytes) +
           " bytes");
  std::memmove(dst, src, bytes);
}

void HostOps::copy(TensorView dst, TensorView src, Stream) const {
  const OpArgs a = args("copy");
  a.on_device(dst, "dst");
  a.on_device(src, "src");
  a.shape(dst, "dst", src.rows, src.cols);
  if (dst.empty()) return;
  const bool floats = (dst.dtype == DType::kF32 || dst.dtype == DType::kBF16) &&
                      (src.dtype == DType::kF32 || src.dtype == DType::kBF16);
  if (dst.dtype != src.dtype && !floats)
    a.fail(std::string("cannot convert src ") + to_string(src.dtype) + " to dst " +
           to_string(dst.dtype) + " (only f32 <-> bf16)");
  if (dst.dtype == src.dtype) {
    const size_t es = dtype_size(dst.dtype), row = static_cast<size_t>(dst.cols) * es;
    for (int64_t r = 0; r < dst.rows; ++r)
      std::memmove(static_cast<char*>(dst.data) + static_cast<size_t>(r * dst.ld) * es,
                   static_cast<const char*>(src.data) + static_cast<size_t>(r * src.ld) * es, row);
  } else if (dst.dtype == DType::kBF16) {
    convert_rows<uint16_t, float>(dst, src);
  } else {
    convert_rows<float, uint16_t>(dst, src);
  }
}

void HostOps::fill(TensorView dst, double value, Stream) const {
  args("fill").on_device(dst, "dst");
  if (dst.empty()) return;
  switch (dst.dtype) {
    case DType::kF32:
      return fill_rows(dst, static_cast<float>(value));
    case DType::kBF16:
      return fill_rows(dst, narrow_bf16(static_cast<float>(value)));
    case DType::kI32:
      return fill_rows(dst, static_cast<int32_t>(value));
    case DType::kI64:
      return fill_rows(dst, static_cast<int64_t>(value));
    case DType::kF64:
      return fill_rows(dst, value);
  }
}

// ---- checks ---------------------------------------------------------------

RowCheck HostOps::check_rows(TensorView m, double key_norm_bound, Stream) const {
  args("check_rows").float_dtype(m, "m");
  RowCheck out;
  if (m.empty()) return out;
  const FloatRows rows(m);
  const int64_t n = m.rows * m.cols;
  // In parallel; each result is the first in row order, so it does not
  // depend on the thread count.
  int64_t first_bad = INT64_MAX;
#pragma omp parallel for reduction(min : first_bad) if (n > (1 << 20))
  for (int64_t r = 0; r < m.rows; ++r) {
    const float* x = rows.row(r);
    for (int64_t c = 0; c < m.cols; ++c)
      if (!std::isfinite(x[c])) {
        first_bad = std::min(first_bad, r * m.cols + c);
        break;
      }
  }
  if (first_bad != INT64_MAX) {
    out.nonfinite_row = first_bad / m.cols;
    out.nonfinite_col = first_bad % m.cols;
    out.nonfinite_value = rows.row(out.nonfinite_row)[out.nonfinite_col];
  }
  const double limit = static_cast<double>(FLT_MAX) / 2;
  std::vector<double> norm(static_cast<size_t>(m.rows));
  double best = 0.0;
  int64_t overflow = INT64_MAX;
#pragma omp parallel for reduction(max : best) reduction(min : overflow) if (n > (1 << 20))
  for (int64_t r = 0; r < m.rows; ++r) {
    const float* x = rows.row(r);
    double sum = 0.0;
    for (int64_t c = 0; c < m.cols; ++c) sum += static_cast<double>(x[c]) * x[c];
    norm[r] = std::sqrt(sum);
    best = std::max(best, norm[r]);
    if (norm[r] * key_norm_bound > limit) overflow = std::min(overflow, r);
  }
  out.max_norm = best;
  if (overflow != INT64_MAX) {
    out.overflow_row = overflow;
    out.overflow_norm = norm[overflow];
  }
  return out;
}

// ---- scoring --------------------------------------------------------------

namespace {

// c = a · bᵀ block by block on a kernel set's block kernel (f32 or bf16
// rows): blocks in whole tiles of the set, sized for its cache use; on
// threads outside an OpenMP region when the work is large enough.
template <typename T>
void score_blocks(const ScoreBlocks& shape,
                  void (*kernel)(const T*, int64_t, const T*, int64_t, int64_t, int64_t, int64_t,
                                 float*, int64_t),
                  const T* a, int64_t lda, const T* b, int64_t ldb, int64_t m, int64_t n, int64_t k,
                  float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const int64_t row_bytes = std::max<int64_t>(k, 1) * static_cast<int64_t>(sizeof(T));
  const auto whole_tiles = [&](int64_t bytes, int64_t tile) {
    return std::max<int64_t>(tile, bytes / row_bytes / tile * tile);
  };
  const int64_t nb = whole_tiles(shape.b_bytes, shape.tile_cols);
  const int64_t mb = whole_tiles(shape.a_bytes, shape.tile_rows);
  const int64_t row_blocks = (m + mb - 1) / mb;
  const int64_t col_blocks = (n + nb - 1) / nb;
  const int64_t tasks = row_blocks * col_blocks;
  const bool parallel = !omp_in_parallel() && tasks > 1 && static_cast<double>(m) * n * k > 4.0e6;
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t t = 0; t < tasks; ++t) {
    // Column-major over tasks: consecutive tasks share a B block.
    const int64_t cb = t / row_blocks, rb = t % row_blocks;
    const int64_t i0 = rb * mb, j0 = cb * nb;
    kernel(a + i0 * lda, lda, b + j0 * ldb, ldb, std::min(mb, m - i0), std::min(nb, n - j0), k,
           c + i0 * ldc + j0, ldc);
  }
}

}  // namespace

void HostOps::score_f32(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m,
                        int64_t n, int64_t k, float* c, int64_t ldc) const {
  score_blocks(kernels_.blocks, kernels_.score_block, a, lda, b, ldb, m, n, k, c, ldc);
}

void HostOps::score_bf16(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t m,
                         int64_t n, int64_t k, float* c, int64_t ldc) const {
  score_blocks(kernels_.blocks, kernels_.score_bf16, a, lda, b, ldb, m, n, k, c, ldc);
}

RowScores::RowScores(const HostOps& ops, const TensorView& a, const TensorView& b)
    : ops_(ops),
      a_(a),
      b_(b),
      bf16_(a.dtype == DType::kBF16 && b.dtype == DType::kBF16 &&
            ops.kernels().score_bf16 != nullptr) {
  if (bf16_) return;
  fa_.emplace(a);
  fb_.emplace(b);
}

void RowScores::operator()(int64_t a0, int64_t n, float* c, int64_t ldc) const {
  if (bf16_)
    ops_.score_bf16(a_.as<const uint16_t>() + a0 * a_.ld, a_.ld, b_.as<const uint16_t>(), b_.ld, n,
                    b_.rows, a_.cols, c, ldc);
  else
    ops_.score_f32(fa_->row(a0), fa_->ld(), fb_->data(), fb_->ld(), n, b_.rows, a_.cols, c, ldc);
}

void HostOps::score(TensorView a, TensorView b, TensorView c, Stream) const {
  const OpArgs check = args("score");
  check.float_dtype(a, "a");
  check.float_dtype(b, "b");
  if (a.cols != b.cols)
    check.fail("a has " + std::to_string(a.cols) + " columns, b " + std::to_string(b.cols));
  check.matrix(c, "c", DType::kF32, a.rows, b.rows);
  if (a.rows == 0 || b.rows == 0) return;
  RowScores(*this, a, b)(0, a.rows, c.as<float>(), c.ld);
}

void HostOps::score_pairs(TensorView a, TensorView b, TensorView a_rows, TensorView b_rows,
                          TensorView c, Stream) const {
  const OpArgs check = args("score_pairs");
  check.float_dtype(a, "a");
  check.float_dtype(b, "b");
  if (a.cols != b.cols)
    check.fail("a has " + std::to_string(a.cols) + " columns, b " + std::to_string(b.cols));
  check.vector(a_rows, "a_rows", DType::kI32);
  const int64_t n = vector_size(a_rows);
  check.vector(b_rows, "b_rows", DType::kI32, n);
  check.vector(c, "c", DType::kF32, n);
  const Vec<const int32_t> ra(a_rows), rb(b_rows);
  const Vec<float> out(c);
  for (int64_t p = 0; p < n; ++p)
    if (ra[p] < 0 || ra[p] >= a.rows || rb[p] < 0 || rb[p] >= b.rows)
      check.fail("pair " + std::to_string(p) + " names rows (" + std::to_string(ra[p]) + ", " +
                 std::to_string(rb[p]) + ") of [" + std::to_string(a.rows) + ", " +
                 std::to_string(b.rows) + "]");
  const int64_t d = a.cols;
  const auto block = kernels_.score_block;
  ParallelErrors errors;  // the row buffers may fail to allocate
#pragma omp parallel if (n * d > (1 << 16))
  {
    std::vector<float> x, y;
    const bool ready = errors.run([&] {
      x.resize(static_cast<size_t>(d));
      y.resize(static_cast<size_t>(d));
    });
#pragma omp for schedule(static)
    for (int64_t p = 0; p < n; ++p) {
      if (!ready) continue;
      load_row(a, ra[p], x.data());
      load_row(b, rb[p], y.data());
      block(x.data(), d, y.data(), d, 1, 1, d, &out[p], 1);
    }
  }
  errors.rethrow();
}

// ---- rows of the sphere and the codebook ----------------------------------

int64_t HostOps::normalize_rows(TensorView rows, TensorView out, Stream) const {
  const OpArgs check = args("normalize_rows");
  check.float_dtype(rows, "rows");
  check.float_dtype(out, "out");
  check.shape(out, "out", rows.rows, rows.cols);
  const FloatRows in(rows);
  int64_t zero_row = INT64_MAX;
#pragma omp parallel for schedule(static) reduction(min : zero_row)
  for (int64_t r = 0; r < rows.rows; ++r) {
    const float* x = in.row(r);
    double norm2 = 0.0;
    for (int64_t c = 0; c < rows.cols; ++c) norm2 += static_cast<double>(x[c]) * x[c];
    if (norm2 == 0.0) {
      zero_row = std::min(zero_row, r);
      continue;
    }
    const double inv = 1.0 / std::sqrt(norm2);
    if (out.dtype == DType::kF32) {
      float* o = out.as<float>() + r * out.ld;
      for (int64_t c = 0; c < rows.cols; ++c) o[c] = static_cast<float>(x[c] * inv);
    } else {
      uint16_t* o = out.as<uint16_t>() + r * out.ld;
      for (int64_t c = 0; c < rows.cols; ++c) o[c] = narrow_bf16(static_cast<float>(x[c] * inv));
    }
  }
  return zero_row == INT64_MAX ? -1 : zero_row;
}

namespace {
constexpr int64_t kAssignChunk = 2048;  // rows scored against the codebook at a time
}

void HostOps::nearest(TensorView unit_rows, TensorView codewords, TensorView best,
                      TensorView best_score, Stream) const {
  const OpArgs check = args("nearest");
  check.float_dtype(unit_rows, "unit_rows");
  check.float_dtype(codewords, "codewords");
  if (unit_rows.cols != codewords.cols)
    check.fail("unit_rows has " + std::to_string(unit_rows.cols) + " columns, codewords " +
               std::to_string(codewords.cols));
  check.at_least(codewords.rows, 1, "codewords rows");
  check.vector(best, "best", DType::kI32, unit_rows.rows);
  check.vector(best_score, "best_score", DType::kF32, unit_rows.rows);
  const FloatRows rows(unit_rows), cw(codewords);
  const Vec<int32_t> arg_out(best);
  const Vec<float> score_out(best_score);
  const int64_t C = codewords.rows, n_rows = unit_rows.rows;
  // Scored in chunks of rows so the score buffer stays small whatever E is.
  std::vector<float> scores(static_cast<size_t>(std::min(n_rows, kAssignChunk) * C));
  for (int64_t r0 = 0; r0 < n_rows; r0 += kAssignChunk) {
    const int64_t n = std::min(kAssignChunk, n_rows - r0);
    score_f32(rows.row(r0), rows.ld(), cw.data(), cw.ld(), n, C, unit_rows.cols, scores.data(), C);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float* s = scores.data() + i * C;
      int32_t arg = 0;
      for (int64_t c = 1; c < C; ++c)
        if (s[c] > s[arg]) arg = static_cast<int32_t>(c);
      arg_out[r0 + i] = arg;
      score_out[r0 + i] = s[arg];
    }
  }
}

KMeansStats HostOps::kmeans_stats(TensorView unit_rows, TensorView codewords, TensorView ids,
                                  Stream stream) const {
  const OpArgs check = args("kmeans_stats");
  const int64_t n = unit_rows.rows, C = codewords.rows, d = codewords.cols;
  if (!ids.empty()) check.vector(ids, "ids", DType::kI32, n);
  Tensor best = empty(DType::kI32, n, 1), score = empty(DType::kF32, n, 1);
  nearest(unit_rows, codewords, best, score, stream);
  const FloatRows rows(unit_rows);
  const Vec<const int32_t> id_of(ids);
  const int32_t* arg = best.as<int32_t>();
  const float* cos = score.as<float>();
  KMeansStats total(C, d);
  // Integer sums: per-thread partials can be added in any order.
  ParallelErrors errors;  // the partials' allocation may throw
#pragma omp parallel
  {
    KMeansStats part;
    const bool ready = errors.run([&] { part = KMeansStats(C, d); });
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      if (!ready) continue;
      const int32_t c = arg[r];
      const int32_t id = ids.empty() ? static_cast<int32_t>(r) : id_of[r];
      const float* x = rows.row(r);
      int64_t* s = part.sums.data() + c * d;
      for (int64_t j = 0; j < d; ++j) s[j] += to_fixed(x[j]);
      part.counts[c] += 1;
      const int64_t cf = to_fixed(cos[r]);
      part.objective += cf;
      if (farther_member(cf, id, part.farthest_cos[c], part.farthest_expert[c])) {
        part.farthest_cos[c] = cf;
        part.farthest_expert[c] = id;
      }
    }
    if (ready) {
#pragma omp critical(airmoe_kmeans_stats)
      total += part;
    }
  }
  errors.rethrow();
  return total;
}

// ---- experts' optimizer step ----------------------------------------------

void HostOps::add_scaled(TensorView dst, TensorView src, float scale, Stream) const {
  const OpArgs check = args("add_scaled");
  check.dtype(dst, "dst", {DType::kF32});
  check.dtype(src, "src", {DType::kF32});
  check.shape(src, "src", dst.rows, dst.cols);
  if (dst.empty()) return;
  const Rows<float> d(dst);
  const Rows<const float> s(src);
  for (int64_t r = 0; r < dst.rows; ++r) {
    float* o = d.row(r);
    const float* x = s.row(r);
    for (int64_t c = 0; c < dst.cols; ++c) o[c] += scale * x[c];  // no fma: -ffp-contract=off
  }
}

}  // namespace airmoe::inline ops::host
