"""Hugging Face transformers MoE models routed by AIR.

    model = MixtralForCausalLM(config)          # or .from_pretrained(...)
    airmoe.use_air(model, codewords=16, probes=4)
    trainer = Trainer(model, ..., callbacks=[AIRCodebookCallback()])

``use_air`` swaps the router of every sparse MoE block of a loaded or freshly
configured model for an :class:`AIRGate`, in place, and returns the model.
Families: Mixtral, Qwen2-MoE, Qwen3-MoE, Qwen3-Next and OLMoE, those that
the installed transformers has. Two layouts are handled:

* transformers 4.x: the block computes its routing inline from an
  ``nn.Linear`` gate, so the block is replaced by an
  :class:`AIRSparseMoeBlock` holding the stock block's own experts (and shared
  expert) under their stock names;
* transformers 5.x: the block calls a router module (``...TopKRouter``), so
  only the router is replaced, by an AIRGate.

Either replacement is also an instance of the stock class it replaces
(transformers 4.5x records ``router_logits`` from instances of the block
class, 5.x from instances of the router class).

Either way the state dict keeps the stock keys (``...gate.weight``), and the
gate's weight is the stock Parameter object itself (in float32).

Nothing here imports transformers until it is needed: ``import airmoe`` and
``import airmoe.integrations.transformers`` do not. docs/hf.md documents the
semantics (gates per family, router logits and the load-balancing loss,
dtypes, checkpoints, generate, gradient checkpointing, torch.compile).
"""

import importlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._tensors import check_int
from ._gate import AIRGate

__all__ = ["AIRCodebookCallback", "AIRGate", "AIRSparseMoeBlock", "FAMILIES", "air_gates",
           "update_codebooks", "use_air"]


@dataclass(frozen=True)
class Family:
    block: str  # the sparse MoE block's class in transformers.models.<type>.modeling_<type>
    # True: the gates are always renormalized over the chosen k (Mixtral);
    # None: the block's (4.x) or router's (5.x) norm_topk_prob says.
    normalized: Optional[bool] = None


# config.model_type -> family. DeepSeek-V3 (sigmoid scores, bias-corrected
# selection) needs the selection bias of the balanced-routers issue first.
FAMILIES = {
    "mixtral": Family("MixtralSparseMoeBlock", normalized=True),
    "qwen2_moe": Family("Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": Family("Qwen3MoeSparseMoeBlock"),
    "qwen3_next": Family("Qwen3NextSparseMoeBlock"),
    "olmoe": Family("OlmoeSparseMoeBlock"),
}


def _modeling_module(model_type):
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def air_gates(model):
    """The model's AIRGate modules, in module order."""
    return [m for m in model.modules() if isinstance(m, AIRGate)]


class AIRSparseMoeBlock(nn.Module):
    """A transformers 4.x sparse MoE block (Mixtral, Qwen2-MoE, OLMoE) routed
    by AIR. Its children are the stock block's, under their stock names
    (``gate``, ``experts``, ``shared_expert``, ``shared_expert_gate``), so
    its state dict keys are the stock ones; ``gate`` is the AIRGate. The
    forward is the stock one with AIR's gates: Mixtral's router jitter in
    training, the experts summed in ascending expert id, and Qwen2-MoE's
    sigmoid-gated shared expert added. Returns (hidden, router_logits)."""

    def __init__(self, stock, gate):
        super().__init__()
        self.stock_class = type(stock).__name__
        self.jitter_noise = float(getattr(stock, "jitter_noise", 0.0) or 0.0)
        for name, child in stock.named_children():
            self.add_module(name, gate if name == "gate" else child)
        self.has_shared_expert = hasattr(stock, "shared_expert")

    def forward(self, hidden_states):
        batch, seq, dim = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        tokens = hidden_states.reshape(-1, dim)
        router_logits, gates, indices = self.gate(tokens)
        out = run_experts(self.experts, tokens, gates, indices)
        if self.has_shared_expert:
            out = out + torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        return out.reshape(batch, seq, dim), router_logits

    def extra_repr(self):
        return f"stock={self.stock_class}"


def run_experts(experts, tokens, gates, indices):
    """sum_j gates[t, j] * experts[indices[t, j]](tokens[t]) for every token,
    expert after expert in ascending id (the stock blocks' order of
    additions); only the experts some token chose run."""
    out = torch.zeros_like(tokens)
    k = indices.shape[1]
    slots = indices.reshape(-1)
    order = torch.sort(slots, stable=True).indices  # slots grouped by expert
    weights = gates.reshape(-1, 1)
    start = 0
    for expert, count in enumerate(torch.bincount(slots, minlength=len(experts)).tolist()):
        if count == 0:
            continue
        chosen = order[start:start + count]
        start += count
        rows = chosen // k
        out.index_add_(0, rows, (experts[expert](tokens[rows]) * weights[chosen]).to(out.dtype))
    return out


# transformers records router_logits from instances of the stock classes
# (5.x: of its router class; 4.5x: of the block class), so the modules put in
# their place are instances of subclasses of both: AIRGate or
# AIRSparseMoeBlock, and the stock class. One class per stock class, named
# AIR<stock name> in this module, so that pickle finds it (see __getattr__).
_STOCK_SUBCLASSES = {}


def _as_stock_class(stock_cls):
    name = "AIR" + stock_cls.__name__
    cls = _STOCK_SUBCLASSES.get(name)
    if cls is None:
        blocks = {family.block for family in FAMILIES.values()}
        air_cls = AIRSparseMoeBlock if stock_cls.__name__ in blocks else AIRGate
        # The AIR class initializes nn.Module itself; the stock __init__
        # (which wants a config) is skipped.
        skip_init = type(f"_{stock_cls.__name__}Base", (stock_cls,),
                         {"__init__": lambda self, *a, **kw: nn.Module.__init__(self),
                          "__module__": __name__})
        cls = type(name, (air_cls, skip_init),
                   {"__module__": __name__, "__qualname__": name,
                    "__doc__": f"{air_cls.__name__} as a {stock_cls.__name__}."})
        _STOCK_SUBCLASSES[name] = cls
    return cls


def _stock_class(name):
    """The transformers class that AIR<name> stands for, or None."""
    for model_type in FAMILIES:
        try:
            module = _modeling_module(model_type)
        except ImportError:
            continue
        if isinstance(getattr(module, name, None), type):
            return getattr(module, name)
    return None


def __getattr__(name):
    if name == "AIRCodebookCallback":
        cls = _codebook_callback_class()
        globals()[name] = cls
        return cls
    stock = _stock_class(name[len("AIR"):]) if name.startswith("AIR") else None
    if stock is not None:
        return _as_stock_class(stock)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class _Swap:
    """One block's change, prepared (gate built, codebook trained) before any
    block is touched, so that a bad argument leaves the model unchanged."""
    parent: nn.Module
    attr: str
    block: nn.Module
    gate: AIRGate
    stock_gate: nn.Module
    layout: str  # "block" (4.x) or "router" (5.x)

    def apply(self):
        weight = self.stock_gate.weight  # the stock Parameter, kept as the gate's
        with torch.no_grad():
            weight.data = self.gate.weight.data
            if weight.grad is not None:
                weight.grad = weight.grad.to(torch.float32)
        self.gate.weight = weight
        if self.layout == "block":
            new = _as_stock_class(type(self.block))(self.block, self.gate)
            _carry_hooks(self.block, new)
            setattr(self.parent, self.attr, new)
        else:
            _carry_hooks(self.stock_gate, self.gate)
            self.block.gate = self.gate


def _carry_hooks(old, new):
    """Forward hooks (transformers 5.x installs output-capture hooks once per
    model) move to the replacement, which has the same output contract."""
    for attr in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(old, attr) and hasattr(new, attr):
            getattr(new, attr).update(getattr(old, attr))


def _family(model):
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, nn.Module) or model_type is None:
        raise TypeError(f"airmoe.use_air: expected a transformers model (a PreTrainedModel with "
                        f"a config), got {type(model).__name__}")
    if model_type not in FAMILIES:
        raise ValueError(
            f"airmoe.use_air: {type(model).__name__} (model_type {model_type!r}) is not a "
            f"family airmoe knows; supported: {', '.join(sorted(FAMILIES))}")
    return model_type, FAMILIES[model_type]


def _prepare(name, parent, attr, block, family, options):
    where = f"{name}.gate" if name else "gate"
    stock_gate = getattr(block, "gate", None)
    weight = getattr(stock_gate, "weight", None)
    if isinstance(stock_gate, nn.Linear):
        layout, gate_cls, settings = "block", AIRGate, block
        if stock_gate.bias is not None:
            raise ValueError(f"airmoe.use_air: {where} has a bias, which AIR does not model")
    elif isinstance(weight, nn.Parameter) and hasattr(stock_gate, "top_k"):
        layout, gate_cls, settings = "router", _as_stock_class(type(stock_gate)), stock_gate
    else:
        raise ValueError(f"airmoe.use_air: {where} is a {type(stock_gate).__name__}, a layout "
                         f"of {family.block} this airmoe does not know")
    if weight.device.type != "cpu":
        raise ValueError(
            f"airmoe.use_air: {where}.weight is on {weight.device}, but this airmoe build routes "
            f"on the CPU only: call use_air on the model on the CPU (model.cpu())")
    normalized = family.normalized
    if normalized is None:
        normalized = bool(settings.norm_topk_prob)
    try:
        gate = gate_cls(weight, settings.top_k, gate_mode="chosen" if normalized else "shortlist",
                        where=where, **options)
    except (ValueError, TypeError, RuntimeError) as e:
        raise type(e)(f"airmoe.use_air: {where}: {e}") from e
    return _Swap(parent, attr, block, gate, stock_gate, layout)


def use_air(model, codewords=None, probes=None, *, kmeans_iterations=10, seed=0, list_cap=0,
            spills=0, spill_lambda=1.0):
    """Swaps the router of every sparse MoE block of `model` for AIR, in
    place, and returns the model.

    codewords (C) and probes (m) are AIRRouter's: None picks the
    recommended ones for the block's E; probes = codewords probes every list,
    where AIR equals the stock router. Every block gets its own codebook,
    trained (spherical k-means, `seed`) on its gate's weight. The options
    are checked on every block before any is swapped: a bad one raises and
    leaves the model as it was. Raises TypeError for something that is not a
    transformers model, ValueError for an unknown family, a model without
    MoE blocks, one already using AIR, a block on a device this build cannot
    serve, and bad AIR options (naming the module).
    """
    model_type, family = _family(model)
    if air_gates(model):
        raise ValueError(f"airmoe.use_air: {type(model).__name__} already routes with AIR "
                         f"({air_gates(model)[0].where})")
    block_cls = getattr(_modeling_module(model_type), family.block)
    options = dict(codewords=codewords, probes=probes, kmeans_iterations=kmeans_iterations,
                   seed=seed, list_cap=list_cap, spills=spills, spill_lambda=spill_lambda)
    swaps = []
    for name, parent in model.named_modules():
        for attr, block in parent.named_children():
            if isinstance(block, block_cls):
                path = f"{name}.{attr}" if name else attr
                swaps.append(_prepare(path, parent, attr, block, family, options))
    if not swaps:
        raise ValueError(
            f"airmoe.use_air: {type(model).__name__} has no {family.block} (no MoE blocks: "
            f"num_experts = 0, or every layer in mlp_only_layers?)")
    for swap in swaps:
        swap.apply()
    return model


def update_codebooks(model, step=1.0, updates=1):
    """Runs ``update_codebook(step, updates)`` on every AIR gate of `model`:
    call it after each ``optimizer.step()``. Returns how many it updated;
    ValueError when the model has none."""
    gates = air_gates(model)
    if not gates:
        raise ValueError(f"airmoe.update_codebooks: {type(model).__name__} has no AIR gates; "
                         f"call airmoe.use_air(model, ...) first")
    for gate in gates:
        gate.update_codebook(step, updates)
    return len(gates)


def _codebook_callback_class():
    try:
        from transformers import TrainerCallback
    except (ImportError, RuntimeError) as e:  # transformers wraps import errors in RuntimeError
        import transformers
        raise ImportError(
            f"AIRCodebookCallback needs transformers' TrainerCallback, which transformers "
            f"{transformers.__version__} cannot import with torch {torch.__version__} ({e}); "
            f"call airmoe.update_codebooks(model) after each optimizer.step() instead") from e

    class AIRCodebookCallback(TrainerCallback):
        """A transformers TrainerCallback that runs update_codebooks(model)
        after every `every`-th optimizer step (on_step_end: with gradient
        accumulation, once per optimizer step)."""

        def __init__(self, step=1.0, updates=1, every=1):
            self.step = float(step)
            self.updates = check_int(updates, "updates", 0, 2**31 - 1)
            self.every = check_int(every, "every", 1, 2**63 - 1)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % self.every == 0:
                update_codebooks(model, self.step, self.updates)

    AIRCodebookCallback.__module__ = __name__
    return AIRCodebookCallback
