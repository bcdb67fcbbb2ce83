// airmoe._airmoe: the pybind11 extension under the PyTorch package.
//
// Zero-copy contract: every matrix argument is a NumPy array that must
// already be float32, 2-D and C-contiguous; its buffer is wrapped in a
// MatrixView as it is. Nothing is converted or copied on the way in: another
// dtype, layout or rank is an std::invalid_argument (Python ValueError) that
// says what was expected. Results are moved into NumPy arrays that own the
// C++ buffers (no copy on the way out either).
//
// Errors: std::invalid_argument -> ValueError (bad arguments, with the C++
// router's message), std::runtime_error -> RuntimeError (wrong state, such as
// a codebook update before the router has centers).
//
// MoELayerImpl (the distributed runtime::MoELayer, built by
// runtime/builder.h) works on an MPI communicator given by the address of its
// MPI_Comm handle (mpi4py's MPI._addressof(comm)); it duplicates it. Its
// methods are collectives: every check that can differ between ranks is
// agreed on before data moves, and an error that escapes one rank after a
// collective began aborts the job (MPI_Abort) instead of hanging the others
// (see collective() below). Its
// W1 / W2 are exposed as writable NumPy views of the C++ buffers (w1_view,
// w2_view, kept alive by the layer object), so that torch parameters over
// them update the experts in place.
//
// Threads: route() and backward() release the GIL. Each router object guards
// its state with a shared mutex: routing calls share it, set_centers(),
// sync() and update_codebook() take it exclusively.
//
// Parameters: each router keeps a copy of its torch parameters (AIR builds
// its lists and blocks from it). sync(params) compares them bit for bit with
// that copy before every use and rebuilds on any difference, so changes that
// autograd does not see (.data, NumPy views) reach routing too; backward()
// refuses when the parameters changed after the forward (RuntimeError).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <mpi.h>

#include "comm/mpi_communicator.h"
#include "core/checks.h"
#include "core/errors.h"
#include "core/matrix.h"
#include "router/air_defaults.h"
#include "router/air_router.h"
#include "router/codebook.h"
#include "router/dense_router.h"
#include "router/inverted_lists.h"
#include "router/list_scan.h"
#include "router/product_key_router.h"
#include "router/routes.h"
#include "runtime/builder.h"
#include "runtime/checkpoint.h"
#include "runtime/moe_layer.h"

namespace py = pybind11;

namespace airmoe {
namespace {

// A float32, 2-D, C-contiguous array seen as a MatrixView, without a copy.
MatrixView as_view(const py::array& a, const std::string& what) {
  if (a.ndim() != 2)
    throw std::invalid_argument(what + " must be a 2-D array [rows, cols], got " +
                                std::to_string(a.ndim()) + "-D");
  if (!a.dtype().is(py::dtype::of<float>()))
    throw std::invalid_argument(what + " must be float32, got " + std::string(py::str(a.dtype())) +
                                " (airmoe does not convert silently)");
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(what +
                                " must be C-contiguous (row-major); call .contiguous() on the "
                                "tensor (airmoe does not copy silently)");
  return MatrixView(static_cast<const float*>(a.data()), a.shape(0), a.shape(1));
}

// NumPy arrays that take ownership of C++ buffers.
template <class T>
py::array_t<T> owned(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* p = new std::vector<T>(std::move(v));
  py::capsule base(p, [](void* q) { delete static_cast<std::vector<T>*>(q); });
  return py::array_t<T>(std::move(shape), p->data(), base);
}

py::array_t<float> owned(Matrix&& m) {
  const py::ssize_t rows = m.rows(), cols = m.cols();
  return owned(std::move(m.storage()), {rows, cols});
}

template <class T>
py::array_t<T> copied(const std::vector<T>& v, std::vector<py::ssize_t> shape) {
  py::array_t<T> out(std::move(shape));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

py::array_t<float> copied(MatrixView m) {
  py::array_t<float> out({static_cast<py::ssize_t>(m.rows), static_cast<py::ssize_t>(m.cols)});
  std::copy_n(m.data, m.rows * m.cols, out.mutable_data());
  return out;
}

// True when a and b have the same shape and the same bits. The routers keep
// their own copy of the torch parameters, and a change made behind
// autograd's back (param.data, a NumPy view of the parameter) leaves its
// `_version` alone: comparing the contents is the exact test. 1 MiB chunks
// over the OpenMP threads; once one differs the others stop at their next
// chunk, so after an optimizer step (the first rows differ) this costs
// little, and only unchanged parameters are read whole.
bool same_bits(MatrixView a, MatrixView b) {
  if (a.rows != b.rows || a.cols != b.cols) return false;
  const auto* pa = reinterpret_cast<const unsigned char*>(a.data);
  const auto* pb = reinterpret_cast<const unsigned char*>(b.data);
  const int64_t bytes = a.rows * a.cols * static_cast<int64_t>(sizeof(float));
  constexpr int64_t kChunk = int64_t{1} << 20;
  const int64_t chunks = (bytes + kChunk - 1) / kChunk;
  std::atomic<bool> differ{false};
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    if (differ.load(std::memory_order_relaxed)) continue;
    const int64_t at = c * kChunk;
    const auto n = static_cast<size_t>(std::min(kChunk, bytes - at));
    if (std::memcmp(pa + at, pb + at, n) != 0) differ.store(true, std::memory_order_relaxed);
  }
  return !differ.load();
}

// Whether the rows row_of(e) of a and b hold the same bits, for the expert
// ids e in `experts` (each row compared once). What backward() checks: it
// reads only the rows of the experts the forward chose, so the cost is that
// of the backward itself, not of the whole parameter.
template <typename RowOf>
bool same_rows(MatrixView a, MatrixView b, const std::vector<int32_t>& experts, RowOf row_of) {
  if (a.rows != b.rows || a.cols != b.cols) return false;
  std::vector<char> seen(static_cast<size_t>(a.rows), 0);
  const auto bytes = static_cast<size_t>(a.cols) * sizeof(float);
  for (const int32_t e : experts) {
    const int64_t r = row_of(e);
    if (r < 0 || r >= a.rows) return false;
    if (seen[r]) continue;
    seen[r] = 1;
    if (std::memcmp(a.row(r), b.row(r), bytes) != 0) return false;
  }
  return true;
}

bool same_rows(MatrixView a, MatrixView b, const std::vector<int32_t>& experts) {
  return same_rows(a, b, experts, [](int32_t e) { return int64_t{e}; });
}

Matrix copy_of(MatrixView m) {
  Matrix out(m.rows, m.cols);
  std::copy_n(m.data, m.rows * m.cols, out.data());
  return out;
}

// What route() hands back for backward(): the C++ Routes, kept alive here.
struct RouteHandle {
  Routes routes;
  std::uintptr_t tokens_address = 0;  // the buffer route() read (zero-copy check)
  uint64_t generation = 0;            // of the router parameters it routed with
};

// backward() computes with the router's copy of its parameters. It refuses a
// handle routed with another generation of that copy (parameters changed
// and synced by a later forward) or when the caller's parameters no longer
// equal the copy in the rows it reads (`unchanged` false: changed since,
// through .data or a NumPy view, which autograd's version check does not
// see): the handle's routes and gates came from other values.
void require_forward_parameters(bool unchanged, const char* names) {
  if (unchanged) return;
  throw std::runtime_error(
      std::string("backward: the router's ") + names +
      " changed between the forward and this backward (in place through .data or a NumPy "
      "view, which autograd does not track); the forward's routes and gates came from the old "
      "values: run the forward again after changing them");
}

// route() result: (experts int32 [T, k], gates float32 [T, k], handle).
py::tuple route_result(std::shared_ptr<RouteHandle> h) {
  const Routes& r = h->routes;
  const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(r.tokens), r.k};
  auto experts = copied(r.experts, shape);
  auto gates = copied(r.gates, shape);
  return py::make_tuple(experts, gates, std::move(h));
}

// Runs route(tokens view) with the GIL released, under a shared lock on the
// router, and packs the result with a handle that keeps the C++ routes, the
// parameters' generation (for backward) and the tokens' address (for the
// zero-copy check).
template <typename Route>
py::tuple routed(const py::array& tokens, std::shared_mutex& mutex, const uint64_t& generation,
                 Route&& route) {
  const MatrixView t = as_view(tokens, "tokens");
  auto h = std::make_shared<RouteHandle>();
  h->tokens_address = reinterpret_cast<std::uintptr_t>(t.data);
  {
    py::gil_scoped_release release;
    std::shared_lock lock(mutex);
    h->routes = route(t);
    h->generation = generation;
  }
  return route_result(std::move(h));
}

// Runs backward(tokens, d_gates) with the GIL released, under a shared lock.
template <typename Backward>
auto backed(const py::array& tokens, const py::array& d_gates, std::shared_mutex& mutex,
            Backward&& backward) {
  const MatrixView t = as_view(tokens, "tokens"), dg = as_view(d_gates, "d_gates");
  py::gil_scoped_release release;
  std::shared_lock lock(mutex);
  return backward(t, dg);
}

py::tuple sparse_result(SparseRowGrad&& g) {
  const auto n = static_cast<py::ssize_t>(g.rows.size());
  return py::make_tuple(owned(std::move(g.rows), {n}), owned(std::move(g.values)));
}

// The router's codebook from given codewords: bit for bit when they are unit
// rows already (the router's own, from a state_dict or a copy), so that a
// restored router routes exactly like the original; normalized otherwise.
Codebook codebook_from(MatrixView codewords) {
  try {
    return Codebook::from_unit_rows(codewords);
  } catch (const std::invalid_argument&) {
    return Codebook(codewords);  // normalizes; throws on zero or non-finite rows
  }
}

// AirRouter with an unbuilt state: constructed from the configuration alone,
// built by the first set_centers() (which trains the codebook) or sync().
class AirIndex {
 public:
  AirIndex(int64_t dim, const AirConfig& config) : dim_(dim), config_(config) {
    if (dim < 1) throw std::invalid_argument("dim must be >= 1, got " + std::to_string(dim));
  }

  bool built() const {
    std::shared_lock lock(mutex_);
    return router_.has_value();
  }

  // First call: trains the codebook (spherical k-means) on the centers.
  // Later calls: new centers, same codebook, lists rebuilt.
  void set_centers(MatrixView centers) {
    require_dim(centers, "centers");
    std::unique_lock lock(mutex_);
    if (router_) {
      router_->set_centers(centers);
      ++generation_;
    } else {
      router_.emplace(centers, config_);
      given_codewords_ = copy_of(router_->codebook().codewords());
    }
  }

  // Brings the router up to date with the torch centers and codebook:
  // rebuilt on other codewords, lists rebuilt on other centers, nothing when
  // both hold the bits of the last sync. An unbuilt router (a copy being
  // restored) is built from them. True when anything changed.
  bool sync(const py::array& centers_array, const py::array& codewords_array) {
    const MatrixView centers = as_view(centers_array, "centers");
    const MatrixView codewords = as_view(codewords_array, "codewords");
    require_dim(centers, "centers");
    require_dim(codewords, "codewords");
    py::gil_scoped_release release;
    std::unique_lock lock(mutex_);
    const bool new_codebook = !router_ || !same_bits(codewords, given_codewords_.view());
    const bool new_centers = !router_ || !same_bits(centers, router_->centers());
    if (new_codebook) {
      AirRouter fresh(centers, codebook_from(codewords),
                      ListOptions{config_.list_cap, config_.spills, config_.spill_lambda});
      router_ = std::move(fresh);
      given_codewords_ = copy_of(codewords);
    } else if (new_centers) {
      router_->set_centers(centers);
    }
    if (new_centers) ++generation_;
    return new_codebook || new_centers;
  }

  void update_codebook(double step, int updates) {
    std::unique_lock lock(mutex_);
    if (!router_)
      throw std::runtime_error(
          "update_codebook: the AIR router has no expert centers yet, so there is no codebook "
          "to update; call set_centers(centers) first");
    if (!(step > 0.0 && step <= 1.0))
      throw std::invalid_argument("update_codebook: step must be in (0, 1], got " +
                                  std::to_string(step));
    router_->update_codebook(step, updates);
    given_codewords_ = copy_of(router_->codebook().codewords());  // what Python copies back
  }

  // gate_mode: "chosen" (softmax over the k chosen) or "shortlist" (over
  // every expert scored); the backward follows the routes' mode.
  py::tuple route(const py::array& tokens, int k, int probes, const std::string& gate_mode) const {
    const GateMode mode = gate_mode_from_string(gate_mode);
    return routed(tokens, mutex_, generation_,
                  [&](MatrixView t) { return get("route").route(t, k, probes, mode); });
  }

  py::tuple backward(const py::array& tokens, const RouteHandle& h, const py::array& d_gates,
                     const py::array& centers) const {
    const MatrixView c = as_view(centers, "centers");
    RouterGradients g = backed(tokens, d_gates, mutex_, [&](MatrixView t, MatrixView dg) {
      const AirRouter& r = get("backward");
      require_forward_parameters(
          h.generation == generation_ && same_rows(c, r.centers(), h.routes.experts), "centers");
      return r.backward(t, h.routes, dg);
    });
    return py::make_tuple(owned(std::move(g.d_tokens)), sparse_result(std::move(g.d_centers)));
  }

  py::array_t<float> codewords() const {
    std::shared_lock lock(mutex_);
    return copied(get("codewords").codebook().codewords());
  }
  py::array_t<float> centers() const {
    std::shared_lock lock(mutex_);
    return copied(get("centers").centers());
  }
  py::array_t<int64_t> list_sizes() const {
    std::shared_lock lock(mutex_);
    const AirRouter& r = get("list_sizes");
    std::vector<int64_t> sizes(static_cast<size_t>(r.codewords()));
    for (int64_t c = 0; c < r.codewords(); ++c) sizes[c] = r.lists().list_size(c);
    return owned(std::move(sizes), {static_cast<py::ssize_t>(r.codewords())});
  }

  int64_t dim() const { return dim_; }
  int64_t codeword_count() const { return config_.codewords; }
  int64_t experts() const {
    std::shared_lock lock(mutex_);
    return router_ ? router_->experts() : 0;
  }

 private:
  void require_dim(MatrixView m, const char* what) const {
    if (m.cols != dim_)
      throw std::invalid_argument(std::string(what) + " has " + std::to_string(m.cols) +
                                  " columns, expected " + std::to_string(dim_));
  }
  const AirRouter& get(const char* op) const {
    if (!router_)
      throw std::runtime_error(std::string(op) +
                               ": the AIR router has no expert centers yet; call "
                               "set_centers(centers) first");
    return *router_;
  }

  int64_t dim_;
  AirConfig config_;
  std::optional<AirRouter> router_;
  Matrix given_codewords_;   // the codewords of the last sync, as given (sync compares them)
  uint64_t generation_ = 0;  // of the centers copy, see RouteHandle
  mutable std::shared_mutex mutex_;
};

class DenseIndex {
 public:
  explicit DenseIndex(const py::array& centers) : router_(as_view(centers, "centers")) {}

  // Rebuilds the router from `centers` unless they hold the bits it has;
  // true when it did (a new generation).
  bool sync(const py::array& centers_array) {
    const MatrixView centers = as_view(centers_array, "centers");
    py::gil_scoped_release release;
    std::unique_lock lock(mutex_);
    if (same_bits(centers, router_.centers())) return false;
    router_ = DenseRouter(centers);
    ++generation_;
    return true;
  }

  py::tuple route(const py::array& tokens, int k) const {
    return routed(tokens, mutex_, generation_, [&](MatrixView t) { return router_.route(t, k); });
  }

  py::tuple backward(const py::array& tokens, const RouteHandle& h, const py::array& d_gates,
                     const py::array& centers) const {
    const MatrixView c = as_view(centers, "centers");
    RouterGradients g = backed(tokens, d_gates, mutex_, [&](MatrixView t, MatrixView dg) {
      require_forward_parameters(
          h.generation == generation_ && same_rows(c, router_.centers(), h.routes.experts),
          "centers");
      return router_.backward(t, h.routes, dg);
    });
    return py::make_tuple(owned(std::move(g.d_tokens)), sparse_result(std::move(g.d_centers)));
  }

  int64_t experts() const { return router_.experts(); }
  int64_t dim() const { return router_.dim(); }

 private:
  DenseRouter router_;
  uint64_t generation_ = 0;  // of the centers copy, see RouteHandle
  mutable std::shared_mutex mutex_;
};

class ProductKeyIndex {
 public:
  ProductKeyIndex(const py::array& keys1, const py::array& keys2)
      : router_(as_view(keys1, "keys1"), as_view(keys2, "keys2")) {}

  // As DenseIndex::sync, for both sub-key sets.
  bool sync(const py::array& keys1_array, const py::array& keys2_array) {
    const MatrixView keys1 = as_view(keys1_array, "keys1"), keys2 = as_view(keys2_array, "keys2");
    py::gil_scoped_release release;
    std::unique_lock lock(mutex_);
    if (same_bits(keys1, router_.keys1()) && same_bits(keys2, router_.keys2())) return false;
    router_ = ProductKeyRouter(keys1, keys2);
    ++generation_;
    return true;
  }

  py::tuple route(const py::array& tokens, int k) const {
    return routed(tokens, mutex_, generation_, [&](MatrixView t) { return router_.route(t, k); });
  }

  // (d_tokens, (rows1, values1), (rows2, values2))
  py::tuple backward(const py::array& tokens, const RouteHandle& h, const py::array& d_gates,
                     const py::array& keys1, const py::array& keys2) const {
    const MatrixView k1 = as_view(keys1, "keys1"), k2 = as_view(keys2, "keys2");
    ProductKeyGradients g = backed(tokens, d_gates, mutex_, [&](MatrixView t, MatrixView dg) {
      const int64_t n = router_.subkeys();  // expert i * n + j: keys1 row i, keys2 row j
      const std::vector<int32_t>& experts = h.routes.experts;
      require_forward_parameters(
          h.generation == generation_ &&
              same_rows(k1, router_.keys1(), experts, [n](int32_t e) { return e / n; }) &&
              same_rows(k2, router_.keys2(), experts, [n](int32_t e) { return e % n; }),
          "keys1/keys2");
      return router_.backward(t, h.routes, dg);
    });
    return py::make_tuple(owned(std::move(g.d_tokens)), sparse_result(std::move(g.d_keys1)),
                          sparse_result(std::move(g.d_keys2)));
  }

  int64_t subkeys() const { return router_.subkeys(); }
  int64_t experts() const { return router_.experts(); }
  int64_t dim() const { return router_.dim(); }
  int64_t half_dim() const { return router_.half_dim(); }

 private:
  ProductKeyRouter router_;
  uint64_t generation_ = 0;  // of the keys copy, see RouteHandle
  mutable std::shared_mutex mutex_;
};

// ---------------------------------------------------------------------------
// The distributed MoE layer (runtime::MoELayer) over an MPI communicator that
// Python hands in (mpi4py: the address of its MPI_Comm handle). Every method
// is collective: every rank of the communicator calls it, in the same order.

// What forward() hands back for backward(): the C++ dispatch handle plus the
// tokens array of its forward (kept alive with it).
struct LayerPlanHandle {
  runtime::DispatchHandle handle;
  py::object tokens;
  bool used = false;
};

// Every collective call of MoELayerImpl runs through this. Errors that every
// rank raised together (core/errors.h: raised_together) reach Python as
// ValueError or RuntimeError, and the ranks stay in step. Any other error
// means this rank left a collective that the others are still inside, where
// they would wait forever: the job is aborted, with a message naming the
// rank, instead of hanging.
template <typename Call>
auto collective(MPI_Comm comm, int rank, const char* what, Call&& call) -> decltype(call()) {
  std::string message;
  try {
    return call();
  } catch (const std::exception& e) {
    if (raised_together(e)) throw;
    message = e.what();
  } catch (...) {
    message = "unknown error";
  }
  std::fprintf(stderr,
               "airmoe.MoELayer.%s: rank %d: %s\nairmoe: rank %d left a collective the other "
               "ranks are still in; aborting the job so that they do not wait forever\n",
               what, rank, message.c_str(), rank);
  std::fflush(stderr);
  MPI_Abort(comm, 1);
  std::abort();  // MPI_Abort does not return
}

// The MoELayer arguments Python passes, before they are checked.
struct LayerArgs {
  std::string strategy, activation, placement;
  int k = 0, probes = 0, kmeans_iterations = 0;
  int64_t hidden = 0, codewords = 0;
  uint64_t kmeans_seed = 0, expert_seed = 0;

  runtime::LayerSpec spec(MatrixView centers) const {
    runtime::LayerSpec s;
    s.experts = centers.rows;
    s.dim = centers.cols;
    s.strategy = runtime::strategy_from_string(strategy);
    s.k = k;
    s.probes = probes;
    s.codewords = codewords;
    s.kmeans_iterations = kmeans_iterations;
    s.kmeans_seed = kmeans_seed;
    s.placement = runtime::placement_policy_from_string(placement);
    s.hidden = hidden;
    s.activation = runtime::activation_from_string(activation);
    s.expert_seed = expert_seed;
    return s;
  }
};

// The MPI_Comm that mpi4py's handle at `comm_address` holds, checked.
MPI_Comm mpi_comm_at(std::uintptr_t comm_address) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized)
    throw std::runtime_error(
        "MoELayer: MPI is not initialized (or already finalized); import mpi4py.MPI first");
  if (comm_address == 0) throw std::invalid_argument("MoELayer: null MPI communicator address");
  const MPI_Comm mpi_comm = *reinterpret_cast<const MPI_Comm*>(comm_address);
  if (mpi_comm == MPI_COMM_NULL)
    throw std::invalid_argument("MoELayer: the communicator is MPI_COMM_NULL");
  return mpi_comm;
}

class MoELayerImpl {
 public:
  // Collective: the layer of the checkpoint in `dir` (runtime/checkpoint.h).
  // local_error: what the Python side found wrong with this rank's path ("":
  // nothing), raised on every rank together.
  MoELayerImpl(std::uintptr_t comm_address, const std::string& dir, const std::string& local_error)
      : comm_(std::make_unique<comm::MpiCommunicator>(mpi_comm_at(comm_address))) {
    collective("load_checkpoint", [&] {
      comm::raise_together(*comm_, local_error, "MoELayer.load_checkpoint");
      layer_ = runtime::load_checkpoint(*comm_, dir);
      const MatrixView cw = layer_->codebook().codewords();
      codewords_ = Matrix(cw.rows, cw.cols);
      std::copy_n(cw.data, cw.rows * cw.cols, codewords_.data());
    });
  }

  // local_error: what the Python side found wrong with this rank's arguments
  // ("" for nothing); it is raised on every rank together with the checks
  // here, so a rank with bad input never leaves the others waiting.
  MoELayerImpl(std::uintptr_t comm_address, const LayerArgs& args, const py::object& centers,
               const py::object& sample, const std::string& local_error)
      : comm_(std::make_unique<comm::MpiCommunicator>(mpi_comm_at(comm_address))) {
    collective("__init__", [&] {
      runtime::LayerSpec spec;
      MatrixView c, t;
      comm::check_together(*comm_, "MoELayer", [&] {
        if (!local_error.empty()) fail(local_error);
        c = as_view(centers.cast<py::array>(), "centers");
        if (!sample.is_none()) t = as_view(sample.cast<py::array>(), "load sample");
        spec = args.spec(c);
      });
      const runtime::SharedIndex index = runtime::agree_on_index(*comm_, spec, c, t);
      codewords_ = Matrix(index.codebook.size(), index.codebook.dim());
      std::copy_n(index.codebook.codewords().data, codewords_.size(), codewords_.data());
      layer_ = runtime::make_layer(*comm_, spec, index,
                                   runtime::place_experts(*comm_, spec, index).placement, c);
    });
  }

  // Collective: raises `local_error` ("" for none) on every rank together
  // (ValueError naming the failing rank); the Python side's checks go here.
  void raise_together(const std::string& local_error, const std::string& what) {
    collective("raise_together",
               [&] { comm::raise_together(*comm_, local_error, ("MoELayer." + what).c_str()); });
  }

  py::tuple forward(const py::array& tokens) {
    auto h = std::make_shared<LayerPlanHandle>();
    h->tokens = tokens;
    runtime::ForwardResult out = collective("forward", [&] {
      MatrixView t;
      comm::check_together(*comm_, "MoELayer.forward", [&] { t = as_view(tokens, "tokens"); });
      py::gil_scoped_release release;
      return layer_->forward(t);
    });
    h->handle = std::move(out.handle);
    return py::make_tuple(owned(std::move(out.output)), std::move(h));
  }

  // (d_tokens [T, d], dW1 [hosted, h, d], dW2 [hosted, d, h], (center ids, rows))
  py::tuple backward(LayerPlanHandle& h, const py::array& d_out) {
    runtime::MoEGradients g = collective("backward", [&] {
      MatrixView dy;
      comm::check_together(*comm_, "MoELayer.backward", [&] {
        if (h.used) fail("this plan was already used for a backward");
        dy = as_view(d_out, "d_out");
      });
      py::gil_scoped_release release;
      runtime::MoEGradients grads = layer_->backward(h.handle, dy);
      // Autograd takes the hosted experts' layout, whatever the config asks.
      grads.dense_experts = layer_->experts().to_dense(grads.touched_experts);
      return grads;
    });
    h.used = true;
    const auto n = static_cast<py::ssize_t>(layer_->experts().size());
    const auto d = static_cast<py::ssize_t>(layer_->config().expert.dim);
    const auto hid = static_cast<py::ssize_t>(layer_->config().expert.hidden);
    const auto rows1 = static_cast<py::ssize_t>(layer_->config().expert.w1_rows());
    return py::make_tuple(
        owned(std::move(g.d_tokens)), owned(std::move(g.dense_experts.w1), {n, rows1, d}),
        owned(std::move(g.dense_experts.w2), {n, d, hid}), sparse_result(std::move(g.d_centers)));
  }

  // Collective: the layer's checkpoint into `dir` (runtime/checkpoint.h);
  // "" or, on rank 0, where the previous checkpoint was left undeleted.
  std::string save_checkpoint(const std::string& dir) {
    return collective("save_checkpoint",
                      [&] { return runtime::save_checkpoint(*layer_, dir).leftover; });
  }

  void set_local_centers(const py::array& centers) {
    collective("set_local_centers", [&] {
      MatrixView v;
      comm::check_together(*comm_, "MoELayer.set_local_centers",
                           [&] { v = as_view(centers, "centers_local"); });
      py::gil_scoped_release release;
      layer_->set_local_centers(v);
    });
  }

  runtime::MoELayer& layer() { return *layer_; }
  const Matrix& codewords() const { return codewords_; }
  int rank() const { return comm_->rank(); }
  int size() const { return comm_->size(); }

 private:
  template <typename Call>
  auto collective(const char* what, Call&& call) -> decltype(call()) {
    return airmoe::collective(comm_->comm(), comm_->rank(), what, std::forward<Call>(call));
  }

  std::unique_ptr<comm::MpiCommunicator> comm_;  // outlives layer_ (declared first)
  Matrix codewords_;
  std::unique_ptr<runtime::MoELayer> layer_;
};

// A writable NumPy view of a C++ float buffer, kept alive by `owner`.
py::array_t<float> shared_view(float* data, std::vector<py::ssize_t> shape, py::handle owner) {
  return py::array_t<float>(std::move(shape), data, owner);
}

}  // namespace
}  // namespace airmoe

PYBIND11_MODULE(_airmoe, m) {
  using namespace airmoe;
  m.doc() =
      "airmoe C++ routers (AIR, dense, product-key). Matrix arguments must be float32, 2-D, "
      "C-contiguous NumPy arrays; they are read in place, never copied or converted.";
  m.def(
      "recommended_air",
      [](int64_t experts) {
        const AirDefaults d = recommended_air(experts);
        return py::make_tuple(d.codewords, d.probes);
      },
      py::arg("experts"),
      "(C, m) AIR starts from for E experts: C ~ sqrt(E), m from docs/routing.md's table.");

  py::class_<RouteHandle, std::shared_ptr<RouteHandle>>(
      m, "RouteHandle", "The C++ routes of one route() call, kept for backward().")
      .def_property_readonly("tokens", [](const RouteHandle& h) { return h.routes.tokens; })
      .def_property_readonly("k", [](const RouteHandle& h) { return h.routes.k; })
      .def_property_readonly("tokens_address",
                             [](const RouteHandle& h) { return h.tokens_address; })
      .def_property_readonly(
          "logits",
          [](const RouteHandle& h) {
            return copied(h.routes.logits, {static_cast<py::ssize_t>(h.routes.tokens), h.routes.k});
          })
      .def_property_readonly("shortlist_size", [](const RouteHandle& h) {
        return copied(h.routes.shortlist_size, {static_cast<py::ssize_t>(h.routes.tokens)});
      });

  py::class_<AirIndex>(m, "AirIndex",
                       "Adaptive inverted-index router. Unbuilt until the first set_centers(), "
                       "which trains the codebook.")
      .def(py::init([](int64_t dim, int64_t codewords, int kmeans_iterations, uint64_t seed,
                       int64_t list_cap, int spills, double spill_lambda) {
             return new AirIndex(dim, AirConfig{codewords, kmeans_iterations, seed, list_cap,
                                                spills, spill_lambda});
           }),
           py::arg("dim"), py::arg("codewords"), py::arg("kmeans_iterations") = 10,
           py::arg("seed") = 1234, py::arg("list_cap") = 0, py::arg("spills") = 0,
           py::arg("spill_lambda") = 1.0)
      .def_property_readonly("built", &AirIndex::built)
      .def_property_readonly("dim", &AirIndex::dim)
      .def_property_readonly("codeword_count", &AirIndex::codeword_count)
      .def_property_readonly("experts", &AirIndex::experts)
      .def(
          "set_centers",
          [](AirIndex& self, const py::array& centers) {
            self.set_centers(as_view(centers, "centers"));
          },
          py::arg("centers"))
      .def("sync", &AirIndex::sync, py::arg("centers"), py::arg("codewords"),
           "Follows the torch centers and codebook (compared bit for bit): True when it changed.")
      .def("update_codebook", &AirIndex::update_codebook, py::arg("step") = 1.0,
           py::arg("updates") = 1)
      .def("route", &AirIndex::route, py::arg("tokens"), py::arg("k"), py::arg("probes"),
           py::arg("gate_mode") = "chosen")
      .def("backward", &AirIndex::backward, py::arg("tokens"), py::arg("handle"),
           py::arg("d_gates"), py::arg("centers"))
      .def("codewords", &AirIndex::codewords)
      .def("centers", &AirIndex::centers)
      .def("list_sizes", &AirIndex::list_sizes);

  py::class_<DenseIndex>(m, "DenseIndex", "Exact top-k router over all E centers.")
      .def(py::init<const py::array&>(), py::arg("centers"))
      .def_property_readonly("experts", &DenseIndex::experts)
      .def_property_readonly("dim", &DenseIndex::dim)
      .def("sync", &DenseIndex::sync, py::arg("centers"),
           "Follows the torch centers (compared bit for bit): True when they changed.")
      .def("route", &DenseIndex::route, py::arg("tokens"), py::arg("k"))
      .def("backward", &DenseIndex::backward, py::arg("tokens"), py::arg("handle"),
           py::arg("d_gates"), py::arg("centers"));

  py::class_<ProductKeyIndex>(m, "ProductKeyIndex", "Product-key router, E = n^2.")
      .def(py::init<const py::array&, const py::array&>(), py::arg("keys1"), py::arg("keys2"))
      .def_property_readonly("subkeys", &ProductKeyIndex::subkeys)
      .def_property_readonly("experts", &ProductKeyIndex::experts)
      .def_property_readonly("dim", &ProductKeyIndex::dim)
      .def_property_readonly("half_dim", &ProductKeyIndex::half_dim)
      .def("sync", &ProductKeyIndex::sync, py::arg("keys1"), py::arg("keys2"),
           "Follows the torch keys (compared bit for bit): True when they changed.")
      .def("route", &ProductKeyIndex::route, py::arg("tokens"), py::arg("k"))
      .def("backward", &ProductKeyIndex::backward, py::arg("tokens"), py::arg("handle"),
           py::arg("d_gates"), py::arg("keys1"), py::arg("keys2"));

  py::class_<LayerPlanHandle, std::shared_ptr<LayerPlanHandle>>(
      m, "LayerPlan", "The C++ dispatch handle of one MoELayer forward, kept for its backward.")
      .def_property_readonly("tokens",
                             [](const LayerPlanHandle& h) { return h.handle.routes().tokens; })
      .def_property_readonly("experts", [](const LayerPlanHandle& h) {
        const Routes& r = h.handle.routes();
        return copied(r.experts, {static_cast<py::ssize_t>(r.tokens), r.k});
      });

  py::class_<MoELayerImpl>(m, "MoELayerImpl",
                           "runtime::MoELayer over an MPI communicator (collective methods).")
      .def(py::init([](std::uintptr_t comm_address, const std::string& strategy, int k, int probes,
                       int64_t hidden, const std::string& activation, int64_t codewords,
                       int kmeans_iterations, uint64_t kmeans_seed, const std::string& placement,
                       uint64_t expert_seed, const py::object& centers, const py::object& sample,
                       const std::string& local_error) {
             const LayerArgs args{strategy,    activation,        placement, k,
                                  probes,      kmeans_iterations, hidden,    codewords,
                                  kmeans_seed, expert_seed};
             return new MoELayerImpl(comm_address, args, centers, sample, local_error);
           }),
           py::arg("comm_address"), py::arg("strategy"), py::arg("k"), py::arg("probes"),
           py::arg("hidden"), py::arg("activation"), py::arg("codewords"),
           py::arg("kmeans_iterations"), py::arg("kmeans_seed"), py::arg("placement"),
           py::arg("expert_seed"), py::arg("centers"), py::arg("sample") = py::none(),
           py::arg("local_error") = "",
           "Collective. local_error: this rank's own argument error (\"\": none), raised on "
           "every rank together.")
      .def_property_readonly("rank", &MoELayerImpl::rank)
      .def_property_readonly("size", &MoELayerImpl::size)
      .def_property_readonly(
          "strategy",
          [](MoELayerImpl& s) { return std::string(runtime::to_string(s.layer().strategy())); })
      .def_property_readonly("experts",
                             [](MoELayerImpl& s) { return s.layer().placement().experts(); })
      .def_property_readonly("dim", [](MoELayerImpl& s) { return s.layer().config().expert.dim; })
      .def_property_readonly("hidden",
                             [](MoELayerImpl& s) { return s.layer().config().expert.hidden; })
      .def(py::init<std::uintptr_t, const std::string&, const std::string&>(),
           py::arg("comm_address"), py::arg("checkpoint_dir"), py::arg("local_error") = "",
           "Collective: the layer of a checkpoint, at this job's P. local_error: this rank's "
           "own path error (\"\": none), raised on every rank together.")
      .def(
          "save_checkpoint",
          [](MoELayerImpl& s, const std::string& dir) {
            py::gil_scoped_release release;
            return s.save_checkpoint(dir);
          },
          py::arg("dir"),
          "Collective: writes the layer's checkpoint into dir; returns \"\" or, on rank 0, "
          "where the previous checkpoint was left because it could not be removed.")
      .def_property_readonly("config",
                             [](MoELayerImpl& s) {
                               const runtime::MoEConfig& c = s.layer().config();
                               py::dict d;
                               d["k"] = c.k;
                               d["probes"] = c.probes;
                               d["activation"] = runtime::to_string(c.expert.activation);
                               d["codewords"] = s.layer().codebook().size();
                               return d;
                             })
      .def("forward", &MoELayerImpl::forward, py::arg("tokens"))
      .def("set_local_centers", &MoELayerImpl::set_local_centers, py::arg("centers"),
           "Collective: this rank's (possibly moved) centers, hosted order; every rank calls it.")
      .def("raise_together", &MoELayerImpl::raise_together, py::arg("local_error"), py::arg("what"),
           "Collective: this rank's error (\"\": none) raised as ValueError on every rank.")
      .def("backward", &MoELayerImpl::backward, py::arg("plan"), py::arg("d_out"))
      .def("hosted",
           [](MoELayerImpl& s) {
             const auto& ids = s.layer().hosted();
             return copied(ids, {static_cast<py::ssize_t>(ids.size())});
           })
      .def("owners",
           [](MoELayerImpl& s) {
             const auto& o = s.layer().placement().owners();
             return copied(o, {static_cast<py::ssize_t>(o.size())});
           })
      .def("codewords", [](MoELayerImpl& s) { return copied(s.codewords().view()); })
      .def("local_centers",
           [](MoELayerImpl& s) { return copied(s.layer().local_centers().view()); })
      .def(
          "w1_view",
          [](py::object self) {
            auto& s = self.cast<MoELayerImpl&>();
            auto& ex = s.layer().experts();
            return shared_view(
                ex.w1_data().data(),
                {static_cast<py::ssize_t>(ex.size()), ex.config().w1_rows(), ex.config().dim},
                self);
          },
          "Writable NumPy view of this rank's W1 [hosted, h, d] ([hosted, 2h, d] for swiglu: "
          "the gate rows, then the up rows; the C++ memory itself).")
      .def(
          "w2_view",
          [](py::object self) {
            auto& s = self.cast<MoELayerImpl&>();
            auto& ex = s.layer().experts();
            return shared_view(
                ex.w2_data().data(),
                {static_cast<py::ssize_t>(ex.size()), ex.config().dim, ex.config().hidden}, self);
          },
          "Writable NumPy view of this rank's W2 [hosted, d, h] (the C++ memory itself).");

  m.def(
      "train_codebook",
      [](const py::array& centers, int64_t codewords, int iterations, uint64_t seed) {
        const MatrixView c = as_view(centers, "centers");
        Codebook cb;
        {
          py::gil_scoped_release release;
          cb = train_codebook(c, {codewords, iterations, seed});
        }
        return copied(cb.codewords());
      },
      py::arg("centers"), py::arg("codewords"), py::arg("iterations") = 20, py::arg("seed") = 1234,
      "Spherical k-means codebook [C, d] (unit rows) over the normalized centers.");

  m.def(
      "view_address",
      [](const py::array& a) { return reinterpret_cast<std::uintptr_t>(as_view(a, "array").data); },
      py::arg("array"), "Debug: the address the C++ side reads for this array (no copy).");
}
