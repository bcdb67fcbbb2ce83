"""pytest suite for the airmoe PyTorch binding.

Run: PYTHONPATH=<build>/python /usr/bin/python3 -m pytest -q python/tests
"""

import numpy as np
import pytest
import torch
from torch import nn

import airmoe
from airmoe import _airmoe
from airmoe._tensors import cpp_tensor, view


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_router(kind, E=12, d=5, k=3, seed=0, **kw):
    if kind == "air":
        return airmoe.AIRRouter(E, d, k, kw.pop("codewords", 4), kw.pop("probes", 4), seed=seed,
                                **kw)
    if kind == "dense":
        return airmoe.DenseRouter(E, d, k, seed=seed, **kw)
    n = int(round(E ** 0.5))
    return airmoe.ProductKeyRouter(n, d, k, seed=seed, **kw)


def expert_rows(router, indices):
    """The chosen experts' full key rows [T, k, d], as torch ops."""
    if isinstance(router, airmoe.ProductKeyRouter):
        n = router.subkeys
        return torch.cat([router.keys1[indices // n], router.keys2[indices % n]], dim=-1)
    return router.centers[indices]


def exact_logits(router, hidden):
    if isinstance(router, airmoe.ProductKeyRouter):
        d1 = router.keys1.shape[1]
        z1 = hidden[:, :d1] @ router.keys1.t()
        z2 = hidden[:, d1:] @ router.keys2.t()
        return (z1[:, :, None] + z2[:, None, :]).reshape(hidden.shape[0], -1)
    return hidden @ router.centers.t()


# ---------------------------------------------------------------------------
# Exactness: m = C equals torch.topk + softmax.


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
@pytest.mark.parametrize("E,d,k,T", [(12, 5, 3, 7), (64, 16, 4, 50), (256, 32, 8, 33)])
def test_equals_torch_topk(kind, E, d, k, T):
    kw = {"codewords": max(3, E // 8), "probes": max(3, E // 8)} if kind == "air" else {}
    if kind == "pk":
        E = 16 if E == 12 else E  # n^2
    r = make_router(kind, E, d, k, seed=E, **kw)  # air: probes = C, exact
    h = randn(T, d, seed=E + 1)
    gates, idx = r(h)
    z, ref_idx = torch.topk(exact_logits(r, h), k, dim=-1)
    assert idx.dtype == torch.int64 and gates.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(gates, torch.softmax(z, -1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_gradients_equal_torch_reference(kind):
    E = 16 if kind == "pk" else 40
    r = make_router(kind, E, 8, 4, seed=3, **({"codewords": 5, "probes": 5}
                                                if kind == "air" else {}))
    h = randn(20, 8, seed=4).requires_grad_()
    w = randn(20, 4, seed=5)
    gates, idx = r(h)
    (gates * w).sum().backward()
    got = [h.grad.clone()] + [p.grad.clone() for p in r.parameters()]
    h.grad = None
    r.zero_grad()
    z, ref_idx = torch.topk(exact_logits(r, h), 4, dim=-1)
    assert torch.equal(idx, ref_idx)
    (torch.softmax(z, -1) * w).sum().backward()
    want = [h.grad] + [p.grad for p in r.parameters()]
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_gradcheck_float64(kind):
    E = 16 if kind == "pk" else 12
    r = make_router(kind, E, 5, 3, seed=7).double()
    h = randn(4, 5, seed=8, dtype=torch.float64).requires_grad_()
    params = list(r.parameters())

    def f(hidden, *ps):
        return r(hidden)[0]

    assert torch.autograd.gradcheck(f, (h, *params), eps=1e-6, atol=1e-5)
    gates, idx = r(h)
    assert gates.dtype == torch.float64
    z, ref_idx = torch.topk(exact_logits(r, h), 3, dim=-1)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(gates, torch.softmax(z, -1))


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
@pytest.mark.parametrize("gate_mode", ["chosen", "sigmoid"])
def test_cpp_backward_equals_closed_form(kind, gate_mode):
    E = 64 if kind == "pk" else 100
    r = make_router(kind, E, 12, 6, seed=11, gate_mode=gate_mode,
                    bias=None if gate_mode == "chosen" else randn(E, seed=14),
                    **({"codewords": 10, "probes": 3} if kind == "air" else {}))
    h = randn(30, 12, seed=12).requires_grad_()
    dg = randn(30, 6, seed=13)
    gates, idx = r(h)
    grads_cpp = torch.autograd.grad(gates, [h, *r.parameters()], dg)
    gates_of = airmoe.chosen_sigmoid if gate_mode == "sigmoid" else airmoe.chosen_softmax
    closed = gates_of(h, expert_rows(r, idx))
    torch.testing.assert_close(gates, closed, atol=1e-6, rtol=1e-5)
    grads_closed = torch.autograd.grad(closed, [h, *r.parameters()], dg)
    for a, b in zip(grads_cpp, grads_closed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# AIR specifics.


def test_air_probes_knob_and_shortlist():
    r = airmoe.AIRRouter(256, 16, 4, 16, 16, seed=1)
    h = randn(64, 16, seed=2)
    _, exact = airmoe.exact_topk(h, r.centers.detach(), 4)
    assert torch.equal(r(h)[1], exact)
    r.probes = 2  # per-call knob: nothing rebuilt
    _, approx = r(h)
    assert 0.3 < airmoe.recall_at_k(approx, exact) < 1.0
    assert int(r.list_sizes().sum()) == 256


def test_air_shortlist_sizes_count_the_probed_lists():
    h = randn(50, 16, seed=4)
    r = airmoe.AIRRouter(256, 16, 4, 16, 1, seed=1)
    sizes = r.list_sizes()
    nearest = torch.argmax(h @ r.codebook.t(), dim=1)
    # one probe: the nearest codeword's list, extended in score order only
    # when it holds fewer than k experts
    expected = torch.where(sizes[nearest] >= 4, sizes[nearest], -1)
    got = r.shortlist_sizes(h)
    assert got.dtype == torch.int64 and got.shape == (50,)
    mask = expected >= 0
    assert torch.equal(got[mask], expected[mask]) and bool((got >= 4).all())
    r.probes = 16  # every list: every expert, once
    assert torch.equal(r.shortlist_sizes(h), torch.full((50,), 256))
    spilled = airmoe.AIRRouter(256, 16, 4, 16, 16, seed=1, spills=1)
    assert torch.equal(spilled.shortlist_sizes(h), torch.full((50,), 256))  # scored once
    spilled.probes = r.probes = 1  # a list also holds the experts spilled into it
    assert spilled.shortlist_sizes(h).double().mean() > 1.5 * r.shortlist_sizes(h).double().mean()
    with pytest.raises(ValueError):
        r.shortlist_sizes(randn(5, 8, seed=1))


def test_state_dict_roundtrip_and_sync():
    a = airmoe.AIRRouter(64, 8, 3, 8, 2, seed=1)
    b = airmoe.AIRRouter(64, 8, 3, 8, 2, seed=99)
    h = randn(40, 8, seed=3)
    assert not torch.equal(a(h)[1], b(h)[1])
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"centers", "codebook"}
    assert torch.equal(a(h)[1], b(h)[1])
    # An in-place change of the centers reaches the C++ router.
    with torch.no_grad():
        a.centers.mul_(-1.0)
        b.centers.mul_(-1.0)
    a.probes = b.probes = 8
    ga, ia = a(h)
    _, exact = airmoe.exact_topk(h, a.centers.detach(), 3)
    assert torch.equal(ia, exact)


def test_update_every_in_training_mode():
    r = airmoe.AIRRouter(64, 8, 3, 8, 2, seed=1, update_every=2)
    h = randn(16, 8, seed=2)
    with torch.no_grad():
        r.centers.add_(0.5 * randn(64, 8, seed=3))
    before = r.codebook.clone()
    r.eval()
    r(h), r(h)
    assert torch.equal(r.codebook, before)  # eval: no update
    r.train()
    r(h)  # call 3
    assert torch.equal(r.codebook, before)
    r(h)  # call 4: updates
    assert not torch.equal(r.codebook, before)
    torch.testing.assert_close(r.codebook.norm(dim=1), torch.ones(8))


def test_training_lowers_loss_and_keeps_recall():
    """A tiny MoE-like regression through the gates: Adam steps on the router
    and the expert values, update_codebook() after each step."""
    torch.manual_seed(0)
    E, d, d_in, k, C, m = 128, 16, 12, 4, 16, 8
    recall_level = 0.9  # configured level for (C, m) = (16, 8); measured >= 0.92
    router = airmoe.AIRRouter(E, d, k, C, m, seed=5)
    proj = nn.Linear(d_in, d)
    values = nn.Embedding(E, 1)
    teacher = airmoe.DenseRouter(E, d, k, seed=6)
    teacher_values = randn(E, 1, seed=7)
    x = randn(256, d_in, seed=8)
    with torch.no_grad():
        tg, ti = teacher(proj(x).detach())
        target = (tg.unsqueeze(-1) * teacher_values[ti]).sum(1)

    opt = torch.optim.Adam(list(router.parameters()) + list(proj.parameters()) +
                           list(values.parameters()), lr=3e-2)

    def loss_fn():
        g, i = router(proj(x))
        y = (g.unsqueeze(-1) * values(i)).sum(1)
        return nn.functional.mse_loss(y, target)

    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        router.update_codebook()
        losses.append(loss.item())
        with torch.no_grad():
            hid = proj(x)
            _, got = router(hid)
            _, exact = airmoe.exact_topk(hid, router.centers, k)
        assert airmoe.recall_at_k(got, exact) >= recall_level
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------
# Megatron-Core outputs.


def test_to_megatron():
    r = airmoe.AIRRouter(32, 8, 3, 4, 2, seed=1)
    h = randn(10, 8, seed=2).requires_grad_()
    gates, idx = r(h)
    probs, rmap = airmoe.to_megatron(gates, idx, 32)
    assert probs.shape == (10, 32) and rmap.shape == (10, 32) and rmap.dtype == torch.bool
    assert torch.equal(rmap.sum(1), torch.full((10,), 3))
    torch.testing.assert_close(probs.sum(1), torch.ones(10))
    assert torch.equal(probs != 0, rmap)
    assert torch.equal(probs.gather(1, idx), gates)
    probs.sum().backward()  # differentiable through the gates
    adapter = airmoe.MegatronRouterAdapter(r)
    p2, m2 = adapter(h.detach().reshape(5, 2, 8))
    assert p2.shape == (10, 32) and torch.equal(m2, rmap)


# ---------------------------------------------------------------------------
# Zero copy.


def test_zero_copy():
    h = randn(9, 8, seed=1)
    a = view(h)
    assert np.shares_memory(a, h.numpy())
    assert _airmoe.view_address(a) == h.data_ptr()
    for dtype in (torch.float32, torch.bfloat16):
        hd = h.to(dtype)
        assert _airmoe.tensor_info(cpp_tensor(hd)) == (hd.data_ptr(), {torch.float32: "f32",
                                                       torch.bfloat16: "bf16"}[dtype],
                                                       "host", 9, 8, 8)
        for r in (airmoe.AIRRouter(32, 8, 3, 4, 2), airmoe.DenseRouter(32, 8, 3),
                  airmoe.ProductKeyRouter(6, 8, 3)):
            r.to(dtype)
            r._sync()
            _, _, handle = r._cpp_route(cpp_tensor(hd))
            assert handle.tokens_address == hd.data_ptr()
            assert handle.tokens == 9 and handle.k == 3


def test_extension_rejects_instead_of_converting():
    idx = _airmoe.DenseIndex(torch.ones(4, 3))
    t = torch.ones(2, 3)
    with pytest.raises(ValueError, match="tokens must be float32 or bfloat16, got DLPack float64"):
        idx.route(t.double(), 2)
    with pytest.raises(ValueError, match="tokens must be float32 or bfloat16, got DLPack float16"):
        idx.route(t.half(), 2)
    with pytest.raises(ValueError, match=r"tokens has strides \(1, 2\).*\.contiguous\(\)"):
        idx.route(torch.ones(3, 2).t(), 2)
    with pytest.raises(ValueError, match="tokens must be a 2-D tensor"):
        idx.route(torch.ones(3), 2)
    with pytest.raises(TypeError, match="tokens must be a tensor .* got list"):
        idx.route([[1.0, 2.0, 3.0]], 2)
    # NumPy arrays cross by DLPack too.
    assert idx.route(np.ones((2, 3), np.float32), 2)[2].tokens == 2


# ---------------------------------------------------------------------------
# Bad input: clear exceptions, C++ messages where C++ decides.


@pytest.fixture(params=["air", "dense", "pk"])
def router(request):
    return make_router(request.param, E=16, d=6, k=3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float16])
def test_bad_dtype(router, dtype):
    with pytest.raises(ValueError, match=f"dtype {dtype}.*float32"):
        router(torch.ones(4, 6, dtype=dtype))


def test_mixed_dtype(router):
    with pytest.raises(ValueError, match="float64 but the router's .* is torch.float32"):
        router(torch.ones(4, 6, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_device(router):
    with pytest.raises(ValueError, match="hidden is on cuda:0 but the router's .* is on cpu"):
        router(torch.ones(4, 6, device="cuda"))


def test_bad_device_meta(router):
    with pytest.raises(ValueError, match="device meta.*CPU or CUDA.*cpu()"):
        router(torch.ones(4, 6, device="meta"))


def test_bad_shape(router):
    with pytest.raises(ValueError, match=r"must be \[T, d\], got shape \[6\]"):
        router(torch.ones(6))
    with pytest.raises(ValueError, match="has 5 columns, expected 6"):
        router(torch.ones(4, 5))


def test_non_contiguous(router):
    h = torch.ones(6, 4).t()
    with pytest.raises(ValueError, match=r"not contiguous.*\.contiguous\(\)"):
        router(h)
    router(h.contiguous())


def test_non_finite_from_cpp(router):
    h = torch.ones(4, 6)
    h[2, 1] = float("nan")
    with pytest.raises(ValueError, match="tokens row 2 column 1 is nan"):
        router(h)


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_k_larger_than_E(kind):
    with pytest.raises(ValueError, match=r"k = 17 is outside \[1, 16\]"):
        make_router(kind, E=16, d=6, k=17)
    r = make_router(kind, E=16, d=6, k=3)
    r.k = 20
    with pytest.raises(ValueError, match=r"k = 20 is outside \[1, 16\]"):
        r(torch.ones(2, 6))


def test_probes_and_codewords_out_of_range():
    with pytest.raises(ValueError, match=r"probes m = 5 is outside \[1, 4\]"):
        airmoe.AIRRouter(16, 6, 3, 4, 5)
    with pytest.raises(ValueError, match=r"codewords C = 20 is outside \[1, 16\]"):
        airmoe.AIRRouter(16, 6, 3, 20, 2)
    r = airmoe.AIRRouter(16, 6, 3, 4, 2)
    r.probes = 0
    with pytest.raises(ValueError, match=r"probes m = 0 is outside \[1, 4\]"):
        r(torch.ones(2, 6))


def test_bad_centers():
    with pytest.raises(ValueError, match="centers row 3 has zero norm|zero norm"):
        airmoe.AIRRouter(8, 4, 2, 2, 2, centers=torch.zeros(8, 4))
    with pytest.raises(ValueError, match="centers has 3 rows, expected num_experts = 8"):
        airmoe.DenseRouter(8, 4, 2, centers=torch.ones(3, 4))
    with pytest.raises(ValueError, match="update_codebook: step must be in"):
        airmoe.AIRRouter(8, 4, 2, 2, 2).update_codebook(step=0.0)


def test_update_codebook_before_centers():
    idx = _airmoe.AirIndex(6, 4)
    assert not idx.built
    with pytest.raises(RuntimeError, match="no expert centers yet.*set_centers"):
        idx.update_codebook()
    with pytest.raises(RuntimeError, match="no expert centers yet"):
        idx.route(np.ones((2, 6), np.float32), 2, 2)
    with pytest.raises(ValueError, match="centers has 5 columns, expected 6"):
        idx.set_centers(np.ones((8, 5), np.float32))
    idx.set_centers(np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32))
    assert idx.built
    idx.update_codebook()


def test_update_codebook_on_meta_router():
    r = airmoe.AIRRouter(16, 6, 3, 4, 2)
    r.to("meta")
    with pytest.raises(RuntimeError, match="no expert centers or codebook yet"):
        r.update_codebook()


def test_backward_after_inplace_change_is_refused():
    r = airmoe.DenseRouter(16, 6, 3)
    h = randn(4, 6).requires_grad_()
    g, _ = r(h)
    with torch.no_grad():
        r.centers.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        g.sum().backward()


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_replaced_parameter_of_another_shape_is_refused(kind):
    r = make_router(kind, E=16, d=6, k=3)
    h = randn(5, 6)
    if kind == "pk":
        r.keys2 = nn.Parameter(randn(9, 3))  # 9 sub-keys, the router has 4
        match = r"keys2 has 9 rows, expected 4"
    else:
        r.centers = nn.Parameter(randn(32, 6))  # 32 experts, the router has 16
        match = r"centers has 32 rows, expected 16"
    with pytest.raises(ValueError, match=match):
        r(h)


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_overflowing_logits_are_refused(kind):
    r = make_router(kind, E=16, d=6, k=3)
    h = randn(4, 6)
    h[0, 0] = 3e38
    with pytest.raises(ValueError, match="tokens row 0: logits overflow float32"):
        r(h)
    gates, _ = r(randn(4, 6))
    assert torch.isfinite(gates).all()


def test_expert_ids_are_32_bit():
    with pytest.raises(ValueError, match="expert ids are 32-bit"):
        airmoe.DenseRouter(2**31, 4, 2)
    with pytest.raises(ValueError, match="expert ids are 32-bit"):
        airmoe.ProductKeyRouter(46341, 4, 2)


def test_air_defaults_follow_num_experts():
    r = airmoe.AIRRouter(4096, 8, 4, seed=1)
    assert (r.num_codewords, r.probes) == airmoe._airmoe.recommended_air(4096) == (64, 1)
    s = airmoe.AIRRouter(4096, 8, 4, 32, 2, seed=1, spills=1, list_cap=160)
    h = torch.randn(50, 8)
    gates, idx = s(h)
    assert idx.shape == (50, 4)
    full = airmoe.AIRRouter(4096, 8, 4, 32, 32, seed=1, spills=1, list_cap=160)
    dense = airmoe.DenseRouter(4096, 8, 4, centers=full.centers.detach().clone())
    assert torch.equal(full(h)[1], dense(h)[1])


# ---------------------------------------------------------------------------
# Changes autograd does not see (issue 17, item 3): `.data`, NumPy views and
# replaced storage do not bump `_version`; the C++ copy follows them anyway.


def fresh_like(router):
    """A new router built from `router`'s current parameters (AIR: dense top-k
    over its centers, exact as AIR with m = C)."""
    if isinstance(router, airmoe.ProductKeyRouter):
        return airmoe.ProductKeyRouter(router.subkeys, router.dim, router.k,
                                       keys1=router.keys1.detach().clone(),
                                       keys2=router.keys2.detach().clone())
    return airmoe.DenseRouter(router.num_experts, router.dim, router.k,
                              centers=router.centers.detach().clone())


def shifted(p, seed):
    return 0.5 * randn(*p.shape, seed=seed)


HIDDEN_CHANGES = {
    "data.add_": lambda p, s: p.data.add_(shifted(p, s)),
    "data.copy_": lambda p, s: p.data.copy_(p.detach() + shifted(p, s)),
    "data.clamp_": lambda p, s: p.data.clamp_(-0.05, 0.05),
    "numpy view": lambda p, s: p.detach().numpy().__iadd__(shifted(p, s).numpy()),
    "data =": lambda p, s: setattr(p, "data", p.detach() + shifted(p, s)),
}


@pytest.mark.parametrize("change", sorted(HIDDEN_CHANGES))
@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_changes_behind_autograd_reach_forward_and_backward(kind, change):
    E = 256
    air = {"codewords": 16, "probes": 16} if kind == "air" else {}  # AIR exact: m = C
    r = make_router(kind, E=E, d=16, k=4, seed=1, **air)
    h = randn(64, 16, seed=2).requires_grad_()
    w = randn(64, 4, seed=3)
    gates, before = r(h)
    for i, p in enumerate(r.parameters()):
        HIDDEN_CHANGES[change](p, 10 + i)
    gates, idx = r(h)
    ref = fresh_like(r)
    ref_gates, ref_idx = ref(h)
    assert not torch.equal(idx, before)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(gates, ref_gates, atol=1e-6, rtol=1e-5)
    got = torch.autograd.grad((gates * w).sum(), [h, *r.parameters()])
    want = torch.autograd.grad((ref_gates * w).sum(), [h, *ref.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_issue_reproducer_gradient_step_through_data():
    r = airmoe.AIRRouter(256, 16, 4, codewords=16, probes=16)
    h = randn(128, 16, seed=5)
    gates, idx = r(h)
    (gates * randn(128, 4, seed=6)).sum().backward()
    for p in r.parameters():
        p.data.add_(p.grad, alpha=-50.0)
    gates, idx = r(h)
    ref_gates, ref_idx = airmoe.DenseRouter(256, 16, 4, centers=r.centers.detach().clone())(h)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(gates, ref_gates, atol=1e-6, rtol=1e-5)


def test_air_codebook_changed_through_data_reaches_routing():
    r = airmoe.AIRRouter(256, 16, 4, 16, 2, seed=1)
    other = airmoe.AIRRouter(256, 16, 4, 16, 2, seed=2,
                             centers=r.centers.detach().clone())
    other.update_codebook(step=0.5)
    h = randn(200, 16, seed=3)
    assert not torch.equal(r(h)[1], other(h)[1])
    r.codebook.data.copy_(other.codebook)
    assert torch.equal(r.list_sizes(), other.list_sizes())
    assert torch.equal(r(h)[1], other(h)[1])


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_backward_after_a_change_behind_autograd_is_refused(kind):
    r = make_router(kind, E=16, d=6, k=3)
    h = randn(4, 6).requires_grad_()
    g, _ = r(h)
    next(r.parameters()).data.add_(1.0)
    with pytest.raises(RuntimeError, match="changed between the forward and this backward"):
        g.sum().backward()
    # a forward after the change: its own backward runs, the older one's is refused
    g1, _ = r(h)
    next(r.parameters()).data.mul_(0.5)
    g2, _ = r(h)
    g2.sum().backward()
    with pytest.raises(RuntimeError, match="changed between the forward and this backward"):
        g1.sum().backward()


def test_unchanged_parameters_are_not_rebuilt():
    r = airmoe.DenseRouter(64, 8, 3, seed=1)
    h = randn(10, 8, seed=2)
    index = r._index
    assert not index.sync(cpp_tensor(r.centers))
    g1, _ = r(h)
    g2, _ = r(h)
    g1.sum().backward()  # two forwards of the same parameters: both backwards run
    g2.sum().backward()
    assert r._index is index


# ---------------------------------------------------------------------------
# Integer arguments out of every C++ integer's range (issue 17, item 20):
# ValueError naming the argument, never a pybind11 argument dump or
# "RuntimeError: Overflow".

AIR_ARGS = dict(num_experts=16, dim=6, k=3, codewords=4, probes=2)
DENSE_ARGS = dict(num_experts=16, dim=6, k=3)
PK_ARGS = dict(subkeys=4, dim=6, k=3)
BAD_INTEGERS = [
    (airmoe.AIRRouter, AIR_ARGS, "num_experts", [0, -1, 2**31, 2**64]),
    (airmoe.AIRRouter, AIR_ARGS, "dim", [0, -1, 2**63, 2**64]),
    (airmoe.AIRRouter, AIR_ARGS, "k", [0, -1, 17, 2**31, 2**64]),
    (airmoe.AIRRouter, AIR_ARGS, "codewords", [0, -1, 17, 2**31, 2**64]),
    (airmoe.AIRRouter, AIR_ARGS, "probes", [0, -1, 5, 2**31, 2**64]),
    (airmoe.AIRRouter, AIR_ARGS, "kmeans_iterations", [-1, 2**31, 2**64]),
    (airmoe.AIRRouter, AIR_ARGS, "seed", [-1, 2**64, -2**64]),
    (airmoe.AIRRouter, AIR_ARGS, "update_every", [-1, -2**64]),
    (airmoe.AIRRouter, AIR_ARGS, "list_cap", [-1, 2**63, 2**64]),
    (airmoe.AIRRouter, AIR_ARGS, "spills", [-1, 2**31, 2**64]),
    (airmoe.DenseRouter, DENSE_ARGS, "num_experts", [0, -1, 2**31, 2**64]),
    (airmoe.DenseRouter, DENSE_ARGS, "dim", [0, -1, 2**63, 2**64]),
    (airmoe.DenseRouter, DENSE_ARGS, "k", [0, -1, 17, 2**31, 2**64]),
    (airmoe.DenseRouter, DENSE_ARGS, "seed", [-1, 2**64, -2**64]),
    (airmoe.ProductKeyRouter, PK_ARGS, "subkeys", [0, -1, 46341, 2**31, 2**64]),
    (airmoe.ProductKeyRouter, PK_ARGS, "dim", [1, -1, 2**63, 2**64]),
    (airmoe.ProductKeyRouter, PK_ARGS, "k", [0, -1, 17, 2**31, 2**64]),
    (airmoe.ProductKeyRouter, PK_ARGS, "seed", [-1, 2**64, -2**64]),
]


@pytest.mark.parametrize("cls,args,name,values", BAD_INTEGERS,
                         ids=[f"{c.__name__}-{n}" for c, _, n, _ in BAD_INTEGERS])
def test_integer_arguments_out_of_range(cls, args, name, values):
    for value in values:
        with pytest.raises(ValueError,
                           match=rf"\b{name}\b.* = {value} (is outside \[|is too many)") as e:
            cls(**{**args, name: value})
        assert "Invoked with" not in str(e.value) and "Overflow" not in str(e.value)


@pytest.mark.parametrize("cls,args", [(airmoe.AIRRouter, AIR_ARGS),
                                      (airmoe.DenseRouter, DENSE_ARGS),
                                      (airmoe.ProductKeyRouter, PK_ARGS)])
def test_integer_arguments_of_other_types(cls, args):
    for bad in (2.0, "3", None, True):
        with pytest.raises(TypeError, match=r"^k must be an integer"):
            cls(**{**args, "k": bad})
    cls(**{**args, "k": np.int64(2)})  # NumPy and torch integers are integers
    cls(**{**args, "k": torch.tensor(2)})
    cls(**{**args, "seed": 2**64 - 1})  # the whole uint64 range


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_attributes_changed_out_of_range(kind):
    r = make_router(kind, E=16, d=6, k=3)
    h = torch.ones(2, 6)
    for value in (0, 2**31, 2**64, -2**64):
        r.k = value
        with pytest.raises(ValueError, match=rf"^k = {value} is outside \[1, 16\]"):
            r(h)
    r.k = 3
    if kind == "air":
        for value in (0, 2**31, 2**64):
            r.probes = value
            with pytest.raises(ValueError, match=rf"^probes m = {value} is outside \[1, 4\]"):
                r(h)
        r.probes = 2
        for value in (-1, 2**31, 2**64):
            with pytest.raises(ValueError, match=rf"^updates = {value} is outside \["):
                r.update_codebook(updates=value)
    r(h)


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_backward_checks_the_rows_it_reads(kind):
    """The backward reads the chosen experts' rows: a change to one of them is
    refused, a change to a row no token chose is not (the gradient is that of
    the forward as computed)."""
    r = make_router(kind, E=64, d=8, k=2, seed=3)
    h = randn(3, 8, seed=4).requires_grad_()
    first = next(r.parameters())
    for chosen in (True, False):
        g, idx = r(h)
        rows = idx.flatten() // r.subkeys if kind == "pk" else idx.flatten()
        pick = [i for i in range(first.shape[0]) if (i in rows.tolist()) == chosen][0]
        first.detach().numpy()[pick, 0] += 0.25
        if chosen:
            with pytest.raises(RuntimeError, match="changed between the forward"):
                g.sum().backward()
        else:
            g.sum().backward()
            assert h.grad is not None


# ---------------------------------------------------------------------------
# Selection bias and sigmoid gates (docs/routing.md).


def biased_reference(router, h, bias, k, gate_mode):
    """Experts by z + b (float64, ties to the lower id), gates from z."""
    with torch.no_grad():
        z = exact_logits(router, h).double()
    order = torch.sort(-(z + bias.double()), dim=-1, stable=True).indices[:, :k]
    chosen = torch.gather(z, 1, order)
    if gate_mode == "sigmoid":
        s = torch.sigmoid(chosen)
        return order, s / s.sum(-1, keepdim=True)
    return order, torch.softmax(chosen, -1)


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
@pytest.mark.parametrize("gate_mode", ["chosen", "sigmoid"])
def test_bias_selects_and_logits_gate(kind, gate_mode):
    E, d, k, T = (64, 12, 4, 40)
    kw = {"codewords": 8, "probes": 8} if kind == "air" else {}  # air: every list probed
    r = make_router(kind, E, d, k, seed=21, gate_mode=gate_mode, **kw)
    h = randn(T, d, seed=22)
    unbiased = r(h)[1]
    bias = 2.0 * randn(E, seed=23)
    r.bias = bias
    gates, idx = r(h)
    if kind == "pk":  # the bias ranks the grid of the halves' top k only: check that grid
        assert not torch.equal(idx, unbiased)
        z = exact_logits(r, h)
        chosen = torch.gather(z, 1, idx)
        want = torch.sigmoid(chosen) if gate_mode == "sigmoid" else torch.exp(chosen)
        torch.testing.assert_close(gates, want / want.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
        return
    want_idx, want_gates = biased_reference(r, h, bias, k, gate_mode)
    assert torch.equal(idx, want_idx)
    assert not torch.equal(idx, unbiased), "the bias moved no route"
    torch.testing.assert_close(gates.double(), want_gates, atol=1e-6, rtol=1e-5)


def test_biased_air_with_every_list_probed_equals_biased_dense():
    E, d = 96, 10
    centers = randn(E, d, seed=24)
    bias = 3.0 * randn(E, seed=25)
    h = randn(50, d, seed=26)
    for gate_mode in ("chosen", "sigmoid"):
        air = airmoe.AIRRouter(E, d, 5, 8, 8, centers=centers, bias=bias, gate_mode=gate_mode)
        dense = airmoe.DenseRouter(E, d, 5, centers=centers, bias=bias, gate_mode=gate_mode)
        ga, ia = air(h)
        gd, id_ = dense(h)
        assert torch.equal(ia, id_) and torch.equal(ga, gd)


def test_bias_changes_between_steps_without_a_rebuild():
    r = airmoe.AIRRouter(128, 8, 4, 8, 8, seed=27)
    h = randn(30, 8, seed=28)
    r(h)
    index, codebook = r._index, r.codebook.clone()
    r.bias = torch.zeros(128)
    for step in range(3):
        r.bias += 0.5 * randn(128, seed=29 + step)  # in place, as a balancing rule does
        _, idx = r(h)
        want, _ = biased_reference(r, h, r.bias, 4, "chosen")
        assert torch.equal(idx, want)
    assert r._index is index and torch.equal(r.codebook, codebook)
    r.bias = None
    assert torch.equal(r(h)[1], torch.topk(exact_logits(r, h), 4, dim=-1).indices)


@pytest.mark.parametrize("kind", ["dense", "pk"])
def test_index_keeps_its_bias_when_sync_rebuilds(kind):
    from airmoe._tensors import cpp_tensor, from_cpp
    r = make_router(kind, 64, 8, 4, seed=39, bias=3.0 * randn(64, seed=40))
    h = randn(20, 8, seed=41)
    want = r(h)[1]
    assert not torch.equal(want, torch.topk(exact_logits(r, h), 4, dim=-1).indices)
    params = [p.detach().clone() for p in r._synced_tensors()]
    assert r._index.sync(*[cpp_tensor(p + 1) for p in params])  # two rebuilds, no set_bias
    assert r._index.sync(*[cpp_tensor(p) for p in params])
    experts = from_cpp(r._index.route(cpp_tensor(h), 4, "chosen")[0])
    assert torch.equal(experts.long(), want)


def test_bias_travels_in_state_dict_and_copies():
    import copy
    r = airmoe.DenseRouter(32, 6, 3, seed=30, bias=randn(32, seed=31), gate_mode="sigmoid")
    h = randn(10, 6, seed=32)
    assert "bias" in r.state_dict()
    twin = copy.deepcopy(r)
    assert torch.equal(twin(h)[1], r(h)[1]) and torch.equal(twin(h)[0], r(h)[0])
    fresh = airmoe.DenseRouter(32, 6, 3, seed=30, bias=torch.zeros(32), gate_mode="sigmoid")
    fresh.load_state_dict(r.state_dict())
    assert torch.equal(fresh(h)[1], r(h)[1])


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_sigmoid_gradcheck_float64(kind):
    E = 16 if kind == "pk" else 12
    r = make_router(kind, E, 5, 3, seed=33, gate_mode="sigmoid", bias=randn(E, seed=34)).double()
    h = randn(4, 5, seed=35, dtype=torch.float64).requires_grad_()

    def f(hidden, *ps):
        return r(hidden)[0]

    assert torch.autograd.gradcheck(f, (h, *list(r.parameters())), eps=1e-6, atol=1e-5)
    # (test_cpp_backward_equals_closed_form checks the C++ backward against it.)


@pytest.mark.parametrize("kind", ["air", "dense", "pk"])
def test_bad_bias_and_gate_mode(kind):
    E = 16
    r = make_router(kind, E, 5, 3, seed=37)
    h = randn(4, 5, seed=38)
    for bias, message in [(torch.zeros(5), "bias has 5 entries, expected E = 16"),
                          (torch.tensor([0.0] * 3 + [float("nan")] + [0.0] * 12),
                           "bias entry 3 is nan"),
                          (torch.tensor([0.0] * 6 + [float("-inf")] + [0.0] * 9),
                           "bias entry 6 is -inf"),
                          (torch.zeros(E, dtype=torch.float16), "float32"),
                          (torch.zeros(E, 1), "1-D"),
                          (torch.zeros(2 * E)[::2], "contiguous")]:
        r.bias = bias
        with pytest.raises(ValueError, match=message):
            r(h)
    r.bias = None
    r(h)
    with pytest.raises(ValueError, match="bias has 5 entries"):
        make_router(kind, E, 5, 3, seed=37, bias=torch.zeros(5))(h)
    for mode in ("shortlist", "softmax"):
        r.gate_mode = mode
        with pytest.raises(ValueError, match=f"gate_mode = '{mode}' is not one of"):
            r(h)
        with pytest.raises(ValueError, match="is not one of"):
            make_router(kind, E, 5, 3, gate_mode=mode)
