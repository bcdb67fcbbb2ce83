// airmoe_bench SUBCOMMAND [options]; `airmoe_bench SUBCOMMAND --help` lists
// each subcommand's options.
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "bench_common.h"
#include "core/checks.h"
#include "core/threads.h"

namespace airmoe::bench {

std::vector<int> parse_int_list(const std::string& text, const char* what, int lo, int hi) {
  std::vector<int> out;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = text.find(',', pos);
    const std::string item = text.substr(pos, comma == std::string::npos ? comma : comma - pos);
    try {
      size_t used = 0;
      out.push_back(std::stoi(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      fail(std::string(what) + ": '" + item + "' is not an integer");
    }
    if (out.back() < lo || out.back() > hi)
      fail(std::string(what) + ": " + item +
           (hi == INT32_MAX
                ? " must be >= " + std::to_string(lo)
                : " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]"));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

void apply_threads_option(int threads) {
  if (threads < 0 || threads > kMaxThreads)
    fail("--threads = " + std::to_string(threads) + " is outside [0, " +
         std::to_string(kMaxThreads) + "] (0: OpenMP's default, all cores)");
  if (threads > 0) set_num_threads(threads);
}

void require_tokens(int64_t tokens, const std::string& tokens_file) {
  if (tokens >= 1) return;
  if (tokens_file.empty())
    fail("-T/--num-tokens = " + std::to_string(tokens) + ": the benchmark needs >= 1 token");
  fail("--tokens " + tokens_file + " has no rows: the benchmark needs >= 1 token");
}

}  // namespace airmoe::bench

namespace {

void usage() {
  std::printf(
      "usage: airmoe_bench SUBCOMMAND [options]\n"
      "subcommands:\n"
      "  router   routing speed and quality of AIR, dense top-k, FAISS IVF and product keys\n"
      "  traffic  distributed AIR routing under mpiexec: bytes per phase, per placement\n"
      "  layer    the MoE layer's three strategies under mpiexec: bytes, seconds, FLOPs\n"
      "  simulate the three strategies' traffic for P up to thousands, in one process\n"
      "run 'airmoe_bench SUBCOMMAND --help' for its options\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    usage();
    return argc < 2 ? 2 : 0;
  }
  const std::string sub = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  try {
    if (sub == "router") return airmoe::bench::run_router(args);
    if (sub == "traffic") return airmoe::bench::run_traffic(args);
    if (sub == "layer") return airmoe::bench::run_layer(args);
    if (sub == "simulate") return airmoe::bench::run_simulate(args);
    std::fprintf(stderr, "airmoe_bench: unknown subcommand '%s'\n", sub.c_str());
    usage();
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "airmoe_bench %s: error: %s\n", sub.c_str(), e.what());
    return 1;
  }
}
