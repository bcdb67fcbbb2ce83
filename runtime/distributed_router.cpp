#include "runtime/distributed_router.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "core/checks.h"
#include "core/clock.h"
#include "core/errors.h"
#include "core/hash.h"
#include "router/dense_router.h"
#include "runtime/wire.h"

namespace airmoe::runtime {

DistributedRouter::DistributedRouter(comm::Communicator& comm, Codebook codebook,
                                     std::vector<int32_t> assignment, Placement placement,
                                     MatrixView local_centers)
    : comm_(comm), codebook_(std::move(codebook)), placement_(std::move(placement)) {
  Matrix unit;
  comm::check_together(comm_, "distributed router set-up", [&] {
    if (placement_.ranks() != comm.size())
      fail("the placement is for " + std::to_string(placement_.ranks()) + " ranks, the job has " +
           std::to_string(comm.size()));
    lists_ = InvertedLists(assignment, codebook_.size());
    placement_.refresh(lists_);
    local_ids_ = placement_.local_experts(comm.rank());
    unit = checked_unit_rows(local_centers);
  });
  keep_local_centers(local_centers, std::move(unit));
  update_key_norm_bound();
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
  rebuild_blocks();
}

// The local check of the rows this rank hosts; returns their unit rows.
Matrix DistributedRouter::checked_unit_rows(MatrixView local_centers) const {
  if (local_centers.rows != static_cast<int64_t>(local_ids_.size()))
    fail("local centers have " + std::to_string(local_centers.rows) +
         " rows, the placement gives this rank " + std::to_string(local_ids_.size()) + " experts");
  if (local_centers.rows > 0) require_cols(local_centers, codebook_.dim(), "local centers");
  return normalize_rows(local_centers, "local centers");
}

// Kept only once every rank's check passed.
void DistributedRouter::keep_local_centers(MatrixView local_centers, Matrix unit) {
  local_unit_ = std::move(unit);
  local_centers_ = Matrix(local_centers.rows, codebook_.dim());
  std::copy_n(local_centers.data, local_centers.rows * local_centers.cols, local_centers_.data());
}

// Collective: max(1, largest center norm over all ranks), so that the home
// rank can refuse a token whose logits could overflow before any request
// leaves it (require_finite_logits).
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
      codebook_.compute(), lists_, codebook_.dim(),
      [&](int32_t e) { return placement_.owner(e) == me; },
      [&](int32_t e) { return local_centers_.row(local_row[e]); });
}

RouteResult DistributedRouter::route_batch(MatrixView tokens, int k, int probes, GateMode mode) {
  check_route_args(tokens, k, probes, mode);
  RouteResult result;
  {
    ScopedTimer timer(result.timings.shortlist);
    result.routes = shortlist(tokens, k, probes, mode);
  }
  {
    ScopedTimer timer(result.timings.requests);
    send_requests(result.routes, tokens);
  }
  LocalTopK best;
  {
    ScopedTimer timer(result.timings.scoring);
    best = score_segments(k, result.received);
  }
  {
    ScopedTimer timer(result.timings.replies);
    send_replies(best, result.received, k);
  }
  {
    ScopedTimer timer(result.timings.merge);
    merge(result.routes);
  }
  return result;
}

void DistributedRouter::check_route_args(MatrixView tokens, int k, int probes, GateMode mode) {
  comm::check_together(comm_, "route", [&] {
    airmoe::check_route_args(tokens, codebook_.dim(), k, lists_.experts(), key_norm_bound_);
    require_in_range(probes, 1, codebook_.size(), "probes m");
    if (mode == GateMode::kShortlist)
      fail(
          "the distributed router forms gates 'chosen' or 'sigmoid', not 'shortlist' (the "
          "shortlist's normalizer is spread over the serving ranks)");
  });
  comm::PhaseScope phase(comm_, "checks");
  comm::require_same_config(
      comm_,
      "k=" + std::to_string(k) + " m=" + std::to_string(probes) + " gates=" + to_string(mode),
      "route arguments k, probes and gate mode");
}

// 1. Shortlist locally against the replicated codebook.
Routes DistributedRouter::shortlist(MatrixView tokens, int k, int probes, GateMode mode) const {
  Routes r = make_routes(tokens.rows, k, mode);
  ProbeSelection sel = select_probes(codebook_, lists_, tokens, k, probes);
  r.probe_offsets = std::move(sel.offsets);
  r.probed_codewords = std::move(sel.codewords);
  r.shortlist_size = std::move(sel.shortlist_size);
  return r;
}

// 2. Scoring requests, only to the ranks hosting a segment of a probed list.
void DistributedRouter::send_requests(const Routes& routes, MatrixView tokens) {
  wire::scoring_requests(placement_, routes.probe_offsets, routes.probed_codewords, tokens,
                         comm_.size(), requests_);
  comm::PhaseScope phase(comm_, "requests");
  comm_.exchange(requests_.send, requests_in_);
}

// The requests received, in order of source rank then the source's order:
// one (request, probed list) scan pair per probed codeword.
DistributedRouter::ScanRequests DistributedRouter::read_requests(ReceivedTokens& received) const {
  const int64_t d = codebook_.dim(), C = codebook_.size();
  ScanRequests pairs;
  std::vector<float> vectors;
  pairs.offsets.assign(1, 0);
  wire::read_records(requests_in_, [&](wire::Reader& in, int32_t token, int32_t n) {
    const auto request = static_cast<int32_t>(received.home_rank.size());
    for (int32_t i = 0; i < n; ++i) {
      const auto list = in.take<int32_t>("probed codeword");
      if (list < 0 || list >= C)
        throw InternalError("request from rank " + std::to_string(in.source()) +
                            " probes codeword " + std::to_string(list) + " of " +
                            std::to_string(C));
      pairs.list.push_back(list);
      pairs.query.push_back(request);
    }
    pairs.offsets.push_back(static_cast<int64_t>(pairs.list.size()));
    received.home_rank.push_back(in.source());
    received.home_token.push_back(token);
    vectors.resize(vectors.size() + static_cast<size_t>(d));
    in.take_n(vectors.data() + vectors.size() - d, static_cast<size_t>(d), "token vector");
  });
  received.vectors = Matrix(static_cast<int64_t>(received.home_rank.size()), d);
  std::copy(vectors.begin(), vectors.end(), received.vectors.data());
  return pairs;
}

// 3. Scan this rank's segments for every request received; local top-k.
DistributedRouter::LocalTopK DistributedRouter::score_segments(int k, ReceivedTokens& received) {
  const ScanRequests pairs = read_requests(received);
  const Compute& c = codebook_.compute();
  const Ops& ops = *c.ops;
  const int64_t P = static_cast<int64_t>(pairs.list.size()), R = received.vectors.rows();
  const Tensor cand_z = ops.empty(DType::kF32, P, k), cand_id = ops.empty(DType::kI32, P, k);
  ops.scan_blocks(blocks_.view(), Staged(c, received.vectors.view()), device_vector(c, pairs.query),
                  device_vector(c, pairs.list), k, {cand_z, cand_id, {}, bias_}, c.stream);
  LocalTopK best{std::vector<float>(static_cast<size_t>(R * k)),
                 std::vector<int32_t>(static_cast<size_t>(R * k))};
  StagedOut z(c, TensorView(best.z.data(), DType::kF32, Device::host(), R, k));
  StagedOut id(c, TensorView(best.id.data(), DType::kI32, Device::host(), R, k));
  ops.merge_topk({cand_z, cand_id, {}, {}}, device_vector(c, pairs.offsets), k, {z, id, {}, bias_},
                 c.stream);
  z.finish();
  id.finish();
  return best;
}

// 4. Replies home, in request order per source rank: k ids, then k logits.
void DistributedRouter::send_replies(const LocalTopK& best, const ReceivedTokens& received, int k) {
  const auto R = static_cast<int64_t>(received.home_rank.size());
  std::vector<int64_t> bytes(static_cast<size_t>(comm_.size()), 0);
  for (int32_t home : received.home_rank) bytes[home] += wire::reply_bytes(k);
  replies_.reset(bytes);
  wire::Writer out(replies_);
  for (int64_t q = 0; q < R; ++q) {
    out.put(received.home_rank[q], best.id.data() + q * k, static_cast<size_t>(k));
    out.put(received.home_rank[q], best.z.data() + q * k, static_cast<size_t>(k));
  }
  out.finish();
  comm::PhaseScope phase(comm_, "replies");
  comm_.exchange(replies_, replies_in_);
}

// 5. The home rank merges the replies into the global top-k and the gates.
void DistributedRouter::merge(Routes& r) {
  const int k = r.k;
  const int64_t n = static_cast<int64_t>(requests_.targets.size());
  std::vector<wire::Reader> in = wire::readers(replies_in_);
  // Each (token, target) reply's k candidates, in (token, target) order.
  std::vector<int32_t> ids(static_cast<size_t>(n * k));
  std::vector<float> zs(static_cast<size_t>(n * k));
  for (int64_t i = 0; i < n; ++i) {
    wire::Reader& reply = in[requests_.targets[i]];
    reply.take_n(ids.data() + i * k, static_cast<size_t>(k), "reply expert ids");
    reply.take_n(zs.data() + i * k, static_cast<size_t>(k), "reply logits");
    for (int j = 0; j < k; ++j)  // the dispatch looks the id up in the placement
      if (ids[i * k + j] >= lists_.experts())
        throw InternalError("reply from rank " + std::to_string(reply.source()) + " names expert " +
                            std::to_string(ids[i * k + j]) +
                            " of E = " + std::to_string(lists_.experts()));
  }
  wire::expect_all_done(in, "merging the replies");
  const Compute& c = codebook_.compute();
  const Staged cand_z(c, TensorView(zs.data(), DType::kF32, Device::host(), n, k));
  const Staged cand_id(c, TensorView(ids.data(), DType::kI32, Device::host(), n, k));
  StagedOut z(c, TensorView(r.logits.data(), DType::kF32, Device::host(), r.tokens, k));
  StagedOut id(c, TensorView(r.experts.data(), DType::kI32, Device::host(), r.tokens, k));
  c.ops->merge_topk({cand_z, cand_id, {}, {}}, device_vector(c, requests_.target_offsets), k,
                    {z, id, {}, bias_}, c.stream);
  z.finish();
  id.finish();
  finalize_gates(r, c);
}

void DistributedRouter::set_local_centers(MatrixView local_centers) {
  Matrix unit;
  comm::check_together(comm_, "set_local_centers", [&] {
    if (local_centers.rows != static_cast<int64_t>(local_ids_.size()))
      fail("set_local_centers: " + std::to_string(local_centers.rows) + " rows, this rank hosts " +
           std::to_string(local_ids_.size()) + " experts");
    unit = checked_unit_rows(local_centers);
  });
  keep_local_centers(local_centers, std::move(unit));
  update_key_norm_bound();
  gather_assignment();
}

Tensor agreed_bias(comm::Communicator& comm, const Compute& compute, MatrixView bias,
                   int64_t experts) {
  Tensor checked;
  comm::check_together(comm, "set_bias", [&] { checked = checked_bias(compute, bias, experts); });
  const OnHost values(compute, checked);
  const std::string digest =
      std::to_string(fnv1a64(values.as<float>(), static_cast<size_t>(experts) * sizeof(float)));
  comm::PhaseScope phase(comm, "checks");
  comm::require_same_config(comm, "bias=" + digest, "selection bias");
  return checked;
}

void agree_no_bias(comm::Communicator& comm) {
  // agreed_bias's collectives, so a rank clearing while another sets raises
  // on every rank instead of hanging.
  comm::check_together(comm, "set_bias", [] {});
  comm::PhaseScope phase(comm, "checks");
  comm::require_same_config(comm, "bias=none", "selection bias");
}

void DistributedRouter::set_bias(MatrixView bias) {
  bias_ = agreed_bias(comm_, codebook_.compute(), bias, lists_.experts());
}

void DistributedRouter::clear_bias() {
  agree_no_bias(comm_);
  bias_ = Tensor();
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
  comm::check_together(comm_, "sync_codebook", [&] {
    if (!(step > 0.0 && step <= 1.0))
      fail("codebook update step = " + std::to_string(step) + " is outside (0, 1]");
    if (updates < 0) fail("updates = " + std::to_string(updates) + " must be >= 0");
  });
  for (int u = 0; u < updates; ++u) {
    const KMeansStats local = codebook_.compute_stats(local_unit_.view(), local_ids_.data());
    comm::PhaseScope phase(comm_, "kmeans_sync");
    KMeansStats total = reduce_sums(local);
    reduce_farthest(local, total);
    const std::vector<RepairRow> rows = repair_rows(total);
    codebook_.apply(total, step, [&](int32_t e, float* out) {
      for (const auto& [id, row] : rows)
        if (id == e) std::copy(row.begin(), row.end(), out);
    });
  }
  gather_assignment();
}

// Sums, counts and objective in one integer all-reduce: exact, whatever P.
KMeansStats DistributedRouter::reduce_sums(const KMeansStats& local) {
  const int64_t C = codebook_.size(), d = codebook_.dim();
  KMeansStats total(C, d);
  std::vector<int64_t> buf(local.sums);
  buf.insert(buf.end(), local.counts.begin(), local.counts.end());
  buf.push_back(local.objective);
  comm_.allreduce_sum(buf.data(), buf.size());
  std::copy_n(buf.begin(), C * d, total.sums.begin());
  std::copy_n(buf.begin() + C * d, C, total.counts.begin());
  total.objective = buf.back();
  return total;
}

// Each codeword's farthest member: gathered, merged by (cosine, expert id).
void DistributedRouter::reduce_farthest(const KMeansStats& local, KMeansStats& total) {
  const int64_t C = codebook_.size();
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
      if (farther_member(cos, id, total.farthest_cos[c], total.farthest_expert[c])) {
        total.farthest_cos[c] = cos;
        total.farthest_expert[c] = id;
      }
    }
}

// Rows for empty-codeword repair, broadcast from their owners.
std::vector<DistributedRouter::RepairRow> DistributedRouter::repair_rows(const KMeansStats& total) {
  const int64_t d = codebook_.dim();
  std::vector<RepairRow> rows;
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
  return rows;
}

}  // namespace airmoe::runtime
