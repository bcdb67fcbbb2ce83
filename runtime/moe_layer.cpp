#include "runtime/moe_layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <unordered_map>

#include "core/checks.h"
#include "core/clock.h"
#include "router/metrics.h"
#include "runtime/wire.h"

namespace airmoe::runtime {
namespace {

using wire::put;
using wire::take;
using wire::take_n;

// Per input row of a plan, in serving order, one fixed-size block of floats
// to its home rank; the home reads them back in its own (token, target) order.
std::vector<std::vector<char>> rows_home(
    const DispatchPlan& plan, int P,
    const std::function<void(int64_t, std::vector<char>&)>& write) {
  std::vector<std::vector<char>> out(static_cast<size_t>(P));
  for (int64_t i = 0; i < plan.inputs.rows(); ++i) write(i, out[plan.input_home[i]]);
  return out;
}

}  // namespace

const char* to_string(Strategy s) {
  switch (s) {
    case Strategy::kAir:
      return "air";
    case Strategy::kDenseReplicated:
      return "dense-replicated";
    case Strategy::kDenseBroadcast:
      return "dense-broadcast";
  }
  return "?";
}

Strategy strategy_from_string(const std::string& name) {
  if (name == "air") return Strategy::kAir;
  if (name == "dense-replicated") return Strategy::kDenseReplicated;
  if (name == "dense-broadcast") return Strategy::kDenseBroadcast;
  fail("strategy '" + name + "' is unknown (expected air, dense-replicated or dense-broadcast)");
}

MoELayer::MoELayer(comm::Communicator& comm, Strategy strategy, MoEConfig config, Codebook codebook,
                   std::vector<int32_t> assignment, Placement placement, MatrixView centers,
                   uint64_t expert_seed)
    : comm_(comm),
      strategy_(strategy),
      config_(config),
      codebook_(std::move(codebook)),
      assignment_(std::move(assignment)),
      placement_(std::move(placement)) {
  std::string error;
  try {
    if (centers.rows != placement_.experts())
      fail("centers have " + std::to_string(centers.rows) + " rows for " +
           std::to_string(placement_.experts()) + " experts");
    require_cols(centers, codebook_.dim(), "centers");
    if (config_.expert.dim != codebook_.dim())
      fail("expert dim " + std::to_string(config_.expert.dim) +
           " differs from d = " + std::to_string(codebook_.dim()));
    require_in_range(config_.k, 1, placement_.experts(), "k");
    require_in_range(config_.probes, 1, codebook_.size(), "probes m");
    const std::vector<int32_t> ids = placement_.local_experts(comm.rank());
    experts_ = ExpertShard::random(config_.expert, ids, expert_seed);
    local_centers_ = Matrix(static_cast<int64_t>(ids.size()), centers.cols);
    for (size_t i = 0; i < ids.size(); ++i)
      std::copy_n(centers.row(ids[i]), centers.cols, local_centers_.row(static_cast<int64_t>(i)));
    if (strategy_ == Strategy::kDenseReplicated) {
      all_centers_ = Matrix(centers.rows, centers.cols);
      std::copy_n(centers.data, centers.rows * centers.cols, all_centers_.data());
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  comm::raise_together(comm_, error, "MoE layer set-up");
  {
    // Same strategy, shapes and expert configuration everywhere, or nobody
    // dispatches (a rank with another h would misread every record).
    comm::PhaseScope phase(comm_, "checks");
    comm::require_same_config(
        comm_,
        std::string(to_string(strategy_)) + " k=" + std::to_string(config_.k) +
            " m=" + std::to_string(config_.probes) + " d=" + std::to_string(config_.expert.dim) +
            " h=" + std::to_string(config_.expert.hidden) + " act=" +
            to_string(config_.expert.activation) + " seed=" + std::to_string(expert_seed) +
            " placement=" + std::to_string(placement_.digest()),
        "MoE layer configuration");
  }
  build_router();
}

void MoELayer::build_router() {
  if (strategy_ == Strategy::kDenseReplicated) {
    dense_ = std::make_unique<DenseRouter>(all_centers_.view());
  } else {
    router_ = std::make_unique<DistributedRouter>(comm_, codebook_, assignment_, placement_,
                                                  local_centers_.view());
  }
}

const float* MoELayer::center_row(int32_t expert) const {
  const int64_t i = experts_.index_of(expert);
  return i >= 0 ? local_centers_.row(i) : all_centers_.row(expert);
}

Matrix MoELayer::forward(MatrixView tokens, DispatchPlan& plan) {
  const int P = comm_.size();
  const int k = config_.k;
  const int64_t d = codebook_.dim(), T = tokens.rows;
  seconds_ = {};
  plan = DispatchPlan{};
  plan.strategy = strategy_;
  plan.placement_digest = placement_.digest();

  // 1. Route.
  double t0 = clock_seconds();
  if (strategy_ == Strategy::kDenseReplicated) {
    std::string error;
    try {
      check_route_args(tokens, d, k, placement_.experts());
    } catch (const std::exception& e) {
      error = e.what();
    }
    comm::raise_together(comm_, error, "MoE forward");
    plan.routes = dense_->route(tokens, k);
    router_flops_ = dense_->flops_per_token();
  } else {
    const int m = strategy_ == Strategy::kAir ? config_.probes : static_cast<int>(codebook_.size());
    plan.routes = router_->route(tokens, k, m);
    router_flops_ = 2.0 * static_cast<double>(codebook_.size() * d) +
                    2.0 * shortlist_stats(plan.routes).mean * static_cast<double>(d);
  }
  const Routes& routes = plan.routes;
  double t1 = clock_seconds();
  seconds_.route = t1 - t0;

  // 2. Dispatch: per (token, target rank) the slots that rank serves.
  const bool ship_vectors = strategy_ == Strategy::kDenseReplicated;
  wire::Outbox out_box = wire::expert_dispatch(placement_, routes, tokens, ship_vectors, P);
  plan.target_offsets = std::move(out_box.target_offsets);
  plan.targets = std::move(out_box.targets);
  plan.slot_offsets = std::move(out_box.slot_offsets);
  plan.slots = std::move(out_box.slots);
  std::vector<std::vector<char>> recv;
  {
    comm::PhaseScope phase(comm_, "dispatch");
    recv = comm_.alltoallv(out_box.send);
  }
  double t2 = clock_seconds();
  seconds_.dispatch = t2 - t1;

  // 3. Serve: one input row per (home, token); the vector came with the
  //    dispatch (dense-replicated) or with the scoring request (fused).
  std::unordered_map<int64_t, int64_t> received_row;
  if (!ship_vectors) {
    const ReceivedTokens& got = router_->received();
    for (size_t i = 0; i < got.home_rank.size(); ++i)
      received_row[(static_cast<int64_t>(got.home_rank[i]) << 32) | got.home_token[i]] =
          static_cast<int64_t>(i);
  }
  std::vector<float> inputs;
  plan.input_pairs.assign(1, 0);
  for (int src = 0; src < P; ++src) {
    const std::vector<char>& buf = recv[src];
    size_t at = 0;
    while (at < buf.size()) {
      const int32_t token = take<int32_t>(buf, at), n = take<int32_t>(buf, at);
      const auto row = static_cast<int32_t>(plan.input_home.size());
      for (int32_t i = 0; i < n; ++i) {
        plan.pairs.token.push_back(row);
        plan.pairs.expert.push_back(take<int32_t>(buf, at));
        plan.pairs.gate.push_back(take<float>(buf, at));
      }
      plan.input_home.push_back(src);
      plan.input_pairs.push_back(static_cast<int64_t>(plan.pairs.size()));
      const size_t base = inputs.size();
      inputs.resize(base + static_cast<size_t>(d));
      if (ship_vectors) {
        take_n(buf, at, inputs.data() + base, static_cast<size_t>(d));
      } else {
        const auto it = received_row.find((static_cast<int64_t>(src) << 32) | token);
        if (it == received_row.end())
          throw std::logic_error("MoE forward: rank " + std::to_string(comm_.rank()) +
                                 " must serve a token it was never sent");
        std::copy_n(router_->received().vectors.row(it->second), d, inputs.data() + base);
      }
    }
  }
  plan.inputs = Matrix(static_cast<int64_t>(plan.input_home.size()), d);
  std::copy(inputs.begin(), inputs.end(), plan.inputs.data());
  Matrix partial(plan.inputs.rows(), d);
  plan.cache = experts_.forward(plan.inputs.view(), plan.pairs, partial);
  double t3 = clock_seconds();
  seconds_.experts = t3 - t2;

  // 4. Combine: one partial vector per (token, rank) back home, summed there
  //    in ascending rank order.
  std::vector<std::vector<char>> back;
  {
    comm::PhaseScope phase(comm_, "combine");
    back = comm_.alltoallv(rows_home(plan, P, [&](int64_t i, std::vector<char>& buf) {
      put(buf, partial.row(i), static_cast<size_t>(d));
    }));
  }
  Matrix out(T, d);
  std::vector<size_t> cursor(static_cast<size_t>(P), 0);
  std::vector<float> part(static_cast<size_t>(d));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = plan.target_offsets[t]; i < plan.target_offsets[t + 1]; ++i) {
      take_n(back[plan.targets[i]], cursor[plan.targets[i]], part.data(), static_cast<size_t>(d));
      for (int64_t c = 0; c < d; ++c) out(t, c) += part[c];
    }
  seconds_.combine = clock_seconds() - t3;
  return out;
}

MoEGradients MoELayer::backward(DispatchPlan& plan, MatrixView d_out) {
  const int P = comm_.size();
  const int k = config_.k;
  const int64_t d = codebook_.dim(), T = plan.routes.tokens;
  std::string error;
  if (plan.placement_digest != placement_.digest() || plan.strategy != strategy_)
    error =
        "the plan was made under another placement or strategy (a re-plan happened between "
        "forward and backward); run forward again";
  else if (d_out.rows != T || d_out.cols != d)
    error = "d_out is [" + std::to_string(d_out.rows) + ", " + std::to_string(d_out.cols) +
            "], expected [" + std::to_string(T) + ", " + std::to_string(d) + "]";
  else {
    try {
      require_finite(d_out, "d_out");
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  comm::raise_together(comm_, error, "MoE backward");
  double t0 = clock_seconds();

  // Round 1: dL/dy out to every rank that served the token; the experts'
  // backward there; dL/dgate of each pair back home.
  std::vector<std::vector<char>> send(static_cast<size_t>(P));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = plan.target_offsets[t]; i < plan.target_offsets[t + 1]; ++i)
      put(send[plan.targets[i]], d_out.row(t), static_cast<size_t>(d));
  std::vector<std::vector<char>> recv;
  {
    comm::PhaseScope phase(comm_, "grad_dispatch");
    recv = comm_.alltoallv(send);
  }
  const int64_t R = plan.inputs.rows();
  Matrix dy(R, d);
  {
    std::vector<size_t> cursor(static_cast<size_t>(P), 0);
    for (int64_t i = 0; i < R; ++i)
      take_n(recv[plan.input_home[i]], cursor[plan.input_home[i]], dy.row(i),
             static_cast<size_t>(d));
  }
  double t1 = clock_seconds();
  MoEGradients grads;
  plan.pair_dx = Matrix(R, d);
  grads.touched_experts = experts_.backward(plan.inputs.view(), plan.pairs, plan.cache, dy.view(),
                                            plan.pair_d_gate, plan.pair_dx);
  if (config_.dense_expert_grads) grads.experts = experts_.to_dense(grads.touched_experts);
  double t2 = clock_seconds();
  std::vector<std::vector<char>> d_gates;
  {
    comm::PhaseScope phase(comm_, "grad_gates");
    d_gates = comm_.alltoallv(rows_home(plan, P, [&](int64_t i, std::vector<char>& buf) {
      put(buf, plan.pair_d_gate.data() + plan.input_pairs[i],
          static_cast<size_t>(plan.input_pairs[i + 1] - plan.input_pairs[i]));
    }));
  }

  // At home: dL/dz of each chosen logit (softmax over the chosen k).
  Matrix dz(T, k);
  {
    std::vector<size_t> cursor(static_cast<size_t>(P), 0);
    std::vector<double> dg(static_cast<size_t>(k));
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t i = plan.target_offsets[t]; i < plan.target_offsets[t + 1]; ++i)
        for (int64_t s = plan.slot_offsets[i]; s < plan.slot_offsets[i + 1]; ++s) {
          float v;
          take_n(d_gates[plan.targets[i]], cursor[plan.targets[i]], &v, 1);
          dg[plan.slots[s]] = v;
        }
      const float* g = plan.routes.gates_of(t);
      double weighted = 0.0;
      for (int j = 0; j < k; ++j) weighted += g[j] * dg[j];
      for (int j = 0; j < k; ++j) dz(t, j) = static_cast<float>(g[j] * (dg[j] - weighted));
    }
  }

  // Round 2: dL/dz to the experts' ranks, where the centers live: center
  // gradients stay there, and each rank returns its whole share of dL/dx.
  std::vector<std::vector<char>> send_dz(static_cast<size_t>(P));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = plan.target_offsets[t]; i < plan.target_offsets[t + 1]; ++i)
      for (int64_t s = plan.slot_offsets[i]; s < plan.slot_offsets[i + 1]; ++s)
        put(send_dz[plan.targets[i]], &dz(t, plan.slots[s]), 1);
  std::vector<std::vector<char>> recv_dz;
  {
    comm::PhaseScope phase(comm_, "grad_logits");
    recv_dz = comm_.alltoallv(send_dz);
  }
  std::vector<float> pair_dz(plan.pairs.size());
  {
    std::vector<size_t> cursor(static_cast<size_t>(P), 0);
    for (int64_t i = 0; i < R; ++i)
      for (int64_t p = plan.input_pairs[i]; p < plan.input_pairs[i + 1]; ++p)
        take_n(recv_dz[plan.input_home[i]], cursor[plan.input_home[i]], &pair_dz[p], 1);
  }
  std::vector<RowContribution> contributions;
  for (int64_t i = 0; i < R; ++i) {
    float* dx = plan.pair_dx.row(i);
    for (int64_t p = plan.input_pairs[i]; p < plan.input_pairs[i + 1]; ++p) {
      const float* w = center_row(plan.pairs.expert[p]);
      for (int64_t c = 0; c < d; ++c) dx[c] += pair_dz[p] * w[c];
      contributions.push_back({plan.pairs.expert[p], static_cast<int32_t>(i), pair_dz[p]});
    }
  }
  grads.d_centers = accumulate_rows(contributions, plan.inputs.data(), d, d);
  double t3 = clock_seconds();
  std::vector<std::vector<char>> back;
  {
    comm::PhaseScope phase(comm_, "grad_combine");
    back = comm_.alltoallv(rows_home(plan, P, [&](int64_t i, std::vector<char>& buf) {
      put(buf, plan.pair_dx.row(i), static_cast<size_t>(d));
    }));
  }
  grads.d_tokens = Matrix(T, d);
  std::vector<size_t> cursor(static_cast<size_t>(P), 0);
  std::vector<float> part(static_cast<size_t>(d));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = plan.target_offsets[t]; i < plan.target_offsets[t + 1]; ++i) {
      take_n(back[plan.targets[i]], cursor[plan.targets[i]], part.data(), static_cast<size_t>(d));
      for (int64_t c = 0; c < d; ++c) grads.d_tokens(t, c) += part[c];
    }
  double t4 = clock_seconds();
  seconds_.backward_dispatch = (t1 - t0);
  seconds_.backward_experts = (t2 - t1) + (t3 - t2);
  seconds_.backward_combine = t4 - t3;
  return grads;
}

void MoELayer::set_local_centers(MatrixView centers) {
  const int64_t d = codebook_.dim();
  std::string error;
  char changed = 0;
  if (centers.rows != local_centers_.rows() || (centers.rows > 0 && centers.cols != d)) {
    error = "set_local_centers: got [" + std::to_string(centers.rows) + ", " +
            std::to_string(centers.cols) + "], this rank hosts [" +
            std::to_string(local_centers_.rows()) + ", " + std::to_string(d) + "]";
  } else {
    changed = centers.rows > 0 && std::memcmp(centers.data, local_centers_.data(),
                                              local_centers_.size() * sizeof(float)) != 0;
  }
  comm::raise_together(comm_, error, "MoE layer");
  std::vector<char> flags(static_cast<size_t>(comm_.size()));
  {
    comm::PhaseScope phase(comm_, "checks");
    comm_.allgather(&changed, 1, flags.data());
  }
  if (std::none_of(flags.begin(), flags.end(), [](char f) { return f != 0; })) return;
  std::copy_n(centers.data, local_centers_.size(), local_centers_.data());
  if (strategy_ == Strategy::kDenseReplicated) {
    // Every replica takes every rank's new rows.
    std::vector<int32_t> ids;
    std::vector<float> rows;
    {
      comm::PhaseScope phase(comm_, "center_sync");
      ids = comm::allgatherv_vector<int32_t>(comm_, experts_.ids());
      rows = comm::allgatherv_vector<float>(
          comm_, std::span<const float>(local_centers_.data(), local_centers_.size()));
    }
    for (size_t i = 0; i < ids.size(); ++i)
      std::copy_n(rows.data() + i * static_cast<size_t>(d), d, all_centers_.row(ids[i]));
    dense_ = std::make_unique<DenseRouter>(all_centers_.view());
  } else {
    router_->set_local_centers(local_centers_.view());
  }
}

Plan MoELayer::replan(PlacementPolicy policy, const std::vector<double>& list_load) {
  if (router_) {  // the codebook and lists may have moved since construction
    codebook_ = router_->codebook();
    assignment_ = router_->lists().assignment();
  }
  const InvertedLists lists(assignment_, codebook_.size());
  Plan plan = plan_and_broadcast(comm_, policy, codebook_, lists, list_load);
  const int P = comm_.size(), me = comm_.rank();
  const int64_t d = codebook_.dim(), h = config_.expert.hidden;
  const size_t w = static_cast<size_t>(h * d);

  // Migration: each moving expert's FFN and center go to its new rank.
  std::vector<std::vector<char>> send(static_cast<size_t>(P));
  for (int64_t i = 0; i < experts_.size(); ++i) {
    const int32_t e = experts_.ids()[i];
    const int to = plan.placement.owner(e);
    if (to == me) continue;
    put(send[to], &e, 1);
    put(send[to], experts_.w1(i), w);
    put(send[to], experts_.w2(i), w);
    put(send[to], local_centers_.row(i), static_cast<size_t>(d));
  }
  std::vector<std::vector<char>> recv;
  {
    comm::PhaseScope phase(comm_, "migration");
    recv = comm_.alltoallv(send);
  }
  const std::vector<int32_t> ids = plan.placement.local_experts(me);
  ExpertShard next(config_.expert, ids);
  Matrix centers(static_cast<int64_t>(ids.size()), d);
  auto place = [&](int32_t e, const float* w1, const float* w2, const float* c) {
    const int64_t j = next.index_of(e);
    std::copy_n(w1, w, next.w1(j));
    std::copy_n(w2, w, next.w2(j));
    std::copy_n(c, d, centers.row(j));
  };
  for (int64_t i = 0; i < experts_.size(); ++i)
    if (plan.placement.owner(experts_.ids()[i]) == me)
      place(experts_.ids()[i], experts_.w1(i), experts_.w2(i), local_centers_.row(i));
  std::vector<float> w1(w), w2(w), c(static_cast<size_t>(d));
  for (int src = 0; src < P; ++src) {
    size_t at = 0;
    while (at < recv[src].size()) {
      const int32_t e = take<int32_t>(recv[src], at);
      take_n(recv[src], at, w1.data(), w);
      take_n(recv[src], at, w2.data(), w);
      take_n(recv[src], at, c.data(), static_cast<size_t>(d));
      place(e, w1.data(), w2.data(), c.data());
    }
  }
  experts_ = std::move(next);
  local_centers_ = std::move(centers);
  placement_ = plan.placement;
  if (router_) {
    router_.reset();
    build_router();
  }
  return plan;
}

}  // namespace airmoe::runtime
