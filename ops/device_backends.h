// The hook through which the device backends (ops/device/: device-emulated;
// ops/cuda/: cuda:N) join the registry (ops/registry.cpp). The device
// target defines both functions when CMake builds it; otherwise
// ops/no_device_backends.cpp does (no device backends, and why).
#pragma once

#include <string>
#include <vector>

#include "ops/ops.h"

namespace airmoe::inline ops {

// Every device backend that can run here, in a fixed order (device-emulated
// first, then cuda:0, cuda:1, ...). Each lives as long as the program.
std::vector<const Ops*> device_backends();

// cuda_unavailable_reason() (ops/registry.h) is defined next to
// device_backends(): empty when a cuda backend runs here, else why not.

}  // namespace airmoe::inline ops
