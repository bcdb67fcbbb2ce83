"""The baselines a user would pick instead of AIR, timed on airmoe_bench
router's own data (it runs this script; see docs/routing.md).

    bench_baselines.py DATA_DIR --k 8 --probes 1,2,4 --threads 2 --repeats 3

DATA_DIR holds what the benchmark wrote: tokens.npy [T, d], centers.npy
[E, d], codewords.npy [C, d] (AIR's codebook) and assignment.npy [E, 1]
(AIR's list of each expert), all float32 but the int32 assignment, and
optionally bias.npy [E, 1] (a selection bias: the torch rows select by
h @ W.T + b; the FAISS rows are skipped, its scan has no bias). It times,
with --threads threads and the best of --repeats runs after one warm-up:

* torch_f32, torch_bf16: torch.topk(h @ W.T, k) in float32 and bfloat16, in
  token chunks when the [T, E] logits would take more than a quarter of the
  free memory;
* faiss_cpu at each m of --probes: PyPI's faiss-cpu (the build for this CPU)
  IndexIVFFlat with inner product, AIR's codewords as the quantizer,
  AIR's lists as its inverted lists, nprobe = m: the same lists AIR scans.

It writes DATA_DIR/baselines.json: {"meta": {...}, "rows": [{"router",
"probes", "seconds", "note", "experts"}]} with each row's chosen experts as
the raw file DATA_DIR/<experts> (little-endian int32 [T, k], C order; -1
where FAISS found fewer than k), which the benchmark scores against its
exact top-k. A missing package gives its
rows with seconds null and note "not installed: ..." instead of failing.
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def threads_text(n):
    return f"{n} thread" + ("" if n == 1 else "s")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="the folder airmoe_bench router wrote")
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--probes", required=True, help="m values, comma-separated")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def best_seconds(fn, repeats):
    """(best seconds of `repeats` timed calls after one warm-up, the result)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def free_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Rows:
    """The rows and their experts files, in the data folder."""

    def __init__(self, folder):
        self.folder, self.rows = folder, []

    def add(self, router, probes, seconds, note, experts=None):
        row = {"router": router, "probes": probes, "seconds": seconds, "note": note,
               "experts": None}
        if experts is not None:
            row["experts"] = f"{router}_m{probes}.i32" if probes else f"{router}.i32"
            np.ascontiguousarray(experts, dtype="<i4").tofile(os.path.join(self.folder,
                                                                            row["experts"]))
        self.rows.append(row)


def torch_rows(rows, data, args, meta):
    try:
        import torch
    except ImportError as e:
        for name in ("torch_f32", "torch_bf16"):
            rows.add(name, 0, None, f"not installed: torch ({e})")
        return
    torch.set_num_threads(args.threads)
    meta["torch"] = torch.__version__
    meta["torch_threads"] = torch.get_num_threads()
    h32, w32 = torch.from_numpy(data["tokens"]), torch.from_numpy(data["centers"])
    bias = torch.from_numpy(data["bias"]).reshape(1, -1) if "bias" in data else None
    T, E = h32.shape[0], w32.shape[0]
    for name, dtype in (("torch_f32", torch.float32), ("torch_bf16", torch.bfloat16)):
        h, w = h32.to(dtype), w32.to(dtype)
        elt = torch.finfo(dtype).bits // 8
        # The logits and top-k's working copy of one chunk: a quarter of
        # the free memory at most.
        step = max(1, min(T, free_bytes() // 4 // max(1, 2 * E * elt)))

        def route():
            with torch.no_grad():
                parts = []
                for s in range(0, T, step):
                    z = h[s:s + step] @ w.t()
                    if bias is not None:
                        z = z + bias.to(dtype)
                    parts.append(torch.topk(z, args.k, dim=-1).indices)
                return torch.cat(parts)

        seconds, ids = best_seconds(route, args.repeats)
        chunks = (T + step - 1) // step
        note = f"torch {torch.__version__}, {threads_text(torch.get_num_threads())}"
        if chunks > 1:
            note += f", {chunks} chunks of {step} tokens"
        rows.add(name, 0, seconds, note, ids.numpy())


def faiss_build_name(faiss):
    """The faiss module the loader picked (swigfaiss_avx512 / _avx2 / generic):
    faiss-cpu 1.8.0's get_compile_options() says AVX2 in its AVX-512 build
    too, so the module is the reliable name."""
    loaded = [m.split(".")[-1] for m in sys.modules if m.startswith("faiss.swigfaiss")]
    return ",".join(sorted(loaded)) or "unknown"


def faiss_rows(rows, data, args, probes, meta):
    if "bias" in data:
        for m in probes:
            rows.add("faiss_cpu", m, None, "skipped: FAISS's IVF scan has no selection bias")
        return
    try:
        import faiss
        from faiss.contrib.ivf_tools import add_preassigned
    except ImportError as e:
        for m in probes:
            rows.add("faiss_cpu", m, None,
                     f"not installed: faiss-cpu ({e}; scripts/install-deps.sh installs it)")
        return
    faiss.omp_set_num_threads(args.threads)
    build = faiss_build_name(faiss)
    meta.update(faiss=faiss.__version__, faiss_module=build,
                faiss_compile_options=faiss.get_compile_options())
    codewords, centers = data["codewords"], data["centers"]
    d = centers.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(codewords)
    index = faiss.IndexIVFFlat(quantizer, d, codewords.shape[0], faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    add_preassigned(index, centers, data["assignment"].reshape(-1).astype(np.int64))
    for m in probes:
        index.nprobe = m
        seconds, (_, ids) = best_seconds(lambda: index.search(data["tokens"], args.k),
                                         args.repeats)
        rows.add("faiss_cpu", m, seconds,
                 f"faiss-cpu {faiss.__version__} ({build}), {threads_text(faiss.omp_get_max_threads())}",
                 ids)


def main(argv=None):
    args = parse_args(argv)
    probes = [int(m) for m in args.probes.split(",") if m]
    data = {name: np.load(os.path.join(args.data, f"{name}.npy"))
            for name in ("tokens", "centers", "codewords", "assignment", "bias")
            if os.path.exists(os.path.join(args.data, f"{name}.npy"))}
    meta = {"python": sys.version.split()[0], "numpy": np.__version__,
            "threads": args.threads, "repeats": args.repeats}
    rows = Rows(args.data)
    torch_rows(rows, data, args, meta)
    faiss_rows(rows, data, args, probes, meta)
    with open(os.path.join(args.data, "baselines.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows.rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
