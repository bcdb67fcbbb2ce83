"""airmoe.use_air on Hugging Face transformers MoE models (tiny configs).

Runs where transformers is installed: scripts/test_hf.sh (transformers 4.49
over Debian's torch 1.13, from scripts/test.sh) and scripts/test_hf_latest.sh
(transformers 5.x, torch 2.x). Every family the installed transformers has
runs; the others are skipped, naming what is missing.
"""

import copy
import math
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import airmoe  # noqa: E402
from airmoe.integrations.transformers import (AIRGate, air_gates, update_codebooks,  # noqa: E402
                                              use_air)

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
E, K = 8, 2

# name: (config class, model class, settings beyond TINY)
CASES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=E, num_experts_per_tok=K)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40, num_experts=E, num_experts_per_tok=K,
                       norm_topk_prob=False)),
    "qwen2_moe_normalized": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                             dict(intermediate_size=48, moe_intermediate_size=24,
                                  shared_expert_intermediate_size=40, num_experts=E,
                                  num_experts_per_tok=K, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=48, num_experts=E, num_experts_per_tok=K,
                   norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=24, num_experts=E,
                       num_experts_per_tok=K, norm_topk_prob=True, head_dim=8)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(intermediate_size=48, moe_intermediate_size=24,
                        shared_expert_intermediate_size=40, num_experts=E, num_experts_per_tok=K,
                        norm_topk_prob=True, head_dim=8,
                        layer_types=["linear_attention", "full_attention"],
                        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                        linear_num_value_heads=4)),
}
NORMALIZED = {"mixtral": True, "qwen2_moe": False, "qwen2_moe_normalized": True, "olmoe": False,
              "qwen3_moe": True, "qwen3_next": True}


def classes(family):
    config_name, model_name, settings = CASES[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    return getattr(transformers, config_name), getattr(transformers, model_name), settings


def make(family, seed=0, **changes):
    config_cls, model_cls, settings = classes(family)
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**TINY, **settings, **changes})).eval()


def tokens(seed=0, batch=2, length=12):
    return torch.randint(0, TINY["vocab_size"], (batch, length),
                         generator=torch.Generator().manual_seed(seed))


def generate(model, ids, **options):
    # synced_gpus=False: transformers 4.49 otherwise imports torch.distributed.fsdp,
    # which Debian's torch 1.13 cannot import under Python 3.11 (stock models too).
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                          do_sample=False, pad_token_id=0, synced_gpus=False, **options)


def capture_gates(model):
    """[(gates, indices)] of every AIR gate, appended at each forward."""
    seen = []
    for gate in air_gates(model):
        gate.register_forward_hook(lambda m, args, out: seen.append((out[1], out[2])))
    return seen


def stock_gates(router_logits, normalized):
    """The stock routers' gates from their [T, E] logits."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    gates, indices = torch.topk(probs, K, dim=-1)
    return (gates / gates.sum(-1, keepdim=True) if normalized else gates), indices


def assert_grads_equal(a, b, atol):
    grads_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        q = grads_b[name]
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
            continue
        assert torch.allclose(p.grad, q.grad.to(p.grad.dtype), atol=atol, rtol=1e-4), name


def train(model, ids, steps, lr=1e-2, optimizer=torch.optim.AdamW):
    model.train()
    opt = optimizer(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        update_codebooks(model)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", CASES)
def test_every_list_probed_equals_stock(family):
    """AIR with m = C: the stock model's logits, gates (softmax over the
    chosen k, or over all E for norm_topk_prob = False) and gradients."""
    stock = make(family)
    air = use_air(copy.deepcopy(stock), codewords=4, probes=4)
    ids = tokens()
    seen = capture_gates(air)
    out_stock = stock(ids, labels=ids, output_router_logits=True)
    out_air = air(ids, labels=ids)
    assert torch.allclose(out_air.logits, out_stock.logits, atol=1e-5, rtol=1e-4)
    assert len(seen) == len(out_stock.router_logits) == TINY["num_hidden_layers"]
    for (gates, indices), logits in zip(seen, out_stock.router_logits):
        want_gates, want_indices = stock_gates(logits, NORMALIZED[family])
        assert torch.equal(indices, want_indices)
        assert torch.allclose(gates, want_gates, atol=1e-6)
    # The LM loss alone (the stock output above also added its aux loss).
    stock.zero_grad()
    stock(ids, labels=ids).loss.backward()
    out_air.loss.backward()
    assert_grads_equal(air, stock, atol=1e-6)
    assert all(g.weight.grad is not None and g.weight.grad.any() for g in air_gates(air))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_next"])
def test_512_experts_top_10(family):
    """Qwen3-Next's shape of routing (E = 512, k = 10): every list probed
    equals stock; 4 of 32 lists score a fraction of the experts."""
    experts = "num_local_experts" if family == "mixtral" else "num_experts"
    stock = make(family, **{experts: 512, "num_experts_per_tok": 10})
    air = use_air(copy.deepcopy(stock), codewords=32, probes=32)
    ids = tokens()
    assert torch.allclose(air(ids).logits, stock(ids).logits, atol=1e-5, rtol=1e-4)
    inputs = []
    air_gates(air)[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    for gate in air_gates(air):
        gate.probes = 4
    air(ids, labels=ids).loss.backward()
    assert air_gates(air)[0].weight.grad.any()
    shortlist = air_gates(air)[0].shortlist_sizes(inputs[0].reshape(-1, TINY["hidden_size"]))
    assert shortlist.float().mean() < 256


@pytest.mark.parametrize("family", CASES)
def test_state_dict_keeps_the_stock_keys(family):
    stock = make(family)
    stock_keys = list(stock.state_dict())
    air = use_air(stock, codewords=4, probes=2)
    assert list(air.state_dict()) == stock_keys
    assert any(key.endswith(".gate.weight") for key in stock_keys)
    gates = air_gates(air)
    assert len(gates) == TINY["num_hidden_layers"]
    assert all(g.gate_mode == ("chosen" if NORMALIZED[family] else "shortlist") for g in gates)


@pytest.mark.parametrize("family", CASES)
def test_fewer_probes_trains(family):
    """m = 1 of C = 4 scores part of the experts, and training lowers the loss
    while the codebook follows the weights."""
    air = use_air(make(family), codewords=4, probes=1)
    gates = air_gates(air)
    inputs = []
    gates[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    codebook = gates[0].codebook.clone()
    losses = train(air, tokens(batch=4, length=16), steps=15)
    assert losses[-1] < 0.6 * losses[0], losses
    assert not torch.equal(codebook, gates[0].codebook)
    assert gates[0].shortlist_sizes(inputs[-1].reshape(-1, TINY["hidden_size"]).float()) \
        .float().mean() < E


@pytest.mark.parametrize("family", CASES)
def test_stock_checkpoint_loads_into_air_and_trains_on(family, tmp_path):
    stock = make(family, seed=1)
    stock.save_pretrained(tmp_path)
    _, model_cls, _ = classes(family)
    air = use_air(make(family, seed=2), codewords=4, probes=4)
    air.load_state_dict(stock.state_dict())  # strict: the stock keys are all there is
    for name, tensor in stock.state_dict().items():
        assert torch.equal(air.state_dict()[name], tensor), name
    # Loading retrained each codebook from the loaded weight, as use_air does.
    fresh = use_air(model_cls.from_pretrained(tmp_path), codewords=4, probes=4)
    for a, b in zip(air_gates(air), air_gates(fresh)):
        assert torch.equal(a.codebook, b.codebook)
    ids = tokens()
    assert torch.allclose(air(ids).logits, stock(ids).logits, atol=1e-5, rtol=1e-4)
    before = air_gates(air)[0].weight.detach().clone()
    losses = train(air, ids, steps=3)
    assert math.isfinite(losses[-1]) and not torch.equal(before, air_gates(air)[0].weight)


@pytest.mark.parametrize("family", CASES)
def test_air_checkpoint_loads_into_stock_class(family, tmp_path):
    air = use_air(make(family), codewords=4, probes=2)
    train(air, tokens(), steps=2)
    air.save_pretrained(tmp_path)
    _, model_cls, _ = classes(family)
    stock, info = model_cls.from_pretrained(tmp_path, output_loading_info=True)
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(what), (what, info[what])
    saved = air.state_dict()
    for name, tensor in stock.state_dict().items():
        assert torch.equal(tensor, saved[name].to(tensor.dtype)), name
    # Nothing re-initialized: with every list probed, AIR on the same weights
    # is the stock model loaded from them.
    for gate in air_gates(air):
        gate.probes = gate.num_codewords
    ids = tokens(1)
    air.eval()
    assert torch.allclose(air(ids).logits, stock.eval()(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", CASES)
def test_generate_with_kv_cache(family):
    stock = make(family)
    air = use_air(copy.deepcopy(stock), codewords=4, probes=4)
    ids = tokens(3, length=6)
    cached = generate(air, ids, use_cache=True)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, generate(stock, ids, use_cache=True))
    assert torch.equal(cached, generate(air, ids, use_cache=False))
    for gate in air_gates(air):
        gate.probes = 1
    assert generate(air, ids).shape == (2, 11)


@pytest.mark.parametrize("family", CASES)
def test_router_logits_feed_the_stock_aux_loss(family):
    """output_router_logits=True: [T, E] log gates at the chosen experts and
    -inf elsewhere; transformers' load-balancing loss reads them as
    E * sum_e f_e P_e with P_e the mean gate renormalized over the chosen k
    (docs/hf.md), and its gradient reaches every router weight."""
    air = use_air(make(family), codewords=4, probes=2)
    seen = capture_gates(air)
    ids = tokens()
    out = air(ids, labels=ids, output_router_logits=True)
    tokens_total = ids.numel()
    counts, probs = torch.zeros(E), torch.zeros(E)
    for logits, (gates, indices) in zip(out.router_logits, seen):
        assert logits.shape == (tokens_total, E) and logits.dtype == torch.float32
        finite = torch.isfinite(logits)
        assert torch.equal(finite, torch.zeros_like(finite).scatter(1, indices, True))
        renormalized = gates / gates.sum(-1, keepdim=True)
        assert torch.allclose(torch.softmax(logits, -1).gather(1, indices), renormalized,
                              atol=1e-6)
        counts += torch.bincount(indices.reshape(-1), minlength=E)
        probs += torch.zeros(tokens_total, E).scatter(1, indices, renormalized).sum(0)
    rows = tokens_total * len(seen)
    want = E * torch.sum(counts / rows * probs / rows)
    assert torch.allclose(out.aux_loss.float(), want, atol=1e-5)
    air.zero_grad()
    out.aux_loss.backward()
    assert all(g.weight.grad is not None and g.weight.grad.any() for g in air_gates(air))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_next"])
def test_gradient_checkpointing(family):
    air = use_air(make(family), codewords=4, probes=2)
    reference = copy.deepcopy(air)
    air.gradient_checkpointing_enable()
    ids = tokens()
    for model in (air, reference):
        model.train()
        model(ids, labels=ids).loss.backward()
    assert_grads_equal(air, reference, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "qwen3_next"])
def test_half_precision_model_keeps_a_float32_router(family, dtype):
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
    except RuntimeError as e:
        pytest.skip(f"torch {torch.__version__} has no CPU {dtype} matmul ({e})")
    stock = make(family).to(dtype)
    stock_weights = [m.gate.weight for m in stock.modules() if hasattr(m, "gate")]
    air = use_air(stock, codewords=4, probes=2)
    gates = air_gates(air)
    # The stock Parameter itself, converted once to float32.
    assert [g.weight for g in gates] == stock_weights
    assert all(g.weight.dtype == torch.float32 for g in gates)
    addresses = [g.weight.data_ptr() for g in gates]
    # One step, no optimizer: the stock models themselves do not train in
    # float16 on the CPU (AdamW's eps underflows; Qwen3-Next's linear
    # attention in transformers 4.57 has non-finite gradients).
    air.train()
    loss = air(tokens(), labels=tokens()).loss
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(g.weight.grad.dtype == torch.float32 and g.weight.grad.any() for g in gates)
    air.to(dtype)  # a dtype conversion of the model leaves the router alone
    assert all(g.weight.dtype == torch.float32 and g.codebook.dtype == torch.float32
               for g in gates)
    assert [g.weight.data_ptr() for g in gates] == addresses  # never copied
    assert next(p for n, p in air.named_parameters() if "embed" in n).dtype == dtype
    assert generate(air.eval(), tokens(length=4)).shape == (2, 9)


def test_copies_route_like_the_original():
    air = use_air(make("mixtral"), codewords=4, probes=2)
    train(air, tokens(), steps=1)
    air.eval()
    ids = tokens(5)
    want = air(ids).logits
    for copied in (copy.deepcopy(air), pickle.loads(pickle.dumps(air))):
        assert torch.equal(copied(ids).logits, want)
        assert all(isinstance(g, AIRGate) for g in air_gates(copied))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_next"])
def test_replacements_are_stock_instances(family):
    """transformers records router_logits from instances of its block class
    (4.5x) or router class (5.x): what use_air puts in their place is an
    instance of the class it replaces, and so is a copy made by pickle."""
    from airmoe.integrations.transformers import AIRSparseMoeBlock
    stock = make(family)
    block_cls = type(next(m for m in stock.modules() if type(m).__name__.endswith("MoeBlock")))
    router_cls = type(next(m for m in stock.modules() if isinstance(m, block_cls)).gate)
    air = use_air(stock, codewords=4, probes=4)
    blocks = [m for m in air.modules() if isinstance(m, block_cls)]
    assert len(blocks) == TINY["num_hidden_layers"]
    for block in blocks + pickle.loads(pickle.dumps(blocks)):
        assert isinstance(block.gate, AIRGate)
        if router_cls is torch.nn.Linear:  # 4.x: the block is replaced
            assert isinstance(block, AIRSparseMoeBlock)
        else:  # 5.x: the router is
            assert isinstance(block.gate, router_cls) and type(block) is block_cls


def test_torch_compile():
    if not hasattr(torch, "compile"):
        pytest.skip(f"torch {torch.__version__} has no torch.compile")
    air = use_air(make("mixtral"), codewords=4, probes=2)
    ids = tokens()
    compiled = torch.compile(air)
    with torch.no_grad():
        assert torch.allclose(compiled(ids).logits, air(ids).logits, atol=1e-5)
    air.train()
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    assert air_gates(air)[0].weight.grad.any()


def test_trainer_callback_updates_codebooks(tmp_path):
    try:
        from transformers import Trainer, TrainingArguments
    except (ImportError, RuntimeError) as e:  # 4.49 over torch 1.13: LRScheduler is 2.x
        pytest.skip(f"transformers {transformers.__version__}'s Trainer does not import with "
                    f"torch {torch.__version__}: {e}")
    from airmoe.integrations.transformers import AIRCodebookCallback
    air = use_air(make("mixtral"), codewords=4, probes=1)
    ids = tokens(batch=8)
    data = [{"input_ids": row, "labels": row} for row in ids]
    codebooks = [g.codebook.clone() for g in air_gates(air)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=air, args=args, train_dataset=data, callbacks=[AIRCodebookCallback()])
    trainer.train()
    assert trainer.state.global_step == 3
    assert all(not torch.equal(c, g.codebook) for c, g in zip(codebooks, air_gates(air)))


def test_callback_names_what_is_missing():
    """Where transformers cannot import its TrainerCallback (simulated here),
    the callback says so and points at update_codebooks."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['transformers.trainer_callback'] = None\n"
            "from airmoe.integrations.transformers import AIRCodebookCallback")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert "ImportError: AIRCodebookCallback needs transformers' TrainerCallback" in run.stderr
    assert "airmoe.update_codebooks(model)" in run.stderr


# ----------------------------------------------------------------- bad input

def test_probes_over_codewords_names_the_module_and_changes_nothing():
    stock = make("mixtral")
    before = {n: t.clone() for n, t in stock.state_dict().items()}
    classes_before = [type(m) for m in stock.modules()]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.\w+\.gate: probes m = 5 is outside "
                                         r"\[1, 4\]"):
        use_air(stock, codewords=4, probes=5)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.\w+\.gate: codewords C = 9 is "
                                         r"outside \[1, 8\]"):
        use_air(stock, codewords=9)
    assert not air_gates(stock)
    assert [type(m) for m in stock.modules()] == classes_before
    after = stock.state_dict()
    assert all(torch.equal(t, after[n]) and t.dtype == after[n].dtype for n, t in before.items())


def test_model_without_moe_blocks():
    stock = make("qwen2_moe", mlp_only_layers=[0, 1])
    with pytest.raises(ValueError, match="Qwen2MoeForCausalLM has no Qwen2MoeSparseMoeBlock"):
        use_air(stock)


def test_unknown_family_and_non_models():
    config = transformers.LlamaConfig(**TINY, intermediate_size=48)
    with pytest.raises(ValueError, match="model_type 'llama'.* not a family airmoe knows"):
        use_air(transformers.LlamaForCausalLM(config))
    with pytest.raises(TypeError, match="expected a transformers model"):
        use_air(torch.nn.Linear(4, 4))


def test_already_air_and_updates_without_air():
    air = use_air(make("olmoe"), codewords=4, probes=2)
    with pytest.raises(ValueError, match="already routes with AIR"):
        use_air(air)
    with pytest.raises(ValueError, match="has no AIR gates"):
        update_codebooks(make("olmoe"))


def test_device_the_build_cannot_serve():
    with pytest.raises(ValueError, match=r"model\.layers\.0\.\w+\.gate\.weight is on meta.* "
                                         r"CPU only"):
        use_air(make("mixtral").to("meta"))
    air = use_air(make("mixtral"), codewords=4, probes=2)
    gate = air_gates(air)[0]
    with pytest.raises(ValueError, match=rf"{gate.where}: the hidden states are on meta"):
        gate(torch.zeros(3, TINY["hidden_size"], device="meta"))


def test_lazy_imports():
    """`import airmoe` imports neither transformers nor the integration."""
    import subprocess
    import sys
    code = ("import sys, airmoe; assert 'transformers' not in sys.modules; "
            "assert 'airmoe.integrations.transformers' not in sys.modules; "
            "airmoe.use_air; assert 'airmoe.integrations.transformers' in sys.modules; "
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
