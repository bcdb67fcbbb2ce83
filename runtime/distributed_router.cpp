#include "runtime/distributed_router.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "core/checks.h"
#include "core/clock.h"
#include "core/hash.h"
#include "router/dense_router.h"
#include "router/topk.h"
#include "runtime/wire.h"

namespace airmoe::runtime {
namespace {}  // namespace

DistributedRouter::DistributedRouter(comm::Communicator& comm, Codebook codebook,
                                     std::vector<int32_t> assignment, Placement placement,
                                     MatrixView local_centers)
    : comm_(comm), codebook_(std::move(codebook)), placement_(std::move(placement)) {
  std::string error;
  try {
    if (placement_.ranks() != comm.size())
      fail("the placement is for " + std::to_string(placement_.ranks()) + " ranks, the job has " +
           std::to_string(comm.size()));
    lists_ = InvertedLists(assignment, codebook_.size());
    placement_.refresh(lists_);
    local_ids_ = placement_.local_experts(comm.rank());
    if (local_centers.rows != static_cast<int64_t>(local_ids_.size()))
      fail("local centers have " + std::to_string(local_centers.rows) +
           " rows, the placement gives this rank " + std::to_string(local_ids_.size()) +
           " experts");
    if (local_centers.rows > 0) require_cols(local_centers, codebook_.dim(), "local centers");
    local_unit_ = normalize_rows(local_centers, "local centers");
    local_centers_ = Matrix(local_centers.rows, codebook_.dim());
    std::copy_n(local_centers.data, local_centers.rows * local_centers.cols, local_centers_.data());
  } catch (const std::exception& e) {
    error = e.what();
  }
  comm::raise_together(comm_, error, "distributed router set-up");
  // Same codebook, lists and placement everywhere, or nobody routes.
  const auto cw = codebook_.codewords();
  const std::string config =
      "E=" + std::to_string(lists_.experts()) + " C=" + std::to_string(codebook_.size()) +
      " d=" + std::to_string(codebook_.dim()) +
      " codebook=" + std::to_string(fnv1a64(cw.data, static_cast<size_t>(cw.rows * cw.cols) * 4)) +
      " lists=" + std::to_string(fnv1a64(assignment.data(), assignment.size() * 4)) +
      " placement=" + std::to_string(placement_.digest());
  {
    comm::PhaseScope phase(comm_, "checks");
    comm::require_same_config(comm_, config, "codebook, lists and placement");
  }
  update_key_norm_bound();
  rebuild_blocks();
}

void DistributedRouter::update_key_norm_bound() {
  double bound = std::max(1.0, max_row_norm(local_centers_.view()));
  comm::PhaseScope phase(comm_, "checks");
  comm_.allreduce_max(&bound, 1);
  key_norm_bound_ = bound;
}

void DistributedRouter::rebuild_blocks() {
  std::vector<int32_t> local_row(static_cast<size_t>(lists_.experts()), -1);
  for (size_t i = 0; i < local_ids_.size(); ++i) local_row[local_ids_[i]] = static_cast<int32_t>(i);
  const int me = comm_.rank();
  blocks_ = ListBlocks::build(
      lists_, codebook_.dim(), [&](int32_t e) { return placement_.owner(e) == me; },
      [&](int32_t e) { return local_centers_.row(local_row[e]); });
}

Routes DistributedRouter::route(MatrixView tokens, int k, int probes) {
  const int64_t d = codebook_.dim(), T = tokens.rows;
  const int P = comm_.size();
  std::string error;
  try {
    check_route_args(tokens, d, k, lists_.experts(), key_norm_bound_);
    require_in_range(probes, 1, codebook_.size(), "probes m");
  } catch (const std::exception& e) {
    error = e.what();
  }
  comm::raise_together(comm_, error, "route");
  {
    comm::PhaseScope phase(comm_, "checks");
    comm::require_same_config(comm_, "k=" + std::to_string(k) + " m=" + std::to_string(probes),
                              "route arguments k and probes");
  }
  timings_ = {};
  double t0 = clock_seconds();

  // 1. Shortlist locally.
  Routes r = make_routes(T, k, GateMode::kChosen);
  ProbeSelection sel = select_probes(codebook_, lists_, tokens, k, probes);
  r.probe_offsets = std::move(sel.offsets);
  r.probes = std::move(sel.codewords);
  r.shortlist_size = std::move(sel.shortlist_size);
  double t1 = clock_seconds();
  timings_.shortlist = t1 - t0;

  // 2. Scoring requests, only to the ranks hosting a segment of a probed list.
  wire::Outbox out = wire::scoring_requests(placement_, r.probe_offsets, r.probes, tokens, P);
  const std::vector<int64_t>& target_offsets = out.target_offsets;
  const std::vector<int32_t>& targets = out.targets;
  std::vector<std::vector<char>> recv;
  {
    comm::PhaseScope phase(comm_, "requests");
    recv = comm_.alltoallv(out.send);
  }
  double t2 = clock_seconds();
  timings_.requests = t2 - t1;

  // 3. Scan this rank's segments for every request received.
  received_ = ReceivedTokens{};
  ScanPairs pairs;
  std::vector<int64_t> request_pairs{0};  // CSR: request -> its pairs
  std::vector<char> vectors;
  for (int src = 0; src < P; ++src) {
    const std::vector<char>& buf = recv[src];
    size_t at = 0;
    while (at < buf.size()) {
      const int32_t token = wire::take<int32_t>(buf, at), n = wire::take<int32_t>(buf, at);
      const int32_t request = static_cast<int32_t>(received_.home_rank.size());
      for (int32_t i = 0; i < n; ++i) {
        pairs.list.push_back(wire::take<int32_t>(buf, at));
        pairs.query.push_back(request);
      }
      request_pairs.push_back(static_cast<int64_t>(pairs.list.size()));
      received_.home_rank.push_back(src);
      received_.home_token.push_back(token);
      vectors.insert(vectors.end(), buf.data() + at, buf.data() + at + d * 4);
      at += static_cast<size_t>(d) * 4;
    }
  }
  const int64_t R = static_cast<int64_t>(received_.home_rank.size());
  received_.vectors = Matrix(R, d);
  if (R) std::memcpy(received_.vectors.data(), vectors.data(), vectors.size());
  std::vector<float> cand_z;
  std::vector<int32_t> cand_id;
  scan_lists(blocks_, received_.vectors.view(), pairs, k, cand_z, cand_id, nullptr);

  // Local top-k per request, replies in request order per source rank.
  std::vector<float> best_z(static_cast<size_t>(R * k));
  std::vector<int32_t> best_id(static_cast<size_t>(R * k));
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < R; ++q) {
    TopK top(k, best_z.data() + q * k, best_id.data() + q * k);
    for (int64_t p = request_pairs[q]; p < request_pairs[q + 1]; ++p)
      for (int j = 0; j < k && cand_id[p * k + j] >= 0; ++j)
        top.push(cand_z[p * k + j], cand_id[p * k + j]);
  }
  std::vector<std::vector<char>> reply(static_cast<size_t>(P));
  for (int64_t q = 0; q < R; ++q) {
    auto& buf = reply[received_.home_rank[q]];
    wire::put(buf, best_id.data() + q * k, static_cast<size_t>(k));
    wire::put(buf, best_z.data() + q * k, static_cast<size_t>(k));
  }
  double t3 = clock_seconds();
  timings_.scoring = t3 - t2;

  // 4. Replies home, merged into the global top-k.
  std::vector<std::vector<char>> answers;
  {
    comm::PhaseScope phase(comm_, "replies");
    answers = comm_.alltoallv(reply);
  }
  double t4 = clock_seconds();
  timings_.replies = t4 - t3;
  std::vector<size_t> cursor(static_cast<size_t>(P), 0);
  std::vector<int32_t> ids(static_cast<size_t>(k));
  std::vector<float> zs(static_cast<size_t>(k));
  for (int64_t t = 0; t < T; ++t) {
    TopK top(k, r.logits.data() + t * k, r.experts.data() + t * k);
    for (int64_t i = target_offsets[t]; i < target_offsets[t + 1]; ++i) {
      const auto& buf = answers[targets[i]];
      size_t& at = cursor[targets[i]];
      std::memcpy(ids.data(), buf.data() + at, static_cast<size_t>(k) * 4);
      std::memcpy(zs.data(), buf.data() + at + static_cast<size_t>(k) * 4,
                  static_cast<size_t>(k) * 4);
      at += static_cast<size_t>(k) * 8;
      for (int j = 0; j < k && ids[j] >= 0; ++j) top.push(zs[j], ids[j]);
    }
  }
  finalize_gates(r);
  timings_.merge = clock_seconds() - t4;
  return r;
}

void DistributedRouter::set_local_centers(MatrixView local_centers) {
  std::string error;
  Matrix unit;
  try {
    if (local_centers.rows != static_cast<int64_t>(local_ids_.size()))
      fail("set_local_centers: " + std::to_string(local_centers.rows) + " rows, this rank hosts " +
           std::to_string(local_ids_.size()) + " experts");
    if (local_centers.rows > 0) require_cols(local_centers, codebook_.dim(), "local centers");
    unit = normalize_rows(local_centers, "local centers");
  } catch (const std::exception& e) {
    error = e.what();
  }
  comm::raise_together(comm_, error, "set_local_centers");
  local_unit_ = std::move(unit);
  local_centers_ = Matrix(local_centers.rows, codebook_.dim());
  std::copy_n(local_centers.data, local_centers.rows * local_centers.cols, local_centers_.data());
  update_key_norm_bound();
  gather_assignment();
}

void DistributedRouter::gather_assignment() {
  std::vector<int32_t> mine;
  const std::vector<int32_t> lists = codebook_.assign(local_unit_.view());
  for (size_t i = 0; i < local_ids_.size(); ++i) {
    mine.push_back(local_ids_[i]);
    mine.push_back(lists[i]);
  }
  std::vector<int32_t> all;
  {
    comm::PhaseScope phase(comm_, "list_sync");
    all = comm::allgatherv_vector<int32_t>(comm_, mine);
  }
  std::vector<int32_t> assignment(static_cast<size_t>(lists_.experts()), -1);
  for (size_t i = 0; i + 1 < all.size(); i += 2) assignment[all[i]] = all[i + 1];
  lists_ = InvertedLists(assignment, codebook_.size());
  placement_.refresh(lists_);
  rebuild_blocks();
}

void DistributedRouter::sync_codebook(double step, int updates) {
  std::string error;
  if (!(step > 0.0 && step <= 1.0))
    error = "codebook update step = " + std::to_string(step) + " is outside (0, 1]";
  if (updates < 0) error = "updates = " + std::to_string(updates) + " must be >= 0";
  comm::raise_together(comm_, error, "sync_codebook");
  const int64_t C = codebook_.size(), d = codebook_.dim();
  for (int u = 0; u < updates; ++u) {
    const KMeansStats local = codebook_.compute_stats(local_unit_.view(), local_ids_.data());
    KMeansStats total(C, d);
    comm::PhaseScope phase(comm_, "kmeans_sync");
    // Sums, counts and objective in one integer all-reduce: exact.
    std::vector<int64_t> buf(local.sums);
    buf.insert(buf.end(), local.counts.begin(), local.counts.end());
    buf.push_back(local.objective);
    comm_.allreduce_sum(buf.data(), buf.size());
    std::copy_n(buf.begin(), C * d, total.sums.begin());
    std::copy_n(buf.begin() + C * d, C, total.counts.begin());
    total.objective = buf.back();
    // Farthest members: gathered, merged by (cosine, expert id).
    std::vector<int64_t> far(static_cast<size_t>(2 * C));
    for (int64_t c = 0; c < C; ++c) {
      far[2 * c] = local.farthest_cos[c];
      far[2 * c + 1] = local.farthest_expert[c];
    }
    std::vector<int64_t> all_far(far.size() * static_cast<size_t>(comm_.size()));
    comm_.allgather(far.data(), far.size() * sizeof(int64_t), all_far.data());
    for (int r = 0; r < comm_.size(); ++r)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t cos = all_far[r * 2 * C + 2 * c];
        const auto id = static_cast<int32_t>(all_far[r * 2 * C + 2 * c + 1]);
        if (id < 0) continue;
        if (total.farthest_expert[c] < 0 || cos < total.farthest_cos[c] ||
            (cos == total.farthest_cos[c] && id < total.farthest_expert[c])) {
          total.farthest_cos[c] = cos;
          total.farthest_expert[c] = id;
        }
      }
    // Rows for empty-codeword repair come from their owners.
    std::vector<std::pair<int32_t, std::vector<float>>> rows;
    for (const Codebook::Repair& rep : Codebook::plan_repairs(total)) {
      std::vector<float> row(static_cast<size_t>(d));
      const int owner = placement_.owner(rep.expert);
      if (owner == comm_.rank()) {
        const auto at = std::lower_bound(local_ids_.begin(), local_ids_.end(), rep.expert);
        std::copy_n(local_unit_.row(at - local_ids_.begin()), d, row.data());
      }
      comm_.broadcast(row.data(), row.size() * sizeof(float), owner);
      rows.emplace_back(rep.expert, std::move(row));
    }
    codebook_.apply(total, step, [&](int32_t e, float* out) {
      for (const auto& [id, row] : rows)
        if (id == e) std::copy(row.begin(), row.end(), out);
    });
  }
  gather_assignment();
}

}  // namespace airmoe::runtime
