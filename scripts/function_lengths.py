#!/usr/bin/env python3
"""Lines per function definition in C++ sources (a rough count for review).

A definition starts at a line that begins in column 0 (not a comment,
preprocessor line or namespace) and whose braces open a body; it ends when
the braces balance again. Reports the longest ones.

  scripts/function_lengths.py runtime comm [--top 10]
"""
import re
import sys
from pathlib import Path


def functions(path):
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if (not line or line[0] in " \t#/}" or line.startswith("namespace")
                or re.match(r"(struct|class|enum|using|template\s*<[^>]*>\s*(struct|class))\b", line)):
            i += 1
            continue
        # Gather the signature up to the first '{' (or a ';': a declaration).
        j = i
        while j < len(lines) and "{" not in lines[j] and ";" not in lines[j]:
            j += 1
        if j >= len(lines) or ";" in lines[j].split("{")[0]:
            i = j + 1
            continue
        depth, k = 0, j
        while k < len(lines):
            depth += lines[k].count("{") - lines[k].count("}")
            if depth <= 0:
                break
            k += 1
        name = re.sub(r"\s+", " ", line.split("(")[0]).strip()
        yield name, i + 1, k - i + 1
        i = k + 1


def main():
    args = sys.argv[1:]
    top = 10
    if "--top" in args:
        top = int(args[args.index("--top") + 1])
        del args[args.index("--top"):args.index("--top") + 2]
    rows = []
    for folder in args:
        for path in sorted(Path(folder).glob("*.cpp")):
            for name, line, length in functions(path):
                rows.append((length, f"{path}:{line}", name))
    for length, where, name in sorted(rows, reverse=True)[:top]:
        print(f"{length:5d}  {where}  {name}")


if __name__ == "__main__":
    main()
