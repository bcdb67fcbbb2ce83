// Ranks as threads of one process (as Gloo's tests do): a fast backend for
// testing sharding logic without MPI. Every rank is a thread holding its own
// InProcessCommunicator over a shared InProcessWorld; collectives exchange
// pointers through shared slots between two barriers, so data is copied once,
// straight from the sender's buffer. Reductions run in rank order, so results
// are deterministic.
//
// Failure handling: a rank that fails (its body throws) aborts the world, and
// every rank blocked in, or later entering, a collective throws
//   std::runtime_error("in-process rank R: aborted because rank Q failed: <msg>")
// instead of hanging. A rank whose body returns while others still wait in a
// collective (mismatched collective calls) aborts the world the same way.
// The collectives also check that all ranks called the same operation with
// consistent arguments (same root, same byte counts where required), and throw
// the same error on every rank when they did not.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace airmoe::comm {

// Thrown on a rank whose collective was interrupted because another rank failed.
class RankAborted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// What one rank publishes for the collective in progress.
struct InProcessSlot {
  const char* op = nullptr;  // name of the collective, to catch mismatched calls
  const void* data = nullptr;
  size_t bytes = 0;  // bytes for byte collectives, element count for reductions
  int root = -1;
  const ExchangeBuffer* exchange = nullptr;  // exchange: what this rank sends
  const std::string* failure = nullptr;      // exchange: this rank's failure, "" for none
};

// State shared by the `size` ranks of one in-process world.
class InProcessWorld {
 public:
  explicit InProcessWorld(int size);
  InProcessWorld(const InProcessWorld&) = delete;
  InProcessWorld& operator=(const InProcessWorld&) = delete;

  int size() const { return size_; }

  // Waits until all ranks arrive. Throws RankAborted on `rank` if the world is
  // (or becomes) aborted, or if some rank has left and can never arrive.
  void sync(int rank);
  // Marks the world failed by `rank` with `message` (the first call wins) and
  // wakes every waiting rank.
  void abort(int rank, const std::string& message);
  // Called when `rank`'s body returned normally: it joins no further
  // collective, so a rank waiting (or later arriving) in one is aborted.
  void rank_exited(int rank);
  bool aborted() const;

  InProcessSlot& slot(int rank) { return slots_[static_cast<size_t>(rank)]; }
  const InProcessSlot& slot(int rank) const { return slots_[static_cast<size_t>(rank)]; }

 private:
  [[noreturn]] void throw_aborted(int rank) const;  // mutex held

  int size_;
  std::vector<InProcessSlot> slots_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  int exited_rank_ = -1;
  bool aborted_ = false;
  int failed_rank_ = -1;
  std::string failure_;
};

class InProcessCommunicator final : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<InProcessWorld> world, int rank);

  int rank() const override { return rank_; }
  int size() const override { return world_->size(); }
  const char* backend() const override { return "in-process"; }

  void barrier() override;
  void broadcast(void* data, size_t bytes, int root) override;
  void allgather(const void* send, size_t bytes, void* recv) override;
  std::vector<char> allgatherv(const void* send, size_t bytes,
                               std::vector<int64_t>& counts) override;
  void allreduce_sum(int64_t* data, size_t count) override;
  void allreduce_max(double* data, size_t count) override;
  void allreduce_min(double* data, size_t count) override;
  // Sparse: each rank copies the segments addressed to it straight from the
  // senders' buffers; metered as the nonblocking consensus (exchange_rule.h).
  ExchangeKind exchange_kind() const override { return ExchangeKind::kSparse; }

 protected:
  // Host buffers by memcpy; device buffers (ranks as threads sharing one
  // device, e.g. P ranks on one GPU) by the receiving rank's device copies
  // on its stream, device to device. Each rank waits for its stream before
  // publishing send and before returning, so that a peer never reads a send
  // still being written nor a rank its send rewritten while read.
  ExchangeFailure exchange_bytes(const ExchangeBuffer& send, ExchangeBuffer& recv, Stream stream,
                                 const std::string& failure) override;
  bool moves_device_buffers() const override { return true; }

 private:
  // Receives every rank's segment for this rank into recv.
  void copy_arrivals(ExchangeBuffer& recv, Stream stream);
  // Publishes this rank's slot and waits for every rank's.
  void enter(const InProcessSlot& mine);
  // Empty if every rank's slot names `op` (and, as asked, the same size and
  // root); else the error, the same on every rank.
  std::string mismatch(const char* op, bool same_bytes, bool same_root) const;
  size_t p_size() const { return static_cast<size_t>(size()); }
  [[noreturn]] void fail(const std::string& what) const;
  template <typename T, typename Op>
  void allreduce(const char* op, T* data, size_t count, Op combine);

  std::shared_ptr<InProcessWorld> world_;
  int rank_;
};

// Runs `body` on `size` ranks, each a thread with its own communicator, and
// joins them. If any rank throws, the others are aborted (see above) and the
// exception of the lowest rank that failed on its own (not by RankAborted) is
// rethrown, with its type; if every failure is an abort, the lowest rank's.
void run_ranks(int size, const std::function<void(Communicator&)>& body);

}  // namespace airmoe::comm
