"""The language-model example's balancing pieces (examples/lm/moe_lm.py)."""
import os
import sys

import pytest
import torch

import airmoe

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "lm"))
moe_lm = pytest.importorskip("moe_lm")


def test_balance_loss_is_one_when_uniform_and_e_over_k_when_collapsed():
    E, k, n = 16, 4, 8
    gates = torch.full((n, k), 1.0 / k)
    uniform = torch.arange(n * k).reshape(n, k) % E  # every expert takes 2 slots
    assert moe_lm.balance_loss(gates, uniform, E).item() == pytest.approx(1.0)
    collapsed = torch.arange(k).repeat(n, 1)  # every token picks experts 0..k-1
    assert moe_lm.balance_loss(gates, collapsed, E).item() == pytest.approx(E / k)


def make(kind, E, d, k):
    extra = moe_lm.LoadBias.extra_dims(kind)
    if kind == "dense":
        return airmoe.DenseRouter(E, d + extra, k, seed=1)
    if kind == "air":
        return airmoe.AIRRouter(E, d + extra, k, 4, 4, seed=1)
    return airmoe.ProductKeyRouter(int(E ** 0.5), d + extra, k, seed=1)


@pytest.mark.parametrize("kind", ["dense", "air", "product_key"])
def test_load_bias_adds_a_per_expert_bias_to_the_scores(kind):
    E, d, k, T, rate = 16, 8, 2, 40, 0.25
    router = make(kind, E, d, k)
    bias = moe_lm.LoadBias(router)
    with torch.no_grad():  # start from zero biases
        for param in bias._columns():
            param[:, -1] = 0
    q = torch.randn(T, d, generator=torch.Generator().manual_seed(2))
    unbiased = bias.augment(q) @ moe_lm.router_centers(router).detach().t()
    # every slot to expert 5: it is over-used, all others under-used
    bias.update(torch.full((T, k), 5), E, rate)
    scores = bias.augment(q) @ moe_lm.router_centers(router).detach().t()
    if kind == "product_key":  # b1_i + b2_j for expert i * n + j: row 1 and column 1
        n = router.subkeys
        b1 = torch.full((n,), rate)
        b1[5 // n] = -rate
        b2 = torch.full((n,), rate)
        b2[5 % n] = -rate
        expected = (b1[:, None] + b2[None, :]).reshape(-1)
    else:
        expected = torch.full((E,), rate)
        expected[5] = -rate
    torch.testing.assert_close(scores - unbiased, expected.expand(T, E), atol=1e-5, rtol=0)
    # the router selects by the biased scores
    _, idx = router(bias.augment(q))
    _, want = torch.topk(scores, k, dim=-1)
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values)


def test_load_bias_columns_get_no_gradient():
    router = make("dense", 16, 8, 2)
    bias = moe_lm.LoadBias(router)
    gates, _ = router(bias.augment(torch.randn(10, 8)))
    gates.pow(2).sum().backward()
    assert router.centers.grad[:, :-1].abs().sum() > 0
    bias.zero_grads()
    assert torch.count_nonzero(router.centers.grad[:, -1]) == 0


def test_score_balance_loss_pushes_over_used_keys_away_from_their_tokens():
    E, d, n, k = 8, 4, 10, 2
    router = airmoe.DenseRouter(E, d, k, seed=3)
    q = torch.randn(n, d, generator=torch.Generator().manual_seed(4))
    idx = torch.tensor([[0, 1]] * n)  # every token picks experts 0 and 1
    assert moe_lm.slot_shares(idx, E, torch.float64).sum().item() == pytest.approx(1.0)
    moe_lm.score_balance_loss(router, q, idx, E).backward()
    # each took half the slots: weight E * 1/2 - 1 = 3 on <q_t, w_e>, / (n * k)
    expected = 3.0 * q.sum(0) / (n * k)
    torch.testing.assert_close(router.centers.grad[0], expected)
    torch.testing.assert_close(router.centers.grad[1], expected)
    assert torch.count_nonzero(router.centers.grad[2:]) == 0


LM_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "lm")


@pytest.mark.parametrize("script,argv,message", [
    ("study.py", ["--configs", "air_C64_m5"], "--configs: ['air_C64_m5'] not in the grid"),
    ("study.py", ["--experts", "1000"], "--experts: [1000] not in the grid"),
    ("study.py", ["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
    ("study.py", ["--seeds", "1,1"], "--seeds: repeated values"),
    ("study.py", ["--jobs", "0"], "--jobs must be >= 1"),
    ("study.py", ["--load-bias-rate", "-1"], "--load-bias-rate must be >= 0"),
    ("moe_lm.py", ["--load-bias-rate", "-0.1"], "--load-bias-rate must be >= 0"),
    ("moe_lm.py", ["--balance", "-1"], "--balance must be >= 0"),
    ("moe_lm.py", ["--score-balance", "-1"], "--score-balance must be >= 0"),
])
def test_scripts_refuse_bad_options_before_training(script, argv, message, tmp_path):
    import subprocess
    done = subprocess.run([sys.executable, os.path.join(LM_DIR, script), *argv,
                           "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out" / "runs").exists()  # nothing written
