#!/usr/bin/python3
"""How often a training MoE layer must gather its request keys again.

With request keys (docs/layer.md, "Request keys"), every forward hands the
moved centers to the C++ router: a drift update (each expert's drift since
its key was made, 4 bytes per expert over the ranks) or, once some expert
drifted past its key's own rounding error, a new gather of every key
(E (d + 20) bytes at up to 8 bits). This trains airmoe.MoELayer (one rank,
strategy air) with Adam on a regression task, for each learning rate, and
counts the two; what a step costs in bytes follows from them.

usage: request_keys_drift.py [--experts E] [--dim D] [--steps N]
                             [--lrs 1e-4,1e-3] [--bits 8] --json OUT
"""
import argparse
import json
import sys
import time

import torch

import airmoe


def communicator():
    """MPI.COMM_SELF where airmoe was built with MPI, else None."""
    if not airmoe._airmoe.has_mpi:
        return None
    from mpi4py import MPI
    return MPI.COMM_SELF


def train(args, lr):
    torch.manual_seed(args.seed)
    layer = airmoe.MoELayer(communicator(), args.experts, args.dim, strategy="air", k=args.k,
                            probes=args.probes, hidden=args.hidden, codewords=args.codewords,
                            seed=args.seed, request_key_bits=args.bits)
    teacher = torch.randn(args.dim, args.dim) / args.dim ** 0.5
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    gathers, losses = [], []
    start = time.time()
    for step in range(args.steps):
        x = torch.randn(args.tokens, args.dim)
        loss = (layer(x) - x @ teacher).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        gathers.append(layer.request_key_counts["gathers"])
        if (step + 1) % max(1, args.steps // 4) == 0:
            print(f"[request_keys_drift] lr {lr:g}: step {step + 1}/{args.steps}, loss "
                  f"{losses[-1]:.4f}, gathers {gathers[-1]}", file=sys.stderr, flush=True)
    counts = layer.request_key_counts
    # The forward of step s hands over the centers step s - 1 moved: the
    # first forward finds them as built (no update), every later one updates.
    regathers = counts["gathers"] - 1
    updates = regathers + counts["drift_updates"]
    return {
        "lr": lr,
        "steps": args.steps,
        "center_updates": updates,
        "regathers": regathers,
        "drift_updates": counts["drift_updates"],
        "regather_fraction": regathers / updates if updates else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "gathers_by_step": gathers,
        "seconds": time.time() - start,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--codewords", type=int, default=64)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per step")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lrs", default="1e-4,1e-3,1e-2", help="Adam learning rates")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2")
    lrs = [float(v) for v in args.lrs.split(",")]
    runs = [train(args, lr) for lr in lrs]
    E, d = args.experts, args.dim
    key_bytes = E * (d * (1 if args.bits <= 8 else 2) + 20)
    for r in runs:
        n = r["center_updates"]
        # Bytes a rank receives per center update on P ranks, P large: the
        # drift of every expert, or every key.
        r["bytes_per_update_large_P"] = (r["drift_updates"] * 4 * E + r["regathers"] * key_bytes) / n
    result = {"benchmark": "request_keys_drift", "config": {k: v for k, v in vars(args).items()
                                                             if k != "json"},
              "key_bytes": key_bytes, "runs": runs}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"request keys while training: E={E} d={d} bits={args.bits}, {args.steps} steps of "
          f"{args.tokens} tokens, Adam")
    print(f"{'lr':>8} {'updates':>8} {'regathers':>10} {'fraction':>9} {'loss first':>11} "
          f"{'loss last':>10} {'B/update (large P)':>19}")
    for r in runs:
        print(f"{r['lr']:>8g} {r['center_updates']:>8} {r['regathers']:>10} "
              f"{r['regather_fraction']:>9.3f} {r['loss_first']:>11.4f} {r['loss_last']:>10.4f} "
              f"{r['bytes_per_update_large_P']:>19.0f}")


if __name__ == "__main__":
    main()
