// MoELayer over an mpi4py communicator: the part of the layer binding that
// needs MPI (built with AIRMOE_WITH_MPI only; see layer_comm.h).
#include <mpi.h>

#include <cstdint>
#include <memory>
#include <stdexcept>

#include "comm/mpi_communicator.h"
#include "layer_comm.h"

namespace airmoe {
namespace {

// The MPI_Comm that mpi4py's handle at `comm_address` holds, checked.
MPI_Comm mpi_comm_at(std::uintptr_t comm_address) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized)
    throw std::runtime_error(
        "MoELayer: MPI is not initialized (or already finalized); import mpi4py.MPI first");
  if (comm_address == 0) throw std::invalid_argument("MoELayer: null MPI communicator address");
  const MPI_Comm mpi_comm = *reinterpret_cast<const MPI_Comm*>(comm_address);
  if (mpi_comm == MPI_COMM_NULL)
    throw std::invalid_argument("MoELayer: the communicator is MPI_COMM_NULL");
  return mpi_comm;
}

}  // namespace

LayerComm mpi_layer_comm(std::uintptr_t address) {
  auto mpi = std::make_unique<comm::MpiCommunicator>(mpi_comm_at(address));
  const MPI_Comm dup = mpi->comm();  // freed with the communicator, after the layer
  return LayerComm{std::move(mpi), [dup] { MPI_Abort(dup, 1); }};
}

}  // namespace airmoe
