// copy, fill, add_scaled and check_rows of the device composition.
#pragma once

#include <thrust/for_each.h>
#include <thrust/transform_reduce.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "ops/device/exec.h"
#include "ops/op_args.h"
#include "ops/ops.h"

namespace airmoe::inline ops::device {

// dst(r, c) = src(r, c) converted (f32 <-> bf16 or the same type).
template <typename D, typename S>
struct ConvertEntry {
  Rows<D> dst;
  Rows<const S> src;
  int64_t cols;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t r = e / cols, c = e % cols;
    store_float(dst.row(r), c, load_float(src.row(r), c));
  }
};

template <typename X>
void convert(const X& x, TensorView dst, TensorView src) {
  with_float_types(dst, src, [&](auto td, auto ts) {
    using D = decltype(td);
    using S = decltype(ts);
    thrust::for_each(x.policy(), count_from(0), count_from(dst.numel()),
                     ConvertEntry<D, S>{rows_of<D>(dst), rows_of<const S>(src), dst.cols});
  });
}

// dst = src where both lie on the host (a CUDA backend's host-to-host case).
inline void convert_on_host(TensorView dst, TensorView src) {
  with_float_types(dst, src, [&](auto td, auto ts) {
    using D = decltype(td);
    using S = decltype(ts);
    const ConvertEntry<D, S> f{rows_of<D>(dst), rows_of<const S>(src), dst.cols};
    for (int64_t e = 0; e < dst.numel(); ++e) f(e);
  });
}

template <typename X>
void copy_rows(const X& x, TensorView dst, TensorView src) {
  const size_t es = dtype_size(dst.dtype);
  x.copy_bytes(dst.data, static_cast<size_t>(dst.ld) * es, src.data,
               static_cast<size_t>(src.ld) * es, static_cast<size_t>(dst.cols) * es,
               static_cast<size_t>(dst.rows));
}

// A contiguous view of `rows x cols` elements of scratch memory.
inline TensorView scratch_view(void* p, DType dtype, Device device, int64_t rows, int64_t cols) {
  return TensorView(p, dtype, device, rows, cols);
}

template <typename X>
void copy(const X& x, const OpArgs& args, TensorView dst, TensorView src) {
  args.reachable(dst, "dst");
  args.reachable(src, "src");
  args.shape(dst, "dst", src.rows, src.cols);
  const bool floats = (dst.dtype == DType::kF32 || dst.dtype == DType::kBF16) &&
                      (src.dtype == DType::kF32 || src.dtype == DType::kBF16);
  if (dst.dtype != src.dtype && !floats)
    args.fail(std::string("cannot convert src ") + to_string(src.dtype) + " to dst " +
              to_string(dst.dtype) + " (only f32 <-> bf16)");
  if (dst.empty()) return;
  const Device dev = x.device();
  const bool dst_dev = dst.device == dev, src_dev = src.device == dev;
  if (dst.dtype == src.dtype) {
    copy_rows(x, dst, src);
  } else if (dst_dev && src_dev) {
    convert(x, dst, src);
  } else if (dst_dev) {  // host src: bring it over, then convert on the device
    Scratch<char, X> staged(x, src.numel() * static_cast<int64_t>(dtype_size(src.dtype)));
    const TensorView s = scratch_view(staged.get(), src.dtype, dev, src.rows, src.cols);
    copy_rows(x, s, src);
    convert(x, dst, s);
  } else if (src_dev) {  // host dst: convert on the device, then bring it back
    Scratch<char, X> staged(x, dst.numel() * static_cast<int64_t>(dtype_size(dst.dtype)));
    const TensorView s = scratch_view(staged.get(), dst.dtype, dev, dst.rows, dst.cols);
    convert(x, s, src);
    copy_rows(x, dst, s);
    x.synchronize();  // before the staging memory goes
  } else {
    convert_on_host(dst, src);
  }
  if (!dst_dev) x.synchronize();  // host data is ready when copy returns
}

template <typename X>
void copy_bytes(const X& x, const OpArgs& args, void* dst, Device dst_device, const void* src,
                Device src_device, size_t bytes) {
  const Device dev = x.device();
  const std::string reach =
      dev.is_host() ? "not the host" : "neither the host nor " + to_string(dev);
  if (!(dst_device == dev || dst_device.is_host()))
    args.fail("dst is on " + to_string(dst_device) + ", " + reach);
  if (!(src_device == dev || src_device.is_host()))
    args.fail("src is on " + to_string(src_device) + ", " + reach);
  if (bytes == 0) return;
  if (dst == nullptr || src == nullptr)
    args.fail("null " + std::string(dst == nullptr ? "dst" : "src") + " for " +
              std::to_string(bytes) + " bytes");
  x.copy_bytes(dst, bytes, src, bytes, bytes, 1);
  if (dst_device != dev) x.synchronize();  // host data is ready when copy_bytes returns
}

template <typename T>
struct FillEntry {
  Rows<T> dst;
  int64_t cols;
  T value;
  AIRMOE_HD void operator()(int64_t e) const { dst(e / cols, e % cols) = value; }
};

template <typename X, typename T>
void fill_with(const X& x, TensorView dst, T value) {
  thrust::for_each(x.policy(), count_from(0), count_from(dst.numel()),
                   FillEntry<T>{rows_of<T>(dst), dst.cols, value});
}

template <typename X>
void fill(const X& x, const OpArgs& args, TensorView dst, double value) {
  args.on_device(dst, "dst");
  if (dst.empty()) return;
  switch (dst.dtype) {
    case DType::kF32:
      return fill_with(x, dst, static_cast<float>(value));
    case DType::kBF16:
      return fill_with(x, dst, narrow_bf16(static_cast<float>(value)));
    case DType::kI32:
      return fill_with(x, dst, static_cast<int32_t>(value));
    case DType::kI64:
      return fill_with(x, dst, static_cast<int64_t>(value));
    case DType::kF64:
      return fill_with(x, dst, value);
  }
}

// dst += scale * src: a rounded product, then a rounded sum (no fma; the
// device build has -fmad=false).
struct AddScaledEntry {
  Rows<float> dst;
  Rows<const float> src;
  int64_t cols;
  float scale;
  AIRMOE_HD void operator()(int64_t e) const {
    const int64_t r = e / cols, c = e % cols;
    const float product = scale * src(r, c);
    dst(r, c) = dst(r, c) + product;
  }
};

template <typename X>
void add_scaled(const X& x, const OpArgs& args, TensorView dst, TensorView src, float scale) {
  args.dtype(dst, "dst", {DType::kF32});
  args.dtype(src, "src", {DType::kF32});
  args.shape(src, "src", dst.rows, dst.cols);
  if (dst.empty()) return;
  thrust::for_each(x.policy(), count_from(0), count_from(dst.numel()),
                   AddScaledEntry{rows_of<float>(dst), rows_of<const float>(src), dst.cols, scale});
}

// ---- check_rows -------------------------------------------------------------

// What check_rows finds in a set of rows; combined by taking the first
// non-finite entry, the first overflowing row and the largest norm, which
// gives the same answer in any order.
struct RowFindings {
  int64_t nonfinite_row;
  int64_t nonfinite_col;
  float nonfinite_value;
  int64_t overflow_row;
  double overflow_norm;
  double max_norm;
};

struct CombineFindings {
  AIRMOE_HD RowFindings operator()(const RowFindings& a, const RowFindings& b) const {
    RowFindings out = a.nonfinite_row <= b.nonfinite_row ? a : b;
    const RowFindings& over = a.overflow_row <= b.overflow_row ? a : b;
    out.overflow_row = over.overflow_row;
    out.overflow_norm = over.overflow_norm;
    out.max_norm = b.max_norm > a.max_norm ? b.max_norm : a.max_norm;
    return out;
  }
};

template <typename T>
struct FindingsOfRow {
  Rows<const T> m;
  int64_t cols;
  double key_norm_bound;
  AIRMOE_HD RowFindings operator()(int64_t r) const {
    RowFindings f{kNoRow, -1, 0.0f, kNoRow, 0.0, 0.0};
    double sum = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const float v = load_float(m.row(r), c);
      if (!std::isfinite(v) && f.nonfinite_row == kNoRow) {
        f.nonfinite_row = r;
        f.nonfinite_col = c;
        f.nonfinite_value = v;
      }
      sum += static_cast<double>(v) * v;
    }
    const double norm = std::sqrt(sum);
    f.max_norm = norm == norm ? norm : 0.0;  // a NaN norm is no maximum (as std::max)
    if (norm * key_norm_bound > static_cast<double>(FLT_MAX) / 2) {
      f.overflow_row = r;
      f.overflow_norm = norm;
    }
    return f;
  }
};

template <typename X>
RowCheck check_rows(const X& x, const OpArgs& args, TensorView m, double key_norm_bound) {
  args.float_dtype(m, "m");
  const RowFindings none{kNoRow, -1, 0.0f, kNoRow, 0.0, 0.0};
  const RowFindings f = with_float_type(m, [&](auto tm) {
    using T = decltype(tm);
    return thrust::transform_reduce(x.policy(), count_from(0), count_from(m.rows),
                                    FindingsOfRow<T>{rows_of<const T>(m), m.cols, key_norm_bound},
                                    none, CombineFindings{});
  });
  RowCheck out;
  if (f.nonfinite_row != kNoRow) {
    out.nonfinite_row = f.nonfinite_row;
    out.nonfinite_col = f.nonfinite_col;
    out.nonfinite_value = f.nonfinite_value;
  }
  if (f.overflow_row != kNoRow) {
    out.overflow_row = f.overflow_row;
    out.overflow_norm = f.overflow_norm;
  }
  out.max_norm = f.max_norm;
  return out;
}

}  // namespace airmoe::inline ops::device
