#!/usr/bin/python3
"""Writes the fuzz seed corpus (tests/fuzz/corpus): a few valid .npy files
and a few malformed ones, hand-made so no NumPy is needed.

usage: make_corpus.py [DIR]
"""
import os
import struct
import sys


def npy(header_dict, data=b"", version=1):
    header = header_dict.encode()
    prefix = 10 if version == 1 else 12
    pad = (64 - (prefix + len(header) + 1) % 64) % 64
    header += b" " * pad + b"\n"
    size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + size + header + data


def floats(values):
    return struct.pack(f"<{len(values)}f", *values)


def shape(rows, cols):
    return f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")
    os.makedirs(out, exist_ok=True)
    seeds = {
        "valid_4x3": npy(shape(4, 3), floats([0.5 * i - 2 for i in range(12)])),
        "valid_3x2_v2": npy(shape(3, 2), floats([1, -1, 2, 0.25, -3, 4]), version=2),
        "valid_empty_0x5": npy(shape(0, 5)),
        "huge_values_2x2": npy(shape(2, 2), floats([3e38, 1, -3e38, 2])),
        "zero_row_3x2": npy(shape(3, 2), floats([0, 0, 1, 2, 3, 4])),
        "zero_columns": npy(shape(1000000000000000000, 0)),
        "negative_dim": npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 2), }",
                            floats([1, 2, 3, 4])),
        "fortran_0": npy("{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 2), }",
                         floats([1, 2, 3, 4])),
        "truncated": npy(shape(4, 4), floats([1, 2, 3])),
    }
    for name, data in seeds.items():
        with open(os.path.join(out, name + ".npy"), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
