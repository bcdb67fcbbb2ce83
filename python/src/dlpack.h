// Tensors across the Python boundary by DLPack, without torch's C++
// libraries: what torch (1.13 and 2.x), NumPy or any other producer hands
// over as a "dltensor" (or "dltensor_versioned") capsule is read in place
// as a TensorView; what the routers return (Tensors of the ops' device)
// leaves as a "dltensor" capsule that torch.utils.dlpack.from_dlpack takes
// over without a copy, on the host or on a GPU.
//
// The structs below are the DLPack ABI (dlpack.h, v0.8 unversioned and v1
// versioned managed tensors); only the fields airmoe reads are named as
// they are there.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "core/tensor.h"
#include "ops/ops.h"

namespace airmoe::dlpack {

namespace py = pybind11;

// A tensor argument: the view the C++ side reads and the capsule (or
// producer) that keeps its memory alive while the view is in use.
struct TensorArg {
  TensorView view;
  py::object owner;
};

// `obj` (an object with __dlpack__, such as a torch tensor or a NumPy array,
// or a DLPack capsule) as a 2-D f32 or bf16 view with unit column stride and
// a row stride of at least its columns; `what` names it in every error.
// `stream` is passed to __dlpack__ for device tensors (torch's current CUDA
// stream, so that the producer orders its pending work before ours; 0 or
// less: none given). Errors: ValueError naming `what` for another dtype,
// rank, layout or an unknown device; for a CUDA tensor where no cuda backend
// runs (a build without CUDA, no GPU, no driver) the registry's reason.
TensorArg import_tensor(const py::object& obj, const std::string& what, intptr_t stream = 0);

// The compute a tensor on `device` runs on: the host backend or cuda:N
// (the registry's error, naming `what`, when there is none), on `stream`.
Compute compute_for(Device device, const std::string& what, intptr_t stream = 0);

// The backend name of a device ("host", "cuda:0") for find_backend.
std::string backend_name(Device device);

// A capsule that hands `t` (moved in) to its consumer without a copy.
py::capsule export_tensor(Tensor&& t);

// A capsule of `v`'s memory itself (no copy), which `owner` keeps alive: the
// consumer's tensor holds a reference to `owner` until it is freed. How
// MoELayer's parameters share the expert shard's memory on any device.
py::capsule export_view(TensorView v, py::object owner);

}  // namespace airmoe::dlpack
