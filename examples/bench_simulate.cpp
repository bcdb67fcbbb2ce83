// airmoe_bench simulate: per-rank, per-phase traffic of the three strategies
// for P up to thousands of ranks, in one process, from the same placement,
// routing and wire-format code as a real run (runtime/simulator.h).
#include <algorithm>
#include <boost/program_options.hpp>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench_common.h"
#include "bench_data.h"
#include "core/checks.h"
#include "layer_report.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "router/metrics.h"
#include "runtime/coordinator.h"
#include "runtime/simulator.h"

namespace po = boost::program_options;
using nlohmann::json;

namespace airmoe::bench {
namespace {

// A simulated job's per-rank tables grow with P; past this it is a typo.
constexpr int kMaxSimulatedRanks = 65536;

PhaseFigures figures(const runtime::SimulatedTraffic& sim) {
  PhaseFigures f;
  for (const auto& [phase, per_rank] : sim.sent) {
    const comm::TrafficCounts t = sim.total(phase);
    f.bytes[phase] = static_cast<double>(t.bytes);
    f.messages[phase] = static_cast<double>(t.messages);
  }
  return f;
}

}  // namespace

int run_simulate(const std::vector<std::string>& args) {
  DataOptions o;
  int hidden = 16;
  std::string ranks_text = "2,4,8,16,32,64,128,256,512,1024,2048,4096", probes_text = "2,4,8";
  std::string placement_name = "locality", csv_file;
  po::options_description opts("airmoe_bench simulate options");
  opts.add_options()("help,h", "show this help");
  o.add_to(opts);
  opts.add_options()("ranks,P", po::value(&ranks_text)->default_value(ranks_text),
                     "comma-separated rank counts, each in [1, 65536]")(
      "probes,m", po::value(&probes_text)->default_value(probes_text), "AIR probe counts")(
      "hidden", po::value(&hidden)->default_value(hidden), "expert hidden size h (>= 1)")(
      "placement", po::value(&placement_name)->default_value(placement_name),
      "round-robin, list or locality")("csv", po::value(&csv_file),
                                       "one CSV row per (P, strategy)");
  if (!parse(args, opts, true)) return 0;
  o.validate();
  require_in_range(hidden, 1, INT32_MAX, "--hidden");
  const std::vector<int> ranks = parse_int_list(ranks_text, "-P/--ranks", 1, kMaxSimulatedRanks);
  const std::vector<int> probes = parse_int_list(probes_text, "-m/--probes", 1, probe_limit(o));
  const runtime::PlacementPolicy policy = runtime::placement_policy_from_string(placement_name);
  OutputFile json_out(o.json_file, "--json"), csv_out(csv_file, "--csv");
  const double t_start = now_seconds();

  progress("preparing data");
  const BenchData bench = load_data(o);
  const MatrixView centers = bench.data.centers.view(), tokens = bench.data.tokens.view();
  const int64_t d = o.dim, E = o.experts, C = o.codewords;
  progress("training the codebook: C=%ld", (long)C);
  const AirRouter air(centers, AirConfig{C, o.kmeans_iters, 1234, 0});
  const InvertedLists& lists = air.lists();
  progress("routing: exact, and AIR for each m");
  const Routes exact = DenseRouter(centers).route(tokens, o.k);
  const Routes broadcast = air.route(tokens, o.k, static_cast<int>(C));  // probes every list
  std::vector<Routes> air_routes;
  for (int m : probes) air_routes.push_back(air.route(tokens, o.k, m));
  const std::vector<double> load =
      runtime::list_load(lists, air.route(tokens, o.k, probes.front()).probes);
  const double expert_flops = static_cast<double>(o.k) * 4.0 * static_cast<double>(d * hidden);
  const double dense_flops = 2.0 * static_cast<double>(E * d);

  std::vector<json> rows;
  for (int P : ranks) {
    const double t0 = now_seconds();
    const runtime::Plan plan = runtime::plan_placement(policy, P, air.codebook(), lists, load);
    std::vector<json> group;
    auto add = [&](const char* name, runtime::Strategy s, const Routes& r, int m,
                   double router_flops) {
      const runtime::SimulatedTraffic sim =
          runtime::simulate_traffic(s, plan.placement, r, tokens, /*backward=*/true);
      json row = strategy_row(name, P, figures(sim), static_cast<double>(o.tokens), router_flops,
                              expert_flops);
      row["probes"] = m;
      row["recall_at_k"] = recall_at_k(r, exact);
      row["mass_recall"] = mass_recall(r, exact);
      row["mean_ranks_per_token"] = sim.mean_ranks_per_token;
      row["imbalance"] = plan.imbalance;
      row["max_rank_bytes_requests"] = static_cast<double>(sim.max_rank_bytes("requests"));
      group.push_back(row);
    };
    add("dense-replicated", runtime::Strategy::kDenseReplicated, exact, 0, dense_flops);
    add("dense-broadcast", runtime::Strategy::kDenseBroadcast, broadcast, static_cast<int>(C),
        2.0 * static_cast<double>(C * d) + dense_flops);
    for (size_t i = 0; i < probes.size(); ++i)
      add("air", runtime::Strategy::kAir, air_routes[i], probes[i],
          air.flops_per_token(shortlist_stats(air_routes[i]).mean));
    finish_rows(group);
    const double bcast_requests = group[1]["bytes"]["requests"].get<double>();
    for (json& row : group) {
      row["requests_vs_dense_broadcast"] =
          bcast_requests > 0 ? row["bytes"]["requests"].get<double>() / bcast_requests : 0.0;
      rows.push_back(row);
    }
    progress("P=%d simulated in %.2f s", P, now_seconds() - t0);
  }

  std::printf(
      "\nairmoe traffic simulation  (%s, E=%ld d=%ld T=%ld k=%d h=%d C=%ld, %s placement)\n",
      bench.source.c_str(), (long)E, (long)d, (long)o.tokens, o.k, hidden, (long)C,
      placement_name.c_str());
  std::printf("%6s %-17s %4s %12s %10s %14s %9s %11s\n", "P", "strategy", "m", "fwd B/token",
              "vs floor", "req vs bcast", "recall", "ranks/token");
  for (const json& r : rows)
    std::printf("%6d %-17s %4d %12.0f %10.3f %14.3f %9.4f %11.2f\n", r["ranks"].get<int>(),
                r["strategy"].get<std::string>().c_str(), r["probes"].get<int>(),
                r["bytes_per_token_forward"].get<double>(), r["bytes_vs_floor"].get<double>(),
                r["requests_vs_dense_broadcast"].get<double>(), r["recall_at_k"].get<double>(),
                r["mean_ranks_per_token"].get<double>());
  std::printf("simulated %zu rank counts in %.1f s\n", ranks.size(), now_seconds() - t_start);
  if (json_out.wanted()) {
    json j;
    j["benchmark"] = "simulate";
    j["config"] = {
        {"experts", E},     {"dim", d},       {"tokens", o.tokens},          {"k", o.k},
        {"hidden", hidden}, {"codewords", C}, {"placement", placement_name}, {"data", bench.source},
        {"seed", o.seed}};
    j["results"] = rows;
    json_out.stream() << j.dump(2) << "\n";
    json_out.finish();
  }
  if (csv_out.wanted()) {
    write_csv(csv_out.stream(), rows);
    csv_out.finish();
  }
  return 0;
}

}  // namespace airmoe::bench
