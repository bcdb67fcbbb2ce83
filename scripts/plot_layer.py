#!/usr/bin/python3
"""Charts from `airmoe_bench simulate --json`: forward bytes per token and
routing FLOPs per token against the number of ranks P, per strategy (AIR once
per probe count m).

usage: plot_layer.py SIMULATE.json OUT_BYTES.png OUT_FLOPS.png

For a weak-scaling run (`simulate` with --tokens-per-rank, the JSON's "mode"
is "weak") the two charts are bytes and messages per rank per step against
P, mean over the sampled ranks, for the dense (alltoallv) and the sparse
(exchange) metering rule.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def air_name(r):
    """air rows by m, and by their request keys where they have them."""
    bits = r.get("request_key_bits", 0)
    return f"air{f'+keys{bits}' if bits else ''} m={r['probes']}"


def series(rows):
    out = {}
    for r in rows:
        name = r["strategy"] if r["strategy"] != "air" else \
            f"{air_name(r)} (recall {r['recall_at_k']:.3f})"
        out.setdefault(name, []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["ranks"])
    return out


def plot_weak(j, out_bytes, out_messages):
    cfg = j["config"]
    title = (f"{cfg['data']}: E={cfg['experts']}, d={cfg['dim']}, {cfg['tokens_per_rank']} "
             f"tokens per rank, k={cfg['k']}, C={cfg['codewords']}; mean over a sample of "
             f"{cfg['sample_ranks']} ranks")
    groups = {}
    for r in j["results"]:
        name = r["strategy"] if r["strategy"] != "air" else air_name(r)
        groups.setdefault((name, r["exchange"]), []).append(r)
    for figure, key, label in ((out_bytes, "bytes_per_rank", "bytes sent per rank per step"),
                               (out_messages, "messages_per_rank",
                                "messages sent per rank per step")):
        fig, ax = plt.subplots(figsize=(8, 5))
        colors = {}
        for (name, exchange), rows in sorted(groups.items()):
            rows.sort(key=lambda r: r["ranks"])
            color = colors.setdefault(name, f"C{len(colors)}")
            ax.plot([r["ranks"] for r in rows], [r[key]["mean"] for r in rows],
                    "--" if exchange == "dense" else "-", color=color, marker="o", markersize=3,
                    label=f"{name}, {exchange}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks P")
        ax.set_ylabel(label + " (forward + backward)")
        ax.set_title(title, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(figure, dpi=110)
    print(f"wrote {out_bytes} and {out_messages}")


def main():
    src, out_bytes, out_flops = sys.argv[1:4]
    with open(src) as f:
        j = json.load(f)
    if j.get("mode") == "weak":
        plot_weak(j, out_bytes, out_flops)
        return
    cfg = j["config"]
    title = (f"{cfg['data']}: E={cfg['experts']}, d={cfg['dim']}, T={cfg['tokens']}, "
             f"k={cfg['k']}, C={cfg['codewords']}, {cfg['placement']} placement")
    groups = series(j["results"])

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rows in groups.items():
        style = "--" if name.startswith("dense") else "-"
        ax.plot([r["ranks"] for r in rows], [r["bytes_per_token_forward"] for r in rows], style,
                marker="o", markersize=4, label=name)
        if name.startswith("air m=4"):
            scoring = [r["bytes"]["requests"] / cfg["tokens"] for r in rows]
            ax.plot([r["ranks"] for r in rows], scoring, ":", color="gray",
                    label="air m=4: scoring requests only")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks P")
    ax.set_ylabel("forward bytes sent per token (all phases)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_bytes, dpi=110)

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rows in groups.items():
        style = "--" if name.startswith("dense") else "-"
        ax.plot([r["ranks"] for r in rows], [r["router_flops_per_token"] / 1e6 for r in rows],
                style, marker="o", markersize=4, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks P")
    ax.set_ylabel("routing MFLOP per token")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_flops, dpi=110)
    print(f"wrote {out_bytes} and {out_flops}")


if __name__ == "__main__":
    main()
