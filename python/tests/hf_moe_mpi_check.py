"""A tiny Hugging Face Mixtral trained with its MoE blocks run expert-parallel
by airmoe.MoELayer (SwiGLU experts, the stock weights loaded): at P ranks
(COMM_WORLD, each rank 1/P of the batch, the dense parameters'
gradients summed over the ranks) the loss curve equals the same training in
one process (COMM_SELF, the whole batch); before training, the swapped model's
loss equals the stock model's (exact routing: every list probed).

    mpiexec -n 2 .venv-hf/bin/python python/tests/hf_moe_mpi_check.py

Run by scripts/test_hf.sh (transformers 4.49). The last line, on rank 0, is
"hf_moe_mpi_check: N passed, M failed"; the exit status is nonzero on any
failure.
"""

import torch
from mpi4py import MPI
from torch import nn

import airmoe
import transformers
from mpi_tally import Tally

world = MPI.COMM_WORLD
rank, P = world.Get_rank(), world.Get_size()
BATCH, SEQ, STEPS, LR = 4, 12, 6, 0.5
TOL = 1e-4
tally = Tally(world)
check = tally.check


class ExpertParallelBlock(nn.Module):
    """A MixtralSparseMoeBlock's work on airmoe.MoELayer: its router weight
    becomes the layer's centers (top-k logits, softmax over the chosen k, as
    Mixtral gates), its experts' w1 / w3 / w2 the layer's gate / up / down."""

    def __init__(self, block, comm, strategy):
        super().__init__()
        E, d = block.gate.weight.shape
        h = block.experts[0].w1.weight.shape[0]
        self.layer = airmoe.MoELayer(comm, E, d, strategy=strategy, k=block.top_k, probes=2,
                                     codewords=2, hidden=h, activation="swiglu", seed=1,
                                     centers=block.gate.weight.detach().contiguous())
        self.layer.load_hf_expert_modules(block.experts)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        out = self.layer(hidden_states.reshape(-1, shape[-1]).contiguous())
        return out.reshape(shape), None


def tiny_config():
    return transformers.MixtralConfig(vocab_size=48, hidden_size=16, intermediate_size=8,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, num_local_experts=6,
                                      num_experts_per_tok=2, max_position_embeddings=64)


def stock_model():
    torch.manual_seed(0)  # the same weights on every rank
    return transformers.MixtralForCausalLM(tiny_config()).eval()


def swapped(model, comm, strategy):
    for decoder in model.model.layers:
        decoder.block_sparse_moe = ExpertParallelBlock(decoder.block_sparse_moe, comm, strategy)
    return model


def batch():
    gen = torch.Generator().manual_seed(5)
    return torch.randint(0, 48, (BATCH, SEQ), generator=gen)


def train(model, comm, ids):
    """SGD steps on this rank's rows of the batch; returns the global loss of
    each step. Dense parameters (every rank's copy) get the gradient summed
    over the ranks; the MoE layers' parameters are this rank's shard, whose
    gradients already cover every rank's tokens."""
    size, me = comm.Get_size(), comm.Get_rank()
    rows = ids[BATCH * me // size:BATCH * (me + 1) // size]
    sharded = {id(p) for m in model.modules() if isinstance(m, airmoe.MoELayer)
               for p in m.parameters()}
    dense = [p for p in model.parameters() if id(p) not in sharded]
    losses = []
    for _ in range(STEPS):
        model.zero_grad()
        loss = model(input_ids=rows, labels=rows).loss / size  # equal tokens per rank
        loss.backward()
        losses.append(comm.allreduce(float(loss)))
        for p in dense:
            if p.grad is not None:
                g = p.grad.numpy()
                comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-LR)
    return losses


def compare(strategy):
    ids = batch()
    with torch.no_grad():
        stock = float(stock_model()(input_ids=ids, labels=ids).loss)
    single = swapped(stock_model(), MPI.COMM_SELF, strategy)
    with torch.no_grad():
        first = float(single(input_ids=ids, labels=ids).loss)
    check(f"{strategy}: swapped model's loss equals the stock model's",
          abs(first - stock) <= TOL * abs(stock), f"{first} vs {stock}")
    one = train(single, MPI.COMM_SELF, ids)
    dist = train(swapped(stock_model(), world, strategy), world, ids)
    check(f"{strategy}: training lowers the loss", one[-1] < one[0], str(one))
    diff = max(abs(a - b) / abs(b) for a, b in zip(dist, one))
    check(f"{strategy}: loss curve at P={P} equals P=1", diff <= TOL, f"{dist} vs {one}")
    if rank == 0:
        print(f"{strategy}: loss at P={P} {[round(x, 6) for x in dist]}, max rel diff to P=1 "
              f"{diff:.2e}", flush=True)


for strategy in ("air", "dense-replicated"):
    try:
        compare(strategy)
    except Exception as e:  # noqa: BLE001 - reported as a failure
        import traceback
        check(strategy, False, "\n" + traceback.format_exc())

tally.finish("hf_moe_mpi_check")
