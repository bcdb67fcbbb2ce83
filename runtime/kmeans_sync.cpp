#include "runtime/kmeans_sync.h"

#include <algorithm>
#include <utility>
#include <vector>

namespace airmoe::runtime {

namespace {

// Sums, counts and objective in one integer all-reduce: exact, whatever P.
KMeansStats reduce_sums(comm::Communicator& comm, const KMeansStats& local, int64_t C, int64_t d) {
  KMeansStats total(C, d);
  std::vector<int64_t> buf(local.sums);
  buf.insert(buf.end(), local.counts.begin(), local.counts.end());
  buf.push_back(local.objective);
  comm.allreduce_sum(buf.data(), buf.size());
  std::copy_n(buf.begin(), C * d, total.sums.begin());
  std::copy_n(buf.begin() + C * d, C, total.counts.begin());
  total.objective = buf.back();
  return total;
}

// Each codeword's farthest member: gathered, merged by (cosine, row id).
void reduce_farthest(comm::Communicator& comm, const KMeansStats& local, KMeansStats& total,
                     int64_t C) {
  std::vector<int64_t> far(static_cast<size_t>(2 * C));
  for (int64_t c = 0; c < C; ++c) {
    far[2 * c] = local.farthest_cos[c];
    far[2 * c + 1] = local.farthest_expert[c];
  }
  std::vector<int64_t> all_far(far.size() * static_cast<size_t>(comm.size()));
  comm.allgather(far.data(), far.size() * sizeof(int64_t), all_far.data());
  for (int r = 0; r < comm.size(); ++r)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t cos = all_far[r * 2 * C + 2 * c];
      const auto id = static_cast<int32_t>(all_far[r * 2 * C + 2 * c + 1]);
      if (farther_member(cos, id, total.farthest_cos[c], total.farthest_expert[c])) {
        total.farthest_cos[c] = cos;
        total.farthest_expert[c] = id;
      }
    }
}

// Rows for empty-codeword repair, broadcast from their owners.
using RepairRow = std::pair<int32_t, std::vector<float>>;
std::vector<RepairRow> repair_rows(comm::Communicator& comm, const KMeansStats& total, int64_t d,
                                   const RowOwners& rows) {
  std::vector<RepairRow> out;
  for (const Codebook::Repair& rep : Codebook::plan_repairs(total)) {
    std::vector<float> row(static_cast<size_t>(d));
    const int owner = rows.owner(rep.expert);
    if (owner == comm.rank()) std::copy_n(rows.local_unit_row(rep.expert), d, row.data());
    comm.broadcast(row.data(), row.size() * sizeof(float), owner);
    out.emplace_back(rep.expert, std::move(row));
  }
  return out;
}

}  // namespace

int64_t synced_kmeans_step(comm::Communicator& comm, Codebook& codebook, const KMeansStats& local,
                           double step, const RowOwners& rows) {
  const int64_t C = codebook.size(), d = codebook.dim();
  comm::PhaseScope phase(comm, "kmeans_sync");
  KMeansStats total = reduce_sums(comm, local, C, d);
  reduce_farthest(comm, local, total, C);
  const std::vector<RepairRow> repairs = repair_rows(comm, total, d, rows);
  return codebook.apply(total, step, [&](int32_t e, float* out) {
    for (const auto& [id, row] : repairs)
      if (id == e) std::copy(row.begin(), row.end(), out);
  });
}

}  // namespace airmoe::runtime
