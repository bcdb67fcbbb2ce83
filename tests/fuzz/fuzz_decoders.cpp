// libFuzzer target: the decoding of every message a rank receives in one MoE
// step -- scoring requests, replies, dispatch records, combine rows, and the
// backward's output, gate and logit gradients and combine rows, and (on
// rank 0, the coordinator) a re-plan's migrating experts -- fed
// arbitrary bytes as the messages of the other ranks (ScriptedPeers).
// Input: byte 0 picks the strategy, byte 1 the job size P in 2..4 and this
// rank; the rest is the script of the peers' messages. A refusal with one of
// airmoe's error types is a pass; anything else (another exception, a crash,
// undefined behaviour) is a finding.
#include <cstddef>
#include <cstdint>

#include "core/errors.h"
#include "fuzz_layer.h"

// Inputs that once crashed are unit tests: tests/test_decoder_findings.cpp.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace airmoe;
  try {
    fuzz::scripted_step(data, size);
  } catch (const UsageError&) {
  } catch (const PeerError&) {
  } catch (const InternalError&) {
  } catch (const TransportError&) {
  }
  return 0;
}
