#!/usr/bin/python3
"""Runs airmoe_layer_bench (P ranks as threads) on tiny shapes and checks it.

usage: check_layer_bench.py AIRMOE_LAYER_BENCH WORKDIR
           [--airmoe-bench AIRMOE_BENCH --mpiexec MPIEXEC]

At P = 1 and P = 3, on host and device-emulated: the JSON holds every
strategy, every phase's seconds and bytes, and air's time over
dense-replicated's; the metered bytes and messages are the same on both
backends (the layer sends the same messages whatever its compute). With
airmoe_bench and mpiexec, `airmoe_bench layer` at P = 3 on the same data
meters the same bytes in every phase both report. Bad arguments fail with
exit status 2 and a message naming the argument; a run that fails later
leaves the --json path as it was.
"""
import json
import os
import subprocess
import sys

STRATEGIES = ("dense-replicated", "air", "dense-broadcast")
PHASES = ("requests", "replies", "dispatch", "combine",
          "grad_dispatch", "grad_gates", "grad_logits", "grad_combine")
SECONDS = ("route", "dispatch", "experts", "combine", "backward_dispatch",
           "backward_experts", "backward_combine", "forward", "backward", "total")
# E, d, tokens per rank, C, k, m
E, D, T, C, K, M = 300, 16, 40, 12, 4, 3
SHAPE = ["--experts", str(E), "--dim", str(D), "--num-tokens", str(T), "--codewords", str(C),
         "--k", str(K), "--probes", str(M)]


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def bench_json(exe, work, backend, P):
    out = os.path.join(work, f"layer_{backend}_P{P}.json")
    r = run([exe, "--backend", backend, "--ranks", str(P), *SHAPE, "--repeats", "2",
             "--warmup", "1", "--quiet", "--json", out])
    print(r.stdout, r.stderr, sep="", flush=True)
    assert r.returncode == 0, f"{backend} P={P}: exit {r.returncode}"
    assert "air / dense-replicated, forward+backward seconds:" in r.stdout, r.stdout
    with open(out) as f:
        return json.load(f)


def check_fields(j, backend, P):
    cfg = j["config"]
    assert (cfg["experts"], cfg["dim"], cfg["tokens_per_rank"], cfg["ranks"]) == (E, D, T, P), cfg
    rows = {r["strategy"]: r for r in j["results"]}
    assert sorted(rows) == sorted(STRATEGIES), f"{backend} P={P}: strategies {sorted(rows)}"
    for name, r in rows.items():
        what = f"{backend} P={P} {name}"
        for s in SECONDS:
            assert isinstance(r["seconds"].get(s), float) and r["seconds"][s] >= 0, \
                f"{what}: seconds.{s} = {r['seconds'].get(s)}"
        for p in PHASES:
            assert p in r["bytes"] and p + ":counts" in r["bytes"], f"{what}: no bytes for {p}"
        assert r["bytes_total"] == r["bytes_forward"] + r["bytes_backward"], what
        assert r["bytes_forward"] == sum(v for p, v in r["bytes"].items()
                                         if p.split(":")[0] in PHASES[:4]), what
        # One rank sends nothing; three send token vectors, both ways.
        assert (r["bytes_total"] > 0) == (P > 1), f"{what}: bytes_total {r['bytes_total']}"
        assert 0 < r["recall_at_k"] <= 1, what
    ratio = rows["air"]["seconds"]["total"] / rows["dense-replicated"]["seconds"]["total"]
    got = j["air_over_dense_replicated_seconds"]
    assert abs(got - ratio) <= 1e-12 * ratio, f"{backend} P={P}: air / dense {got}, want {ratio}"
    return rows


def traffic(rows):
    return {name: (r["bytes"], r["messages"]) for name, r in rows.items()}


def check_against_mpi(exe, mpiexec, work, rows):
    """airmoe_bench layer on 3 MPI ranks, the same data (T = 3 x 40 tokens)."""
    out = os.path.join(work, "mpi_P3.json")
    r = run([mpiexec, "-n", "3", "--oversubscribe", exe, "layer", "-E", str(E), "-d", str(D),
             "-T", str(3 * T), "-C", str(C), "--k", str(K), "-m", str(M), "--repeats", "1",
             "--json", out])
    print(r.stdout[-2000:], r.stderr[-2000:], sep="", flush=True)
    assert r.returncode == 0, f"airmoe_bench layer: exit {r.returncode}"
    with open(out) as f:
        mpi = {x["strategy"]: x for x in json.load(f)["results"]}
    for name in STRATEGIES:
        shared = set(mpi[name]["bytes"]) & set(rows[name]["bytes"])
        assert set(PHASES) <= shared, f"{name}: phases {sorted(shared)}"
        for p in sorted(shared):
            assert mpi[name]["bytes"][p] == rows[name]["bytes"][p], \
                f"{name} {p}: {mpi[name]['bytes'][p]} bytes under MPI, " \
                f"{rows[name]['bytes'][p]} in-process"
    print("airmoe_bench layer (MPI, P = 3) meters the same bytes", flush=True)


ERRORS = [
    (["--ranks", "0"], "--ranks = 0 is outside [1, 64]"),
    (["--ranks", "two"], "--ranks: 'two' is not an integer"),
    (["--num-tokens", "1.5"], "--num-tokens: '1.5' is not an integer"),
    (["--experts"], "--experts needs a value"),
    (["--frobnicate", "1"], "unknown argument '--frobnicate'"),
    (["--backend", "no-such-backend"], "--backend: "),
    (["--strategies", "air,bogus"], "--strategies: "),
    (["--codewords", "12", "--probes", "20"], "--probes = 20 is more than --codewords = 12"),
    (["--json", ""], "--json: the value is empty"),
    (["--json", "/nonexistent-dir/x.json"], "--json /nonexistent-dir/x.json: cannot open"),
]


def check_errors(exe):
    for args, want in ERRORS:
        r = run([exe, *SHAPE, *args])
        assert r.returncode == 2, f"{args}: exit {r.returncode}, stderr {r.stderr!r}"
        assert want in r.stderr, f"{args}: stderr {r.stderr!r} lacks {want!r}"
    r = run([exe, "--help"])
    assert r.returncode == 0 and "--ranks P" in r.stdout, r


def check_failed_run_keeps_files(exe, work):
    """A run that fails after its --json path was accepted (here the layer
    refuses k > E) makes no file where there was none and leaves an earlier
    result as it was."""
    failing = ["--experts", "4", "--dim", "8", "--num-tokens", "4", "--codewords", "2",
               "--k", "8", "--probes", "1", "--quiet", "--json"]
    fresh, earlier = os.path.join(work, "never_written.json"), os.path.join(work, "earlier.json")
    if os.path.exists(fresh):
        os.remove(fresh)
    with open(earlier, "w") as f:
        f.write('{"earlier": true}')
    for path in (fresh, earlier):
        r = run([exe, *failing, path])
        assert r.returncode == 1 and "k = 8 is outside [1, 4]" in r.stderr, r
    assert not os.path.exists(fresh), "a failed run left a file at --json"
    with open(earlier) as f:
        assert f.read() == '{"earlier": true}', "a failed run changed the earlier --json file"


def main():
    exe, work = sys.argv[1], sys.argv[2]
    extra = dict(zip(sys.argv[3::2], sys.argv[4::2]))
    os.makedirs(work, exist_ok=True)
    check_errors(exe)
    check_failed_run_keeps_files(exe, work)
    for P in (1, 3):
        by_backend = {b: check_fields(bench_json(exe, work, b, P), b, P)
                      for b in ("host", "device-emulated")}
        assert traffic(by_backend["host"]) == traffic(by_backend["device-emulated"]), \
            f"P={P}: host and device-emulated metered different bytes"
        if P == 3 and "--airmoe-bench" in extra:
            check_against_mpi(extra["--airmoe-bench"], extra["--mpiexec"], work,
                              by_backend["host"])
    print("airmoe_layer_bench: ok")


if __name__ == "__main__":
    main()
