// NumPy arrays across the Python boundary: float32 host matrices read in
// place (MatrixView), results moved into (or copied to) NumPy arrays. What
// the MoELayer binding and the module's host-only functions use; the
// routers take any device and dtype through DLPack (dlpack.h).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "core/matrix.h"
#include "router/routes.h"

namespace airmoe {

namespace py = pybind11;

// A float32, 2-D, C-contiguous array seen as a MatrixView, without a copy.
inline MatrixView as_view(const py::array& a, const std::string& what) {
  if (a.ndim() != 2)
    throw std::invalid_argument(what + " must be a 2-D array [rows, cols], got " +
                                std::to_string(a.ndim()) + "-D");
  if (!a.dtype().is(py::dtype::of<float>()))
    throw std::invalid_argument(what + " must be float32, got " + std::string(py::str(a.dtype())) +
                                " (airmoe does not convert silently)");
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(what +
                                " must be C-contiguous (row-major); call .contiguous() on the "
                                "tensor (airmoe does not copy silently)");
  return MatrixView(static_cast<const float*>(a.data()), a.shape(0), a.shape(1));
}

// NumPy arrays that take ownership of C++ buffers.
template <class T>
py::array_t<T> owned(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* p = new std::vector<T>(std::move(v));
  py::capsule base(p, [](void* q) { delete static_cast<std::vector<T>*>(q); });
  return py::array_t<T>(std::move(shape), p->data(), base);
}

inline py::array_t<float> owned(Matrix&& m) {
  const py::ssize_t rows = m.rows(), cols = m.cols();
  return owned(std::move(m.storage()), {rows, cols});
}

template <class T>
py::array_t<T> copied(const std::vector<T>& v, std::vector<py::ssize_t> shape) {
  py::array_t<T> out(std::move(shape));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

inline py::array_t<float> copied(MatrixView m) {
  py::array_t<float> out({static_cast<py::ssize_t>(m.rows), static_cast<py::ssize_t>(m.cols)});
  std::copy_n(m.data, m.rows * m.cols, out.mutable_data());
  return out;
}

}  // namespace airmoe
