// The one ranking every router uses: a higher logit first, and on equal
// logits the lower expert id. Dense, AIR, product keys, FAISS comparisons and
// the references all break ties this way, so their answers can be compared
// entry by entry. Per-element code, the same on every backend (AIRMOE_HD).
#pragma once

#include <cmath>
#include <cstdint>

#include "core/hd.h"

namespace airmoe::inline ops {

AIRMOE_HD inline bool ranks_before(float za, int32_t ia, float zb, int32_t ib) {
  return za > zb || (za == zb && ia < ib);
}

// The best k (logit, id) pairs pushed so far, best first, in caller memory.
// Empty slots hold id -1 and logit -inf.
//
// With a selection bias (DeepSeek-V3's auxiliary-loss-free balancing; bias
// f32 [E] by expert id, contiguous), entries rank by the selection score
// z + bias[id], one float addition recomputed at every compare (so always
// the same bits), while the slots keep the unbiased logit z: the gates are
// formed from z. Without one (nullptr) the score is z itself.
class TopK {
 public:
  AIRMOE_HD TopK(int k, float* logits, int32_t* ids, const float* bias = nullptr)
      : k_(k), logits_(logits), ids_(ids), bias_(bias) {
    for (int i = 0; i < k_; ++i) {
      logits_[i] = -INFINITY;
      ids_[i] = -1;
    }
  }

  // Any order of ids.
  AIRMOE_HD void push(float z, int32_t id) {
    if (size_ == k_ && !ranks_before(score(z, id), id, worst(), ids_[k_ - 1])) return;
    insert(z, id);
  }

  // push, but an id the slots already hold is not taken again (the same
  // expert scored in two lists: the same logit, so which copy stays does
  // not matter). Only an entry that would be inserted looks for its id.
  AIRMOE_HD void push_unique(float z, int32_t id) {
    if (size_ == k_ && !ranks_before(score(z, id), id, worst(), ids_[k_ - 1])) return;
    for (int i = 0; i < size_; ++i)
      if (ids_[i] == id) return;
    insert(z, id);
  }

  // Ids must arrive in increasing order: then an equal score never displaces
  // an earlier entry, and the common case is a single compare.
  AIRMOE_HD void push_ascending(float z, int32_t id) {
    if (size_ == k_ && !(score(z, id) > worst())) return;
    insert(z, id);
  }

  AIRMOE_HD int size() const { return size_; }
  // The selection score of the last slot (only meaningful when full).
  AIRMOE_HD float worst() const { return score(logits_[k_ - 1], ids_[k_ - 1]); }
  AIRMOE_HD float score(float z, int32_t id) const { return bias_ ? z + bias_[id] : z; }

 private:
  AIRMOE_HD void insert(float z, int32_t id) {
    int pos = size_ < k_ ? size_++ : k_ - 1;
    const float s = score(z, id);
    while (pos > 0 && ranks_before(s, id, score(logits_[pos - 1], ids_[pos - 1]), ids_[pos - 1])) {
      logits_[pos] = logits_[pos - 1];
      ids_[pos] = ids_[pos - 1];
      --pos;
    }
    logits_[pos] = z;
    ids_[pos] = id;
  }

  int k_;
  int size_ = 0;
  float* logits_;
  int32_t* ids_;
  const float* bias_;
};

}  // namespace airmoe::inline ops
