// The one entry point that sets up a distributed router or MoE layer: every
// front-end (the Python MoELayer, the benchmarks, the tests) describes what
// it wants in a LayerSpec and calls build_layer / build_router, instead of
// writing out the set-up sequence itself.
//
// The set-up, all collective, in this order:
//   1. checks: the spec, the shape and values of this rank's centers and load
//      sample, raised on every rank together (comm::check_together);
//   2. the spec is compared across ranks (ConfigMismatchError on every rank,
//      "MoE layer configuration");
//   3. the codebook: rank 0 trains it (spherical k-means with the spec's C,
//      iterations and seed) and broadcasts it; every rank then compares a
//      digest of its centers and of the codebook ("MoE layer centers and
//      codebook"). This is the one rule for agreeing on the codebook: one
//      training, so ranks never depend on training being bit-reproducible,
//      and the digest catches ranks that were handed different centers;
//   4. assignment and inverted lists on every rank (replicated);
//   5. the list load from this rank's load sample (only rank 0's is used,
//      by the coordinator; no sample: the list sizes);
//   6. the placement, planned on rank 0 and broadcast;
//   7. this rank's router (its hosted centers) or layer.
// Steps 1-5 are agree_on_index, 6 is place_experts, 7 is make_router /
// make_layer: callers that build several routers or layers over one index
// (the benchmarks' placement and strategy sweeps) call them one by one.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/matrix.h"
#include "router/codebook.h"
#include "router/inverted_lists.h"
#include "runtime/coordinator.h"
#include "runtime/distributed_router.h"
#include "runtime/experts.h"
#include "runtime/moe_layer.h"

namespace airmoe::runtime {

// LayerSpec is versioned as NCCL's ncclConfig_t is: a caller sets `version`
// to the value it was written against (the default does); fields are only
// ever added at the end, and the version goes up when one is. This build
// reads every version from kOldestLayerSpecVersion to kLayerSpecVersion: a
// field newer than the spec's version is ignored and takes the behaviour of
// that version, so code written against an older version keeps its meaning.
//   1: experts ... expert_seed.
//   2: dense_expert_grads (off by default: the touched experts' gradients
//      only; under version 1 the layer always returned the dense layout).
//   3: activation swiglu (gated experts, W1 = [gate; up]); a spec of an
//      older version naming it is refused.
//   4: wire_dtype (f32 by default; older versions always send f32).
//   5: request_key_bits (0, off, by default; older versions send every
//      scoring request).
inline constexpr int kLayerSpecVersion = 5;
inline constexpr int kOldestLayerSpecVersion = 1;

// Everything that defines a distributed router or MoE layer, the same on
// every rank (it is compared across ranks). build_router reads the shape and
// routing fields; build_layer reads all.
struct LayerSpec {
  int version = kLayerSpecVersion;
  // Shape: the centers are [experts, dim].
  int64_t experts = 0;
  int64_t dim = 0;
  // Routing.
  Strategy strategy = Strategy::kAir;
  int k = 8;       // experts per token
  int probes = 4;  // AIR's m; also the probes of the load sample
  int64_t codewords = 256;
  int kmeans_iterations = 10;
  uint64_t kmeans_seed = 1234;
  PlacementPolicy placement = PlacementPolicy::kLocality;
  // Experts (build_layer only): FFN width, activation (swiglu from version
  // 3), and the seed of their
  // random parameters, which depend only on (seed, expert id), not on P.
  int64_t hidden = 16;
  Activation activation = Activation::kGelu;
  uint64_t expert_seed = 0;
  // Version 2. Backward also fills the dense expert gradients over every
  // hosted expert (MoEConfig::dense_expert_grads); off, only the touched
  // experts' come back. Ignored under version 1, which always fills them.
  bool dense_expert_grads = false;
  // Version 4. The element type of token vectors on the wire
  // (MoEConfig::wire_dtype): f32 or bf16. Ignored under older versions (f32).
  DType wire_dtype = DType::kF32;
  // Version 5. Scoring requests pruned with replicated keys of this many
  // bits (MoEConfig::request_key_bits, DistributedRouter::set_request_keys;
  // build_router sets them too); 0: off. Ignored under older versions (off).
  int request_key_bits = 0;

  // Every field as this build reads it, one line: what ranks compare, and
  // what logs print.
  std::string describe() const;
  // The layer's configuration, each field read as the spec's version says.
  MoEConfig moe_config() const;
};

// Throws UsageError naming the first field out of range, or a version this
// build does not read (no communication).
void check_spec(const LayerSpec& spec);

// What every rank holds alike before experts are placed.
struct SharedIndex {
  Codebook codebook;
  std::vector<int32_t> assignment;  // every expert's list
  std::vector<double> list_load;    // from this rank's sample; rank 0's is used
  InvertedLists lists() const { return InvertedLists(assignment, codebook.size()); }
};

// Collective: steps 1-5 above. centers: [E, d], the same on every rank;
// load_sample: [T, d] tokens of this rank (may be empty).
SharedIndex agree_on_index(comm::Communicator& comm, const LayerSpec& spec, MatrixView centers,
                           MatrixView load_sample);

// Collective: rank 0 plans the spec's placement policy and broadcasts it.
PlacementPlan place_experts(comm::Communicator& comm, const LayerSpec& spec,
                            const SharedIndex& index);

// Collective: this rank's router over its hosted rows of `centers` [E, d].
std::unique_ptr<DistributedRouter> make_router(comm::Communicator& comm, const SharedIndex& index,
                                               const Placement& placement, MatrixView centers);

// Collective: this rank's MoE layer (MoELayer's constructor), its experts
// and vectors on `compute`.
std::unique_ptr<MoELayer> make_layer(comm::Communicator& comm, const LayerSpec& spec,
                                     const SharedIndex& index, const Placement& placement,
                                     MatrixView centers, Compute compute = host_compute());

// Collective: the whole set-up in one call.
std::unique_ptr<DistributedRouter> build_router(comm::Communicator& comm, const LayerSpec& spec,
                                                MatrixView centers, MatrixView load_sample = {});
std::unique_ptr<MoELayer> build_layer(comm::Communicator& comm, const LayerSpec& spec,
                                      MatrixView centers, MatrixView load_sample = {},
                                      Compute compute = host_compute());

}  // namespace airmoe::runtime
