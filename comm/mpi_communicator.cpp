#include "comm/mpi_communicator.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <string>

#include "core/errors.h"

namespace airmoe::comm {

namespace {

// The private duplicate carries only our messages, so any tag is ours;
// kExchangeTag + 1 too: see exchange_calls_. Failures travel under
// kFailureTag (+ 1).
constexpr int kExchangeTag = 0x4d70;
constexpr int kFailureTag = kExchangeTag + 2;

std::string error_string(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS || len <= 0)
    return "MPI error code " + std::to_string(rc);
  return std::string(text, static_cast<size_t>(len));
}

bool mpi_initialized() {
  int flag = 0;
  MPI_Initialized(&flag);
  return flag != 0;
}

bool mpi_finalized() {
  int flag = 0;
  MPI_Finalized(&flag);
  return flag != 0;
}

// Size of `comm`, checked before the base class (which needs it) is built.
int checked_size(MPI_Comm comm) {
  // Said for every caller: C and other languages (the C API) call
  // MPI_Init_thread themselves; C++ may let an MpiSession do it.
  if (!mpi_initialized())
    throw TransportError(
        "MpiCommunicator: MPI is not initialized: call MPI_Init_thread (MPI_THREAD_FUNNELED or "
        "higher) or MPI_Init first (in C++, an airmoe::comm::MpiSession does it)");
  if (mpi_finalized())
    throw TransportError("MpiCommunicator: MPI is already finalized (MPI_Finalize was called)");
  if (comm == MPI_COMM_NULL) throw std::invalid_argument("MpiCommunicator: MPI_COMM_NULL");
  int size = 0;
  const int rc = MPI_Comm_size(comm, &size);
  if (rc != MPI_SUCCESS)
    throw TransportError("MpiCommunicator: MPI_Comm_size failed: " + error_string(rc));
  return size;
}

}  // namespace

// ----------------------------------------------------------- MpiSession ---

MpiSession::MpiSession(int* argc, char*** argv) {
  if (mpi_finalized()) throw TransportError("MpiSession: MPI has already been finalized");
  if (mpi_initialized()) {
    MPI_Query_thread(&provided_);
    return;
  }
  const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided_);
  if (rc != MPI_SUCCESS)
    throw TransportError("MpiSession: MPI_Init_thread failed: " + error_string(rc));
  owns_ = true;
  if (provided_ < MPI_THREAD_FUNNELED) {
    MPI_Finalize();
    owns_ = false;
    throw TransportError("MpiSession: MPI provides thread level " + std::to_string(provided_) +
                         ", below MPI_THREAD_FUNNELED");
  }
}

MpiSession::~MpiSession() {
  if (owns_ && !mpi_finalized()) MPI_Finalize();
}

// ------------------------------------------------------ MpiCommunicator ---

MpiCommunicator::MpiCommunicator(MPI_Comm comm)
    : Communicator(checked_size(comm)), max_message_(INT_MAX) {
  int rc = MPI_Comm_dup(comm, &comm_);
  if (rc != MPI_SUCCESS) {
    comm_ = MPI_COMM_NULL;
    throw TransportError("MpiCommunicator: MPI_Comm_dup failed: " + error_string(rc));
  }
  rc = MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(comm_, &rank_);
  if (rc == MPI_SUCCESS) rc = MPI_Comm_size(comm_, &size_);
  if (rc != MPI_SUCCESS) {
    MPI_Comm_free(&comm_);
    throw TransportError("MpiCommunicator: setting up the duplicate failed: " + error_string(rc));
  }
}

MpiCommunicator::~MpiCommunicator() {
  if (comm_ != MPI_COMM_NULL && !mpi_finalized()) MPI_Comm_free(&comm_);
}

void MpiCommunicator::set_max_message_bytes(int64_t bytes) {
  if (bytes < 1 || bytes > INT_MAX)
    throw std::invalid_argument("MpiCommunicator::set_max_message_bytes: " + std::to_string(bytes) +
                                " not in [1, INT_MAX]");
  max_message_ = bytes;
}

void MpiCommunicator::fail(const std::string& what) const {
  throw TransportError("MPI rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ": " +
                       what);
}

void MpiCommunicator::check(int rc, const char* call) const {
  if (rc == MPI_SUCCESS) return;
  fail(std::string(call) + " failed: " + error_string(rc));
}

void MpiCommunicator::barrier() {
  check(MPI_Barrier(comm_), "MPI_Barrier");
}

void MpiCommunicator::broadcast(void* data, size_t bytes, int root) {
  char* p = static_cast<char*>(data);
  size_t left = bytes;
  do {  // at least one call, so that a bad root is reported even for 0 bytes
    const size_t n = std::min(left, static_cast<size_t>(max_message_));
    check(MPI_Bcast(p, static_cast<int>(n), MPI_BYTE, root, comm_), "MPI_Bcast");
    p += n;
    left -= n;
  } while (left > 0);
  record_broadcast(root, bytes);
}

void MpiCommunicator::allgather(const void* send, size_t bytes, void* recv) {
  if (bytes > static_cast<size_t>(INT_MAX))
    fail("allgather: " + std::to_string(bytes) + " bytes per rank exceeds INT_MAX");
  std::vector<char> copy;  // MPI forbids aliased send / recv buffers
  if (overlaps(send, bytes, recv, bytes * static_cast<size_t>(size_))) {
    copy.assign(static_cast<const char*>(send), static_cast<const char*>(send) + bytes);
    send = copy.data();
  }
  const int n = static_cast<int>(bytes);
  check(MPI_Allgather(send, n, MPI_BYTE, recv, n, MPI_BYTE, comm_), "MPI_Allgather");
  record_allgather(bytes);
}

std::vector<char> MpiCommunicator::allgatherv(const void* send, size_t bytes,
                                              std::vector<int64_t>& counts) {
  const auto p = static_cast<size_t>(size_);
  int64_t mine = static_cast<int64_t>(bytes);
  std::vector<int64_t> all(p);
  check(MPI_Allgather(&mine, 1, MPI_INT64_T, all.data(), 1, MPI_INT64_T, comm_),
        "MPI_Allgather (allgatherv counts)");
  // Every rank sees the same counts, so every rank refuses alike.
  int64_t total = 0;
  for (int64_t c : all) total += c;
  if (total > INT_MAX)
    fail("allgatherv: " + std::to_string(total) +
         " bytes in all exceeds INT_MAX (MPI_Allgatherv's int displacements)");
  std::vector<int> recv_counts(p), displs(p);
  int offset = 0;
  for (size_t q = 0; q < p; ++q) {
    recv_counts[q] = static_cast<int>(all[q]);
    displs[q] = offset;
    offset += recv_counts[q];
  }
  std::vector<char> out(static_cast<size_t>(total));
  char dummy = 0;
  check(MPI_Allgatherv(bytes ? send : &dummy, static_cast<int>(bytes), MPI_BYTE,
                       out.empty() ? &dummy : out.data(), recv_counts.data(), displs.data(),
                       MPI_BYTE, comm_),
        "MPI_Allgatherv");
  counts = std::move(all);
  record_allgather(bytes);
  return out;
}

template <typename T>
void MpiCommunicator::allreduce(T* data, size_t count, MPI_Datatype type, MPI_Op op) {
  const size_t chunk = std::max<size_t>(1, static_cast<size_t>(max_message_) / sizeof(T));
  size_t done = 0;
  do {  // at least one call, as every rank must make the same calls
    const size_t n = std::min(count - done, chunk);
    check(MPI_Allreduce(MPI_IN_PLACE, data + done, static_cast<int>(n), type, op, comm_),
          "MPI_Allreduce");
    done += n;
  } while (done < count);
  record_allreduce(count * sizeof(T));
}

void MpiCommunicator::allreduce_sum(int64_t* data, size_t count) {
  allreduce(data, count, MPI_INT64_T, MPI_SUM);
}

void MpiCommunicator::allreduce_max(double* data, size_t count) {
  allreduce(data, count, MPI_DOUBLE, MPI_MAX);
}

void MpiCommunicator::allreduce_min(double* data, size_t count) {
  allreduce(data, count, MPI_DOUBLE, MPI_MIN);
}

void MpiCommunicator::post_exchange_sends(const ExchangeBuffer& send, int tag,
                                          std::vector<MPI_Request>& sends) {
  for (int q = 0; q < size_; ++q) {
    if (!is_payload_message(rank_, q, send.bytes(q))) continue;
    // Pieces between one pair of ranks under one tag arrive in order (MPI's
    // non-overtaking rule), so the receiver appends them as they come.
    for (int64_t off = 0; off < send.bytes(q); off += max_message_) {
      const int64_t n = std::min(max_message_, send.bytes(q) - off);
      sends.emplace_back();
      const int rc = MPI_Issend(send.begin(q) + off, static_cast<int>(n), MPI_BYTE, q, tag, comm_,
                                &sends.back());
      if (rc != MPI_SUCCESS) {
        sends.pop_back();
        MPI_Waitall(static_cast<int>(sends.size()), sends.data(), MPI_STATUSES_IGNORE);
        check(rc, "MPI_Issend (exchange)");
      }
    }
  }
}

void MpiCommunicator::post_failure_sends(const std::string& failure, int tag,
                                         std::vector<MPI_Request>& sends) {
  // Cut to one message: a failure's text is short, and any part names it.
  const int n = static_cast<int>(std::min<size_t>(failure.size(), 4096));
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    sends.emplace_back();
    const int rc = MPI_Issend(failure.data(), n, MPI_BYTE, q, tag, comm_, &sends.back());
    if (rc != MPI_SUCCESS) {
      sends.pop_back();
      MPI_Waitall(static_cast<int>(sends.size()), sends.data(), MPI_STATUSES_IGNORE);
      check(rc, "MPI_Issend (exchange failure)");
    }
  }
}

bool MpiCommunicator::receive_exchange_message(int tag, int failure_tag) {
  int waiting = 0;
  MPI_Status status;
  check(MPI_Iprobe(MPI_ANY_SOURCE, failure_tag, comm_, &waiting, &status),
        "MPI_Iprobe (exchange failure)");
  if (waiting) {
    int n = 0;
    check(MPI_Get_count(&status, MPI_BYTE, &n), "MPI_Get_count (exchange failure)");
    std::string text(static_cast<size_t>(n), '\0');
    check(MPI_Recv(text.data(), n, MPI_BYTE, status.MPI_SOURCE, failure_tag, comm_,
                   MPI_STATUS_IGNORE),
          "MPI_Recv (exchange failure)");
    failures_.emplace_back(status.MPI_SOURCE, std::move(text));
    return true;
  }
  check(MPI_Iprobe(MPI_ANY_SOURCE, tag, comm_, &waiting, &status), "MPI_Iprobe (exchange)");
  if (!waiting) return false;
  int n = 0;
  check(MPI_Get_count(&status, MPI_BYTE, &n), "MPI_Get_count (exchange)");
  const size_t at = arrivals_.size();
  arrivals_.resize(at + static_cast<size_t>(n));
  check(MPI_Recv(arrivals_.data() + at, n, MPI_BYTE, status.MPI_SOURCE, tag, comm_,
                 MPI_STATUS_IGNORE),
        "MPI_Recv (exchange)");
  arrival_sizes_.emplace_back(status.MPI_SOURCE, n);
  return true;
}

void MpiCommunicator::place_arrivals(const ExchangeBuffer& send, ExchangeBuffer& recv) {
  std::vector<int64_t> bytes(static_cast<size_t>(size_), 0);
  for (const auto& [source, n] : arrival_sizes_) bytes[source] += n;
  bytes[rank_] = send.bytes(rank_);
  recv.reset(bytes);
  // Pieces from one source arrived in order; sources in any order. Writing
  // each at its source's running offset gives rank order whatever the timing.
  std::vector<int64_t> filled(static_cast<size_t>(size_), 0);
  size_t at = 0;
  for (const auto& [source, n] : arrival_sizes_) {
    std::memcpy(recv.begin(source) + filled[source], arrivals_.data() + at, static_cast<size_t>(n));
    filled[source] += n;
    at += static_cast<size_t>(n);
  }
  if (send.bytes(rank_) > 0)
    std::memcpy(recv.begin(rank_), send.begin(rank_), static_cast<size_t>(send.bytes(rank_)));
}

Communicator::ExchangeFailure MpiCommunicator::exchange_bytes(const ExchangeBuffer& send,
                                                              ExchangeBuffer& recv, Stream,
                                                              const std::string& failure) {
  const int parity = static_cast<int>(exchange_calls_++ & 1);
  const int tag = kExchangeTag + parity, failure_tag = kFailureTag + parity;
  arrivals_.clear();
  arrival_sizes_.clear();
  failures_.clear();
  std::vector<MPI_Request> sends;
  if (failure.empty())
    post_exchange_sends(send, tag, sends);
  else
    post_failure_sends(failure, failure_tag, sends);
  // Nonblocking consensus: an Issend completes once its receive matched, so
  // when every rank's sends completed (the barrier) nothing is left in flight.
  MPI_Request barrier = MPI_REQUEST_NULL;
  bool barrier_entered = false;
  for (;;) {
    if (receive_exchange_message(tag, failure_tag)) continue;
    int done = 0;
    if (!barrier_entered) {
      check(MPI_Testall(static_cast<int>(sends.size()), sends.data(), &done, MPI_STATUSES_IGNORE),
            "MPI_Testall (exchange sends)");
      if (done) {
        check(MPI_Ibarrier(comm_, &barrier), "MPI_Ibarrier (exchange)");
        barrier_entered = true;
      }
    } else {
      check(MPI_Test(&barrier, &done, MPI_STATUS_IGNORE), "MPI_Test (exchange barrier)");
      if (done) break;
    }
  }
  ExchangeFailure first;
  if (!failure.empty()) first = {rank_, failure};
  for (auto& [source, text] : failures_)
    if (first.rank < 0 || source < first.rank) first = {source, std::move(text)};
  if (first.rank < 0) place_arrivals(send, recv);
  return first;
}

std::unique_ptr<MpiCommunicator> world_communicator() {
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD);
}

}  // namespace airmoe::comm
