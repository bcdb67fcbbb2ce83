// airmoe_bench router: routing speed and quality of AIR against exact dense
// top-k, FAISS IndexIVFFlat on the same codebook, and product keys, all in one
// process with one thread count; and against the baselines a user would pick
// instead (PyTorch's dense top-k, faiss-cpu for this CPU), timed by a Python
// helper on the same data (bench_baselines.h).
#include <cblas.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "bench_baselines.h"
#include "bench_common.h"
#include "bench_data.h"
#include "core/checks.h"
#include "core/errors.h"
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
#include "router/query_lists.h"

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
  bool measured = true;  // false: a baseline with `note` saying why not
  std::string note;      // the build and threads of a baseline
};

// Speed-ups against dense routing by airmoe and by PyTorch in float32 (the
// headline; 0 when PyTorch was not measured).
struct Yardsticks {
  double dense_tps = 0.0, torch_f32_tps = 0.0;
};

json ratio_json(double tps, double base) {
  return base > 0.0 ? json(tps / base) : json(nullptr);
}

json to_json(const Row& r, const Yardsticks& y) {
  json j = {{"router", r.router}, {"probes", r.probes}, {"note", r.note}};
  if (!r.measured) {  // every figure null: one schema for every row
    for (const char* key :
         {"seconds", "tokens_per_s", "speedup_vs_dense", "speedup_vs_torch_f32", "recall_at_k",
          "mass_recall", "shortlist_mean", "shortlist_p99", "flops_per_token"})
      j[key] = nullptr;
    return j;
  }
  j.update({{"seconds", r.seconds},
            {"tokens_per_s", r.tokens_per_s},
            {"speedup_vs_dense", r.tokens_per_s / y.dense_tps},
            {"speedup_vs_torch_f32", ratio_json(r.tokens_per_s, y.torch_f32_tps)},
            {"recall_at_k", r.recall},
            {"mass_recall", r.mass},
            {"shortlist_mean", r.shortlist.mean},
            {"shortlist_p99", r.shortlist.p99},
            {"flops_per_token", r.flops}});
  return j;
}

// A baseline's row: its quality against the exact top-k from its own
// routes; the shortlist and FLOPs of what it scans (`scanned`: every
// expert for PyTorch, AIR's row at the same m for faiss-cpu).
Row baseline_row(const BaselineRow& b, const Routes& exact, const Row& scanned) {
  Row row{b.router, b.probes};
  row.note = b.note;
  row.measured = b.routes.has_value();
  if (!row.measured) return row;
  row.seconds = b.seconds;
  row.recall = recall_at_k(*b.routes, exact);
  row.mass = mass_recall(*b.routes, exact);
  row.shortlist = scanned.shortlist;
  row.flops = scanned.flops;
  return row;
}

const Row* find_row(const std::vector<Row>& rows, const std::string& router, int probes = 0) {
  for (const Row& r : rows)
    if (r.router == router && r.probes == probes && r.measured) return &r;
  return nullptr;
}

// GFLOP/s of one [rows x E] block of logits, by OpenBLAS sgemm, by the
// backend's scoring op (the dense router's) and by the same op on the
// tokens and centers rounded to bf16.
struct GemmRates {
  double sgemm = 0.0, kernel = 0.0, bf16_kernel = 0.0;
};

Tensor bf16_copy(const Ops& ops, TensorView f32) {
  Tensor out = ops.empty(DType::kBF16, f32.rows, f32.cols);
  ops.copy(out.view(), f32, {});  // rounds to nearest even
  return out;
}

GemmRates gemm_rates(const Ops& ops, MatrixView tokens, MatrixView centers, int repeats) {
  const int64_t rows = std::min<int64_t>(tokens.rows, 384), E = centers.rows, d = centers.cols;
  if (rows == 0) return {};
  std::vector<float> out(static_cast<size_t>(rows * E));
  const double flops = 2.0 * static_cast<double>(rows) * E * d;
  const double blas = best_seconds(repeats, [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
                static_cast<int>(E), static_cast<int>(d), 1.0f, tokens.data, static_cast<int>(d),
                centers.data, static_cast<int>(d), 0.0f, out.data(), static_cast<int>(E));
  });
  const TensorView c(out.data(), DType::kF32, Device::host(), rows, E);
  const TensorView block = TensorView(tokens).row_range(0, rows);
  const double ours = best_seconds(repeats, [&] { ops.score(block, centers, c, {}); });
  const Tensor block16 = bf16_copy(ops, block), centers16 = bf16_copy(ops, centers);
  const double ours16 =
      best_seconds(repeats, [&] { ops.score(block16.view(), centers16.view(), c, {}); });
  return {flops / blas / 1e9, flops / ours / 1e9, flops / ours16 / 1e9};
}

// --backend: a host backend by name (the routers here read host matrices).
const Ops& host_backend_option(const std::string& name) {
  if (name != "host" && name.rfind("host-", 0) != 0)
    fail("--backend " + name +
         ": the router benchmark runs on a host backend (host, host-avx512, host-avx2, "
         "host-portable)");
  try {
    return find_backend(name);
  } catch (const UsageError& e) {
    fail("--backend " + name + ": " + e.what());
  }
}

// One router's routes as .npy files under --save-routes.
void save_routes(const std::string& dir, const std::string& name, const Routes& r) {
  save_npy_in("--save-routes", dir, name + "_experts.npy", r.experts.data(), r.tokens, r.k);
  save_npy_in("--save-routes", dir, name + "_gates.npy", r.gates.data(), r.tokens, r.k);
}

std::string route_name(const Row& r) {
  return r.probes > 0 ? r.router + "_m" + std::to_string(r.probes) : r.router;
}

std::string number_text(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", v);
  return text;
}

// An AIR list layout to compare: "air" (plain), "spill", "balanced",
// "spill+balanced" share one codebook trained on the centers; "query" (one
// row name per --list-lengths entry) has its own, trained on tokens.
struct Variant {
  std::string name, row_name;  // "spill", "air_spill"
  bool balanced = false, spilled = false, query = false;
};

std::vector<Variant> parse_variants(const std::string& text) {
  std::vector<Variant> out;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t end = std::min(text.find(',', start), text.size());
    const std::string name = text.substr(start, end - start);
    if (name == "air")
      out.push_back({name, "air", false, false});
    else if (name == "spill")
      out.push_back({name, "air_spill", false, true});
    else if (name == "balanced")
      out.push_back({name, "air_balanced", true, false});
    else if (name == "spill+balanced")
      out.push_back({name, "air_spill_balanced", true, true});
    else if (name == "query")
      out.push_back({name, "air_query", false, false, true});
    else
      throw std::invalid_argument("--variants: unknown variant '" + name +
                                  "' (air, spill, balanced, spill+balanced, query)");
    start = end + 1;
  }
  return out;
}

// --balance, --spills, --soar-lambda: what the variants' lists are built
// with.
struct VariantOptions {
  double balance = 1.25;
  int spills = 1;
  double soar_lambda = 1.0;

  // Before any data is made. A balance below 1 gives C lists too short for
  // E experts; 0 or NaN would build plain lists under a balanced name; a
  // spill variant needs a spill.
  void validate(const std::vector<Variant>& variants) const {
    if (!(balance >= 1.0) || !std::isfinite(balance))
      fail("--balance = " + number_text(balance) +
           " must be a finite number >= 1 (a list cap of balance x E/C experts)");
    if (!(soar_lambda >= 0.0) || !std::isfinite(soar_lambda))
      fail("--soar-lambda = " + number_text(soar_lambda) + " must be a finite number >= 0");
    for (const Variant& v : variants)
      if (v.spilled && spills < 1)
        fail("--spills = " + std::to_string(spills) + ": the " + v.name +
             " variant needs >= 1 extra list per expert");
  }

  // The cap of a balanced list, ceil(balance x E/C). Above C the cap
  // exceeds E, so no list is ever full: refused, as it would measure plain
  // lists under the balanced name.
  int64_t list_cap(int64_t experts, int64_t codewords) const {
    if (balance > static_cast<double>(codewords))
      fail("--balance = " + number_text(balance) + " is above C = " + std::to_string(codewords) +
           ": a cap of balance x E/C experts would exceed E, and no list would be capped");
    return static_cast<int64_t>(
        std::ceil(balance * static_cast<double>(experts) / static_cast<double>(codewords)));
  }

  ListOptions lists_of(const Variant& v, int64_t cap) const {
    return {v.balanced ? cap : 0, v.spilled ? spills : 0, soar_lambda};
  }

  // "--spills 1, --soar-lambda 1, --balance 1.25": the options `v` uses.
  std::string text_of(const Variant& v) const {
    std::string out;
    if (v.spilled)
      out = "--spills " + std::to_string(spills) + ", --soar-lambda " + number_text(soar_lambda);
    if (v.balanced)
      out += (out.empty() ? "" : ", ") + std::string("--balance ") + number_text(balance);
    return out;
  }
};

// The router of one row name ("air_spill", "air_query_L256").
struct Layout {
  std::string row_name;
  AirRouter router;
};

// --variants query: the query-aware lists (router/query_lists.h) of each
// --list-lengths entry and each --list-k depth, from one codebook trained on
// the sample tokens and one count of their exact (biased) top-k picks per
// depth. The row of depth k is "air_query_L<L>", of a deeper one
// "air_query_L<L>_k<depth>". `seconds` times the builds of the first depth.
struct QueryBuild {
  std::vector<Layout> layouts;
  double flops = 0.0, seconds = 0.0;
};
QueryBuild build_query_layouts(MatrixView centers, TensorView bias, MatrixView sample,
                               const QueryListOptions& options, const std::vector<int>& lengths,
                               const std::vector<int>& depths, const Compute& compute) {
  progress("query lists: codebook (C=%ld) on %ld sample tokens and their exact top-%d",
           (long)options.codewords, (long)sample.rows, depths.front());
  QueryBuild out;
  const double t0 = now_seconds();
  const Codebook codebook = train_query_codebook(sample, options, compute);
  DenseRouter exact(centers, compute);
  if (!bias.empty()) exact.set_bias(bias);
  const std::vector<int32_t> home = codebook.assign(normalize_rows(centers, "centers").view());
  out.flops = query_lists_build_flops(sample.rows, centers.rows, centers.cols, options);
  for (const int depth : depths) {
    const PickCounts counts = count_picks(codebook, exact, sample, depth);
    const std::string suffix = depth == options.k ? "" : "_k" + std::to_string(depth);
    for (const int length : lengths) {
      QueryListOptions o = options;
      o.list_length = length;
      o.k = depth;
      try {
        QueryLists lists{o, codebook, lists_from_counts(counts, length, home), out.flops};
        out.layouts.push_back({"air_query_L" + std::to_string(length) + suffix,
                               AirRouter(centers, std::move(lists))});
      } catch (const std::invalid_argument& e) {
        fail("--list-lengths " + std::to_string(length) + ": " + e.what());
      }
    }
    if (depth == depths.front()) out.seconds = now_seconds() - t0;
  }
  return out;
}

// Per AIR variant, the row with the highest recall whose mean shortlist fits
// the budget: the comparison at equal stage-2 FLOPs. A shortlist holds at
// least k experts (AIR extends it to k), so a budget below k (the default
// E/16 when E < 16·k) has no row: said once instead of "no row within the
// budget" for each variant.
void print_budget_summary(const std::vector<Row>& rows, double budget, int k) {
  if (budget < k) {
    std::printf(
        "\nno shortlist budget summary: %s experts is below k = %d, the least a shortlist "
        "holds (set --shortlist-budget)\n",
        number_text(budget).c_str(), k);
    return;
  }
  std::printf("\nbest recall@%d at a mean shortlist <= %s experts:\n", k,
              number_text(budget).c_str());
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

// The rows to compare the recommended AIR row with: PyTorch's dense top-k
// in float32 and bfloat16, and both FAISS builds at the same m (the linked
// one's table note says which build it is).
std::vector<std::pair<const char*, const Row*>> peers_of(const std::vector<Row>& rows,
                                                         const Row& air) {
  std::vector<std::pair<const char*, const Row*>> out;
  const std::pair<const char*, const Row*> all[] = {
      {"torch f32", find_row(rows, "torch_f32")},
      {"torch bf16", find_row(rows, "torch_bf16")},
      {"linked FAISS IVF", find_row(rows, "faiss_ivf", air.probes)},
      {"faiss-cpu IVF", find_row(rows, "faiss_cpu", air.probes)}};
  for (const auto& p : all)
    if (p.second) out.push_back(p);
  return out;
}

// The table: speed-ups against PyTorch's float32 dense routing (the
// headline, "-" when not measured) and against airmoe's dense router; a
// baseline's note (build, threads, or why no figure) ends its line.
void print_table(const std::vector<Row>& rows, const Yardsticks& y) {
  int width = 16;  // the router column fits the longest name ("air_query_L256_k32")
  for (const Row& r : rows) width = std::max(width, static_cast<int>(r.router.size()));
  std::printf("%-*s %6s %12s %9s %9s %9s %9s %10s %12s  %s\n", width, "router", "m", "tokens/s",
              "x torch32", "x dense", "recall@k", "mass", "shortlist", "MFLOP/token", "note");
  for (const Row& r : rows) {
    const std::string m = r.probes ? std::to_string(r.probes) : "-";
    if (!r.measured) {
      std::printf("%-*s %6s %12s %9s %9s %9s %9s %10s %12s  %s\n", width, r.router.c_str(),
                  m.c_str(), "-", "-", "-", "-", "-", "-", "-", r.note.c_str());
      continue;
    }
    char headline[32] = "-";
    if (y.torch_f32_tps > 0.0)
      std::snprintf(headline, sizeof headline, "%.1fx", r.tokens_per_s / y.torch_f32_tps);
    std::printf("%-*s %6s %12.0f %9s %8.1fx %9.4f %9.4f %10.0f %12.2f  %s\n", width,
                r.router.c_str(), m.c_str(), r.tokens_per_s, headline, r.tokens_per_s / y.dense_tps,
                r.recall, r.mass, r.shortlist.mean, r.flops / 1e6, r.note.c_str());
  }
}

}  // namespace

int run_router(const std::vector<std::string>& args) {
  int64_t experts = 65536, dim = 512, num_tokens = 4096, codewords = 0;
  int k = 8, threads = 0, repeats = 3, kmeans_iters = 10;
  uint64_t seed = 42;
  double shortlist_budget = 0.0;
  VariantOptions vo;
  std::string probes_text = "1,2,4,8,16,32", preset = "default", centers_file, tokens_file,
              bias_file;
  std::string json_file, routes_dir, gates = "chosen", variants_text = "air",
                                     list_lengths_text = "256", list_k_text, backend = "host";
  int64_t list_sample = 0;
  bool no_faiss = false, no_product_key = false, no_baselines = false;
  std::string baselines_python = "/usr/bin/python3", baselines_script = AIRMOE_BASELINES_SCRIPT;

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
      "gates: 'chosen', 'shortlist' or 'sigmoid' (docs/routing.md)")(
      "centers", path_value(&centers_file, "--centers"),
      "expert centers [E, d] from a float32 .npy file")(
      "tokens", path_value(&tokens_file, "--tokens"), "tokens [T, d] from a float32 .npy file")(
      "bias", path_value(&bias_file, "--bias"),
      "selection bias [E, 1] from a float32 .npy file: dense and AIR select by z + b, gates "
      "from z (FAISS rows are skipped)")("threads", po::value(&threads)->default_value(threads),
                                         kThreadsHelp)("repeats",
                                                       po::value(&repeats)->default_value(repeats),
                                                       "timed runs per row; the best counts")(
      "json", path_value(&json_file, "--json"), "write every figure to this JSON file")(
      "save-routes", path_value(&routes_dir, "--save-routes"),
      "write each router's experts/gates as .npy here")("no-faiss", po::bool_switch(&no_faiss),
                                                        "skip the FAISS IndexIVFFlat rows")(
      "no-product-key", po::bool_switch(&no_product_key), "skip the product-key row")(
      "backend", po::value(&backend)->default_value(backend),
      "host backend of every airmoe router and of the scoring kernel: host (the fastest), "
      "host-avx512, host-avx2 or host-portable")(
      "no-baselines", po::bool_switch(&no_baselines),
      "skip the PyTorch and faiss-cpu rows (timed by Python on the same data)")(
      "baselines-python", po::value(&baselines_python)->default_value(baselines_python),
      "the Python interpreter with torch and faiss-cpu for the baseline rows")(
      "baselines-script", po::value(&baselines_script)->default_value(baselines_script),
      "the helper that times the baselines (examples/bench_baselines.py)")(
      "variants", po::value(&variants_text)->default_value(variants_text),
      "AIR list layouts, comma-separated: air, spill, balanced, spill+balanced, query")(
      "list-sample", po::value(&list_sample)->default_value(list_sample),
      "query: the first this many tokens build the query lists (their exact top-k); every "
      "router is measured on the tokens after them (0: no split)")(
      "list-lengths", po::value(&list_lengths_text)->default_value(list_lengths_text),
      "query: experts per query list, comma-separated (a row each)")(
      "list-k", po::value(&list_k_text),
      "query: how deep the lists count each sample token's exact top-k, comma-separated "
      "depths in [k, E] (a row each; default: k)")("spills",
                                                   po::value(&vo.spills)->default_value(vo.spills),
                                                   "extra lists per expert, >= 1 (spill)")(
      "soar-lambda", po::value(&vo.soar_lambda)->default_value(vo.soar_lambda),
      "SOAR weight of the residual alignment penalty, >= 0 (spill)")(
      "balance", po::value(&vo.balance)->default_value(vo.balance),
      "list cap as a multiple of E/C, in [1, C] (balanced)")(
      "shortlist-budget", po::value(&shortlist_budget)->default_value(shortlist_budget),
      "also print each variant's best recall at a mean shortlist <= this, >= 0 (0: E/16)");
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
  const Ops& ops = host_backend_option(backend);
  const Compute compute{&ops, {}};
  require_expert_count(experts, "-E/--experts");
  if (centers_file.empty()) require_tokens(num_tokens, "");
  const std::vector<Variant> variants = parse_variants(variants_text);
  vo.validate(variants);
  const std::vector<int> list_lengths = parse_int_list(list_lengths_text, "--list-lengths", 1);
  const std::vector<int> list_depths =
      list_k_text.empty() ? std::vector<int>{k} : parse_int_list(list_k_text, "--list-k", k);
  const bool any_query =
      std::any_of(variants.begin(), variants.end(), [](const Variant& v) { return v.query; });
  if (list_sample < 0) fail("--list-sample must be >= 0, got " + std::to_string(list_sample));
  if (any_query && list_sample == 0)
    fail(
        "--variants query needs --list-sample N: the first N tokens build the lists, the rest "
        "are measured (they must not be the same tokens)");
  if (!(shortlist_budget >= 0.0) || !std::isfinite(shortlist_budget))
    fail("--shortlist-budget = " + number_text(shortlist_budget) +
         " must be a finite number >= 0 (0: E/16)");
  apply_threads_option(threads);
  const std::vector<NamedPath> inputs = {
      {"--centers", centers_file}, {"--tokens", tokens_file}, {"--bias", bias_file}};
  OutputFile json_out(json_file, "--json", inputs);
  if (!routes_dir.empty()) require_writable_folder(routes_dir, "--save-routes");

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
  const MatrixView centers = data.centers.view(), all_tokens = data.tokens.view();
  experts = centers.rows;
  dim = centers.cols;
  if (all_tokens.cols != dim)
    throw std::invalid_argument("tokens have " + std::to_string(all_tokens.cols) +
                                " columns but centers have " + std::to_string(dim));
  if (list_sample >= all_tokens.rows)
    fail("--list-sample = " + std::to_string(list_sample) + " leaves none of the " +
         std::to_string(all_tokens.rows) + " tokens to measure");
  // The sample that builds query lists, and the tokens every router is
  // measured on: disjoint.
  const MatrixView sample(all_tokens.data, list_sample, dim);
  const MatrixView tokens(all_tokens.row(list_sample), all_tokens.rows - list_sample, dim);
  num_tokens = tokens.rows;
  require_tokens(num_tokens, tokens_file);

  const Matrix bias = read_bias_option(bias_file, experts);  // before any index is built

  if (codewords == 0) codewords = recommended_air(experts).codewords;
  require_in_range(codewords, 1, experts, "-C/--codewords");
  for (const int depth : list_depths) require_in_range(depth, k, experts, "--list-k");
  if (shortlist_budget == 0.0) shortlist_budget = static_cast<double>(experts) / 16.0;
  const bool any_balanced =
      std::any_of(variants.begin(), variants.end(), [](const Variant& v) { return v.balanced; });
  const int64_t list_cap = any_balanced ? vo.list_cap(experts, codewords) : 0;
  progress("training the codebook: C=%ld, %d Lloyd iterations", (long)codewords, kmeans_iters);
  const double t_train = now_seconds();
  AirRouter air(centers, AirConfig{codewords, kmeans_iters, 1234, 0}, compute);
  const double train_seconds = now_seconds() - t_train;
  std::vector<Layout> layouts;
  QueryBuild query;
  for (const Variant& v : variants) {
    if (v.query) {
      query =
          build_query_layouts(centers, bias.view(), sample, {codewords, 0, k, kmeans_iters, 1234},
                              list_lengths, list_depths, compute);
      for (Layout& l : query.layouts) layouts.push_back(std::move(l));
      continue;
    }
    progress("building %s lists", v.row_name.c_str());
    try {
      layouts.push_back({v.row_name, AirRouter(centers, air.codebook(), vo.lists_of(v, list_cap))});
    } catch (const std::invalid_argument& e) {
      fail("--variants " + v.name + " (" + vo.text_of(v) + "): " + e.what());
    }
  }

  progress("measuring sgemm and the scoring kernel");
  const GemmRates rates = gemm_rates(ops, tokens, centers, repeats);
  const double sgemm_gflops = rates.sgemm, kernel_gflops = rates.kernel;

  DenseRouter dense(centers, compute);
  if (!bias_file.empty()) {
    dense.set_bias(bias.view());
    for (Layout& layout : layouts) layout.router.set_bias(bias.view());
    no_faiss = true;  // FAISS's IVF scan has no selection bias
  }
  std::vector<Row> rows;
  progress("dense top-%d over %ld experts", k, (long)experts);
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

  std::vector<int> probes_run;
  for (int m : probe_list)
    if (m >= 1 && m <= codewords)
      probes_run.push_back(m);
    else
      progress("skipping m=%d: outside [1, C=%ld]", m, (long)codewords);
  Baselines baselines;
  if (!no_baselines) {
    const BaselineOptions bo{baselines_python, baselines_script, k,
                             num_threads(),    repeats,          probes_run};
    baselines = run_baselines(bo, tokens, centers, air, bias_file.empty() ? nullptr : &bias);
  }
  for (const BaselineRow& b : baselines.rows)
    if (b.probes == 0) rows.push_back(baseline_row(b, exact, drow));
  const std::string faiss_build = FaissIvf::build();

  std::optional<FaissIvf> faiss;
  if (!no_faiss && FaissIvf::available()) faiss.emplace(air);
  for (int m : probes_run) {
    Row row{"air", m};
    for (const Layout& layout : layouts) {
      progress("%s with m=%d probes", layout.row_name.c_str(), m);
      Routes r;
      Row vrow{layout.row_name, m};
      vrow.seconds =
          best_seconds(repeats, [&] { r = layout.router.route(tokens, k, m, gate_mode); });
      vrow.recall = recall_at_k(r, exact);
      vrow.mass = mass_recall(r, exact);
      vrow.shortlist = shortlist_stats(r);
      vrow.flops = layout.router.flops_per_token(vrow.shortlist.mean);
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
      frow.note = faiss_build;
      rows.push_back(frow);
      if (!routes_dir.empty()) save_routes(routes_dir, route_name(frow), f);
    }
    for (const BaselineRow& b : baselines.rows)
      if (b.probes == m) rows.push_back(baseline_row(b, exact, row));
  }

  if (!no_product_key && dim >= 2) {
    const int64_t n = std::max<int64_t>(1, std::llround(std::sqrt(static_cast<double>(experts))));
    if (n * n >= k) {
      progress("product keys: n=%ld sub-keys per half (E=%ld)", (long)n, (long)(n * n));
      const int64_t d1 = dim / 2;
      const ProductKeyRouter pk(
          random_matrix(n, d1, 1.0 / std::sqrt(double(d1)), seed + 1),
          random_matrix(n, dim - d1, 1.0 / std::sqrt(double(dim - d1)), seed + 2), compute);
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
      const Routes pk_exact = DenseRouter(implied.view(), compute).route(tokens, k);
      row.recall = recall_at_k(r, pk_exact);
      row.mass = mass_recall(r, pk_exact);
      row.shortlist = shortlist_stats(r);
      row.flops = pk.flops_per_token(k);
      rows.push_back(row);
      if (!routes_dir.empty()) save_routes(routes_dir, "product_key", r);
    }
  }

  for (Row& r : rows)
    if (r.measured) r.tokens_per_s = static_cast<double>(num_tokens) / std::max(r.seconds, 1e-12);
  const double dense_tps = rows.front().tokens_per_s;
  const Row* torch_f32 = find_row(rows, "torch_f32");
  const Yardsticks yard{dense_tps, torch_f32 ? torch_f32->tokens_per_s : 0.0};

  // The recommendation: the fewest probes reaching recall@k >= 0.95.
  const Row* best_air = nullptr;
  const Row* best_faiss = nullptr;  // Debian's, for the JSON field kept from before
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
      ops.name().c_str());
  std::printf(
      "codebook training %.2f s;  OpenBLAS sgemm %.1f GFLOP/s, scoring kernel %.1f GFLOP/s "
      "(%.0f%%), on bf16 %.1f GFLOP/s\n\n",
      train_seconds, sgemm_gflops, kernel_gflops, 100.0 * kernel_gflops / sgemm_gflops,
      rates.bf16_kernel);
  if (any_query)
    std::printf(
        "query lists built from the first %ld tokens (the rest are measured) in %.2f s: %.1f "
        "MFLOP (exact top-%d of the sample and k-means on it), %.1f kFLOP per sample token; not "
        "in MFLOP/token below\n\n",
        (long)list_sample, query.seconds, query.flops / 1e6, k,
        query.flops / static_cast<double>(list_sample) / 1e3);
  print_table(rows, yard);
  if (best_air) {
    std::printf("\nsmallest m with recall@%d >= 0.95: m=%d, AIR %.1fx dense", k, best_air->probes,
                best_air->tokens_per_s / dense_tps);
    for (const auto& [name, other] : peers_of(rows, *best_air))
      std::printf(", %.1fx %s", best_air->tokens_per_s / other->tokens_per_s, name);
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
                   {"bias", bias_file},
                   {"seed", seed},
                   {"threads", num_threads()},
                   {"kmeans_iterations", kmeans_iters},
                   {"gates", gates},
                   {"variants", variants_text},
                   {"spills", vo.spills},
                   {"soar_lambda", vo.soar_lambda},
                   {"list_cap", list_cap},
                   {"scoring_kernel", ops.name()},
                   {"list_sample", list_sample},
                   {"list_lengths", list_lengths_text},
                   {"list_k", list_k_text.empty() ? std::to_string(k) : list_k_text}};
    if (any_query) {
      j["query_lists_build_flops"] = query.flops;
      j["query_lists_build_seconds"] = query.seconds;
    }
    j["codebook_train_seconds"] = train_seconds;
    j["sgemm_gflops"] = sgemm_gflops;
    j["scoring_kernel_gflops"] = kernel_gflops;
    j["bf16_scoring_kernel_gflops"] = rates.bf16_kernel;
    j["dense_gemm_gflops"] = kernel_gflops;
    j["dense_gemm_vs_sgemm"] = kernel_gflops / sgemm_gflops;
    j["dense_router_gflops"] = dense_gemm_gflops;
    j["faiss_linked"] = faiss_build;
    j["baselines"] = no_baselines ? json(nullptr) : json::parse(baselines.meta);
    j["results"] = json::array();
    for (const Row& r : rows) j["results"].push_back(to_json(r, yard));
    if (best_air) {
      j["recommended_probes"] = best_air->probes;
      j["air_speedup_vs_dense"] = best_air->tokens_per_s / dense_tps;
      if (best_faiss) j["air_speedup_vs_faiss"] = best_air->tokens_per_s / best_faiss->tokens_per_s;
      for (const auto& [name, other] : peers_of(rows, *best_air))
        if (other->router != "faiss_ivf")
          j["air_speedup_vs_" + other->router] = best_air->tokens_per_s / other->tokens_per_s;
    }
    json_out.stream() << j.dump(2) << "\n";
    json_out.finish();
  }
  return 0;
}

}  // namespace airmoe::bench
