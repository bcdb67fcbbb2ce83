#!/usr/bin/python3
"""Checks that runs of `airmoe_bench traffic` and `airmoe_bench layer` launched
differently (one host, several hosts, TCP or UCX) routed and metered the same:
every token's saved experts and gates are identical (bit for bit), and so are
the bytes and messages of every phase, recall and mass recall. Seconds may
differ; nothing else may.

usage: compare_runs.py REFERENCE_DIR OTHER_DIR...
Each DIR holds traffic.json, layer.json and the traffic routes
(<placement>_experts.npy, <placement>_gates.npy) that --save-routes wrote.
Prints one line per directory with a digest of its routes.
"""
import hashlib
import json
import os
import sys

import numpy as np

# The fields of each result row that must be equal across launches: every one
# that does not measure time or describe the launch itself.
EQUAL_FIELDS = {
    "traffic.json": ("placement", "ranks", "mean_ranks_per_token", "bytes", "messages",
                     "broadcast_bytes", "recall_at_k", "mass_recall", "imbalance",
                     "experts_per_rank"),
    "layer.json": ("strategy", "ranks", "probes", "bytes", "messages", "messages_total",
                   "bytes_forward", "bytes_backward", "bytes_total", "recall_at_k",
                   "mass_recall", "router_flops_per_token", "expert_flops_per_token"),
}


def load(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return json.load(f)


def routes_digest(run_dir, placements):
    """sha256 over every placement's experts and gates, in placement order."""
    h = hashlib.sha256()
    for p in placements:
        for part in ("experts", "gates"):
            a = np.load(os.path.join(run_dir, f"{p}_{part}.npy"))
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def compare_rows(reference, other, name, label):
    ref_rows, rows = load(reference, name)["results"], load(other, name)["results"]
    assert len(ref_rows) == len(rows), f"{label} {name}: {len(rows)} rows, expected {len(ref_rows)}"
    for ref, row in zip(ref_rows, rows):
        for key in EQUAL_FIELDS[name]:
            assert key in ref, f"{name}: reference row lacks {key}"
            assert row.get(key) == ref[key], (
                f"{label} {name} row {ref.get('placement', ref.get('strategy'))}: {key} = "
                f"{row.get(key)!r}, one host gave {ref[key]!r}")
    return sum(r["bytes_total"] for r in rows) if name == "layer.json" else sum(
        sum(r["bytes"].values()) for r in rows)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    reference, others = sys.argv[1], sys.argv[2:]
    placements = [r["placement"] for r in load(reference, "traffic.json")["results"]]
    want = routes_digest(reference, placements)
    print(f"{'run':<24} {'routes digest':<18} {'traffic bytes':>14} {'layer bytes':>12}")
    for run_dir in [reference] + others:
        label = os.path.basename(os.path.normpath(run_dir))
        got = routes_digest(run_dir, placements)
        assert got == want, f"{label}: routes digest {got}, one host gave {want}"
        traffic = compare_rows(reference, run_dir, "traffic.json", label)
        layer = compare_rows(reference, run_dir, "layer.json", label)
        print(f"{label:<24} {got:<18} {traffic:>14.0f} {layer:>12.0f}")
    print("routes and bytes equal: ok")


if __name__ == "__main__":
    main()
