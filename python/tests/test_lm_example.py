"""The language-model example's balancing pieces (examples/lm/moe_lm.py)."""
import copy
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


# moe_lm.py options the issue (17, items 11 and 12) saw crash, some after
# training: each is refused by name, through the script itself, before the
# corpus is read (test_scripts_refuse_bad_options_before_training).
MOE_LM_CRASHES = [
    (["--routers", "dense,Air"], "--routers: unknown ['Air']; choose from dense, air, product_key"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--eval-every", "0"], "--eval-every must be >= 1, got 0"),
    (["--eval-batches", "0"], "--eval-batches must be >= 1, got 0"),
    (["--save-router-data", "{tmp}/data", "--save-batches", "0"],
     "--save-batches must be >= 1, got 0"),
    (["--routers", "product_key", "--experts", "60"],
     "--experts 60 is not a square: product_key needs E = n^2 (e.g. 49 or 64)"),
    (["--heads", "3", "--dim", "16"], "--heads 3 does not divide --dim 16"),
    (["--out", "{tmp}/file"], "--out: cannot create directory"),
]

# More refusals, checked on the parsed options (test_moe_lm_option_errors).
MOE_LM_REFUSED = [
    (["--routers", "dense,,air"], "--routers: unknown ['']"),
    (["--routers", "air,air"], "--routers: repeated names in 'air,air'"),
    (["--layers", "0"], "--layers must be >= 1, got 0"),
    (["--update-every", "0"], "--update-every must be >= 1, got 0"),
    (["--k", "5000"], "--k 5000 exceeds --experts 4096"),
    (["--codewords", "5000"], "--codewords 5000 exceeds --experts 4096"),
    (["--probes", "65"], "--probes 65 exceeds --codewords 64"),
    (["--routers", "air", "--spills", "64"],
     "--routers air: the router refuses these options: spills must be in"),
    (["--routers", "air", "--list-cap", "10"],
     "--routers air: the router refuses these options: list cap 10 x 64 lists cannot hold"),
    (["--lr", "0"], "--lr must be finite and > 0, got 0.0"),
    (["--codebook-step", "1.5"], "--codebook-step must be in (0, 1], got 1.5"),
    (["--soar-lambda", "inf"], "--soar-lambda must be finite and >= 0, got inf"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--seed", str(2**64)], "--seed must be < 2^64"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--query-norm", "--batch", "1", "--seq", "1"], "--query-norm needs --batch x --seq >= 2"),
    (["--save-router-data", "{tmp}/file"], "--save-router-data: cannot create directory"),
    (["--experts", "0", "--k", "0"], "--experts must be >= 1, got 0; --k must be >= 1, got 0"),
]


@pytest.mark.parametrize("script,argv,message", [
    ("study.py", ["--configs", "air_C64_m5"], "--configs: ['air_C64_m5'] not in the grid"),
    ("study.py", ["--experts", "1000"], "--experts: [1000] not in the grid"),
    ("study.py", ["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
    ("study.py", ["--seeds", "1,1"], "--seeds: repeated values"),
    ("study.py", ["--jobs", "0"], "--jobs must be >= 1"),
    ("study.py", ["--load-bias-rate", "-1"], "--load-bias-rate must be >= 0"),
    ("moe_lm.py", ["--load-bias-rate", "-0.1"], "--load-bias-rate must be finite and >= 0"),
    ("moe_lm.py", ["--balance", "-1"], "--balance must be finite and >= 0"),
    ("moe_lm.py", ["--score-balance", "-1"], "--score-balance must be finite and >= 0"),
    ("moe_lm.py", ["--balance", "nan"], "--balance must be finite and >= 0, got nan"),
    *[("moe_lm.py", argv, message) for argv, message in MOE_LM_CRASHES],
    ("study.py", ["--steps", "0"], "E4096_dense_s0: --steps must be >= 1, got 0"),
    ("study.py", ["--dim", "6"], "--heads 4 does not divide --dim 6"),
])
def test_scripts_refuse_bad_options_before_training(script, argv, message, tmp_path):
    import subprocess
    (tmp_path / "file").write_text("not a directory")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = subprocess.run([sys.executable, os.path.join(LM_DIR, script),
                           "--out", str(tmp_path / "out"), *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "bytes train" not in done.stdout  # refused before the corpus was read
    assert not (tmp_path / "out" / "runs").exists()  # nothing written
    assert not (tmp_path / "out" / "lm_results.json").exists()
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("argv,message", MOE_LM_CRASHES + MOE_LM_REFUSED)
def test_moe_lm_option_errors(argv, message, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in ["--out", str(tmp_path / "out"), *argv]]
    args = moe_lm.make_parser().parse_args(argv)
    errors = moe_lm.option_errors(args) or moe_lm.writable_directory_errors(args)
    assert message in "; ".join(errors), errors


def test_moe_lm_default_and_smoke_options_pass(tmp_path):
    for argv in ([], ["--routers", "product_key", "--experts", "256", "--codewords", "16",
                      "--probes", "4", "--dim", "32", "--heads", "2", "--load-bias-rate", "0.1"]):
        args = moe_lm.make_parser().parse_args(["--out", str(tmp_path / "out"), *argv])
        assert moe_lm.option_errors(args) == [] and moe_lm.writable_directory_errors(args) == []


def test_study_reuses_only_runs_made_with_the_settings_asked_for(tmp_path):
    """Issue 17, item 6: a run stored under other settings is not reported
    under the new ones; the study refuses, naming the differences, and keeps
    the stored run."""
    import subprocess
    if not os.path.exists(moe_lm.GCIDE):
        pytest.skip(f"no {moe_lm.GCIDE} (Debian dict-gcide)")
    out = tmp_path / "study"

    def study(*argv):
        return subprocess.run(
            [sys.executable, os.path.join(LM_DIR, "study.py"), "--experts", "4096", "--seeds",
             "0", "--configs", "dense", "--eval-every", "1", "--eval-batches", "1", "--layers",
             "1", "--batch", "2", "--seq", "16", "--out", str(out), *argv],
            capture_output=True, text=True, timeout=300)

    first = study("--steps", "2", "--dim", "16")
    assert first.returncode == 0 and "0 already done, 1 to run" in first.stdout, first.stderr
    run = out / "runs" / "E4096_dense_s0.json"
    stored = run.read_bytes()
    for argv in (["--steps", "3", "--dim", "32"], ["--steps", "3", "--dim", "32", "--report-only"]):
        again = study(*argv)
        assert again.returncode == 2, again.stdout
        assert "1 stored run(s) under" in again.stderr and "use another --out" in again.stderr
        assert "dim: stored 16, asked 32; steps: stored 2, asked 3" in again.stderr
        assert "already done" not in again.stdout
        assert run.read_bytes() == stored
    same = study("--steps", "2", "--dim", "16")
    assert same.returncode == 0 and "1 already done, 0 to run" in same.stdout, same.stderr
    import shutil  # a moved study still reports: where outputs go is not compared
    out = shutil.copytree(out, tmp_path / "moved")
    moved = study("--steps", "2", "--dim", "16", "--report-only")
    assert moved.returncode == 0 and "| 4,096 | dense |" in moved.stdout, moved.stderr


def test_hash_router_fixes_each_bytes_experts_and_gates():
    router = moe_lm.HashRouter(64, 4, seed=3)
    router.token_ids = torch.tensor([7, 200, 7])
    gates, idx = router(torch.zeros(3, 8))
    assert torch.equal(idx[0], idx[2]) and not torch.equal(idx[0], idx[1])
    assert all(len(set(row.tolist())) == 4 for row in idx)  # k distinct experts
    assert torch.equal(gates, torch.full((3, 4), 0.25))


def test_effective_experts_is_e_when_uniform_and_k_when_collapsed():
    assert moe_lm.effective_experts(torch.ones(32)) == pytest.approx(32)
    collapsed = torch.zeros(32)
    collapsed[:4] = 10
    assert moe_lm.effective_experts(collapsed) == pytest.approx(4)


@pytest.mark.parametrize("kind", ["dense", "air", "product_key"])
def test_smoothed_load_bias_lowers_over_used_experts_through_the_router_bias(kind):
    E, d, k, T = 16, 8, 2, 40
    router = {"dense": lambda: airmoe.DenseRouter(E, d, k, seed=1),
              "air": lambda: airmoe.AIRRouter(E, d, k, 4, 4, seed=1),
              "product_key": lambda: airmoe.ProductKeyRouter(4, d, k, seed=1)}[kind]()
    balancer = moe_lm.SmoothedLoadBias(router, E, rate=0.1, window=4)
    assert torch.equal(router.bias, torch.zeros(E))
    q = torch.randn(T, d, generator=torch.Generator().manual_seed(2))
    over = torch.full((T, k), 5)  # every slot to expert 5
    balancer.update(q, over)
    assert router.bias[5] < 0 and (router.bias[torch.arange(E) != 5] > 0).all()
    # the average moves a quarter of the way per step (window 4)
    assert balancer.share[5].item() == pytest.approx(1 / E + 0.25 * (1 - 1 / E))
    # the router now selects by z + b
    z = q @ moe_lm.router_centers(router).detach().t()
    _, idx = router(q)
    want = torch.topk(z + router.bias, k, dim=-1).indices
    if kind != "product_key":  # product keys search the biased sub-key grid, not all E
        assert torch.equal(idx.sort(-1).values, want.sort(-1).values)


def test_a_bias_cap_bounds_the_bias_of_experts_no_token_reaches():
    E, d, k, T = 16, 8, 2, 40
    q = torch.randn(T, d, generator=torch.Generator().manual_seed(2))
    over = torch.full((T, k), 5)  # every slot to expert 5: the others are never reached
    biases = {}
    for cap in (0.0, 0.5):
        router = airmoe.DenseRouter(E, d, k, seed=1)
        balancer = moe_lm.SmoothedLoadBias(router, E, rate=0.1, window=4, cap=cap)
        for _ in range(30):
            balancer.update(q, over)
        biases[cap] = router.bias.clone()
    spread = moe_lm.chosen_logits(router, q, over).float().std().item()
    # uncapped, 30 steps of +0.1 spread: three spreads for an unreached expert
    assert biases[0.0][0] > 2.5 * spread and biases[0.0][5] < -0.5 * spread
    capped = biases[0.5]
    assert capped.abs().max() == pytest.approx(0.5 * spread, rel=1e-6)
    assert capped[0] > 0 and capped[5] < 0


def test_saved_router_data_carries_the_bias_as_a_key_column(tmp_path, monkeypatch):
    import numpy as np
    args = _tiny_args(tmp_path, save_router_data=str(tmp_path / "data"), save_batches=1,
                      steps=3, eval_every=3)
    model_bias = {}
    real_save = moe_lm.save_router_data

    def save(model, name, val, args):
        model_bias[0] = model.blocks[0].ffn.router.bias.clone()
        real_save(model, name, val, args)

    monkeypatch.setattr(moe_lm, "save_router_data", save)
    _tiny_train(args)
    centers = np.load(tmp_path / "data" / "dense_layer0_centers.npy")
    tokens = np.load(tmp_path / "data" / "dense_layer0_tokens.npy")
    assert centers.shape == (64, 17) and tokens.shape[1] == 17
    assert np.array_equal(centers[:, -1], model_bias[0].numpy()) and (model_bias[0] != 0).any()
    assert (tokens[:, -1] == 1).all()


def test_full_softmax_balance_loss_reaches_unchosen_experts():
    E, d, k, T = 16, 8, 2, 32
    router = airmoe.DenseRouter(E, d, k, seed=1)
    q = torch.randn(T, d, generator=torch.Generator().manual_seed(3))
    _, idx = router(q)
    loss = moe_lm.full_softmax_balance_loss(router, q, idx, E)
    loss.backward()
    chosen = torch.zeros(E, dtype=torch.bool)
    chosen[idx.reshape(-1)] = True
    assert (~chosen).any() and router.centers.grad[~chosen].abs().sum() > 0


def test_moe_lm_refuses_two_forms_of_the_bias(tmp_path):
    args = moe_lm.make_parser().parse_args(["--out", str(tmp_path / "out"), "--bias-balance",
                                            "0.01", "--load-bias-rate", "0.05"])
    assert "choose one" in "; ".join(moe_lm.option_errors(args))
    args = moe_lm.make_parser().parse_args(["--out", str(tmp_path / "out"), "--load-window",
                                            "0"])
    assert "--load-window must be >= 1, got 0" in "; ".join(moe_lm.option_errors(args))


def test_product_key_heads_concatenate_their_picks_with_gates_summing_to_one():
    heads = moe_lm.ProductKeyHeads(4, 8, 4, 2, seed=1)
    q = torch.randn(10, 8, generator=torch.Generator().manual_seed(4))
    gates, idx = heads(q)
    assert gates.shape == idx.shape == (10, 4)
    torch.testing.assert_close(gates.sum(1), torch.ones(10))
    for i, head in enumerate(heads.heads):  # each head's own top-2, side by side
        g, j = head(q)
        assert torch.equal(idx[:, 2 * i:2 * i + 2], j)
        torch.testing.assert_close(gates[:, 2 * i:2 * i + 2], g / 2)
    heads.bias = torch.linspace(-1, 1, 16)
    assert all(torch.equal(h.bias, heads.bias) for h in heads.heads)
    z = moe_lm.chosen_logits(heads, q, idx)
    assert z.shape == (10, 4)
    with pytest.raises(ValueError, match="k = 3 is not a multiple of 2 heads"):
        moe_lm.ProductKeyHeads(4, 8, 3, 2, seed=1)


def test_moe_lm_refuses_the_key_column_bias_for_heads_and_hash(tmp_path):
    args = moe_lm.make_parser().parse_args(["--out", str(tmp_path / "out"), "--routers",
                                            "hash,product_key_h2", "--load-bias-rate", "0.05"])
    assert ("its key-column bias has no form for hash, product_key_h2"
            in "; ".join(moe_lm.option_errors(args)))


def _tiny_args(tmp_path, **options):
    args = moe_lm.make_parser().parse_args([])
    # bias_balance 0.5: large enough that the balancing state changes routes
    # within six steps, so a resume that lost it would show
    settings = dict(experts=64, k=2, dim=16, heads=2, layers=1, hidden=4, seq=8, batch=4,
                    steps=6, eval_every=3, eval_batches=1, threads=1, bias_balance=0.5,
                    load_window=4, out=str(tmp_path))
    for key, value in {**settings, **options}.items():
        setattr(args, key, value)
    return args


def _tiny_train(args, name="dense"):
    data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(7))
    make_router, flops = moe_lm.routers(args)[name]
    return moe_lm.train(name, make_router, flops, data, data[:512], args)


def _parallel_lists_layout(state):
    """A checkpoint as moe_lm.py wrote it before its "blocks" entry: one list
    per per-block quantity."""
    blocks = state.pop("blocks")
    state["recent_load"] = [b["recent_load"] for b in blocks]
    state["smoothed_share"] = [b["smoothed_bias"]["share"] if b["smoothed_bias"] else None
                               for b in blocks]
    state["query_lists"] = [b["list_refresh"] for b in blocks]
    return state


# air_query: lists refreshed at steps 3 and 6 from the last 3 steps' tokens,
# so the refresh after the resume reads tokens of a step before the checkpoint.
# "parallel lists": the checkpoint rewritten in the layout before "blocks".
@pytest.mark.parametrize("layout", ["blocks", "parallel lists"])
@pytest.mark.parametrize("name,options", [
    ("dense", {}),
    ("dense", dict(expert_updates="sparse")),
    ("air_query", dict(codewords=8, probes=2, list_length=16, list_refresh=3, list_sample=96))])
def test_a_killed_run_resumes_from_its_checkpoint_with_the_same_bits(tmp_path, monkeypatch, name,
                                                                     options, layout):
    whole = _tiny_train(_tiny_args(tmp_path, **options), name)
    args = _tiny_args(tmp_path, checkpoint_dir=str(tmp_path / "partial"), checkpoint_every=2,
                      **options)
    os.makedirs(args.checkpoint_dir)
    real_update = moe_lm.update_codebooks

    def killed_at_step_5(model, step, a):
        if step == 5:
            raise KeyboardInterrupt
        real_update(model, step, a)

    monkeypatch.setattr(moe_lm, "update_codebooks", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _tiny_train(args, name)
    path = moe_lm.checkpoint_path(name, args)
    saved = torch.load(path)
    assert saved["step"] == 4  # the last checkpoint before the kill
    assert len(saved["blocks"]) == args.layers
    assert (saved["blocks"][0]["list_refresh"] is not None) == (name == "air_query")
    # the wall seconds before the kill count in the resumed run's
    saved["wall_s"] = 1000.0
    torch.save(_parallel_lists_layout(saved) if layout == "parallel lists" else saved, path)
    monkeypatch.setattr(moe_lm, "update_codebooks", real_update)
    resumed = _tiny_train(args, name)
    assert 1000.0 < resumed["wall_s"] < 1000.0 + whole["wall_s"] + 60.0
    assert resumed["train_curve"] == whole["train_curve"]
    assert resumed["evals"] == whole["evals"]
    assert resumed["effective_experts"] == whole["effective_experts"]
    for key in ("list_builds", "list_build_flops", "router_flops_per_token"):
        assert resumed.get(key) == whole.get(key)
    moe_lm.discard_checkpoint(name, args)
    assert not os.listdir(args.checkpoint_dir)


def test_a_checkpoint_made_with_other_settings_is_refused_by_name(tmp_path, monkeypatch):
    args = _tiny_args(tmp_path, checkpoint_dir=str(tmp_path), checkpoint_every=2, steps=3)
    monkeypatch.setattr(moe_lm, "evaluate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed after the step-2 checkpoint
        _tiny_train(args)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"lr: saved 0.003, asked 0.001"):
        _tiny_train(_tiny_args(tmp_path, checkpoint_dir=str(tmp_path), steps=3, lr=1e-3))


def test_a_checkpoint_from_before_newer_options_resumes(tmp_path, monkeypatch):
    """A run checkpointed by an older moe_lm.py (no list_refresh option, no
    air_query state) resumes under today's with the options at their
    defaults, and computes what a run never stopped computes."""
    whole = _tiny_train(_tiny_args(tmp_path))
    args = _tiny_args(tmp_path, checkpoint_dir=str(tmp_path / "partial"), checkpoint_every=2)
    os.makedirs(args.checkpoint_dir)
    monkeypatch.setattr(moe_lm, "evaluate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed at step 3, after the step-2 checkpoint
        _tiny_train(args)
    monkeypatch.undo()
    path = moe_lm.checkpoint_path("dense", args)
    state = _parallel_lists_layout(torch.load(path))
    del state["settings"]["list_refresh"], state["query_lists"], state["wall_s"]
    torch.save(state, path)
    assert _tiny_train(args)["train_curve"] == whole["train_curve"]
    with pytest.raises(ValueError, match=r"list_refresh: saved 64, asked 65"):
        torch.save(state, path)
        _tiny_train(_tiny_args(tmp_path, checkpoint_dir=args.checkpoint_dir, list_refresh=65))


def test_air_query_trains_with_its_refreshes_counted(tmp_path):
    """air_query: query lists built from the initial centers, rebuilt every
    --list-refresh steps from the last --list-sample training inputs, each
    build's C++ FLOP count amortized over the training tokens, recall
    measured as for AIR."""
    argv = ["--routers", "air_query", "--steps", "4", "--eval-every", "2", "--eval-batches", "1",
            "--experts", "256", "--codewords", "16", "--probes", "2", "--list-length", "32",
            "--list-refresh", "2", "--list-sample", "96", "--dim", "16", "--heads", "2",
            "--layers", "1", "--seq", "16", "--batch", "4", "--k", "4", "--bias-balance", "0.05",
            "--threads", "1", "--out", str(tmp_path)]
    args = moe_lm.make_parser().parse_args(argv)
    assert moe_lm.option_errors(args) == []
    data = moe_lm.byte_tensor(bytes(torch.randint(0, 256, (3000,), generator=torch.Generator()
                                                  .manual_seed(0)).tolist()))
    make_router, flops = moe_lm.routers(args)["air_query"]
    result = moe_lm.train("air_query", make_router, flops, data[:2000], data[2000:], args)
    build = lambda tokens: airmoe._airmoe.query_lists_build_flops(  # noqa: E731
        tokens, 256, 16, 16, 32, 4, 10)
    # the initial build from the 256 centers, then steps 2 and 4 from 96 tokens
    assert result["list_builds"] == 3
    assert result["list_build_flops"] == pytest.approx(build(256) + 2 * build(96))
    per_token = result["list_refresh_flops_per_token"]
    assert per_token == pytest.approx(result["list_build_flops"] / (4 * 4 * 16))
    shortlists = [e["shortlist"] for e in result["evals"]]
    assert len(shortlists) == 2 and min(shortlists) >= 4
    # probe scores + the measured shortlist + the refreshes, per token
    assert result["router_flops_per_token"] == pytest.approx(
        2.0 * 16 * 16 + 2.0 * 16 * sum(shortlists) / 2 + per_token)
    assert per_token > 0 and 0.0 <= result["recall_at_k"] <= 1.0
    # --list-k: how deep the builds count each sample token's exact top-k
    assert make_router().list_k == 4
    args.list_k = 12
    assert moe_lm.routers(args)["air_query"][0]().list_k == 12


def test_air_query_option_errors(tmp_path):
    for argv, message in (
            (["--routers", "air_query", "--list-length", "5000"],
             "--list-length 5000 exceeds --experts 4096"),
            (["--routers", "air_query", "--list-sample", "32"],
             "air_query: a refresh samples min(--list-sample, --list-refresh x --batch x --seq)"
             " = 32 tokens, fewer than --codewords 64"),
            (["--routers", "air_query", "--list-k", "2"],
             "--list-k 2 is outside [--k 4, --experts 4096] (0: --k)"),
            (["--list-refresh", "0"], "--list-refresh must be >= 1, got 0")):
        args = moe_lm.make_parser().parse_args(["--out", str(tmp_path), *argv])
        assert message in "; ".join(moe_lm.option_errors(args))


def test_expert_ffn_equals_the_per_pair_weight_gather_in_value_and_every_gradient():
    E, d, h, N, k = 9, 6, 5, 14, 3
    gen = torch.Generator().manual_seed(3)
    # expert 0 takes one slot of every token (many pairs), experts 1..5 share
    # the rest unevenly, experts 6, 7, 8 take no pair at all
    idx = torch.stack([torch.zeros(N, dtype=torch.long),
                       1 + torch.arange(N) % 5,
                       1 + (torch.arange(N) % 5 + 1 + (torch.arange(N) % 3 == 0).long()) % 5], 1)
    assert (idx[:, 1] != idx[:, 2]).all()
    x = torch.randn(N, d, generator=gen, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(E, h, d, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, d, h, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(N, k, d, generator=gen, dtype=torch.float64)

    def reference(x, w1, w2):
        a = torch.nn.functional.gelu(torch.einsum("nkhd,nd->nkh", w1[idx], x))
        return torch.einsum("nkdh,nkh->nkd", w2[idx], a)

    want = reference(x, w1, w2)
    want_grads = torch.autograd.grad(want, (x, w1, w2), dy)
    got = moe_lm.ExpertFFN.apply(x, w1, w2, idx, False)
    got_grads = torch.autograd.grad(got, (x, w1, w2), dy)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert (got_grads[1][6:] == 0).all() and (got_grads[2][6:] == 0).all()
    # sparse grads: the touched experts' rows alone, the same bits
    sparse_grads = torch.autograd.grad(moe_lm.ExpertFFN.apply(x, w1, w2, idx, True),
                                       (x, w1, w2), dy)
    assert torch.equal(sparse_grads[0], got_grads[0])
    for g, dense in zip(sparse_grads[1:], got_grads[1:]):
        assert g.is_sparse
        assert sorted(g.coalesce().indices()[0].tolist()) == [0, 1, 2, 3, 4, 5]
        assert torch.equal(g.to_dense(), dense)


def test_sparse_expert_updates_move_only_the_experts_a_step_routed_to(tmp_path):
    """--expert-updates sparse: the first step equals AdamW's on every
    parameter (no expert has moments yet) but for where eps sits, and a later step leaves an expert
    it did not route to where it was, where AdamW's decaying moments move it."""
    args = _tiny_args(tmp_path, experts=64, k=2, steps=2)
    torch.manual_seed(0)
    dense_model = moe_lm.MoELM(moe_lm.routers(args)["dense"][0], args)
    sparse_model = copy.deepcopy(dense_model)
    args.expert_updates = "sparse"
    for block in sparse_model.blocks:
        block.ffn.sparse_grads = True
    dense_opt = moe_lm.make_optimizer(dense_model, _tiny_args(tmp_path))
    sparse_opt = moe_lm.make_optimizer(sparse_model, args)
    assert isinstance(sparse_opt, moe_lm.LazyExpertOptimizer)
    x = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    start = [p.detach().clone() for p in dense_model.parameters()]
    for model, opt in ((dense_model, dense_opt), (sparse_model, sparse_opt)):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        moe_lm.zero_missing_grads(opt)
        opt.step()
    # SparseAdam adds eps to sqrt(v) before the bias correction, AdamW after:
    # a first step is lr * g / (|g| + 32 eps) against lr * g / (|g| + eps), so
    # the steps agree within 1e-3 where |g| > 1e-3
    for p, q, p0 in zip(dense_model.parameters(), sparse_model.parameters(), start):
        clear = p.grad.abs() > 1e-3
        assert clear.any()
        torch.testing.assert_close((q - p0)[clear], (p - p0)[clear], rtol=1e-3, atol=0)
    # a second step on one token: every expert it did not route to stays put
    for model, opt in ((dense_model, dense_opt), (sparse_model, sparse_opt)):
        before = [b.ffn.w1.detach().clone() for b in model.blocks]
        opt.zero_grad(set_to_none=True)
        model(x[:1, :1]).square().mean().backward()
        moe_lm.zero_missing_grads(opt)
        opt.step()
        for b, w in zip(model.blocks, before):
            untouched = torch.ones(args.experts, dtype=torch.bool)
            untouched[b.ffn.last_experts.reshape(-1)] = False
            moved = (b.ffn.w1.detach() != w).flatten(1).any(1)
            if opt is sparse_opt:
                assert not moved[untouched].any() and moved[~untouched].all()
            else:
                assert moved[untouched].any()
    # and its state round-trips through state_dict (a checkpoint)
    again = moe_lm.make_optimizer(sparse_model, args)
    again.load_state_dict(sparse_opt.state_dict())
    assert again.state_dict()["sparse"]["state"].keys() == sparse_opt.state_dict()[
        "sparse"]["state"].keys()


def test_zero_missing_grads_gives_stepped_parameters_a_zero_grad_and_leaves_new_ones_alone():
    stepped, new = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([stepped, new], lr=0.1, weight_decay=0.0)
    stepped.grad = torch.ones(3)
    opt.step()  # only `stepped` has AdamW state
    opt.zero_grad(set_to_none=True)
    moe_lm.zero_missing_grads(opt)
    assert torch.equal(stepped.grad, torch.zeros(3)) and new.grad is None
    moved = stepped.detach().clone()
    opt.step()  # its moments decay: it keeps moving with a zero grad
    assert not torch.equal(stepped.detach(), moved)


@pytest.mark.parametrize("argv,message", [
    (["dense_s0"], "config: 'dense_s0' is not one of"),
    (["dense", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["dense", "--moe-lm-dir", "{tmp}"], "--moe-lm-dir: no moe_lm.py in"),
])
def test_train_speed_refuses_bad_options_before_training(argv, message, tmp_path):
    import subprocess
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = subprocess.run([sys.executable, os.path.join(LM_DIR, "train_speed.py"), *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "bytes train" not in done.stdout  # refused before the corpus was read


def test_a_study_row_is_balanced_only_when_each_of_its_runs_is():
    study = pytest.importorskip("study")
    row = dict(experts=4096, config="air_x", router="air_query", seeds=[0, 1],
               val_losses=[1.40, 1.41], val_loss_mean=1.405, val_loss_std=0.007,
               router_flops_per_token=9e4, tokens_per_s=1e3)
    one_short = dict(row, effective_experts_runs=[0.53, 0.49], effective_experts=0.51)
    both = dict(row, config="air_y", effective_experts_runs=[0.53, 0.51], effective_experts=0.52)
    verdict = study.criteria([one_short, both])["4096"]["balanced"]
    assert verdict == {"air_x": False, "air_y": True}
    assert "0.530 / 0.490" in study.table([one_short])


def test_the_probe_size_gets_no_verdict_on_criteria_2_to_4():
    """E = 65,536 is a probe (criterion 5): one seed, no ranking read from it,
    even where its numbers would answer criterion 3."""
    study = pytest.importorskip("study")
    base = dict(seeds=[0], val_losses=[1.5], val_loss_std=0.0, tokens_per_s=1e3,
                effective_experts_runs=[0.6], effective_experts=0.6)
    rows = [dict(base, experts=e, config=c, router=r, val_loss_mean=loss,
                 router_flops_per_token=f, **extra)
            for e in (4096, 65536)
            for c, r, loss, f, extra in (
                ("dense", "dense", 1.5, 1e6, {}),
                ("air_x", "air_query", 1.501, 1e5, dict(loss_vs_dense=0.001, flops_vs_dense=0.1)))]
    verdicts = study.criteria(rows)
    assert verdicts["4096"]["air_within_1pct_at_1_8_flops"] is True
    assert verdicts["65536"] == {"balanced": {"dense": True, "air_x": True}, "probe": True}
    text = study.criteria_text(verdicts)
    probe_part = text.split("E = 65,536:")[1]
    assert "without a verdict" in probe_part and "1/8" not in probe_part
    # one seed has no spread: the table shows none (not "± 0.0000")
    body = study.table(rows).split("\n", 2)[2]  # below the header
    assert "| 65,536 | dense | 1.5000 |" in body and "±" not in body


def test_a_diagnostic_row_is_reported_and_marked_but_not_read_by_criteria_2_to_4():
    """Rows chosen after the plan's runs were seen explain them; a verdict
    from them would be a post hoc one."""
    study = pytest.importorskip("study")
    grid = {name for rows in study.BALANCED_GRID.values() for name, _, _ in rows}
    assert study.DIAGNOSTICS <= grid  # a renamed grid row cannot slip out
    base = dict(experts=4096, seeds=[0, 1], val_loss_std=0.0, tokens_per_s=1e3,
                effective_experts_runs=[0.6, 0.6], effective_experts=0.6)
    diagnostic = "air_query_C64_L256_m1_cap1_k32"
    rows = [dict(base, config="dense", router="dense", val_losses=[1.5, 1.6],
                 val_loss_mean=1.55, router_flops_per_token=1e6),
            dict(base, config="air_query_C64_L256_m1", router="air_query",
                 val_losses=[1.6, 1.7], val_loss_mean=1.65, router_flops_per_token=1e5,
                 loss_vs_dense=0.065, flops_vs_dense=0.1),
            dict(base, config=diagnostic, router="air_query", val_losses=[1.5, 1.6],
                 val_loss_mean=1.55, router_flops_per_token=1e5, loss_vs_dense=0.0,
                 flops_vs_dense=0.1, diagnostic=True)]
    verdicts = study.criteria(rows)["4096"]
    assert verdicts["air_within_1pct_at_1_8_flops"] is False  # the diagnostic would say yes
    assert verdicts["balanced"][diagnostic] is True  # criterion 1 is per run: still read
    assert f"| {diagnostic} (diagnostic) |" in study.table(rows)


def test_a_run_another_process_trains_is_refused(tmp_path):
    """Two studies on one --out (or a worker a killed study left behind)
    would train one run twice into one checkpoint: the second is refused,
    naming the run, until the first lets go."""
    study = pytest.importorskip("study")
    args = moe_lm.make_parser().parse_args(["--out", str(tmp_path)])
    args.checkpoint_dir = str(tmp_path)
    with study.hold_run_lock("E4096_dense_s0", args):
        with pytest.raises(RuntimeError, match="E4096_dense_s0: another process is training"):
            study.run_one((str(tmp_path / "run.json"), args, "E4096_dense_s0"))
        assert not (tmp_path / "run.json").exists()
    with study.hold_run_lock("E4096_dense_s0", args):  # released: taken again
        pass


WORKERS_MODULE = """
import os, signal
def pid_of(job):
    return os.getpid()
def die_on_b(job):
    if job[2] == "b":
        os.kill(os.getpid(), signal.SIGKILL)
    return job[2]
"""


def test_study_runs_each_job_in_a_fresh_worker_and_stops_when_one_dies(tmp_path, monkeypatch):
    study = pytest.importorskip("study")
    (tmp_path / "workers_module.py").write_text(WORKERS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import workers_module
    jobs = [(None, None, name) for name in "abcd"]
    pids = list(study.run_in_workers(workers_module.pid_of, jobs, 2))
    assert len(set(pids)) == 4 and os.getpid() not in pids  # one process per run
    with pytest.raises(RuntimeError, match=r"worker process died.*unfinished runs: .*\bb\b"):
        list(study.run_in_workers(workers_module.die_on_b, jobs, 1))


def test_study_workers_end_with_the_study(tmp_path):
    """A study killed outright (SIGKILL: no cleanup runs) takes its pool's
    workers with it: they get SIGTERM from the kernel (die_with_parent)."""
    import signal
    import subprocess
    import time
    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        f"sys.path.insert(0, {LM_DIR!r})\n"
        "import study\n"
        "def work(_):\n"
        "    print(os.getpid(), flush=True)\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    with multiprocessing.get_context('spawn').Pool(1, study.die_with_parent) as pool:\n"
        "        pool.map(work, [0])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=env)
    worker = int(parent.stdout.readline())
    os.kill(worker, 0)  # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    for _ in range(100):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail(f"worker {worker} outlived its killed study")
