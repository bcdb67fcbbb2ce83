// The k-means step over rows spread across ranks (expert centers sharded
// by the placement, or a sample of tokens split between ranks): each rank's
// statistics of its own rows, combined exactly, and the same update applied
// on every rank. Sums, counts and objective are 2^-40 fixed-point int64
// (router/codebook.h), so one integer all-reduce adds them exactly; the
// farthest member of each codeword is merged by (cosine, row id). The
// codebook that comes out is the single-process one, bit for bit, for any
// number of ranks and any split of the rows.
#pragma once

#include <cstdint>
#include <functional>

#include "comm/communicator.h"
#include "router/codebook.h"

namespace airmoe::runtime {

// Where the rows live: the rank holding row `id`, and (on that rank) its
// unit row, for the empty-codeword repair.
struct RowOwners {
  std::function<int(int32_t)> owner;
  std::function<const float*(int32_t)> local_unit_row;
};

// Collective (phase "kmeans_sync"): `local` is this rank's
// Codebook::compute_stats over its rows with their global ids; every rank
// applies the combined statistics with weight `step`. Returns the codewords
// repaired.
int64_t synced_kmeans_step(comm::Communicator& comm, Codebook& codebook, const KMeansStats& local,
                           double step, const RowOwners& rows);

}  // namespace airmoe::runtime
