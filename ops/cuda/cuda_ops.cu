// cuda:N: the device composition (ops/device/) compiled by nvcc on the CUDA
// platform, one backend per GPU, and what the registry needs to list them.
#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <vector>

#include "ops/cuda/cuda_backends.h"
#include "ops/cuda/cuda_platform.h"
#include "ops/device/device_ops.h"

namespace airmoe::inline ops::device {

void check_cuda(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return;
  throw DeviceError(what + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

void* CudaAllocator::allocate(size_t bytes) {
  const std::string where = "cuda:" + std::to_string(index_);
  CurrentDevice current(index_, where);
  void* p = nullptr;
  check_cuda(cudaMalloc(&p, bytes), where + ": cudaMalloc of " + std::to_string(bytes) + " bytes");
  return p;
}

void CudaAllocator::deallocate(void* p, size_t) noexcept {
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  if (cudaSetDevice(index_) == cudaSuccess) cudaFree(p);
  cudaSetDevice(previous);
}

void* CudaPinnedAllocator::allocate(size_t bytes) {
  void* p = nullptr;
  check_cuda(cudaMallocHost(&p, bytes),
             "cudaMallocHost of " + std::to_string(bytes) + " bytes (pinned staging memory)");
  return p;
}

void CudaPinnedAllocator::deallocate(void* p, size_t) noexcept {
  cudaFreeHost(p);
}

CurrentDevice::CurrentDevice(int index, const std::string& where) {
  check_cuda(cudaGetDevice(&previous_), where + ": cudaGetDevice");
  if (previous_ != index) check_cuda(cudaSetDevice(index), where + ": cudaSetDevice");
}

CurrentDevice::~CurrentDevice() {
  int now = -1;
  if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
}

char* StreamOrderedMemory::allocate(std::ptrdiff_t bytes) {
  void* p = nullptr;
  check_cuda(cudaMallocAsync(&p, static_cast<size_t>(bytes), stream),
             *where + ": cudaMallocAsync of " + std::to_string(bytes) + " bytes");
  return static_cast<char*>(p);
}

void StreamOrderedMemory::deallocate(char* p, size_t) noexcept {
  cudaFreeAsync(p, stream);
}

void CudaExec::copy_bytes(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                          size_t rows) const {
  if (rows <= 1) dpitch = spitch = width;
  check_cuda(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, cudaMemcpyDefault, stream_),
             where_ + ": cudaMemcpy2DAsync");
}

void CudaExec::synchronize() const {
  check_cuda(cudaStreamSynchronize(stream_), where_ + ": cudaStreamSynchronize");
}

void CudaExec::finish() const {
  check_cuda(cudaGetLastError(), where_);
}

template class DeviceOps<CudaPlatform>;

namespace {

struct Discovery {
  std::vector<std::unique_ptr<DeviceOps<CudaPlatform>>> backends;
  std::string missing;

  Discovery() {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
      missing = "cudaGetDeviceCount failed: error " + std::to_string(static_cast<int>(e)) + " (" +
                cudaGetErrorName(e) + "): " + cudaGetErrorString(e);
      cudaGetLastError();  // the failure is reported here, not by the next call
      return;
    }
    if (count == 0) missing = "no CUDA device (cudaGetDeviceCount found 0)";
    for (int i = 0; i < count; ++i)
      backends.push_back(std::make_unique<DeviceOps<CudaPlatform>>(CudaPlatform(i)));
  }
};

const Discovery& discovery() {
  static const Discovery d;
  return d;
}

}  // namespace
}  // namespace airmoe::inline ops::device

namespace airmoe::inline ops {

std::vector<const Ops*> cuda_backends() {
  std::vector<const Ops*> out;
  for (const auto& b : device::discovery().backends) out.push_back(b.get());
  return out;
}

std::string cuda_backends_missing_reason() {
  return device::discovery().missing;
}

}  // namespace airmoe::inline ops
