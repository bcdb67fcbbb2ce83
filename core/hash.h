// 64-bit FNV-1a: a fixed hash, so every rank and every build hashes the same
// bytes alike. Used to compare configurations and replicated state across
// ranks, never for security.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace airmoe::inline core {

inline constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;

inline uint64_t fnv1a64(const void* data, size_t bytes, uint64_t h = kFnvOffset) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h;
}

inline uint64_t fnv1a64(std::string_view s, uint64_t h = kFnvOffset) {
  return fnv1a64(s.data(), s.size(), h);
}

}  // namespace airmoe::inline core
