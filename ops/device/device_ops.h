// The device composition as an Ops backend, over a platform that supplies
// the execution (ops/device/exec.h): DeviceOps<EmulatedPlatform> is
// device-emulated (g++, Thrust's OpenMP system, host memory) and
// DeviceOps<CudaPlatform> is cuda:N (nvcc, a CUDA stream). Included only by
// the two files that instantiate it (ops/device/emulated.cpp and
// ops/cuda/cuda_ops.cu).
//
// A platform has name(), device(), allocator() and exec(Stream), which
// returns the Exec one op call runs with.
#pragma once

#include <thrust/system_error.h>

#include <string>
#include <type_traits>
#include <utility>

#include "ops/device/exec.h"
#include "ops/device/expert_ops.h"
#include "ops/device/list_ops.h"
#include "ops/device/memory_ops.h"
#include "ops/device/router_grad_ops.h"
#include "ops/device/row_ops.h"
#include "ops/device/scoring_ops.h"
#include "ops/device/topk_ops.h"
#include "ops/op_args.h"
#include "ops/ops.h"

namespace airmoe::inline ops::device {

template <typename Platform>
class DeviceOps final : public Ops {
 public:
  explicit DeviceOps(Platform platform) : platform_(std::move(platform)) {}

  std::string name() const override { return platform_.name(); }
  Device device() const override { return platform_.device(); }
  Allocator& allocator() const override { return platform_.allocator(); }
  void synchronize(Stream stream) const override {
    run("synchronize", stream, [](const auto& x, const OpArgs&) { x.synchronize(); });
  }
  void copy(TensorView dst, TensorView src, Stream stream) const override {
    run("copy", stream, [&](const auto& x, const OpArgs& a) { device::copy(x, a, dst, src); });
  }
  void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes,
                  Stream stream) const override {
    run("copy_bytes", stream, [&](const auto& x, const OpArgs& a) {
      device::copy_bytes(x, a, dst, dst_device, src, src_device, bytes);
    });
  }
  Allocator& staging_allocator() const override { return platform_.staging_allocator(); }
  void fill(TensorView dst, double value, Stream stream) const override {
    run("fill", stream, [&](const auto& x, const OpArgs& a) { device::fill(x, a, dst, value); });
  }
  RowCheck check_rows(TensorView m, double key_norm_bound, Stream stream) const override {
    return run("check_rows", stream, [&](const auto& x, const OpArgs& a) {
      return device::check_rows(x, a, m, key_norm_bound);
    });
  }
  void score(TensorView a, TensorView b, TensorView c, Stream stream) const override {
    run("score", stream,
        [&](const auto& x, const OpArgs& args) { device::score(x, args, a, b, c); });
  }
  void score_pairs(TensorView a, TensorView b, TensorView a_rows, TensorView b_rows, TensorView c,
                   Stream stream) const override {
    run("score_pairs", stream, [&](const auto& x, const OpArgs& args) {
      device::score_pairs(x, args, a, b, a_rows, b_rows, c);
    });
  }
  int64_t normalize_rows(TensorView rows, TensorView out, Stream stream) const override {
    return run("normalize_rows", stream, [&](const auto& x, const OpArgs& a) {
      return device::normalize_rows(x, a, rows, out);
    });
  }
  void nearest(TensorView unit_rows, TensorView codewords, TensorView best, TensorView best_score,
               Stream stream) const override {
    run("nearest", stream, [&](const auto& x, const OpArgs& a) {
      device::nearest(x, a, unit_rows, codewords, best, best_score);
    });
  }
  KMeansStats kmeans_stats(TensorView unit_rows, TensorView codewords, TensorView ids,
                           Stream stream) const override {
    return run("kmeans_stats", stream, [&](const auto& x, const OpArgs& a) {
      return device::kmeans_stats(x, a, unit_rows, codewords, ids);
    });
  }
  void dense_topk(TensorView tokens, TensorView keys, int k, TopKView out,
                  Stream stream) const override {
    run("dense_topk", stream,
        [&](const auto& x, const OpArgs& a) { device::dense_topk(x, a, tokens, keys, k, out); });
  }
  void product_topk(TensorView tokens, TensorView keys1, TensorView keys2, int k, TopKView out,
                    Stream stream) const override {
    run("product_topk", stream, [&](const auto& x, const OpArgs& a) {
      device::product_topk(x, a, tokens, keys1, keys2, k, out);
    });
  }
  ProbeSet select_probes(TensorView tokens, TensorView codewords, TensorView list_sizes, int probes,
                         int k, Stream stream) const override {
    return run("select_probes", stream, [&](const auto& x, const OpArgs& a) {
      return device::select_probes(x, a, tokens, codewords, list_sizes, probes, k);
    });
  }
  PairSet probe_pairs(const ListBlocksView& lists, const ProbeSet& probes, ScanUnit unit,
                      Stream stream) const override {
    return run("probe_pairs", stream, [&](const auto& x, const OpArgs& a) {
      return device::probe_pairs(x, a, lists, probes, unit);
    });
  }
  void scan_blocks(const ListBlocksView& lists, TensorView queries, TensorView query,
                   TensorView block, TensorView block_end, int k, TopKView out,
                   Stream stream) const override {
    run("scan_blocks", stream, [&](const auto& x, const OpArgs& a) {
      device::scan_blocks(x, a, lists, queries, query, block, block_end, k, out);
    });
  }
  void scan_topk(const ListBlocksView& lists, TensorView queries, const PairSet& pairs, int k,
                 TopKView out, Stream stream) const override {
    run("scan_topk", stream, [&](const auto& x, const OpArgs& a) {
      device::scan_topk(x, a, lists, queries, pairs, k, out);
    });
  }
  void merge_topk(TopKView candidates, TensorView offsets, int k, TopKView out,
                  Stream stream) const override {
    run("merge_topk", stream, [&](const auto& x, const OpArgs& a) {
      device::merge_topk(x, a, candidates, offsets, k, out);
    });
  }
  void finalize_gates(TensorView logits, TensorView lse, TensorView log_normalizer,
                      TensorView gates, GateFunction fn, Stream stream) const override {
    run("finalize_gates", stream, [&](const auto& x, const OpArgs& a) {
      device::finalize_gates(x, a, logits, lse, log_normalizer, gates, fn);
    });
  }
  void logit_grads(TensorView token, TensorView expert, TensorView z, TensorView chosen_ids,
                   TensorView gates, TensorView d_gates, TensorView log_normalizer, TensorView coef,
                   GateFunction fn, Stream stream) const override {
    run("logit_grads", stream, [&](const auto& x, const OpArgs& a) {
      device::logit_grads(x, a, token, expert, z, chosen_ids, gates, d_gates, log_normalizer, coef,
                          fn);
    });
  }
  RowGrads accumulate_row_grads(TensorView tokens, TensorView keys,
                                RowContributionsView contributions, TensorView d_tokens,
                                Stream stream) const override {
    return run("accumulate_row_grads", stream, [&](const auto& x, const OpArgs& a) {
      return device::accumulate_row_grads(x, a, tokens, keys, contributions, d_tokens);
    });
  }
  void expert_forward(const ExpertWeightsView& weights, TensorView x_in, ExpertPairsView pairs,
                      TensorView out, ExpertCacheView cache, Stream stream) const override {
    run("expert_forward", stream, [&](const auto& x, const OpArgs& a) {
      device::expert_forward(x, a, weights, x_in, pairs, out, cache);
    });
  }
  TouchedExpertGrads expert_backward(const ExpertWeightsView& weights, TensorView x_in,
                                     ExpertPairsView pairs, ExpertCacheView cache, TensorView dy,
                                     TensorView d_gate, TensorView dx,
                                     Stream stream) const override {
    return run("expert_backward", stream, [&](const auto& x, const OpArgs& a) {
      return device::expert_backward(x, a, weights, x_in, pairs, cache, dy, d_gate, dx);
    });
  }
  void add_scaled(TensorView dst, TensorView src, float scale, Stream stream) const override {
    run("add_scaled", stream,
        [&](const auto& x, const OpArgs& a) { device::add_scaled(x, a, dst, src, scale); });
  }
  void gather_rows(TensorView src, TensorView rows, TensorView dst, Stream stream) const override {
    run("gather_rows", stream,
        [&](const auto& x, const OpArgs& a) { device::gather_rows(x, a, src, rows, dst); });
  }
  void sum_rows(TensorView src, TensorView rows, TensorView offsets, TensorView dst,
                Stream stream) const override {
    run("sum_rows", stream,
        [&](const auto& x, const OpArgs& a) { device::sum_rows(x, a, src, rows, offsets, dst); });
  }
  void add_scaled_rows(TensorView dst, TensorView dst_rows, TensorView src, TensorView src_rows,
                       TensorView scale, Stream stream) const override {
    run("add_scaled_rows", stream, [&](const auto& x, const OpArgs& a) {
      device::add_scaled_rows(x, a, dst, dst_rows, src, src_rows, scale);
    });
  }

 private:
  // Runs one op: its argument checks name this backend and the op; a failed
  // device call (Thrust reports CUDA errors as thrust::system_error, the
  // platform's finish() reports the ones still pending) becomes a
  // DeviceError naming both.
  template <typename Fn>
  auto run(const char* op, Stream stream, Fn&& fn) const {
    const OpArgs args(name(), op, device());
    try {
      const auto x = platform_.exec(stream, op);
      if constexpr (std::is_void_v<decltype(fn(x, args))>) {
        fn(x, args);
        x.finish();
      } else {
        auto result = fn(x, args);
        x.finish();
        return result;
      }
    } catch (const thrust::system_error& e) {
      throw DeviceError(name() + " " + op + ": " + e.what());
    }
  }

  Platform platform_;
};

}  // namespace airmoe::inline ops::device
