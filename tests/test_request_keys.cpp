// Request keys (router/request_keys.h): the contenders they keep hold every
// token's exact top-k (ties at the k-th included), at any bits and with a
// selection bias; a row's keys do not depend on the rows around it; and most
// of a well-separated shortlist is ruled out at 8 bits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/synthetic.h"
#include "router/request_keys.h"
#include "runtime/wire.h"
#include "test_util.h"

namespace airmoe {
namespace {

using test::clustered_data;

// Every expert a candidate of every token: one group of all of them.
struct AllExperts {
  explicit AllExperts(int64_t experts) : ids(static_cast<size_t>(experts)) {
    std::iota(ids.begin(), ids.end(), 0);
  }
  Contenders of(const RequestKeys& keys, MatrixView tokens, int k,
                std::span<const float> bias = {}) const {
    TokenGroups groups;
    for (int64_t t = 0; t < tokens.rows; ++t) {
      groups.ids.push_back(0);
      groups.offsets.push_back(t + 1);
    }
    return keys.contenders(tokens, k, bias, groups,
                           [&](int32_t) { return std::span<const int32_t>(ids); });
  }
  std::vector<int32_t> ids;
};

// Per token, the experts whose exact score z + b (double) reaches the k-th
// largest: the top-k and anything tied with its k-th.
std::vector<std::vector<int32_t>> must_keep(MatrixView centers, MatrixView tokens, int k,
                                            const std::vector<float>& bias) {
  std::vector<std::vector<int32_t>> out;
  for (int64_t t = 0; t < tokens.rows; ++t) {
    std::vector<double> z(static_cast<size_t>(centers.rows));
    for (int64_t e = 0; e < centers.rows; ++e)
      z[e] = test::dot_double(tokens.row(t), centers.row(e), centers.cols) +
             (bias.empty() ? 0.0 : bias[e]);
    std::vector<double> sorted = z;
    std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<>());
    const double kth = sorted[static_cast<size_t>(k - 1)];
    std::vector<int32_t> keep;
    for (int64_t e = 0; e < centers.rows; ++e)
      if (z[e] >= kth) keep.push_back(static_cast<int32_t>(e));
    out.push_back(keep);
  }
  return out;
}

void expect_contenders_hold(const Contenders& got, const std::vector<std::vector<int32_t>>& keep,
                            const std::string& where) {
  ASSERT_EQ(got.offsets.size(), keep.size() + 1) << where;
  for (size_t t = 0; t < keep.size(); ++t) {
    const std::span<const int32_t> c = got.of(static_cast<int64_t>(t));
    EXPECT_TRUE(std::is_sorted(c.begin(), c.end())) << where << " token " << t;
    for (int32_t e : keep[t])
      EXPECT_TRUE(std::binary_search(c.begin(), c.end(), e))
          << where << " token " << t << " lost expert " << e;
  }
}

TEST(RequestKeys, ContendersHoldTheExactTopKAtAnyBitsWithOrWithoutBias) {
  const SyntheticData data = clustered_data(300, 24, 120, 11);
  const Matrix b = random_matrix(300, 1, 3.0, 5);
  const std::vector<float> bias(b.data(), b.data() + 300);
  const int k = 6;
  for (const bool biased : {false, true}) {
    const std::vector<float> used = biased ? bias : std::vector<float>();
    const auto keep = must_keep(data.centers.view(), data.tokens.view(), k, used);
    for (int bits : {2, 3, 4, 6, 8, 12, 16}) {
      const RequestKeys keys(data.centers.view(), bits);
      const Contenders got = AllExperts(data.centers.rows()).of(keys, data.tokens.view(), k, used);
      expect_contenders_hold(got, keep, std::to_string(bits) + " bits" + (biased ? " biased" : ""));
    }
  }
}

TEST(RequestKeys, EightBitsRuleOutMostOfASeparatedShortlist) {
  const SyntheticData data = clustered_data(400, 32, 100, 3);
  const RequestKeys keys(data.centers.view(), 8);
  const Contenders got = AllExperts(400).of(keys, data.tokens.view(), 4);
  const double mean = static_cast<double>(got.ids.size()) / 100.0;
  EXPECT_LT(mean, 40.0) << "8-bit keys kept " << mean << " of 400 experts per token";
  EXPECT_GE(mean, 4.0);
  // Coarser keys bound less tightly: never fewer contenders on average.
  const Contenders coarse =
      AllExperts(400).of(RequestKeys(data.centers.view(), 2), data.tokens.view(), 4);
  EXPECT_GE(coarse.ids.size(), got.ids.size());
}

// Every center twice: exact ties everywhere, the k-th's twin included.
TEST(RequestKeys, TiesAtTheKthAreKept) {
  const SyntheticData data = clustered_data(50, 16, 60, 8);
  Matrix twice(100, 16);
  for (int64_t e = 0; e < 100; ++e) std::copy_n(data.centers.row(e % 50), 16, twice.row(e));
  for (int k : {1, 3, 4}) {
    const auto keep = must_keep(twice.view(), data.tokens.view(), k, {});
    const Contenders got = AllExperts(100).of(RequestKeys(twice.view(), 8), data.tokens.view(), k);
    expect_contenders_hold(got, keep, "k=" + std::to_string(k));
    // Twins have the same keys, so the same bounds: both kept or neither.
    for (size_t t = 0; t < keep.size(); ++t) {
      const std::span<const int32_t> c = got.of(static_cast<int64_t>(t));
      for (int32_t e : c)
        EXPECT_TRUE(std::binary_search(c.begin(), c.end(), (e + 50) % 100))
            << "k=" << k << " token " << t << " kept " << e << " without its twin";
    }
  }
}

// Token t names groups 2t and 2t + 1: {7, 3} and {7, 30, 3}, shifted by t.
TEST(RequestKeys, FewerThanKCandidatesAreAllKeptAndRepeatsCountOnce) {
  const SyntheticData data = clustered_data(40, 8, 5, 2);
  const RequestKeys keys(data.centers.view(), 8);
  TokenGroups groups;
  std::vector<std::vector<int32_t>> members;
  for (int32_t t = 0; t < 5; ++t) {
    members.push_back({7 + t, 3 + t});
    members.push_back({7 + t, 30 + t, 3 + t});
    groups.ids.insert(groups.ids.end(), {2 * t, 2 * t + 1});
    groups.offsets.push_back(2 * (t + 1));
  }
  const Contenders got = keys.contenders(data.tokens.view(), 4, {}, groups, [&](int32_t g) {
    return std::span<const int32_t>(members[static_cast<size_t>(g)]);
  });
  for (int32_t t = 0; t < 5; ++t) {
    const std::span<const int32_t> c = got.of(t);
    EXPECT_EQ(std::vector<int32_t>(c.begin(), c.end()),
              (std::vector<int32_t>{3 + t, 7 + t, 30 + t}))
        << "token " << t;
  }
}

// A row's keys are its own: the same bits quantized with any other rows
// (what makes the gathered keys the same for any P), and their error and
// norm bound the row's.
TEST(RequestKeys, RowsQuantizeOnTheirOwnAndBoundTheirError) {
  Matrix centers = random_matrix(30, 20, 1.0, 4);
  for (int64_t c = 0; c < 20; ++c) centers(7, c) = 0.0f;  // a zero row
  centers(9, 3) = 1e6f;                                   // one huge entry
  for (int bits : {2, 5, 8, 12, 16}) {
    const QuantizedKeys all = quantize_keys(centers.view(), bits);
    const QuantizedKeys part = quantize_keys(MatrixView(centers.row(10), 12, 20), bits);
    for (int64_t i = 0; i < 12; ++i) {
      EXPECT_EQ(part.scale[i], all.scale[10 + i]);
      EXPECT_EQ(part.error[i], all.error[10 + i]);
      for (int64_t c = 0; c < 20; ++c) EXPECT_EQ(part.code(i, c), all.code(10 + i, c));
    }
    const int levels = (1 << (bits - 1)) - 1;
    for (int64_t e = 0; e < 30; ++e) {
      double err2 = 0.0, err_max = 0.0, norm2 = 0.0;
      for (int64_t c = 0; c < 20; ++c) {
        const int32_t q = all.code(e, c);
        EXPECT_LE(std::abs(q), levels);
        const double err = centers(e, c) - static_cast<double>(all.scale[e]) * q;
        err2 += err * err;
        err_max = std::max(err_max, std::fabs(err));
        norm2 += static_cast<double>(centers(e, c)) * centers(e, c);
      }
      EXPECT_LE(std::sqrt(err2), all.error[e]) << "row " << e << " " << bits << " bits";
      EXPECT_LE(err_max, all.error_max[e]) << "row " << e;
      EXPECT_LE(std::sqrt(norm2), all.norm[e]) << "row " << e;
    }
    EXPECT_EQ(all.scale[7], 0.0f);
    EXPECT_EQ(all.error[7], 0.0f);
  }
}

TEST(RequestKeys, BitsOutsideTwoToSixteenAreRefusedByName) {
  const Matrix centers = random_matrix(4, 3, 1.0, 1);
  for (int bits : {-1, 0, 1, 17, 32}) {
    try {
      quantize_keys(centers.view(), bits);
      ADD_FAILURE() << bits << " bits were accepted";
    } catch (const UsageError& e) {
      EXPECT_NE(std::string(e.what()).find("request key bits = " + std::to_string(bits)),
                std::string::npos)
          << e.what();
    }
  }
}

// Keys made from old centers, with each expert's drift to the new ones:
// the contenders still hold the new centers' exact top-k; a drift that is
// not a finite nonnegative number per expert is refused.
TEST(RequestKeys, DriftKeepsStaleKeysCertain) {
  const SyntheticData data = clustered_data(300, 24, 120, 21);
  Matrix moved = random_matrix(300, 24, 0.2, 9);
  for (int64_t e = 0; e < 300; ++e)
    for (int64_t c = 0; c < 24; ++c) moved(e, c) += data.centers(e, c);
  const int k = 5;
  const auto keep = must_keep(moved.view(), data.tokens.view(), k, {});
  RequestKeys keys(data.centers.view(), 8);
  std::vector<float> drift(300);
  for (int64_t e = 0; e < 300; ++e) drift[e] = drift_norm(moved.row(e), data.centers.row(e), 24);
  keys.set_drift(drift);
  const Contenders got = AllExperts(300).of(keys, data.tokens.view(), k);
  expect_contenders_hold(got, keep, "stale keys with drift");
  EXPECT_THROW(keys.set_drift(std::vector<float>(299, 0.0f)), InternalError);
  drift[3] = -1.0f;
  EXPECT_THROW(keys.set_drift(drift), InternalError);
  drift[3] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(keys.set_drift(drift), InternalError);
}

// The gathered records (runtime/wire.h): every expert's keys back, in any
// order of the records, at 1- and 2-byte codes; a record short, an expert
// out of range or twice, a NaN field or a code beyond the bits is an
// InternalError, never a read past the end or a silently dropped expert.
TEST(RequestKeyRecords, RoundTripAndRefusals) {
  const Matrix centers = random_matrix(9, 5, 1.0, 3);
  for (int bits : {8, 12}) {
    const QuantizedKeys all = quantize_keys(centers.view(), bits);
    // Two "ranks": rows 0..3 as experts 5..8, rows 4..8 as experts 0..4.
    std::vector<char> records = runtime::wire::key_records(
        quantize_keys(MatrixView(centers.row(5), 4, 5), bits), std::vector<int32_t>{5, 6, 7, 8});
    const std::vector<char> second = runtime::wire::key_records(
        quantize_keys(MatrixView(centers.row(0), 5, 5), bits), std::vector<int32_t>{0, 1, 2, 3, 4});
    records.insert(records.end(), second.begin(), second.end());
    ASSERT_EQ(static_cast<int64_t>(records.size()), 9 * runtime::wire::key_record_bytes(5, bits));
    const QuantizedKeys back = runtime::wire::read_key_records(records, 9, 5, bits);
    for (int64_t e = 0; e < 9; ++e) {
      EXPECT_EQ(back.scale[e], all.scale[e]) << bits << " bits, expert " << e;
      EXPECT_EQ(back.error[e], all.error[e]);
      EXPECT_EQ(back.error_max[e], all.error_max[e]);
      EXPECT_EQ(back.norm[e], all.norm[e]);
      for (int64_t c = 0; c < 5; ++c) EXPECT_EQ(back.code(e, c), all.code(e, c));
    }
    std::vector<char> short_by_one(records.begin(), records.end() - 1);
    AIRMOE_EXPECT_THROW_MSG(runtime::wire::read_key_records(short_by_one, 9, 5, bits),
                            InternalError, "expected E = 9 records");
    std::vector<char> twice = records;
    const int32_t again = 5;  // record 1 (expert 6) claims expert 5
    std::memcpy(twice.data() + runtime::wire::key_record_bytes(5, bits), &again, 4);
    AIRMOE_EXPECT_THROW_MSG(runtime::wire::read_key_records(twice, 9, 5, bits), InternalError,
                            "expert 5 out of range or gathered twice");
    std::vector<char> nan_scale = records;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(nan_scale.data() + 4, &nan, 4);
    AIRMOE_EXPECT_THROW_MSG(runtime::wire::read_key_records(nan_scale, 9, 5, bits), InternalError,
                            "expert 5 has a scale, error or norm of nan");
    std::vector<char> wide = records;
    const int16_t too_big = bits <= 8 ? 0 : 32767;
    if (bits <= 8) {
      wide[20] = static_cast<char>(-128);  // beyond +-127
    } else {
      std::memcpy(wide.data() + 20, &too_big, 2);  // beyond +-2047 at 12 bits
    }
    AIRMOE_EXPECT_THROW_MSG(runtime::wire::read_key_records(wide, 9, 5, bits), InternalError,
                            "beyond " + std::to_string(bits) + " bits");
    std::vector<char> outside = records;
    const int32_t nine = 9;
    std::memcpy(outside.data(), &nine, 4);
    AIRMOE_EXPECT_THROW_MSG(runtime::wire::read_key_records(outside, 9, 5, bits), InternalError,
                            "expert 9 out of range");
  }
}

}  // namespace
}  // namespace airmoe
