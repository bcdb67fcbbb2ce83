#include "runtime/wire.h"

#include <algorithm>
#include <cmath>

#include "ops/bf16.h"

namespace airmoe::runtime::wire {

DType wire_dtype_from_string(const std::string& name, const std::string& argument) {
  if (name == "f32") return DType::kF32;
  if (name == "bf16") return DType::kBF16;
  throw UsageError(argument + ": unknown wire dtype '" + name + "' (f32 or bf16)");
}

void check_wire_dtype(DType dtype, const std::string& argument) {
  if (dtype != DType::kF32 && dtype != DType::kBF16)
    throw UsageError(argument + ": the wire carries f32 or bf16 vectors, not " + to_string(dtype));
}

void Writer::put_vector(int rank, const float* data, size_t n, DType dtype) {
  if (dtype == DType::kF32) return put(rank, data, n);
  reserve(rank, n * sizeof(uint16_t));
  char* at = buf_.begin(rank) + written_[rank];
  for (size_t i = 0; i < n; ++i) {
    const uint16_t bits = narrow_bf16(data[i]);
    std::memcpy(at + i * sizeof(bits), &bits, sizeof(bits));
  }
  written_[rank] += static_cast<int64_t>(n * sizeof(uint16_t));
}

void Reader::take_vector(float* out, size_t n, DType dtype, const char* what) {
  if (dtype == DType::kF32) return take_n(out, n, what);
  require(n * sizeof(uint16_t), what);
  for (size_t i = 0; i < n; ++i) {
    uint16_t bits;
    std::memcpy(&bits, bytes_.data() + at_ + i * sizeof(bits), sizeof(bits));
    out[i] = widen_bf16(bits);
  }
  at_ += n * sizeof(uint16_t);
}

void Writer::skip(int rank, size_t bytes) {
  reserve(rank, bytes);
  written_[rank] += static_cast<int64_t>(bytes);
}

Writer::Writer(comm::ExchangeBuffer& buf)
    : buf_(buf), written_(static_cast<size_t>(buf.ranks()), 0) {}

void Writer::reserve(int rank, size_t bytes) const {
  if (written_[rank] + static_cast<int64_t>(bytes) > buf_.bytes(rank))
    throw InternalError("wire: the record for rank " + std::to_string(rank) + " overruns its " +
                        std::to_string(buf_.bytes(rank)) + " counted bytes");
}

void Writer::finish() const {
  for (int p = 0; p < buf_.ranks(); ++p)
    if (written_[p] != buf_.bytes(p))
      throw InternalError("wire: " + std::to_string(written_[p]) + " bytes written for rank " +
                          std::to_string(p) + ", " + std::to_string(buf_.bytes(p)) + " counted");
}

void Reader::require(size_t bytes, const char* what) const {
  const size_t left = bytes_.size() - at_;
  if (bytes > left)
    throw InternalError("message from rank " + std::to_string(source_) + " truncated: needs " +
                        std::to_string(bytes) + " bytes for " + what + ", " + std::to_string(left) +
                        " left");
}

void Reader::expect_done(const char* phase) const {
  if (!done())
    throw InternalError("message from rank " + std::to_string(source_) + " has " +
                        std::to_string(bytes_.size() - at_) + " bytes left over after " + phase);
}

std::vector<Reader> readers(const comm::ExchangeBuffer& recv) {
  std::vector<Reader> out;
  out.reserve(static_cast<size_t>(recv.ranks()));
  for (int q = 0; q < recv.ranks(); ++q) out.emplace_back(recv.segment(q), q);
  return out;
}

void expect_all_done(const std::vector<Reader>& readers, const char* phase) {
  for (const Reader& r : readers) r.expect_done(phase);
}

namespace {

void start(Outbox& box, int64_t T) {
  box.target_offsets.assign(static_cast<size_t>(T + 1), 0);
  box.targets.clear();
  box.slot_offsets.assign(1, 0);
  box.slots.clear();
}

// Calls body(rank, token, i) for each (token, target) record i, in token
// order: every call visits each rank's records in the same order.
template <typename Body>
void each_record(const Outbox& box, Body&& body) {
  const auto T = static_cast<int64_t>(box.target_offsets.size()) - 1;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = box.target_offsets[t]; i < box.target_offsets[t + 1]; ++i)
      body(box.targets[i], t, i);
}

// Pass 2 of a builder: lays out box.send from the counted bytes, then writes
// each (token, target) record: its header (token, number of entries) and
// what `body` adds.
template <typename Body>
void write_records(Outbox& box, const std::vector<int64_t>& bytes, Body&& body) {
  box.send.reset(bytes);
  Writer out(box.send);
  each_record(box, [&](int rank, int64_t t, int64_t i) {
    const int32_t header[2] = {static_cast<int32_t>(t),
                               static_cast<int32_t>(box.slot_offsets[i + 1] - box.slot_offsets[i])};
    out.put(rank, header, 2);
    body(out, rank, t, i);
  });
  out.finish();
}

// Pass 2 of the dispatch builder: each rank's sections, one pass over the
// records per section, into box.send as laid out; then vectors(out) writes
// (or leaves room for) the vector blocks.
template <typename Vectors>
void write_dispatch(Outbox& box, const std::vector<int64_t>& records,
                    const std::vector<int64_t>& pairs, const Routes& routes, Vectors&& vectors) {
  Writer out(box.send);
  for (int p = 0; p < box.send.ranks(); ++p)
    if (records[p] > 0) {
      const int32_t header[2] = {static_cast<int32_t>(records[p]), static_cast<int32_t>(pairs[p])};
      out.put(p, header, 2);
    }
  each_record(box, [&](int rank, int64_t t, int64_t) {
    const auto token = static_cast<int32_t>(t);
    out.put(rank, &token, 1);
  });
  each_record(box, [&](int rank, int64_t, int64_t i) {
    const auto n = static_cast<int32_t>(box.slot_offsets[i + 1] - box.slot_offsets[i]);
    out.put(rank, &n, 1);
  });
  each_record(box, [&](int rank, int64_t t, int64_t i) {
    for (int64_t s = box.slot_offsets[i]; s < box.slot_offsets[i + 1]; ++s)
      out.put(rank, routes.experts_of(t) + box.slots[s], 1);
  });
  each_record(box, [&](int rank, int64_t t, int64_t i) {
    for (int64_t s = box.slot_offsets[i]; s < box.slot_offsets[i + 1]; ++s)
      out.put(rank, routes.gates_of(t) + box.slots[s], 1);
  });
  vectors(out);
  out.finish();
}

}  // namespace

RequestTargets::RequestTargets(const Placement& placement, const Routes& routes)
    : placement_(placement),
      routes_(routes),
      codewords_(static_cast<size_t>(placement.ranks())),
      allowed_(routes.contender_offsets.empty() ? 0 : static_cast<size_t>(placement.ranks()), 0) {}

const std::vector<int32_t>& RequestTargets::of(int64_t t) {
  for (int32_t rank : targets_) codewords_[rank].clear();
  targets_.clear();
  const bool pruned = !allowed_.empty();
  if (pruned)
    for (int64_t i = routes_.contender_offsets[t]; i < routes_.contender_offsets[t + 1]; ++i)
      allowed_[placement_.owner(routes_.contenders[i])] = 1;
  for (int64_t p = routes_.probe_offsets[t]; p < routes_.probe_offsets[t + 1]; ++p)
    for (int32_t rank : placement_.list_ranks(routes_.probed_codewords[p])) {
      if (pruned && !allowed_[rank]) continue;
      if (codewords_[rank].empty()) targets_.push_back(rank);
      codewords_[rank].push_back(routes_.probed_codewords[p]);
    }
  if (pruned)
    for (int64_t i = routes_.contender_offsets[t]; i < routes_.contender_offsets[t + 1]; ++i)
      allowed_[placement_.owner(routes_.contenders[i])] = 0;
  std::sort(targets_.begin(), targets_.end());
  return targets_;
}

void scoring_requests(const Placement& placement, const Routes& routes, MatrixView tokens,
                      int ranks, Outbox& box) {
  const int64_t T = tokens.rows, d = tokens.cols;
  start(box, T);
  // Pass 1: per (token, target) record, the probed codewords that rank hosts
  // (its entries), and the bytes per rank.
  std::vector<int64_t> bytes(static_cast<size_t>(ranks), 0);
  RequestTargets targets(placement, routes);
  for (int64_t t = 0; t < T; ++t) {
    for (int32_t rank : targets.of(t)) {
      const std::span<const int32_t> codewords = targets.codewords(rank);
      box.targets.push_back(rank);
      box.slots.insert(box.slots.end(), codewords.begin(), codewords.end());
      box.slot_offsets.push_back(static_cast<int64_t>(box.slots.size()));
      bytes[rank] += request_record_bytes(static_cast<int64_t>(codewords.size()), d);
    }
    box.target_offsets[t + 1] = static_cast<int64_t>(box.targets.size());
  }
  write_records(box, bytes, [&](Writer& out, int rank, int64_t t, int64_t i) {
    const int64_t n = box.slot_offsets[i + 1] - box.slot_offsets[i];
    out.put(rank, box.slots.data() + box.slot_offsets[i], static_cast<size_t>(n));
    out.put(rank, tokens.row(t), static_cast<size_t>(d));
  });
}

namespace {

// Pass 1 of the dispatch builder: per (token, target) record, the token's
// slots that rank serves (by rank, then slot: prefix sums over a sorted
// list, no atomics); box.send laid out from the records and pairs per rank;
// then pass 2, vectors(out) writing each segment's vector block.
template <typename Vectors>
void build_dispatch(const Placement& placement, const Routes& routes, int64_t d, bool ship_vectors,
                    DType vector_dtype, int ranks, Outbox& box, Vectors&& vectors) {
  const int64_t T = routes.tokens;
  const int k = routes.k;
  start(box, T);
  std::vector<int64_t> records(static_cast<size_t>(ranks), 0), pairs(records);
  std::vector<std::pair<int32_t, int32_t>> owner_slot(static_cast<size_t>(k));
  for (int64_t t = 0; t < T; ++t) {
    const int32_t* e = routes.experts_of(t);
    for (int j = 0; j < k; ++j) owner_slot[j] = {placement.owner(e[j]), j};
    std::sort(owner_slot.begin(), owner_slot.end());
    for (int j = 0; j < k;) {
      const int32_t rank = owner_slot[j].first;
      int n = 0;
      for (; j + n < k && owner_slot[j + n].first == rank; ++n)
        box.slots.push_back(owner_slot[j + n].second);
      box.targets.push_back(rank);
      box.slot_offsets.push_back(static_cast<int64_t>(box.slots.size()));
      ++records[rank];
      pairs[rank] += n;
      j += n;
    }
    box.target_offsets[t + 1] = static_cast<int64_t>(box.targets.size());
  }
  std::vector<int64_t> bytes(static_cast<size_t>(ranks));
  for (int p = 0; p < ranks; ++p)
    bytes[p] = dispatch_message_bytes(records[p], pairs[p], d, ship_vectors, vector_dtype);
  box.send.reset(bytes);
  write_dispatch(box, records, pairs, routes, [&](Writer& out) { vectors(out, records); });
}

}  // namespace

void expert_dispatch(const Placement& placement, const Routes& routes, MatrixView tokens,
                     bool ship_vectors, DType vector_dtype, int ranks, Outbox& box) {
  build_dispatch(placement, routes, tokens.cols, ship_vectors, vector_dtype, ranks, box,
                 [&](Writer& out, const std::vector<int64_t>&) {
                   if (ship_vectors)
                     each_record(box, [&](int rank, int64_t t, int64_t) {
                       out.put_vector(rank, tokens.row(t), static_cast<size_t>(tokens.cols),
                                      vector_dtype);
                     });
                 });
}

void expert_dispatch_sections(const Placement& placement, const Routes& routes, int64_t d,
                              bool ship_vectors, DType vector_dtype, int ranks, Outbox& box) {
  build_dispatch(placement, routes, d, ship_vectors, vector_dtype, ranks, box,
                 [&](Writer& out, const std::vector<int64_t>& records) {
                   if (ship_vectors)
                     for (int p = 0; p < ranks; ++p)
                       out.skip(p, static_cast<size_t>(records[p] * vector_bytes(d, vector_dtype)));
                 });
}

int64_t dispatch_sections_bytes(const int32_t header[2], int64_t length, int source, int64_t d,
                                bool ship_vectors, DType vector_dtype) {
  const int32_t records = header[0], pairs = header[1];
  auto refuse = [&](const std::string& what) {
    throw InternalError("dispatch message from rank " + std::to_string(source) + " " + what);
  };
  if (records <= 0 || pairs < 0)
    refuse("announces " + std::to_string(records) + " records and " + std::to_string(pairs) +
           " pairs");
  // Before anything is sized from the header: the message is as long as it says.
  const int64_t expected = dispatch_message_bytes(records, pairs, d, ship_vectors, vector_dtype);
  if (expected != length)
    refuse("has " + std::to_string(length) + " bytes; its header (" + std::to_string(records) +
           " records, " + std::to_string(pairs) + " pairs) says " + std::to_string(expected));
  return dispatch_message_bytes(records, pairs, d, false, vector_dtype);
}

WireOrder wire_order(std::span<const int32_t> dest, int ranks) {
  WireOrder w;
  w.offsets.assign(static_cast<size_t>(ranks) + 1, 0);
  for (const int32_t p : dest) ++w.offsets[p + 1];
  for (int p = 0; p < ranks; ++p) w.offsets[p + 1] += w.offsets[p];
  std::vector<int64_t> next(w.offsets.begin(), w.offsets.end() - 1);
  w.item.resize(dest.size());
  w.position.resize(dest.size());
  for (size_t i = 0; i < dest.size(); ++i) {
    const int64_t at = next[dest[i]]++;
    w.item[at] = static_cast<int32_t>(i);
    w.position[i] = static_cast<int32_t>(at);
  }
  return w;
}

DispatchMessage read_dispatch(Reader& in, int64_t d, bool ship_vectors, DType vector_dtype) {
  DispatchMessage m;
  if (in.done()) return m;  // nothing served: no message
  auto refuse = [&](const std::string& what) {
    throw InternalError("dispatch message from rank " + std::to_string(in.source()) + " " + what);
  };
  const auto length = static_cast<int64_t>(in.left());
  int32_t header[2];
  in.take_n(header, 2, "dispatch header");
  dispatch_sections_bytes(header, length, in.source(), d, ship_vectors, vector_dtype);
  const int32_t records = header[0], pairs = header[1];
  m.tokens.resize(static_cast<size_t>(records));
  in.take_n(m.tokens.data(), m.tokens.size(), "dispatch token indices");
  std::vector<int32_t> counts(static_cast<size_t>(records));
  in.take_n(counts.data(), counts.size(), "dispatch pair counts");
  for (const int32_t n : counts) {
    if (n < 0 || m.pair_offsets.back() + n > pairs) break;
    m.pair_offsets.push_back(m.pair_offsets.back() + n);
  }
  if (m.records() + 1 != static_cast<int64_t>(m.pair_offsets.size()) ||
      m.pair_offsets.back() != pairs)
    refuse("has pair counts that do not add up to its " + std::to_string(pairs) + " pairs");
  m.experts.resize(static_cast<size_t>(pairs));
  in.take_n(m.experts.data(), m.experts.size(), "dispatch expert ids");
  m.gates.resize(static_cast<size_t>(pairs));
  in.take_n(m.gates.data(), m.gates.size(), "dispatch gates");
  if (ship_vectors) {
    m.vectors.resize(static_cast<size_t>(records * d));
    in.take_vector(m.vectors.data(), m.vectors.size(), vector_dtype, "dispatched token vectors");
  }
  in.expect_done("dispatch");
  return m;
}

Outbox scoring_requests(const Placement& placement, const Routes& routes, MatrixView tokens,
                        int ranks) {
  Outbox box;
  scoring_requests(placement, routes, tokens, ranks, box);
  return box;
}

Outbox expert_dispatch(const Placement& placement, const Routes& routes, MatrixView tokens,
                       bool ship_vectors, DType vector_dtype, int ranks) {
  Outbox box;
  expert_dispatch(placement, routes, tokens, ship_vectors, vector_dtype, ranks, box);
  return box;
}

std::vector<char> key_records(const QuantizedKeys& keys, const std::vector<int32_t>& ids) {
  const int64_t record = key_record_bytes(keys.dim, keys.bits);
  const auto codes = static_cast<size_t>(keys.dim * keys.code_bytes());
  std::vector<char> out(static_cast<size_t>(keys.rows() * record));
  for (int64_t i = 0; i < keys.rows(); ++i) {
    char* at = out.data() + i * record;
    const float fields[4] = {keys.scale[i], keys.error[i], keys.error_max[i], keys.norm[i]};
    std::memcpy(at, &ids[i], 4);
    std::memcpy(at + 4, fields, sizeof(fields));
    std::memcpy(at + 20, keys.codes_of(i), codes);
  }
  return out;
}

QuantizedKeys read_key_records(std::span<const char> records, int64_t experts, int64_t d,
                               int bits) {
  const int64_t record = key_record_bytes(d, bits);
  if (static_cast<int64_t>(records.size()) != experts * record)
    throw InternalError("request keys: gathered " + std::to_string(records.size()) +
                        " bytes, expected E = " + std::to_string(experts) + " records of " +
                        std::to_string(record));
  QuantizedKeys keys(bits, d, experts);
  const auto codes = static_cast<size_t>(d * keys.code_bytes());
  std::vector<char> seen(static_cast<size_t>(experts), 0);
  for (int64_t i = 0; i < experts; ++i) {
    const char* at = records.data() + i * record;
    int32_t e = 0;
    std::memcpy(&e, at, 4);
    if (e < 0 || e >= experts || seen[e]++)
      throw InternalError("request keys: expert " + std::to_string(e) +
                          " out of range or gathered twice");
    float fields[4];
    std::memcpy(fields, at + 4, sizeof(fields));
    for (float f : fields)
      if (!(f >= 0.0f) || !std::isfinite(f))  // a NaN would silently drop experts
        throw InternalError("request keys: expert " + std::to_string(e) +
                            " has a scale, error or norm of " + std::to_string(f));
    keys.scale[e] = fields[0];
    keys.error[e] = fields[1];
    keys.error_max[e] = fields[2];
    keys.norm[e] = fields[3];
    std::memcpy(keys.codes_of(e), at + 20, codes);
    const int32_t levels = (1 << (bits - 1)) - 1;
    for (int64_t i = 0; i < d; ++i)
      if (std::abs(keys.code(e, i)) > levels)
        throw InternalError("request keys: expert " + std::to_string(e) + " has code " +
                            std::to_string(keys.code(e, i)) + " beyond " + std::to_string(bits) +
                            " bits");
  }
  return keys;
}

}  // namespace airmoe::runtime::wire
