"""Routers on one device, in one process: tokens/s, recall@k and mass recall.

    PYTHONPATH=<build>/python python3 examples/bench_device.py --device cuda \\
        --json bench_device.json

For each shape (default: E = 65,536, d = 512, T = 16,384 and E = 1,048,576,
d = 1,024, T = 16,384; or --experts/--dim/--tokens) it times, on --device:

* AIR (airmoe.AIRRouter) at each m of --probes ("all" = every list: exact),
* the dense router (airmoe.DenseRouter, exact top-k without a [T, E] buffer),
* product keys (airmoe.ProductKeyRouter, n = ceil(sqrt(E)) sub-keys; its own
  keys, so its recall is against its own exact top-k and is 1.0 by
  construction: it is timed, not compared),
* the PyTorch baseline torch.topk(h @ W.T, k) in bfloat16 and float32, or
  "does not fit" when its [T, E] logits (plus top-k's copy) exceed the
  device's free memory, or the attempt runs out of memory.

The routers run in --dtype (bfloat16 by default on CUDA, float32 on the CPU),
forward only (torch.no_grad), the module call as a model makes it
(including its parameter check). Timing: one warm-up call, then --repeat
calls between CUDA events (or a monotonic clock on the CPU), synchronized.
Quality against the exact top-k: the dense router's (every logit, the
project's inner product and tie rule; or, with --skip dense, torch's float32
top-k in token chunks): recall@k = mean |chosen ∩ exact| / k; mass recall =
mean of sum exp(z_chosen) / sum exp(z_exact), logits of the same (dtype-
rounded) values in float64. Data: clustered synthetic keys and tokens (seeded;
--clusters groups on the sphere with noise), as the C++ benchmark's.

Output: a table on stdout and, with --json, every row with its fields.
"""

import argparse
import json
import math
import sys
import time

import torch

import airmoe


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="the routers' dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--experts", type=int, nargs="*", default=None,
                   help="E of each shape (with --dim and --tokens, one value per shape)")
    p.add_argument("--dim", type=int, nargs="*", default=None)
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--codewords", type=int, default=None, help="C (default: recommended)")
    p.add_argument("--probes", default="1,2,4,8,16,all",
                   help="AIR's m values, comma-separated; 'all' = C (exact)")
    p.add_argument("--kmeans-iterations", type=int, default=4)
    p.add_argument("--clusters", type=int, default=None, help="default: E / 64")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated: air, dense, pk, torch")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--check", action="store_true",
                   help="assert: AIR with every list probed has recall 1.0, every field set")
    args = p.parse_args(argv)
    shapes = [(65536, 512, 16384), (1048576, 1024, 16384)]
    if args.experts or args.dim or args.tokens:
        n = len(args.experts or [])
        if not (n and len(args.dim or []) == n and len(args.tokens or []) == n):
            p.error("--experts, --dim and --tokens take one value per shape, all three")
        shapes = list(zip(args.experts, args.dim, args.tokens))
    args.shapes = shapes
    args.device = torch.device(args.device)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    args.torch_dtype = getattr(torch, args.dtype)
    args.skip = set(filter(None, args.skip.split(",")))
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat):
    """(seconds per call, last result): one warm-up, then `repeat` calls."""
    out = fn()
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / repeat, out
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - t0) / repeat, out


def near(dirs, rows, noise, gen):
    """Rows near random unit directions: direction + Gaussian noise of norm ~noise."""
    dev = dirs.device
    pick = torch.randint(dirs.shape[0], (rows,), generator=gen, device=dev)
    d = dirs.shape[1]
    return dirs[pick] + noise * torch.randn(rows, d, generator=gen, device=dev) / math.sqrt(d)


def make_data(E, d, T, args):
    """Generated on the device (seeded there: the GPU's generator differs
    from the CPU's, so the data differ between devices)."""
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    clusters = args.clusters or max(1, E // 64)
    dirs = torch.randn(clusters, d, generator=gen, device=args.device)
    dirs = torch.nn.functional.normalize(dirs, dim=1)
    centers = near(dirs, E, 0.5, gen)
    tokens = near(dirs, T, 0.8, gen)
    # The routers' dtype first: every path sees the same (rounded) values.
    dt = args.torch_dtype
    return centers.to(dt).to(args.device), tokens.to(dt).to(args.device)


def free_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def chunk_rows(T, E, device, elt=4, share=0.25):
    """Tokens per chunk so that a [chunk, E] float32 buffer takes at most a
    quarter of the free memory (the exact reference, never [T, E] at once)."""
    return max(1, min(T, int(free_bytes(device) * share // max(1, E * elt))))


def exact_topk(tokens, keys, k, device):
    """Exact top-k ids and logits of float32 tokens @ keys.T, in chunks."""
    h, w = tokens.float(), keys.float()
    ids, vals = [], []
    step = chunk_rows(h.shape[0], w.shape[0], device)
    for s in range(0, h.shape[0], step):
        z, i = torch.topk(h[s:s + step] @ w.t(), k, dim=-1)
        ids.append(i)
        vals.append(z)
    return torch.cat(ids), torch.cat(vals)


def logits64(tokens, keys, indices):
    """float64 logits of the chosen experts [T, k]."""
    return torch.einsum("td,tkd->tk", tokens.double(), keys[indices.clamp_min(0)].double())


def quality(indices, tokens, keys, exact_ids, exact_z):
    """(recall@k, mass recall) of `indices` against the exact top-k."""
    hits = (indices.unsqueeze(-1) == exact_ids.unsqueeze(-2)).any(-1)
    recall = hits.double().mean().item()
    z_got = logits64(tokens, keys, indices)
    top = exact_z.double().max(1, keepdim=True).values
    num = torch.exp(z_got - top).sum(1)
    den = torch.exp(exact_z.double() - top).sum(1)
    return recall, (num / den).mean().item()


def row(router, shape, T, seconds, **fields):
    out = {"router": router, "experts": shape[0], "dim": shape[1], "tokens": T,
           "seconds": seconds, "tokens_per_s": (T / seconds) if seconds else None}
    out.update(fields)
    return out


def bench_air(args, shape, centers, tokens, exact):
    E, d, T = shape
    t0 = time.perf_counter()
    r = airmoe.AIRRouter(E, d, args.k, args.codewords, 1, centers=centers.float().cpu(),
                         kmeans_iterations=args.kmeans_iterations, seed=args.seed,
                         device=args.device).to(args.torch_dtype)
    r._sync()
    synchronize(args.device)
    build = time.perf_counter() - t0
    C = r.num_codewords
    ms = sorted({C if m == "all" else min(C, int(m)) for m in args.probes.split(",")})
    rows = []
    for m in ms:
        r.probes = m
        with torch.no_grad():
            sec, (_, idx) = timed(lambda: r(tokens), args.device, args.repeat)
            shortlist = r.shortlist_sizes(tokens).double().mean().item()
        recall, mass = quality(idx, tokens, r.centers, *exact)
        rows.append(row("air", shape, T, sec, m=m, codewords=C, recall=recall,
                        mass_recall=mass, shortlist=shortlist, build_seconds=build,
                        dtype=args.dtype, exact=(m == C)))
    return rows


def bench_dense(args, shape, centers, tokens):
    """The dense router's row and its routes: the exact top-k (ids, logits)."""
    E, d, T = shape
    r = airmoe.DenseRouter(E, d, args.k, centers=centers.float().cpu()).to(args.device,
                                                                          args.torch_dtype)
    with torch.no_grad():
        sec, (_, idx) = timed(lambda: r(tokens), args.device, args.repeat)
    exact = (idx, logits64(tokens, centers, idx))
    recall, mass = quality(idx, tokens, centers, *exact)
    return [row("dense", shape, T, sec, recall=recall, mass_recall=mass, dtype=args.dtype)], exact


def bench_pk(args, shape, tokens):
    E, d, T = shape
    n = math.isqrt(E - 1) + 1
    r = airmoe.ProductKeyRouter(n, d, args.k, seed=args.seed).to(args.device, args.torch_dtype)
    with torch.no_grad():
        sec, (_, idx) = timed(lambda: r(tokens), args.device, args.repeat)
    # Its own exact top-k over the n^2 sums (recall 1.0 by construction).
    return [row("product_keys", shape, T, sec, experts_pk=n * n, subkeys=n, dtype=args.dtype,
                recall=1.0, mass_recall=1.0, note="own keys; exact by construction")]


def bench_torch(args, shape, centers, tokens, exact, dtype):
    E, d, T = shape
    name = f"torch.topk(h @ W.T) {str(dtype).replace('torch.', '')}"
    elt = torch.finfo(dtype).bits // 8
    need = T * E * elt * 2  # the logits and top-k's working copy
    free = free_bytes(args.device)
    base = {"dtype": str(dtype).replace("torch.", ""), "logits_bytes": T * E * elt,
            "free_bytes": free}
    if need > free:
        return [row(name, shape, T, None, fits=False,
                    note=f"[T, E] logits need ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB "
                         "free", **base)]
    h, w = tokens.to(dtype), centers.to(dtype)
    try:
        with torch.no_grad():
            sec, (_, idx) = timed(lambda: torch.topk(h @ w.t(), args.k, dim=-1), args.device,
                                  args.repeat)
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
        if "out of memory" not in str(e):
            raise
        torch.cuda.empty_cache() if args.device.type == "cuda" else None
        return [row(name, shape, T, None, fits=False, note=f"out of memory: {e}"[:200], **base)]
    recall, mass = quality(idx, tokens, centers, *exact)
    return [row(name, shape, T, sec, fits=True, recall=recall, mass_recall=mass, **base)]


def bench_shape(args, shape):
    E, d, T = shape
    centers, tokens = make_data(E, d, T, args)
    rows = []
    if "dense" not in args.skip:
        rows, exact = bench_dense(args, shape, centers, tokens)
    else:
        ids, _ = exact_topk(tokens, centers, args.k, args.device)
        exact = (ids, logits64(tokens, centers, ids))
    if "air" not in args.skip:
        rows += bench_air(args, shape, centers, tokens, exact)
    if "pk" not in args.skip:
        rows += bench_pk(args, shape, tokens)
    if "torch" not in args.skip:
        for dtype in (torch.bfloat16, torch.float32):
            rows += bench_torch(args, shape, centers, tokens, exact, dtype)
    return rows


def print_table(rows):
    head = f"{'router':<26} {'E':>9} {'d':>5} {'T':>6} {'m':>4} {'tokens/s':>12} " \
           f"{'recall@k':>9} {'mass':>7}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        tps = f"{r['tokens_per_s']:.4g}" if r.get("tokens_per_s") else "-"
        rec = f"{r['recall']:.4f}" if r.get("recall") is not None else "-"
        mass = f"{r['mass_recall']:.4f}" if r.get("mass_recall") is not None else "-"
        print(f"{r['router']:<26} {r['experts']:>9} {r['dim']:>5} {r['tokens']:>6} "
              f"{r.get('m', ''):>4} {tps:>12} {rec:>9} {mass:>7}  {r.get('note', '')}")


def check(rows):
    """What the smoke test asserts: fields present, exact AIR exact."""
    need = {"router", "experts", "dim", "tokens", "seconds", "tokens_per_s"}
    for r in rows:
        missing = need - r.keys()
        assert not missing, f"row {r['router']} lacks {missing}"
        if r.get("fits", True):
            assert r["tokens_per_s"] and r["tokens_per_s"] > 0, r
            assert 0.0 <= r["recall"] <= 1.0 and 0.0 < r["mass_recall"] <= 1.0 + 1e-9, r
    exact = [r for r in rows if r["router"] == "air" and r["exact"]]
    assert exact, "no AIR row with every list probed"
    for r in exact:
        assert r["recall"] == 1.0, f"AIR with every list probed: recall {r['recall']}"
    dense = [r for r in rows if r["router"] == "dense"]
    for r in dense:
        assert r["recall"] == 1.0, f"dense router: recall {r['recall']}"
    routers = {r["router"] for r in rows}
    for name in ("air", "dense", "product_keys", "torch.topk(h @ W.T) bfloat16",
                 "torch.topk(h @ W.T) float32"):
        assert name in routers, f"no {name} row"


def main(argv=None):
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_device: {args.device} requested but torch has no CUDA device",
              file=sys.stderr)
        return 2
    meta = {"device": str(args.device), "dtype": args.dtype, "k": args.k,
            "repeat": args.repeat, "kmeans_iterations": args.kmeans_iterations,
            "torch": torch.__version__, "backends": airmoe._airmoe.backends(),
            "device_name": (torch.cuda.get_device_name(args.device)
                            if args.device.type == "cuda" else "cpu")}
    rows = []
    for shape in args.shapes:
        rows += bench_shape(args, shape)
        print_table([r for r in rows if (r["experts"], r["dim"]) == shape[:2]])
        sys.stdout.flush()
        if args.json:  # after every shape: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.json:
        print(f"wrote {args.json}")
    if args.check:
        check(rows)
        print("bench_device: checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
