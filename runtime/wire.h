// What each phase of distributed routing and of the MoE layer puts on the
// wire: the builders of the send buffers (written straight into a
// comm::ExchangeBuffer: the bytes per rank are counted first, then filled),
// the bounds-checked reader of what came back, and the sizes of the fixed
// records. The runtime sends exactly these; the traffic simulator counts
// exactly these, so the two cannot drift apart.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "comm/exchange_buffer.h"
#include "core/errors.h"
#include "core/matrix.h"
#include "router/routes.h"
#include "runtime/placement.h"

namespace airmoe::runtime::wire {

// Appends n values to a growing buffer (the checkpoint files).
template <typename T>
void put(std::vector<char>& buf, const T* data, size_t n) {
  const size_t at = buf.size();
  buf.resize(at + n * sizeof(T));
  if (n) std::memcpy(buf.data() + at, data, n * sizeof(T));
}

// Fills an ExchangeBuffer whose segment sizes were counted beforehand: one
// write cursor per destination rank. Writing past a segment, or leaving one
// short, is a counting bug: InternalError.
class Writer {
 public:
  explicit Writer(comm::ExchangeBuffer& buf);
  template <typename T>
  void put(int rank, const T* data, size_t n) {
    const size_t bytes = n * sizeof(T);
    reserve(rank, bytes);
    if (bytes) std::memcpy(buf_.begin(rank) + written_[rank], data, bytes);
    written_[rank] += static_cast<int64_t>(bytes);
  }
  // Every segment exactly full.
  void finish() const;

 private:
  void reserve(int rank, size_t bytes) const;
  comm::ExchangeBuffer& buf_;
  std::vector<int64_t> written_;
};

// Reads the bytes one source rank sent, bounds checked: a message shorter
// than its records say (a peer's bug, or corruption) is an InternalError
// naming the source rank and what was being read, never a read past the end.
class Reader {
 public:
  Reader(std::span<const char> bytes, int source) : bytes_(bytes), source_(source) {}
  template <typename T>
  T take(const char* what) {
    T v;
    take_n(&v, 1, what);
    return v;
  }
  template <typename T>
  void take_n(T* out, size_t n, const char* what) {
    const size_t bytes = n * sizeof(T);
    require(bytes, what);
    if (bytes) std::memcpy(out, bytes_.data() + at_, bytes);
    at_ += bytes;
  }
  bool done() const { return at_ == bytes_.size(); }
  int source() const { return source_; }
  // Nothing may be left once every record was read.
  void expect_done(const char* phase) const;

 private:
  void require(size_t bytes, const char* what) const;
  std::span<const char> bytes_;
  int source_;
  size_t at_ = 0;
};

// One Reader per source rank over a received exchange.
std::vector<Reader> readers(const comm::ExchangeBuffer& recv);
void expect_all_done(const std::vector<Reader>& readers, const char* phase);

// Reads every (token, n, ...) record of a received exchange, in order of
// source rank: the header, then body(reader, token, n) reads the rest.
template <typename Body>
void read_records(const comm::ExchangeBuffer& recv, Body&& body) {
  for (Reader& in : readers(recv))
    while (!in.done()) {
      const auto token = in.take<int32_t>("record token index");
      const auto n = in.take<int32_t>("record entry count");
      if (n < 0)
        throw InternalError("message from rank " + std::to_string(in.source()) +
                            " has a record of " + std::to_string(n) + " entries");
      body(in, token, n);
    }
}

// Per (token, target rank) records of a batch, and where each token's went.
struct Outbox {
  comm::ExchangeBuffer send;            // segment p goes to rank p
  std::vector<int64_t> target_offsets;  // [T + 1]
  std::vector<int32_t> targets;         // ascending per token
  // Per (token, target) record, its entries: the probed codewords that rank
  // hosts (scoring requests), or the token's slots it serves (dispatch).
  std::vector<int64_t> slot_offsets{0};
  std::vector<int32_t> slots;
};

// Scoring requests: to each rank hosting a segment of a probed list,
// (token, n, n probed codewords it hosts, d floats). Fills `box`, reusing
// its buffer's storage.
void scoring_requests(const Placement& placement, const std::vector<int64_t>& probe_offsets,
                      const std::vector<int32_t>& probed_codewords, MatrixView tokens, int ranks,
                      Outbox& box);

// Expert dispatch: to each rank hosting a chosen expert, (token, n,
// n x (expert id, gate)) and, when the vectors travel (dense-replicated),
// the d floats.
void expert_dispatch(const Placement& placement, const Routes& routes, MatrixView tokens,
                     bool ship_vectors, int ranks, Outbox& box);

// The same, returned (for the simulator, which only counts).
Outbox scoring_requests(const Placement& placement, const std::vector<int64_t>& probe_offsets,
                        const std::vector<int32_t>& probed_codewords, MatrixView tokens, int ranks);
Outbox expert_dispatch(const Placement& placement, const Routes& routes, MatrixView tokens,
                       bool ship_vectors, int ranks);

// Fixed-size records: item i sends record(i) (a span of T) to rank dest[i];
// each rank's segment holds its items' records in item order. Counts the
// bytes per rank, lays out `send`, then fills it.
template <typename Record>
void records(std::span<const int32_t> dest, int ranks, Record&& record,
             comm::ExchangeBuffer& send) {
  std::vector<int64_t> bytes(static_cast<size_t>(ranks), 0);
  for (size_t i = 0; i < dest.size(); ++i)
    bytes[dest[i]] += static_cast<int64_t>(record(i).size_bytes());
  send.reset(bytes);
  Writer out(send);
  for (size_t i = 0; i < dest.size(); ++i) {
    const auto r = record(i);
    out.put(dest[i], r.data(), r.size());
  }
  out.finish();
}

// The size of one record the builders above write (the simulator counts
// these without building the buffers; a test holds them equal): a request
// for `codewords` probed codewords, a dispatch of `experts` chosen experts.
inline int64_t request_record_bytes(int64_t codewords, int64_t d) {
  return 4 * (2 + codewords + d);
}
inline int64_t dispatch_record_bytes(int64_t experts, int64_t d, bool ship_vectors) {
  return 4 * (2 + 2 * experts) + (ship_vectors ? 4 * d : 0);
}

// A migrating expert: its id, W1 [w1_rows, d] (w1_rows = h, or 2h for
// SwiGLU), W2 [d, h] and its center [d].
inline int64_t migrant_record_bytes(int64_t w1_rows, int64_t h, int64_t d) {
  return 4 * (1 + w1_rows * d + d * h + d);
}

// Records flowing back per (token, target) record, and the backward's.
inline int64_t reply_bytes(int k) {
  return 8 * static_cast<int64_t>(k);
}  // k (id, logit)
inline int64_t vector_bytes(int64_t d) {
  return 4 * d;
}  // combine, grad dispatch / combine
inline int64_t per_pair_bytes(int64_t pairs) {
  return 4 * pairs;
}  // grad gates, grad logits

}  // namespace airmoe::runtime::wire
