#include "runtime/moe_layer.h"

#include <algorithm>
#include <cstring>
#include <span>
#include <unordered_map>

#include "core/checks.h"
#include "core/clock.h"
#include "core/errors.h"

namespace airmoe::runtime {
namespace {

// Key of a received token: (home rank, token index on its home).
int64_t home_key(int32_t home, int32_t token) {
  return (static_cast<int64_t>(home) << 32) | static_cast<uint32_t>(token);
}

}  // namespace

MoELayer::MoELayer(comm::Communicator& comm, Strategy strategy, MoEConfig config, Codebook codebook,
                   std::vector<int32_t> assignment, Placement placement, MatrixView centers,
                   uint64_t expert_seed, Compute compute)
    : comm_(comm),
      config_(config),
      compute_send_(comm::ExchangeBuffer::for_compute(*compute.ops)),
      compute_recv_(comm::ExchangeBuffer::for_compute(*compute.ops)) {
  comm::check_together(comm_, "MoE layer set-up", [&] {
    if (centers.rows != placement.experts())
      fail("centers have " + std::to_string(centers.rows) + " rows for " +
           std::to_string(placement.experts()) + " experts");
    require_cols(centers, codebook.dim(), "centers");
    if (config_.expert.dim != codebook.dim())
      fail("expert dim " + std::to_string(config_.expert.dim) +
           " differs from d = " + std::to_string(codebook.dim()));
    require_in_range(config_.k, 1, placement.experts(), "k");
    require_in_range(config_.probes, 1, codebook.size(), "probes m");
    wire::check_wire_dtype(config_.wire_dtype);
    if (config_.request_key_bits != 0)
      check_request_key_bits(config_.request_key_bits, "request_key_bits");
    experts_ = ExpertShard::random(config_.expert, placement.local_experts(comm.rank()),
                                   expert_seed, compute);
  });
  {
    // Same strategy, shapes, expert configuration and wire dtype everywhere,
    // or nobody dispatches (a rank with another h or wire dtype would misread
    // every message).
    comm::PhaseScope phase(comm_, "checks");
    comm::require_same_config(
        comm_,
        std::string(to_string(strategy)) + " k=" + std::to_string(config_.k) +
            " m=" + std::to_string(config_.probes) + " d=" + std::to_string(config_.expert.dim) +
            " h=" + std::to_string(config_.expert.hidden) + " act=" +
            to_string(config_.expert.activation) + " wire_dtype=" + to_string(config_.wire_dtype) +
            " request_key_bits=" + std::to_string(config_.request_key_bits) + " seed=" +
            std::to_string(expert_seed) + " placement=" + std::to_string(placement.digest()),
        "MoE layer configuration");
  }
  routing_ = make_layer_routing(comm_, strategy, config_.probes, std::move(codebook),
                                std::move(assignment), std::move(placement), centers,
                                config_.request_key_bits);
}

// ---------------------------------------------------------- the handle --

// The step's state: what the forward decided and computed, which its
// backward reuses: the layout on the host, the vectors in the compute's
// memory. Counts come from prefix sums, no atomics.
struct DispatchHandle::State {
  Strategy strategy = Strategy::kAir;
  uint64_t placement_digest = 0;
  Routes routes;  // this rank's tokens
  // Home side: for token t, targets[target_offsets[t] ..] (ascending ranks);
  // each target's slots (indices into the token's k), in slot order.
  std::vector<int64_t> target_offsets;
  std::vector<int32_t> targets;
  std::vector<int64_t> slot_offsets;  // per (token, target)
  std::vector<int32_t> slots;
  std::vector<int32_t> record_token;  // the token of each (token, target) record
  wire::WireOrder record_order;       // the records on the wire (dispatch, grad_dispatch)
  // Serving side: one input row per (home rank, token) served, in order of
  // home rank then the home's token order; its pairs in slot order.
  std::vector<int32_t> input_home;   // home rank of each input row
  std::vector<int64_t> input_pairs;  // CSR: input row -> its pairs
  ExpertPairs pairs;                 // token = input row
  wire::WireOrder input_order;       // the input rows on the wire (combine, grad_combine)
  std::vector<float> pair_d_gate;    // filled by backward
  // The compute's memory.
  Tensor inputs;  // f32 [input rows, d]
  DeviceExpertPairs device_pairs;
  DeviceExpertCache cache;
  Tensor pair_dx;   // per input row, f32 (backward)
  StepStats stats;  // this step's timings and router FLOPs
};

DispatchHandle::DispatchHandle() = default;
DispatchHandle::~DispatchHandle() = default;
DispatchHandle::DispatchHandle(DispatchHandle&&) noexcept = default;
DispatchHandle& DispatchHandle::operator=(DispatchHandle&&) noexcept = default;

const DispatchHandle::State& DispatchHandle::state() const {
  if (!state_)
    throw UsageError(
        "DispatchHandle: the handle is empty (default-constructed or moved from); use the one "
        "MoELayer::forward returned");
  return *state_;
}

const Routes& DispatchHandle::routes() const {
  return state().routes;
}

const StepStats& DispatchHandle::stats() const {
  return state().stats;
}

// ---------------------------------------------------------------- forward --

ForwardResult MoELayer::forward(MatrixView tokens) {
  ForwardResult result;
  result.output = Matrix(tokens.rows, config_.expert.dim);
  const Compute& c = compute();
  StagedOut out(c, result.output.view());
  result.handle = run_forward(tokens, Staged(c, tokens), out);
  out.finish();
  return result;
}

DeviceForwardResult MoELayer::forward(TensorView tokens) {
  const Compute& c = compute();
  comm::check_together(comm_, "MoE forward", [&] {
    require_rows_of(c, tokens, config_.expert.dim, "tokens");
    if (tokens.dtype != DType::kF32)
      fail("tokens are " + std::string(to_string(tokens.dtype)) + ", the layer takes f32");
  });
  DeviceForwardResult result;
  result.output = c.ops->empty(DType::kF32, tokens.rows, config_.expert.dim);
  // Routing runs on the host for now: the tokens are read back for it.
  const OnHost routing_tokens(c, tokens);
  result.handle = run_forward(routing_tokens.view().matrix(), tokens, result.output);
  return result;
}

DispatchHandle MoELayer::run_forward(MatrixView routing_tokens, TensorView tokens, TensorView out) {
  DispatchHandle handle;
  handle.state_ = std::make_unique<Step>();
  Step& step = *handle.state_;
  step.strategy = strategy();
  step.placement_digest = placement().digest();
  PhaseSeconds& seconds = step.stats.seconds;
  RoutedBatch batch;
  {
    ScopedTimer timer(seconds.route);
    batch = routing_->route(routing_tokens, config_.k);
  }
  step.routes = std::move(batch.routes);
  step.stats.router_flops_per_token = batch.router_flops_per_token;
  {
    ScopedTimer timer(seconds.dispatch);
    dispatch(tokens, step);
  }
  Tensor partial;
  {
    ScopedTimer timer(seconds.experts);
    partial = serve(step, batch.received);
  }
  {
    ScopedTimer timer(seconds.combine);
    combine(step, partial, out);
  }
  return handle;
}

// Per (token, target rank) the slots that rank serves (and, when the
// strategy says so, the token vector).
void MoELayer::dispatch(TensorView tokens, Step& step) {
  wire::expert_dispatch_sections(placement(), step.routes, config_.expert.dim,
                                 routing_->dispatch_ships_vectors(), config_.wire_dtype,
                                 comm_.size(), dispatch_out_);
  step.target_offsets = std::move(dispatch_out_.target_offsets);
  step.targets = std::move(dispatch_out_.targets);
  step.slot_offsets = std::move(dispatch_out_.slot_offsets);
  step.slots = std::move(dispatch_out_.slots);
  step.record_token.resize(step.targets.size());
  for (int64_t t = 0; t < step.routes.tokens; ++t)
    std::fill(step.record_token.begin() + step.target_offsets[t],
              step.record_token.begin() + step.target_offsets[t + 1], static_cast<int32_t>(t));
  step.record_order = wire::wire_order(step.targets, comm_.size());
  send_dispatch(tokens, step);
}

// The host sections into the compute's buffer, each rank's vector block
// gathered after them (rounded to the wire dtype), and one exchange: the
// same bytes and messages as a host-built message.
void MoELayer::send_dispatch(TensorView tokens, const Step& step) {
  const Compute& c = compute();
  const comm::ExchangeBuffer& host = dispatch_out_.send;
  std::vector<int64_t> bytes(static_cast<size_t>(comm_.size()));
  for (int p = 0; p < comm_.size(); ++p) bytes[p] = host.bytes(p);
  compute_send_.reset(bytes);
  const bool shipped = routing_->dispatch_ships_vectors();
  const int64_t d = config_.expert.dim, row_bytes = wire::vector_bytes(d, config_.wire_dtype);
  std::vector<int32_t> rows;
  if (shipped)
    for (const int32_t i : step.record_order.item) rows.push_back(step.record_token[i]);
  const Tensor device_rows = device_vector(c, rows);
  const Staged src(c, tokens);
  for (int p = 0; p < comm_.size(); ++p) {
    const int64_t n = shipped ? step.record_order.count(p) : 0;
    const int64_t sections = host.bytes(p) - n * row_bytes;
    c.ops->copy_bytes(compute_send_.begin(p), compute_send_.device(), host.begin(p), Device::host(),
                      static_cast<size_t>(sections), c.stream);
    if (n > 0)
      c.ops->gather_rows(src, device_rows.view().row_range(step.record_order.offsets[p], n),
                         TensorView(compute_send_.begin(p) + sections, config_.wire_dtype,
                                    compute_send_.device(), n, d),
                         c.stream);
  }
  comm::PhaseScope phase(comm_, "dispatch");
  comm_.exchange(compute_send_, compute_recv_, c.stream);
}

// One input row per (home, token) served and the experts on them. Whatever
// fails here (a malformed record, an expert's check) fails every rank
// together, before the combine moves data.
Tensor MoELayer::serve(Step& step, const ReceivedTokens& received) {
  const Compute& c = compute();
  Tensor partial;
  comm::check_together(comm_, "MoE forward: serving experts", [&] {
    read_dispatch(step, received);
    const int64_t rows = step.inputs.rows();
    step.device_pairs = experts_.device_pairs(step.pairs, rows, config_.expert.dim, "forward");
    partial = c.ops->empty(DType::kF32, rows, config_.expert.dim);
    c.ops->fill(partial, 0.0, c.stream);
    if (!step.pairs.token.empty())
      step.cache = experts_.forward(step.inputs, step.device_pairs, partial);
  });
  return partial;
}

// The dispatch messages (wire::expert_dispatch's sections, read back to the
// host) and each record's vector, which came with the message (its vector
// block, dense-replicated) or with the scoring request (fused).
void MoELayer::read_dispatch(Step& step, const ReceivedTokens& received) {
  const bool shipped = routing_->dispatch_ships_vectors();
  std::unordered_map<int64_t, int64_t> received_row;
  for (size_t i = 0; i < received.home_rank.size(); ++i)
    received_row[home_key(received.home_rank[i], received.home_token[i])] = static_cast<int64_t>(i);
  std::vector<int32_t> source_row;  // fused: each input row's row of received.vectors
  std::vector<std::pair<int64_t, const char*>> blocks;  // shipped: each source's vector block
  step.input_pairs.assign(1, 0);
  for (int q = 0; q < comm_.size(); ++q) {
    const char* vectors = nullptr;
    const wire::DispatchMessage m = received_dispatch(q, vectors);
    if (shipped && m.records() > 0) blocks.emplace_back(m.records(), vectors);
    for (int64_t r = 0; r < m.records(); ++r) {
      const auto row = static_cast<int32_t>(step.input_home.size());
      for (int64_t p = m.pair_offsets[r]; p < m.pair_offsets[r + 1]; ++p) {
        step.pairs.token.push_back(row);
        step.pairs.expert.push_back(m.experts[p]);
        step.pairs.gate.push_back(m.gates[p]);
      }
      step.input_home.push_back(q);
      step.input_pairs.push_back(static_cast<int64_t>(step.pairs.size()));
      if (shipped) continue;
      const auto it = received_row.find(home_key(q, m.tokens[r]));
      if (it == received_row.end())
        throw InternalError("MoE forward: rank " + std::to_string(comm_.rank()) +
                            " must serve token " + std::to_string(m.tokens[r]) + " of rank " +
                            std::to_string(q) + ", which it was never sent");
      source_row.push_back(static_cast<int32_t>(it->second));
    }
  }
  step.input_order = wire::wire_order(step.input_home, comm_.size());
  gather_inputs(step, blocks, received.vectors.view(), source_row);
}

// Rank q's dispatch message in compute_recv_: its header, checked against
// the message's length, then its sections, read back to the host; `vectors`
// points at its vector block there (where vectors travel). No message: no
// records.
wire::DispatchMessage MoELayer::received_dispatch(int q, const char*& vectors) const {
  const Compute& c = compute();
  const int64_t length = compute_recv_.bytes(q);
  if (length == 0) return {};  // nothing served: no message
  int32_t header[2] = {0, 0};
  if (length < static_cast<int64_t>(sizeof(header)))
    throw InternalError("dispatch message from rank " + std::to_string(q) + " has " +
                        std::to_string(length) + " bytes, less than its header");
  c.ops->copy_bytes(header, Device::host(), compute_recv_.begin(q), compute_recv_.device(),
                    sizeof(header), c.stream);
  const int64_t n =
      wire::dispatch_sections_bytes(header, length, q, config_.expert.dim,
                                    routing_->dispatch_ships_vectors(), config_.wire_dtype);
  std::vector<char> sections(static_cast<size_t>(n));
  c.ops->copy_bytes(sections.data(), Device::host(), compute_recv_.begin(q), compute_recv_.device(),
                    sections.size(), c.stream);
  wire::Reader in(sections, q);
  vectors = compute_recv_.begin(q) + n;
  return wire::read_dispatch(in, config_.expert.dim, false, config_.wire_dtype);
}

// The input rows in the compute's memory: the shipped vector blocks
// (widened from the wire dtype) in order, or the received scoring vectors'
// rows `source_row`.
void MoELayer::gather_inputs(Step& step, const std::vector<std::pair<int64_t, const char*>>& blocks,
                             MatrixView received, const std::vector<int32_t>& source_row) const {
  const Compute& c = compute();
  const int64_t d = config_.expert.dim;
  step.inputs = c.ops->empty(DType::kF32, static_cast<int64_t>(step.input_home.size()), d);
  int64_t at = 0;
  for (const auto& [n, block] : blocks) {
    c.ops->copy(
        step.inputs.view().row_range(at, n),
        TensorView(const_cast<char*>(block), config_.wire_dtype, compute_recv_.device(), n, d),
        c.stream);
    at += n;
  }
  if (!source_row.empty())
    c.ops->gather_rows(Staged(c, received), device_vector(c, source_row), step.inputs, c.stream);
}

void MoELayer::combine(const Step& step, TensorView partial, TensorView out) {
  send_home_and_sum(step, partial, "combine", out);
}

// One partial vector per (token, rank) back home, summed there in ascending
// rank order (sum_rows: +0.0f, then each row in order).
void MoELayer::send_home_and_sum(const Step& step, TensorView rows, const char* phase,
                                 TensorView out) {
  send_vectors(step.input_order, step.input_order.item, rows, phase);
  const TensorView parts = received_vectors(step.record_order, phase);
  if (out.rows == 0) return;
  const Compute& c = compute();
  c.ops->sum_rows(parts, device_vector(c, step.record_order.position),
                  device_vector(c, step.target_offsets), out, c.stream);
}

void MoELayer::send_vectors(const wire::WireOrder& order, const std::vector<int32_t>& rows,
                            TensorView src, const char* phase) {
  const Compute& c = compute();
  const int64_t d = config_.expert.dim, row_bytes = wire::vector_bytes(d, config_.wire_dtype);
  std::vector<int64_t> bytes(static_cast<size_t>(comm_.size()));
  for (int p = 0; p < comm_.size(); ++p) bytes[p] = order.count(p) * row_bytes;
  compute_send_.reset(bytes);
  std::vector<int32_t> wire_rows(order.item.size());
  for (size_t j = 0; j < wire_rows.size(); ++j) wire_rows[j] = rows[order.item[j]];
  if (!wire_rows.empty())
    c.ops->gather_rows(src, device_vector(c, wire_rows),
                       TensorView(compute_send_.data(), config_.wire_dtype, compute_send_.device(),
                                  static_cast<int64_t>(wire_rows.size()), d),
                       c.stream);
  comm::PhaseScope scope(comm_, phase);
  comm_.exchange(compute_send_, compute_recv_, c.stream);
}

TensorView MoELayer::received_vectors(const wire::WireOrder& expected, const char* phase) const {
  const int64_t d = config_.expert.dim, row_bytes = wire::vector_bytes(d, config_.wire_dtype);
  for (int q = 0; q < comm_.size(); ++q)
    if (compute_recv_.bytes(q) != expected.count(q) * row_bytes)
      throw InternalError("message from rank " + std::to_string(q) + " has " +
                          std::to_string(compute_recv_.bytes(q)) + " bytes in " + phase +
                          ", expected " + std::to_string(expected.count(q)) + " vectors of " +
                          std::to_string(row_bytes) + " bytes");
  return TensorView(const_cast<char*>(compute_recv_.data()), config_.wire_dtype,
                    compute_recv_.device(), compute_recv_.total_bytes() / row_bytes, d);
}

// --------------------------------------------------------------- backward --

MoEGradients MoELayer::backward(DispatchHandle& handle, MatrixView d_out) {
  const Compute& c = compute();
  MoEGradients grads;
  grads.d_tokens = Matrix(d_out.rows, d_out.cols);
  StagedOut d_tokens(c, grads.d_tokens.view());
  DeviceMoEGradients device = run_backward(handle, Staged(c, d_out), d_tokens);
  d_tokens.finish();
  grads.touched_experts.ids = std::move(device.touched_expert_ids);
  grads.touched_experts.w1 = HostFloats(to_host_tensor(c, std::move(device.touched_experts.w1)));
  grads.touched_experts.w2 = HostFloats(to_host_tensor(c, std::move(device.touched_experts.w2)));
  if (config_.dense_expert_grads) grads.dense_experts = experts_.to_dense(grads.touched_experts);
  grads.d_centers = to_host(c, device.d_centers);
  return grads;
}

DeviceMoEGradients MoELayer::backward(DispatchHandle& handle, TensorView d_out) {
  const Compute& c = compute();
  Tensor d_tokens = c.ops->empty(DType::kF32, d_out.rows, d_out.cols);
  DeviceMoEGradients grads = run_backward(handle, d_out, d_tokens);
  grads.d_tokens = std::move(d_tokens);
  return grads;
}

DeviceMoEGradients MoELayer::run_backward(DispatchHandle& handle, TensorView d_out,
                                          TensorView d_tokens) {
  check_backward_args(handle, d_out);
  Step& step = *handle.state_;
  PhaseSeconds& seconds = step.stats.seconds;
  seconds.backward_dispatch = seconds.backward_experts = seconds.backward_combine = 0.0;
  DeviceMoEGradients grads;
  Tensor dy;
  {
    ScopedTimer timer(seconds.backward_dispatch);
    dy = grad_dispatch(step, d_out);
  }
  {
    ScopedTimer timer(seconds.backward_experts);
    expert_backward(step, dy, grads);
    const Matrix dz = grad_gates(step);
    grad_logits(step, dz.view(), grads);
  }
  ScopedTimer timer(seconds.backward_combine);
  send_home_and_sum(step, step.pair_dx, "grad_combine", d_tokens);
  return grads;
}

void MoELayer::check_backward_args(const DispatchHandle& handle, TensorView d_out) {
  comm::check_together(comm_, "MoE backward", [&] {
    const Step& step = handle.state();
    if (step.placement_digest != placement().digest() || step.strategy != strategy())
      fail(
          "the dispatch handle was made under another placement or strategy (a re-plan happened "
          "between forward and backward); run forward again");
    const int64_t d = config_.expert.dim, T = step.routes.tokens;
    if (d_out.rows != T || d_out.cols != d)
      fail("d_out is [" + std::to_string(d_out.rows) + ", " + std::to_string(d_out.cols) +
           "], expected [" + std::to_string(T) + ", " + std::to_string(d) + "]");
    require_rows_of(compute(), d_out, d, "d_out");
    if (d_out.dtype != DType::kF32)
      fail("d_out is " + std::string(to_string(d_out.dtype)) + ", the layer takes f32");
    require_finite_rows(compute(), d_out, "d_out");
  });
}

// dL/dy out to every rank that served the token, one row per input row.
Tensor MoELayer::grad_dispatch(const Step& step, TensorView d_out) {
  send_vectors(step.record_order, step.record_token, d_out, "grad_dispatch");
  const TensorView rows = received_vectors(step.input_order, "grad_dispatch");
  const Compute& c = compute();
  Tensor dy = c.ops->empty(DType::kF32, step.inputs.rows(), config_.expert.dim);
  if (dy.rows() > 0)  // widened from the wire dtype
    c.ops->gather_rows(rows, device_vector(c, step.input_order.position), dy, c.stream);
  return dy;
}

// The experts' backward where they live; fails every rank together.
void MoELayer::expert_backward(Step& step, TensorView dy, DeviceMoEGradients& grads) {
  const Compute& c = compute();
  comm::check_together(comm_, "MoE backward: serving experts", [&] {
    require_finite_rows(c, dy, "ExpertShard::backward: dy");
    step.pair_dx = c.ops->empty(DType::kF32, step.inputs.rows(), config_.expert.dim);
    c.ops->fill(step.pair_dx, 0.0, c.stream);
    step.pair_d_gate.assign(step.pairs.size(), 0.0f);
    if (step.pairs.token.empty()) return;
    const Tensor d_gate = c.ops->empty(DType::kF32, static_cast<int64_t>(step.pairs.size()), 1);
    grads.touched_experts =
        experts_.backward(step.inputs, step.device_pairs, step.cache, dy, d_gate, step.pair_dx);
    grads.touched_expert_ids = experts_.global_ids(grads.touched_experts);
    step.pair_d_gate = host_vector<float>(c, d_gate);
  });
}

// dL/dgate of each pair back home; there, dL/dz of each chosen logit
// (softmax over the chosen k).
Matrix MoELayer::grad_gates(const Step& step) {
  const int k = config_.k;
  wire::records(
      step.input_home, comm_.size(),
      [&](size_t i) {
        return std::span<const float>(
            step.pair_d_gate.data() + step.input_pairs[i],
            static_cast<size_t>(step.input_pairs[i + 1] - step.input_pairs[i]));
      },
      send_);
  {
    comm::PhaseScope phase(comm_, "grad_gates");
    comm_.exchange(send_, recv_);
  }
  Matrix dz(step.routes.tokens, k);
  std::vector<wire::Reader> in = wire::readers(recv_);
  std::vector<double> dg(static_cast<size_t>(k));
  for (int64_t t = 0; t < step.routes.tokens; ++t) {
    for (int64_t i = step.target_offsets[t]; i < step.target_offsets[t + 1]; ++i)
      for (int64_t s = step.slot_offsets[i]; s < step.slot_offsets[i + 1]; ++s)
        dg[step.slots[s]] = in[step.targets[i]].take<float>("gate gradient");
    const float* g = step.routes.gates_of(t);
    double weighted = 0.0;
    for (int j = 0; j < k; ++j) weighted += g[j] * dg[j];
    for (int j = 0; j < k; ++j) dz(t, j) = static_cast<float>(g[j] * (dg[j] - weighted));
  }
  wire::expect_all_done(in, "grad_gates");
  return dz;
}

// dL/dz to the experts' ranks, where the centers live: center gradients stay
// there, and each input row's dL/dx gains its logits' part.
void MoELayer::grad_logits(Step& step, MatrixView dz, DeviceMoEGradients& grads) {
  send_logit_grads(step, dz);
  std::vector<wire::Reader> in = wire::readers(recv_);
  std::vector<int32_t> input, local;  // (input row, hosted center) of each pair
  std::vector<float> pair_dz;
  for (int64_t i = 0; i < step.inputs.rows(); ++i)
    for (int64_t p = step.input_pairs[i]; p < step.input_pairs[i + 1]; ++p) {
      pair_dz.push_back(in[step.input_home[i]].take<float>("logit gradient"));
      input.push_back(static_cast<int32_t>(i));
      local.push_back(static_cast<int32_t>(experts_.index_of(step.pairs.expert[p])));
    }
  wire::expect_all_done(in, "grad_logits");
  if (input.empty()) return;
  const Compute& c = compute();
  const Staged centers(c, local_centers().view());
  const Tensor device_input = device_vector(c, input), device_local = device_vector(c, local);
  // dx += dz * center, pair by pair in order (one rounded multiply, one add).
  c.ops->add_scaled_rows(step.pair_dx, device_input, centers, device_local,
                         device_vector(c, pair_dz), c.stream);
  // Each hosted center's gradient: its pairs' dz * input row, in input-row
  // order, in double (the ops' sum), listed for every center a pair used.
  // Hosted rows ascend with their ids.
  const std::vector<double> coef(pair_dz.begin(), pair_dz.end());
  const RowGrads rows = c.ops->accumulate_row_grads(
      step.inputs, centers, {device_input, device_local, device_vector(c, coef)}, TensorView(),
      c.stream);                                               // dL/dx is the float sum above
  SparseRowGrad hit = with_rows_hit(to_host(c, rows), local);  // every center a pair used
  for (int32_t& r : hit.rows) r = experts_.ids()[r];
  grads.d_centers = to_device(c, hit);
}

// One float per pair, (token, target, slot) order, to the pair's rank.
void MoELayer::send_logit_grads(const Step& step, MatrixView dz) {
  std::vector<float> record_dz(step.slots.size());
  for (int64_t t = 0; t < step.routes.tokens; ++t)
    for (int64_t i = step.target_offsets[t]; i < step.target_offsets[t + 1]; ++i)
      for (int64_t s = step.slot_offsets[i]; s < step.slot_offsets[i + 1]; ++s)
        record_dz[s] = dz(t, step.slots[s]);
  wire::records(
      step.targets, comm_.size(),
      [&](size_t i) {
        return std::span<const float>(
            record_dz.data() + step.slot_offsets[i],
            static_cast<size_t>(step.slot_offsets[i + 1] - step.slot_offsets[i]));
      },
      send_);
  comm::PhaseScope phase(comm_, "grad_logits");
  comm_.exchange(send_, recv_);
}

// ------------------------------------------------------ centers, codebook --

void MoELayer::set_local_centers(MatrixView centers) {
  const int64_t d = config_.expert.dim;
  const Matrix& mine = local_centers();
  char changed = 0;
  comm::check_together(comm_, "MoE layer", [&] {
    if (centers.rows != mine.rows() || (centers.rows > 0 && centers.cols != d))
      fail("set_local_centers: got [" + std::to_string(centers.rows) + ", " +
           std::to_string(centers.cols) + "], this rank hosts [" + std::to_string(mine.rows()) +
           ", " + std::to_string(d) + "]");
    changed = centers.rows > 0 &&
              std::memcmp(centers.data, mine.data(), mine.size() * sizeof(float)) != 0;
  });
  std::vector<char> flags(static_cast<size_t>(comm_.size()));
  {
    comm::PhaseScope phase(comm_, "checks");
    comm_.allgather(&changed, 1, flags.data());
  }
  if (std::none_of(flags.begin(), flags.end(), [](char f) { return f != 0; })) return;
  routing_->set_local_centers(MatrixView(centers.data, mine.rows(), d));
}

void MoELayer::set_request_keys(int bits) {
  comm::check_together(comm_, "MoE layer", [&] {
    if (bits != 0) check_request_key_bits(bits, "set_request_keys: bits");
  });
  routing_->set_request_keys(bits);
  config_.request_key_bits = bits;
}

// -------------------------------------------------------------- re-plan --

PlacementPlan MoELayer::replan(PlacementPolicy policy, const std::vector<double>& list_load) {
  // The routing's current codebook and lists (a sync may have moved them).
  PlacementPlan plan = plan_and_broadcast(comm_, policy, codebook(), lists(), list_load);
  migrate(plan.placement);
  return plan;
}

namespace {

// Expert i's W1 and W2 rows in its shard's memory.
std::pair<char*, char*> expert_rows(const ExpertShard& shard, int64_t i) {
  const ExpertWeightsView w = shard.weights();
  const int64_t h1 = shard.config().w1_rows(), d = shard.config().dim;
  return {static_cast<char*>(w.w1.row_range(i * h1, h1).data),
          static_cast<char*>(w.w2.row_range(i * d, d).data)};
}

}  // namespace

// Each moving expert's FFN and center go to its new rank, in one exchange.
void MoELayer::migrate(const Placement& next_placement) {
  send_migrants(next_placement);
  ExpertShard next(config_.expert, next_placement.local_experts(comm_.rank()), compute());
  Matrix next_centers(next.size(), config_.expert.dim);
  const Matrix& centers = local_centers();
  for (int64_t i = 0; i < experts_.size(); ++i)
    if (next_placement.owner(experts_.ids()[i]) == comm_.rank()) {
      const auto [w1, w2] = expert_rows(experts_, i);
      place_expert(experts_.ids()[i], w1, w2, reinterpret_cast<const char*>(centers.row(i)),
                   Device::host(), next, next_centers);
    }
  receive_migrants(next, next_centers);
  experts_ = std::move(next);
  routing_->move_experts(next_placement, next_centers.view());
}

// To each new rank, (id, W1, W2, center) of every expert leaving this rank
// for it, in hosted order; nothing to a rank that gains none of them. The
// records are laid out in the compute's memory, the weights copied there
// from the shard and the id and center from the host.
void MoELayer::send_migrants(const Placement& next) {
  const Compute& c = compute();
  const int64_t d = config_.expert.dim;
  const auto w1 = static_cast<size_t>(config_.expert.w1_size()) * sizeof(float);
  const auto w2 = static_cast<size_t>(config_.expert.w2_size()) * sizeof(float);
  const int64_t record =
      wire::migrant_record_bytes(config_.expert.w1_rows(), config_.expert.hidden, d);
  const Matrix& centers = local_centers();
  std::vector<int64_t> bytes(static_cast<size_t>(comm_.size()), 0);
  for (const int32_t e : experts_.ids())
    if (next.owner(e) != comm_.rank()) bytes[next.owner(e)] += record;
  compute_send_.reset(bytes);
  std::vector<int64_t> at(compute_send_.offsets().begin(), compute_send_.offsets().end() - 1);
  const Device dev = compute_send_.device(), host = Device::host();
  for (int64_t i = 0; i < experts_.size(); ++i) {
    const int32_t e = experts_.ids()[i];
    const int to = next.owner(e);
    if (to == comm_.rank()) continue;
    char* out = compute_send_.data() + at[to];
    const auto [rows1, rows2] = expert_rows(experts_, i);
    c.ops->copy_bytes(out, dev, &e, host, sizeof(e), c.stream);
    c.ops->copy_bytes(out + sizeof(e), dev, rows1, dev, w1, c.stream);
    c.ops->copy_bytes(out + sizeof(e) + w1, dev, rows2, dev, w2, c.stream);
    c.ops->copy_bytes(out + sizeof(e) + w1 + w2, dev, centers.row(i), host,
                      static_cast<size_t>(d) * sizeof(float), c.stream);
    at[to] += record;
  }
  comm::PhaseScope phase(comm_, "migration");
  comm_.exchange(compute_send_, compute_recv_, c.stream);
}

void MoELayer::receive_migrants(ExpertShard& next, Matrix& next_centers) const {
  const Compute& c = compute();
  const auto w1 = static_cast<size_t>(config_.expert.w1_size()) * sizeof(float);
  const auto w2 = static_cast<size_t>(config_.expert.w2_size()) * sizeof(float);
  const int64_t record = wire::migrant_record_bytes(config_.expert.w1_rows(), config_.expert.hidden,
                                                    config_.expert.dim);
  for (int q = 0; q < comm_.size(); ++q) {
    if (compute_recv_.bytes(q) % record != 0)
      throw InternalError("migration message from rank " + std::to_string(q) + " has " +
                          std::to_string(compute_recv_.bytes(q)) +
                          " bytes, not whole expert records of " + std::to_string(record));
    for (int64_t at = 0; at < compute_recv_.bytes(q); at += record) {
      const char* in = compute_recv_.begin(q) + at;
      int32_t e = -1;
      c.ops->copy_bytes(&e, Device::host(), in, compute_recv_.device(), sizeof(e), c.stream);
      place_expert(e, in + sizeof(e), in + sizeof(e) + w1, in + sizeof(e) + w1 + w2,
                   compute_recv_.device(), next, next_centers);
    }
  }
}

// W1 and W2 are in the compute's memory.
void MoELayer::place_expert(int32_t e, const char* w1, const char* w2, const char* center,
                            Device center_device, ExpertShard& next, Matrix& next_centers) const {
  const int64_t j = next.index_of(e);
  if (j < 0)
    throw InternalError("migration: expert " + std::to_string(e) + " arrived at rank " +
                        std::to_string(comm_.rank()) + ", which does not host it");
  const Compute& c = compute();
  const Device dev = c.ops->device();
  const auto [rows1, rows2] = expert_rows(next, j);
  c.ops->copy_bytes(rows1, dev, w1, dev,
                    static_cast<size_t>(config_.expert.w1_size()) * sizeof(float), c.stream);
  c.ops->copy_bytes(rows2, dev, w2, dev,
                    static_cast<size_t>(config_.expert.w2_size()) * sizeof(float), c.stream);
  c.ops->copy_bytes(next_centers.row(j), Device::host(), center, center_device,
                    static_cast<size_t>(config_.expert.dim) * sizeof(float), c.stream);
}

}  // namespace airmoe::runtime
