"""Checks and zero-copy views between torch tensors and the C++ side.

The routers read float32 or bfloat16 rows in place, on the CPU or a CUDA
GPU: a tensor crosses by DLPack (``cpp_tensor``: the detached tensor itself,
whose ``__dlpack__`` the extension calls), and the routers' results come
back the same way (``from_cpp``). MoELayer reads CPU float32 memory through
NumPy (``view``). Anything else is refused with a ValueError naming the
fix; the only conversions airmoe makes are the documented float64 ones (see
:mod:`airmoe.routers`) and AIR's float32 host copy of its centers.
"""

import math
import operator

import numpy as np
import torch

_FLOAT_DTYPES = (torch.float32, torch.float64)
# What the routers take: bfloat16 too, and CUDA tensors.
ROUTER_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
ROUTER_DEVICES = ("cpu", "cuda")


def check_tensor(x, name, dim=None, ndim=2, rows=None, dtypes=_FLOAT_DTYPES, devices=("cpu",)):
    """Raise ValueError/TypeError unless x is a contiguous tensor of one of
    `dtypes` on one of `devices` (types), with `ndim` dimensions (and `dim`
    columns, `rows` rows when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type not in devices:
        where = " or ".join(d.upper() if d == "cuda" else "the CPU" for d in devices)
        raise ValueError(
            f"{name} is on device {x.device}; airmoe computes this on {where} and does not "
            f"move tensors between devices: pass {name}.cpu()")
    if x.dtype not in dtypes:
        accepted = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(
            f"{name} has dtype {x.dtype}; airmoe accepts {accepted} (float32"
            f"{' and bfloat16' if torch.bfloat16 in dtypes else ''} read in place, no copy; "
            f"float64: explicit float32 selection, float64 gates): convert with "
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


def cpp_tensor(x):
    """A checked tensor as the C++ routers read it (DLPack, zero-copy): the
    detached tensor itself (DLPack exports no tensor that requires grad);
    float64 becomes a float32 copy, which callers only do where documented.
    The one place where router tensors cross to C++."""
    x = x.detach()
    return x.float() if x.dtype == torch.float64 else x


def host_float32(x):
    """A checked tensor as a CPU float32 tensor (itself when it is one): what
    the AIR index takes for its centers and codebook (bfloat16 converts
    exactly)."""
    return cpp_tensor(x).float().cpu().contiguous()


def from_cpp(capsule):
    """A tensor the C++ routers returned (a DLPack capsule), taken over
    without a copy, on the device it was computed on."""
    return torch.utils.dlpack.from_dlpack(capsule)


def backend_name(device):
    """The C++ backend of a torch device: "host" or "cuda:N"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return "host"


def current_stream(device):
    """torch's current CUDA stream on `device` as the int the C++ side takes
    (0: the legacy default stream, and on the CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def same_bits(tensors, copies):
    """Whether each tensor holds the bits of its copy (same dtype, shape,
    device), compared where they live (no copy to the host)."""
    for t, c in zip(tensors, copies):
        if t.dtype != c.dtype or t.shape != c.shape or t.device != c.device:
            return False
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        if not torch.equal(t.detach().view(ints), c.view(ints)):
            return False
    return True


def checked_bias(b, num_experts, device, owner):
    """The selection bias `b` ([E] float32, contiguous, on `device`, no
    gradient) as an [E, 1] view, or None for None. Its length and
    finiteness are the C++ side's checks (they name the entry)."""
    if b is None:
        return None
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(b).__name__}")
    if b.dim() != 1 or b.dtype != torch.float32 or b.device != device \
            or not b.is_contiguous():
        raise ValueError(
            f"bias must be a 1-D contiguous float32 tensor of num_experts = "
            f"{num_experts} entries on the {owner}'s device {device} (or None), got "
            f"{b.dtype} {list(b.shape)} on {b.device}"
            f"{'' if b.is_contiguous() else ' (not contiguous)'}: move the {owner} with "
            f".to() (the bias follows), or assign a float32 bias there")
    if b.requires_grad:
        raise ValueError("bias takes no gradient: give a tensor without requires_grad")
    return b.detach().view(-1, 1)


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
