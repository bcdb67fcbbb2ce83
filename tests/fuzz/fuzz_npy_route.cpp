// libFuzzer target: bytes -> .npy reader -> the loaded matrix routed as
// tokens (against fixed centers) and as centers (small codebook). Refusals
// (UsageError, the reader's errors) are fine; a crash, a hang, an sanitizer
// report, another exception type, or routes with NaN gates / ids out of
// range are findings. Each finding becomes a unit test (tests/test_npy.cpp,
// tests/test_input_guards.cpp).
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "core/matrix.h"
#include "core/npy.h"
#include "core/synthetic.h"
#include "router/air_router.h"
#include "router/dense_router.h"

namespace {

using airmoe::Matrix;
using airmoe::MatrixView;
using airmoe::Routes;

// The reader takes a path: the input lives in a memory file (no disk I/O).
struct MemoryFile {
  int fd = memfd_create("airmoe_fuzz", 0);
  ~MemoryFile() { close(fd); }
  std::string path() const { return "/proc/self/fd/" + std::to_string(fd); }
  void write_all(const uint8_t* data, size_t size) {
    if (ftruncate(fd, 0) != 0 || lseek(fd, 0, SEEK_SET) != 0) std::abort();
    while (size > 0) {
      const ssize_t n = write(fd, data, size);
      if (n <= 0) std::abort();
      data += n;
      size -= static_cast<size_t>(n);
    }
  }
};

void require_sane(const Routes& r, int64_t experts) {
  for (size_t i = 0; i < r.experts.size(); ++i) {
    if (r.experts[i] < 0 || r.experts[i] >= experts) __builtin_trap();
    if (!std::isfinite(r.gates[i])) __builtin_trap();
  }
}

// Refusals are expected; anything else propagates and libFuzzer reports it.
template <typename Fn>
void refusal_ok(Fn&& fn) {
  try {
    fn();
  } catch (const std::invalid_argument&) {  // UsageError, PeerError
  } catch (const std::runtime_error&) {     // the reader's file errors
  }
}

void route_as_tokens(const Matrix& m) {
  const Matrix centers = airmoe::random_matrix(8, m.cols(), 1.0, 3);
  const airmoe::DenseRouter dense(centers.view());
  require_sane(dense.route(m.view(), 2), 8);
  const airmoe::AirRouter air(centers.view(), airmoe::AirConfig{2, 2, 1, 0});
  require_sane(air.route(m.view(), 2, 1), 8);
}

void route_as_centers(const Matrix& m) {
  const int64_t C = std::min<int64_t>(2, m.rows());
  const airmoe::AirRouter air(m.view(), airmoe::AirConfig{C, 2, 1, 0});
  const Matrix tokens = airmoe::random_matrix(5, m.cols(), 1.0, 4);
  require_sane(air.route(tokens.view(), 1, 1), m.rows());
  require_sane(airmoe::DenseRouter(m.view()).route(tokens.view(), 1), m.rows());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static MemoryFile file;
  file.write_all(data, size);
  Matrix m;
  bool loaded = false;
  refusal_ok([&] {
    m = airmoe::read_npy_matrix(file.path());
    loaded = true;
  });
  // Keep each input cheap: the reader has done its part on larger ones.
  if (!loaded || m.cols() > 4096 || m.rows() * m.cols() > (1 << 16)) return 0;
  refusal_ok([&] { route_as_tokens(m); });
  refusal_ok([&] { route_as_centers(m); });
  return 0;
}
