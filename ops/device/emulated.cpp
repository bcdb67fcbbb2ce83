#include "ops/device/emulated.h"

#include <thrust/system/omp/execution_policy.h>

#include <cstring>

#include "ops/device/device_ops.h"

namespace airmoe::inline ops::device {
namespace {

// One op call on host memory: Thrust's OpenMP policy, the host allocator
// for scratch, memcpy for copies; nothing is asynchronous.
struct EmulatedExec {
  auto policy() const { return thrust::omp::par; }
  Device device() const { return Device::host(); }
  Allocator& allocator() const { return host_allocator(); }
  void* allocate(size_t bytes) const { return host_allocator().allocate(bytes); }
  void deallocate(void* p, size_t bytes) const { host_allocator().deallocate(p, bytes); }
  void copy_bytes(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                  size_t rows) const {
    for (size_t r = 0; r < rows; ++r)
      std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                   width);
  }
  void synchronize() const {}
  void finish() const {}
};

struct EmulatedPlatform {
  std::string name() const { return "device-emulated"; }
  Device device() const { return Device::host(); }
  Allocator& allocator() const { return host_allocator(); }
  Allocator& staging_allocator() const { return host_allocator(); }
  EmulatedExec exec(Stream, const char*) const { return {}; }
};

}  // namespace

template class DeviceOps<EmulatedPlatform>;

}  // namespace airmoe::inline ops::device

namespace airmoe::inline ops {

const Ops& device_emulated_ops() {
  static const device::DeviceOps<device::EmulatedPlatform> ops{device::EmulatedPlatform{}};
  return ops;
}

}  // namespace airmoe::inline ops
