#!/usr/bin/python3
"""`airmoe_bench router`'s baseline rows (examples/bench_baselines.py).

usage: check_bench_baselines.py AIRMOE_BENCH WORKDIR

On a small shape, with this interpreter (torch and PyPI's faiss-cpu, from
scripts/install-deps.sh) as --baselines-python, checks that:

* torch_f32 and torch_bf16 are measured, with recall against the exact top-k
  from their own routes, and every row carries the speed-up against torch_f32;
* faiss_cpu (IndexIVFFlat on AIR's codewords and lists, nprobe = m) has
  AIR's recall and mass at every m: the same lists probed give the same
  shortlists, so the same top-k up to ties;
* a missing interpreter, or faiss-cpu missing from a working one, turns the
  rows into a "not installed: ..." note and the run still ends well;
* --no-baselines leaves the rows out.
"""
import json
import os
import subprocess
import sys

E, D, T, K, C = 2000, 24, 300, 4, 16
PROBES = (1, 4, C)


def run(bench, work, name, *extra, env=None):
    out = os.path.join(work, name + ".json")
    cmd = [bench, "router", "-E", str(E), "-d", str(D), "-T", str(T), "--k", str(K), "-C", str(C),
           "--probes", ",".join(map(str, PROBES)), "--repeats", "1", "--no-product-key",
           "--json", out, *extra]
    print("+", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, **(env or {})))
    print(res.stdout, flush=True)
    with open(out) as f:
        return json.load(f), res.stdout


def rows_of(j, router):
    return {r["probes"]: r for r in j["results"] if r["router"] == router}


def check_measured(bench, work):
    j, text = run(bench, work, "measured", "--baselines-python", sys.executable)
    meta = j["baselines"]
    assert meta.get("torch") and meta.get("faiss_module", "").startswith("swigfaiss"), meta
    torch_f32, torch_bf16 = rows_of(j, "torch_f32")[0], rows_of(j, "torch_bf16")[0]
    for row in (torch_f32, torch_bf16):
        assert row["tokens_per_s"] > 0, row
        assert 0.9 <= row["recall_at_k"] <= 1.0, row
    assert torch_f32["recall_at_k"] >= 0.99, f"float32 top-k must match the exact one: {torch_f32}"
    assert abs(torch_f32["speedup_vs_torch_f32"] - 1.0) < 1e-12, torch_f32
    for row in j["results"]:
        assert row["speedup_vs_torch_f32"] > 0, f"no speed-up against torch f32: {row}"
    air, faiss_cpu = rows_of(j, "air"), rows_of(j, "faiss_cpu")
    one_hit = 1.0 / (T * K)  # a tie broken the other way
    for m in PROBES:
        assert m in faiss_cpu and faiss_cpu[m]["tokens_per_s"] > 0, f"no faiss_cpu row at m={m}"
        assert abs(faiss_cpu[m]["recall_at_k"] - air[m]["recall_at_k"]) <= one_hit, (air[m],
                                                                                    faiss_cpu[m])
        assert abs(faiss_cpu[m]["mass_recall"] - air[m]["mass_recall"]) <= 1e-4, (air[m],
                                                                                 faiss_cpu[m])
    assert air[1]["recall_at_k"] < 1.0, "m = 1 must lose some of the top-k for the check to bite"
    assert faiss_cpu[C]["recall_at_k"] == 1.0, faiss_cpu[C]
    for m, row in rows_of(j, "faiss_ivf").items():
        assert "linked" in row["note"], row
    assert "faiss-cpu IVF" in text and "torch f32" in text, "the summary names the baselines"


def check_missing(bench, work):
    missing = os.path.join(work, "no-such-python")
    j, text = run(bench, work, "missing", "--baselines-python", missing)
    want = f"not installed: no Python interpreter '{missing}'"
    names = [r["router"] for r in j["results"] if r["note"].startswith(want)]
    assert sorted(set(names)) == ["faiss_cpu", "torch_bf16", "torch_f32"], j["results"]
    assert want in text, "the table must say why the baselines are missing"
    assert all(r["tokens_per_s"] is None for r in j["results"] if r["router"] in names)
    assert rows_of(j, "torch_f32")[0]["speedup_vs_torch_f32"] is None
    assert rows_of(j, "air")[C]["recall_at_k"] == 1.0, "the run goes on without them"

    # faiss-cpu missing from a working interpreter: its rows say so, torch's run.
    hide = os.path.join(work, "hide_faiss")
    os.makedirs(hide, exist_ok=True)
    with open(os.path.join(hide, "sitecustomize.py"), "w") as f:
        f.write("import sys\nsys.modules['faiss'] = None\n")
    j, text = run(bench, work, "no_faiss", "--baselines-python", sys.executable,
                  env={"PYTHONPATH": hide})
    for m, row in rows_of(j, "faiss_cpu").items():
        assert row["note"].startswith("not installed: faiss-cpu"), row
        assert row["tokens_per_s"] is None, row
    assert rows_of(j, "torch_f32")[0]["tokens_per_s"] > 0

    j, _ = run(bench, work, "off", "--no-baselines")
    assert not {"torch_f32", "torch_bf16", "faiss_cpu"} & {r["router"] for r in j["results"]}
    assert j["baselines"] is None


def main():
    bench, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    check_measured(bench, work)
    check_missing(bench, work)
    print("bench_router_baselines: ok")


if __name__ == "__main__":
    main()
