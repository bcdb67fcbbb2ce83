#include "runtime/selection_bias.h"

#include <string>

#include "core/hash.h"
#include "ops/boundary.h"
#include "router/routes.h"

namespace airmoe::runtime {

Tensor agreed_bias(comm::Communicator& comm, const Compute& compute, MatrixView bias,
                   int64_t experts) {
  Tensor checked;
  comm::check_together(comm, "set_bias", [&] { checked = checked_bias(compute, bias, experts); });
  const OnHost values(compute, checked);
  const std::string digest =
      std::to_string(fnv1a64(values.as<float>(), static_cast<size_t>(experts) * sizeof(float)));
  comm::PhaseScope phase(comm, "checks");
  comm::require_same_config(comm, "bias=" + digest, "selection bias");
  return checked;
}

void agree_no_bias(comm::Communicator& comm) {
  // agreed_bias's collectives, so a rank clearing while another sets raises
  // on every rank instead of hanging.
  comm::check_together(comm, "set_bias", [] {});
  comm::PhaseScope phase(comm, "checks");
  comm::require_same_config(comm, "bias=none", "selection bias");
}

}  // namespace airmoe::runtime
