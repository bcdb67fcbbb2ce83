#include "router/air_router.h"

#include <algorithm>
#include <string>
#include <vector>

#include "core/checks.h"

namespace airmoe::inline router {

AirRouter::AirRouter(MatrixView centers, const AirConfig& config, Compute compute)
    : AirRouter(centers,
                train_codebook(centers, {config.codewords, config.kmeans_iterations, config.seed},
                               nullptr, compute),
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

AirRouter::AirRouter(MatrixView centers, TensorView bias, MatrixView sample_tokens,
                     const QueryListOptions& options, Compute compute)
    : AirRouter(centers, build_query_lists(centers, bias, sample_tokens, options, compute)) {
  if (!bias.empty()) set_bias(bias);
}

AirRouter::AirRouter(MatrixView centers, QueryLists lists)
    : codebook_(std::move(lists.codebook)),
      query_(QueryState{lists.options, std::move(lists.membership), lists.build_flops}) {
  if (query_->membership.list_count != codebook_.size())
    fail("query lists: the membership has " + std::to_string(query_->membership.list_count) +
         " lists, the codebook " + std::to_string(codebook_.size()) + " codewords");
  set_centers(centers);
}

void AirRouter::set_centers(MatrixView centers) {
  if (centers.rows < 1) fail("centers must have at least one row");
  if (query_ && centers.rows != query_->membership.experts())
    fail("set_centers: the query lists hold E = " + std::to_string(query_->membership.experts()) +
         " experts, the centers have " + std::to_string(centers.rows) +
         " rows (build a new router for another expert count)");
  require_expert_count(centers.rows, "centers rows E");
  require_cols(centers, codebook_.dim(), "centers");
  if (codebook_.size() > centers.rows)
    fail("number of codewords C = " + std::to_string(codebook_.size()) +
         " exceeds E = " + std::to_string(centers.rows));
  const Compute& c = compute();
  Tensor unit = normalize_rows(c, centers, "centers");  // validates finite, nonzero
  centers_ = c.ops->empty(DType::kF32, centers.rows, centers.cols);
  c.ops->copy(centers_, centers, c.stream);
  unit_centers_ = std::move(unit);
  if (bias_.rows() != centers.rows) bias_ = Tensor();  // a bias of other experts goes
  key_norm_bound_ = std::max(1.0, require_finite_rows(c, centers_, "centers"));
  rebuild_lists();
}

void AirRouter::update_codebook(double step, int updates) {
  if (query_)
    fail(
        "update_codebook: the query lists' codebook is trained on tokens, not on the centers; "
        "call refresh_lists(sample_tokens)");
  if (updates < 0) fail("update_codebook: updates must be >= 0");
  const OnHost unit(compute(), unit_centers_);
  auto lookup = [&](int32_t e, float* out) {
    std::copy_n(unit.as<float>() + static_cast<int64_t>(e) * dim(), dim(), out);
  };
  for (int u = 0; u < updates; ++u)
    codebook_.apply(codebook_.compute_stats(unit_centers_), step, lookup);
  rebuild_lists();
}

void AirRouter::refresh_lists(MatrixView sample_tokens) {
  if (!query_)
    fail("refresh_lists: the router's lists are built from the centers, not from tokens");
  const OnHost centers(compute(), centers_);
  QueryLists fresh =
      build_query_lists(centers.view().matrix(), bias_, sample_tokens, query_->options, compute());
  codebook_ = std::move(fresh.codebook);
  query_ = QueryState{fresh.options, std::move(fresh.membership), fresh.build_flops};
  rebuild_lists();
}

ListMembership AirRouter::center_lists() const {
  const std::vector<int32_t> primary = codebook_.assign_capped(unit_centers_, options_.list_cap);
  const int per_expert = 1 + options_.spills;
  ListMembership m{{0}, {}, codebook_.size()};
  std::vector<int32_t> spilled;
  if (options_.spills > 0) {
    const SpillOptions spill{options_.spills, options_.spill_lambda,
                             options_.spills * options_.list_cap};
    spilled = soar_spills(codebook_, unit_centers_, primary, spill);
  }
  for (int64_t e = 0; e < experts(); ++e) {
    m.lists.push_back(primary[e]);
    m.lists.insert(m.lists.end(), spilled.begin() + e * options_.spills,
                   spilled.begin() + (e + 1) * options_.spills);
    m.offsets.push_back((e + 1) * per_expert);
  }
  return m;
}

void AirRouter::rebuild_lists() {
  const ListMembership membership = query_ ? query_->membership : center_lists();
  std::vector<int32_t> primary(static_cast<size_t>(experts()));
  for (int64_t e = 0; e < experts(); ++e) primary[e] = membership.lists[membership.offsets[e]];
  // The primary lists are disjoint, so probes whose primary lists hold k
  // experts give a shortlist of at least k distinct experts (stage 1's rule).
  lists_ = InvertedLists(primary, codebook_.size());
  list_sizes_ = list_sizes(compute(), lists_);
  segments_ = ListSegments(membership.offsets, membership.lists, codebook_.size());
  const OnHost centers(compute(), centers_);
  blocks_ = segments_.blocks(compute(), dim(), [&](int32_t e) {
    return centers.as<float>() + static_cast<int64_t>(e) * dim();
  });
}

double AirRouter::flops_per_token(double mean_shortlist) const {
  return 2.0 * static_cast<double>(codewords() * dim()) +
         2.0 * mean_shortlist * static_cast<double>(dim());
}

void AirRouter::set_bias(TensorView bias) {
  bias_ = checked_bias(compute(), bias, experts());
}

Routes AirRouter::route(MatrixView tokens, int k, int probes, GateMode mode) const {
  return route(Staged(compute(), tokens).view(), k, probes, mode).to_host(compute());
}

DeviceRoutes AirRouter::route(TensorView tokens, int k, int probes, GateMode mode) const {
  const Compute& c = compute();
  const Ops& ops = *c.ops;
  check_route_args(c, tokens, dim(), k, experts(), key_norm_bound_);
  require_in_range(probes, 1, codewords(), "probes m");
  const int64_t T = tokens.rows;
  DeviceRoutes r = make_device_routes(c, T, k, mode);
  if (T == 0) {
    r.probe_offsets = device_vector(c, std::vector<int64_t>{0});
    r.probed_codewords = ops.empty(DType::kI32, 0, 1);
    return r;
  }
  ProbeSet sel = ops.select_probes(tokens, codebook_.tensor(), list_sizes_, probes, k, c.stream);
  // An expert in several probed lists (spilled, query-aware) is scored in
  // each and kept once by scan_topk, except where the shortlist's softmax
  // needs each expert once in its log-sum-exp.
  const bool shortlist = mode == GateMode::kShortlist;
  const ScanUnit unit = shortlist ? ScanUnit::kSegments : ScanUnit::kLists;
  PairSet pairs = ops.probe_pairs(blocks_.view(), sel, unit, c.stream);
  r.probe_offsets = std::move(sel.offsets);
  r.probed_codewords = std::move(sel.codewords);
  r.shortlist_size = std::move(pairs.shortlist_size);
  // Each token's top-k over its pairs (a pair: a token and a run of a list's blocks). Stage 1
  // ranks lists by the unbiased probe scores; the bias re-ranks the experts of the scanned
  // lists.
  const Tensor lse = shortlist ? ops.empty(DType::kF64, T, 2) : Tensor();
  ops.scan_topk(blocks_.view(), tokens, pairs, k, {r.logits, r.experts, lse, bias_}, c.stream);
  ops.finalize_gates(r.logits, lse, r.log_normalizer, r.gates, gate_function(mode), c.stream);
  return r;
}

RouterGradients AirRouter::backward(MatrixView tokens, const Routes& routes,
                                    MatrixView d_gates) const {
  return backward(Staged(compute(), tokens).view(), to_device(compute(), routes),
                  Staged(compute(), d_gates).view())
      .to_host(compute());
}

DeviceRouterGradients AirRouter::backward(TensorView tokens, const DeviceRoutes& routes,
                                          TensorView d_gates) const {
  require_rows_of(compute(), tokens, dim(), "tokens");
  ShortlistEntries entries;  // with kShortlist, every expert the token's probes scanned
  if (routes.gate_mode == GateMode::kShortlist) {
    if (!routes.has_probes())
      fail("backward: shortlist gates need the routes' probes, which these routes lack");
    const std::vector<int64_t> offsets = host_vector<int64_t>(compute(), routes.probe_offsets);
    const std::vector<int32_t> codewords = host_vector<int32_t>(compute(), routes.probed_codewords);
    ProbedLists probed_lists;
    for (int64_t t = 0; t < routes.tokens; ++t) {
      const std::span<const int32_t> probed(codewords.data() + offsets[t],
                                            static_cast<size_t>(offsets[t + 1] - offsets[t]));
      segments_.for_each_scanned(probed, probed_lists, [&](int64_t s) {
        for (int32_t e : segments_.members(s)) {
          entries.token.push_back(static_cast<int32_t>(t));
          entries.expert.push_back(e);
        }
      });
    }
  }
  return center_router_backward(compute(), tokens, routes, d_gates, centers_, &entries);
}

}  // namespace airmoe::inline router
