#include "router/air_router.h"

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "core/checks.h"
#include "ops/topk.h"
#include "router/dense_router.h"
#include "router/list_scan.h"

namespace airmoe::inline router {

AirRouter::AirRouter(MatrixView centers, const AirConfig& config)
    : AirRouter(centers,
                train_codebook(centers, {config.codewords, config.kmeans_iterations, config.seed}),
                ListOptions{config.list_cap, config.spills, config.spill_lambda}) {}

AirRouter::AirRouter(MatrixView centers, Codebook codebook, int64_t list_cap)
    : AirRouter(centers, std::move(codebook), ListOptions{list_cap}) {}

AirRouter::AirRouter(MatrixView centers, Codebook codebook, const ListOptions& options)
    : codebook_(std::move(codebook)), options_(options) {
  if (options.list_cap < 0)
    fail("list cap must be >= 0 (0: no cap), got " + std::to_string(options.list_cap));
  if (options.spills < 0) fail("spills must be >= 0, got " + std::to_string(options.spills));
  set_centers(centers);
}

void AirRouter::set_centers(MatrixView centers) {
  if (centers.rows < 1) fail("centers must have at least one row");
  require_expert_count(centers.rows, "centers rows E");
  require_cols(centers, codebook_.dim(), "centers");
  if (codebook_.size() > centers.rows)
    fail("number of codewords C = " + std::to_string(codebook_.size()) +
         " exceeds E = " + std::to_string(centers.rows));
  Matrix unit = normalize_rows(centers, "centers");  // validates finite, nonzero
  centers_ = Matrix(centers.rows, centers.cols);
  std::copy_n(centers.data, centers.rows * centers.cols, centers_.data());
  unit_centers_ = std::move(unit);
  key_norm_bound_ = std::max(1.0, max_row_norm(centers_.view()));
  rebuild_lists();
}

void AirRouter::update_codebook(double step, int updates) {
  if (updates < 0) fail("update_codebook: updates must be >= 0");
  auto lookup = [&](int32_t e, float* out) { std::copy_n(unit_centers_.row(e), dim(), out); };
  for (int u = 0; u < updates; ++u)
    codebook_.apply(codebook_.compute_stats(unit_centers_.view()), step, lookup);
  rebuild_lists();
}

void AirRouter::rebuild_lists() {
  const std::vector<int32_t> primary =
      codebook_.assign_capped(unit_centers_.view(), options_.list_cap);
  lists_ = InvertedLists(primary, codebook_.size());
  const int per_expert = 1 + options_.spills;
  std::vector<int32_t> lists_of = primary;
  if (options_.spills > 0) {
    const SpillOptions spill{options_.spills, options_.spill_lambda,
                             options_.spills * options_.list_cap};
    const std::vector<int32_t> spilled =
        soar_spills(codebook_, unit_centers_.view(), primary, spill);
    lists_of.assign(static_cast<size_t>(experts() * per_expert), 0);
    for (int64_t e = 0; e < experts(); ++e) {
      lists_of[e * per_expert] = primary[e];
      std::copy_n(spilled.begin() + e * options_.spills, options_.spills,
                  lists_of.begin() + e * per_expert + 1);
    }
  }
  segments_ = ListSegments(lists_of, per_expert, codebook_.size());
  blocks_ = segments_.blocks(dim(), [&](int32_t e) { return centers_.row(e); });
}

double AirRouter::flops_per_token(double mean_shortlist) const {
  return 2.0 * static_cast<double>(codewords() * dim()) +
         2.0 * mean_shortlist * static_cast<double>(dim());
}

Routes AirRouter::route(MatrixView tokens, int k, int probes, GateMode mode) const {
  check_route_args(tokens, dim(), k, experts(), key_norm_bound_);
  require_in_range(probes, 1, codewords(), "probes m");
  const int64_t T = tokens.rows;
  Routes r = make_routes(T, k, mode);
  r.probe_offsets.assign(static_cast<size_t>(T + 1), 0);
  if (T == 0) return r;

  // The primary lists are disjoint, so probes whose primary lists hold k
  // experts give a shortlist of at least k distinct experts.
  ProbeSelection sel = select_probes(codebook_, lists_, tokens, k, probes);
  r.probe_offsets = std::move(sel.offsets);
  r.probes = std::move(sel.codewords);
  SegmentPairs scan = segment_pairs(segments_, r.probe_offsets, r.probes);
  r.shortlist_size = std::move(scan.shortlist_size);
  const ScanPairs& pairs = scan.pairs;
  std::vector<float> cand_z;
  std::vector<int32_t> cand_id;
  std::vector<LogSumExp> cand_lse;
  const bool shortlist = mode == GateMode::kShortlist;
  scan_lists(blocks_, tokens, pairs, k, cand_z, cand_id, shortlist ? &cand_lse : nullptr);

  // Merge each token's candidates in probe order.
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    TopK top(k, r.logits.data() + t * k, r.experts.data() + t * k);
    LogSumExp lse;
    for (int64_t p = scan.offsets[t]; p < scan.offsets[t + 1]; ++p) {
      for (int j = 0; j < k && cand_id[p * k + j] >= 0; ++j)
        top.push(cand_z[p * k + j], cand_id[p * k + j]);
      if (shortlist) lse.merge(cand_lse[p]);
    }
    if (shortlist) r.log_normalizer[t] = lse.value();
  }
  finalize_gates(r);
  return r;
}

RouterGradients AirRouter::backward(MatrixView tokens, const Routes& routes,
                                    MatrixView d_gates) const {
  require_cols(tokens, dim(), "tokens");
  if (routes.gate_mode == GateMode::kShortlist &&
      routes.probe_offsets.size() != static_cast<size_t>(routes.tokens + 1))
    fail("backward: shortlist gates need the routes' probes, which these routes lack");
  return center_router_backward(
      tokens, routes, d_gates, [&](int32_t e) { return centers_.row(e); },
      [&](int64_t t, const std::function<void(int32_t)>& visit) {
        const std::span<const int32_t> probed(
            routes.probes.data() + routes.probe_offsets[t],
            static_cast<size_t>(routes.probe_offsets[t + 1] - routes.probe_offsets[t]));
        std::vector<int32_t> sorted;
        segments_.for_each_scanned(probed, sorted, [&](int64_t s) {
          for (int32_t e : segments_.members(s)) visit(e);
        });
      });
}

}  // namespace airmoe::inline router
