/* airmoe C API: plain C99 over the C++ routers, the distributed router and
 * the MPI communicator.
 *
 * This is how JAX custom calls, other frameworks and other languages embed
 * airmoe. Objects are opaque handles created by airmoe_*_create* and released
 * by airmoe_*_free. Matrices are dense, row-major float32 arrays.
 *
 * Error contract:
 *  - Every function except airmoe_last_error / airmoe_status_name returns an
 *    airmoe_status; AIRMOE_OK (0) is success.
 *  - No C++ exception ever crosses this interface.
 *  - On failure, airmoe_last_error() returns a message naming the problem (the
 *    argument, the offending value, or the row and column of a non-finite
 *    entry). The message is thread-local and belongs to the last *failed* call
 *    on the calling thread: successful calls leave it unchanged (like errno).
 *    It stays valid until the next failed call on the same thread.
 *  - A NULL pointer argument gives AIRMOE_ERR_INVALID_ARGUMENT naming the
 *    argument. The one exception: an array of zero elements (for example
 *    tokens when T = 0) may be NULL.
 *  - On failure, outputs are left in an unspecified state and no handle is
 *    created (*out is set to NULL).
 *  - Handles: every function checks its handle against a process-wide
 *    registry of live handles before touching it. A handle already freed
 *    (use after free, double free), one of the other type, or a pointer
 *    airmoe never returned gives AIRMOE_ERR_INVALID_ARGUMENT, "<function>:
 *    argument 'router' is not a live airmoe_router handle ...". (A stale
 *    pointer whose address a newer handle now reuses cannot be told apart.)
 *  - Array sizes: every input and output array must hold at least the
 *    elements its shape arguments declare (e.g. experts_out: T * k int32).
 *    A shorter buffer is the caller's error and cannot be detected: the
 *    library reads or writes the declared size.
 *  - Expert ids are int32: experts >= 2^31 is refused.
 *
 * Threads: different handles may be used from different threads at once. One
 * router handle must not be used by two threads at the same time (it keeps
 * the routes of its last route call, see airmoe_router_route).
 */
#ifndef AIRMOE_CAPI_AIRMOE_H_
#define AIRMOE_CAPI_AIRMOE_H_

#include <stdint.h>

#include "airmoe_version.h" /* AIRMOE_VERSION_MAJOR, _MINOR, _PATCH, _STRING */

#if defined(_WIN32)
#define AIRMOE_API
#else
#define AIRMOE_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  AIRMOE_OK = 0,
  AIRMOE_ERR_INVALID_ARGUMENT = 1, /* bad shape, range, NULL or non-finite input */
  AIRMOE_ERR_RUNTIME = 2,          /* e.g. an MPI call failed, MPI not initialized */
  AIRMOE_ERR_OUT_OF_MEMORY = 3,
  AIRMOE_ERR_UNKNOWN = 4
} airmoe_status;

typedef struct airmoe_router airmoe_router;
typedef struct airmoe_comm airmoe_comm;
typedef struct airmoe_dist_router airmoe_dist_router;

/* Message of the last failed call on this thread ("" if none has failed). */
AIRMOE_API const char* airmoe_last_error(void);

/* Static name of a status code, e.g. "AIRMOE_ERR_INVALID_ARGUMENT". */
AIRMOE_API const char* airmoe_status_name(airmoe_status status);

/* The library's version (the CMake project version). */
AIRMOE_API airmoe_status airmoe_version(int* major, int* minor, int* patch);

/* ------------------------------------------------------------- routers --- */

/* AIR router: trains a spherical k-means codebook of `codewords` codewords
 * (1 <= codewords <= experts) on centers [experts, dim] with
 * `kmeans_iterations` Lloyd iterations, seeded by `seed`. centers must be
 * finite with no zero row; they are copied. */
AIRMOE_API airmoe_status airmoe_router_create_air(const float* centers, int64_t experts,
                                                  int64_t dim, int64_t codewords,
                                                  int kmeans_iterations, uint64_t seed,
                                                  airmoe_router** out);

/* Exact dense top-k router over centers [experts, dim] (finite; copied). */
AIRMOE_API airmoe_status airmoe_router_create_dense(const float* centers, int64_t experts,
                                                    int64_t dim, airmoe_router** out);

/* Releases a router; NULL is a no-op (AIRMOE_OK). A handle that is not live
 * (freed already) gives AIRMOE_ERR_INVALID_ARGUMENT and is left alone. */
AIRMOE_API airmoe_status airmoe_router_free(airmoe_router* router);

/* Routes tokens [T, dim] to k experts each (1 <= k <= experts).
 * experts_out [T, k]: expert ids per token, best first (higher logit plus
 * bias, then lower id). gates_out [T, k]: per the router's gate mode
 * (default: softmax over the k chosen logits).
 * probes: AIR only, 1 <= probes <= codewords (probes = codewords gives exact
 * top-k, equal bit for bit to the dense router); ignored by the dense router.
 * The handle keeps these routes for airmoe_router_backward; a failed call
 * leaves the handle with no routes. */
AIRMOE_API airmoe_status airmoe_router_route(const airmoe_router* router, const float* tokens,
                                             int64_t T, int64_t dim, int k, int probes,
                                             int32_t* experts_out, float* gates_out);

/* Backward of the gates of the last airmoe_router_route call on this handle,
 * which must have had the same T and dim (an error otherwise); tokens must be
 * the tokens routed then. d_gates [T, k] is dL/dgates with that call's k.
 * Writes d_tokens_out [T, dim] = dL/dtokens and d_centers_out
 * [experts, dim] = dL/dcenters, dense and overwritten (rows of experts no
 * token chose are zero). */
AIRMOE_API airmoe_status airmoe_router_backward(const airmoe_router* router, const float* tokens,
                                                int64_t T, int64_t dim, const float* d_gates,
                                                float* d_tokens_out, float* d_centers_out);

/* AIR only (AIRMOE_ERR_INVALID_ARGUMENT for a dense router): the optimizer
 * moved the centers. Replaces them with centers [experts, dim] (dim must be
 * the router's; experts may change but must stay >= codewords), then runs
 * `updates` adaptive spherical k-means steps with EMA weight `step` in
 * (0, 1] (1: a Lloyd step) and rebuilds the inverted lists. updates = 0 only
 * replaces the centers. Clears the routes kept for backward. */
AIRMOE_API airmoe_status airmoe_router_update_codebook(airmoe_router* router, const float* centers,
                                                       int64_t experts, int64_t dim, double step,
                                                       int updates);

/* Gate modes (since 0.2.0), for airmoe_router_set_gate_mode. */
typedef enum {
  AIRMOE_GATES_CHOSEN = 0,    /* softmax over the k chosen logits (the default) */
  AIRMOE_GATES_SHORTLIST = 1, /* exp(z) over the sum over every expert scored (AIR: the
                                 shortlist; dense: all experts) */
  AIRMOE_GATES_SIGMOID = 2    /* sigmoid(z) of the k chosen, renormalized to sum 1
                                 (DeepSeek-V3, GLM-4.5) */
} airmoe_gate_mode;

/* Since 0.2.0. The gates later airmoe_router_route calls form (and
 * airmoe_router_backward differentiates): one of airmoe_gate_mode. Clears
 * the routes kept for backward. */
AIRMOE_API airmoe_status airmoe_router_set_gate_mode(airmoe_router* router, int gate_mode);

/* Since 0.2.0. The selection bias b [experts] (finite; copied), or none
 * (bias NULL and experts 0): later route calls select experts by z + b and
 * form the gates from the unbiased logits z (DeepSeek-V3's auxiliary-loss-free
 * load balancing); the bias takes no gradient. A copy and a check: nothing
 * else is rebuilt, so it may change every step. A refused bias leaves the
 * router's bias as it was. Clears the routes kept for backward. */
AIRMOE_API airmoe_status airmoe_router_set_bias(airmoe_router* router, const float* bias,
                                                int64_t experts);

/* Since 0.2.0. Options of query-aware lists (docs/routing.md, "First-stage
 * options"): a codebook of `codewords` codewords trained on sample tokens
 * (1 <= codewords <= sample tokens) with `kmeans_iterations` Lloyd
 * iterations seeded by `seed`, and each codeword's list the (at most)
 * `list_length` experts (1 <= list_length <= experts) that its tokens' exact
 * top-`k` (1 <= k <= experts) picks most; an expert no list took joins the
 * list of its center's nearest codeword. `k` need not be the k the router
 * routes with: counting twice as deep fills what a small sample leaves of
 * each list (docs/routing.md, "How deep the lists count"). */
typedef struct {
  int64_t codewords;
  int64_t list_length;
  int k;
  int kmeans_iterations;
  uint64_t seed;
} airmoe_query_list_options;

/* Since 0.2.0. AIR router with query-aware lists over centers [experts, dim]
 * (finite, no zero row; copied), built from sample_tokens [sample_T, dim]
 * (finite, no zero row; sample_T >= 1) routed exactly under the selection
 * bias `bias` [experts] (NULL: none; it becomes the router's bias, as with
 * airmoe_router_set_bias). The lists overlap; probing every codeword still
 * gives exact top-k, equal bit for bit to the dense router. The sample
 * should be tokens the router will not be measured on. */
AIRMOE_API airmoe_status airmoe_router_create_air_query(const float* centers, int64_t experts,
                                                        int64_t dim, const float* bias,
                                                        const float* sample_tokens,
                                                        int64_t sample_T,
                                                        const airmoe_query_list_options* options,
                                                        airmoe_router** out);

/* Since 0.2.0. A query-list AIR router only (AIRMOE_ERR_INVALID_ARGUMENT
 * otherwise): rebuilds its codebook and lists, with the same options, from
 * sample_tokens [sample_T, dim] routed exactly under the router's current
 * centers and bias (they go stale as those move). A refused call leaves the
 * lists as they were. Clears the routes kept for backward. */
AIRMOE_API airmoe_status airmoe_router_refresh_query_lists(airmoe_router* router,
                                                           const float* sample_tokens,
                                                           int64_t sample_T, int64_t dim);

/* Since 0.2.0. FLOPs the router's query lists last cost to build (0 for a
 * router without them): exact routing of the sample, k-means on it and the
 * assignment of the sample to the codewords. */
AIRMOE_API airmoe_status airmoe_router_query_lists_build_flops(const airmoe_router* router,
                                                               double* out);

/* Shape of a router; codewords is 0 for a dense router. */
AIRMOE_API airmoe_status airmoe_router_info(const airmoe_router* router, int64_t* experts,
                                            int64_t* dim, int64_t* codewords);

/* -------------------------------------------------------- communicator --- */

/* Communicator over an MPI communicator. `mpi_comm` is the ADDRESS of an
 * MPI_Comm (e.g. &comm, or the address of MPI_COMM_WORLD copied into a
 * variable), so that this header need not include mpi.h. Collective over that
 * communicator (it duplicates it); MPI must be initialized
 * (MPI_THREAD_FUNNELED or higher, calls from the thread that initialized it)
 * and the handle must be freed before MPI_Finalize. */
AIRMOE_API airmoe_status airmoe_comm_create_mpi(const void* mpi_comm, airmoe_comm** out);

/* Releases a communicator (collective: frees the duplicate); NULL is a no-op
 * (AIRMOE_OK). A handle that is not live, or one that live distributed
 * routers still use, gives AIRMOE_ERR_INVALID_ARGUMENT and is left alone. */
AIRMOE_API airmoe_status airmoe_comm_free(airmoe_comm* comm);

AIRMOE_API airmoe_status airmoe_comm_rank(const airmoe_comm* comm, int* out);
AIRMOE_API airmoe_status airmoe_comm_size(const airmoe_comm* comm, int* out);

/* Phase name under which later calls are metered (default "default"). */
AIRMOE_API airmoe_status airmoe_comm_set_phase(airmoe_comm* comm, const char* phase);

/* Collective barrier. */
AIRMOE_API airmoe_status airmoe_comm_barrier(airmoe_comm* comm);

/* Collective element-wise sum of `count` int64 values, in place (exact). */
AIRMOE_API airmoe_status airmoe_comm_allreduce_sum_i64(airmoe_comm* comm, int64_t* data,
                                                       int64_t count);

/* Bytes and messages this rank has sent through the handle, from its traffic
 * meter: under `phase`, or over all phases when phase is NULL. A phase never
 * used gives 0 and 0. */
AIRMOE_API airmoe_status airmoe_comm_bytes_sent(const airmoe_comm* comm, const char* phase,
                                                int64_t* bytes, int64_t* messages);

/* -------------------------------------------------- distributed router --- */

/* Since 0.2.0. An AIR router whose experts and inverted lists are sharded
 * over the ranks of `comm` (docs/architecture.md): each rank shortlists its
 * own tokens and sends scoring requests only to the ranks hosting candidate
 * experts. Collective over comm: every rank calls each function below except
 * airmoe_dist_router_free and airmoe_dist_router_info, in the same order.
 * A bad argument on any rank fails the call on every rank together, with the
 * same message naming that rank ("... rank 1: ..."), so no rank is left
 * waiting; a handle that is not live, though, is that rank's own error and
 * the other ranks then wait in the collective, as with any MPI call one rank
 * skips. The router uses comm until it is freed: airmoe_comm_free refuses a
 * communicator with live routers. */

/* Collective: rank 0 trains the codebook of `codewords` codewords on centers
 * [experts, dim] (finite, no zero row) with `kmeans_iterations` Lloyd
 * iterations seeded by `seed`, as airmoe_router_create_air does, and
 * broadcasts it; the experts are placed by list locality, and each rank
 * keeps its own experts' centers. centers must be the same on every rank (a
 * digest is compared). Routes then equal those of airmoe_router_create_air's
 * router with the same arguments, bit for bit, whatever the number of
 * ranks. */
AIRMOE_API airmoe_status airmoe_dist_router_create(airmoe_comm* comm, const float* centers,
                                                   int64_t experts, int64_t dim, int64_t codewords,
                                                   int kmeans_iterations, uint64_t seed,
                                                   airmoe_dist_router** out);

/* Releases this rank's router (local, not collective); NULL is a no-op. */
AIRMOE_API airmoe_status airmoe_dist_router_free(airmoe_dist_router* router);

/* Collective: routes this rank's tokens [T, dim] (T may be 0 and may differ
 * between ranks) as airmoe_router_route does: experts_out [T, k] best first,
 * gates_out [T, k] in the router's gate mode, 1 <= probes <= codewords. */
AIRMOE_API airmoe_status airmoe_dist_router_route(airmoe_dist_router* router, const float* tokens,
                                                  int64_t T, int64_t dim, int k, int probes,
                                                  int32_t* experts_out, float* gates_out);

/* Collective: the gates later route calls form, AIRMOE_GATES_CHOSEN (the
 * default) or AIRMOE_GATES_SIGMOID (the shortlist softmax would need every
 * serving rank's normalizer: refused). The same on every rank. */
AIRMOE_API airmoe_status airmoe_dist_router_set_gate_mode(airmoe_dist_router* router,
                                                          int gate_mode);

/* Collective: the selection bias, as airmoe_router_set_bias (bias NULL and
 * experts 0 clears it), the same on every rank (a digest is compared). */
AIRMOE_API airmoe_status airmoe_dist_router_set_bias(airmoe_dist_router* router, const float* bias,
                                                     int64_t experts);

/* Collective: scoring requests pruned with replicated `bits`-bit copies of
 * the expert keys (2 to 16; 0 turns it off): requests go only to the ranks
 * of experts that may still be in a token's top-k, the routes stay the same
 * bit for bit (docs/layer.md, "Request keys"). The same on every rank. */
AIRMOE_API airmoe_status airmoe_dist_router_set_request_keys(airmoe_dist_router* router, int bits);

/* Shape of the router, and how many experts this rank hosts. */
AIRMOE_API airmoe_status airmoe_dist_router_info(const airmoe_dist_router* router, int64_t* experts,
                                                 int64_t* dim, int64_t* codewords, int64_t* hosted);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* AIRMOE_CAPI_AIRMOE_H_ */
