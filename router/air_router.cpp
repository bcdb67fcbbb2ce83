#include "router/air_router.h"

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "router/checks.h"
#include "router/dense_router.h"
#include "router/scoring.h"
#include "router/topk.h"

namespace airmoe {
namespace {

constexpr int64_t kTokensPerTask = 64;

Matrix copy_of(MatrixView m) {
  Matrix out(m.rows, m.cols);
  std::copy_n(m.data, m.rows * m.cols, out.data());
  return out;
}

// Codewords for one token: the best `probes` by (score, lower id), extended
// in score order until their lists hold at least k experts.
void select_probes(const float* s, int64_t C, int probes, int k, const InvertedLists& lists,
                   std::vector<int32_t>& order, std::vector<int32_t>& out) {
  out.clear();
  auto better = [s](int32_t a, int32_t b) { return ranks_before(s[a], a, s[b], b); };
  int64_t members = 0;
  if (static_cast<int64_t>(probes) * 8 < C) {
    std::vector<float> z(static_cast<size_t>(probes));
    out.resize(static_cast<size_t>(probes));
    TopK top(probes, z.data(), out.data());
    for (int64_t c = 0; c < C; ++c) top.push_ascending(s[c], static_cast<int32_t>(c));
    for (int32_t c : out) members += lists.list_size(c);
    if (members >= k) return;
  }
  // Many probes, or the shortlist came up short: rank every codeword.
  order.resize(static_cast<size_t>(C));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), better);
  out.clear();
  members = 0;
  for (int64_t i = 0; i < C; ++i) {
    if (i >= probes && members >= k) break;
    out.push_back(order[i]);
    members += lists.list_size(order[i]);
  }
}

}  // namespace

AirRouter::AirRouter(MatrixView centers, const AirConfig& config)
    : AirRouter(centers,
                train_codebook(centers, {config.codewords, config.kmeans_iterations, config.seed}),
                config.list_cap) {}

AirRouter::AirRouter(MatrixView centers, Codebook codebook, int64_t list_cap)
    : codebook_(std::move(codebook)), list_cap_(list_cap) {
  if (list_cap < 0) fail("list cap must be >= 0 (0: no cap), got " + std::to_string(list_cap));
  set_centers(centers);
}

void AirRouter::set_centers(MatrixView centers) {
  if (centers.rows < 1) fail("centers must have at least one row");
  require_cols(centers, codebook_.dim(), "centers");
  if (codebook_.size() > centers.rows)
    fail("number of codewords C = " + std::to_string(codebook_.size()) +
         " exceeds E = " + std::to_string(centers.rows));
  Matrix unit = normalize_rows(centers, "centers");  // validates finite, nonzero
  centers_ = copy_of(centers);
  unit_centers_ = std::move(unit);
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
  lists_ =
      InvertedLists(codebook_.assign_capped(unit_centers_.view(), list_cap_), codebook_.size());
  list_centers_ = Matrix(experts(), dim());
  const auto& ids = lists_.ids();
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < experts(); ++p)
    std::copy_n(centers_.row(ids[p]), dim(), list_centers_.row(p));
}

double AirRouter::flops_per_token(double mean_shortlist) const {
  return 2.0 * static_cast<double>(codewords() * dim()) +
         2.0 * mean_shortlist * static_cast<double>(dim());
}

Routes AirRouter::route(MatrixView tokens, int k, int probes, GateMode mode) const {
  check_route_args(tokens, dim(), k, experts());
  require_in_range(probes, 1, codewords(), "probes m");
  const int64_t T = tokens.rows, C = codewords(), d = dim();
  Routes r = make_routes(T, k, mode);
  r.probe_offsets.assign(static_cast<size_t>(T + 1), 0);
  if (T == 0) return r;

  // Stage 1: probe scores and per-token codeword choice.
  std::vector<std::vector<int32_t>> chosen(static_cast<size_t>(T));
  {
    const int64_t block = std::max<int64_t>(3, (int64_t{4} << 20) / C);
    std::vector<float> scores(static_cast<size_t>(std::min(block, T) * C));
    for (int64_t t0 = 0; t0 < T; t0 += block) {
      const int64_t n = std::min(block, T - t0);
      score_nt(tokens.row(t0), d, codebook_.codewords().data, d, n, C, d, scores.data(), C);
#pragma omp parallel
      {
        std::vector<int32_t> order;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i)
          select_probes(scores.data() + i * C, C, probes, k, lists_, order, chosen[t0 + i]);
      }
    }
  }
  for (int64_t t = 0; t < T; ++t)
    r.probe_offsets[t + 1] = r.probe_offsets[t] + static_cast<int64_t>(chosen[t].size());
  r.probes.resize(static_cast<size_t>(r.probe_offsets[T]));
  for (int64_t t = 0; t < T; ++t) {
    std::copy(chosen[t].begin(), chosen[t].end(), r.probes.begin() + r.probe_offsets[t]);
    int64_t members = 0;
    for (int32_t c : chosen[t]) members += lists_.list_size(c);
    r.shortlist_size[t] = static_cast<int32_t>(members);
  }
  chosen.clear();

  // Group (token, probe) pairs by list with a counting sort in token order.
  const int64_t P = r.probe_offsets[T];
  std::vector<int64_t> group_offsets(static_cast<size_t>(C + 1), 0);
  for (int32_t c : r.probes) ++group_offsets[c + 1];
  for (int64_t c = 0; c < C; ++c) group_offsets[c + 1] += group_offsets[c];
  std::vector<int64_t> group(static_cast<size_t>(P));  // probe positions, by list
  std::vector<int32_t> token_of(static_cast<size_t>(P));
  {
    std::vector<int64_t> next(group_offsets.begin(), group_offsets.end() - 1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t p = r.probe_offsets[t]; p < r.probe_offsets[t + 1]; ++p) {
        group[next[r.probes[p]]++] = p;
        token_of[p] = static_cast<int32_t>(t);
      }
  }
  struct Task {
    int32_t list;
    int64_t begin, end;  // into group
  };
  std::vector<Task> tasks;
  for (int64_t c = 0; c < C; ++c) {
    if (lists_.list_size(c) == 0) continue;
    for (int64_t b = group_offsets[c]; b < group_offsets[c + 1]; b += kTokensPerTask)
      tasks.push_back(
          {static_cast<int32_t>(c), b, std::min(b + kTokensPerTask, group_offsets[c + 1])});
  }

  // Stage 2: per (token, probe), the list's local top-k (and log-sum-exp).
  std::vector<float> cand_z(static_cast<size_t>(P * k));
  std::vector<int32_t> cand_id(static_cast<size_t>(P * k));
  std::vector<LogSumExp> cand_lse(mode == GateMode::kShortlist ? static_cast<size_t>(P) : 0);
  for (int64_t p = 0; p < P; ++p)  // probes of empty lists keep empty slots
    TopK(k, cand_z.data() + p * k, cand_id.data() + p * k);
#pragma omp parallel
  {
    std::vector<float> xbuf(static_cast<size_t>(kTokensPerTask * d));
    std::vector<float> zbuf;
#pragma omp for schedule(dynamic, 1)
    for (size_t ti = 0; ti < tasks.size(); ++ti) {
      const Task& task = tasks[ti];
      const int64_t n = task.end - task.begin;
      const int64_t L = lists_.list_size(task.list);
      const int64_t first = lists_.list_offset(task.list);
      const int32_t* ids = lists_.ids().data() + first;
      for (int64_t i = 0; i < n; ++i)
        std::copy_n(tokens.row(token_of[group[task.begin + i]]), d, xbuf.data() + i * d);
      zbuf.resize(static_cast<size_t>(n * L));
      score_nt(xbuf.data(), d, list_centers_.row(first), d, n, L, d, zbuf.data(), L);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = group[task.begin + i];
        const float* z = zbuf.data() + i * L;
        TopK top(k, cand_z.data() + p * k, cand_id.data() + p * k);
        for (int64_t j = 0; j < L; ++j) top.push_ascending(z[j], ids[j]);
        if (mode == GateMode::kShortlist)
          for (int64_t j = 0; j < L; ++j) cand_lse[p].add(z[j]);
      }
    }
  }

  // Merge each token's candidates in probe order.
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    TopK top(k, r.logits.data() + t * k, r.experts.data() + t * k);
    LogSumExp lse;
    for (int64_t p = r.probe_offsets[t]; p < r.probe_offsets[t + 1]; ++p) {
      for (int j = 0; j < k && cand_id[p * k + j] >= 0; ++j)
        top.push(cand_z[p * k + j], cand_id[p * k + j]);
      if (mode == GateMode::kShortlist) lse.merge(cand_lse[p]);
    }
    if (mode == GateMode::kShortlist) r.log_normalizer[t] = lse.value();
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
        for (int64_t p = routes.probe_offsets[t]; p < routes.probe_offsets[t + 1]; ++p)
          for (int32_t e : lists_.list(routes.probes[p])) visit(e);
      });
}

}  // namespace airmoe
