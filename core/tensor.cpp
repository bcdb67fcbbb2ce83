#include "core/tensor.h"

#include <cstdlib>
#include <new>
#include <type_traits>
#include <utility>

#include "core/errors.h"

namespace airmoe::inline core {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kI64:
    case DType::kF64:
      return 8;
  }
  throw UsageError("dtype_size: unknown dtype " + std::to_string(static_cast<int>(t)));
}

const char* to_string(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kBF16:
      return "bf16";
    case DType::kI32:
      return "i32";
    case DType::kI64:
      return "i64";
    case DType::kF64:
      return "f64";
  }
  return "unknown";
}

std::string to_string(Device d) {
  return d.is_host() ? std::string("host") : "cuda:" + std::to_string(d.index);
}

namespace {

// The element type of each dtype as TensorView::as<T> names it (bf16 is
// stored as its 16 bits).
template <typename T>
constexpr bool holds(DType t) {
  using U = std::remove_const_t<T>;
  if constexpr (std::is_same_v<U, float>) return t == DType::kF32;
  if constexpr (std::is_same_v<U, uint16_t>) return t == DType::kBF16;
  if constexpr (std::is_same_v<U, int32_t>) return t == DType::kI32;
  if constexpr (std::is_same_v<U, int64_t>) return t == DType::kI64;
  if constexpr (std::is_same_v<U, double>) return t == DType::kF64;
  return false;
}

template <typename T>
constexpr const char* type_name() {
  using U = std::remove_const_t<T>;
  if constexpr (std::is_same_v<U, float>) return "float (f32)";
  if constexpr (std::is_same_v<U, uint16_t>) return "uint16_t (bf16)";
  if constexpr (std::is_same_v<U, int32_t>) return "int32_t (i32)";
  if constexpr (std::is_same_v<U, int64_t>) return "int64_t (i64)";
  return "double (f64)";
}

std::string shape_of(const TensorView& v) {
  std::string s = "[";
  s += std::to_string(v.rows);
  s += ", ";
  s += std::to_string(v.cols);
  s += "]";
  return s;
}

}  // namespace

template <typename T>
T* TensorView::as() const {
  if (!holds<T>(dtype))
    throw UsageError(std::string("tensor of dtype ") + to_string(dtype) + " read as " +
                     type_name<T>());
  return static_cast<T*>(data);
}

template float* TensorView::as<float>() const;
template const float* TensorView::as<const float>() const;
template uint16_t* TensorView::as<uint16_t>() const;
template const uint16_t* TensorView::as<const uint16_t>() const;
template int32_t* TensorView::as<int32_t>() const;
template const int32_t* TensorView::as<const int32_t>() const;
template int64_t* TensorView::as<int64_t>() const;
template const int64_t* TensorView::as<const int64_t>() const;
template double* TensorView::as<double>() const;
template const double* TensorView::as<const double>() const;

TensorView TensorView::block(int64_t r0, int64_t n, int64_t c0, int64_t m) const {
  if (r0 < 0 || n < 0 || r0 + n > rows || c0 < 0 || m < 0 || c0 + m > cols)
    throw UsageError("tensor block rows [" + std::to_string(r0) + ", " + std::to_string(r0 + n) +
                     ") columns [" + std::to_string(c0) + ", " + std::to_string(c0 + m) +
                     ") lies outside the " + shape_of(*this) + " tensor");
  char* base = static_cast<char*>(data);
  const size_t offset = static_cast<size_t>(r0 * ld + c0) * dtype_size(dtype);
  return TensorView(base == nullptr ? nullptr : base + offset, dtype, device, n, m, ld);
}

MatrixView TensorView::matrix() const {
  if (dtype != DType::kF32 || !device.is_host())
    throw UsageError(std::string("a MatrixView needs a host f32 tensor, this one is ") +
                     to_string(dtype) + " on " + to_string(device));
  if (!contiguous())
    throw UsageError("a MatrixView needs contiguous rows, this " + shape_of(*this) +
                     " tensor has ld " + std::to_string(ld));
  return MatrixView(static_cast<const float*>(data), rows, cols);
}

namespace {

// Host memory, 64-byte aligned.
class HostAllocator final : public Allocator {
 public:
  Device device() const override { return Device::host(); }
  void* allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;
    constexpr size_t kAlign = 64;
    void* p = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  void deallocate(void* p, size_t) noexcept override { std::free(p); }
};

}  // namespace

Allocator& host_allocator() {
  static HostAllocator allocator;
  return allocator;
}

Buffer::Buffer(Allocator& allocator, size_t bytes)
    : allocator_(&allocator), data_(allocator.allocate(bytes)), bytes_(bytes) {}

Buffer::Buffer(Buffer&& other) noexcept
    : allocator_(std::exchange(other.allocator_, nullptr)),
      data_(std::exchange(other.data_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)) {}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) allocator_->deallocate(data_, bytes_);
    allocator_ = std::exchange(other.allocator_, nullptr);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

Buffer::~Buffer() {
  if (data_ != nullptr) allocator_->deallocate(data_, bytes_);
}

Device Buffer::device() const {
  return allocator_ != nullptr ? allocator_->device() : Device::host();
}

Tensor::Tensor(Allocator& allocator, DType dtype, int64_t rows, int64_t cols)
    : dtype_(dtype), rows_(rows), cols_(cols) {
  if (rows < 0 || cols < 0)
    throw UsageError("tensor shape [" + std::to_string(rows) + ", " + std::to_string(cols) +
                     "] is negative");
  buffer_ = Buffer(allocator, static_cast<size_t>(rows * cols) * dtype_size(dtype));
}

TensorView Tensor::view() const {
  // An empty tensor made by an allocator still lives on its device.
  return TensorView(buffer_.data(), dtype_, buffer_.device(), rows_, cols_);
}

}  // namespace airmoe::inline core
