"""One rank's error in airmoe.MoELayer, under mpiexec -n 2: it is raised on
every rank together (the ranks stay in step and can go on), or, where one
rank meets it alone in the middle of a collective, the job is aborted with a
message naming the rank. Never a hang (issue 13).

    python3 layer_mpi_errors.py CASE --mpiexec MPIEXEC [--timeout S]

launches `MPIEXEC -n 2 python3 layer_mpi_errors.py CASE --rank` under a
timeout and checks its exit status and every rank's message; it prints
"layer_mpi_errors CASE: ok" or exits nonzero with what went wrong. CTest runs
one entry per case (python_layer_mpi_error_CASE).
"""

import argparse
import os
import re
import signal
import subprocess
import sys

E, D, T = 256, 16, 32

# case: (what rank 1 does wrong, the message fragment every rank must report,
#        whether the job is aborted rather than raised together)
CASES = {
    "wrong_dim": ("hidden with 17 columns", r"hidden has 17 columns, expected 16", False),
    "wrong_dtype": ("float64 hidden", r"float32", False),
    "wrong_strides": ("a transposed (strided) hidden", r"not contiguous", False),
    "nan_centers": ("NaN centers", r"centers row 5 column 2 is nan", False),
    # Finite tokens whose logits would overflow (and so give NaN gates) are
    # refused on their home rank before any data moves, on every rank together.
    "nan_gate": ("finite tokens whose logits overflow float32", r"logits overflow float32", False),
}


def rank_body(case):
    import torch
    from mpi4py import MPI

    import airmoe

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    bad = rank == 1

    def build(centers=None):
        return airmoe.MoELayer(world, E, D, strategy="air", k=4, probes=2, hidden=8,
                               codewords=16, seed=3, centers=centers)

    def report(step, fn):
        try:
            fn()
            print(f"rank {rank}: {step}: no error", flush=True)
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            print(f"rank {rank}: {step}: {type(e).__name__}: {e}", flush=True)

    torch.manual_seed(rank)
    if case == "nan_centers":
        centers = torch.randn(E, D, generator=torch.Generator().manual_seed(3)) / 4
        if bad:
            centers[5, 2] = float("nan")
        report("build", lambda: build(centers))
    else:
        layer = build()
        x = torch.randn(T, D)
        if case == "wrong_dim" and bad:
            x = torch.randn(T, D + 1)
        elif case == "wrong_dtype" and bad:
            x = x.double()
        elif case == "wrong_strides" and bad:
            x = torch.randn(D, T).t()
        elif case == "nan_gate" and bad:
            # One finite token whose logits would overflow float32 (its gates
            # would be NaN): refused on rank 1, every rank raising together.
            x[9] = x[9] / x[9].abs().max() * 3e38
        report("forward", lambda: layer(x).sum().backward())
        # Raised together, the ranks are still in step: the next call works.
        report("next forward", lambda: layer(torch.randn(T, D)).sum().backward())
    world.Barrier()


def check(case, mpiexec, timeout):
    what, message, aborts = CASES[case]
    cmd = [mpiexec, "-n", "2", "--oversubscribe", "--allow-run-as-root", sys.executable,
           __file__, case, "--rank"]
    # Its own process group, so that a hung job is ended whole (mpiexec and
    # its ranks), leaving nothing behind.
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        out, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, _ = job.communicate()
        return [f"hung: no exit within {timeout} s ({what} on rank 1)\n{out}"]
    problems = []
    if aborts:
        if job.returncode == 0:
            problems.append("exit status 0, expected the job to be aborted")
        if not re.search(r"airmoe\.MoELayer\.\w+: rank \d: .*" + message, out):
            problems.append(f"no abort message naming the rank and '{message}'")
        if "aborting the job" not in out:
            problems.append("no 'aborting the job' message")
    else:
        if job.returncode != 0:
            problems.append(f"exit status {job.returncode}, expected 0")
        step = "build" if case == "nan_centers" else "forward"
        for rank in (0, 1):
            # Rank 1 raises its own error; rank 0 a ValueError naming rank 1.
            peer = "" if rank == 1 else r".*rank 1: "
            if not re.search(rf"rank {rank}: {step}: \w+Error: {peer}.*{message}", out):
                problems.append(f"rank {rank} did not report '{message}' from its {step}")
            if step == "forward" and f"rank {rank}: next forward: no error" not in out:
                problems.append(f"rank {rank}: the next forward after the error failed")
    return [p + "\n--- output ---\n" + out for p in problems[:1]] + problems[1:]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--rank", action="store_true", help="run as one rank (under mpiexec)")
    parser.add_argument("--mpiexec", default="mpiexec")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    if args.rank:
        rank_body(args.case)
        return 0
    problems = check(args.case, args.mpiexec, args.timeout)
    for p in problems:
        print(f"layer_mpi_errors {args.case}: FAIL: {p}")
    if not problems:
        print(f"layer_mpi_errors {args.case}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
