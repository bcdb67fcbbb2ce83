"""Routing quality against exact top-k (small E: builds the [T, E] logits)."""

import torch

__all__ = ["exact_topk", "recall_at_k"]


def exact_topk(hidden, centers, k):
    """(gates [T, k], indices [T, k]) of exact top-k over hidden @ centers.T,
    gates = softmax over the chosen logits. Plain torch, any dtype/device."""
    logits = hidden @ centers.t()
    z, idx = torch.topk(logits, k, dim=-1)
    return torch.softmax(z, dim=-1), idx


def recall_at_k(indices, exact_indices):
    """Mean over tokens of |chosen ∩ exact top-k| / k."""
    if indices.shape != exact_indices.shape:
        raise ValueError(f"shapes differ: {list(indices.shape)} vs {list(exact_indices.shape)}")
    hits = (indices.unsqueeze(-1) == exact_indices.unsqueeze(-2)).any(-1)
    return hits.float().mean().item()
