/* Test of the C API (capi/airmoe.h), written in C99 and compiled as C.
 *
 * Data: small seeded sets whose entries are multiples of 1/8 in [-1, 1], so
 * every logit <w_e, h> is computed exactly in float and in double alike and
 * equal logits (ties) really occur: the reference below is exact, and the
 * library must break ties to the lower expert id as it does.
 *
 * Checked:
 *  - AIR routing with probes = codewords equals dense routing bit for bit,
 *    and both equal a brute-force top-k computed here in double (ties to the
 *    lower id), gates within 1e-5 of a double softmax over the chosen k;
 *  - AIR with few probes returns k distinct valid experts, best first;
 *  - backward: d_tokens and d_centers against the closed form in double
 *    (dz = g * (dg - sum g dg), dL/dh = sum_j dz_j w_j, dL/dw_j += dz_j h)
 *    within 1e-4; AIR and dense backward agree bit for bit;
 *  - update_codebook on moved centers, then routing again exact;
 *  - T = 0; error paths: NULL arguments, k = 0, probes > codewords, NaN in
 *    tokens, wrong dim, backward without routes or with another T, dense
 *    update_codebook, bad step; each a non-OK status whose
 *    airmoe_last_error() names the problem; the message survives a later
 *    successful call;
 *  - since 0.2.0, a selection bias and sigmoid gates: selection by z + b,
 *    gates from z, AIR (probes = C) == dense, bad biases and modes refused;
 *  - the MPI communicator from MPI_COMM_WORLD: rank, size, an all-reduce and
 *    its metered traffic; before MPI_Init_thread, an AIRMOE_ERR_RUNTIME whose
 *    message says to call MPI_Init_thread;
 *  - handles: use after free, double free, a handle of the other type and a
 *    pointer that never was a handle are refused with the function's name;
 *    expert counts beyond int32 ids and tokens whose logits overflow float32
 *    are refused.
 * Runs on any number of MPI ranks (every rank runs every check). The last
 * line, printed by rank 0, is "capi: N passed, M failed" summed over ranks;
 * the exit status is nonzero on every rank if any check failed anywhere. */
#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "airmoe.h"

static int g_passed = 0;
static int g_failed = 0;
static int g_rank = 0;

static void check(int ok, const char* what, int line) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    fprintf(stderr, "[rank %d] test_capi.c:%d: FAILED: %s\n", g_rank, line, what);
  }
}
#define CHECK(cond) check((cond) != 0, #cond, __LINE__)

/* A failed call: status `want`, and the last error contains `needle`. */
static void check_error(airmoe_status got, airmoe_status want, const char* needle, int line) {
  const char* msg = airmoe_last_error();
  char what[512];
  snprintf(what, sizeof what, "status %s (want %s), message \"%s\" (want it to contain \"%s\")",
           airmoe_status_name(got), airmoe_status_name(want), msg ? msg : "(null)", needle);
  check(got == want && msg != NULL && strstr(msg, needle) != NULL, what, line);
}
#define CHECK_ERROR(call, want, needle) check_error((call), (want), (needle), __LINE__)

static void check_ok(airmoe_status got, const char* call, int line) {
  char what[512];
  snprintf(what, sizeof what, "%s returned %s: %s", call, airmoe_status_name(got),
           got == AIRMOE_OK ? "" : airmoe_last_error());
  check(got == AIRMOE_OK, what, line);
}
#define CHECK_OK(call) check_ok((call), #call, __LINE__)

/* ------------------------------------------------------------- data --- */

static uint64_t g_lcg = 0;

static uint32_t lcg_next(void) {
  g_lcg = g_lcg * 6364136223846793005ULL + 1442695040888963407ULL;
  return (uint32_t)(g_lcg >> 33);
}

/* A multiple of 1/8 in [-1, 1]. */
static float dyadic(void) {
  return (float)((int)(lcg_next() % 17u) - 8) / 8.0f;
}

/* rows x cols of dyadic values, no zero row (routers reject zero centers). */
static float* random_matrix(int64_t rows, int64_t cols) {
  float* m = (float*)malloc((size_t)(rows * cols) * sizeof(float));
  if (!m) abort();
  for (int64_t r = 0; r < rows; ++r) {
    int nonzero = 0;
    for (int64_t c = 0; c < cols; ++c) {
      m[r * cols + c] = dyadic();
      nonzero |= m[r * cols + c] != 0.0f;
    }
    if (!nonzero) m[r * cols] = 0.5f;
  }
  return m;
}

/* ------------------------------------------------ double reference --- */

static double dot(const float* a, const float* b, int64_t d) {
  double s = 0.0;
  for (int64_t j = 0; j < d; ++j) s += (double)a[j] * (double)b[j];
  return s;
}

/* Exact top-k of tokens . centers^T (ties to the lower id) and the softmax
 * over the chosen k, in double. */
static void reference_route(const float* tokens, int64_t T, const float* centers, int64_t E,
                            int64_t d, int k, int32_t* experts, double* gates) {
  double* z = (double*)malloc((size_t)E * sizeof(double));
  char* taken = (char*)malloc((size_t)E);
  if (!z || !taken) abort();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) {
      z[e] = dot(tokens + t * d, centers + e * d, d);
      taken[e] = 0;
    }
    double zk[64];
    for (int j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || z[e] > z[best])) best = e; /* strict: lower id wins ties */
      taken[best] = 1;
      experts[t * k + j] = (int32_t)best;
      zk[j] = z[best];
    }
    double sum = 0.0;
    for (int j = 0; j < k; ++j) sum += exp(zk[j] - zk[0]);
    for (int j = 0; j < k; ++j) gates[t * k + j] = exp(zk[j] - zk[0]) / sum;
  }
  free(z);
  free(taken);
}

/* Closed-form backward of the chosen-k softmax gates, in double. */
static void reference_backward(const float* tokens, int64_t T, const float* centers, int64_t E,
                               int64_t d, int k, const int32_t* experts, const double* gates,
                               const float* d_gates, double* d_tokens, double* d_centers) {
  memset(d_tokens, 0, (size_t)(T * d) * sizeof(double));
  memset(d_centers, 0, (size_t)(E * d) * sizeof(double));
  for (int64_t t = 0; t < T; ++t) {
    double weighted = 0.0;
    for (int j = 0; j < k; ++j) weighted += gates[t * k + j] * d_gates[t * k + j];
    for (int j = 0; j < k; ++j) {
      const double dz = gates[t * k + j] * (d_gates[t * k + j] - weighted);
      const int64_t e = experts[t * k + j];
      for (int64_t c = 0; c < d; ++c) {
        d_tokens[t * d + c] += dz * centers[e * d + c];
        d_centers[e * d + c] += dz * tokens[t * d + c];
      }
    }
  }
}

static double max_abs_diff(const float* a, const double* b, int64_t n) {
  double m = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double diff = fabs((double)a[i] - b[i]);
    if (!(diff <= m)) m = diff; /* a NaN wins */
  }
  return m;
}

/* Routes of `router` equal the exact reference: experts exactly, gates to 1e-5. */
static void check_exact(const int32_t* experts, const float* gates, const float* tokens, int64_t T,
                        const float* centers, int64_t E, int64_t d, int k, const char* what,
                        int line) {
  int32_t* ref_e = (int32_t*)malloc((size_t)(T * k) * sizeof(int32_t));
  double* ref_g = (double*)malloc((size_t)(T * k) * sizeof(double));
  if (!ref_e || !ref_g) abort();
  reference_route(tokens, T, centers, E, d, k, ref_e, ref_g);
  char msg[256];
  snprintf(msg, sizeof msg, "%s: experts equal the exact double top-k", what);
  check(memcmp(experts, ref_e, (size_t)(T * k) * sizeof(int32_t)) == 0, msg, line);
  snprintf(msg, sizeof msg, "%s: gates within 1e-5 of the double softmax (max diff %.3g)", what,
           max_abs_diff(gates, ref_g, T * k));
  check(max_abs_diff(gates, ref_g, T * k) <= 1e-5, msg, line);
  free(ref_e);
  free(ref_g);
}

/* Number of tokens with two equal logits among their best k + 1 (a tie
 * within the chosen k or at its boundary): shows the data exercises the
 * tie-breaking rule. */
static int64_t count_ties(const float* tokens, int64_t T, const float* centers, int64_t E,
                          int64_t d, int k) {
  int32_t* top = (int32_t*)malloc((size_t)(T * (k + 1)) * sizeof(int32_t));
  double* gates = (double*)malloc((size_t)(T * (k + 1)) * sizeof(double));
  if (!top || !gates) abort();
  reference_route(tokens, T, centers, E, d, k + 1, top, gates);
  int64_t ties = 0;
  for (int64_t t = 0; t < T; ++t) {
    int tie = 0;
    for (int j = 1; j <= k; ++j)
      tie |= dot(tokens + t * d, centers + (int64_t)top[t * (k + 1) + j - 1] * d, d) ==
             dot(tokens + t * d, centers + (int64_t)top[t * (k + 1) + j] * d, d);
    ties += tie;
  }
  free(top);
  free(gates);
  return ties;
}

/* ------------------------------------------------------------ tests --- */

enum { E = 48, D = 12, T = 40, K = 4, C = 6 };

static void test_version(void) {
  int major = -1, minor = -1, patch = -1;
  CHECK_OK(airmoe_version(&major, &minor, &patch));
  CHECK(major == 0 && minor >= 0 && patch >= 0);
  CHECK_ERROR(airmoe_version(NULL, &minor, &patch), AIRMOE_ERR_INVALID_ARGUMENT, "major");
  CHECK(strcmp(airmoe_status_name(AIRMOE_ERR_RUNTIME), "AIRMOE_ERR_RUNTIME") == 0);
}

/* An AIR router (C codewords) and a dense router over centers [E, D]; 0
 * (and a failed check) when either is not created, both freed then. */
static int make_routers(const float* centers, airmoe_router** air, airmoe_router** dense) {
  *air = NULL;
  *dense = NULL;
  CHECK_OK(airmoe_router_create_air(centers, E, D, C, 10, 7u, air));
  CHECK_OK(airmoe_router_create_dense(centers, E, D, dense));
  if (*air && *dense) return 1;
  CHECK(!"routers created");
  airmoe_router_free(*air);
  airmoe_router_free(*dense);
  return 0;
}

static void test_routers(void) {
  g_lcg = 20240611u;
  float* centers = random_matrix(E, D);
  float* tokens = random_matrix(T, D);
  const int64_t ties = count_ties(tokens, T, centers, E, D, K);
  printf("capi: %lld of %d tokens have tied logits among their best k + 1\n", (long long)ties, T);
  CHECK(ties > 0);

  airmoe_router *air, *dense;
  if (!make_routers(centers, &air, &dense)) {
    free(centers);
    free(tokens);
    return;
  }

  int64_t e = 0, d = 0, c = -1;
  CHECK_OK(airmoe_router_info(air, &e, &d, &c));
  CHECK(e == E && d == D && c == C);
  CHECK_OK(airmoe_router_info(dense, &e, &d, &c));
  CHECK(e == E && d == D && c == 0);

  /* Forward: AIR (probes = C) == dense == exact. */
  int32_t air_e[T * K], dense_e[T * K];
  float air_g[T * K], dense_g[T * K];
  CHECK_OK(airmoe_router_route(air, tokens, T, D, K, C, air_e, air_g));
  CHECK_OK(airmoe_router_route(dense, tokens, T, D, K, 0, dense_e, dense_g));
  CHECK(memcmp(air_e, dense_e, sizeof air_e) == 0);
  CHECK(memcmp(air_g, dense_g, sizeof air_g) == 0);
  check_exact(dense_e, dense_g, tokens, T, centers, E, D, K, "dense", __LINE__);
  check_exact(air_e, air_g, tokens, T, centers, E, D, K, "air, probes = C", __LINE__);

  /* Backward: closed form in double; AIR == dense bit for bit. */
  float d_gates[T * K];
  for (int i = 0; i < T * K; ++i) d_gates[i] = dyadic();
  float* air_dh = (float*)malloc(sizeof(float) * T * D);
  float* dense_dh = (float*)malloc(sizeof(float) * T * D);
  float* air_dw = (float*)malloc(sizeof(float) * E * D);
  float* dense_dw = (float*)malloc(sizeof(float) * E * D);
  double* ref_dh = (double*)malloc(sizeof(double) * T * D);
  double* ref_dw = (double*)malloc(sizeof(double) * E * D);
  double ref_g[T * K];
  int32_t ref_e[T * K];
  if (!air_dh || !dense_dh || !air_dw || !dense_dw || !ref_dh || !ref_dw) abort();
  for (int i = 0; i < E * D; ++i) air_dw[i] = dense_dw[i] = 123.0f; /* must be overwritten */
  CHECK_OK(airmoe_router_backward(air, tokens, T, D, d_gates, air_dh, air_dw));
  CHECK_OK(airmoe_router_backward(dense, tokens, T, D, d_gates, dense_dh, dense_dw));
  reference_route(tokens, T, centers, E, D, K, ref_e, ref_g);
  reference_backward(tokens, T, centers, E, D, K, ref_e, ref_g, d_gates, ref_dh, ref_dw);
  printf("capi: backward max |d_tokens - ref| = %.3g, max |d_centers - ref| = %.3g\n",
         max_abs_diff(dense_dh, ref_dh, T * D), max_abs_diff(dense_dw, ref_dw, E * D));
  CHECK(max_abs_diff(dense_dh, ref_dh, T * D) <= 1e-4);
  CHECK(max_abs_diff(dense_dw, ref_dw, E * D) <= 1e-4);
  CHECK(memcmp(air_dh, dense_dh, sizeof(float) * T * D) == 0);
  CHECK(memcmp(air_dw, dense_dw, sizeof(float) * E * D) == 0);

  /* Few probes: k distinct valid experts, best first. */
  CHECK_OK(airmoe_router_route(air, tokens, T, D, K, 1, air_e, air_g));
  int valid = 1;
  for (int t = 0; t < T; ++t) {
    double sum = 0.0;
    for (int j = 0; j < K; ++j) {
      const int32_t x = air_e[t * K + j];
      valid &= x >= 0 && x < E;
      if (!(x >= 0 && x < E)) break;
      for (int i = 0; i < j; ++i) valid &= air_e[t * K + i] != x;
      if (j > 0)
        valid &= dot(tokens + t * D, centers + (int64_t)air_e[t * K + j - 1] * D, D) >=
                 dot(tokens + t * D, centers + (int64_t)x * D, D);
      sum += air_g[t * K + j];
    }
    valid &= fabs(sum - 1.0) <= 1e-5;
  }
  CHECK(valid);

  /* T = 0: empty arrays may be NULL; d_centers is still overwritten. */
  CHECK_OK(airmoe_router_route(air, NULL, 0, D, K, 2, NULL, NULL));
  CHECK_OK(airmoe_router_backward(air, NULL, 0, D, NULL, NULL, air_dw));
  int zero = 1;
  for (int i = 0; i < E * D; ++i) zero &= air_dw[i] == 0.0f;
  CHECK(zero);

  /* Error paths: status and a message that names the problem. */
  airmoe_router* none = (airmoe_router*)&none; /* must be reset to NULL */
  CHECK_ERROR(airmoe_router_create_air(centers, E, D, C, 10, 7u, NULL), AIRMOE_ERR_INVALID_ARGUMENT,
              "'out' is NULL");
  CHECK_ERROR(airmoe_router_create_dense(NULL, E, D, &none), AIRMOE_ERR_INVALID_ARGUMENT,
              "'centers' is NULL");
  CHECK(none == NULL);
  CHECK_ERROR(airmoe_router_create_air(centers, E, D, E + 1, 10, 7u, &none),
              AIRMOE_ERR_INVALID_ARGUMENT, "codewords");
  CHECK_ERROR(airmoe_router_create_dense(centers, E, 0, &none), AIRMOE_ERR_INVALID_ARGUMENT, "dim");
  CHECK_ERROR(airmoe_router_route(NULL, tokens, T, D, K, C, air_e, air_g),
              AIRMOE_ERR_INVALID_ARGUMENT, "'router' is NULL");
  CHECK_ERROR(airmoe_router_route(air, tokens, T, D, 0, C, air_e, air_g),
              AIRMOE_ERR_INVALID_ARGUMENT, "k = 0");
  CHECK_ERROR(airmoe_router_route(dense, tokens, T, D, E + 1, C, air_e, air_g),
              AIRMOE_ERR_INVALID_ARGUMENT, "k = 49");
  CHECK_ERROR(airmoe_router_route(air, tokens, T, D, K, C + 1, air_e, air_g),
              AIRMOE_ERR_INVALID_ARGUMENT, "probes");
  CHECK_ERROR(airmoe_router_route(air, tokens, T, D, K, 0, air_e, air_g),
              AIRMOE_ERR_INVALID_ARGUMENT, "probes");
  CHECK_ERROR(airmoe_router_route(air, tokens, T, D, K, C, NULL, air_g),
              AIRMOE_ERR_INVALID_ARGUMENT, "experts_out");
  CHECK_ERROR(airmoe_router_route(air, tokens, T, D + 1, K, C, air_e, air_g),
              AIRMOE_ERR_INVALID_ARGUMENT, "columns");
  tokens[3 * D + 2] = NAN;
  CHECK_ERROR(airmoe_router_route(dense, tokens, T, D, K, C, air_e, air_g),
              AIRMOE_ERR_INVALID_ARGUMENT, "row 3 column 2 is nan");
  CHECK_ERROR(airmoe_router_route(air, tokens, T, D, K, C, air_e, air_g),
              AIRMOE_ERR_INVALID_ARGUMENT, "nan");
  tokens[3 * D + 2] = 0.25f;
  /* The failed route left the handle without routes. */
  CHECK_ERROR(airmoe_router_backward(air, tokens, T, D, d_gates, air_dh, air_dw),
              AIRMOE_ERR_INVALID_ARGUMENT, "no routes");
  CHECK_OK(airmoe_router_route(air, tokens, T, D, K, C, air_e, air_g));
  /* A success leaves the last error as it was. */
  CHECK(strstr(airmoe_last_error(), "no routes") != NULL);
  CHECK_ERROR(airmoe_router_backward(air, tokens, T - 1, D, d_gates, air_dh, air_dw),
              AIRMOE_ERR_INVALID_ARGUMENT, "T = 39");
  CHECK_ERROR(airmoe_router_backward(air, tokens, T, D, d_gates, air_dh, NULL),
              AIRMOE_ERR_INVALID_ARGUMENT, "d_centers_out");
  d_gates[5] = INFINITY;
  CHECK_ERROR(airmoe_router_backward(air, tokens, T, D, d_gates, air_dh, air_dw),
              AIRMOE_ERR_INVALID_ARGUMENT, "d_gates row 1 column 1 is +inf");
  CHECK_ERROR(airmoe_router_update_codebook(dense, centers, E, D, 1.0, 1),
              AIRMOE_ERR_INVALID_ARGUMENT, "dense");
  CHECK_ERROR(airmoe_router_update_codebook(air, centers, E, D, 0.0, 1),
              AIRMOE_ERR_INVALID_ARGUMENT, "step");
  CHECK_ERROR(airmoe_router_update_codebook(air, centers, C - 1, D, 1.0, 1),
              AIRMOE_ERR_INVALID_ARGUMENT, "exceeds E");
  CHECK_ERROR(airmoe_router_info(air, NULL, &d, &c), AIRMOE_ERR_INVALID_ARGUMENT, "experts");

  /* update_codebook: move the centers, adapt, route exactly again. */
  for (int i = 0; i < E * D; ++i) centers[i] = centers[i] * 0.5f + dyadic() * 0.5f;
  for (int r = 0; r < E; ++r) {
    int nonzero = 0;
    for (int j = 0; j < D; ++j) nonzero |= centers[r * D + j] != 0.0f;
    if (!nonzero) centers[r * D] = 0.5f;
  }
  CHECK_OK(airmoe_router_update_codebook(air, centers, E, D, 0.5, 2));
  CHECK_OK(airmoe_router_info(air, &e, &d, &c));
  CHECK(e == E && d == D && c == C);
  CHECK_ERROR(airmoe_router_backward(air, tokens, T, D, d_gates, air_dh, air_dw),
              AIRMOE_ERR_INVALID_ARGUMENT, "no routes");
  CHECK_OK(airmoe_router_route(air, tokens, T, D, K, C, air_e, air_g));
  check_exact(air_e, air_g, tokens, T, centers, E, D, K, "air after update_codebook", __LINE__);
  CHECK_OK(airmoe_router_route(air, tokens, T, D, K, 2, air_e, air_g));

  airmoe_router_free(air);
  airmoe_router_free(dense);
  airmoe_router_free(NULL);
  free(air_dh);
  free(dense_dh);
  free(air_dw);
  free(dense_dw);
  free(ref_dh);
  free(ref_dw);
  free(centers);
  free(tokens);
}

/* Since 0.2.0: a selection bias and sigmoid gates. Experts selected by
 * z + b (exact here: dyadic values), gates sigmoid(z) of the chosen,
 * renormalized, from the unbiased z; AIR with probes = C equals dense bit for
 * bit; a bad bias or gate mode is refused by name and leaves the router as
 * it was. */
static void test_bias_and_sigmoid(void) {
  g_lcg = 20261203u;
  float* centers = random_matrix(E, D);
  float* tokens = random_matrix(T, D);
  float* bias = random_matrix(E, 1);
  for (int e = 0; e < E; ++e) bias[e] *= 4.0f;
  airmoe_router *air, *dense;
  if (!make_routers(centers, &air, &dense)) {
    free(centers);
    free(tokens);
    free(bias);
    return;
  }
  int32_t plain_e[T * K], air_e[T * K], dense_e[T * K];
  float plain_g[T * K], air_g[T * K], dense_g[T * K];
  CHECK_OK(airmoe_router_route(dense, tokens, T, D, K, 0, plain_e, plain_g));
  CHECK_OK(airmoe_router_set_bias(air, bias, E));
  CHECK_OK(airmoe_router_set_bias(dense, bias, E));
  CHECK_OK(airmoe_router_set_gate_mode(air, AIRMOE_GATES_SIGMOID));
  CHECK_OK(airmoe_router_set_gate_mode(dense, AIRMOE_GATES_SIGMOID));
  CHECK_OK(airmoe_router_route(air, tokens, T, D, K, C, air_e, air_g));
  CHECK_OK(airmoe_router_route(dense, tokens, T, D, K, 0, dense_e, dense_g));
  CHECK(memcmp(air_e, dense_e, sizeof air_e) == 0);
  CHECK(memcmp(air_g, dense_g, sizeof air_g) == 0);
  CHECK(memcmp(plain_e, dense_e, sizeof plain_e) != 0); /* the bias moved routes */
  for (int t = 0; t < T; ++t) {
    double s[E], sig[K], sum = 0.0;
    char taken[E];
    for (int e = 0; e < E; ++e) {
      s[e] = dot(tokens + t * D, centers + e * D, D) + bias[e];
      taken[e] = 0;
    }
    for (int j = 0; j < K; ++j) {
      int best = -1;
      for (int e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || s[e] > s[best])) best = e;
      taken[best] = 1;
      CHECK(dense_e[t * K + j] == best);
      sig[j] = 1.0 / (1.0 + exp(-(s[best] - bias[best]))); /* from the unbiased z */
      sum += sig[j];
    }
    for (int j = 0; j < K; ++j) CHECK(fabs(dense_g[t * K + j] - sig[j] / sum) < 1e-5);
  }
  /* Backward of the sigmoid gates: AIR == dense bit for bit. */
  float d_gates[T * K], air_dh[T * D], dense_dh[T * D];
  float* air_dw = (float*)malloc(sizeof(float) * E * D);
  float* dense_dw = (float*)malloc(sizeof(float) * E * D);
  if (!air_dw || !dense_dw) abort();
  for (int i = 0; i < T * K; ++i) d_gates[i] = dyadic();
  CHECK_OK(airmoe_router_backward(air, tokens, T, D, d_gates, air_dh, air_dw));
  CHECK_OK(airmoe_router_backward(dense, tokens, T, D, d_gates, dense_dh, dense_dw));
  CHECK(memcmp(air_dh, dense_dh, sizeof air_dh) == 0);
  CHECK(memcmp(air_dw, dense_dw, sizeof(float) * E * D) == 0);
  /* Bad input, each named; the bias in place stays. */
  float nan_bias[E];
  memcpy(nan_bias, bias, sizeof nan_bias);
  nan_bias[3] = NAN;
  CHECK_ERROR(airmoe_router_set_bias(dense, nan_bias, E), AIRMOE_ERR_INVALID_ARGUMENT,
              "airmoe_router_set_bias: bias entry 3 is nan");
  CHECK_ERROR(airmoe_router_set_bias(dense, bias, E - 1), AIRMOE_ERR_INVALID_ARGUMENT,
              "bias has 47 entries, expected E = 48");
  CHECK_ERROR(airmoe_router_set_bias(dense, NULL, E), AIRMOE_ERR_INVALID_ARGUMENT,
              "argument 'bias' is NULL");
  CHECK_ERROR(airmoe_router_set_gate_mode(dense, 3), AIRMOE_ERR_INVALID_ARGUMENT,
              "gate_mode = 3 is not an airmoe_gate_mode");
  CHECK_ERROR(airmoe_router_backward(dense, tokens, T, D, d_gates, dense_dh, dense_dw),
              AIRMOE_ERR_INVALID_ARGUMENT, "no routes"); /* set_bias cleared them */
  CHECK_OK(airmoe_router_route(dense, tokens, T, D, K, 0, plain_e, plain_g));
  CHECK(memcmp(plain_e, air_e, sizeof plain_e) == 0);
  /* No bias, chosen gates: the routes of before. */
  CHECK_OK(airmoe_router_set_bias(dense, NULL, 0));
  CHECK_OK(airmoe_router_set_gate_mode(dense, AIRMOE_GATES_CHOSEN));
  int32_t again_e[T * K];
  float again_g[T * K];
  CHECK_OK(airmoe_router_route(dense, tokens, T, D, K, 0, again_e, again_g));
  CHECK(memcmp(again_e, air_e, sizeof again_e) != 0);
  airmoe_router_free(air);
  airmoe_router_free(dense);
  free(air_dw);
  free(dense_dw);
  free(centers);
  free(tokens);
  free(bias);
}

/* Query-aware lists: built from a sample under a bias, probing every
 * codeword equals the dense router (with that bias) bit for bit, before and
 * after a refresh from another sample, also when the lists count the
 * sample's top-2k; their build FLOPs are reported; bad input is refused by
 * name and a refused refresh keeps the lists. */
static void test_query_lists(void) {
  enum { S = 30 };
  g_lcg = 20261204u;
  float* centers = random_matrix(E, D);
  float* tokens = random_matrix(T, D);
  float* sample = random_matrix(S, D);
  float* other = random_matrix(S, D);
  float* bias = random_matrix(E, 1);
  const airmoe_query_list_options options = {5, 12, K, 4, 7u};
  airmoe_query_list_options deep_options = options;
  deep_options.k = 2 * K;
  airmoe_router *query = NULL, *dense = NULL, *plain = NULL, *deep = NULL;
  CHECK_OK(airmoe_router_create_air_query(centers, E, D, bias, sample, S, &options, &query));
  CHECK_OK(airmoe_router_create_air_query(centers, E, D, bias, sample, S, &deep_options, &deep));
  CHECK_OK(airmoe_router_create_dense(centers, E, D, &dense));
  CHECK_OK(airmoe_router_create_air(centers, E, D, C, 10, 7u, &plain));
  if (!query || !dense || !plain || !deep) {
    CHECK(!"routers created");
  } else {
    CHECK_OK(airmoe_router_set_bias(dense, bias, E));
    int64_t e = 0, d = 0, c = 0;
    CHECK_OK(airmoe_router_info(query, &e, &d, &c));
    CHECK(e == E && d == D && c == options.codewords);
    double flops = 0.0, plain_flops = -1.0;
    CHECK_OK(airmoe_router_query_lists_build_flops(query, &flops));
    CHECK_OK(airmoe_router_query_lists_build_flops(plain, &plain_flops));
    CHECK(flops > 2.0 * S * E * D && plain_flops == 0.0);
    int32_t q_e[T * K], d_e[T * K];
    float q_g[T * K], d_g[T * K];
    CHECK_OK(airmoe_router_route(dense, tokens, T, D, K, 0, d_e, d_g));
    CHECK_OK(airmoe_router_route(deep, tokens, T, D, K, (int)options.codewords, q_e, q_g));
    CHECK(memcmp(q_e, d_e, sizeof q_e) == 0);
    CHECK(memcmp(q_g, d_g, sizeof q_g) == 0);
    for (int round = 0; round < 2; ++round) {
      CHECK_OK(airmoe_router_route(query, tokens, T, D, K, (int)options.codewords, q_e, q_g));
      CHECK(memcmp(q_e, d_e, sizeof q_e) == 0);
      CHECK(memcmp(q_g, d_g, sizeof q_g) == 0);
      CHECK_OK(airmoe_router_refresh_query_lists(query, other, S, D));
    }
    float bad[S * D];
    memcpy(bad, sample, sizeof bad);
    bad[2 * D + 1] = NAN;
    CHECK_ERROR(airmoe_router_refresh_query_lists(query, bad, S, D), AIRMOE_ERR_INVALID_ARGUMENT,
                "sample tokens row 2 column 1 is nan");
    float* wide = random_matrix(S, D + 1);
    CHECK_ERROR(airmoe_router_refresh_query_lists(query, wide, S, D + 1),
                AIRMOE_ERR_INVALID_ARGUMENT, "sample tokens has 13 columns, expected 12");
    free(wide);
    CHECK_ERROR(airmoe_router_refresh_query_lists(plain, sample, S, D), AIRMOE_ERR_INVALID_ARGUMENT,
                "the router has no query lists");
    CHECK_ERROR(airmoe_router_refresh_query_lists(dense, sample, S, D), AIRMOE_ERR_INVALID_ARGUMENT,
                "the router has no query lists");
    /* The refused refreshes kept the lists: still exact at every codeword. */
    CHECK_OK(airmoe_router_route(query, tokens, T, D, K, (int)options.codewords, q_e, q_g));
    CHECK(memcmp(q_e, d_e, sizeof q_e) == 0);
    airmoe_router* none = NULL;
    airmoe_query_list_options bad_k = options;
    bad_k.k = 0;
    CHECK_ERROR(airmoe_router_create_air_query(centers, E, D, NULL, sample, S, &bad_k, &none),
                AIRMOE_ERR_INVALID_ARGUMENT, "query lists: k = 0 is outside [1, 48]");
    CHECK_ERROR(airmoe_router_create_air_query(centers, E, D, NULL, sample, 0, &options, &none),
                AIRMOE_ERR_INVALID_ARGUMENT, "the sample has no tokens");
    CHECK_ERROR(airmoe_router_create_air_query(centers, E, D, NULL, sample, S, NULL, &none),
                AIRMOE_ERR_INVALID_ARGUMENT, "argument 'options' is NULL");
    CHECK(none == NULL);
  }
  airmoe_router_free(query);
  airmoe_router_free(dense);
  airmoe_router_free(plain);
  airmoe_router_free(deep);
  free(centers);
  free(tokens);
  free(sample);
  free(other);
  free(bias);
}

static void test_comm(void) {
  airmoe_comm* comm = NULL;
  MPI_Comm world = MPI_COMM_WORLD;
  int mpi_rank = -1, mpi_size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &mpi_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &mpi_size);

  CHECK_ERROR(airmoe_comm_create_mpi(NULL, &comm), AIRMOE_ERR_INVALID_ARGUMENT, "mpi_comm");
  CHECK_ERROR(airmoe_comm_create_mpi(&world, NULL), AIRMOE_ERR_INVALID_ARGUMENT, "out");
  CHECK_OK(airmoe_comm_create_mpi(&world, &comm));
  if (!comm) return;
  int rank = -1, size = -1;
  CHECK_OK(airmoe_comm_rank(comm, &rank));
  CHECK_OK(airmoe_comm_size(comm, &size));
  CHECK(rank == mpi_rank && size == mpi_size);
  CHECK_ERROR(airmoe_comm_rank(comm, NULL), AIRMOE_ERR_INVALID_ARGUMENT, "out");

  /* An all-reduce metered as a ring: 2 (P - 1) messages of ceil(bytes / P). */
  CHECK_OK(airmoe_comm_set_phase(comm, "capi"));
  int64_t v[4];
  for (int i = 0; i < 4; ++i) v[i] = (int64_t)(rank + 1) * (i + 1);
  CHECK_OK(airmoe_comm_allreduce_sum_i64(comm, v, 4));
  const int64_t tri = (int64_t)size * (size + 1) / 2;
  CHECK(v[0] == tri && v[1] == 2 * tri && v[2] == 3 * tri && v[3] == 4 * tri);
  CHECK_OK(airmoe_comm_barrier(comm));
  int64_t bytes = -1, messages = -1;
  CHECK_OK(airmoe_comm_bytes_sent(comm, "capi", &bytes, &messages));
  CHECK(messages == 2 * (size - 1) && bytes == 2 * (size - 1) * ((32 + size - 1) / size));
  int64_t all_bytes = -1, all_messages = -1;
  CHECK_OK(airmoe_comm_bytes_sent(comm, NULL, &all_bytes, &all_messages));
  CHECK(all_bytes >= bytes && all_messages >= messages);
  CHECK_OK(airmoe_comm_bytes_sent(comm, "never used", &bytes, &messages));
  CHECK(bytes == 0 && messages == 0);
  airmoe_comm_free(comm);
  airmoe_comm_free(NULL);
}

static void test_handles(void) {
  enum { E = 6, D = 4 };
  float centers[E * D];
  for (int i = 0; i < E * D; ++i) centers[i] = (float)((i * 7) % 5 - 2) * 0.25f + 0.125f;
  airmoe_router* dense = NULL;
  CHECK_OK(airmoe_router_create_dense(centers, E, D, &dense));
  float tokens[2 * D] = {0.5f, -0.25f, 0.125f, 1.0f, 3e38f, 0.0f, 0.0f, 0.0f};
  int32_t ids[2 * 2];
  float gates[2 * 2];
  /* A finite token whose logits overflow float32 is refused, naming its row. */
  CHECK_ERROR(airmoe_router_route(dense, tokens, 2, D, 2, 0, ids, gates),
              AIRMOE_ERR_INVALID_ARGUMENT, "tokens row 1: logits overflow float32");
  CHECK_OK(airmoe_router_route(dense, tokens, 1, D, 2, 0, ids, gates));
  CHECK_OK(airmoe_router_free(dense));
  /* dense is now a dangling pointer: every use is refused, never followed. */
  CHECK_ERROR(airmoe_router_route(dense, tokens, 1, D, 2, 0, ids, gates),
              AIRMOE_ERR_INVALID_ARGUMENT,
              "airmoe_router_route: argument 'router' is not a live airmoe_router handle");
  int64_t e = 0, d = 0, c = 0;
  CHECK_ERROR(airmoe_router_info(dense, &e, &d, &c), AIRMOE_ERR_INVALID_ARGUMENT,
              "airmoe_router_info: argument 'router' is not a live");
  CHECK_ERROR(airmoe_router_free(dense), AIRMOE_ERR_INVALID_ARGUMENT,
              "airmoe_router_free: argument 'router' is not a live airmoe_router handle");
  /* A pointer airmoe never returned, and a handle of the other type. */
  int not_a_handle = 0;
  CHECK_ERROR(airmoe_router_info((const airmoe_router*)&not_a_handle, &e, &d, &c),
              AIRMOE_ERR_INVALID_ARGUMENT, "not a live airmoe_router handle");
  airmoe_comm* comm = NULL;
  MPI_Comm world = MPI_COMM_WORLD;
  CHECK_OK(airmoe_comm_create_mpi(&world, &comm));
  CHECK_ERROR(airmoe_router_info((const airmoe_router*)comm, &e, &d, &c),
              AIRMOE_ERR_INVALID_ARGUMENT, "not a live airmoe_router handle");
  CHECK_OK(airmoe_comm_free(comm));
  int rank = -1;
  CHECK_ERROR(airmoe_comm_rank(comm, &rank), AIRMOE_ERR_INVALID_ARGUMENT,
              "airmoe_comm_rank: argument 'comm' is not a live airmoe_comm handle");
  CHECK_ERROR(airmoe_comm_free(comm), AIRMOE_ERR_INVALID_ARGUMENT, "airmoe_comm_free");
  CHECK_OK(airmoe_router_free(NULL));
  CHECK_OK(airmoe_comm_free(NULL));
  /* Expert ids are int32: 2^31 experts is refused before any row is read. */
  airmoe_router* huge = (airmoe_router*)&huge;
  CHECK_ERROR(airmoe_router_create_dense(centers, (int64_t)1 << 31, 1, &huge),
              AIRMOE_ERR_INVALID_ARGUMENT, "expert ids are 32-bit");
  CHECK(huge == NULL);
  CHECK_ERROR(airmoe_router_create_air(centers, (int64_t)1 << 31, 1, 4, 1, 7u, &huge),
              AIRMOE_ERR_INVALID_ARGUMENT, "expert ids are 32-bit");
}

/* The distributed router: each rank routes its own slice of a token
 * matrix, and gets what the single-process AIR router gets for those rows,
 * bit for bit, whatever the number of ranks; bad arguments on the last rank
 * fail on every rank, naming it. */
static int same_routes(airmoe_dist_router* dist, airmoe_router* single, const float* tokens,
                       int64_t rows, int k, int probes) {
  int32_t e1[64 * K], e2[64 * K];
  float g1[64 * K], g2[64 * K];
  if (airmoe_dist_router_route(dist, tokens, rows, D, k, probes, e1, g1) != AIRMOE_OK ||
      airmoe_router_route(single, tokens, rows, D, k, probes, e2, g2) != AIRMOE_OK)
    return 0;
  return memcmp(e1, e2, (size_t)(rows * k) * sizeof(int32_t)) == 0 &&
         memcmp(g1, g2, (size_t)(rows * k) * sizeof(float)) == 0;
}

static void test_dist_router(void) {
  enum { ALL = 64 };
  g_lcg = 20261205u;
  float* centers = random_matrix(E, D);
  float* tokens = random_matrix(ALL, D);
  float bias[E];
  for (int e = 0; e < E; ++e) bias[e] = dyadic() / 2.0f;
  airmoe_comm* comm = NULL;
  MPI_Comm world = MPI_COMM_WORLD;
  int rank = 0, size = 1;
  CHECK_OK(airmoe_comm_create_mpi(&world, &comm));
  airmoe_router* single = NULL;
  airmoe_dist_router* dist = NULL;
  CHECK_OK(airmoe_router_create_air(centers, E, D, C, 10, 7u, &single));
  if (!comm || !single) goto done;
  airmoe_comm_rank(comm, &rank);
  airmoe_comm_size(comm, &size);

  /* the last rank's centers are refused (a zero row): every rank fails, naming it */
  float* bad = random_matrix(E, D);
  memcpy(bad, centers, sizeof(float) * E * D);
  if (rank == size - 1) memset(bad + 5 * D, 0, sizeof(float) * D);
  char needle[32];
  snprintf(needle, sizeof needle, "rank %d", size - 1);
  CHECK_ERROR(airmoe_dist_router_create(comm, bad, E, D, C, 10, 7u, &dist),
              AIRMOE_ERR_INVALID_ARGUMENT, needle);
  CHECK(dist == NULL);
  free(bad);

  CHECK_OK(airmoe_dist_router_create(comm, centers, E, D, C, 10, 7u, &dist));
  if (!dist) goto done;
  int64_t experts = 0, dim = 0, codewords = 0, hosted = 0;
  CHECK_OK(airmoe_dist_router_info(dist, &experts, &dim, &codewords, &hosted));
  int64_t all_hosted = hosted;
  MPI_Allreduce(&hosted, &all_hosted, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  CHECK(experts == E && dim == D && codewords == C && all_hosted == E);
  CHECK_ERROR(airmoe_comm_free(comm), AIRMOE_ERR_INVALID_ARGUMENT, "free them first");

  /* each rank its own rows: 3 + 5 rank of them from row 7 rank; rank 0 also none */
  const float* mine = tokens + (int64_t)(7 * rank % (ALL - 20)) * D;
  const int64_t rows = 3 + 5 * (rank % 4);
  int equal = 1;
  for (int probes = 1; probes <= C; ++probes)
    equal &= same_routes(dist, single, mine, rows, K, probes);
  CHECK(equal);
  CHECK(same_routes(dist, single, mine, rank == 0 ? 0 : rows, K, 2));
  CHECK_OK(airmoe_dist_router_set_bias(dist, bias, E));
  CHECK_OK(airmoe_router_set_bias(single, bias, E));
  CHECK_OK(airmoe_dist_router_set_gate_mode(dist, AIRMOE_GATES_SIGMOID));
  CHECK_OK(airmoe_router_set_gate_mode(single, AIRMOE_GATES_SIGMOID));
  CHECK(same_routes(dist, single, mine, rows, K, 3));
  CHECK_OK(airmoe_dist_router_set_request_keys(dist, 8));
  CHECK(same_routes(dist, single, mine, rows, K, 3));
  CHECK_OK(airmoe_dist_router_set_bias(dist, NULL, 0));
  CHECK_OK(airmoe_router_set_bias(single, NULL, 0));
  CHECK(same_routes(dist, single, mine, rows, K, C));

  /* refusals, on every rank together */
  int32_t e_out[64 * K];
  float g_out[64 * K];
  CHECK_ERROR(
      airmoe_dist_router_route(dist, mine, rows, rank == size - 1 ? D + 1 : D, K, 2, e_out, g_out),
      AIRMOE_ERR_INVALID_ARGUMENT, needle);
  CHECK_ERROR(airmoe_dist_router_route(dist, mine, rows, D, K, C + 1, e_out, g_out),
              AIRMOE_ERR_INVALID_ARGUMENT, "probes");
  CHECK_ERROR(
      airmoe_dist_router_route(dist, mine, rows, D, K, 2, e_out, rank == size - 1 ? NULL : g_out),
      AIRMOE_ERR_INVALID_ARGUMENT, "gates_out");
  CHECK_ERROR(airmoe_dist_router_set_gate_mode(dist, AIRMOE_GATES_SHORTLIST),
              AIRMOE_ERR_INVALID_ARGUMENT, "0 chosen, 2 sigmoid");
  bias[3] = NAN;
  CHECK_ERROR(airmoe_dist_router_set_bias(dist, bias, E), AIRMOE_ERR_INVALID_ARGUMENT,
              "bias entry 3 is nan");
  CHECK_ERROR(airmoe_dist_router_set_request_keys(dist, 1), AIRMOE_ERR_INVALID_ARGUMENT, "bits");
  /* still routing as before */
  CHECK(same_routes(dist, single, mine, rows, K, C));
  CHECK_ERROR(airmoe_dist_router_info(dist, NULL, &dim, &codewords, &hosted),
              AIRMOE_ERR_INVALID_ARGUMENT, "experts");

done:
  CHECK_OK(airmoe_dist_router_free(dist));
  CHECK_ERROR(airmoe_dist_router_free(dist), AIRMOE_ERR_INVALID_ARGUMENT, "not a live");
  CHECK_OK(airmoe_dist_router_free(NULL));
  airmoe_router_free(single);
  CHECK_OK(airmoe_comm_free(comm));
  free(centers);
  free(tokens);
}

/* Before MPI_Init_thread: a communicator is refused, and the message tells a
 * C program what to call (not a C++ class of the library's). */
static void test_comm_before_mpi_init(void) {
  airmoe_comm* comm = (airmoe_comm*)&comm;
  MPI_Comm world = MPI_COMM_WORLD;
  CHECK_ERROR(airmoe_comm_create_mpi(&world, &comm), AIRMOE_ERR_RUNTIME,
              "MPI is not initialized: call MPI_Init_thread");
  CHECK(comm == NULL);
  CHECK(strstr(airmoe_last_error(), "MpiSession first") == NULL);
}

int main(int argc, char** argv) {
  int provided = 0;
  test_comm_before_mpi_init();
  if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
    fprintf(stderr, "capi: MPI_Init_thread failed\n");
    return 1;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);

  test_version();
  test_routers();
  test_bias_and_sigmoid();
  test_query_lists();
  test_comm();
  test_dist_router();
  test_handles();

  int local[2] = {g_passed, g_failed}, total[2] = {0, 0};
  MPI_Allreduce(local, total, 2, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Finalize();
  if (g_rank == 0) {
    if (size > 1) printf("capi: %d ranks, counts summed over ranks\n", size);
    printf("capi: %d passed, %d failed\n", total[0], total[1]);
  }
  return total[1] == 0 ? 0 : 1;
}
