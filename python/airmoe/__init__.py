"""airmoe: adaptive inverted-index routing for Mixture-of-Experts, for PyTorch.

Routers (torch.nn.Module; CPU or CUDA, float32 or bfloat16 in place, float64
for gradcheck):

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
:mod:`airmoe.layer`, or on one rank in this process with ``comm=None``, which a
build without MPI also has (an mpi4py communicator then raises RuntimeError
saying the build has no MPI).

:func:`use_air` swaps the routers of a Hugging Face transformers MoE model
for AIR, and :func:`update_codebooks` runs their codebook updates (see
:mod:`airmoe.integrations.transformers`; transformers is imported only then).
"""

# PyTorch is the user's own (airmoe's install does not pull it in, so that it
# never replaces Debian's python3-torch or a CUDA build): any torch from 1.13
# on, with NumPy 1.x or 2.x.
try:
    import torch  # noqa: F401
except ImportError as e:
    raise ImportError(
        "airmoe needs PyTorch, which `pip install` does not bring in: install torch (1.13 or "
        "newer) into this environment first, e.g. `pip install torch`, or create the virtualenv "
        "with --system-site-packages over Debian's python3-torch") from e

from . import _airmoe
from .layer import MoELayer
from .megatron import MegatronRouterAdapter, to_megatron
from .metrics import exact_topk, recall_at_k
from .routers import AIRRouter, DenseRouter, ProductKeyRouter, chosen_sigmoid, chosen_softmax

__version__ = "0.2.0"
__all__ = [
    "AIRRouter",
    "DenseRouter",
    "ProductKeyRouter",
    "MegatronRouterAdapter",
    "MoELayer",
    "chosen_sigmoid",
    "chosen_softmax",
    "exact_topk",
    "recall_at_k",
    "to_megatron",
    "update_codebooks",
    "use_air",
]

# The transformers integration, imported on first use: `import airmoe` never
# imports transformers.
_INTEGRATION = ("use_air", "update_codebooks", "air_gates")


def __getattr__(name):
    if name in _INTEGRATION:
        from .integrations import transformers as integration
        return getattr(integration, name)
    raise AttributeError(f"module 'airmoe' has no attribute {name!r}")
