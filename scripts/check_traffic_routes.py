#!/usr/bin/python3
"""Runs `airmoe_bench traffic` under mpiexec at P = 1 and P = 3 and checks
that every token's saved experts and gates are identical, and that the JSON
holds every promised field.

usage: check_traffic_routes.py AIRMOE_BENCH MPIEXEC WORKDIR
"""
import json
import os
import subprocess
import sys

import numpy as np

POLICIES = ("round-robin", "list", "locality")
FIELDS = ("placement", "ranks", "mean_ranks_per_token", "bytes", "broadcast_bytes",
          "recall_at_k", "imbalance", "seconds")


def run(mpiexec, bench, ranks, work):
    out = os.path.join(work, f"P{ranks}")
    cmd = [mpiexec, "-n", str(ranks), "--oversubscribe", "--allow-run-as-root", bench, "traffic",
           "-E", "3001", "-d", "24", "-T", "301", "--k", "4", "-C", "29", "-m", "3",
           "--repeats", "1", "--json", os.path.join(out, "traffic.json"), "--save-routes", out]
    os.makedirs(out, exist_ok=True)
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(out, "traffic.json")) as f:
        return out, json.load(f)


def main():
    bench, mpiexec, work = sys.argv[1:4]
    one, j1 = run(mpiexec, bench, 1, work)
    three, j3 = run(mpiexec, bench, 3, work)
    for j, ranks in ((j1, 1), (j3, 3)):
        assert [r["placement"] for r in j["results"]] == list(POLICIES), j["results"]
        for row in j["results"]:
            for key in FIELDS:
                assert key in row, f"missing {key}"
            assert row["ranks"] == ranks
            for phase in ("requests", "replies", "kmeans_sync"):
                assert phase in row["bytes"] and phase in row["seconds"], (phase, row)
            assert 1.0 <= row["imbalance"] < 2.0, row["imbalance"]
            assert 0.5 < row["recall_at_k"] <= 1.0
    # One rank sends nothing to anyone; three ranks do, and less than a broadcast
    # with the locality placement.
    assert all(r["bytes"]["requests"] == 0 for r in j1["results"])
    loc = [r for r in j3["results"] if r["placement"] == "locality"][0]
    assert 0 < loc["bytes"]["requests"] < loc["broadcast_bytes"], loc
    for policy in POLICIES:
        for part in ("experts", "gates"):
            a = np.load(os.path.join(one, f"{policy}_{part}.npy"))
            b = np.load(os.path.join(three, f"{policy}_{part}.npy"))
            assert a.shape == (301, 4) and a.shape == b.shape, (a.shape, b.shape)
            assert (a == b).all(), f"{policy} {part}: P=3 differs from P=1"
        # Every placement routes the same.
        assert (np.load(os.path.join(three, f"{policy}_experts.npy")) ==
                np.load(os.path.join(three, "round-robin_experts.npy"))).all()
    print("traffic_routes_match: ok")


if __name__ == "__main__":
    main()
