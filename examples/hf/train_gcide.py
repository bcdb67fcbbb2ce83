#!/usr/bin/env python3
"""A small transformers MoE language model (Mixtral-style by default;
Qwen3-MoE-, Qwen2-MoE- or OLMoE-style with --family) trained from scratch on
the bytes of the GCIDE dictionary (Debian's dict-gcide) twice, from the same
initial weights on the same batches: once with its stock router, once with
AIR (``airmoe.use_air``). Reports validation loss, training tokens/s and
routing FLOPs per token side by side: a JSON file, a Markdown table and a
PNG chart. docs/hf.md has a measured run.

usage: <python with transformers and airmoe> examples/hf/train_gcide.py [--steps N] [--out DIR]
       (scripts/test_hf.sh builds such a python: .venv-hf/bin/python)
"""

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import torch

import airmoe

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lm"))
from moe_lm import load_splits  # noqa: E402  (the GCIDE reader and its split)

VOCAB = 256  # bytes

# family: (config class, model class, MoE settings from the arguments)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                lambda a: dict(intermediate_size=a.expert_hidden, num_local_experts=a.experts)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  lambda a: dict(intermediate_size=a.expert_hidden,
                                 moe_intermediate_size=a.expert_hidden, num_experts=a.experts,
                                 norm_topk_prob=True, head_dim=a.dim // a.heads)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  lambda a: dict(intermediate_size=a.expert_hidden,
                                 moe_intermediate_size=a.expert_hidden,
                                 shared_expert_intermediate_size=a.expert_hidden,
                                 num_experts=a.experts, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              lambda a: dict(intermediate_size=a.expert_hidden, num_experts=a.experts,
                             norm_topk_prob=True)),
}


def make_model(args):
    import transformers
    config_name, model_name, moe = FAMILIES[args.family]
    if not hasattr(transformers, model_name):
        raise SystemExit(f"transformers {transformers.__version__} has no {model_name}: "
                         f"choose another --family")
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=args.dim, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq + 1, num_experts_per_tok=args.k,
        output_router_logits=args.aux_loss > 0, router_aux_loss_coef=args.aux_loss,
        tie_word_embeddings=False, **moe(args))
    torch.manual_seed(args.seed)
    return getattr(transformers, model_name)(config)


def windows(data, args, gen):
    """[batch, seq + 1] byte windows: transformers shifts the labels itself."""
    starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
    return torch.stack([data[s:s + args.seq + 1] for s in starts])


def lm_loss(out, model):
    """The language-model loss alone (out.loss also holds the weighted
    load-balancing loss when it is on)."""
    if out.aux_loss is None:
        return out.loss
    return out.loss - model.config.router_aux_loss_coef * out.aux_loss


@torch.no_grad()
def evaluate(model, val, args):
    """Validation loss on fixed batches; for AIR also the shortlist (experts
    scored per token) and recall@k against exact top-k, per layer."""
    gen = torch.Generator().manual_seed(1234)
    gates = airmoe.air_gates(model)
    inputs = [[] for _ in gates]
    hooks = [g.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].reshape(
        -1, a[0].shape[-1]).float())) for i, g in enumerate(gates)]
    model.eval()
    losses = [lm_loss(model(x, labels=x), model).item()
              for x in (windows(val, args, gen) for _ in range(args.eval_batches))]
    model.train()
    for hook in hooks:
        hook.remove()
    result = {"val_loss": sum(losses) / len(losses)}
    if gates:
        shortlists, recalls = [], []
        for gate, seen in zip(gates, inputs):
            h = torch.cat(seen)
            shortlists.append(gate.shortlist_sizes(h).double().mean().item())
            exact = torch.topk(h @ gate.weight.t(), args.k, dim=-1).indices
            recalls.append(airmoe.recall_at_k(gate(h)[2], exact))
        result["shortlist_per_layer"] = shortlists
        result["recall_at_k"] = sum(recalls) / len(recalls)
    return result


def routing_flops(model, evaluation, args):
    """Routing FLOPs per token, summed over the MoE layers: the stock gate's
    [d] x [d, E] product, 2 E d; AIR's probe scores and shortlist, 2 C d + 2 d
    * shortlist (docs/python.md)."""
    d = args.dim
    layers = airmoe.air_gates(model)
    if not layers:
        return args.layers * 2 * args.experts * d
    return sum(2 * g.num_codewords * d + 2 * d * s
               for g, s in zip(layers, evaluation["shortlist_per_layer"]))


def train(name, model, data, val, args):
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for both routers
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    air = name == "air"
    curve, train_seconds, step_losses = [], 0.0, []
    model.train()
    for step in range(1, args.steps + 1):
        x = windows(data, args, gen)
        for group in opt.param_groups:  # cosine decay after a short warm-up
            warm = min(1.0, step / max(1, args.steps // 20))
            group["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        start = time.perf_counter()
        out = model(x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if air:
            airmoe.update_codebooks(model)
        train_seconds += time.perf_counter() - start
        step_losses.append(lm_loss(out, model).item())
        if step % args.eval_every == 0 or step == args.steps:
            ev = evaluate(model, val, args)
            curve.append({"step": step, "train_loss": sum(step_losses) / len(step_losses),
                          **ev})
            step_losses = []
            print(f"  {name:5s} step {step:5d}  val loss {ev['val_loss']:.4f}"
                  + (f"  recall@k {ev['recall_at_k']:.3f}" if air else ""), flush=True)
    final = curve[-1]
    return {"router": name, "val_loss": final["val_loss"],
            "val_bits_per_byte": final["val_loss"] / math.log(2),
            "tokens_per_s": args.steps * args.batch * args.seq / train_seconds,
            "routing_flops_per_token": routing_flops(model, final, args),
            "recall_at_k": final.get("recall_at_k"),
            "shortlist_per_layer": final.get("shortlist_per_layer"), "curve": curve}


def plot(results, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"stock": "tab:gray", "air": "tab:blue"}
    for r in results:
        label = "stock router" if r["router"] == "stock" else \
            f"AIR (C={args.codewords}, m={args.probes})"
        curves.plot([p["step"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]],
                    label=label, color=colors[r["router"]])
    curves.set_xlabel("step")
    curves.set_ylabel("validation loss (nats/byte)")
    curves.set_title(f"{args.family}-style, E={args.experts}, k={args.k}, GCIDE bytes")
    curves.legend()
    names = [r["router"] for r in results]
    flops = [r["routing_flops_per_token"] / 1e3 for r in results]
    speed = [r["tokens_per_s"] / 1e3 for r in results]
    x = torch.arange(len(results)).tolist()
    bars.bar([i - 0.2 for i in x], flops, 0.4, color="tab:orange", label="routing kFLOP/token")
    bars.set_ylabel("routing kFLOP / token", color="tab:orange")
    twin = bars.twinx()
    twin.bar([i + 0.2 for i in x], speed, 0.4, color="tab:green", label="k tokens/s (train)")
    twin.set_ylabel("training k tokens / s", color="tab:green")
    bars.set_xticks(x)
    bars.set_xticklabels(names)
    bars.set_title("routing FLOPs (orange) and training speed (green)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="mixtral")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--experts", type=int, default=128, help="E")
    p.add_argument("--k", type=int, default=2, help="experts per token")
    p.add_argument("--codewords", type=int, default=16, help="AIR's C")
    p.add_argument("--probes", type=int, default=4, help="AIR's m")
    p.add_argument("--dim", type=int, default=64, help="hidden size d")
    p.add_argument("--expert-hidden", type=int, default=64, help="each expert's FFN width")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-loss", type=float, default=0.01,
                   help="router_aux_loss_coef (0: off); AIR's is the one docs/hf.md describes")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="out/hf")
    return p


def option_errors(args):
    checks = [(args.steps >= 1, "--steps must be >= 1"),
              (1 <= args.k <= args.experts, "--k must be in [1, --experts]"),
              (1 <= args.probes <= args.codewords <= args.experts,
               "need 1 <= --probes <= --codewords <= --experts"),
              (args.dim % args.heads == 0, "--dim must be a multiple of --heads"),
              (min(args.dim, args.expert_hidden, args.layers, args.heads, args.seq, args.batch,
                   args.eval_every, args.eval_batches, args.threads) >= 1,
               "sizes, --eval-every, --eval-batches and --threads must be >= 1"),
              (args.lr > 0 and args.aux_loss >= 0, "--lr must be > 0, --aux-loss >= 0")]
    return [message for ok, message in checks if not ok]


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    errors = option_errors(args)
    if errors:
        parser.error("; ".join(errors))
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data, val = load_splits("gcide")
    print(f"gcide: {len(data):,} bytes train, {len(val):,} validation")
    stock = make_model(args)
    air = airmoe.use_air(copy.deepcopy(stock), codewords=args.codewords, probes=args.probes)
    results = [train("stock", stock, data, val, args), train("air", air, data, val, args)]

    import transformers
    machine = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
               "transformers": transformers.__version__, "python": platform.python_version()}
    with open(os.path.join(args.out, "hf_results.json"), "w") as f:
        json.dump({"config": vars(args), "machine": machine, "results": results}, f, indent=2)
    lines = ["| router | val loss (nats/byte) | bits/byte | training tokens/s "
             "| routing kFLOP/token | recall@k |", "|---|---|---|---|---|---|"]
    for r in results:
        recall = "–" if r["recall_at_k"] is None else f"{r['recall_at_k']:.3f}"
        name = "stock" if r["router"] == "stock" else f"AIR C={args.codewords} m={args.probes}"
        lines.append(f"| {name} | {r['val_loss']:.4f} | {r['val_bits_per_byte']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['routing_flops_per_token'] / 1e3:,.1f} | "
                     f"{recall} |")
    with open(os.path.join(args.out, "hf_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results, args, os.path.join(args.out, "hf_loss.png"))
    print("\n".join(lines))
    print(f"wrote {args.out}/hf_results.json, hf_table.md, hf_loss.png")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
