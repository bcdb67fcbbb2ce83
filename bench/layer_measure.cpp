#include "bench/layer_measure.h"

#include <fstream>
#include <memory>
#include <set>
#include <span>

#include "bench/progress.h"
#include "core/synthetic.h"
#include "router/dense_router.h"
#include "router/metrics.h"

namespace airmoe::bench {

std::vector<PhaseEntry> reported_phases(const PhaseFigures& f) {
  std::vector<PhaseEntry> out;
  auto add = [&](const std::vector<std::string>& phases, bool forward) {
    for (const std::string& p : phases)
      for (const std::string& name : {p, p + ":counts", p + ":barrier"}) {
        const auto b = f.bytes.find(name);
        const auto m = f.messages.find(name);
        // A sparse exchange's barrier: listed only where it ran.
        if (name.ends_with(":barrier") && b == f.bytes.end()) continue;
        out.push_back({name, b == f.bytes.end() ? 0.0 : b->second,
                       m == f.messages.end() ? 0.0 : m->second, forward});
      }
  };
  add(kForwardPhases, true);
  add(kBackwardPhases, false);
  return out;
}

PhaseTotals phase_totals(const std::vector<PhaseEntry>& entries) {
  PhaseTotals t;
  for (const PhaseEntry& e : entries) {
    (e.forward ? t.forward : t.backward) += e.bytes;
    t.messages += e.messages;
  }
  return t;
}

std::vector<std::pair<const char*, double>> named_seconds(const runtime::PhaseSeconds& s) {
  return {{"route", s.route},
          {"dispatch", s.dispatch},
          {"experts", s.experts},
          {"combine", s.combine},
          {"backward_dispatch", s.backward_dispatch},
          {"backward_experts", s.backward_experts},
          {"backward_combine", s.backward_combine}};
}

double sum_over_ranks(comm::Communicator& comm, double v) {
  std::vector<double> all(static_cast<size_t>(comm.size()));
  comm.allgather(&v, sizeof(v), all.data());
  double s = 0.0;
  for (double x : all) s += x;
  return s;
}

double max_over_ranks(comm::Communicator& comm, double v) {
  comm.allreduce_max(&v, 1);
  return v;
}

std::vector<double> per_rank(comm::Communicator& comm, double mine) {
  std::vector<double> all(static_cast<size_t>(comm.size()));
  comm.allgather(&mine, sizeof mine, all.data());
  return all;
}

double peak_resident_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) * 1024.0;  // in kB
  return 0.0;
}

namespace {

// The union of every rank's metered phases. A rank with no tokens, or no
// experts, sends nothing in some phases and so has no entry for them; the
// per-phase sums are collectives, so every rank must loop over the same
// names (looping over its own names hung: ranks met in different
// collectives).
std::vector<std::string> phases_of_every_rank(comm::Communicator& comm,
                                              const comm::TrafficMeter& meter) {
  std::string mine;
  for (const std::string& phase : meter.phases()) mine += phase + '\n';
  const std::vector<char> all =
      comm::allgatherv_vector<char>(comm, std::span<const char>(mine.data(), mine.size()));
  std::set<std::string> names;
  std::string name;
  for (char c : all) {
    if (c != '\n') {
      name += c;
      continue;
    }
    names.insert(name);
    name.clear();
  }
  return {names.begin(), names.end()};
}

double phases_sum(const runtime::PhaseSeconds& s) {
  return s.route + s.dispatch + s.experts + s.combine + s.backward_dispatch + s.backward_experts +
         s.backward_combine;
}

// Each phases seconds on the slowest rank in it.
runtime::PhaseSeconds slowest_ranks(comm::Communicator& comm, const runtime::PhaseSeconds& s) {
  return {max_over_ranks(comm, s.route),
          max_over_ranks(comm, s.dispatch),
          max_over_ranks(comm, s.experts),
          max_over_ranks(comm, s.combine),
          max_over_ranks(comm, s.backward_dispatch),
          max_over_ranks(comm, s.backward_experts),
          max_over_ranks(comm, s.backward_combine)};
}

// This rank's share of the step: its token rows, their output gradient and
// their exact routes.
struct RankShare {
  MatrixView tokens;
  Matrix d_out;
  Routes exact;
};

// The fastest of `repeats` steps of one layer, as this rank saw it.
struct BestStep {
  runtime::PhaseSeconds seconds;
  double total = 1e300;  // max over ranks
  comm::TrafficMeter meter;
  Routes routes;
  double router_flops_per_token = 0.0;
};

BestStep fastest_step(comm::Communicator& comm, runtime::MoELayer& layer, const RankShare& share,
                      const LayerBenchInputs& in, const char* name) {
  BestStep best;
  for (int rep = -in.warmup; rep < in.repeats; ++rep) {
    if (in.progress && comm.rank() == 0)
      progress(rep < 0 ? "strategy %s: warm-up %d/%d" : "strategy %s: forward + backward %d/%d",
               name, rep < 0 ? rep + in.warmup + 1 : rep + 1, rep < 0 ? in.warmup : in.repeats);
    comm.barrier();
    comm.meter().reset();
    runtime::DispatchHandle step = layer.forward(share.tokens).handle;
    layer.backward(step, share.d_out.view());
    const runtime::PhaseSeconds& s = step.stats().seconds;
    const double total = max_over_ranks(comm, phases_sum(s));
    if (rep >= 0 && total < best.total) {
      best.total = total;
      best.seconds = s;
      best.meter = comm.meter();
      best.routes = step.routes();
      best.router_flops_per_token = step.stats().router_flops_per_token;
    }
  }
  return best;
}

// A figure of this rank's tokens, averaged over every rank's tokens.
double token_mean(comm::Communicator& comm, double mine, int64_t rows, int64_t tokens) {
  return sum_over_ranks(comm, mine * static_cast<double>(rows)) / static_cast<double>(tokens);
}

StrategyFigures measure_strategy(comm::Communicator& comm, const LayerBenchInputs& in,
                                 runtime::LayerSpec spec, const runtime::SharedIndex& index,
                                 const runtime::PlacementPlan& plan, const RankShare& share) {
  const char* name = runtime::to_string(spec.strategy);
  if (in.progress && comm.rank() == 0)
    progress("strategy %s: building the layer (experts on their ranks)", name);
  const std::unique_ptr<runtime::MoELayer> layer =
      runtime::make_layer(comm, spec, index, plan.placement, in.centers, in.compute);
  const BestStep best = fastest_step(comm, *layer, share, in, name);
  StrategyFigures f;
  f.strategy = name;
  f.probes = spec.strategy == runtime::Strategy::kAir ? spec.probes
             : spec.strategy == runtime::Strategy::kDenseBroadcast
                 ? static_cast<int>(spec.codewords)
                 : 0;
  f.seconds = slowest_ranks(comm, best.seconds);
  f.total_seconds = best.total;
  for (const std::string& phase : phases_of_every_rank(comm, best.meter)) {
    f.traffic.bytes[phase] =
        sum_over_ranks(comm, static_cast<double>(best.meter.sent(phase).bytes));
    f.traffic.messages[phase] =
        sum_over_ranks(comm, static_cast<double>(best.meter.sent(phase).messages));
  }
  const int64_t rows = share.tokens.rows, T = in.tokens.rows;
  f.router_flops_per_token = token_mean(comm, best.router_flops_per_token, rows, T);
  f.expert_flops_per_token = layer->expert_flops_per_token();
  f.recall_at_k = token_mean(comm, recall_at_k(best.routes, share.exact), rows, T);
  f.mass_recall = token_mean(comm, mass_recall(best.routes, share.exact), rows, T);
  // The process's high-water mark: it includes the set-up and the strategies
  // run before this one.
  f.peak_rss_bytes = per_rank(comm, peak_resident_bytes());
  const runtime::ExpertShard& shard = layer->experts();
  f.ffn_weight_bytes =
      per_rank(comm, static_cast<double>(sizeof(float) * shard.size() *
                                         (shard.config().w1_size() + shard.config().w2_size())));
  return f;
}

}  // namespace

LayerFigures measure_layer(comm::Communicator& comm, const LayerBenchInputs& in) {
  const int P = comm.size(), me = comm.rank();
  const int64_t T = in.tokens.rows, d = in.tokens.cols;
  const int64_t b = T * me / P, e = T * (me + 1) / P;
  RankShare share{MatrixView(in.tokens.row(b), e - b, d), Matrix(), Routes()};
  if (in.progress && me == 0)
    progress("training the codebook on rank 0: C=%ld", (long)in.spec.codewords);
  const runtime::SharedIndex index =
      runtime::agree_on_index(comm, in.spec, in.centers, share.tokens);
  const runtime::PlacementPlan plan = runtime::place_experts(comm, in.spec, index);
  if (in.progress && me == 0) progress("exact routing for recall");
  share.exact = DenseRouter(in.centers).route(share.tokens, in.spec.k);
  share.d_out = random_matrix(e - b, d, 1.0, in.d_out_seed + static_cast<uint64_t>(me));
  LayerFigures out;
  out.imbalance = plan.imbalance;
  out.setup_peak_rss_bytes = per_rank(comm, peak_resident_bytes());
  for (runtime::Strategy strategy : in.strategies) {
    runtime::LayerSpec spec = in.spec;
    spec.strategy = strategy;
    out.strategies.push_back(measure_strategy(comm, in, spec, index, plan, share));
  }
  return out;
}

}  // namespace airmoe::bench
