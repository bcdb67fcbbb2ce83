#!/usr/bin/python3
"""A small byte-level MoE language model trained on the English text of
Debian's `fortunes` package, once per router (exact dense top-k, AIR,
product keys), same seed and steps. Writes loss curves (PNG), a table
(Markdown) and every figure (JSON).

The question it answers is the paper's: at equal compute, does AIR match
dense top-k routing's quality, and does it beat product keys?

usage: PYTHONPATH=build/python /usr/bin/python3 examples/lm/moe_lm.py [--steps N] [--out DIR]
"""
import argparse
import collections
import glob
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import airmoe

FORTUNES = "/usr/share/games/fortunes"
GCIDE = "/usr/share/dictd/gcide.dict.dz"


def load_fortunes():
    files = sorted(f for f in glob.glob(os.path.join(FORTUNES, "*"))
                   if not f.endswith((".dat", ".u8")) and os.path.basename(f) not in ("art", "ascii-art"))
    if not files:
        raise SystemExit(f"no text under {FORTUNES}: install Debian's 'fortunes' package")
    return b"".join(open(f, "rb").read() for f in files)


def load_gcide():
    import gzip
    if not os.path.exists(GCIDE):
        raise SystemExit(f"no {GCIDE}: install Debian's 'dict-gcide' package")
    with gzip.open(GCIDE, "rb") as f:  # dictzip is gzip with a random-access index
        return f.read()


CORPORA = {"fortunes": load_fortunes, "gcide": load_gcide}


def load_splits(corpus):
    """(train, validation) byte tensors. fortunes: the last 10% (the split of
    the first table in docs/lm.md); gcide: interleaved, see split_text."""
    data = CORPORA[corpus]()
    if corpus == "fortunes":
        cut = int(len(data) * 0.9)
        return byte_tensor(data[:cut]), byte_tensor(data[cut:])
    return split_text(data)


def byte_tensor(data):
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def split_text(data, chunks=100):
    """Every tenth of `chunks` equal pieces is validation, so that both splits
    span the whole corpus (the dictionary is sorted: a tail split would
    validate on the last letters only)."""
    size = len(data) // chunks
    pieces = [data[i * size:(i + 1) * size] for i in range(chunks)]
    train = b"".join(p for i, p in enumerate(pieces) if i % 10 != 9)
    val = b"".join(p for i, p in enumerate(pieces) if i % 10 == 9)
    return byte_tensor(train), byte_tensor(val)


class LoadBias:
    """Auxiliary-loss-free load balancing (DeepSeek-V3): a per-expert bias
    b_e in the selection scores, lowered for experts that took more than
    their share of a batch's routing slots and raised for the others, by
    --load-bias-rate per step. Every router here takes it the same way,
    as one more input feature (a constant) and one more key column: dense
    and AIR score <q, w_e> + b_e; product keys carry a bias per
    sub-key (b1_i + b2_j), balanced over rows and over columns. The
    columns get no gradient; the gates see the bias too."""

    # The bias feature's value: the key column holds b / FEATURE, so that it
    # stays small beside |w_e| ~ 1 and AIR's codebook, trained on the
    # normalized keys, is hardly bent by the biases.
    FEATURE = 16.0

    def __init__(self, router):
        self.router = router
        self.product = isinstance(router, airmoe.ProductKeyRouter)

    @staticmethod
    def extra_dims(name):
        return 2 if name == "product_key" else 1

    def augment(self, q):
        feature = torch.full((q.shape[0], 1), self.FEATURE, dtype=q.dtype)
        if not self.product:
            return torch.cat([q, feature], 1)
        half = q.shape[1] // 2
        return torch.cat([q[:, :half], feature, q[:, half:], feature], 1)

    def _columns(self):
        r = self.router
        return [r.keys1, r.keys2] if self.product else [r.centers]

    def zero_grads(self):
        for param in self._columns():
            if param.grad is not None:
                param.grad[:, -1] = 0

    @torch.no_grad()
    def update(self, experts, num_experts, rate):
        load = torch.bincount(experts.reshape(-1), minlength=num_experts).double()
        if self.product:
            n = self.router.subkeys
            loads = [load.view(n, n).sum(1), load.view(n, n).sum(0)]
        else:
            loads = [load]
        for param, group_load in zip(self._columns(), loads):
            step = rate / self.FEATURE * torch.sign(group_load - group_load.mean())
            param[:, -1] -= step.to(param.dtype)


def slot_shares(idx, num_experts, dtype):
    """f_e: the share of the N*k routing slots that went to expert e."""
    return torch.bincount(idx.reshape(-1), minlength=num_experts).to(dtype) / idx.numel()


def score_balance_loss(router, q, idx, num_experts):
    """Load balancing through the keys themselves: sum over routing slots of
    (E * f_e - 1) * <q, w_e> / (N * k), f_e the share of slots expert e took
    (no gradient). Its gradient moves over-used keys away from their
    tokens and under-used chosen ones toward theirs, so the balance lives in
    the key geometry that AIR's codebook clusters (a selection bias does
    not: AIR's first stage cannot see it)."""
    n, k = idx.shape
    share = slot_shares(idx, num_experts, q.dtype)
    scores = chosen_logits(router, q, idx)
    return ((num_experts * share[idx] - 1.0) * scores).sum() / (n * k)


def balance_loss(gates, idx, num_experts):
    """Switch-style load balancing on what every router returns, the k
    chosen experts and their gates: E * sum_e f_e * P_e, where f_e is the
    share of the N*k routing slots that went to expert e (no gradient) and
    P_e its mean gate per token (sums to 1 over e). 1 when the load is
    uniform, E/k when every token picks the same k experts. Its gradient
    only moves gate mass between a token's k chosen experts (their gates
    sum to 1): too weak to stop the collapse docs/lm.md reports."""
    n = idx.shape[0]
    flat = idx.reshape(-1)
    share = slot_shares(idx, num_experts, gates.dtype)
    mean_gate = torch.zeros(num_experts, dtype=gates.dtype).index_add(0, flat, gates.reshape(-1)) / n
    return num_experts * (share * mean_gate).sum()


class SmoothedLoadBias:
    """Auxiliary-loss-free balancing through the router's own selection bias
    (its `bias` buffer: experts are selected by z + b, gates come from z):
    each step the per-expert share of the routing slots enters an average
    over about --load-window steps (an EMA of weight 1 / window), and
    b_e -= rate * spread * (E * share_e - 1), where spread is the standard
    deviation of the batch's chosen logits, so that the rate is relative to
    the logits it competes with. The average replaces the sign of one
    batch's count, which at 2 slots per expert per step is mostly noise.

    cap > 0 keeps every |b_e| <= cap * spread. Without it an expert that
    no token can reach (AIR: in no probed list) gains rate * spread every
    step without bound, until the bias alone decides the exact top-k
    (docs/lm.md, "The bias race")."""

    def __init__(self, router, num_experts, rate, window, cap=0.0):
        self.router, self.num_experts, self.rate, self.cap = router, num_experts, rate, cap
        self.decay = 1.0 - 1.0 / window
        self.share = torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)
        router.bias = torch.zeros(num_experts)

    @torch.no_grad()
    def update(self, q, idx):
        share = slot_shares(idx, self.num_experts, torch.float64)
        self.share.mul_(self.decay).add_(share, alpha=1.0 - self.decay)
        chosen = chosen_logits(self.router, q, idx)
        spread = chosen.float().std().item() if chosen.numel() > 1 else 1.0
        step = self.rate * spread * (self.num_experts * self.share - 1.0)
        bias = self.router.bias - step.float()
        if self.cap > 0:
            bias = bias.clamp(-self.cap * spread, self.cap * spread)
        self.router.bias = bias.contiguous()

    def state(self):  # for a checkpoint (the bias itself is a router buffer)
        return {"share": self.share}

    def load_state(self, state):
        self.share = state["share"]


def full_softmax_balance_loss(router, q, idx, num_experts):
    """The Switch loss with P_e the mean over tokens of the softmax over all
    E logits (not only the chosen gates): E * sum_e f_e * P_e, f_e the share
    of routing slots (no gradient). Its gradient reaches every expert's
    logit, so it can push an over-used expert out of a token's top-k, which
    balance_loss (chosen gates only) cannot. Dense routing only: it needs
    every logit."""
    probs = torch.softmax(q @ router_centers(router).t(), dim=-1)
    share = slot_shares(idx, num_experts, probs.dtype)
    return num_experts * (share * probs.mean(0)).sum()


class ProductKeyHeads(nn.Module):
    """PEER-style heads: H product-key routers with their own sub-keys, each
    choosing k / H experts; a token's k experts are the heads' picks side by
    side (a head may repeat another's), each head's gates scaled by 1 / H so
    that they sum to 1. Routing FLOPs grow with H: product keys at several
    FLOP points. The selection bias is every head's."""

    def __init__(self, subkeys, dim, k, heads, seed):
        super().__init__()
        if k % heads:
            raise ValueError(f"product-key heads: k = {k} is not a multiple of {heads} heads")
        self.heads = nn.ModuleList(
            airmoe.ProductKeyRouter(subkeys, dim, k // heads, seed=seed + i) for i in range(heads))
        self.subkeys = subkeys

    @property
    def bias(self):
        return self.heads[0].bias

    @bias.setter
    def bias(self, value):
        for head in self.heads:
            head.bias = value

    def forward(self, q):
        picks = [head(q) for head in self.heads]
        gates = torch.cat([g for g, _ in picks], 1) / len(self.heads)
        return gates, torch.cat([i for _, i in picks], 1)


def chosen_logits(router, q, idx):
    """<q, w_e> of each token's chosen experts [N, k]; with product-key
    heads, each head's slice against its own implied centers."""
    if isinstance(router, ProductKeyHeads):
        per = idx.shape[1] // len(router.heads)
        return torch.cat([chosen_logits(h, q, idx[:, i * per:(i + 1) * per])
                          for i, h in enumerate(router.heads)], 1)
    return (router_centers(router)[idx] * q.unsqueeze(1)).sum(-1)


class HashRouter(nn.Module):
    """The control that learns nothing (Roller et al., hash layers): each
    byte value's k experts are fixed by a seeded permutation, gates 1/k.
    Routes by MoEFFN.token_ids, the bytes of the current batch."""

    def __init__(self, num_experts, k, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        table = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(256)])
        self.register_buffer("table", table)
        self.k = k
        self.token_ids = None

    def forward(self, q):
        idx = self.table[self.token_ids]
        return torch.full(idx.shape, 1.0 / self.k, dtype=q.dtype), idx


def effective_experts(load):
    """exp of the entropy of a load vector (counts per expert): E for a
    uniform load, k-ish when every token picks the same experts."""
    p = load.double() / load.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


class QueryListRefresh:
    """air_query's list upkeep: the router's query lists rebuilt (in C++,
    AIRRouter.refresh_lists) every `every` training steps from the last
    `sample` tokens it routed in training, under its current centers and
    selection bias; the FLOPs of every build, the one at construction (from
    the initial centers) included, are summed for the routing FLOPs."""

    def __init__(self, router, sample, every):
        self.router, self.sample, self.every = router, sample, every
        self.recent = None  # the last `sample` training inputs of the router
        self.builds = 1
        self.build_flops = router.list_build_flops

    def after_step(self, q, step):
        q = q.detach()
        self.recent = (q if self.recent is None else torch.cat([self.recent, q]))[-self.sample:]
        if step % self.every == 0:
            self.router.refresh_lists(self.recent)
            self.builds += 1
            self.build_flops += self.router.list_build_flops

    def state(self):  # for a checkpoint (the lists themselves are router buffers)
        return {"recent": self.recent, "builds": self.builds, "build_flops": self.build_flops}

    def load_state(self, state):
        self.recent, self.builds, self.build_flops = (state["recent"], state["builds"],
                                                      state["build_flops"])


def expert_groups(idx, num_experts):
    """The (token, slot) pairs of idx [N, k] grouped by expert, experts with
    the same number of pairs together: a list of (experts [U], pairs [U, c])
    per distinct count c, pairs as flat indices into idx. Lets the expert FFN
    run one bmm per count over the experts' own weights instead of gathering
    a weight copy per pair."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    groups = []
    for c in torch.unique(counts).tolist():
        chosen = counts == c
        slots = starts[chosen].unsqueeze(1) + torch.arange(c)
        groups.append((experts[chosen], order[slots]))
    return groups


class ExpertFFN(torch.autograd.Function):
    """y[n, j] = w2[e] @ gelu(w1[e] @ x[n]) for e = idx[n, j]: what
    einsum over w1[idx], w2[idx] computes, without their [N, k, h, d] copies;
    the weight gradients are written for the touched experts only: into dense
    grads whose other rows stay zero (so AdamW still decays every expert), or,
    with sparse_grads, as sparse rows of the touched experts alone (for
    SparseAdam, --expert-updates sparse)."""

    @staticmethod
    def forward(ctx, x, w1, w2, idx, sparse_grads):
        N, k = idx.shape
        groups = expert_groups(idx, w1.shape[0])
        y = x.new_empty(N * k, w2.shape[1])
        saved = []
        for experts, pairs in groups:
            xs = x[torch.div(pairs, k, rounding_mode="floor")]  # [U, c, d]
            pre = torch.bmm(xs, w1[experts].transpose(1, 2))  # [U, c, h]
            act = F.gelu(pre)
            y[pairs.reshape(-1)] = torch.bmm(act, w2[experts].transpose(1, 2)).reshape(
                -1, y.shape[1])
            saved.append((xs, pre, act))
        ctx.groups, ctx.saved, ctx.k, ctx.sparse_grads = groups, saved, k, sparse_grads
        ctx.save_for_backward(x, w1, w2)
        return y.reshape(N, k, -1)

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2 = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1])
        dx = torch.zeros_like(x)
        rows, dw1_rows, dw2_rows = [], [], []  # per group: its experts and their grads
        for (experts, pairs), (xs, pre, act) in zip(ctx.groups, ctx.saved):
            dys = dy[pairs.reshape(-1)].reshape(*pairs.shape, -1)  # [U, c, d]
            w1e, w2e = w1[experts], w2[experts]
            dw2_rows.append(torch.bmm(dys.transpose(1, 2), act))
            dpre = torch.ops.aten.gelu_backward(torch.bmm(dys, w2e), pre)
            dw1_rows.append(torch.bmm(dpre.transpose(1, 2), xs))
            rows.append(experts)
            dx.index_add_(0, torch.div(pairs, ctx.k, rounding_mode="floor").reshape(-1),
                          torch.bmm(dpre, w1e).reshape(-1, x.shape[1]))
        return dx, expert_grad(w1, rows, dw1_rows, ctx.sparse_grads), expert_grad(
            w2, rows, dw2_rows, ctx.sparse_grads), None, None


def expert_grad(weight, rows, grads, sparse):
    """The gradient of an [E, ...] expert weight from the touched experts'
    rows (each expert in one group): dense with zero rows elsewhere, or
    sparse over the touched rows alone."""
    if sparse:
        rows = torch.cat(rows)
        return torch.sparse_coo_tensor(rows.unsqueeze(0), torch.cat(grads), weight.shape)
    grad = torch.zeros_like(weight)
    for experts, g in zip(rows, grads):
        grad[experts] = g
    return grad


class MoEFFN(nn.Module):
    """E small experts (d -> h -> d, GELU) behind a pluggable router."""

    def __init__(self, router, num_experts, dim, hidden, query_norm=False, load_bias=False,
                 balance=False, score_balance=False, bias_balance=None, full_balance=False,
                 list_refresh=None, sparse_grads=False):
        super().__init__()
        self.router = router
        self.sparse_grads = sparse_grads  # the experts' weight grads: sparse rows
        # (sample tokens, every N steps) of QueryListRefresh, for query lists
        self.list_refresh = (QueryListRefresh(router, *list_refresh)
                             if list_refresh and getattr(router, "lists", None) == "query"
                             else None)
        self.load_bias = LoadBias(router) if load_bias else None
        # (rate, window, cap) of SmoothedLoadBias, or None
        self.smoothed_bias = (SmoothedLoadBias(router, num_experts, *bias_balance)
                              if bias_balance and not isinstance(router, HashRouter) else None)
        self.balance, self.score_balance = balance, score_balance
        self.full_balance = full_balance and isinstance(router, airmoe.DenseRouter)
        # PEER's query batch norm: the router sees centered, unit-variance
        # queries, so no expert wins every token by lining up with the mean
        # hidden state (measured in docs/lm.md: not enough to stop the collapse)
        self.query_norm = nn.BatchNorm1d(dim, affine=False) if query_norm else nn.Identity()
        self.w1 = nn.Parameter(torch.randn(num_experts, hidden, dim) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, hidden) / math.sqrt(hidden))
        self.num_experts = num_experts
        self.last_input = None
        self.last_experts = None
        self.balance_loss = None

    def forward(self, x):  # x [N, d]
        x = x.contiguous()
        q = self.query_norm(x).contiguous()
        if self.load_bias is not None:
            q = self.load_bias.augment(q)
        self.last_input = q.detach()  # what the router saw
        gates, idx = self.router(q)  # [N, k]
        self.last_experts = idx
        self.balance_loss = (balance_loss(gates, idx, self.num_experts)
                             if self.training and self.balance else None)
        self.score_balance_loss = (score_balance_loss(self.router, q, idx, self.num_experts)
                                   if self.training and self.score_balance else None)
        self.full_balance_loss = (full_softmax_balance_loss(self.router, q, idx, self.num_experts)
                                  if self.training and self.full_balance else None)
        y = ExpertFFN.apply(x, self.w1, self.w2, idx, self.sparse_grads)
        return (gates.unsqueeze(-1) * y).sum(1)

    # The balancing helpers whose state lives outside the module's buffers
    # (a checkpoint's per-block entry holds each one's state(), or None).
    HELPERS = ("smoothed_bias", "list_refresh")

    def helper_states(self):
        return {name: getattr(self, name).state() if getattr(self, name) else None
                for name in self.HELPERS}

    def load_helper_states(self, states):
        for name in self.HELPERS:
            if states.get(name) is not None:
                getattr(self, name).load_state(states[name])


class Block(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = ffn

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        B, S, D = x.shape
        return x + self.ffn(self.ln2(x).reshape(B * S, D)).reshape(B, S, D)


class MoELM(nn.Module):
    def __init__(self, make_router, args):
        super().__init__()
        self.embed = nn.Embedding(256, args.dim)
        self.pos = nn.Parameter(torch.randn(args.seq, args.dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(args.dim, args.heads, MoEFFN(
                make_router(), args.experts, args.dim, args.hidden, args.query_norm,
                args.load_bias_rate > 0, args.balance > 0, args.score_balance > 0,
                (args.bias_balance, args.load_window, args.bias_cap) if args.bias_balance > 0
                else None,
                args.full_balance > 0, (args.list_sample, args.list_refresh),
                args.expert_updates == "sparse"))
            for _ in range(args.layers))
        self.ln = nn.LayerNorm(args.dim)
        self.head = nn.Linear(args.dim, 256)

    def forward(self, tokens):
        S = tokens.shape[1]
        mask = torch.triu(torch.full((S, S), float("-inf")), diagonal=1)
        x = self.embed(tokens) + self.pos[:S]
        for b in self.blocks:
            if isinstance(b.ffn.router, HashRouter):
                b.ffn.router.token_ids = tokens.reshape(-1)
            x = b(x, mask)
        return self.head(self.ln(x))


def routers(args):
    n = int(round(math.sqrt(args.experts)))
    E, C, m, k = args.experts, args.codewords, args.probes, args.k

    def dim(name):  # the router's input width: the load bias adds features
        return args.dim + (LoadBias.extra_dims(name) if args.load_bias_rate > 0 else 0)

    return {
        "dense": (lambda: airmoe.DenseRouter(E, dim("dense"), k, seed=args.seed),
                  2.0 * E * dim("dense")),
        "air": (lambda: airmoe.AIRRouter(E, dim("air"), k, C, m, seed=args.seed,
                                         kmeans_iterations=5, list_cap=args.list_cap,
                                         spills=args.spills, spill_lambda=args.soar_lambda),
                # probe scores + exact scores on m lists of E / C experts on average;
                # train() replaces it with the measured shortlist
                2.0 * C * dim("air") + 2.0 * m * (E / C) * dim("air")),
        # query-aware lists (first built from the initial centers, then from
        # recent training tokens every --list-refresh steps: QueryListRefresh)
        "air_query": (lambda: airmoe.AIRRouter(E, dim("air_query"), k, C, m, seed=args.seed,
                                               lists="query", list_length=args.list_length,
                                               list_k=list_k(args)),
                      # probe scores + at most m lists of L experts, plus the
                      # refreshes; train() replaces it with the measured cost
                      2.0 * C * dim("air_query") + 2.0 * min(E, m * args.list_length) *
                      dim("air_query") + refresh_flops_per_token(args, dim("air_query"))),
        "product_key": (lambda: airmoe.ProductKeyRouter(n, dim("product_key"), k, seed=args.seed),
                        2.0 * n * dim("product_key") + k * k),
        "hash": (lambda: HashRouter(E, k, args.seed), 0.0),
        **{f"product_key_h{h}": (
            lambda h=h: ProductKeyHeads(n, dim("product_key"), k, h, args.seed),
            h * (2.0 * n * dim("product_key") + (k // h) ** 2)) for h in (2, 4)},
    }


def batches(data, args, gen):
    starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
    x = torch.stack([data[s:s + args.seq] for s in starts])
    y = torch.stack([data[s + 1:s + args.seq + 1] for s in starts])
    return x, y


@torch.no_grad()
def evaluate(model, val, args):
    gen = torch.Generator().manual_seed(1234)  # the same validation batches for every router
    model.eval()
    losses, recalls, masses, shortlists = [], [], [], []
    used = [torch.zeros(args.experts, dtype=torch.bool) for _ in model.blocks]
    for _ in range(args.eval_batches):
        x, y = batches(val, args, gen)
        logits = model(x)
        losses.append(F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)).item())
        for u, b in zip(used, model.blocks):
            u[b.ffn.last_experts.reshape(-1)] = True
        for b in model.blocks:
            r = b.ffn.router
            if isinstance(r, airmoe.AIRRouter):
                h = b.ffn.last_input
                _, idx = r(h)
                all_logits = h @ r.centers.t()
                # the exact choice is by z + b when a selection bias is set
                chosen_by = all_logits if r.bias is None else all_logits + r.bias
                exact = torch.topk(chosen_by, args.k, dim=-1).indices
                recalls.append(airmoe.recall_at_k(idx, exact))
                p = torch.softmax(all_logits, dim=-1)
                masses.append((p.gather(1, idx).sum(1) / p.gather(1, exact).sum(1)).mean().item())
                shortlists.append(r.shortlist_sizes(h).double().mean().item())
    model.train()
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    # the share of experts that any validation token chose, per block
    utilization = mean([u.double().mean().item() for u in used])
    return {"val_loss": mean(losses), "recall_at_k": mean(recalls), "mass_recall": mean(masses),
            "shortlist": mean(shortlists), "utilization": utilization}


def update_codebooks(model, step, args):
    """The AIR codebook's schedule: during the first --codebook-warmup steps
    every step is a full Lloyd step (step size 1), so the codebook catches up
    with centers that move fast early on; after that, one EMA step of size
    --codebook-step every --update-every steps. Query lists (air_query)
    follow their own: QueryListRefresh, every --list-refresh steps."""
    warm = step <= args.codebook_warmup
    update = warm or step % args.update_every == 0
    for b in model.blocks:
        if b.ffn.list_refresh is not None:
            b.ffn.list_refresh.after_step(b.ffn.last_input, step)
        elif update and isinstance(b.ffn.router, airmoe.AIRRouter):
            b.ffn.router.update_codebook(step=1.0 if warm else args.codebook_step)


def list_k(args):
    """How deep query lists count the sample's exact top-k (--list-k; 0: --k)."""
    return args.list_k or args.k


def refresh_flops_per_token(args, width):
    """Query lists' upkeep per routed training token, before a run measures
    it: one build from --list-sample tokens (airmoe.query_lists_build_flops,
    the C++ count) per --list-refresh steps of --batch x --seq tokens."""
    build = airmoe._airmoe.query_lists_build_flops(args.list_sample, args.experts, width,
                                                   args.codewords, args.list_length,
                                                   list_k(args), 10)
    return build / (args.list_refresh * args.batch * args.seq)


def list_upkeep(model, args):
    """Query lists' measured upkeep: the FLOPs of every build of a block's
    lists (the initial one and each refresh), mean over blocks, amortized
    over the training tokens the run routed (each refresh serves the
    --list-refresh x --batch x --seq tokens until the next). Empty for
    other routers."""
    refreshes = [b.ffn.list_refresh for b in model.blocks if b.ffn.list_refresh is not None]
    if not refreshes:
        return {}
    build_flops = sum(r.build_flops for r in refreshes) / len(refreshes)
    return {"list_builds": refreshes[0].builds, "list_build_flops": build_flops,
            "list_refresh_flops_per_token": build_flops / (args.steps * args.batch * args.seq)}


def router_centers(router):
    """The router's keys as [E, d] centers (product keys: the n^2 implied ones)."""
    if isinstance(router, airmoe.ProductKeyRouter):
        n = router.subkeys
        return torch.cat([router.keys1.repeat_interleave(n, 0), router.keys2.repeat(n, 1)], 1)
    return router.centers


@torch.no_grad()
def save_router_data(model, name, val, args):
    """Each block's trained router centers and a batch of its router inputs
    (hidden states of validation text), float32 .npy, for
    `airmoe_bench router --centers ... --tokens ...`."""
    import numpy as np
    gen = torch.Generator().manual_seed(4321)
    model.eval()
    inputs = [[] for _ in model.blocks]
    for _ in range(args.save_batches):
        model(batches(val, args, gen)[0])
        for i, b in enumerate(model.blocks):
            inputs[i].append(b.ffn.last_input)
    model.train()
    os.makedirs(args.save_router_data, exist_ok=True)
    for i, b in enumerate(model.blocks):
        if isinstance(b.ffn.router, (HashRouter, ProductKeyHeads)):
            continue  # no one [E, d] set of keys to save
        stem = os.path.join(args.save_router_data, f"{name}_layer{i}")
        centers = router_centers(b.ffn.router).detach().float()
        tokens = torch.cat(inputs[i]).float()
        bias = getattr(b.ffn.router, "bias", None)
        if bias is not None:  # keys [w_e, b_e], tokens [h, 1]: z + b is one inner product
            centers = torch.cat([centers, bias.detach().float().view(-1, 1)], 1)
            tokens = torch.cat([tokens, torch.ones(len(tokens), 1)], 1)
        np.save(stem + "_centers.npy", centers.contiguous().numpy())
        np.save(stem + "_tokens.npy", tokens.contiguous().numpy())
    print(f"[{name}] saved router centers and inputs under {args.save_router_data}", flush=True)


def learning_rate(step, args):
    """constant: --lr. cosine: linear warm-up over --warmup steps, then a
    cosine decay to a tenth of --lr at the last step, so that the loss
    curve flattens by the end of the run."""
    if args.lr_schedule == "constant":
        return args.lr
    if step <= args.warmup:
        return args.lr * step / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


# Where a run's outputs go, how often it saves its progress and how much
# router data it saves at the end: not part of what it computes (a resumed
# run computes the same bits).
OUTPUT_ARGS = ("out", "save_router_data", "save_batches", "checkpoint_dir", "checkpoint_every")


def run_settings(args):
    """A run's arguments as JSON values, less OUTPUT_ARGS."""
    stored = json.loads(json.dumps(args if isinstance(args, dict) else vars(args)))
    return {key: value for key, value in stored.items() if key not in OUTPUT_ARGS}


def settings_differences(saved, args, verb):
    """How `saved` (run_settings of an earlier run) differs from `args`, one
    line per option ([] when they match). An option added to moe_lm.py since
    then counts as its default there (the earlier run was made without it)."""
    wanted = run_settings(args)
    defaults = run_settings(make_parser().parse_args([]))
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    return [f"{key}: {verb} {saved.get(key, '(none)')!r}, asked {wanted.get(key, '(none)')!r}"
            for key in sorted(set(saved) | set(wanted)) if saved.get(key) != wanted.get(key)]


class Progress:
    """What a run has done so far: its last step, the training curve, the
    evaluations, the training seconds, the wall seconds and each block's
    recent expert loads (over the last --load-window steps). A resumed run
    carries both times over: each is the total over the run's segments (a
    killed segment counts up to its last checkpoint)."""

    def __init__(self, blocks, window, start):
        self.step, self.curve, self.evals, self.t_train = 0, [], [], 0.0
        self.recent_load = [collections.deque(maxlen=window) for _ in range(blocks)]
        self.wall_before = 0.0  # wall seconds of the earlier segments
        self.start = start  # this segment's perf_counter() at its start

    def wall_s(self):
        return self.wall_before + time.perf_counter() - self.start


def checkpoint_path(name, args):
    return os.path.join(args.checkpoint_dir, f"{name}.ckpt") if args.checkpoint_dir else None


def save_checkpoint(path, model, opt, gen, progress, args):
    """Everything the next steps read (parameters, buffers, optimizer moments,
    the batch and global random states, the curves and times, and per block
    its recent loads and its balancing helpers' states: the smoothed load
    shares, air_query's recent tokens and build counts), written atomically:
    a run killed at any moment resumes from its last checkpoint and computes
    the same bits as one never stopped."""
    state = {"settings": run_settings(args), "model": model.state_dict(),
             "optimizer": opt.state_dict(), "batches": gen.get_state(),
             "torch_rng": torch.get_rng_state(), "step": progress.step, "curve": progress.curve,
             "evals": progress.evals, "t_train": progress.t_train, "wall_s": progress.wall_s(),
             "blocks": [{"recent_load": list(window), **b.ffn.helper_states()}
                        for b, window in zip(model.blocks, progress.recent_load)]}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def blocks_of_parallel_lists(state):
    """The "blocks" entry of a checkpoint written before it existed, from its
    parallel per-block lists ("recent_load", "smoothed_share" and, from
    air_query on, "query_lists")."""
    n = len(state["recent_load"])
    return [{"recent_load": load, "smoothed_bias": None if share is None else {"share": share},
             "list_refresh": lists}
            for load, share, lists in zip(state["recent_load"], state["smoothed_share"],
                                          state.get("query_lists", [None] * n))]


def load_checkpoint(path, model, opt, gen, progress, args):
    """Restores what save_checkpoint wrote; refuses one made with other
    settings, naming each difference."""
    state = torch.load(path)
    diff = settings_differences(state["settings"], args, "saved")
    if diff:
        raise ValueError(f"checkpoint {path} was made with other settings ({'; '.join(diff)}): "
                         f"delete it to start the run over")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["batches"])
    torch.set_rng_state(state["torch_rng"])
    progress.step, progress.curve, progress.evals = state["step"], state["curve"], state["evals"]
    progress.t_train = state["t_train"]
    # (a checkpoint from before wall_s: its training seconds, a lower bound)
    progress.wall_before = state.get("wall_s", state["t_train"])
    blocks = state["blocks"] if "blocks" in state else blocks_of_parallel_lists(state)
    for b, window, saved in zip(model.blocks, progress.recent_load, blocks):
        window.extend(saved["recent_load"])
        b.ffn.load_helper_states(saved)


def discard_checkpoint(name, args):
    """Called once the run's result is stored: the result supersedes it."""
    path = checkpoint_path(name, args)
    if path and os.path.exists(path):
        os.remove(path)


def zero_missing_grads(opt):
    """A zero grad for each parameter AdamW has stepped before that got none
    this step: what zeroing the grads in place gives, so every such parameter's
    moments still decay, without a zeroing pass and an accumulating add over
    the dense expert grads each step."""
    for group in opt.param_groups:
        for param in group["params"]:
            if param.grad is None and param in opt.state:
                param.grad = torch.zeros_like(param)


class LazyExpertOptimizer:
    """--expert-updates sparse: the expert weights by torch.optim.SparseAdam,
    which moves an expert, decays its moments and advances its bias
    correction only on the steps that route a token to it (the lazy Adam of
    product-key memory layers), everything else by AdamW as in dense mode.
    Dense AdamW touches all 2 x 2 x E*h*d expert weights every step however
    few experts the step used: at E = 65,536 that update alone took 3.5 s on
    one thread, and a product-key step 4.7 s with it, 0.45 s without."""

    def __init__(self, model, lr):
        experts = [w for b in model.blocks for w in (b.ffn.w1, b.ffn.w2)]
        expert_ids = {id(w) for w in experts}
        rest = [p for p in model.parameters() if id(p) not in expert_ids]
        self.dense = torch.optim.AdamW(rest, lr=lr, weight_decay=0.0)
        self.sparse = torch.optim.SparseAdam(experts, lr=lr)
        self.param_groups = self.dense.param_groups + self.sparse.param_groups
        # zero_missing_grads reads it: only AdamW's parameters get zero grads
        self.state = self.dense.state

    def zero_grad(self, set_to_none=True):
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.dense.step()
        self.sparse.step()

    def state_dict(self):
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state):
        self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


def make_optimizer(model, args):
    if args.expert_updates == "sparse":
        return LazyExpertOptimizer(model, args.lr)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)


def train(name, make_router, flops, data, val, args):
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = MoELM(make_router, args)
    opt = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    progress = Progress(len(model.blocks), args.load_window, start)
    ckpt = checkpoint_path(name, args)
    if ckpt and os.path.exists(ckpt):
        load_checkpoint(ckpt, model, opt, gen, progress, args)
        print(f"[{name}] resumed from {ckpt} after step {progress.step}", flush=True)
    curve, evals, recent_load = progress.curve, progress.evals, progress.recent_load
    for step in range(progress.step + 1, args.steps + 1):
        x, y = batches(data, args, gen)
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        ce = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        loss = ce
        if args.balance:
            loss = loss + args.balance * sum(b.ffn.balance_loss for b in model.blocks) / len(
                model.blocks)
        if args.score_balance:
            loss = loss + args.score_balance * sum(
                b.ffn.score_balance_loss for b in model.blocks) / len(model.blocks)
        full = [b.ffn.full_balance_loss for b in model.blocks if b.ffn.full_balance_loss is not None]
        if full:
            loss = loss + args.full_balance * sum(full) / len(full)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        zero_missing_grads(opt)
        biased = [b.ffn for b in model.blocks if b.ffn.load_bias is not None]
        for ffn in biased:
            ffn.load_bias.zero_grads()
        opt.step()
        for ffn in biased:
            ffn.load_bias.update(ffn.last_experts, args.experts, args.load_bias_rate)
        for i, b in enumerate(model.blocks):
            if b.ffn.smoothed_bias is not None:
                b.ffn.smoothed_bias.update(b.ffn.last_input, b.ffn.last_experts)
            recent_load[i].append(torch.bincount(b.ffn.last_experts.reshape(-1),
                                                 minlength=args.experts))
        update_codebooks(model, step, args)
        progress.t_train += time.perf_counter() - t0
        curve.append(ce.item())
        if step % args.eval_every == 0 or step == args.steps:
            ev = {"step": step, **evaluate(model, val, args)}
            evals.append(ev)
            extra = ""
            if ev["recall_at_k"] is not None:
                extra = (f" recall@{args.k} {ev['recall_at_k']:.3f} mass {ev['mass_recall']:.3f}"
                         f" shortlist {ev['shortlist']:.0f}")
            print(f"[{name}] step {step}/{args.steps} train {ce.item():.3f} "
                  f"val {ev['val_loss']:.3f} experts used {ev['utilization']:.3f}{extra}",
                  flush=True)
        progress.step = step
        if ckpt and step % args.checkpoint_every == 0 and step < args.steps:
            save_checkpoint(ckpt, model, opt, gen, progress, args)
    if args.save_router_data:
        save_router_data(model, name, val, args)
    final = evals[-1]
    shortlists = [e["shortlist"] for e in evals if e["shortlist"] is not None]
    upkeep = list_upkeep(model, args)
    if shortlists:  # AIR: the measured shortlist, averaged over the evaluations
        width = args.dim + (1 if args.load_bias_rate > 0 else 0)
        flops = 2.0 * args.codewords * width + 2.0 * width * sum(shortlists) / len(shortlists)
        flops += upkeep.get("list_refresh_flops_per_token", 0.0)  # air_query's refreshes
    return {
        **upkeep,
        "router": name,
        "train_curve": curve,
        "evals": evals,
        "val_loss": final["val_loss"],
        "val_perplexity": math.exp(final["val_loss"]),
        "val_bits_per_byte": final["val_loss"] / math.log(2),
        "router_flops_per_token": flops,
        "tokens_per_s": args.steps * args.batch * args.seq / progress.t_train,
        "wall_s": progress.wall_s(),  # over every segment of a resumed run
        "recall_at_k": final["recall_at_k"],
        "mass_recall": final["mass_recall"],
        "utilization": final["utilization"],
        "shortlist": final["shortlist"],
        # exp(entropy) of the training load over the last --load-window
        # steps, as a fraction of E, mean over blocks (>= 0.5: balanced)
        "effective_experts": sum(effective_experts(sum(w)) for w in recent_load) / (
            len(recent_load) * args.experts),
    }


def plot(results, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    w = max(1, args.steps // 50)
    for r in results:
        c = r["train_curve"]
        smooth = [sum(c[max(0, i - w + 1):i + 1]) / len(c[max(0, i - w + 1):i + 1]) for i in range(len(c))]
        line, = ax.plot(range(1, len(c) + 1), smooth, label=f"{r['router']} (train, smoothed)")
        ax.plot([e["step"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], "o--",
                color=line.get_color(), label=f"{r['router']} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title(f"byte-level MoE LM on fortunes: E={args.experts}, h={args.hidden}, k={args.k}, "
                 f"d={args.dim}, {args.layers} layers", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4, help="expert hidden size h")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--codewords", type=int, default=64)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--update-every", type=int, default=1, help="AIR codebook update period")
    p.add_argument("--codebook-step", type=float, default=1.0,
                   help="AIR codebook EMA step size per update (1: a Lloyd step)")
    p.add_argument("--codebook-warmup", type=int, default=0,
                   help="AIR: a Lloyd step after every one of the first N steps")
    p.add_argument("--list-cap", type=int, default=0, help="AIR inverted-list cap (0: none)")
    p.add_argument("--spills", type=int, default=0, help="AIR: extra (SOAR) lists per expert")
    p.add_argument("--soar-lambda", type=float, default=1.0, help="AIR: SOAR spill weight")
    for option, default, what in (
            ("--list-length", 256, "experts per query list (L)"),
            ("--list-k", 0, "count each sample token's exact top-N picks (0: --k)"),
            ("--list-refresh", 64, "rebuild the query lists every N training steps"),
            ("--list-sample", 4096, "from the last S tokens the router saw in training")):
        p.add_argument(option, type=int, default=default, help="air_query: " + what)
    p.add_argument("--save-router-data", default="",
                   help="directory: save each router's trained centers and a batch of its "
                        "inputs as <router>_layer<i>_{centers,tokens}.npy")
    p.add_argument("--save-batches", type=int, default=4,
                   help="validation batches of router inputs to save")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--query-norm", action="store_true",
                   help="batch-normalize the router's input (no affine), as PEER does")
    p.add_argument("--load-bias-rate", type=float, default=0.0,
                   help="auxiliary-loss-free balancing: per-step change of the expert "
                        "selection biases (0: off)")
    p.add_argument("--bias-balance", type=float, default=0.0,
                   help="selection bias from the load averaged over --load-window steps, "
                        "moved by this fraction of the logit spread per step (0: off)")
    p.add_argument("--bias-cap", type=float, default=0.0,
                   help="--bias-balance: keep every |bias| within this many logit spreads "
                        "(0: no cap)")
    p.add_argument("--load-window", type=int, default=32,
                   help="steps the --bias-balance load average spans (EMA weight 1/window)")
    p.add_argument("--full-balance", type=float, default=0.0,
                   help="dense: weight of the Switch loss over the softmax of all E logits")
    p.add_argument("--score-balance", type=float, default=0.0,
                   help="weight of the key-side load-balancing loss (0: none)")
    p.add_argument("--balance", type=float, default=0.0,
                   help="weight of the load-balancing loss (0: none)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--warmup", type=int, default=0, help="cosine schedule: warm-up steps")
    p.add_argument("--corpus", choices=sorted(CORPORA), default="fortunes",
                   help="fortunes (Debian 'fortunes', 2.5 MB) or gcide (Debian 'dict-gcide', "
                        "the GNU Collaborative International Dictionary of English, 40 MB)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--routers", default="dense,air,product_key")
    p.add_argument("--expert-updates", choices=("dense", "sparse"), default="dense",
                   help="dense: AdamW over every expert each step; sparse: lazy Adam "
                        "(SparseAdam) on the experts a step routed to, for large E")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/lm")
    p.add_argument("--checkpoint-dir", default="",
                   help="directory: save each run's progress there as <router>.ckpt every "
                        "--checkpoint-every steps; a run finds its checkpoint and resumes "
                        "(deleted once the run's results are written)")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between checkpoints (with --checkpoint-dir)")
    return p


ROUTERS = ("dense", "air", "product_key", "product_key_h2", "product_key_h4", "hash",
           "air_query")

# Integer options and their least value.
INT_MINIMUM = {"steps": 1, "batch": 1, "seq": 1, "dim": 1, "heads": 1, "layers": 1, "experts": 1,
               "hidden": 1, "k": 1, "codewords": 1, "probes": 1, "update_every": 1,
               "codebook_warmup": 0, "list_cap": 0, "spills": 0, "save_batches": 1,
               "warmup": 0, "eval_every": 1, "eval_batches": 1, "threads": 1, "seed": 0,
               "load_window": 1, "checkpoint_every": 1, "list_length": 1, "list_refresh": 1,
               "list_sample": 1, "list_k": 0}


def flag(option):
    return "--" + option.replace("_", "-")


def option_errors(args):
    """Every problem with the options, each message naming its option: what
    main() (and study.py, for each of its runs) checks before the corpus is
    read or anything trains. The routers' own checks are tried too, on a
    router built from the options (router_errors)."""
    errors = []

    def need(ok, message):
        if not ok:
            errors.append(message)

    names = args.routers.split(",")
    unknown = [n for n in names if n not in ROUTERS]
    need(not unknown, f"--routers: unknown {unknown}; choose from {', '.join(ROUTERS)}")
    need(len(set(names)) == len(names), f"--routers: repeated names in {args.routers!r}")
    for option, least in INT_MINIMUM.items():
        value = getattr(args, option)
        need(value >= least, f"{flag(option)} must be >= {least}, got {value}")
    need(args.seed < 2**64, f"--seed must be < 2^64, got {args.seed}")
    for option in ("soar_lambda", "balance", "score_balance", "load_bias_rate", "bias_balance",
                   "bias_cap", "full_balance"):
        value = getattr(args, option)
        need(math.isfinite(value) and value >= 0, f"{flag(option)} must be finite and >= 0, "
                                                  f"got {value}")
    need(math.isfinite(args.lr) and args.lr > 0, f"--lr must be finite and > 0, got {args.lr}")
    need(args.expert_updates in ("dense", "sparse"),
         f"--expert-updates must be dense or sparse, got {args.expert_updates!r}")
    need(0 < args.codebook_step <= 1, f"--codebook-step must be in (0, 1], got "
                                      f"{args.codebook_step}")
    if errors:  # the checks below assume sane values
        return errors
    need(args.dim % args.heads == 0, f"--heads {args.heads} does not divide --dim {args.dim}")
    need(not (args.bias_balance > 0 and args.load_bias_rate > 0),
         "--bias-balance and --load-bias-rate are two forms of the same bias: choose one")
    no_column = [n for n in names if n in ("hash", "product_key_h2", "product_key_h4")]
    need(not (args.load_bias_rate > 0 and no_column),
         f"--load-bias-rate: its key-column bias has no form for {', '.join(no_column)}; "
         f"use --bias-balance")
    need(args.k <= args.experts, f"--k {args.k} exceeds --experts {args.experts}")
    if "air" in names or "air_query" in names:
        need(args.codewords <= args.experts,
             f"--codewords {args.codewords} exceeds --experts {args.experts}")
        need(args.probes <= args.codewords,
             f"--probes {args.probes} exceeds --codewords {args.codewords}")
    if "air_query" in names:
        need(args.list_length <= args.experts,
             f"--list-length {args.list_length} exceeds --experts {args.experts}")
        need(args.list_k == 0 or args.k <= args.list_k <= args.experts,
             f"--list-k {args.list_k} is outside [--k {args.k}, --experts {args.experts}] "
             f"(0: --k)")
        # a refresh's k-means needs C sample tokens
        need(min(args.list_sample, args.list_refresh * args.batch * args.seq) >= args.codewords,
             f"air_query: a refresh samples min(--list-sample, --list-refresh x --batch x --seq)"
             f" = {min(args.list_sample, args.list_refresh * args.batch * args.seq)} tokens, "
             f"fewer than --codewords {args.codewords}")
    if any(name.startswith("product_key") for name in names):
        n = math.isqrt(args.experts)
        need(n * n == args.experts, f"--experts {args.experts} is not a square: product_key "
                                    f"needs E = n^2 (e.g. {n * n} or {(n + 1) ** 2})")
    need(not args.query_norm or args.batch * args.seq >= 2,
         "--query-norm needs --batch x --seq >= 2 tokens (batch statistics)")
    return errors or router_errors(args, names)


def router_errors(args, names):
    """What the routers themselves refuse in these options (AIR: spills
    against C, list caps), found by building one of each before training."""
    table = routers(args)
    errors = []
    for name in names:
        try:
            table[name][0]()
        except (ValueError, TypeError, RuntimeError, MemoryError) as e:
            errors.append(f"--routers {name}: the router refuses these options: {e}")
    return errors


def writable_directory_errors(args):
    """Creates --out and --save-router-data now, so that a bad path fails
    before training rather than after it."""
    errors = []
    for option in ("out", "save_router_data", "checkpoint_dir"):
        path = getattr(args, option)
        if not path:
            continue
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            errors.append(f"{flag(option)}: cannot create directory {path!r}: {e.strerror}")
            continue
        if not os.access(path, os.W_OK | os.X_OK):
            errors.append(f"{flag(option)}: directory {path!r} is not writable")
    return errors


def main():
    parser = make_parser()
    args = parser.parse_args()
    errors = option_errors(args) or writable_directory_errors(args)
    if errors:
        parser.error("; ".join(errors))
    torch.set_num_threads(args.threads)

    train_data, val_data = load_splits(args.corpus)
    print(f"{args.corpus}: {len(train_data):,} bytes train, {len(val_data):,} validation")
    shortest = min(len(train_data), len(val_data))
    if args.seq + 1 >= shortest:
        parser.error(f"--seq {args.seq} leaves no room in the corpus's {shortest:,}-byte split")
    table = routers(args)
    results = []
    for name in args.routers.split(","):
        make_router, flops = table[name]
        results.append(train(name, make_router, flops, train_data, val_data, args))

    with open(os.path.join(args.out, "lm_results.json"), "w") as f:
        json.dump({"config": vars(args), "results": results}, f, indent=2)
    for name in args.routers.split(","):
        discard_checkpoint(name, args)
    lines = ["| router | val loss (nats/byte) | perplexity | bits/byte | routing MFLOP/token "
             "| tokens/s (train) | recall@k | mass recall |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rec = f"{r['recall_at_k']:.3f}" if r["recall_at_k"] is not None else "–"
        mass = f"{r['mass_recall']:.3f}" if r["mass_recall"] is not None else "–"
        lines.append(f"| {r['router']} | {r['val_loss']:.4f} | {r['val_perplexity']:.3f} | "
                     f"{r['val_bits_per_byte']:.3f} | {r['router_flops_per_token'] / 1e6:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {rec} | {mass} |")
    with open(os.path.join(args.out, "lm_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results, args, os.path.join(args.out, "lm_loss.png"))
    print("\n".join(lines))
    print(f"wrote {args.out}/lm_results.json, lm_table.md, lm_loss.png")


if __name__ == "__main__":
    main()
