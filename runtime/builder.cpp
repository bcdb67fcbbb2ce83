#include "runtime/builder.h"

#include <algorithm>
#include <string>
#include <utility>

#include "core/checks.h"
#include "core/hash.h"
#include "router/list_scan.h"

namespace airmoe::runtime {
namespace {

// Step 1, this rank's part: the spec and this rank's inputs. Returns the
// centers' unit rows (the assignment needs them; normalizing also refuses
// zero-norm and non-finite rows, naming the row).
Matrix check_inputs(const LayerSpec& spec, MatrixView centers, MatrixView load_sample) {
  check_spec(spec);
  if (centers.rows != spec.experts || centers.cols != spec.dim)
    fail("centers are [" + std::to_string(centers.rows) + ", " + std::to_string(centers.cols) +
         "], the spec says [experts = " + std::to_string(spec.experts) +
         ", dim = " + std::to_string(spec.dim) + "]");
  Matrix unit = normalize_rows(centers, "centers");
  if (load_sample.rows > 0) {
    require_cols(load_sample, spec.dim, "load sample");
    require_finite(load_sample, "load sample");
  }
  return unit;
}

// Step 3: rank 0 trains, every rank receives the same bytes.
Codebook shared_codebook(comm::Communicator& comm, const LayerSpec& spec, MatrixView centers) {
  Matrix codewords(spec.codewords, spec.dim);
  comm::check_together(comm, "codebook training on rank 0", [&] {
    if (comm.rank() != 0) return;
    const Codebook trained =
        train_codebook(centers, {spec.codewords, spec.kmeans_iterations, spec.kmeans_seed});
    std::copy_n(trained.codewords().data, codewords.size(), codewords.data());
  });
  comm.broadcast(codewords.data(), codewords.size() * sizeof(float), 0);
  return Codebook(codewords.view());
}

// Step 3's check: ranks handed different centers would place and route
// against different experts; the codebook bytes are compared too.
void require_same_centers(comm::Communicator& comm, MatrixView centers, const Codebook& codebook) {
  const MatrixView cw = codebook.codewords();
  const uint64_t centers_digest =
      fnv1a64(centers.data, static_cast<size_t>(centers.rows * centers.cols) * sizeof(float));
  const uint64_t codebook_digest =
      fnv1a64(cw.data, static_cast<size_t>(cw.rows * cw.cols) * sizeof(float));
  comm::require_same_config(
      comm,
      "centers=" + std::to_string(centers_digest) + " codebook=" + std::to_string(codebook_digest),
      "MoE layer centers and codebook");
}

}  // namespace

std::string LayerSpec::describe() const {
  return "version=" + std::to_string(version) + " experts=" + std::to_string(experts) +
         " dim=" + std::to_string(dim) + " strategy=" + to_string(strategy) +
         " k=" + std::to_string(k) + " probes=" + std::to_string(probes) +
         " codewords=" + std::to_string(codewords) +
         " kmeans_iterations=" + std::to_string(kmeans_iterations) +
         " kmeans_seed=" + std::to_string(kmeans_seed) + " placement=" + to_string(placement) +
         " hidden=" + std::to_string(hidden) + " activation=" + to_string(activation) +
         " expert_seed=" + std::to_string(expert_seed) +
         " dense_expert_grads=" + std::to_string(moe_config().dense_expert_grads) +
         " wire_dtype=" + to_string(moe_config().wire_dtype) +
         " request_key_bits=" + std::to_string(moe_config().request_key_bits);
}

MoEConfig LayerSpec::moe_config() const {
  MoEConfig config;
  config.k = k;
  config.probes = probes;
  config.expert = {dim, hidden, activation};
  config.dense_expert_grads = version >= 2 ? dense_expert_grads : true;
  config.wire_dtype = version >= 4 ? wire_dtype : DType::kF32;
  config.request_key_bits = version >= 5 ? request_key_bits : 0;
  return config;
}

void check_spec(const LayerSpec& spec) {
  if (spec.version < kOldestLayerSpecVersion || spec.version > kLayerSpecVersion)
    fail("LayerSpec version " + std::to_string(spec.version) +
         " is not supported (this build reads versions " + std::to_string(kOldestLayerSpecVersion) +
         " to " + std::to_string(kLayerSpecVersion) + ")");
  require_in_range(spec.experts, 1, INT32_MAX, "LayerSpec experts");
  require_in_range(spec.dim, 1, INT32_MAX, "LayerSpec dim");
  require_in_range(spec.codewords, 1, spec.experts, "LayerSpec codewords");
  require_in_range(spec.k, 1, spec.experts, "LayerSpec k");
  require_in_range(spec.probes, 1, spec.codewords, "LayerSpec probes");
  require_in_range(spec.kmeans_iterations, 0, 1 << 20, "LayerSpec kmeans_iterations");
  require_in_range(spec.hidden, 1, INT32_MAX, "LayerSpec hidden");
  if (spec.version >= 4) wire::check_wire_dtype(spec.wire_dtype, "LayerSpec wire_dtype");
  if (spec.version >= 5 && spec.request_key_bits != 0)
    check_request_key_bits(spec.request_key_bits, "LayerSpec request_key_bits");
  if (is_gated(spec.activation) && spec.version < 3)
    fail("LayerSpec activation " + std::string(to_string(spec.activation)) +
         " needs version 3; the spec says version " + std::to_string(spec.version));
}

SharedIndex agree_on_index(comm::Communicator& comm, const LayerSpec& spec, MatrixView centers,
                           MatrixView load_sample) {
  comm::PhaseScope phase(comm, "setup");
  Matrix unit;
  comm::check_together(comm, "layer set-up",
                       [&] { unit = check_inputs(spec, centers, load_sample); });
  comm::require_same_config(comm, spec.describe(), "MoE layer configuration");
  SharedIndex index;
  index.codebook = shared_codebook(comm, spec, centers);
  require_same_centers(comm, centers, index.codebook);
  index.assignment = index.codebook.assign(unit.view());
  const InvertedLists lists = index.lists();
  std::vector<int32_t> probed;
  if (load_sample.rows > 0)
    probed = select_probes(index.codebook, lists, load_sample, spec.k, spec.probes).codewords;
  index.list_load = list_load(lists, probed);
  return index;
}

PlacementPlan place_experts(comm::Communicator& comm, const LayerSpec& spec,
                            const SharedIndex& index) {
  return plan_and_broadcast(comm, spec.placement, index.codebook, index.lists(), index.list_load);
}

std::unique_ptr<DistributedRouter> make_router(comm::Communicator& comm, const SharedIndex& index,
                                               const Placement& placement, MatrixView centers) {
  const std::vector<int32_t> ids = placement.local_experts(comm.rank());
  Matrix local(static_cast<int64_t>(ids.size()), centers.cols);
  for (size_t i = 0; i < ids.size(); ++i)
    std::copy_n(centers.row(ids[i]), centers.cols, local.row(static_cast<int64_t>(i)));
  return std::make_unique<DistributedRouter>(comm, index.codebook, index.assignment, placement,
                                             local.view());
}

std::unique_ptr<MoELayer> make_layer(comm::Communicator& comm, const LayerSpec& spec,
                                     const SharedIndex& index, const Placement& placement,
                                     MatrixView centers, Compute compute) {
  return std::make_unique<MoELayer>(comm, spec.strategy, spec.moe_config(), index.codebook,
                                    index.assignment, placement, centers, spec.expert_seed,
                                    compute);
}

std::unique_ptr<DistributedRouter> build_router(comm::Communicator& comm, const LayerSpec& spec,
                                                MatrixView centers, MatrixView load_sample) {
  const SharedIndex index = agree_on_index(comm, spec, centers, load_sample);
  std::unique_ptr<DistributedRouter> router =
      make_router(comm, index, place_experts(comm, spec, index).placement, centers);
  if (const int bits = spec.moe_config().request_key_bits) router->set_request_keys(bits);
  return router;
}

std::unique_ptr<MoELayer> build_layer(comm::Communicator& comm, const LayerSpec& spec,
                                      MatrixView centers, MatrixView load_sample, Compute compute) {
  const SharedIndex index = agree_on_index(comm, spec, centers, load_sample);
  return make_layer(comm, spec, index, place_experts(comm, spec, index).placement, centers,
                    compute);
}

}  // namespace airmoe::runtime
