// Query-aware inverted lists (issue 19): a codebook trained on the tokens,
// and each codeword's list the experts that its tokens' exact (biased) top-k
// picks most. Lists built from the centers alone (router/air_router.h) rank
// experts by the direction of their keys, which cannot see the key norms or
// a selection bias that decide a balanced router's winners; these lists are
// made of the winners themselves (docs/routing.md, "First-stage options").
//
// Building them is split like the k-means update (router/codebook.h) so that
// it can be distributed: count_picks() over any part of the sample gives
// int64 PickCounts; counts of disjoint parts add up (operator+=) to those of
// the whole exactly, whatever the split (a caller all-reduces data()); and
// lists_from_counts() turns the total into the lists deterministically.
//
// The lists overlap (an expert may sit in many lists); stage 2 scores each
// distinct expert of the probed lists once (router/spilled_lists.h
// ListSegments). Every expert sits in at least one list, so probing every
// list equals dense routing.
#pragma once

#include <cstdint>
#include <vector>

#include "core/matrix.h"
#include "ops/boundary.h"
#include "router/codebook.h"
#include "router/dense_router.h"

namespace airmoe::inline router {

struct QueryListOptions {
  int64_t codewords = 256;    // C: the token codebook's size
  int64_t list_length = 256;  // L: most-picked experts per list, in [1, E]
  int k = 8;                  // the exact top-k whose picks are counted
  int kmeans_iterations = 10;
  uint64_t seed = 1234;
};

// How often each expert is in the exact top-k of the sample tokens nearest
// each codeword: [C, E] row-major int64.
class PickCounts {
 public:
  PickCounts(int64_t codewords, int64_t experts);
  int64_t codewords() const { return codewords_; }
  int64_t experts() const { return experts_; }
  int64_t at(int64_t c, int64_t e) const { return counts_[c * experts_ + e]; }
  // The counts as one buffer, for an all-reduce (sum).
  std::vector<int64_t>& data() { return counts_; }
  const std::vector<int64_t>& data() const { return counts_; }
  // Adds counts of the same shape (throws otherwise).
  PickCounts& operator+=(const PickCounts& other);

 private:
  int64_t codewords_, experts_;
  std::vector<int64_t> counts_;
};

// The checks of a (part of a) sample: finite rows of nonzero norm (an
// empty part passes), naming the row. The distributed runtime runs them
// on each rank's part before any data moves.
void check_sample_rows(MatrixView tokens);
// The options against E experts and a sample of `tokens` tokens in all:
// k and L in [1, E], C in [1, tokens], iterations >= 0.
void check_query_options(const QueryListOptions& options, int64_t experts, int64_t tokens);

// The codebook of the query lists: spherical k-means on the sample tokens
// (router/codebook.h train_codebook; C <= tokens). Throws, naming the row, on
// a token that is not finite or has zero norm.
Codebook train_query_codebook(MatrixView tokens, const QueryListOptions& options,
                              Compute compute = host_compute());

// The count step over (a part of) the sample: each token's nearest codeword
// and its exact top-k from `exact` (dense routing, with the router's bias if
// it has one) add one pick per chosen expert.
PickCounts count_picks(const Codebook& codebook, const DenseRouter& exact, MatrixView tokens,
                       int k);

// The same count from routes computed elsewhere: `exact` must be the exact
// (biased) top-k of `tokens` over all `experts` (the distributed runtime
// routes its part of the sample probing every list, which is exact).
PickCounts count_routed_picks(const Codebook& codebook, MatrixView tokens, const Routes& exact,
                              int64_t experts);

// Each expert's lists, CSR over experts, in priority order: the list that
// picks it most first (then lower list id). What ListSegments takes.
struct ListMembership {
  std::vector<int64_t> offsets;  // [E + 1]
  std::vector<int32_t> lists;
  int64_t list_count = 0;  // C

  int64_t experts() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t entries() const { return static_cast<int64_t>(lists.size()); }
};

// The build step, deterministic in the total counts: list c holds the (at
// most) `list_length` experts its tokens picked most, ties to the lower
// expert id, experts never picked by its tokens left out; an expert no list
// took goes to list home[e] (its center's nearest codeword), so every expert
// sits in at least one list.
ListMembership lists_from_counts(const PickCounts& counts, int64_t list_length,
                                 const std::vector<int32_t>& home);

// Everything an AirRouter needs to route with query lists.
struct QueryLists {
  QueryListOptions options;
  Codebook codebook;  // trained on the tokens
  ListMembership membership;
  double build_flops = 0.0;  // what building them cost (query_lists_build_flops)
};

// Trains the codebook on `tokens`, routes them exactly against `centers`
// (with `bias` as the selection bias when it is not empty) and builds the
// lists: the single-process form of the steps above. Throws on an empty
// sample, k outside [1, E], a list length outside [1, E], C outside [1, T],
// or a token that is not finite (naming its row).
QueryLists build_query_lists(MatrixView centers, TensorView bias, MatrixView tokens,
                             const QueryListOptions& options, Compute compute = host_compute());

// The FLOPs of building query lists from `tokens` sample tokens: the exact
// routing of the sample (2 E d each), the k-means on it (k-means++ seeding
// on at most 8 C of them, then one assignment pass per iteration) and the
// assignment of the sample to the trained codewords (2 C d each).
double query_lists_build_flops(int64_t tokens, int64_t experts, int64_t dim,
                               const QueryListOptions& options);

}  // namespace airmoe::inline router
