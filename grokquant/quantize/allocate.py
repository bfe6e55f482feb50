"""Per-tensor GGML types under a size budget, chosen by each tensor's measured effect on the output.

`quantize --target-bpw B` on a GGUF recipe replaces the ftype's fixed mix (llama.cpp's rules by tensor
name and layer index) by one fitted to the model:

1. Sensitivity. The model (llama.cpp semantics, the file's) runs the calibration windows once; hooks
   record each linear's Σx² per input column (each expert over its own tokens) and the hidden states
   entering each layer. Then, one tensor g at a time, g alone is rounded to a probe type and the model
   is run again from g's layer on: D_g = mean KL(original ‖ perturbed) over the calibration tokens.
   For small perturbations the KL divergence is quadratic in the output change, so for any type t
   ΔKLD(g, t) ≈ D_g · e(g, t) / e(g, probe), with e = Σ_ij imp_j (W − Q_t(W))²_ij the importance-weighted
   rounding error of t (one quantization per type, no forward pass). One model pass per tensor measures
   what llama.cpp's mix assumes by name: that attn_v matters more than attn_q, the last layers more than
   the middle ones, the embedding of a small vocabulary more than an expert seen by a quarter of the tokens.
2. Allocation: minimise Σ_g ΔKLD(g, t_g) subject to Σ_g bytes(g, t_g) ≤ budget over each tensor's Pareto
   front: the better of a Lagrangian relaxation (llama.cpp PR #15550 solves the same problem with
   imatrix-weighted errors in place of measured KL divergences) and a knapsack dynamic programme, each
   topped up with the upgrades of best gain per byte that still fit.

The budget counts what llama.cpp's file sizes count as weights: bits per weight over every tensor with two
or more dimensions (the routers stay F32 in both). The model is held in memory as float32 for the probes;
the quantized file is still written one layer at a time.
"""

from __future__ import annotations

import math
from typing import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from grokquant.errors import GrokquantError
from grokquant.grok.checkpoint import Checkpoint
from grokquant.grok.model import PRESETS, Grok2ForCausalLM, rope_cos_sin
from grokquant.grok.names import gguf_tensors, release_names
from grokquant.quant.ggml.base import QUANTIZERS
from grokquant.quant.ggml.mixes import NEEDS_IMATRIX, is_quantizable
from grokquant.quant.ggml.types import TYPES
from grokquant.quant.gptq_ggml import ggml_rtn
from grokquant.quant.sums import stack_sum

CANDIDATES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS", "Q4_K",
              "Q5_K", "Q6_K", "Q8_0")
PROBE = "Q3_K"  # large enough an error to measure above float noise, small enough to stay quadratic
MAX_TOKENS = 4096  # calibration tokens the probes run on
MAX_LOGIT_ELEMENTS = 1 << 28  # of the reference log-probabilities kept (1 GiB): fewer tokens for a large vocabulary
MAX_MODEL_BYTES = 8 << 30  # float32 copy of the model held for the probes
# llama.cpp's forward pass (routing, no softcaps, √2/2 residuals) without its bit-level emulation (fp16
# GELU table, double-precision norms): those move logits by ~1e-6, far below any probe's effect, and
# cost more than the rest of the pass
PROBE_SEMANTICS = replace(PRESETS["llama.cpp"], name="llama.cpp-probe", gelu="tanh", rms_norm_ggml=False)


def matrix_elements(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    """Elements of the tensors bits per weight are counted over (two or more dimensions)."""
    return sum(math.prod(s) for _, s in shapes if len(s) >= 2)


@dataclass
class Sensitivity:
    """Per GGUF tensor: the measured KLD of its probe rounding and its rounding error per type."""

    probe_kld: dict[str, float] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> type -> e(g, t)

    def kld(self, name: str, type_name: str) -> float:
        e = self.errors[name]
        # the ratio first: the probe's own type then gives its measured KLD exactly (1.0 * p == p)
        return self.probe_kld[name] * (e[type_name] / e[PROBE]) if e[PROBE] > 0 else 0.0


# ---- measuring ----------------------------------------------------------------------------------------

def _weighted_error(W: torch.Tensor, type_name: str, imp: torch.Tensor | None, col_weight: torch.Tensor | None,
                    row_weight: torch.Tensor | None) -> tuple[float, torch.Tensor]:
    """(Σ row_weight · col_weight · (W − Q)², Q) for a stack W [B, out, in] rounded to type_name with
    importance imp [B, in] (one call for the whole stack: the searches cost per call); a missing weight
    counts 1."""
    q = QUANTIZERS[type_name]
    Q = q.dequantize(ggml_rtn(W, type_name, imp).reshape(-1, q.type.block_bytes * (W.shape[2] // q.type.block)),
                     W.shape[2]).view(W.shape)
    d2 = (W - Q).double().pow(2)
    if col_weight is not None:
        d2 = d2 * col_weight.double()[:, None, :]
    if row_weight is not None:
        d2 = d2 * row_weight.double()[None, :, None]
    return float(stack_sum(d2[None])), Q


class _Probe:
    """The model in memory with every layer's input hidden states, for runs from any layer on."""

    def __init__(self, ckpt: Checkpoint, tokens: torch.Tensor, batch_size: int):
        cfg = ckpt.config
        self.model = Grok2ForCausalLM.from_checkpoint(ckpt, PROBE_SEMANTICS)
        self.batches = list(tokens.split(batch_size))
        T = tokens.shape[1]
        self.positions = torch.arange(T)
        self.rope = rope_cos_sin(self.positions, cfg, self.model.sem)
        self.sum2: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_pre_hook(self._recorder(name)) for name, m in self.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith("block_sparse_moe.gate")]
        try:
            self.hidden = [[self.model.embed(b) for b in self.batches]]
            for layer in range(cfg.num_hidden_layers):
                self.hidden.append([self._layer(layer, h) for h in self.hidden[-1]])
            self.base = [self._logp(h) for h in self.hidden[-1]]
        finally:
            for h in hooks:
                h.remove()
        self.token_counts = torch.bincount(tokens.reshape(-1), minlength=cfg.vocab_size).float()

    def _recorder(self, name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            s = self.sum2.get(name)
            self.sum2[name] = x.pow(2).sum(0) if s is None else s + x.pow(2).sum(0)
        return hook

    def _logp(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.log_softmax(self.model.head(w), -1) for w in h.split(1)])  # a window at a time

    def _layer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.model.run_layer(layer, h, self.positions, None, self.rope)

    def kld_from(self, start: int) -> float:
        """Mean KL(base ‖ model) with the model's current weights, run from layer `start` (-1: the embedding,
        n_layers: only the head) on the recorded inputs."""
        n_layers = len(self.hidden) - 1
        total, count = 0.0, 0
        for i, b in enumerate(self.batches):
            h = self.model.embed(b) if start < 0 else self.hidden[start][i]
            for layer in range(max(start, 0), n_layers):
                h = self._layer(layer, h)
            for w in range(h.shape[0]):
                base = self.base[i][w]
                logp = F.log_softmax(self.model.head(h[w:w + 1]), -1)[0]
                total += float((base.exp() * (base - logp)).sum(-1).double().sum())
                count += base.shape[0]
        return total / count

    def release_weights(self, gguf: str) -> list[tuple[str, torch.Tensor]]:
        return [(n, self.model.get_parameter(n).detach()) for n in release_names(gguf, self.model.cfg)]

    def set_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.assign(tensors)


def _start_layer(gguf: str, n_layers: int) -> int:
    if gguf.startswith("blk."):
        return int(gguf.split(".")[1])
    return -1 if gguf.startswith("token_embd") else n_layers


def allocatable(ckpt: Checkpoint, fixed: set[str]) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF tensors whose type the allocation chooses: quantizable, not fixed by the recipe, and whose rows
    fit the probe type (the others keep their planned type and count as fixed)."""
    return [(g, s) for g, s in gguf_tensors(ckpt.config)
            if is_quantizable(g, len(s)) and g not in fixed and PROBE in _candidates(s)]


def _candidates(shape: tuple[int, ...], embedding: bool = False) -> list[str]:
    """Types whose block divides the rows; for the embedding (a row lookup, no column importance) not the
    ones whose searches need importance."""
    return [t for t in CANDIDATES if shape[-1] % TYPES[t].block == 0 and not (embedding and t in NEEDS_IMATRIX)]


@torch.no_grad()
def measure(ckpt: Checkpoint, tokens: torch.Tensor, fixed: set[str], batch_size: int = 8,
            on_tensor: Callable[[int], None] | None = None) -> Sensitivity:
    """The sensitivity of every allocatable tensor (see the module docstring); on_tensor(number done)."""
    cfg = ckpt.config
    model_bytes = 4 * sum(math.prod(s) for _, s in gguf_tensors(cfg))
    if model_bytes > MAX_MODEL_BYTES:
        raise GrokquantError(f"--target-bpw measures each tensor's effect with the model in memory: "
                             f"{model_bytes / 2**30:.1f} GiB as float32, more than {MAX_MODEL_BYTES >> 30} GiB")
    n_tokens = min(MAX_TOKENS, MAX_LOGIT_ELEMENTS // cfg.vocab_size)
    tokens = tokens[:max(1, n_tokens // tokens.shape[1])]
    probe = _Probe(ckpt, tokens, batch_size)
    sens = Sensitivity()
    for done, (g, shape) in enumerate(allocatable(ckpt, fixed), 1):
        original = probe.release_weights(g)
        W = torch.stack([w.float() for _, w in original])
        imp, cols, rows = None, None, None
        if g.startswith("token_embd"):  # a row lookup: each row weighs by how often its token occurs
            rows = probe.token_counts
        else:
            cols = torch.stack([probe.sum2.get(_module_name(n), torch.zeros(W.shape[2], dtype=torch.float64))
                                for n, _ in original]).float()
            imp = cols.clone()
            unseen = ~imp.any(1)  # experts no calibration token reached: their error costs nothing (cols 0),
            if unseen.any():      # but the quantizer needs some weights to round them
                imp[unseen] = imp[~unseen].mean(0) if (~unseen).any() else 1.0
        errors = {}
        for t in _candidates(shape, embedding=imp is None):
            errors[t], Q = _weighted_error(W, t, imp, cols, rows)
            if t == PROBE:
                probe.set_weights({n: Q[i] for i, (n, _) in enumerate(original)})
        sens.probe_kld[g] = probe.kld_from(_start_layer(g, cfg.num_hidden_layers))
        probe.set_weights(dict(original))
        sens.errors[g] = errors
        if on_tensor:
            on_tensor(done)
    return sens


def _module_name(param: str) -> str:
    return param.rsplit(".", 1)[0]


# ---- choosing -----------------------------------------------------------------------------------------

def _front(options: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """(bytes, cost, type) sorted by bytes, keeping only types that lower the cost."""
    front = []
    for opt in sorted(options):
        if not front or opt[1] < front[-1][1]:
            front.append(opt)
    return front


def allocate(sens: Sensitivity, shapes: dict[str, tuple[int, ...]], budget: int) -> dict[str, str]:
    """GGUF name -> GGML type minimising the predicted KLD with Σ bytes ≤ budget: the better of a Lagrangian
    relaxation and a dynamic programme over bytes in units of budget / max(64 · tensors, 2¹⁴), each followed by
    a greedy fill of the bytes it left."""
    fronts = {g: _front([(TYPES[t].nbytes(shapes[g]), sens.kld(g, t), t) for t in sens.errors[g]])
              for g in sorted(sens.errors)}
    if sum(f[0][0] for f in fronts.values()) > budget:
        raise GrokquantError("the target is below the smallest allocation: raise --target-bpw")
    picks = [_fill(fronts, p, budget) for p in (_lagrangian(fronts, budget), _knapsack(fronts, budget))]
    pick = min(picks, key=lambda p: sum(fronts[g][i][1] for g, i in p.items()))
    return {g: fronts[g][i][2] for g, i in sorted(pick.items())}


def check_budget(shapes: dict[str, tuple[int, ...]], budget: int) -> None:
    """Refuse a budget below every tensor at its smallest candidate (before anything is measured)."""
    smallest = sum(min(TYPES[t].nbytes(s) for t in _candidates(s, g.startswith("token_embd")))
                   for g, s in shapes.items())
    if smallest > budget:
        raise GrokquantError(f"the target is below the smallest allocation ({smallest} bytes of weights "
                             f"for {budget} allowed): raise --target-bpw")


def _size(fronts, pick: dict[str, int]) -> int:
    return sum(fronts[g][i][0] for g, i in pick.items())


def _lagrangian(fronts, budget: int) -> dict[str, int]:
    """The points of each front on the convex hull that minimise cost + λ·bytes for the smallest λ that fits."""
    def choose(lam: float) -> dict[str, int]:
        return {g: min(range(len(f)), key=lambda i: f[i][1] + lam * f[i][0]) for g, f in fronts.items()}

    lo, hi = 0.0, 1e-12
    while _size(fronts, choose(hi)) > budget:
        hi *= 4
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _size(fronts, choose(mid)) > budget else (lo, mid)
    return choose(hi)


def _knapsack(fronts, budget: int) -> dict[str, int]:
    """Exact over sizes rounded up to whole units (so the choice always fits)."""
    names = list(fronts)
    units = max(64 * len(names), 1 << 14)
    unit = budget / units
    best = np.zeros(units + 1)  # least cost of the tensors so far within j units
    choice = np.zeros((len(names), units + 1), dtype=np.int8)
    for k, g in enumerate(names):
        new = np.full(units + 1, np.inf)
        for i, (nbytes, c, _) in enumerate(fronts[g]):
            w = math.ceil(nbytes / unit - 1e-9)
            if w > units:
                continue
            cand = np.full(units + 1, np.inf)
            cand[w:] = best[:units + 1 - w] + c
            better = cand < new
            new[better], choice[k, better] = cand[better], i
        best = new
    j = int(np.argmin(best))
    pick = {}
    for k in range(len(names) - 1, -1, -1):
        i = int(choice[k, j])
        pick[names[k]] = i
        j -= math.ceil(fronts[names[k]][i][0] / unit - 1e-9)
    return pick


def _fill(fronts, pick: dict[str, int], budget: int) -> dict[str, int]:
    """Spend the bytes left on the upgrades of best gain per byte."""
    pick = dict(pick)
    left = budget - _size(fronts, pick)
    while True:
        best, best_rate = None, 0.0
        for g, i in pick.items():
            f = fronts[g]
            for j in range(i + 1, len(f)):
                if f[j][0] - f[i][0] <= left:
                    rate = (f[i][1] - f[j][1]) / (f[j][0] - f[i][0])
                    if rate > best_rate:
                        best, best_rate = (g, j), rate
        if best is None:
            return pick
        g, j = best
        left -= fronts[g][j][0] - fronts[g][pick[g]][0]
        pick[g] = j


HEADER_BYTES_PER_TENSOR = 128  # what the file's report of the allocation adds to its header, at most
HEADER_BYTES = 1024  # and the per-class report


def budget_bytes(shapes: dict[str, tuple[int, ...]], target_bpw: float, planned: dict[str, str],
                 free: set[str]) -> int:
    """Bytes the `free` tensors may take for `target_bpw` over all matrices, the others at their planned
    types (the recipe's fixed ones, the routers), less what our reports add to the header: a file made
    for another file's bits per weight is then no larger than it."""
    total = int(target_bpw * matrix_elements(list(shapes.items())) / 8)
    fixed = sum(TYPES[planned[g]].nbytes(s) for g, s in shapes.items() if len(s) >= 2 and g not in free)
    return total - fixed - HEADER_BYTES - HEADER_BYTES_PER_TENSOR * len(free)


def allocation_report(sens: Sensitivity, types: dict[str, str]) -> list[dict]:
    """Per allocated tensor: type, measured probe KLD and predicted KLD at the chosen type."""
    return [{"tensor": g, "type": t, "probe_kld": float(f"{sens.probe_kld[g]:.3g}"),
             "predicted_kld": float(f"{sens.kld(g, t):.3g}")} for g, t in types.items()]

