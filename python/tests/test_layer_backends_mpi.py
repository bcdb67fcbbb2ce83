"""airmoe.MoELayer over COMM_WORLD on a chosen compute backend and with
bfloat16 tokens: run by plain pytest (one rank) and under mpiexec (CTest
python_layer_backends_mpi_2/3: ``mpiexec -n 2 python3 -m pytest
python/tests/test_layer_backends_mpi.py``).

* bfloat16 ``hidden``: the output and hidden's gradient are the float32
  layer's on the same (bfloat16-exact) values, rounded to bfloat16.
"""

import pytest
import torch

MPI = pytest.importorskip("mpi4py.MPI")

import airmoe  # noqa: E402

E, D, C, K, M, H = 29, 6, 5, 3, 2, 2
STRATEGIES = ["air", "dense-replicated", "dense-broadcast"]
world = MPI.COMM_WORLD
rank, P = world.Get_rank(), world.Get_size()


def build(strategy, **kw):
    return airmoe.MoELayer(world, E, D, strategy=strategy, k=K, probes=M, hidden=H, codewords=C,
                           seed=7, **kw)


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


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_hidden_is_the_f32_layer_rounded(strategy):
    layer = build(strategy)
    x, dy = tokens(), tokens(seed=4)
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
