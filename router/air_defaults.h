// The codebook size and probe count AIR starts from when the caller gives
// none, as a function of E, from the measured table in docs/routing.md
// ("Choosing C and m"): C = sqrt(E) rounded to a power of two, and the
// smallest m that reached recall@8 >= 0.95 on the benchmark's default data
// at that (E, C). Learned routers cluster less; measure yours
// (airmoe_bench router --centers ... --tokens ...) and raise m.
#pragma once

#include <cstdint>

namespace airmoe::inline router {

struct AirDefaults {
  int64_t codewords;  // C
  int probes;         // m
};

// E >= 1. C is at most E.
AirDefaults recommended_air(int64_t experts);

}  // namespace airmoe::inline router
