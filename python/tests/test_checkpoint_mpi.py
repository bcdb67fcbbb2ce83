"""airmoe.MoELayer.save_checkpoint / load_checkpoint over COMM_WORLD: run by
plain pytest (one rank) and under mpiexec (CTest python_checkpoint_mpi_2:
``mpiexec -n 2 python3 -m pytest python/tests/test_checkpoint_mpi.py``). A
layer trained a step is saved on every rank and loaded at this P and at
P' = 1 (COMM_SELF): the parameters, keyed by expert id, and the outputs are
the saved layer's bit for bit. A damaged checkpoint, ranks that read
different checkpoints, an empty path and stale weights raise on every rank."""

import os
import pathlib
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


def test_bias_is_saved_and_loaded(shared_dir):
    layer = trained("air")
    layer.bias = torch.linspace(-2.0, 2.0, E)  # set after the last forward: save hands it over
    layer.save_checkpoint(shared_dir)
    with torch.no_grad():
        out = layer(tokens())
    for comm in (world, MPI.COMM_SELF):
        again = airmoe.MoELayer.load_checkpoint(comm, shared_dir)
        assert again.bias is not None and torch.equal(again.bias, layer.bias)
        assert "bias" in again.state_dict()
        with torch.no_grad():
            assert torch.allclose(again(tokens()), out, rtol=1e-5, atol=1e-6)
    layer.bias = None
    layer.save_checkpoint(shared_dir)
    assert airmoe.MoELayer.load_checkpoint(world, shared_dir).bias is None


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


def test_ranks_reading_other_checkpoints_are_refused_on_every_rank(shared_dir):
    """Another E on one rank corrupted memory, another P hung: now every rank
    raises ValueError before any acts on what it read."""
    if world.Get_size() < 2:
        pytest.skip("needs 2 ranks")
    rank, last = world.Get_rank(), world.Get_size() - 1
    here, other_e, other_p = (os.path.join(shared_dir, n) for n in ("here", "E64", "P1"))
    trained("air").save_checkpoint(here)
    airmoe.MoELayer(world, 2 * E, D, k=3, probes=2, hidden=2, codewords=C,
                    seed=11).save_checkpoint(other_e)
    if rank == 0:
        airmoe.MoELayer(MPI.COMM_SELF, E, D, k=3, probes=2, hidden=2, codewords=C,
                        seed=11).save_checkpoint(other_p)
    world.Barrier()
    for other in (other_e, other_p):
        with pytest.raises(ValueError, match=f"rank {last}: reads another checkpoint than rank 0"):
            airmoe.MoELayer.load_checkpoint(world, other if rank == last else here)


def test_path_likes_name_the_directory(shared_dir):
    """bytes and os.PathLike paths are decoded, not written as "b'...'"."""
    layer = trained("air")
    as_bytes = os.fsencode(os.path.join(shared_dir, "bytes"))
    as_path = pathlib.Path(shared_dir) / "pathlib"
    layer.save_checkpoint(as_bytes)
    layer.save_checkpoint(as_path)
    assert os.path.isfile(os.path.join(shared_dir, "bytes", "manifest.airmoe"))
    assert os.path.isfile(as_path / "manifest.airmoe")
    assert not os.path.exists(str(as_bytes))
    for path in (as_bytes, as_path):
        again = airmoe.MoELayer.load_checkpoint(world, path)
        assert same(experts_by_id(again, world), experts_by_id(layer, world))


def test_empty_or_wrong_paths_are_refused_on_every_rank(shared_dir):
    layer = trained("air")
    rank, last = world.Get_rank(), world.Get_size() - 1
    with pytest.raises(ValueError, match="save_checkpoint: path is empty"):
        layer.save_checkpoint("")
    with pytest.raises(ValueError, match="load_checkpoint: path is empty"):
        airmoe.MoELayer.load_checkpoint(world, b"")
    # One rank's bad path: its own error there, a ValueError naming it on the others.
    own = TypeError if rank == last else ValueError
    with pytest.raises(own, match="path must be a str, bytes or os.PathLike, got int"):
        layer.save_checkpoint(7 if rank == last else shared_dir)
    with pytest.raises(own, match="path must be a str, bytes or os.PathLike, got int"):
        airmoe.MoELayer.load_checkpoint(world, 7 if rank == last else shared_dir)
    assert os.listdir(shared_dir) == []


def test_replaced_weights_are_refused_by_save_as_by_forward(shared_dir):
    """vector_to_parameters sets param.data: w1/w2 no longer are the C++
    shard's weights, which a save would write, stale."""
    layer = trained("air")
    layer.save_checkpoint(shared_dir)
    before = experts_by_id(layer, world)
    rank, last = world.Get_rank(), world.Get_size() - 1
    if rank == last:
        vector = torch.nn.utils.parameters_to_vector(layer.parameters())
        torch.nn.utils.vector_to_parameters(vector + 1.0, layer.parameters())
    own = RuntimeError if rank == last else ValueError
    with pytest.raises(own, match="w1/w2 no longer share the C\\+\\+ shard's memory"):
        layer.save_checkpoint(shared_dir)
    with pytest.raises(own, match="w1/w2 no longer share the C\\+\\+ shard's memory"):
        layer(tokens())
    assert same(experts_by_id(airmoe.MoELayer.load_checkpoint(world, shared_dir), world), before)


def test_a_loaded_layer_takes_the_state_dict_of_the_layer_that_saved_it(shared_dir):
    layer = trained("air")
    layer.save_checkpoint(shared_dir)
    loaded = airmoe.MoELayer.load_checkpoint(world, shared_dir)
    with torch.no_grad():
        loaded.w1.zero_()
    loaded.load_state_dict(layer.state_dict())
    assert same(experts_by_id(loaded, world), experts_by_id(layer, world))
    assert torch.equal(loaded(tokens()).detach(), layer(tokens()).detach())
    # What matters is still compared: another placement (owners) is refused.
    state = layer.state_dict()
    state["owners"] = state["owners"] + 1
    with pytest.raises(ValueError, match="owners differs from this layer's"):
        loaded.load_state_dict(state)
