"""AIRGate: an AIRRouter in the place of a model's stock MoE gate.

It keeps what the rest of the model and its checkpoints know of the gate:

* the parameter is ``weight`` [E, d], the stock key, so that a stock state
  dict loads into it and its state dict loads into the stock model; the
  codebook is a buffer that is not saved, and loading a weight
  (``load_state_dict``) retrains it from that weight, seeded, exactly as
  ``use_air`` trained it;
* the output is a stock router's: ``(router_logits, gates, indices)``.

Precision: the gate routes in float32 (AIRRouter itself takes bfloat16
too; the gate keeps a stock gate's float32). Its weight and codebook stay
float32 whatever the model's dtype (``model.to(torch.bfloat16)`` and ``model.half()`` leave them
alone), so the router keys are never converted per step; a bf16 or fp16
model's hidden states [T, d] are converted to float32 as they enter (one
activation-sized copy per MoE block), and the gates are handed back in the
hidden states' dtype.

router_logits: [T, E] float32, log of each token's gate at its k chosen
experts and -inf elsewhere. Nothing of size [T, E] is multiplied: it is a
scatter of T*k values (the stock gate computes [T, E] logits with a
[T, d] x [d, E] product). A softmax over a row gives the token's gates
renormalized over its k experts, and a top-k over it gives AIR's choice:
see docs/hf.md for what transformers' load-balancing loss computes from it.
"""

import math

import torch

from .._tensors import check_int, host_float32
from ..routers import AIRRouter

GATE_MODES = ("chosen", "shortlist")


class AIRGate(AIRRouter):
    """AIR routing under a stock gate's name and contract.

    Args:
        weight: the stock gate's weight [E, d] (any float dtype; copied as
            float32 to train the codebook).
        k: experts per token.
        gate_mode: "chosen" (softmax over the k chosen logits: Mixtral, and
            the others with norm_topk_prob = True) or "shortlist" (exp(z)
            over the sum over every expert AIR scored: norm_topk_prob =
            False, where the stock gate divides by the sum over all E).
        codewords, probes, kmeans_iterations, seed, list_cap, spills,
        spill_lambda: as for :class:`airmoe.AIRRouter`.
        where: the module's path in its model, for error messages.
    """

    def __init__(self, weight, k, *, gate_mode, codewords=None, probes=None, where="gate",
                 kmeans_iterations=10, seed=0, list_cap=0, spills=0, spill_lambda=1.0):
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
        super().__init__(weight.shape[0], weight.shape[1], k, codewords, probes,
                         centers=weight.detach().to(torch.float32).contiguous(),
                         kmeans_iterations=kmeans_iterations, seed=seed, list_cap=list_cap,
                         spills=spills, spill_lambda=spill_lambda)
        self.gate_mode = gate_mode
        self.where = where
        # The stock names: AIRRouter registered `centers` and a saved
        # `codebook`; the checkpoint keeps only `weight`.
        keys = self.centers
        delattr(self, "centers")
        self.weight = keys
        codebook = self.codebook
        delattr(self, "codebook")
        self.register_buffer("codebook", codebook, persistent=False)

    # AIRRouter reads its keys as `self.centers`; here they are the stock
    # `weight` (during AIRRouter.__init__, before the rename, `centers`).
    @property
    def centers(self):
        for name in ("weight", "centers"):
            if name in self._parameters:
                return self._parameters[name]
        raise AttributeError("centers")

    # The names transformers' own router modules have.
    @property
    def top_k(self):
        return self.k

    @property
    def hidden_dim(self):
        return self.dim

    @property
    def norm_topk_prob(self):
        return self.gate_mode == "chosen"

    def forward(self, hidden_states):
        """hidden [..., d] -> (router_logits [T, E] float32, gates [T, k] in
        hidden's dtype, indices [T, k] int64)."""
        if hidden_states.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"{self.where}: the hidden states are on {hidden_states.device}, but airmoe "
                f"routes on the CPU or on CUDA: move the model (model.cpu() or model.cuda())")
        tokens = hidden_states.reshape(-1, self.dim).to(torch.float32).contiguous()
        try:
            gates, indices = super().forward(tokens)
        except (ValueError, RuntimeError) as e:
            raise type(e)(f"{self.where}: {e}") from e
        return self.router_logits(gates, indices), gates.to(hidden_states.dtype), indices

    def _cpp_route(self, tokens, stream=0):
        return self._index.route(tokens, self._checked_k(),
                                 check_int(self.probes, "probes m", 1, self.num_codewords),
                                 self.gate_mode, stream=stream)

    def router_logits(self, gates, indices):
        """[T, E]: log gates at the chosen experts, -inf elsewhere (a
        scatter; differentiable through the gates)."""
        logits = torch.full((gates.shape[0], self.num_experts), -math.inf, dtype=torch.float32,
                            device=gates.device)
        tiny = torch.finfo(torch.float32).tiny  # an underflowed gate stays finite
        return logits.scatter(1, indices, torch.log(gates.clamp_min(tiny)))

    @torch.no_grad()
    def retrain_codebook(self):
        """Spherical k-means on the current weight, seeded as at construction:
        a fresh codebook and fresh lists (what loading a weight does)."""
        index = self._new_index()
        index.set_centers(host_float32(self.weight))
        self._index = index
        self.codebook.copy_(torch.from_numpy(index.codewords()))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "weight" in state_dict and len(error_msgs) == errors:
            self.retrain_codebook()

    def _apply(self, fn, *args, **kwargs):
        # Device moves apply; dtype conversions of the model do not reach the
        # float32 router (see the module's docstring).
        # (.data: _apply converts the Parameter and its grad in place.)
        # (AIRRouter._apply keeps the codebook float32.)
        weight = self.weight.data
        grad = None if self.weight.grad is None else self.weight.grad.data
        super()._apply(fn, *args, **kwargs)
        if self.weight.dtype != torch.float32:
            self.weight.data = weight.to(self.weight.device)
            if grad is not None:
                self.weight.grad.data = grad.to(self.weight.device)
        return self

    def extra_repr(self):
        return f"{super().extra_repr()}, gate_mode={self.gate_mode}, where={self.where}"
