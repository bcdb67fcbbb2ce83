#include "comm/nccl_communicator.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>

#include "core/errors.h"

namespace airmoe::comm {

namespace {

// Makes `gpu`'s device current for a scope (NCCL and CUDA calls act on the
// current device) and restores the previous one.
class OnDevice {
 public:
  explicit OnDevice(const Ops& gpu) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    const int index = gpu.device().index;
    if (index != previous_) {
      const cudaError_t rc = cudaSetDevice(index);
      if (rc != cudaSuccess)
        throw TransportError("nccl: cudaSetDevice(" + std::to_string(index) +
                             ") failed: " + cudaGetErrorString(rc));
    }
  }
  ~OnDevice() {
    int now = -1;
    if (previous_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous_)
      cudaSetDevice(previous_);
  }
  OnDevice(const OnDevice&) = delete;
  OnDevice& operator=(const OnDevice&) = delete;

 private:
  int previous_ = -1;
};

int count_of(ncclComm_t comm) {
  int n = 0;
  const ncclResult_t rc = ncclCommCount(comm, &n);
  if (rc != ncclSuccess)
    throw TransportError(std::string("nccl: ncclCommCount failed: ") + ncclGetErrorString(rc));
  return n;
}

void require_gpu(const Ops& gpu, const char* where) {
  if (gpu.device().is_host())
    throw UsageError(std::string(where) + ": the ops given are " + gpu.name() +
                     ", a host backend; NCCL needs a cuda:N backend");
}

}  // namespace

NcclCommunicator::NcclCommunicator(Communicator& host, const Ops& gpu)
    : Communicator(host.size()), gpu_(gpu), owned_(true), rank_(host.rank()), size_(host.size()) {
  ncclUniqueId id{};
  check_together(host, "NcclCommunicator", [&] {
    require_gpu(gpu, "NcclCommunicator");
    if (rank_ == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  });
  host.broadcast(&id, sizeof(id), 0);
  check_together(host, "NcclCommunicator", [&] {
    OnDevice on(gpu_);
    check(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  });
}

NcclCommunicator::NcclCommunicator(ncclComm_t comm, const Ops& gpu)
    : Communicator(count_of(comm)), gpu_(gpu), comm_(comm), size_(count_of(comm)) {
  require_gpu(gpu, "NcclCommunicator");
  check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
  OnDevice on(gpu_);
  check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
}

NcclCommunicator::~NcclCommunicator() {
  try {
    OnDevice on(gpu_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (owned_ && !aborted_ && comm_ != nullptr) ncclCommDestroy(comm_);
  } catch (...) {  // a destructor reports nothing: the device is gone
  }
}

void NcclCommunicator::fail(const std::string& what) const {
  throw TransportError("nccl rank " + std::to_string(rank_) + " of " + std::to_string(size_) +
                       ": " + what);
}

void NcclCommunicator::check(ncclResult_t rc, const std::string& call) const {
  if (rc == ncclSuccess) return;
  std::string detail = ncclGetErrorString(rc);
  const char* last = comm_ != nullptr ? ncclGetLastError(comm_) : nullptr;
  if (last != nullptr && *last != '\0') detail += " (" + std::string(last) + ")";
  fail(call + " failed: " + detail);
}

void NcclCommunicator::check_cuda(cudaError_t rc, const std::string& call) const {
  if (rc == cudaSuccess) return;
  fail(call + " failed: " + cudaGetErrorName(rc) + ": " + cudaGetErrorString(rc));
}

void NcclCommunicator::require_usable(const char* call) const {
  if (aborted_)
    fail(std::string(call) + ": the NCCL communicator was aborted after an asynchronous failure");
}

void NcclCommunicator::wait(cudaStream_t stream, const std::string& call) {
  for (;;) {
    const cudaError_t done = cudaStreamQuery(stream);
    if (done == cudaSuccess) return;
    if (done != cudaErrorNotReady) check_cuda(done, call + ": cudaStreamQuery");
    ncclResult_t async = ncclSuccess;
    check(ncclCommGetAsyncError(comm_, &async), call + ": ncclCommGetAsyncError");
    if (async != ncclSuccess && async != ncclInProgress) {
      ncclCommAbort(comm_);
      aborted_ = true;
      fail(call + ": asynchronous NCCL failure: " + ncclGetErrorString(async) +
           "; the NCCL communicator is aborted");
    }
    std::this_thread::yield();
  }
}

char* NcclCommunicator::scratch(size_t bytes) {
  bytes = std::max<size_t>(bytes, 64);  // never null, even for 0-byte calls
  if (scratch_.bytes() < bytes) {
    Buffer grown(gpu_.allocator(), std::max(bytes, scratch_.bytes() * 2));
    scratch_ = std::move(grown);
  }
  return static_cast<char*>(scratch_.data());
}

// ---------------------------------------------------------- collectives ---

void NcclCommunicator::barrier() {
  require_usable("barrier");
  int64_t one = 1;
  allreduce(&one, 1, sizeof(one), ncclInt64, ncclSum, "barrier (ncclAllReduce)");
}

void NcclCommunicator::broadcast(void* data, size_t bytes, int root) {
  require_usable("broadcast");
  if (root < 0 || root >= size_)
    throw UsageError("nccl rank " + std::to_string(rank_) + ": broadcast: root " +
                     std::to_string(root) + " out of range [0, " + std::to_string(size_) + ")");
  OnDevice on(gpu_);
  const Stream s{stream_};
  char* d = scratch(bytes);
  if (rank_ == root) gpu_.copy_bytes(d, gpu_.device(), data, Device::host(), bytes, s);
  check(ncclBroadcast(d, d, bytes, ncclChar, root, comm_, stream_), "ncclBroadcast");
  wait(stream_, "ncclBroadcast");
  if (rank_ != root) gpu_.copy_bytes(data, Device::host(), d, gpu_.device(), bytes, s);
  record_broadcast(root, bytes);
}

void NcclCommunicator::allgather(const void* send, size_t bytes, void* recv) {
  require_usable("allgather");
  OnDevice on(gpu_);
  const Stream s{stream_};
  const size_t total = bytes * static_cast<size_t>(size_);
  char* d = scratch(total);
  // In place: this rank's block of the result is its input (no aliasing
  // between the caller's send and recv matters: send is read first).
  char* mine = d + bytes * static_cast<size_t>(rank_);
  gpu_.copy_bytes(mine, gpu_.device(), send, Device::host(), bytes, s);
  check(ncclAllGather(mine, d, bytes, ncclChar, comm_, stream_), "ncclAllGather");
  wait(stream_, "ncclAllGather");
  gpu_.copy_bytes(recv, Device::host(), d, gpu_.device(), total, s);
  record_allgather(bytes);
}

std::vector<char> NcclCommunicator::allgatherv(const void* send, size_t bytes,
                                               std::vector<int64_t>& counts) {
  require_usable("allgatherv");
  const auto p = static_cast<size_t>(size_);
  int64_t mine = static_cast<int64_t>(bytes);
  std::vector<int64_t> all(p);
  {
    // The sizes: an allgather that is not metered (the logical traffic of
    // allgatherv is its payload, as on the other backends).
    OnDevice on(gpu_);
    const Stream s{stream_};
    auto* d = reinterpret_cast<int64_t*>(scratch(p * sizeof(int64_t)));
    gpu_.copy_bytes(d + rank_, gpu_.device(), &mine, Device::host(), sizeof(mine), s);
    check(ncclAllGather(d + rank_, d, 1, ncclInt64, comm_, stream_), "ncclAllGather (sizes)");
    wait(stream_, "ncclAllGather (sizes)");
    gpu_.copy_bytes(all.data(), Device::host(), d, gpu_.device(), p * sizeof(int64_t), s);
  }
  const int64_t widest = *std::max_element(all.begin(), all.end());
  std::vector<char> padded(static_cast<size_t>(widest) * p), own(static_cast<size_t>(widest));
  if (bytes) std::memcpy(own.data(), send, bytes);
  {
    OnDevice on(gpu_);
    const Stream s{stream_};
    const auto w = static_cast<size_t>(widest);
    char* d = scratch(w * p);
    gpu_.copy_bytes(d + w * static_cast<size_t>(rank_), gpu_.device(), own.data(), Device::host(),
                    w, s);
    check(ncclAllGather(d + w * static_cast<size_t>(rank_), d, w, ncclChar, comm_, stream_),
          "ncclAllGather (allgatherv)");
    wait(stream_, "ncclAllGather (allgatherv)");
    gpu_.copy_bytes(padded.data(), Device::host(), d, gpu_.device(), w * p, s);
  }
  std::vector<char> out;
  for (size_t q = 0; q < p; ++q) {
    const char* at = padded.data() + q * static_cast<size_t>(widest);
    out.insert(out.end(), at, at + all[q]);
  }
  counts = std::move(all);
  record_allgather(bytes);
  return out;
}

void NcclCommunicator::allreduce(void* data, size_t count, size_t element, ncclDataType_t type,
                                 ncclRedOp_t op, const char* call) {
  OnDevice on(gpu_);
  const Stream s{stream_};
  const size_t bytes = count * element;
  char* d = scratch(bytes);
  gpu_.copy_bytes(d, gpu_.device(), data, Device::host(), bytes, s);
  check(ncclAllReduce(d, d, count, type, op, comm_, stream_), call);
  wait(stream_, call);
  gpu_.copy_bytes(data, Device::host(), d, gpu_.device(), bytes, s);
}

void NcclCommunicator::allreduce_sum(int64_t* data, size_t count) {
  require_usable("allreduce_sum");
  allreduce(data, count, sizeof(int64_t), ncclInt64, ncclSum, "ncclAllReduce (sum)");
  record_allreduce(count * sizeof(int64_t));
}

void NcclCommunicator::allreduce_max(double* data, size_t count) {
  require_usable("allreduce_max");
  allreduce(data, count, sizeof(double), ncclFloat64, ncclMax, "ncclAllReduce (max)");
  record_allreduce(count * sizeof(double));
}

void NcclCommunicator::allreduce_min(double* data, size_t count) {
  require_usable("allreduce_min");
  allreduce(data, count, sizeof(double), ncclFloat64, ncclMin, "ncclAllReduce (min)");
  record_allreduce(count * sizeof(double));
}

// ------------------------------------------------------------- exchange ---

std::vector<int64_t> NcclCommunicator::exchange_counts(const std::vector<int64_t>& mine,
                                                       cudaStream_t stream) {
  const auto p = static_cast<size_t>(size_);
  if (counts_.bytes() < 2 * p * sizeof(int64_t))
    counts_ = Buffer(gpu_.allocator(), 2 * p * sizeof(int64_t));
  auto* out = static_cast<int64_t*>(counts_.data());
  int64_t* in = out + p;
  const Stream s{stream};
  gpu_.copy_bytes(out, gpu_.device(), mine.data(), Device::host(), p * sizeof(int64_t), s);
  check(ncclGroupStart(), "ncclGroupStart (exchange counts)");
  for (int q = 0; q < size_; ++q) {
    check(ncclSend(out + q, 1, ncclInt64, q, comm_, stream), "ncclSend (exchange counts)");
    check(ncclRecv(in + q, 1, ncclInt64, q, comm_, stream), "ncclRecv (exchange counts)");
  }
  check(ncclGroupEnd(), "ncclGroupEnd (exchange counts)");
  std::vector<int64_t> theirs(p);
  wait(stream, "exchange counts");
  gpu_.copy_bytes(theirs.data(), Device::host(), in, gpu_.device(), p * sizeof(int64_t), s);
  return theirs;
}

Communicator::ExchangeFailure NcclCommunicator::exchange_bytes(const ExchangeBuffer& send,
                                                               ExchangeBuffer& recv, Stream stream,
                                                               const std::string& failure) {
  require_usable("exchange");
  OnDevice on(gpu_);
  auto cuda_stream = static_cast<cudaStream_t>(stream.handle);
  std::string refused = failure;
  if (refused.empty() && send.device() != gpu_.device())
    refused = "exchange: rank " + std::to_string(rank_) + ": nccl moves " +
              to_string(gpu_.device()) + " memory, send is on " + send.where();
  // -1 from a rank: it failed before data moved.
  std::vector<int64_t> mine(static_cast<size_t>(size_), -1);
  if (refused.empty())
    for (int q = 0; q < size_; ++q) mine[static_cast<size_t>(q)] = send.bytes(q);
  const std::vector<int64_t> theirs = exchange_counts(mine, cuda_stream);
  ExchangeFailure first;
  if (!refused.empty()) first = {rank_, refused};
  for (int q = 0; q < size_; ++q)
    if (theirs[static_cast<size_t>(q)] < 0 && (first.rank < 0 || q < first.rank))
      first = {q, "its exchange failed before data moved (its error is on rank " +
                      std::to_string(q) + ")"};
  if (first.rank >= 0) return first;
  recv.reset(theirs);
  check(ncclGroupStart(), "ncclGroupStart (exchange)");
  for (int q = 0; q < size_; ++q) {
    if (send.bytes(q) > 0)
      check(ncclSend(send.begin(q), static_cast<size_t>(send.bytes(q)), ncclChar, q, comm_,
                     cuda_stream),
            "ncclSend (exchange to rank " + std::to_string(q) + ")");
    if (recv.bytes(q) > 0)
      check(ncclRecv(recv.begin(q), static_cast<size_t>(recv.bytes(q)), ncclChar, q, comm_,
                     cuda_stream),
            "ncclRecv (exchange from rank " + std::to_string(q) + ")");
  }
  check(ncclGroupEnd(), "ncclGroupEnd (exchange)");
  return first;
}

}  // namespace airmoe::comm
