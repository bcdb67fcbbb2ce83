#!/usr/bin/python3
"""Splits saved router data whose last column carries a selection bias --
keys [w_e, b_e] and tokens [h, s] with the same s in every token, so that
[h, s]·[w_e, b_e] = h·w_e + s b_e -- into centers w [E, d], a bias s b [E, 1]
and tokens h [T, d], for `airmoe_bench simulate --bias` and the router
benchmark's --bias.

usage: split_bias_column.py CENTERS.npy TOKENS.npy OUT_DIR
"""
import os
import sys

import numpy as np


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    keys, tokens = np.load(sys.argv[1]), np.load(sys.argv[2])
    if keys.ndim != 2 or tokens.ndim != 2 or keys.shape[1] != tokens.shape[1] or keys.shape[1] < 2:
        sys.exit(f"{sys.argv[1]} {keys.shape}, {sys.argv[2]} {tokens.shape}: expected [E, d + 1] "
                 f"and [T, d + 1]")
    scale = tokens[:, -1]
    if not np.all(scale == scale[0]):
        sys.exit(f"{sys.argv[2]}: the last column is not the same in every token")
    os.makedirs(sys.argv[3], exist_ok=True)
    out = {"centers.npy": keys[:, :-1], "bias.npy": scale[0] * keys[:, -1:],
           "tokens.npy": tokens[:, :-1]}
    for name, a in out.items():
        np.save(os.path.join(sys.argv[3], name), np.ascontiguousarray(a, dtype=np.float32))
    print(f"wrote centers {out['centers.npy'].shape}, bias {out['bias.npy'].shape} (scale "
          f"{scale[0]:g}), tokens {out['tokens.npy'].shape} to {sys.argv[3]}")


if __name__ == "__main__":
    main()
