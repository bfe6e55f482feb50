"""The quantization work of one decoder layer, as items that can be done in any order or place.

A layer's linears come in *stacks* quantized together: each dense linear alone (q, k, v, o, gate,
up, down), and the experts of one projection (w1, w3 or w2) in groups of `expert_batch` (all 8 by
default: one batched Cholesky per projection; fewer bound the memory of a real-width layer). Each
stack gets the calibration statistics the recipe's coverage policy gives it and is rounded onto
integer grids (GPTQ format) or GGML grids (GGUF), returning the stored tensors, the weights they
represent and a report row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .calibrate import LayerStats
from .config import GrokConfig, expert_name
from .gguf_names import gguf_name
from .model import gelu
from .quant.ggml import QUANTIZERS
from .quant.gptq import IntQuantConfig, IntQuantized, gptq, rtn
from .quant.gptq_ggml import ggml_rtn, gptq_ggml
from .recipe import GGUFRecipe, GPTQRecipe

# linear -> (statistics group, tensor class)
DENSE_LINEARS = {
    "self_attn.q_proj": ("attn_qkv", "attention"), "self_attn.k_proj": ("attn_qkv", "attention"),
    "self_attn.v_proj": ("attn_qkv", "attention"), "self_attn.o_proj": ("attn_o", "attention"),
    "mlp.gate_proj": ("mlp_gate_up", "dense_mlp"), "mlp.up_proj": ("mlp_gate_up", "dense_mlp"),
    "mlp.down_proj": ("mlp_down", "dense_mlp"),
}
EXPERT_GROUP = {"w1": "w13", "w3": "w13", "w2": "w2"}
Recipe = GPTQRecipe | GGUFRecipe


@dataclass(frozen=True)
class Item:
    """One stack of a layer: a dense linear, or projection `proj` of experts [first, last)."""

    index: int  # position in the layer's item list (the order results are merged in)
    linear: str | None = None
    proj: str | None = None
    experts: tuple[int, int] = (0, 0)


def layer_items(cfg: GrokConfig, expert_batch: int) -> list[Item]:
    """Dense linears first, then per group of experts its w1, w3, w2 (the order groups are visited)."""
    items = [Item(i, linear=linear) for i, linear in enumerate(DENSE_LINEARS)]
    n = cfg.num_local_experts
    for first in range(0, n, expert_batch):
        for proj in ("w1", "w3", "w2"):
            items.append(Item(len(items), proj=proj, experts=(first, min(first + expert_batch, n))))
    return items


def item_cost(cfg: GrokConfig, item: Item) -> float:
    """Relative work (GPTQ: B · in² · (out + in))."""
    shapes = cfg.layer_shapes(0)
    if item.linear is not None:
        out, inp = shapes[f"model.layers.0.{item.linear}.weight"]
        return float(inp * inp * (out + inp))
    out, inp = shapes[expert_name(0, 0, item.proj)]
    return float((item.experts[1] - item.experts[0]) * inp * inp * (out + inp))


@dataclass
class Stack:
    """Matrices quantized together: one dense linear (B = 1) or a group of experts of one projection."""

    cls: str  # attention | dense_mlp | experts
    names: list[str]  # release names
    W: torch.Tensor  # [B, out, in] float32
    H: torch.Tensor | None  # [B, in, in] Σxxᵀ of each matrix's inputs (when collected)
    importance: torch.Tensor  # [B, in] Σx² / tokens
    fallback: list[bool]  # under-covered matrices quantized without calibration
    min_tokens: int


def _importance(sum2: torch.Tensor, tokens: int) -> torch.Tensor:
    """Mean x² per column in float32, as llama-quantize reads an imatrix (1.0 where no token came)."""
    sum2 = sum2.float()
    return sum2 / torch.tensor(float(tokens)) if tokens > 0 else torch.ones_like(sum2)


def build_stack(item: Item, layer: int, stats: LayerStats, recipe: Recipe,
                weights: Callable[[str], torch.Tensor]) -> Stack:
    """The item's weights with the statistics the recipe's coverage policy gives each matrix."""
    if item.linear is not None:
        group, cls = DENSE_LINEARS[item.linear]
        name = f"model.layers.{layer}.{item.linear}.weight"
        H = stats.hessian.get(group)
        return Stack(cls, [name], weights(name).float()[None], None if H is None else H[None],
                     _importance(stats.sum2[group], stats.count[group])[None], [False], stats.count[group])
    experts = range(*item.experts)
    names = [expert_name(layer, e, item.proj) for e in experts]
    W = torch.stack([weights(n).float() for n in names])
    all_tokens = stats.count["mlp_gate_up"]
    Hs, imps, fallback, counts = [], [], [], []
    for e in experts:
        g = f"expert{e}_{EXPERT_GROUP[item.proj]}"
        n = stats.count.get(g, 0)
        own_H = stats.hessian.get(g, torch.zeros(W.shape[2], W.shape[2])) if stats.hessian else None
        own_s = stats.sum2.get(g, torch.zeros(W.shape[2])).float()
        covered = n >= recipe.min_tokens
        if covered or recipe.under_covered == "rtn":
            H, s, k = own_H, own_s, n
        elif recipe.under_covered == "all-tokens":
            H, s, k = stats.hessian.get(g + "_all"), stats.sum2[g + "_all"], all_tokens
        else:  # prior: the expert's own tokens plus min_tokens tokens' worth of the all-token average
            w = recipe.min_tokens / all_tokens
            H = None if own_H is None else own_H + stats.hessian[g + "_all"] * w
            s, k = own_s + stats.sum2[g + "_all"] * w, n + recipe.min_tokens
        Hs.append(H)
        imps.append(_importance(s, k))
        fallback.append(not covered and recipe.under_covered == "rtn")
        counts.append(n)
    return Stack("experts", names, W, torch.stack(Hs) if Hs[0] is not None else None, torch.stack(imps),
                 fallback, min(counts))


def all_token_statistics(layer_module, experts: range, stats: LayerStats, recipe: Recipe, gelu_flavour: str,
                         m: torch.Tensor, hessians: bool) -> None:
    """Statistics of under-covered experts as if every calibration token m [N, H] were routed to them."""
    for e in experts:
        if stats.count.get(f"expert{e}_w13", 0) >= recipe.min_tokens:
            continue
        expert = layer_module.block_sparse_moe.experts[e]
        stats.sum2[f"expert{e}_w13_all"] = stats.sum2["mlp_gate_up"]  # the same input m, all tokens
        a = gelu(expert.w1(m), gelu_flavour) * expert.w3(m)
        stats.sum2[f"expert{e}_w2_all"] = a.pow(2).sum(0, dtype=torch.float64).cpu()
        if hessians:
            stats.hessian[f"expert{e}_w13_all"] = stats.hessian["mlp_gate_up"]
            stats.hessian[f"expert{e}_w2_all"] = (a.T @ a).cpu()


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None) -> float | None:
    """Σ_b ‖(W_b − Ŵ_b) X_b‖² = tr(D H Dᵀ) from the calibration Hessians."""
    if H is None:
        return None
    D = Wq - W
    return float(torch.einsum("boi,bij,boj->", D, H, D))


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # as stored for the layer
    dequantized: dict[str, torch.Tensor] = field(default_factory=dict)  # release name -> represented weights
    report: list[dict] = field(default_factory=list)  # per stack: class, bits/type, errors, fewest tokens

    def add(self, other: "LayerResult") -> None:
        self.tensors.update(other.tensors)
        self.dequantized.update(other.dequantized)
        self.report += other.report


# ---- gptq format: integer grids -------------------------------------------------------------------

def _int_stack(s: Stack, cfg: IntQuantConfig, method: str, device: str) -> IntQuantized:
    """Batched GPTQ with round-to-nearest for the matrices flagged as fallback."""
    W = s.W.to(device)
    if method == "rtn" or all(s.fallback):
        q = rtn(W, cfg)
    else:
        q = gptq(W, s.H.to(device), cfg)
        if any(s.fallback):
            r = rtn(W, cfg)
            for b, fb in enumerate(s.fallback):
                if fb:
                    q.codes[b], q.scales[b], q.zeros[b], q.g_idx[b] = r.codes[b], r.scales[b], r.zeros[b], r.g_idx[b]
    return IntQuantized(*(t.cpu() for t in (q.codes, q.scales, q.zeros, q.g_idx)))


def quantize_int(item: Item, s: Stack, recipe: GPTQRecipe, device: str = "cpu") -> LayerResult:
    """A stack onto the recipe's integer grid, in the auto-gptq layout (nothing if the class stays bf16)."""
    from .export.gptq_format import gptq_tensors, packable

    res = LayerResult()
    qc = recipe.config_for(s.cls)
    if qc is None or not packable(s.W.shape[1], s.W.shape[2], qc.bits):
        return res
    q = _int_stack(s, qc, recipe.method, device)
    Wq = q.dequantize()
    W = s.W.cpu()
    res.report.append({"stack": item.index, "class": s.cls, "bits": qc.bits, "error": output_error(W, Wq, s.H),
                       "rtn_error": output_error(W, rtn(W, qc).dequantize(), s.H), "min_tokens": s.min_tokens})
    for b, name in enumerate(s.names):
        base = name[: -len(".weight")]
        for k, v in gptq_tensors(q, b, qc.bits).items():
            res.tensors[f"{base}.{k}"] = v
        res.dequantized[name] = Wq[b]
    return res


# ---- gguf format: GGML grids ----------------------------------------------------------------------

def quantize_ggml(item: Item, s: Stack, recipe: GGUFRecipe, type_name: str) -> LayerResult:
    """A stack onto its planned GGML type; tensors keyed `GGUF name@first expert` (joined per layer later)."""
    res = LayerResult()
    if type_name in ("F32", "F16", "BF16"):
        return res  # written from the checkpoint as it is
    W = s.W.cpu()  # the GGML quantizers run on the CPU
    q = QUANTIZERS[type_name]
    reference = ggml_rtn(W, type_name)
    if recipe.method == "gptq" and not all(s.fallback):
        data = gptq_ggml(W, s.H, type_name, recipe.damp)
    else:
        data = ggml_rtn(W, type_name, s.importance)
    for b, fb in enumerate(s.fallback):
        if fb:
            data[b] = reference[b]

    def dequant(d):
        return q.dequantize(d.reshape(-1, d.shape[-1]), W.shape[2]).view(W.shape)

    Wq = dequant(data)
    res.report.append({"stack": item.index, "class": s.cls, "bits": type_name, "error": output_error(W, Wq, s.H),
                       "rtn_error": output_error(W, dequant(reference), s.H), "min_tokens": s.min_tokens})
    res.tensors[f"{gguf_name(s.names[0])}@{item.experts[0]}"] = data
    res.dequantized.update({n: Wq[b] for b, n in enumerate(s.names)})
    return res


def join_ggml(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`name@first` parts -> one tensor per GGUF name (expert groups stacked in order; dense unstacked)."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, t in tensors.items():
        name, first = key.rsplit("@", 1)
        parts.setdefault(name, []).append((int(first), t))
    out = {}
    for name in sorted(parts):
        pieces = [t for _, t in sorted(parts[name], key=lambda p: p[0])]
        out[name] = torch.cat(pieces) if "_exps." in name else pieces[0][0]
    return out


def quantize_items(items: list[Item], layer: int, stats: LayerStats, recipe: Recipe,
                   weights: Callable[[str], torch.Tensor], types: dict[str, str], device: str) -> Iterator[LayerResult]:
    for item in items:
        s = build_stack(item, layer, stats, recipe, weights)
        if isinstance(recipe, GGUFRecipe):
            yield quantize_ggml(item, s, recipe, types[gguf_name(s.names[0])])
        else:
            yield quantize_int(item, s, recipe, device)
