#!/usr/bin/python3
"""What request keys cost and save while a MoE layer trains.

With request keys (docs/layer.md, "Request keys"), every forward hands the
moved centers to the C++ router: a drift update (each expert's drift since
its key was made, 4 bytes per expert over the ranks) or, once some expert
drifted past its key's own rounding error, a new gather of every key
(E (d + 20) bytes at up to 8 bits). This trains airmoe.MoELayer (strategy
air) with Adam on a regression task, for each learning rate with and
without keys, and reports how often the keys were gathered again and, from
the communicator's meter, the bytes a rank sent per step by phase.

Run it on one rank (python3 ...) or several (mpiexec -n P python3 ...):
each rank trains on its own tokens; rank 0 writes the JSON.

usage: request_keys_drift.py [--experts E] [--dim D] [--steps N]
                             [--lrs 1e-4,1e-3] [--bits 8] --json OUT
"""
import argparse
import json
import sys
import time

import torch

import airmoe

# The meter's phases, grouped for the report.
GROUPS = {
    "scoring": ("requests", "replies"),
    "keys": ("request_keys",),
    "experts": ("dispatch", "combine", "grad_dispatch", "grad_gates", "grad_logits",
                "grad_combine"),
}


def communicator():
    """MPI.COMM_WORLD where airmoe was built with MPI, else None (one rank)."""
    if not airmoe._airmoe.has_mpi:
        return None
    from mpi4py import MPI
    return MPI.COMM_WORLD


def group_of(phase):
    base = phase.split(":")[0]
    for group, phases in GROUPS.items():
        if base in phases:
            return group
    return "other"


def mean_over_ranks(comm, value):
    return value if comm is None else comm.allreduce(value) / comm.Get_size()


def train(args, comm, lr, bits):
    rank = 0 if comm is None else comm.Get_rank()
    torch.manual_seed(args.seed)
    layer = airmoe.MoELayer(comm, args.experts, args.dim, strategy="air", k=args.k,
                            probes=args.probes, hidden=args.hidden, codewords=args.codewords,
                            seed=args.seed, request_key_bits=bits)
    teacher = torch.randn(args.dim, args.dim) / args.dim ** 0.5
    tokens = torch.Generator().manual_seed(args.seed + 1 + rank)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    gathers, losses = [], []
    start = time.time()
    layer.reset_traffic()
    for step in range(args.steps):
        x = torch.randn(args.tokens, args.dim, generator=tokens)
        loss = (layer(x) - x @ teacher).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        gathers.append(layer.request_key_counts["gathers"])
        if rank == 0 and (step + 1) % max(1, args.steps // 4) == 0:
            print(f"[request_keys_drift] lr {lr:g} bits {bits}: step {step + 1}/{args.steps}, "
                  f"loss {losses[-1]:.4f}, gathers {gathers[-1]}", file=sys.stderr, flush=True)
    sent = layer.traffic()
    per_step = {g: 0.0 for g in (*GROUPS, "other")}
    for phase, c in sent.items():
        per_step[group_of(phase)] += c["bytes"] / args.steps
    per_step = {g: mean_over_ranks(comm, v) for g, v in per_step.items()}
    counts = layer.request_key_counts
    # The forward of step s hands over the centers step s - 1 moved: the
    # first forward finds them as built (no update), every later one updates.
    regathers = max(0, counts["gathers"] - 1)
    updates = regathers + counts["drift_updates"]
    return {
        "lr": lr,
        "bits": bits,
        "steps": args.steps,
        "center_updates": updates,
        "regathers": regathers,
        "drift_updates": counts["drift_updates"],
        "regather_fraction": regathers / updates if updates else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "gathers_by_step": gathers,
        "bytes_per_step_per_rank": per_step,
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
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lrs", default="1e-4,1e-3,1e-2", help="Adam learning rates")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--without-keys", action="store_true",
                    help="also train each lr without keys (the bytes to compare with)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2")
    comm = communicator()
    ranks = 1 if comm is None else comm.Get_size()
    lrs = [float(v) for v in args.lrs.split(",")]
    runs = []
    for lr in lrs:
        for bits in ([0] if args.without_keys else []) + [args.bits]:
            runs.append(train(args, comm, lr, bits))
    if comm is not None and comm.Get_rank() != 0:
        return
    E, d = args.experts, args.dim
    result = {"benchmark": "request_keys_drift", "ranks": ranks,
              "config": {k: v for k, v in vars(args).items() if k != "json"},
              "key_bytes": E * (d * (1 if args.bits <= 8 else 2) + 20), "runs": runs}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"request keys while training: {ranks} rank(s), E={E} d={d} C={args.codewords} "
          f"m={args.probes} k={args.k}, {args.steps} steps of {args.tokens} tokens per rank, "
          f"Adam")
    print(f"{'lr':>8} {'bits':>4} {'updates':>8} {'regathers':>10} {'loss last':>10} "
          f"{'B/step/rank: scoring':>21} {'keys':>10} {'experts':>10} {'other':>10}")
    for r in runs:
        b = r["bytes_per_step_per_rank"]
        print(f"{r['lr']:>8g} {r['bits']:>4} {r['center_updates']:>8} {r['regathers']:>10} "
              f"{r['loss_last']:>10.4f} {b['scoring']:>21.0f} {b['keys']:>10.0f} "
              f"{b['experts']:>10.0f} {b['other']:>10.0f}")


if __name__ == "__main__":
    main()
