// The parts of the airmoe._airmoe module that live in their own files.
#pragma once

#include <pybind11/pybind11.h>

namespace airmoe {

// MoELayerImpl and LayerPlan (layer_bindings.cpp): in every build; mpi4py
// communicators with MPI only (layer_comm.h).
void bind_layer(pybind11::module_& m);

}  // namespace airmoe
