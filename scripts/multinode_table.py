#!/usr/bin/python3
"""The table of docs/multinode.md: per-phase seconds of each strategy of
`airmoe_bench layer`, one JSON per network setting, the setting named by the
file (multinode_<setting>.json); the first file is the baseline of the
"x unshaped" column.

usage: multinode_table.py multinode_<setting>.json...
"""
import json
import os
import sys

PHASES = ("route", "dispatch", "experts", "combine", "backward_dispatch", "backward_experts",
          "backward_combine", "total")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    runs = []
    for path in sys.argv[1:]:
        name = os.path.basename(path)
        setting = name[len("multinode_"):-len(".json")] if name.startswith("multinode_") else name
        with open(path) as f:
            runs.append((setting, json.load(f)))
    base = {r["strategy"]: r["seconds"]["total"] for r in runs[0][1]["results"]}
    print("| network | strategy | fwd MB | " + " | ".join(PHASES) + " | x unshaped |")
    print("|---" * (len(PHASES) + 4) + "|")
    for setting, j in runs:
        for r in j["results"]:
            s = r["seconds"]
            cells = " | ".join(f"{s[p]:.3f}" for p in PHASES)
            print(f"| {setting} | {r['strategy']} | {r['bytes_forward'] / 1e6:.2f} | {cells} | "
                  f"{s['total'] / base[r['strategy']]:.2f} |")


if __name__ == "__main__":
    main()
