// The C API (airmoe.h) over the C++ routers and the MPI communicator. Every
// entry point runs its body inside guarded(), which turns any C++ exception
// into a status code and a thread-local message, so that nothing throws
// across the C boundary.
#include "capi/airmoe.h"

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>

#include "comm/mpi_communicator.h"
#include "core/checks.h"
#include "core/matrix.h"
#include "router/air_router.h"
#include "router/dense_router.h"
#include "router/routes.h"
#include "runtime/builder.h"
#include "runtime/distributed_router.h"

struct airmoe_router {
  std::unique_ptr<airmoe::AirRouter> air;      // exactly one of air / dense is set
  std::unique_ptr<airmoe::DenseRouter> dense;  //
  // Routes of the last successful route() call, for backward(). Mutable: a
  // route() on a const handle still records them (the documented contract).
  mutable airmoe::Routes last;
  mutable bool has_last = false;
  airmoe::GateMode gate_mode = airmoe::GateMode::kChosen;

  int64_t experts() const { return air ? air->experts() : dense->experts(); }
  int64_t dim() const { return air ? air->dim() : dense->dim(); }
};

struct airmoe_comm {
  std::unique_ptr<airmoe::comm::MpiCommunicator> mpi;
  int live_routers = 0;  // distributed routers over it: it may not be freed before them
};

struct airmoe_dist_router {
  airmoe_comm* comm = nullptr;  // not owned; outlives the router (live_routers)
  std::unique_ptr<airmoe::runtime::DistributedRouter> router;
  airmoe::GateMode gate_mode = airmoe::GateMode::kChosen;
  int64_t experts = 0, dim = 0;

  ~airmoe_dist_router() {
    if (comm) --comm->live_routers;
  }
};

namespace {

thread_local std::string last_error_message;

// Thrown by the argument checks below; mapped to AIRMOE_ERR_INVALID_ARGUMENT.
[[noreturn]] void invalid(const std::string& what) {
  throw std::invalid_argument(what);
}

airmoe_status set_error(airmoe_status status, const char* fn, const char* what) {
  try {
    last_error_message = std::string(fn) + ": " + what;
  } catch (...) {  // no memory for the message: an empty one rather than a stale one
    last_error_message.clear();
  }
  return status;
}

// Runs body(); any exception becomes a status and the thread's last error,
// "<function>: <what>".
template <typename Body>
airmoe_status guarded(const char* fn, Body&& body) noexcept {
  try {
    body();
    return AIRMOE_OK;
  } catch (const std::bad_alloc&) {
    return set_error(AIRMOE_ERR_OUT_OF_MEMORY, fn, "out of memory");
  } catch (const std::length_error& e) {  // a size beyond what a vector can hold
    return set_error(AIRMOE_ERR_OUT_OF_MEMORY, fn, e.what());
  } catch (const std::logic_error& e) {  // invalid_argument, out_of_range, ...
    return set_error(AIRMOE_ERR_INVALID_ARGUMENT, fn, e.what());
  } catch (const std::runtime_error& e) {
    return set_error(AIRMOE_ERR_RUNTIME, fn, e.what());
  } catch (const std::exception& e) {
    return set_error(AIRMOE_ERR_UNKNOWN, fn, e.what());
  } catch (...) {
    return set_error(AIRMOE_ERR_UNKNOWN, fn, "unknown exception");
  }
}

void require_nonnull(const void* p, const char* name) {
  if (p == nullptr) invalid(std::string("argument '") + name + "' is NULL");
}

// Every live handle, with its type: a freed handle (use after free, double
// free) or a pointer that never was one is refused by address before it is
// dereferenced. A magic field could not do this: after free its memory may
// hold anything. What it cannot see: a new handle created at a freed one's
// address makes the stale pointer live again.
class HandleRegistry {
 public:
  void add(const void* handle, const char* type) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_[handle] = type;
  }
  // Throws unless `handle` is a live handle of `type` (NULL: "is NULL").
  void require(const void* handle, const char* type, const char* name) const {
    require_nonnull(handle, name);
    std::lock_guard<std::mutex> lock(mutex_);
    find_live(handle, type, name);
  }
  // Removes a live handle once `may_free()` (run on it while it is live)
  // returns without throwing, under one lock: two threads freeing the same
  // handle, one succeeds. Throws as require() does otherwise.
  template <typename MayFree>
  void remove(const void* handle, const char* type, const char* name, MayFree&& may_free) {
    require_nonnull(handle, name);
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = find_live(handle, type, name);
    may_free();
    live_.erase(it);
  }

 private:
  using Map = std::unordered_map<const void*, const char*>;
  Map::const_iterator find_live(const void* handle, const char* type, const char* name) const {
    const auto it = live_.find(handle);
    if (it == live_.end() || it->second != type)
      invalid(std::string("argument '") + name + "' is not a live " + type +
              " handle (freed already, or never created by airmoe)");
    return it;
  }

  mutable std::mutex mutex_;
  Map live_;
};

HandleRegistry& handles() {
  static HandleRegistry* registry = new HandleRegistry();  // never destroyed: usable at exit
  return *registry;
}

constexpr const char* kRouterType = "airmoe_router";
constexpr const char* kCommType = "airmoe_comm";
constexpr const char* kDistRouterType = "airmoe_dist_router";

void require_router(const airmoe_router* router) {
  handles().require(router, kRouterType, "router");
}
void require_comm(const airmoe_comm* comm) {
  handles().require(comm, kCommType, "comm");
}
void require_dist_router(const airmoe_dist_router* router) {
  handles().require(router, kDistRouterType, "router");
}

// Collective: `local_checks` of this rank's arguments, failing on every rank
// together before any data moves: "<function>: arguments: rank R: <what>",
// R the lowest failing rank.
template <typename Checks>
void check_on_every_rank(airmoe_comm* comm, Checks&& local_checks) {
  airmoe::comm::check_together(*comm->mpi, "arguments", std::forward<Checks>(local_checks));
}

// Frees a live handle once `may_free(handle)` has not thrown; NULL is a
// no-op, anything else not live an error.
template <typename Handle, typename MayFree = void (*)(const Handle*)>
airmoe_status free_handle(
    const char* fn, Handle* handle, const char* type, const char* name,
    MayFree may_free = [](const Handle*) {}) {
  if (handle == nullptr) return AIRMOE_OK;
  return guarded(fn, [&] {
    handles().remove(handle, type, name, [&] { may_free(handle); });
    delete handle;
  });
}

// Hands a new handle to the caller, registered as live.
template <typename Handle>
void publish(std::unique_ptr<Handle> handle, const char* type, Handle** out) {
  handles().add(handle.get(), type);
  *out = handle.release();
}

// A [rows, cols] array: rows >= 0, cols >= min_cols, rows * cols fits in
// int64; the pointer may be NULL only when the array is empty.
void require_array(const void* p, int64_t rows, int64_t cols, int64_t min_cols, const char* name,
                   const char* rows_name, const char* cols_name) {
  if (rows < 0) invalid(std::string(rows_name) + " = " + std::to_string(rows) + " is negative");
  if (cols < min_cols)
    invalid(std::string(cols_name) + " = " + std::to_string(cols) +
            " must be >= " + std::to_string(min_cols));
  if (cols > 0 && rows > INT64_MAX / cols)
    invalid(std::string(name) + " [" + std::to_string(rows) + ", " + std::to_string(cols) +
            "] is too large");
  if (rows * cols > 0) require_nonnull(p, name);
}

// The arrays of a route call: tokens [T, dim], k in [1, experts], and the
// outputs experts_out and gates_out [T, k].
void require_route_arrays(const float* tokens, int64_t T, int64_t dim, int k, int64_t experts,
                          const int32_t* experts_out, const float* gates_out) {
  require_array(tokens, T, dim, 1, "tokens", "T", "dim");
  if (k < 1 || k > experts)
    invalid("k = " + std::to_string(k) + " is outside [1, " + std::to_string(experts) + "]");
  require_array(experts_out, T, k, 1, "experts_out", "T", "k");
  require_array(gates_out, T, k, 1, "gates_out", "T", "k");
}

// Copies the routes' experts and gates into the caller's [T, k] arrays.
void write_routes(const airmoe::Routes& r, int32_t* experts_out, float* gates_out) {
  const auto n = static_cast<size_t>(r.tokens * r.k);
  if (n == 0) return;
  std::copy_n(r.experts.data(), n, experts_out);
  std::copy_n(r.gates.data(), n, gates_out);
}

}  // namespace

extern "C" {

const char* airmoe_last_error(void) {
  return last_error_message.c_str();
}

const char* airmoe_status_name(airmoe_status status) {
  switch (status) {
    case AIRMOE_OK:
      return "AIRMOE_OK";
    case AIRMOE_ERR_INVALID_ARGUMENT:
      return "AIRMOE_ERR_INVALID_ARGUMENT";
    case AIRMOE_ERR_RUNTIME:
      return "AIRMOE_ERR_RUNTIME";
    case AIRMOE_ERR_OUT_OF_MEMORY:
      return "AIRMOE_ERR_OUT_OF_MEMORY";
    case AIRMOE_ERR_UNKNOWN:
      return "AIRMOE_ERR_UNKNOWN";
  }
  return "AIRMOE_ERR_UNKNOWN";
}

airmoe_status airmoe_version(int* major, int* minor, int* patch) {
  return guarded("airmoe_version", [&] {
    require_nonnull(major, "major");
    require_nonnull(minor, "minor");
    require_nonnull(patch, "patch");
    *major = AIRMOE_VERSION_MAJOR;
    *minor = AIRMOE_VERSION_MINOR;
    *patch = AIRMOE_VERSION_PATCH;
  });
}

// ---------------------------------------------------------------- routers --

airmoe_status airmoe_router_create_air(const float* centers, int64_t experts, int64_t dim,
                                       int64_t codewords, int kmeans_iterations, uint64_t seed,
                                       airmoe_router** out) {
  return guarded("airmoe_router_create_air", [&] {
    require_nonnull(out, "out");
    *out = nullptr;
    require_array(centers, experts, dim, 1, "centers", "experts", "dim");
    airmoe::require_expert_count(experts, "experts");
    if (codewords < 1 || codewords > experts)
      invalid("codewords = " + std::to_string(codewords) + " is outside [1, " +
              std::to_string(experts) + "]");
    if (kmeans_iterations < 0)
      invalid("kmeans_iterations = " + std::to_string(kmeans_iterations) + " is negative");
    airmoe::AirConfig config;
    config.codewords = codewords;
    config.kmeans_iterations = kmeans_iterations;
    config.seed = seed;
    auto r = std::make_unique<airmoe_router>();
    r->air = std::make_unique<airmoe::AirRouter>(airmoe::MatrixView(centers, experts, dim), config);
    publish(std::move(r), kRouterType, out);
  });
}

airmoe_status airmoe_router_create_air_query(const float* centers, int64_t experts, int64_t dim,
                                             const float* bias, const float* sample_tokens,
                                             int64_t sample_T,
                                             const airmoe_query_list_options* options,
                                             airmoe_router** out) {
  return guarded("airmoe_router_create_air_query", [&] {
    require_nonnull(out, "out");
    *out = nullptr;
    require_array(centers, experts, dim, 1, "centers", "experts", "dim");
    airmoe::require_expert_count(experts, "experts");
    require_array(sample_tokens, sample_T, dim, 1, "sample_tokens", "sample_T", "dim");
    require_nonnull(options, "options");
    airmoe::QueryListOptions o;
    o.codewords = options->codewords;
    o.list_length = options->list_length;
    o.k = options->k;
    o.kmeans_iterations = options->kmeans_iterations;
    o.seed = options->seed;
    const airmoe::TensorView b =
        bias ? airmoe::bias_view({bias, static_cast<size_t>(experts)}) : airmoe::TensorView();
    auto r = std::make_unique<airmoe_router>();
    r->air =
        std::make_unique<airmoe::AirRouter>(airmoe::MatrixView(centers, experts, dim), b,
                                            airmoe::MatrixView(sample_tokens, sample_T, dim), o);
    publish(std::move(r), kRouterType, out);
  });
}

airmoe_status airmoe_router_refresh_query_lists(airmoe_router* router, const float* sample_tokens,
                                                int64_t sample_T, int64_t dim) {
  return guarded("airmoe_router_refresh_query_lists", [&] {
    require_router(router);
    if (!router->air || !router->air->has_query_lists())
      invalid("the router has no query lists (airmoe_router_create_air_query routers only)");
    require_array(sample_tokens, sample_T, dim, 1, "sample_tokens", "sample_T", "dim");
    router->has_last = false;
    router->last = airmoe::Routes();
    router->air->refresh_lists(airmoe::MatrixView(sample_tokens, sample_T, dim));
  });
}

airmoe_status airmoe_router_query_lists_build_flops(const airmoe_router* router, double* out) {
  return guarded("airmoe_router_query_lists_build_flops", [&] {
    require_router(router);
    require_nonnull(out, "out");
    *out = router->air ? router->air->query_lists_build_flops() : 0.0;
  });
}

airmoe_status airmoe_router_create_dense(const float* centers, int64_t experts, int64_t dim,
                                         airmoe_router** out) {
  return guarded("airmoe_router_create_dense", [&] {
    require_nonnull(out, "out");
    *out = nullptr;
    require_array(centers, experts, dim, 1, "centers", "experts", "dim");
    airmoe::require_expert_count(experts, "experts");
    auto r = std::make_unique<airmoe_router>();
    r->dense = std::make_unique<airmoe::DenseRouter>(airmoe::MatrixView(centers, experts, dim));
    publish(std::move(r), kRouterType, out);
  });
}

airmoe_status airmoe_router_free(airmoe_router* router) {
  return free_handle("airmoe_router_free", router, kRouterType, "router");
}

airmoe_status airmoe_router_route(const airmoe_router* router, const float* tokens, int64_t T,
                                  int64_t dim, int k, int probes, int32_t* experts_out,
                                  float* gates_out) {
  return guarded("airmoe_router_route", [&] {
    require_router(router);
    router->has_last = false;
    router->last = airmoe::Routes();
    require_route_arrays(tokens, T, dim, k, router->experts(), experts_out, gates_out);
    const airmoe::MatrixView view(tokens, T, dim);
    airmoe::Routes r = router->air ? router->air->route(view, k, probes, router->gate_mode)
                                   : router->dense->route(view, k, router->gate_mode);
    write_routes(r, experts_out, gates_out);
    router->last = std::move(r);
    router->has_last = true;
  });
}

airmoe_status airmoe_router_backward(const airmoe_router* router, const float* tokens, int64_t T,
                                     int64_t dim, const float* d_gates, float* d_tokens_out,
                                     float* d_centers_out) {
  return guarded("airmoe_router_backward", [&] {
    require_router(router);
    if (!router->has_last) invalid("no routes: call airmoe_router_route on this handle first");
    const airmoe::Routes& routes = router->last;
    if (T != routes.tokens)
      invalid("T = " + std::to_string(T) +
              " but the last route call had T = " + std::to_string(routes.tokens));
    if (dim != router->dim())
      invalid("dim = " + std::to_string(dim) +
              " but the router has dim = " + std::to_string(router->dim()));
    require_array(tokens, T, dim, 1, "tokens", "T", "dim");
    require_array(d_gates, T, routes.k, 1, "d_gates", "T", "k");
    require_array(d_tokens_out, T, dim, 1, "d_tokens_out", "T", "dim");
    require_array(d_centers_out, router->experts(), dim, 1, "d_centers_out", "experts", "dim");
    const airmoe::MatrixView h(tokens, T, dim), dg(d_gates, T, routes.k);
    airmoe::RouterGradients g =
        router->air ? router->air->backward(h, routes, dg) : router->dense->backward(h, routes, dg);
    if (T > 0) std::copy_n(g.d_tokens.data(), static_cast<size_t>(T * dim), d_tokens_out);
    std::fill_n(d_centers_out, static_cast<size_t>(router->experts() * dim), 0.0f);
    const airmoe::SparseRowGrad& dc = g.d_centers;
    for (size_t i = 0; i < dc.rows.size(); ++i)
      std::copy_n(dc.values.row(static_cast<int64_t>(i)), static_cast<size_t>(dim),
                  d_centers_out + static_cast<int64_t>(dc.rows[i]) * dim);
  });
}

airmoe_status airmoe_router_update_codebook(airmoe_router* router, const float* centers,
                                            int64_t experts, int64_t dim, double step,
                                            int updates) {
  return guarded("airmoe_router_update_codebook", [&] {
    require_router(router);
    if (!router->air) invalid("a dense router has no codebook (AIR routers only)");
    require_array(centers, experts, dim, 1, "centers", "experts", "dim");
    if (!(step > 0.0 && step <= 1.0))
      invalid("step = " + std::to_string(step) + " is outside (0, 1]");
    if (updates < 0) invalid("updates = " + std::to_string(updates) + " is negative");
    router->has_last = false;
    router->last = airmoe::Routes();
    router->air->set_centers(airmoe::MatrixView(centers, experts, dim));
    router->air->update_codebook(step, updates);
  });
}

airmoe_status airmoe_router_set_gate_mode(airmoe_router* router, int gate_mode) {
  return guarded("airmoe_router_set_gate_mode", [&] {
    require_router(router);
    if (gate_mode < AIRMOE_GATES_CHOSEN || gate_mode > AIRMOE_GATES_SIGMOID)
      invalid("gate_mode = " + std::to_string(gate_mode) +
              " is not an airmoe_gate_mode (0 chosen, 1 shortlist, 2 sigmoid)");
    router->has_last = false;
    router->last = airmoe::Routes();
    router->gate_mode = gate_mode == AIRMOE_GATES_CHOSEN      ? airmoe::GateMode::kChosen
                        : gate_mode == AIRMOE_GATES_SHORTLIST ? airmoe::GateMode::kShortlist
                                                              : airmoe::GateMode::kSigmoid;
  });
}

airmoe_status airmoe_router_set_bias(airmoe_router* router, const float* bias, int64_t experts) {
  return guarded("airmoe_router_set_bias", [&] {
    require_router(router);
    router->has_last = false;
    router->last = airmoe::Routes();
    if (bias == nullptr && experts == 0) {
      if (router->air) router->air->clear_bias();
      if (router->dense) router->dense->clear_bias();
      return;
    }
    require_array(bias, experts, 1, 1, "bias", "experts", "1");
    const airmoe::TensorView b = airmoe::bias_view({bias, static_cast<size_t>(experts)});
    if (router->air) router->air->set_bias(b);
    if (router->dense) router->dense->set_bias(b);
  });
}

airmoe_status airmoe_router_info(const airmoe_router* router, int64_t* experts, int64_t* dim,
                                 int64_t* codewords) {
  return guarded("airmoe_router_info", [&] {
    require_router(router);
    require_nonnull(experts, "experts");
    require_nonnull(dim, "dim");
    require_nonnull(codewords, "codewords");
    *experts = router->experts();
    *dim = router->dim();
    *codewords = router->air ? router->air->codewords() : 0;
  });
}

// ----------------------------------------------------------- communicator --

airmoe_status airmoe_comm_create_mpi(const void* mpi_comm, airmoe_comm** out) {
  return guarded("airmoe_comm_create_mpi", [&] {
    require_nonnull(out, "out");
    *out = nullptr;
    require_nonnull(mpi_comm, "mpi_comm");
    const MPI_Comm comm = *static_cast<const MPI_Comm*>(mpi_comm);
    auto c = std::make_unique<airmoe_comm>();
    c->mpi = std::make_unique<airmoe::comm::MpiCommunicator>(comm);
    publish(std::move(c), kCommType, out);
  });
}

airmoe_status airmoe_comm_free(airmoe_comm* comm) {
  return free_handle("airmoe_comm_free", comm, kCommType, "comm", [](const airmoe_comm* c) {
    if (c->live_routers > 0)
      invalid(std::to_string(c->live_routers) +
              " distributed router(s) still use this communicator: free them first");
  });
}

airmoe_status airmoe_comm_rank(const airmoe_comm* comm, int* out) {
  return guarded("airmoe_comm_rank", [&] {
    require_comm(comm);
    require_nonnull(out, "out");
    *out = comm->mpi->rank();
  });
}

airmoe_status airmoe_comm_size(const airmoe_comm* comm, int* out) {
  return guarded("airmoe_comm_size", [&] {
    require_comm(comm);
    require_nonnull(out, "out");
    *out = comm->mpi->size();
  });
}

airmoe_status airmoe_comm_set_phase(airmoe_comm* comm, const char* phase) {
  return guarded("airmoe_comm_set_phase", [&] {
    require_comm(comm);
    require_nonnull(phase, "phase");
    comm->mpi->set_phase(phase);
  });
}

airmoe_status airmoe_comm_barrier(airmoe_comm* comm) {
  return guarded("airmoe_comm_barrier", [&] {
    require_comm(comm);
    comm->mpi->barrier();
  });
}

airmoe_status airmoe_comm_allreduce_sum_i64(airmoe_comm* comm, int64_t* data, int64_t count) {
  return guarded("airmoe_comm_allreduce_sum_i64", [&] {
    require_comm(comm);
    require_array(data, count, 1, 1, "data", "count", "1");
    comm->mpi->allreduce_sum(data, static_cast<size_t>(count));
  });
}

airmoe_status airmoe_comm_bytes_sent(const airmoe_comm* comm, const char* phase, int64_t* bytes,
                                     int64_t* messages) {
  return guarded("airmoe_comm_bytes_sent", [&] {
    require_comm(comm);
    require_nonnull(bytes, "bytes");
    require_nonnull(messages, "messages");
    const airmoe::comm::TrafficMeter& meter = comm->mpi->meter();
    const airmoe::comm::TrafficCounts c = phase ? meter.sent(phase) : meter.total();
    *bytes = c.bytes;
    *messages = c.messages;
  });
}

// ------------------------------------------------------ distributed router --

airmoe_status airmoe_dist_router_create(airmoe_comm* comm, const float* centers, int64_t experts,
                                        int64_t dim, int64_t codewords, int kmeans_iterations,
                                        uint64_t seed, airmoe_dist_router** out) {
  return guarded("airmoe_dist_router_create", [&] {
    if (out != nullptr) *out = nullptr;
    require_comm(comm);
    check_on_every_rank(comm, [&] {
      require_nonnull(out, "out");
      require_array(centers, experts, dim, 1, "centers", "experts", "dim");
      airmoe::require_expert_count(experts, "experts");
    });
    airmoe::runtime::LayerSpec spec;
    spec.experts = experts;
    spec.dim = dim;
    spec.codewords = codewords;
    spec.kmeans_iterations = kmeans_iterations;
    spec.kmeans_seed = seed;
    spec.k = spec.probes = 1;  // the spec's k and m only route a load sample; there is none
    auto r = std::make_unique<airmoe_dist_router>();
    r->router =
        airmoe::runtime::build_router(*comm->mpi, spec, airmoe::MatrixView(centers, experts, dim));
    r->experts = experts;
    r->dim = dim;
    r->comm = comm;
    ++comm->live_routers;
    publish(std::move(r), kDistRouterType, out);
  });
}

airmoe_status airmoe_dist_router_free(airmoe_dist_router* router) {
  return free_handle("airmoe_dist_router_free", router, kDistRouterType, "router");
}

airmoe_status airmoe_dist_router_route(airmoe_dist_router* router, const float* tokens, int64_t T,
                                       int64_t dim, int k, int probes, int32_t* experts_out,
                                       float* gates_out) {
  return guarded("airmoe_dist_router_route", [&] {
    require_dist_router(router);
    check_on_every_rank(router->comm, [&] {
      require_route_arrays(tokens, T, dim, k, router->experts, experts_out, gates_out);
      if (dim != router->dim)
        invalid("dim = " + std::to_string(dim) +
                " but the router has dim = " + std::to_string(router->dim));
    });
    const airmoe::Routes r =
        router->router
            ->route_batch(airmoe::MatrixView(tokens, T, dim), k, probes, router->gate_mode)
            .routes;
    write_routes(r, experts_out, gates_out);
  });
}

airmoe_status airmoe_dist_router_set_gate_mode(airmoe_dist_router* router, int gate_mode) {
  return guarded("airmoe_dist_router_set_gate_mode", [&] {
    require_dist_router(router);
    check_on_every_rank(router->comm, [&] {
      if (gate_mode != AIRMOE_GATES_CHOSEN && gate_mode != AIRMOE_GATES_SIGMOID)
        invalid("gate_mode = " + std::to_string(gate_mode) +
                " is not one the distributed router forms (0 chosen, 2 sigmoid)");
    });
    airmoe::comm::require_same_config(*router->comm->mpi, std::to_string(gate_mode),
                                      "airmoe_dist_router_set_gate_mode gate_mode");
    router->gate_mode =
        gate_mode == AIRMOE_GATES_CHOSEN ? airmoe::GateMode::kChosen : airmoe::GateMode::kSigmoid;
  });
}

airmoe_status airmoe_dist_router_set_bias(airmoe_dist_router* router, const float* bias,
                                          int64_t experts) {
  return guarded("airmoe_dist_router_set_bias", [&] {
    require_dist_router(router);
    const bool clear = bias == nullptr && experts == 0;
    check_on_every_rank(router->comm, [&] {
      if (!clear) require_array(bias, experts, 1, 1, "bias", "experts", "1");
    });
    airmoe::comm::require_same_config(*router->comm->mpi, clear ? "clear" : "set",
                                      "airmoe_dist_router_set_bias (a bias on some ranks, none "
                                      "on others)");
    if (clear) {
      router->router->clear_bias();
      return;
    }
    router->router->set_bias(airmoe::bias_view({bias, static_cast<size_t>(experts)}).matrix());
  });
}

airmoe_status airmoe_dist_router_set_request_keys(airmoe_dist_router* router, int bits) {
  return guarded("airmoe_dist_router_set_request_keys", [&] {
    require_dist_router(router);
    router->router->set_request_keys(bits);
  });
}

airmoe_status airmoe_dist_router_info(const airmoe_dist_router* router, int64_t* experts,
                                      int64_t* dim, int64_t* codewords, int64_t* hosted) {
  return guarded("airmoe_dist_router_info", [&] {
    require_dist_router(router);
    require_nonnull(experts, "experts");
    require_nonnull(dim, "dim");
    require_nonnull(codewords, "codewords");
    require_nonnull(hosted, "hosted");
    *experts = router->experts;
    *dim = router->dim;
    *codewords = router->router->codebook().size();
    *hosted = static_cast<int64_t>(router->router->local_experts().size());
  });
}

}  // extern "C"
