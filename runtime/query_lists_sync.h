// The token-trained codebook of query lists (router/query_lists.h) over a
// sample split between ranks: the whole sample is every rank's part in rank
// order, and the codebook is train_query_codebook's on it, bit for bit,
// whatever P and however the sample is split. The k-means++ seeding sample
// (at most 8 C rows, the same indices on every rank) is gathered from the
// ranks holding it; each Lloyd step's statistics are all-reduced
// (runtime/kmeans_sync.h), with the rows' global indices as their ids.
#pragma once

#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "core/matrix.h"
#include "router/codebook.h"
#include "router/query_lists.h"

namespace airmoe::runtime {

// This rank's part of a split sample and where every part sits in the whole.
struct SplitSample {
  MatrixView local;
  std::vector<int64_t> offsets;  // [P + 1]: rank r holds rows offsets[r] .. offsets[r + 1]

  int64_t total() const { return offsets.back(); }
  // The rank holding global row `row`.
  int owner(int64_t row) const;
};

// Collective: the parts' sizes gathered.
SplitSample split_sample(comm::Communicator& comm, MatrixView local);

// Collective: the options checked (check_query_options with T = the whole
// sample) and the rows checked by the caller beforehand (check_sample_rows).
Codebook train_query_codebook(comm::Communicator& comm, const SplitSample& sample,
                              const QueryListOptions& options, const Compute& compute);

}  // namespace airmoe::runtime
