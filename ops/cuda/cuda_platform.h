// The CUDA platform of the device composition (ops/device/exec.h): one
// op call runs on the backend's GPU (made current for the call), on the
// caller's stream, with Thrust's non-synchronizing CUDA policy, scratch and
// Thrust's temporaries from the stream-ordered allocator (cudaMallocAsync),
// copies by cudaMemcpy2DAsync. Every CUDA error becomes a DeviceError
// naming the backend, the op and the CUDA error. Included by cuda_ops.cu
// only.
#pragma once

#include <cuda_runtime.h>
#include <thrust/system/cuda/execution_policy.h>

#include <cstddef>
#include <memory>
#include <string>

#include "core/tensor.h"
#include "ops/device/exec.h"
#include "ops/ops.h"

namespace airmoe::inline ops::device {

// "what: cudaErrorX: text" as a DeviceError, unless e is cudaSuccess.
void check_cuda(cudaError_t e, const std::string& what);

// Device memory of one GPU for tensors that outlive an op (cudaMalloc and
// cudaFree, which waits for the device: no stream can still use the memory).
class CudaAllocator final : public Allocator {
 public:
  explicit CudaAllocator(int index) : index_(index) {}
  Device device() const override { return Device::cuda(index_); }
  void* allocate(size_t bytes) override;
  void deallocate(void* p, size_t bytes) noexcept override;

 private:
  int index_;
};

// Page-locked host memory (cudaMallocHost / cudaFreeHost) for staging a
// GPU's data through host transports: copies from and to it are DMA and
// truly asynchronous. Reports the host as its device.
class CudaPinnedAllocator final : public Allocator {
 public:
  Device device() const override { return Device::host(); }
  void* allocate(size_t bytes) override;
  void deallocate(void* p, size_t bytes) noexcept override;
};

// Makes a GPU current for a scope and restores the previous one.
class CurrentDevice {
 public:
  CurrentDevice(int index, const std::string& where);
  ~CurrentDevice();
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;

 private:
  int previous_ = -1;
};

// Thrust's temporary storage, freed in stream order.
struct StreamOrderedMemory {
  using value_type = char;
  cudaStream_t stream;
  const std::string* where;
  char* allocate(std::ptrdiff_t bytes);
  void deallocate(char* p, size_t bytes) noexcept;
};

class CudaExec {
 public:
  CudaExec(int index, CudaAllocator& allocator, cudaStream_t stream, std::string where)
      : where_(std::move(where)),
        current_(index, where_),
        index_(index),
        allocator_(&allocator),
        stream_(stream),
        temp_{stream, &where_} {}

  auto policy() const { return thrust::cuda::par_nosync(temp_).on(stream_); }
  Device device() const { return Device::cuda(index_); }
  Allocator& allocator() const { return *allocator_; }
  void* allocate(size_t bytes) const { return temp_.allocate(static_cast<std::ptrdiff_t>(bytes)); }
  void deallocate(void* p, size_t bytes) const { temp_.deallocate(static_cast<char*>(p), bytes); }
  void copy_bytes(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                  size_t rows) const;
  void synchronize() const;
  // Reports a launch error still pending when the op returns.
  void finish() const;

 private:
  std::string where_;  // "cuda:0 score"
  CurrentDevice current_;
  int index_;
  CudaAllocator* allocator_;
  cudaStream_t stream_;
  mutable StreamOrderedMemory temp_;
};

class CudaPlatform {
 public:
  explicit CudaPlatform(int index)
      : index_(index),
        allocator_(std::make_unique<CudaAllocator>(index)),
        pinned_(std::make_unique<CudaPinnedAllocator>()) {}
  std::string name() const { return "cuda:" + std::to_string(index_); }
  Device device() const { return Device::cuda(index_); }
  Allocator& allocator() const { return *allocator_; }
  Allocator& staging_allocator() const { return *pinned_; }
  CudaExec exec(Stream stream, const char* op) const {
    return CudaExec(index_, *allocator_, static_cast<cudaStream_t>(stream.handle),
                    name() + " " + op);
  }

 private:
  int index_;
  std::unique_ptr<CudaAllocator> allocator_;
  std::unique_ptr<CudaPinnedAllocator> pinned_;
};

}  // namespace airmoe::inline ops::device
