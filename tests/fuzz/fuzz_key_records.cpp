// libFuzzer target: the request-key records a rank gathers from the others
// (runtime/wire.h read_key_records), fed arbitrary bytes, and the keys it
// accepts bounding one token's shortlist. Input: byte 0 picks the bits
// (2..16), byte 1 the experts E (1..16), byte 2 the dimension d (1..16);
// the rest is the gathered records. A refusal with InternalError is a pass;
// anything else (another exception, a crash, undefined behaviour, a NaN
// bound that would drop an expert) is a finding.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <span>
#include <vector>

#include "core/errors.h"
#include "router/request_keys.h"
#include "runtime/wire.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace airmoe;
  if (size < 3) return 0;
  const int bits = 2 + data[0] % 15;
  const int64_t experts = 1 + data[1] % 16, d = 1 + data[2] % 16;
  const std::span<const char> records(reinterpret_cast<const char*>(data + 3), size - 3);
  QuantizedKeys keys;
  try {
    keys = runtime::wire::read_key_records(records, experts, d, bits);
  } catch (const InternalError&) {
    return 0;
  }
  // Accepted keys bound a unit token against every expert. Where no score
  // can overflow float32 (as the router's finite-logits check guarantees
  // for real keys), the bounds are finite, so some expert stays a contender.
  bool moderate = true;
  const double levels = (1 << (bits - 1)) - 1;
  for (int64_t e = 0; e < experts; ++e)
    moderate =
        moderate && keys.norm[e] < 1e18f && keys.error[e] < 1e18f && keys.scale[e] * levels < 1e18;
  const RequestKeys request_keys(std::move(keys));
  std::vector<float> token(static_cast<size_t>(d), 1.0f / std::sqrt(static_cast<float>(d)));
  std::vector<int32_t> all(static_cast<size_t>(experts));
  std::iota(all.begin(), all.end(), 0);
  const Contenders c =
      request_keys.contenders(MatrixView(token.data(), 1, d), 1, {}, TokenGroups{{0, 1}, {0}},
                              [&](int32_t) { return std::span<const int32_t>(all); });
  if (moderate && c.ids.empty()) std::abort();  // some expert must stay a contender
  return 0;
}
