// Tests that run once per compute backend (ops/registry.h): the parameter is
// the backend's name; every backend registered here is a parameter, and a
// "cuda" parameter stands for the GPU where none is registered, so that the
// test output counts it as skipped, with the reason. Test names carry the
// backend ("/host_avx2", "/cuda_0"); CMake labels those with "cuda" `gpu`.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "ops/registry.h"

namespace airmoe::test {

inline std::vector<std::string> backend_names() {
  std::vector<std::string> names;
  bool cuda = false;
  for (const Ops* ops : backends()) {
    names.push_back(ops->name());
    cuda = cuda || ops->name().rfind("cuda", 0) == 0;
  }
  if (!cuda) names.push_back("cuda");
  return names;
}

inline std::string backend_test_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string s = info.param;
  for (char& c : s)
    if (c == '-' || c == ':') c = '_';
  return s;
}

inline bool is_cuda(const Ops& ops) {
  return ops.name().rfind("cuda", 0) == 0;
}

// The fixture: ops() is the backend under test, ref() host-portable, the
// reference every backend is compared with.
class BackendTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "cuda") {
      const std::string why = cuda_unavailable_reason();
      GTEST_SKIP() << "no cuda backend here: " << (why.empty() ? "none registered" : why);
    }
    ops_ = &find_backend(GetParam());
  }
  const Ops& ops() const { return *ops_; }
  static const Ops& ref() { return find_backend("host-portable"); }
  Compute compute() const { return Compute{ops_, Stream{}}; }
  // Whether exp, log and erf give libm's bits here (every backend but cuda).
  bool libm_bits() const { return !is_cuda(*ops_); }

 private:
  const Ops* ops_ = nullptr;
};

// got equals want bit for bit where `bits`, else entry by entry within
// `tol` relative to 1 + |want| (cuda's exp, log and erf).
template <typename T>
void expect_same_values(const std::vector<T>& got, const std::vector<T>& want,
                        const std::string& what, bool bits, double tol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  if (got.empty()) return;
  if (bits) {
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(T)), 0) << what;
    return;
  }
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_NEAR(got[i], want[i], tol * (1.0 + std::fabs(static_cast<double>(want[i]))))
        << what << " entry " << i;
}

#define AIRMOE_INSTANTIATE_BACKENDS(Suite)                                                        \
  INSTANTIATE_TEST_SUITE_P(Backends, Suite, ::testing::ValuesIn(::airmoe::test::backend_names()), \
                           ::airmoe::test::backend_test_name)

}  // namespace airmoe::test
