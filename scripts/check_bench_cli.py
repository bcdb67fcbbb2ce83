#!/usr/bin/python3
"""Runs airmoe_bench with bad command lines and checks each one fails fast
with a non-zero exit and a message naming the option and the bad value
(issue 13: crashes, stalls, silent defaults and ignored output paths).

usage: check_bench_cli.py AIRMOE_BENCH MPIEXEC WORKDIR
"""
import os
import struct
import subprocess
import sys

SHAPE = ["-E", "256", "-d", "16", "-T", "64", "-C", "16", "--repeats", "1"]
SMALL = SHAPE + ["--threads", "1"]
MISSING = "/nonexistent/dir/out"


def npy(path, header_dict, data=b""):
    """A hand-made .npy file: version 1.0, header padded to 64 bytes."""
    header = header_dict.encode()
    pad = (64 - (10 + len(header) + 1) % 64) % 64
    header += b" " * pad + b"\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data)


def main():
    bench, mpiexec, work = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(work, exist_ok=True)
    zero_cols = os.path.join(work, "zero_cols.npy")
    npy(zero_cols, "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000000000, 0), }")
    good = os.path.join(work, "good.npy")
    npy(good, "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2), }", b"\0" * 32)
    mpi = [mpiexec, "--allow-run-as-root", "--oversubscribe", "-n", "1", bench]

    # (command, text the error must contain, text stderr must not contain)
    cases = [
        ([bench, "router", *SMALL, "-m", "0"], "-m/--probes: 0 must be >= 1", None),
        ([bench, "router", *SMALL, "-m", "2,-3"], "-m/--probes: -3 must be >= 1", None),
        ([bench, "router", *SMALL, "-m", "2,x"], "-m/--probes: 'x' is not an integer", None),
        ([bench, "router", "-E", "256", "-d", "16", "-T", "0", "-C", "16", "--repeats", "1"],
         "-T/--num-tokens = 0", None),
        ([bench, "router", *SHAPE, "--threads", "100000"],
         "--threads = 100000 is outside [0, 1024]", None),
        ([bench, "router", *SHAPE, "--threads", "30000"], "--threads = 30000", None),
        ([bench, "router", *SHAPE, "--threads", "-1"], "--threads = -1 is outside [0, 1024]", None),
        ([bench, "router", *SMALL, "--json", MISSING + ".json"],
         "--json " + MISSING + ".json: cannot open for writing: No such file or directory",
         "training the codebook"),
        ([bench, "router", "-E", "2147483648", "-d", "1", "-T", "64", "-C", "16", "--repeats", "1"],
         "-E/--experts = 2147483648 is too many: expert ids are 32-bit", "generating"),
        ([bench, "router", "--centers", zero_cols, "--tokens", good], "has no columns", None),
        ([bench, "simulate", *SMALL, "--hidden", "0"], "--hidden = 0 is outside", None),
        ([bench, "simulate", *SMALL, "--hidden", "-5"], "--hidden = -5 is outside", None),
        ([bench, "simulate", *SMALL, "-P", "2,x"], "-P/--ranks: 'x' is not an integer", None),
        ([bench, "simulate", *SMALL, "-m", "abc"], "-m/--probes: 'abc' is not an integer", None),
        ([bench, "simulate", *SMALL, "-m", "0"], "-m/--probes: 0 is outside [1, 16]", None),
        ([bench, "simulate", *SMALL, "-P", "2147483647"],
         "-P/--ranks: 2147483647 is outside [1, 65536]", None),
        ([bench, "simulate", *SMALL, "-P", "2", "--csv", MISSING + ".csv"],
         "--csv " + MISSING + ".csv: cannot open for writing", "preparing data"),
        ([bench, "simulate", *SMALL, "-P", "2", "--json", MISSING + ".json"],
         "--json " + MISSING + ".json: cannot open for writing", "preparing data"),
        ([*mpi, "traffic", *SMALL, "-m", "0"], "-m/--probes = 0 is outside [1, 16]", None),
        ([*mpi, "traffic", *SMALL, "-m", "-2"], "-m/--probes = -2 is outside [1, 16]", None),
        ([*mpi, "traffic", *SHAPE, "--threads", "100000"], "--threads = 100000", None),
        ([*mpi, "traffic", *SMALL, "--json", MISSING + ".json"],
         "--json " + MISSING + ".json: cannot open for writing", "preparing"),
        ([*mpi, "layer", *SMALL, "-m", "0"], "-m/--probes = 0 is outside [1, 16]", None),
        ([*mpi, "layer", *SMALL, "--hidden", "0"], "--hidden = 0 is outside", None),
        ([*mpi, "layer", *SMALL, "--csv", MISSING + ".csv"],
         "--csv " + MISSING + ".csv: cannot open for writing", "preparing"),
        ([*mpi, "layer", *SMALL, "--json", MISSING + ".json"],
         "--json " + MISSING + ".json: cannot open for writing", "preparing"),
    ]
    failed = 0
    for cmd, needle, absent in cases:
        shown = " ".join(cmd)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            print(f"FAIL (hung > 120 s): {shown}")
            failed += 1
            continue
        problems = []
        if p.returncode == 0:
            problems.append("exit status 0")
        if p.returncode < 0:
            problems.append(f"killed by signal {-p.returncode}")
        if needle not in p.stderr:
            problems.append(f"stderr lacks {needle!r}")
        if absent and absent in p.stderr:
            problems.append(f"the run started ({absent!r}) before the error")
        if problems:
            failed += 1
            print(f"FAIL: {shown}\n  " + "; ".join(problems) + f"\n  stderr: {p.stderr[-600:]}")
        else:
            print(f"ok: {shown}")

    # The help states the bounds.
    for sub in ("router", "simulate"):
        h = subprocess.run([bench, sub, "--help"], capture_output=True, text=True).stdout
        for needle in ["1..1024"] + (["[1, 65536]"] if sub == "simulate" else []):
            if needle not in h:
                failed += 1
                print(f"FAIL: {sub} --help lacks {needle!r}")
    print(f"{len(cases)} command lines checked, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
