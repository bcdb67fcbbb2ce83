"""airmoe.MoELayer with comm=None (one rank in this process, no MPI), in
every build, a build without MPI (a GPU machine's) included: every case of
test_layer_backends_mpi.py (each backend bit-equal to the host layer,
bfloat16 tokens, a bad backend, hidden on another device, checkpoints),
executed again as a module of its own with ONE_RANK set, plus the errors
about ``comm`` itself."""

import importlib.util
import pathlib

import pytest

import airmoe
from airmoe import _airmoe


def _one_rank_cases():
    path = pathlib.Path(__file__).with_name("test_layer_backends_mpi.py")
    spec = importlib.util.spec_from_file_location("layer_backends_one_rank", path)
    module = importlib.util.module_from_spec(spec)
    module.ONE_RANK = True
    spec.loader.exec_module(module)
    return module


_cases = _one_rank_cases()
globals().update({name: value for name, value in vars(_cases).items()
                  if name.startswith("test_") or name == "shared_dir"})


@pytest.mark.parametrize("comm", ["COMM_WORLD", 0, object()])
def test_comm_of_another_type_is_refused_by_name(comm):
    with pytest.raises(TypeError, match=f"comm must be None \\(one rank in this process\\) or an "
                                        f"mpi4py.MPI.Comm .*got {type(comm).__name__}"):
        airmoe.MoELayer(comm, 16, 4, codewords=4)


def _fake_mpi4py_comm():
    """An object of a type from mpi4py.MPI, as an mpi4py communicator's is,
    without importing mpi4py (a build without MPI may have none)."""
    return type("Intracomm", (), {"__module__": "mpi4py.MPI"})()


@pytest.mark.skipif(_airmoe.has_mpi, reason="this build has MPI: it takes mpi4py communicators")
def test_mpi4py_comm_is_refused_without_mpi(tmp_path):
    message = ("MoELayer: comm is an mpi4py Intracomm, but this build of airmoe has no MPI .*"
               "pass comm=None")
    with pytest.raises(RuntimeError, match=message):
        airmoe.MoELayer(_fake_mpi4py_comm(), 16, 4, codewords=4)
    with pytest.raises(RuntimeError, match=message):
        airmoe.MoELayer.load_checkpoint(_fake_mpi4py_comm(), str(tmp_path))


@pytest.mark.skipif(_airmoe.has_mpi, reason="this build has MPI: an address is an MPI_Comm's")
def test_the_extension_refuses_an_address_without_mpi():
    with pytest.raises(ValueError, match="this build of airmoe has no MPI .* pass comm=None"):
        _airmoe.MoELayerImpl(1234, "/nonexistent")
