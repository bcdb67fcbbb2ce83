"""bfloat16 and CUDA tensors in the routers (issue 18).

bfloat16 on the CPU is checked against the float32 path (the same values,
widened exactly: equal routes, gates and gradients up to the final rounding
to bfloat16) and against a float64 reference. CUDA tensors where no cuda
backend runs are checked with a hand-made DLPack capsule on a fake device
object, which reaches the extension's own check. The tests marked `cuda`
run the routers on a GPU and compare with the CPU; they skip here, with the
reason.

Run: PYTHONPATH=<build>/python /usr/bin/python3 -m pytest -q python/tests/test_devices.py
"""

import ctypes

import pytest
import torch

import airmoe
from airmoe import _airmoe
from airmoe._tensors import cpp_tensor
from test_routers import exact_logits  # pytest puts python/tests on sys.path

KINDS = ["air", "dense", "pk"]
CUDA_REASON = _airmoe.cuda_unavailable_reason() or (
    "" if torch.cuda.is_available() else "torch has no CUDA device")
cuda = pytest.mark.skipif(bool(CUDA_REASON), reason=f"no cuda backend: {CUDA_REASON}")


def bf16_exact(*shape, seed):
    """Random values that bfloat16 holds exactly (so float32 and bfloat16
    inputs are the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).bfloat16().float()


def make(kind, E=64, d=16, k=4, seed=0):
    if kind == "air":  # every list probed: exact top-k
        c = 8
        return airmoe.AIRRouter(E, d, k, c, c, centers=bf16_exact(E, d, seed=seed), seed=seed)
    if kind == "dense":
        return airmoe.DenseRouter(E, d, k, centers=bf16_exact(E, d, seed=seed))
    n = int(round(E ** 0.5))
    d1 = d // 2
    return airmoe.ProductKeyRouter(n, d, k, keys1=bf16_exact(n, d1, seed=seed),
                                   keys2=bf16_exact(n, d - d1, seed=seed + 1))


def run(router, hidden, weights):
    """Forward and backward of sum(gates * weights): gates, indices and the
    gradients of hidden and of every parameter."""
    h = hidden.clone().requires_grad_(True)
    router.zero_grad()
    gates, idx = router(h)
    (gates * weights.to(gates.dtype)).sum().backward()
    # Copies: Module.cuda() moves a parameter's .grad in place, which would
    # move gradients kept from an earlier run too.
    return gates, idx, h.grad, [p.grad.detach().clone() for p in router.parameters()]


# ---------------------------------------------------------------------------
# bfloat16 on the CPU.


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_equals_float32_of_the_same_values(kind):
    r = make(kind)
    hidden = bf16_exact(40, 16, seed=7)
    weights = bf16_exact(40, 4, seed=8)
    g32, i32, dh32, dp32 = run(r, hidden, weights)
    r.bfloat16()
    assert all(p.dtype == torch.bfloat16 for p in r.parameters())
    g16, i16, dh16, dp16 = run(r, hidden.bfloat16(), weights)
    assert g16.dtype == dh16.dtype == torch.bfloat16
    assert torch.equal(i16, i32)
    # The C++ side computed the same float32 values: only the final
    # rounding to bfloat16 differs.
    assert torch.equal(g16, g32.bfloat16())
    assert torch.equal(dh16, dh32.bfloat16())
    for a, b in zip(dp16, dp32):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.bfloat16())


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_against_a_float64_reference(kind):
    r = make(kind).bfloat16()
    hidden = bf16_exact(40, 16, seed=9)
    weights = bf16_exact(40, 4, seed=10)
    gates, idx, d_hidden, d_params = run(r, hidden.bfloat16(), weights)
    # The reference: float64 logits of the same values, exact top-k,
    # softmax over the chosen, and its gradient by autograd in float64.
    ref = r.double()
    h = hidden.double().requires_grad_(True)
    z = exact_logits(ref, h)
    z_top, ref_idx = torch.topk(z.detach(), 4, dim=-1)
    assert torch.equal(idx, ref_idx)
    ref_gates = torch.softmax(torch.gather(z, 1, ref_idx), dim=-1)
    torch.testing.assert_close(gates.double(), ref_gates.detach(), rtol=8e-3, atol=1e-3)
    (ref_gates * weights.double()).sum().backward()
    torch.testing.assert_close(d_hidden.double(), h.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_module_moves_and_converts(kind):
    r = make(kind)
    hidden = bf16_exact(12, 16, seed=3)
    g32, i32 = r(hidden)
    r.bfloat16()
    if kind == "air":
        assert r.codebook.dtype == torch.float32  # unit rows stay float32
    g16, i16 = r(hidden.bfloat16())
    assert torch.equal(i16, i32)
    r.double()
    g64, i64 = r(hidden.double())
    assert g64.dtype == torch.float64 and torch.equal(i64, i32)
    r.float()
    g, i = r(hidden)
    assert torch.equal(g, g32) and torch.equal(i, i32)
    r.to("cpu", torch.bfloat16)
    assert torch.equal(r(hidden.bfloat16())[1], i32)


# ---------------------------------------------------------------------------
# Selection bias with bfloat16 routers: a float32 buffer on the router's device.


@pytest.mark.parametrize("kind", ["air", "dense"])
@pytest.mark.parametrize("gate_mode", ["chosen", "sigmoid"])
def test_biased_bfloat16_selects_by_z_plus_b_with_gates_from_z(kind, gate_mode):
    r = make(kind).bfloat16()
    r.gate_mode = gate_mode
    hidden = bf16_exact(40, 16, seed=11).bfloat16()
    unbiased = r(hidden)[1]
    r.bias = 0.5 * torch.randn(64, generator=torch.Generator().manual_seed(12))
    gates, idx = r(hidden)
    assert gates.dtype == torch.bfloat16
    # Reference in float64 from the same (bfloat16) values: experts by
    # z + b (ties to the lower id), gates from the unbiased z.
    z = exact_logits(r.double(), hidden.double()).detach()
    want = torch.sort(-(z + r.bias.double()), dim=-1, stable=True).indices[:, :4]
    assert torch.equal(idx, want)
    assert not torch.equal(idx, unbiased), "the bias moved no route"
    chosen = torch.gather(z, 1, want)
    w = torch.sigmoid(chosen) if gate_mode == "sigmoid" else torch.softmax(chosen, -1)
    torch.testing.assert_close(gates.double(), w / w.sum(-1, keepdim=True), rtol=8e-3, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_bias_stays_float32_and_follows_the_module(kind):
    r = make(kind)
    r.bias = torch.linspace(-1, 1, 64)
    hidden = bf16_exact(20, 16, seed=13)
    i32 = r(hidden)[1]
    r.bfloat16()
    assert r.bias.dtype == torch.float32 and r.bias.device.type == "cpu"
    assert torch.equal(r(hidden.bfloat16())[1], i32)
    r.double()
    assert r.bias.dtype == torch.float32
    assert torch.equal(r(hidden.double())[1], i32)
    assert "bias" in r.state_dict()


@pytest.mark.parametrize("kind", KINDS)
def test_bias_of_the_wrong_device_dtype_or_length_named(kind):
    r = make(kind).bfloat16()
    hidden = bf16_exact(4, 16, seed=14).bfloat16()
    for bias, message in [
            (torch.zeros(64, dtype=torch.bfloat16),
             r"bias must be a 1-D contiguous float32 tensor .* got torch.bfloat16 \[64\] on cpu"),
            (torch.zeros(64, dtype=torch.float64), "got torch.float64"),
            (torch.zeros(64, device="meta"),
             "on the router's device cpu .* got torch.float32 \\[64\\] on meta"),
            (torch.zeros(63), "bias has 63 entries, expected E = 64")]:
        r.bias = bias
        with pytest.raises(ValueError, match=message):
            r(hidden)
    r.bias = torch.zeros(64, requires_grad=True)
    with pytest.raises(ValueError, match="bias takes no gradient"):
        r(hidden)
    r.bias = None
    r(hidden)


@cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_biased_matches_cpu(kind):
    r = make(kind)
    r.bias = torch.linspace(-0.5, 0.5, 64)
    r.gate_mode = "sigmoid"
    hidden = bf16_exact(30, 16, seed=15)
    g_cpu, i_cpu = r(hidden)
    r.cuda()
    assert r.bias.device.type == "cuda" and r.bias.dtype == torch.float32
    g_gpu, i_gpu = r(hidden.cuda())
    assert torch.equal(i_gpu.cpu(), i_cpu)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-5, atol=1e-6)
    r.bias = torch.zeros(64)  # a CPU bias for a CUDA router
    with pytest.raises(ValueError, match="on the router's device cuda"):
        r(hidden.cuda())


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_dtypes_named(kind):
    r = make(kind)
    with pytest.raises(ValueError, match=r"hidden is torch.bfloat16 but the router's \w+ is "
                                         r"torch.float32.*router.bfloat16\(\)"):
        r(torch.ones(3, 16, dtype=torch.bfloat16))
    r.bfloat16()
    with pytest.raises(ValueError, match=r"hidden is torch.float32 but the router's \w+ is "
                                         r"torch.bfloat16"):
        r(torch.ones(3, 16))


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_devices_named(kind):
    r = make(kind).to("meta")
    with pytest.raises(ValueError, match=r"hidden is on cpu but the router's \w+ is on meta: "
                                         r"move one of them"):
        r(torch.ones(3, 16))


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_bad_values_named(kind):
    r = make(kind).bfloat16()
    h = torch.ones(5, 16, dtype=torch.bfloat16)
    h[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"tokens row 3 column 2 is \+inf"):
        r(h)
    h[3, 2] = float("nan")
    with pytest.raises(ValueError, match="tokens row 3 column 2 is nan"):
        r(h)
    with pytest.raises(ValueError, match=r"hidden is not contiguous"):
        r(torch.ones(16, 5, dtype=torch.bfloat16).t())
    with pytest.raises(ValueError, match="hidden has 15 columns, expected 16"):
        r(torch.ones(5, 15, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="hidden has dtype torch.float16"):
        r(torch.ones(5, 16, dtype=torch.float16))
    r.k = r.num_experts + 1
    with pytest.raises(ValueError, match=rf"k = {r.num_experts + 1} is outside \[1, "
                                         rf"{r.num_experts}\]"):
        r(torch.ones(5, 16, dtype=torch.bfloat16))


def test_row_strided_views_are_read_in_place():
    wide = torch.ones(6, 10)
    info = _airmoe.tensor_info(wide[:, 2:7])
    assert info == (wide.data_ptr() + 2 * 4, "f32", "host", 6, 5, 10)
    with pytest.raises(ValueError, match=r"centers has strides \(1, 4\)"):
        _airmoe.tensor_info(torch.ones(6, 4).t(), "centers")


# A DLPack tensor on CUDA made by hand (the DLPack ABI through ctypes): what
# a CUDA tensor hands over, on a machine or build where none can exist.
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class FakeCudaTensor:
    """Exposes __dlpack_device__ = (kDLCUDA, 0) and a hand-made capsule of
    a [rows, cols] float32 tensor on cuda:0 (never read: the extension
    refuses it first)."""

    def __init__(self, rows, cols, code=2, bits=32):
        self.shape = (ctypes.c_int64 * 2)(rows, cols)
        self.strides = (ctypes.c_int64 * 2)(cols, 1)
        self.managed = _DLManagedTensor(
            _DLTensor(0x1000, _DLDevice(2, 0), 2, _DLDataType(code, bits, 1), self.shape,
                      self.strides, 0), None, None)

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None):
        return self.capsule()

    def capsule(self):
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self.managed), b"dltensor", None)


@pytest.mark.skipif(not CUDA_REASON, reason="a cuda backend runs here")
def test_cuda_tensor_without_a_cuda_backend():
    why = "is on cuda:0, where airmoe cannot compute: backend 'cuda:0' is not available: "
    reason = _airmoe.cuda_unavailable_reason()
    assert reason  # names the build or the driver
    fake = FakeCudaTensor(4, 16)
    # The object (device asked first) and its bare capsule (device read from it).
    for obj in (fake, fake.capsule()):
        with pytest.raises(ValueError, match="tensor " + why) as e:
            _airmoe.tensor_info(obj)
        assert reason in str(e.value)
    with pytest.raises(ValueError, match="centers " + why):
        _airmoe.DenseIndex(fake)
    with pytest.raises(ValueError, match="keys1 " + why):
        _airmoe.ProductKeyIndex(fake, fake)
    with pytest.raises(ValueError, match="backend 'cuda:0' is not available"):
        _airmoe.AirIndex(16, 4, device="cuda:0")
    index = _airmoe.DenseIndex(torch.ones(8, 16))
    with pytest.raises(ValueError, match="tokens " + why):
        index.route(fake, 2)
    # The dtype of a CUDA capsule is checked too (before its device).
    with pytest.raises(ValueError, match="tokens must be float32 or bfloat16, got DLPack int64"):
        index.route(FakeCudaTensor(4, 16, code=0, bits=64).capsule(), 2)


def test_consumed_capsule_is_refused():
    capsule = torch.ones(2, 3).__dlpack__()
    torch.utils.dlpack.from_dlpack(capsule)  # consumes it
    with pytest.raises(ValueError, match="capsule named 'used_dltensor' is not an unused"):
        _airmoe.tensor_info(capsule)


def test_results_are_taken_over_without_a_copy():
    index = _airmoe.DenseIndex(bf16_exact(8, 4, seed=1))
    experts, gates, handle = index.route(bf16_exact(3, 4, seed=2), 2)
    e = torch.utils.dlpack.from_dlpack(experts)
    assert e.dtype == torch.int32 and e.shape == (3, 2) and e.device.type == "cpu"
    del handle  # the capsule owns its tensor
    g = torch.utils.dlpack.from_dlpack(gates)
    torch.testing.assert_close(g.sum(1), torch.ones(3))


# ---------------------------------------------------------------------------
# On a GPU (skipped without one): the same routes as the CPU, on torch's
# current stream, gradients on the device in the input's dtype.


@cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(kind, dtype):
    r = make(kind, E=256, d=32, k=8).to(dtype)
    hidden = bf16_exact(300, 32, seed=11).to(dtype)
    weights = bf16_exact(300, 8, seed=12)
    g_cpu, i_cpu, dh_cpu, dp_cpu = run(r, hidden, weights)
    r.cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # routed on torch's current stream
        g, i, dh, dp = run(r, hidden.cuda(), weights.cuda())
    stream.synchronize()
    assert g.device.type == dh.device.type == "cuda" and g.dtype == dh.dtype == dtype
    assert torch.equal(i.cpu(), i_cpu)  # logits are bit-equal; exp may differ by ulps
    # float32 values within a few ulps; in bfloat16 an ulp of float32 may
    # move the final rounding by one bfloat16 ulp.
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(g.cpu(), g_cpu, **tol)
    torch.testing.assert_close(dh.cpu(), dh_cpu, **tol)
    for a, b in zip(dp, dp_cpu):
        assert a.device.type == "cuda" and a.dtype == dtype
        torch.testing.assert_close(a.cpu(), b, **tol)
    with pytest.raises(ValueError, match="hidden is on cpu but the router's .* is on cuda:0"):
        r(hidden)
    r.cpu()
    assert torch.equal(r(hidden)[1], i_cpu)


@cuda
def test_cuda_parameter_changes_are_seen():
    r = make("dense", E=256, d=32, k=8).cuda()
    h = bf16_exact(50, 32, seed=5).cuda()
    before = r(h)[1]
    r.centers.data.mul_(-1.0)  # behind autograd's back
    after = r(h)[1]
    assert not torch.equal(before, after)
    g, _ = r(h)
    r.centers.data.mul_(-1.0)
    with pytest.raises(RuntimeError, match="changed between the forward and this backward"):
        g.sum().backward()
    assert cpp_tensor(r.centers).is_cuda


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_bad_parameters_named(kind):
    r = make(kind).bfloat16()
    p = next(r.parameters())
    name = "keys1" if kind == "pk" else "centers"
    p.data[5, 3] = float("nan")
    with pytest.raises(ValueError, match=f"{name} row 5 column 3 is nan"):
        r(torch.ones(2, 16, dtype=torch.bfloat16))
