"""AIR's first stage (which experts to score) compared on saved router data.

Reads the files `moe_lm.py --save-router-data` writes (centers [E, D] and
router inputs [T, D]; with `--load-bias-rate` the last center column carries
the selection bias and the last token column is a constant) and measures,
against the exact top-k of the (biased) logits z = token . center:

  air      today's AIR: spherical k-means on the centers, probe the m lists
           whose codewords score highest (the `airmoe_bench router` codebook);
  mips     the MIPS-to-nearest-neighbour transform: the centers get one more
           column sqrt(M^2 - |c|^2) (M the largest center norm), so all have
           norm M and the biased inner product orders them as Euclidean
           distance to [token, 0] does; the same codebook and probing on them.
           `mips_bandsB`: B norm bands, each with its own M and C/B codewords;
  bound    lists ordered by an upper bound of their best member,
           h.mu_L + |h| r_L + max_L b (mu_L the members' mean key, r_L their
           largest distance from it, b the bias), probed until the next
           list's bound is below the k-th best logit found: exact top-k with
           an adaptive shortlist. `bound_aA` replaces |h| r_L by A |h| r_L
           (A < 1: an optimistic estimate, stopping earlier); `meankey` probes
           a fixed m lists in the order of h.mu_L + max_L b;
  query_sN query-aware lists: a codebook trained on N tokens, each
           codeword's list the L experts its tokens' exact top-k picks most;
           refreshing them takes the exact routing of such a sample, counted
           as upkeep FLOPs per routed token (--sample-fraction of 2 E D).

With --drift-steps, one query-list setting (--drift-list) learned at the
saved biases is also scored after that many steps of moe_lm.py's load-bias
update on the frozen router (routers with a bias only): how fast the lists
go stale as the biases move.

Every option is scored on the last --test-tokens tokens (other sequences
than the ones before them), so the query lists never see the text they are
measured on. The shortlist is every expert stage 2 scores (distinct
experts: query lists overlap); stage 1 (probe scores, bounds, sampled exact
routing) is reported separately as FLOPs per token. docs/routing.md has the
commands and the results ("First-stage options on balanced and collapsed
routers"), e.g.

    /usr/bin/python3 examples/lm/first_stage.py \
        --data balanced_layer0=out/lm_balanced_dense16/router_data/dense_layer0 \
        --out out/first_stage --drift-steps 0,1,5,20,100,400
"""
import argparse
import json
import math
import os

import numpy as np


# ---------------------------------------------------------------- the data

def split_bias(centers, tokens):
    """(keys w [E, d], biases b [E], queries h [T, d]) when the tokens' last
    column is a constant c (the bias feature: b = c * last center column);
    otherwise the centers have no bias (b = 0) and w, h are the inputs."""
    last = tokens[:, -1]
    if tokens.shape[1] > 1 and np.all(last == last[0]) and last[0] != 0:
        return centers[:, :-1], centers[:, -1] * last[0], tokens[:, :-1]
    return centers, np.zeros(len(centers), dtype=centers.dtype), tokens


def exact_topk(z, k):
    """Indices of each row's k largest entries, best first (ties: lower index)."""
    part = np.argpartition(-z, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(z, part, 1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, 1)


def softmax_rows(z):
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


# ------------------------------------------------------ spherical k-means

def unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def spherical_kmeans(x, C, iterations=10, seed=1234):
    """Unit codewords [C, D] for the rows of x: k-means++ seeding (distance
    1 - cos) on a sample of at most 8 C rows, then Lloyd steps; an empty
    codeword takes the farthest member of the largest cluster (as
    router/codebook.cpp does; not its bits)."""
    u = unit_rows(x.astype(np.float64))
    rng = np.random.default_rng(seed)
    pts = u[np.sort(rng.choice(len(u), min(len(u), 8 * C), replace=False))]
    seeds = [int(rng.integers(len(pts)))]
    best = pts @ pts[seeds[0]]
    for _ in range(C - 1):
        dist = np.maximum(0.0, 1.0 - best)
        dist[seeds] = 0.0
        nxt = int(rng.choice(len(pts), p=dist / dist.sum())) if dist.sum() > 0 else \
            int(np.setdiff1d(np.arange(len(pts)), seeds)[0])
        seeds.append(nxt)
        best = np.maximum(best, pts @ pts[nxt])
    cw = pts[seeds].copy()
    for _ in range(iterations):
        sim = u @ cw.T
        a = sim.argmax(1)
        sums = np.zeros_like(cw)
        np.add.at(sums, a, u)
        counts = np.bincount(a, minlength=C)
        full = counts > 0
        cw[full] = unit_rows(sums[full])
        donors = np.argsort(-counts, kind="stable")
        for i, c in enumerate(np.flatnonzero(~full)):
            members = np.flatnonzero(a == donors[i])
            cw[c] = u[members[np.argmin(sim[members, donors[i]])]]
    return cw.astype(np.float32)


def nearest(x, cw):
    return (x @ cw.T).argmax(1)


# ----------------------------------------------------- the MIPS transform

def mips_keys(keys, radius=None):
    """[keys, sqrt(M^2 - |key|^2)]: every row gets norm M (the largest key
    norm unless given), and for queries [q, 0], q . key is unchanged while
    |[q, 0] - key'|^2 = |q|^2 + M^2 - 2 q . key orders keys by it exactly."""
    n2 = (keys.astype(np.float64) ** 2).sum(1)
    M2 = n2.max() if radius is None else radius ** 2
    extra = np.sqrt(np.maximum(M2 - n2, 0.0))
    return np.concatenate([keys.astype(np.float64), extra[:, None]], 1)


def mips_queries(q):
    return np.concatenate([q.astype(np.float64), np.zeros((len(q), 1))], 1)


# -------------------------------------------------------- the shortlists

class Lists:
    """Disjoint inverted lists: `owner[e]` is expert e's list."""

    def __init__(self, owner, C):
        self.owner = np.asarray(owner)
        self.C = C
        self.sizes = np.bincount(self.owner, minlength=C)

    def probe_mask(self, order, m, k):
        """Each token probes its first m lists of `order` [T, C] (and more
        until it holds >= k experts): [T, E] shortlist mask and sizes."""
        csum = np.cumsum(self.sizes[order], 1)
        n = np.maximum(m, (csum < k).sum(1) + 1)
        n = np.minimum(n, self.C)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(self.C)[None, :].repeat(len(order), 0), 1)
        return rank[:, self.owner] < n[:, None]


def shortlist_stats(z, mask, exact, probs, k):
    """recall@k and mass recall of the top-k of z inside `mask`, and the
    shortlist sizes (each True is one expert scored in stage 2)."""
    got = exact_topk(np.where(mask, z, -np.inf), k)
    hits = (got[:, :, None] == exact[:, None, :]).any(2).sum(1)
    sizes = mask.sum(1)
    got_mass = np.take_along_axis(probs, got, 1)
    got_mass[np.take_along_axis(~mask, got, 1)] = 0.0  # fewer than k experts
    mass = got_mass.sum(1) / np.take_along_axis(probs, exact, 1).sum(1)
    return {"recall": float(hits.mean() / k), "mass_recall": float(mass.mean()),
            "shortlist": float(sizes.mean()), "shortlist_p99": float(np.percentile(sizes, 99))}


def list_bounds(lists, w, b):
    """Per list: the members' mean key mu_L [C, d], their largest distance
    from it r_L, and their largest bias (empty lists: -inf)."""
    C, d = lists.C, w.shape[1]
    mu = np.zeros((C, d))
    np.add.at(mu, lists.owner, w.astype(np.float64))
    mu /= np.maximum(lists.sizes, 1)[:, None]
    r = np.zeros(C)
    np.maximum.at(r, lists.owner, np.linalg.norm(w - mu[lists.owner], axis=1))
    bmax = np.full(C, -np.inf)
    np.maximum.at(bmax, lists.owner, b.astype(np.float64))
    return mu, r, bmax


def bound_scores(lists, w, b, h, slack):
    """h.mu_L + slack |h| r_L + max b: with slack 1 an upper bound of every
    member's logit (Cauchy-Schwarz), with slack < 1 an optimistic estimate."""
    mu, r, bmax = list_bounds(lists, w, b)
    return h.astype(np.float64) @ mu.T + slack * np.linalg.norm(h, axis=1)[:, None] * r + bmax


def probe_until_bound(lists, z, est, k):
    """Probes lists in decreasing `est` and stops before the first list whose
    est is <= the k-th best logit found so far (or when all are probed).
    When est bounds every member's logit from above, the top-k found is the
    exact top-k. Returns the [T, E] shortlist mask."""
    T = len(z)
    order = np.argsort(-est, 1, kind="stable")
    est_sorted = np.take_along_axis(est, order, 1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(lists.C)[None, :].repeat(T, 0), 1)
    mask = np.zeros(z.shape, dtype=bool)
    for t in range(T):
        pos = rank[t, lists.owner]  # each expert's list position for this token
        zt = z[t]

        def done(n):  # n lists probed: is the k-th best >= the next estimate?
            if n >= lists.C:
                return True
            inside = zt[pos < n]
            return len(inside) >= k and np.partition(inside, -k)[-k] >= est_sorted[t, n]

        lo, hi = 1, lists.C  # smallest n with done(n), by bisection (done is monotone)
        while lo < hi:
            mid = (lo + hi) // 2
            if done(mid):
                hi = mid
            else:
                lo = mid + 1
        mask[t] = pos < lo
    return mask


def query_lists(train_tokens, train_exact, E, C, seed):
    """Codebook on the tokens and, per codeword, its tokens' pick counts
    [C, E] (how often each expert is in their exact top-k)."""
    cw = spherical_kmeans(train_tokens, C, seed=seed)
    a = nearest(train_tokens, cw)
    counts = np.zeros((C, E), dtype=np.int64)
    np.add.at(counts, (np.repeat(a, train_exact.shape[1]), train_exact.ravel()), 1)
    return cw, counts


def top_members(counts, length):
    """Membership [C, E]: each codeword's `length` most picked experts (only
    experts picked at least once)."""
    order = np.argsort(-counts, 1, kind="stable")[:, :length]
    member = np.zeros(counts.shape, dtype=bool)
    np.put_along_axis(member, order, True, 1)
    return member & (counts > 0)


# --------------------------------------------------------------- the study

def measure(centers, tokens, k, Cs, probes, slacks, lengths, samples, sample_fraction,
            test_tokens, seed=1234):
    """Every option's rows on one router's data (see the module docstring):
    the last `test_tokens` tokens are scored, the query lists learn from up
    to `samples` of the tokens before them."""
    E, D = centers.shape
    w, b, h = split_bias(centers, tokens)
    d = w.shape[1]
    half = len(tokens) - test_tokens
    train, test = tokens[:half], tokens[half:]
    z = test.astype(np.float64) @ centers.T.astype(np.float64)
    exact = exact_topk(z, k)
    probs = softmax_rows(z)
    h_test = h[half:]
    rows = []

    def add(option, C, setting, mask, stage1_flops, upkeep_flops=0.0):
        row = {"option": option, "C": C, "setting": setting,
               "stage1_flops": stage1_flops, "upkeep_flops": upkeep_flops}
        row.update(shortlist_stats(z, mask, exact, probs, k))
        row["total_mflops"] = (stage1_flops + upkeep_flops + 2 * D * row["shortlist"]) / 1e6
        rows.append(row)

    for C in Cs:
        ms = [m for m in probes if m <= C]
        # (a) today's AIR: cosine codebook on the centers as stored.
        cw = spherical_kmeans(centers, C, seed=seed)
        air = Lists(nearest(unit_rows(centers), cw), C)
        order = np.argsort(-(test @ cw.T), 1, kind="stable")
        for m in ms:
            add("air", C, {"m": m}, air.probe_mask(order, m, k), 2 * C * D)
        # (b) MIPS transform (one band, and norm bands).
        for bands in (1, 4):
            norms = np.linalg.norm(centers, axis=1)
            edges = np.quantile(norms, np.linspace(0, 1, bands + 1))
            band = np.clip(np.searchsorted(edges, norms, side="right") - 1, 0, bands - 1)
            if C % bands or np.bincount(band, minlength=bands).min() < C // bands:
                continue  # each band needs C / bands codewords and as many experts
            owner, cw_all, radius_of = np.empty(E, dtype=np.int64), [], []
            for j in range(bands):
                ids = np.flatnonzero(band == j)
                aug = mips_keys(centers[ids])
                cwb = spherical_kmeans(aug, C // bands, seed=seed + j)
                owner[ids] = nearest(unit_rows(aug), cwb) + j * (C // bands)
                cw_all.append(cwb)
                radius_of.append(np.full(C // bands, np.sqrt((aug[0] ** 2).sum())))
            cwm = np.concatenate(cw_all)[:, :D] * np.concatenate(radius_of)[:, None]
            mips = Lists(owner, C)
            order = np.argsort(-(test @ cwm.T), 1, kind="stable")
            name = "mips" if bands == 1 else f"mips_bands{bands}"
            for m in ms:
                add(name, C, {"m": m}, mips.probe_mask(order, m, k), 2 * C * D)
            if bands == 1:
                mips_lists = mips
        # (c) bound-ordered probing, on the cosine and on the MIPS lists.
        for lists_name, lists in (("air", air), ("mips", mips_lists)):
            for slack in slacks:
                est = bound_scores(lists, w, b, h_test, slack)
                name = f"bound_{lists_name}" + ("" if slack == 1 else f"_a{slack:g}")
                add(name, C, {"slack": slack}, probe_until_bound(lists, z, est, k),
                    2 * C * (d + 1))
            est = bound_scores(lists, w, b, h_test, 0.0)  # fixed m, mean-key order
            order = np.argsort(-est, 1, kind="stable")
            for m in ms:
                add(f"meankey_{lists_name}", C, {"m": m}, lists.probe_mask(order, m, k),
                    2 * C * (d + 1))
        # (d) query-aware lists from the exact routing of a sample of tokens.
        for sample in samples:
            if sample > len(train) or sample < C:
                continue
            z_train = train[:sample].astype(np.float64) @ centers.T.astype(np.float64)
            cwq, counts = query_lists(train[:sample], exact_topk(z_train, k), E, C, seed)
            order = np.argsort(-(test @ cwq.T), 1, kind="stable")
            for length in lengths:
                member = top_members(counts, length).astype(np.float32)
                for m in ms:
                    probed = np.zeros((len(test), C), dtype=np.float32)
                    np.put_along_axis(probed, order[:, :m], 1.0, 1)
                    add(f"query_s{sample}", C, {"m": m, "list_length": length},
                        (probed @ member) > 0, 2 * C * D,
                        upkeep_flops=sample_fraction * 2 * E * D)
    return rows


def drift_biases(w, b, h, k, steps, rate, batch):
    """The biases after `steps` of moe_lm.py's load-bias update on a frozen
    router: each step routes the next `batch` tokens of h exactly and moves
    every bias by `rate` against the sign of its load's excess over the mean."""
    b = b.astype(np.float64).copy()
    starts = np.arange(steps) * batch % max(len(h) - batch + 1, 1)
    for start in starts:
        z = h[start:start + batch].astype(np.float64) @ w.T.astype(np.float64) + b
        load = np.bincount(exact_topk(z, k).ravel(), minlength=len(b))
        b -= rate * np.sign(load - load.mean())
    return b


def stale_query_lists(centers, tokens, k, C, m, length, sample, test_tokens, drift_steps,
                      rate, batch, seed=1234):
    """How query lists learned before the biases moved hold up after: lists
    from `sample` tokens' exact routing at the saved biases, scored against
    the exact top-k after each number of load-bias steps in `drift_steps`."""
    w, b, h = split_bias(centers, tokens)
    train, test = tokens[:len(tokens) - test_tokens], tokens[len(tokens) - test_tokens:]
    z_train = train[:sample].astype(np.float64) @ centers.T.astype(np.float64)
    cwq, counts = query_lists(train[:sample], exact_topk(z_train, k), len(centers), C, seed)
    member = top_members(counts, length).astype(np.float32)
    probed = np.zeros((len(test), C), dtype=np.float32)
    np.put_along_axis(probed, np.argsort(-(test @ cwq.T), 1, kind="stable")[:, :m], 1.0, 1)
    mask = (probed @ member) > 0
    rows = []
    for steps in drift_steps:
        moved = drift_biases(w, b, h[:len(train)], k, steps, rate, batch)
        z = h[len(train):].astype(np.float64) @ w.T.astype(np.float64) + moved
        row = {"drift_steps": steps, "bias_change_rms": float(np.sqrt(np.mean((moved - b) ** 2))),
               "C": C, "m": m, "list_length": length, "sample": sample}
        row.update(shortlist_stats(z, mask, exact_topk(z, k), softmax_rows(z), k))
        rows.append(row)
    return rows


def best_at(rows, budget):
    """Each (option, C)'s best recall at a mean shortlist <= budget."""
    best = {}
    for r in rows:
        key = (r["option"], r["C"])
        if r["shortlist"] <= budget and (key not in best or r["recall"] > best[key]["recall"]):
            best[key] = r
    return sorted(best.values(), key=lambda r: -r["recall"])


def markdown(results, fractions=(64, 16, 4)):
    """Per data set and option: the best recall@k (over C and settings) at a
    mean shortlist <= E/64, E/16, E/4, with where it was reached."""
    lines = []
    for name, result in results.items():
        E = result["E"]
        lines += [f"**{name}** (E = {E:,}, D = {result['D']}, {result['T_test']:,} test tokens)", "",
                  "| option | " + " | ".join(f"≤ E/{f} = {E // f}" for f in fractions) + " |",
                  "|---|" + "---|" * len(fractions)]
        for option in dict.fromkeys(r["option"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["option"] == option]
            cells = []
            for f in fractions:
                fit = [r for r in rows if r["shortlist"] <= E / f]
                if not fit:
                    least = min(rows, key=lambda r: r["shortlist"])
                    cells.append(f"– (least: {least['shortlist']:.0f} at {least['recall']:.3f})")
                    continue
                r = max(fit, key=lambda r: r["recall"])
                setting = ", ".join(f"{k}={v:g}" for k, v in r["setting"].items())
                flops = (r["stage1_flops"] + r["upkeep_flops"]) / 1e3
                cells.append(f"{r['recall']:.3f} ({r['shortlist']:.0f}; C={r['C']}, {setting}; "
                             f"{flops:.0f} kFLOP)")
            lines.append(f"| {option} | " + " | ".join(cells) + " |")
        lines.append("")
        if result.get("drift"):
            r0 = result["drift"][0]
            lines += [f"Query lists (C={r0['C']}, m={r0['m']}, L={r0['list_length']}, "
                      f"N={r0['sample']}) learned at the saved biases, after load-bias steps:", "",
                      "| steps | bias moved (rms) | recall@k | mass recall | shortlist |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['drift_steps']} | {r['bias_change_rms']:.3f} | {r['recall']:.3f} | "
                      f"{r['mass_recall']:.3f} | {r['shortlist']:.0f} |" for r in result["drift"]]
            lines.append("")
    return "\n".join(lines)


def envelope(rows):
    """(shortlist, recall) points no other point beats at an equal or smaller
    shortlist: an option's best over its C and settings."""
    out = []
    for r in sorted(rows, key=lambda r: (r["shortlist"], -r["recall"])):
        if not out or r["recall"] > out[-1][1]:
            out.append((r["shortlist"], r["recall"]))
    return out


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    cols = min(2, len(names))
    grid = (math.ceil(len(names) / cols), cols)
    fig, axes = plt.subplots(*grid, figsize=(6 * grid[1], 4.6 * grid[0]), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, name in zip(axes.ravel(), names):
        rows = results[name]["rows"]
        for i, option in enumerate(dict.fromkeys(r["option"] for r in rows)):
            pts = envelope([r for r in rows if r["option"] == option])
            style = "o-" if option.startswith(("bound", "query")) else ".--"
            ax.plot(*zip(*pts), style, ms=3, lw=1, color=colors[i % 20], label=option)
        ax.axvline(results[name]["E"] / 16, color="grey", lw=0.8, ls=":")
        ax.axhline(0.9, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlim(8, results[name]["E"])
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name} (best over C)", fontsize=9)
        ax.set_xlabel("mean shortlist (experts scored in stage 2)")
        ax.set_ylabel("recall@8")
    axes[0][0].legend(fontsize=6, loc="upper left")
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_ints(text):
    return [int(x) for x in text.split(",") if x]


def report(name, result):
    E, k = result["E"], result["k"]
    print(f"\n{name}: E={E} D={result['D']}; best recall@{k} at a mean shortlist <= "
          f"E/16 = {E // 16}:")
    for r in best_at(result["rows"], E / 16):
        print(f"  {r['option']:<18} C={r['C']:<5} {json.dumps(r['setting']):<32} recall "
              f"{r['recall']:.3f} mass {r['mass_recall']:.3f} shortlist {r['shortlist']:.0f} "
              f"(p99 {r['shortlist_p99']:.0f}) stage1 {r['stage1_flops'] / 1e3:.0f} kFLOP "
              f"upkeep {r['upkeep_flops'] / 1e3:.0f} kFLOP", flush=True)
    for r in result.get("drift", []):
        print(f"  query lists (C={r['C']}, m={r['m']}, L={r['list_length']}, N={r['sample']}) "
              f"after {r['drift_steps']} load-bias steps (bias moved {r['bias_change_rms']:.3f} "
              f"rms): recall {r['recall']:.3f} mass {r['mass_recall']:.3f} "
              f"shortlist {r['shortlist']:.0f}", flush=True)


def measure_data(p, args, spec):
    name, _, stem = spec.partition("=")
    if not stem:
        p.error(f"--data {spec!r}: expected NAME=STEM")
    centers = np.load(stem + "_centers.npy").astype(np.float32)
    tokens = np.load(stem + "_tokens.npy").astype(np.float32)
    if centers.ndim != 2 or tokens.ndim != 2 or centers.shape[1] != tokens.shape[1]:
        p.error(f"--data {name}: centers {centers.shape} and tokens {tokens.shape} "
                "need the same number of columns")
    if not all(0 < C <= len(centers) for C in parse_ints(args.codewords)):
        p.error(f"--codewords {args.codewords}: each must be in [1, E = {len(centers)}]")
    if not 0 < args.test_tokens < len(tokens):
        p.error(f"--test-tokens {args.test_tokens}: {name} has {len(tokens)} tokens")
    if args.save_mips:
        os.makedirs(args.save_mips, exist_ok=True)
        stem_out = os.path.join(args.save_mips, name + "_mips")
        np.save(stem_out + "_centers.npy", mips_keys(centers).astype(np.float32))
        np.save(stem_out + "_tokens.npy", mips_queries(tokens).astype(np.float32))
    rows = measure(centers, tokens, args.k, parse_ints(args.codewords),
                   parse_ints(args.probes), [float(s) for s in args.slacks.split(",")],
                   parse_ints(args.list_lengths), parse_ints(args.samples),
                   args.sample_fraction, args.test_tokens)
    result = {"stem": stem, "args": {a: v for a, v in vars(args).items() if a != "merge"},
              "E": len(centers), "D": centers.shape[1], "T": len(tokens),
              "T_test": args.test_tokens, "k": args.k, "rows": rows}
    if args.drift_steps and split_bias(centers, tokens)[1].any():  # routers with a bias only
        C, m, length, sample = parse_ints(args.drift_list)
        result["drift"] = stale_query_lists(
            centers, tokens, args.k, C, m, length, sample, args.test_tokens,
            parse_ints(args.drift_steps), args.drift_rate, args.drift_batch)
    return name, result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", action="append", default=[],
                   help="NAME=STEM: STEM_centers.npy and STEM_tokens.npy (repeatable)")
    p.add_argument("--merge", action="append", default=[],
                   help="a first_stage.json of an earlier run: its data sets join this "
                        "report (repeatable; to run data sets in parallel processes)")
    p.add_argument("--out", required=True,
                   help="directory for first_stage.json, .png and .md (best recall per option "
                        "at a mean shortlist <= E/64, E/16, E/4)")
    p.add_argument("--save-mips", default="",
                   help="directory: also write each data set's MIPS-transformed centers "
                        "[E, D+1] and tokens [T, D+1] as NAME_mips_{centers,tokens}.npy, so that "
                        "`airmoe_bench router --centers --tokens` measures the mips option")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--codewords", default="64,256,1024")
    p.add_argument("--probes", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--slacks", default="1,0.3,0.1,0",
                   help="bound probing: weights A of |h| r_L (1: exact)")
    p.add_argument("--list-lengths", default="32,64,128,256",
                   help="query lists: experts per codeword")
    p.add_argument("--samples", default="2048,14336",
                   help="query lists: tokens whose exact routing trains them (each a line)")
    p.add_argument("--test-tokens", type=int, default=2048,
                   help="the last this many tokens are scored; the ones before train")
    p.add_argument("--sample-fraction", type=float, default=1 / 16,
                   help="query lists: share of routed tokens also routed exactly to refresh "
                        "them (counted as upkeep FLOPs per token)")
    p.add_argument("--drift-steps", default="",
                   help="also score one query-list setting (--drift-list C,m,L,N) after this "
                        "many load-bias steps on the frozen router (comma-separated)")
    p.add_argument("--drift-list", default="256,4,256,14336",
                   help="the query lists --drift-steps scores: C,m,L,N")
    p.add_argument("--drift-rate", type=float, default=0.05,
                   help="the load-bias step (moe_lm.py --load-bias-rate)")
    p.add_argument("--drift-batch", type=int, default=1024,
                   help="tokens per load-bias step (moe_lm.py: batch x seq)")
    args = p.parse_args(argv)
    if not args.data and not args.merge:
        p.error("nothing to report: give --data or --merge")
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for path in args.merge:
        with open(path) as f:
            for name, result in json.load(f)["results"].items():
                if name in results:
                    p.error(f"--merge {path}: data set {name!r} is there twice")
                results[name] = result
    for spec in args.data:
        name, result = measure_data(p, args, spec)
        if name in results:
            p.error(f"--data {spec!r}: data set {name!r} is there twice")
        results[name] = result
    results = dict(sorted(results.items()))
    for name, result in results.items():
        report(name, result)
    with open(os.path.join(args.out, "first_stage.json"), "w") as f:
        json.dump({"results": results}, f, separators=(",", ":"))
    chart(results, os.path.join(args.out, "first_stage.png"))
    with open(os.path.join(args.out, "first_stage.md"), "w") as f:
        f.write(markdown(results))
    print(f"wrote {args.out}/first_stage.json, .png and .md")


if __name__ == "__main__":
    main()
