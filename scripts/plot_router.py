#!/usr/bin/python3
"""Plots recall@k against routing throughput from `airmoe_bench router --json` files.

usage: plot_router.py OUT.png RESULT.json [RESULT.json ...]

One panel per JSON file: a curve per router over its probe counts, dense,
PyTorch and product keys as single points (baselines not measured left out),
the 0.95 recall line for reference.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"air": ("tab:blue", "o"), "faiss_ivf": ("tab:orange", "s"),
         "faiss_cpu": ("tab:red", "D"), "dense": ("black", "*"),
         "torch_f32": ("tab:gray", "P"), "torch_bf16": ("tab:brown", "X"),
         "product_key": ("tab:green", "^")}


def main():
    out, files = sys.argv[1], sys.argv[2:]
    fig, axes = plt.subplots(1, len(files), figsize=(6 * len(files), 4.5), squeeze=False)
    for ax, path in zip(axes[0], files):
        with open(path) as f:
            j = json.load(f)
        cfg = j["config"]
        for router, (color, marker) in STYLE.items():
            rows = [r for r in j["results"] if r["router"] == router and r["tokens_per_s"]]
            if not rows:
                continue
            xs = [r["tokens_per_s"] for r in rows]
            ys = [r["recall_at_k"] for r in rows]
            label = "product_key (recall vs its own keys)" if router == "product_key" else router
            ax.plot(xs, ys, color=color, marker=marker, label=label,
                    linestyle="-" if len(rows) > 1 else "none", markersize=8)
            if len(rows) > 1:
                for r in rows:
                    ax.annotate(f"m={r['probes']}", (r["tokens_per_s"], r["recall_at_k"]),
                                textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
        ax.axhline(0.95, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("tokens / s (log)")
        ax.set_ylabel(f"recall@{cfg['k']}")
        threads = f", {cfg['threads']} threads" if "threads" in cfg else ""
        ax.set_title(f"{cfg['data']}: E={cfg['experts']}, d={cfg['dim']}, C={cfg['codewords']}"
                     f"{threads}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
