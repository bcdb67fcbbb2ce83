"""airmoe: adaptive inverted-index routing for Mixture-of-Experts, for PyTorch.

Routers (torch.nn.Module, CPU, float32 in place or float64 for gradcheck):

* :class:`AIRRouter` — spherical k-means codebook + inverted lists; top-k over
  the shortlist of the m probed lists; ``update_codebook()`` after each
  optimizer step (or ``update_every=N``).
* :class:`DenseRouter` — exact top-k over all experts.
* :class:`ProductKeyRouter` — product keys, E = n^2.

Each maps hidden [T, d] to (gates [T, k], indices [T, k] int64).
:func:`to_megatron` turns that into Megatron-Core's (probs, routing_map).
See :mod:`airmoe.routers` for the tensor and copy rules.

:class:`MoELayer` is the distributed expert-parallel layer (routing, dispatch,
experts, combine and backward in C++ over MPI) on an mpi4py communicator; see
:mod:`airmoe.layer`.
"""

from . import _airmoe
from .layer import MoELayer
from .megatron import MegatronRouterAdapter, to_megatron
from .metrics import exact_topk, recall_at_k
from .routers import AIRRouter, DenseRouter, ProductKeyRouter, chosen_softmax

__all__ = [
    "AIRRouter",
    "DenseRouter",
    "ProductKeyRouter",
    "MegatronRouterAdapter",
    "MoELayer",
    "chosen_softmax",
    "exact_topk",
    "recall_at_k",
    "to_megatron",
]
__version__ = "0.1.0"
