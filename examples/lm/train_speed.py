#!/usr/bin/python3
"""Training tokens/s of one config of study.py's balanced plan (E = 4,096),
one thread, with the moe_lm.py found in --moe-lm-dir (default: this one), so
that two versions can be timed alternately in the same conditions.

usage: PYTHONPATH=build/python /usr/bin/python3 examples/lm/train_speed.py
           dense [--steps 30] [--moe-lm-dir DIR]
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a name in study.BALANCED_GRID[4096]")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--moe-lm-dir", default=HERE)
    cli = parser.parse_args()
    if cli.steps < 1:
        parser.error(f"--steps must be >= 1, got {cli.steps}")
    if not os.path.isfile(os.path.join(cli.moe_lm_dir, "moe_lm.py")):
        parser.error(f"--moe-lm-dir: no moe_lm.py in {cli.moe_lm_dir}")
    sys.path[:0] = [os.path.abspath(cli.moe_lm_dir), HERE]
    import torch
    import moe_lm  # before study.py, which puts its own folder first on the path
    import study
    torch.set_num_threads(1)
    configs = {name: (router, options) for name, router, options in study.BALANCED_GRID[4096]}
    if cli.config not in configs:
        parser.error(f"config: {cli.config!r} is not one of {sorted(configs)}")
    router, options = configs[cli.config]
    args = moe_lm.make_parser().parse_args([])
    for key, value in {**study.BALANCED_BASE, **options}.items():
        setattr(args, key, value)
    args.experts, args.routers, args.seed, args.steps = 4096, router, 0, cli.steps
    args.eval_batches = 2  # the evaluation is not timed
    train, val = moe_lm.load_splits(args.corpus)
    make_router, flops = moe_lm.routers(args)[router]
    result = moe_lm.train(cli.config, make_router, flops, train, val, args)
    print(f"{moe_lm.__file__} {cli.config}: {result['tokens_per_s']:.0f} tokens/s, "
          f"last train losses {result['train_curve'][-3:]}")


if __name__ == "__main__":
    main()
