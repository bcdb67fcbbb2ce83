"""airmoe.MoELayer under mpiexec: the layer on COMM_WORLD (P ranks, each with
its block of tokens) equals the single-rank layer (COMM_SELF, every token) in
outputs and in every gradient, for the three strategies; a SwiGLU layer
with Hugging Face expert weights loaded equals a plain PyTorch SwiGLU MoE on
the same routes and gates; plus the error paths (wrong communicator type, a
state_dict from another configuration, ranks that disagree, bad HF weights).

    mpiexec -n 2 python3 python/tests/layer_mpi_check.py

Run by CTest (python_layer_mpi_1, python_layer_mpi_2). The last line, on rank
0, is "layer_mpi_check: N passed, M failed" over all ranks; the exit status
is nonzero on any failure.
"""

import traceback

import numpy as np
import torch
from mpi4py import MPI

import airmoe
from mpi_tally import Tally

E, D, T, C, K, M, H = 61, 8, 37, 7, 4, 3, 3
TOL = 1e-5

world = MPI.COMM_WORLD
rank, P = world.Get_rank(), world.Get_size()
tally = Tally(world)
check = tally.check


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def data():
    gen = torch.Generator().manual_seed(11)
    # Clustered centers, so that lists differ in size and placement matters.
    anchors = torch.randn(5, D, generator=gen)
    centers = anchors[torch.arange(E) % 5] + 0.3 * torch.randn(E, D, generator=gen)
    tokens = torch.randn(T, D, generator=gen)
    dy = torch.randn(T, D, generator=gen)
    return centers.contiguous(), tokens, dy


def build(comm, strategy, centers, **kw):
    args = dict(strategy=strategy, k=K, probes=M, hidden=H, codewords=C, placement="locality",
                seed=123, centers=centers)
    args.update(kw)
    return airmoe.MoELayer(comm, E, D, **args)


def run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * dy).sum().backward()
    return out.detach(), x.grad


def guarded(name, fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - reported as a failure
        check(name, False, "\n" + traceback.format_exc())


def compare_strategy(strategy):
    centers, tokens, dy = data()
    b, e = T * rank // P, T * (rank + 1) // P
    dist = build(world, strategy, centers, load_sample=tokens)
    single = build(MPI.COMM_SELF, strategy, centers)
    out, dx = run(dist, tokens[b:e], dy[b:e])
    ref_out, ref_dx = run(single, tokens, dy)
    hosted = dist.hosted.numpy()
    tag = f"{strategy} P={P}"
    check(f"{tag} hosted ids agree with owners", np.array_equal(
        hosted, np.flatnonzero(dist.owners.numpy() == rank)))
    all_hosted = np.concatenate(world.allgather(hosted))
    check(f"{tag} every expert hosted once", np.array_equal(np.sort(all_hosted), np.arange(E)))
    check(f"{tag} same FFN weights", rel(dist.w1.detach(), single.w1.detach()[hosted]) == 0.0
          and rel(dist.w2.detach(), single.w2.detach()[hosted]) == 0.0)
    r = rel(out, ref_out[b:e])
    check(f"{tag} output", r <= TOL, f"rel {r}")
    r = rel(dx, ref_dx[b:e])
    check(f"{tag} d_hidden", r <= TOL, f"rel {r}")
    r = rel(dist.w1.grad, single.w1.grad[hosted])
    check(f"{tag} dW1 of hosted experts", r <= TOL, f"rel {r}")
    r = rel(dist.w2.grad, single.w2.grad[hosted])
    check(f"{tag} dW2 of hosted experts", r <= TOL, f"rel {r}")
    r = rel(dist.centers_local.grad, single.centers_local.grad[hosted])
    check(f"{tag} d_centers of hosted experts", r <= TOL, f"rel {r}")
    check(f"{tag} some center gradient is nonzero",
          world.allreduce(float(dist.centers_local.grad.abs().sum())) > 0)

    # state_dict: round trip; zero-copy load reaches the C++ experts.
    # state_dict() tensors alias the parameters (torch's rule): clone to keep.
    sd = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in dist.state_dict().items()}
    dist.load_state_dict(sd)
    check(f"{tag} state_dict holds this rank's shard",
          sd["w1"].shape == (len(hosted), H, D) and sd["hosted"].tolist() == hosted.tolist())
    zero = {k: (torch.zeros_like(v) if k == "w2" else v) for k, v in sd.items()}
    dist.load_state_dict(zero)
    with torch.no_grad():
        z = dist(tokens[b:e])
    check(f"{tag} loaded w2 = 0 gives output 0 (parameters are the C++ memory)",
          float(z.abs().max()) == 0.0 if z.numel() else True)
    dist.load_state_dict(sd)
    with torch.no_grad():
        again = dist(tokens[b:e])
    check(f"{tag} reloaded weights give the same output", rel(again, out) == 0.0)

    # A state_dict from another configuration.
    other = build(MPI.COMM_SELF, strategy, centers, hidden=H + 1)
    try:
        dist.load_state_dict(other.state_dict())
        check(f"{tag} state from another configuration raises ValueError", False, "no error")
    except ValueError as err:
        check(f"{tag} state from another configuration raises ValueError", "hidden" in str(err),
              str(err))
    tampered = dict(sd)
    tampered["owners"] = (sd["owners"] + 1) % max(P, 2)
    try:
        dist.load_state_dict(tampered)
        check(f"{tag} state with another placement raises ValueError", False, "no error")
    except ValueError as err:
        check(f"{tag} state with another placement raises ValueError", "owners" in str(err),
              str(err))
    if P > 1:
        # Rank 0's state on rank 1: another shard.
        from_root = world.bcast(sd, root=0)
        if rank != 0:
            try:
                dist.load_state_dict(from_root)
                check(f"{tag} another rank's state raises ValueError", False, "no error")
            except ValueError as err:
                check(f"{tag} another rank's state raises ValueError", "rank" in str(err),
                      str(err))


def torch_swiglu_moe(x, centers, gate, up, down):
    """The plain PyTorch MoE the layer computes with exact routing: the top-K
    logits <x, center>, their softmax as gates, HF's SwiGLU experts."""
    logits = x @ centers.t()
    top, ids = logits.topk(K, dim=1)
    g = torch.softmax(top, dim=1)
    out = torch.zeros_like(x)
    for j in range(K):
        e = ids[:, j]
        a = torch.nn.functional.silu(torch.einsum("thd,td->th", gate[e], x)) * \
            torch.einsum("thd,td->th", up[e], x)
        out = out + g[:, j:j + 1] * torch.einsum("tdh,th->td", down[e], a)
    return out


class HfExpert(torch.nn.Module):
    """An HF MoE expert MLP's parameters under HF's names (Qwen2-MoE's or
    Mixtral's), without importing transformers."""

    def __init__(self, gate, up, down, mixtral):
        super().__init__()
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for name, w in zip(names, (gate, up, down)):
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                lin.weight.copy_(w)
            setattr(self, name, lin)


def compare_swiglu_with_torch(strategy, from_modules):
    """Exact routing (dense-replicated, or AIR probing every list)."""
    centers, tokens, dy = data()
    b, e = T * rank // P, T * (rank + 1) // P
    gen = torch.Generator().manual_seed(21)
    gate = 0.5 * torch.randn(E, H, D, generator=gen)
    up = 0.5 * torch.randn(E, H, D, generator=gen)
    down = 0.5 * torch.randn(E, D, H, generator=gen)
    dist = build(world, strategy, centers, activation="swiglu", probes=C)
    if from_modules:
        dist.load_hf_expert_modules(torch.nn.ModuleList(
            HfExpert(gate[i], up[i], down[i], mixtral=i % 2 == 1) for i in range(E)))
    else:
        dist.load_hf_experts(gate.bfloat16().float(), list(up), down)
        gate = gate.bfloat16().float()
    hosted = dist.hosted.numpy()
    tag = f"swiglu {strategy} {'modules' if from_modules else 'tensors'} P={P}"
    check(f"{tag} w1 is [hosted, 2h, d]", tuple(dist.w1.shape) == (len(hosted), 2 * H, D))
    out, dx = run(dist, tokens[b:e], dy[b:e])
    params = [t.clone().requires_grad_(True) for t in (centers, gate, up, down)]
    xr = tokens.clone().requires_grad_(True)
    ref = torch_swiglu_moe(xr, *params)
    (ref * dy).sum().backward()
    r = rel(out, ref.detach()[b:e])
    check(f"{tag} output", r <= TOL, f"rel {r}")
    r = rel(dx, xr.grad[b:e])
    check(f"{tag} d_hidden", r <= TOL, f"rel {r}")
    d_centers, d_gate, d_up, d_down = (p.grad[hosted] for p in params)
    r = rel(dist.w1.grad[:, :H], d_gate)
    check(f"{tag} d gate_proj of hosted experts", r <= TOL, f"rel {r}")
    r = rel(dist.w1.grad[:, H:], d_up)
    check(f"{tag} d up_proj of hosted experts", r <= TOL, f"rel {r}")
    r = rel(dist.w2.grad, d_down)
    check(f"{tag} d down_proj of hosted experts", r <= TOL, f"rel {r}")
    r = rel(dist.centers_local.grad, d_centers)
    check(f"{tag} d_centers of hosted experts", r <= TOL, f"rel {r}")


def swiglu_errors():
    centers, _, _ = data()
    dist = build(world, "air", centers, activation="swiglu")
    w = torch.zeros(E, H, D)

    def refused(name, call, needle):
        try:
            call()
            check(name, False, "no error")
        except ValueError as err:
            check(name, needle in str(err), str(err))

    refused("HF weights of another h are refused on every rank",
            lambda: dist.load_hf_experts(w, w, torch.zeros(E, D, H + 1)),
            "has shape [8, 4], expected [8, 3]")
    refused("HF weights of too few experts are refused",
            lambda: dist.load_hf_experts(w[:-1], w, torch.zeros(E, D, H)), "gate holds 60 experts")
    bad = w.clone()
    if rank == 0:  # one of rank 0's own experts: the others' weights are fine
        bad[int(dist.hosted[0]), 0, 0] = float("nan")
    refused("non-finite HF weights are refused on every rank",
            lambda: dist.load_hf_experts(bad, w, torch.zeros(E, D, H)), "non-finite")
    refused("modules without HF's projection names are refused",
            lambda: dist.load_hf_expert_modules([torch.nn.Linear(D, H)] * E), "experts[0]")
    gelu = build(world, "air", centers)
    refused("a gelu layer refuses HF weights", lambda: gelu.load_hf_experts(w, w, w),
            "activation='swiglu'")
    try:
        airmoe.MoELayer(world, E, D, activation="swish", codewords=C)
        check("unknown activation raises ValueError", False, "no error")
    except ValueError as err:
        check("unknown activation raises ValueError", "'swiglu'" in str(err), str(err))


def compare_biased(strategy):
    """A selection bias: the P-rank layer equals the single-rank one, the bias
    moves routes, and it is a buffer of the state_dict."""
    centers, tokens, dy = data()
    b, e = T * rank // P, T * (rank + 1) // P
    bias = 3.0 * torch.randn(E, generator=torch.Generator().manual_seed(5))
    dist = build(world, strategy, centers, load_sample=tokens, bias=bias)
    single = build(MPI.COMM_SELF, strategy, centers, bias=bias)
    plain = build(MPI.COMM_SELF, strategy, centers)
    out, dx = run(dist, tokens[b:e], dy[b:e])
    ref_out, ref_dx = run(single, tokens, dy)
    plain_out, _ = run(plain, tokens, dy)
    tag = f"biased {strategy} P={P}"
    r = rel(out, ref_out[b:e])
    check(f"{tag} output", r <= TOL, f"rel {r}")
    r = rel(dx, ref_dx[b:e])
    check(f"{tag} d_hidden", r <= TOL, f"rel {r}")
    hosted = dist.hosted.numpy()
    r = rel(dist.centers_local.grad, single.centers_local.grad[hosted])
    check(f"{tag} d_centers of hosted experts", r <= TOL, f"rel {r}")
    check(f"{tag} the bias moves routes", rel(ref_out, plain_out) > 1e-3)
    check(f"{tag} bias is in the state_dict", torch.equal(dist.state_dict()["bias"], bias))
    dist.bias = None  # cleared on every rank: the unbiased layer again
    with torch.no_grad():
        again = dist(tokens[b:e])
    r = rel(again, plain_out[b:e])
    check(f"{tag} cleared bias gives the unbiased output", r <= TOL, f"rel {r}")


def compare_request_keys(strategy):
    """Request keys: the P-rank layer with keys gives the outputs and
    gradients of the one without, bit for bit; its meter (traffic()) shows
    fewer request bytes where P > 1, and reset_traffic() zeroes it."""
    centers, tokens, dy = data()
    b, e = T * rank // P, T * (rank + 1) // P
    plain = build(world, strategy, centers, load_sample=tokens)
    keyed = build(world, strategy, centers, load_sample=tokens, request_key_bits=8)
    tag = f"request keys {strategy} P={P}"
    sent = {}
    for name, layer in (("plain", plain), ("keyed", keyed)):
        layer.reset_traffic()
        sent[name] = run(layer, tokens[b:e], dy[b:e]), layer.traffic()
    (out, dx), traffic = sent["keyed"]
    (ref_out, ref_dx), ref_traffic = sent["plain"]
    check(f"{tag} output", torch.equal(out, ref_out))
    check(f"{tag} d_hidden", torch.equal(dx, ref_dx))
    check(f"{tag} d_centers", torch.equal(keyed.centers_local.grad, plain.centers_local.grad))
    requests = world.allreduce(traffic.get("requests", {}).get("bytes", 0))
    ref_requests = world.allreduce(ref_traffic.get("requests", {}).get("bytes", 0))
    if P > 1:
        check(f"{tag} the meter saw requests", ref_requests > 0, f"{ref_requests}")
        check(f"{tag} keys send fewer request bytes", requests < ref_requests,
              f"{requests} >= {ref_requests}")
    check(f"{tag} the dispatch is the same",
          traffic.get("dispatch") == ref_traffic.get("dispatch"))
    keyed.reset_traffic()
    check(f"{tag} reset_traffic zeroes the meter",
          all(c["bytes"] == 0 and c["messages"] == 0 for c in keyed.traffic().values()))


def bias_errors():
    centers, tokens, _ = data()
    b, e = T * rank // P, T * (rank + 1) // P
    layer = build(world, "air", centers)
    layer.bias = torch.zeros(E, dtype=torch.float64) if rank == P - 1 else torch.zeros(E)
    try:
        layer(tokens[b:e])
        check("float64 bias on the last rank raises ValueError", False, "no error")
    except ValueError as err:
        check("float64 bias on the last rank raises ValueError",
              "bias must be a 1-D contiguous float32" in str(err), str(err))
    layer.bias = torch.zeros(E - 1)
    try:
        layer(tokens[b:e])
        check("a short bias raises ValueError", False, "no error")
    except ValueError as err:
        check("a short bias raises ValueError", f"bias has {E - 1} entries" in str(err), str(err))
    if P > 1:
        layer.bias = torch.full((E,), float(rank))
        try:
            layer(tokens[b:e])
            check("ranks with different biases raise RuntimeError", False, "no error")
        except RuntimeError as err:
            check("ranks with different biases raise RuntimeError",
                  "selection bias" in str(err), str(err))
    layer.bias = torch.zeros(E)
    with torch.no_grad():
        check("the layer routes after the refused biases", layer(tokens[b:e]).shape[0] == e - b)


def errors():
    centers, _, _ = data()
    for bad in (0, "COMM_WORLD", object()):  # None: one rank in this process
        try:
            airmoe.MoELayer(bad, E, D, codewords=C)
            check(f"comm {bad!r} raises TypeError", False, "no error")
        except TypeError as err:
            check(f"comm {bad!r} raises TypeError", "mpi4py.MPI.Comm" in str(err), str(err))
    try:
        build(world, "nope", centers)
        check("unknown strategy raises ValueError", False, "no error")
    except ValueError as err:
        check("unknown strategy raises ValueError", "strategy 'nope' is unknown" in str(err),
              str(err))
    if P > 1:
        # Ranks that disagree on the configuration fail together.
        try:
            build(world, "air", centers, hidden=H + rank)
            check("ranks with different hidden raise RuntimeError", False, "no error")
        except RuntimeError as err:
            check("ranks with different hidden raise RuntimeError",
                  "MoE layer configuration" in str(err), str(err))
        try:
            build(world, "air", centers + rank)
            check("ranks with different centers raise RuntimeError", False, "no error")
        except RuntimeError as err:
            check("ranks with different centers raise RuntimeError",
                  "centers and codebook" in str(err), str(err))


torch.manual_seed(0)
for strategy in ("air", "dense-replicated", "dense-broadcast"):
    guarded(strategy, lambda: compare_strategy(strategy))
guarded("errors", errors)
for strategy in ("air", "dense-replicated", "dense-broadcast"):
    guarded(f"biased {strategy}", lambda: compare_biased(strategy))
guarded("bias errors", bias_errors)
for strategy in ("air", "dense-broadcast"):
    guarded(f"request keys {strategy}", lambda: compare_request_keys(strategy))
for strategy in ("air", "dense-replicated", "dense-broadcast"):
    for from_modules in (False, True):
        guarded(f"swiglu {strategy}", lambda: compare_swiglu_with_torch(strategy, from_modules))
guarded("swiglu errors", swiglu_errors)

tally.finish("layer_mpi_check")
