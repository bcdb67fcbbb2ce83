#!/usr/bin/python3
"""Compares two builds' `airmoe_bench router` runs (an A/B, run alternately:
before, after, before, after) and prints Markdown tables:

- every row's tokens/s per run for each build and after ÷ before (best run);
- each row that is not plain AIR against plain lists at equal shortlist: its
  tokens/s ÷ the plain rows' of the same build, interpolated log-log between
  the two plain rows around its shortlist (rows outside the plain rows' range
  are left out), before and after, and after ÷ plain before.

The builds must route the same: recall@k and mean shortlist must agree in
every row, or the script stops naming the row.

usage: router_ab.py --before B1.json [B2.json ...] --after A1.json [A2.json ...]
"""
import argparse
import json
import math
import sys


def load_rows(path):
    with open(path) as f:
        rows = json.load(f)["results"]
    return {(r["router"], r["probes"]): r for r in rows}


def best(runs, key):
    return max(run[key]["tokens_per_s"] for run in runs)


def check_same_routes(before, after):
    for key, row in before[0].items():
        for run in before + after:
            other = run.get(key)
            if other is None:
                sys.exit(f"row {key} is missing from a run")
            for field in ("recall_at_k", "shortlist_mean"):
                if abs(other[field] - row[field]) > 1e-9:
                    sys.exit(f"row {key}: {field} {other[field]} differs from {row[field]}")


def plain_at(runs, shortlist):
    """Plain AIR's best tokens/s at `shortlist`, log-log between its rows."""
    plain = sorted((r["shortlist_mean"], best(runs, key))
                   for key, r in runs[0].items() if key[0] == "air")
    for (s0, v0), (s1, v1) in zip(plain, plain[1:]):
        if s0 <= shortlist <= s1:
            w = (math.log(shortlist) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return math.exp((1 - w) * math.log(v0) + w * math.log(v1))
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", nargs="+", required=True)
    parser.add_argument("--after", nargs="+", required=True)
    args = parser.parse_args()
    before = [load_rows(p) for p in args.before]
    after = [load_rows(p) for p in args.after]
    check_same_routes(before, after)
    keys = sorted(before[0], key=lambda k: (k[1], k[0]))

    print("| router | m | shortlist | recall@8 | before: tok/s (runs) | after: tok/s (runs) "
          "| after ÷ before (best) |")
    print("|---|---|---|---|---|---|---|")
    for key in keys:
        row = before[0][key]
        runs_b = ", ".join(f"{run[key]['tokens_per_s']:,.0f}" for run in before)
        runs_a = ", ".join(f"{run[key]['tokens_per_s']:,.0f}" for run in after)
        print(f"| {key[0]} | {key[1]} | {row['shortlist_mean']:.0f} | {row['recall_at_k']:.3f} "
              f"| {runs_b} | {runs_a} | {best(after, key) / best(before, key):.2f} |")

    print()
    print("| router | m | shortlist | recall@8 | ÷ plain at equal shortlist, before | after "
          "| after ÷ plain before |")
    print("|---|---|---|---|---|---|---|")
    for key in keys:
        row = before[0][key]
        if key[0] in ("air", "dense"):
            continue
        plain_b = plain_at(before, row["shortlist_mean"])
        plain_a = plain_at(after, row["shortlist_mean"])
        if plain_b is None or plain_a is None:
            continue
        tb, ta = best(before, key), best(after, key)
        print(f"| {key[0]} | {key[1]} | {row['shortlist_mean']:.0f} | {row['recall_at_k']:.3f} "
              f"| {tb / plain_b:.2f} | {ta / plain_a:.2f} | {ta / plain_b:.2f} |")


if __name__ == "__main__":
    main()
