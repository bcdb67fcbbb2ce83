#!/usr/bin/python3
"""The routing study: the byte-level MoE LM of moe_lm.py trained with every
router configuration for the same tokens and seeds, on Debian's GCIDE
dictionary (40 MB of English). Per configuration it reports the validation
loss (mean and spread over seeds), routing FLOPs per token, training
tokens/s, and AIR's recall, mass recall and shortlist over training; it
draws the validation loss against routing FLOPs, the loss curves and AIR's
recall curves.

Runs go to <out>/runs/<E>_<config>_s<seed>.json, one file each, written
when the run ends; a run in progress saves a checkpoint under <out>/partial
every CHECKPOINT_EVERY steps: an interrupted study resumes where it
stopped, a run in the middle from its last checkpoint. The workers end
with the study (killed or stopped, they do not train on unseen), and a run
another process is training (partial/<run>.lock) is refused, not trained
twice into one checkpoint. A stored
run counts only if it was made with the settings asked for now (its stored
moe_lm arguments, all but where outputs go); if any was made with others,
the study refuses before training, naming the differences: use another
--out, or delete those runs to redo them.

usage: PYTHONPATH=build/python /usr/bin/python3 examples/lm/study.py [--jobs 2] [--out DIR]
"""
import argparse
import concurrent.futures
import ctypes
import fcntl
import json
import math
import multiprocessing
import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_lm  # noqa: E402

# (name, router, moe_lm options) per E. AIR's C is sqrt(E) (recommended_air);
# m spans 1/20 to 1/8 of dense routing's FLOPs; "spilled" adds one SOAR
# spill per expert at half the probes, so its shortlist matches the largest
# plain m (equal FLOPs, routing.md's best recall option on learned centers).
GRID = {
    4096: [
        ("dense", "dense", {}),
        ("product_key", "product_key", {}),
        ("air_C64_m2", "air", {"codewords": 64, "probes": 2}),
        ("air_C64_m4", "air", {"codewords": 64, "probes": 4}),
        ("air_C64_m6", "air", {"codewords": 64, "probes": 6}),
        ("air_C64_m3_spill1", "air", {"codewords": 64, "probes": 3, "spills": 1}),
    ],
    16384: [
        ("dense", "dense", {}),
        ("product_key", "product_key", {}),
        ("air_C128_m4", "air", {"codewords": 128, "probes": 4}),
        ("air_C128_m12", "air", {"codewords": 128, "probes": 12}),
        ("air_C128_m6_spill1", "air", {"codewords": 128, "probes": 6, "spills": 1}),
    ],
}

# The model and schedule every run shares (moe_lm.py option names).
BASE = {"corpus": "gcide", "k": 8, "dim": 128, "heads": 4, "layers": 2, "hidden": 4, "seq": 64,
        "batch": 16, "lr": 3e-3, "lr_schedule": "cosine", "warmup": 20, "eval_every": 50,
        "eval_batches": 4, "threads": 1, "load_bias_rate": 0.0, "steps": 400}

# The next study (docs/lm.md, "The next study: criteria fixed before its
# runs"): every router balanced in its own form, k * h = 128, 5M tokens per
# run (4,883 steps of 16 x 64), 64 evaluation batches, hash routing and
# product keys at three FLOP points as controls, one probe at E = 65,536.
# AIR runs with key-codebook lists and, as the plan asks, with query-aware
# lists (air_query: refreshed every 128 steps from the last 4,096 training
# tokens, whose builds count in the routing FLOPs); m probes of lists of L
# keep the shortlist near m * L <= E/16 (measured on short runs, docs/lm.md).
QUERY_UPKEEP = {"list_refresh": 128, "list_sample": 4096}
# moe_lm.py --expert-updates sparse: only the experts a step routed to move
LAZY_EXPERTS = {"expert_updates": "sparse"}
BALANCED_GRID = {
    4096: [
        ("dense", "dense", {"full_balance": 0.01}),
        ("product_key", "product_key", {}),
        ("product_key_h2", "product_key_h2", {}),
        ("product_key_h4", "product_key_h4", {}),
        ("hash", "hash", {}),
        ("air_C64_m6", "air", {"codewords": 64, "probes": 6}),
        ("air_C64_m3_spill1", "air", {"codewords": 64, "probes": 3, "spills": 1}),
        ("air_query_C64_L256_m1", "air_query",
         {"codewords": 64, "probes": 1, "list_length": 256, **QUERY_UPKEEP}),
        ("air_query_C64_L128_m2", "air_query",
         {"codewords": 64, "probes": 2, "list_length": 128, **QUERY_UPKEEP}),
        # A diagnostic, not a FLOP point of the plan: the same lists rebuilt
        # 4x as often (4x their upkeep), to see how much of air_query's gap
        # is the lists' lag behind the moving bias.
        ("air_query_C64_L256_m1_r32", "air_query",
         {"codewords": 64, "probes": 1, "list_length": 256, **QUERY_UPKEEP, "list_refresh": 32}),
        # ... and at the plan's upkeep: rebuilt every 32 steps from the last
        # 1,024 tokens (the same build FLOPs per routed token as 4,096 every 128).
        ("air_query_C64_L256_m1_r32_s1024", "air_query",
         {"codewords": 64, "probes": 1, "list_length": 256, "list_refresh": 32,
          "list_sample": 1024}),
        # ... and the plan's row with every bias kept within one logit spread:
        # without a cap, experts in no probed list gain bias every step until
        # it alone decides the exact top-k the lists are built from.
        ("air_query_C64_L256_m1_cap1", "air_query",
         {"codewords": 64, "probes": 1, "list_length": 256, **QUERY_UPKEEP, "bias_cap": 1.0}),
        # ... and the plan's row with lists that count each sample token's
        # top-32, not only its top-8: lists filled toward L reach the experts
        # a 4,096-token sample's top-8 leaves out (docs/routing.md, "How deep
        # the lists count"), with no cap on the bias
        ("air_query_C64_L256_m1_k32", "air_query",
         {"codewords": 64, "probes": 1, "list_length": 256, **QUERY_UPKEEP, "list_k": 32}),
        # ... and with both: the cap on the unreachable experts' biases and
        # the deeper count that leaves fewer experts unreachable
        ("air_query_C64_L256_m1_cap1_k32", "air_query",
         {"codewords": 64, "probes": 1, "list_length": 256, **QUERY_UPKEEP, "bias_cap": 1.0,
          "list_k": 32}),
    ],
    16384: [
        ("dense", "dense", {"full_balance": 0.01}),
        ("product_key", "product_key", {}),
        ("product_key_h2", "product_key_h2", {}),
        ("product_key_h4", "product_key_h4", {}),
        ("hash", "hash", {}),
        ("air_C128_m12", "air", {"codewords": 128, "probes": 12}),
        ("air_query_C128_L256_m4", "air_query",
         {"codewords": 128, "probes": 4, "list_length": 256, **QUERY_UPKEEP}),
    ],
    # The probe: lazy Adam on the experts (LAZY_EXPERTS), for every router
    # alike. Dense AdamW over 65,536 experts' weights is most of a step
    # whatever the router (product keys: 217 tokens/s with it, 2,299
    # without, one thread); this way the probe fits the machine.
    65536: [
        ("dense", "dense", {"full_balance": 0.01, **LAZY_EXPERTS}),
        ("product_key", "product_key", LAZY_EXPERTS),
        ("hash", "hash", LAZY_EXPERTS),
        ("air_C256_m16", "air", {"codewords": 256, "probes": 16, **LAZY_EXPERTS}),
        ("air_query_C256_L256_m16", "air_query",
         {"codewords": 256, "probes": 16, "list_length": 256, **QUERY_UPKEEP, **LAZY_EXPERTS}),
        # diagnostic: E = 4,096's best AIR row's two changes (the bias cap and
        # lists counting the top-32), chosen after its runs
        ("air_query_C256_L256_m16_cap1_k32", "air_query",
         {"codewords": 256, "probes": 16, "list_length": 256, **QUERY_UPKEEP, **LAZY_EXPERTS,
          "bias_cap": 1.0, "list_k": 32}),
    ],
}
# The sizes run as a probe only: criteria 2-4 are not read there.
PROBES = (65536,)
# Rows added after the plan's runs were seen, to explain them: reported and
# marked, but not read by the criteria (they were chosen knowing the results).
DIAGNOSTICS = frozenset({
    "air_query_C64_L256_m1_r32", "air_query_C64_L256_m1_r32_s1024", "air_query_C64_L256_m1_cap1",
    "air_query_C64_L256_m1_k32", "air_query_C64_L256_m1_cap1_k32",
    "air_query_C256_L256_m16_cap1_k32"})
# The routers the criteria read as AIR: key-codebook and query-aware lists.
AIR_ROUTERS = ("air", "air_query")
BALANCED_BASE = {**BASE, "hidden": 16, "warmup": 100, "eval_every": 500, "eval_batches": 64,
                 "bias_balance": 0.01, "load_window": 32, "steps": 4883}

# Steps between a run's checkpoints (about 4 minutes of one thread at the
# balanced plan's rate).
CHECKPOINT_EVERY = 250

PLANS = {"first": (GRID, BASE), "balanced": (BALANCED_GRID, BALANCED_BASE)}


def run_args(study, experts, router, options, seed):
    args = moe_lm.make_parser().parse_args([])
    for key, value in {**study.base, **options}.items():
        setattr(args, key, value)
    args.experts, args.routers, args.seed = experts, router, seed
    if study.steps is not None:
        args.steps = study.steps
    if study.load_bias_rate is not None:
        args.load_bias_rate = study.load_bias_rate
    for key in ("dim", "layers", "batch", "seq", "eval_every", "eval_batches"):
        if getattr(study, key) is not None:
            setattr(args, key, getattr(study, key))
    return args


def die_with_parent():
    """Pool initializer: the worker gets SIGTERM when the study's process
    ends, however it ends (Linux prctl PR_SET_PDEATHSIG). A worker that
    outlived a killed study would go on writing its checkpoint after a
    resumed run had finished and removed it."""
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() == 1:  # the study ended before the call
        os._exit(1)


def hold_run_lock(name, args):
    """An exclusive lock on partial/<name>.lock for as long as the returned
    file stays open; raises, naming the run, when another process holds it."""
    path = os.path.join(args.checkpoint_dir, f"{name}.lock")
    lock = open(path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeError(f"{name}: another process is training this run now (it holds {path}); "
                           f"stop it, or wait for it to finish") from None
    return lock


def run_one(job):
    """One training run in a worker process; returns its result path."""
    path, args, name = job
    with hold_run_lock(name, args):
        return train_and_store(path, args, name)


def train_and_store(path, args, name):
    import torch
    torch.set_num_threads(args.threads)
    train_data, val_data = moe_lm.load_splits(args.corpus)
    make_router, flops = moe_lm.routers(args)[args.routers]
    # result["wall_s"]: the run's wall seconds over all its segments (a run
    # resumed from its checkpoint counts the time before the kill too)
    result = moe_lm.train(name, make_router, flops, train_data, val_data, args)
    result.update(config=name, experts=args.experts, seed=args.seed, args=vars(args))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)
    moe_lm.discard_checkpoint(name, args)
    return path


def run_path(study, experts, name, seed):
    return os.path.join(study.out, "runs", f"E{experts}_{name}_s{seed}.json")


def grid_jobs(study, configs=()):
    """(path, moe_lm arguments, name) of each run of the grid for --experts
    and --seeds, of the `configs` given (all of them: what aggregate() may
    read)."""
    out = []
    for experts in study.experts:
        for name, router, options in study.grid[experts]:
            if configs and name not in configs:
                continue
            for seed in study.seeds:
                path = run_path(study, experts, name, seed)
                args = run_args(study, experts, router, options, seed)
                if seed == study.seeds[0]:  # learned centers for airmoe_bench router
                    args.save_router_data = os.path.join(study.out, "router_data")
                    # 16,384 inputs: query lists built from a sample as large
                    # as training's (4,096) leave the rest to measure on
                    args.save_batches = 16
                # a killed run resumes from its last checkpoint (a few minutes back)
                args.checkpoint_dir = os.path.join(study.out, "partial")
                args.checkpoint_every = CHECKPOINT_EVERY
                out.append((path, args, f"E{experts}_{name}_s{seed}"))
    return out


def jobs(study):
    """The runs --configs selects."""
    return grid_jobs(study, study.configs)


settings = moe_lm.run_settings  # a stored run's arguments that decide what it computed


def setting_differences(path, args):
    """How the run stored at `path` differs from the arguments asked for
    ([] when it matches, or when there is no run there yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        stored = settings(json.load(f).get("args", {}))
    return moe_lm.settings_differences(stored, args, "stored")


def stale_runs(study):
    """One line per stored run made with other settings than asked for."""
    out = []
    for path, args, _ in grid_jobs(study):
        diff = setting_differences(path, args)
        if diff:
            out.append(f"{path}: " + "; ".join(diff))
    return out


def run_all(study):
    every = jobs(study)
    todo = [j for j in every if not os.path.exists(j[0])]
    total = len(every)
    print(f"study: {total} runs, {total - len(todo)} already done, {len(todo)} to run "
          f"on {study.jobs} worker(s)", flush=True)
    if not todo:
        return
    start = time.time()
    for done, path in enumerate(run_in_workers(run_one, todo, study.jobs), 1):
        elapsed = time.time() - start
        eta = elapsed / done * (len(todo) - done)
        print(f"study: {done}/{len(todo)} done ({os.path.basename(path)}), "
              f"{elapsed / 60:.1f} min elapsed, about {eta / 60:.1f} min left", flush=True)


def run_in_workers(work, todo, workers):
    """work(job) for each (path, args, name) job, yielded as each finishes,
    each job in a fresh spawned process: a finished run's memory goes back to
    the machine before the next starts (at E = 65,536 an idle worker kept
    3.5 GB of its finished run, and a run started beside another met the
    out-of-memory killer). A worker that dies mid-run stops the study with the names of
    the runs left unfinished, where multiprocessing.Pool waited forever."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=die_with_parent,
                                                max_tasks_per_child=1) as pool:
        futures = {pool.submit(work, job): job[2] for job in todo}
        for future in concurrent.futures.as_completed(futures):
            try:
                result = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                unfinished = sorted(name for f, name in futures.items()
                                    if not f.done() or f.cancelled() or f.exception() is not None)
                raise RuntimeError(
                    f"a worker process died without a result (killed, e.g. by the kernel's "
                    f"out-of-memory killer: see dmesg); unfinished runs: "
                    f"{', '.join(unfinished)}. Each resumes from its last checkpoint when "
                    f"the study runs again") from None
            yield result


def spread(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(study):
    """Per (E, configuration): means and spreads over seeds, and mean curves."""
    rows = []
    for experts in study.experts:
        for name, router, options in study.grid[experts]:
            runs = []
            for seed in study.seeds:
                path = run_path(study, experts, name, seed)
                if os.path.exists(path):
                    with open(path) as f:
                        runs.append(json.load(f))
            if not runs:
                continue
            steps = [e["step"] for e in runs[0]["evals"]]
            def curve(key):  # the mean over the runs that have the metric
                values = [[r["evals"][i][key] for r in runs
                           if r["evals"][i].get(key) is not None] for i in range(len(steps))]
                return [statistics.mean(v) if v else None for v in values]

            losses = [r["val_loss"] for r in runs]
            row = {"experts": experts, "config": name, "router": router, "options": options,
                   "diagnostic": name in DIAGNOSTICS,
                   "seeds": [r["seed"] for r in runs], "val_loss_mean": statistics.mean(losses),
                   "val_loss_std": spread(losses), "val_losses": losses,
                   "router_flops_per_token": statistics.mean(r["router_flops_per_token"]
                                                             for r in runs),
                   "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
                   "steps": steps, "val_loss_curve": curve("val_loss"),
                   "utilization_curve": curve("utilization")}
            effective = [r["effective_experts"] for r in runs if "effective_experts" in r]
            if effective:  # runs from before the metric existed have none
                row["effective_experts"] = statistics.mean(effective)
                row["effective_experts_runs"] = effective
            used = [r["utilization"] for r in runs if r.get("utilization") is not None]
            if used:  # runs from before the metric existed have none
                row["utilization"] = statistics.mean(used)
                row["utilization_runs"] = len(used)
            if runs[0]["recall_at_k"] is not None:
                row.update(recall_at_k=statistics.mean(r["recall_at_k"] for r in runs),
                           mass_recall=statistics.mean(r["mass_recall"] for r in runs),
                           shortlist=statistics.mean(r["shortlist"] for r in runs),
                           recall_curve=curve("recall_at_k"), mass_curve=curve("mass_recall"),
                           shortlist_curve=curve("shortlist"))
            rows.append(row)
    for row in rows:
        dense = [r for r in rows if r["experts"] == row["experts"] and r["router"] == "dense"]
        if dense:  # a partial study may have no dense run yet
            row["loss_vs_dense"] = row["val_loss_mean"] / dense[0]["val_loss_mean"] - 1.0
            # the same seed means the same initialization and batches: the
            # per-seed difference is less noisy than the difference of means
            by_seed = dict(zip(dense[0]["seeds"], dense[0]["val_losses"]))
            diffs = [loss - by_seed[seed] for seed, loss in zip(row["seeds"], row["val_losses"])
                     if seed in by_seed]
            row["paired_diff_mean"] = statistics.mean(diffs) if diffs else None
            row["paired_diff_std"] = spread(diffs) if diffs else None
            row["paired_diff_ci95"] = interval(diffs)
            row["flops_vs_dense"] = (row["router_flops_per_token"] /
                                     dense[0]["router_flops_per_token"])
    return rows


# Two-sided 95% quantiles of Student's t by degrees of freedom (n - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(diffs):
    """The 95% confidence interval [lo, hi] of the mean of paired
    differences (Student's t), or None with fewer than two."""
    if len(diffs) < 2:
        return None
    half = T95.get(len(diffs) - 1, 1.96) * spread(diffs) / math.sqrt(len(diffs))
    mean = statistics.mean(diffs)
    return [mean - half, mean + half]


def paired(a, b):
    """Per-seed differences a - b of two rows' validation losses."""
    by_seed = dict(zip(b["seeds"], b["val_losses"]))
    return [loss - by_seed[seed] for seed, loss in zip(a["seeds"], a["val_losses"])
            if seed in by_seed]


def criteria(rows):
    """docs/lm.md's criteria, per E, from the plan's rows there are (each
    answer None when its rows are missing; DIAGNOSTICS rows are not read,
    except for criterion 1, which is per run)."""
    out = {}
    for e in sorted({r["experts"] for r in rows}):
        mine = [r for r in rows if r["experts"] == e]
        planned = [r for r in mine if not r.get("diagnostic")]
        learned = [r for r in planned if r["router"] != "hash"]
        hashed = next((r for r in mine if r["router"] == "hash"), None)
        # criterion 1 is per run: a row is balanced when each of its runs is
        balanced = {r["config"]: min(r["effective_experts_runs"]) >= 0.5 for r in mine
                    if "effective_experts_runs" in r}
        verdict = {"balanced": balanced}
        if e in PROBES:  # criterion 5: reported, without a verdict
            out[str(e)] = {**verdict, "probe": True}
            continue
        if hashed and learned:
            best = min(learned, key=lambda r: r["val_loss_mean"])
            d = paired(hashed, best)
            se = spread(d) / math.sqrt(len(d)) if len(d) > 1 else None
            verdict["can_rank"] = (None if se is None else
                                   statistics.mean(d) > 2 * se and statistics.mean(d) > 0)
            verdict["hash_minus_best"] = {"best": best["config"], "diffs": d}
        air = [r for r in planned if r["router"] in AIR_ROUTERS and "loss_vs_dense" in r]
        if air:
            verdict["air_within_1pct_at_1_8_flops"] = any(
                r["loss_vs_dense"] <= 0.01 and r["flops_vs_dense"] <= 1 / 8 for r in air)
        keys = [r for r in planned if r["router"].startswith("product_key")]
        if air and keys:
            wins = []
            for pk in keys:  # AIR at the nearest FLOP point, within a factor of 2
                near = min(air, key=lambda r: abs(math.log(r["router_flops_per_token"] /
                                                           pk["router_flops_per_token"])))
                ratio = near["router_flops_per_token"] / pk["router_flops_per_token"]
                ci = interval(paired(near, pk))
                wins.append({"product_keys": pk["config"], "air": near["config"],
                             "flops_ratio": ratio, "ci95": ci,
                             "air_better": bool(ci and ci[1] < 0 and 0.5 <= ratio <= 2)})
            verdict["air_vs_product_keys"] = wins
            verdict["air_better_at_two_points"] = sum(w["air_better"] for w in wins) >= 2
        out[str(e)] = verdict
    return out


def criteria_text(verdicts):
    """The criteria as lines of Markdown."""
    lines = []
    for e, v in verdicts.items():
        lines.append(f"E = {int(e):,}:")
        unbalanced = [c for c, ok in v["balanced"].items() if not ok]
        lines.append(f"- balanced (effective experts >= E/2): "
                     f"{'all' if not unbalanced else 'not ' + ', '.join(unbalanced)}")
        if v.get("probe"):
            lines.append("- a probe: reported without a verdict (criterion 5)")
            continue
        for key, what in (("can_rank", "the setting can rank routers (hash > best + 2 SE)"),
                          ("air_within_1pct_at_1_8_flops",
                           "AIR within 1% of dense at <= 1/8 of its routing FLOPs"),
                          ("air_better_at_two_points",
                           "AIR better than product keys at two FLOP points")):
            answer = v.get(key)
            lines.append(f"- {what}: {'no data' if answer is None else 'yes' if answer else 'no'}")
    return "\n".join(lines) + "\n"


def row_label(r):
    """A row's configuration name, as the table and charts show it."""
    return r["config"] + (" (diagnostic)" if r.get("diagnostic") else "")


def table(rows):
    lines = ["| E | router | val loss (mean ± sd) | vs dense | − dense, per seed (mean ± sd) | "
             "routing kFLOP/token | ÷ dense FLOPs | tokens/s | experts used | "
             "effective experts, per seed | recall@8 | mass recall | shortlist |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda key, spec: format(r[key], spec) if key in r else "–"  # noqa: E731
        vs_dense = f"{100 * r['loss_vs_dense']:+.2f}%" if "loss_vs_dense" in r else "–"
        paired = "–"
        one_seed = len(r["seeds"]) == 1  # no spread to show
        if r.get("paired_diff_mean") is not None:
            paired = f"{r['paired_diff_mean']:+.4f}" + (
                "" if one_seed else f" ± {r['paired_diff_std']:.4f}")
        share = "–"
        if r.get("flops_vs_dense"):
            share = f"1/{1 / r['flops_vs_dense']:.1f}"
        elif "flops_vs_dense" in r:
            share = "0"  # hash routing scores nothing
        used = fmt("utilization", ".3f")
        if "utilization" in r and r["utilization_runs"] < len(r["seeds"]):
            used += f" ({r['utilization_runs']} of {len(r['seeds'])} seeds)"
        effective = " / ".join(f"{e:.3f}" for e in r.get("effective_experts_runs", [])) or "–"
        loss = f"{r['val_loss_mean']:.4f}" + ("" if one_seed else f" ± {r['val_loss_std']:.4f}")
        lines.append(
            f"| {r['experts']:,} | {row_label(r)} | {loss} | {vs_dense} | {paired} | "
            f"{r['router_flops_per_token'] / 1e3:,.0f} | {share} | "
            f"{r['tokens_per_s']:,.0f} | {used} | {effective} | "
            f"{fmt('recall_at_k', '.3f')} | "
            f"{fmt('mass_recall', '.3f')} | {fmt('shortlist', ',.0f')} |")
    return "\n".join(lines) + "\n"


def plot(rows, study):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    experts = sorted({r["experts"] for r in rows})
    colors = {"dense": "black", "product_key": "tab:red", "product_key_h2": "tab:pink",
              "product_key_h4": "tab:olive", "hash": "gray"}
    air_palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:cyan"]
    for e in experts:  # AIR configurations: the same color for the same place in each grid
        for i, r in enumerate(r for r in rows
                              if r["experts"] == e and r["router"] in AIR_ROUTERS):
            colors[(e, r["config"])] = air_palette[i % len(air_palette)]
    color = lambda r: colors.get(r["router"], colors.get((r["experts"], r["config"])))  # noqa: E731
    def marker(r):  # spilled lists: squares; query lists: triangles
        return "s" if "spill" in r["config"] else "^" if r["router"] == "air_query" else "o"

    fig, axes = plt.subplots(1, len(experts), figsize=(9 * len(experts), 4.5), squeeze=False)
    for ax, e in zip(axes[0], experts):
        for r in (r for r in rows if r["experts"] == e):
            if r["router_flops_per_token"] == 0:  # hash routing: no routing FLOPs to plot at
                ax.axhline(r["val_loss_mean"], ls="--", color="gray", label=row_label(r))
                continue
            ax.errorbar(r["router_flops_per_token"], r["val_loss_mean"], yerr=r["val_loss_std"],
                        fmt=marker(r), capsize=3, color=color(r), label=row_label(r))
        ax.set_xscale("log")
        ax.set_xlabel("routing FLOPs per token per layer (log)")
        ax.set_ylabel("validation loss (nats/byte), mean ± sd over seeds")
        ax.set_title(f"E = {e:,}, k = 8", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # off the points
    fig.tight_layout()
    fig.savefig(os.path.join(study.out, "lm_study_loss_vs_flops.png"), dpi=110)

    fig, axes = plt.subplots(2, len(experts), figsize=(6 * len(experts), 8), squeeze=False)
    for col, e in enumerate(experts):
        for r in (r for r in rows if r["experts"] == e):
            style = dict(ms=3, color=color(r), label=row_label(r))
            axes[0][col].plot(r["steps"], r["val_loss_curve"], marker(r) + "-", **style)
            if None not in r["utilization_curve"]:
                axes[1][col].plot(r["steps"], r["utilization_curve"], marker(r) + "-", **style)
        axes[0][col].set_ylabel("validation loss (nats/byte), mean over seeds")
        axes[0][col].set_title(f"E = {e:,}: validation loss over training", fontsize=10)
        axes[1][col].set_ylabel("share of experts any validation token picks")
        axes[1][col].set_title(f"E = {e:,}: experts used", fontsize=10)
        for ax in axes[:, col]:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(study.out, "lm_study_curves.png"), dpi=110)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in (r for r in rows if "recall_curve" in r):
        style = marker(r) + ("-" if r["experts"] == experts[0] else "--")  # E: solid, dashed
        for ax, key in zip(axes, ("recall_curve", "mass_curve")):
            ax.plot(r["steps"], r[key], style, ms=3, label=f"E={r['experts']} {row_label(r)}",
                    color=color(r))
    for ax, what in zip(axes, ("recall@8", "mass recall")):
        ax.set_xlabel("step")
        ax.set_ylabel(f"AIR {what} (validation, mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    # mass recall spans 1 (the exact top-k's mass) to 100s (a bias-made top-k)
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(os.path.join(study.out, "lm_study_recall.png"), dpi=110)


def int_list(parser, option, text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{option}: expected comma-separated integers, got {text!r}")
    if len(set(values)) != len(values):
        parser.error(f"{option}: repeated values in {text!r}")
    return values


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", choices=sorted(PLANS), default="first",
                   help="first: the study docs/lm.md reports (no balancing by default); "
                        "balanced: the next study, its setting and criteria fixed in docs/lm.md")
    p.add_argument("--steps", type=int, default=None, help="default: the plan's (400; 4,883)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--experts", default="4096,16384", help="comma-separated, from the grid")
    p.add_argument("--configs", default="", help="comma-separated subset of the grid's names")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    for key in ("dim", "layers", "batch", "seq", "eval-every", "eval-batches"):
        p.add_argument(f"--{key}", type=int, default=None, help="override the shared model")
    p.add_argument("--load-bias-rate", type=float, default=None,
                   help="load balancing (moe_lm.py --load-bias-rate; 0: none, the "
                        "routers collapse onto a few experts)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: tabulate and chart the runs already done")
    p.add_argument("--out", default=None, help="default: out/lm_study, out/lm_study_balanced")
    study = p.parse_args()
    study.grid, study.base = PLANS[study.plan]
    if study.out is None:
        study.out = "out/lm_study" if study.plan == "first" else "out/lm_study_balanced"
    study.seeds = int_list(p, "--seeds", study.seeds)
    study.experts = int_list(p, "--experts", study.experts)
    study.configs = [c for c in study.configs.split(",") if c]
    unknown = [e for e in study.experts if e not in study.grid]
    if unknown:
        p.error(f"--experts: {unknown} not in the grid ({sorted(study.grid)})")
    names = {name for e in study.experts for name, _, _ in study.grid[e]}
    unknown = [c for c in study.configs if c not in names]
    if unknown:
        p.error(f"--configs: {unknown} not in the grid for --experts ({sorted(names)})")
    if study.load_bias_rate is not None and study.load_bias_rate < 0:
        p.error(f"--load-bias-rate must be >= 0, got {study.load_bias_rate}")
    if study.jobs < 1:
        p.error(f"--jobs must be >= 1, got {study.jobs}")
    for _, args, name in jobs(study):  # what moe_lm.py would refuse, per configuration
        errors = moe_lm.option_errors(args) if args.seed == study.seeds[0] else []
        if errors:
            p.error(f"{name}: " + "; ".join(errors))
    stale = stale_runs(study)
    if stale:
        p.error(f"{len(stale)} stored run(s) under {study.out} were made with other settings "
                f"than asked for; use another --out, or delete them to redo them:\n  " +
                "\n  ".join(stale))
    os.makedirs(os.path.join(study.out, "runs"), exist_ok=True)
    os.makedirs(os.path.join(study.out, "partial"), exist_ok=True)
    if not study.report_only:
        run_all(study)
    rows = aggregate(study)
    with open(os.path.join(study.out, "study_results.json"), "w") as f:
        json.dump({"plan": study.plan, "base": study.base,
                   "load_bias_rate": study.load_bias_rate, "steps": study.steps,
                   "seeds": study.seeds, "rows": rows, "criteria": criteria(rows)}, f, indent=1)
    text = table(rows) + "\n" + criteria_text(criteria(rows))
    with open(os.path.join(study.out, "study_table.md"), "w") as f:
        f.write(text)
    plot(rows, study)
    print(text)
    print(f"wrote {study.out}/study_results.json, study_table.md and lm_study_*.png")


if __name__ == "__main__":
    main()
