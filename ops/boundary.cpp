#include "ops/boundary.h"

#include <cstring>
#include <type_traits>

namespace airmoe::inline ops {

Staged::Staged(const Compute& compute, TensorView v) : view_(v) {
  if (v.device == compute.ops->device() || v.empty()) return;
  copy_ = compute.ops->empty(v.dtype, v.rows, v.cols);
  compute.ops->copy(copy_, v, compute.stream);
  view_ = copy_;
}

StagedOut::StagedOut(const Compute& compute, TensorView dst, bool initialized)
    : compute_(compute), dst_(dst), view_(dst) {
  if (dst.device == compute.ops->device() || dst.empty()) return;
  copy_ = compute.ops->empty(dst.dtype, dst.rows, dst.cols);
  view_ = copy_;
  if (initialized) compute.ops->copy(view_, dst, compute.stream);
}

void StagedOut::finish() {
  if (view_.data == dst_.data) return;
  compute_.ops->copy(dst_, view_, compute_.stream);
  compute_.ops->synchronize(compute_.stream);
}

Tensor to_device(const Compute& compute, Tensor host) {
  if (host.device() == compute.ops->device()) return host;
  Tensor out = compute.ops->empty(host.dtype(), host.rows(), host.cols());
  compute.ops->copy(out, host, compute.stream);
  compute.ops->synchronize(compute.stream);  // before `host` goes
  return out;
}

Tensor to_host_tensor(const Compute& compute, Tensor t) {
  if (t.device().is_host()) return t;
  Tensor out(host_allocator(), t.dtype(), t.rows(), t.cols());
  compute.ops->copy(out, t, compute.stream);
  compute.ops->synchronize(compute.stream);
  return out;
}

OnHost::OnHost(const Compute& compute, TensorView v) : view_(v) {
  if (v.device.is_host() || v.empty()) return;
  copy_ = Tensor(host_allocator(), v.dtype, v.rows, v.cols);
  compute.ops->copy(copy_, v, compute.stream);
  compute.ops->synchronize(compute.stream);
  view_ = copy_;
}

void score_to_host(const Compute& compute, TensorView a, TensorView b, float* c) {
  StagedOut out(compute, TensorView(c, DType::kF32, Device::host(), a.rows, b.rows));
  compute.ops->score(Staged(compute, a), Staged(compute, b), out, compute.stream);
  out.finish();
}

namespace {

template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::kF32;
  if constexpr (std::is_same_v<T, double>) return DType::kF64;
  if constexpr (std::is_same_v<T, int32_t>) return DType::kI32;
  return DType::kI64;
}

}  // namespace

template <typename T>
Tensor host_tensor_of(const std::vector<T>& v) {
  Tensor t(host_allocator(), dtype_of<T>(), static_cast<int64_t>(v.size()), 1);
  if (!v.empty()) std::memcpy(t.view().data, v.data(), v.size() * sizeof(T));
  return t;
}

template <typename T>
std::vector<T> host_vector(const Compute& compute, TensorView t) {
  std::vector<T> out(static_cast<size_t>(t.rows * t.cols));
  if (out.empty()) return out;
  const TensorView dst(out.data(), dtype_of<T>(), Device::host(), t.rows, t.cols);
  compute.ops->copy(dst, t, compute.stream);
  compute.ops->synchronize(compute.stream);
  return out;
}

template Tensor host_tensor_of(const std::vector<float>&);
template Tensor host_tensor_of(const std::vector<double>&);
template Tensor host_tensor_of(const std::vector<int32_t>&);
template Tensor host_tensor_of(const std::vector<int64_t>&);
template std::vector<float> host_vector(const Compute&, TensorView);
template std::vector<double> host_vector(const Compute&, TensorView);
template std::vector<int32_t> host_vector(const Compute&, TensorView);
template std::vector<int64_t> host_vector(const Compute&, TensorView);

}  // namespace airmoe::inline ops
