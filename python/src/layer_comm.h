// The communicator a MoELayerImpl (layer_bindings.cpp) runs on: one rank in
// this process (comm=None, every build) or an mpi4py communicator
// (layer_mpi.cpp, builds with MPI only).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>

#include "comm/communicator.h"

namespace airmoe {

struct LayerComm {
  std::unique_ptr<comm::Communicator> comm;
  // Ends the job when this rank fails alone inside a collective that other
  // ranks are still in (they would wait forever); it does not return. Empty
  // for one rank: nothing waits, so the error is simply raised.
  std::function<void()> abort_job;
};

// One rank in this process (no address) or the MPI communicator whose
// mpi4py handle is at `mpi_comm_address` (a build without MPI refuses it).
LayerComm layer_comm(std::optional<std::uintptr_t> mpi_comm_address);

#ifdef AIRMOE_PYTHON_WITH_MPI
// A duplicate of mpi4py's MPI_Comm at `address`, checked; aborting calls
// MPI_Abort on it (layer_mpi.cpp).
LayerComm mpi_layer_comm(std::uintptr_t address);
#endif

}  // namespace airmoe
