// airmoe_bench layer, under mpiexec -n P: forward and backward of the MoE
// layer for each strategy on the same data, weights and placement, with the
// bytes and messages of every phase from the communicator's meter. The
// measuring is bench/layer_measure.h's (shared with airmoe_layer_bench, the
// in-process front end); this is the MPI front end: options, JSON, CSV.
#include <algorithm>
#include <boost/program_options.hpp>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench/layer_measure.h"
#include "bench_common.h"
#include "bench_data.h"
#include "comm/mpi_communicator.h"
#include "core/checks.h"
#include "core/threads.h"
#include "layer_report.h"
#include "ops/registry.h"
#include "router/request_keys.h"
#include "runtime/wire.h"

namespace po = boost::program_options;
using nlohmann::json;

namespace airmoe::bench {
namespace {

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

// The JSON row of one strategy (layer_report.h's fields, then the layer's).
json layer_row(const StrategyFigures& f, int P, int64_t T, const std::vector<double>& setup_peak) {
  json row = strategy_row(f.strategy, P, f.traffic, static_cast<double>(T),
                          f.router_flops_per_token, f.expert_flops_per_token);
  row["probes"] = f.probes;
  row["recall_at_k"] = f.recall_at_k;
  row["mass_recall"] = f.mass_recall;
  json& seconds = row["seconds"];
  for (const auto& [name, value] : named_seconds(f.seconds)) seconds[name] = value;
  seconds["total"] = f.total_seconds;
  row["setup_peak_rss_bytes"] = setup_peak;
  row["peak_rss_bytes"] = f.peak_rss_bytes;
  row["ffn_weight_bytes"] = f.ffn_weight_bytes;
  return row;
}

int layer_main(comm::Communicator& comm, const std::vector<std::string>& args) {
  const int P = comm.size(), me = comm.rank();
  DataOptions o;
  int probes = 4, hidden = 16, request_key_bits = 0;
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
      "host-portable, device-emulated, cuda, cuda:N); routing stays on the host")(
      "request-key-bits", po::value(&request_key_bits)->default_value(request_key_bits),
      "air and dense-broadcast: scoring requests pruned with replicated keys of these bits (2 "
      "to 16; 0: off)");
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
    if (request_key_bits != 0) check_request_key_bits(request_key_bits, "--request-key-bits");
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
  const int64_t d = o.dim, T = o.tokens;
  LayerBenchInputs in;
  in.spec = routing_spec(o, probes);
  in.spec.placement = policy;
  in.spec.hidden = hidden;
  in.spec.activation = act;
  in.spec.expert_seed = 7;
  in.spec.dense_expert_grads = dense_expert_grads;
  in.spec.wire_dtype = wire_dtype;
  in.spec.request_key_bits = request_key_bits;
  in.strategies = strategies;
  in.centers = bench.data.centers.view();
  in.tokens = bench.data.tokens.view();
  in.d_out_seed = o.seed + 1000;
  in.compute = Compute{backend, {}};
  in.repeats = o.repeats;
  in.progress = true;
  const LayerFigures figures = measure_layer(comm, in);

  std::vector<json> rows;
  for (const StrategyFigures& f : figures.strategies)
    rows.push_back(layer_row(f, P, T, figures.setup_peak_rss_bytes));
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
                     {"imbalance", figures.imbalance},
                     {"threads_per_rank", num_threads()},
                     {"dense_expert_grads", dense_expert_grads},
                     {"wire_dtype", wire_dtype_name},
                     {"request_key_bits", request_key_bits},
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
