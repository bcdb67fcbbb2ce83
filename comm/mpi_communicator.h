// The MPI backend. MpiCommunicator works on a private duplicate of the
// communicator it is given (MPI_COMM_WORLD, or a program's own communicator),
// so its messages never mix with the program's; it sets MPI_ERRORS_RETURN on
// that duplicate and turns every failed MPI call into a std::runtime_error
// naming the call, the rank and MPI's error string.
//
// Metering follows the contract in communicator.h exactly as the in-process
// backend does: the logical traffic of each call, not what Open MPI sends
// internally (its counts exchange for allgatherv, tree broadcasts, ...).
//
// All calls must be made from the thread that initialized MPI
// (MPI_THREAD_FUNNELED), and every rank of the communicator must make the same
// sequence of calls.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"

namespace airmoe::comm {

// Initializes MPI (MPI_Init_thread with MPI_THREAD_FUNNELED) unless it is
// already initialized, and finalizes it on destruction only if it did the
// initialization. argc / argv may be null.
class MpiSession {
 public:
  explicit MpiSession(int* argc = nullptr, char*** argv = nullptr);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  bool initialized_here() const { return owns_; }
  int thread_level() const { return provided_; }

 private:
  bool owns_ = false;
  int provided_ = MPI_THREAD_SINGLE;
};

class MpiCommunicator final : public Communicator {
 public:
  // Collective over `comm` (it calls MPI_Comm_dup). MPI must be initialized.
  explicit MpiCommunicator(MPI_Comm comm);
  // Frees the duplicate (unless MPI is already finalized).
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "mpi"; }

  void barrier() override;
  void broadcast(void* data, size_t bytes, int root) override;
  void allgather(const void* send, size_t bytes, void* recv) override;
  std::vector<char> allgatherv(const void* send, size_t bytes,
                               std::vector<int64_t>& counts) override;
  void allreduce_sum(int64_t* data, size_t count) override;
  void allreduce_max(double* data, size_t count) override;
  void allreduce_min(double* data, size_t count) override;
  // Sparse data exchange by nonblocking consensus (Hoefler, Siebert,
  // Lumsdaine, PPoPP 2010): MPI_Issend of each non-empty segment (in pieces
  // of max_message_bytes()), receives of whatever arrives (MPI_Iprobe on any
  // source), and, once this rank's sends are matched, MPI_Ibarrier; done when
  // the barrier completes. No message to ranks this rank does not talk to.
  // Device buffers are staged through host memory (Communicator::exchange).
  ExchangeKind exchange_kind() const override { return ExchangeKind::kSparse; }

  // The private duplicate all calls go through.
  MPI_Comm comm() const { return comm_; }

  // Largest single MPI message (default INT_MAX bytes, MPI's count limit):
  // broadcasts, reductions and exchange messages above it are sent in
  // pieces. Lowering it exercises that path in tests; it does not change
  // what the meter records. Must be equal on all ranks.
  void set_max_message_bytes(int64_t bytes);
  int64_t max_message_bytes() const { return max_message_; }

 private:
  // Throws std::runtime_error naming `call` and this rank if rc is an error.
  void check(int rc, const char* call) const;
  [[noreturn]] void fail(const std::string& what) const;
  template <typename T>
  void allreduce(T* data, size_t count, MPI_Datatype type, MPI_Op op);
  // A failing rank takes part in the same consensus without payload: it
  // sends its failure text to every other rank (under the failure tag)
  // instead, so every rank knows of it when the barrier completes.
  ExchangeFailure exchange_bytes(const ExchangeBuffer& send, ExchangeBuffer& recv, Stream stream,
                                 const std::string& failure) override;
  bool moves_device_buffers() const override { return false; }
  // exchange_bytes()'s phases: post the synchronous sends (the payload, or
  // the failure to every peer); receive one probed message into arrivals_
  // or failures_ (false if none is waiting); lay the arrivals out in recv
  // in rank order.
  void post_exchange_sends(const ExchangeBuffer& send, int tag, std::vector<MPI_Request>& sends);
  void post_failure_sends(const std::string& failure, int tag, std::vector<MPI_Request>& sends);
  bool receive_exchange_message(int tag, int failure_tag);
  void place_arrivals(const ExchangeBuffer& send, ExchangeBuffer& recv);

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  int64_t max_message_;
  // exchange() calls so far: its tag alternates with the call's parity, as a
  // rank can run at most one exchange ahead of another (it leaves a call only
  // when every rank entered that call's barrier).
  uint64_t exchange_calls_ = 0;
  // Reused across exchange() calls: the bytes received, in arrival order, and
  // (source, bytes) per message.
  std::vector<char> arrivals_;
  std::vector<std::pair<int, int64_t>> arrival_sizes_;
  // (source, failure text) of the failed ranks heard from in this call.
  std::vector<std::pair<int, std::string>> failures_;
};

// A communicator over MPI_COMM_WORLD (collective; MPI must be initialized).
std::unique_ptr<MpiCommunicator> world_communicator();

}  // namespace airmoe::comm
