// The host backends' row ops (ops/ops.h gather_rows, sum_rows,
// add_scaled_rows). Threads split the output rows only: every output entry
// gets its additions in the stated order from one thread, so the bits do
// not depend on the thread count.
#include <omp.h>

#include "ops/bf16.h"
#include "ops/host/grouping.h"
#include "ops/host/host_ops.h"
#include "ops/host/host_views.h"
#include "ops/row_args.h"

namespace airmoe::inline ops::host {
namespace {

// Threads only for work that outweighs starting them.
bool worth_threads(int64_t entries) {
  return !omp_in_parallel() && entries > (1 << 16);
}

template <typename D, typename S>
void gather(const Vec<const int32_t>& rows, const TensorView& src, const TensorView& dst) {
  const Rows<const S> s(src);
  const Rows<D> d(dst);
  const int64_t cols = dst.cols;
#pragma omp parallel for schedule(static) if (worth_threads(dst.rows * cols))
  for (int64_t i = 0; i < dst.rows; ++i) {
    const S* x = s.row(rows[i]);
    D* o = d.row(i);
    for (int64_t c = 0; c < cols; ++c) convert_float(o, c, x, c);
  }
}

// dst(g) = +0.0f, then + each row of group g in order.
template <typename S>
void sum_groups(const Vec<const int32_t>& rows, const Vec<const int64_t>& offsets,
                const TensorView& src, const TensorView& dst) {
  const Rows<const S> s(src);
  const Rows<float> d(dst);
  const int64_t cols = dst.cols, groups = dst.rows;
#pragma omp parallel for schedule(static) if (worth_threads(rows.size * cols))
  for (int64_t g = 0; g < groups; ++g) {
    float* o = d.row(g);
    for (int64_t c = 0; c < cols; ++c) o[c] = 0.0f;
    for (int64_t j = offsets[g]; j < offsets[g + 1]; ++j) {
      const S* x = s.row(rows[j]);
      for (int64_t c = 0; c < cols; ++c) o[c] += load_float(x, c);
    }
  }
}

// The pairs of each dst row in pair order (a stable counting sort), rows
// in parallel: dst(r) += scale[p] * src(src_rows[p]), multiply then add.
template <typename S>
void add_scaled_pairs(const Vec<const int32_t>& dst_rows, const Vec<const int32_t>& src_rows,
                      const Vec<const float>& scale, const TensorView& src, const TensorView& dst) {
  const int64_t n = dst_rows.size, cols = dst.cols;
  const Csr by_dst = bucket(dst.rows, n, [&](int64_t p) { return dst_rows[p]; });
  const Rows<const S> s(src);
  const Rows<float> d(dst);
#pragma omp parallel for schedule(static) if (worth_threads(n * cols))
  for (int64_t r = 0; r < dst.rows; ++r) {
    float* o = d.row(r);
    for (int64_t q = by_dst.offsets[r]; q < by_dst.offsets[r + 1]; ++q) {
      const int64_t p = by_dst.items[q];
      const float g = scale[p];
      const S* x = s.row(src_rows[p]);
      for (int64_t c = 0; c < cols; ++c) {
        const float product = g * load_float(x, c);  // rounded: -ffp-contract=off
        o[c] += product;
      }
    }
  }
}

}  // namespace

void HostOps::gather_rows(TensorView src, TensorView rows, TensorView dst, Stream) const {
  check_gather_rows(args("gather_rows"), HostFind{}, src, rows, dst);
  if (dst.empty()) return;
  with_float_types(dst, src, [&](auto td, auto ts) {
    gather<decltype(td), decltype(ts)>(Vec<const int32_t>(rows), src, dst);
  });
}

void HostOps::sum_rows(TensorView src, TensorView rows, TensorView offsets, TensorView dst,
                       Stream) const {
  check_sum_rows(args("sum_rows"), HostFind{}, src, rows, offsets, dst);
  if (dst.empty()) return;
  with_float_type(src, [&](auto ts) {
    sum_groups<decltype(ts)>(Vec<const int32_t>(rows), Vec<const int64_t>(offsets), src, dst);
  });
}

void HostOps::add_scaled_rows(TensorView dst, TensorView dst_rows, TensorView src,
                              TensorView src_rows, TensorView scale, Stream) const {
  const int64_t n = check_add_scaled_rows(args("add_scaled_rows"), HostFind{}, dst, dst_rows, src,
                                          src_rows, scale);
  if (n == 0 || dst.cols == 0) return;
  with_float_type(src, [&](auto ts) {
    add_scaled_pairs<decltype(ts)>(Vec<const int32_t>(dst_rows), Vec<const int32_t>(src_rows),
                                   Vec<const float>(scale), src, dst);
  });
}

}  // namespace airmoe::inline ops::host
