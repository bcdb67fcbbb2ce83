"""Checks and zero-copy views between torch tensors and the C++ routers.

The C++ side reads float32, row-major memory in place. A CPU, contiguous
float32 tensor crosses as ``tensor.detach().numpy()``, which is a view of the
same memory (no copy). Anything else is refused with a ValueError naming the
fix; the only conversions airmoe makes are the documented float64 ones (see
:mod:`airmoe.routers`).
"""

import math
import operator

import numpy as np
import torch

_FLOAT_DTYPES = (torch.float32, torch.float64)


def check_tensor(x, name, dim=None, ndim=2, rows=None):
    """Raise ValueError/TypeError unless x is a CPU, contiguous, float32/float64 tensor
    with `ndim` dimensions (and `dim` columns, `rows` rows when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(
            f"{name} is on device {x.device}; airmoe routes on the CPU and does not move "
            f"tensors between devices: pass {name}.cpu()")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name} has dtype {x.dtype}; airmoe accepts float32 (routed in place, no copy) "
            f"or float64 (explicit float32 selection, float64 gates): convert with "
            f"{name}.float()")
    if x.dim() != ndim:
        shape = "[T, d]" if ndim == 2 else f"{ndim}-D"
        raise ValueError(f"{name} must be {shape}, got shape {list(x.shape)}")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name} has {x.shape[-1]} columns, expected {dim}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(
            f"{name} has {x.shape[0]} rows, expected {rows} (was the parameter replaced "
            f"with one of another shape?)")
    if not x.is_contiguous():
        raise ValueError(
            f"{name} is not contiguous (strides {x.stride()}); airmoe does not copy "
            f"silently: pass {name}.contiguous()")


INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
MAX_EXPERTS = INT32_MAX  # expert ids are int32 in the C++ library


def check_int(value, name, lo, hi, why=""):
    """`value` as a Python int in [lo, hi]. The C++ routers take 32- and 64-bit
    integers, and pybind11 answers anything else with an argument dump or
    "Overflow": every integer argument is checked here first. TypeError unless
    it is an integer (Python, NumPy or one-element torch integer; not bool),
    ValueError "<name> = V is outside [lo, hi]" otherwise."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") \
            from None
    if not lo <= value <= hi:
        raise ValueError(f"{name} = {value} is outside [{lo}, {hi}]{why}")
    return value


def check_expert_count(experts, name):
    """Expert ids are int32 in the C++ library: refuse more experts up front,
    in the words of its check (core/checks.h: require_expert_count)."""
    try:
        return check_int(experts, name, 1, MAX_EXPERTS)
    except ValueError:
        if operator.index(experts) < 1:
            raise
        raise ValueError(f"{name} = {experts} is too many: expert ids are 32-bit, "
                         f"at most {MAX_EXPERTS} experts") from None


def check_seed(seed):
    return check_int(seed, "seed", 0, UINT64_MAX)


def initial_centers(num_experts, dim, centers, seed):
    """The given centers [E, d] (checked, detached) or seeded Gaussian ones
    scaled by 1/sqrt(d): how every module here starts its router keys."""
    num_experts = check_expert_count(num_experts, "num_experts")
    dim = check_int(dim, "dim", 1, INT64_MAX)
    seed = check_seed(seed)
    if centers is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(num_experts, dim, generator=gen) / math.sqrt(dim)
    check_tensor(centers, "centers", dim=dim)
    if centers.shape[0] != num_experts:
        raise ValueError(
            f"centers has {centers.shape[0]} rows, expected num_experts = {num_experts}")
    return centers.detach()


def view(x):
    """float32 numpy view of a checked tensor: zero-copy for float32; float64 is
    converted (a copy), which callers only do where documented."""
    if x.dtype != torch.float32:
        x = x.float()
    a = x.detach().numpy()
    assert a.flags["C_CONTIGUOUS"]
    return a


def from_numpy(a, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if dtype is None else t.to(dtype)
