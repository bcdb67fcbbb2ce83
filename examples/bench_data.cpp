#include "bench_data.h"

#include <cstdio>
#include <iostream>
#include <stdexcept>

#include "bench_common.h"
#include "comm/mpi_communicator.h"
#include "core/npy.h"
#include "core/threads.h"

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
  add("centers", po::value(&centers_file), "expert centers [E, d] from a float32 .npy file");
  add("tokens", po::value(&tokens_file), "tokens [T, d] from a float32 .npy file");
  add("threads", po::value(&threads)->default_value(threads), "OpenMP threads (0: default)");
  add("repeats", po::value(&repeats)->default_value(repeats), "timed runs; the fastest counts");
  add("json", po::value(&json_file), "write every figure to this JSON file");
}

void DataOptions::validate() const {
  if (repeats < 1) throw std::invalid_argument("--repeats must be >= 1");
  if (centers_file.empty() != tokens_file.empty())
    throw std::invalid_argument("--centers and --tokens go together");
  if (threads > 0) set_num_threads(threads);
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
    if (b.data.tokens.cols() != b.data.centers.cols())
      throw std::invalid_argument("tokens have " + std::to_string(b.data.tokens.cols()) +
                                  " columns but centers have " +
                                  std::to_string(b.data.centers.cols()));
  } else {
    b.data = make_synthetic(o.synthetic_config());
    b.source = "synthetic:" + o.preset;
  }
  o.experts = b.data.centers.rows();
  o.dim = b.data.centers.cols();
  o.tokens = b.data.tokens.rows();
  return b;
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

Codebook shared_codebook(comm::Communicator& comm, MatrixView centers, const DataOptions& o) {
  Matrix cw(o.codewords, centers.cols);
  comm::PhaseScope phase(comm, "setup");
  std::string error;
  if (comm.rank() == 0) {
    try {
      const Codebook cb = train_codebook(centers, {o.codewords, o.kmeans_iters, 1234});
      std::copy_n(cb.codewords().data, cw.size(), cw.data());
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  std::vector<char> msg(error.begin(), error.end());
  comm::broadcast_vector(comm, msg, 0);
  if (!msg.empty()) throw std::invalid_argument(std::string(msg.begin(), msg.end()));
  comm.broadcast(cw.data(), cw.size() * sizeof(float), 0);
  return Codebook(cw.view());
}

bool parse(const std::vector<std::string>& args, po::options_description& opts, bool print_help) {
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(opts).run(), vm);
  if (vm.count("help")) {
    if (print_help) std::cout << opts << "\n";
    return false;
  }
  po::notify(vm);
  return true;
}

double sum_over_ranks(comm::Communicator& comm, double v) {
  std::vector<double> all(static_cast<size_t>(comm.size()));
  comm.allgather(&v, sizeof(v), all.data());
  double s = 0.0;
  for (double x : all) s += x;
  return s;
}

double max_over_ranks(comm::Communicator& comm, double v) {
  comm.allreduce_max(&v, 1);
  return v;
}

int run_on_mpi_world(const char* name, const std::vector<std::string>& args, MpiBody body) {
  comm::MpiSession session;
  auto world = comm::world_communicator();
  try {
    return body(*world, args);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "airmoe_bench %s: rank %d: error: %s\n", name, world->rank(), e.what());
    std::fflush(stderr);
    if (world->size() > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
}

}  // namespace airmoe::bench
