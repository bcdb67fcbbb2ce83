// libFuzzer target: the decoding of every message a rank receives in one MoE
// step -- scoring requests, replies, dispatch records, combine rows, and the
// backward's output, gate and logit gradients and combine rows -- fed
// arbitrary bytes as the messages of the other ranks (ScriptedPeers).
// Input: byte 0 picks the strategy, byte 1 the job size P in 2..4 and this
// rank; the rest is the script of the peers' messages. A refusal with one of
// airmoe's error types is a pass; anything else (another exception, a crash,
// undefined behaviour) is a finding.
#include <cstddef>
#include <cstdint>

#include "core/errors.h"
#include "fuzz_layer.h"
#include "scripted_peers.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace airmoe;
  if (size < 2) return 0;
  const auto strategy = static_cast<runtime::Strategy>(data[0] % 3);
  const int ranks = 2 + data[1] % 3;
  const int me = (data[1] / 3) % ranks;
  fuzz::ScriptedPeers comm(ranks, me, {data + 2, size - 2});
  try {
    fuzz::FuzzLayer::get().step(comm, strategy);
  } catch (const UsageError&) {
  } catch (const PeerError&) {
  } catch (const InternalError&) {
  } catch (const TransportError&) {
  }
  return 0;
}
