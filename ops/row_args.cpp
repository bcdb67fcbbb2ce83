#include "ops/row_args.h"

namespace airmoe::inline ops {
namespace {

void same_cols(const OpArgs& args, const TensorView& src, const TensorView& dst) {
  if (src.cols != dst.cols)
    args.fail("src has " + std::to_string(src.cols) + " columns, dst " + std::to_string(dst.cols));
}

}  // namespace

int64_t gather_rows_shapes(const OpArgs& args, const TensorView& src, const TensorView& rows,
                           const TensorView& dst) {
  args.float_dtype(src, "src");
  args.float_dtype(dst, "dst");
  args.vector(rows, "rows", DType::kI32);
  const int64_t n = vector_size(rows);
  args.shape(dst, "dst", n, src.cols);
  return n;
}

int64_t sum_rows_shapes(const OpArgs& args, const TensorView& src, const TensorView& rows,
                        const TensorView& offsets, const TensorView& dst) {
  args.float_dtype(src, "src");
  args.vector(rows, "rows", DType::kI32);
  args.vector(offsets, "offsets", DType::kI64);
  const int64_t groups = vector_size(offsets) - 1;
  if (groups < 0) args.fail("offsets is empty, expected G + 1 entries");
  args.matrix(dst, "dst", DType::kF32, groups, src.cols);
  return groups;
}

int64_t add_scaled_rows_shapes(const OpArgs& args, const TensorView& dst,
                               const TensorView& dst_rows, const TensorView& src,
                               const TensorView& src_rows, const TensorView& scale) {
  args.dtype(dst, "dst", {DType::kF32});
  args.float_dtype(src, "src");
  same_cols(args, src, dst);
  args.vector(dst_rows, "dst_rows", DType::kI32);
  const int64_t n = vector_size(dst_rows);
  args.vector(src_rows, "src_rows", DType::kI32, n);
  args.vector(scale, "scale", DType::kF32, n);
  return n;
}

void fail_row_id(const OpArgs& args, const char* arg, int64_t i, int64_t value, int64_t limit,
                 const char* of) {
  args.fail(std::string(arg) + "[" + std::to_string(i) + "] = " + std::to_string(value) +
            " is outside [0, " + std::to_string(limit) + "): " + of + " has " +
            std::to_string(limit) + " rows");
}

void fail_offsets(const OpArgs& args, int64_t g, int64_t begin, int64_t end, int64_t items) {
  args.fail("offsets[" + std::to_string(g) + "] .. offsets[" + std::to_string(g + 1) +
            "] = " + std::to_string(begin) + " .. " + std::to_string(end) +
            " is not a range of the " + std::to_string(items) + " rows entries");
}

}  // namespace airmoe::inline ops
