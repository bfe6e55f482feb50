"""Per-tensor types under a budget: the allocation's optimisation and the sensitivity measurement."""

import itertools
import math

import pytest
import torch

from grokquant.data.documents import calibration_tokens
from grokquant.errors import GrokquantError
from grokquant.grok.checkpoint import Checkpoint
from grokquant.grok.names import gguf_tensors
from grokquant.grok.tokenizer import load_tokenizer
from grokquant.quant.ggml.types import TYPES
from grokquant.quantize.allocate import PROBE, Sensitivity, allocatable, allocate, measure

K_CHAIN = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]


def random_problem(n_tensors, seed):
    """Tensors of different sizes and sensitivities; errors fall ~4x per bit, as rounding errors do."""
    gen = torch.Generator().manual_seed(seed)
    shapes, sens = {}, Sensitivity()
    for i in range(n_tensors):
        name = f"blk.{i}.attn_q.weight"
        shapes[name] = (int(torch.randint(1, 9, (1,), generator=gen)) * 256, 512)
        base = float(torch.rand(1, generator=gen)) + 0.05
        sens.errors[name] = {t: base * 4.0 ** -TYPES[t].bits_per_weight * float(0.7 + 0.6 * torch.rand(1, generator=gen))
                             for t in K_CHAIN}
        sens.probe_kld[name] = float(torch.rand(1, generator=gen)) * 1e-2
    return sens, shapes


def cost(sens, types):
    return sum(sens.kld(g, t) for g, t in types.items())


def size(shapes, types):
    return sum(TYPES[t].nbytes(shapes[g]) for g, t in types.items())


@pytest.mark.parametrize("seed", range(4))
def test_allocation_fits_the_budget_and_is_near_the_exhaustive_optimum(seed):
    sens, shapes = random_problem(5, seed)
    names = sorted(shapes)
    for bpw in (3.0, 4.0, 5.0, 6.5):
        budget = int(bpw * sum(math.prod(s) for s in shapes.values()) / 8)
        ours = allocate(sens, shapes, budget)
        assert size(shapes, ours) <= budget
        best = min(cost(sens, dict(zip(names, c))) for c in itertools.product(K_CHAIN, repeat=len(names))
                   if size(shapes, dict(zip(names, c))) <= budget)
        # Lagrangian relaxation plus a greedy fill is not an exact knapsack solver; on these instances it
        # lands within a few percent of the exhaustive optimum
        assert cost(sens, ours) <= 1.1 * best, (bpw, cost(sens, ours), best)


def test_allocation_limits():
    sens, shapes = random_problem(6, 9)
    elements = sum(math.prod(s) for s in shapes.values())
    everything = allocate(sens, shapes, 10 * elements)
    assert set(everything.values()) == {"Q8_0"}
    with pytest.raises(GrokquantError, match="below the smallest"):
        allocate(sens, shapes, int(2.0 * elements / 8))
    previous = math.inf
    for bpw in (3, 3.5, 4, 4.5, 5, 6):  # more bytes never predict a worse file
        c = cost(sens, allocate(sens, shapes, int(bpw * elements / 8)))
        assert c <= previous
        previous = c


@pytest.fixture(scope="module")
def tiny_sensitivity(tiny_tp8):
    ckpt = Checkpoint.open(tiny_tp8)
    tokens = calibration_tokens(load_tokenizer(tiny_tp8 / "tokenizer.tok.json"), "builtin", 1024, 64, seed=1)
    return ckpt, tokens, measure(ckpt, tokens, set())


def test_sensitivity_covers_every_quantizable_tensor(tiny_sensitivity):
    ckpt, _, sens = tiny_sensitivity
    names = {g for g, _ in allocatable(ckpt, set())}
    assert names == set(sens.probe_kld) and "token_embd.weight" in names and "output.weight" in names
    assert not any("ffn_gate_inp" in g or "norm" in g for g in names)  # the router and norms stay float
    for g in names:
        assert sens.probe_kld[g] > 0
        e = [sens.errors[g][t] for t in K_CHAIN]
        assert all(a > b for a, b in zip(e, e[1:])), (g, e)  # more bits, less rounding error


def test_predicted_kld_follows_the_measured_one(tiny_sensitivity):
    """The model of the allocation: KLD scales with the importance-weighted rounding error. Rounding one
    tensor to Q2_K and measuring agrees with the prediction from its Q3_K probe within a small factor
    (KLD is quadratic in small output changes; Q2_K's change is not that small)."""
    from grokquant.quantize.allocate import _Probe, _start_layer, _weighted_error

    ckpt, tokens, sens = tiny_sensitivity
    probe = _Probe(ckpt, tokens, 8)
    for g in ("blk.0.attn_v.weight", "blk.1.ffn_down_exps.weight", "output.weight"):
        original = probe.release_weights(g)
        W = torch.stack([w.float() for _, w in original])
        imp = torch.stack([probe.sum2[n.rsplit(".", 1)[0]] for n, _ in original]).float()
        _, Q = _weighted_error(W, "Q2_K", imp, imp, None)
        probe.set_weights({n: Q[i] for i, (n, _) in enumerate(original)})
        measured = probe.kld_from(_start_layer(g, ckpt.config.num_hidden_layers))
        probe.set_weights(dict(original))
        assert probe.kld_from(-1) == 0  # the weights went back
        assert 1 / 3 < sens.kld(g, "Q2_K") / measured < 3, (g, sens.kld(g, "Q2_K"), measured)
        assert sens.kld(g, PROBE) == sens.probe_kld[g]


def test_fixed_tensors_are_left_out(tiny_sensitivity):
    ckpt, tokens, _ = tiny_sensitivity
    fixed = {g for g, _ in gguf_tensors(ckpt.config) if "attn" in g}
    assert not any("attn" in g for g, _ in allocatable(ckpt, fixed))


def test_rows_the_probe_type_cannot_hold_keep_their_planned_type(odd_tp8):
    """A row length that is not a multiple of 256 has no K-quant: such a tensor is not measured or
    allocated (it stays at the mix's fallback type and counts as fixed in the budget)."""
    ckpt = Checkpoint.open(odd_tp8)
    shapes = dict(gguf_tensors(ckpt.config))
    free = dict(allocatable(ckpt, set()))
    assert all(s[-1] % 256 == 0 for s in free.values())
    assert any(len(s) >= 2 and s[-1] % 256 and "norm" not in g and "gate_inp" not in g for g, s in shapes.items())
