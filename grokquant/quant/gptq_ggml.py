"""GPTQ onto GGML grids: error-compensating rounding whose result is an ordinary GGML tensor.

GPTQ (quant/gptq.py) rounds one column at a time and spreads each column's error over the columns
not yet rounded. A GGML block (32 or 256 consecutive columns of a row) shares its scales, so here
the unit is one block-column: quantize columns [j, j+bs) of every row with the type's own quantizer
(importance = diag H, as llama-quantize --imatrix would), then hand the block's error on to the
columns after it (no compensation inside a block: its columns are rounded together, so 256-column
K-quant blocks win less than 32-column ones). With U the upper Cholesky factor of H⁻¹ and E = W_B − Q_B the block's error, the
joint optimal update of the remaining columns R is  W_R −= (E · U_BB⁻¹) · U_BR  — the column-wise
GPTQ update with the block's columns frozen together. Updates are applied lazily per window of
columns, as GPTQ does. Batched over a stack of matrices (the experts of a projection).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from grokquant.quant.ggml.base import QUANTIZERS
from grokquant.quant.gptq import upper_cholesky_of_inverse


def _quantize_block_columns(q, W: torch.Tensor, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns [B, out, bs] of one GGML block -> (bytes [B, out, block_bytes], dequantized [B, out, bs])."""
    B, rows, bs = W.shape
    qw = None
    if importance is not None:
        qw = importance[:, None, :].expand(B, rows, bs).reshape(B * rows, bs).contiguous()
    data = q.quantize_blocks(W.reshape(B * rows, bs).contiguous(), qw)
    return data.view(B, rows, -1), q.dequantize_blocks(data).view(B, rows, bs)


def ggml_rtn(W: torch.Tensor, type_name: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Plain GGML quantization of a stack W [B, out, in] with per-matrix importance [B, in] (or None)."""
    q = QUANTIZERS[type_name]
    B, rows, cols = W.shape
    qw = None
    if importance is not None:
        qw = importance[:, None, :].expand(B, rows, cols).reshape(-1, q.type.block).contiguous()
    data = q.quantize_blocks(W.float().reshape(-1, q.type.block).contiguous(), qw)
    return data.view(B, rows, -1)


class GGMLQuantized(NamedTuple):
    data: torch.Tensor  # [B, out, row_bytes] GGML bytes of each matrix
    hessian_error: torch.Tensor  # [B] ‖(W − Ŵ)X‖² on the calibration Hessian


@torch.no_grad()
def gptq_ggml(W: torch.Tensor, H: torch.Tensor, type_name: str, damp: float = 0.01, window: int = 512,
              overwrite_h: bool = False) -> GGMLQuantized:
    """W [B, out, in], H [B, in, in] -> GGML bytes; overwrite_h factorises H in its own storage."""
    q = QUANTIZERS[type_name]
    bs = q.type.block
    B, rows, cols = W.shape
    if cols % bs:
        raise ValueError(f"{type_name}: row length {cols} is not a multiple of {bs}")
    W0 = W
    W = W.to(torch.float32, copy=True)
    H = H if overwrite_h and H.dtype == torch.float32 else H.float().clone()
    dead = torch.diagonal(H, dim1=1, dim2=2) == 0  # columns no token touched: rounded, pass no error on
    H.diagonal(dim1=1, dim2=2)[dead] = 1
    # 1/diag(U)² (the Schur complement diagonal) measured no better than diag H as block importance
    importance = torch.diagonal(H, dim1=1, dim2=2).clone()
    damping = damp * importance.mean(-1)
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
            data, Q = _quantize_block_columns(q, W1[:, :, j:k], importance[:, i1 + j:i1 + k])
            first = (i1 + j) // bs * q.type.block_bytes
            out[:, :, first:first + q.type.block_bytes] = data
            err = torch.linalg.solve_triangular(U1[:, j:k, j:k], W1[:, :, j:k] - Q, upper=True, left=False)
            W1[:, :, k:] -= err @ U1[:, j:k, k:]
            Err1[:, :, j:k] = err
            d2 = (Q - W0[:, :, i1 + j:i1 + k].float()).pow(2).sum(1, dtype=torch.float64)  # [B, bs]
            added_share += (added[:, i1 + j:i1 + k] * d2).sum(1)
        objective += Err1.pow(2).sum((1, 2), dtype=torch.float64)
        W[:, :, i2:] -= Err1 @ U[:, i1:i2, i2:]
    return GGMLQuantized(out, objective - added_share)
