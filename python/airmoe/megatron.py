"""Megatron-Core router outputs from airmoe routes.

Megatron-Core's ``TopKRouter.forward(input)`` returns ``(probs, routing_map)``,
both [num_tokens, num_experts]: ``probs`` holds each token's gates at its k
experts and zeros elsewhere, ``routing_map`` is True exactly there. These are
dense [T, E] tensors: use them for small E (tests, stand-ins), not for the
granular E airmoe is built for.
"""

import torch
from torch import nn

__all__ = ["to_megatron", "MegatronRouterAdapter"]


def to_megatron(gates, indices, num_experts):
    """(gates [T, k], indices [T, k]) -> (probs [T, E] gates.dtype, routing_map [T, E] bool).

    Differentiable in ``gates``. Each row of routing_map has exactly k True
    entries (indices of a row are distinct) and each row of probs sums to 1.
    """
    if gates.shape != indices.shape or gates.dim() != 2:
        raise ValueError(f"gates {list(gates.shape)} and indices {list(indices.shape)} "
                         f"must both be [T, k]")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_experts):
        raise ValueError(f"indices must lie in [0, {num_experts}), got "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    idx = indices.long()
    probs = torch.zeros(gates.shape[0], num_experts, dtype=gates.dtype,
                        device=gates.device).scatter(1, idx, gates)
    routing_map = torch.zeros(gates.shape[0], num_experts, dtype=torch.bool,
                              device=gates.device).scatter(1, idx, True)
    return probs, routing_map


class MegatronRouterAdapter(nn.Module):
    """Wraps an airmoe router so it answers like Megatron-Core's TopKRouter:
    forward(input [..., H]) -> (probs [N, E], routing_map [N, E]), with the
    leading dimensions flattened to N tokens (input must be contiguous)."""

    def __init__(self, router):
        super().__init__()
        self.router = router

    def forward(self, input):
        hidden = input.reshape(-1, input.shape[-1])
        gates, indices = self.router(hidden)
        return to_megatron(gates, indices, self.router.num_experts)
