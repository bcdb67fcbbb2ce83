"""Copies of routers and layers (issue 17, item 10): copy.deepcopy, pickle and
torch.save of the whole module. A router copy carries its parameters, buffers
and configuration and rebuilds its C++ index from them: it routes exactly as
the original, and is independent of it. The distributed MoELayer refuses with
a TypeError that says what to do instead."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import airmoe


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make(kind):
    if kind == "air":
        return airmoe.AIRRouter(256, 16, 4, 16, 3, seed=1, kmeans_iterations=4, list_cap=24,
                                spills=1, spill_lambda=0.5, update_every=3)
    if kind == "dense":
        return airmoe.DenseRouter(256, 16, 4, seed=1)
    return airmoe.ProductKeyRouter(16, 16, 4, seed=1)


def torch_save_load(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": torch_save_load,
}


def trained(kind):
    """A router after an optimizer step and (AIR) a codebook update, so that its
    state differs from what its constructor arguments would give."""
    r = make(kind)
    h = randn(64, 16, seed=2)
    opt = torch.optim.SGD(r.parameters(), lr=5.0)
    gates, _ = r(h)
    (gates * randn(64, 4, seed=3)).sum().backward()
    opt.step()
    if kind == "air":
        r.update_codebook(step=0.5)
    return r


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_router_copies_route_like_the_original(kind, how):
    r = trained(kind)
    c = COPIES[how](r)
    assert type(c) is type(r) and c is not r
    assert c.state_dict().keys() == r.state_dict().keys()
    for name, value in r.state_dict().items():
        assert torch.equal(c.state_dict()[name], value), name
        assert c.state_dict()[name].data_ptr() != value.data_ptr(), name
    h = randn(300, 16, seed=4).requires_grad_()
    gates, idx = r(h)
    c_gates, c_idx = c(h)
    assert torch.equal(idx, c_idx) and torch.equal(gates, c_gates)
    if kind == "air":
        assert torch.equal(r.list_sizes(), c.list_sizes())
        assert torch.equal(r.shortlist_sizes(h), c.shortlist_sizes(h))
        assert (c.probes, c.update_every, c._calls) == (r.probes, r.update_every, r._calls)
        assert repr(c) == repr(r)
    w = randn(300, 4, seed=5)
    got = torch.autograd.grad((c_gates * w).sum(), [h, *c.parameters()])
    want = torch.autograd.grad((gates * w).sum(), [h, *r.parameters()])
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_router_copy_is_independent(kind):
    r = trained(kind).eval()  # eval: no codebook update inside forward
    c = copy.deepcopy(r)
    h = randn(100, 16, seed=6)
    _, before = r(h)
    with torch.no_grad():
        for p in c.parameters():
            p.mul_(-1.0)
    assert not torch.equal(c(h)[1], before)
    assert torch.equal(r(h)[1], before)


def test_whole_model_with_routers_and_an_ema_copy():
    model = nn.Sequential(nn.Linear(8, 16), airmoe.MegatronRouterAdapter(make("air")))
    ema = copy.deepcopy(model)
    x = randn(20, 8, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model(x), ema(x)))
    with torch.no_grad():  # an EMA step through .data, as EMA helpers do it
        for p, q in zip(ema.parameters(), model.parameters()):
            p.data.mul_(0.5).add_(q.data + 0.1, alpha=0.5)
    loaded = torch_save_load(ema)
    assert all(torch.equal(a, b) for a, b in zip(ema(x), loaded(x)))


def test_distributed_layer_refuses_copies():
    MPI = pytest.importorskip("mpi4py.MPI")
    layer = airmoe.MoELayer(MPI.COMM_SELF, 16, 6, k=2, probes=2, hidden=2, codewords=4)
    for how in (copy.copy, *COPIES.values()):
        with pytest.raises(TypeError, match="MoELayer cannot be copied or pickled.*"
                                            "save_checkpoint.*load_checkpoint"):
            how(layer)
    layer(randn(3, 6))  # the layer itself is untouched
