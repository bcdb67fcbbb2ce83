#include "bench_data.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <utility>

#include "bench_common.h"
#include "comm/mpi_communicator.h"
#include "core/checks.h"
#include "core/errors.h"
#include "core/hash.h"
#include "core/npy.h"
#include "core/threads.h"
#include "ops/boundary.h"
#include "router/routes.h"

namespace po = boost::program_options;

namespace airmoe::bench {

void DataOptions::add_to(po::options_description& opts) {
  auto add = opts.add_options();
  add("experts,E", po::value(&experts)->default_value(experts),
      "number of experts E (generated data)");
  add("dim,d", po::value(&dim)->default_value(dim), "model dimension d (generated data)");
  add("num-tokens,T", po::value(&tokens)->default_value(tokens),
      "tokens, over all ranks (generated data)");
  add("k", po::value(&k)->default_value(k), "experts per token");
  add("codewords,C", po::value(&codewords)->default_value(codewords), "codebook size C");
  add("preset", po::value(&preset)->default_value(preset), "generated data: 'default' or 'hard'");
  add("seed", po::value(&seed)->default_value(seed), "data seed");
  add("kmeans-iters", po::value(&kmeans_iters)->default_value(kmeans_iters), "Lloyd iterations");
  add("centers", path_value(&centers_file, "--centers"),
      "expert centers [E, d] from a float32 .npy file");
  add("tokens", path_value(&tokens_file, "--tokens"), "tokens [T, d] from a float32 .npy file");
  add("threads", po::value(&threads)->default_value(threads), kThreadsHelp);
  add("repeats", po::value(&repeats)->default_value(repeats), "timed runs; the fastest counts");
  add("json", path_value(&json_file, "--json"), "write every figure to this JSON file");
}

void DataOptions::validate() const {
  if (repeats < 1) throw std::invalid_argument("--repeats must be >= 1");
  if (centers_file.empty() != tokens_file.empty())
    throw std::invalid_argument("--centers and --tokens go together");
  require_expert_count(experts, "-E/--experts");
  if (centers_file.empty()) require_tokens(tokens, "");
  apply_threads_option(threads);
}

std::vector<NamedPath> DataOptions::inputs() const {
  return {{"--centers", centers_file}, {"--tokens", tokens_file}};
}

int probe_limit(const DataOptions& o) {
  return static_cast<int>(std::clamp<int64_t>(o.codewords, 0, INT32_MAX));
}

OutputFile open_on_rank0(comm::Communicator& comm, const std::string& path, const char* option,
                         const std::vector<NamedPath>& apart) {
  OutputFile file;
  comm::check_together(comm, option, [&] {
    if (comm.rank() == 0) file = OutputFile(path, option, apart);
  });
  return file;
}

SyntheticConfig DataOptions::synthetic_config() const {
  SyntheticConfig cfg = synthetic_preset(preset);
  cfg.experts = experts;
  cfg.dim = dim;
  cfg.tokens = tokens;
  cfg.seed = seed;
  return cfg;
}

BenchData load_data(DataOptions& o) {
  BenchData b;
  if (!o.centers_file.empty()) {
    b.data.centers = read_npy_matrix(o.centers_file);
    b.data.tokens = read_npy_matrix(o.tokens_file);
    b.source = "npy";
    require_expert_count(b.data.centers.rows(), "rows of --centers");
    if (b.data.tokens.cols() != b.data.centers.cols())
      throw std::invalid_argument("tokens have " + std::to_string(b.data.tokens.cols()) +
                                  " columns but centers have " +
                                  std::to_string(b.data.centers.cols()));
    require_tokens(b.data.tokens.rows(), o.tokens_file);
  } else {
    b.data = make_synthetic(o.synthetic_config());
    b.source = "synthetic:" + o.preset;
  }
  o.experts = b.data.centers.rows();
  o.dim = b.data.centers.cols();
  o.tokens = b.data.tokens.rows();
  return b;
}

Matrix read_bias_option(const std::string& file, int64_t experts) {
  if (file.empty()) return Matrix();
  progress("loading the selection bias %s", file.c_str());
  Matrix bias = read_npy_matrix(file);
  try {
    checked_bias(host_compute(), bias.view(), experts);
  } catch (const std::invalid_argument& e) {
    fail("--bias " + file + ": " + e.what());
  }
  return bias;
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = text.find(',', pos);
    out.push_back(text.substr(pos, comma == std::string::npos ? comma : comma - pos));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

runtime::LayerSpec routing_spec(const DataOptions& o, int probes) {
  runtime::LayerSpec spec;
  spec.experts = o.experts;
  spec.dim = o.dim;
  spec.k = o.k;
  spec.probes = probes;
  spec.codewords = o.codewords;
  spec.kmeans_iterations = o.kmeans_iters;
  spec.kmeans_seed = 1234;
  return spec;
}

bool parse(const std::vector<std::string>& args, po::options_description& opts, bool print_help,
           po::variables_map* parsed) {
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(opts).run(), vm);
  if (vm.count("help")) {
    if (print_help) std::cout << opts << "\n";
    return false;
  }
  po::notify(vm);
  if (parsed) *parsed = std::move(vm);
  return true;
}

namespace {

std::string option_text(const po::variable_value& v) {
  const boost::any& a = v.value();
  if (const auto* s = boost::any_cast<std::string>(&a)) return *s;
  if (const auto* i = boost::any_cast<int>(&a)) return std::to_string(*i);
  if (const auto* i = boost::any_cast<int64_t>(&a)) return std::to_string(*i);
  if (const auto* u = boost::any_cast<uint64_t>(&a)) return std::to_string(*u);
  if (const auto* x = boost::any_cast<double>(&a)) return std::to_string(*x);
  if (const auto* b = boost::any_cast<bool>(&a)) return *b ? "true" : "false";
  throw InternalError("airmoe_bench: an option of a type the agreement cannot print");
}

// A digest of a file's bytes: ranks given files of one name but different
// contents (another machine's copy) must not pass the agreement.
std::string file_digest(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "unreadable";
  uint64_t h = kFnvOffset;
  std::vector<char> buf(1 << 20);
  while (in.read(buf.data(), static_cast<std::streamsize>(buf.size())) || in.gcount() > 0)
    h = fnv1a64(buf.data(), static_cast<size_t>(in.gcount()), h);
  return std::to_string(h);
}

// One "name value" line per option (variables_map is sorted by name).
std::vector<std::pair<std::string, std::string>> command_lines(const char* subcommand,
                                                               const po::variables_map& vm) {
  std::vector<std::pair<std::string, std::string>> lines{{"subcommand", subcommand}};
  for (const auto& [name, value] : vm) {
    lines.emplace_back("--" + name, option_text(value));
    if ((name == "centers" || name == "tokens") && !value.empty())
      lines.emplace_back("--" + name + " contents", file_digest(option_text(value)));
  }
  return lines;
}

std::string joined(const std::vector<std::pair<std::string, std::string>>& lines) {
  std::string s;
  for (const auto& [name, value] : lines) s += name + '\x1f' + value + '\n';
  return s;
}

std::vector<std::pair<std::string, std::string>> split_lines(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> lines;
  size_t at = 0;
  while (at < text.size()) {
    const size_t end = text.find('\n', at), sep = text.find('\x1f', at);
    lines.emplace_back(text.substr(at, sep - at), text.substr(sep + 1, end - sep - 1));
    at = end + 1;
  }
  return lines;
}

// "--repeats 3 vs 1" for each line where `theirs` differs from rank 0's;
// only the subcommand when that differs (their options are another set).
std::string differences(const std::vector<std::pair<std::string, std::string>>& root,
                        const std::vector<std::pair<std::string, std::string>>& theirs) {
  auto value_in = [](const auto& lines, const std::string& name) -> std::string {
    for (const auto& [n, v] : lines)
      if (n == name) return v;
    return "(unset)";
  };
  if (root.front() != theirs.front())
    return "subcommand " + theirs.front().second + " vs " + root.front().second;
  std::string out;
  std::vector<std::string> names;
  for (const auto& line : root) names.push_back(line.first);
  for (const auto& line : theirs) names.push_back(line.first);
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  for (const std::string& name : names) {
    const std::string a = value_in(theirs, name), b = value_in(root, name);
    if (a != b) out += (out.empty() ? "" : ", ") + name + " " + a + " vs " + b;
  }
  return out;
}

}  // namespace

bool parse_on_every_rank(comm::Communicator& comm, const char* subcommand,
                         const std::vector<std::string>& args, po::options_description& opts) {
  po::variables_map vm;
  if (!parse(args, opts, comm.rank() == 0, &vm)) return false;
  const std::string mine = joined(command_lines(subcommand, vm));
  std::vector<int64_t> counts;
  const std::vector<char> all = comm.allgatherv(mine.data(), mine.size(), counts);
  std::vector<std::string> texts;
  for (int64_t r = 0, at = 0; r < comm.size(); at += counts[r], ++r)
    texts.emplace_back(all.data() + at, static_cast<size_t>(counts[r]));
  std::string mismatch;
  const auto root = split_lines(texts[0]);
  for (int r = 1; r < comm.size(); ++r)
    if (texts[r] != texts[0])
      mismatch += (mismatch.empty() ? ": rank " : "; rank ") + std::to_string(r) + ": " +
                  differences(root, split_lines(texts[r]));
  if (!mismatch.empty())
    throw ConfigMismatchError(
        std::string("configuration mismatch (airmoe_bench ") + subcommand +
        ": every rank needs the same subcommand and options; a rank's value vs rank 0's)" +
        mismatch);
  return true;
}

int run_on_mpi_world(const char* name, const std::vector<std::string>& args, MpiBody body) {
  comm::MpiSession session;
  auto world = comm::world_communicator();
  try {
    return body(*world, args);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "airmoe_bench %s: rank %d: error: %s\n", name, world->rank(), e.what());
    std::fflush(stderr);
    if (world->size() > 1 && !raised_together(e)) MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
}

}  // namespace airmoe::bench
