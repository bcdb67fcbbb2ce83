// The data options every airmoe_bench subcommand shares, and what the
// distributed ones share: the option agreement across ranks, the routing spec
// for runtime/builder.h, reductions over ranks, the MPI wrapper.
#pragma once

#include <boost/program_options.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "bench/layer_measure.h"  // sum_over_ranks, max_over_ranks
#include "bench_common.h"
#include "comm/communicator.h"
#include "core/synthetic.h"
#include "router/codebook.h"
#include "runtime/builder.h"

namespace airmoe::bench {

struct DataOptions {
  int64_t experts = 65536, dim = 512, tokens = 4096, codewords = 256;
  int k = 8, kmeans_iters = 10, threads = 0, repeats = 3;
  uint64_t seed = 42;
  std::string preset = "default", centers_file, tokens_file, json_file;

  // -E -d -T --k -C --preset --seed --kmeans-iters --centers --tokens
  // --threads --repeats --json
  void add_to(boost::program_options::options_description& opts);
  // Checks the values (generated data: -T >= 1) and applies --threads.
  void validate() const;
  // --centers and --tokens, for require_apart (empty where not given).
  std::vector<NamedPath> inputs() const;
  // The generator's configuration: --preset with -E -d -T --seed.
  SyntheticConfig synthetic_config() const;
};

// The largest valid probe count m: C, as an int.
int probe_limit(const DataOptions& options);

// Rank 0 checks `path` (--json, --csv) before the run (OutputFile, against
// `apart`); a bad path stops every rank together. Other ranks get an empty
// OutputFile.
OutputFile open_on_rank0(comm::Communicator& comm, const std::string& path, const char* option,
                         const std::vector<NamedPath>& apart);

struct BenchData {
  SyntheticData data;
  std::string source;  // "synthetic:<preset>" or "npy"
};

// Generates or loads the data; sets options.experts/dim/tokens to what was
// loaded (a --tokens file with no rows is refused). Every rank that calls it
// gets the same data.
BenchData load_data(DataOptions& options);

std::vector<std::string> split_list(const std::string& text);

// --bias FILE: a selection bias of `experts` entries from a float32 .npy
// file, checked ("--bias F: bias has 3 entries, expected E = 256"); no
// file: an empty matrix.
Matrix read_bias_option(const std::string& file, int64_t experts);

// The routing part of the layer spec these options describe (shape, k, C,
// k-means iterations; the k-means seed every subcommand uses), with m = probes.
runtime::LayerSpec routing_spec(const DataOptions& o, int probes);

// Parses args into vm; returns false if --help was asked (and printed when
// print_help).
bool parse(const std::vector<std::string>& args, boost::program_options::options_description& opts,
           bool print_help, boost::program_options::variables_map* vm = nullptr);

// Collective, and the first collective of every MPI subcommand: parses args
// (as parse, help printed on rank 0), then every rank must run the same
// subcommand with the same value of every option, defaults included, and the
// same --centers / --tokens file contents. Otherwise every rank throws a
// ConfigMismatchError naming the ranks and options that differ from rank 0's
// (so ranks launched with different options, or an MPMD launch of different
// subcommands, fail together instead of deadlocking or reporting
// inconsistent figures). Returns false if --help was asked.
bool parse_on_every_rank(comm::Communicator& comm, const char* subcommand,
                         const std::vector<std::string>& args,
                         boost::program_options::options_description& opts);

// Runs body(world, args) under MPI. An error every rank raised together
// (core/errors.h: raised_together) is reported by each rank, which exits 1;
// any other failure would leave the other ranks waiting in a collective, so
// it is reported and ends the job (MPI_Abort).
using MpiBody = int (*)(comm::Communicator&, const std::vector<std::string>&);
int run_on_mpi_world(const char* name, const std::vector<std::string>& args, MpiBody body);

}  // namespace airmoe::bench
