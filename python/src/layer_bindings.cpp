// The distributed MoE layer (runtime::MoELayer) over the communicator Python
// names (layer_comm.h): None, one rank in this process (every build), or
// mpi4py's (the address of its MPI_Comm handle; builds with MPI). Every
// method is collective: every rank of the communicator calls it, in the same
// order.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "arrays.h"
#include "bindings.h"
#include "comm/in_process.h"
#include "core/checks.h"
#include "core/errors.h"
#include "core/matrix.h"
#include "dlpack.h"
#include "layer_comm.h"
#include "ops/registry.h"
#include "runtime/builder.h"
#include "runtime/checkpoint.h"
#include "runtime/moe_layer.h"
#include "runtime/wire.h"

namespace airmoe {
namespace {

// What forward() hands back for backward(): the C++ dispatch handle plus the
// tokens of its forward (their DLPack owner, kept alive with it).
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
// rank, instead of hanging. One rank (no abort_job) has no one waiting: every
// error is raised.
template <typename Call>
auto collective(const LayerComm& comm, const char* what, Call&& call) -> decltype(call()) {
  if (!comm.abort_job) return call();
  const int rank = comm.comm->rank();
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
  comm.abort_job();
  std::abort();  // abort_job does not return
}

// The MoELayer arguments Python passes, before they are checked.
struct LayerArgs {
  std::string strategy, activation, placement, wire_dtype, backend;
  int k = 0, probes = 0, kmeans_iterations = 0;
  int64_t hidden = 0, codewords = 0;
  uint64_t kmeans_seed = 0, expert_seed = 0;
  int request_key_bits = 0;

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
    s.wire_dtype = runtime::wire::wire_dtype_from_string(wire_dtype);
    if (request_key_bits != 0) check_request_key_bits(request_key_bits, "request_key_bits");
    s.request_key_bits = request_key_bits;
    return s;
  }
};

// The compute a layer's `backend` argument names ("": the host default),
// or a UsageError naming the argument (find_backend's message says why and
// lists the backends it knows).
Compute layer_compute(const std::string& backend) {
  if (backend.empty()) return host_compute();
  try {
    return Compute{&find_backend(backend), Stream{}};
  } catch (const UsageError& e) {
    throw UsageError(std::string("backend: ") + e.what());
  }
}

}  // namespace

LayerComm layer_comm(std::optional<std::uintptr_t> mpi_comm_address) {
  if (!mpi_comm_address)
    return LayerComm{
        std::make_unique<comm::InProcessCommunicator>(std::make_shared<comm::InProcessWorld>(1), 0),
        {}};
#ifdef AIRMOE_PYTHON_WITH_MPI
  return mpi_layer_comm(*mpi_comm_address);
#else
  throw std::invalid_argument(
      "MoELayer: this build of airmoe has no MPI (AIRMOE_WITH_MPI=OFF), so it takes no MPI "
      "communicator; pass comm=None for one rank in this process");
#endif
}

namespace {

// A capsule of `t`, or None for an empty tensor (nothing touched).
py::object exported(Tensor&& t) {
  if (t.rows() * t.cols() == 0) return py::none();
  return dlpack::export_tensor(std::move(t));
}

class MoELayerImpl {
 public:
  // Collective: the layer of the checkpoint in `dir` (runtime/checkpoint.h).
  // local_error: what the Python side found wrong with this rank's path ("":
  // nothing), raised on every rank together.
  // backend: the compute backend's name ("": the host default).
  MoELayerImpl(std::optional<std::uintptr_t> comm_address, const std::string& dir,
               const std::string& local_error, const std::string& backend)
      : comm_(layer_comm(comm_address)) {
    collective("load_checkpoint", [&] {
      runtime::LoadOptions options;
      comm::check_together(world(), "MoELayer.load_checkpoint", [&] {
        if (!local_error.empty()) fail(local_error);
        options.compute = layer_compute(backend);
      });
      layer_ = runtime::load_checkpoint(world(), dir, options);
      const MatrixView cw = layer_->codebook().codewords();
      codewords_ = Matrix(cw.rows, cw.cols);
      std::copy_n(cw.data, cw.rows * cw.cols, codewords_.data());
    });
  }

  // local_error: what the Python side found wrong with this rank's arguments
  // ("" for nothing); it is raised on every rank together with the checks
  // here, so a rank with bad input never leaves the others waiting.
  MoELayerImpl(std::optional<std::uintptr_t> comm_address, const LayerArgs& args,
               const py::object& centers, const py::object& sample, const std::string& local_error)
      : comm_(layer_comm(comm_address)) {
    collective("__init__", [&] {
      runtime::LayerSpec spec;
      MatrixView c, t;
      Compute compute;
      comm::check_together(world(), "MoELayer", [&] {
        if (!local_error.empty()) fail(local_error);
        c = as_view(centers.cast<py::array>(), "centers");
        if (!sample.is_none()) t = as_view(sample.cast<py::array>(), "load sample");
        spec = args.spec(c);
        compute = layer_compute(args.backend);
      });
      const runtime::SharedIndex index = runtime::agree_on_index(world(), spec, c, t);
      codewords_ = Matrix(index.codebook.size(), index.codebook.dim());
      std::copy_n(index.codebook.codewords().data, codewords_.size(), codewords_.data());
      layer_ = runtime::make_layer(
          world(), spec, index, runtime::place_experts(world(), spec, index).placement, c, compute);
    });
  }

  // Collective: raises `local_error` ("" for none) on every rank together
  // (ValueError naming the failing rank); the Python side's checks go here.
  void raise_together(const std::string& local_error, const std::string& what) {
    collective("raise_together",
               [&] { comm::raise_together(world(), local_error, ("MoELayer." + what).c_str()); });
  }

  // The layer's device API on every backend: tokens by DLPack (f32 on the
  // backend's device, the CPU for the host backends), the output as a
  // capsule of a tensor there. One path for every backend, so a host layer
  // and a device layer differ only in where their memory is.
  py::tuple forward(const py::object& tokens) {
    auto h = std::make_shared<LayerPlanHandle>();
    runtime::DeviceForwardResult out = collective("forward", [&] {
      dlpack::TensorArg t;
      comm::check_together(world(), "MoELayer.forward",
                           [&] { t = dlpack::import_tensor(tokens, "hidden"); });
      h->tokens = t.owner;
      py::gil_scoped_release release;
      return on_device_stream([&] { return layer_->forward(t.view); });
    });
    h->handle = std::move(out.handle);
    return py::make_tuple(dlpack::export_tensor(std::move(out.output)), std::move(h));
  }

  // (d_tokens [T, d], the touched experts' local indices [n, 1] (int32),
  // their dW1 [n * w1_rows, d] and dW2 [n * d, h], center ids [m, 1]
  // (int32) and their gradient rows [m, d]), as capsules of tensors on the
  // backend's device; None where nothing was touched.
  py::tuple backward(LayerPlanHandle& h, const py::object& d_out) {
    runtime::DeviceMoEGradients g = collective("backward", [&] {
      dlpack::TensorArg dy;
      comm::check_together(world(), "MoELayer.backward", [&] {
        if (h.used) fail("this plan was already used for a backward");
        dy = dlpack::import_tensor(d_out, "d_out");
      });
      py::gil_scoped_release release;
      return on_device_stream([&] { return layer_->backward(h.handle, dy.view); });
    });
    h.used = true;
    TouchedExpertGrads& touched = g.touched_experts;
    return py::make_tuple(exported(std::move(g.d_tokens)), exported(std::move(touched.local)),
                          exported(std::move(touched.w1)), exported(std::move(touched.w2)),
                          exported(std::move(g.d_centers.rows)),
                          exported(std::move(g.d_centers.values)));
  }

  // Collective: the layer's checkpoint into `dir` (runtime/checkpoint.h);
  // "" or, on rank 0, where the previous checkpoint was left undeleted.
  std::string save_checkpoint(const std::string& dir) {
    return collective("save_checkpoint",
                      [&] { return runtime::save_checkpoint(*layer_, dir).leftover; });
  }

  // Collective: None on every rank clears the selection bias, an [E, 1]
  // float32 array sets it (runtime::MoELayer::set_bias). Both take the same
  // collectives, so ranks that disagree raise together instead of hanging.
  void set_bias(const py::object& bias) {
    collective("set_bias", [&] {
      MatrixView v;
      comm::check_together(world(), "MoELayer.set_bias", [&] {
        if (!bias.is_none()) v = as_view(bias.cast<py::array>(), "bias");
      });
      if (bias.is_none())
        layer_->clear_bias();
      else
        layer_->set_bias(v);
    });
  }

  void set_request_keys(int bits) {
    collective("set_request_keys", [&] {
      py::gil_scoped_release release;
      layer_->set_request_keys(bits);
    });
  }

  void set_local_centers(const py::array& centers) {
    collective("set_local_centers", [&] {
      MatrixView v;
      comm::check_together(world(), "MoELayer.set_local_centers",
                           [&] { v = as_view(centers, "centers_local"); });
      py::gil_scoped_release release;
      layer_->set_local_centers(v);
    });
  }

  runtime::MoELayer& layer() { return *layer_; }
  const Matrix& codewords() const { return codewords_; }
  // What this rank sent since the last reset, per phase (all peers).
  py::dict traffic() {
    py::dict out;
    const comm::TrafficMeter& meter = world().meter();
    for (const std::string& phase : meter.phases()) {
      const comm::TrafficCounts c = meter.sent(phase);
      py::dict d;
      d["bytes"] = c.bytes;
      d["messages"] = c.messages;
      out[py::str(phase)] = d;
    }
    return out;
  }
  void reset_traffic() { world().meter().reset(); }

  int rank() const { return comm_.comm->rank(); }
  int size() const { return comm_.comm->size(); }

 private:
  comm::Communicator& world() { return *comm_.comm; }

  // Runs the device API's `call` and waits for the layer's stream (the
  // device's default stream), whose results torch then reads on whichever
  // stream is current there. The caller has waited for torch's stream
  // (layer.py), so the layer never reads what torch has not yet written.
  template <typename Call>
  auto on_device_stream(Call&& call) -> decltype(call()) {
    auto result = call();
    layer_->compute().ops->synchronize(layer_->compute().stream);
    return result;
  }

  template <typename Call>
  auto collective(const char* what, Call&& call) -> decltype(call()) {
    return airmoe::collective(comm_, what, std::forward<Call>(call));
  }

  LayerComm comm_;  // outlives layer_ (declared first)
  Matrix codewords_;
  std::unique_ptr<runtime::MoELayer> layer_;
};

// This rank's W1 [hosted * w1_rows, d] (which = 1) or W2 [hosted * d, h]
// (which = 2) on the backend's device: a capsule of the shard's memory
// itself, kept alive by the layer object `self`.
py::capsule expert_weights_capsule(const py::object& self, int which) {
  const ExpertWeightsView w = self.cast<MoELayerImpl&>().layer().experts().weights();
  return dlpack::export_view(which == 1 ? w.w1 : w.w2, self);
}

}  // namespace

void bind_layer(py::module_& m) {
  py::class_<LayerPlanHandle, std::shared_ptr<LayerPlanHandle>>(
      m, "LayerPlan", "The C++ dispatch handle of one MoELayer forward, kept for its backward.")
      .def_property_readonly("tokens",
                             [](const LayerPlanHandle& h) { return h.handle.routes().tokens; })
      .def_property_readonly("experts", [](const LayerPlanHandle& h) {
        const Routes& r = h.handle.routes();
        return copied(r.experts, {static_cast<py::ssize_t>(r.tokens), r.k});
      });

  py::class_<MoELayerImpl>(m, "MoELayerImpl",
                           "runtime::MoELayer over one rank in this process (comm_address None) or "
                           "an MPI communicator (collective methods).")
      .def(py::init([](std::optional<std::uintptr_t> comm_address, const std::string& strategy,
                       int k, int probes, int64_t hidden, const std::string& activation,
                       int64_t codewords, int kmeans_iterations, uint64_t kmeans_seed,
                       const std::string& placement, uint64_t expert_seed,
                       const py::object& centers, const py::object& sample,
                       const std::string& local_error, const std::string& wire_dtype,
                       const std::string& backend, int request_key_bits) {
             const LayerArgs args{strategy,        activation, placement,   wire_dtype,
                                  backend,         k,          probes,      kmeans_iterations,
                                  hidden,          codewords,  kmeans_seed, expert_seed,
                                  request_key_bits};
             return new MoELayerImpl(comm_address, args, centers, sample, local_error);
           }),
           py::arg("comm_address"), py::arg("strategy"), py::arg("k"), py::arg("probes"),
           py::arg("hidden"), py::arg("activation"), py::arg("codewords"),
           py::arg("kmeans_iterations"), py::arg("kmeans_seed"), py::arg("placement"),
           py::arg("expert_seed"), py::arg("centers"), py::arg("sample") = py::none(),
           py::arg("local_error") = "", py::arg("wire_dtype") = "f32", py::arg("backend") = "",
           py::arg("request_key_bits") = 0,
           "Collective. wire_dtype: the token vectors' element type on the wire (f32 or bf16). "
           "request_key_bits: scoring requests pruned with replicated keys of these bits (2 to "
           "8; 0: off). "
           "backend: the compute backend's name (\"\": the host default). "
           "local_error: this rank's own argument error (\"\": none), raised on "
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
      .def_property_readonly("w1_rows",
                             [](MoELayerImpl& s) { return s.layer().config().expert.w1_rows(); })
      .def(py::init<std::optional<std::uintptr_t>, const std::string&, const std::string&,
                    const std::string&>(),
           py::arg("comm_address"), py::arg("checkpoint_dir"), py::arg("local_error") = "",
           py::arg("backend") = "",
           "Collective: the layer of a checkpoint, at this job's P, on `backend` (\"\": the "
           "host default). local_error: this rank's own path error (\"\": none), raised on "
           "every rank together.")
      .def_property_readonly("backend",
                             [](MoELayerImpl& s) { return s.layer().compute().ops->name(); })
      .def_property_readonly(
          "device",
          [](MoELayerImpl& s) { return dlpack::backend_name(s.layer().compute().ops->device()); })
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
                               d["wire_dtype"] = to_string(c.wire_dtype);
                               d["request_key_bits"] = c.request_key_bits;
                               d["codewords"] = s.layer().codebook().size();
                               return d;
                             })
      .def_property_readonly("request_key_counts",
                             [](MoELayerImpl& s) {
                               const RequestKeyCounts c = s.layer().request_key_counts();
                               py::dict d;
                               d["gathers"] = c.gathers;
                               d["drift_updates"] = c.drift_updates;
                               return d;
                             })
      .def("set_request_keys", &MoELayerImpl::set_request_keys, py::arg("bits"),
           "Collective: request keys of these bits from now on (0: off).")
      .def("traffic", &MoELayerImpl::traffic,
           "What this rank sent since the last reset_traffic, per phase: {phase: {bytes, "
           "messages}} over all peers (the communicator's meter).")
      .def("reset_traffic", &MoELayerImpl::reset_traffic)
      .def("forward", &MoELayerImpl::forward, py::arg("tokens"),
           "Collective: tokens by DLPack on the backend's device; (output capsule, plan).")
      .def("backward", &MoELayerImpl::backward, py::arg("plan"), py::arg("d_out"),
           "Collective: (d_tokens, touched local ids, their dW1, dW2, center ids, their "
           "gradients), capsules on the backend's device or None.")
      .def("set_bias", &MoELayerImpl::set_bias, py::arg("bias"))
      .def("bias",
           [](MoELayerImpl& s) -> py::object {
             const TensorView b = s.layer().bias();
             if (b.rows == 0) return py::none();
             return copied(b.matrix());
           })
      .def("set_local_centers", &MoELayerImpl::set_local_centers, py::arg("centers"),
           "Collective: this rank's (possibly moved) centers, hosted order; every rank calls it.")
      .def("raise_together", &MoELayerImpl::raise_together, py::arg("local_error"), py::arg("what"),
           "Collective: this rank's error (\"\": none) raised as ValueError on every rank.")
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
          "w1_capsule", [](py::object self) { return expert_weights_capsule(self, 1); },
          "DLPack capsule of this rank's W1 [hosted * w1_rows, d] on the backend's device (the "
          "C++ memory itself, keeping the layer alive).")
      .def(
          "w2_capsule", [](py::object self) { return expert_weights_capsule(self, 2); },
          "DLPack capsule of this rank's W2 [hosted * d, h] on the backend's device.");
}

}  // namespace airmoe
