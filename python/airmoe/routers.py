"""torch.nn routers over the airmoe C++ library.

All three routers share one interface::

    gates, indices = router(hidden)    # hidden [T, d] -> gates [T, k], indices [T, k] int64

Row t holds token t's k experts, best first (higher logit, then lower expert
id), and gates = softmax over the k chosen logits z_e = <w_e, h>. Gates are
differentiable in ``hidden`` and in the router's parameters; indices are not
(selection is piecewise constant).

Tensors and copies
------------------
Inputs must be CPU or CUDA tensors, contiguous, float32, bfloat16 or
float64, and every router parameter must share hidden's dtype and device.
Anything else (float16, integers, other devices, mixed devices,
non-contiguous views, wrong shapes) raises ValueError naming the fix: airmoe
never copies or converts silently. A router computes where its parameters
are: on the CPU (the host backend) or on cuda:N (the cuda backend of a
build with -DAIRMOE_WITH_CUDA=ON, on torch's current CUDA stream); move it
with ``.to(device)`` / ``.cuda()`` / ``.cpu()``, and its dtype with
``.bfloat16()`` / ``.float()``, like any module: the C++ copy follows.

* float32 and bfloat16 (the training path): ``hidden`` is handed to C++ in
  place (DLPack, no copy); the forward and the backward are the C++
  router's (``RouterGradients``: d_hidden and the sparse rows of d_centers,
  scattered here into a dense [E, d] gradient). bfloat16 values are widened
  exactly to float32 as they are read and every sum runs in float32 or
  double (the ops' numeric contract): bfloat16 routing equals float32
  routing of the same (bfloat16-representable) values. Gates and gradients
  come back in the input's dtype, on its device. AIR keeps its centers and
  codebook as a float32 host copy (its lists are built on the host).
* float64 (for ``torch.autograd.gradcheck`` and debugging): an explicit,
  documented conversion. Selection runs in C++ on a float32 copy of hidden
  and the parameters (selection is piecewise constant, so its derivative is
  zero wherever it is defined); the gates are then computed in float64 from
  the chosen experts by the closed-form softmax below, whose backward is
  written out by hand (not C++). The float32 tests check that the C++
  backward equals this closed form to 1e-5, and gradcheck checks the closed
  form in float64: together they cover the C++ gradients.

  Closed form, per token, chosen rows w_j (j < k)::

      z_j = <h, w_j>,  g = softmax(z),  dz_j = g_j (dg_j - sum_i g_i dg_i)
      dh  = sum_j dz_j w_j,  dw_j = dz_j h

Gate modes (``gate_mode=``, an attribute that may change between calls):
'chosen' (the default: softmax over the k chosen logits) and 'sigmoid'
(DeepSeek-V3 / GLM-4.5: sigmoid(z_j) of the k chosen, renormalized to sum 1;
in float64 the softmax of logsigmoid(z), differentiated by autograd). The
'shortlist' mode of the C++ routers is not offered here.

Selection bias
--------------
``bias`` (a buffer, None by default; a float32 tensor [E] on the router's
device) selects the experts by z_e + b_e while the gates come from the
unbiased z_e (DeepSeek-V3's auxiliary-loss-free balancing;
docs/routing.md). It takes no gradient. It stays float32 whatever the
parameters' dtype: ``.to(device)`` / ``.cuda()`` move it with the module,
``.bfloat16()`` / ``.double()`` leave its dtype (bfloat16 and float64
routers select with the same float32 bias). A bias given to the
constructor is copied to the parameters' device. A bias of another dtype,
shape or device raises ValueError at the next forward; its length and
finiteness are checked by the C++ router. Assign it or change it in place
between steps: it reaches the C++ router (in place, by DLPack) at the next
forward, which rebuilds nothing else.
"""

import math

import torch
from torch import nn

from . import _airmoe
from ._tensors import (INT32_MAX, INT64_MAX, MAX_EXPERTS, ROUTER_DEVICES, ROUTER_DTYPES,
                       backend_name, check_expert_count, check_int, check_seed, checked_bias,
                       check_tensor, cpp_tensor, current_stream, from_cpp, host_float32, initial_centers,
                       same_bits)

__all__ = ["AIRRouter", "DenseRouter", "ProductKeyRouter", "chosen_softmax", "chosen_sigmoid"]

GATE_MODES = ("chosen", "sigmoid")


class _ChosenSoftmax(torch.autograd.Function):
    """gates = softmax_j <hidden, rows[:, j]>, with the closed-form backward."""

    @staticmethod
    def forward(ctx, hidden, rows):  # hidden [T, d], rows [T, k, d]
        z = torch.einsum("td,tkd->tk", hidden, rows)
        g = torch.softmax(z, dim=-1)
        ctx.save_for_backward(hidden, rows, g)
        return g

    @staticmethod
    def backward(ctx, dg):
        hidden, rows, g = ctx.saved_tensors
        dz = g * (dg - (g * dg).sum(-1, keepdim=True))
        d_hidden = torch.einsum("tk,tkd->td", dz, rows)
        d_rows = dz.unsqueeze(-1) * hidden.unsqueeze(1)
        return d_hidden, d_rows


def chosen_softmax(hidden, rows):
    """Closed-form gates of the chosen experts: hidden [T, d], rows [T, k, d]
    (the chosen experts' center rows, e.g. ``centers[indices]``)."""
    return _ChosenSoftmax.apply(hidden, rows)


def chosen_sigmoid(hidden, rows):
    """Sigmoid gates of the chosen experts, renormalized: softmax of
    logsigmoid(<hidden, rows[:, j]>) (finite for any finite logit), in torch."""
    z = torch.einsum("td,tkd->tk", hidden, rows)
    return torch.softmax(torch.nn.functional.logsigmoid(z), dim=-1)


def _closed_form_gates(gate_mode, hidden, rows):
    return (chosen_sigmoid if gate_mode == "sigmoid" else chosen_softmax)(hidden, rows)


class _CppRoute(torch.autograd.Function):
    """float32 / bfloat16 routing through a C++ router: forward and backward
    in C++, on hidden's device (torch's current stream there).

    `impl` has _cpp_route(tokens, stream) -> (experts, gates, handle) and
    _cpp_backward(tokens, handle, d_gates, params, stream) -> (d_tokens,
    (rows, values) per param), tensors as DLPack capsules.
    """

    @staticmethod
    def forward(ctx, impl, hidden, *params):
        experts, gates, handle = impl._cpp_route(cpp_tensor(hidden),
                                                 current_stream(hidden.device))
        ctx.impl, ctx.handle = impl, handle
        # Saving the parameters makes autograd refuse a backward after they
        # were modified in place; the backward also refuses changes that
        # autograd does not see (.data, NumPy views), by comparing contents.
        ctx.save_for_backward(hidden, *params)
        indices = from_cpp(experts).long()
        ctx.mark_non_differentiable(indices)
        return from_cpp(gates).to(hidden.dtype), indices

    @staticmethod
    def backward(ctx, d_gates, _d_indices):
        hidden, *params = ctx.saved_tensors
        impl = ctx.impl
        impl._require_synced(params)
        # d_gates comes from autograd (it may be an expanded view, in
        # hidden's dtype): a float32 contiguous copy here is internal.
        d_tokens, *sparse = impl._cpp_backward(
            cpp_tensor(hidden), ctx.handle, d_gates.float().contiguous(),
            [impl._backward_arg(p) for p in params], current_stream(hidden.device))
        grads = []
        for p, (rows, values), needed in zip(params, sparse, ctx.needs_input_grad[2:]):
            if not needed:
                grads.append(None)
                continue
            g = torch.zeros_like(p)
            g[from_cpp(rows).view(-1).long()] = from_cpp(values).to(p.dtype)
            grads.append(g)
        d_hidden = from_cpp(d_tokens).to(hidden.dtype) if ctx.needs_input_grad[1] else None
        return (None, d_hidden, *grads)


def _check_router_tensor(x, name, dim=None, rows=None):
    check_tensor(x, name, dim=dim, rows=rows, dtypes=ROUTER_DTYPES, devices=ROUTER_DEVICES)


def _check_hidden(hidden, dim, params):
    _check_router_tensor(hidden, "hidden", dim=dim)
    for name, p in params:
        if p.device != hidden.device:
            raise ValueError(
                f"hidden is on {hidden.device} but the router's {name} is on {p.device}: "
                f"move one of them (router.to(hidden.device), or hidden.to({str(p.device)!r}))")
        if p.dtype != hidden.dtype:
            raise ValueError(
                f"hidden is {hidden.dtype} but the router's {name} is {p.dtype}: convert one "
                f"of them (router.float() / router.bfloat16() / router.double(), or "
                f"hidden.to({p.dtype}))")
        _check_router_tensor(p, name)


class _Router(nn.Module):
    """What the three routers share.

    The C++ index (``_index``) routes on its own copy of the parameters.
    ``_sync()`` hands it the current ones before every use; it compares them
    bit for bit with its copy and rebuilds on any difference, because
    autograd's ``_version`` misses writes through ``.data`` and NumPy views.

    Copies (``copy.deepcopy``, pickle, ``torch.save`` of the module) carry the
    parameters, buffers and configuration but not the index, which is rebuilt
    from them at first use: a copy routes exactly like the original.
    """

    _index = None
    _snapshot = None  # CUDA: the parameters the index was last synced with
    _float32_buffers = ("bias",)  # see _apply

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_index"] = None
        state["_snapshot"] = None
        return state

    def _sync(self):
        """Brings the index up to date with the parameters: a new index when
        they moved to another device (or for a copy), then the index's sync.
        On a GPU the comparison runs here, on the device, against a copy of
        the parameters (the index does not read its own back); on the CPU
        the index compares."""
        params = self._synced_tensors()
        device = params[0].device
        if self._index is None or self._index.device != backend_name(device):
            self._index = self._new_index()
            self._snapshot = None
        if device.type != "cuda" or self._snapshot is None or not same_bits(params,
                                                                            self._snapshot):
            if device.type == "cuda":
                self._snapshot = [p.detach().clone() for p in params]
            self._sync_index(params)
        self._index.set_bias(self._bias_arg(device), stream=current_stream(device))

    def _sync_index(self, params):
        """Hands the index the tensors _synced_tensors() gave."""
        self._index.sync(*[self._index_arg(p) for p in params])

    def _index_arg(self, p):
        """A parameter as the index takes it (in place, in its dtype)."""
        return cpp_tensor(p)

    def _backward_arg(self, p):
        """A parameter for the backward's rows check: on the CPU what the
        index took; on a GPU nothing (_require_synced compared)."""
        return None if p.device.type == "cuda" else self._index_arg(p)

    def _require_synced(self, params):
        """On a GPU: the parameters still hold the bits the index routed
        with (changes through .data escape autograd's version check)."""
        if params[0].device.type == "cuda" and (self._snapshot is None or
                                                not same_bits(params, self._snapshot)):
            raise RuntimeError(
                "backward: the router's parameters changed between the forward and this "
                "backward (in place through .data, which autograd does not track); the "
                "forward's routes and gates came from the old values: run the forward again "
                "after changing them")

    def _init_selection(self, gate_mode, bias, device):
        """gate_mode and the bias buffer (a given bias is copied to `device`,
        the parameters' device, in its own dtype: _bias_arg checks it)."""
        self.gate_mode = gate_mode
        self._checked_gate_mode()
        if bias is not None:
            bias = torch.as_tensor(bias).detach().to(device).clone()
        self.register_buffer("bias", bias)
        self._bias_arg(device)

    def _apply(self, fn, *args, **kwargs):
        # Device moves reach the float32 buffers (the bias, AIR's codebook);
        # dtype conversions (.bfloat16(), .double()) do not: the index takes
        # them as float32 whatever the parameters' dtype.
        kept = {name: getattr(self, name, None) for name in self._float32_buffers}
        super()._apply(fn, *args, **kwargs)
        for name, old in kept.items():
            new = getattr(self, name, None)
            if old is not None and new is not None and new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def _checked_gate_mode(self):
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode = {self.gate_mode!r} is not one of {GATE_MODES} (the "
                             "C++ 'shortlist' mode is not offered by the torch routers)")
        return self.gate_mode

    def _bias_arg(self, device):
        """The bias as the index takes it ([E, 1] float32 on the parameters'
        device, in place), or None. Its length and finiteness are the C++
        router's checks."""
        b = checked_bias(self.bias, self.num_experts, device, "router")
        return None if b is None else cpp_tensor(b)

    def _checked_k(self):
        return check_int(self.k, "k", 1, self.num_experts)

    def _cpp_route(self, tokens, stream=0):
        return self._index.route(tokens, self._checked_k(), self._checked_gate_mode(),
                                 stream=stream)

    def _cpp_backward(self, tokens, handle, d_gates, params, stream=0):
        return self._index.backward(tokens, handle, d_gates, *params, stream=stream)


class _CenterRouter(_Router):
    """Shared parts of routers with one center per expert (AIR, dense)."""

    def _init_centers(self, num_experts, dim, k, centers, seed):
        self.num_experts = check_expert_count(num_experts, "num_experts")
        self.dim = check_int(dim, "dim", 1, INT64_MAX)
        self.seed = check_seed(seed)
        self.k = check_int(k, "k", 1, self.num_experts)
        centers = initial_centers(self.num_experts, self.dim, centers, self.seed).clone()
        self.centers = nn.Parameter(centers)

    def _forward(self, hidden):
        _check_hidden(hidden, self.dim, [("centers", self.centers)])
        self._sync()
        if hidden.dtype != torch.float64:
            return _CppRoute.apply(self, hidden, self.centers)
        # float64: float32 selection in C++, float64 closed-form gates.
        with torch.no_grad():
            _, experts = _CppRoute.apply(self, hidden.detach().float().contiguous(),
                                         self.centers.detach())
        return _closed_form_gates(self.gate_mode, hidden, self.centers[experts]), experts

    def extra_repr(self):
        return (f"num_experts={self.num_experts}, dim={self.dim}, k={self.k}, "
                f"gate_mode={self.gate_mode!r}")


class AIRRouter(_CenterRouter):
    """Adaptive inverted-index router (AIR).

    Args:
        num_experts: E. dim: d. k: experts per token (1 <= k <= E).
        codewords: C, the codebook size (1 <= C <= E); None: C ~ sqrt(E)
            (``airmoe._airmoe.recommended_air``, from docs/routing.md).
        probes: m, codewords probed per token (1 <= m <= C; None: the m
            recommended with that C, measured on clustered synthetic
            routers; learned routers need more); more are probed
            when the first m lists hold fewer than k experts. A plain
            attribute: change it between calls, nothing is rebuilt. With
            m = C the router equals exact top-k.
        centers: initial expert centers [E, d] (copied), or None for a seeded
            N(0, 1/d) initialization.
        kmeans_iterations, seed: codebook training (spherical k-means, seeded;
            0 <= seed < 2^64).
        update_every: N > 0 makes forward() call update_codebook() itself on
            every N-th call in training mode (before routing). 0: never; the
            training loop calls update_codebook() after optimizer.step().
        list_cap: balanced lists: at most this many experts have a list as
            their primary (0: no cap); the rest go to their next nearest list.
        spills, spill_lambda: spilled lists: each expert also sits in
            `spills` more lists chosen by SOAR (weight spill_lambda); an
            expert is still scored once per token. Off by default.
        lists: 'centers' (the default: the codebook is trained on the
            expert centers and each expert sits in its nearest codeword's
            list) or 'query' (query-aware lists, router/query_lists.h: the
            codebook is trained on sample tokens and each codeword's list
            holds the `list_length` experts that its tokens' exact top-k,
            biased by ``bias`` when set, picks most; every expert sits in at
            least one list, so m = C still equals exact top-k). Query lists
            are what a balanced, learned router needs (docs/routing.md,
            "Query-aware lists"); they go stale as the centers and the bias
            move: call ``refresh_lists(sample_hidden)`` to rebuild them.
            With 'query', update_every, list_cap and spills must stay 0 and
            update_codebook() raises.
        list_sample: query lists: the tokens [S, d] (C <= S) the first lists
            are built from; None: the centers themselves (each expert's
            exact top-k among the experts), until refresh_lists(). Read as
            a float32 CPU copy.
        list_length: query lists: L, the most-picked experts each list keeps
            (1 <= L <= E; None: min(E, 256)).
        list_k: query lists: how deep each sample token's exact top-k is
            counted (k <= list_k <= E; None: min(2k, E), which found more
            of the exact experts than k within a shortlist of E/16 on every
            measured router, docs/routing.md, "How deep the lists count").
            Deeper counts fill the places of a list that the sample's top-k
            picks leave empty with the experts its tokens rank next.
        gate_mode: 'chosen' or 'sigmoid' (module docstring).
        bias: the selection bias [E] (float32, copied to the router's
            device), or None (module docstring).
            AIR's codebook ranks lists without it; with every list probed
            (m = C) biased AIR equals biased dense routing.
        device: where the codebook is trained and the router computes
            (None: the CPU; "cuda" / "cuda:N" with a CUDA build). Move it
            later with ``.to(device)``, like any module.

    Integer arguments outside these ranges (or outside the C++ integer
    types: 32-bit k, m, iterations and spills, 64-bit list_cap) raise
    ValueError naming the argument; non-integers raise TypeError.

    Parameters and buffers: ``centers`` (nn.Parameter [E, d]) and ``codebook``
    (buffer [C, d], float32, unit rows), both in state_dict. Query lists
    add the lists themselves, saved and restored exactly (not recounted:
    the sample is gone): ``list_offsets`` (int64 [E + 1]) and
    ``list_members`` (int64, each expert's lists in priority order, CSR),
    and ``list_sample_size`` (int64 scalar: the size of the sample they
    were built from, for ``list_build_flops``). A restored or copied
    router routes exactly like the original. The C++ router
    keeps its own copy of the centers and codebook and compares them bit for
    bit with the module's before every use: any change (an optimizer step,
    load_state_dict, a write through ``.data`` or a NumPy view, a replaced
    tensor) rebuilds what it affects.
    """

    _float32_buffers = ("bias", "codebook")  # the codebook: float32 unit rows, as the index has it
    LIST_KINDS = ("centers", "query")
    lists, list_length, list_k = "centers", 0, 1  # routers pickled before query lists: center lists
    _QUERY_BUFFERS = ("list_offsets", "list_members", "list_sample_size")

    def __init__(self, num_experts, dim, k, codewords=None, probes=None, *, centers=None,
                 kmeans_iterations=10, seed=0, update_every=0, list_cap=0, spills=0,
                 spill_lambda=1.0, device=None, gate_mode="chosen", bias=None, lists="centers",
                 list_sample=None, list_length=None, list_k=None):
        super().__init__()
        self._init_centers(num_experts, dim, k, centers, seed)
        if device is not None:  # trained and built there (a GPU's k-means)
            self.centers = nn.Parameter(self.centers.detach().to(device))
        self._init_selection(gate_mode, bias, self.centers.device)
        recommended_c, recommended_m = _airmoe.recommended_air(self.num_experts)
        codewords = check_int(recommended_c if codewords is None else codewords, "codewords C",
                              1, self.num_experts)
        self.probes = check_int(recommended_m if probes is None else probes, "probes m", 1,
                                codewords)
        self.kmeans_iterations = check_int(kmeans_iterations, "kmeans_iterations", 0, INT32_MAX)
        self.update_every = check_int(update_every, "update_every", 0, INT64_MAX)
        self.list_cap = check_int(list_cap, "list_cap", 0, INT64_MAX)
        self.spills = check_int(spills, "spills", 0, INT32_MAX)
        self.spill_lambda = float(spill_lambda)
        self._init_list_kind(lists, list_length, list_k)
        self._calls = 0
        self._index = self._new_index(codewords)
        if self.lists == "query":
            sample = self.centers if list_sample is None else list_sample
            self._build_query_lists(self._checked_sample(sample, "list_sample"))
            return
        # C++ validates the centers and the list options, and trains the codebook.
        self._index.set_centers(host_float32(self.centers))
        self.register_buffer("codebook",
                             torch.from_numpy(self._index.codewords()).to(self.centers.device))

    def _init_list_kind(self, lists, list_length, list_k):
        if lists not in self.LIST_KINDS:
            raise ValueError(f"lists = {lists!r} is not one of {self.LIST_KINDS}")
        self.lists = lists
        self.list_length = 0
        self.list_k = self.k  # center lists: unused
        if lists != "query":
            for name, value in (("list_length", list_length), ("list_k", list_k)):
                if value is not None:
                    raise ValueError(f"{name} is for query lists: pass lists='query'")
            return
        for name in ("update_every", "list_cap", "spills"):
            if getattr(self, name):
                raise ValueError(f"{name} = {getattr(self, name)} does not apply to query lists "
                                 f"(lists='query'): leave it 0 and call refresh_lists()")
        self.list_length = check_int(min(self.num_experts, 256) if list_length is None
                                     else list_length, "list_length L", 1, self.num_experts)
        self.list_k = check_int(min(2 * self.k, self.num_experts) if list_k is None else list_k,
                                "list_k", self.k, self.num_experts)

    def _checked_sample(self, sample, name):
        """Sample tokens as the index takes them: [S >= 1, d], a float32 CPU
        copy (C++ names their non-finite or zero rows)."""
        _check_router_tensor(sample, name, dim=self.dim)
        if sample.shape[0] < 1:
            raise ValueError(f"{name} has no tokens (shape {tuple(sample.shape)}): query lists "
                             f"need at least C = {self._index.codeword_count} sample tokens")
        return host_float32(sample)

    def _build_query_lists(self, sample):
        """The first query lists (C++ build_query_lists), and their buffers."""
        self._index.build_query_lists(host_float32(self.centers),
                                      self._bias_arg(self.centers.device), sample)
        device = self.centers.device
        self.register_buffer("codebook", torch.from_numpy(self._index.codewords()).to(device))
        self.register_buffer("list_sample_size", torch.tensor(sample.shape[0], device=device))
        offsets, members = self._index.query_membership()
        self.register_buffer("list_offsets", torch.from_numpy(offsets).to(device))
        self.register_buffer("list_members", torch.from_numpy(members).to(device))

    def _take_query_lists(self, sample_size):
        """Copies the index's rebuilt query lists into the buffers."""
        self.codebook.copy_(torch.from_numpy(self._index.codewords()))
        self.list_sample_size.fill_(sample_size)
        offsets, members = self._index.query_membership()
        self.list_offsets.copy_(torch.from_numpy(offsets))
        self.list_members = torch.from_numpy(members).to(self.list_members.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Query lists: the members' count changes with every rebuild, so the
        # buffer takes the saved one's shape before the copy.
        saved = state_dict.get(prefix + "list_members")
        if self.lists == "query" and isinstance(saved, torch.Tensor):
            self.list_members = torch.empty_like(saved, device=self.list_members.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _new_index(self, codewords=None):
        return _airmoe.AirIndex(self.dim, codewords or self.num_codewords, self.kmeans_iterations,
                                self.seed, self.list_cap, self.spills, self.spill_lambda,
                                device=backend_name(self.centers.device),
                                list_length=self.list_length, query_k=self.list_k)

    def _index_arg(self, p):
        if not p.is_floating_point():  # query lists' int64 buffers
            return p.cpu().numpy()
        return host_float32(p)  # the AIR index keeps float32 host copies

    def _sync_index(self, params):
        if self.lists != "query":
            return super()._sync_index(params)
        centers, codebook, offsets, members, sample_size = params
        self._index.sync(self._index_arg(centers), self._index_arg(codebook),
                         self._index_arg(offsets), self._index_arg(members), int(sample_size))

    @property
    def num_codewords(self):
        return self.codebook.shape[0]

    def _synced_tensors(self):
        if self.centers.device.type == "meta" or self.codebook.device.type == "meta":
            raise RuntimeError("the AIR router has no expert centers or codebook yet "
                               "(meta tensors): materialize the module first")
        _check_router_tensor(self.centers, "centers", dim=self.dim, rows=self.num_experts)
        _check_router_tensor(self.codebook, "codebook", dim=self.dim)
        if self.codebook.device != self.centers.device:
            raise ValueError(f"the AIR router's codebook is on {self.codebook.device} but its "
                             f"centers on {self.centers.device}: move the module with .to()")
        if self.lists != "query":
            return self.centers, self.codebook
        return (self.centers, self.codebook,
                *(getattr(self, name) for name in self._QUERY_BUFFERS))

    def forward(self, hidden):
        """hidden [T, d] -> (gates [T, k] hidden.dtype, indices [T, k] int64)."""
        self._calls += 1
        if self.training and self.update_every and self._calls % self.update_every == 0:
            self.update_codebook()
        return self._forward(hidden)

    def _cpp_route(self, tokens, stream=0):
        return self._index.route(tokens, self._checked_k(),
                                 check_int(self.probes, "probes m", 1, self.num_codewords),
                                 self._checked_gate_mode(), stream=stream)

    @torch.no_grad()
    def update_codebook(self, step=1.0, updates=1):
        """Adaptive spherical k-means on the current centers: `updates` steps,
        mu_c <- normalize((1 - step) mu_c + step * mean of its members), empty
        codewords repaired; then the inverted lists are rebuilt. Call after
        optimizer.step(). Gradient-free: the loss does not change."""
        updates = check_int(updates, "updates", 0, INT32_MAX)
        if self.lists == "query":
            raise RuntimeError("update_codebook: query lists' codebook is trained on tokens, not "
                               "on the centers; call refresh_lists(sample_hidden)")
        self._sync()
        self._index.update_codebook(float(step), updates)
        self.codebook.copy_(torch.from_numpy(self._index.codewords()))
        if self._snapshot is not None:  # the index has these codewords already
            self._snapshot = [p.detach().clone() for p in self._synced_tensors()]

    @torch.no_grad()
    def refresh_lists(self, sample_hidden):
        """Query lists: rebuilds the codebook (spherical k-means on the
        sample) and the lists (the sample's exact top-k under the current
        centers and bias) in C++ (router/query_lists.h). sample_hidden:
        [S, d] router inputs, C <= S, finite and nonzero rows, read as a
        float32 CPU copy. Gradient-free; costs ``list_build_flops``."""
        if self.lists != "query":
            raise RuntimeError("refresh_lists: this AIR router has center lists (lists="
                               "'centers'); build it with lists='query' for query lists")
        sample = self._checked_sample(sample_hidden, "sample_hidden")
        self._sync()
        self._index.refresh_lists(sample)
        self._take_query_lists(sample.shape[0])
        if self._snapshot is not None:  # the index has these lists already
            self._snapshot = [p.detach().clone() for p in self._synced_tensors()]

    @property
    def list_build_flops(self):
        """FLOPs of building the current query lists (C++
        query_lists_build_flops: the sample's exact routing, the k-means on
        it and its assignment); 0.0 for center lists."""
        if self.lists != "query":
            return 0.0
        self._sync()
        return self._index.query_build_flops()

    @torch.no_grad()
    def shortlist_sizes(self, hidden):
        """Experts scored exactly per token, [T] int64: the size of the
        deduplicated union of the lists each token probes (what routing
        FLOPs count beyond the C probe scores). Gradient-free."""
        _check_hidden(hidden, self.dim, [("centers", self.centers)])
        self._sync()
        _, _, handle = self._cpp_route(cpp_tensor(hidden), current_stream(hidden.device))
        return torch.from_numpy(handle.shortlist_size).long().to(hidden.device)

    def list_sizes(self):
        """Inverted-list lengths [C] (int64) for the current centers and codebook."""
        self._sync()
        return torch.from_numpy(self._index.list_sizes())

    def extra_repr(self):
        lists = (f", lists='query', list_length={self.list_length}, list_k={self.list_k}"
                 if self.lists == "query" else "")
        return (super().extra_repr() +
                f", codewords={self.num_codewords}, probes={self.probes}"
                f", update_every={self.update_every}{lists}")


class DenseRouter(_CenterRouter):
    """Exact top-k routing over all E centers (the reference). Arguments and
    parameter sync as for AIRRouter."""

    def __init__(self, num_experts, dim, k, *, centers=None, seed=0, gate_mode="chosen",
                 bias=None):
        super().__init__()
        self._init_centers(num_experts, dim, k, centers, seed)
        self._init_selection(gate_mode, bias, self.centers.device)
        self._index = self._new_index()

    def _new_index(self):
        return _airmoe.DenseIndex(cpp_tensor(self.centers))

    def _synced_tensors(self):
        _check_router_tensor(self.centers, "centers", dim=self.dim, rows=self.num_experts)
        return (self.centers,)

    def forward(self, hidden):
        """hidden [T, d] -> (gates [T, k] hidden.dtype, indices [T, k] int64)."""
        return self._forward(hidden)


class ProductKeyRouter(_Router):
    """Product-key routing (PEER): E = n^2 experts from two sub-key sets,
    ``keys1`` [n, d // 2] and ``keys2`` [n, d - d // 2] (nn.Parameters);
    expert i * n + j has the logit <keys1[i], h[:d/2]> + <keys2[j], h[d/2:]>.
    1 <= n <= 46340 (expert ids are 32-bit), d >= 2, 1 <= k <= n^2,
    0 <= seed < 2^64; parameter sync as for AIRRouter. gate_mode and bias as
    for AIRRouter; the bias enters after the sub-key stage (it ranks the
    grid of each half's top min(k, n) sub-keys, docs/routing.md)."""

    def __init__(self, subkeys, dim, k, *, keys1=None, keys2=None, seed=0, gate_mode="chosen",
                 bias=None):
        super().__init__()
        self.subkeys = check_int(subkeys, "subkeys", 1, math.isqrt(MAX_EXPERTS),
                                 " (num_experts = subkeys^2: expert ids are 32-bit)")
        self.dim = check_int(dim, "dim", 2, INT64_MAX)
        self.num_experts = self.subkeys * self.subkeys
        self.k = check_int(k, "k", 1, self.num_experts)
        self.seed = check_seed(seed)
        d1 = self.dim // 2
        gen = torch.Generator().manual_seed(self.seed)
        init = []
        for name, given, width in (("keys1", keys1, d1), ("keys2", keys2, self.dim - d1)):
            if given is None:
                given = torch.randn(self.subkeys, width, generator=gen) / math.sqrt(self.dim)
            else:
                check_tensor(given, name, dim=width)
                if given.shape[0] != self.subkeys:
                    raise ValueError(f"{name} has {given.shape[0]} rows, expected {self.subkeys}")
                given = given.detach().clone()
            init.append(given)
        self.keys1, self.keys2 = nn.Parameter(init[0]), nn.Parameter(init[1])
        self._init_selection(gate_mode, bias, self.keys1.device)
        self._index = self._new_index()

    def _new_index(self):
        return _airmoe.ProductKeyIndex(cpp_tensor(self.keys1), cpp_tensor(self.keys2))

    def _synced_tensors(self):
        d1 = self.dim // 2
        _check_router_tensor(self.keys1, "keys1", dim=d1, rows=self.subkeys)
        _check_router_tensor(self.keys2, "keys2", dim=self.dim - d1, rows=self.subkeys)
        if self.keys2.device != self.keys1.device:
            raise ValueError(f"keys2 is on {self.keys2.device} but keys1 on {self.keys1.device}: "
                             f"move the module with .to()")
        return self.keys1, self.keys2

    def forward(self, hidden):
        """hidden [T, d] -> (gates [T, k] hidden.dtype, indices [T, k] int64)."""
        _check_hidden(hidden, self.dim, [("keys1", self.keys1), ("keys2", self.keys2)])
        self._sync()
        if hidden.dtype != torch.float64:
            return _CppRoute.apply(self, hidden, self.keys1, self.keys2)
        with torch.no_grad():
            _, experts = _CppRoute.apply(self, hidden.detach().float().contiguous(),
                                         self.keys1.detach(), self.keys2.detach())
        rows = torch.cat([self.keys1[experts // self.subkeys],
                          self.keys2[experts % self.subkeys]], dim=-1)
        return _closed_form_gates(self.gate_mode, hidden, rows), experts

    def extra_repr(self):
        return (f"subkeys={self.subkeys}, num_experts={self.num_experts}, dim={self.dim}, "
                f"k={self.k}, gate_mode={self.gate_mode!r}")
