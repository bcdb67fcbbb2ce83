"""airmoe.MoELayer.save_checkpoint / load_checkpoint over COMM_WORLD: run by
plain pytest (one rank) and under mpiexec (CTest python_checkpoint_mpi_2:
``mpiexec -n 2 python3 -m pytest python/tests/test_checkpoint_mpi.py``). A
layer trained a step is saved on every rank and loaded at this P and at
P' = 1 (COMM_SELF): the parameters, keyed by expert id, and the outputs are
the saved layer's bit for bit. A damaged checkpoint raises ValueError."""

import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

MPI = pytest.importorskip("mpi4py.MPI")

import airmoe  # noqa: E402

E, D, C = 31, 6, 5
world = MPI.COMM_WORLD


@pytest.fixture
def shared_dir():
    path = tempfile.mkdtemp(prefix="airmoe-py-ckpt-") if world.Get_rank() == 0 else None
    path = world.bcast(path, root=0)
    yield path
    world.Barrier()
    if world.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def trained(strategy):
    layer = airmoe.MoELayer(world, E, D, strategy=strategy, k=3, probes=2, hidden=2,
                            codewords=C, seed=11)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(tokens()).pow(2).sum().backward()
    opt.step()  # moves w1, w2 and the centers
    return layer


def tokens(n=13):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(4))


def experts_by_id(layer, comm):
    """{expert id: (w1, w2, center)} over every rank of comm."""
    mine = {int(e): (layer.w1[i].detach().numpy().copy(), layer.w2[i].detach().numpy().copy(),
                     layer.centers_local[i].detach().numpy().copy())
            for i, e in enumerate(layer.hosted.tolist())}
    out = {}
    for part in comm.allgather(mine):
        out.update(part)
    return out


def same(a, b):
    return a.keys() == b.keys() and all(
        all(np.array_equal(x, y) for x, y in zip(a[e], b[e])) for e in a)


@pytest.mark.parametrize("strategy", ["air", "dense-replicated", "dense-broadcast"])
def test_round_trip_at_this_p_and_at_one_rank(strategy, shared_dir):
    layer = trained(strategy)
    saved = experts_by_id(layer, world)
    out = layer(tokens()).detach()
    layer.save_checkpoint(shared_dir)

    again = airmoe.MoELayer.load_checkpoint(world, shared_dir)
    assert again.strategy == strategy and again.k == 3 and again.hidden_size == 2
    assert same(experts_by_id(again, world), saved)
    assert torch.equal(again(tokens()).detach(), out), "same placement: same bits"
    assert torch.equal(again.codebook, layer.codebook)

    alone = airmoe.MoELayer.load_checkpoint(MPI.COMM_SELF, shared_dir)
    assert alone.world_size == 1 and alone.hosted.tolist() == list(range(E))
    assert same(experts_by_id(alone, MPI.COMM_SELF), saved)
    # Another placement: the same routes and parameters, the sums' rounding
    # may differ (docs/checkpoints.md).
    assert torch.allclose(alone(tokens()).detach(), out, rtol=1e-5, atol=1e-6)


def test_damaged_checkpoint_is_refused_on_every_rank(shared_dir):
    layer = trained("air")
    layer.save_checkpoint(shared_dir)
    world.Barrier()
    if world.Get_rank() == 0:
        shard = os.path.join(shared_dir, "shard-00000.airmoe")
        data = bytearray(open(shard, "rb").read())
        data[len(data) // 2] ^= 0x40
        open(shard, "wb").write(bytes(data))
    world.Barrier()
    with pytest.raises(ValueError, match="shard-00000.airmoe' is corrupted"):
        airmoe.MoELayer.load_checkpoint(world, shared_dir)
