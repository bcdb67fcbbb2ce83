// Tensors with a dtype and a device: the currency of the compute layer
// (ops/). A TensorView names memory someone else owns; a Tensor owns a
// Buffer from the allocator of its device.
//
// Two dimensions are enough for everything airmoe computes (tokens, keys,
// logits, ids; a vector is [n, 1]); rows may be strided (ld >= cols, in
// elements) so that a view can select columns, e.g. the halves of a
// product-key token. MatrixView stays the host float32 case and converts
// to a TensorView without a copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/matrix.h"

namespace airmoe::inline core {

enum class DType : uint8_t { kF32, kBF16, kI32, kI64, kF64 };
size_t dtype_size(DType t);
const char* to_string(DType t);

enum class DeviceKind : uint8_t { kHost, kCuda };

struct Device {
  DeviceKind kind = DeviceKind::kHost;
  int index = 0;  // CUDA ordinal; 0 on the host

  static Device host() { return {}; }
  static Device cuda(int index) { return {DeviceKind::kCuda, index}; }
  bool is_host() const { return kind == DeviceKind::kHost; }
  bool operator==(const Device&) const = default;
};
std::string to_string(Device d);  // "host", "cuda:0"

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;  // elements from one row's start to the next, >= cols

  TensorView() = default;
  TensorView(void* data, DType dtype, Device device, int64_t rows, int64_t cols, int64_t ld = -1)
      : data(data), dtype(dtype), device(device), rows(rows), cols(cols),
        ld(ld < 0 ? cols : ld) {}
  // The host float32 matrix a MatrixView names (no copy; ops read it only).
  TensorView(MatrixView m)  // NOLINT: a MatrixView is the host f32 tensor
      : TensorView(const_cast<float*>(m.data), DType::kF32, Device::host(), m.rows, m.cols) {}

  bool empty() const { return rows == 0 || cols == 0; }
  bool contiguous() const { return ld == cols || rows <= 1; }
  int64_t numel() const { return rows * cols; }
  // The element pointer, typed; throws UsageError when T is not the dtype.
  template <typename T>
  T* as() const;
  // Rows [r0, r0 + n) and columns [c0, c0 + m) of this view.
  TensorView block(int64_t r0, int64_t n, int64_t c0, int64_t m) const;
  TensorView row_range(int64_t r0, int64_t n) const { return block(r0, n, 0, cols); }
  // Host float32 only (throws otherwise): the MatrixView of a contiguous view.
  MatrixView matrix() const;
};

// Where device memory comes from; one allocator per device.
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual Device device() const = 0;
  // Throws std::bad_alloc (or a runtime_error naming the device) on failure.
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p, size_t bytes) noexcept = 0;
};
Allocator& host_allocator();  // aligned to 64 bytes

// Owning, move-only bytes from an allocator.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Allocator& allocator, size_t bytes);
  Buffer(Buffer&& other) noexcept;
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const;

 private:
  Allocator* allocator_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// A contiguous owning tensor.
class Tensor {
 public:
  Tensor() = default;
  Tensor(Allocator& allocator, DType dtype, int64_t rows, int64_t cols);

  TensorView view() const;
  operator TensorView() const { return view(); }  // NOLINT: views are the currency
  DType dtype() const { return dtype_; }
  Device device() const { return buffer_.device(); }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  template <typename T>
  T* as() const {
    return view().as<T>();
  }

 private:
  Buffer buffer_;
  DType dtype_ = DType::kF32;
  int64_t rows_ = 0;
  int64_t cols_ = 0;
};

}  // namespace airmoe::inline core
