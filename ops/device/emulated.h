// device-emulated: the device composition (ops/device/) compiled by the
// host compiler with Thrust's OpenMP system, on host memory. Everything the
// cuda backend runs except the CUDA calls themselves, testable on any
// machine; its results equal host-portable's bit for bit (same libm).
#pragma once

#include "ops/ops.h"

namespace airmoe::inline ops {

const Ops& device_emulated_ops();

}  // namespace airmoe::inline ops
