// .npy reading and writing, checked against NumPy itself: fixtures are written
// by /usr/bin/python3 at test time (skipped when NumPy is not available).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/npy.h"
#include "core/synthetic.h"
#include "test_util.h"

namespace airmoe {
namespace {

const char* kPython = "/usr/bin/python3";

bool have_numpy() {
  static const bool ok = [] {
    if (!std::filesystem::exists(kPython)) return false;
    const std::string cmd = std::string(kPython) + " -c \"import numpy\" > /dev/null 2>&1";
    return std::system(cmd.c_str()) == 0;
  }();
  return ok;
}

// Runs a Python snippet in `dir` (as the working directory); true on exit 0.
bool run_python(const test::TempDir& dir, const std::string& code) {
  const std::string script = dir.file("script.py");
  {
    std::ofstream out(script);
    out << "import os, sys\nimport numpy as np\nos.chdir(sys.argv[1])\n" << code << "\n";
  }
  const std::string cmd = std::string(kPython) + " " + script + " " + dir.path().string();
  return std::system(cmd.c_str()) == 0;
}

#define REQUIRE_NUMPY() \
  if (!have_numpy()) GTEST_SKIP() << "python3 with numpy is not available"

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

TEST(Npy, ReadsWhatNumPyWrites) {
  REQUIRE_NUMPY();
  test::TempDir dir("npy_read");
  ASSERT_TRUE(run_python(dir, R"PY(
rng = np.random.default_rng(5)
a = rng.standard_normal((37, 13)).astype(np.float32)
a[0, 0] = -0.0
a[0, 1] = np.float32(1e-42)   # subnormal
a[0, 2] = np.float32(3.4e38)
a[0, 3] = np.nan
a[0, 4] = -np.inf
np.save('a.npy', a)
a.tofile('a.raw')
np.save('empty.npy', np.zeros((0, 5), np.float32))
np.save('row.npy', np.arange(6, dtype=np.float32).reshape(1, 6))
np.save('col.npy', np.arange(4, dtype=np.float32).reshape(4, 1) * 0.5)
# A sliced (non-contiguous) array is saved in C order too.
np.save('sliced.npy', np.arange(60, dtype=np.float32).reshape(6, 10)[::2, 1::3])
with open('v2.npy', 'wb') as f:
    np.lib.format.write_array(f, a, version=(2, 0))
)PY"));
  const Matrix a = read_npy_matrix(dir.file("a.npy"));
  ASSERT_EQ(a.rows(), 37);
  ASSERT_EQ(a.cols(), 13);
  const std::vector<char> raw = read_bytes(dir.file("a.raw"));
  ASSERT_EQ(raw.size(), a.size() * sizeof(float));
  EXPECT_EQ(std::memcmp(raw.data(), a.data(), raw.size()), 0) << "values differ from NumPy's";
  EXPECT_EQ(bits(a(0, 0)), bits(-0.0f));
  EXPECT_TRUE(std::isnan(a(0, 3)));

  const Matrix v2 = read_npy_matrix(dir.file("v2.npy"));
  ASSERT_EQ(v2.rows(), 37);
  ASSERT_EQ(v2.cols(), 13);
  EXPECT_EQ(std::memcmp(v2.data(), a.data(), raw.size()), 0);
  EXPECT_EQ(read_bytes(dir.file("v2.npy"))[6], 2) << "fixture is not version 2";

  const Matrix empty = read_npy_matrix(dir.file("empty.npy"));
  EXPECT_EQ(empty.rows(), 0);
  EXPECT_EQ(empty.cols(), 5);

  const Matrix row = read_npy_matrix(dir.file("row.npy"));
  ASSERT_EQ(row.rows(), 1);
  ASSERT_EQ(row.cols(), 6);
  for (int j = 0; j < 6; ++j) EXPECT_EQ(row(0, j), static_cast<float>(j));
  const Matrix col = read_npy_matrix(dir.file("col.npy"));
  ASSERT_EQ(col.rows(), 4);
  ASSERT_EQ(col.cols(), 1);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(col(i, 0), 0.5f * i);

  const Matrix sliced = read_npy_matrix(dir.file("sliced.npy"));
  ASSERT_EQ(sliced.rows(), 3);
  ASSERT_EQ(sliced.cols(), 3);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) EXPECT_EQ(sliced(i, j), static_cast<float>(20 * i + 1 + 3 * j));
}

TEST(Npy, RejectsWhatItCannotRead) {
  REQUIRE_NUMPY();
  test::TempDir dir("npy_reject");
  ASSERT_TRUE(run_python(dir, R"PY(
a = np.arange(12, dtype=np.float32).reshape(3, 4)
np.save('f64.npy', a.astype(np.float64))
np.save('i32.npy', a.astype(np.int32))
np.save('big_endian.npy', a.astype('>f4'))
np.save('one_d.npy', np.arange(5, dtype=np.float32))
np.save('three_d.npy', np.zeros((2, 3, 4), np.float32))
np.save('scalar.npy', np.float32(1.5))
np.save('fortran.npy', np.asfortranarray(a))
np.save('good.npy', a)
data = open('good.npy', 'rb').read()
open('truncated.npy', 'wb').write(data[:-4])
open('truncated_header.npy', 'wb').write(data[:40])
open('trailing.npy', 'wb').write(data + b'\0\0\0\0')
open('bad_magic.npy', 'wb').write(b'\x93NUMPZ' + data[6:])
open('tiny.npy', 'wb').write(b'\x93NU')
open('version9.npy', 'wb').write(data[:6] + b'\x09' + data[7:])
)PY"));
  EXPECT_NO_THROW(read_npy_matrix(dir.file("good.npy")));
  struct Bad {
    const char* file;
    const char* needle;
  };
  for (const Bad b :
       {Bad{"f64.npy", "float32"}, Bad{"f64.npy", "'<f8'"}, Bad{"i32.npy", "float32"},
        Bad{"i32.npy", "'<i4'"}, Bad{"big_endian.npy", "float32"}, Bad{"one_d.npy", "dimensions"},
        Bad{"one_d.npy", "has 1 dimensions"}, Bad{"three_d.npy", "has 3 dimensions"},
        Bad{"scalar.npy", "dimensions"}, Bad{"fortran.npy", "Fortran"},
        Bad{"truncated.npy", "truncated"}, Bad{"truncated_header.npy", "truncated"},
        Bad{"trailing.npy", "beyond"}, Bad{"bad_magic.npy", "magic"}, Bad{"tiny.npy", "too short"},
        Bad{"version9.npy", "version 9"}, Bad{"missing.npy", "cannot open"}}) {
    SCOPED_TRACE(b.file);
    AIRMOE_EXPECT_THROW_MSG(read_npy_matrix(dir.file(b.file)), std::runtime_error, b.needle);
    // Every message names the file.
    AIRMOE_EXPECT_THROW_MSG(read_npy_matrix(dir.file(b.file)), std::runtime_error, b.file);
  }
}

TEST(Npy, NumPyReadsWhatWeWrite) {
  REQUIRE_NUMPY();
  test::TempDir dir("npy_write");
  const int64_t rows = 23, cols = 7;
  Matrix f(rows, cols);
  std::vector<int32_t> ints(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows * cols; ++i) {
    f.data()[i] = static_cast<float>(i) * 0.25f - 3.0f;
    ints[i] = static_cast<int32_t>(i * 7919 % 65537) - 30000;
  }
  write_npy(dir.file("f.npy"), f.data(), rows, cols);
  write_npy(dir.file("i.npy"), ints.data(), rows, cols);
  write_npy(dir.file("empty.npy"), f.data(), 0, 3);
  // The data starts on a 64-byte boundary (NumPy's own alignment).
  EXPECT_EQ((std::filesystem::file_size(dir.file("f.npy")) - rows * cols * 4) % 64, 0u);
  EXPECT_TRUE(run_python(dir, R"PY(
f = np.load('f.npy')
assert f.dtype == np.float32 and f.shape == (23, 7) and f.flags.c_contiguous, (f.dtype, f.shape)
assert np.array_equal(f, (np.arange(23 * 7, dtype=np.float32) * 0.25 - 3).reshape(23, 7))
i = np.load('i.npy')
assert i.dtype == np.int32 and i.shape == (23, 7), (i.dtype, i.shape)
assert np.array_equal(i, (np.arange(23 * 7, dtype=np.int64) * 7919 % 65537 - 30000).reshape(23, 7))
e = np.load('empty.npy')
assert e.dtype == np.float32 and e.shape == (0, 3)
)PY")) << "NumPy did not read our files back correctly";
}

// No NumPy needed: write_npy output reads back bit for bit.
TEST(Npy, RoundTripsThroughOurOwnReader) {
  test::TempDir dir("npy_roundtrip");
  const Matrix m = random_matrix(31, 17, 3.0, 9);
  write_npy(dir.file("m.npy"), m.data(), m.rows(), m.cols());
  const Matrix back = read_npy_matrix(dir.file("m.npy"));
  ASSERT_EQ(back.rows(), 31);
  ASSERT_EQ(back.cols(), 17);
  EXPECT_EQ(test::values(back), test::values(m));
  // int32 output is not a float32 matrix.
  const std::vector<int32_t> ids(6, 3);
  write_npy(dir.file("ids.npy"), ids.data(), 2, 3);
  AIRMOE_EXPECT_THROW_MSG(read_npy_matrix(dir.file("ids.npy")), std::runtime_error, "float32");
  // Unwritable path.
  AIRMOE_EXPECT_THROW_MSG(write_npy(dir.file("no/such/dir/x.npy"), m.data(), 1, 1),
                          std::runtime_error, "cannot open");
}

// Hand-made headers (no NumPy needed): a shape whose byte count overflows,
// a dimension too long for int64, a header without a shape.
void write_raw_npy(const std::string& path, const std::string& dict, size_t data_bytes) {
  std::string header = dict;
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  const char len[2] = {static_cast<char>(header.size() & 0xff),
                       static_cast<char>(header.size() >> 8)};
  out.write(len, 2);
  out << header << std::string(data_bytes, '\0');
}

TEST(Npy, RejectsImpossibleShapes) {
  test::TempDir dir("npy_shapes");
  struct Bad {
    const char* file;
    const char* dict;
    const char* needle;
  };
  for (const Bad b :
       {Bad{"overflow.npy",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }",
            "shape"},
        Bad{"overflow2.npy",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3037000500, 3037000500), }",
            "shape"},
        Bad{"huge_digit.npy",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999, 2), }",
            "shape"},
        Bad{"no_shape.npy", "{'descr': '<f4', 'fortran_order': False, }", "shape"},
        Bad{"no_descr.npy", "{'fortran_order': False, 'shape': (2, 2), }", "float32"}}) {
    SCOPED_TRACE(b.file);
    write_raw_npy(dir.file(b.file), b.dict, 16);
    AIRMOE_EXPECT_THROW_MSG(read_npy_matrix(dir.file(b.file)), std::runtime_error, b.needle);
    AIRMOE_EXPECT_THROW_MSG(read_npy_matrix(dir.file(b.file)), std::runtime_error, b.file);
  }
  // The same writer with a sane shape reads fine.
  write_raw_npy(dir.file("ok.npy"), "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
                16);
  const Matrix ok = read_npy_matrix(dir.file("ok.npy"));
  EXPECT_EQ(ok.rows(), 2);
  EXPECT_EQ(ok.cols(), 2);
}

// Issue 13: a shape with no columns (it used to load, and a router then
// looped over 10^18 rows), and headers the old reader parsed leniently or
// misreported. Each message says what is actually wrong.
TEST(Npy, RefusesZeroColumnsAndMalformedHeaders) {
  test::TempDir dir("npy_strict");
  struct Bad {
    const char* file;
    const char* dict;
    const char* needle;
  };
  for (const Bad b :
       {Bad{"no_columns.npy",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000000000, 0), }",
            "has no columns"},
        Bad{"zero_zero.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 0), }",
            "has no columns"},
        Bad{"negative.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (-64, 16), }",
            "shape entry '-64' is not a non-negative integer"},
        Bad{"tilde.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (4,~ 1), }",
            "shape entry '~ 1' is not a non-negative integer"},
        Bad{"float_dim.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (64.0, 16), }",
            "shape entry '64.0' is not a non-negative integer"},
        Bad{"hex_dim.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (0x40, 16), }",
            "shape entry '0x40' is not a non-negative integer"},
        Bad{"order_0.npy", "{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 2), }",
            "fortran_order must be True or False, got 0"},
        Bad{"no_order.npy", "{'descr': '<f4', 'shape': (2, 2), }", "header has no fortran_order"},
        Bad{"extra_key.npy",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), 'extra': 1, }",
            "unexpected key 'extra'"},
        Bad{"not_tuple.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': [2, 2], }",
            "shape must be a tuple, got [2"},
        Bad{"unclosed.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2 }",
            "shape has no closing ')'"},
        Bad{"not_dict.npy", "'descr': '<f4', 'fortran_order': False, 'shape': (2, 2)",
            "does not start with '{'"},
        Bad{"one_tuple.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }",
            "has 1 dimensions (4,)"}}) {
    SCOPED_TRACE(b.file);
    write_raw_npy(dir.file(b.file), b.dict, 16);
    AIRMOE_EXPECT_THROW_MSG(read_npy_matrix(dir.file(b.file)), std::runtime_error, b.needle);
    AIRMOE_EXPECT_THROW_MSG(read_npy_matrix(dir.file(b.file)), std::runtime_error, b.file);
  }
  // What the format allows still reads: double quotes, no trailing comma,
  // keys in any order, extra spaces.
  write_raw_npy(dir.file("ok.npy"),
                "{ \"shape\" : ( 2 ,2 ) , 'fortran_order': False,'descr':'<f4'}", 16);
  const Matrix ok = read_npy_matrix(dir.file("ok.npy"));
  EXPECT_EQ(ok.rows(), 2);
  EXPECT_EQ(ok.cols(), 2);
}

}  // namespace
}  // namespace airmoe
