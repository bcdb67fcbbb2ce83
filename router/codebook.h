// The spherical k-means codebook over normalized expert centers: training
// (k-means++ seeding on the sphere, Lloyd iterations, empty-codeword repair)
// and the adaptive update a training loop runs as the centers move.
//
// The update is split in two so that it can be distributed: compute_stats()
// over any subset of the experts gives a KMeansStats; stats from disjoint
// subsets add up (operator+=) to the stats of their union, exactly; apply()
// turns the total into the new codebook. Sums are kept in 2^-40 fixed point
// in int64, so addition is exact and associative: the result does not depend
// on how experts were split or in which order partial stats were added.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "core/matrix.h"
#include "core/tensor.h"
#include "ops/boundary.h"
#include "ops/kmeans_stats.h"

namespace airmoe::inline router {

// Unit-norm copy of `rows`; throws if a row has zero norm or is not finite
// ("<what> row R has zero norm"). The host form, and the same on the ops'
// device (a tensor there).
Matrix normalize_rows(MatrixView rows, const char* what);
Tensor normalize_rows(const Compute& compute, TensorView rows, const char* what);

// The codewords live on the ops' device the codebook is built with (host by
// default); the host algorithms over them (the capped assignment, the
// update) call the ops for their scoring.
class Codebook {
 public:
  Codebook() = default;
  // Rows are normalized; throws on zero-norm or non-finite rows.
  explicit Codebook(MatrixView codewords, Compute compute = host_compute());
  // Codewords that are unit rows already (a checkpoint's), kept bit for bit:
  // normalizing them again may move their last bits and so the routing.
  // Throws on a non-finite row or one whose norm is not 1 within 1e-3.
  static Codebook from_unit_rows(MatrixView unit_codewords, Compute compute = host_compute());
  Codebook(const Codebook& other);
  Codebook& operator=(const Codebook& other);
  Codebook(Codebook&&) = default;
  Codebook& operator=(Codebook&&) = default;

  int64_t size() const { return codewords_.rows(); }
  int64_t dim() const { return codewords_.cols(); }
  const Compute& compute() const { return compute_; }
  // Later calls run on `stream` (the caller's CUDA stream; the host ignores it).
  void set_stream(Stream stream) { compute_.stream = stream; }
  // The unit codewords [C, d] on the ops' device; as a MatrixView only with
  // host ops.
  TensorView tensor() const { return codewords_; }
  MatrixView codewords() const { return codewords_.view().matrix(); }

  // Nearest codeword (highest inner product, then lower index) of each row.
  std::vector<int32_t> assign(TensorView unit_rows) const;

  // Like assign, but no list gets more than `cap` members: experts are
  // placed in order of their best score (highest first, then lower id), and an
  // expert whose nearest list is full takes its best list with room.
  std::vector<int32_t> assign_capped(TensorView unit_rows, int64_t cap) const;

  // Statistics of one assignment pass over unit-norm rows. `expert_ids`
  // (host memory) gives each row's global expert id (nullptr: the row index).
  KMeansStats compute_stats(TensorView unit_rows, const int32_t* expert_ids = nullptr) const;

  // One step: mu_c <- normalize((1 - step) mu_c + step * normalize(sum_c)).
  // step = 1 is a Lloyd step. Empty codewords are repaired by splitting the
  // largest clusters: each takes its cluster's farthest member, whose unit
  // row `unit_row_of(expert_id, out)` must write. Returns the number repaired.
  using RowLookup = std::function<void(int32_t, float*)>;
  int64_t apply(const KMeansStats& stats, double step, const RowLookup& unit_row_of);

  // The repairs apply() will make: (empty codeword, expert whose unit row it
  // takes). A distributed caller fetches those rows from their owners first.
  struct Repair {
    int32_t codeword;
    int32_t expert;
  };
  static std::vector<Repair> plan_repairs(const KMeansStats& stats);

 private:
  Compute compute_ = host_compute();
  Tensor codewords_;
};

struct KMeansOptions {
  int64_t codewords = 256;
  int iterations = 20;
  uint64_t seed = 1234;
};

struct KMeansReport {
  std::vector<double> objective;  // mean cosine after each assignment pass
  int64_t repaired = 0;           // empty codewords repaired over all iterations
};

// The seeding train_codebook starts with, over n unit rows held anywhere:
// a seeded sample of at most 8 C row indices (ascending), whose unit rows
// rows_at(indices) returns ([indices, d] on the host), then k-means++ on
// them. The distributed runtime gathers the sampled rows from the ranks
// holding them, so its seeds are the single-process ones whatever P.
using SampleRows = std::function<Matrix(const std::vector<int32_t>&)>;
Matrix kmeans_seeds(const Compute& compute, int64_t n, const KMeansOptions& options,
                    const SampleRows& rows_at);

// Trains a codebook on the expert centers (any norms; rows are normalized),
// on the given ops.
Codebook train_codebook(MatrixView centers, const KMeansOptions& options,
                        KMeansReport* report = nullptr, Compute compute = host_compute());

// `updates` adaptive steps on new centers (one assignment pass each): what a
// training loop calls after the optimizer moved W. Single-process form of
// compute_stats + apply.
void adaptive_update(Codebook& codebook, MatrixView centers, double step, int updates = 1);

}  // namespace airmoe::inline router
