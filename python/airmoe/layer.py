"""The distributed expert-parallel MoE layer (C++ ``runtime::MoELayer``) as a
torch.nn.Module over an mpi4py communicator, or on one rank in this process
without MPI (``comm=None``).

    layer = airmoe.MoELayer(MPI.COMM_WORLD, num_experts=4096, dim=512,
                            strategy="air", k=8, probes=4, hidden=16)
    out = layer(hidden)            # hidden [T_r, d] (this rank's tokens) -> [T_r, d]
    out.sum().backward()           # grads of hidden, layer.w1, layer.w2, layer.centers_local

Each rank passes its own tokens; routing, dispatch, the experts, the combine
and the backward run in C++ over MPI. forward() and the backward are
collectives: every rank of the communicator must call them, in the same
order (a rank whose loss does not use the output must still backward, e.g.
``(out * 0).sum().backward()``), or the job hangs. One backward per forward
(the C++ dispatch handle is consumed; ``retain_graph=True`` double backward is
refused). ``hidden`` is float32 or bfloat16 (widened to float32, the
layer's math; the output and hidden's gradient come back in hidden's dtype).

Without MPI: ``comm=None`` runs the layer on one rank in this process (the
C++ layer on a single-rank in-process communicator), in every build,
including one without MPI (a GPU machine's, ``-DAIRMOE_WITH_MPI=OFF``): for
one GPU, for tests, for scripts/gpu_check.sh. It is the P = 1 layer, bit for
bit the one over an MPI communicator of one rank; an error inside a
collective simply raises (no other rank waits). A build without MPI refuses
an mpi4py communicator with RuntimeError saying so.

Backends: ``backend=None`` (the default) runs the layer on the fastest host
kernel set; ``backend="host-portable"``, ``"device-emulated"`` (host memory,
but every device rule and the device code path, on the CPU) or ``"cuda:0"``
(a CUDA build) runs it there (``_airmoe.backends()`` lists what runs here;
another name raises ValueError naming ``backend`` on every rank).
``layer.backend`` names it. Every backend gives the host's bits. ``hidden``
must be on the backend's device (CPU for the host backends and
device-emulated, the GPU for cuda:N), and the output and every gradient but
the centers' come back there; ``w1``/``w2`` are then DLPack views of the
backend's own memory (zero copy, on its device). Routing runs on the host,
so ``centers_local``, the codebook and the bias stay CPU tensors. A cuda
layer computes on the device's default stream: forward() and the backward
first wait for torch's current stream (``synchronize()``) and return once the
layer's work is done, so torch may run on any stream (at the price of those
two waits per call).

Strategies (see runtime/moe_layer.h): ``"air"`` (distributed inverted-index
routing, fused dispatch), ``"dense-replicated"`` (every rank holds all
centers, exact top-k, token vectors dispatched), ``"dense-broadcast"`` (exact
routing over sharded centers). Placement policies: ``"round-robin"``,
``"list"``, ``"locality"``.

Parameters (this rank's shard; ``state_dict()`` holds exactly these):

* ``w1`` [hosted, h, d] and ``w2`` [hosted, d, h] (``activation="swiglu"``:
  ``w1`` is [hosted, 2h, d], each expert's gate rows then its up rows, and
  ``w2`` its down projection): nn.Parameters whose memory
  IS the C++ shard's (zero copy): an optimizer step or ``load_state_dict``
  changes the weights the C++ experts use, in place. Replacing them (e.g.
  ``.double()``, ``.to()``) breaks the sharing and forward() refuses to run.
* ``centers_local`` [hosted, d]: this rank's router centers, in ``hosted``
  order; it receives the router's gradient. Every forward() hands them to the
  C++ layer (a collective: ranks whose centers moved re-route with the new
  ones; nothing moves when none changed).

Buffers: ``codebook`` [C, d] (trained on rank 0 from the centers and
broadcast; every rank checks a digest of its centers and of the codebook),
``hosted`` [hosted] int64 (this rank's global expert ids) and ``owners`` [E]
int64 (the placement: expert -> rank), plus an extra state
with the configuration. ``load_state_dict`` of a state from another
configuration (other E, d, h, k, strategy, codebook, owners or hosted ids,
e.g. from another rank or another number of ranks) raises ValueError naming
the difference; the placement policy's name is not compared, so a layer
loaded from a checkpoint takes the state of the layer that saved it.

Checkpoints: ``save_checkpoint(path)`` and ``MoELayer.load_checkpoint(comm,
path, backend=None)`` (runtime/checkpoint.h, docs/checkpoints.md), from and
onto any backend.

Hugging Face experts: with ``activation="swiglu"`` each expert is
``down(silu(gate x) * up x)``, HF's MoE MLP; ``load_hf_experts(gate, up,
down)`` or ``load_hf_expert_modules(block.experts)`` copy stock weights into
the experts this rank hosts (docs/hf.md).

Errors: a communicator that is neither None nor an ``mpi4py.MPI.Comm``
raises TypeError naming its type;
bad arguments raise ValueError with the C++ message; ranks that disagree on
the configuration raise RuntimeError on every rank. Errors are raised on
every rank together: the rank whose argument was bad (a wrong shape, dtype or
strides, NaN centers) raises its own error, every other rank a ValueError
naming that rank, so no rank is left waiting in a collective. An error that
one rank meets alone in the middle of a collective (e.g. a NaN gate reaching
a serving rank) cannot be raised together: the job is aborted (MPI_Abort)
with a message naming the rank.
"""

import contextlib
import os
import warnings

import numpy as np
import torch
from torch import nn

from . import _airmoe
from ._tensors import (INT32_MAX, check_expert_count, check_int, check_seed, checked_bias,
                       check_tensor, from_cpp, initial_centers, view)

__all__ = ["MoELayer"]

# What forward() takes; bfloat16 is widened to float32, the layer's math.
_HIDDEN_DTYPES = (torch.float32, torch.bfloat16)


def _is_mpi4py_object(comm):
    # By the type's module, so that a build without MPI names an mpi4py
    # communicator without importing mpi4py (which would start MPI).
    return any(t.__module__.startswith("mpi4py") for t in type(comm).__mro__)


def _comm_address(comm):
    """What MoELayerImpl takes for ``comm``: None (one rank in this process)
    or the address of an mpi4py communicator's MPI_Comm."""
    if comm is None:
        return None
    if not _is_mpi4py_object(comm):
        raise TypeError(f"comm must be None (one rank in this process) or an mpi4py.MPI.Comm "
                        f"(e.g. MPI.COMM_WORLD), got {type(comm).__name__}")
    if not _airmoe.has_mpi:
        raise RuntimeError(
            f"MoELayer: comm is an mpi4py {type(comm).__name__}, but this build of airmoe has no "
            f"MPI (AIRMOE_WITH_MPI=OFF, or no MPI found): pass comm=None for one rank in this "
            f"process, or rebuild with MPI (Debian: libopenmpi-dev) for the distributed layer")
    from mpi4py import MPI
    if not isinstance(comm, MPI.Comm):
        raise TypeError(
            f"comm must be None (one rank in this process) or an mpi4py.MPI.Comm (e.g. "
            f"MPI.COMM_WORLD), got {type(comm).__name__}")
    if comm == MPI.COMM_NULL:
        raise ValueError("comm is MPI.COMM_NULL")
    if comm.Is_inter():
        raise ValueError("comm must be an intracommunicator")
    return MPI._addressof(comm)


def _check_request_key_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"request_key_bits must be an int (0, or 2 to 16), got "
                        f"{type(bits).__name__}")
    if bits != 0 and not 2 <= bits <= 16:
        raise ValueError(f"request_key_bits = {bits}: request keys take 2 to 16 bits per entry "
                         f"(0: off)")


def _together(impl, what, check):
    """Collective: runs this rank's check() and raises on every rank if any
    rank's check failed: this rank's own exception where it failed, a
    ValueError naming the failing rank elsewhere."""
    error = None
    try:
        check()
    except (TypeError, ValueError, RuntimeError) as e:
        error = e
    with _own_error_first(error):
        impl.raise_together(_message(error), what)


@contextlib.contextmanager
def _own_error_first(error):
    """Around a collective that raises this rank's `error` on every rank: where
    it was this rank's own, re-raise it as it was (its type and message)."""
    try:
        yield
    except ValueError:
        if error is not None:
            raise error from None
        raise


def _checked_centers(num_experts, dim, centers, seed):
    centers = initial_centers(num_experts, dim, centers, seed)
    if centers.dtype != torch.float32:
        raise ValueError(f"centers must be float32, got {centers.dtype}")
    return centers.detach()


def _checked_ints(num_experts, k, probes, hidden, codewords, kmeans_iterations, seed):
    """The constructor's integers as Python ints in the ranges the C++ layer
    takes (pybind11 would answer others with an argument dump or
    "Overflow"); codewords and probes default to the recommended (C, m)."""
    num_experts = check_expert_count(num_experts, "num_experts")
    recommended_c, recommended_m = _airmoe.recommended_air(num_experts)
    return {
        "num_experts": num_experts,
        "k": check_int(k, "k", 1, num_experts),
        "probes": check_int(recommended_m if probes is None else probes, "probes", 1, INT32_MAX),
        "hidden": check_int(hidden, "hidden", 1, INT32_MAX),
        "codewords": check_int(recommended_c if codewords is None else codewords, "codewords",
                               1, num_experts),
        "kmeans_iterations": check_int(kmeans_iterations, "kmeans_iterations", 0, INT32_MAX),
        "seed": check_seed(seed),
    }


def _placeholder_ints():
    """Valid integers for a rank whose own were refused: it still enters the
    C++ constructor's first collective, which raises its error on every rank."""
    return {"num_experts": 1, "k": 1, "probes": 1, "hidden": 1, "codewords": 1,
            "kmeans_iterations": 0, "seed": 0}


class _Refused:
    """Stands for expert weights that could not be read: their check raises
    the error (on every rank, through load_hf_experts' collective check)."""

    def __init__(self, error):
        self.error = error


# HF's names of an expert MLP's (gate, up, down) projections.
_HF_PROJECTIONS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _hf_projections(module, e):
    """The (gate, up, down) weights of HF expert module `e`."""
    for names in _HF_PROJECTIONS:
        if all(hasattr(module, n) for n in names):
            return tuple(getattr(module, n).weight for n in names)
    raise ValueError(f"load_hf_expert_modules: experts[{e}] ({type(module).__name__}) has "
                     f"neither gate_proj/up_proj/down_proj nor w1/w3/w2")


def _check_hf_weights(name, weights, shape, num_experts, hosted):
    """E experts' weights, each hosted one a finite floating [shape] tensor."""
    if isinstance(weights, _Refused):
        raise weights.error
    try:
        count = len(weights)
    except TypeError:
        raise TypeError(f"load_hf_experts: {name} must be a tensor or a sequence of tensors, "
                        f"got {type(weights).__name__}") from None
    if count != num_experts:
        raise ValueError(f"load_hf_experts: {name} holds {count} experts, the layer has "
                         f"{num_experts}")
    for e in hosted:
        w = weights[e]
        if not torch.is_tensor(w) or not w.is_floating_point():
            raise ValueError(f"load_hf_experts: {name}[{e}] must be a floating tensor, got "
                             f"{getattr(w, 'dtype', type(w).__name__)}")
        if tuple(w.shape) != shape:
            raise ValueError(f"load_hf_experts: {name}[{e}] has shape {list(w.shape)}, "
                             f"expected {list(shape)}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"load_hf_experts: {name}[{e}] holds non-finite values")


def _message(error):
    return "" if error is None else (str(error) or type(error).__name__)


def _checkpoint_path(path, what):
    """A str, bytes or os.PathLike checkpoint directory as the str the C++
    side takes (bytes decoded as the file system encodes names)."""
    try:
        decoded = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"MoELayer.{what}: path must be a str, bytes or os.PathLike, got "
                        f"{type(path).__name__}") from None
    if not decoded:
        raise ValueError(f"MoELayer.{what}: path is empty")
    return decoded


def _checked_backend(backend):
    """The backend argument as the C++ side takes it ("" for the default);
    its name is checked there, on every rank together."""
    if backend is None:
        return ""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be None or a backend name (str, e.g. 'device-emulated', "
                        f"'cuda:0'), got {type(backend).__name__}")
    return backend


def _torch_device(impl):
    """The torch device of the C++ layer's backend ("host" is the CPU)."""
    name = impl.device
    return torch.device("cpu" if name == "host" else name)


def _backward(impl, plan, d_out, w1, w2):
    """The C++ backward on the backend's device: d_tokens, dW1 and dW2 in
    the hosted layout (the touched experts' gradients scattered into zeros,
    a copy, so the bits are the C++ ones), the center rows' ids (numpy) and
    their gradients."""
    if d_out.numel() == 0:  # autograd's empty gradients may carry any strides
        d_out = torch.empty(d_out.shape, dtype=d_out.dtype, device=d_out.device)
    _wait_for_torch(d_out.device)
    d_tokens, local, tw1, tw2, rows, values = impl.backward(plan, d_out.detach())
    dw1, dw2 = torch.zeros_like(w1), torch.zeros_like(w2)
    if local is not None:
        local = from_cpp(local).view(-1).long()
        dw1[local] = from_cpp(tw1).view(-1, *w1.shape[1:])
        dw2[local] = from_cpp(tw2).view(-1, *w2.shape[1:])
    d_tokens = torch.zeros_like(d_out) if d_tokens is None else from_cpp(d_tokens)
    if rows is None:
        return d_tokens, dw1, dw2, np.zeros(0, np.int32), None
    return d_tokens, dw1, dw2, from_cpp(rows).view(-1).cpu().numpy(), from_cpp(values)


def _wait_for_torch(device):
    """A cuda layer computes on the device's default stream: torch's pending
    work on its current stream (writing hidden, d_out, or w1/w2 in an
    optimizer step) must be done first. The C++ side in turn waits for the
    layer's stream before it returns."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class _LayerFunction(torch.autograd.Function):
    """out = MoE(hidden); backward in C++ along the forward's dispatch handle.
    Tensors cross by DLPack on every backend (the host's too), so one path
    serves them all."""

    @staticmethod
    def forward(ctx, impl, hidden, w1, w2, centers_local):
        _wait_for_torch(hidden.device)
        out, plan = impl.forward(hidden.detach())
        out = from_cpp(out)
        ctx.impl, ctx.plan = impl, plan
        # Saving the parameters makes autograd refuse a backward after they
        # were changed in place (the C++ backward reads the same memory).
        ctx.save_for_backward(hidden, w1, w2, centers_local)
        return out

    @staticmethod
    def backward(ctx, d_out):
        _hidden, w1, w2, centers_local = ctx.saved_tensors

        def check():
            if ctx.plan is None:
                raise RuntimeError("MoELayer: one backward per forward (the C++ dispatch handle "
                                   "is consumed); retain_graph=True double backward is not "
                                   "supported")

        _together(ctx.impl, "backward", check)
        d_out = d_out.contiguous()
        d_tokens, dw1, dw2, rows, values = _backward(ctx.impl, ctx.plan, d_out, w1, w2)
        ctx.plan = None
        d_centers = None
        if ctx.needs_input_grad[4]:
            # The centers stay on the host, where routing runs.
            d_centers = torch.zeros_like(centers_local)
            if len(rows):
                hosted = ctx.impl.hosted()
                local = np.searchsorted(hosted, rows)
                d_centers[torch.from_numpy(local).long()] = values.to(d_centers.device)
        return (None, d_tokens if ctx.needs_input_grad[1] else None,
                dw1 if ctx.needs_input_grad[2] else None,
                dw2 if ctx.needs_input_grad[3] else None, d_centers)


class MoELayer(nn.Module):
    """Distributed MoE layer over an mpi4py communicator, or one rank in this
    process (see the module doc).

    Args:
        comm: an ``mpi4py.MPI.Comm`` (the job's communicator; the layer
            duplicates it, so its messages never mix with the job's; builds
            with MPI), or None: one rank in this process, no MPI (every build).
        num_experts: E. dim: d.
        strategy: "air", "dense-replicated" or "dense-broadcast".
        k: experts per token. probes: AIR's m (lists probed per token);
            None: the m recommended for C (``_airmoe.recommended_air``).
        hidden: each expert's FFN width h. activation: "gelu", "relu", "silu"
            (y = W2 act(W1 x)) or "swiglu" (y = down(silu(gate x) * up x), HF's
            MoE experts; see load_hf_experts).
        codewords: C, codebook size (<= E); None: C ~ sqrt(E), from the
            measured table in docs/routing.md. kmeans_iterations: codebook training.
        placement: "round-robin", "list" or "locality".
        seed: seeds the default centers, the codebook and the experts' FFN
            weights (which depend only on (seed, expert id), not on P).
        centers: [E, d] float32 initial router centers, the same on every rank;
            None: seeded N(0, 1/d).
        load_sample: optional [T, d] float32 token sample for the placement's
            load estimate (rank 0's is used); None: load = list sizes.
        bias: the selection bias [E] (float32, the same on every rank; a
            buffer, None by default, that may change between steps): experts
            are selected by z + bias, gates and their gradients come from the
            unbiased logits z (DeepSeek-V3's auxiliary-loss-free balancing).
            Each forward hands it to the C++ layer (one small collective that
            compares a digest: a bias that differs between ranks raises on
            every rank).
        backend: None (the host default) or a backend's name
            ("host-portable", "device-emulated", "cuda:0", ...; see the
            module doc): where the experts live and the layer computes.
        wire_dtype: "f32" (default) or "bf16": the element type of the token
            vectors the layer's all-to-alls carry (dispatch, combine and their
            gradients). bf16 halves their bytes; vectors are rounded to
            nearest even when sent and widened on receipt, the math stays
            float32. The same on every rank (compared; a layer loaded from a
            checkpoint sends f32).
        request_key_bits: 0 (default, off) or 2 to 16: air and dense-broadcast
            keep every expert's key in that many bits on every rank
            (E (d + 20) bytes; E (2 d + 20) above 8 bits) and send a token's
            scoring requests only to the ranks owning an expert that may
            still be in its top-k; the routes, outputs and gradients are the
            same bit for bit (docs/layer.md). The same on every rank (compared; a layer
            loaded from a checkpoint starts without keys: set the
            request_key_bits property).
    """

    def __init__(self, comm, num_experts, dim, *, strategy="air", k=8, probes=None, hidden=16,
                 activation="gelu", codewords=None, placement="locality", seed=0, centers=None,
                 kmeans_iterations=10, load_sample=None, bias=None, wire_dtype="f32",
                 backend=None, request_key_bits=0):
        super().__init__()
        address = _comm_address(comm)
        # This rank's argument errors are raised on every rank together, by
        # the C++ constructor (its first collective), not here.
        error, sample, ints, backend_arg = None, None, _placeholder_ints(), ""
        try:
            backend_arg = _checked_backend(backend)
            if not isinstance(wire_dtype, str):
                raise TypeError(f"wire_dtype must be a str ('f32' or 'bf16'), got "
                                f"{type(wire_dtype).__name__}")
            _check_request_key_bits(request_key_bits)
            ints = _checked_ints(num_experts, k, probes, hidden, codewords, kmeans_iterations, seed)
            centers = view(_checked_centers(ints["num_experts"], dim, centers, seed))
            if load_sample is not None:
                check_tensor(load_sample, "load_sample", dim=dim)
                sample = view(load_sample)
        except (TypeError, ValueError) as e:
            error, centers, sample = e, None, None
        with _own_error_first(error):
            impl = _airmoe.MoELayerImpl(
                address, strategy, ints["k"], ints["probes"], ints["hidden"], activation,
                ints["codewords"], ints["kmeans_iterations"], ints["seed"], placement,
                ints["seed"], centers, sample, local_error=_message(error),
                wire_dtype=wire_dtype if isinstance(wire_dtype, str) else "f32",
                backend=backend_arg,
                request_key_bits=request_key_bits if error is None else 0)
        self._adopt(impl, placement, ints["seed"])
        if bias is not None:
            self.bias = torch.as_tensor(bias).detach().clone()

    def traffic(self):
        """What this rank sent since the last reset_traffic() (or since the
        layer was made), per phase: {"requests": {"bytes": n, "messages": n},
        ...} over all peers, from the communicator's meter. Phases are the
        layer's all-to-alls (requests, replies, dispatch, combine and the
        backward's), their control messages (":counts", ":barrier") and its
        collectives (checks, request_keys, ...)."""
        return {phase: dict(c) for phase, c in self._impl.traffic().items()}

    def reset_traffic(self):
        """Zeroes this rank's meter (not collective)."""
        self._impl.reset_traffic()

    @property
    def request_key_bits(self):
        """The request keys' bits (0: off). Setting it is collective: every
        rank sets the same value (a value that differs, or one outside 0 and
        2 to 16, raises on every rank), the keys are made and gathered (or
        dropped), and the outputs stay the same bit for bit. E.g. train
        without keys, then turn them on for inference."""
        return self._impl.config["request_key_bits"]

    @request_key_bits.setter
    def request_key_bits(self, bits):
        _together(self._impl, "request_key_bits", lambda: _check_request_key_bits(bits))
        self._impl.set_request_keys(bits)

    @property
    def request_key_counts(self):
        """With request keys: {"gathers": n, "drift_updates": n}, how this
        rank's router kept them current since they were made (every forward
        hands the centers over: a drift update, or a new gather once some
        expert drifted past its key's rounding error). Zeros without keys."""
        return dict(self._impl.request_key_counts)

    def _adopt(self, impl, placement, seed):
        """Takes the C++ layer: its configuration, parameters and buffers."""
        self._impl = impl
        config = impl.config
        self.num_experts, self.dim, self.k, self.probes = impl.experts, impl.dim, config["k"], \
            config["probes"]
        self.hidden_size, self.activation = impl.hidden, config["activation"]
        self.wire_dtype = config["wire_dtype"]
        self.strategy, self.placement_policy, self.seed = impl.strategy, placement, seed
        self.rank, self.world_size = self._impl.rank, self._impl.size
        self.backend, self._device = impl.backend, _torch_device(impl)
        # Zero-copy: these parameters are the C++ shard's buffers (DLPack
        # views of the backend's memory).
        n, d, h = impl.hosted().size, impl.dim, impl.hidden
        w1 = from_cpp(impl.w1_capsule()).view(n, impl.w1_rows, d)
        w2 = from_cpp(impl.w2_capsule()).view(n, d, h)
        self.w1, self.w2 = nn.Parameter(w1), nn.Parameter(w2)
        self._w_ptrs = (self.w1.data_ptr(), self.w2.data_ptr())
        self.centers_local = nn.Parameter(torch.from_numpy(self._impl.local_centers()))
        self.register_buffer("codebook", torch.from_numpy(self._impl.codewords()))
        self.register_buffer("hosted", torch.from_numpy(self._impl.hosted()).long())
        self.register_buffer("owners", torch.from_numpy(self._impl.owners()).long())
        bias = self._impl.bias()
        self.register_buffer("bias", None if bias is None else torch.from_numpy(bias).view(-1))

    def __reduce_ex__(self, protocol):
        # copy.copy, copy.deepcopy, pickle and torch.save all come here.
        raise TypeError(
            "MoELayer cannot be copied or pickled: it is this rank's part of a layer shared by "
            "every rank of its MPI communicator, and a copy made on one rank would belong to no "
            "job. Save it with save_checkpoint(path) and rebuild it with "
            "MoELayer.load_checkpoint(comm, path) (every rank), or copy its state_dict()")

    # -- Hugging Face expert weights (docs/hf.md) ---------------------------
    def load_hf_experts(self, gate, up, down):
        """Collective: copies Hugging Face SwiGLU expert weights into the
        experts this rank hosts (only theirs are read). ``gate`` and ``up``:
        every expert's gate_proj / up_proj weight ([E, h, d] tensors, or
        sequences of E [h, d] tensors; Mixtral's w1 / w3), ``down``: every
        expert's down_proj weight ([E, d, h] or E [d, h]; Mixtral's w2). Any
        floating dtype (copied as float32). The layer must have
        activation="swiglu", this h and d; a bad argument raises ValueError
        on every rank, naming it and the expert."""
        h, d = self.hidden_size, self.dim
        hosted = self.hosted.tolist()

        def check():
            if self.activation != "swiglu":
                raise ValueError(f"load_hf_experts: the layer's activation is "
                                 f"{self.activation!r}; HF's experts need activation='swiglu'")
            for name, weights, shape in (("gate", gate, (h, d)), ("up", up, (h, d)),
                                         ("down", down, (d, h))):
                _check_hf_weights(name, weights, shape, self.num_experts, hosted)
            self._check_shared_weights()

        _together(self._impl, "load_hf_experts", check)
        with torch.no_grad():
            for i, e in enumerate(hosted):
                self.w1[i, :h].copy_(gate[e])
                self.w1[i, h:].copy_(up[e])
                self.w2[i].copy_(down[e])

    def load_hf_expert_modules(self, experts):
        """Collective: ``load_hf_experts`` from an HF MoE block's ``experts``
        (a sequence of E modules with gate_proj / up_proj / down_proj, as
        Qwen2-MoE, Qwen3-MoE and OLMoE have, or w1 / w3 / w2, as Mixtral
        has); only the hosted experts' weights are read."""
        gate, up, down = [], [], []
        error = None
        try:
            for e, module in enumerate(experts):
                g, u, dn = _hf_projections(module, e)
                gate.append(g)
                up.append(u)
                down.append(dn)
        except (TypeError, ValueError) as err:
            error = err
        if error is not None:  # raised on every rank by load_hf_experts' check
            gate = up = down = _Refused(error)
        self.load_hf_experts(gate, up, down)

    # -- checkpoints (runtime/checkpoint.h, docs/checkpoints.md) ----------
    def save_checkpoint(self, path):
        """Collective: writes the whole layer (every rank's shard) into the
        directory ``path`` (str, bytes or os.PathLike; rank 0's names it),
        replacing a previous checkpoint there only once the new one is
        complete; other files in the directory are kept. Refused on every
        rank when a rank's w1/w2 no longer share the C++ shard's memory (as
        forward() refuses). Warns on rank 0 when the previous checkpoint could
        not be removed (the warning says where it is)."""
        decoded = None

        def check():
            nonlocal decoded
            decoded = _checkpoint_path(path, "save_checkpoint")
            self._check_shared_weights()
            self._checked_bias()

        _together(self._impl, "save_checkpoint", check)
        self._hand_over_routing_state()
        leftover = self._impl.save_checkpoint(decoded)
        if leftover:
            warnings.warn(f"MoELayer.save_checkpoint: the checkpoint is saved, but {leftover}",
                          RuntimeWarning, stacklevel=2)

    @classmethod
    def load_checkpoint(cls, comm, path, backend=None):
        """Collective: the layer saved in ``path`` (str, bytes or
        os.PathLike), on ``comm`` (any number of ranks: the experts are placed
        anew when it differs from the saved one; None: one rank in this
        process, as the constructor's), on ``backend`` (as the
        constructor's; None: the host's). A damaged or foreign checkpoint,
        ranks that read different checkpoints, or a bad backend raise
        ValueError on every rank."""
        address = _comm_address(comm)
        error, decoded, backend_arg = None, "", ""
        try:
            decoded = _checkpoint_path(path, "load_checkpoint")
            backend_arg = _checked_backend(backend)
        except (TypeError, ValueError) as e:
            error = e
        with _own_error_first(error):
            impl = _airmoe.MoELayerImpl(address, decoded, local_error=_message(error),
                                        backend=backend_arg)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._adopt(impl, "checkpoint", None)
        return layer

    # -- configuration, checked on load ----------------------------------
    def _config(self):
        return {"strategy": self.strategy, "num_experts": self.num_experts, "dim": self.dim,
                "hidden": self.hidden_size, "activation": self.activation, "k": self.k,
                "probes": self.probes, "placement": self.placement_policy,
                "world_size": self.world_size, "rank": self.rank}

    def get_extra_state(self):
        return self._config()

    def set_extra_state(self, state):
        pass  # checked in _load_from_state_dict

    # How the placement was made, not what it is: a layer loaded from a
    # checkpoint ("checkpoint") takes the state of the layer that saved it;
    # the placement itself (hosted ids, owners) is compared below.
    _LABELS = ("placement",)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        mine = self._config()
        theirs = state_dict.get(prefix + "_extra_state")
        if isinstance(theirs, dict):
            diff = [f"{key}: state has {theirs.get(key)!r}, layer has {value!r}"
                    for key, value in mine.items()
                    if key not in self._LABELS and theirs.get(key) != value]
            if diff:
                raise ValueError("MoELayer.load_state_dict: the state is from another "
                                 "configuration: " + "; ".join(diff))
        for name in ("hosted", "owners", "codebook", "w1", "w2", "centers_local"):
            key = prefix + name
            if key not in state_dict:
                continue
            t, own = state_dict[key], getattr(self, name)
            if tuple(t.shape) != tuple(own.shape):
                raise ValueError(
                    f"MoELayer.load_state_dict: {name} has shape {list(t.shape)} in the state, "
                    f"{list(own.shape)} in this layer (another configuration, placement or rank)")
            if name in ("hosted", "owners", "codebook") and not torch.equal(
                    t.to(own.dtype), own):
                raise ValueError(
                    f"MoELayer.load_state_dict: {name} differs from this layer's (the state "
                    f"is from another placement, codebook or rank); the C++ layer fixes "
                    f"{name} at construction")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- forward ---------------------------------------------------------
    def forward(self, hidden):
        """hidden [T_r, d] float32 or bfloat16 (this rank's tokens) -> [T_r, d]
        in hidden's dtype. Collective. The math is float32: bfloat16 is
        widened first (exactly) and the output rounded to nearest even, so
        autograd hands hidden a bfloat16 gradient (the float32 one, rounded)."""
        _together(self._impl, "forward", lambda: self._check_forward(hidden))
        self._hand_over_routing_state()
        x = hidden.float() if hidden.dtype == torch.bfloat16 else hidden
        out = _LayerFunction.apply(self._impl, x, self.w1, self.w2, self.centers_local)
        return out.to(hidden.dtype)

    def _hand_over_routing_state(self):
        """Collective: the centers and the bias as they are now go to the C++
        routing (forward and save_checkpoint). Ranks whose centers moved (an
        optimizer step, load_state_dict) hand them over; when none moved this
        is one small all-gather. The bias is compared by digest across ranks."""
        self._impl.set_local_centers(view(self.centers_local.detach()))
        bias = self._checked_bias()
        self._impl.set_bias(None if bias is None else view(bias))

    def _checked_bias(self):
        return checked_bias(self.bias, self.num_experts, torch.device("cpu"), "layer")

    def _check_forward(self, hidden):
        if torch.is_tensor(hidden) and hidden.device != self._device:
            raise ValueError(f"hidden is on {hidden.device}, but the layer's backend "
                             f"{self.backend!r} computes on {self._device}: pass "
                             f"hidden.to('{self._device}')")
        if torch.is_tensor(hidden) and hidden.dtype not in _HIDDEN_DTYPES:
            raise ValueError(f"hidden must be float32 or bfloat16 for MoELayer (the math is "
                             f"float32), got {hidden.dtype}")
        check_tensor(hidden, "hidden", dim=self.dim, dtypes=_HIDDEN_DTYPES,
                     devices=(self._device.type,))
        self._checked_bias()
        self._check_shared_weights()

    def _check_shared_weights(self):
        """forward() and save_checkpoint() use the C++ shard's weights, which
        are w1/w2 only while these share its memory."""
        if (self.w1.data_ptr(), self.w2.data_ptr()) != self._w_ptrs or \
                self.w1.dtype != torch.float32 or self.w2.dtype != torch.float32:
            raise RuntimeError("MoELayer: w1/w2 no longer share the C++ shard's memory (they "
                               "were replaced, e.g. by .to(), .double() or an assignment to "
                               ".data such as torch.nn.utils.vector_to_parameters); update "
                               "them in place instead (with torch.no_grad(): "
                               "layer.w1.copy_(...))")

    def extra_repr(self):
        return (f"strategy={self.strategy!r}, num_experts={self.num_experts}, dim={self.dim}, "
                f"k={self.k}, probes={self.probes}, hidden={self.hidden_size}, "
                f"placement={self.placement_policy!r}, backend={self.backend!r}, "
                f"rank={self.rank}/{self.world_size}, "
                f"hosted={self.hosted.numel()}")
