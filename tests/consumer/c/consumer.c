/* Uses the installed C API (found through CMake or pkg-config): a dense and
 * an AIR router over the same centers must pick the same experts when AIR
 * probes every list. */
#include <airmoe.h>
#include <stdio.h>
#include <string.h>

#define E 256
#define D 16
#define T 8
#define K 4
#define C 8

int main(void) {
  static float centers[E * D], tokens[T * D];
  int32_t ids_air[T * K], ids_dense[T * K];
  float gates_air[T * K], gates_dense[T * K];
  airmoe_router *air = NULL, *dense = NULL;
  int major = -1, minor = -1, patch = -1;
  unsigned state = 12345u;
  for (int i = 0; i < E * D; ++i)
    centers[i] = (float)((state = state * 1103515245u + 12345u) >> 8) / 16777216.0f - 0.5f;
  for (int i = 0; i < T * D; ++i)
    tokens[i] = (float)((state = state * 1103515245u + 12345u) >> 8) / 16777216.0f - 0.5f;
  if (airmoe_version(&major, &minor, &patch) != AIRMOE_OK || major != AIRMOE_VERSION_MAJOR ||
      minor != AIRMOE_VERSION_MINOR || patch != AIRMOE_VERSION_PATCH) {
    fprintf(stderr, "consumer_c: library version %d.%d.%d, header %s\n", major, minor, patch,
            AIRMOE_VERSION_STRING);
    return 1;
  }
  if (airmoe_router_create_air(centers, E, D, C, 5, 7, &air) != AIRMOE_OK ||
      airmoe_router_create_dense(centers, E, D, &dense) != AIRMOE_OK ||
      airmoe_router_route(air, tokens, T, D, K, C, ids_air, gates_air) != AIRMOE_OK ||
      airmoe_router_route(dense, tokens, T, D, K, 1, ids_dense, gates_dense) != AIRMOE_OK) {
    fprintf(stderr, "consumer_c: %s\n", airmoe_last_error());
    return 1;
  }
  if (memcmp(ids_air, ids_dense, sizeof ids_air) != 0) {
    fprintf(stderr, "consumer_c: AIR with m = C differs from dense routing\n");
    return 1;
  }
  airmoe_router_free(air);
  airmoe_router_free(dense);
  printf("consumer_c: airmoe %s, %d tokens routed\n", AIRMOE_VERSION_STRING, T);
  return 0;
}
