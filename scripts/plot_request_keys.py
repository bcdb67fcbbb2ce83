#!/usr/bin/python3
"""Forward bytes over the dense-replicated floor against recall@k, for air
with and without request keys, from an `airmoe_bench simulate
--request-key-bits ...` weak-scaling JSON (one line per keys setting, one
point per m, at the largest P in the file).

usage: plot_request_keys.py SIMULATE.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    j = json.load(open(sys.argv[1]))
    rows = [r for r in j["results"] if r["strategy"] == "air"]
    if not rows or "forward_vs_floor" not in rows[0]:
        sys.exit(f"{sys.argv[1]}: no air rows with forward_vs_floor (a weak-scaling run of "
                 f"airmoe_bench simulate)")
    P = max(r["ranks"] for r in rows)
    cfg = j["config"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for bits in sorted({r.get("request_key_bits", 0) for r in rows}):
        line = sorted((r for r in rows if r["ranks"] == P and r.get("request_key_bits", 0) == bits),
                      key=lambda r: r["probes"])
        ax.plot([r["recall_at_k"] for r in line], [r["forward_vs_floor"] for r in line],
                marker="o", label=f"air, {bits}-bit request keys" if bits else "air")
        for r in line:
            ax.annotate(f"m={r['probes']}", (r["recall_at_k"], r["forward_vs_floor"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(1.2, color="gray", linestyle="--", linewidth=1, label="1.2 x floor")
    ax.set_yscale("log")
    ax.set_xlabel(f"recall@{cfg['k']}")
    ax.set_ylabel("forward bytes / dense-replicated floor")
    ax.set_title(f"E={cfg['experts']}, d={cfg['dim']}, P={P}, C={cfg['codewords']}, "
                 f"{cfg['tokens_per_rank']} tokens per rank", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
