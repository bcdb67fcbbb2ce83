#include "dlpack.h"

#include <string>
#include <utility>

#include "core/errors.h"
#include "ops/registry.h"

namespace airmoe::dlpack {
namespace {

// ---- the DLPack ABI --------------------------------------------------------
enum DeviceType : int32_t { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3 };
enum TypeCode : uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4 };

struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null: compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
struct DLPackVersion {
  uint32_t major;
  uint32_t minor;
};
struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned*);
  uint64_t flags;
  DLTensor dl_tensor;
};

constexpr const char* kCapsule = "dltensor";
constexpr const char* kVersionedCapsule = "dltensor_versioned";

// ---- import ----------------------------------------------------------------

Device device_of(DLDevice d, const std::string& what) {
  switch (d.device_type) {
    case kDLCPU:
    case kDLCUDAHost:  // pinned host memory: the host reads it in place
      return Device::host();
    case kDLCUDA:
      return Device::cuda(d.device_id);
    default:
      throw UsageError(what + " is on DLPack device type " + std::to_string(d.device_type) +
                       " (index " + std::to_string(d.device_id) +
                       "); airmoe routes on the CPU or on CUDA GPUs");
  }
}

DType dtype_of(DLDataType t, const std::string& what) {
  if (t.lanes == 1 && t.code == kDLFloat && t.bits == 32) return DType::kF32;
  if (t.lanes == 1 && t.code == kDLBfloat && t.bits == 16) return DType::kBF16;
  static const char* names[] = {"int", "uint", "float", "opaque", "bfloat"};
  const std::string name = t.code < 5 ? names[t.code] : "code " + std::to_string(t.code);
  throw UsageError(what + " must be float32 or bfloat16, got DLPack " + name +
                   std::to_string(t.bits) + (t.lanes == 1 ? "" : "x" + std::to_string(t.lanes)) +
                   " (airmoe does not convert silently)");
}

const DLTensor& dl_tensor_of(const py::handle& capsule, const std::string& what) {
  PyObject* p = capsule.ptr();
  if (PyCapsule_IsValid(p, kCapsule))
    return static_cast<DLManagedTensor*>(PyCapsule_GetPointer(p, kCapsule))->dl_tensor;
  if (PyCapsule_IsValid(p, kVersionedCapsule)) {
    const auto* m =
        static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(p, kVersionedCapsule));
    if (m->version.major != 1)
      throw UsageError(what + ": DLPack version " + std::to_string(m->version.major) + "." +
                       std::to_string(m->version.minor) + " is not supported (1.x is)");
    return m->dl_tensor;
  }
  const char* name = PyCapsule_GetName(p);
  PyErr_Clear();
  throw UsageError(what + ": a capsule named '" + std::string(name ? name : "") +
                   "' is not an unused DLPack tensor (\"dltensor\")");
}

TensorView view_of(const DLTensor& t, const std::string& what) {
  if (t.ndim != 2)
    throw UsageError(what + " must be a 2-D tensor [rows, cols], got " + std::to_string(t.ndim) +
                     "-D");
  const DType dtype = dtype_of(t.dtype, what);
  const Device device = device_of(t.device, what);
  const int64_t rows = t.shape[0], cols = t.shape[1];
  int64_t ld = cols;
  if (t.strides != nullptr) {
    const bool unit_cols = t.strides[1] == 1 || cols <= 1;
    const bool rows_apart = rows <= 1 || t.strides[0] >= cols;
    if (!unit_cols || !rows_apart)
      throw UsageError(what + " has strides (" + std::to_string(t.strides[0]) + ", " +
                       std::to_string(t.strides[1]) + ") for shape [" + std::to_string(rows) +
                       ", " + std::to_string(cols) +
                       "]; airmoe reads rows of consecutive elements: pass " + what +
                       ".contiguous() (airmoe does not copy silently)");
    if (rows > 1) ld = t.strides[0];
  }
  auto* data = static_cast<char*>(t.data) + t.byte_offset;
  return TensorView(data, dtype, device, rows, cols, ld);
}

}  // namespace

std::string backend_name(Device device) {
  return device.is_host() ? "host" : to_string(device);
}

Compute compute_for(Device device, const std::string& what, intptr_t stream) {
  try {
    // A name, not a temporary: GCC 13's -Wdangling-reference.
    const std::string name = backend_name(device);
    const Ops& ops = find_backend(name);
    if (device.is_host()) return Compute{&ops, Stream{}};
    return Compute{&ops, Stream{reinterpret_cast<void*>(stream)}};
  } catch (const UsageError& e) {
    throw UsageError(what + " is on " + to_string(device) +
                     ", where airmoe cannot compute: " + e.what());
  }
}

TensorArg import_tensor(const py::object& obj, const std::string& what, intptr_t stream) {
  py::object capsule = obj;
  if (!PyCapsule_CheckExact(obj.ptr())) {
    if (!py::hasattr(obj, "__dlpack__"))
      throw py::type_error(what +
                           " must be a tensor (torch.Tensor, or any object with "
                           "__dlpack__), got " +
                           std::string(py::str(py::type::of(obj).attr("__name__"))));
    // The device first: a CUDA tensor where no cuda backend runs is refused
    // with the reason before the producer is asked for anything.
    Device device = Device::host();
    if (py::hasattr(obj, "__dlpack_device__")) {
      const auto d = obj.attr("__dlpack_device__")().cast<std::pair<int32_t, int32_t>>();
      device = device_of(DLDevice{d.first, d.second}, what);
      compute_for(device, what);
    }
    capsule = device.is_host() || stream <= 0 ? obj.attr("__dlpack__")()
                                              : obj.attr("__dlpack__")(py::arg("stream") = stream);
  }
  TensorArg arg{view_of(dl_tensor_of(capsule, what), what), capsule};
  compute_for(arg.view.device, what);
  return arg;
}

// ---- export ----------------------------------------------------------------

namespace {

DLDataType dl_dtype(DType t) {
  switch (t) {
    case DType::kF32:
      return {kDLFloat, 32, 1};
    case DType::kBF16:
      return {kDLBfloat, 16, 1};
    case DType::kI32:
      return {kDLInt, 32, 1};
    case DType::kI64:
      return {kDLInt, 64, 1};
    case DType::kF64:
      return {kDLFloat, 64, 1};
  }
  throw UsageError("export_tensor: unknown dtype");
}

// What the capsule owns: the tensor (or the Python object that keeps a
// view's memory alive) and the shape and strides DLPack points to.
struct Exported {
  Tensor tensor;
  PyObject* owner = nullptr;  // a strong reference, or null
  int64_t shape[2] = {0, 0};
  int64_t strides[2] = {0, 1};
  DLManagedTensor managed{};
};

void delete_exported(DLManagedTensor* m) {
  auto* e = static_cast<Exported*>(m->manager_ctx);
  if (e->owner != nullptr) {
    // The consumer may free its tensor without holding the GIL.
    py::gil_scoped_acquire gil;
    Py_DECREF(e->owner);
  }
  delete e;
}

// The capsule's own destructor: frees the tensor unless a consumer took it
// over (and renamed the capsule "used_dltensor": then the consumer calls
// the deleter when it is done).
void destroy_capsule(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, kCapsule)) return;
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, kCapsule));
  m->deleter(m);
}

// The capsule of `e` (taken over: freed here on failure), describing `v`.
py::capsule capsule_of(Exported* e, TensorView v) {
  e->shape[0] = v.rows;
  e->shape[1] = v.cols;
  e->strides[0] = v.ld;
  const Device d = v.device;
  e->managed.dl_tensor = DLTensor{v.data,   DLDevice{d.is_host() ? kDLCPU : kDLCUDA, d.index},
                                  2,        dl_dtype(v.dtype),
                                  e->shape, e->strides,
                                  0};
  e->managed.manager_ctx = e;
  e->managed.deleter = delete_exported;
  PyObject* capsule = PyCapsule_New(&e->managed, kCapsule, destroy_capsule);
  if (capsule == nullptr) {
    delete_exported(&e->managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(capsule);
}

}  // namespace

py::capsule export_tensor(Tensor&& t) {
  auto* e = new Exported{};
  e->tensor = std::move(t);
  return capsule_of(e, e->tensor.view());
}

py::capsule export_view(TensorView v, py::object owner) {
  auto* e = new Exported{};
  e->owner = owner.release().ptr();
  return capsule_of(e, v);
}

}  // namespace airmoe::dlpack
