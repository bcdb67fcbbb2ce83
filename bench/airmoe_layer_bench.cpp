// airmoe_layer_bench: the MoE layer benchmark with P ranks as threads of one
// process (comm/in_process.h), on one compute backend: forward and backward
// seconds per phase and metered bytes per strategy, and air's
// forward+backward time over dense-replicated's in the same run. The
// measuring is bench/layer_measure.h's, as in `airmoe_bench layer` (the MPI
// front end); this one needs no MPI, Boost or JSON package, so that the
// CUDA build has it (P ranks sharing one GPU, exchanging device buffers).
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench/json_writer.h"
#include "bench/layer_measure.h"
#include "bench/output_file.h"
#include "bench/progress.h"
#include "comm/in_process.h"
#include "core/errors.h"
#include "core/synthetic.h"
#include "core/threads.h"
#include "ops/registry.h"
#include "runtime/layer_routing.h"

namespace airmoe::bench {
namespace {

constexpr const char* kProgram = "airmoe_layer_bench";

// A bad command line: reported with the usage hint, exit status 2.
class ArgumentError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

struct Options {
  std::string backend = "host", strategies = "dense-replicated,air,dense-broadcast", json;
  int64_t ranks = 1, experts = 65536, dim = 512, tokens = 2048, codewords = 256;
  int64_t probes = 4, k = 8, hidden = 16, repeats = 3, warmup = 1, seed = 42;
  bool quiet = false, help = false;
};

struct IntOption {
  int64_t* target;
  int64_t lo, hi;
};

void usage() {
  std::printf(
      "usage: %s [options]\n"
      "The MoE layer's forward and backward with P ranks as threads of this process\n"
      "(in-process exchange; on a device backend the ranks share the device).\n"
      "  --backend NAME      host, host-avx512, host-avx2, host-portable, device-emulated,\n"
      "                      cuda, cuda:N (default host); routing stays on the host\n"
      "  --ranks P           ranks, 1..64 (default 1)\n"
      "  --experts E         experts (default 65536)\n"
      "  --dim d             model dimension (default 512)\n"
      "  --num-tokens T      tokens per rank (default 2048)\n"
      "  --codewords C       codebook size (default 256)\n"
      "  --probes m          AIR's probe count, 1..C (default 4)\n"
      "  --k K               experts per token (default 8)\n"
      "  --hidden h          expert hidden size (default 16)\n"
      "  --strategies LIST   comma-separated: air, dense-replicated, dense-broadcast\n"
      "                      (default all three)\n"
      "  --repeats N         timed steps; the fastest counts (default 3)\n"
      "  --warmup N          untimed steps first (default 1)\n"
      "  --seed S            data seed (default 42)\n"
      "  --json PATH         write every figure to this JSON file\n"
      "  --quiet             no progress lines on stderr\n",
      kProgram);
}

int64_t parse_int(const std::string& name, const std::string& text, const IntOption& o) {
  size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size())
    throw ArgumentError(name + ": '" + text + "' is not an integer");
  if (v < o.lo || v > o.hi)
    throw ArgumentError(name + " = " + text + " is outside [" + std::to_string(o.lo) + ", " +
                        std::to_string(o.hi) + "]");
  return v;
}

Options parse_args(int argc, char** argv) {
  Options o;
  const std::map<std::string, IntOption> ints = {{"--ranks", {&o.ranks, 1, 64}},
                                                 {"--experts", {&o.experts, 1, INT32_MAX}},
                                                 {"--dim", {&o.dim, 1, 1 << 20}},
                                                 {"--num-tokens", {&o.tokens, 1, INT32_MAX}},
                                                 {"--codewords", {&o.codewords, 1, INT32_MAX}},
                                                 {"--probes", {&o.probes, 1, INT32_MAX}},
                                                 {"--k", {&o.k, 1, INT32_MAX}},
                                                 {"--hidden", {&o.hidden, 1, INT32_MAX}},
                                                 {"--repeats", {&o.repeats, 1, 1000000}},
                                                 {"--warmup", {&o.warmup, 0, 1000000}},
                                                 {"--seed", {&o.seed, 0, INT64_MAX}}};
  const std::map<std::string, std::string*> texts = {
      {"--backend", &o.backend}, {"--strategies", &o.strategies}, {"--json", &o.json}};
  for (int i = 1; i < argc; ++i) {
    const std::string name = argv[i];
    if (name == "--help" || name == "-h") {
      o.help = true;
      continue;
    }
    if (name == "--quiet") {
      o.quiet = true;
      continue;
    }
    const auto in = ints.find(name);
    const auto tx = texts.find(name);
    if (in == ints.end() && tx == texts.end())
      throw ArgumentError("unknown argument '" + name + "'");
    if (i + 1 >= argc) throw ArgumentError(name + " needs a value");
    const std::string text = argv[++i];
    if (in != ints.end()) *in->second.target = parse_int(name, text, in->second);
    if (tx != texts.end()) {
      if (text.empty()) throw ArgumentError(name + ": the value is empty");
      *tx->second = text;
    }
  }
  if (o.probes > o.codewords)
    throw ArgumentError("--probes = " + std::to_string(o.probes) +
                        " is more than --codewords = " + std::to_string(o.codewords));
  return o;
}

std::vector<runtime::Strategy> parse_strategies(const std::string& text) {
  std::vector<runtime::Strategy> out;
  size_t at = 0;
  while (at <= text.size()) {
    const size_t comma = std::min(text.find(',', at), text.size());
    const std::string name = text.substr(at, comma - at);
    try {
      out.push_back(runtime::strategy_from_string(name));
    } catch (const std::exception& e) {
      throw ArgumentError(std::string("--strategies: ") + e.what());
    }
    at = comma + 1;
  }
  return out;
}

const Ops& parse_backend(const std::string& name) {
  try {
    return find_backend(name);
  } catch (const std::exception& e) {
    throw ArgumentError(std::string("--backend: ") + e.what());
  }
}

double forward_seconds(const runtime::PhaseSeconds& s) {
  return s.route + s.dispatch + s.experts + s.combine;
}
double backward_seconds(const runtime::PhaseSeconds& s) {
  return s.backward_dispatch + s.backward_experts + s.backward_combine;
}

// air's forward+backward seconds over dense-replicated's, or a negative
// number where the run has not both.
double air_over_dense(const LayerFigures& f) {
  double air = -1, dense = -1;
  for (const StrategyFigures& s : f.strategies) {
    if (s.strategy == "air") air = s.total_seconds;
    if (s.strategy == "dense-replicated") dense = s.total_seconds;
  }
  return air >= 0 && dense > 0 ? air / dense : -1;
}

void print_table(const Options& o, const std::string& backend, const LayerFigures& f) {
  std::printf(
      "\nairmoe layer benchmark, in-process  (E=%ld d=%ld T=%ld per rank, k=%ld h=%ld C=%ld "
      "m=%ld, %ld ranks as threads, %s)\n",
      (long)o.experts, (long)o.dim, (long)o.tokens, (long)o.k, (long)o.hidden, (long)o.codewords,
      (long)o.probes, (long)o.ranks, backend.c_str());
  std::printf("%-17s %8s %8s %8s %8s %8s %8s %8s %8s %8s %9s %9s %8s\n", "strategy", "route",
              "dispatch", "experts", "combine", "b.disp", "b.expert", "b.comb", "fwd s", "bwd s",
              "fwd MB", "bwd MB", "recall");
  for (const StrategyFigures& s : f.strategies) {
    const runtime::PhaseSeconds& t = s.seconds;
    const PhaseTotals b = phase_totals(reported_phases(s.traffic));
    std::printf("%-17s %8.4f %8.4f %8.4f %8.4f %8.4f %8.4f %8.4f %8.4f %8.4f %9.3f %9.3f %8.4f\n",
                s.strategy.c_str(), t.route, t.dispatch, t.experts, t.combine, t.backward_dispatch,
                t.backward_experts, t.backward_combine, forward_seconds(t), backward_seconds(t),
                b.forward / 1e6, b.backward / 1e6, s.recall_at_k);
  }
  const double ratio = air_over_dense(f);
  if (ratio >= 0)
    std::printf("air / dense-replicated, forward+backward seconds: %.3f\n", ratio);
  else
    std::printf("air / dense-replicated: - (the run has not both strategies)\n");
}

void write_strategy(JsonWriter& w, const StrategyFigures& s) {
  const std::vector<PhaseEntry> entries = reported_phases(s.traffic);
  const PhaseTotals b = phase_totals(entries);
  const runtime::PhaseSeconds& t = s.seconds;
  w.begin_object().value("strategy", s.strategy).value("probes", s.probes);
  w.begin_object("seconds");
  for (const auto& [name, seconds] : named_seconds(t)) w.value(name, seconds);
  w.value("forward", forward_seconds(t))
      .value("backward", backward_seconds(t))
      .value("total", s.total_seconds)
      .end_object();
  w.begin_object("bytes");
  for (const PhaseEntry& e : entries) w.value(e.name.c_str(), e.bytes);
  w.end_object().begin_object("messages");
  for (const PhaseEntry& e : entries) w.value(e.name.c_str(), e.messages);
  w.end_object();
  w.value("bytes_forward", b.forward)
      .value("bytes_backward", b.backward)
      .value("bytes_total", b.forward + b.backward)
      .value("messages_total", b.messages)
      .value("recall_at_k", s.recall_at_k)
      .value("mass_recall", s.mass_recall)
      .value("router_flops_per_token", s.router_flops_per_token)
      .value("expert_flops_per_token", s.expert_flops_per_token)
      .array("peak_rss_bytes", s.peak_rss_bytes)
      .array("ffn_weight_bytes", s.ffn_weight_bytes)
      .end_object();
}

void write_json(std::ostream& out, const Options& o, const std::string& backend,
                const LayerFigures& f) {
  JsonWriter w(out);
  w.begin_object().value("benchmark", "layer-in-process");
  w.begin_object("config")
      .value("experts", o.experts)
      .value("dim", o.dim)
      .value("tokens_per_rank", o.tokens)
      .value("tokens", o.tokens * o.ranks)
      .value("k", o.k)
      .value("hidden", o.hidden)
      .value("codewords", o.codewords)
      .value("probes", o.probes)
      .value("ranks", o.ranks)
      .value("communicator", "in-process")
      .value("backend", backend)
      .value("seed", o.seed)
      .value("warmup", o.warmup)
      .value("repeats", o.repeats)
      .value("threads_per_process", num_threads())
      .value("imbalance", f.imbalance)
      .end_object();
  w.begin_array("results");
  for (const StrategyFigures& s : f.strategies) write_strategy(w, s);
  w.end_array();
  const double ratio = air_over_dense(f);
  if (ratio >= 0)
    w.value("air_over_dense_replicated_seconds", ratio);
  else
    w.null("air_over_dense_replicated_seconds");
  w.end_object().finish();
}

SyntheticData generate(const Options& o) {
  SyntheticConfig cfg = synthetic_preset("default");
  cfg.experts = o.experts;
  cfg.dim = o.dim;
  cfg.tokens = o.tokens * o.ranks;
  cfg.seed = static_cast<uint64_t>(o.seed);
  if (!o.quiet)
    progress("generating E=%ld d=%ld T=%ld", (long)cfg.experts, (long)cfg.dim, (long)cfg.tokens);
  return make_synthetic(cfg);
}

// The measurement these options describe, on `data`; the layer's other
// settings (placement, activation, expert seed, d_out seed) are
// airmoe_bench layer's defaults, so that both meter the same bytes.
LayerBenchInputs inputs_of(const Options& o, const Ops& ops, const SyntheticData& data) {
  LayerBenchInputs in;
  in.strategies = parse_strategies(o.strategies);
  in.spec.experts = o.experts;
  in.spec.dim = o.dim;
  in.spec.k = static_cast<int>(o.k);
  in.spec.probes = static_cast<int>(o.probes);
  in.spec.codewords = o.codewords;
  in.spec.hidden = o.hidden;
  in.spec.expert_seed = 7;
  in.centers = data.centers.view();
  in.tokens = data.tokens.view();
  in.d_out_seed = static_cast<uint64_t>(o.seed) + 1000;
  in.compute = Compute{&ops, {}};
  in.warmup = static_cast<int>(o.warmup);
  in.repeats = static_cast<int>(o.repeats);
  in.progress = !o.quiet;
  return in;
}

// --json: checked now, touching no file there; written whole when the run
// has ended (bench/output_file.h). A bad path is a bad argument.
OutputFile json_output(const std::string& path) {
  try {
    return OutputFile(path, "--json");
  } catch (const UsageError& e) {
    throw ArgumentError(e.what());
  }
}

int run(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  if (o.help) {
    usage();
    return 0;
  }
  const Ops& ops = parse_backend(o.backend);
  parse_strategies(o.strategies);  // a bad list fails before the data is made
  OutputFile json = json_output(o.json);
  const SyntheticData data = generate(o);
  const LayerBenchInputs in = inputs_of(o, ops, data);
  LayerFigures figures;
  comm::run_ranks(static_cast<int>(o.ranks), [&](comm::Communicator& comm) {
    LayerFigures mine = measure_layer(comm, in);
    if (comm.rank() == 0) figures = std::move(mine);
  });
  print_table(o, ops.name(), figures);
  if (json.wanted()) {
    write_json(json.stream(), o, ops.name(), figures);
    json.finish();
  }
  return 0;
}

}  // namespace
}  // namespace airmoe::bench

int main(int argc, char** argv) {
  try {
    return airmoe::bench::run(argc, argv);
  } catch (const airmoe::bench::ArgumentError& e) {
    std::fprintf(stderr, "%s: error: %s (see --help)\n", airmoe::bench::kProgram, e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", airmoe::bench::kProgram, e.what());
    return 1;
  }
}
