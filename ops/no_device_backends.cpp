// The device-backend hook of a build without the device target
// (ops/device_backends.h): no device backends.
#include "ops/device_backends.h"
#include "ops/registry.h"

namespace airmoe::inline ops {

std::vector<const Ops*> device_backends() {
  return {};
}

std::string cuda_unavailable_reason() {
  return "this build has no device backends (no CUDA build: configure with -DAIRMOE_WITH_CUDA=ON)";
}

}  // namespace airmoe::inline ops
