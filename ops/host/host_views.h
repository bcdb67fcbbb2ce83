// How the host ops read their tensors: typed vectors of any stride, and
// float rows of f32 or bf16 tensors (bf16 widened once, at load: correct,
// not yet fast).
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "core/tensor.h"
#include "ops/lane_dot.h"
#include "ops/op_args.h"

namespace airmoe::inline ops::host {

// Entry i of a vector view ([n, 1] or [1, n]).
template <typename T>
struct Vec {
  T* data = nullptr;
  int64_t stride = 1;
  int64_t size = 0;

  Vec() = default;
  explicit Vec(const TensorView& v)
      : data(v.empty() ? nullptr : v.as<T>()), stride(vector_stride(v)), size(vector_size(v)) {}
  T& operator[](int64_t i) const { return data[i * stride]; }
  std::vector<std::remove_const_t<T>> values() const {
    std::vector<std::remove_const_t<T>> out(static_cast<size_t>(size));
    for (int64_t i = 0; i < size; ++i) out[i] = (*this)[i];
    return out;
  }
};

// Element (r, c) of a 2-D view.
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t ld = 0;

  Rows() = default;
  Rows(T* data, int64_t ld) : data(data), ld(ld) {}
  explicit Rows(const TensorView& v) : data(v.empty() ? nullptr : v.as<T>()), ld(v.ld) {}
  T* row(int64_t r) const { return data + r * ld; }
};

// The float32 rows of an f32 or bf16 tensor: the tensor itself, or a
// widened copy.
class FloatRows {
 public:
  explicit FloatRows(const TensorView& v);
  const float* row(int64_t r) const { return data_ + r * ld_; }
  const float* data() const { return data_; }
  int64_t ld() const { return ld_; }

 private:
  std::vector<float> widened_;
  const float* data_ = nullptr;
  int64_t ld_ = 0;
};

// Row r of an f32 or bf16 tensor into `out` (v.cols floats).
void load_row(const TensorView& v, int64_t r, float* out);

// The `find` of the shared value checks (ops/row_args.h) on host memory.
struct HostFind {
  template <typename Pred>
  int64_t first(int64_t n, Pred pred) const {
    for (int64_t i = 0; i < n; ++i)
      if (pred(i)) return i;
    return -1;
  }
  template <typename T>
  T value(const T* p) const {
    return *p;
  }
};

}  // namespace airmoe::inline ops::host
