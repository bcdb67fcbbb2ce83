#!/usr/bin/python3
"""Runs `airmoe_bench router` on a small shape and checks its outputs.

usage: check_bench_json.py AIRMOE_BENCH WORKDIR

Checks the JSON holds every promised field, that AIR with m = C reproduces
dense routing exactly (recall 1), that --save-routes wrote int32/float32
[T, k] arrays, and that --centers/--tokens route a user's .npy data.
"""
import json
import os
import subprocess
import sys

import numpy as np


def run(bench, *args):
    cmd = [bench, "router", *args, "--no-baselines"]  # bench_router_baselines checks those
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main():
    bench, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "router.json")
    routes = os.path.join(work, "routes")
    E, d, T, k, C = 2000, 24, 300, 4, 16
    run(bench, "-E", str(E), "-d", str(d), "-T", str(T), "--k", str(k), "-C", str(C),
        "--probes", f"1,4,{C}", "--repeats", "1", "--json", out, "--save-routes", routes)
    with open(out) as f:
        j = json.load(f)
    for key in ("config", "sgemm_gflops", "dense_gemm_gflops", "results"):
        assert key in j, f"missing {key}"
    cfg = j["config"]
    assert (cfg["experts"], cfg["dim"], cfg["tokens"], cfg["k"], cfg["codewords"]) == (E, d, T, k, C), cfg
    assert "seed" in cfg
    assert j["sgemm_gflops"] > 0 and j["dense_gemm_gflops"] > 0
    fields = ("router", "probes", "tokens_per_s", "recall_at_k", "mass_recall", "shortlist_mean",
              "flops_per_token")
    routers = set()
    for row in j["results"]:
        for key in fields:
            assert key in row, f"row {row} lacks {key}"
        assert row["tokens_per_s"] > 0 and 0.0 <= row["recall_at_k"] <= 1.0
        routers.add(row["router"])
    assert {"dense", "air", "product_key"} <= routers, routers
    air_full = [r for r in j["results"] if r["router"] == "air" and r["probes"] == C]
    assert air_full and air_full[0]["recall_at_k"] == 1.0 and air_full[0]["mass_recall"] == 1.0
    recalls = [r["recall_at_k"] for r in j["results"] if r["router"] == "air"]
    assert recalls == sorted(recalls), f"recall must not fall as m grows: {recalls}"

    dense_e = np.load(os.path.join(routes, "dense_experts.npy"))
    dense_g = np.load(os.path.join(routes, "dense_gates.npy"))
    air_e = np.load(os.path.join(routes, f"air_m{C}_experts.npy"))
    air_g = np.load(os.path.join(routes, f"air_m{C}_gates.npy"))
    assert dense_e.dtype == np.int32 and dense_e.shape == (T, k), (dense_e.dtype, dense_e.shape)
    assert dense_g.dtype == np.float32 and dense_g.shape == (T, k)
    assert (air_e == dense_e).all() and (air_g == dense_g).all(), "AIR at m=C must equal dense"
    assert np.allclose(dense_g.sum(axis=1), 1.0, atol=1e-5)

    # A user's own router weights and tokens, from .npy.
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((500, 16)).astype(np.float32)
    tokens = rng.standard_normal((64, 16)).astype(np.float32)
    np.save(os.path.join(work, "centers.npy"), centers)
    np.save(os.path.join(work, "tokens.npy"), tokens)
    out2 = os.path.join(work, "npy.json")
    run(bench, "--centers", os.path.join(work, "centers.npy"), "--tokens",
        os.path.join(work, "tokens.npy"), "-C", "8", "--k", "2", "--probes", "8", "--repeats", "1",
        "--no-faiss", "--json", out2, "--save-routes", os.path.join(work, "npy_routes"))
    with open(out2) as f:
        j2 = json.load(f)
    assert j2["config"]["experts"] == 500 and j2["config"]["tokens"] == 64
    got = np.load(os.path.join(work, "npy_routes", "dense_experts.npy"))
    logits = tokens.astype(np.float64) @ centers.astype(np.float64).T
    want = np.argsort(-logits, axis=1, kind="stable")[:, :2]
    assert (got == want).mean() > 0.99, "dense routes of .npy data disagree with NumPy"

    # A selection bias: --bias b routes like keys [w, b] and tokens [h, 1],
    # and AIR at m = C still equals dense.
    bias = (3.0 * rng.standard_normal((500, 1))).astype(np.float32)
    np.save(os.path.join(work, "bias.npy"), bias)
    np.save(os.path.join(work, "keys_wb.npy"), np.hstack([centers, bias]))
    np.save(os.path.join(work, "tokens_h1.npy"), np.hstack([tokens, np.ones((64, 1), np.float32)]))
    common = ["-C", "8", "--k", "2", "--probes", "8", "--repeats", "1", "--no-product-key"]
    run(bench, "--centers", os.path.join(work, "centers.npy"), "--tokens",
        os.path.join(work, "tokens.npy"), "--bias", os.path.join(work, "bias.npy"), *common,
        "--gates", "sigmoid", "--save-routes", os.path.join(work, "bias_routes"))
    run(bench, "--centers", os.path.join(work, "keys_wb.npy"), "--tokens",
        os.path.join(work, "tokens_h1.npy"), *common, "--no-faiss", "--save-routes",
        os.path.join(work, "wb_routes"))
    biased = np.load(os.path.join(work, "bias_routes", "dense_experts.npy"))
    augmented = np.load(os.path.join(work, "wb_routes", "dense_experts.npy"))
    want = np.argsort(-(logits + bias.T.astype(np.float64)), axis=1, kind="stable")[:, :2]
    assert (biased == want).mean() > 0.99, "biased dense routes disagree with NumPy"
    assert (biased == augmented).mean() > 0.99, "--bias b and keys [w, b] route differently"
    assert (biased != got).any(), "the bias moved no route"
    air = np.load(os.path.join(work, "bias_routes", "air_m8_experts.npy"))
    assert (air == biased).all(), "biased AIR at m = C must equal biased dense"
    gates = np.load(os.path.join(work, "bias_routes", "dense_gates.npy"))
    chosen = np.take_along_axis(logits, biased.astype(np.int64), axis=1)
    sig = 1.0 / (1.0 + np.exp(-chosen))
    assert np.allclose(gates, sig / sig.sum(axis=1, keepdims=True), atol=1e-5), "sigmoid gates"

    # Query-aware lists from the first tokens, measured on the rest: every
    # list probed equals dense (with the bias), and the build cost is there.
    q_tokens = rng.standard_normal((400, 16)).astype(np.float32)
    np.save(os.path.join(work, "q_tokens.npy"), q_tokens)
    out3 = os.path.join(work, "query.json")
    run(bench, "--centers", os.path.join(work, "centers.npy"), "--tokens",
        os.path.join(work, "q_tokens.npy"), "--bias", os.path.join(work, "bias.npy"), "-C", "8",
        "--k", "2", "--probes", "1,8", "--repeats", "1", "--no-product-key", "--variants",
        "air,query", "--list-sample", "300", "--list-lengths", "4,40", "--list-k", "2,6",
        "--json", out3,
        "--save-routes", os.path.join(work, "query_routes"))
    with open(out3) as f:
        j3 = json.load(f)
    assert j3["config"]["tokens"] == 100 and j3["config"]["list_sample"] == 300, j3["config"]
    assert j3["query_lists_build_flops"] >= 2 * 300 * 500 * 16, j3["query_lists_build_flops"]
    assert j3["config"]["list_k"] == "2,6", j3["config"]
    rows = {(r["router"], r["probes"]): r for r in j3["results"]}
    for name in ("air_query_L4", "air_query_L40", "air_query_L4_k6", "air_query_L40_k6"):
        full = rows[(name, 8)]
        assert full["recall_at_k"] == 1.0 and full["shortlist_mean"] == 500, full
        assert rows[(name, 1)]["shortlist_mean"] < 500
    # counted 3x as deep, a list of L = 40 holds more of the experts
    assert rows[("air_query_L40_k6", 1)]["shortlist_mean"] > rows[("air_query_L40", 1)][
        "shortlist_mean"]
    q_dense = np.load(os.path.join(work, "query_routes", "dense_experts.npy"))
    q_full = np.load(os.path.join(work, "query_routes", "air_query_L4_m8_experts.npy"))
    assert q_dense.shape == (100, 2) and (q_full == q_dense).all(), "query lists at m = C"
    print("bench_router_smoke: ok")


if __name__ == "__main__":
    main()
