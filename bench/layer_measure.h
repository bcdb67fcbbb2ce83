// The layer benchmark's measuring core: builds the MoE layer on a
// Communicator and a Compute for each strategy, runs its forward and
// backward `repeats` times and keeps the fastest step's per-phase seconds
// and metered bytes in plain structs. It needs no MPI, Boost or JSON
// package, so that both front ends call it: `airmoe_bench layer` (ranks are
// MPI processes, examples/bench_layer.cpp) and `airmoe_layer_bench` (ranks
// are threads of one process through comm/in_process.h, bench/, built in
// every configuration, the CUDA build without MPI included).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "comm/traffic_meter.h"
#include "core/tensor.h"
#include "ops/ops.h"
#include "runtime/builder.h"
#include "runtime/moe_layer.h"

namespace airmoe::bench {

// The metered phases of a step, in the order reports list them.
inline const std::vector<std::string> kForwardPhases = {"requests", "replies", "dispatch",
                                                        "combine"};
inline const std::vector<std::string> kBackwardPhases = {"grad_dispatch", "grad_gates",
                                                         "grad_logits", "grad_combine"};

struct PhaseFigures {
  std::map<std::string, double> bytes, messages;  // phase (with ":counts" phases) -> total
};

// One reported entry: a phase or its control messages (":counts" of
// alltoallv; ":barrier" of a sparse exchange, listed only where it ran).
struct PhaseEntry {
  std::string name;
  double bytes = 0, messages = 0;
  bool forward = true;
};

// Every entry of kForwardPhases then kBackwardPhases that a report lists,
// 0 where nothing was metered.
std::vector<PhaseEntry> reported_phases(const PhaseFigures& f);

// The sums of those entries: forward bytes, backward bytes, messages.
struct PhaseTotals {
  double forward = 0, backward = 0, messages = 0;
};
PhaseTotals phase_totals(const std::vector<PhaseEntry>& entries);

// A step's phases by the names the reports give them, in step order:
// route, dispatch, experts, combine, backward_dispatch, backward_experts,
// backward_combine.
std::vector<std::pair<const char*, double>> named_seconds(const runtime::PhaseSeconds& s);

// Reductions of one figure over ranks: a sum (added in rank order, so every
// rank gets the same bits), a max, and every rank's value.
double sum_over_ranks(comm::Communicator& comm, double v);
double max_over_ranks(comm::Communicator& comm, double v);
std::vector<double> per_rank(comm::Communicator& comm, double mine);

// This process's peak resident memory so far (VmHWM), in bytes; 0 where
// /proc/self/status is not there.
double peak_resident_bytes();

// What every rank passes alike (tokens and centers included: each rank
// takes its own share of the token rows).
struct LayerBenchInputs {
  // Routing, placement and experts; `strategy` is set per strategy.
  runtime::LayerSpec spec;
  std::vector<runtime::Strategy> strategies;
  MatrixView centers;  // [E, d]
  MatrixView tokens;   // [T, d], over all ranks; rank r takes rows [T r / P, T (r+1) / P)
  // Rank r's output gradient is random_matrix(rows, d, 1, d_out_seed + r).
  uint64_t d_out_seed = 0;
  Compute compute;
  int warmup = 0;         // untimed steps first (allocations, caches, a GPU's first launches)
  int repeats = 1;        // timed steps; the fastest (max over ranks) counts
  bool progress = false;  // rank 0 reports each stage on stderr
};

// One strategy's figures, the same on every rank.
struct StrategyFigures {
  std::string strategy;
  int probes = 0;                 // m for air, C for dense-broadcast, 0 for dense-replicated
  runtime::PhaseSeconds seconds;  // of the fastest step, each phase's max over ranks
  double total_seconds = 0;       // that step's max over ranks of its phases' sum
  PhaseFigures traffic;           // that step's bytes and messages, summed over ranks
  double router_flops_per_token = 0, expert_flops_per_token = 0;
  double recall_at_k = 0, mass_recall = 0;               // against exact routing, over all tokens
  std::vector<double> peak_rss_bytes, ffn_weight_bytes;  // per rank
};

struct LayerFigures {
  double imbalance = 0;                      // of the placement every strategy shares
  std::vector<double> setup_peak_rss_bytes;  // per rank, before the first strategy
  std::vector<StrategyFigures> strategies;
};

// Collective: one index and one placement for every strategy (the same
// data, weights and placement; rank 0's tokens are the load sample), then
// each strategy's layer, measured.
LayerFigures measure_layer(comm::Communicator& comm, const LayerBenchInputs& in);

}  // namespace airmoe::bench
