// Where host memory meets a backend's device: the one place that knows
// whether the two are the same. The routers, the codebook and the expert
// shard are written against their ops' device; their host APIs (MatrixView
// in, vectors out) are that code plus these copies at the boundary, which
// pass host memory through untouched where the ops run on the host.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "ops/ops.h"
#include "ops/registry.h"

namespace airmoe::inline ops {

// The default of every class built on a Compute: the host backend.
inline Compute host_compute() {
  return Compute{&host_ops(), Stream{}};
}

// `v` as the ops read it: itself where it lies on their device, else a copy
// there (same dtype).
class Staged {
 public:
  Staged(const Compute& compute, TensorView v);
  TensorView view() const { return view_; }
  operator TensorView() const { return view_; }  // NOLINT: stands for the view

 private:
  Tensor copy_;
  TensorView view_;
};

// Memory of the host (or the device) that an op writes: the memory itself
// where it lies on the ops' device, else a device tensor whose values
// finish() copies back (and waits for). Initial values are not carried over
// unless `initialized`.
class StagedOut {
 public:
  StagedOut(const Compute& compute, TensorView dst, bool initialized = false);
  TensorView view() const { return view_; }
  operator TensorView() const { return view_; }  // NOLINT: stands for the view
  void finish();

 private:
  Compute compute_;
  TensorView dst_;
  Tensor copy_;
  TensorView view_;
};

// Host values as a tensor of the ops' device (moved there as it is where
// the device is the host).
Tensor to_device(const Compute& compute, Tensor host);

// A tensor on the host: `t` itself where it lies there, else a host copy.
Tensor to_host_tensor(const Compute& compute, Tensor t);

// `v` readable on the host: itself where it lies there, else a host copy
// (synchronized).
class OnHost {
 public:
  OnHost(const Compute& compute, TensorView v);
  TensorView view() const { return view_; }
  operator TensorView() const { return view_; }  // NOLINT: stands for the view
  template <typename T>
  const T* as() const {
    return view_.as<const T>();
  }

 private:
  Tensor copy_;
  TensorView view_;
};

// c = a · bᵀ (ops.score) into host memory c [a.rows, b.rows].
void score_to_host(const Compute& compute, TensorView a, TensorView b, float* c);

// A host tensor holding a vector ([n, 1]) and a vector from a tensor of the
// ops' device.
template <typename T>
Tensor host_tensor_of(const std::vector<T>& v);
template <typename T>
std::vector<T> host_vector(const Compute& compute, TensorView t);

// A vector's values as a tensor [n, 1] of the ops' device.
template <typename T>
Tensor device_vector(const Compute& compute, const std::vector<T>& v) {
  return to_device(compute, host_tensor_of(v));
}

}  // namespace airmoe::inline ops
