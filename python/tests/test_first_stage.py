"""The first-stage measurement's pieces (examples/lm/first_stage.py) on
synthetic data: the MIPS transform, exact bound probing, list probing."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "lm"))
first_stage = pytest.importorskip("first_stage")

K = 4


def biased_router(E=512, d=16, T=64, seed=0, clusters=0):
    """Keys [w, b / c] and queries [h, c] with spread norms and biases, as
    moe_lm.py --load-bias-rate saves them. With clusters > 0, the keys sit
    near that many well separated directions (so bounds can prune)."""
    rng = np.random.default_rng(seed)
    if clusters:
        dirs = 10.0 * rng.standard_normal((clusters, d))
        w = dirs[rng.integers(clusters, size=E)] + 0.1 * rng.standard_normal((E, d))
    else:
        w = rng.standard_normal((E, d)) * rng.uniform(0.2, 3.0, size=(E, 1))
    b = rng.uniform(-2.0, 2.0, size=E)
    c = 16.0
    h = rng.standard_normal((T, d))
    centers = np.concatenate([w, (b / c)[:, None]], 1)
    tokens = np.concatenate([h, np.full((T, 1), c)], 1)
    return centers, tokens


def test_split_bias_finds_the_constant_bias_feature():
    centers, tokens = biased_router()
    w, b, h = first_stage.split_bias(centers, tokens)
    np.testing.assert_allclose(h @ w.T + b, tokens @ centers.T, rtol=1e-12, atol=1e-9)
    w0, b0, h0 = first_stage.split_bias(centers[:, :-1], tokens[:, :-1])  # no constant column
    assert w0.shape == centers[:, :-1].shape and not b0.any()


def test_mips_transform_keeps_the_biased_order_as_euclidean_distance():
    centers, tokens = biased_router()
    keys = first_stage.mips_keys(centers)
    queries = first_stage.mips_queries(tokens)
    norms = np.linalg.norm(keys, axis=1)
    np.testing.assert_allclose(norms, norms.max(), rtol=1e-12)  # every key on one sphere
    z = tokens @ centers.T
    np.testing.assert_allclose(queries @ keys.T, z, rtol=1e-12, atol=1e-9)
    dist = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(2)
    assert (np.argsort(dist, 1, kind="stable") == np.argsort(-z, 1, kind="stable")).all()


def kmeans_lists(centers, C):
    cw = first_stage.spherical_kmeans(centers, C, iterations=5, seed=3)
    return first_stage.Lists(first_stage.nearest(first_stage.unit_rows(centers), cw), C)


@pytest.mark.parametrize("clusters", [0, 8])
def test_upper_bound_probing_with_the_stopping_rule_finds_the_exact_top_k(clusters):
    centers, tokens = biased_router(clusters=clusters)
    w, b, h = first_stage.split_bias(centers, tokens)
    lists = kmeans_lists(centers, 16)
    z = tokens @ centers.T
    exact = first_stage.exact_topk(z, K)
    est = first_stage.bound_scores(lists, w, b, h, 1.0)
    # The bound holds for every member of every list.
    member_best = np.full(est.shape, -np.inf)
    for e, L in enumerate(lists.owner):
        member_best[:, L] = np.maximum(member_best[:, L], z[:, e])
    assert (member_best <= est + 1e-9).all()
    mask = first_stage.probe_until_bound(lists, z, est, K)
    stats = first_stage.shortlist_stats(z, mask, exact, first_stage.softmax_rows(z), K)
    assert stats["recall"] == 1.0 and stats["mass_recall"] == pytest.approx(1.0)
    if clusters:  # separated clusters: the bound stops long before every list
        assert stats["shortlist"] < len(centers) / 2
    # An optimistic estimate stops no later than the bound.
    optimistic = first_stage.probe_until_bound(
        lists, z, first_stage.bound_scores(lists, w, b, h, 0.0), K)
    assert optimistic.sum() <= mask.sum()


def test_probing_every_list_is_dense_and_fewer_lists_score_fewer_experts():
    centers, tokens = biased_router()
    C = 16
    lists = kmeans_lists(centers, C)
    z = tokens @ centers.T
    exact = first_stage.exact_topk(z, K)
    order = np.argsort(-np.random.default_rng(1).standard_normal((len(tokens), C)), 1)
    every = lists.probe_mask(order, C, K)
    assert every.all()
    assert first_stage.shortlist_stats(z, every, exact, first_stage.softmax_rows(z),
                                       K)["recall"] == 1.0
    one = lists.probe_mask(order, 1, K)
    assert (one.sum(1) >= K).all()  # probes on until k experts are in
    assert one.sum() < every.sum()
    # The shortlist is exactly the probed lists' members.
    first = order[:, 0]
    assert (one[lists.sizes[first] >= K] == (lists.owner[None, :] == first[:, None])
            [lists.sizes[first] >= K]).all()


def test_query_lists_hold_only_the_experts_their_tokens_picked():
    counts = np.array([[0, 3, 1, 0, 2], [5, 0, 0, 0, 0]])
    member = first_stage.top_members(counts, 2)
    assert member.tolist() == [[False, True, False, False, True],
                               [True, False, False, False, False]]


def test_measure_reports_every_option_with_honest_costs():
    centers, tokens = biased_router(E=256, T=96)
    rows = first_stage.measure(centers, tokens, K, Cs=[16], probes=[1, 16], slacks=[1.0],
                               lengths=[32], samples=[48], sample_fraction=0.5,
                               test_tokens=48)
    options = {r["option"] for r in rows}
    assert {"air", "mips", "mips_bands4", "bound_air", "bound_mips", "meankey_air",
            "query_s48"} <= options
    for r in rows:
        if r["option"] in ("air", "mips", "mips_bands4", "meankey_air", "meankey_mips") \
                and r["setting"].get("m") == 16:
            assert r["recall"] == 1.0 and r["shortlist"] == 256
        if r["option"].startswith("bound_") and r["setting"]["slack"] == 1.0:
            assert r["recall"] == 1.0
        if r["option"].startswith("query"):
            assert r["upkeep_flops"] == 0.5 * 2 * 256 * centers.shape[1]


def test_main_writes_json_chart_and_mips_files_the_bench_can_read(tmp_path):
    centers, tokens = biased_router(E=256, T=96)
    stem = str(tmp_path / "r_layer0")
    np.save(stem + "_centers.npy", centers.astype(np.float32))
    np.save(stem + "_tokens.npy", tokens.astype(np.float32))
    out, mips = tmp_path / "out", tmp_path / "mips"
    first_stage.main(["--data", f"tiny={stem}", "--out", str(out), "--save-mips", str(mips),
                      "--codewords", "16", "--probes", "1,4", "--slacks", "1,0",
                      "--list-lengths", "16", "--samples", "48", "--test-tokens", "48"])
    result = json.load(open(out / "first_stage.json"))["results"]["tiny"]
    assert result["E"] == 256 and result["T_test"] == 48 and result["rows"]
    assert (out / "first_stage.png").stat().st_size > 0
    assert "| air |" in (out / "first_stage.md").read_text()
    keys = np.load(mips / "tiny_mips_centers.npy")
    queries = np.load(mips / "tiny_mips_tokens.npy")
    assert keys.shape == (256, centers.shape[1] + 1) and not queries[:, -1].any()
    np.testing.assert_allclose(queries @ keys.T, tokens @ centers.T, rtol=1e-4, atol=1e-3)
    # A merged report keeps the data set; the same data set twice is refused.
    first_stage.main(["--merge", str(out / "first_stage.json"), "--out", str(tmp_path / "m")])
    assert "tiny" in json.load(open(tmp_path / "m" / "first_stage.json"))["results"]
    with pytest.raises(SystemExit):
        first_stage.main(["--merge", str(out / "first_stage.json"), "--merge",
                          str(out / "first_stage.json"), "--out", str(tmp_path / "m2")])


@pytest.mark.parametrize("bad", [["--codewords", "512"], ["--test-tokens", "96"]])
def test_main_refuses_options_the_data_cannot_take(tmp_path, bad):
    centers, tokens = biased_router(E=256, T=96)
    stem = str(tmp_path / "r_layer0")
    np.save(stem + "_centers.npy", centers.astype(np.float32))
    np.save(stem + "_tokens.npy", tokens.astype(np.float32))
    with pytest.raises(SystemExit):
        first_stage.main(["--data", f"tiny={stem}", "--out", str(tmp_path / "o")] + bad)


def test_load_bias_steps_lower_the_overloaded_and_raise_the_idle():
    w = np.zeros((4, 2))
    h = np.ones((8, 2))
    b = np.array([1.0, 0.0, 0.0, -1.0])  # every token picks expert 0 (k = 1)
    moved = first_stage.drift_biases(w, b, h, 1, steps=1, rate=0.25, batch=8)
    np.testing.assert_allclose(moved, [0.75, 0.25, 0.25, -0.75])
    np.testing.assert_allclose(first_stage.drift_biases(w, b, h, 1, 0, 0.25, 8), b)
    # Enough steps hand the top slot to another expert.
    moved = first_stage.drift_biases(w, b, h, 1, steps=3, rate=0.25, batch=8)
    assert np.argmax(moved) != 0


def test_stale_query_lists_at_zero_steps_are_the_query_option():
    centers, tokens = biased_router(E=256, T=96)
    kw = dict(Cs=[16], probes=[2], slacks=[1.0], lengths=[32], samples=[48],
              sample_fraction=0.5, test_tokens=48)
    fresh = [r for r in first_stage.measure(centers, tokens, K, **kw)
             if r["option"] == "query_s48"][0]
    stale = first_stage.stale_query_lists(centers, tokens, K, 16, 2, 32, 48, 48, [0, 50],
                                          rate=0.05, batch=16)
    assert stale[0]["recall"] == fresh["recall"] and stale[0]["shortlist"] == fresh["shortlist"]
    assert stale[0]["bias_change_rms"] == 0.0 and stale[1]["bias_change_rms"] > 0.0
    assert stale[1]["shortlist"] == fresh["shortlist"]  # the lists did not change
