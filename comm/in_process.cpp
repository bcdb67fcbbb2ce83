#include "comm/in_process.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <thread>
#include <utility>

namespace airmoe::comm {

// ---------------------------------------------------------------- world ---

InProcessWorld::InProcessWorld(int size) : size_(size) {
  if (size < 1)
    throw std::invalid_argument("InProcessWorld: size must be >= 1, got " + std::to_string(size));
  slots_.resize(static_cast<size_t>(size));
}

void InProcessWorld::throw_aborted(int rank) const {
  throw RankAborted("in-process rank " + std::to_string(rank) + ": aborted because rank " +
                    std::to_string(failed_rank_) + " failed: " + failure_);
}

void InProcessWorld::sync(int rank) {
  std::unique_lock<std::mutex> lock(mu_);
  if (aborted_) throw_aborted(rank);
  if (exited_rank_ >= 0) {
    // A rank that has returned can never arrive: nobody could leave this sync.
    aborted_ = true;
    failed_rank_ = exited_rank_;
    failure_ = "it returned from its body while rank " + std::to_string(rank) +
               " entered a collective (mismatched collective calls)";
    cv_.notify_all();
    throw_aborted(rank);
  }
  const uint64_t generation = generation_;
  if (++arrived_ == size_) {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
    return;
  }
  cv_.wait(lock, [&] { return generation_ != generation || aborted_; });
  if (generation_ != generation) return;  // completed, even if aborted since
  throw_aborted(rank);
}

void InProcessWorld::abort(int rank, const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!aborted_) {
    aborted_ = true;
    failed_rank_ = rank;
    failure_ = message;
  }
  cv_.notify_all();
}

void InProcessWorld::rank_exited(int rank) {
  std::lock_guard<std::mutex> lock(mu_);
  if (exited_rank_ < 0) exited_rank_ = rank;
  if (arrived_ > 0 && !aborted_) {
    aborted_ = true;
    failed_rank_ = rank;
    failure_ =
        "it returned from its body while other ranks wait in a collective "
        "(mismatched collective calls)";
    cv_.notify_all();
  }
}

bool InProcessWorld::aborted() const {
  std::lock_guard<std::mutex> lock(mu_);
  return aborted_;
}

// --------------------------------------------------------- communicator ---

InProcessCommunicator::InProcessCommunicator(std::shared_ptr<InProcessWorld> world, int rank)
    : Communicator(world ? world->size() : 1), world_(std::move(world)), rank_(rank) {
  if (!world_) throw std::invalid_argument("InProcessCommunicator: null world");
  if (rank < 0 || rank >= world_->size())
    throw std::out_of_range("InProcessCommunicator: rank " + std::to_string(rank) +
                            " out of range [0, " + std::to_string(world_->size()) + ")");
}

void InProcessCommunicator::fail(const std::string& what) const {
  throw std::runtime_error("in-process rank " + std::to_string(rank_) + ": " + what);
}

void InProcessCommunicator::enter(const InProcessSlot& mine) {
  world_->slot(rank_) = mine;
  world_->sync(rank_);
}

// Every rank computes the same verdict from the same slots, so a mismatch
// throws the same error everywhere. Call between enter() and the closing sync.
std::string InProcessCommunicator::mismatch(const char* op, bool same_bytes, bool same_root) const {
  for (int p = 0; p < size(); ++p) {
    const InProcessSlot& s = world_->slot(p);
    if (std::strcmp(s.op, op) != 0)
      return std::string("collective mismatch: rank ") + std::to_string(p) + " called " + s.op +
             " while rank " + std::to_string(rank_) + " called " + op;
  }
  const InProcessSlot& first = world_->slot(0);
  for (int p = 1; p < size(); ++p) {
    const InProcessSlot& s = world_->slot(p);
    if (same_bytes && s.bytes != first.bytes)
      return std::string(op) + ": rank " + std::to_string(p) + " passed size " +
             std::to_string(s.bytes) + " but rank 0 passed size " + std::to_string(first.bytes);
    if (same_root && s.root != first.root)
      return std::string(op) + ": rank " + std::to_string(p) + " passed root " +
             std::to_string(s.root) + " but rank 0 passed root " + std::to_string(first.root);
  }
  return {};
}

void InProcessCommunicator::barrier() {
  enter({"barrier"});
  const std::string err = mismatch("barrier", false, false);
  world_->sync(rank_);
  if (!err.empty()) fail(err);
}

void InProcessCommunicator::broadcast(void* data, size_t bytes, int root) {
  if (root < 0 || root >= size())
    fail("broadcast: root " + std::to_string(root) + " out of range [0, " + std::to_string(size()) +
         ")");
  if (bytes > 0 && data == nullptr)
    fail("broadcast: null buffer for " + std::to_string(bytes) + " bytes");
  InProcessSlot mine{"broadcast", data, bytes, root};
  enter(mine);
  const std::string err = mismatch("broadcast", true, true);
  if (err.empty() && rank_ != root && bytes > 0) {
    const void* src = world_->slot(root).data;
    if (src != data) std::memcpy(data, src, bytes);
  }
  world_->sync(rank_);
  if (!err.empty()) fail(err);
  record_broadcast(root, bytes);
}

void InProcessCommunicator::allgather(const void* send, size_t bytes, void* recv) {
  const size_t p_count = static_cast<size_t>(size());
  if (bytes > 0 && (send == nullptr || recv == nullptr))
    fail("allgather: null buffer for " + std::to_string(bytes) + " bytes");
  // Other ranks read `send` while this rank writes `recv`: keep them apart.
  std::vector<char> copy;
  if (overlaps(send, bytes, recv, bytes * p_count)) {
    copy.assign(static_cast<const char*>(send), static_cast<const char*>(send) + bytes);
    send = copy.data();
  }
  enter({"allgather", send, bytes});
  const std::string err = mismatch("allgather", true, false);
  if (err.empty() && bytes > 0)
    for (int p = 0; p < size(); ++p)
      std::memcpy(static_cast<char*>(recv) + static_cast<size_t>(p) * bytes, world_->slot(p).data,
                  bytes);
  world_->sync(rank_);
  if (!err.empty()) fail(err);
  record_allgather(bytes);
}

std::vector<char> InProcessCommunicator::allgatherv(const void* send, size_t bytes,
                                                    std::vector<int64_t>& counts) {
  if (bytes > 0 && send == nullptr)
    fail("allgatherv: null buffer for " + std::to_string(bytes) + " bytes");
  enter({"allgatherv", send, bytes});
  const std::string err = mismatch("allgatherv", false, false);
  std::vector<char> out;
  if (err.empty()) {
    counts.assign(p_size(), 0);
    size_t total = 0;
    for (int p = 0; p < size(); ++p) {
      counts[static_cast<size_t>(p)] = static_cast<int64_t>(world_->slot(p).bytes);
      total += world_->slot(p).bytes;
    }
    out.resize(total);
    size_t offset = 0;
    for (int p = 0; p < size(); ++p) {
      const InProcessSlot& s = world_->slot(p);
      if (s.bytes) std::memcpy(out.data() + offset, s.data, s.bytes);
      offset += s.bytes;
    }
  }
  world_->sync(rank_);
  if (!err.empty()) fail(err);
  record_allgather(bytes);
  return out;
}

template <typename T, typename Op>
void InProcessCommunicator::allreduce(const char* op, T* data, size_t count, Op combine) {
  if (count > 0 && data == nullptr)
    fail(std::string(op) + ": null buffer for " + std::to_string(count) + " elements");
  enter({op, data, count});
  const std::string err = mismatch(op, true, false);
  std::vector<T> result;
  if (err.empty() && count > 0) {
    const T* first = static_cast<const T*>(world_->slot(0).data);
    result.assign(first, first + count);
    for (int p = 1; p < size(); ++p) {  // rank order: deterministic
      const T* other = static_cast<const T*>(world_->slot(p).data);
      for (size_t i = 0; i < count; ++i) result[i] = combine(result[i], other[i]);
    }
  }
  world_->sync(rank_);  // every rank has read `data`: now it may be overwritten
  if (!err.empty()) fail(err);
  if (count > 0) std::copy(result.begin(), result.end(), data);
  record_allreduce(count * sizeof(T));
}

void InProcessCommunicator::allreduce_sum(int64_t* data, size_t count) {
  // Wrap-around addition, as MPI_SUM on int64 does in practice, without UB.
  allreduce("allreduce_sum", data, count, [](int64_t a, int64_t b) {
    return static_cast<int64_t>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b));
  });
}

void InProcessCommunicator::allreduce_max(double* data, size_t count) {
  allreduce("allreduce_max", data, count, [](double a, double b) { return a < b ? b : a; });
}

void InProcessCommunicator::allreduce_min(double* data, size_t count) {
  allreduce("allreduce_min", data, count, [](double a, double b) { return b < a ? b : a; });
}

void InProcessCommunicator::copy_arrivals(ExchangeBuffer& recv, Stream stream) {
  std::vector<int64_t> bytes(p_size());
  for (int q = 0; q < size(); ++q) bytes[q] = world_->slot(q).exchange->bytes(rank_);
  recv.reset(bytes);
  for (int q = 0; q < size(); ++q) {
    const ExchangeBuffer& from = *world_->slot(q).exchange;
    copy_exchange_bytes(recv, recv.begin(q), from, from.begin(rank_), bytes[q], stream);
  }
  if (recv.ops()) recv.ops()->synchronize(stream);
}

Communicator::ExchangeFailure InProcessCommunicator::exchange_bytes(const ExchangeBuffer& send,
                                                                    ExchangeBuffer& recv,
                                                                    Stream stream,
                                                                    const std::string& failure) {
  if (failure.empty() && send.ops()) send.ops()->synchronize(stream);
  InProcessSlot mine{"exchange"};
  mine.exchange = &send;
  mine.failure = &failure;
  enter(mine);
  const std::string err = mismatch("exchange", false, false);
  ExchangeFailure first;
  for (int q = 0; err.empty() && q < size() && first.rank < 0; ++q)
    if (!world_->slot(q).failure->empty()) first = {q, *world_->slot(q).failure};
  std::exception_ptr copy_error;
  if (err.empty() && first.rank < 0) {
    try {
      copy_arrivals(recv, stream);
    } catch (...) {
      copy_error = std::current_exception();  // after the sync: the peers must not wait
    }
  }
  world_->sync(rank_);  // every rank has read `send`: now it may change
  if (!err.empty()) fail(err);
  if (copy_error) std::rethrow_exception(copy_error);
  return first;
}

// --------------------------------------------------------------- runner ---

void run_ranks(int size, const std::function<void(Communicator&)>& body) {
  auto world = std::make_shared<InProcessWorld>(size);
  struct Outcome {
    std::exception_ptr error;
    bool aborted = false;
  };
  std::vector<Outcome> outcomes(static_cast<size_t>(size));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&world, &outcomes, &body, r] {
      Outcome& out = outcomes[static_cast<size_t>(r)];
      try {
        InProcessCommunicator comm(world, r);
        body(comm);
        world->rank_exited(r);
      } catch (const RankAborted& e) {
        out.error = std::current_exception();
        out.aborted = true;
        world->abort(r, e.what());
      } catch (const std::exception& e) {
        out.error = std::current_exception();
        world->abort(r, e.what());
      } catch (...) {
        out.error = std::current_exception();
        world->abort(r, "unknown exception");
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const Outcome& o : outcomes)
    if (o.error && !o.aborted) std::rethrow_exception(o.error);
  for (const Outcome& o : outcomes)
    if (o.error) std::rethrow_exception(o.error);
}

}  // namespace airmoe::comm
