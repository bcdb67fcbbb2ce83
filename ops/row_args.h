// The argument checks of the row ops (ops/ops.h: gather_rows, sum_rows,
// add_scaled_rows), the same on every backend. Dtypes and shapes are read
// from the views; the values (row ids in range, offsets a rising range)
// through the backend's `find`:
//   find.first(n, pred)  the first i in [0, n) with pred(i), or -1
//   find.value(p)        the entry at p (memory of the op's device) on the host
// The predicates are per-element code, so a device backend runs them where
// the ids live and brings back only the first bad one.
#pragma once

#include <cstdint>
#include <string>

#include "core/hd.h"
#include "core/tensor.h"
#include "ops/op_args.h"

namespace airmoe::inline ops {

// Entry i of an i32 vector lies outside [0, limit).
struct RowIdOutside {
  const int32_t* ids;
  int64_t stride;
  int64_t limit;
  AIRMOE_HD bool operator()(int64_t i) const {
    const int32_t v = ids[i * stride];
    return v < 0 || v >= limit;
  }
};

// offsets[g] .. offsets[g + 1] is not a range of the `items` row ids.
struct OffsetsNotARange {
  const int64_t* offsets;
  int64_t stride;
  int64_t items;
  AIRMOE_HD bool operator()(int64_t g) const {
    const int64_t begin = offsets[g * stride], end = offsets[(g + 1) * stride];
    return begin < 0 || begin > end || end > items;
  }
};

// Dtypes and shapes; each returns the op's count (rows gathered, groups
// summed, pairs added).
int64_t gather_rows_shapes(const OpArgs& args, const TensorView& src, const TensorView& rows,
                           const TensorView& dst);
int64_t sum_rows_shapes(const OpArgs& args, const TensorView& src, const TensorView& rows,
                        const TensorView& offsets, const TensorView& dst);
int64_t add_scaled_rows_shapes(const OpArgs& args, const TensorView& dst,
                               const TensorView& dst_rows, const TensorView& src,
                               const TensorView& src_rows, const TensorView& scale);

// "<arg>[i] = v is outside [0, limit): <of> has limit rows".
[[noreturn]] void fail_row_id(const OpArgs& args, const char* arg, int64_t i, int64_t value,
                              int64_t limit, const char* of);
// "offsets[g] .. offsets[g + 1] = begin .. end is not a range of the items rows entries".
[[noreturn]] void fail_offsets(const OpArgs& args, int64_t g, int64_t begin, int64_t end,
                               int64_t items);

// Every entry of the i32 vector `ids` (argument `arg`) in [0, limit), the
// rows of argument `of`.
template <typename Find>
void check_row_ids(const OpArgs& args, const Find& find, const TensorView& ids, const char* arg,
                   int64_t limit, const char* of) {
  const int64_t n = vector_size(ids), stride = vector_stride(ids);
  if (ids.empty()) return;
  const auto* p = static_cast<const int32_t*>(ids.data);
  const int64_t i = find.first(n, RowIdOutside{p, stride, limit});
  if (i >= 0) fail_row_id(args, arg, i, find.value(p + i * stride), limit, of);
}

// offsets (i64 [G + 1]) rising, within [0, items].
template <typename Find>
void check_offsets(const OpArgs& args, const Find& find, const TensorView& offsets, int64_t items) {
  const int64_t groups = vector_size(offsets) - 1, stride = vector_stride(offsets);
  const auto* p = static_cast<const int64_t*>(offsets.data);
  const int64_t g = find.first(groups, OffsetsNotARange{p, stride, items});
  if (g >= 0)
    fail_offsets(args, g, find.value(p + g * stride), find.value(p + (g + 1) * stride), items);
}

// The whole check of each op; returns its count.
template <typename Find>
int64_t check_gather_rows(const OpArgs& args, const Find& find, const TensorView& src,
                          const TensorView& rows, const TensorView& dst) {
  const int64_t n = gather_rows_shapes(args, src, rows, dst);
  check_row_ids(args, find, rows, "rows", src.rows, "src");
  return n;
}

template <typename Find>
int64_t check_sum_rows(const OpArgs& args, const Find& find, const TensorView& src,
                       const TensorView& rows, const TensorView& offsets, const TensorView& dst) {
  const int64_t groups = sum_rows_shapes(args, src, rows, offsets, dst);
  check_row_ids(args, find, rows, "rows", src.rows, "src");
  check_offsets(args, find, offsets, vector_size(rows));
  return groups;
}

template <typename Find>
int64_t check_add_scaled_rows(const OpArgs& args, const Find& find, const TensorView& dst,
                              const TensorView& dst_rows, const TensorView& src,
                              const TensorView& src_rows, const TensorView& scale) {
  const int64_t n = add_scaled_rows_shapes(args, dst, dst_rows, src, src_rows, scale);
  check_row_ids(args, find, dst_rows, "dst_rows", dst.rows, "dst");
  check_row_ids(args, find, src_rows, "src_rows", src.rows, "src");
  return n;
}

}  // namespace airmoe::inline ops
