// What every op of the device composition runs with, and the few patterns
// they share (scratch memory, values brought to the host, stable grouping).
//
// An op receives an Exec (one per op call, from its platform: ops/device/
// emulated.h on host memory, ops/cuda/cuda_platform.h on a GPU):
//   policy()                      the Thrust execution policy (on the op's stream)
//   allocate(bytes), deallocate(p, bytes)
//                                 scratch memory of the device, stream-ordered
//   copy_bytes(dst, dpitch, src, spitch, width, rows)
//                                 rows of bytes; each side host or device memory
//   synchronize()                 wait until the stream's work is done
//   device()                      the Device tensors of this backend live on
// Everything else (the algorithms and functors below and in the op
// headers) is written once for both.
#pragma once

#include <thrust/binary_search.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/sequence.h>
#include <thrust/sort.h>
#include <thrust/transform.h>
#include <thrust/transform_reduce.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/hd.h"
#include "ops/device/access.h"
#include "ops/op_args.h"

namespace airmoe::inline ops::device {

// A failed device call (a CUDA error): names the backend, the op and the
// runtime's error text.
class DeviceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Typed scratch memory of the device for the duration of an op.
template <typename T, typename X>
class Scratch {
 public:
  Scratch(const X& x, int64_t n)
      : x_(&x), n_(n), p_(n > 0 ? static_cast<T*>(x.allocate(bytes(n))) : nullptr) {}
  Scratch(Scratch&& o) noexcept
      : x_(o.x_), n_(std::exchange(o.n_, 0)), p_(std::exchange(o.p_, nullptr)) {}
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Scratch& operator=(Scratch&&) = delete;
  ~Scratch() {
    if (p_) x_->deallocate(p_, bytes(n_));
  }

  T* get() const { return p_; }
  int64_t size() const { return n_; }

 private:
  static size_t bytes(int64_t n) { return static_cast<size_t>(n) * sizeof(T); }
  const X* x_;
  int64_t n_;
  T* p_;
};

inline thrust::counting_iterator<int64_t> count_from(int64_t i) {
  return thrust::counting_iterator<int64_t>(i);
}

// n values from device memory, on the host (waits for the stream).
template <typename T, typename X>
std::vector<T> to_host(const X& x, const T* p, int64_t n) {
  std::vector<T> out(static_cast<size_t>(n));
  if (n > 0) {
    x.copy_bytes(out.data(), 0, p, 0, static_cast<size_t>(n) * sizeof(T), 1);
    x.synchronize();
  }
  return out;
}

template <typename T, typename X>
T value_at(const X& x, const T* p) {
  return to_host(x, p, 1)[0];
}

// n host values into device memory.
template <typename T, typename X>
void from_host(const X& x, T* dst, const std::vector<T>& src) {
  if (!src.empty()) x.copy_bytes(dst, 0, src.data(), 0, src.size() * sizeof(T), 1);
}

constexpr int64_t kNoRow = INT64_MAX;  // "none" in a min-reduction over rows

struct Min64 {
  AIRMOE_HD int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};
struct Max64 {
  AIRMOE_HD int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

template <typename Pred>
struct IndexIf {
  Pred pred;
  AIRMOE_HD int64_t operator()(int64_t i) const { return pred(i) ? i : kNoRow; }
};

// The first i in [0, n) with pred(i), or -1 (one reduction, on the host).
template <typename X, typename Pred>
int64_t first_where(const X& x, int64_t n, Pred pred) {
  if (n <= 0) return -1;
  const int64_t i = thrust::transform_reduce(x.policy(), count_from(0), count_from(n),
                                             IndexIf<Pred>{pred}, kNoRow, Min64{});
  return i == kNoRow ? -1 : i;
}

struct OutOfRange {
  Vec<const int32_t> values;
  int64_t limit;
  AIRMOE_HD bool operator()(int64_t i) const { return values[i] < 0 || values[i] >= limit; }
};

// Refuses (UsageError "<entry> i names <what> v, outside [0, limit)") an
// index vector with an entry outside [0, limit): a device must never read
// past a tensor on a caller's bad index.
template <typename X>
void check_indices(const X& x, const OpArgs& args, const char* entry, const char* what,
                   const TensorView& v, int64_t limit) {
  const Vec<const int32_t> values = vec_of<const int32_t>(v);
  const int64_t i = first_where(x, vector_size(v), OutOfRange{values, limit});
  if (i < 0) return;
  const int32_t bad = value_at(x, &values[i]);
  args.fail(std::string(entry) + " " + std::to_string(i) + " names " + what + " " +
            std::to_string(bad) + ", outside [0, " + std::to_string(limit) + ")");
}

// Reads key i of an int32 vector (a Vec of any stride).
struct ReadKey {
  Vec<const int32_t> keys;
  AIRMOE_HD int32_t operator()(int64_t i) const { return keys[i]; }
};

// Items 0..n-1 grouped by an int32 key in [0, buckets) with a stable sort,
// so each group keeps item order whatever the device's timing: items[]
// lists them group after group, and group g is items[offsets[g] ..
// offsets[g + 1]).
template <typename X>
struct Grouping {
  Scratch<int32_t, X> keys;     // [n], sorted
  Scratch<int64_t, X> items;    // [n]
  Scratch<int64_t, X> offsets;  // [buckets + 1]
};

template <typename X, typename KeyOf>
Grouping<X> group_by(const X& x, int64_t n, int64_t buckets, KeyOf key_of) {
  Grouping<X> g{Scratch<int32_t, X>(x, n), Scratch<int64_t, X>(x, n),
                Scratch<int64_t, X>(x, buckets + 1)};
  if (n > 0) {
    thrust::transform(x.policy(), count_from(0), count_from(n), g.keys.get(), key_of);
    thrust::sequence(x.policy(), g.items.get(), g.items.get() + n);
    thrust::stable_sort_by_key(x.policy(), g.keys.get(), g.keys.get() + n, g.items.get());
  }
  thrust::lower_bound(x.policy(), g.keys.get(), g.keys.get() + n, count_from(0),
                      count_from(buckets + 1), g.offsets.get());
  return g;
}

}  // namespace airmoe::inline ops::device
