// The statistics of one spherical k-means assignment pass (what the
// distributed runtime all-reduces): per codeword the sum of its members'
// unit rows, their count, and its farthest member; the objective. Sums are
// kept in 2^-40 fixed point in int64, so stats from disjoint sets of rows add
// up exactly (integer addition is associative): the result does not depend
// on how rows were split over threads, ranks or devices, nor on the order in
// which partial stats arrive. 2^40 leaves room for 2^22 members per
// codeword; the quantum (1e-12) is far below float precision.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/hd.h"

namespace airmoe::inline ops {

struct KMeansStats {
  int64_t codewords = 0;
  int64_t dim = 0;
  std::vector<int64_t> sums;    // [C, d], fixed point: value * 2^40
  std::vector<int64_t> counts;  // [C]
  int64_t objective = 0;        // sum of cos(expert, its codeword), fixed point
  // Per codeword, the member farthest from it (lowest cosine, then lower
  // expert id): the point an empty codeword is moved to when this cluster is
  // split. -1 when the codeword has no member.
  std::vector<int64_t> farthest_cos;     // fixed point
  std::vector<int32_t> farthest_expert;  // global expert id

  KMeansStats() = default;
  KMeansStats(int64_t codewords, int64_t dim);
  KMeansStats& operator+=(const KMeansStats& other);
  int64_t experts() const;
  double mean_objective() const;  // mean cosine over all experts counted

  static constexpr double kScale = 1099511627776.0;  // 2^40
};

// x in 2^-40 fixed point, rounded to nearest (ties away from zero).
AIRMOE_HD inline int64_t to_fixed(double x) {
  return llround(x * KMeansStats::kScale);
}

// Whether member (cos, id) replaces (best_cos, best_id) as a codeword's
// farthest: a lower cosine, then a lower id; id -1 is no member.
AIRMOE_HD inline bool farther_member(int64_t cos, int32_t id, int64_t best_cos, int32_t best_id) {
  return id >= 0 && (best_id < 0 || cos < best_cos || (cos == best_cos && id < best_id));
}

}  // namespace airmoe::inline ops
