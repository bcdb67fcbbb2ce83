// The data options every airmoe_bench subcommand shares, and the set-up the
// distributed ones share (the codebook trained on rank 0 and broadcast).
#pragma once

#include <boost/program_options.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/synthetic.h"
#include "router/codebook.h"

namespace airmoe::bench {

struct DataOptions {
  int64_t experts = 65536, dim = 512, tokens = 4096, codewords = 256;
  int k = 8, kmeans_iters = 10, threads = 0, repeats = 3;
  uint64_t seed = 42;
  std::string preset = "default", centers_file, tokens_file, json_file;

  // -E -d -T --k -C --preset --seed --kmeans-iters --centers --tokens
  // --threads --repeats --json
  void add_to(boost::program_options::options_description& opts);
  // Checks the values and applies --threads.
  void validate() const;
  // The generator's configuration: --preset with -E -d -T --seed.
  SyntheticConfig synthetic_config() const;
};

struct BenchData {
  SyntheticData data;
  std::string source;  // "synthetic:<preset>" or "npy"
};

// Generates or loads the data; sets options.experts/dim/tokens to what was
// loaded. Every rank that calls it gets the same data.
BenchData load_data(DataOptions& options);

std::vector<std::string> split_list(const std::string& text);

// Collective: rank 0 trains the codebook, every rank receives it.
Codebook shared_codebook(comm::Communicator& comm, MatrixView centers, const DataOptions& o);

// Parses args into vm; returns false if --help was asked (and printed on
// rank `printer`).
bool parse(const std::vector<std::string>& args, boost::program_options::options_description& opts,
           bool print_help);

// Reductions of one figure over ranks: a sum (added in rank order, so every
// rank gets the same bits) and a max.
double sum_over_ranks(comm::Communicator& comm, double v);
double max_over_ranks(comm::Communicator& comm, double v);

// Runs body(world, args) under MPI. A failure on one rank would leave the
// others waiting in a collective, so it is reported and ends the job.
using MpiBody = int (*)(comm::Communicator&, const std::vector<std::string>&);
int run_on_mpi_world(const char* name, const std::vector<std::string>& args, MpiBody body);

}  // namespace airmoe::bench
