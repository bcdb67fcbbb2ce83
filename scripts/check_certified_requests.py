#!/usr/bin/python3
"""`airmoe_bench simulate --save-data` and scripts/certified_requests.py on a
small weak-scaling run: the saved files have the run's shapes, the script's
recount of today's requests matches the simulator's JSON to the byte (it
exits non-zero when the JSON says otherwise, shown with a tampered copy),
pruning never reaches more ranks than today's requests do, and the
survivors mode runs on the saved keys and refuses a bad --exact-columns.
The runtime's request keys (`simulate --request-key-bits 8` on the same
run) keep AIR's recall, never reach more ranks than without keys, and reach
about as many as the offline analysis's 8-bit pruning (two implementations
of one bound: the analysis scores in double, the runtime in float32 with
its rounding added to the bound).

usage: check_certified_requests.py AIRMOE_BENCH WORK_DIR
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd, expect_ok=True):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if (p.returncode == 0) != expect_ok:
        sys.exit(f"{' '.join(cmd)}: rc {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def main():
    bench, work = sys.argv[1], sys.argv[2]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    data, sim = os.path.join(work, "data"), os.path.join(work, "simulate.json")
    E, d, C, tpr, S = 4096, 32, 64, 256, 2
    run([bench, "simulate", "-E", str(E), "-d", str(d), "-C", str(C), "-P", "16,64",
         "--sample-ranks", str(S), "--tokens-per-rank", str(tpr), "-m", "2,4",
         "--exchange", "sparse", "--threads", "1", "--save-data", data, "--json", sim])
    shapes = {"centers.npy": (E, d), "codewords.npy": (C, d), "assignment.npy": (E, 1),
              "tokens.npy": (S * tpr, d), "owners_P16.npy": (E, 1), "owners_P64.npy": (E, 1)}
    for name, shape in shapes.items():
        got = np.load(os.path.join(data, name)).shape
        if got != shape:
            sys.exit(f"{name}: shape {got}, expected {shape}")
    owners = np.load(os.path.join(data, "owners_P64.npy"))
    if owners.min() < 0 or owners.max() >= 64:
        sys.exit("owners_P64.npy: a rank outside [0, 64)")

    script = [sys.executable, os.path.join(HERE, "certified_requests.py")]
    out = os.path.join(work, "pruned.json")
    run(script + ["traffic", data, sim, out])
    rows = json.load(open(out))["rows"]
    if len(rows) != 4:
        sys.exit(f"{out}: {len(rows)} rows, expected 4 (2 rank counts x 2 probe counts)")
    for r in rows:
        for b, p in r["pruned"].items():
            if p["ranks_per_token"] > r["today"]["ranks_per_token"] + 1e-12:
                sys.exit(f"P={r['ranks']} m={r['probes']} {b}-bit: pruning reached more ranks "
                         f"({p['ranks_per_token']}) than today ({r['today']['ranks_per_token']})")
            if p["survivors_per_token"] < 8:
                sys.exit(f"P={r['ranks']} m={r['probes']} {b}-bit: fewer survivors than k")

    surv = os.path.join(work, "survivors.json")
    run(script + ["survivors", os.path.join(data, "centers.npy"), os.path.join(data, "tokens.npy"),
                  surv, "--bits", "8", "--exact-columns", "1", "--tokens", "64"])
    mean = json.load(open(surv))["bits"]["8"]["mean"]
    if not 8 <= mean <= E:
        sys.exit(f"{surv}: {mean} survivors per token, outside [k, E]")
    run(script + ["survivors", os.path.join(data, "centers.npy"), os.path.join(data, "tokens.npy"),
                  surv, "--bits", "8", "--tokens", "16", "--experts", "512,0"])
    if set(json.load(open(surv))["bits"]) != {"8@E512", "8"}:
        sys.exit(f"{surv}: expected the entries 8@E512 and 8")
    for bad, message in ((["--exact-columns", str(d)], f"--exact-columns {d}: outside [0, {d})"),
                         (["--experts", "4"], f"--experts 4: outside [8, {E}]")):
        p = run(script + ["survivors", os.path.join(data, "centers.npy"),
                          os.path.join(data, "tokens.npy"), surv, *bad], expect_ok=False)
        if message not in p.stderr:
            sys.exit(f"{' '.join(bad)}: unexpected message {p.stderr!r}")

    j = json.load(open(sim))
    j["results"][-1]["mean_bytes_by_phase"]["requests"] += 4
    tampered = os.path.join(work, "tampered.json")
    json.dump(j, open(tampered, "w"))
    p = run(script + ["traffic", data, tampered, os.path.join(work, "t.json")], expect_ok=False)
    if "differ from the simulator" not in p.stderr:
        sys.exit(f"tampered JSON: unexpected message {p.stderr!r}")
    keyed_json = os.path.join(work, "simulate_keys.json")
    run([bench, "simulate", "-E", str(E), "-d", str(d), "-C", str(C), "-P", "16,64",
         "--sample-ranks", str(S), "--tokens-per-rank", str(tpr), "-m", "2,4",
         "--exchange", "sparse", "--threads", "1", "--request-key-bits", "8",
         "--json", keyed_json])
    results = json.load(open(keyed_json))["results"]
    offline = {(r["ranks"], r["probes"]): r["pruned"]["8"]["ranks_per_token"] for r in rows}
    for r in results:
        if r["strategy"] != "air" or r["request_key_bits"] != 8:
            continue
        plain = next(o for o in results if o["strategy"] == "air" and o["request_key_bits"] == 0
                     and o["ranks"] == r["ranks"] and o["probes"] == r["probes"])
        at = f"P={r['ranks']} m={r['probes']}"
        if r["recall_at_k"] != plain["recall_at_k"]:
            sys.exit(f"{at}: request keys changed the recall")
        if r["mean_ranks_per_token"] > plain["mean_ranks_per_token"]:
            sys.exit(f"{at}: request keys reached more ranks than without")
        if r["forward_vs_floor"] > plain["forward_vs_floor"]:
            sys.exit(f"{at}: request keys sent more forward bytes than without")
        want = offline[(r["ranks"], r["probes"])]
        if abs(r["mean_ranks_per_token"] - want) > 0.1 * want:
            sys.exit(f"{at}: the runtime's keys reach {r['mean_ranks_per_token']} ranks per "
                     f"token, the offline analysis {want}")
    png = os.path.join(work, "keys.png")
    run([sys.executable, os.path.join(HERE, "plot_request_keys.py"), keyed_json, png])
    if os.path.getsize(png) < 1000:
        sys.exit(f"{png}: no chart")
    print("certified_requests: saved data, recount and the runtime's request keys checked")


if __name__ == "__main__":
    main()
