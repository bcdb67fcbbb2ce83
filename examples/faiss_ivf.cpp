#include "faiss_ivf.h"

#include <stdexcept>
#include <vector>

#ifdef AIRMOE_HAVE_FAISS
#include <faiss/IndexFlat.h>
#include <faiss/IndexIVFFlat.h>
#include <faiss/utils/utils.h>
#endif

namespace airmoe::bench {

#ifdef AIRMOE_HAVE_FAISS
struct FaissIvf::Impl {
  faiss::IndexFlatIP quantizer;
  faiss::IndexIVFFlat index;
  Impl(const AirRouter& air)
      : quantizer(air.dim()),
        index(&quantizer, air.dim(), air.codewords(), faiss::METRIC_INNER_PRODUCT) {
    quantizer.add(air.codewords(), air.codebook().codewords().data);
    index.is_trained = true;
    const auto& assignment = air.lists().assignment();
    std::vector<faiss::Index::idx_t> lists(assignment.begin(), assignment.end());
    index.add_core(air.experts(), air.centers().data, nullptr, lists.data());
  }
};

bool FaissIvf::available() {
  return true;
}
std::string FaissIvf::build() {
  std::string options = faiss::get_compile_options();
  while (!options.empty() && options.back() == ' ') options.pop_back();
  const std::string version = std::to_string(FAISS_VERSION_MAJOR) + "." +
                              std::to_string(FAISS_VERSION_MINOR) + "." +
                              std::to_string(FAISS_VERSION_PATCH);
  const bool generic = options.find("GENERIC") != std::string::npos;
  return "FAISS " + version + " linked" + (generic ? ", generic build" : "") + " (" + options + ")";
}
FaissIvf::FaissIvf(const AirRouter& air) : impl_(std::make_unique<Impl>(air)) {}

Routes FaissIvf::route(MatrixView tokens, int k, int probes) const {
  Routes r = make_routes(tokens.rows, k, GateMode::kChosen);
  std::vector<faiss::Index::idx_t> labels(static_cast<size_t>(tokens.rows * k));
  faiss::SearchParametersIVF params;
  params.nprobe = static_cast<size_t>(probes);
  impl_->index.search(tokens.rows, tokens.data, k, r.logits.data(), labels.data(), &params);
  for (size_t i = 0; i < labels.size(); ++i) r.experts[i] = static_cast<int32_t>(labels[i]);
  // Fewer than k found (label -1): give that slot the lowest logit found so
  // its gate is near zero rather than undefined.
  for (int64_t t = 0; t < r.tokens; ++t)
    for (int j = 1; j < k; ++j)
      if (r.experts[t * k + j] < 0) r.logits[t * k + j] = r.logits[t * k + j - 1];
  finalize_gates(r);
  return r;
}
#else
struct FaissIvf::Impl {};
bool FaissIvf::available() {
  return false;
}
std::string FaissIvf::build() {
  return "built without FAISS";
}
FaissIvf::FaissIvf(const AirRouter&) {
  throw std::runtime_error("built without FAISS");
}
Routes FaissIvf::route(MatrixView, int, int) const {
  throw std::runtime_error("built without FAISS");
}
#endif

FaissIvf::~FaissIvf() = default;

}  // namespace airmoe::bench
