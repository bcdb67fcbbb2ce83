// The cuda:N backends of a CUDA build (ops/cuda/), for the registry
// (ops/registry.h): the device composition (ops/device/) compiled by nvcc,
// one backend per GPU the runtime finds.
#pragma once

#include <string>
#include <vector>

#include "ops/ops.h"

namespace airmoe::inline ops {

// One backend per GPU, cuda:0 first; empty when no GPU or driver works.
std::vector<const Ops*> cuda_backends();
// Why cuda_backends() is empty ("cudaGetDeviceCount failed: error 35
// (cudaErrorInsufficientDriver): ..."); empty when it is not.
std::string cuda_backends_missing_reason();

}  // namespace airmoe::inline ops
