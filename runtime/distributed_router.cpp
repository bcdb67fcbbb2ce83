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
#include "runtime/kmeans_sync.h"
#include "runtime/query_lists_sync.h"
#include "runtime/selection_bias.h"
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
  const auto mine = [&](int32_t e) { return placement_.owner(e) == me; };
  const auto center_of = [&](int32_t e) { return local_centers_.row(local_row[e]); };
  // Query lists overlap: this rank's members of every segment, the
  // outranking kept, so each probed expert is still scanned once.
  blocks_ = query_
                ? segments_.blocks(codebook_.compute(), codebook_.dim(), mine, center_of)
                : ListBlocks::build(codebook_.compute(), lists_, codebook_.dim(), mine, center_of);
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
    if (!request_keys_.empty()) {
      ScopedTimer pruning(result.timings.contenders);
      find_contenders(result.routes, tokens);
    }
    send_requests(result.routes, tokens);
  }
  LocalTopK best;
  {
    ScopedTimer timer(result.timings.scoring);
    best = score_segments(k, result.received, result.timings.scoring_pairs);
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
  if (query_) set_query_shortlist_sizes(r);
  return r;
}

// With overlapping lists the shortlist is the distinct experts of the
// scanned segments (what AirRouter's probe_pairs counts), not the sum of the
// primary lists' sizes.
void DistributedRouter::set_query_shortlist_sizes(Routes& r) const {
  ProbedLists probed_lists;
  for (int64_t t = 0; t < r.tokens; ++t) {
    const std::span<const int32_t> probed(
        r.probed_codewords.data() + r.probe_offsets[t],
        static_cast<size_t>(r.probe_offsets[t + 1] - r.probe_offsets[t]));
    int64_t members = 0;
    segments_.for_each_scanned(probed, probed_lists,
                               [&](int64_t s) { members += segments_.segment_size(s); });
    r.shortlist_size[t] = static_cast<int32_t>(members);
  }
}

// 1b. With request keys: every token's shortlist (the members of its probed
// lists, each once) bounded with the keys; what may still win is kept.
void DistributedRouter::find_contenders(Routes& r, MatrixView tokens) const {
  std::optional<OnHost> bias;
  if (has_bias()) bias.emplace(codebook_.compute(), bias_);
  const std::span<const float> b =
      bias ? std::span<const float>(bias->as<float>(), static_cast<size_t>(lists_.experts()))
           : std::span<const float>();
  if (!query_) {
    set_contenders(r, tokens, request_keys_, lists_, b);
    return;
  }
  // Query lists overlap: a token's groups are the segments it scans.
  TokenGroups scanned;
  ProbedLists scratch;
  for (int64_t t = 0; t < r.tokens; ++t) {
    segments_.for_each_scanned(probed_of(r, t), scratch,
                               [&](int64_t s) { scanned.ids.push_back(static_cast<int32_t>(s)); });
    scanned.offsets.push_back(static_cast<int64_t>(scanned.ids.size()));
  }
  Contenders found = request_keys_.contenders(tokens, r.k, b, scanned,
                                              [&](int32_t s) { return segments_.members(s); });
  r.contender_offsets = std::move(found.offsets);
  r.contenders = std::move(found.ids);
}

// 2. Scoring requests, only to the ranks hosting a segment of a probed list
// (with request keys: of those, the owners of a contender).
void DistributedRouter::send_requests(const Routes& routes, MatrixView tokens) {
  wire::scoring_requests(placement_, routes, tokens, comm_.size(), requests_);
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
DistributedRouter::LocalTopK DistributedRouter::score_segments(int k, ReceivedTokens& received,
                                                               double& pairs_seconds) {
  const ScanRequests pairs = read_requests(received);
  const Compute& c = codebook_.compute();
  const Ops& ops = *c.ops;
  const int64_t R = received.vectors.rows();
  // Each request's blocks: its probed lists, whole; an expert sitting in
  // several of them (query lists) is scored in each and kept once by
  // scan_topk (the distributed router has no shortlist softmax, which would
  // need it scored once).
  ProbeSet probes;
  probes.offsets = device_vector(c, pairs.offsets);
  probes.codewords = device_vector(c, pairs.list);
  probes.count = static_cast<int64_t>(pairs.list.size());
  PairSet scans;
  {
    ScopedTimer timer(pairs_seconds);
    scans = ops.probe_pairs(blocks_.view(), probes, ScanUnit::kLists, c.stream);
  }
  LocalTopK best{std::vector<float>(static_cast<size_t>(R * k)),
                 std::vector<int32_t>(static_cast<size_t>(R * k))};
  StagedOut z(c, TensorView(best.z.data(), DType::kF32, Device::host(), R, k));
  StagedOut id(c, TensorView(best.id.data(), DType::kI32, Device::host(), R, k));
  ops.scan_topk(blocks_.view(), Staged(c, received.vectors.view()), scans, k, {z, id, {}, bias_},
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
  update_request_keys();
  if (query_)
    rebuild_blocks();  // the query lists stay; their members' rows moved
  else
    gather_assignment();
}

void DistributedRouter::set_request_keys(int bits) {
  comm::check_together(comm_, "set_request_keys", [&] {
    if (bits != 0) check_request_key_bits(bits, "set_request_keys: bits");
  });
  {
    comm::PhaseScope phase(comm_, "checks");
    comm::require_same_config(comm_, "request_key_bits=" + std::to_string(bits),
                              "request key bits");
  }
  request_key_bits_ = bits;
  request_key_counts_ = RequestKeyCounts();
  gather_request_keys();
}

// Each rank quantizes its own experts (a row's keys depend on nothing else,
// so they are the same bits for any placement) and every rank gathers all
// (wire::key_records).
void DistributedRouter::gather_request_keys() {
  if (request_key_bits_ == 0) {
    request_keys_ = RequestKeys();
    return;
  }
  const QuantizedKeys mine = quantize_keys(local_centers_.view(), request_key_bits_);
  std::vector<char> all;
  {
    comm::PhaseScope phase(comm_, "request_keys");
    all = comm::allgatherv_vector<char>(comm_, wire::key_records(mine, local_ids_));
  }
  QuantizedKeys keys =
      wire::read_key_records(all, lists_.experts(), codebook_.dim(), request_key_bits_);
  request_keys_ = RequestKeys(std::move(keys));
  keyed_centers_ = local_centers_;
  ++request_key_counts_.gathers;
}

// Each local expert's drift since its key was made; all of them gathered in
// rank order (every rank knows each rank's experts from the placement), or,
// once one exceeds its key's rounding error, new keys.
void DistributedRouter::update_request_keys() {
  if (request_key_bits_ == 0) return;
  const int64_t d = codebook_.dim(), E = lists_.experts();
  const QuantizedKeys& keys = request_keys_.keys();
  std::vector<float> mine(local_ids_.size());
  double stale = 0.0;  // 1: some expert drifted past its key's error
  for (size_t i = 0; i < local_ids_.size(); ++i) {
    const auto row = static_cast<int64_t>(i);
    mine[i] = drift_norm(local_centers_.row(row), keyed_centers_.row(row), d);
    if (mine[i] > keys.error[local_ids_[i]]) stale = 1.0;
  }
  {
    comm::PhaseScope phase(comm_, "request_keys:drift");
    comm_.allreduce_max(&stale, 1);
  }
  if (stale > 0.0) {
    gather_request_keys();
    return;
  }
  std::vector<float> all;
  {
    comm::PhaseScope phase(comm_, "request_keys:drift");
    all = comm::allgatherv_vector<float>(comm_, mine);
  }
  if (static_cast<int64_t>(all.size()) != E)
    throw InternalError("request keys: gathered " + std::to_string(all.size()) +
                        " drifts, expected E = " + std::to_string(E));
  std::vector<float> drift(static_cast<size_t>(E));
  const std::vector<int32_t> order = placement_.experts_in_rank_order();
  for (size_t i = 0; i < order.size(); ++i) drift[order[i]] = all[i];
  request_keys_.set_drift(std::move(drift));
  ++request_key_counts_.drift_updates;
}

void DistributedRouter::set_bias(MatrixView bias) {
  bias_ = agreed_bias(comm_, codebook_.compute(), bias, lists_.experts());
}

void DistributedRouter::clear_bias() {
  agree_no_bias(comm_);
  bias_ = Tensor();
}

std::vector<int32_t> DistributedRouter::gathered_assignment(const Codebook& codebook) {
  std::vector<int32_t> mine;
  const std::vector<int32_t> lists = codebook.assign(local_unit_.view());
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
  return assignment;
}

void DistributedRouter::gather_assignment() {
  lists_ = InvertedLists(gathered_assignment(codebook_), codebook_.size());
  placement_.refresh(lists_);
  rebuild_blocks();
}

void DistributedRouter::sync_codebook(double step, int updates) {
  comm::check_together(comm_, "sync_codebook", [&] {
    if (query_)
      fail(
          "sync_codebook: the query lists' codebook is trained on tokens, not on the centers; "
          "call refresh_query_lists(sample_tokens)");
    if (!(step > 0.0 && step <= 1.0))
      fail("codebook update step = " + std::to_string(step) + " is outside (0, 1]");
    if (updates < 0) fail("updates = " + std::to_string(updates) + " must be >= 0");
  });
  const RowOwners rows{[&](int32_t e) { return placement_.owner(e); },
                       [&](int32_t e) {
                         const auto at = std::lower_bound(local_ids_.begin(), local_ids_.end(), e);
                         return local_unit_.row(at - local_ids_.begin());
                       }};
  for (int u = 0; u < updates; ++u)
    synced_kmeans_step(comm_, codebook_,
                       codebook_.compute_stats(local_unit_.view(), local_ids_.data()), step, rows);
  gather_assignment();
}

void DistributedRouter::refresh_query_lists(MatrixView sample_tokens,
                                            const QueryListOptions& options) {
  const int64_t E = lists_.experts(), d = codebook_.dim();
  comm::check_together(comm_, "refresh_query_lists", [&] {
    if (sample_tokens.rows > 0) require_cols(sample_tokens, d, "query lists: sample tokens");
    check_sample_rows(sample_tokens);
  });
  {
    comm::PhaseScope phase(comm_, "checks");
    comm::require_same_config(
        comm_,
        "C=" + std::to_string(options.codewords) + " L=" + std::to_string(options.list_length) +
            " k=" + std::to_string(options.k) + " iterations=" +
            std::to_string(options.kmeans_iterations) + " seed=" + std::to_string(options.seed),
        "query list options");
  }
  const SplitSample sample = split_sample(comm_, sample_tokens);
  comm::check_together(comm_, "refresh_query_lists", [&] {
    if (sample.total() < 1) fail("query lists: the sample has no tokens on any rank");
    require_expert_count(sample.total(), "query lists: sample tokens T");
    check_query_options(options, E, sample.total());
  });
  // Every current list probed is exact (dense) routing, with the bias.
  const Routes exact =
      route_batch(sample_tokens, options.k, static_cast<int>(codebook_.size())).routes;
  Codebook codebook = train_query_codebook(comm_, sample, options, codebook_.compute());
  PickCounts counts = count_routed_picks(codebook, sample_tokens, exact, E);
  {
    comm::PhaseScope phase(comm_, "query_lists");
    comm_.allreduce_sum(counts.data().data(), counts.data().size());
  }
  const std::vector<int32_t> home = gathered_assignment(codebook);
  ListMembership membership = lists_from_counts(counts, options.list_length, home);
  codebook_ = std::move(codebook);
  query_ = QueryState{options, std::move(membership),
                      router::query_lists_build_flops(sample.total(), E, d, options)};
  apply_query_lists();
}

void DistributedRouter::set_query_lists(QueryLists lists) {
  comm::check_together(comm_, "set_query_lists", [&] {
    if (lists.membership.experts() != lists_.experts())
      fail("set_query_lists: the lists hold E = " + std::to_string(lists.membership.experts()) +
           " experts, the router " + std::to_string(lists_.experts()));
    if (lists.codebook.dim() != codebook_.dim())
      fail("set_query_lists: codebook dimension " + std::to_string(lists.codebook.dim()) +
           ", the router's " + std::to_string(codebook_.dim()));
    if (lists.membership.list_count != lists.codebook.size())
      fail("set_query_lists: " + std::to_string(lists.membership.list_count) + " lists for " +
           std::to_string(lists.codebook.size()) + " codewords");
  });
  const auto cw = lists.codebook.codewords();
  const auto& m = lists.membership;
  const std::string digest =
      "codebook=" +
      std::to_string(fnv1a64(cw.data, static_cast<size_t>(cw.rows * cw.cols) * sizeof(float))) +
      " offsets=" + std::to_string(fnv1a64(m.offsets.data(), m.offsets.size() * sizeof(int64_t))) +
      " lists=" + std::to_string(fnv1a64(m.lists.data(), m.lists.size() * sizeof(int32_t)));
  {
    comm::PhaseScope phase(comm_, "checks");
    comm::require_same_config(comm_, digest, "query lists");
  }
  codebook_ = std::move(lists.codebook);
  query_ = QueryState{lists.options, std::move(lists.membership), lists.build_flops};
  apply_query_lists();
}

std::optional<QueryLists> DistributedRouter::query_lists() const {
  if (!query_) return std::nullopt;
  return QueryLists{query_->options, codebook_, query_->membership, query_->build_flops};
}

void DistributedRouter::apply_query_lists() {
  const ListMembership& m = query_->membership;
  std::vector<int32_t> primary(static_cast<size_t>(m.experts()));
  for (int64_t e = 0; e < m.experts(); ++e) primary[e] = m.lists[m.offsets[e]];
  // The primary lists are disjoint: stage 1's rule (probes whose lists hold
  // k experts) holds as in AirRouter.
  lists_ = InvertedLists(primary, codebook_.size());
  segments_ = ListSegments(m.offsets, m.lists, codebook_.size());
  placement_.refresh(m);
  rebuild_blocks();
}

}  // namespace airmoe::runtime
