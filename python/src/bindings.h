// The parts of the airmoe._airmoe module that live in their own files.
#pragma once

#include <pybind11/pybind11.h>

namespace airmoe {

// MoELayerImpl and LayerPlan (layer_bindings.cpp): built with MPI only.
void bind_layer(pybind11::module_& m);

}  // namespace airmoe
