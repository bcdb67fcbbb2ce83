// libFuzzer target: the checkpoint reader. Byte 0 says what the rest is:
// bit 0 clear, a manifest; set, a shard file. With bit 1 set the harness
// rewrites the file's trailing checksum to match its bytes, so that the
// fuzzer reaches the checks behind the checksum. A manifest that decodes
// goes on through what load_checkpoint builds from it (codebook, lists,
// placement, and the segments of its query lists). A refusal with one of airmoe's error types is a
// pass.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/errors.h"
#include "core/hash.h"
#include "router/codebook.h"
#include "router/inverted_lists.h"
#include "router/spilled_lists.h"
#include "runtime/checkpoint.h"
#include "runtime/placement.h"

namespace {

void read_manifest_bytes(const std::vector<char>& bytes) {
  using namespace airmoe;
  const runtime::CheckpointManifest m = runtime::decode_manifest(bytes, "fuzz manifest");
  const Codebook codebook = Codebook::from_unit_rows(m.codebook.view());
  const InvertedLists lists(m.assignment, codebook.size());
  runtime::Placement placement(m.ranks, m.owners, lists);
  (void)placement.local_experts(0);
  if (m.query) {
    const ListSegments segments(m.query->membership.offsets, m.query->membership.lists,
                                codebook.size());
    (void)segments.entries();
    placement.refresh(m.query->membership);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace airmoe;
  if (size < 1) return 0;
  std::vector<char> bytes(data + 1, data + size);
  if ((data[0] & 2) && bytes.size() >= 8) {
    const uint64_t h = fnv1a64(bytes.data(), bytes.size() - 8);
    std::memcpy(bytes.data() + bytes.size() - 8, &h, 8);
  }
  try {
    if (data[0] & 1)
      runtime::decode_shard(
          bytes, "fuzz shard",
          (data[0] & 4) ? runtime::Activation::kSwiglu : runtime::Activation::kGelu);
    else
      read_manifest_bytes(bytes);
  } catch (const UsageError&) {
  } catch (const InternalError&) {
  }
  return 0;
}
