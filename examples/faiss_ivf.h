// FAISS IndexIVFFlat (inner product) over the very same codewords and list
// assignment as an AirRouter, so that the two differ only in how they scan.
#pragma once

#include <memory>

#include "router/air_router.h"
#include "router/routes.h"

namespace airmoe::bench {

class FaissIvf {
 public:
  static bool available();
  explicit FaissIvf(const AirRouter& air);
  ~FaissIvf();
  // nprobe = probes; routes with gates softmax over the k found.
  Routes route(MatrixView tokens, int k, int probes) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace airmoe::bench
