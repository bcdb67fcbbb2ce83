// The baselines a user would pick instead of AIR, timed on the router
// benchmark's own data by examples/bench_baselines.py: PyTorch's
// torch.topk(h @ W.T, k) in float32 and bfloat16, and PyPI's faiss-cpu (the
// build for this CPU) IndexIVFFlat scanning AIR's very lists. Python and its
// packages are optional: a missing one turns its rows into a note.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "core/matrix.h"
#include "router/air_router.h"
#include "router/routes.h"

namespace airmoe::bench {

struct BaselineOptions {
  std::string python;  // the interpreter (--baselines-python)
  std::string script;  // bench_baselines.py (--baselines-script)
  int k = 8;
  int threads = 1;
  int repeats = 3;
  std::vector<int> probes;  // the m values AIR runs at
};

struct BaselineRow {
  std::string router;  // torch_f32, torch_bf16, faiss_cpu
  int probes = 0;      // faiss_cpu: nprobe = m
  double seconds = 0.0;
  std::string note;              // versions and threads, or why there is no figure
  std::optional<Routes> routes;  // absent when not measured
};

struct Baselines {
  std::vector<BaselineRow> rows;
  std::string meta;  // the helper's versions and build names, JSON text
};

// Writes the data to a fresh temporary folder, runs the helper there with
// its output on stderr, and reads its rows back; the chosen experts get
// their exact float32 logits <w_e, h> so that recall and mass are the same
// metrics as every other row's. Never throws for a missing interpreter,
// package or a failed helper: each expected row then says why.
Baselines run_baselines(const BaselineOptions& options, MatrixView tokens, MatrixView centers,
                        const AirRouter& air, const Matrix* bias);

}  // namespace airmoe::bench
