// The NCCL backend: one rank per GPU, the exchange on the caller's CUDA
// stream over GPU buffers (ExchangeBuffers made with that GPU's cuda:N ops).
// Built only by a CUDA build that finds NCCL (target airmoe_comm_nccl,
// AIRMOE_WITH_NCCL defined for its users).
//
// exchange() is counts first (ExchangeKind::kCountsFirst): NCCL has no
// sparse protocol and a receive must be posted with its size, so every rank
// first sends every rank its segment's size (one int64, grouped
// ncclSend/ncclRecv), waits for the counts on the host, lays recv out, then
// posts the payload as grouped ncclSend/ncclRecv of the non-empty segments
// (self-sends included: NCCL allows them) on the caller's stream, and
// returns: the payload is stream-ordered (synchronize the stream, or the
// ops, before reading recv on the host). A rank that failed before data
// moved sends -1 counts, so every rank throws (a PeerError naming it).
//
// The collectives (broadcast, allgather(v), allreduce, barrier) run on NCCL
// too, on a private stream, through GPU scratch memory, and return when
// done; allgatherv is an allgather of the sizes, then of the largest size
// (padded). Each is metered as communicator.h says.
//
// Errors: every NCCL call's failure becomes a TransportError naming the
// rank, the call and NCCL's error string (and ncclGetLastError's detail);
// while waiting for a stream it polls ncclCommGetAsyncError and, on an
// asynchronous failure (a peer died, a network error), aborts the NCCL
// communicator (ncclCommAbort) and throws, instead of hanging. After that
// the communicator is unusable: every later call throws.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/tensor.h"
#include "ops/ops.h"

namespace airmoe::comm {

class NcclCommunicator final : public Communicator {
 public:
  // Collective over every rank of `host` (an MpiCommunicator, or any
  // communicator of the job's ranks): rank 0 makes the unique id
  // (ncclGetUniqueId), host.broadcast hands it to every rank (MPI_Bcast on
  // MPI), each rank joins with ncclCommInitRank on `gpu`'s device (its cuda:N
  // backend: one distinct GPU per rank). A failure on any rank (no GPU, a
  // host backend for `gpu`, NCCL's init) throws on every rank.
  NcclCommunicator(Communicator& host, const Ops& gpu);
  // Over an existing NCCL communicator on `gpu`'s device (e.g. a framework's
  // process group): not owned, so not destroyed here.
  NcclCommunicator(ncclComm_t comm, const Ops& gpu);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "nccl"; }
  ExchangeKind exchange_kind() const override { return ExchangeKind::kCountsFirst; }

  void barrier() override;
  void broadcast(void* data, size_t bytes, int root) override;
  void allgather(const void* send, size_t bytes, void* recv) override;
  std::vector<char> allgatherv(const void* send, size_t bytes,
                               std::vector<int64_t>& counts) override;
  void allreduce_sum(int64_t* data, size_t count) override;
  void allreduce_max(double* data, size_t count) override;
  void allreduce_min(double* data, size_t count) override;

  ncclComm_t nccl_comm() const { return comm_; }
  const Ops& gpu() const { return gpu_; }

 protected:
  ExchangeFailure exchange_bytes(const ExchangeBuffer& send, ExchangeBuffer& recv, Stream stream,
                                 const std::string& failure) override;
  bool moves_device_buffers() const override { return true; }

 private:
  // Throws TransportError "nccl rank R of P: <call> failed: ..." unless rc
  // is ncclSuccess.
  void check(ncclResult_t rc, const std::string& call) const;
  void check_cuda(cudaError_t rc, const std::string& call) const;
  // Waits for `stream`, polling NCCL's asynchronous error (see above).
  void wait(cudaStream_t stream, const std::string& call);
  [[noreturn]] void fail(const std::string& what) const;
  void require_usable(const char* call) const;
  // GPU scratch of at least `bytes` for the collectives, reused.
  char* scratch(size_t bytes);
  // `count` elements of `type` in place at data (host): to the GPU, NCCL's
  // all-reduce with `op`, back.
  void allreduce(void* data, size_t count, size_t element, ncclDataType_t type, ncclRedOp_t op,
                 const char* call);
  // The counts-first step: sends `mine[q]` to each rank q, returns what each
  // rank sent here.
  std::vector<int64_t> exchange_counts(const std::vector<int64_t>& mine, cudaStream_t stream);

  const Ops& gpu_;
  ncclComm_t comm_ = nullptr;
  bool owned_ = false;
  bool aborted_ = false;
  int rank_ = 0;
  int size_ = 1;
  cudaStream_t stream_ = nullptr;  // the collectives' private stream
  Buffer scratch_;                 // on the GPU, from gpu_'s allocator
  Buffer counts_;                  // on the GPU: [2P] int64, the counts step
};

}  // namespace airmoe::comm
