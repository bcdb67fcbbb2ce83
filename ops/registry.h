// The compute backends this build and this machine have.
//   host_ops()      the fastest host backend this CPU runs (host-avx512
//                   where the CPU has AVX-512 F/VL/DQ/BW, AVX2 and FMA;
//                   host-avx2 where it has AVX2 and FMA; else host-portable)
//   backends()      every backend that can run here: every host kernel set
//                   the CPU runs, device-emulated, and cuda:N for each GPU
//                   of a CUDA build; what tests iterate over
//   find_backend()  one by name ("host", "host-avx512", "host-avx2",
//                   "host-portable", "device-emulated", "cuda", "cuda:0");
//                   throws UsageError naming the name, and why it is missing
//                   here (no such backend, a CPU without AVX-512 or AVX2, a
//                   build without CUDA, no GPU or no driver, with the CUDA
//                   error)
//   cuda_unavailable_reason()  empty when a cuda backend runs here
//   is_host_backend()  true for the host kernel sets (ops/host/), whose
//                   memory is the host's and whose copies are memcpy; false
//                   for device-emulated (host memory, but the device's code
//                   path, copies included) and cuda
#pragma once

#include <string>
#include <vector>

#include "ops/ops.h"

namespace airmoe::inline ops {

const Ops& host_ops();
std::vector<const Ops*> backends();
const Ops& find_backend(const std::string& name);
std::string cuda_unavailable_reason();
bool is_host_backend(const Ops& ops);

}  // namespace airmoe::inline ops
