// NumPy .npy files: float32 matrices in (a user's router weights and
// tokens), int32 and float32 matrices out (saved routes). Anything else is
// refused with a message naming the file and what is wrong with it.
#pragma once

#include <cstdint>
#include <string>

#include "core/matrix.h"

namespace airmoe::inline core {

// A 2-D, C-order, little-endian float32 array ('<f4').
Matrix read_npy_matrix(const std::string& path);

void write_npy(const std::string& path, const float* data, int64_t rows, int64_t cols);
void write_npy(const std::string& path, const int32_t* data, int64_t rows, int64_t cols);

}  // namespace airmoe::inline core
