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
    case Activation::kSwiglu:
      return "swiglu";
  }
  return "unknown";
}

Activation activation_from_string(const std::string& name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  if (name == "swiglu") return Activation::kSwiglu;
  fail("activation '" + name + "' is unknown (expected 'gelu', 'relu', 'silu' or 'swiglu')");
}

}  // namespace airmoe::inline ops
