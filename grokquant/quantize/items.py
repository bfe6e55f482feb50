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

from grokquant.calibrate.statistics import LayerStats
from grokquant.grok.config import GrokConfig, expert_name
from grokquant.grok.names import DENSE_LINEARS, all_tokens, expert_group, gguf_name, stack_groups
from grokquant.grok.model import gelu
from grokquant.quant.ggml.base import QUANTIZERS
from grokquant.quant.ggml.mixes import NEEDS_IMATRIX
from grokquant.quant.gptq import IntQuantConfig, IntQuantized, gptq, rtn
from grokquant.quant.gptq_ggml import ggml_rtn, gptq_ggml
from grokquant.quant.sums import stack_sum
from grokquant.quantize.recipe import GGUFRecipe, GPTQRecipe

# module name of each quantized dense linear within a layer -> its table entry (group and class)
DENSE = {t.release[: -len(".weight")]: t for t in DENSE_LINEARS}
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
    items = [Item(i, linear=linear) for i, linear in enumerate(DENSE)]
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
    owns_h: bool = False  # H is no one else's: GPTQ may factorise it in place


def _importance(sum2: torch.Tensor, tokens: int) -> torch.Tensor:
    """Mean x² per column in float32, as llama-quantize reads an imatrix (1.0 where no token came)."""
    sum2 = sum2.float()
    return sum2 / torch.tensor(float(tokens)) if tokens > 0 else torch.ones_like(sum2)


def stats_groups(item: Item) -> list[str]:
    """The statistics groups an item's own Hessians come from."""
    return stack_groups(item.linear, item.proj, range(*item.experts))


def last_uses(items: list[Item]) -> dict[int, set[str]]:
    """Per item, the Hessians no later item of `items` needs (the MoE input's is kept for the experts)."""
    last = {g: it.index for it in items for g in stats_groups(it) if g != "mlp_gate_up"}
    out: dict[int, set[str]] = {}
    for g, index in last.items():
        out.setdefault(index, set()).add(g)
    return out


def build_stack(item: Item, layer: int, stats: LayerStats, recipe: Recipe,
                weights: Callable[[str], torch.Tensor], take: set[str] = frozenset()) -> Stack:
    """The item's weights with the statistics the recipe's coverage policy gives each matrix.

    Hessians named in `take` leave `stats` with the stack, which may then factorise them in place.
    """
    def hessian(g: str, default=None):
        return stats.hessian.pop(g, default) if g in take else stats.hessian.get(g, default)

    if item.linear is not None:
        group, cls = DENSE[item.linear].group, DENSE[item.linear].cls
        name = f"model.layers.{layer}.{item.linear}.weight"
        H = hessian(group)
        return Stack(cls, [name], weights(name).float()[None], None if H is None else H[None],
                     _importance(stats.sum2[group], stats.count[group])[None], [False], stats.count[group],
                     owns_h=group in take)
    experts = range(*item.experts)
    names = [expert_name(layer, e, item.proj) for e in experts]
    W = torch.stack([weights(n).float() for n in names])
    n_all = stats.count["mlp_gate_up"]
    Hs, imps, fallback, counts = [], [], [], []
    owned = True
    for g in stats_groups(item):
        n = stats.count.get(g, 0)
        own_H = hessian(g, torch.zeros(W.shape[2], W.shape[2])) if stats.with_hessians else None
        own_s = stats.sum2.get(g, torch.zeros(W.shape[2])).float()
        covered = n >= recipe.min_tokens
        if covered or recipe.under_covered == "rtn":
            H, s, k = own_H, own_s, n
            owned &= g in take
        elif recipe.under_covered == "all-tokens":
            H, s, k = stats.hessian.get(all_tokens(g)), stats.sum2[all_tokens(g)], n_all
            owned = False
        else:  # prior: the expert's own tokens plus min_tokens tokens' worth of the all-token average
            w = recipe.min_tokens / n_all
            H = None if own_H is None else own_H + stats.hessian[all_tokens(g)] * w
            s, k = own_s + stats.sum2[all_tokens(g)] * w, n + recipe.min_tokens
        Hs.append(H)
        imps.append(_importance(s, k))
        fallback.append(not covered and recipe.under_covered == "rtn")
        counts.append(n)
    if Hs[0] is None:
        H = None
    elif len(Hs) == 1:
        H = Hs[0][None]  # a view: one expert's Hessian is not copied
    else:
        H, owned = torch.stack(Hs), True
    return Stack("experts", names, W, H, torch.stack(imps), fallback, min(counts), owns_h=owned)


def all_token_statistics(layer_module, experts: range, stats: LayerStats, recipe: Recipe, gelu_flavour: str,
                         m: torch.Tensor, hessians: bool) -> None:
    """Statistics of under-covered experts as if every calibration token m [N, H] were routed to them."""
    for e in experts:
        w13, w2 = expert_group(e, "w13"), expert_group(e, "w2")
        if stats.count.get(w13, 0) >= recipe.min_tokens:
            continue
        expert = layer_module.block_sparse_moe.experts[e]
        stats.sum2[all_tokens(w13)] = stats.sum2["mlp_gate_up"]  # the same input m, all tokens
        a = gelu(expert.w1(m), gelu_flavour) * expert.w3(m)
        stats.sum2[all_tokens(w2)] = a.pow(2).sum(0, dtype=torch.float64).cpu()
        if hessians:
            stats.hessian[all_tokens(w13)] = stats.hessian["mlp_gate_up"]
            stats.hessian[all_tokens(w2)] = (a.T @ a).cpu()


def hessian_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor | None:
    """‖(W_b − Ŵ_b) X_b‖² = tr(D H Dᵀ) of each matrix, from the calibration Hessians (Wq, a temporary,
    is overwritten: at 32768 columns each copy is a gigabyte)."""
    if H is None:
        return None
    D = Wq.sub_(W) if Wq.dtype == torch.float32 else Wq - W  # Wq is a temporary here
    return symmetric_form(D, H)


def symmetric_form(D: torch.Tensor, H: torch.Tensor, block: int = 512) -> torch.Tensor:
    """tr(D_b H_b D_bᵀ) [B] in float64 for symmetric H, from H's lower triangle only: half the flops of D H.

    tr(D H Dᵀ) = 2·tr(D M Dᵀ) with M = H's strict lower triangle plus half its diagonal; each column block J
    of D M is D_J M_JJ + D_{>J} H_{>J,J}."""
    B, rows, cols = D.shape
    chunk = max(1, (1 << 25) // (B * block))  # rows per product: each is at most 2^25 floats
    total = torch.zeros(B, dtype=torch.float64, device=D.device)
    for j1 in range(0, cols, block):
        j2 = min(j1 + block, cols)
        M = H[:, j1:j2, j1:j2].tril(-1)
        M.diagonal(dim1=1, dim2=2).copy_(H[:, j1:j2, j1:j2].diagonal(dim1=1, dim2=2)).mul_(0.5)
        for r1 in range(0, rows, chunk):
            d = D[:, r1:r1 + chunk]
            dj = d[:, :, j1:j2]
            p = torch.bmm(dj, M)
            if j2 < cols:
                p.baddbmm_(d[:, :, j2:], H[:, j2:, j1:j2])
            total += stack_sum(p.mul_(dj))
    return total.mul_(2)


def _total(errors: torch.Tensor | None) -> float | None:
    return None if errors is None else float(errors.sum())


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

def _int_stack(s: Stack, cfg: IntQuantConfig, method: str, device: str) -> tuple[IntQuantized, tuple]:
    """Batched GPTQ with round-to-nearest for the matrices flagged as fallback; (result, (error, rtn error)).

    The errors are measured before GPTQ factorises a Hessian the stack owns (s.H is gone afterwards).
    """
    W = s.W.to(device)
    H = None if s.H is None else s.H.to(device)
    r = rtn(W, cfg)
    rtn_error = hessian_error(W, r.dequantize(), H)
    if method == "rtn" or all(s.fallback):
        q, error = r, rtn_error
    else:
        q = gptq(W, H, cfg, overwrite_h=s.owns_h or H is not s.H)
        s.H = H = None
        error = q.hessian_error
        for b, fb in enumerate(s.fallback):
            if fb:
                q.codes[b], q.scales[b], q.zeros[b], q.g_idx[b] = r.codes[b], r.scales[b], r.zeros[b], r.g_idx[b]
                error[b] = rtn_error[b]
    q = IntQuantized(*(t.cpu() for t in (q.codes, q.scales, q.zeros, q.g_idx)))
    return q, tuple(None if e is None else e.cpu() for e in (error, rtn_error))


def quantize_int(item: Item, s: Stack, recipe: GPTQRecipe, device: str = "cpu") -> LayerResult:
    """A stack onto the recipe's integer grid, in the auto-gptq layout (nothing if the class stays bf16)."""
    from grokquant.gptq.layout import gptq_tensors, packable

    res = LayerResult()
    qc = recipe.config_for(s.cls)
    if qc is None or not packable(s.W.shape[1], s.W.shape[2], qc.bits):
        return res
    q, (error, rtn_error) = _int_stack(s, qc, recipe.method, device)
    Wq = q.dequantize()
    res.report.append({"stack": item.index, "class": s.cls, "bits": qc.bits, "error": _total(error),
                       "rtn_error": _total(rtn_error), "min_tokens": s.min_tokens})
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

    def dequant(d):
        return q.dequantize(d.reshape(-1, d.shape[-1]), W.shape[2]).view(W.shape)

    # llama-quantize's rounding without data for a matrix; the lattice types cannot search without
    # importance, and llama-quantize gives an expert that saw no tokens 1.0 for every column
    unit = torch.ones(W.shape[0], W.shape[2]) if type_name in NEEDS_IMATRIX else None
    reference = ggml_rtn(W, type_name, unit)
    rtn_error = hessian_error(W, dequant(reference), s.H)  # before GPTQ factorises an owned Hessian
    if recipe.method == "gptq" and not all(s.fallback):
        data, error = gptq_ggml(W, s.H, type_name, recipe.damp, overwrite_h=s.owns_h, refits=recipe.refits)
        s.H = None
    else:
        data = ggml_rtn(W, type_name, s.importance)
        error = hessian_error(W, dequant(data), s.H)
    for b, fb in enumerate(s.fallback):
        if fb:
            data[b] = reference[b]
            if error is not None:
                error[b] = rtn_error[b]

    Wq = dequant(data)
    res.report.append({"stack": item.index, "class": s.cls, "bits": type_name, "error": _total(error),
                       "rtn_error": _total(rtn_error), "min_tokens": s.min_tokens})
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
    take = last_uses(items)
    for item in items:
        s = build_stack(item, layer, stats, recipe, weights, take.get(item.index, set()))
        if isinstance(recipe, GGUFRecipe):
            res = quantize_ggml(item, s, recipe, types[gguf_name(s.names[0])])
        else:
            res = quantize_int(item, s, recipe, device)
        del s  # its weights and Hessians go before the next stack's arrive
        yield res
