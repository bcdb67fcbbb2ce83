// Granular experts: each a small FFN  y = W2 act(W1 x),  W1: [h, d], W2: [d, h]
// (h = 1 is a PEER-style single-neuron expert). A shard holds the parameters
// of the experts one rank hosts and runs them expert-centric: the (token,
// expert) pairs it must serve are grouped by expert and each group runs as
// two small GEMMs, not one token at a time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/matrix.h"

namespace airmoe::runtime {

enum class Activation { kGelu, kRelu, kSilu };
const char* to_string(Activation a);
Activation activation_from_string(const std::string& name);

struct ExpertConfig {
  int64_t dim = 0;     // d
  int64_t hidden = 1;  // h >= 1
  Activation activation = Activation::kGelu;
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
  Matrix pre;     // [pairs, h]  W1 x
  Matrix output;  // [pairs, d]  FFN(x), before the gate
};

// Gradients of a shard's parameters, same layout as the parameters.
struct ExpertGrads {
  std::vector<float> w1;  // [experts, h, d]
  std::vector<float> w2;  // [experts, d, h]
};

class ExpertShard {
 public:
  ExpertShard() = default;
  // Experts `ids` (ascending, distinct) with zero parameters.
  ExpertShard(ExpertConfig config, std::vector<int32_t> ids);
  // Seeded initialization that depends only on (seed, expert id): any rank
  // creates the same parameters for the same expert, whatever P is.
  static ExpertShard random(ExpertConfig config, std::vector<int32_t> ids, uint64_t seed);

  const ExpertConfig& config() const { return config_; }
  int64_t size() const { return static_cast<int64_t>(ids_.size()); }
  const std::vector<int32_t>& ids() const { return ids_; }
  int64_t index_of(int32_t expert) const;  // local index, or -1 if not hosted

  float* w1(int64_t local) { return w1_.data() + local * config_.hidden * config_.dim; }
  const float* w1(int64_t local) const { return w1_.data() + local * config_.hidden * config_.dim; }
  float* w2(int64_t local) { return w2_.data() + local * config_.dim * config_.hidden; }
  const float* w2(int64_t local) const { return w2_.data() + local * config_.dim * config_.hidden; }
  std::vector<float>& w1_data() { return w1_; }
  std::vector<float>& w2_data() { return w2_; }
  const std::vector<float>& w1_data() const { return w1_; }
  const std::vector<float>& w2_data() const { return w2_; }

  // out: [rows of x, d], zeroed by the caller or holding earlier sums; each
  // token's pairs are added in pair order (deterministic). Throws if a pair
  // names an expert this shard does not host, or a token row out of range.
  ExpertCache forward(MatrixView x, const ExpertPairs& pairs, Matrix& out) const;

  // Given dL/dout (dy, [rows, d]): d_gate[p] = <dy[token_p], FFN(x)_p>; adds
  // to dx[token] the gate-weighted input gradient (pair order) and to
  // grads the parameter gradients (accumulated per expert in pair order).
  void backward(MatrixView x, const ExpertPairs& pairs, const ExpertCache& cache, MatrixView dy,
                std::vector<float>& d_gate, Matrix& dx, ExpertGrads& grads) const;

  ExpertGrads zero_grads() const;
  // FLOPs per (token, expert) pair: 2 GEMVs of d x h, 2 FLOPs per multiply-add.
  double flops_per_pair() const { return 4.0 * static_cast<double>(config_.dim * config_.hidden); }

 private:
  ExpertConfig config_;
  std::vector<int32_t> ids_;
  std::vector<float> w1_;  // [experts, h, d]
  std::vector<float> w2_;  // [experts, d, h]
};

}  // namespace airmoe::runtime
