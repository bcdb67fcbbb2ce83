#include "ops/expert_ffn.h"

#include "core/checks.h"

namespace airmoe::inline ops {

const char* to_string(Activation a) {
  switch (a) {
    case Activation::kGelu:
      return "gelu";
    case Activation::kRelu:
      return "relu";
    case Activation::kSilu:
      return "silu";
  }
  return "unknown";
}

Activation activation_from_string(const std::string& name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  fail("activation '" + name + "' is unknown (expected 'gelu', 'relu' or 'silu')");
}

}  // namespace airmoe::inline ops
