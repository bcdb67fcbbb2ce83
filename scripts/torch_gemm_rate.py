#!/usr/bin/python3
"""GFLOP/s of PyTorch's `a @ b.T` in bf16 and f32 on the block whose rate
`airmoe_bench router` prints for its scoring kernel ([rows, d] x [d, E]):
the GEMM a PyTorch user gets on this CPU (oneDNN; AMX where present), the
reference of docs/routing.md's bf16 figures. Needs Debian's python3 with
torch (/usr/bin/python3).

usage: /usr/bin/python3 scripts/torch_gemm_rate.py [-E 65536] [-d 512]
       [--rows 384] [--threads 1] [--repeats 5]
"""
import argparse
import time

import torch


def rate(a, b, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - start)
    return 2.0 * a.shape[0] * b.shape[0] * a.shape[1] / best / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-E", "--experts", type=int, default=65536)
    p.add_argument("-d", "--dim", type=int, default=512)
    p.add_argument("--rows", type=int, default=384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    for name, value in vars(args).items():
        if value < 1:
            p.error(f"--{name} = {value} must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    a = torch.randn(args.rows, args.dim)
    b = torch.randn(args.experts, args.dim)
    shape = f"[{args.rows} x {args.dim}] x [{args.dim} x {args.experts}]"
    for dtype in (torch.bfloat16, torch.float32):
        gflops = rate(a.to(dtype), b.to(dtype), args.repeats)
        print(f"torch {torch.__version__} {dtype} a @ b.T {shape}, "
              f"{torch.get_num_threads()} threads: {gflops:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
