// airmoe_bench traffic, under mpiexec -n P: the distributed AIR router's
// traffic per phase, from the communicator's meter, for each placement
// policy, with recall against exact routing and seconds per phase.
#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "bench_common.h"
#include "bench_data.h"
#include "comm/mpi_communicator.h"
#include "core/checks.h"
#include "core/npy.h"
#include "core/synthetic.h"
#include "core/threads.h"
#include "router/dense_router.h"
#include "router/metrics.h"
#include "runtime/builder.h"

namespace po = boost::program_options;
using nlohmann::json;

namespace airmoe::bench {
namespace {

const char* const kPhases[] = {"requests", "replies", "kmeans_sync", "list_sync"};

// Every token's experts and gates, on rank 0, in global token order.
void save_global_routes(comm::Communicator& comm, const Routes& r, const std::string& dir,
                        const std::string& name) {
  comm::PhaseScope phase(comm, "gather_routes");
  const auto experts = comm::allgatherv_vector<int32_t>(comm, r.experts);
  const auto gates = comm::allgatherv_vector<float>(comm, r.gates);
  if (comm.rank() != 0) return;
  try {
    std::filesystem::create_directories(dir);
    const int64_t T = static_cast<int64_t>(experts.size()) / r.k;
    write_npy(dir + "/" + name + "_experts.npy", experts.data(), T, r.k);
    write_npy(dir + "/" + name + "_gates.npy", gates.data(), T, r.k);
  } catch (const std::exception& e) {
    fail("--save-routes " + dir + ": " + e.what());
  }
}

int traffic_main(comm::Communicator& comm, const std::vector<std::string>& args) {
  const int P = comm.size(), me = comm.rank();

  DataOptions o;
  int probes = 4;
  std::string routes_dir, policies_text = "round-robin,list,locality";
  po::options_description opts("airmoe_bench traffic options (run under mpiexec -n P)");
  opts.add_options()("help,h", "show this help");
  o.add_to(opts);
  opts.add_options()("probes,m", po::value(&probes)->default_value(probes), "probe count m")(
      "placements", po::value(&policies_text)->default_value(policies_text),
      "comma-separated placement policies")("save-routes", path_value(&routes_dir, "--save-routes"),
                                            "rank 0 writes every token's experts/gates here");
  if (!parse_on_every_rank(comm, "traffic", args, opts)) return 0;
  // Every rank has the same options: each finds the same fault, and they
  // raise it together.
  std::vector<runtime::PlacementPolicy> policies;
  comm::check_together(comm, "command line", [&] {
    o.validate();
    require_in_range(probes, 1, probe_limit(o), "-m/--probes");
    for (const std::string& name : split_list(policies_text))
      policies.push_back(runtime::placement_policy_from_string(name));
  });
  OutputFile json_out = open_on_rank0(comm, o.json_file, "--json", o.inputs());
  comm::check_together(comm, "--save-routes", [&] {
    if (me == 0 && !routes_dir.empty()) require_writable_folder(routes_dir, "--save-routes");
  });

  // The same global data on every rank; each routes its own block of tokens.
  if (me == 0)
    progress("preparing %s data on %d ranks", o.centers_file.empty() ? o.preset.c_str() : "npy", P);
  BenchData bench_data;
  comm::check_together(comm, "data", [&] { bench_data = load_data(o); });
  const SyntheticData& data = bench_data.data;
  const std::string& source = bench_data.source;
  const int64_t experts = o.experts, dim = o.dim, num_tokens = o.tokens, codewords = o.codewords;
  const int k = o.k, repeats = o.repeats;
  const int64_t t_begin = num_tokens * me / P, t_end = num_tokens * (me + 1) / P;
  const MatrixView my_tokens(data.tokens.row(t_begin), t_end - t_begin, dim);

  // The codebook (trained on rank 0, broadcast), the lists, and the load
  // estimate from rank 0's own tokens' probes (the coordinator's sample).
  if (me == 0) progress("training the codebook on rank 0: C=%ld", (long)codewords);
  runtime::LayerSpec spec = routing_spec(o, probes);
  const runtime::SharedIndex index =
      runtime::agree_on_index(comm, spec, data.centers.view(), my_tokens);

  // Exact reference for recall, on each rank's own tokens.
  if (me == 0) progress("exact routing for recall");
  const Routes exact = DenseRouter(data.centers.view()).route(my_tokens, k);

  std::vector<json> rows;
  for (runtime::PlacementPolicy policy : policies) {
    const char* name = runtime::to_string(policy);
    if (me == 0) progress("placement %s: planning, routing, syncing", name);
    spec.placement = policy;
    const runtime::PlacementPlan plan = runtime::place_experts(comm, spec, index);
    const std::unique_ptr<runtime::DistributedRouter> built =
        runtime::make_router(comm, index, plan.placement, data.centers.view());
    runtime::DistributedRouter& router = *built;

    Routes r;
    runtime::RouteTimings best;
    double best_total = 1e300;
    for (int rep = 0; rep < repeats; ++rep) {
      comm.barrier();
      comm.meter().reset();
      runtime::RouteResult result = router.route_batch(my_tokens, k, probes);
      r = std::move(result.routes);
      const runtime::RouteTimings& t = result.timings;
      const double total =
          max_over_ranks(comm, t.shortlist + t.requests + t.scoring + t.replies + t.merge);
      if (total < best_total) {
        best_total = total;
        best = t;
      }
    }
    const comm::TrafficMeter route_meter = comm.meter();
    comm.meter().reset();
    comm.barrier();
    const double s0 = now_seconds();
    router.sync_codebook(1.0, 1);
    const double sync_seconds = max_over_ranks(comm, now_seconds() - s0);
    const comm::TrafficMeter sync_meter = comm.meter();

    // Figures over all ranks.
    json bytes, messages;
    for (const char* phase : kPhases) {
      const auto& m =
          std::string(phase).find("sync") != std::string::npos ? sync_meter : route_meter;
      const comm::TrafficCounts c = m.sent(phase);
      bytes[phase] = sum_over_ranks(comm, static_cast<double>(c.bytes));
      messages[phase] = sum_over_ranks(comm, static_cast<double>(c.messages));
    }
    double ranks_reached = 0.0;
    for (int64_t t = 0; t < r.tokens; ++t) {
      std::set<int32_t> reach;
      for (int64_t p = r.probe_offsets[t]; p < r.probe_offsets[t + 1]; ++p)
        for (int32_t rank : plan.placement.list_ranks(r.probed_codewords[p])) reach.insert(rank);
      ranks_reached += static_cast<double>(reach.size());
    }
    const double hits = sum_over_ranks(comm, recall_at_k(r, exact) * static_cast<double>(r.tokens));
    const double mass = sum_over_ranks(comm, mass_recall(r, exact) * static_cast<double>(r.tokens));
    const double reached = sum_over_ranks(comm, ranks_reached);
    const double T = static_cast<double>(num_tokens);
    const double broadcast_bytes = T * (P - 1) * (4.0 + 4.0 * static_cast<double>(dim));
    json seconds = {{"shortlist", max_over_ranks(comm, best.shortlist)},
                    {"requests", max_over_ranks(comm, best.requests)},
                    {"scoring", max_over_ranks(comm, best.scoring)},
                    {"scoring_pairs", max_over_ranks(comm, best.scoring_pairs)},
                    {"replies", max_over_ranks(comm, best.replies)},
                    {"merge", max_over_ranks(comm, best.merge)},
                    {"route_total", best_total},
                    {"kmeans_sync", sync_seconds}};
    rows.push_back(
        {{"placement", name},
         {"ranks", P},
         {"mean_ranks_per_token", reached / T},
         {"bytes", bytes},
         {"messages", messages},
         {"broadcast_bytes", broadcast_bytes},
         {"requests_vs_broadcast", ratio_or_null(bytes["requests"].get<double>(), broadcast_bytes)},
         {"recall_at_k", hits / T},
         {"mass_recall", mass / T},
         {"imbalance", plan.imbalance},
         {"experts_per_rank", plan.placement.experts_per_rank()},
         {"seconds", seconds}});
    if (!routes_dir.empty()) save_global_routes(comm, r, routes_dir, name);
  }

  // Open MPI passes `--mca pml X` to its processes as OMPI_MCA_pml.
  const char* pml_env = std::getenv("OMPI_MCA_pml");
  const std::string pml = pml_env && *pml_env && pml_env[0] != '^' ? pml_env : "default (ob1)";
  if (me == 0) {
    std::printf(
        "\nairmoe traffic benchmark  (%s, E=%ld d=%ld T=%ld k=%d C=%ld m=%d, %d ranks over %s, pml "
        "%s)\n",
        source.c_str(), (long)experts, (long)dim, (long)num_tokens, k, (long)codewords, probes, P,
        comm.backend(), pml.c_str());
    std::printf("%-12s %10s %12s %12s %12s %9s %8s %9s %10s %10s\n", "placement", "ranks/tok",
                "requests MB", "replies MB", "bcast MB", "req/bcast", "recall", "imbalance",
                "route s", "sync KB");
    for (const json& row : rows)
      std::printf(
          "%-12s %10.2f %12.2f %12.2f %12.2f %9s %8.4f %9.3f %10.4f %10.1f\n",
          row["placement"].get<std::string>().c_str(), row["mean_ranks_per_token"].get<double>(),
          row["bytes"]["requests"].get<double>() / 1e6, row["bytes"]["replies"].get<double>() / 1e6,
          row["broadcast_bytes"].get<double>() / 1e6,
          cell(row["requests_vs_broadcast"], "%.3f").c_str(), row["recall_at_k"].get<double>(),
          row["imbalance"].get<double>(), row["seconds"]["route_total"].get<double>(),
          (row["bytes"]["kmeans_sync"].get<double>() + row["bytes"]["list_sync"].get<double>()) /
              1e3);
    if (json_out.wanted()) {
      json j;
      j["benchmark"] = "traffic";
      j["config"] = {{"experts", experts},
                     {"dim", dim},
                     {"tokens", num_tokens},
                     {"k", k},
                     {"codewords", codewords},
                     {"probes", probes},
                     {"data", source},
                     {"seed", o.seed},
                     {"ranks", P},
                     {"backend", comm.backend()},
                     {"mpi_pml", pml},
                     {"threads_per_rank", num_threads()}};
      j["results"] = rows;
      json_out.stream() << j.dump(2) << "\n";
      json_out.finish();
    }
  }
  return 0;
}

}  // namespace

int run_traffic(const std::vector<std::string>& args) {
  return run_on_mpi_world("traffic", args, traffic_main);
}

}  // namespace airmoe::bench
