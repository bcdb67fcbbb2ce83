#include "router/list_scan.h"

#include <string>

#include "core/checks.h"

namespace airmoe::inline router {

Tensor list_sizes(const Compute& compute, const InvertedLists& lists) {
  std::vector<int64_t> sizes(static_cast<size_t>(lists.lists()));
  for (int64_t c = 0; c < lists.lists(); ++c) sizes[c] = lists.list_size(c);
  return device_vector(compute, sizes);
}

ProbeSelection select_probes(const Codebook& codebook, const InvertedLists& lists,
                             MatrixView tokens, int k, int probes) {
  if (lists.lists() != codebook.size())
    fail("select_probes: the inverted lists have " + std::to_string(lists.lists()) +
         " lists, the codebook " + std::to_string(codebook.size()) + " codewords");
  require_cols(tokens, codebook.dim(), "tokens");
  require_in_range(k, 1, lists.experts(), "k");
  // More probes than codewords probes every list (load estimates ask for a
  // fixed m whatever C); fewer than one selects nothing and is an error.
  if (probes < 1) fail("probes m = " + std::to_string(probes) + " must be >= 1");
  const Compute& compute = codebook.compute();
  const ProbeSet set =
      compute.ops->select_probes(Staged(compute, tokens), codebook.tensor(),
                                 list_sizes(compute, lists), probes, k, compute.stream);
  ProbeSelection sel;
  sel.offsets = host_vector<int64_t>(compute, set.offsets);
  sel.codewords = host_vector<int32_t>(compute, set.codewords);
  sel.shortlist_size = host_vector<int32_t>(compute, set.shortlist_size);
  return sel;
}

}  // namespace airmoe::inline router
