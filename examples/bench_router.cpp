// airmoe_bench router: routing speed and quality of AIR against exact dense
// top-k, FAISS IndexIVFFlat on the same codebook, and product keys, all in one
// process with one thread count.
#include <cblas.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "bench_common.h"
#include "core/checks.h"
#include "core/npy.h"
#include "core/synthetic.h"
#include "core/threads.h"
#include "faiss_ivf.h"
#include "ops/registry.h"
#include "router/air_defaults.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "router/metrics.h"
#include "router/product_key_router.h"

namespace po = boost::program_options;
using nlohmann::json;

namespace airmoe::bench {
namespace {

struct Row {
  explicit Row(std::string name, int m = 0) : router(std::move(name)), probes(m) {}
  std::string router;
  int probes = 0;
  double seconds = 0.0;
  double tokens_per_s = 0.0;
  double recall = 0.0;
  double mass = 0.0;
  ShortlistStats shortlist;
  double flops = 0.0;
};

json to_json(const Row& r, double dense_tokens_per_s) {
  return {{"router", r.router},
          {"probes", r.probes},
          {"seconds", r.seconds},
          {"tokens_per_s", r.tokens_per_s},
          {"speedup_vs_dense", r.tokens_per_s / dense_tokens_per_s},
          {"recall_at_k", r.recall},
          {"mass_recall", r.mass},
          {"shortlist_mean", r.shortlist.mean},
          {"shortlist_p99", r.shortlist.p99},
          {"flops_per_token", r.flops}};
}

// GFLOP/s of one [rows x E] block of logits, by OpenBLAS sgemm and by the
// host backend's scoring op (the dense router's): its rate against BLAS's.
std::pair<double, double> gemm_rates(MatrixView tokens, MatrixView centers, int repeats) {
  const int64_t rows = std::min<int64_t>(tokens.rows, 384), E = centers.rows, d = centers.cols;
  if (rows == 0) return {0.0, 0.0};
  std::vector<float> out(static_cast<size_t>(rows * E));
  const double flops = 2.0 * static_cast<double>(rows) * E * d;
  const double blas = best_seconds(repeats, [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
                static_cast<int>(E), static_cast<int>(d), 1.0f, tokens.data, static_cast<int>(d),
                centers.data, static_cast<int>(d), 0.0f, out.data(), static_cast<int>(E));
  });
  const TensorView c(out.data(), DType::kF32, Device::host(), rows, E);
  const double ours = best_seconds(
      repeats, [&] { host_ops().score(TensorView(tokens).row_range(0, rows), centers, c, {}); });
  return {flops / blas / 1e9, flops / ours / 1e9};
}

void save_routes(const std::string& dir, const std::string& name, const Routes& r) {
  std::filesystem::create_directories(dir);
  write_npy(dir + "/" + name + "_experts.npy", r.experts.data(), r.tokens, r.k);
  write_npy(dir + "/" + name + "_gates.npy", r.gates.data(), r.tokens, r.k);
}

std::string route_name(const Row& r) {
  return r.probes > 0 ? r.router + "_m" + std::to_string(r.probes) : r.router;
}

// An AIR list layout to compare: "air" (plain), "spill", "balanced",
// "spill+balanced"; all share one trained codebook.
struct Variant {
  std::string row_name;
  ListOptions lists;
};

std::vector<Variant> parse_variants(const std::string& text, int spills, double lambda,
                                    int64_t cap) {
  std::vector<Variant> out;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t end = std::min(text.find(',', start), text.size());
    const std::string name = text.substr(start, end - start);
    if (name == "air")
      out.push_back({"air", {}});
    else if (name == "spill")
      out.push_back({"air_spill", {0, spills, lambda}});
    else if (name == "balanced")
      out.push_back({"air_balanced", {cap, 0, lambda}});
    else if (name == "spill+balanced")
      out.push_back({"air_spill_balanced", {cap, spills, lambda}});
    else
      throw std::invalid_argument("--variants: unknown variant '" + name +
                                  "' (air, spill, balanced, spill+balanced)");
    start = end + 1;
  }
  return out;
}

// Per AIR variant, the row with the highest recall whose mean shortlist fits
// the budget: the comparison at equal stage-2 FLOPs.
void print_budget_summary(const std::vector<Row>& rows, double budget, int k) {
  std::printf("\nbest recall@%d at a mean shortlist <= %.0f experts:\n", k, budget);
  std::vector<std::string> seen;
  for (const Row& r : rows) {
    if (r.router.rfind("air", 0) != 0 ||
        std::find(seen.begin(), seen.end(), r.router) != seen.end())
      continue;
    seen.push_back(r.router);
    const Row* best = nullptr;
    for (const Row& q : rows)
      if (q.router == r.router && q.shortlist.mean <= budget && (!best || q.recall > best->recall))
        best = &q;
    if (best)
      std::printf("  %-20s m=%-4d recall %.4f  mass %.4f  shortlist %.0f\n", r.router.c_str(),
                  best->probes, best->recall, best->mass, best->shortlist.mean);
    else
      std::printf("  %-20s no row within the budget\n", r.router.c_str());
  }
}

}  // namespace

int run_router(const std::vector<std::string>& args) {
  int64_t experts = 65536, dim = 512, num_tokens = 4096, codewords = 0;
  int k = 8, threads = 0, repeats = 3, kmeans_iters = 10, spills = 1;
  uint64_t seed = 42;
  double soar_lambda = 1.0, balance = 1.25, shortlist_budget = 0.0;
  std::string probes_text = "1,2,4,8,16,32", preset = "default", centers_file, tokens_file;
  std::string json_file, routes_dir, gates = "chosen", variants_text = "air";
  bool no_faiss = false, no_product_key = false;

  po::options_description opts("airmoe_bench router options");
  opts.add_options()("help,h", "show this help")("experts,E",
                                                 po::value(&experts)->default_value(experts),
                                                 "number of experts E (generated data)")(
      "dim,d", po::value(&dim)->default_value(dim), "model dimension d (generated data)")(
      "num-tokens,T", po::value(&num_tokens)->default_value(num_tokens),
      "tokens to route (generated data)")("k", po::value(&k)->default_value(k),
                                          "experts per token")(
      "codewords,C", po::value(&codewords)->default_value(codewords),
      "codebook size C (0: from E, see docs/routing.md)")(
      "probes,m", po::value(&probes_text)->default_value(probes_text),
      "comma-separated probe counts m >= 1 (those above C are skipped)")(
      "preset", po::value(&preset)->default_value(preset), "generated data: 'default' or 'hard'")(
      "seed", po::value(&seed)->default_value(seed), "data seed")(
      "kmeans-iters", po::value(&kmeans_iters)->default_value(kmeans_iters), "Lloyd iterations")(
      "gates", po::value(&gates)->default_value(gates),
      "gate softmax over 'chosen' or 'shortlist'")(
      "centers", po::value(&centers_file), "expert centers [E, d] from a float32 .npy file")(
      "tokens", po::value(&tokens_file), "tokens [T, d] from a float32 .npy file")(
      "threads", po::value(&threads)->default_value(threads), kThreadsHelp)(
      "repeats", po::value(&repeats)->default_value(repeats),
      "timed runs per row; the best counts")("json", po::value(&json_file),
                                             "write every figure to this JSON file")(
      "save-routes", po::value(&routes_dir), "write each router's experts/gates as .npy here")(
      "no-faiss", po::bool_switch(&no_faiss), "skip the FAISS IndexIVFFlat rows")(
      "no-product-key", po::bool_switch(&no_product_key), "skip the product-key row")(
      "variants", po::value(&variants_text)->default_value(variants_text),
      "AIR list layouts, comma-separated: air, spill, balanced, spill+balanced")(
      "spills", po::value(&spills)->default_value(spills), "extra lists per expert (spill)")(
      "soar-lambda", po::value(&soar_lambda)->default_value(soar_lambda),
      "SOAR weight of the residual alignment penalty (spill)")(
      "balance", po::value(&balance)->default_value(balance),
      "list cap as a multiple of E/C (balanced)")(
      "shortlist-budget", po::value(&shortlist_budget)->default_value(shortlist_budget),
      "also print each variant's best recall at a mean shortlist <= this (0: E/16)");
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(opts).run(), vm);
  if (vm.count("help")) {
    std::cout << opts << "\n";
    return 0;
  }
  po::notify(vm);
  if (repeats < 1) throw std::invalid_argument("--repeats must be >= 1");
  if (centers_file.empty() != tokens_file.empty())
    throw std::invalid_argument("--centers and --tokens go together");
  const std::vector<int> probe_list = parse_int_list(probes_text, "-m/--probes", 1);
  const GateMode gate_mode = gate_mode_from_string(gates);
  require_expert_count(experts, "-E/--experts");
  // Speed-ups and recall are ratios over the tokens routed: none, no figures.
  if (centers_file.empty() && num_tokens < 1)
    fail("-T/--num-tokens = " + std::to_string(num_tokens) + ": the benchmark needs >= 1 token");
  apply_threads_option(threads);
  OutputFile json_out(json_file, "--json");

  // Data.
  SyntheticData data;
  std::string source;
  if (!centers_file.empty()) {
    progress("loading %s and %s", centers_file.c_str(), tokens_file.c_str());
    data.centers = read_npy_matrix(centers_file);
    data.tokens = read_npy_matrix(tokens_file);
    source = "npy";
  } else {
    SyntheticConfig cfg = synthetic_preset(preset);
    cfg.experts = experts;
    cfg.dim = dim;
    cfg.tokens = num_tokens;
    cfg.seed = seed;
    progress("generating %s data: E=%ld d=%ld T=%ld", preset.c_str(), (long)experts, (long)dim,
             (long)num_tokens);
    data = make_synthetic(cfg);
    source = "synthetic:" + preset;
  }
  const MatrixView centers = data.centers.view(), tokens = data.tokens.view();
  experts = centers.rows;
  dim = centers.cols;
  num_tokens = tokens.rows;
  if (tokens.cols != dim)
    throw std::invalid_argument("tokens have " + std::to_string(tokens.cols) +
                                " columns but centers have " + std::to_string(dim));
  if (num_tokens < 1) fail("--tokens " + tokens_file + " has no rows: the benchmark needs >= 1");

  if (codewords == 0) codewords = recommended_air(experts).codewords;
  if (shortlist_budget <= 0.0) shortlist_budget = static_cast<double>(experts) / 16.0;
  const int64_t list_cap = static_cast<int64_t>(
      std::ceil(balance * static_cast<double>(experts) / static_cast<double>(codewords)));
  const std::vector<Variant> variants =
      parse_variants(variants_text, spills, soar_lambda, list_cap);
  progress("training the codebook: C=%ld, %d Lloyd iterations", (long)codewords, kmeans_iters);
  const double t_train = now_seconds();
  AirRouter air(centers, AirConfig{codewords, kmeans_iters, 1234, 0});
  const double train_seconds = now_seconds() - t_train;
  std::vector<AirRouter> layouts;
  for (const Variant& v : variants) {
    progress("building %s lists", v.row_name.c_str());
    layouts.emplace_back(centers, air.codebook(), v.lists);
  }

  progress("measuring sgemm and the scoring kernel");
  const auto [sgemm_gflops, kernel_gflops] = gemm_rates(tokens, centers, repeats);

  std::vector<Row> rows;
  progress("dense top-%d over %ld experts", k, (long)experts);
  DenseRouter dense(centers);
  Routes exact;
  Row drow{"dense"};
  drow.seconds = best_seconds(repeats, [&] { exact = dense.route(tokens, k, gate_mode); });
  drow.recall = 1.0;
  drow.mass = 1.0;
  drow.shortlist = shortlist_stats(exact);
  drow.flops = dense.flops_per_token();
  rows.push_back(drow);
  if (!routes_dir.empty()) save_routes(routes_dir, "dense", exact);
  const double dense_gemm_gflops =
      drow.flops * static_cast<double>(num_tokens) / std::max(drow.seconds, 1e-12) / 1e9;

  std::optional<FaissIvf> faiss;
  if (!no_faiss && FaissIvf::available()) faiss.emplace(air);
  for (int m : probe_list) {
    if (m < 1 || m > codewords) {
      progress("skipping m=%d: outside [1, C=%ld]", m, (long)codewords);
      continue;
    }
    Row row{"air", m};
    for (size_t v = 0; v < variants.size(); ++v) {
      progress("%s with m=%d probes", variants[v].row_name.c_str(), m);
      Routes r;
      Row vrow{variants[v].row_name, m};
      vrow.seconds = best_seconds(repeats, [&] { r = layouts[v].route(tokens, k, m, gate_mode); });
      vrow.recall = recall_at_k(r, exact);
      vrow.mass = mass_recall(r, exact);
      vrow.shortlist = shortlist_stats(r);
      vrow.flops = layouts[v].flops_per_token(vrow.shortlist.mean);
      rows.push_back(vrow);
      if (!routes_dir.empty()) save_routes(routes_dir, route_name(vrow), r);
      if (vrow.router == "air") row = vrow;
    }
    if (faiss && row.seconds > 0.0) {
      progress("FAISS IndexIVFFlat with nprobe=%d", m);
      Routes f;
      Row frow{"faiss_ivf", m};
      frow.seconds = best_seconds(repeats, [&] { f = faiss->route(tokens, k, m); });
      frow.recall = recall_at_k(f, exact);
      frow.mass = mass_recall(f, exact);
      // The same lists are scanned, bar the extension AIR makes when the
      // first m lists hold fewer than k experts.
      frow.shortlist = row.shortlist;
      frow.flops = row.flops;
      rows.push_back(frow);
      if (!routes_dir.empty()) save_routes(routes_dir, route_name(frow), f);
    }
  }

  if (!no_product_key && dim >= 2) {
    const int64_t n = std::max<int64_t>(1, std::llround(std::sqrt(static_cast<double>(experts))));
    if (n * n >= k) {
      progress("product keys: n=%ld sub-keys per half (E=%ld)", (long)n, (long)(n * n));
      const int64_t d1 = dim / 2;
      const ProductKeyRouter pk(
          random_matrix(n, d1, 1.0 / std::sqrt(double(d1)), seed + 1),
          random_matrix(n, dim - d1, 1.0 / std::sqrt(double(dim - d1)), seed + 2));
      Routes r;
      Row row{"product_key"};
      row.seconds = best_seconds(repeats, [&] { r = pk.route(tokens, k); });
      // Its exact reference is dense routing over the n^2 implied centers.
      Matrix implied(n * n, dim);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) {
          std::copy_n(pk.keys1().row(i), d1, implied.row(i * n + j));
          std::copy_n(pk.keys2().row(j), dim - d1, implied.row(i * n + j) + d1);
        }
      const Routes pk_exact = DenseRouter(implied.view()).route(tokens, k);
      row.recall = recall_at_k(r, pk_exact);
      row.mass = mass_recall(r, pk_exact);
      row.shortlist = shortlist_stats(r);
      row.flops = pk.flops_per_token(k);
      rows.push_back(row);
      if (!routes_dir.empty()) save_routes(routes_dir, "product_key", r);
    }
  }

  for (Row& r : rows) r.tokens_per_s = static_cast<double>(num_tokens) / std::max(r.seconds, 1e-12);
  const double dense_tps = rows.front().tokens_per_s;

  // The recommendation: the fewest probes reaching recall@k >= 0.95.
  const Row* best_air = nullptr;
  const Row* best_faiss = nullptr;
  for (const Row& r : rows)
    if (r.router == "air" && r.recall >= 0.95) {
      best_air = &r;
      break;
    }
  if (best_air)
    for (const Row& r : rows)
      if (r.router == "faiss_ivf" && r.probes == best_air->probes) best_faiss = &r;

  // Human-readable table.
  std::printf(
      "\nairmoe router benchmark  (%s, E=%ld d=%ld T=%ld k=%d C=%ld, %d threads, kernel %s)\n",
      source.c_str(), (long)experts, (long)dim, (long)num_tokens, k, (long)codewords, num_threads(),
      host_ops().name().c_str());
  std::printf(
      "codebook training %.2f s;  OpenBLAS sgemm %.1f GFLOP/s, scoring kernel %.1f GFLOP/s "
      "(%.0f%%)\n\n",
      train_seconds, sgemm_gflops, kernel_gflops, 100.0 * kernel_gflops / sgemm_gflops);
  std::printf("%-12s %6s %12s %9s %9s %9s %10s %12s\n", "router", "m", "tokens/s", "speedup",
              "recall@k", "mass", "shortlist", "MFLOP/token");
  for (const Row& r : rows)
    std::printf("%-12s %6s %12.0f %8.1fx %9.4f %9.4f %10.0f %12.2f\n", r.router.c_str(),
                r.probes ? std::to_string(r.probes).c_str() : "-", r.tokens_per_s,
                r.tokens_per_s / dense_tps, r.recall, r.mass, r.shortlist.mean, r.flops / 1e6);
  if (best_air) {
    std::printf("\nsmallest m with recall@%d >= 0.95: m=%d, AIR %.1fx dense", k, best_air->probes,
                best_air->tokens_per_s / dense_tps);
    if (best_faiss)
      std::printf(", %.1fx FAISS IVF", best_air->tokens_per_s / best_faiss->tokens_per_s);
    std::printf("\n");
  } else {
    std::printf("\nno probe count reached recall@%d >= 0.95; try larger --probes\n", k);
  }

  print_budget_summary(rows, shortlist_budget, k);

  if (json_out.wanted()) {
    json j;
    j["benchmark"] = "router";
    j["config"] = {{"experts", experts},
                   {"dim", dim},
                   {"tokens", num_tokens},
                   {"k", k},
                   {"codewords", codewords},
                   {"data", source},
                   {"seed", seed},
                   {"threads", num_threads()},
                   {"kmeans_iterations", kmeans_iters},
                   {"gates", gates},
                   {"variants", variants_text},
                   {"spills", spills},
                   {"soar_lambda", soar_lambda},
                   {"list_cap", list_cap},
                   {"scoring_kernel", host_ops().name()}};
    j["codebook_train_seconds"] = train_seconds;
    j["sgemm_gflops"] = sgemm_gflops;
    j["scoring_kernel_gflops"] = kernel_gflops;
    j["dense_gemm_gflops"] = kernel_gflops;
    j["dense_gemm_vs_sgemm"] = kernel_gflops / sgemm_gflops;
    j["dense_router_gflops"] = dense_gemm_gflops;
    j["results"] = json::array();
    for (const Row& r : rows) j["results"].push_back(to_json(r, dense_tps));
    if (best_air) {
      j["recommended_probes"] = best_air->probes;
      j["air_speedup_vs_dense"] = best_air->tokens_per_s / dense_tps;
      if (best_faiss) j["air_speedup_vs_faiss"] = best_air->tokens_per_s / best_faiss->tokens_per_s;
    }
    json_out.stream() << j.dump(2) << "\n";
    json_out.finish();
  }
  return 0;
}

}  // namespace airmoe::bench
