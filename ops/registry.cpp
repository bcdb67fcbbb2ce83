#include "ops/registry.h"

#include "core/errors.h"
#include "ops/device_backends.h"
#include "ops/host/host_ops.h"

namespace airmoe::inline ops {
namespace {

// The HostOps of a SIMD kernel set, or nullptr where the CPU lacks it.
template <const host::HostKernels* (*kernels_of)()>
const Ops* host_simd() {
  static const host::HostKernels* kernels = kernels_of();
  if (kernels == nullptr) return nullptr;
  static const host::HostOps ops(*kernels);
  return &ops;
}

const Ops* host_avx512() {
  return host_simd<host::avx512_kernels>();
}

const Ops* host_avx2() {
  return host_simd<host::avx2_kernels>();
}

const Ops& host_portable() {
  static const host::HostOps ops(host::portable_kernels());
  return ops;
}

}  // namespace

const Ops& host_ops() {
  if (const Ops* avx512 = host_avx512()) return *avx512;
  if (const Ops* avx2 = host_avx2()) return *avx2;
  return host_portable();
}

std::vector<const Ops*> backends() {
  std::vector<const Ops*> out;
  if (const Ops* avx512 = host_avx512()) out.push_back(avx512);
  if (const Ops* avx2 = host_avx2()) out.push_back(avx2);
  out.push_back(&host_portable());
  for (const Ops* ops : device_backends()) out.push_back(ops);
  return out;
}

const Ops& find_backend(const std::string& name) {
  if (name == "host") return host_ops();
  if (name == "host-portable") return host_portable();
  if (name == "host-avx512") {
    if (const Ops* avx512 = host_avx512()) return *avx512;
    throw UsageError("backend 'host-avx512' is not available: this CPU lacks AVX-512 F/VL/DQ");
  }
  if (name == "host-avx2") {
    if (const Ops* avx2 = host_avx2()) return *avx2;
    throw UsageError("backend 'host-avx2' is not available: this CPU lacks AVX2 or FMA");
  }
  for (const Ops* ops : device_backends())
    if (ops->name() == name || (name == "cuda" && ops->name().rfind("cuda:", 0) == 0)) return *ops;
  if (name == "cuda" || name.rfind("cuda:", 0) == 0) {
    const std::string why = cuda_unavailable_reason();
    throw UsageError("backend '" + name +
                     "' is not available: " + (why.empty() ? "no such GPU here" : why));
  }
  std::string known = "host, host-avx512, host-avx2, host-portable";
  for (const Ops* ops : device_backends()) known += ", " + ops->name();
  throw UsageError("backend '" + name + "' is unknown or not built here (available: " + known +
                   "; cuda: " + (cuda_unavailable_reason().empty() ? "yes" : "no") + ")");
}

bool is_host_backend(const Ops& ops) {
  return &ops == host_avx512() || &ops == host_avx2() || &ops == &host_portable();
}

}  // namespace airmoe::inline ops
