// FAISS IndexIVFFlat (inner product) over the very same codewords and list
// assignment as an AirRouter, so that the two differ only in how they scan.
#pragma once

#include <memory>
#include <string>

#include "router/air_router.h"
#include "router/routes.h"

namespace airmoe::bench {

class FaissIvf {
 public:
  static bool available();
  // "FAISS 1.7.3 linked, generic build (OPTIMIZE GENERIC)": the library
  // this binary links (Debian's libfaiss by default, built for any x86-64
  // CPU), from its compile options.
  static std::string build();
  explicit FaissIvf(const AirRouter& air);
  ~FaissIvf();
  // nprobe = probes; routes with gates softmax over the k found.
  Routes route(MatrixView tokens, int k, int probes) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace airmoe::bench
