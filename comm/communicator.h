// The transport the runtime is written against: a small set of collectives
// and one variable all-to-all (exchange), each metered per phase and per peer.
// Backends: MPI (mpi_communicator.h) and ranks-as-threads in one process
// (in_process.h) for fast tests of sharding logic. No routing here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <span>
#include <string>
#include <vector>

#include "comm/exchange_buffer.h"
#include "comm/exchange_rule.h"
#include "comm/traffic_meter.h"

namespace airmoe::comm {

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* backend() const = 0;

  virtual void barrier() = 0;
  // root's `bytes` bytes at data are copied to every rank's data.
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  // Every rank contributes `bytes` bytes; recv holds size() * bytes, rank order.
  virtual void allgather(const void* send, size_t bytes, void* recv) = 0;
  // Every rank contributes a different number of bytes; returns the
  // concatenation in rank order and fills `counts` with each rank's bytes.
  virtual std::vector<char> allgatherv(const void* send, size_t bytes,
                                       std::vector<int64_t>& counts) = 0;
  // Element-wise sum; integer addition, so exact and order-free.
  virtual void allreduce_sum(int64_t* data, size_t count) = 0;
  // Element-wise max / min of doubles (exact whatever the order).
  virtual void allreduce_max(double* data, size_t count) = 0;
  virtual void allreduce_min(double* data, size_t count) = 0;
  // The variable all-to-all on caller-owned buffers: send has size() segments,
  // segment p goes to rank p; recv is reset to size() segments, segment q
  // holding what rank q sent here (its storage is reused across calls). A
  // rank that sends nothing to p sends p no message. Metered by
  // exchange_kind()'s rule (below).
  //
  // send and recv live in the same memory: both host buffers, or both on
  // one device (comm/exchange_buffer.h). A backend that moves only host
  // memory (MPI) stages device buffers through host memory: the send bytes
  // to a host staging buffer (pinned on cuda), its host exchange, the
  // received bytes back to recv, each copy through the device's ops on
  // `stream`; then recv is ready when exchange returns. Backends that move
  // device memory themselves (in-process, NCCL) order their copies on
  // `stream`; host backends ignore it.
  //
  // Errors: a bad buffer pair (a wrong segment count, send and recv the
  // same buffer, on different memory) or a failed staging copy on one rank
  // fails every rank, never a hang: that rank throws its own error
  // (UsageError "exchange: rank R: ..." for bad buffers), the others a
  // PeerError naming it. The lowest failing rank is the one named.
  void exchange(const ExchangeBuffer& send, ExchangeBuffer& recv) {
    exchange(send, recv, Stream{});
  }
  void exchange(const ExchangeBuffer& send, ExchangeBuffer& recv, Stream stream);
  // Which all-to-all exchange() performs (comm/exchange_rule.h): the
  // nonblocking consensus (kSparse: in-process, MPI) or counts first
  // (kCountsFirst: NCCL). Its control messages follow the kind, in the
  // meter and in the simulator (runtime/simulator.h), which asks this.
  virtual ExchangeKind exchange_kind() const = 0;

  // The phase name under which subsequent calls are metered.
  void set_phase(std::string phase) { phase_ = std::move(phase); }
  const std::string& phase() const { return phase_; }
  TrafficMeter& meter() { return meter_; }
  const TrafficMeter& meter() const { return meter_; }

 protected:
  explicit Communicator(int size) : meter_(size) {}

  // What each call records (self-sends are local and never recorded):
  //   broadcast: root -> each other rank, one message of `bytes`.
  //   allgather(v): each rank -> each other rank, one message of its bytes.
  //   allreduce: a ring: 2 (P - 1) messages of bytes / P (rounded up) to
  //              rank + 1, the bandwidth-optimal algorithm's traffic.
  //   exchange:  phase, one message per non-empty segment p != rank; and
  //              the control messages of exchange_kind(): phase +
  //              ":barrier" (kSparse) or phase + ":counts" (kCountsFirst)
  //              (comm/exchange_rule.h, which the simulator counts too).
  // The metering rules above live here, once; backends call these after a
  // call succeeded.
  void record_broadcast(int root, size_t bytes);
  void record_allgather(size_t bytes);  // allgather and allgatherv alike
  void record_allreduce(size_t bytes);
  void record_exchange(const ExchangeBuffer& send);

  // What exchange() learns from the backend: the lowest rank that failed
  // before data moved (-1: none) and its message; the same on every rank.
  struct ExchangeFailure {
    int rank = -1;
    std::string message;
  };
  // The backend's exchange, called by exchange() on every rank. `failure`
  // empty: move send to recv (resetting recv), no metering. Otherwise this
  // rank failed before data moved (send is not to be read): it takes part
  // without data and without touching recv, so that every rank learns of
  // the failure. Returns the lowest failing rank, whatever this rank's own
  // state (this rank with its message when the backend itself refused its
  // buffers); throws only for transport errors.
  virtual ExchangeFailure exchange_bytes(const ExchangeBuffer& send, ExchangeBuffer& recv,
                                         Stream stream, const std::string& failure) = 0;
  // True when exchange_bytes moves device buffers itself; false when it
  // moves host memory only and exchange() stages device buffers.
  virtual bool moves_device_buffers() const = 0;
  // True when [a, a + na) and [b, b + nb) share a byte (aliased buffers).
  static bool overlaps(const void* a, size_t na, const void* b, size_t nb);

 private:
  // Records the control messages of one all-to-all of `kind`.
  void record_control(ExchangeKind kind);
  // Throws UsageError (naming this rank) unless send has one segment per
  // rank, recv is another buffer and both live in the same memory.
  void check_exchange_buffers(const ExchangeBuffer& send, const ExchangeBuffer& recv) const;
  // The staged exchange of device buffers over a host-only backend.
  ExchangeFailure exchange_staged(const ExchangeBuffer& send, ExchangeBuffer& recv, Stream stream,
                                  std::exception_ptr& own_failure);

  TrafficMeter meter_;
  std::string phase_ = "default";
  // Host staging buffers of exchange_staged(), reused while the device
  // buffers come from the same backend (staged_for_).
  const Ops* staged_for_ = nullptr;
  ExchangeBuffer staged_send_, staged_recv_;
};

// Sets the phase for a scope and restores the previous one.
class PhaseScope {
 public:
  PhaseScope(Communicator& comm, std::string phase) : comm_(comm), previous_(comm.phase()) {
    comm_.set_phase(std::move(phase));
  }
  ~PhaseScope() { comm_.set_phase(previous_); }
  PhaseScope(const PhaseScope&) = delete;
  PhaseScope& operator=(const PhaseScope&) = delete;

 private:
  Communicator& comm_;
  std::string previous_;
};

// Every rank must pass the same configuration: compares a hash of `config`
// across ranks and, if any differs, throws on every rank a
// ConfigMismatchError (an std::runtime_error, core/errors.h) naming `what`
// and the ranks that differ from rank 0.
void require_same_config(Communicator& comm, const std::string& config, const char* what);

// Every rank passes its own local error ("" for none); if any rank has one,
// every rank throws "<what>: rank R: <message>" with the lowest failing
// rank's message: a JointUsageError (a UsageError) on each rank that had an
// error of its own, a PeerError (naming R) on the others; both are
// std::invalid_argument (core/errors.h). Checks of local input go through this before data moves,
// so one rank's bad input fails the whole job together instead of leaving the
// others waiting in the next collective. Metered under the phase "checks".
void raise_together(Communicator& comm, const std::string& local_error, const char* what);

// Collective: runs `local_check` on this rank and raises what it threw (any
// std::exception) on every rank together, as raise_together does. The one
// way the runtime validates local input before data moves.
template <typename Check>
void check_together(Communicator& comm, const char* what, Check&& local_check) {
  std::string error;
  try {
    local_check();
  } catch (const std::exception& e) {
    error = e.what();
    if (error.empty()) error = "unknown error";
  }
  raise_together(comm, error, what);
}

// Typed helpers over the byte interface.
template <typename T>
void broadcast_vector(Communicator& comm, std::vector<T>& v, int root) {
  uint64_t n = v.size();
  comm.broadcast(&n, sizeof(n), root);
  v.resize(n);
  if (n) comm.broadcast(v.data(), n * sizeof(T), root);
}

template <typename T>
std::vector<T> allgatherv_vector(Communicator& comm, std::span<const T> mine) {
  std::vector<int64_t> counts;
  std::vector<char> raw = comm.allgatherv(mine.data(), mine.size_bytes(), counts);
  std::vector<T> out(raw.size() / sizeof(T));
  if (!raw.empty()) std::memcpy(out.data(), raw.data(), raw.size());
  return out;
}

}  // namespace airmoe::comm
