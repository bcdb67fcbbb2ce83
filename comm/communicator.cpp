#include "comm/communicator.h"

#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>

#include "core/errors.h"
#include "core/hash.h"

namespace airmoe::comm {

void Communicator::record_broadcast(int root, size_t bytes) {
  if (rank() != root) return;
  for (int p = 0; p < size(); ++p)
    if (p != root) meter_.record(phase_, p, static_cast<int64_t>(bytes));
}

void Communicator::record_allgather(size_t bytes) {
  for (int p = 0; p < size(); ++p)
    if (p != rank()) meter_.record(phase_, p, static_cast<int64_t>(bytes));
}

void Communicator::record_allreduce(size_t bytes) {
  const int p = size();
  if (p <= 1) return;
  // Ring reduce-scatter then ring allgather: P - 1 steps each, every step
  // sends one chunk of ceil(bytes / P) to the next rank.
  const int64_t chunk = static_cast<int64_t>((bytes + static_cast<size_t>(p) - 1) / p);
  const int next = (rank() + 1) % p;
  for (int step = 0; step < 2 * (p - 1); ++step) meter_.record(phase_, next, chunk);
}

void Communicator::record_control(ExchangeKind kind) {
  const std::string control_phase = phase_ + control_suffix(kind);
  for_each_control_message(kind, rank(), size(), [&](int peer, int64_t bytes) {
    meter_.record(control_phase, peer, bytes);
  });
}

void Communicator::record_exchange(const ExchangeBuffer& send) {
  record_control(exchange_kind());
  for (int p = 0; p < size(); ++p)
    if (is_payload_message(rank(), p, send.bytes(p))) meter_.record(phase_, p, send.bytes(p));
}

void Communicator::check_exchange_buffers(const ExchangeBuffer& send,
                                          const ExchangeBuffer& recv) const {
  const std::string where = "exchange: rank " + std::to_string(rank()) + ": ";
  if (send.ranks() != size())
    throw UsageError(where + "send has " + std::to_string(send.ranks()) + " segments for " +
                     std::to_string(size()) + " ranks");
  // recv is reset before send is read out.
  if (&send == &recv) throw UsageError(where + "send and recv are the same buffer");
  if (send.ops() != recv.ops())
    throw UsageError(where + "send is on " + send.where() + " but recv on " + recv.where() +
                     " (both must live in the same memory)");
}

void Communicator::exchange(const ExchangeBuffer& send, ExchangeBuffer& recv, Stream stream) {
  std::exception_ptr own_failure;
  std::string failure;
  try {
    check_exchange_buffers(send, recv);
  } catch (const std::exception& e) {
    own_failure = std::current_exception();
    failure = e.what();
  }
  const bool staged = !own_failure && send.ops() != nullptr && !moves_device_buffers();
  const ExchangeFailure peer = staged ? exchange_staged(send, recv, stream, own_failure)
                                      : exchange_bytes(send, recv, stream, failure);
  if (own_failure) std::rethrow_exception(own_failure);
  if (peer.rank == rank()) throw UsageError(peer.message);  // found by the backend
  if (peer.rank >= 0)
    throw PeerError("exchange: rank " + std::to_string(rank()) + ": aborted because rank " +
                        std::to_string(peer.rank) + " failed: " + peer.message,
                    peer.rank);
  record_exchange(send);
}

// Device -> host staging -> the host exchange -> device. A failed copy
// before the exchange (an allocation, a device error) goes through the
// exchange as this rank's failure; one after it fails this rank only (the
// others already have their data).
Communicator::ExchangeFailure Communicator::exchange_staged(const ExchangeBuffer& send,
                                                            ExchangeBuffer& recv, Stream stream,
                                                            std::exception_ptr& own_failure) {
  const Ops& ops = *send.ops();
  std::string failure;
  try {
    if (staged_for_ != &ops) {
      staged_send_ = ExchangeBuffer::staging_for(ops);
      staged_recv_ = ExchangeBuffer::staging_for(ops);
      staged_for_ = &ops;
    }
    std::vector<int64_t> bytes(static_cast<size_t>(size()));
    for (int p = 0; p < size(); ++p) bytes[static_cast<size_t>(p)] = send.bytes(p);
    staged_send_.reset(bytes);
    copy_exchange_bytes(staged_send_, staged_send_.data(), send, send.data(), send.total_bytes(),
                        stream);  // to the host: ready on return
  } catch (const std::exception& e) {
    own_failure = std::current_exception();
    failure =
        "exchange: rank " + std::to_string(rank()) + ": staging to host memory failed: " + e.what();
  }
  const ExchangeFailure peer = exchange_bytes(staged_send_, staged_recv_, stream, failure);
  if (own_failure || peer.rank >= 0) return peer;
  std::vector<int64_t> bytes(static_cast<size_t>(size()));
  for (int p = 0; p < size(); ++p) bytes[static_cast<size_t>(p)] = staged_recv_.bytes(p);
  recv.reset(bytes);
  copy_exchange_bytes(recv, recv.data(), staged_recv_, staged_recv_.data(),
                      staged_recv_.total_bytes(), stream);
  // The next call refills staged_recv_: this copy must have read it.
  ops.synchronize(stream);
  return peer;
}

bool Communicator::overlaps(const void* a, size_t na, const void* b, size_t nb) {
  if (na == 0 || nb == 0) return false;
  const auto pa = reinterpret_cast<uintptr_t>(a);
  const auto pb = reinterpret_cast<uintptr_t>(b);
  return pa < pb + nb && pb < pa + na;
}

void require_same_config(Communicator& comm, const std::string& config, const char* what) {
  const int p = comm.size();
  const uint64_t mine = fnv1a64(config);
  std::vector<uint64_t> all(static_cast<size_t>(p));
  comm.allgather(&mine, sizeof(mine), all.data());
  std::vector<int> differ;
  for (int r = 1; r < p; ++r)
    if (all[static_cast<size_t>(r)] != all[0]) differ.push_back(r);
  if (differ.empty()) return;
  std::string msg = "configuration mismatch (";
  msg += what ? what : "config";
  msg += differ.size() == 1 ? "): rank " : "): ranks ";
  for (size_t i = 0; i < differ.size(); ++i) {
    if (i) msg += ", ";
    msg += std::to_string(differ[i]);
  }
  msg += differ.size() == 1 ? " differs" : " differ";
  msg += " from rank 0";
  throw ConfigMismatchError(msg);
}

void raise_together(Communicator& comm, const std::string& local_error, const char* what) {
  PhaseScope phase(comm, "checks");
  std::vector<int64_t> counts;
  const std::vector<char> all = comm.allgatherv(local_error.data(), local_error.size(), counts);
  int64_t at = 0;
  for (int r = 0; r < comm.size(); ++r) {
    if (counts[r] > 0) {
      const std::string message = std::string(what) + ": rank " + std::to_string(r) + ": " +
                                  std::string(all.data() + at, static_cast<size_t>(counts[r]));
      if (!local_error.empty()) throw JointUsageError(message);
      throw PeerError(message, r);
    }
    at += counts[r];
  }
}

}  // namespace airmoe::comm
