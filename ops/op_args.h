// The preconditions an op checks on its own arguments (ops/ops.h: devices,
// dtypes and shapes; user input is checked by the callers), the same for
// every backend. A failure is a UsageError naming the backend, the op and
// the argument: "host-avx2 score: c is [2, 3] f32 on host, expected [2, 4]".
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/tensor.h"

namespace airmoe::inline ops {

class OpArgs {
 public:
  OpArgs(const std::string& backend, const char* op, Device device)
      : where_(backend + " " + op + ": "), device_(device) {}

  // On this backend's device (an empty view may lie anywhere).
  void on_device(const TensorView& v, const char* arg) const;
  // On the host or on this backend's device.
  void reachable(const TensorView& v, const char* arg) const;
  // On the device, one of `dtypes`.
  void dtype(const TensorView& v, const char* arg, std::initializer_list<DType> dtypes) const;
  void float_dtype(const TensorView& v, const char* arg) const {
    dtype(v, arg, {DType::kF32, DType::kBF16});
  }
  // On the device, of the dtype, [rows, cols].
  void matrix(const TensorView& v, const char* arg, DType dtype, int64_t rows, int64_t cols) const;
  // On the device, of the dtype, [n, 1] or [1, n]; n < 0 accepts any n.
  void vector(const TensorView& v, const char* arg, DType dtype, int64_t n = -1) const;
  void shape(const TensorView& v, const char* arg, int64_t rows, int64_t cols) const;
  // A selection bias (TopKView::bias) where one is given: an f32 vector of
  // stride 1 on the device, of `experts` entries where that is known (>= 0).
  // Returns its size, or -1 for none.
  int64_t bias(const TensorView& v, const char* arg, int64_t experts = -1) const;
  void at_least(int64_t value, int64_t lo, const char* arg) const;
  // Offsets of n ranges of `what` (n + 1 entries): entry 0 is 0 and none is
  // below the one before. `first_bad` is the first entry that breaks it (-1:
  // none), as the backend found it, and `value` that entry.
  void offsets(const char* arg, int64_t first_bad, int64_t value, const char* what) const;
  // ListBlocksView's list_blocks ends at `end`: it must be the blocks' count.
  void list_blocks_end(int64_t end, int64_t blocks) const;
  // scan_blocks' pair p names blocks block .. block_end - 1, which are not a
  // run of consecutive blocks of one list among the S blocks.
  [[noreturn]] void bad_run(int64_t p, int64_t block, int64_t block_end, int64_t blocks) const;
  [[noreturn]] void fail(const std::string& what) const;

 private:
  std::string where_;
  Device device_;
};

// Entry i of a vector view ([n, 1] with any ld, or [1, n]).
inline int64_t vector_stride(const TensorView& v) {
  return v.cols == 1 ? v.ld : 1;
}
inline int64_t vector_size(const TensorView& v) {
  return v.cols == 1 ? v.rows : v.cols;
}

}  // namespace airmoe::inline ops
