#include "ops/op_args.h"

#include "core/errors.h"

namespace airmoe::inline ops {
namespace {

std::string describe(const TensorView& v) {
  std::string s = "[";
  s += std::to_string(v.rows);
  s += ", ";
  s += std::to_string(v.cols);
  s += "] ";
  s += to_string(v.dtype);
  s += " on ";
  s += to_string(v.device);
  return s;
}

}  // namespace

void OpArgs::fail(const std::string& what) const {
  throw UsageError(where_ + what);
}

void OpArgs::on_device(const TensorView& v, const char* arg) const {
  if (v.empty() || v.device == device_) return;
  fail(std::string(arg) + " is " + describe(v) + ", expected it on " + to_string(device_));
}

void OpArgs::reachable(const TensorView& v, const char* arg) const {
  if (v.empty() || v.device == device_ || v.device.is_host()) return;
  fail(std::string(arg) + " is " + describe(v) + ", expected it on the host or on " +
       to_string(device_));
}

void OpArgs::dtype(const TensorView& v, const char* arg,
                   std::initializer_list<DType> dtypes) const {
  on_device(v, arg);
  if (v.empty()) return;  // no element to misread
  std::string names;
  for (DType d : dtypes) {
    if (v.dtype == d) return;
    names += names.empty() ? "" : " or ";
    names += to_string(d);
  }
  fail(std::string(arg) + " is " + describe(v) + ", expected " + names);
}

void OpArgs::shape(const TensorView& v, const char* arg, int64_t rows, int64_t cols) const {
  if (v.rows == rows && v.cols == cols && v.ld >= v.cols) return;
  if (v.empty() && rows * cols == 0) return;  // nothing to read or write
  fail(std::string(arg) + " is " + describe(v) + " (ld " + std::to_string(v.ld) + "), expected [" +
       std::to_string(rows) + ", " + std::to_string(cols) + "]");
}

void OpArgs::matrix(const TensorView& v, const char* arg, DType dtype, int64_t rows,
                    int64_t cols) const {
  this->dtype(v, arg, {dtype});
  shape(v, arg, rows, cols);
}

void OpArgs::vector(const TensorView& v, const char* arg, DType dtype, int64_t n) const {
  this->dtype(v, arg, {dtype});
  const bool column = v.cols == 1 && v.ld >= 1, row = v.rows == 1;
  if ((column || row) && (n < 0 || vector_size(v) == n)) return;
  if (v.empty() && n <= 0) return;
  fail(std::string(arg) + " is " + describe(v) + ", expected a vector [" +
       (n < 0 ? std::string("n") : std::to_string(n)) + ", 1]");
}

int64_t OpArgs::bias(const TensorView& v, const char* arg, int64_t experts) const {
  if (v.empty()) return -1;
  vector(v, arg, DType::kF32, experts);
  if (vector_stride(v) != 1 && vector_size(v) > 1)
    fail(std::string(arg) + " is " + describe(v) + ", expected a contiguous vector");
  return vector_size(v);
}

void OpArgs::at_least(int64_t value, int64_t lo, const char* arg) const {
  if (value >= lo) return;
  fail(std::string(arg) + " = " + std::to_string(value) + " must be >= " + std::to_string(lo));
}

void OpArgs::offsets(const char* arg, int64_t first_bad, int64_t value, const char* what) const {
  if (first_bad < 0) return;
  if (first_bad == 0) fail(std::string(arg) + "[0] = " + std::to_string(value) + " must be 0");
  fail(std::string(arg) + "[" + std::to_string(first_bad) + "] = " + std::to_string(value) +
       " is below entry " + std::to_string(first_bad - 1) + ": each entry starts a range of " +
       what);
}

void OpArgs::list_blocks_end(int64_t end, int64_t blocks) const {
  if (end == blocks) return;
  fail("lists.list_blocks ends at " + std::to_string(end) + ", not at the " +
       std::to_string(blocks) + " blocks: every block belongs to one list");
}

void OpArgs::bad_run(int64_t p, int64_t block, int64_t block_end, int64_t blocks) const {
  fail("pair " + std::to_string(p) + " names blocks " + std::to_string(block) + " .. " +
       std::to_string(block_end) + " (block .. block_end): not a run of one list's blocks in [0, " +
       std::to_string(blocks) + ")");
}

}  // namespace airmoe::inline ops
