#!/usr/bin/python3
"""Runs airmoe_bench with bad command lines and checks each one fails fast
with a non-zero exit and a message naming the option and the bad value
(issue 13: crashes, stalls, silent defaults and ignored output paths; issue
17: option values, output paths, edge shapes). Then:
  - result files (--json, --csv) are never truncated by a run that fails or
    is interrupted, are replaced whole by one that succeeds, leave no
    temporary behind, and never overwrite an input;
  - edge shapes (ranks without experts, no dense-replicated row, P = 1,
    E < 16) print "-" (JSON null) for a figure that does not exist, never a
    made-up number;
  - every default the docs state as "`SUBCOMMAND --option X` (default V)"
    is the one `SUBCOMMAND --help` shows.

usage: check_bench_cli.py AIRMOE_BENCH MPIEXEC WORKDIR
"""
import glob
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")

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


def floats(path, rows, cols, seed):
    """A float32 .npy [rows, cols] of seeded values in [-0.5, 0.5)."""
    values, state = [], seed
    for _ in range(rows * cols):
        state = (state * 1103515245 + 12345) % 2**31
        values.append(state / 2**31 - 0.5)
    npy(path, f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}",
        struct.pack(f"<{rows * cols}f", *values))


def run(cmd, timeout=120):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def error_cases(bench, mpi, work):
    """(command, text the error must contain, text stderr must not contain)."""
    zero_cols = os.path.join(work, "zero_cols.npy")
    npy(zero_cols, "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000000000, 0), }")
    good = os.path.join(work, "good.npy")
    npy(good, "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2), }", b"\0" * 32)
    short_bias, nan_bias = os.path.join(work, "short_bias.npy"), os.path.join(work, "nan_bias.npy")
    floats(short_bias, 3, 1, 5)
    npy(nan_bias, "{'descr': '<f4', 'fortran_order': False, 'shape': (256, 1), }",
        struct.pack("<256f", 0.0, float("nan"), *([0.0] * 254)))
    sim_centers, sim_tokens = os.path.join(work, "sim_c.npy"), os.path.join(work, "sim_t.npy")
    floats(sim_centers, 64, 8, 1)
    floats(sim_tokens, 32, 8, 2)
    a_file = os.path.join(work, "a_file")
    with open(a_file, "w") as f:
        f.write("not a folder\n")
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
        ([bench, "router", *SMALL, "--bias", short_bias], "--bias " + short_bias +
         ": bias has 3 entries, expected E = 256", None),
        ([bench, "router", *SMALL, "--bias", nan_bias], "--bias " + nan_bias +
         ": bias entry 1 is nan", None),
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
        # Issue 17: option values, checked before any data is made.
        ([bench, "router", *SMALL, "--variants", "balanced", "--balance", "nan"],
         "--balance = nan must be a finite number >= 1", "generating"),
        ([bench, "router", *SMALL, "--variants", "balanced", "--balance", "1e30"],
         "--balance = 1e+30 is above C = 16", "training the codebook"),
        ([bench, "router", *SMALL, "--variants", "balanced", "--balance", "-1"],
         "--balance = -1 must be a finite number >= 1", "generating"),
        ([bench, "router", *SMALL, "--variants", "balanced", "--balance", "0"],
         "--balance = 0 must be a finite number >= 1", "generating"),
        ([bench, "router", *SMALL, "--variants", "spill", "--spills", "0"],
         "--spills = 0: the spill variant needs >= 1", "generating"),
        ([bench, "router", *SMALL, "--variants", "spill", "--spills", "9"],
         "--variants spill (--spills 9, --soar-lambda 1): spills must be in", None),
        ([bench, "router", *SMALL, "--variants", "query"],
         "--variants query needs --list-sample N", "generating"),
        ([bench, "router", *SMALL, "--variants", "query", "--list-sample", "64"],
         "--list-sample = 64 leaves none of the 64 tokens to measure", "training the codebook"),
        ([bench, "router", *SMALL, "--variants", "query", "--list-sample", "-2"],
         "--list-sample must be >= 0, got -2", "generating"),
        ([bench, "router", *SMALL, "--variants", "query", "--list-sample", "32",
          "--list-lengths", "0"], "--list-lengths: 0 must be >= 1", "generating"),
        ([bench, "router", *SMALL, "--variants", "query", "--list-sample", "32",
          "--list-lengths", "300"],
         "--list-lengths 300: query lists: list length L = 300 is outside [1, 256]", None),
        ([bench, "router", *SMALL, "--variants", "query", "--list-sample", "32",
          "--list-k", "4"], "--list-k: 4 must be >= 8", "generating"),
        ([bench, "router", *SMALL, "--variants", "query", "--list-sample", "32",
          "--list-k", "16,300"], "--list-k = 300 is outside [8, 256]", "training the codebook"),
        ([bench, "router", *SMALL, "--backend", "cuda:0"],
         "--backend cuda:0: the router benchmark runs on a host backend", "generating"),
        ([bench, "router", *SMALL, "--backend", "host-sse"],
         "--backend host-sse: backend 'host-sse' is unknown", "generating"),
        ([bench, "router", *SMALL, "--soar-lambda", "nan"],
         "--soar-lambda = nan must be a finite number >= 0", "generating"),
        ([bench, "router", *SMALL, "--shortlist-budget", "-5"],
         "--shortlist-budget = -5 must be a finite number >= 0", "generating"),
        ([bench, "router", *SMALL, "--json", ""], "--json: the path is empty", "generating"),
        ([bench, "router", *SMALL, "--save-routes", ""], "--save-routes: the path is empty",
         "generating"),
        ([bench, "router", "--centers", "", "--tokens", ""], "--centers: the path is empty", None),
        ([bench, "simulate", *SMALL, "--json", ""], "--json: the path is empty", "preparing"),
        ([bench, "simulate", *SMALL, "-P", "2", "--csv", ""], "--csv: the path is empty",
         "preparing"),
        ([*mpi, "traffic", *SMALL, "--json", ""], "--json: the path is empty", "preparing"),
        ([*mpi, "layer", *SMALL, "--csv", ""], "--csv: the path is empty", "preparing"),
        ([bench, "router", *SMALL, "--json", work], f"--json {work}: is a directory", "generating"),
        # --save-routes: a file, or a path under a file, fails at once.
        ([bench, "router", *SMALL, "--save-routes", a_file],
         f"--save-routes {a_file}: exists and is not a folder", "generating"),
        ([bench, "router", *SMALL, "--save-routes", a_file + "/sub"],
         f"--save-routes {a_file}/sub: '{a_file}' is not a folder", "generating"),
        ([*mpi, "traffic", *SMALL, "--save-routes", a_file],
         f"--save-routes {a_file}: exists and is not a folder", "preparing"),
        ([bench, "simulate", *SMALL, "-P", "2", "--save-data", a_file],
         f"--save-data {a_file}: exists and is not a folder", "generating"),
        ([bench, "simulate", *SMALL, "-P", "2", "--save-data", ""],
         "--save-data: the path is empty", "generating"),
        ([bench, "simulate", *SMALL, "-P", "2", "--tokens-per-rank", "0", "--save-data",
          os.path.join(work, "sd")], "--save-data: needs --tokens-per-rank > 0", "preparing"),
        ([bench, "simulate", *SMALL, "-P", "2", "--bias", short_bias],
         "--bias: needs --tokens-per-rank 0 with --centers and --tokens", "generating"),
        ([bench, "simulate", "--centers", sim_centers, "--tokens", sim_tokens, "-C", "4", "-P",
          "2", "-m", "2", "--tokens-per-rank", "0", "--bias", short_bias],
         "--bias " + short_bias + ": bias has 3 entries, expected E = 64", "training"),
        ([bench, "simulate", *SMALL, "-P", "2", "--request-key-bits", "17"],
         "--request-key-bits: 17 is outside [2, 16]", "generating"),
        ([*mpi, "layer", *SMALL, "--request-key-bits", "1"],
         "--request-key-bits = 1: request keys take 2 to 16 bits per entry", "preparing"),
        # No tokens, no figures: every subcommand refuses -T 0 alike.
        ([*mpi, "layer", "-E", "64", "-d", "16", "-T", "0", "-C", "4", "--repeats", "1"],
         "-T/--num-tokens = 0: the benchmark needs >= 1 token", "preparing"),
        ([*mpi, "traffic", "-E", "64", "-d", "16", "-T", "0", "-C", "4", "--repeats", "1"],
         "-T/--num-tokens = 0: the benchmark needs >= 1 token", "preparing"),
        ([bench, "simulate", "-E", "64", "-d", "16", "-T", "0", "-C", "4", "-P", "2"],
         "-T/--num-tokens = 0: the benchmark needs >= 1 token", "preparing"),
    ]
    if os.geteuid() != 0:  # root writes in a read-only folder
        locked = os.path.join(work, "locked")
        os.makedirs(locked, exist_ok=True)
        os.chmod(locked, 0o555)
        cases.append(([bench, "router", *SMALL, "--save-routes", locked + "/routes"],
                      f"--save-routes {locked}/routes: cannot write in '{locked}'", "generating"))
    return cases


def check_errors(cases):
    failed = 0
    for cmd, needle, absent in cases:
        shown = " ".join(repr(c) if c == "" else c for c in cmd)
        p = run(cmd)
        if p is None:
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
    return failed


def read(path):
    with open(path, "rb") as f:
        return f.read()


def leftovers(folder):
    """Temporaries a result file's writer left in `folder`."""
    return sorted(glob.glob(os.path.join(folder, "*.tmp")))


def check_result_files(bench, mpi, work):
    """Result files: kept by a failed or interrupted run, replaced whole by a
    finished one, never an input. Returns the number of failures."""
    folder = os.path.join(work, "results")
    os.makedirs(folder, exist_ok=True)
    centers, tokens, narrow = (os.path.join(folder, n) for n in ("c.npy", "t.npy", "t4.npy"))
    floats(centers, 64, 8, 1)
    floats(tokens, 32, 8, 2)
    floats(narrow, 32, 4, 3)  # 4 columns: the run fails once the data is loaded
    data = ["--centers", centers, "--tokens", tokens, "-C", "4", "--k", "2", "--repeats", "1"]
    bad_data = ["--centers", centers, "--tokens", narrow, "-C", "4", "--k", "2", "--repeats", "1"]
    earlier = b"an earlier run's results\n"
    failed = 0

    def expect(what, ok, detail=""):
        nonlocal failed
        print(("ok: " if ok else "FAIL: ") + what + ("" if ok else f"\n  {detail}"))
        failed += 0 if ok else 1

    # A run that fails after the start-up checks leaves the file as it was.
    for name, cmd in [
            ("router --json", [bench, "router", *bad_data, "--json"]),
            ("simulate --csv", [bench, "simulate", *bad_data, "-m", "1", "-P", "2",
                                "--tokens-per-rank", "0", "--csv"]),
            ("layer --json", [*mpi, "layer", *bad_data, "-m", "1", "--json"])]:
        out = os.path.join(folder, "kept.out")
        with open(out, "wb") as f:
            f.write(earlier)
        p = run(cmd + [out])
        expect(f"{name}: a failed run keeps the earlier file",
               p is not None and p.returncode != 0 and "tokens have 4 columns" in p.stderr
               and read(out) == earlier and not leftovers(folder),
               f"exit {p and p.returncode}, file {read(out)[:60]!r}, left {leftovers(folder)}")

    # An interrupted run (SIGTERM while it generates its data) keeps it too.
    out = os.path.join(folder, "interrupted.json")
    with open(out, "wb") as f:
        f.write(earlier)
    proc = subprocess.Popen([bench, "router", "-E", "65536", "-d", "256", "-T", "8192",
                             "--threads", "1", "--json", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    expect("router --json: an interrupted run keeps the earlier file",
           "generating" in started and read(out) == earlier and not leftovers(folder),
           f"first line {started!r}, file {read(out)[:60]!r}, left {leftovers(folder)}")

    # A finished run replaces it whole, keeping its permissions.
    out = os.path.join(folder, "replaced.json")
    with open(out, "wb") as f:
        f.write(earlier)
    os.chmod(out, 0o640)
    p = run([bench, "router", *data, "--json", out])
    try:
        replaced = json.loads(read(out))["benchmark"] == "router"
    except ValueError:
        replaced = False
    expect("router --json: a finished run replaces the file",
           p is not None and p.returncode == 0 and replaced
           and (os.stat(out).st_mode & 0o777) == 0o640 and not leftovers(folder),
           f"exit {p and p.returncode}, file {read(out)[:60]!r}, mode "
           f"{oct(os.stat(out).st_mode & 0o777)}, left {leftovers(folder)}")

    # An output naming an input (by another spelling, or through a link) is
    # refused before anything is read or written.
    link = os.path.join(folder, "link.npy")
    if not os.path.islink(link):
        os.symlink(tokens, link)
    respelled = os.path.join(folder, "..", "results", "t.npy")
    before = read(tokens)
    for cmd, needle in [
            ([bench, "router", *data, "--json", respelled],
             f"--json {respelled}: the same file as --tokens {tokens}"),
            ([bench, "router", "--centers", centers, "--tokens", link, "--json", tokens],
             f"--json {tokens}: the same file as --tokens {link}"),
            ([bench, "simulate", *data, "-m", "1", "-P", "2", "--tokens-per-rank", "0", "--csv",
              centers],
             f"--csv {centers}: the same file as --centers {centers}"),
            ([*mpi, "traffic", *data, "-m", "1", "--json", tokens],
             f"--json {tokens}: the same file as --tokens {tokens}"),
            ([*mpi, "layer", *data, "-m", "1", "--json", out, "--csv", out],
             f"--csv {out}: the same file as --json {out}")]:
        p = run(cmd)
        expect(" ".join(cmd[cmd.index(bench):])[len(bench) + 1:] + ": refused",
               p is not None and p.returncode != 0 and needle in p.stderr
               and "loading" not in p.stderr and "preparing" not in p.stderr
               and read(tokens) == before,
               f"exit {p and p.returncode}, stderr {p and p.stderr[-400:]!r}")
    return failed


def table_rows(stdout, first_word):
    """The table rows of stdout whose first field is `first_word`, split."""
    return [line.split() for line in stdout.splitlines() if line.split()[:1] == [first_word]]


def check_edge_shapes(bench, mpiexec, work):
    """Figures that do not exist print "-" (JSON null); returns failures."""
    failed = 0

    def expect(what, ok, detail=""):
        nonlocal failed
        print(("ok: " if ok else "FAIL: ") + what + ("" if ok else f"\n  {detail}"))
        failed += 0 if ok else 1

    mpi4 = [mpiexec, "--allow-run-as-root", "--oversubscribe", "-n", "4", bench]
    # E = 3 < P = 4: rank 3 hosts no expert, so it has no peak/FFN.
    out = os.path.join(work, "edge_layer.json")
    p = run([*mpi4, "layer", "-E", "3", "-d", "32", "-T", "8", "-C", "2", "--k", "2", "-m", "1",
             "--repeats", "1", "--strategies", "air", "--json", out], timeout=200)
    ok = p is not None and p.returncode == 0
    if ok:
        row = json.loads(read(out))["results"][0]
        memory = [r for r in table_rows(p.stdout, "air") if len(r) == 6]
        empty = [i for i, b in enumerate(row["ffn_weight_bytes"]) if b == 0]
        # One strategy, no dense-replicated row: no "vs floor" either.
        vs_floor = [r[3] for r in table_rows(p.stdout, "air") if len(r) == 10]
        ok = (empty and len(memory) == 4 and all(memory[i][5] == "-" for i in empty)
              and all(memory[i][5] != "-" for i in range(4) if i not in empty)
              and row["bytes_vs_floor"] is None and vs_floor == ["-"])
    expect("layer E < P, --strategies air: '-' for peak/FFN of expertless ranks and vs floor",
           ok, p and p.stdout[-1200:])

    # P = 1: nothing is sent, so no ratio to dense-replicated's bytes.
    p = run([bench, "simulate", "-E", "64", "-d", "16", "-T", "32", "-C", "4", "-m", "2",
             "-P", "1", "--tokens-per-rank", "0"])
    rows = table_rows(p.stdout, "1") if p else []
    expect("simulate -P 1: '-' for vs floor and req vs bcast",
           p is not None and p.returncode == 0 and len(rows) == 3
           and all(r[4] == "-" and r[5] == "-" for r in rows), p and p.stdout[-800:])

    # E < 16: the default budget E/16 is below k; no "shortlist <= 0 experts".
    p = run([bench, "router", "-E", "8", "-d", "16", "-T", "64", "-C", "2", "--k", "2",
             "--repeats", "1", "--threads", "1"])
    expect("router E = 8: no budget summary below k",
           p is not None and p.returncode == 0 and "shortlist <= 0" not in p.stdout
           and "no shortlist budget summary: 0.5 experts is below k = 2" in p.stdout,
           p and p.stdout[-600:])
    return failed


def check_documented_defaults(bench):
    """Each "`SUBCOMMAND --option X` (default V)" in docs/*.md against --help;
    simulate --sample-ranks must be among them. Returns failures."""
    failed, seen = 0, set()
    stated = re.compile(r"`(router|traffic|layer|simulate) (--[a-z-]+)[^`]*` \(default ([^)]+)\)")
    for doc in sorted(glob.glob(os.path.join(DOCS, "*.md"))):
        with open(doc) as f:
            text = f.read()
        for sub, option, value in stated.findall(text):
            seen.add((sub, option))
            h = subprocess.run([bench, sub, "--help"], capture_output=True, text=True).stdout
            shown = re.search(re.escape(option) + r" arg \(=([^)]*)\)", h)
            if not shown or shown.group(1) != value.replace(",", ""):
                failed += 1
                print(f"FAIL: {os.path.basename(doc)} says {sub} {option} defaults to {value}; "
                      f"--help says {shown.group(1) if shown else 'no default'}")
            else:
                print(f"ok: {os.path.basename(doc)}: {sub} {option} (default {value})")
    if ("simulate", "--sample-ranks") not in seen:
        failed += 1
        print("FAIL: no doc states simulate --sample-ranks' default as "
              "\"`simulate --sample-ranks S` (default N)\"")
    return failed


def main():
    bench, mpiexec, work = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(work, exist_ok=True)
    mpi = [mpiexec, "--allow-run-as-root", "--oversubscribe", "-n", "1", bench]
    cases = error_cases(bench, mpi, work)
    failed = check_errors(cases)
    failed += check_result_files(bench, mpi, work)
    failed += check_edge_shapes(bench, mpiexec, work)
    failed += check_documented_defaults(bench)

    # The help states the bounds.
    for sub in ("router", "simulate"):
        h = subprocess.run([bench, sub, "--help"], capture_output=True, text=True).stdout
        for needle in ["1..1024"] + (["[1, 65536]"] if sub == "simulate" else []):
            if needle not in h:
                failed += 1
                print(f"FAIL: {sub} --help lacks {needle!r}")
    print(f"{len(cases)} command lines and the result-file, edge-shape and docs checks, "
          f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
