// airmoe_bench simulate: per-rank, per-phase traffic of the three strategies
// for P up to thousands of ranks, in one process, from the same placement,
// routing and wire-format code as a real run (runtime/simulator.h). Weak
// scaling (the default): a fixed batch per rank, a sample of ranks routed;
// --tokens-per-rank 0: -T tokens in all, split over the ranks. --save-data
// writes what the weak sweep routed and placed, for analyses outside it
// (scripts/certified_requests.py).
#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench_common.h"
#include "bench_data.h"
#include "core/checks.h"
#include "core/npy.h"
#include "core/synthetic.h"
#include "layer_report.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "router/metrics.h"
#include "router/request_keys.h"
#include "runtime/coordinator.h"
#include "runtime/simulator.h"
#include "runtime/wire.h"

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

// ---------------------------------------------------------- weak scaling ---
// A fixed batch per rank; only a sample of ranks is routed (each from its own
// token stream), and their traffic is counted exactly (runtime::simulate_sample).

struct Stat {
  double mean = 0.0, max = 0.0, stderr_mean = 0.0;
};

// Mean, max and the standard error of the mean of `v` over the sample.
Stat stat_of(const std::vector<double>& v) {
  Stat s;
  if (v.empty()) return s;
  const double n = static_cast<double>(v.size());
  for (double x : v) s.mean += x / n;
  s.max = *std::max_element(v.begin(), v.end());
  if (v.size() > 1) {
    double ss = 0.0;
    for (double x : v) ss += (x - s.mean) * (x - s.mean);
    s.stderr_mean = std::sqrt(ss / (n - 1.0) / n);
  }
  return s;
}

json to_json(const Stat& s) {
  return {{"mean", s.mean}, {"max", s.max}, {"stderr", s.stderr_mean}};
}

// One sampled rank's batch, routed every way the sweep needs.
struct SampleRoutes {
  Routes exact;             // AIR probing every list: exact top-k (and dense-broadcast's probes)
  std::vector<Routes> air;  // per --probes
  // per --request-key-bits, per --probes: air's routes with their contenders
  std::vector<std::vector<Routes>> keyed;
};

// AIR's routes with the contenders of `keys` (what the distributed router
// with set_request_keys sends requests to).
Routes with_contenders(Routes routes, MatrixView tokens, const RequestKeys& keys,
                       const InvertedLists& lists, std::span<const float> bias = {}) {
  set_contenders(routes, tokens, keys, lists, bias);
  return routes;
}

// --request-key-bits: every expert's keys at each of the bits.
std::vector<RequestKeys> request_keys(MatrixView centers, const std::vector<int>& bits) {
  std::vector<RequestKeys> out;
  for (int b : bits) {
    progress("quantizing the request keys: %d bits", b);
    out.emplace_back(centers, b);
  }
  return out;
}

// Routes of each sampled rank's batch, drawn and routed once per rank.
class SampleCache {
 public:
  SampleCache(const SyntheticGenerator& gen, const AirRouter& air, int64_t tokens_per_rank, int k,
              const std::vector<int>& probes, const std::vector<RequestKeys>& keys)
      : gen_(gen),
        air_(air),
        tokens_per_rank_(tokens_per_rank),
        k_(k),
        probes_(probes),
        keys_(keys) {}

  const SampleRoutes& of(int rank) {
    auto it = cache_.find(rank);
    if (it != cache_.end()) return it->second;
    const Matrix tokens =
        gen_.tokens(static_cast<int64_t>(rank) * tokens_per_rank_, tokens_per_rank_);
    SampleRoutes r;
    r.exact = air_.route(tokens.view(), k_, static_cast<int>(air_.codebook().size()));
    for (int m : probes_) r.air.push_back(air_.route(tokens.view(), k_, m));
    for (const RequestKeys& keys : keys_) {
      r.keyed.emplace_back();
      for (const Routes& air : r.air)
        r.keyed.back().push_back(with_contenders(air, tokens.view(), keys, air_.lists()));
    }
    return cache_.emplace(rank, std::move(r)).first->second;
  }
  size_t routed() const { return cache_.size(); }

 private:
  const SyntheticGenerator& gen_;
  const AirRouter& air_;
  int64_t tokens_per_rank_;
  int k_;
  std::vector<int> probes_;
  const std::vector<RequestKeys>& keys_;
  std::map<int, SampleRoutes> cache_;
};

// The sampled ranks at P: the first S. A batch's routes do not depend on P,
// so the same ranks at every P are routed once for the whole sweep (routing
// is the sweep's cost: S x tokens-per-rank x E x d for the exact routes). A
// home's rank number matters to its traffic only through its self-sends
// (its tokens' targets do not depend on where they come from), so the first
// ranks are as typical as any.
std::vector<int> sample_ranks(int P, int S) {
  std::vector<int> out;
  for (int r = 0; r < std::min(P, S); ++r) out.push_back(r);
  return out;
}

// One row: per-rank figures per step (forward and backward) over the sample.
json sample_row(const std::string& strategy, int m, comm::ExchangeKind kind,
                const runtime::SimulatedTraffic& sim, double recall) {
  const size_t n = sim.rank_ids.size();
  std::vector<double> bytes(n, 0.0), messages(n, 0.0), data_messages(n, 0.0);
  json by_phase_bytes = json::object(), by_phase_messages = json::object();
  for (const auto& [phase, per_rank] : sim.sent) {
    double b = 0.0, msg = 0.0;
    const bool payload = phase.find(':') == std::string::npos;
    for (size_t i = 0; i < n; ++i) {
      bytes[i] += static_cast<double>(per_rank[i].bytes);
      messages[i] += static_cast<double>(per_rank[i].messages);
      if (payload) data_messages[i] += static_cast<double>(per_rank[i].messages);
      b += static_cast<double>(per_rank[i].bytes) / static_cast<double>(n);
      msg += static_cast<double>(per_rank[i].messages) / static_cast<double>(n);
    }
    by_phase_bytes[phase] = b;
    by_phase_messages[phase] = msg;
  }
  const Stat b = stat_of(bytes), msg = stat_of(messages), peers = stat_of(data_messages);
  PhaseFigures means;
  for (const auto& [phase, value] : by_phase_bytes.items())
    means.bytes[phase] = value.get<double>();
  const double forward = phase_totals(reported_phases(means)).forward;
  return {{"strategy", strategy},
          {"probes", m},
          {"ranks", sim.ranks},
          {"exchange", kind == comm::ExchangeKind::kSparse ? "sparse" : "dense"},
          {"sampled_ranks", sim.rank_ids},
          {"bytes_per_rank", to_json(b)},
          {"messages_per_rank", to_json(msg)},
          {"data_messages_per_rank", to_json(peers)},
          {"messages_per_data_message", ratio_or_null(msg.mean, peers.mean)},
          {"mean_bytes_by_phase", by_phase_bytes},
          {"forward_bytes_per_rank", forward},
          {"mean_messages_by_phase", by_phase_messages},
          {"mean_ranks_per_token", sim.mean_ranks_per_token},
          {"recall_at_k", recall}};
}

// bytes_vs_floor: mean bytes per rank over dense-replicated's at the same P
// and exchange (null at P = 1, where nothing is sent); forward_vs_floor the
// same of the forward phases alone.
void finish_sample_rows(std::vector<json>& rows) {
  for (json& row : rows) {
    double floor = 0.0, forward_floor = 0.0;
    for (const json& o : rows)
      if (o["strategy"] == "dense-replicated" && o["ranks"] == row["ranks"] &&
          o["exchange"] == row["exchange"]) {
        floor = o["bytes_per_rank"]["mean"].get<double>();
        forward_floor = o["forward_bytes_per_rank"].get<double>();
      }
    row["bytes_vs_floor"] = ratio_or_null(row["bytes_per_rank"]["mean"].get<double>(), floor);
    row["forward_vs_floor"] =
        ratio_or_null(row["forward_bytes_per_rank"].get<double>(), forward_floor);
    if (!row.contains("request_key_bits")) row["request_key_bits"] = 0;
  }
}

// A row's strategy as printed: air with request keys as "air+keys8".
std::string row_label(const json& row) {
  const int bits = row.value("request_key_bits", 0);
  const std::string name = row["strategy"].get<std::string>();
  return bits > 0 ? name + "+keys" + std::to_string(bits) : name;
}

double mean_recall(const std::vector<const Routes*>& got, const std::vector<const Routes*>& exact) {
  double sum = 0.0;
  for (size_t i = 0; i < got.size(); ++i) sum += recall_at_k(*got[i], *exact[i]);
  return got.empty() ? 0.0 : sum / static_cast<double>(got.size());
}

struct WeakOptions {
  int64_t tokens_per_rank = 4096;
  int sample = 8;
  std::vector<comm::ExchangeKind> kinds;
  DType wire_dtype = DType::kF32;  // token vectors on the wire (both modes)
  std::string data_dir;            // --save-data (none: "")
  std::vector<int> key_bits;       // --request-key-bits (none: empty)
};

// --save-data: the data of the weak sweep as .npy files. The experts, AIR's
// codewords and lists, and the sampled ranks' batches one after another
// (rank r's are rows [r T, (r + 1) T) of tokens.npy) are written first;
// owners_P<P>.npy (each expert's rank) as each P is placed.
void save_sweep_data(const std::string& dir, const SyntheticGenerator& gen, const AirRouter& air,
                     const WeakOptions& w) {
  const Matrix& centers = gen.centers();
  save_npy_in("--save-data", dir, "centers.npy", centers.data(), centers.rows(), centers.cols());
  const MatrixView codewords = air.codebook().codewords();
  save_npy_in("--save-data", dir, "codewords.npy", codewords.data, codewords.rows, codewords.cols);
  const std::vector<int32_t>& lists = air.lists().assignment();
  save_npy_in("--save-data", dir, "assignment.npy", lists.data(),
              static_cast<int64_t>(lists.size()), 1);
  const Matrix tokens = gen.tokens(0, static_cast<int64_t>(w.sample) * w.tokens_per_rank);
  save_npy_in("--save-data", dir, "tokens.npy", tokens.data(), tokens.rows(), tokens.cols());
}

// Rows of every strategy at P over the sample.
std::vector<json> simulate_weak_at(int P, const WeakOptions& w, SampleCache& cache,
                                   const runtime::Placement& placement, int64_t d,
                                   const std::vector<int>& probes, int C) {
  const std::vector<int> ranks = sample_ranks(P, w.sample);
  std::vector<runtime::RankBlock> exact_blocks;
  std::vector<const Routes*> exact;
  std::vector<std::vector<runtime::RankBlock>> air_blocks(probes.size());
  std::vector<std::vector<const Routes*>> air(probes.size());
  // [bits][m]: the same routes with their contenders.
  std::vector<std::vector<std::vector<runtime::RankBlock>>> keyed_blocks(
      w.key_bits.size(), std::vector<std::vector<runtime::RankBlock>>(probes.size()));
  for (int r : ranks) {
    const SampleRoutes& s = cache.of(r);
    exact_blocks.push_back({r, &s.exact});
    exact.push_back(&s.exact);
    for (size_t i = 0; i < probes.size(); ++i) {
      air_blocks[i].push_back({r, &s.air[i]});
      air[i].push_back(&s.air[i]);
      for (size_t b = 0; b < w.key_bits.size(); ++b)
        keyed_blocks[b][i].push_back({r, &s.keyed[b][i]});
    }
  }
  std::vector<json> rows;
  for (comm::ExchangeKind kind : w.kinds) {
    auto add = [&](const char* name, runtime::Strategy s,
                   const std::vector<runtime::RankBlock>& blocks, int m, double recall) {
      const runtime::SimulatedTraffic sim =
          runtime::simulate_sample(s, placement, blocks, d, /*backward=*/true, kind, w.wire_dtype);
      rows.push_back(sample_row(name, m, kind, sim, recall));
    };
    add("dense-replicated", runtime::Strategy::kDenseReplicated, exact_blocks, 0, 1.0);
    add("dense-broadcast", runtime::Strategy::kDenseBroadcast, exact_blocks, C, 1.0);
    for (size_t i = 0; i < probes.size(); ++i) {
      const double recall = mean_recall(air[i], exact);
      add("air", runtime::Strategy::kAir, air_blocks[i], probes[i], recall);
      for (size_t b = 0; b < w.key_bits.size(); ++b) {
        add("air", runtime::Strategy::kAir, keyed_blocks[b][i], probes[i], recall);
        rows.back()["request_key_bits"] = w.key_bits[b];
      }
    }
  }
  return rows;
}

void print_weak(const std::vector<json>& rows) {
  std::printf("%6s %-17s %4s %-7s %14s %10s %14s %11s %11s %9s %8s %8s %8s %8s\n", "P", "strategy",
              "m", "xchg", "bytes/rank", "+-stderr", "max bytes", "msgs/rank", "max msgs",
              "msg/peer", "vs floor", "fwd only", "recall", "ranks/t");
  for (const json& r : rows)
    std::printf(
        "%6d %-17s %4d %-7s %14.0f %10.0f %14.0f %11.1f %11.0f %9s %8s %8s %8.4f %8.2f\n",
        r["ranks"].get<int>(), row_label(r).c_str(), r["probes"].get<int>(),
        r["exchange"].get<std::string>().c_str(), r["bytes_per_rank"]["mean"].get<double>(),
        r["bytes_per_rank"]["stderr"].get<double>(), r["bytes_per_rank"]["max"].get<double>(),
        r["messages_per_rank"]["mean"].get<double>(), r["messages_per_rank"]["max"].get<double>(),
        cell(r["messages_per_data_message"], "%.2f").c_str(),
        cell(r["bytes_vs_floor"], "%.3f").c_str(), cell(r["forward_vs_floor"], "%.3f").c_str(),
        r["recall_at_k"].get<double>(), r["mean_ranks_per_token"].get<double>());
}

int run_weak(DataOptions& o, const WeakOptions& w, const std::vector<int>& ranks,
             const std::vector<int>& probes, const std::string& placement_name, int hidden,
             OutputFile& json_out) {
  if (!o.centers_file.empty())
    throw std::invalid_argument(
        "--tokens-per-rank draws each sampled rank's batch from the generator; with --centers "
        "and --tokens pass --tokens-per-rank 0");
  if (w.sample < 1) fail("--sample-ranks must be >= 1");
  const double t_start = now_seconds();
  const runtime::PlacementPolicy policy = runtime::placement_policy_from_string(placement_name);
  progress("generating the experts: E=%ld d=%ld", (long)o.experts, (long)o.dim);
  const SyntheticGenerator gen(o.synthetic_config());
  const int64_t d = o.dim, C = o.codewords;
  progress("training the codebook: C=%ld", (long)C);
  const AirRouter air(gen.centers().view(), AirConfig{C, o.kmeans_iters, 1234, 0});
  // The placement's expected load, from rank 0's first -T tokens.
  const Matrix calibration = gen.tokens(0, o.tokens);
  const std::vector<double> load = runtime::list_load(
      air.lists(), air.route(calibration.view(), o.k, probes.front()).probed_codewords);
  if (!w.data_dir.empty()) save_sweep_data(w.data_dir, gen, air, w);
  const std::vector<RequestKeys> keys = request_keys(gen.centers().view(), w.key_bits);
  SampleCache cache(gen, air, w.tokens_per_rank, o.k, probes, keys);
  const double t_sweep = now_seconds();
  std::vector<json> rows;
  for (int P : ranks) {
    const double t0 = now_seconds();
    const runtime::PlacementPlan plan =
        runtime::plan_placement(policy, P, air.codebook(), air.lists(), load);
    if (!w.data_dir.empty())
      save_npy_in("--save-data", w.data_dir, "owners_P" + std::to_string(P) + ".npy",
                  plan.placement.owners().data(), plan.placement.experts(), 1);
    std::vector<json> group =
        simulate_weak_at(P, w, cache, plan.placement, d, probes, static_cast<int>(C));
    finish_sample_rows(group);
    for (json& row : group) row["imbalance"] = plan.imbalance;
    rows.insert(rows.end(), group.begin(), group.end());
    progress("P=%d simulated in %.2f s (%zu batches routed so far)", P, now_seconds() - t0,
             cache.routed());
  }
  const double sweep_seconds = now_seconds() - t_sweep;
  std::printf(
      "\nairmoe traffic simulation, weak scaling  (synthetic:%s, E=%ld d=%ld, %ld tokens per "
      "rank, k=%d C=%ld, %s placement)\nper rank per step (forward + backward), over a sample of "
      "up to %d ranks: mean, its standard error, max\n",
      o.preset.c_str(), (long)o.experts, (long)d, (long)w.tokens_per_rank, o.k, (long)C,
      placement_name.c_str(), w.sample);
  print_weak(rows);
  std::printf("simulated %zu rank counts in %.1f s (sweep %.1f s, %zu batches routed)\n",
              ranks.size(), now_seconds() - t_start, sweep_seconds, cache.routed());
  if (json_out.wanted()) {
    json j;
    j["benchmark"] = "simulate";
    j["mode"] = "weak";
    j["sampled"] = true;
    j["note"] =
        "figures are over a sample of ranks (sampled_ranks), each routing its own batch; a "
        "rank's traffic counts what its tokens send out and what the others send back to it";
    j["config"] = {{"experts", o.experts},
                   {"dim", d},
                   {"tokens_per_rank", w.tokens_per_rank},
                   {"sample_ranks", w.sample},
                   {"k", o.k},
                   {"hidden", hidden},
                   {"codewords", C},
                   {"placement", placement_name},
                   {"data", "synthetic:" + o.preset},
                   {"seed", o.seed},
                   {"wire_dtype", to_string(w.wire_dtype)},
                   {"request_key_bits", w.key_bits}};
    j["seconds"] = {{"total", now_seconds() - t_start}, {"sweep", sweep_seconds}};
    j["results"] = rows;
    json_out.stream() << j.dump(2) << "\n";
    json_out.finish();
  }
  return 0;
}

std::vector<comm::ExchangeKind> exchange_kinds(const std::string& name) {
  if (name == "sparse") return {comm::ExchangeKind::kSparse};
  if (name == "dense") return {comm::ExchangeKind::kCountsFirst};
  if (name == "both") return {comm::ExchangeKind::kCountsFirst, comm::ExchangeKind::kSparse};
  throw std::invalid_argument("--exchange: '" + name + "' is not sparse, dense or both");
}

}  // namespace

int run_simulate(const std::vector<std::string>& args) {
  DataOptions o;
  int hidden = 16;
  std::string ranks_text = "16,32,64,128,256,512,1024,2048,4096", probes_text = "2,4,8";
  std::string placement_name = "locality", csv_file, exchange_name = "both";
  std::string wire_dtype_name = "f32", key_bits_text, bias_file;
  WeakOptions weak;
  po::options_description opts("airmoe_bench simulate options");
  opts.add_options()("help,h", "show this help");
  o.add_to(opts);
  opts.add_options()("ranks,P", po::value(&ranks_text)->default_value(ranks_text),
                     "comma-separated rank counts, each in [1, 65536]")(
      "probes,m", po::value(&probes_text)->default_value(probes_text), "AIR probe counts")(
      "hidden", po::value(&hidden)->default_value(hidden), "expert hidden size h (>= 1)")(
      "placement", po::value(&placement_name)->default_value(placement_name),
      "round-robin, list or locality")("csv", path_value(&csv_file, "--csv"),
                                       "one CSV row per (P, strategy); -T tokens in all only")(
      "tokens-per-rank", po::value(&weak.tokens_per_rank)->default_value(weak.tokens_per_rank),
      "weak scaling: each rank's batch (0: -T tokens in all, split over the ranks)")(
      "sample-ranks", po::value(&weak.sample)->default_value(weak.sample),
      "weak scaling: ranks routed and counted (the first S, the same at every P)")(
      "exchange", po::value(&exchange_name)->default_value(exchange_name),
      "metering rule of the layer's all-to-alls: sparse (the MPI and in-process exchange), dense "
      "(counts first: the NCCL exchange, or an alltoallv) or both "
      "(-T tokens in all: sparse for both)")(
      "wire-dtype", po::value(&wire_dtype_name)->default_value(wire_dtype_name),
      "element type of the token vectors on the wire: f32 or bf16")(
      "save-data", path_value(&weak.data_dir, "--save-data"),
      "weak scaling: write the experts, codewords, lists, sampled batches and each P's owners "
      "as .npy files to this folder")(
      "request-key-bits", po::value(&key_bits_text)->default_value(key_bits_text),
      "comma-separated bits (2 to 16) of replicated request keys: air rows with each, their "
      "requests sent only to the owners of a token's contenders (none: \"\")")(
      "bias", path_value(&bias_file, "--bias"),
      "with --centers, --tokens and --tokens-per-rank 0: a selection bias [E, 1] from a float32 "
      ".npy file (AIR and exact routing select by z + b; request keys keep it exact)");
  if (!parse(args, opts, true)) return 0;
  o.validate();
  require_in_range(hidden, 1, INT32_MAX, "--hidden");
  const std::vector<int> ranks = parse_int_list(ranks_text, "-P/--ranks", 1, kMaxSimulatedRanks);
  const std::vector<int> probes = parse_int_list(probes_text, "-m/--probes", 1, probe_limit(o));
  weak.kinds = exchange_kinds(exchange_name);
  if (!key_bits_text.empty())
    weak.key_bits = parse_int_list(key_bits_text, "--request-key-bits", 2, 16);
  weak.wire_dtype = runtime::wire::wire_dtype_from_string(wire_dtype_name, "--wire-dtype");
  if (weak.tokens_per_rank < 0) fail("--tokens-per-rank must be >= 0");
  std::vector<NamedPath> apart = o.inputs();
  apart.push_back({"--bias", bias_file});
  OutputFile json_out(o.json_file, "--json", apart);
  apart.push_back({"--json", o.json_file});
  OutputFile csv_out(csv_file, "--csv", apart);
  if (!weak.data_dir.empty()) {
    if (weak.tokens_per_rank == 0) fail("--save-data: needs --tokens-per-rank > 0 (weak scaling)");
    require_writable_folder(weak.data_dir, "--save-data");
  }
  if (weak.tokens_per_rank > 0) {
    if (csv_out.wanted()) fail("--csv: needs --tokens-per-rank 0 (-T tokens in all)");
    if (!bias_file.empty()) fail("--bias: needs --tokens-per-rank 0 with --centers and --tokens");
    return run_weak(o, weak, ranks, probes, placement_name, hidden, json_out);
  }
  const comm::ExchangeKind exchange = weak.kinds.back();
  const runtime::PlacementPolicy policy = runtime::placement_policy_from_string(placement_name);
  const double t_start = now_seconds();

  progress("preparing data");
  const BenchData bench = load_data(o);
  const MatrixView centers = bench.data.centers.view(), tokens = bench.data.tokens.view();
  const int64_t d = o.dim, E = o.experts, C = o.codewords;
  const Matrix bias = read_bias_option(bias_file, E);  // refused before any work
  progress("training the codebook: C=%ld", (long)C);
  AirRouter air(centers, AirConfig{C, o.kmeans_iters, 1234, 0});
  const InvertedLists& lists = air.lists();
  DenseRouter dense(centers);
  if (!bias_file.empty()) {
    air.set_bias(bias.view());
    dense.set_bias(bias.view());
  }
  const std::span<const float> bias_values(bias.data(), static_cast<size_t>(bias.size()));
  progress("routing: exact, and AIR for each m");
  const Routes exact = dense.route(tokens, o.k);
  const Routes broadcast = air.route(tokens, o.k, static_cast<int>(C));  // probes every list
  std::vector<Routes> air_routes;
  for (int m : probes) air_routes.push_back(air.route(tokens, o.k, m));
  const std::vector<double> load =
      runtime::list_load(lists, air.route(tokens, o.k, probes.front()).probed_codewords);
  std::vector<std::vector<Routes>> keyed;  // [bits][m]
  for (const RequestKeys& keys : request_keys(centers, weak.key_bits)) {
    keyed.emplace_back();
    for (const Routes& r : air_routes)
      keyed.back().push_back(with_contenders(r, tokens, keys, lists, bias_values));
  }
  const double expert_flops = static_cast<double>(o.k) * 4.0 * static_cast<double>(d * hidden);
  const double dense_flops = 2.0 * static_cast<double>(E * d);

  std::vector<json> rows;
  for (int P : ranks) {
    const double t0 = now_seconds();
    const runtime::PlacementPlan plan =
        runtime::plan_placement(policy, P, air.codebook(), lists, load);
    std::vector<json> group;
    auto add = [&](const char* name, runtime::Strategy s, const Routes& r, int m,
                   double router_flops) {
      const runtime::SimulatedTraffic sim = runtime::simulate_traffic(
          s, plan.placement, r, tokens, /*backward=*/true, exchange, weak.wire_dtype);
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
    for (size_t i = 0; i < probes.size(); ++i) {
      const double flops = air.flops_per_token(shortlist_stats(air_routes[i]).mean);
      add("air", runtime::Strategy::kAir, air_routes[i], probes[i], flops);
      group.back()["request_key_bits"] = 0;
      for (size_t b = 0; b < keyed.size(); ++b) {
        add("air", runtime::Strategy::kAir, keyed[b][i], probes[i], flops);
        group.back()["request_key_bits"] = weak.key_bits[b];
      }
    }
    finish_rows(group);
    const double bcast_requests = group[1]["bytes"]["requests"].get<double>();
    for (json& row : group) {
      row["requests_vs_dense_broadcast"] =
          ratio_or_null(row["bytes"]["requests"].get<double>(), bcast_requests);
      rows.push_back(row);
    }
    progress("P=%d simulated in %.2f s", P, now_seconds() - t0);
  }

  std::printf(
      "\nairmoe traffic simulation  (%s, E=%ld d=%ld T=%ld k=%d h=%d C=%ld, %s placement, %s "
      "wire)\n",
      bench.source.c_str(), (long)E, (long)d, (long)o.tokens, o.k, hidden, (long)C,
      placement_name.c_str(), to_string(weak.wire_dtype));
  std::printf("%6s %-17s %4s %12s %10s %14s %9s %11s\n", "P", "strategy", "m", "fwd B/token",
              "vs floor", "req vs bcast", "recall", "ranks/token");
  for (const json& r : rows)
    std::printf("%6d %-17s %4d %12.0f %10s %14s %9.4f %11.2f\n", r["ranks"].get<int>(),
                row_label(r).c_str(), r["probes"].get<int>(),
                r["bytes_per_token_forward"].get<double>(),
                cell(r["bytes_vs_floor"], "%.3f").c_str(),
                cell(r["requests_vs_dense_broadcast"], "%.3f").c_str(),
                r["recall_at_k"].get<double>(), r["mean_ranks_per_token"].get<double>());
  std::printf("simulated %zu rank counts in %.1f s\n", ranks.size(), now_seconds() - t_start);
  if (json_out.wanted()) {
    json j;
    j["benchmark"] = "simulate";
    j["config"] = {{"experts", E},
                   {"dim", d},
                   {"tokens", o.tokens},
                   {"k", o.k},
                   {"hidden", hidden},
                   {"codewords", C},
                   {"placement", placement_name},
                   {"data", bench.source},
                   {"seed", o.seed},
                   {"exchange", exchange == comm::ExchangeKind::kSparse ? "sparse" : "dense"},
                   {"wire_dtype", to_string(weak.wire_dtype)},
                   {"request_key_bits", weak.key_bits},
                   {"bias", bias_file}};
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
