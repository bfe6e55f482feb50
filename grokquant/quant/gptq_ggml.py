"""GPTQ onto GGML grids: error-compensating rounding whose result is an ordinary GGML tensor.

GPTQ (quant/gptq.py, Frantar et al. 2022) rounds one column at a time and spreads each column's error
over the columns not yet rounded, through the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU):
err_c = (w_c − q_c) / U_cc,  W_{>c} −= err_c · U_{c,>c}.  A GGML block (32 or 256 consecutive columns of
a row) shares its parameters (fp16 scales and mins, 4/6-bit sub-block scales), so when the sweep reaches
a block:

1. the type's own quantizer fits the block's parameters on the current, error-updated weights (with
   importance diag H, as llama-quantize --imatrix would);
2. `sweep="columns"` (default): the block's columns are rounded one by one onto that fixed grid
   (Quantizer.grid: scale · levels[code] + offset, exactly as the dequantizer reads it), each column's
   error spread over the block's later columns at once and over the columns after the block lazily;
   `sweep="blocks"` (the lattice types IQ1/IQ2/IQ3, whose codes name 4 or 8 columns at once): the
   quantizer's own codes are kept and the block's error is handed on as a whole,
   W_R −= (E · U_BB⁻¹) · U_BR — no compensation inside a block;
3. `refits` > 0: the parameters are fitted again, on the columns as the sweep left them (the targets it
   actually rounded, after the in-block updates), and the block is swept again from the same start;
   each row keeps the sweep with the lower error.

Only codes and parameters the type stores change: the bytes are a standard GGML tensor. Batched over a
stack of matrices (the experts of a projection).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from grokquant.quant.ggml.base import QUANTIZERS, Quantizer
from grokquant.quant.cholesky import upper_cholesky_of_inverse
from grokquant.quant.sums import stack_mean, stack_sum


def ggml_rtn(W: torch.Tensor, type_name: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Plain GGML quantization of a stack W [B, out, in] with per-matrix importance [B, in] (or None)."""
    q = QUANTIZERS[type_name]
    B, rows, cols = W.shape
    qw = None
    if importance is not None:
        qw = importance[:, None, :].expand(B, rows, cols).reshape(-1, q.type.block).contiguous()
    data = q.quantize_blocks(W.float().reshape(-1, q.type.block).contiguous(), qw)
    return data.view(B, rows, -1)


class _Rounder:
    """Nearest code of a type's levels for values already divided by their scale."""

    def __init__(self, levels: torch.Tensor):
        self.levels = levels
        steps = levels[1:] - levels[:-1]
        self.uniform = bool((steps == 1).all())
        self.midpoints = (levels[1:] + levels[:-1]) / 2

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.uniform:
            return (t.round() - self.levels[0]).clamp_(0, len(self.levels) - 1).long()
        return torch.bucketize(t, self.midpoints)


def _sweep_block(q: Quantizer, rounder: _Rounder, data: torch.Tensor, W: torch.Tensor, U: torch.Tensor):
    """Round the block's columns W [B, out, bs] one at a time onto the grid of `data`, compensating inside
    the block; W is updated in place. Returns (bytes, GPTQ errors [B, out, bs])."""
    B, rows, bs = W.shape
    scale, offset = q.grid(data)
    scale, offset = scale.view(B, rows, bs), None if offset is None else offset.view(B, rows, bs)
    levels = rounder.levels
    codes = torch.empty(B, rows, bs, dtype=torch.uint8)
    err = torch.empty_like(W)
    zero = scale == 0
    for c in range(bs):
        w = W[:, :, c]
        t = w if offset is None else w - offset[:, :, c]
        code = rounder(torch.where(zero[:, :, c], 0.0, t / scale[:, :, c]))
        codes[:, :, c] = code
        value = scale[:, :, c] * levels[code]
        if offset is not None:
            value += offset[:, :, c]
        e = (w - value) / U[:, c, c, None]
        err[:, :, c] = e
        if c + 1 < bs:
            W[:, :, c + 1:] -= e[:, :, None] * U[:, None, c, c + 1:]
    return q.with_codes(data, codes.view(B * rows, bs)), err


class GGMLQuantized(NamedTuple):
    data: torch.Tensor  # [B, out, row_bytes] GGML bytes of each matrix
    hessian_error: torch.Tensor  # [B] ‖(W − Ŵ)X‖² on the calibration Hessian


@torch.no_grad()
def gptq_ggml(W: torch.Tensor, H: torch.Tensor, type_name: str, damp: float = 0.01, window: int = 512,
              overwrite_h: bool = False, sweep: str | None = None, refits: int = 0) -> GGMLQuantized:
    """W [B, out, in], H [B, in, in] -> GGML bytes; overwrite_h factorises H in its own storage.

    `sweep` defaults to "columns" for types with per-element levels and to "blocks" for the lattice
    codebooks (IQ1/IQ2/IQ3), whose codes cover 4 or 8 columns jointly."""
    q = QUANTIZERS[type_name]
    if sweep is None:
        sweep = "columns" if q.levels is not None else "blocks"
    if sweep not in ("columns", "blocks"):
        raise ValueError(f"sweep must be 'columns' or 'blocks', not {sweep!r}")
    bs = q.type.block
    B, rows, cols = W.shape
    if cols % bs:
        raise ValueError(f"{type_name}: row length {cols} is not a multiple of {bs}")
    rounder = _Rounder(q.levels) if sweep == "columns" else None
    W0 = W
    W = W.to(torch.float32, copy=True)
    H = H if overwrite_h and H.dtype == torch.float32 else H.float().clone()
    dead = torch.diagonal(H, dim1=1, dim2=2) == 0  # columns no token touched: rounded, pass no error on
    H.diagonal(dim1=1, dim2=2)[dead] = 1
    # 1/diag(U)² (the Schur complement diagonal) measured no better than diag H as block importance
    importance = torch.diagonal(H, dim1=1, dim2=2).clone()
    damping = damp * stack_mean(importance)
    H.diagonal(dim1=1, dim2=2).add_(damping[:, None])
    added = dead.float() + damping[:, None]  # as in gptq(): the objective less the added diagonal's share
    U = upper_cholesky_of_inverse(H)  # H⁻¹ = UᵀU
    del H
    objective = torch.zeros(B, dtype=torch.float64)
    added_share = torch.zeros(B, dtype=torch.float64)

    window = max(bs, window // bs * bs)
    out = torch.empty(B, rows, cols // bs * q.type.block_bytes, dtype=torch.uint8)
    for i1 in range(0, cols, window):
        i2 = min(i1 + window, cols)
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for j in range(0, i2 - i1, bs):
            k = j + bs
            Ub = U1[:, j:k, j:k]
            imp = importance[:, i1 + j:i1 + k]
            data = ggml_rtn(W1[:, :, j:k], type_name, imp).view(B * rows, -1)
            if rounder is None:
                Q = q.dequantize_blocks(data).view(B, rows, bs)
                err = torch.linalg.solve_triangular(Ub, W1[:, :, j:k] - Q, upper=True, left=False)
            else:
                target = W1[:, :, j:k].clone()
                data, err = _sweep_block(q, rounder, data, W1[:, :, j:k], Ub)
                for _ in range(refits):
                    data2 = ggml_rtn(W1[:, :, j:k], type_name, imp).view(B * rows, -1)  # fitted to the compensated columns
                    trial = target.clone()
                    data2, err2 = _sweep_block(q, rounder, data2, trial, Ub)
                    better = err2.pow(2).sum(-1) < err.pow(2).sum(-1)  # per row [B, out]
                    if not better.any():
                        break
                    flat = better.view(-1)
                    data[flat], err[better] = data2[flat], err2[better]
                    W1[:, :, j:k][better] = trial[better]
                Q = q.dequantize_blocks(data).view(B, rows, bs)
            first = (i1 + j) // bs * q.type.block_bytes
            out[:, :, first:first + q.type.block_bytes] = data.view(B, rows, -1)
            W1[:, :, k:] -= err @ U1[:, j:k, k:]
            Err1[:, :, j:k] = err
            d2 = (Q - W0[:, :, i1 + j:i1 + k].float()).pow(2).sum(1, dtype=torch.float64)  # [B, bs]
            added_share += (added[:, i1 + j:i1 + k] * d2).sum(1)
        objective += stack_sum(Err1.pow(2))
        W[:, :, i2:] -= Err1 @ U[:, i1:i2, i2:]
    return GGMLQuantized(out, objective - added_share)
