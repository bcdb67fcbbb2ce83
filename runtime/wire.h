// What each phase of distributed routing and of the MoE layer puts on the
// wire: the builders of the send buffers (written straight into a
// comm::ExchangeBuffer: the bytes per rank are counted first, then filled),
// the bounds-checked reader of what came back, and the sizes of the
// messages. The runtime sends exactly these; the traffic simulator counts
// exactly these, so the two cannot drift apart.
//
// Token vectors (dispatched tokens, combined partial outputs and their
// gradients) travel in the layer's wire dtype: f32, or bf16, rounded to
// nearest even when sent (ops/bf16.h) and widened exactly on receipt, so the
// math on either side stays f32. Scoring requests keep f32 vectors: routing
// is exact whatever the wire dtype. The layer's vectors live in its
// compute's memory: it lays them out in WireOrder and packs them there with
// the ops (gather_rows rounds as put_vector does); the records around them
// are built here, on the host.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "comm/exchange_buffer.h"
#include "core/errors.h"
#include "core/matrix.h"
#include "core/tensor.h"
#include "router/request_keys.h"
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

// The wire dtype by name ("f32" or "bf16"); anything else is a UsageError
// naming `argument`.
DType wire_dtype_from_string(const std::string& name, const std::string& argument = "wire_dtype");
// Refuses (UsageError naming `argument`) a dtype the wire does not carry.
void check_wire_dtype(DType dtype, const std::string& argument = "wire_dtype");

// One token vector of d elements (combine, grad dispatch / combine, and
// dense-replicated dispatch).
inline int64_t vector_bytes(int64_t d, DType dtype) {
  return d * static_cast<int64_t>(dtype_size(dtype));
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
  // n floats as `dtype` (f32 or bf16) elements.
  void put_vector(int rank, const float* data, size_t n, DType dtype);
  // Leaves `bytes` bytes of rank's segment for someone else to fill (the
  // layer's vector blocks, packed on the compute's device).
  void skip(int rank, size_t bytes);
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
  // n `dtype` (f32 or bf16) elements, widened to floats.
  void take_vector(float* out, size_t n, DType dtype, const char* what);
  bool done() const { return at_ == bytes_.size(); }
  size_t left() const { return bytes_.size() - at_; }
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

// Where each token's scoring requests go: the ranks hosting a segment of a
// probed list, ascending, each with the probed codewords it hosts (probe
// order); with the routes' contenders, only the ranks owning one of them
// (the others hold no expert that can be in the token's top-k). The runtime's
// builder and the simulator's count both read it.
class RequestTargets {
 public:
  RequestTargets(const Placement& placement, const Routes& routes);
  // Token t's target ranks (valid until the next call).
  const std::vector<int32_t>& of(int64_t t);
  std::span<const int32_t> codewords(int32_t rank) const { return codewords_[rank]; }

 private:
  const Placement& placement_;
  const Routes& routes_;
  std::vector<std::vector<int32_t>> codewords_;  // per rank, this token's
  std::vector<char> allowed_;                    // per rank: owns a contender
  std::vector<int32_t> targets_;
};

// Scoring requests: to each of a token's RequestTargets, (token, n, the n
// probed codewords it hosts, d floats). Fills `box`, reusing its buffer's
// storage.
void scoring_requests(const Placement& placement, const Routes& routes, MatrixView tokens,
                      int ranks, Outbox& box);

// Expert dispatch: to each rank hosting a chosen expert, one record per
// token it serves, the records' fields in sections (so that each section is
// one contiguous array, and the vectors one [records, d] block):
//   header   records R, pairs N                 2 x int32
//   tokens   each record's token index          R x int32
//   counts   each record's pair count (sum N)   R x int32
//   experts  the pairs' global expert ids       N x int32
//   gates    the pairs' gates                   N x f32
//   vectors  when they travel (dense-replicated) R x d x vector_dtype (f32, bf16)
// Pairs are in record order, each record's in slot order. A rank served
// nothing gets no message (no header either).
void expert_dispatch(const Placement& placement, const Routes& routes, MatrixView tokens,
                     bool ship_vectors, DType vector_dtype, int ranks, Outbox& box);
// The same message without the vectors' values: the sections are written and
// each segment ends in room for its vector block (when they travel), which
// the caller fills (the layer, from the compute's memory, in the wire order
// of box.targets).
void expert_dispatch_sections(const Placement& placement, const Routes& routes, int64_t d,
                              bool ship_vectors, DType vector_dtype, int ranks, Outbox& box);

// One source rank's dispatch message, read and checked (the counts add up to
// the header's pairs, the message has exactly the bytes its header says):
// record r has counts[r] pairs from pair_offsets[r]; its vector, when they
// travel, is vectors[r * d ..] (widened to f32).
struct DispatchMessage {
  std::vector<int32_t> tokens;
  std::vector<int64_t> pair_offsets{0};  // [R + 1]
  std::vector<int32_t> experts;
  std::vector<float> gates;
  std::vector<float> vectors;
  int64_t records() const { return static_cast<int64_t>(tokens.size()); }
};
DispatchMessage read_dispatch(Reader& in, int64_t d, bool ship_vectors, DType vector_dtype);
// The bytes of a message's sections (all but its vector block), from its
// header (records, pairs), once the header agrees with the message's
// `length` in bytes (else the InternalError read_dispatch raises, naming
// `source`): what a reader of a message in device memory copies to the host.
int64_t dispatch_sections_bytes(const int32_t header[2], int64_t length, int source, int64_t d,
                                bool ship_vectors, DType vector_dtype);

// The same, returned (for the simulator, which only counts).
Outbox scoring_requests(const Placement& placement, const Routes& routes, MatrixView tokens,
                        int ranks);
Outbox expert_dispatch(const Placement& placement, const Routes& routes, MatrixView tokens,
                       bool ship_vectors, DType vector_dtype, int ranks);

// Item i sends bytes(i) bytes, written by write(out, rank, i), to rank
// dest[i]; each rank's segment holds its items in item order. Counts the
// bytes per rank, lays out `send`, then fills it.
template <typename Bytes, typename Write>
void items(std::span<const int32_t> dest, int ranks, Bytes&& bytes, Write&& write,
           comm::ExchangeBuffer& send) {
  std::vector<int64_t> per_rank(static_cast<size_t>(ranks), 0);
  for (size_t i = 0; i < dest.size(); ++i) per_rank[dest[i]] += bytes(i);
  send.reset(per_rank);
  Writer out(send);
  for (size_t i = 0; i < dest.size(); ++i) write(out, dest[i], i);
  out.finish();
}

// Fixed-size records: item i sends record(i) (a span of T) to rank dest[i].
template <typename Record>
void records(std::span<const int32_t> dest, int ranks, Record&& record,
             comm::ExchangeBuffer& send) {
  items(
      dest, ranks, [&](size_t i) { return static_cast<int64_t>(record(i).size_bytes()); },
      [&](Writer& out, int rank, size_t i) {
        const auto r = record(i);
        out.put(rank, r.data(), r.size());
      },
      send);
}

// Items sent to ranks dest[i] (token vectors: combine, grad_dispatch,
// grad_combine, dispatch's vector blocks), in the order the wire carries
// them: grouped by destination rank, in item order within a rank. The layer
// packs its vectors into this order with the ops' gather_rows.
struct WireOrder {
  std::vector<int64_t> offsets;   // [ranks + 1]: rank p's items at positions offsets[p] ..
  std::vector<int32_t> item;      // the item at each wire position
  std::vector<int32_t> position;  // the wire position of each item (the inverse)
  int64_t count(int rank) const { return offsets[rank + 1] - offsets[rank]; }
};
WireOrder wire_order(std::span<const int32_t> dest, int ranks);

// Request keys (router/request_keys.h), gathered by every rank: one record
// per expert, its id (int32), scale, error, largest error and norm (4 x f32)
// and its d codes (1 byte each up to 8 bits, 2 above). `ids`: the experts
// of the rows of `keys`.
inline int64_t key_record_bytes(int64_t d, int bits) {
  return 20 + d * (bits <= 8 ? 1 : 2);
}
std::vector<char> key_records(const QuantizedKeys& keys, const std::vector<int32_t>& ids);
// All E experts' keys from the gathered records: each expert exactly once,
// scale, errors and norm finite and >= 0, codes within the bits (else an
// InternalError: a peer's bug or corruption).
QuantizedKeys read_key_records(std::span<const char> records, int64_t experts, int64_t d, int bits);

// The size of one record the builders above write (the simulator counts
// these without building the buffers; a test holds them equal): a request
// for `codewords` probed codewords.
inline int64_t request_record_bytes(int64_t codewords, int64_t d) {
  return 4 * (2 + codewords + d);
}
// A dispatch message of `records` records holding `pairs` pairs (none: no
// message).
inline int64_t dispatch_message_bytes(int64_t records, int64_t pairs, int64_t d, bool ship_vectors,
                                      DType vector_dtype) {
  if (records == 0) return 0;
  return 4 * (2 + 2 * records + 2 * pairs) +
         (ship_vectors ? records * vector_bytes(d, vector_dtype) : 0);
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
inline int64_t per_pair_bytes(int64_t pairs) {
  return 4 * pairs;
}  // grad gates, grad logits

}  // namespace airmoe::runtime::wire
