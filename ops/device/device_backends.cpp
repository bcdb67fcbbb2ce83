// The device-backend hook (ops/device_backends.h) of a build with the
// device composition: device-emulated always, cuda:N for each GPU of a CUDA
// build.
#include "ops/device_backends.h"

#include "ops/device/emulated.h"
#include "ops/registry.h"

#if AIRMOE_WITH_CUDA
#include "ops/cuda/cuda_backends.h"
#endif

namespace airmoe::inline ops {

std::vector<const Ops*> device_backends() {
  std::vector<const Ops*> out{&device_emulated_ops()};
#if AIRMOE_WITH_CUDA
  for (const Ops* ops : cuda_backends()) out.push_back(ops);
#endif
  return out;
}

std::string cuda_unavailable_reason() {
#if AIRMOE_WITH_CUDA
  return cuda_backends_missing_reason();
#else
  return "this build has no CUDA backend (configure with -DAIRMOE_WITH_CUDA=ON)";
#endif
}

}  // namespace airmoe::inline ops
