"""airmoe.MoELayer in one process (mpi4py's COMM_SELF): shapes, zero-copy
parameters, gradients against finite differences, and the error paths. The
multi-rank equality with the single-rank layer is layer_mpi_check.py, run
under mpiexec by CTest."""

import numpy as np
import pytest
import torch

MPI = pytest.importorskip("mpi4py.MPI")

import airmoe  # noqa: E402

E, D, C = 29, 6, 5


def make(**kw):
    args = dict(strategy="air", k=3, probes=2, hidden=2, codewords=C, seed=7)
    args.update(kw)
    return airmoe.MoELayer(MPI.COMM_SELF, E, D, **args)


def tokens(n=11, seed=3):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", ["air", "dense-replicated", "dense-broadcast"])
def test_forward_shapes_and_backward(strategy):
    layer = make(strategy=strategy)
    assert layer.w1.shape == (E, 2, D) and layer.w2.shape == (E, D, 2)
    assert layer.centers_local.shape == (E, D)
    assert layer.hosted.tolist() == list(range(E))
    assert layer.codebook.shape == (C, D)
    x = tokens().requires_grad_(True)
    out = layer(x)
    assert out.shape == (11, D) and out.dtype == torch.float32
    out.pow(2).sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert layer.w1.grad.abs().sum() > 0 and layer.w2.grad.abs().sum() > 0
    assert layer.centers_local.grad.abs().sum() > 0


def test_parameters_share_cpp_memory():
    layer = make()
    capsules = [torch.utils.dlpack.from_dlpack(c()) for c in
                (layer._impl.w1_capsule, layer._impl.w2_capsule)]
    assert layer.w1.data_ptr() == capsules[0].data_ptr()
    assert layer.w2.data_ptr() == capsules[1].data_ptr()
    x = tokens()
    before = layer(x).detach()
    opt = torch.optim.SGD([layer.w2], lr=0.5)
    (layer(x) * before).sum().backward()
    opt.step()
    after = layer(x).detach()
    assert not torch.equal(before, after), "an optimizer step reaches the C++ experts"


def test_gradients_match_finite_differences():
    layer = make(hidden=3)
    x, dy = tokens(seed=5), tokens(seed=6)
    xr = x.clone().requires_grad_(True)
    (layer(xr) * dy).sum().backward()
    gen = torch.Generator().manual_seed(1)

    def loss():
        with torch.no_grad():
            return float((layer(x).double() * dy.double()).sum())

    # Output is linear in W2: finite differences are exact up to rounding.
    for p, tol in ((layer.w2, 1e-2), (layer.w1, 5e-2)):
        for _ in range(6):
            idx = tuple(int(torch.randint(s, (1,), generator=gen)) for s in p.shape)
            eps = 1e-2
            with torch.no_grad():
                p[idx] += eps
            up = loss()
            with torch.no_grad():
                p[idx] -= 2 * eps
            down = loss()
            with torch.no_grad():
                p[idx] += eps
            fd = (up - down) / (2 * eps)
            assert abs(fd - float(p.grad[idx])) <= tol * max(1.0, abs(fd)), (idx, fd)


def test_wrong_communicator_type():
    with pytest.raises(TypeError, match="mpi4py.MPI.Comm"):
        airmoe.MoELayer("COMM_WORLD", E, D, codewords=C)
    with pytest.raises(TypeError, match="mpi4py.MPI.Comm"):
        airmoe.MoELayer(object(), E, D, codewords=C)


def test_bad_arguments_carry_cpp_message():
    with pytest.raises(ValueError, match="strategy 'x' is unknown"):
        make(strategy="x")
    with pytest.raises(ValueError, match="activation 'tanh' is unknown"):
        make(activation="tanh")
    with pytest.raises(ValueError, match="placement policy 'p' is unknown"):
        make(placement="p")
    with pytest.raises(ValueError):
        make(k=E + 1)
    layer = make()
    with pytest.raises(ValueError, match="float32"):
        layer(tokens().double())
    with pytest.raises(ValueError, match="columns"):
        layer(torch.zeros(3, D + 1))


@pytest.mark.parametrize("strategy", ["air", "dense-replicated"])
def test_bf16_wire_rounds_the_vectors_only(strategy):
    f32, bf16 = make(strategy=strategy), make(strategy=strategy, wire_dtype="bf16")
    assert f32.wire_dtype == "f32" and f32._impl.config["wire_dtype"] == "f32"
    assert bf16.wire_dtype == "bf16" and bf16._impl.config["wire_dtype"] == "bf16"
    x = tokens()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = f32(xa), bf16(xb)
    scale = a.abs().max()
    assert 0 < (a - b).abs().max() <= 1e-2 * scale, "bf16 rounding, and only that"
    a.sum().backward()
    b.sum().backward()
    gscale = xa.grad.abs().max()
    assert 0 < (xa.grad - xb.grad).abs().max() <= 1e-2 * gscale


def test_unknown_wire_dtype_names_the_argument():
    with pytest.raises(ValueError, match="wire_dtype: unknown wire dtype 'fp8' \\(f32 or bf16\\)"):
        make(wire_dtype="fp8")
    with pytest.raises(TypeError, match="wire_dtype must be a str"):
        make(wire_dtype=16)


@pytest.mark.parametrize("strategy", ["air", "dense-broadcast"])
def test_request_keys_change_no_bit(strategy):
    plain, keyed = make(strategy=strategy), make(strategy=strategy, request_key_bits=8)
    assert plain.request_key_bits == 0 and keyed.request_key_bits == 8
    assert keyed._impl.config["request_key_bits"] == 8
    x = tokens(n=17)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = plain(xa), keyed(xb)
    assert torch.equal(a, b)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(plain.w1.grad, keyed.w1.grad)
    assert torch.equal(plain.centers_local.grad, keyed.centers_local.grad)
    assert plain.request_key_counts == {"gathers": 0, "drift_updates": 0}
    assert keyed.request_key_counts == {"gathers": 1, "drift_updates": 0}
    # Moved centers reach the router at the next forward: a tiny move is a
    # drift update, a large one a new gather; the outputs stay equal.
    for scale, counts in ((1e-7, {"gathers": 1, "drift_updates": 1}),
                          (0.5, {"gathers": 2, "drift_updates": 1})):
        with torch.no_grad():
            for layer in (plain, keyed):
                layer.centers_local += scale * torch.ones_like(layer.centers_local)
        assert torch.equal(plain(x), keyed(x))
        assert keyed.request_key_counts == counts, (scale, keyed.request_key_counts)


def test_request_keys_can_be_turned_on_and_off():
    layer, plain = make(), make()
    x = tokens(n=13)
    want = plain(x)
    layer.request_key_bits = 12
    assert layer.request_key_bits == 12 and layer.request_key_counts["gathers"] == 1
    assert torch.equal(layer(x), want)
    layer.request_key_bits = 0
    assert layer.request_key_bits == 0 and layer.request_key_counts["gathers"] == 0
    assert torch.equal(layer(x), want)
    with pytest.raises(ValueError, match="request_key_bits = 1: request keys take 2 to 16"):
        layer.request_key_bits = 1
    with pytest.raises(TypeError, match="request_key_bits must be an int"):
        layer.request_key_bits = 8.0
    assert layer.request_key_bits == 0


def test_bad_request_key_bits_name_the_argument():
    with pytest.raises(ValueError, match="request_key_bits = 17: request keys take 2 to 16 bits"):
        make(request_key_bits=17)
    with pytest.raises(TypeError, match="request_key_bits must be an int"):
        make(request_key_bits="8")
    with pytest.raises(TypeError, match="request_key_bits must be an int"):
        make(request_key_bits=True)


@pytest.mark.parametrize("name,value,error", [
    ("num_experts", 2**64, "num_experts"), ("num_experts", 0, "num_experts"),
    ("k", 2**31, "k = 2147483648 is outside"), ("probes", 2**31, "probes = "),
    ("hidden", -1, "hidden = -1"), ("codewords", 2**40, "codewords = "),
    ("kmeans_iterations", 2**31, "kmeans_iterations = "), ("seed", -1, "seed = -1"),
    ("seed", 2**64, "seed = "),
])
def test_out_of_range_integers_name_the_argument(name, value, error):
    kwargs = {"codewords": C, name: value}
    num_experts = kwargs.pop("num_experts", E)
    with pytest.raises(ValueError, match=error):
        airmoe.MoELayer(MPI.COMM_SELF, num_experts, D, **kwargs)


def test_non_integer_arguments_are_type_errors():
    with pytest.raises(TypeError, match="k must be an integer"):
        make(k=2.0)
    with pytest.raises(TypeError, match="hidden must be an integer"):
        make(hidden="16")


def test_state_dict_round_trip_and_other_configuration():
    layer = make()
    sd = layer.state_dict()
    assert set(sd) >= {"w1", "w2", "centers_local", "codebook", "hosted", "owners"}
    layer.load_state_dict(sd)
    with pytest.raises(ValueError, match="hidden"):
        layer.load_state_dict(make(hidden=3).state_dict())
    with pytest.raises(ValueError, match="codebook"):
        layer.load_state_dict(make(seed=8).state_dict())
    with pytest.raises(ValueError, match="strategy"):
        layer.load_state_dict(make(strategy="dense-broadcast").state_dict())


def test_parameters_replaced_are_refused():
    layer = make()
    layer.double()
    with pytest.raises(RuntimeError, match="share the C\\+\\+ shard"):
        layer(tokens())


def test_second_backward_through_one_forward_is_refused():
    layer = make()
    out = layer(tokens())
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        out.sum().backward()


@pytest.mark.parametrize("strategy", ["air", "dense-replicated", "dense-broadcast"])
def test_moved_centers_reach_routing(strategy):
    # One expert's center is pushed along every token: routing must now pick
    # it, exactly as a layer built from the moved centers does.
    layer = make(strategy=strategy)
    x = tokens()
    before = layer(x).detach().clone()
    hosted = layer.hosted.tolist()
    with torch.no_grad():
        layer.centers_local[hosted.index(4)] += 10.0 * x.mean(0)
    after = layer(x).detach()
    assert not torch.equal(before, after)
    all_centers = torch.zeros(E, D)
    all_centers[layer.hosted.long()] = layer.centers_local.detach()
    fresh = make(strategy=strategy, centers=all_centers)
    fresh.load_state_dict({**fresh.state_dict(), "w1": layer.w1.detach().clone(),
                           "w2": layer.w2.detach().clone()})
    # The fresh layer trains its codebook on the moved centers; with every
    # list probed (dense strategies) the outputs must agree exactly.
    if strategy != "air":
        assert torch.allclose(fresh(x), after, rtol=1e-5, atol=1e-6)
