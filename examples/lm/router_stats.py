#!/usr/bin/python3
"""How a trained router uses its experts, from the .npy files that
`moe_lm.py --save-router-data` writes (centers [E, d], router inputs [T, d]).

For each (centers, tokens) pair it reports, against exact top-k:
- utilization: the share of the E experts that any token picks, and the
  effective number of experts exp(entropy of the load);
- how concentrated the load is: the share of the T*k routing slots that the
  E/64, E/16 and E/4 most used experts hold;
- two shortlists of E/16 experts built from half of the tokens and scored
  on the other half: the same most-used experts for every token
  ("popular"), and "query lists": a spherical k-means codebook of C = sqrt(E)
  codewords trained on the tokens, list c holding the E/C experts the
  tokens of codeword c picked most (ties by the codeword's own scores),
  probed in score order until the shortlist holds E/16 experts.

AIR's codebook and lists are trained on the expert centers; the rows here
say what is left to gain by looking at the tokens, and whether a router has
collapsed onto a few experts (then any shortlist of the popular experts
reaches a high recall and the recall says little).

usage: /usr/bin/python3 examples/lm/router_stats.py DIR/<name>_layer<i> [...] [--json OUT]
"""
import argparse
import json
import math

import numpy as np


def exact_topk(tokens, centers, k):
    scores = tokens @ centers.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return top


def recall(shortlists, exact):
    k = exact.shape[1]
    return float(np.mean([len(short.intersection(row)) / k
                          for short, row in zip(shortlists, exact.tolist())]))


def spherical_kmeans(x, count, iterations, rng):
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    codebook = unit[rng.choice(len(unit), count, replace=False)].copy()
    for _ in range(iterations):
        nearest = np.argmax(unit @ codebook.T, axis=1)
        for c in range(count):
            members = unit[nearest == c]
            if len(members):
                total = members.sum(0)
                codebook[c] = total / max(np.linalg.norm(total), 1e-12)
    return codebook


def query_lists(build, exact_build, centers, codewords, rng):
    num_experts = len(centers)
    codebook = spherical_kmeans(build, codewords, 10, rng)
    nearest = np.argmax(build @ codebook.T, axis=1)
    size = max(1, num_experts // codewords)
    lists = []
    for c in range(codewords):
        counts = np.bincount(exact_build[nearest == c].ravel(), minlength=num_experts)
        # counts first; the codeword's own score breaks ties (and fills lists
        # whose tokens picked fewer than `size` distinct experts)
        score = codebook[c] @ centers.T
        order = np.lexsort((-score, -counts))
        lists.append(set(order[:size].tolist()))
    return codebook, lists


def probe_until(tokens, codebook, lists, budget):
    order = np.argsort(-(tokens @ codebook.T), axis=1)
    shortlists = []
    for row in order:
        short = set()
        for c in row:
            if len(short) >= budget:
                break
            short |= lists[c]
        shortlists.append(short)
    return shortlists


def stats(stem, k, seed):
    centers = np.load(stem + "_centers.npy").astype(np.float64)
    tokens = np.load(stem + "_tokens.npy").astype(np.float64)
    num_experts = len(centers)
    exact = exact_topk(tokens, centers, k)
    load = np.bincount(exact.ravel(), minlength=num_experts)
    p = load[load > 0] / load.sum()
    by_use = np.sort(load)[::-1]
    row = {"data": stem, "experts": num_experts, "tokens": len(tokens), "k": k,
           "utilization": float((load > 0).mean()),
           "effective_experts": float(math.exp(-(p * np.log(p)).sum())),
           "slots_held_by_top": {f"E/{f}": float(by_use[:num_experts // f].sum() / load.sum())
                                 for f in (64, 16, 4)}}
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(tokens))
    build, held = perm[:len(tokens) // 2], perm[len(tokens) // 2:]
    budget = num_experts // 16
    popular = set(np.argsort(-np.bincount(exact[build].ravel(), minlength=num_experts),
                             kind="stable")[:budget].tolist())
    row["popular_recall"] = recall([popular] * len(held), exact[held])
    codewords = 2 ** round(math.log2(math.sqrt(num_experts)))
    codebook, lists = query_lists(tokens[build], exact[build], centers, codewords, rng)
    shortlists = probe_until(tokens[held], codebook, lists, budget)
    row.update(query_lists_C=codewords, shortlist_budget=budget,
               query_lists_recall=recall(shortlists, exact[held]),
               query_lists_shortlist=float(np.mean([len(s) for s in shortlists])))
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stems", nargs="+", help="path prefixes: <stem>_centers.npy, <stem>_tokens.npy")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args()
    rows = [stats(stem, args.k, args.seed) for stem in args.stems]
    print("| data | used | effective experts | slots held by top E/16 | "
          "popular E/16 recall | query lists recall (shortlist) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data'].split('/')[-1]} | {r['utilization']:.3f} | "
              f"{r['effective_experts']:,.0f} of {r['experts']:,} | "
              f"{r['slots_held_by_top']['E/16']:.3f} | {r['popular_recall']:.3f} | "
              f"{r['query_lists_recall']:.3f} ({r['query_lists_shortlist']:.0f}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
