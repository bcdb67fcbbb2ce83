// The host backends: every op of ops/ops.h on host memory with OpenMP,
// written once over a SIMD kernel set (ops/host/kernels.h). host-avx512,
// host-avx2 and host-portable are instances of this class; they differ only
// in their kernels and give the same bits.
#pragma once

#include <optional>
#include <string>

#include "ops/host/host_views.h"
#include "ops/host/kernels.h"
#include "ops/op_args.h"
#include "ops/ops.h"

namespace airmoe::inline ops::host {

class HostOps final : public Ops {
 public:
  explicit HostOps(const HostKernels& kernels) : kernels_(kernels) {}

  std::string name() const override { return kernels_.name; }
  Device device() const override { return Device::host(); }
  Allocator& allocator() const override { return host_allocator(); }
  void synchronize(Stream) const override {}
  void copy(TensorView dst, TensorView src, Stream stream) const override;
  void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes,
                  Stream stream) const override;
  Allocator& staging_allocator() const override { return host_allocator(); }
  void fill(TensorView dst, double value, Stream stream) const override;

  RowCheck check_rows(TensorView m, double key_norm_bound, Stream stream) const override;

  void score(TensorView a, TensorView b, TensorView c, Stream stream) const override;
  void score_pairs(TensorView a, TensorView b, TensorView a_rows, TensorView b_rows, TensorView c,
                   Stream stream) const override;

  int64_t normalize_rows(TensorView rows, TensorView out, Stream stream) const override;
  void nearest(TensorView unit_rows, TensorView codewords, TensorView best, TensorView best_score,
               Stream stream) const override;
  KMeansStats kmeans_stats(TensorView unit_rows, TensorView codewords, TensorView ids,
                           Stream stream) const override;

  void dense_topk(TensorView tokens, TensorView keys, int k, TopKView out,
                  Stream stream) const override;
  void product_topk(TensorView tokens, TensorView keys1, TensorView keys2, int k, TopKView out,
                    Stream stream) const override;
  ProbeSet select_probes(TensorView tokens, TensorView codewords, TensorView list_sizes, int probes,
                         int k, Stream stream) const override;
  PairSet probe_pairs(const ListBlocksView& lists, const ProbeSet& probes, ScanUnit unit,
                      Stream stream) const override;
  void scan_blocks(const ListBlocksView& lists, TensorView queries, TensorView query,
                   TensorView block, TensorView block_end, int k, TopKView out,
                   Stream stream) const override;
  void scan_topk(const ListBlocksView& lists, TensorView queries, const PairSet& pairs, int k,
                 TopKView out, Stream stream) const override;
  void merge_topk(TopKView candidates, TensorView offsets, int k, TopKView out,
                  Stream stream) const override;
  void finalize_gates(TensorView logits, TensorView lse, TensorView log_normalizer,
                      TensorView gates, GateFunction fn, Stream stream) const override;

  void logit_grads(TensorView token, TensorView expert, TensorView z, TensorView chosen_ids,
                   TensorView gates, TensorView d_gates, TensorView log_normalizer, TensorView coef,
                   GateFunction fn, Stream stream) const override;
  RowGrads accumulate_row_grads(TensorView tokens, TensorView keys,
                                RowContributionsView contributions, TensorView d_tokens,
                                Stream stream) const override;

  void expert_forward(const ExpertWeightsView& weights, TensorView x, ExpertPairsView pairs,
                      TensorView out, ExpertCacheView cache, Stream stream) const override;
  TouchedExpertGrads expert_backward(const ExpertWeightsView& weights, TensorView x,
                                     ExpertPairsView pairs, ExpertCacheView cache, TensorView dy,
                                     TensorView d_gate, TensorView dx,
                                     Stream stream) const override;
  void add_scaled(TensorView dst, TensorView src, float scale, Stream stream) const override;

  void gather_rows(TensorView src, TensorView rows, TensorView dst, Stream stream) const override;
  void sum_rows(TensorView src, TensorView rows, TensorView offsets, TensorView dst,
                Stream stream) const override;
  void add_scaled_rows(TensorView dst, TensorView dst_rows, TensorView src, TensorView src_rows,
                       TensorView scale, Stream stream) const override;

  // C = A · Bᵀ on float32 rows (c[i * ldc + j] = lane_dot(a row i, b row j)
  // over k): the scoring loop every op above runs. Multi-threaded over
  // blocks outside an OpenMP region when the work is large enough; in one
  // thread inside one (the grouped scans call it from their own loops).
  void score_f32(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n,
                 int64_t k, float* c, int64_t ldc) const;
  // The same on bf16 rows, on the kernel set's score_bf16 (not nullptr).
  void score_bf16(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t m,
                  int64_t n, int64_t k, float* c, int64_t ldc) const;
  const HostKernels& kernels() const { return kernels_; }

 private:
  OpArgs args(const char* op) const { return OpArgs(kernels_.name, op, Device::host()); }

  const HostKernels& kernels_;
};

// The scores of rows of `a` against every row of `b` (f32 or bf16, the same
// columns): bf16 x bf16 on the kernel set's score_bf16 where it has one,
// with no widened copy; otherwise on float32 rows, widened once here. The
// same bits either way (lane_dot of the widened rows).
class RowScores {
 public:
  RowScores(const HostOps& ops, const TensorView& a, const TensorView& b);
  // c[i * ldc + j] for rows a0 .. a0 + n - 1 of a and every row of b.
  void operator()(int64_t a0, int64_t n, float* c, int64_t ldc) const;

 private:
  const HostOps& ops_;
  TensorView a_, b_;
  bool bf16_;
  std::optional<FloatRows> fa_, fb_;
};

}  // namespace airmoe::inline ops::host
