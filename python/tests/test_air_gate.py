"""AIRGate (airmoe.integrations._gate): AIR under a stock gate's name and
contract, without transformers (python/tests/test_hf_integration.py runs it
inside transformers models)."""

import copy
import pickle

import pytest
import torch

from airmoe.integrations._gate import AIRGate

E, D, K, C = 64, 16, 4, 8


def weight(seed=0):
    return torch.randn(E, D, generator=torch.Generator().manual_seed(seed)) / D**0.5


def hidden(seed=1, rows=24):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))


def reference(h, w, mode):
    """Exact top-k with the stock gates: softmax over the chosen k
    ("chosen") or over all E ("shortlist" with every list probed)."""
    probs = torch.softmax(h @ w.t(), dim=-1)
    gates, indices = torch.topk(probs, K, dim=-1)
    return (gates / gates.sum(-1, keepdim=True) if mode == "chosen" else gates), indices


@pytest.mark.parametrize("mode", ["chosen", "shortlist"])
def test_every_list_probed_is_exact(mode):
    w = weight()
    gate = AIRGate(w, K, gate_mode=mode, codewords=C, probes=C)
    h = hidden().requires_grad_()
    _, gates, indices = gate(h)
    w_ref = w.clone().requires_grad_()
    h_ref = h.detach().clone().requires_grad_()
    want_gates, want_indices = reference(h_ref, w_ref, mode)
    assert torch.equal(indices, want_indices)
    assert torch.allclose(gates, want_gates, atol=1e-6)
    d_gates = torch.randn_like(gates)
    (gates * d_gates).sum().backward()
    (want_gates * d_gates).sum().backward()
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-5)
    assert torch.allclose(gate.weight.grad, w_ref.grad, atol=1e-5)


def test_shortlist_gates_divide_by_the_scored_experts():
    """m < C: exp(z) over the sum over the shortlist, which is at least the
    stock gate (sum over all E) and sums to at most 1; gradients reach every
    scored expert, not only the chosen."""
    w = weight()
    gate = AIRGate(w, K, gate_mode="shortlist", codewords=C, probes=2)
    h = hidden()
    _, gates, indices = gate(h)
    full = torch.softmax(h @ w.t(), dim=-1).gather(1, indices)
    assert (gates >= full - 1e-6).all() and (gates.sum(-1) <= 1 + 1e-6).all()
    assert (gates.sum(-1) < 1 - 1e-3).any()
    gates.sum().backward()
    rows_hit = (gate.weight.grad != 0).any(-1).sum()
    assert rows_hit > torch.unique(indices).numel()


def test_state_dict_is_the_stock_gates_and_loading_retrains_the_codebook():
    gate = AIRGate(weight(0), K, gate_mode="chosen", codewords=C, probes=2)
    assert list(gate.state_dict()) == ["weight"]
    gate.update_codebook()
    other = weight(5)
    gate.load_state_dict({"weight": other})
    fresh = AIRGate(other, K, gate_mode="chosen", codewords=C, probes=2)
    assert torch.equal(gate.weight, fresh.weight)
    assert torch.equal(gate.codebook, fresh.codebook)
    h = hidden()
    assert torch.equal(gate(h)[2], fresh(h)[2])


def test_float32_router_in_a_bfloat16_model():
    gate = AIRGate(weight().bfloat16(), K, gate_mode="chosen", codewords=C, probes=2)
    assert gate.weight.dtype == torch.float32
    address = gate.weight.data_ptr()
    gate.to(torch.bfloat16)
    gate.half()
    assert gate.weight.dtype == gate.codebook.dtype == torch.float32
    assert gate.weight.data_ptr() == address
    logits, gates, indices = gate(hidden().bfloat16())
    assert logits.dtype == torch.float32 and gates.dtype == torch.bfloat16
    assert indices.dtype == torch.int64


def test_router_logits_are_log_gates_at_the_chosen_experts():
    gate = AIRGate(weight(), K, gate_mode="shortlist", codewords=C, probes=2)
    logits, gates, indices = gate(hidden())
    assert logits.shape == (24, E)
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)
    assert torch.isinf(logits[~chosen]).all() and (logits[~chosen] < 0).all()
    assert torch.allclose(logits.gather(1, indices).exp(), gates, atol=1e-6)


def test_copies_route_like_the_original():
    gate = AIRGate(weight(), K, gate_mode="shortlist", codewords=C, probes=2)
    gate.update_codebook()
    h = hidden()
    want = gate(h)
    for copied in (copy.deepcopy(gate), pickle.loads(pickle.dumps(gate))):
        got = copied(h)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_arguments():
    with pytest.raises(ValueError, match="gate_mode must be one of"):
        AIRGate(weight(), K, gate_mode="all", codewords=C)
    with pytest.raises(ValueError, match=r"probes m = 9 is outside \[1, 8\]"):
        AIRGate(weight(), K, gate_mode="chosen", codewords=C, probes=9)
    gate = AIRGate(weight(), K, gate_mode="chosen", codewords=C, where="layers.3.mlp.gate")
    with pytest.raises(ValueError, match="layers.3.mlp.gate: the hidden states are on meta"):
        gate(torch.zeros(2, D, device="meta"))
    with pytest.raises(ValueError, match=r"layers.3.mlp.gate: tokens row 1 column 0 is nan"):
        gate(torch.tensor([[0.0] * D, [float("nan")] * D]))
