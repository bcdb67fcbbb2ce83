#include "runtime/query_lists_sync.h"

#include <algorithm>
#include <numeric>

#include "core/checks.h"
#include "runtime/kmeans_sync.h"

namespace airmoe::runtime {

int SplitSample::owner(int64_t row) const {
  // The last rank starting at or before `row` (ranks with no rows start where
  // the next one does).
  return static_cast<int>(std::upper_bound(offsets.begin(), offsets.end(), row) - offsets.begin()) -
         1;
}

SplitSample split_sample(comm::Communicator& comm, MatrixView local) {
  SplitSample s{local, std::vector<int64_t>(static_cast<size_t>(comm.size()) + 1, 0)};
  const int64_t mine = local.rows;
  comm::PhaseScope phase(comm, "query_lists");
  comm.allgather(&mine, sizeof(mine), s.offsets.data() + 1);
  std::partial_sum(s.offsets.begin(), s.offsets.end(), s.offsets.begin());
  return s;
}

namespace {

// The unit rows at global indices `rows` (ascending), from the ranks that
// hold them: each rank's in rank order, which is index order.
Matrix gather_rows(comm::Communicator& comm, const SplitSample& sample, const float* local_unit,
                   const std::vector<int32_t>& rows) {
  const int64_t d = sample.local.cols, begin = sample.offsets[comm.rank()],
                end = sample.offsets[comm.rank() + 1];
  std::vector<float> mine;
  for (const int32_t row : rows)
    if (row >= begin && row < end)
      mine.insert(mine.end(), local_unit + (row - begin) * d, local_unit + (row - begin + 1) * d);
  std::vector<float> all;
  {
    comm::PhaseScope phase(comm, "query_lists");
    all = comm::allgatherv_vector<float>(comm, mine);
  }
  Matrix out(static_cast<int64_t>(rows.size()), d);
  if (all.size() != static_cast<size_t>(out.size()))
    fail("query lists: gathered " + std::to_string(all.size()) + " floats of seeding rows for " +
         std::to_string(out.size()));
  std::copy(all.begin(), all.end(), out.data());
  return out;
}

}  // namespace

Codebook train_query_codebook(comm::Communicator& comm, const SplitSample& sample,
                              const QueryListOptions& options, const Compute& compute) {
  const int64_t d = sample.local.cols, begin = sample.offsets[comm.rank()];
  const Tensor unit = normalize_rows(compute, sample.local, "query lists: sample tokens");
  const OnHost unit_host(compute, unit);
  const float* local_unit = unit_host.as<float>();
  const KMeansOptions kmeans{options.codewords, options.kmeans_iterations, options.seed};
  const Matrix seeds =
      kmeans_seeds(compute, sample.total(), kmeans, [&](const std::vector<int32_t>& rows) {
        return gather_rows(comm, sample, local_unit, rows);
      });
  Codebook codebook(seeds.view(), compute);
  std::vector<int32_t> ids(static_cast<size_t>(sample.local.rows));
  std::iota(ids.begin(), ids.end(), static_cast<int32_t>(begin));
  const RowOwners rows{[&](int32_t row) { return sample.owner(row); },
                       [&](int32_t row) { return local_unit + (row - begin) * d; }};
  for (int it = 0; it < options.kmeans_iterations; ++it)
    synced_kmeans_step(comm, codebook, codebook.compute_stats(unit, ids.data()), 1.0, rows);
  return codebook;
}

}  // namespace airmoe::runtime
