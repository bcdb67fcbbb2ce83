// The selection bias as the runtime replicates it: every rank holds all E
// biases (experts are selected by z + b on whichever rank merges a token's
// candidates), so setting or clearing it is collective, and ranks that
// disagree must fail together rather than route differently.
#pragma once

#include <cstdint>

#include "comm/communicator.h"
#include "core/matrix.h"
#include "core/tensor.h"
#include "ops/ops.h"

namespace airmoe::runtime {

// Collective: `bias` checked on every rank (router/routes.h checked_bias; all
// raise together), then the ranks compare a digest, so a bias that differs
// between ranks fails everywhere instead of routing differently. Returns the
// checked copy on `compute`'s device. Every router the runtime replicates
// the bias into (distributed, dense-replicated) goes through here.
Tensor agreed_bias(comm::Communicator& comm, const Compute& compute, MatrixView bias,
                   int64_t experts);
// Collective: every rank clears its bias, or all raise.
void agree_no_bias(comm::Communicator& comm);

}  // namespace airmoe::runtime
