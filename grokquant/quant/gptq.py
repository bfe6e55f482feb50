"""Integer weight quantization: round-to-nearest and GPTQ, batched over a stack of matrices.

Every function takes W [B, out, in] (B = the 8 experts of one projection, or 1) and, for GPTQ, the
Hessians H [B, in, in] = Σxxᵀ of each matrix's own inputs. One in-place factorisation per Hessian
(quant/cholesky.py); the column loop runs once for the whole batch. Quantization groups run along the input dimension;
codes are unsigned q in [0, 2^bits - 1] with W ≈ scale · (q - zero), the grid of the GPTQ paper's
reference quantizer (Frantar et al. 2022, arXiv:2210.17323) and of auto-gptq's checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from grokquant.gptq.layout import MIN_ZERO
from grokquant.quant.cholesky import reversed_cholesky_
from grokquant.quant.sums import stack_mean, stack_sum


@dataclass(frozen=True)
class IntQuantConfig:
    """Integer weight-only settings of one linear: what a recipe asks the quantizer for and what an
    artifact's quantization_config says (grokquant.gptq.config maps the fields to its JSON keys)."""

    bits: int = 4
    group_size: int = 128  # -1: one group per row
    sym: bool = True
    act_order: bool = False  # process columns by decreasing Hessian diagonal
    static_groups: bool = False  # with act_order: group parameters fixed before the column loop
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    block_size: int = 128  # columns per lazy batch update

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1


# each field's type, for reading settings from untrusted files (recipes, an artifact's quantization_config)
FIELD_TYPES = {f.name: type(f.default) for f in fields(IntQuantConfig)}


def is_of_type(value, kind: type) -> bool:
    """`value` is a `kind` as JSON or YAML would give it: bool is not an int here, an int is a float."""
    return isinstance(value, bool) == (kind is bool) and isinstance(value, (int, float) if kind is float else kind)


@dataclass
class IntQuantized:
    codes: torch.Tensor  # [B, out, in] uint8
    scales: torch.Tensor  # [B, n_groups, out] float32
    zeros: torch.Tensor  # [B, n_groups, out] float32 (integer values)
    g_idx: torch.Tensor  # [B, in] int32: group of each input column
    hessian_error: torch.Tensor | None = None  # [B] ‖(W − Ŵ)X‖² on the calibration Hessian (GPTQ only)

    def dequantize(self) -> torch.Tensor:
        B, rows, cols = self.codes.shape
        n_groups = self.scales.shape[1]
        out = self.codes.float()  # in place from here: a 32768-wide stack is 1 GB per temporary
        zeros, scales = self.zeros.transpose(1, 2), self.scales.transpose(1, 2)  # [B, out, n_groups]
        gs = cols // n_groups
        if gs * n_groups == cols and torch.equal(self.g_idx, _in_order(cols, gs, self.g_idx)):
            grouped = out.view(B, rows, n_groups, gs)  # groups in column order: broadcast, no gathered copies
            grouped.sub_(zeros[..., None]).mul_(scales[..., None])
            return out
        g = self.g_idx.long()[:, None, :].expand(-1, rows, -1)  # [B, out, in]
        out.sub_(torch.gather(zeros, 2, g))
        return out.mul_(torch.gather(scales, 2, g))


def _in_order(cols: int, gs: int, like: torch.Tensor) -> torch.Tensor:
    return (torch.arange(cols, device=like.device) // gs).to(like.dtype).expand_as(like)


def group_params(w: torch.Tensor, cfg: IntQuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of each row of w [..., rows, cols] over its columns."""
    xmin = w.amin(-1).clamp(max=0)
    xmax = w.amax(-1).clamp(min=0)
    if cfg.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / cfg.maxq
    if cfg.sym:
        return scale, torch.full_like(scale, (cfg.maxq + 1) / 2)
    zero = torch.round(-xmin / scale)
    # the checkpoint cannot store a zero below MIN_ZERO (grokquant.gptq.layout): groups whose zero
    # rounds below it take MIN_ZERO and stretch their scale over the maxq − MIN_ZERO steps above it
    low = zero < MIN_ZERO
    scale = torch.where(low, xmax / (cfg.maxq - MIN_ZERO), scale)
    return scale, torch.where(low, torch.full_like(zero, MIN_ZERO), zero)


def quantize_codes(w, scale, zero, maxq: int) -> torch.Tensor:
    return (w / scale).round_().add_(zero).clamp_(0, maxq)  # one temporary, however wide w is


def rtn(W: torch.Tensor, cfg: IntQuantConfig) -> IntQuantized:
    """Round-to-nearest with the same grid as GPTQ (the baseline)."""
    B, rows, cols = W.shape
    gs = cols if cfg.group_size == -1 else cfg.group_size
    n_groups = -(-cols // gs)
    W = W.float()
    pad = n_groups * gs - cols
    Wg = torch.nn.functional.pad(W, (0, pad)) if pad else W
    Wg = Wg.view(B, rows, n_groups, gs)
    scale, zero = group_params(Wg, cfg)  # [B, rows, n_groups]; padding is 0, inside every group's range
    codes = quantize_codes(Wg, scale[..., None], zero[..., None], cfg.maxq).view(B, rows, -1)[..., :cols]
    g_idx = (torch.arange(cols, device=W.device) // gs).to(torch.int32).expand(B, -1).contiguous()
    return IntQuantized(codes.to(torch.uint8), scale.transpose(1, 2).contiguous(), zero.transpose(1, 2).contiguous(),
                        g_idx)


def column_weights(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H [B, n, n] (damped, overwritten) -> (G, r): R upper with H = R Rᵀ, r = diag R, and G = R with each
    column j divided by r_j, in H's storage. Column j's GPTQ target is its weight plus Σ_{k<j} (w_k − ŵ_k) G_kj."""
    R = reversed_cholesky_(H)
    r = torch.diagonal(R, dim1=1, dim2=2).clone()
    return R.div_(r[:, None, :]), r


def reference_targets(T: torch.Tensor, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Columns [B, out, k] that start a group (or block), as the paper's update holds them at that point,
    from their partial targets T, original weights W and their block of G [B, k, k].

    The paper's columns ahead are the best continuous weights given the columns already rounded,
    w + Σ_{i<c} err_i U_i; T − W is the same sum through R, which still lacks the coupling among the
    columns ahead. Their leading block of R (= U⁻¹) supplies it: the paper's values are
    W + (T − W) G⁻¹ (G unit upper triangular), one small triangular solve per group."""
    return torch.linalg.solve_triangular(G, T - W, upper=True, left=False, unitriangular=True).add_(W)


@torch.no_grad()
def gptq(W: torch.Tensor, H: torch.Tensor, cfg: IntQuantConfig, overwrite_h: bool = False) -> IntQuantized:
    """GPTQ (Frantar et al. 2022) for a stack of matrices with their own Hessians.

    The paper spreads column c's error through U, the upper Cholesky factor of H⁻¹:
    err_c = (t_c − ŵ_c) / U_cc, t_{>c} −= err_c · U_{c,>c}. Summed over the columns that is
    W − Ŵ = Err · U, and since U⁻¹ = R (H = R Rᵀ, quant/cholesky.py) each target is
    t_j = w_j + Σ_{k<j} (w_k − ŵ_k) R_kj / R_jj: the same recursion (Babai's nearest plane, as Chen et al.
    2025, arXiv:2507.18553, observe) from one factorisation of H, no inverse. err_j = (t_j − ŵ_j) R_jj.

    overwrite_h: factorise H (float32) in its own storage instead of a copy, for callers done with it
    (a 32768-wide Hessian is 4.3 GB). The result's hessian_error is measured on H as given.
    """
    B, rows, cols = W.shape
    W0 = W
    W = W.to(torch.float32, copy=True)  # the targets t
    H = H if overwrite_h and H.dtype == torch.float32 else H.float().clone()
    gs = cols if cfg.group_size == -1 else cfg.group_size
    n_groups = -(-cols // gs)
    idx = torch.arange(cols, device=W.device)

    # columns no calibration token touched: keep H invertible; they are rounded to nearest and pass no
    # error on (GPTQ's reference zeroes them, which breaks inputs the calibration did not cover)
    dead = torch.diagonal(H, dim1=1, dim2=2) == 0
    H.diagonal(dim1=1, dim2=2)[dead] = 1

    if cfg.static_groups:  # parameters from the original weights, by original column
        st = rtn(W, cfg)
    if cfg.act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=1, descending=True)
        W = torch.gather(W, 2, perm[:, None, :].expand(-1, rows, -1))
        H = torch.gather(torch.gather(H, 1, perm[:, :, None].expand(-1, -1, cols)), 2, perm[:, None, :].expand(-1, cols, -1))
    else:
        perm = idx.expand(B, -1)

    damp = cfg.damp * stack_mean(torch.diagonal(H, dim1=1, dim2=2))
    H.diagonal(dim1=1, dim2=2).add_(damp[:, None])
    added = torch.gather(dead.float(), 1, perm) + damp[:, None]  # [B, cols] what the diagonal gained
    G, r = column_weights(H)  # H is overwritten
    # Σ err² over the columns is the objective on the damped H (each OBS step adds exactly its err²);
    # the added diagonal's share Σ added·(ŵ − w)² comes off to give the error on H itself
    objective = torch.zeros(B, dtype=torch.float64, device=W.device)
    added_share = torch.zeros(B, dtype=torch.float64, device=W.device)

    codes = torch.zeros(B, rows, cols, dtype=torch.uint8, device=W.device)
    if cfg.static_groups:
        scales, zeros = st.scales, st.zeros
    else:
        scales = torch.zeros(B, n_groups, rows, device=W.device)
        zeros = torch.zeros(B, n_groups, rows, device=W.device)
    batch = torch.arange(B, device=W.device)
    orig_group = perm // gs  # group of each processed column when groups follow the original order
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        T1 = W[:, :, i1:i2].clone()  # the block's targets
        W1 = torch.gather(W0, 2, perm[:, None, i1:i2].expand(-1, rows, -1)).float()  # its original weights
        D1 = torch.empty_like(T1)  # w − ŵ
        E1 = torch.empty_like(T1)  # t − ŵ
        G1 = G[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if cfg.static_groups:
                g = orig_group[:, col]
                scale, zero = scales[batch, g], zeros[batch, g]
            elif col % gs == 0:  # a new group: parameters from the error-compensated columns ahead
                ahead, orig = T1[:, :, i:i + gs], W1[:, :, i:i + gs]
                if ahead.shape[2] < gs:  # the group runs past this block
                    rest = slice(i2, col + gs)
                    ahead = torch.cat([ahead, W[:, :, rest]], dim=2)
                    orig = torch.cat([orig, torch.gather(W0, 2, perm[:, None, rest].expand(-1, rows, -1)).float()], 2)
                if col:
                    ahead = reference_targets(ahead, orig, G[:, col:col + gs, col:col + gs])
                scale, zero = group_params(ahead, cfg)
                scales[:, col // gs], zeros[:, col // gs] = scale, zero
            t = T1[:, :, i]
            q = quantize_codes(t, scale, zero, cfg.maxq)
            codes[:, :, col] = q
            wq = q.sub_(zero).mul_(scale)
            torch.sub(t, wq, out=E1[:, :, i])
            d = torch.sub(W1[:, :, i], wq, out=D1[:, :, i])
            if i + 1 < i2 - i1:
                T1[:, :, i + 1:].addcmul_(d[:, :, None], G1[:, None, i, i + 1:])
        objective += stack_sum(E1.mul_(r[:, None, i1:i2]).pow_(2))
        added_share += (added[:, i1:i2] * D1.pow(2).sum(1)).sum(1, dtype=torch.float64)
        W[:, :, i2:].baddbmm_(D1, G[:, i1:i2, i2:])

    if cfg.act_order:
        inv = torch.argsort(perm, dim=1)
        codes = torch.gather(codes, 2, inv[:, None, :].expand(-1, rows, -1))
        g_idx = torch.gather(orig_group if cfg.static_groups else (idx // gs).expand(B, -1), 1, inv)
    else:
        g_idx = (idx // gs).expand(B, -1)
    return IntQuantized(codes, scales, zeros, g_idx.to(torch.int32).contiguous(), objective - added_share)


def output_error(W: torch.Tensor, Wq: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Relative ‖WX − ŴX‖ / ‖WX‖ per matrix; X [B, n, in] inputs (rows are samples)."""
    ref = X @ W.float().transpose(1, 2)
    return (X @ Wq.float().transpose(1, 2) - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
