// airmoe_bench layer, under mpiexec -n P: forward and backward of the MoE
// layer for each strategy on the same data, weights and placement, with the
// bytes and messages of every phase from the communicator's meter.
#include <algorithm>
#include <boost/program_options.hpp>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "bench_common.h"
#include "bench_data.h"
#include "comm/mpi_communicator.h"
#include "core/checks.h"
#include "core/threads.h"
#include "layer_report.h"
#include "ops/registry.h"
#include "router/dense_router.h"
#include "router/metrics.h"
#include "runtime/builder.h"
#include "runtime/moe_layer.h"
#include "runtime/wire.h"

namespace po = boost::program_options;
using nlohmann::json;

namespace airmoe::bench {
namespace {

// The union of every rank's metered phases. A rank with no tokens, or no
// experts, sends nothing in some phases and so has no entry for them; the
// per-phase sums below are collectives, so every rank must loop over the same
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

// This process's peak resident memory so far (VmHWM), in bytes; 0 where
// /proc/self/status is not there.
double peak_resident_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) * 1024.0;  // in kB
  return 0.0;
}

std::vector<double> per_rank(comm::Communicator& comm, double mine) {
  std::vector<double> all(static_cast<size_t>(comm.size()));
  comm.allgather(&mine, sizeof mine, all.data());
  return all;
}

void print_memory(const std::vector<json>& rows) {
  std::printf("\n%-17s %5s %13s %13s %13s %10s\n", "strategy", "rank", "FFN MiB", "set-up MiB",
              "peak MiB", "peak/FFN");
  for (const json& r : rows) {
    const auto ffn = r["ffn_weight_bytes"].get<std::vector<double>>();
    const auto setup = r["setup_peak_rss_bytes"].get<std::vector<double>>();
    const auto peak = r["peak_rss_bytes"].get<std::vector<double>>();
    // A rank that hosts no expert (E < P) has no peak/FFN.
    for (size_t i = 0; i < peak.size(); ++i)
      std::printf("%-17s %5zu %13.1f %13.1f %13.1f %10s\n",
                  r["strategy"].get<std::string>().c_str(), i, ffn[i] / 1048576.0,
                  setup[i] / 1048576.0, peak[i] / 1048576.0,
                  cell(ratio_or_null(peak[i], ffn[i]), "%.2f").c_str());
  }
}

int layer_main(comm::Communicator& comm, const std::vector<std::string>& args) {
  const int P = comm.size(), me = comm.rank();
  DataOptions o;
  int probes = 4, hidden = 16;
  std::string activation = "gelu", placement_name = "locality", csv_file, wire_dtype_name = "f32";
  std::string backend_name = "host";
  std::string strategies_text = "dense-replicated,air,dense-broadcast";
  bool dense_expert_grads = false;
  po::options_description opts("airmoe_bench layer options (run under mpiexec -n P)");
  opts.add_options()("help,h", "show this help");
  o.add_to(opts);
  opts.add_options()("probes,m", po::value(&probes)->default_value(probes), "AIR's probe count m")(
      "hidden", po::value(&hidden)->default_value(hidden), "expert hidden size h")(
      "activation", po::value(&activation)->default_value(activation), "gelu, relu or silu")(
      "placement", po::value(&placement_name)->default_value(placement_name),
      "round-robin, list or locality")("strategies",
                                       po::value(&strategies_text)->default_value(strategies_text),
                                       "comma-separated strategies")(
      "csv", path_value(&csv_file, "--csv"), "rank 0 writes one CSV row per strategy here")(
      "dense-expert-grads", po::bool_switch(&dense_expert_grads),
      "backward also fills the dense expert gradients (all hosted experts)")(
      "wire-dtype", po::value(&wire_dtype_name)->default_value(wire_dtype_name),
      "element type of the token vectors on the wire: f32 or bf16")(
      "backend", po::value(&backend_name)->default_value(backend_name),
      "compute backend of the experts and the step's vectors (host, host-avx512, host-avx2, "
      "host-portable, device-emulated, cuda, cuda:N); routing stays on the host");
  if (!parse_on_every_rank(comm, "layer", args, opts)) return 0;
  // Every rank has the same options: each finds the same fault, and they
  // raise it together.
  runtime::PlacementPolicy policy{};
  runtime::Activation act{};
  DType wire_dtype{};
  std::vector<runtime::Strategy> strategies;
  const Ops* backend = nullptr;
  comm::check_together(comm, "command line", [&] {
    backend = &find_backend(backend_name);
    o.validate();
    require_in_range(probes, 1, probe_limit(o), "-m/--probes");
    require_in_range(hidden, 1, INT32_MAX, "--hidden");
    policy = runtime::placement_policy_from_string(placement_name);
    act = runtime::activation_from_string(activation);
    wire_dtype = runtime::wire::wire_dtype_from_string(wire_dtype_name, "--wire-dtype");
    for (const std::string& s : split_list(strategies_text))
      strategies.push_back(runtime::strategy_from_string(s));
  });
  std::vector<NamedPath> apart = o.inputs();
  OutputFile json_out = open_on_rank0(comm, o.json_file, "--json", apart);
  apart.push_back({"--json", o.json_file});
  OutputFile csv_out = open_on_rank0(comm, csv_file, "--csv", apart);

  if (me == 0) progress("preparing data on %d ranks", P);
  BenchData bench;
  comm::check_together(comm, "data", [&] { bench = load_data(o); });
  const MatrixView centers = bench.data.centers.view();
  const int64_t d = o.dim, T = o.tokens;
  const int64_t b = T * me / P, e = T * (me + 1) / P;
  const MatrixView mine(bench.data.tokens.row(b), e - b, d);
  if (me == 0) progress("training the codebook on rank 0: C=%ld", (long)o.codewords);
  runtime::LayerSpec spec = routing_spec(o, probes);
  spec.placement = policy;
  spec.hidden = hidden;
  spec.activation = act;
  spec.expert_seed = 7;
  spec.dense_expert_grads = dense_expert_grads;
  spec.wire_dtype = wire_dtype;
  // One index and one placement for every strategy: the same data, weights
  // and placement (rank 0's tokens are the load sample).
  const runtime::SharedIndex index = runtime::agree_on_index(comm, spec, centers, mine);
  const runtime::PlacementPlan plan = runtime::place_experts(comm, spec, index);
  if (me == 0) progress("exact routing for recall");
  const Routes exact = DenseRouter(centers).route(mine, o.k);
  const Matrix d_out = random_matrix(e - b, d, 1.0, o.seed + 1000 + static_cast<uint64_t>(me));
  const std::vector<double> setup_peak = per_rank(comm, peak_resident_bytes());

  std::vector<json> rows;
  for (runtime::Strategy strategy : strategies) {
    const char* name = runtime::to_string(strategy);
    if (me == 0) progress("strategy %s: building the layer (experts on their ranks)", name);
    spec.strategy = strategy;
    const std::unique_ptr<runtime::MoELayer> built =
        runtime::make_layer(comm, spec, index, plan.placement, centers, Compute{backend, {}});
    runtime::MoELayer& layer = *built;
    runtime::PhaseSeconds best;
    double best_total = 1e300;
    comm::TrafficMeter meter;
    Routes routes;
    double router_flops_per_token = 0.0;
    for (int rep = 0; rep < o.repeats; ++rep) {
      if (me == 0) progress("strategy %s: forward + backward %d/%d", name, rep + 1, o.repeats);
      comm.barrier();
      comm.meter().reset();
      runtime::DispatchHandle step = layer.forward(mine).handle;
      layer.backward(step, d_out.view());
      const runtime::PhaseSeconds& s = step.stats().seconds;
      router_flops_per_token = step.stats().router_flops_per_token;
      const double total =
          max_over_ranks(comm, s.route + s.dispatch + s.experts + s.combine + s.backward_dispatch +
                                   s.backward_experts + s.backward_combine);
      if (total < best_total) {
        best_total = total;
        best = s;
        meter = comm.meter();
        routes = step.routes();
      }
    }
    PhaseFigures f;
    for (const std::string& phase : phases_of_every_rank(comm, meter)) {
      f.bytes[phase] = sum_over_ranks(comm, static_cast<double>(meter.sent(phase).bytes));
      f.messages[phase] = sum_over_ranks(comm, static_cast<double>(meter.sent(phase).messages));
    }
    const double router_flops =
        sum_over_ranks(comm, router_flops_per_token * static_cast<double>(e - b)) /
        static_cast<double>(T);
    json row = strategy_row(name, P, f, static_cast<double>(T), router_flops,
                            layer.expert_flops_per_token());
    row["probes"] = strategy == runtime::Strategy::kAir              ? probes
                    : strategy == runtime::Strategy::kDenseBroadcast ? static_cast<int>(o.codewords)
                                                                     : 0;
    row["recall_at_k"] =
        sum_over_ranks(comm, recall_at_k(routes, exact) * static_cast<double>(e - b)) /
        static_cast<double>(T);
    row["mass_recall"] =
        sum_over_ranks(comm, mass_recall(routes, exact) * static_cast<double>(e - b)) /
        static_cast<double>(T);
    row["seconds"] = {{"route", max_over_ranks(comm, best.route)},
                      {"dispatch", max_over_ranks(comm, best.dispatch)},
                      {"experts", max_over_ranks(comm, best.experts)},
                      {"combine", max_over_ranks(comm, best.combine)},
                      {"backward_dispatch", max_over_ranks(comm, best.backward_dispatch)},
                      {"backward_experts", max_over_ranks(comm, best.backward_experts)},
                      {"backward_combine", max_over_ranks(comm, best.backward_combine)},
                      {"total", best_total}};
    // The process's high-water mark: it includes the set-up and the strategies
    // run before this one.
    row["setup_peak_rss_bytes"] = setup_peak;
    row["peak_rss_bytes"] = per_rank(comm, peak_resident_bytes());
    const runtime::ExpertShard& shard = layer.experts();
    row["ffn_weight_bytes"] =
        per_rank(comm, static_cast<double>(sizeof(float) * shard.size() *
                                           (shard.config().w1_size() + shard.config().w2_size())));
    rows.push_back(row);
  }
  finish_rows(rows);

  if (me == 0) {
    std::printf(
        "\nairmoe layer benchmark  (%s, E=%ld d=%ld T=%ld k=%d h=%d C=%ld m=%d, %s placement, %d "
        "ranks, %s)\n",
        bench.source.c_str(), (long)o.experts, (long)d, (long)T, o.k, hidden, (long)o.codewords,
        probes, placement_name.c_str(), P, backend->name().c_str());
    std::printf("%-17s %11s %11s %8s %9s %12s %12s %8s %9s %9s\n", "strategy", "fwd MB", "bwd MB",
                "vs floor", "recall", "router MF/t", "expert MF/t", "route s", "fwd s", "bwd s");
    for (const json& r : rows) {
      const json& s = r["seconds"];
      std::printf("%-17s %11.2f %11.2f %8s %9.4f %12.2f %12.2f %8.3f %9.3f %9.3f\n",
                  r["strategy"].get<std::string>().c_str(), r["bytes_forward"].get<double>() / 1e6,
                  r["bytes_backward"].get<double>() / 1e6,
                  cell(r["bytes_vs_floor"], "%.2f").c_str(), r["recall_at_k"].get<double>(),
                  r["router_flops_per_token"].get<double>() / 1e6,
                  r["expert_flops_per_token"].get<double>() / 1e6, s["route"].get<double>(),
                  s["route"].get<double>() + s["dispatch"].get<double>() +
                      s["experts"].get<double>() + s["combine"].get<double>(),
                  s["backward_dispatch"].get<double>() + s["backward_experts"].get<double>() +
                      s["backward_combine"].get<double>());
    }
    print_memory(rows);
    if (json_out.wanted()) {
      json j;
      j["benchmark"] = "layer";
      j["config"] = {{"experts", o.experts},
                     {"dim", d},
                     {"tokens", T},
                     {"k", o.k},
                     {"hidden", hidden},
                     {"activation", activation},
                     {"codewords", o.codewords},
                     {"probes", probes},
                     {"placement", placement_name},
                     {"data", bench.source},
                     {"seed", o.seed},
                     {"ranks", P},
                     {"imbalance", plan.imbalance},
                     {"threads_per_rank", num_threads()},
                     {"dense_expert_grads", dense_expert_grads},
                     {"wire_dtype", wire_dtype_name},
                     {"backend", backend->name()}};
      j["results"] = rows;
      json_out.stream() << j.dump(2) << "\n";
      json_out.finish();
    }
    if (csv_out.wanted()) {
      write_csv(csv_out.stream(), rows);
      csv_out.finish();
    }
  }
  return 0;
}

}  // namespace

int run_layer(const std::vector<std::string>& args) {
  return run_on_mpi_world("layer", args, layer_main);
}

}  // namespace airmoe::bench
