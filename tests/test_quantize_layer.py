"""A layer's work items: which stack may consume which Hessian, and the errors reported for each stack."""

import pytest
import torch

from grokquant.calibrate.statistics import LayerStats
from grokquant.grok.config import expert_name
from grokquant.quant.gptq import rtn
from grokquant.quantize.items import (Item, build_stack, last_uses, layer_items, quantize_int, stats_groups,
                                      symmetric_form)
from grokquant.quantize.recipe import GPTQRecipe
from grokquant.grok.synth import synth_config


def names(items, take):
    return {(it.linear or f"{it.proj}@{it.experts[0]}"): sorted(take.get(it.index, ())) for it in items}


def test_each_hessian_goes_to_its_last_user_in_the_list():
    cfg = synth_config("tiny")
    items = layer_items(cfg, expert_batch=4)
    got = names(items, last_uses(items))
    assert got["self_attn.v_proj"] == ["attn_qkv"] and got["self_attn.q_proj"] == []
    assert got["self_attn.o_proj"] == ["attn_o"] and got["mlp.down_proj"] == ["mlp_down"]
    assert got["mlp.up_proj"] == [] and got["mlp.gate_proj"] == []  # the MoE input's Hessian stays for the experts
    assert got["w1@0"] == [] and got["w3@0"] == [f"expert{e}_w13" for e in range(4)]
    assert got["w2@4"] == [f"expert{e}_w2" for e in range(4, 8)]
    # a rank with only some items: its own last user takes the Hessian
    mine = [it for it in items if it.linear == "self_attn.q_proj"]
    assert names(mine, last_uses(mine))["self_attn.q_proj"] == ["attn_qkv"]
    assert {g for it in items for g in stats_groups(it)} >= {"attn_qkv", "mlp_gate_up", "expert7_w2"}


def stats_for(cfg, layer=0, tokens=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    stats = LayerStats(layer, with_hessians=True)
    shapes = cfg.layer_shapes(layer)
    d = shapes[expert_name(layer, 0, "w2")][1]
    for e in range(cfg.num_local_experts):
        for group, n in ((f"expert{e}_w13", cfg.hidden_size), (f"expert{e}_w2", d)):
            x = torch.randn(tokens, n, generator=gen) @ (torch.eye(n) + torch.randn(n, n, generator=gen) / n ** 0.5)
            stats.hessian[group], stats.sum2[group], stats.count[group] = x.T @ x, x.pow(2).sum(0), tokens
    stats.count["mlp_gate_up"] = tokens
    return stats


def test_a_consumed_hessian_leaves_the_statistics_and_the_errors_are_measured_on_it():
    cfg = synth_config("tiny")
    stats = stats_for(cfg)
    weights = {n: torch.randn(*cfg.layer_shapes(0)[n]) * 0.05 for n in cfg.layer_shapes(0)}
    item = Item(9, proj="w2", experts=(0, 2))
    H = torch.stack([stats.hessian["expert0_w2"], stats.hessian["expert1_w2"]]).clone()
    s = build_stack(item, 0, stats, GPTQRecipe(), weights.__getitem__, {"expert0_w2", "expert1_w2"})
    assert s.owns_h and "expert0_w2" not in stats.hessian and "expert2_w2" in stats.hessian
    W = s.W.clone()
    res = quantize_int(item, s, GPTQRecipe(), "cpu")
    (row,) = res.report
    Wq = torch.stack([res.dequantized[n] for n in s.names])
    D = (Wq - W).double()
    assert abs(row["error"] - float(torch.einsum("boi,bij,boj->", D, H.double(), D))) < 1e-3 * row["error"]
    R = (rtn(W, GPTQRecipe().config_for("experts")).dequantize() - W).double()
    assert abs(row["rtn_error"] - float(torch.einsum("boi,bij,boj->", R, H.double(), R))) < 1e-4 * row["rtn_error"]
    assert row["error"] < row["rtn_error"]


def test_a_shared_hessian_is_left_in_place():
    cfg = synth_config("tiny")
    stats = stats_for(cfg)
    weights = {n: torch.randn(*cfg.layer_shapes(0)[n]) * 0.05 for n in cfg.layer_shapes(0)}
    before = stats.hessian["expert3_w13"].clone()
    s = build_stack(Item(8, proj="w1", experts=(3, 4)), 0, stats, GPTQRecipe(), weights.__getitem__)
    assert not s.owns_h
    quantize_int(Item(8, proj="w1", experts=(3, 4)), s, GPTQRecipe(), "cpu")
    assert torch.equal(stats.hessian["expert3_w13"], before)  # w3 still needs it


@pytest.mark.parametrize("shape", [(2, 37, 1100), (1, 5, 512), (3, 64, 96)])
def test_the_symmetric_form_is_the_trace_from_the_lower_triangle(shape):
    """The report's error tr(D H Dᵀ) from H's lower triangle equals the full product in float64, and
    nothing above the diagonal is read (a block edge inside and outside the matrix is covered)."""
    B, rows, cols = shape
    g = torch.Generator().manual_seed(cols)
    D = torch.randn(B, rows, cols, generator=g)
    X = torch.randn(B, 2 * cols, cols, generator=g)
    H = X.transpose(1, 2) @ X
    expected = ((D.double() @ H.double()) * D.double()).sum((1, 2))
    upper_garbage = H.tril() + torch.triu(torch.full_like(H, float("nan")), 1)
    got = symmetric_form(D, upper_garbage, block=256)
    assert torch.allclose(got, expected, rtol=1e-5), (got, expected)
