// Row-major float matrices: an owning Matrix and a non-owning MatrixView.
//
// Every router takes its tokens and keys as views so that callers (the
// benchmark, the runtime, the PyTorch binding) can hand over memory they
// already own without a copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace airmoe::inline core {

struct MatrixView {
  const float* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;

  MatrixView() = default;
  MatrixView(const float* d, int64_t r, int64_t c) : data(d), rows(r), cols(c) {}

  const float* row(int64_t i) const { return data + i * cols; }
  float operator()(int64_t i, int64_t j) const { return data[i * cols + j]; }
};

class Matrix {
 public:
  Matrix() = default;
  Matrix(int64_t rows, int64_t cols, float fill = 0.0f)
      : rows_(rows), cols_(cols), data_(static_cast<size_t>(rows * cols), fill) {}

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  size_t size() const { return data_.size(); }

  float* data() { return data_.data(); }
  const float* data() const { return data_.data(); }
  float* row(int64_t i) { return data_.data() + i * cols_; }
  const float* row(int64_t i) const { return data_.data() + i * cols_; }
  float& operator()(int64_t i, int64_t j) { return data_[i * cols_ + j]; }
  float operator()(int64_t i, int64_t j) const { return data_[i * cols_ + j]; }

  MatrixView view() const { return {data_.data(), rows_, cols_}; }
  operator MatrixView() const { return view(); }  // NOLINT: views are the currency

  std::vector<float>& storage() { return data_; }

 private:
  int64_t rows_ = 0;
  int64_t cols_ = 0;
  std::vector<float> data_;
};

}  // namespace airmoe::inline core
