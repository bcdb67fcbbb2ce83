#!/usr/bin/python3
"""How many ranks must AIR's scoring requests reach if the home rank prunes
the shortlist with replicated low-bit keys, and what that does to the
layer's bytes: an offline analysis of an `airmoe_bench simulate --save-data`
run (weak scaling), against the same run's JSON.

Today a token's scoring request goes to every rank hosting a segment of a
probed list. The variant analysed here keeps every expert's key on every
rank in b bits (a per-expert symmetric scale, so key e is s_e q_e with
integer q_e in [-(2^(b-1) - 1), 2^(b-1) - 1]) with a bound on its error. The
home rank scores its shortlist with them, and each approximate score a_e
lies within beta_e of the exact one:

    beta_e = min(s_e / 2 * |h|_1, |h|_2 * |w_e - s_e q_e|_2) + float32 slack.

Any expert whose upper bound a_e + beta_e is below the k-th largest lower
bound a_e - beta_e cannot be in the exact top-k of the shortlist, so the
token goes only to the owners of the others (the survivors), each scoring
only its survivors. The routes are today's exactly: the script asserts, for
every token, that the exact top-k over the shortlist is among the survivors.
Nothing here is built into the runtime; see docs/layer.md.

Bytes follow runtime/wire.h: a request record is 4 (2 + n + d) bytes for n
probed codewords (today) or n survivors (pruned) hosted by the target, a
reply 8 k, self-sends are free. The script first recounts today's requests
and replies from the saved data and checks them against the JSON to the
byte, so the model is the simulator's.

The same bound on saved router data (`survivors`): how many of all E
experts survive per token, with the last --exact-columns columns of the keys
(a selection bias exported as keys [w_e, b_e] and tokens [h, c]) kept exact,
as a replicated bias would be.

usage: certified_requests.py traffic DATA_DIR SIMULATE.json OUT.json
           [--bits 8,4] [--tokens N] [--png OUT.png]
       certified_requests.py survivors CENTERS.npy TOKENS.npy OUT.json
           [--bits 8,4] [--exact-columns N] [--tokens N]
"""
import argparse
import json
import os
import sys

import numpy as np

F32_UNIT = 2.0**-24


def load(data_dir, name):
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        sys.exit(f"{path}: missing; run airmoe_bench simulate with --save-data {data_dir}")
    return np.load(path)


def probes_of(tokens, codewords, m):
    """AIR's probe order: codewords by score, ties to the lower index."""
    scores = tokens.astype(np.float64) @ codewords.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(codewords.shape[0]), scores.shape), -scores))
    return order[:, :m]


def quantize(centers, bits):
    """Per-expert symmetric b-bit keys: (q, scale, |w - scale q|_2)."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(centers).max(axis=1).astype(np.float64) / qmax
    scale[scale == 0] = 1.0
    q = np.rint(centers / scale[:, None]).astype(np.int8 if bits <= 8 else np.int32)
    err = np.linalg.norm(centers - q.astype(np.float64) * scale[:, None], axis=1)
    return q, scale, err


def request_bytes(ranks, counts, home, d, k):
    """(ranks reached, request bytes, reply bytes) of one token: a record to
    each of `ranks` but home, with its `counts` entries (codewords or
    experts)."""
    keep = ranks != home
    req = int((4 * (2 + counts[keep] + d)).sum())
    return len(ranks), req, int(keep.sum()) * 8 * k


def survivors(h, centers, norms, keys, rows, k, exact_columns, what):
    """The mask of `rows` whose score upper bound reaches the k-th largest
    lower bound; exits if the exact top-k is not among them."""
    q, scale, err = keys
    d = centers.shape[1]
    cut = d - exact_columns
    exact = centers[rows].astype(np.float64) @ h
    top = rows[np.lexsort((rows, -exact))[:k]]
    hq = h[:cut]
    approx = scale[rows] * (q[rows].astype(np.float64) @ hq)
    if exact_columns:
        approx += centers[rows, cut:].astype(np.float64) @ h[cut:]
    slack = 2 * d * F32_UNIT * np.linalg.norm(h) * norms[rows]
    beta = np.minimum(0.5 * scale[rows] * np.abs(hq).sum(), np.linalg.norm(hq) * err[rows]) + slack
    tau = np.partition(approx - beta, -k)[-k] if len(rows) >= k else -np.inf
    survive = approx + beta >= tau
    if not np.isin(top, rows[survive]).all():
        sys.exit(f"{what}: a top-{k} expert was pruned (the bound is wrong)")
    return survive


def per_token(h, home, probes, members, lists_of, place, centers, norms, quant, k, d):
    """(today's ranks, requests, replies) and per bit width the pruned ones."""
    sl = np.concatenate([members[c] for c in probes])
    owners = place[sl]
    # Today: each rank hosting a probed list gets the token with the probed
    # codewords it hosts.
    C = len(members)
    hosted = np.unique(owners.astype(np.int64) * C + lists_of(probes))  # (rank, list) pairs
    ranks, n_codewords = np.unique(hosted // C, return_counts=True)
    today = request_bytes(ranks, n_codewords, home, d, k)
    out = {}
    for bits, keys in quant.items():
        survive = survivors(h, centers, norms, keys, sl, k, 0, f"bits={bits}")
        ranks, counts = np.unique(owners[survive], return_counts=True)
        out[bits] = request_bytes(ranks, counts, home, d, k) + (int(survive.sum()),)
    return today, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("traffic", help="ranks and bytes of a simulate --save-data run")
    t.add_argument("data_dir")
    t.add_argument("simulate_json")
    t.add_argument("out_json")
    t.add_argument("--png")
    v = sub.add_parser("survivors", help="survivors among all experts, on router data")
    v.add_argument("centers")
    v.add_argument("tokens_file")
    v.add_argument("out_json")
    v.add_argument("--exact-columns", type=int, default=0)
    v.add_argument("--experts", default="0",
                   help="comma-separated expert counts: each a random subset of the keys "
                        "(seed 0), to see how the survivors grow with E (0: all)")
    for p in (t, v):
        p.add_argument("--bits", default="8,4")
        p.add_argument("--tokens", type=int, default=0,
                       help="tokens to analyse (0: all; traffic: per sampled rank, and a subset "
                            "skips the check against the JSON)")
    a = ap.parse_args()
    if a.mode == "survivors":
        return survivors_main(a)
    traffic_main(a)


def survivors_main(a):
    centers, tokens = np.load(a.centers), np.load(a.tokens_file)
    if centers.ndim != 2 or tokens.ndim != 2 or centers.shape[1] != tokens.shape[1]:
        sys.exit(f"{a.centers} {centers.shape} and {a.tokens_file} {tokens.shape}: not [E, d] "
                 "and [T, d]")
    if not 0 <= a.exact_columns < centers.shape[1]:
        sys.exit(f"--exact-columns {a.exact_columns}: outside [0, {centers.shape[1]})")
    k, cut = 8, centers.shape[1] - a.exact_columns
    n = tokens.shape[0] if a.tokens <= 0 else min(a.tokens, tokens.shape[0])
    out = {"analysis": "certified_survivors", "centers": a.centers, "tokens": a.tokens_file,
           "k": k, "exact_columns": a.exact_columns, "tokens_analysed": n, "bits": {}}
    all_experts = centers.shape[0]
    for E in (int(e) for e in a.experts.split(",")):
        if not 0 <= E <= all_experts or 0 < E < k:
            sys.exit(f"--experts {E}: outside [{k}, {all_experts}] (0: all)")
        subset = (np.sort(np.random.default_rng(0).choice(all_experts, E, replace=False))
                  if 0 < E < all_experts else np.arange(all_experts))
        keys_f32 = centers[subset]
        norms = np.linalg.norm(keys_f32.astype(np.float64), axis=1)
        rows = np.arange(len(subset))
        for bits in (int(b) for b in a.bits.split(",")):
            keys = quantize(keys_f32[:, :cut], bits)
            counts = np.array([survivors(tokens[t].astype(np.float64), keys_f32, norms, keys, rows,
                                         k, a.exact_columns, f"token {t}").sum()
                               for t in range(n)])
            name = str(bits) if E in (0, all_experts) else f"{bits}@E{E}"
            out["bits"][name] = {"experts": int(len(subset)), "mean": float(counts.mean()),
                                 "median": float(np.median(counts)),
                                 "p90": float(np.percentile(counts, 90)),
                                 "max": int(counts.max())}
            print(f"{bits}-bit keys: survivors of E = {len(subset)} per token: mean "
                  f"{counts.mean():.2f}, median {np.median(counts):.0f}, p90 "
                  f"{np.percentile(counts, 90):.0f}, max {counts.max()}", flush=True)
    with open(a.out_json, "w") as f:
        json.dump(out, f, indent=1)


class SavedRun:
    """A simulate --save-data folder: the experts, AIR's lists and the
    sampled ranks' batches."""

    def __init__(self, data_dir):
        self.dir = data_dir
        self.centers = load(data_dir, "centers.npy")
        self.codewords = load(data_dir, "codewords.npy")
        self.tokens = load(data_dir, "tokens.npy")
        assignment = load(data_dir, "assignment.npy")[:, 0]
        order = np.argsort(assignment, kind="stable")
        starts = np.searchsorted(assignment[order], np.arange(self.codewords.shape[0] + 1))
        self.members = [order[starts[c]:starts[c + 1]] for c in range(self.codewords.shape[0])]
        self.sizes = np.diff(starts)
        self.norms = np.linalg.norm(self.centers.astype(np.float64), axis=1)
        self._probes = {}

    def lists_of(self, probes):
        """The list of each shortlisted expert, in shortlist order."""
        return np.repeat(probes, self.sizes[probes])

    def probes(self, m):
        if m not in self._probes:
            self._probes[m] = probes_of(self.tokens, self.codewords, m)
        return self._probes[m]


def count_row(run, r, quant, k, tpr, n):
    """Sums over the row's sampled ranks' first n tokens: today's (ranks,
    requests, replies) and per bit width the pruned ones and survivors."""
    place = load(run.dir, f"owners_P{r['ranks']}.npy")[:, 0]
    probes = run.probes(r["probes"])
    today = np.zeros(3)
    pruned = {b: np.zeros(4) for b in quant}
    for i, home in enumerate(r["sampled_ranks"]):
        for t in range(i * tpr, i * tpr + n):
            td, pr = per_token(run.tokens[t].astype(np.float64), home, probes[t], run.members,
                               run.lists_of, place, run.centers, run.norms, quant, k,
                               run.centers.shape[1])
            today += td
            for b in quant:
                pruned[b] += pr[b]
        print(f"P={r['ranks']} m={r['probes']}: rank {home} analysed", file=sys.stderr, flush=True)
    return today, pruned


def check_recount(r, today, count):
    """Today's requests and replies, recounted, against the simulator's."""
    homes = len(r["sampled_ranks"])
    by_phase = r["mean_bytes_by_phase"]
    want = (by_phase.get("requests", 0.0), by_phase.get("replies", 0.0))
    got = (today[1] / homes, today[2] / homes)
    where = f"P={r['ranks']} m={r['probes']}"
    if abs(got[0] - want[0]) > 0.5 or abs(got[1] - want[1]) > 0.5:
        sys.exit(f"{where}: recounted requests/replies {got} differ from the simulator's {want}")
    if abs(today[0] / count - r["mean_ranks_per_token"]) > 1e-9:
        sys.exit(f"{where}: recounted ranks per token {today[0] / count} differ from the "
                 f"simulator's {r['mean_ranks_per_token']}")


def forward_bytes(row):
    phases = ("requests", "replies", "dispatch", "combine")
    return sum(v for p, v in row["mean_bytes_by_phase"].items() if p.split(":")[0] in phases)


def figures(r, floor_row, today, pruned, count, tpr, experts, d):
    """The output row: per rank per step, today and pruned, against the floor."""
    total, floor = r["bytes_per_rank"]["mean"], floor_row["bytes_per_rank"]["mean"]
    fwd, floor_fwd = forward_bytes(r), forward_bytes(floor_row)
    today_rr = (today[1] + today[2]) / count * tpr
    row = {"ranks": r["ranks"], "probes": r["probes"], "recall_at_k": r["recall_at_k"],
           "tokens_analysed": count,
           "today": {"ranks_per_token": today[0] / count, "requests_replies_per_rank": today_rr,
                     "bytes_vs_floor": total / floor, "forward_bytes_vs_floor": fwd / floor_fwd},
           "pruned": {}}
    for b, p in pruned.items():
        rr = (p[1] + p[2]) / count * tpr
        row["pruned"][str(b)] = {
            "ranks_per_token": p[0] / count, "survivors_per_token": p[3] / count,
            "requests_replies_per_rank": rr,
            "bytes_vs_floor": (total - today_rr + rr) / floor,
            "forward_bytes_vs_floor": (fwd - today_rr + rr) / floor_fwd,
            "replicated_key_bytes_per_rank": int(experts * (d * b // 8 + 8))}
    return row


def describe(row):
    pruned = " ".join(f"{b}-bit: {p['ranks_per_token']:.2f} ranks, {p['bytes_vs_floor']:.3f}x "
                      f"floor ({p['forward_bytes_vs_floor']:.3f}x fwd)"
                      for b, p in row["pruned"].items())
    t = row["today"]
    return (f"P={row['ranks']} m={row['probes']} recall {row['recall_at_k']:.3f}: today "
            f"{t['ranks_per_token']:.2f} ranks, {t['bytes_vs_floor']:.3f}x floor "
            f"({t['forward_bytes_vs_floor']:.3f}x fwd); {pruned}")


def traffic_main(a):
    sim = json.load(open(a.simulate_json))
    if sim.get("mode") != "weak":
        sys.exit(f"{a.simulate_json}: not a weak-scaling run (simulate --tokens-per-rank > 0)")
    cfg = sim["config"]
    k, d, tpr = cfg["k"], cfg["dim"], cfg["tokens_per_rank"]
    run = SavedRun(a.data_dir)
    bits_list = [int(b) for b in a.bits.split(",")]
    quant = {b: quantize(run.centers, b) for b in bits_list}
    n = tpr if a.tokens <= 0 else min(a.tokens, tpr)
    sparse = [r for r in sim["results"] if r["exchange"] == "sparse"]
    rows = [r for r in sparse if r["strategy"] == "air"]
    floors = {r["ranks"]: r for r in sparse if r["strategy"] == "dense-replicated"}
    if not rows:
        sys.exit(f"{a.simulate_json}: no air row with the sparse exchange "
                 "(simulate --exchange sparse or both)")
    out = []
    for r in rows:
        today, pruned = count_row(run, r, quant, k, tpr, n)
        count = n * len(r["sampled_ranks"])
        if n == tpr:
            check_recount(r, today, count)
        out.append(figures(r, floors[r["ranks"]], today, pruned, count, tpr,
                           run.centers.shape[0], d))
        print(describe(out[-1]), flush=True)
    result = {"analysis": "certified_requests", "simulate": cfg, "bits": bits_list,
              "tokens_per_rank_analysed": n, "rows": out}
    with open(a.out_json, "w") as f:
        json.dump(result, f, indent=1)
    if a.png:
        plot(out, bits_list, a.png)


def plot(rows, bits_list, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for P in sorted({r["ranks"] for r in rows}):
        rs = sorted((r for r in rows if r["ranks"] == P), key=lambda r: r["recall_at_k"])
        x = [r["recall_at_k"] for r in rs]
        ax.plot(x, [r["today"]["bytes_vs_floor"] for r in rs], "o-", label=f"today, P={P}")
        for b in bits_list:
            ax.plot(x, [r["pruned"][str(b)]["bytes_vs_floor"] for r in rs], "s--",
                    label=f"pruned with {b}-bit keys, P={P}")
    ax.axhline(1.2, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("recall@k of AIR (the same routes either way)")
    ax.set_ylabel("bytes per rank per step / dense-replicated")
    ax.set_title("AIR's layer traffic: requests to every list rank, or pruned")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
