// gather_rows, sum_rows and add_scaled_rows of the device composition: one
// thread per output entry, which adds its terms in the stated order (the
// pairs of add_scaled_rows grouped by dst row with a stable sort, so a row's
// pairs stay in pair order whatever the device's timing).
#pragma once

#include <thrust/for_each.h>

#include <cstdint>

#include "ops/device/exec.h"
#include "ops/op_args.h"
#include "ops/row_args.h"

namespace airmoe::inline ops::device {

// The `find` of the shared value checks (ops/row_args.h): a reduction on
// the device, and the one bad entry brought to the host.
template <typename X>
struct DeviceFind {
  const X& x;
  template <typename Pred>
  int64_t first(int64_t n, Pred pred) const {
    return first_where(x, n, pred);
  }
  template <typename T>
  T value(const T* p) const {
    return value_at(x, p);
  }
};

// dst(i, c) = src(rows[i], c) in dst's storage type.
template <typename D, typename S>
struct GatherEntry {
  Rows<D> dst;
  Rows<const S> src;
  Vec<const int32_t> rows;
  int64_t cols;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t i = e / cols, c = e % cols;
    convert_float(dst.row(i), c, src.row(rows[i]), c);
  }
};

// dst(g, c) = +0.0f + the entries of group g's rows, in order.
template <typename S>
struct SumEntry {
  Rows<float> dst;
  Rows<const S> src;
  Vec<const int32_t> rows;
  Vec<const int64_t> offsets;
  int64_t cols;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t g = e / cols, c = e % cols;
    float sum = 0.0f;
    for (int64_t j = offsets[g]; j < offsets[g + 1]; ++j)
      sum = add_rn(sum, load_float(src.row(rows[j]), c));
    dst(g, c) = sum;
  }
};

// dst(r, c) += scale[p] * src(src_row[p], c) over dst row r's pairs p in
// pair order (items[offsets[r] .. offsets[r + 1]) of a stable grouping):
// one rounded product, then one rounded sum. Without scale (data ==
// nullptr) a term is the src entry itself; without src_row, pair p's row is p.
template <typename S>
struct AddRowsInOrder {
  const int64_t* items;
  const int64_t* offsets;  // [dst rows + 1]
  Vec<const float> scale;
  Vec<const int32_t> src_row;
  Rows<const S> src;
  Rows<float> dst;
  int64_t cols;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t r = e / cols, c = e % cols;
    float o = dst(r, c);
    for (int64_t q = offsets[r]; q < offsets[r + 1]; ++q) {
      const int64_t p = items[q];
      const float v = load_float(src.row(src_row.data ? src_row[p] : p), c);
      o = add_rn(o, scale.data ? mul_rn(scale[p], v) : v);
    }
    dst(r, c) = o;
  }
};

// The n pairs p (dst_rows[p], src_row[p], scale[p]) added into dst row by
// row (AddRowsInOrder); expert_forward and expert_backward sum their
// per-pair rows into tokens with it too.
template <typename X, typename S>
void add_rows_in_pair_order(const X& x, TensorView dst, TensorView dst_rows, int64_t n,
                            Vec<const int32_t> src_row, Rows<const S> src, Vec<const float> scale) {
  if (n == 0 || dst.empty()) return;
  const Grouping<X> by_dst = group_by(x, n, dst.rows, ReadKey{vec_of<const int32_t>(dst_rows)});
  thrust::for_each(x.policy(), count_from(0), count_from(dst.numel()),
                   AddRowsInOrder<S>{by_dst.items.get(), by_dst.offsets.get(), scale, src_row, src,
                                     rows_of<float>(dst), dst.cols});
}

template <typename X>
void gather_rows(const X& x, const OpArgs& args, TensorView src, TensorView rows, TensorView dst) {
  check_gather_rows(args, DeviceFind<X>{x}, src, rows, dst);
  if (dst.empty()) return;
  with_float_types(dst, src, [&](auto td, auto ts) {
    using D = decltype(td);
    using S = decltype(ts);
    thrust::for_each(x.policy(), count_from(0), count_from(dst.numel()),
                     GatherEntry<D, S>{rows_of<D>(dst), rows_of<const S>(src),
                                       vec_of<const int32_t>(rows), dst.cols});
  });
}

template <typename X>
void sum_rows(const X& x, const OpArgs& args, TensorView src, TensorView rows, TensorView offsets,
              TensorView dst) {
  check_sum_rows(args, DeviceFind<X>{x}, src, rows, offsets, dst);
  if (dst.empty()) return;
  with_float_type(src, [&](auto ts) {
    using S = decltype(ts);
    thrust::for_each(
        x.policy(), count_from(0), count_from(dst.numel()),
        SumEntry<S>{rows_of<float>(dst), rows_of<const S>(src), vec_of<const int32_t>(rows),
                    vec_of<const int64_t>(offsets), dst.cols});
  });
}

template <typename X>
void add_scaled_rows(const X& x, const OpArgs& args, TensorView dst, TensorView dst_rows,
                     TensorView src, TensorView src_rows, TensorView scale) {
  const int64_t n =
      check_add_scaled_rows(args, DeviceFind<X>{x}, dst, dst_rows, src, src_rows, scale);
  with_float_type(src, [&](auto ts) {
    using S = decltype(ts);
    add_rows_in_pair_order(x, dst, dst_rows, n, vec_of<const int32_t>(src_rows),
                           rows_of<const S>(src), vec_of<const float>(scale));
  });
}

}  // namespace airmoe::inline ops::device
