#!/usr/bin/python3
"""A small byte-level MoE language model trained on the English text of
Debian's `fortunes` package, once per router (exact dense top-k, AIR,
product keys), same seed and steps. Writes loss curves (PNG), a table
(Markdown) and every figure (JSON).

The question it answers is the paper's: at equal compute, does AIR match
dense top-k routing's quality, and does it beat product keys?

usage: PYTHONPATH=build/python /usr/bin/python3 examples/lm/moe_lm.py [--steps N] [--out DIR]
"""
import argparse
import glob
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import airmoe

FORTUNES = "/usr/share/games/fortunes"


def load_text():
    files = sorted(f for f in glob.glob(os.path.join(FORTUNES, "*"))
                   if not f.endswith((".dat", ".u8")) and os.path.basename(f) not in ("art", "ascii-art"))
    if not files:
        raise SystemExit(f"no text under {FORTUNES}: install Debian's 'fortunes' package")
    data = b"".join(open(f, "rb").read() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class MoEFFN(nn.Module):
    """E small experts (d -> h -> d, GELU) behind a pluggable router."""

    def __init__(self, router, num_experts, dim, hidden):
        super().__init__()
        self.router = router
        self.w1 = nn.Parameter(torch.randn(num_experts, hidden, dim) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, hidden) / math.sqrt(hidden))
        self.last_input = None

    def forward(self, x):  # x [N, d]
        x = x.contiguous()
        self.last_input = x.detach()
        gates, idx = self.router(x)  # [N, k]
        a = F.gelu(torch.einsum("nkhd,nd->nkh", self.w1[idx], x))
        y = torch.einsum("nkdh,nkh->nkd", self.w2[idx], a)
        return (gates.unsqueeze(-1) * y).sum(1)


class Block(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = ffn

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        B, S, D = x.shape
        return x + self.ffn(self.ln2(x).reshape(B * S, D)).reshape(B, S, D)


class MoELM(nn.Module):
    def __init__(self, make_router, args):
        super().__init__()
        self.embed = nn.Embedding(256, args.dim)
        self.pos = nn.Parameter(torch.randn(args.seq, args.dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(args.dim, args.heads, MoEFFN(make_router(), args.experts, args.dim, args.hidden))
            for _ in range(args.layers))
        self.ln = nn.LayerNorm(args.dim)
        self.head = nn.Linear(args.dim, 256)

    def forward(self, tokens):
        S = tokens.shape[1]
        mask = torch.triu(torch.full((S, S), float("-inf")), diagonal=1)
        x = self.embed(tokens) + self.pos[:S]
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def routers(args):
    n = int(round(math.sqrt(args.experts)))
    E, d, C, m, k = args.experts, args.dim, args.codewords, args.probes, args.k
    return {
        "dense": (lambda: airmoe.DenseRouter(E, d, k, seed=args.seed), 2.0 * E * d),
        "air": (lambda: airmoe.AIRRouter(E, d, k, C, m, seed=args.seed, kmeans_iterations=5,
                                         list_cap=args.list_cap, spills=args.spills,
                                         spill_lambda=args.soar_lambda),
                # probe scores + exact scores on m lists of E / C experts on average
                2.0 * C * d + 2.0 * m * (E / C) * d),
        "product_key": (lambda: airmoe.ProductKeyRouter(n, d, k, seed=args.seed),
                        2.0 * n * d + k * k),
    }


def batches(data, args, gen):
    starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
    x = torch.stack([data[s:s + args.seq] for s in starts])
    y = torch.stack([data[s + 1:s + args.seq + 1] for s in starts])
    return x, y


@torch.no_grad()
def evaluate(model, val, args):
    gen = torch.Generator().manual_seed(1234)  # the same validation batches for every router
    model.eval()
    losses, recalls, masses = [], [], []
    for _ in range(args.eval_batches):
        x, y = batches(val, args, gen)
        logits = model(x)
        losses.append(F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)).item())
        for b in model.blocks:
            r = b.ffn.router
            if isinstance(r, airmoe.AIRRouter):
                h = b.ffn.last_input
                _, idx = r(h)
                all_logits = h @ r.centers.t()
                exact = torch.topk(all_logits, args.k, dim=-1).indices
                recalls.append(airmoe.recall_at_k(idx, exact))
                p = torch.softmax(all_logits, dim=-1)
                masses.append((p.gather(1, idx).sum(1) / p.gather(1, exact).sum(1)).mean().item())
    model.train()
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return mean(losses), mean(recalls), mean(masses)


def update_codebooks(model, step, args):
    """The AIR codebook's schedule: during the first --codebook-warmup steps
    every step is a full Lloyd step (step size 1), so the codebook catches up
    with centers that move fast early on; after that, one EMA step of size
    --codebook-step every --update-every steps."""
    warm = step <= args.codebook_warmup
    if not warm and step % args.update_every != 0:
        return
    for b in model.blocks:
        if isinstance(b.ffn.router, airmoe.AIRRouter):
            b.ffn.router.update_codebook(step=1.0 if warm else args.codebook_step)


def router_centers(router):
    """The router's keys as [E, d] centers (product keys: the n^2 implied ones)."""
    if isinstance(router, airmoe.ProductKeyRouter):
        n = router.subkeys
        return torch.cat([router.keys1.repeat_interleave(n, 0), router.keys2.repeat(n, 1)], 1)
    return router.centers


@torch.no_grad()
def save_router_data(model, name, val, args):
    """Each block's trained router centers and a batch of its router inputs
    (hidden states of validation text), float32 .npy, for
    `airmoe_bench router --centers ... --tokens ...`."""
    import numpy as np
    gen = torch.Generator().manual_seed(4321)
    model.eval()
    inputs = [[] for _ in model.blocks]
    for _ in range(args.save_batches):
        model(batches(val, args, gen)[0])
        for i, b in enumerate(model.blocks):
            inputs[i].append(b.ffn.last_input)
    model.train()
    os.makedirs(args.save_router_data, exist_ok=True)
    for i, b in enumerate(model.blocks):
        stem = os.path.join(args.save_router_data, f"{name}_layer{i}")
        centers = router_centers(b.ffn.router).detach().float().contiguous()
        np.save(stem + "_centers.npy", centers.numpy())
        np.save(stem + "_tokens.npy", torch.cat(inputs[i]).float().contiguous().numpy())
    print(f"[{name}] saved router centers and inputs under {args.save_router_data}", flush=True)


def train(name, make_router, flops, data, val, args):
    torch.manual_seed(args.seed)
    model = MoELM(make_router, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    curve, evals = [], []
    t_train = 0.0
    for step in range(1, args.steps + 1):
        x, y = batches(data, args, gen)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_codebooks(model, step, args)
        t_train += time.perf_counter() - t0
        curve.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            vl, rec, mass = evaluate(model, val, args)
            evals.append({"step": step, "val_loss": vl, "recall_at_k": rec, "mass_recall": mass})
            extra = f" recall@{args.k} {rec:.3f} mass {mass:.3f}" if rec is not None else ""
            print(f"[{name}] step {step}/{args.steps} train {loss.item():.3f} val {vl:.3f}{extra}",
                  flush=True)
    if args.save_router_data:
        save_router_data(model, name, val, args)
    final = evals[-1]
    return {
        "router": name,
        "train_curve": curve,
        "evals": evals,
        "val_loss": final["val_loss"],
        "val_perplexity": math.exp(final["val_loss"]),
        "val_bits_per_byte": final["val_loss"] / math.log(2),
        "router_flops_per_token": flops,
        "tokens_per_s": args.steps * args.batch * args.seq / t_train,
        "recall_at_k": final["recall_at_k"],
        "mass_recall": final["mass_recall"],
    }


def plot(results, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    w = max(1, args.steps // 50)
    for r in results:
        c = r["train_curve"]
        smooth = [sum(c[max(0, i - w + 1):i + 1]) / len(c[max(0, i - w + 1):i + 1]) for i in range(len(c))]
        line, = ax.plot(range(1, len(c) + 1), smooth, label=f"{r['router']} (train, smoothed)")
        ax.plot([e["step"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], "o--",
                color=line.get_color(), label=f"{r['router']} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title(f"byte-level MoE LM on fortunes: E={args.experts}, h={args.hidden}, k={args.k}, "
                 f"d={args.dim}, {args.layers} layers", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4, help="expert hidden size h")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--codewords", type=int, default=64)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--update-every", type=int, default=1, help="AIR codebook update period")
    p.add_argument("--codebook-step", type=float, default=1.0,
                   help="AIR codebook EMA step size per update (1: a Lloyd step)")
    p.add_argument("--codebook-warmup", type=int, default=0,
                   help="AIR: a Lloyd step after every one of the first N steps")
    p.add_argument("--list-cap", type=int, default=0, help="AIR inverted-list cap (0: none)")
    p.add_argument("--spills", type=int, default=0, help="AIR: extra (SOAR) lists per expert")
    p.add_argument("--soar-lambda", type=float, default=1.0, help="AIR: SOAR spill weight")
    p.add_argument("--save-router-data", default="",
                   help="directory: save each router's trained centers and a batch of its "
                        "inputs as <router>_layer<i>_{centers,tokens}.npy")
    p.add_argument("--save-batches", type=int, default=4,
                   help="validation batches of router inputs to save")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--routers", default="dense,air,product_key")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/lm")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    data = load_text()
    cut = int(len(data) * 0.9)
    train_data, val_data = data[:cut], data[cut:]
    print(f"fortunes: {len(data):,} bytes ({cut:,} train, {len(data) - cut:,} validation)")
    table = routers(args)
    results = []
    for name in args.routers.split(","):
        make_router, flops = table[name]
        results.append(train(name, make_router, flops, train_data, val_data, args))

    with open(os.path.join(args.out, "lm_results.json"), "w") as f:
        json.dump({"config": vars(args), "results": results}, f, indent=2)
    lines = ["| router | val loss (nats/byte) | perplexity | bits/byte | routing MFLOP/token "
             "| tokens/s (train) | recall@k | mass recall |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rec = f"{r['recall_at_k']:.3f}" if r["recall_at_k"] is not None else "–"
        mass = f"{r['mass_recall']:.3f}" if r["mass_recall"] is not None else "–"
        lines.append(f"| {r['router']} | {r['val_loss']:.4f} | {r['val_perplexity']:.3f} | "
                     f"{r['val_bits_per_byte']:.3f} | {r['router_flops_per_token'] / 1e6:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {rec} | {mass} |")
    with open(os.path.join(args.out, "lm_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results, args, os.path.join(args.out, "lm_loss.png"))
    print("\n".join(lines))
    print(f"wrote {args.out}/lm_results.json, lm_table.md, lm_loss.png")


if __name__ == "__main__":
    main()
