#!/usr/bin/python3
"""Runs an MPMD launch of `airmoe_bench` whose two ranks disagree on one
option (or on the subcommand, or on the contents of --centers), under a
timeout, and checks that it fails on every rank with a message naming the
rank and the difference, instead of deadlocking or finishing with
inconsistent figures (issue 13).

usage: check_bench_mismatch.py AIRMOE_BENCH MPIEXEC WORKDIR CASE
"""
import os
import re
import signal
import subprocess
import sys

import numpy as np

BASE = {"-E": "256", "-d": "16", "-T": "64", "-C": "16", "--threads": "1", "--repeats": "1"}

# case: (rank 0's subcommand, rank 1's subcommand, rank 1's changed options,
#        what the message must say about rank 1)
CASES = {
    "repeats": ("layer", "layer", {"--repeats": "3"}, r"--repeats 3 vs 1"),
    "tokens": ("layer", "layer", {"-T": "32"}, r"--num-tokens 32 vs 64"),
    "preset": ("layer", "layer", {"--preset": "hard"}, r"--preset hard vs default"),
    "seed": ("layer", "layer", {"--seed": "5"}, r"--seed 5 vs 42"),
    "placement": ("layer", "layer", {"--placement": "list"}, r"--placement list vs locality"),
    "dim": ("layer", "layer", {"-d": "8"}, r"--dim 8 vs 16"),
    "codewords": ("layer", "layer", {"-C": "8"}, r"--codewords 8 vs 16"),
    # Same file names, other contents: each rank runs in its own directory.
    "centers": ("layer", "layer", {}, r"--centers contents \d+ vs \d+"),
    "traffic_repeats": ("traffic", "traffic", {"--repeats": "3"}, r"--repeats 3 vs 1"),
    "traffic_layer": ("traffic", "layer", {}, r"subcommand layer vs traffic"),
}


def write_data(work, rank):
    """centers.npy / tokens.npy in WORKDIR/rankR, different on each rank."""
    folder = os.path.join(work, f"rank{rank}")
    os.makedirs(folder, exist_ok=True)
    gen = np.random.default_rng(rank)
    for name, rows in (("centers", 256), ("tokens", 64)):
        np.save(os.path.join(folder, name + ".npy"), gen.standard_normal((rows, 16), np.float32))
    return folder


def command(bench, mpiexec, work, case):
    sub0, sub1, changed, _ = CASES[case]
    cmd = [mpiexec, "--oversubscribe", "--allow-run-as-root"]
    for rank, (sub, opts) in enumerate(((sub0, BASE), (sub1, {**BASE, **changed}))):
        args = [a for kv in opts.items() for a in kv]
        if case == "centers":
            cmd += ["-wdir", write_data(work, rank)]
            args += ["--centers", "centers.npy", "--tokens", "tokens.npy"]
        cmd += ["-n", "1", bench, sub] + args + ([":"] if rank == 0 else [])
    return cmd


def main():
    bench, mpiexec, work, case = sys.argv[1:5]
    os.makedirs(work, exist_ok=True)
    cmd = command(os.path.abspath(bench), mpiexec, os.path.abspath(work), case)
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env, start_new_session=True)
    try:
        out, _ = job.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # mpiexec and both ranks
        out, _ = job.communicate()
        print(out)
        sys.exit(f"check_bench_mismatch {case}: FAIL: hung (no exit within 120 s)")
    print(out)
    problems = []
    if job.returncode == 0:
        problems.append("exit status 0, expected a failure")
    want = CASES[case][3]
    for rank in (0, 1):
        if not re.search(rf"rank {rank}: error: configuration mismatch .*rank 1: .*{want}", out):
            problems.append(f"rank {rank} did not report the mismatch '{want}'")
    if problems:
        sys.exit(f"check_bench_mismatch {case}: FAIL: " + "; ".join(problems))
    print(f"check_bench_mismatch {case}: ok")


if __name__ == "__main__":
    main()
