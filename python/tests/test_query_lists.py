"""AIRRouter with query-aware lists (lists='query', router/query_lists.h).

Run: PYTHONPATH=<build>/python /usr/bin/python3 -m pytest -q python/tests/test_query_lists.py
"""

import copy
import io
import pickle

import pytest
import torch

import airmoe
from airmoe import _airmoe


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def query_router(E, d, k, C, m, centers, sample, **kw):
    return airmoe.AIRRouter(E, d, k, C, m, centers=centers, lists="query", list_sample=sample,
                            **kw)


def exact_ids(router, hidden, k):
    """The exact top-k by z + b (the router's bias, when set)."""
    z = hidden @ router.centers.detach().t()
    if router.bias is not None:
        z = z + router.bias
    return torch.topk(z, k, dim=-1).indices


def balanced_case(E=2048, d=16, seed=0):
    """A balanced learned router in miniature: expert keys whose norms
    spread over 10x (the winners of a token are not the keys nearest its
    direction) and a selection bias of the logits' size, with tokens from a
    few dozen clusters. Returns centers, bias, a build sample and disjoint
    measurement tokens."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(E, d, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    norms = torch.exp(torch.rand(E, 1, generator=g) * 2.3)
    centers = directions * norms
    bias = 1.5 * torch.randn(E, generator=g)
    means = torch.randn(48, d, generator=g)

    def tokens(n):
        which = torch.randint(0, 48, (n,), generator=g)
        return means[which] + 0.5 * torch.randn(n, d, generator=g)

    return centers, bias, tokens(8192), tokens(1024)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("gate_mode", ["chosen", "sigmoid"])
def test_every_list_probed_equals_dense(with_bias, gate_mode):
    E, d, k, C = 300, 12, 6, 16
    centers, sample, h = randn(E, d, seed=1), randn(500, d, seed=2), randn(64, d, seed=3)
    bias = 2.0 * randn(E, seed=4) if with_bias else None
    air = query_router(E, d, k, C, C, centers, sample, bias=bias, gate_mode=gate_mode,
                       list_length=20)
    dense = airmoe.DenseRouter(E, d, k, centers=centers, bias=bias, gate_mode=gate_mode)
    ga, ia = air(h)
    gd, id_ = dense(h)
    assert torch.equal(ia, id_) and torch.equal(ga, gd)  # ids and gate bits
    # every expert is in at least one list, and each is scored once
    assert int((air.list_offsets[1:] - air.list_offsets[:-1]).min()) >= 1
    assert torch.equal(air.shortlist_sizes(h), torch.full((64,), E))


def test_gradients_equal_dense_with_every_list_probed():
    E, d, k, C = 200, 8, 4, 10
    centers, sample = randn(E, d, seed=5), randn(300, d, seed=6)
    air = query_router(E, d, k, C, C, centers, sample, bias=randn(E, seed=7))
    dense = airmoe.DenseRouter(E, d, k, centers=centers, bias=air.bias)
    w = randn(40, k, seed=8)
    grads = []
    for r in (air, dense):
        h = randn(40, d, seed=9).requires_grad_()
        (r(h)[0] * w).sum().backward()
        grads.append((h.grad, r.centers.grad))
    assert air.centers.grad is not None and air.centers.grad.shape == (E, d)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    # float64: the closed-form gates, checked by gradcheck
    r = query_router(E, d, k, C, 3, centers, sample).double()
    h = randn(5, d, seed=10, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, c: r(x)[0], (h, r.centers), eps=1e-6, atol=1e-5)


def test_recall_far_above_center_lists_on_a_balanced_router():
    E, d, k = 2048, 16, 8
    centers, bias, sample, h = balanced_case(E, d)
    query = query_router(E, d, k, 64, 1, centers, sample, bias=bias, list_length=64)
    plain = airmoe.AIRRouter(E, d, k, 32, 4, centers=centers, bias=bias)
    exact = exact_ids(query, h, k)
    q_recall = airmoe.recall_at_k(query(h)[1], exact)
    p_recall = airmoe.recall_at_k(plain(h)[1], exact)
    q_short = query.shortlist_sizes(h).double().mean().item()
    p_short = plain.shortlist_sizes(h).double().mean().item()
    # at a shortlist <= E/16, smaller than the center lists', the query
    # lists find nearly all the exact experts (measured 0.97 at 87 experts
    # against 0.53 at 258)
    assert q_short <= min(p_short, E / 16), (q_short, p_short)
    assert q_recall >= 0.9 and q_recall - p_recall >= 0.3, (q_recall, p_recall)


def test_deeper_counts_fill_what_a_small_sample_leaves_empty():
    E, d, k, C = 2048, 16, 8, 64
    centers, bias, sample, h = balanced_case(E, d, seed=3)
    small = sample[:512]  # 8 tokens per codeword: most lists are far from L = 128 picks
    shallow = query_router(E, d, k, C, 1, centers, small, bias=bias, list_length=128, list_k=k)
    default = query_router(E, d, k, C, 1, centers, small, bias=bias, list_length=128)
    twice = query_router(E, d, k, C, 1, centers, small, bias=bias, list_length=128,
                         list_k=2 * k)
    deep = query_router(E, d, k, C, 1, centers, small, bias=bias, list_length=128, list_k=4 * k)
    assert default.list_k == 2 * k and "list_k=16" in repr(default)
    for name in ("codebook", "list_offsets", "list_members"):  # the default counts the top-2k
        assert torch.equal(getattr(default, name), getattr(twice, name))
    assert torch.equal(deep.codebook, shallow.codebook)  # only the counts go deeper
    exact = exact_ids(deep, h, k)
    routers = (shallow, twice, deep)
    recall = [airmoe.recall_at_k(r(h)[1], exact) for r in routers]
    short = [r.shortlist_sizes(h).double().mean().item() for r in routers]
    # the deeper lists fill toward L and find more of the exact experts
    # (measured 0.84, 0.93, 0.97 at 55, 75, 113 experts), still <= E/16
    assert short[0] < short[1] < short[2] <= E / 16, short
    assert recall[0] + 0.05 <= recall[1] <= recall[2], recall
    deep.probes = C  # deeper lists still cover every expert: exact at m = C
    assert torch.equal(deep(h)[1], exact)
    assert airmoe.AIRRouter(6, d, 4, 2, 1, centers=centers[:6], lists="query").list_k == 6


def test_list_k_is_checked():
    E, d, k, C = 64, 6, 3, 8
    centers, sample = randn(E, d, seed=24), randn(50, d, seed=25)
    for bad in (k - 1, E + 1):
        with pytest.raises(ValueError, match="list_k"):
            query_router(E, d, k, C, 2, centers, sample, list_k=bad)
    with pytest.raises(ValueError, match="list_k is for query lists"):
        airmoe.AIRRouter(E, d, k, C, 2, centers=centers, list_k=2 * k)


def test_refresh_after_centers_move():
    E, d, k, C, S = 2048, 16, 8, 32, 8192
    centers, bias, sample, h = balanced_case(E, d, seed=1)
    r = query_router(E, d, k, C, 2, centers, sample, bias=bias, list_length=64)
    assert r.list_build_flops == _airmoe.query_lists_build_flops(S, E, d, C, 64, k, 10) > 0
    fresh = airmoe.recall_at_k(r(h)[1], exact_ids(r, h, k))
    with torch.no_grad():  # the keys move a long way: the lists go stale
        r.centers.mul_(torch.exp(2.0 * torch.rand(E, 1, generator=torch.Generator()
                                                  .manual_seed(3)) - 1.0))
    stale = airmoe.recall_at_k(r(h)[1], exact_ids(r, h, k))
    before = [r.codebook.clone(), r.list_offsets.clone(), r.list_members.clone()]
    r.refresh_lists(sample[: S // 2])
    refreshed = airmoe.recall_at_k(r(h)[1], exact_ids(r, h, k))
    assert stale < fresh - 0.1 and refreshed > stale + 0.1, (fresh, stale, refreshed)
    assert not torch.equal(r.list_offsets, before[1])
    assert int(r.list_sample_size) == S // 2
    assert r.list_build_flops == _airmoe.query_lists_build_flops(S // 2, E, d, C, 64, k, 10)
    r.probes = C  # the refreshed lists still cover every expert
    assert torch.equal(r(h)[1], exact_ids(r, h, k))


def test_refresh_counts_the_current_bias():
    E, d, k, C = 2048, 16, 8, 32
    centers, bias, sample, h = balanced_case(E, d, seed=2)
    bias = 5.0 * bias  # a bias that decides most winners (measured: 0.63 -> 0.997)
    r = query_router(E, d, k, C, 2, centers, sample, list_length=64)  # counted without a bias
    r.bias = bias
    unaware = airmoe.recall_at_k(r(h)[1], exact_ids(r, h, k))
    r.refresh_lists(sample)
    aware = airmoe.recall_at_k(r(h)[1], exact_ids(r, h, k))
    assert aware > unaware + 0.25, (unaware, aware)
    built_biased = query_router(E, d, k, C, 2, centers, sample, list_length=64, bias=bias)
    for name in ("codebook", "list_offsets", "list_members"):
        assert torch.equal(getattr(r, name), getattr(built_biased, name))


def test_state_dict_copies_and_pickles_restore_the_lists():
    E, d, k, C = 512, 8, 4, 16
    centers, sample, h = randn(E, d, seed=11), randn(600, d, seed=12), randn(80, d, seed=13)
    r = query_router(E, d, k, C, 2, centers, sample, bias=randn(E, seed=14), list_length=40)
    with torch.no_grad():
        r.centers.add_(0.1 * randn(E, d, seed=15))  # lists stale: not recountable from centers
    want = r(h)
    assert set(r.state_dict()) == {"centers", "codebook", "bias", "list_offsets", "list_members",
                                   "list_sample_size"}
    other = query_router(E, d, k, C, 2, randn(E, d, seed=16), randn(100, d, seed=17),
                         bias=torch.zeros(E), list_length=40)
    assert other.list_members.shape != r.list_members.shape
    other.load_state_dict(r.state_dict())
    buf = io.BytesIO()
    torch.save(r, buf)
    buf.seek(0)
    for twin in (other, copy.deepcopy(r), pickle.loads(pickle.dumps(r)), torch.load(buf)):
        got = twin(h)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        assert twin.list_build_flops == r.list_build_flops > 0
        assert twin.lists == "query" and twin.list_length == 40


def test_bad_input_names_the_argument():
    E, d, k, C = 64, 6, 3, 8
    centers, sample = randn(E, d, seed=18), randn(50, d, seed=19)
    r = query_router(E, d, k, C, 2, centers, sample)
    with pytest.raises(ValueError, match="sample_hidden"):
        r.refresh_lists(randn(50, d + 1, seed=20))
    with pytest.raises(ValueError, match="sample_hidden has no tokens"):
        r.refresh_lists(torch.zeros(0, d))
    with pytest.raises(ValueError, match="list_sample"):
        query_router(E, d, k, C, 2, centers, randn(50, d - 1, seed=21))
    with pytest.raises(ValueError, match="list_sample has no tokens"):
        query_router(E, d, k, C, 2, centers, torch.zeros(0, d))
    with pytest.raises(ValueError, match="C = 8 codewords need between 1 and the 5 sample"):
        r.refresh_lists(randn(5, d, seed=22))
    bad = sample.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match="row 7"):
        r.refresh_lists(bad)
    with pytest.raises(ValueError, match="list_length"):
        query_router(E, d, k, C, 2, centers, sample, list_length=E + 1)
    for name in ("update_every", "list_cap", "spills"):
        with pytest.raises(ValueError, match=name):
            query_router(E, d, k, C, 2, centers, sample, **{name: 1})
    with pytest.raises(ValueError, match="lists"):
        airmoe.AIRRouter(E, d, k, C, 2, lists="tokens")
    with pytest.raises(RuntimeError, match="refresh_lists"):
        r.update_codebook()
    with pytest.raises(RuntimeError, match="lists='query'"):
        airmoe.AIRRouter(E, d, k, C, 2).refresh_lists(sample)
    # a corrupt saved state: the restored router names the bad list
    state = r.state_dict()
    state["list_members"] = state["list_members"].clone()
    state["list_members"][0] = C + 3
    twin = query_router(E, d, k, C, 2, centers, sample)
    twin.load_state_dict(state)
    with pytest.raises(ValueError, match="list_members entry 0 is list 11"):
        twin(randn(4, d, seed=23))
    state = r.state_dict()
    state["list_offsets"] = state["list_offsets"].clone()
    state["list_offsets"][5] = state["list_offsets"][4]
    twin.load_state_dict(state)
    with pytest.raises(ValueError, match="list_offsets: expert 4 is in no list"):
        twin(randn(4, d, seed=23))
    state["list_offsets"][5] += 10**6  # past the entries: refused, never read
    twin.load_state_dict(state)
    with pytest.raises(ValueError, match="list_offsets"):
        twin(randn(4, d, seed=23))
    assert r(randn(4, d, seed=23))[1].shape == (4, k)  # the original is untouched
