// airmoe._airmoe: the pybind11 extension under the PyTorch package.
//
// Routers (AirIndex, DenseIndex, ProductKeyIndex): tensor arguments cross by
// DLPack (dlpack.h), zero-copy, on the host or on a GPU, float32 or
// bfloat16, 2-D with rows of consecutive elements; anything else is a
// ValueError naming the argument (airmoe converts nothing silently). An
// index runs on the backend of its parameters' device (the fastest host
// backend, or cuda:N) and on the CUDA stream each call passes (torch's
// current stream; the host ignores it). Results leave as DLPack capsules of
// the ops' tensors (torch.utils.dlpack.from_dlpack takes them over without
// a copy): experts int32 [T, k], gates float32 [T, k], gradients float32.
// AIR keeps its centers and codebook in float32 and trains and rebuilds its
// lists on the host: AirIndex takes them as host float32 tensors (the
// Python side converts, once per change).
//
// Errors: std::invalid_argument -> ValueError (bad arguments, with the C++
// router's message), std::runtime_error -> RuntimeError (wrong state, such as
// a codebook update before the router has centers, or a CUDA error).
//
// Selection bias: set_bias(bias, stream) sets it on the C++ router under
// the exclusive lock (None clears it); a router that sync() rebuilds keeps
// it. Python hands the module's float32 buffer over before every forward.
//
// MoELayerImpl (layer_bindings.cpp, in every build) keeps NumPy float32
// arguments (arrays.h).
//
// Threads: route() and backward() release the GIL. Each router object guards
// its state with a shared mutex: host routing calls share it; device calls
// take it exclusively (they set the router's stream); set_centers(), sync()
// and update_codebook() take it exclusively.
//
// Parameters: each router keeps a copy of its torch parameters (AIR builds
// its lists and blocks from it). On the host, sync(params) compares them bit
// for bit with that copy before every use and rebuilds on any difference,
// so changes that autograd does not see (.data, NumPy views) reach routing
// too; backward() refuses when the parameters changed after the forward
// (RuntimeError). On a GPU the copy is not read back: the Python side
// compares on the device and calls sync() when they changed, which then
// rebuilds; backward() checks the generation, Python the contents.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "arrays.h"
#include "bindings.h"
#include "core/errors.h"
#include "core/matrix.h"
#include "dlpack.h"
#include "ops/boundary.h"
#include "ops/registry.h"
#include "router/air_defaults.h"
#include "router/air_router.h"
#include "router/codebook.h"
#include "router/dense_router.h"
#include "router/inverted_lists.h"
#include "router/product_key_router.h"
#include "router/query_lists.h"
#include "router/routes.h"

namespace airmoe {
namespace {

using dlpack::export_tensor;
using dlpack::import_tensor;
using dlpack::TensorArg;

// The bytes of row r of a host view.
const unsigned char* row_bytes(TensorView v, int64_t r) {
  return static_cast<const unsigned char*>(v.data) + r * v.ld * dtype_size(v.dtype);
}

// True when host views a and b have the same dtype, shape and bits. The
// routers keep their own copy of the torch parameters, and a change made
// behind autograd's back (param.data, a NumPy view of the parameter) leaves
// its `_version` alone: comparing the contents is the exact test. Rows in
// 1 MiB chunks over the OpenMP threads; once one differs the others stop at
// their next chunk, so after an optimizer step (the first rows differ) this
// costs little, and only unchanged parameters are read whole.
bool same_bits(TensorView a, TensorView b) {
  if (a.dtype != b.dtype || a.rows != b.rows || a.cols != b.cols) return false;
  const auto row = static_cast<int64_t>(a.cols * dtype_size(a.dtype));
  if (row == 0) return true;
  const int64_t per_chunk = std::max<int64_t>(1, (int64_t{1} << 20) / row);
  const int64_t chunks = (a.rows + per_chunk - 1) / per_chunk;
  std::atomic<bool> differ{false};
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t end = std::min(a.rows, (c + 1) * per_chunk);
    for (int64_t r = c * per_chunk; r < end; ++r) {
      if (differ.load(std::memory_order_relaxed)) break;
      if (std::memcmp(row_bytes(a, r), row_bytes(b, r), static_cast<size_t>(row)) != 0)
        differ.store(true, std::memory_order_relaxed);
    }
  }
  return !differ.load();
}

// Whether the rows row_of(e) of host views a and b hold the same bits, for
// the expert ids e in `experts` (each row compared once). What backward()
// checks: it reads only the rows of the experts the forward chose, so the
// cost is that of the backward itself, not of the whole parameter.
template <typename RowOf>
bool same_rows(TensorView a, TensorView b, const std::vector<int32_t>& experts, RowOf row_of) {
  if (a.dtype != b.dtype || a.rows != b.rows || a.cols != b.cols) return false;
  std::vector<char> seen(static_cast<size_t>(a.rows), 0);
  const auto bytes = static_cast<size_t>(a.cols) * dtype_size(a.dtype);
  for (const int32_t e : experts) {
    const int64_t r = row_of(e);
    if (r < 0 || r >= a.rows) return false;
    if (seen[r]) continue;
    seen[r] = 1;
    if (std::memcmp(row_bytes(a, r), row_bytes(b, r), bytes) != 0) return false;
  }
  return true;
}

// The row of expert e in a centers matrix: row e.
int64_t expert_row(int32_t e) {
  return e;
}

// A host float32 copy of a view of the ops' device.
Matrix host_matrix(const Compute& compute, TensorView v) {
  Matrix out(v.rows, v.cols);
  if (out.size() > 0)
    compute.ops->copy(TensorView(out.data(), DType::kF32, Device::host(), v.rows, v.cols), v,
                      compute.stream);
  compute.ops->synchronize(compute.stream);
  return out;
}

// A copy of v on the ops' device (what a result capsule takes over while
// the routes keep theirs for backward()).
Tensor duplicate(const Compute& compute, TensorView v) {
  Tensor out = compute.ops->empty(v.dtype, v.rows, v.cols);
  if (!v.empty()) compute.ops->copy(out, v, compute.stream);
  return out;
}

// The AIR router's centers and codebook: host float32 (see the top).
MatrixView host_f32(const TensorArg& a, const std::string& what) {
  const TensorView v = a.view;
  if (!v.device.is_host() || v.dtype != DType::kF32 || !v.contiguous())
    throw UsageError(what + " must reach the AIR index as a contiguous float32 host tensor, got " +
                     std::string(to_string(v.dtype)) + " on " + to_string(v.device));
  return v.matrix();
}

// Both arguments on one device ("keys2 is on host but keys1 on cuda:0").
void require_same_device(const TensorArg& a, const std::string& a_name, const TensorArg& b,
                         const std::string& b_name) {
  if (a.view.device != b.view.device)
    throw UsageError(b_name + " is on " + to_string(b.view.device) + " but " + a_name + " on " +
                     to_string(a.view.device) + ": keep a router's tensors on one device");
}

// What route() hands back for backward(): the routes on the ops' device.
struct RouteHandle {
  DeviceRoutes routes;
  Compute compute;
  std::uintptr_t tokens_address = 0;  // the memory route() read (zero-copy check)
  uint64_t generation = 0;            // of the router parameters it routed with

  std::vector<int32_t> experts() const { return host_vector<int32_t>(compute, routes.experts); }
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

// route() result: (experts int32 [T, k], gates float32 [T, k], handle), the
// first two as DLPack capsules on the router's device.
py::tuple route_result(std::shared_ptr<RouteHandle> h) {
  py::capsule experts = export_tensor(duplicate(h->compute, h->routes.experts));
  py::capsule gates = export_tensor(duplicate(h->compute, h->routes.gates));
  return py::make_tuple(experts, gates, std::move(h));
}

py::tuple sparse_capsules(RowGrads&& g) {
  return py::make_tuple(export_tensor(std::move(g.rows)), export_tensor(std::move(g.values)));
}

// What the three indexes share: the compute of their parameters' device,
// the generation of their copy of the parameters, and the lock.
class IndexState {
 public:
  explicit IndexState(Compute compute) : compute_(compute) {}

  bool on_host() const { return compute_.ops->device().is_host(); }
  std::string device() const { return dlpack::backend_name(compute_.ops->device()); }

 protected:
  // Runs call(router) under the lock: shared on the host, exclusive on a
  // device, where the router first moves to the caller's stream.
  template <typename Router, typename Call>
  auto locked(Router& router, intptr_t stream, Call&& call) const {
    if (on_host()) {
      std::shared_lock lock(mutex_);
      return call(router);
    }
    return exclusively(router, stream, call);
  }

  // Runs call(router) under the exclusive lock, on the caller's stream.
  template <typename Router, typename Call>
  auto exclusively(Router& router, intptr_t stream, Call&& call) const {
    std::unique_lock lock(mutex_);
    if (!on_host()) router.set_stream(Stream{reinterpret_cast<void*>(stream)});
    return call(router);
  }

  // Sets the selection bias of the router's later routes: experts selected
  // by z + b, gates from z (router/routes.h checked_bias: E finite entries,
  // float32 or bfloat16, on the host or the router's device; copied to the
  // device). None clears it. On the host a bias with the bits the router
  // holds is skipped (Python hands it over before every forward); on a
  // device it is copied again (E floats). A refused bias leaves the router
  // as it was.
  template <typename Router>
  void set_router_bias(Router& router, const py::object& bias, intptr_t stream) {
    std::optional<TensorArg> b;
    if (!bias.is_none()) b = import_tensor(bias, "bias", stream);
    py::gil_scoped_release release;
    exclusively(router, stream, [&](Router& r) {
      if (!b)
        r.clear_bias();
      else if (!on_host() || !same_bits(b->view, r.bias()))
        r.set_bias(b->view);
      return 0;
    });
  }

  // A router rebuilt from new parameters keeps the selection bias of the one
  // it replaces (when the expert count is the same: otherwise none).
  template <typename Router>
  static void carry_bias(const Router& from, Router& to) {
    const TensorView b = from.bias();
    if (!b.empty() && b.rows == to.experts()) to.set_bias(b);
  }

  // Rebuilt parameters must stay on the index's device: moving a router to
  // another device builds a new index.
  void require_index_device(const TensorArg& t, const std::string& name) const {
    if (t.view.device != compute_.ops->device())
      throw UsageError(name + " are on " + to_string(t.view.device) + ", the index on " + device() +
                       ": build a new index");
  }

  // Swaps in a router rebuilt from new parameters; handles of earlier
  // forwards then see another generation.
  template <typename Router>
  void replace_router(Router& current, Router fresh) {
    carry_bias(current, fresh);
    current = std::move(fresh);
    ++generation_;
  }

  // Runs route(router, tokens view) with the GIL released, and packs the
  // result with a handle that keeps the routes, the parameters' generation
  // (for backward) and the tokens' address (for the zero-copy check).
  template <typename Router, typename Route>
  py::tuple routed(Router& router, const py::object& tokens, intptr_t stream, Route&& route) {
    const TensorArg t = import_tensor(tokens, "tokens", stream);
    auto h = std::make_shared<RouteHandle>();
    h->tokens_address = reinterpret_cast<std::uintptr_t>(t.view.data);
    {
      py::gil_scoped_release release;
      locked(router, stream, [&](Router& r) {
        h->routes = route(r, t.view);
        h->compute = r.compute();
        h->generation = generation_;
        return 0;
      });
    }
    return route_result(std::move(h));
  }

  // Runs backward(router, tokens, d_gates) with the GIL released.
  template <typename Router, typename Backward>
  auto backed(Router& router, const py::object& tokens, const py::object& d_gates, intptr_t stream,
              Backward&& backward) {
    const TensorArg t = import_tensor(tokens, "tokens", stream);
    const TensorArg dg = import_tensor(d_gates, "d_gates", stream);
    py::gil_scoped_release release;
    return locked(router, stream, [&](Router& r) { return backward(r, t.view, dg.view); });
  }

  // The generation check of backward(), and on the host the rows check.
  template <typename Same>
  void require_forward(const RouteHandle& h, const char* names, Same&& same) const {
    require_forward_parameters(h.generation == generation_ && (!on_host() || same()), names);
  }

  Compute compute_;
  uint64_t generation_ = 0;  // of the parameters' copy, see RouteHandle
  mutable std::shared_mutex mutex_;
};

// The router's codebook from given codewords: bit for bit when they are unit
// rows already (the router's own, from a state_dict or a copy), so that a
// restored router routes exactly like the original; normalized otherwise.
Codebook codebook_from(MatrixView codewords, const Compute& compute) {
  try {
    return Codebook::from_unit_rows(codewords, compute);
  } catch (const std::invalid_argument&) {
    return Codebook(codewords, compute);  // normalizes; throws on zero or non-finite rows
  }
}

// A query-list membership as Python keeps it (int64 buffers: offsets
// [E + 1], lists [entries]) in the C++ form. It may come from a saved state,
// so the CSR itself is checked here (the router reads each expert's first
// entry before ListSegments checks the rest: no list twice per expert).
ListMembership membership_from(const py::array_t<int64_t, py::array::c_style>& offsets,
                               const py::array_t<int64_t, py::array::c_style>& lists,
                               int64_t list_count) {
  if (offsets.ndim() != 1 || lists.ndim() != 1)
    throw std::invalid_argument("list_offsets and list_members must be 1-D");
  const int64_t entries = lists.size();
  if (offsets.size() < 2 || offsets.data()[0] != 0 || offsets.data()[offsets.size() - 1] != entries)
    throw std::invalid_argument("list_offsets must run from 0 to the " + std::to_string(entries) +
                                " list_members entries over at least one expert");
  for (py::ssize_t e = 0; e + 1 < offsets.size(); ++e)
    if (offsets.data()[e + 1] <= offsets.data()[e])
      throw std::invalid_argument("list_offsets: expert " + std::to_string(e) +
                                  " is in no list (offsets must increase)");
  ListMembership m;
  m.list_count = list_count;
  m.offsets.assign(offsets.data(), offsets.data() + offsets.size());
  m.lists.reserve(static_cast<size_t>(lists.size()));
  for (py::ssize_t i = 0; i < lists.size(); ++i) {
    const int64_t c = lists.data()[i];
    if (c < 0 || c >= list_count)
      throw std::invalid_argument("list_members entry " + std::to_string(i) + " is list " +
                                  std::to_string(c) + ", outside [0, " +
                                  std::to_string(list_count) + ")");
    m.lists.push_back(static_cast<int32_t>(c));
  }
  return m;
}

bool same_membership(const ListMembership& a, const ListMembership& b) {
  return a.list_count == b.list_count && a.offsets == b.offsets && a.lists == b.lists;
}

// AirRouter with an unbuilt state: constructed from the configuration alone,
// built by the first set_centers() (which trains the codebook), by
// build_query_lists() (query lists: the codebook trained on sample tokens)
// or by sync().
class AirIndex : public IndexState {
 public:
  AirIndex(int64_t dim, const AirConfig& config, const std::string& device,
           std::optional<QueryListOptions> query = std::nullopt)
      : IndexState(Compute{&find_backend(device), {}}), dim_(dim), config_(config), query_(query) {
    if (dim < 1) throw std::invalid_argument("dim must be >= 1, got " + std::to_string(dim));
  }

  bool query_lists() const { return query_.has_value(); }

  // Query lists, first build: the codebook trained on `sample`, the lists
  // counted from its exact top-k under `bias` (None: no bias).
  void build_query_lists(const py::object& centers_arg, const py::object& bias_arg,
                         const py::object& sample_arg) {
    require_query("build_query_lists");
    const TensorArg c_arg = import_tensor(centers_arg, "centers");
    const TensorArg s_arg = import_tensor(sample_arg, "sample tokens");
    std::optional<TensorArg> b;
    if (!bias_arg.is_none()) b = import_tensor(bias_arg, "bias");
    const MatrixView centers = host_f32(c_arg, "centers");
    const MatrixView sample = host_f32(s_arg, "sample tokens");
    require_dim(centers, "centers");
    require_dim(sample, "sample tokens");
    py::gil_scoped_release release;
    std::unique_lock lock(mutex_);
    router_.emplace(centers, b ? b->view : TensorView(), sample, *query_, compute_);
    remember_query_lists();
  }

  // Query lists: rebuilt from `sample` under the router's current centers
  // and bias (what sync() and set_bias() last gave it).
  void refresh_lists(const py::object& sample_arg) {
    require_query("refresh_lists");
    const TensorArg s_arg = import_tensor(sample_arg, "sample tokens");
    const MatrixView sample = host_f32(s_arg, "sample tokens");
    require_dim(sample, "sample tokens");
    py::gil_scoped_release release;
    std::unique_lock lock(mutex_);
    get("refresh_lists").refresh_lists(sample);
    remember_query_lists();
  }

  // The query lists' membership as (offsets [E + 1], lists) int64 arrays.
  py::tuple query_membership() const {
    std::shared_lock lock(mutex_);
    const ListMembership* m = get("query_membership").query_membership();
    if (!m) throw std::runtime_error("query_membership: the AIR router has plain lists");
    std::vector<int64_t> lists(m->lists.begin(), m->lists.end());
    return py::make_tuple(copied(m->offsets, {static_cast<py::ssize_t>(m->offsets.size())}),
                          owned(std::move(lists), {static_cast<py::ssize_t>(m->lists.size())}));
  }

  // What building the current query lists cost (0 for plain lists).
  double query_build_flops() const {
    std::shared_lock lock(mutex_);
    return get("query_build_flops").query_lists_build_flops();
  }

  bool built() const {
    std::shared_lock lock(mutex_);
    return router_.has_value();
  }

  // First call: trains the codebook (spherical k-means) on the centers.
  // Later calls: new centers, same codebook, lists rebuilt.
  void set_centers(const py::object& centers_arg) {
    const TensorArg arg = import_tensor(centers_arg, "centers");
    const MatrixView centers = host_f32(arg, "centers");
    require_dim(centers, "centers");
    std::unique_lock lock(mutex_);
    if (router_) {
      router_->set_centers(centers);
      ++generation_;
    } else {
      router_.emplace(centers, config_, compute_);
      given_codewords_ = host_matrix(compute_, router_->codebook().tensor());
    }
  }

  // Brings the router up to date with the torch centers and codebook (host
  // float32) and, for query lists, their membership (list_offsets,
  // list_members) and sample size: rebuilt on other codewords or lists,
  // lists rebuilt on other centers, nothing when all hold the bits of the
  // last sync (on a device, where the caller compared, the centers always
  // count as changed). An unbuilt router (a copy being restored) is built
  // from them. True when anything changed.
  bool sync(const py::object& centers_arg, const py::object& codewords_arg,
            const std::optional<py::array_t<int64_t, py::array::c_style>>& list_offsets,
            const std::optional<py::array_t<int64_t, py::array::c_style>>& list_members,
            int64_t sample_tokens) {
    const TensorArg c_arg = import_tensor(centers_arg, "centers");
    const TensorArg w_arg = import_tensor(codewords_arg, "codewords");
    const MatrixView centers = host_f32(c_arg, "centers");
    const MatrixView codewords = host_f32(w_arg, "codewords");
    require_dim(centers, "centers");
    require_dim(codewords, "codewords");
    std::optional<ListMembership> membership;
    if (query_) {
      if (!list_offsets || !list_members)
        throw std::invalid_argument("sync: query lists need list_offsets and list_members");
      membership = membership_from(*list_offsets, *list_members, codewords.rows);
    }
    py::gil_scoped_release release;
    std::unique_lock lock(mutex_);
    const bool new_codebook = !router_ || !same_bits(codewords, given_codewords_.view()) ||
                              (membership && !same_membership(*membership, given_membership_));
    const bool new_centers =
        !router_ || !on_host() || !same_bits(centers, TensorView(router_->keys()));
    if (new_codebook) {
      AirRouter fresh =
          membership
              ? query_router(centers, codewords, std::move(*membership), sample_tokens)
              : AirRouter(centers, codebook_from(codewords, compute_),
                          ListOptions{config_.list_cap, config_.spills, config_.spill_lambda});
      if (router_) carry_bias(*router_, fresh);
      router_ = std::move(fresh);
      given_codewords_ = copy_of(codewords);
      if (query_) given_membership_ = *router_->query_membership();
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
    given_codewords_ = host_matrix(compute_, router_->codebook().tensor());  // what Python copies
  }

  // The selection bias of later routes (see IndexState::set_router_bias).
  void set_bias(const py::object& bias, intptr_t stream) {
    set_router_bias(get("set_bias"), bias, stream);
  }

  // gate_mode: "chosen" (softmax over the k chosen), "shortlist" (over
  // every expert scored) or "sigmoid"; the backward follows the routes' mode.
  py::tuple route(const py::object& tokens, int k, int probes, const std::string& gate_mode,
                  intptr_t stream) {
    const GateMode mode = gate_mode_from_string(gate_mode);
    return routed(get("route"), tokens, stream,
                  [&](const AirRouter& r, TensorView t) { return r.route(t, k, probes, mode); });
  }

  // centers: the torch centers as host float32 for the rows check (None on
  // a device, where Python checks).
  py::tuple backward(const py::object& tokens, const RouteHandle& h, const py::object& d_gates,
                     const py::object& centers, intptr_t stream) {
    std::optional<TensorArg> c;
    if (on_host()) c = import_tensor(centers, "centers");
    DeviceRouterGradients g = backed(
        get("backward"), tokens, d_gates, stream,
        [&](const AirRouter& r, TensorView t, TensorView dg) {
          require_forward(h, "centers",
                          [&] { return same_rows(c->view, r.keys(), h.experts(), expert_row); });
          return r.backward(t, h.routes, dg);
        });
    return py::make_tuple(export_tensor(std::move(g.d_tokens)),
                          sparse_capsules(std::move(g.d_centers)));
  }

  py::array_t<float> codewords() const {
    std::shared_lock lock(mutex_);
    get("codewords");
    return copied(given_codewords_.view());
  }
  py::array_t<float> centers() const {
    std::shared_lock lock(mutex_);
    return copied(host_matrix(compute_, get("centers").keys()).view());
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
  static Matrix copy_of(MatrixView m) {
    Matrix out(m.rows, m.cols);
    std::copy_n(m.data, m.rows * m.cols, out.data());
    return out;
  }
  void require_query(const char* op) const {
    if (!query_)
      throw std::runtime_error(std::string(op) +
                               ": the AIR router was built with plain (center) lists");
  }
  // A router over saved query lists (a copy or a loaded state): the build
  // cost is that of a build from `sample_tokens` tokens.
  AirRouter query_router(MatrixView centers, MatrixView codewords, ListMembership membership,
                         int64_t sample_tokens) const {
    const double flops = sample_tokens > 0 ? query_lists_build_flops(sample_tokens, centers.rows,
                                                                     centers.cols, *query_)
                                           : 0.0;
    return AirRouter(centers, QueryLists{*query_, codebook_from(codewords, compute_),
                                         std::move(membership), flops});
  }
  // The codewords and membership sync() compares against (the router's own).
  void remember_query_lists() {
    given_codewords_ = host_matrix(compute_, router_->codebook().tensor());
    given_membership_ = *router_->query_membership();
  }
  void require_dim(MatrixView m, const char* what) const {
    if (m.cols != dim_)
      throw std::invalid_argument(std::string(what) + " has " + std::to_string(m.cols) +
                                  " columns, expected " + std::to_string(dim_));
  }
  AirRouter& get(const char* op) const {
    if (!router_)
      throw std::runtime_error(std::string(op) +
                               ": the AIR router has no expert centers yet; call "
                               "set_centers(centers) first");
    return *router_;
  }

  int64_t dim_;
  AirConfig config_;
  std::optional<QueryListOptions> query_;    // set: query lists (router/query_lists.h)
  mutable std::optional<AirRouter> router_;  // mutable: calls set its stream
  Matrix given_codewords_;  // the codewords of the last sync, as given (sync compares them)
  ListMembership given_membership_;  // query lists: the membership of the last sync or build
};

class DenseIndex : public IndexState {
 public:
  explicit DenseIndex(const py::object& centers) : DenseIndex(import_tensor(centers, "centers")) {}

  // Rebuilds the router from `centers` unless they hold the bits it has (on
  // the host); true when it did (a new generation).
  bool sync(const py::object& centers_arg) {
    const TensorArg centers = import_tensor(centers_arg, "centers");
    py::gil_scoped_release release;
    std::unique_lock lock(mutex_);
    require_index_device(centers, "centers");
    if (on_host() && same_bits(centers.view, router_.keys())) return false;
    replace_router(router_, DenseRouter(centers.view, compute_));
    return true;
  }

  void set_bias(const py::object& bias, intptr_t stream) { set_router_bias(router_, bias, stream); }

  py::tuple route(const py::object& tokens, int k, const std::string& gate_mode, intptr_t stream) {
    const GateMode mode = gate_mode_from_string(gate_mode);
    return routed(router_, tokens, stream,
                  [&](const DenseRouter& r, TensorView t) { return r.route(t, k, mode); });
  }

  py::tuple backward(const py::object& tokens, const RouteHandle& h, const py::object& d_gates,
                     const py::object& centers, intptr_t stream) {
    std::optional<TensorArg> c;
    if (on_host()) c = import_tensor(centers, "centers");
    DeviceRouterGradients g = backed(
        router_, tokens, d_gates, stream, [&](const DenseRouter& r, TensorView t, TensorView dg) {
          require_forward(h, "centers",
                          [&] { return same_rows(c->view, r.keys(), h.experts(), expert_row); });
          return r.backward(t, h.routes, dg);
        });
    return py::make_tuple(export_tensor(std::move(g.d_tokens)),
                          sparse_capsules(std::move(g.d_centers)));
  }

  int64_t experts() const { return router_.experts(); }
  int64_t dim() const { return router_.dim(); }

 private:
  explicit DenseIndex(const TensorArg& centers)
      : IndexState(dlpack::compute_for(centers.view.device, "centers")),
        router_(centers.view, compute_) {}

  DenseRouter router_;
};

class ProductKeyIndex : public IndexState {
 public:
  ProductKeyIndex(const py::object& keys1, const py::object& keys2)
      : ProductKeyIndex(imported_in_order(keys1, keys2)) {}

  // As DenseIndex::sync, for both sub-key sets.
  bool sync(const py::object& keys1_arg, const py::object& keys2_arg) {
    const auto [keys1, keys2] = imported_in_order(keys1_arg, keys2_arg);
    py::gil_scoped_release release;
    std::unique_lock lock(mutex_);
    require_index_device(keys1, "keys1");
    if (on_host() && same_bits(keys1.view, key_view(1)) && same_bits(keys2.view, key_view(2)))
      return false;
    replace_router(router_, ProductKeyRouter(keys1.view, keys2.view, compute_));
    return true;
  }

  void set_bias(const py::object& bias, intptr_t stream) { set_router_bias(router_, bias, stream); }

  py::tuple route(const py::object& tokens, int k, const std::string& gate_mode, intptr_t stream) {
    const GateMode mode = gate_mode_from_string(gate_mode);
    return routed(router_, tokens, stream,
                  [&](const ProductKeyRouter& r, TensorView t) { return r.route(t, k, mode); });
  }

  // (d_tokens, (rows1, values1), (rows2, values2))
  py::tuple backward(const py::object& tokens, const RouteHandle& h, const py::object& d_gates,
                     const py::object& keys1, const py::object& keys2, intptr_t stream) {
    std::optional<TensorArg> k1, k2;
    if (on_host()) {
      k1 = import_tensor(keys1, "keys1");
      k2 = import_tensor(keys2, "keys2");
    }
    DeviceProductKeyGradients g = backed(
        router_, tokens, d_gates, stream,
        [&](const ProductKeyRouter& r, TensorView t, TensorView dg) {
          require_forward(h, "keys1/keys2", [&] {
            const int64_t n = r.subkeys();  // expert i * n + j: keys1 row i, keys2 row j
            const std::vector<int32_t> experts = h.experts();
            return same_rows(k1->view, key_view(1), experts, [n](int32_t e) { return e / n; }) &&
                   same_rows(k2->view, key_view(2), experts, [n](int32_t e) { return e % n; });
          });
          return r.backward(t, h.routes, dg);
        });
    return py::make_tuple(export_tensor(std::move(g.d_tokens)),
                          sparse_capsules(std::move(g.d_keys1)),
                          sparse_capsules(std::move(g.d_keys2)));
  }

  int64_t subkeys() const { return router_.subkeys(); }
  int64_t experts() const { return router_.experts(); }
  int64_t dim() const { return router_.dim(); }
  int64_t half_dim() const { return router_.half_dim(); }

 private:
  // keys1 first (so that errors name the first bad one), then keys2, on
  // one device.
  static std::pair<TensorArg, TensorArg> imported_in_order(const py::object& keys1,
                                                           const py::object& keys2) {
    TensorArg k1 = import_tensor(keys1, "keys1");
    TensorArg k2 = import_tensor(keys2, "keys2");
    require_same_device(k1, "keys1", k2, "keys2");
    return {std::move(k1), std::move(k2)};
  }
  explicit ProductKeyIndex(const std::pair<TensorArg, TensorArg>& keys)
      : IndexState(dlpack::compute_for(keys.first.view.device, "keys1")),
        router_(keys.first.view, keys.second.view, compute_) {}

  // Sub-key set 1 or 2 as the router holds it (host only: sync compares it).
  TensorView key_view(int which) const {
    return which == 1 ? router_.keys1_tensor() : router_.keys2_tensor();
  }

  ProductKeyRouter router_;
};

}  // namespace
}  // namespace airmoe

PYBIND11_MODULE(_airmoe, m) {
  using namespace airmoe;
  static constexpr const char* kSetBiasDoc =
      "The selection bias (float32 or bfloat16 [E, 1] on the CPU or the index's device; None: "
      "none) of later routes: experts selected by z + b, gates from z.";
  m.doc() =
      "airmoe C++ routers (AIR, dense, product-key). Tensor arguments cross by DLPack (float32 "
      "or bfloat16, 2-D, on the CPU or a GPU), read in place, never copied or converted; "
      "results are DLPack capsules.";
  m.def(
      "recommended_air",
      [](int64_t experts) {
        const AirDefaults d = recommended_air(experts);
        return py::make_tuple(d.codewords, d.probes);
      },
      py::arg("experts"),
      "(C, m) AIR starts from for E experts: C ~ sqrt(E), m from docs/routing.md's table.");
  m.def(
      "backends",
      [] {
        std::vector<std::string> names;
        for (const Ops* ops : backends()) names.push_back(ops->name());
        return names;
      },
      "The compute backends that run here (host twins, device-emulated, cuda:N).");
  m.def("cuda_unavailable_reason", &cuda_unavailable_reason,
        "Why no cuda backend runs here (\"\" when one does).");
  // MoELayer is in every build; with MPI it also takes mpi4py communicators.
  m.attr("has_layer") = true;
#ifdef AIRMOE_PYTHON_WITH_MPI
  m.attr("has_mpi") = true;
#else
  m.attr("has_mpi") = false;
#endif

  py::class_<RouteHandle, std::shared_ptr<RouteHandle>>(
      m, "RouteHandle", "The C++ routes of one route() call, kept for backward().")
      .def_property_readonly("tokens", [](const RouteHandle& h) { return h.routes.tokens; })
      .def_property_readonly("k", [](const RouteHandle& h) { return h.routes.k; })
      .def_property_readonly("tokens_address",
                             [](const RouteHandle& h) { return h.tokens_address; })
      .def_property_readonly("logits",
                             [](const RouteHandle& h) {
                               return copied(
                                   host_vector<float>(h.compute, h.routes.logits),
                                   {static_cast<py::ssize_t>(h.routes.tokens), h.routes.k});
                             })
      .def_property_readonly("shortlist_size", [](const RouteHandle& h) {
        return copied(host_vector<int32_t>(h.compute, h.routes.shortlist_size),
                      {static_cast<py::ssize_t>(h.routes.tokens)});
      });

  py::class_<AirIndex>(m, "AirIndex",
                       "Adaptive inverted-index router. Unbuilt until the first set_centers(), "
                       "which trains the codebook, or, with list_length > 0 (query lists), "
                       "build_query_lists(), which trains it on sample tokens.")
      .def(py::init([](int64_t dim, int64_t codewords, int kmeans_iterations, uint64_t seed,
                       int64_t list_cap, int spills, double spill_lambda, const std::string& device,
                       int64_t list_length, int query_k) {
             std::optional<QueryListOptions> query;
             if (list_length > 0)
               query = QueryListOptions{codewords, list_length, query_k, kmeans_iterations, seed};
             return new AirIndex(
                 dim, AirConfig{codewords, kmeans_iterations, seed, list_cap, spills, spill_lambda},
                 device, query);
           }),
           py::arg("dim"), py::arg("codewords"), py::arg("kmeans_iterations") = 10,
           py::arg("seed") = 1234, py::arg("list_cap") = 0, py::arg("spills") = 0,
           py::arg("spill_lambda") = 1.0, py::arg("device") = "host", py::arg("list_length") = 0,
           py::arg("query_k") = 8)
      .def_property_readonly("built", &AirIndex::built)
      .def_property_readonly("query_lists", &AirIndex::query_lists)
      .def("build_query_lists", &AirIndex::build_query_lists, py::arg("centers"), py::arg("bias"),
           py::arg("sample"),
           "Query lists: codebook trained on the sample tokens, lists from their exact (biased) "
           "top-k picks (router/query_lists.h).")
      .def("refresh_lists", &AirIndex::refresh_lists, py::arg("sample"),
           "Query lists rebuilt from the sample under the current centers and bias.")
      .def("query_membership", &AirIndex::query_membership,
           "(offsets int64 [E + 1], lists int64): each expert's query lists, CSR.")
      .def("query_build_flops", &AirIndex::query_build_flops,
           "FLOPs of building the current query lists (0 for plain lists).")
      .def_property_readonly("device", &AirIndex::device)
      .def_property_readonly("dim", &AirIndex::dim)
      .def_property_readonly("codeword_count", &AirIndex::codeword_count)
      .def_property_readonly("experts", &AirIndex::experts)
      .def("set_centers", &AirIndex::set_centers, py::arg("centers"))
      .def("sync", &AirIndex::sync, py::arg("centers"), py::arg("codewords"),
           py::arg("list_offsets") = py::none(), py::arg("list_members") = py::none(),
           py::arg("sample_tokens") = 0,
           "Follows the torch centers and codebook (and query lists' membership; compared bit "
           "for bit): True when it changed.")
      .def("update_codebook", &AirIndex::update_codebook, py::arg("step") = 1.0,
           py::arg("updates") = 1)
      .def("route", &AirIndex::route, py::arg("tokens"), py::arg("k"), py::arg("probes"),
           py::arg("gate_mode") = "chosen", py::arg("stream") = 0)
      .def("set_bias", &AirIndex::set_bias, py::arg("bias"), py::arg("stream") = 0, kSetBiasDoc)
      .def("backward", &AirIndex::backward, py::arg("tokens"), py::arg("handle"),
           py::arg("d_gates"), py::arg("centers"), py::arg("stream") = 0)
      .def("codewords", &AirIndex::codewords)
      .def("centers", &AirIndex::centers)
      .def("list_sizes", &AirIndex::list_sizes);

  py::class_<DenseIndex>(m, "DenseIndex", "Exact top-k router over all E centers.")
      .def(py::init<const py::object&>(), py::arg("centers"))
      .def_property_readonly("device", &DenseIndex::device)
      .def_property_readonly("experts", &DenseIndex::experts)
      .def_property_readonly("dim", &DenseIndex::dim)
      .def("sync", &DenseIndex::sync, py::arg("centers"),
           "Follows the torch centers (compared bit for bit): True when they changed.")
      .def("route", &DenseIndex::route, py::arg("tokens"), py::arg("k"),
           py::arg("gate_mode") = "chosen", py::arg("stream") = 0)
      .def("set_bias", &DenseIndex::set_bias, py::arg("bias"), py::arg("stream") = 0, kSetBiasDoc)
      .def("backward", &DenseIndex::backward, py::arg("tokens"), py::arg("handle"),
           py::arg("d_gates"), py::arg("centers"), py::arg("stream") = 0);

  py::class_<ProductKeyIndex>(m, "ProductKeyIndex", "Product-key router, E = n^2.")
      .def(py::init<const py::object&, const py::object&>(), py::arg("keys1"), py::arg("keys2"))
      .def_property_readonly("device", &ProductKeyIndex::device)
      .def_property_readonly("subkeys", &ProductKeyIndex::subkeys)
      .def_property_readonly("experts", &ProductKeyIndex::experts)
      .def_property_readonly("dim", &ProductKeyIndex::dim)
      .def_property_readonly("half_dim", &ProductKeyIndex::half_dim)
      .def("sync", &ProductKeyIndex::sync, py::arg("keys1"), py::arg("keys2"),
           "Follows the torch keys (compared bit for bit): True when they changed.")
      .def("route", &ProductKeyIndex::route, py::arg("tokens"), py::arg("k"),
           py::arg("gate_mode") = "chosen", py::arg("stream") = 0)
      .def("set_bias", &ProductKeyIndex::set_bias, py::arg("bias"), py::arg("stream") = 0,
           kSetBiasDoc)
      .def("backward", &ProductKeyIndex::backward, py::arg("tokens"), py::arg("handle"),
           py::arg("d_gates"), py::arg("keys1"), py::arg("keys2"), py::arg("stream") = 0);

  bind_layer(m);

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
      "query_lists_build_flops",
      [](int64_t tokens, int64_t experts, int64_t dim, int64_t codewords, int64_t list_length,
         int k, int kmeans_iterations) {
        return query_lists_build_flops(
            tokens, experts, dim, QueryListOptions{codewords, list_length, k, kmeans_iterations});
      },
      py::arg("tokens"), py::arg("experts"), py::arg("dim"), py::arg("codewords"),
      py::arg("list_length"), py::arg("k"), py::arg("kmeans_iterations"),
      "FLOPs of building query lists from `tokens` sample tokens (router/query_lists.h).");

  m.def(
      "view_address",
      [](const py::array& a) { return reinterpret_cast<std::uintptr_t>(as_view(a, "array").data); },
      py::arg("array"), "Debug: the address the C++ side reads for this array (no copy).");
  m.def(
      "tensor_info",
      [](const py::object& t, const std::string& what) {
        const dlpack::TensorArg a = dlpack::import_tensor(t, what);
        const TensorView v = a.view;
        return py::make_tuple(reinterpret_cast<std::uintptr_t>(v.data), to_string(v.dtype),
                              to_string(v.device), v.rows, v.cols, v.ld);
      },
      py::arg("tensor"), py::arg("what") = "tensor",
      "Debug: (address, dtype, device, rows, cols, ld) the routers read for this tensor, "
      "through the same import and checks (no copy).");
}
