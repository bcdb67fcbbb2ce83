// Granular experts: each a small FFN  y = W2 act(W1 x),  W1: [h, d], W2: [d, h]
// (h = 1 is a PEER-style single-neuron expert), or SwiGLU's
// y = W2 (silu(G x) * (U x)) with W1 = [G; U]: [2h, d] (ops/expert_ffn.h). A shard holds the
// parameters of the experts one rank hosts and runs them expert-centric: the (token, expert) pairs
// it must serve are grouped by expert and each group runs as two small GEMMs, not one token at a
// time.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/matrix.h"
#include "core/tensor.h"
#include "ops/boundary.h"
#include "ops/expert_ffn.h"
#include "ops/ops.h"

namespace airmoe::runtime {

// The activations live with the FFN math every backend shares.
using ops::Activation;
using ops::activation_from_string;
using ops::is_gated;
using ops::to_string;

struct ExpertConfig {
  int64_t dim = 0;     // d
  int64_t hidden = 1;  // h >= 1
  Activation activation = Activation::kGelu;
  // Rows of one expert's W1 (2h for SwiGLU, else h) and the entries of one
  // expert's W1 and W2.
  int64_t w1_rows() const { return ops::w1_rows(activation, hidden); }
  int64_t w1_size() const { return w1_rows() * dim; }
  int64_t w2_size() const { return dim * hidden; }
};

// (token, expert, gate) triples: out[token] += gate * FFN_expert(x[token]).
struct ExpertPairs {
  std::vector<int32_t> token;   // row of x / out
  std::vector<int32_t> expert;  // global expert id, hosted by the shard
  std::vector<float> gate;
  size_t size() const { return token.size(); }
};

// Per-pair intermediates of a forward call, kept for its backward.
struct ExpertCache {
  Matrix pre;     // [pairs, w1_rows]  W1 x
  Matrix output;  // [pairs, d]  FFN(x), before the gate
};

// Gradients of a shard's parameters, dense: same layout as the parameters,
// zeros for the experts a step did not touch.
struct DenseExpertGrads {
  std::vector<float> w1;  // [experts, w1_rows, d]
  std::vector<float> w2;  // [experts, d, h]
};

// Float32 values on the host, in a tensor: what the ops computed, handed
// over without a copy. Reads like a std::vector (data, size, iteration,
// indexing, ==); made from a vector by copying its values.
class HostFloats {
 public:
  HostFloats() = default;
  HostFloats(const std::vector<float>& values);  // NOLINT: the vector's values
  explicit HostFloats(Tensor host);              // a host f32 tensor, kept as it is
  HostFloats(const HostFloats& other);
  HostFloats& operator=(const HostFloats& other);
  HostFloats(HostFloats&&) = default;
  HostFloats& operator=(HostFloats&&) = default;

  float* data() { return values_.as<float>(); }
  const float* data() const { return values_.as<float>(); }
  size_t size() const { return static_cast<size_t>(values_.rows() * values_.cols()); }
  bool empty() const { return size() == 0; }
  float* begin() { return data(); }
  float* end() { return data() + size(); }
  const float* begin() const { return data(); }
  const float* end() const { return data() + size(); }
  float& operator[](size_t i) { return data()[i]; }
  const float& operator[](size_t i) const { return data()[i]; }
  operator std::span<const float>() const { return {data(), size()}; }  // NOLINT: a view
  bool operator==(const HostFloats& other) const;

 private:
  Tensor values_;
};

// Gradients of the experts one backward call touched, keyed by global expert
// id: a step touches at most (pairs) experts of the shard, so this stays
// small where the dense form would be the size of the shard. Row i of w1 / w2
// holds the same bits as expert ids[i]'s rows of the dense form.
struct SparseExpertGrads {
  std::vector<int32_t> ids;  // ascending global expert ids
  HostFloats w1;             // [ids, w1_rows, d]
  HostFloats w2;             // [ids, d, h]
  int64_t size() const { return static_cast<int64_t>(ids.size()); }
};

// The pairs and the forward's intermediates on the ops' device (the
// shard's TensorView API): local expert indices, not global ids.
struct DeviceExpertPairs {
  Tensor token;  // i32 [P]
  Tensor local;  // i32 [P]
  Tensor gate;   // f32 [P]
  ExpertPairsView view() const { return {token, local, gate}; }
};
struct DeviceExpertCache {
  Tensor pre;     // f32 [P, w1_rows]
  Tensor output;  // f32 [P, d]
  ExpertCacheView view() const { return {pre, output}; }
};

class ExpertShard {
 public:
  ExpertShard() = default;
  // Experts `ids` (ascending, distinct) with zero parameters, held on the
  // ops' device (host by default).
  ExpertShard(ExpertConfig config, std::vector<int32_t> ids, Compute compute = host_compute());
  // Seeded initialization that depends only on (seed, expert id): any rank
  // creates the same parameters for the same expert, whatever P is.
  static ExpertShard random(ExpertConfig config, std::vector<int32_t> ids, uint64_t seed,
                            Compute compute = host_compute());
  ExpertShard(const ExpertShard& other);
  ExpertShard& operator=(const ExpertShard& other);
  ExpertShard(ExpertShard&&) = default;
  ExpertShard& operator=(ExpertShard&&) = default;

  const ExpertConfig& config() const { return config_; }
  const Compute& compute() const { return compute_; }
  int64_t size() const { return static_cast<int64_t>(ids_.size()); }
  const std::vector<int32_t>& ids() const { return ids_; }
  int64_t index_of(int32_t expert) const;  // local index, or -1 if not hosted

  // The parameters on the ops' device: W1 [experts * w1_rows, d] (SwiGLU:
  // each expert's gate rows, then its up rows), W2 [experts * d, h].
  ExpertWeightsView weights() const;
  // The same on the host, expert by expert or whole (host ops only: a
  // UsageError otherwise).
  float* w1(int64_t local) { return host_w1() + local * config_.w1_size(); }
  const float* w1(int64_t local) const { return host_w1() + local * config_.w1_size(); }
  float* w2(int64_t local) { return host_w2() + local * config_.w2_size(); }
  const float* w2(int64_t local) const { return host_w2() + local * config_.w2_size(); }
  std::span<float> w1_data() { return {host_w1(), w1_entries()}; }
  std::span<float> w2_data() { return {host_w2(), w2_entries()}; }
  std::span<const float> w1_data() const { return {host_w1(), w1_entries()}; }
  std::span<const float> w2_data() const { return {host_w2(), w2_entries()}; }

  // out: [rows of x, d], zeroed by the caller or holding earlier sums; each
  // token's pairs are added in pair order (deterministic). Throws if a pair
  // names an expert this shard does not host, or a token row out of range.
  ExpertCache forward(MatrixView x, const ExpertPairs& pairs, Matrix& out) const;
  // The same on the ops' device (pairs from device_pairs()).
  DeviceExpertCache forward(TensorView x, const DeviceExpertPairs& pairs, TensorView out) const;
  // Pairs (global ids) checked against x [x_rows, x_cols] and the shard, as
  // the TensorView API takes them; `fn` names the caller in errors.
  DeviceExpertPairs device_pairs(const ExpertPairs& pairs, int64_t x_rows, int64_t x_cols,
                                 const char* fn) const;

  // Given dL/dout (dy, [rows, d]): d_gate[p] = <dy[token_p], FFN(x)_p>; adds
  // to dx[token] the gate-weighted input gradient (pair order) and returns
  // the parameter gradients of the touched experts (contracted per expert in
  // pair order).
  SparseExpertGrads backward(MatrixView x, const ExpertPairs& pairs, const ExpertCache& cache,
                             MatrixView dy, std::vector<float>& d_gate, Matrix& dx) const;
  // The same on the ops' device; the touched experts by local index.
  TouchedExpertGrads backward(TensorView x, const DeviceExpertPairs& pairs,
                              const DeviceExpertCache& cache, TensorView dy, TensorView d_gate,
                              TensorView dx) const;
  // The same, adding the parameter gradients to dense `grads` (empty: taken
  // as zero_grads()).
  void backward(MatrixView x, const ExpertPairs& pairs, const ExpertCache& cache, MatrixView dy,
                std::vector<float>& d_gate, Matrix& dx, DenseExpertGrads& grads) const;

  // The global ids of a backward's touched experts (read back to the host).
  std::vector<int32_t> global_ids(const TouchedExpertGrads& touched) const;

  DenseExpertGrads zero_grads() const;
  // The hosted layout of sparse gradients, zeros for the experts not in it.
  DenseExpertGrads to_dense(const SparseExpertGrads& grads) const;

  // Optimizer steps: parameters += scale * gradients, one float multiply and
  // one add per entry (the ops' add_scaled). The sparse form touches only its
  // experts; for a descent step (scale < 0) it gives the same bits as the
  // dense form, whose zeros add -0 and so leave the untouched experts'
  // parameters as they are.
  void apply(const SparseExpertGrads& grads, float scale);
  void apply(const DenseExpertGrads& grads, float scale);
  void apply_sgd(const SparseExpertGrads& grads, float lr) { apply(grads, -lr); }
  // FLOPs per (token, expert) pair: the GEMVs of W1 and W2, 2 FLOPs per
  // multiply-add.
  double flops_per_pair() const {
    return 2.0 * static_cast<double>(config_.w1_size() + config_.w2_size());
  }

 private:
  // Throws unless the gradients fit this shard; the sparse check returns each
  // expert's local index.
  void check_dense(const DenseExpertGrads& grads, const char* fn) const;
  std::vector<int64_t> check_sparse(const SparseExpertGrads& grads, const char* fn) const;
  size_t w1_entries() const { return static_cast<size_t>(size() * config_.w1_size()); }
  size_t w2_entries() const { return static_cast<size_t>(size() * config_.w2_size()); }
  float* host_w1() const;
  float* host_w2() const;

  ExpertConfig config_;
  Compute compute_ = host_compute();
  std::vector<int32_t> ids_;
  Tensor w1_;  // [experts * w1_rows, d]
  Tensor w2_;  // [experts * d, h]
};

}  // namespace airmoe::runtime
