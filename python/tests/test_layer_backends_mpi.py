"""airmoe.MoELayer over COMM_WORLD on a chosen compute backend and with
bfloat16 tokens: run by plain pytest (one rank) and under mpiexec (CTest
python_layer_backends_mpi_2/3: ``mpiexec -n 2 python3 -m pytest
python/tests/test_layer_backends_mpi.py``). test_layer_backends.py runs
every case again with comm=None (one rank in this process, no MPI: every
build, the GPU check's too).

* ``backend=``: the layer on device-emulated (the device code path on the
  CPU) or host-portable equals the default host layer bit for bit through a
  forward, the backward (hidden.grad, w1.grad, w2.grad, centers_local.grad),
  an SGD step and a second forward; so does cuda:0 (the same body, skipped
  without a GPU, with the reason). A state_dict or checkpoint of a
  device-emulated layer loads into a host layer with the same outputs.
* bfloat16 ``hidden``: the output and hidden's gradient are the float32
  layer's on the same (bfloat16-exact) values, rounded to bfloat16.
* A bad backend name and hidden on another device than the backend's are
  refused on every rank, each with the named message.
* At P = 1 the layer over COMM_WORLD is the comm=None layer bit for bit.
"""

import pytest
import torch

import airmoe
from airmoe import _airmoe

E, D, C, K, M, H = 29, 6, 5, 3, 2, 2
STRATEGIES = ["air", "dense-replicated", "dense-broadcast"]
# test_layer_backends.py executes this file as a module of its own with
# ONE_RANK set: comm=None, one rank in this process, without MPI.
if globals().get("ONE_RANK"):
    world, rank, P = None, 0, 1

    @pytest.fixture
    def shared_dir(tmp_path):
        return str(tmp_path)
else:
    if not _airmoe.has_mpi:
        pytest.skip("this build has no MPI (test_layer_backends.py runs these cases with "
                    "comm=None)", allow_module_level=True)
    MPI = pytest.importorskip("mpi4py.MPI")
    from test_checkpoint_mpi import shared_dir  # noqa: F401 - a fixture
    world = MPI.COMM_WORLD
    rank, P = world.Get_rank(), world.Get_size()
BAD_RANK = P - 1  # the rank that passes a bad argument in the error tests


def backend_here(name):
    """`name`, or a skip with the reason where this machine lacks it."""
    if name.startswith("cuda") and _airmoe.cuda_unavailable_reason():
        pytest.skip(f"{name}: {_airmoe.cuda_unavailable_reason()}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"{name}: torch sees no CUDA device")
    return name


BACKENDS = ["device-emulated", "host-portable", "cuda:0"]


def build(strategy, comm=world, **kw):
    return airmoe.MoELayer(comm, E, D, strategy=strategy, k=K, probes=M, hidden=H, codewords=C,
                           seed=7, **kw)


def train_step(layer, x, dy):
    """Every tensor a step makes, on the CPU: the output, hidden.grad, the
    parameters' gradients, then (after an SGD step) the second output."""
    x = x.to(layer.w1.device).requires_grad_(True)
    out = layer(x)
    # dy None: out.sum(), whose gradient autograd hands over expanded
    # (strides (0, 0), or (1, 0) when empty).
    (out if dy is None else out * dy.to(out.device)).sum().backward()
    grads = [x.grad, layer.w1.grad, layer.w2.grad, layer.centers_local.grad]
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    again = layer(x.detach())
    return [t.detach().cpu() for t in [out, *grads, again]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_backend_equals_host_bit_for_bit(strategy, backend):
    layer = build(strategy, backend=backend_here(backend))
    assert layer.backend == backend
    assert layer.w1.device.type == backend.split(":")[0].replace("device-emulated", "cpu") \
        .replace("host-portable", "cpu")
    host = build(strategy)
    assert host.backend.startswith("host-")
    expect_same_steps(layer, host, tokens(), tokens(seed=4), f"{backend} {strategy}")


def expect_same_steps(layer, host, x, dy, where):
    names = ["output", "hidden.grad", "w1.grad", "w2.grad", "centers_local.grad", "output 2"]
    for name, a, b in zip(names, train_step(layer, x, dy), train_step(host, x, dy)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: {name}"
    # The step moved the backend's own weights (zero copy), as the host's.
    assert torch.equal(layer.w1.detach().cpu(), host.w1.detach())
    assert torch.equal(layer.w2.detach().cpu(), host.w2.detach())


@pytest.mark.skipif(world is None or P != 1, reason="compares COMM_WORLD of one rank with "
                    "comm=None (an MPI build, run without mpiexec or with one rank)")
@pytest.mark.parametrize("backend", [None, "device-emulated"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_mpi_rank_equals_comm_none(strategy, backend):
    layer = build(strategy, comm=None, backend=backend)
    assert (layer.rank, layer.world_size) == (0, 1)
    expect_same_steps(layer, build(strategy, backend=backend), tokens(), tokens(seed=4),
                      f"comm=None {backend} {strategy}")


def test_a_rank_without_tokens_equals_host():
    x = tokens()[:0] if rank == BAD_RANK else tokens()
    expect_same_steps(build("air", backend="device-emulated"), build("air"), x, None, "no tokens")


def tokens(n=11, seed=3):
    """This rank's tokens (a different block on every rank), bfloat16-exact."""
    gen = torch.Generator().manual_seed(seed + 100 * rank)
    return torch.randn(n + rank, D, generator=gen).bfloat16().float()


def forward_backward(layer, x, dy):
    """(output, hidden's gradient) of one forward and backward of sum(out * dy)."""
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * dy.to(out.dtype)).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("backend", [None, "device-emulated", "cuda:0"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_hidden_is_the_f32_layer_rounded(strategy, backend):
    layer = build(strategy, backend=backend and backend_here(backend))
    device = layer.w1.device
    x, dy = tokens().to(device), tokens(seed=4).to(device)
    out32, dx32 = forward_backward(layer, x, dy)
    w1_grad = layer.w1.grad.clone()
    layer.zero_grad()
    out16, dx16 = forward_backward(layer, x.bfloat16(), dy)
    assert out16.dtype == torch.bfloat16 and dx16.dtype == torch.bfloat16
    assert torch.equal(out16, out32.bfloat16())
    assert torch.equal(dx16, dx32.bfloat16())
    assert layer.w1.grad.dtype == torch.float32 and torch.equal(layer.w1.grad, w1_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_hidden_dtypes_are_refused_by_name(dtype):
    layer = build("air")
    # Only the last rank passes the wrong dtype: every rank raises, naming it.
    x = tokens().to(dtype) if rank == P - 1 else tokens()
    with pytest.raises(ValueError, match=f"hidden must be float32 or bfloat16 for MoELayer "
                                         f"\\(the math is float32\\), got {dtype}"):
        layer(x)


def test_unknown_backend_is_refused_on_every_rank():
    backend = "nope" if rank == BAD_RANK else "device-emulated"
    message = (f"rank {BAD_RANK}: backend: backend 'nope' is unknown or not built here "
               f"\\(available: host, .*device-emulated")
    with pytest.raises(ValueError, match=message):
        build("air", backend=backend)


def test_backend_of_another_type_is_refused_on_every_rank():
    backend = 3 if rank == BAD_RANK else None
    error = TypeError if rank == BAD_RANK else ValueError
    with pytest.raises(error, match="backend must be None or a backend name"):
        build("air", backend=backend)


@pytest.mark.parametrize("backend", [None, "device-emulated"])
def test_hidden_on_another_device_is_refused_on_every_rank(backend):
    layer = build("air", backend=backend)
    x = torch.empty(4, D, device="meta") if rank == BAD_RANK else tokens()
    # The rank at fault raises its own error, the others name it.
    message = (("" if rank == BAD_RANK else f"rank {BAD_RANK}: ") + "hidden is on meta, but "
               f"the layer's backend '{layer.backend}' computes on cpu")
    with pytest.raises(ValueError, match=message):
        layer(x)
    layer(tokens())  # every rank goes on


def test_device_emulated_state_dict_loads_into_a_host_layer():
    layer = build("air", backend="device-emulated")
    train_step(layer, tokens(), tokens(seed=4))  # moves w1, w2 and the centers
    host = build("air")
    host.load_state_dict(layer.state_dict())
    x = tokens(seed=5)
    assert torch.equal(host(x), layer(x))


@pytest.mark.parametrize("load_on", [None, "device-emulated"])
def test_device_emulated_checkpoint_loads_on_any_backend(load_on, shared_dir):  # noqa: F811
    layer = build("dense-replicated", backend="device-emulated")
    train_step(layer, tokens(), tokens(seed=4))
    layer.save_checkpoint(shared_dir)
    again = airmoe.MoELayer.load_checkpoint(world, shared_dir, backend=load_on)
    assert again.backend == (load_on or host_backend())
    x = tokens(seed=5)
    assert torch.equal(again(x), layer(x))
    assert torch.equal(again.w1, layer.w1) and torch.equal(again.w2, layer.w2)


def test_checkpoint_with_unknown_backend_is_refused_on_every_rank(shared_dir):  # noqa: F811
    build("air").save_checkpoint(shared_dir)
    backend = "nope" if rank == BAD_RANK else None
    with pytest.raises(ValueError, match=f"rank {BAD_RANK}: backend: backend 'nope' is unknown"):
        airmoe.MoELayer.load_checkpoint(world, shared_dir, backend=backend)


def host_backend():
    return build("air").backend
