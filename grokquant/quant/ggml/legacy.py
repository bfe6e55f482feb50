"""Legacy 32-element GGML blocks: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (spec quant.md §4, §5, §7).

Bit-exact with ggml-quants.c. Rules that matter for exactness:
- every float op is done in fp32 in the C order (libggml-base is plain SSE code: no FMA contraction, no
  reassociation), so sums over a block run element by element, vectorized across blocks;
- divisors are device tensors, never Python scalars: on CUDA `x / scalar` becomes `x * (1/scalar)`;
- ties keep the first element (the C loops compare with strict `<`), which decides the sign of max|x|
  and of a zero min/max;
- torch's fp32 sqrt is not correctly rounded on AVX2 CPUs, so sqrtf is done in fp64.
With an imatrix, Q4_0/Q5_0 run `make_qx_quants` and Q4_1/Q5_1 `make_qkx3_quants` on weights
qw * sqrt(sigma2 + x^2), sigma2 = mean x^2 over the whole row (so `quantize` computes it per row).
"""

from __future__ import annotations

import numpy as np
import torch

from grokquant.quant.ggml.base import Quantizer, for_each_chunk, fp16_bytes, fp16_from_bytes, register

QK = 32
GROUP_MAX_EPS = 1e-15
# Blocks per pass: small enough that temporaries stay in cache (a fresh 64 MB temporary per op costs
# more in page faults than the arithmetic), large enough to amortize per-op overhead (the qkx3 search
# runs ~3000 ops per pass; make_qx_quants batches 19 trials, so its temporaries are 19x larger).
CHUNK_REF, CHUNK_QKX3, CHUNK_QX = 1 << 15, 1 << 13, 1 << 12


def _chunked(fn, n_out: int, chunk: int, *args: torch.Tensor) -> torch.Tensor:
    """fn(out[s:e], *args[s:e]) over block ranges (each range vectorized); fn fills its slice of out."""
    out = torch.empty(args[0].shape[0], n_out, dtype=torch.uint8, device=args[0].device)
    for_each_chunk(lambda s, e: fn(out[s:e], *(a[s:e] for a in args)), out.shape[0], chunk, out.device)
    return out


def _const(v, like: torch.Tensor) -> torch.Tensor:
    """A C float constant (rounded to fp32) on like's device."""
    return torch.tensor(np.float32(v), dtype=torch.float32, device=like.device)


def _seqsum(terms: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 left to right from 0.0f, as `s += t[i]` in C (torch.sum reorders)."""
    acc = torch.zeros_like(terms[0])
    for t in terms:
        acc += t
    return acc


def _first_of(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, idx).squeeze(-1)


def _signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max) over the last dim: the first element with the largest |x|, sign kept; +0.0 if all zero.
    amax/amin are much faster than argmax; only blocks holding both +a and -a need the first index."""
    hi, lo = x.amax(dim=-1), x.amin(dim=-1)
    amax = torch.maximum(hi, -lo)
    mx = torch.where(hi >= -lo, hi, lo)
    tie = ((hi == -lo) & (hi > 0)).nonzero().squeeze(1)
    if tie.numel():
        xt = x[tie]
        mx[tie] = _first_of(xt, xt.abs().argmax(dim=-1, keepdim=True))  # argmax: first index on ties
    return amax, torch.where(amax > 0, mx, torch.zeros_like(mx))  # C starts from max = +0.0


def _first_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block min and max; the C keeps the first of equal values, which only matters for the sign of 0."""
    mn, mx = x.amin(dim=-1), x.amax(dim=-1)
    z = ((mn == 0) | (mx == 0)).nonzero().squeeze(1)
    if z.numel():
        xz = x[z]
        mn[z] = _first_of(xz, xz.argmin(dim=-1, keepdim=True))
        mx[z] = _first_of(xz, xz.argmax(dim=-1, keepdim=True))
    return mn, mx


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """id = d ? 1.0f/d : 0.0f."""
    return torch.where(d != 0, torch.ones_like(d) / d, torch.zeros_like(d))


def _nearest_int(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """ggml nearest_int clamped to [lo, hi], as float. The C adds 1.5*2^23 and reads the low mantissa bits:
    round half to even for |v| < 2^22 (every finite product here is within nmax + 1), NaN -> 0 and
    +-inf -> -2^22 (a tiny block range makes iscale infinite; torch.round would keep +-inf)."""
    return torch.round(v).nan_to_num_(nan=0.0, posinf=lo, neginf=lo).clamp_(lo, hi)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf, half away from zero (torch.round is half to even): trunc(v + copysign(0.5 - ulp/4, v)).
    With the largest float below 0.5 a tie still carries up and 0.49999997 does not (floor(v + 0.5) fails)."""
    return (v + torch.copysign(_const(np.nextafter(np.float32(0.5), np.float32(0)), v), v)).trunc_()


def row_sigma2(rows: torch.Tensor) -> torch.Tensor:
    """sigma2 = (sum_j x_j*x_j) / n per row, summed sequentially like `quantize_row_q4_0_impl`."""
    n = rows.shape[1]
    sq = (rows * rows).t().contiguous()
    return _seqsum(sq) / _const(n, rows)


# ---- imatrix scale searches, on [32, blocks] (element-major so each step of a sum is contiguous) --------

def make_qx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml make_qx_quants(32, nmax, x, L, rmse_type=1, qw=w): symmetric codes 0..2nmax-1 and the scale.
    The 19 trial scales do not depend on each other, so their sums are computed in one batch."""
    amax, mx = _signed_absmax(x.t())
    steps = np.arange(-9, 10, dtype=np.float32)
    nums = -(np.float32(nmax) + np.float32(0.1) * steps)  # -(nmax + 0.1f*is), fp32 like the C
    nums[9] = -nmax  # is = 0 slot: the first trial, iscale = -nmax/max
    iscale = torch.from_numpy(nums).to(x.device)[:, None] / mx  # [19, blocks]
    l = _nearest_int(iscale * x[:, None], -nmax, nmax - 1)  # [32, 19, blocks]
    # filled in place: allocating temporaries of this size costs more than the arithmetic
    terms = torch.empty((x.shape[0], 2, *l.shape[1:]), device=x.device)
    torch.mul((w * x)[:, None], l, out=terms[:, 0])  # w*x[i]*l
    torch.mul(w[:, None], l, out=terms[:, 1]).mul_(l)  # w*l*l
    sumlx, suml2 = _seqsum(terms).unbind(0)
    pick = torch.full_like(mx, 9, dtype=torch.long)
    scale = torch.where(suml2[9] != 0, sumlx[9] / suml2[9], torch.zeros_like(mx))
    best = scale * sumlx[9]
    for k in [*range(0, 9), *range(10, 19)]:  # is = -9..-1, 1..9, strict improvement keeps the earlier
        better = (suml2[k] > 0) & (sumlx[k] * sumlx[k] > best * suml2[k])
        pick = torch.where(better, k, pick)
        scale = torch.where(better, sumlx[k] / suml2[k], scale)
        best = torch.where(better, scale * sumlx[k], best)
    L = l.gather(1, pick.expand(l.shape[0], 1, -1)).squeeze(1)
    zero = amax < _const(GROUP_MAX_EPS, x)  # all-zero block: codes 0 (not nmax) and scale 0
    codes = torch.where(zero, torch.zeros_like(L), L + nmax)
    return codes, torch.where(zero, torch.zeros_like(scale), scale)


def make_qkx3_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin=-0.9, rdelta=0.05, nstep=36):
    """ggml make_qkx3_quants(32, nmax, x, w, rmin, rdelta, nstep, use_mad=false): codes 0..nmax, scale
    and min (x ~ scale*l + min, min <= 0)."""
    mn, mx = x[0].clone(), x[0].clone()
    sum_w, sum_x = w[0].clone(), w[0] * x[0]
    for i in range(1, x.shape[0]):
        mn = torch.where(x[i] < mn, x[i], mn)
        mx = torch.where(x[i] > mx, x[i], mx)
        sum_w += w[i]
        sum_x += w[i] * x[i]
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat, mn0 = mx <= mn, mn  # constant non-negative block: codes 0, scale 0, min kept

    def codes(num, mn):  # nearest_int(iscale*(x - min)) with iscale = num / (max - min)
        return _nearest_int(_const(num, x) / (mx - mn) * (x - mn), 0, nmax)

    def wsse(scale, m, l):  # sum w * (scale*l + min - x)^2, in C order
        diff = scale * l
        diff += m
        diff -= x
        return _seqsum(diff.mul_(diff).mul_(w))

    scale = _const(1, x) / (_const(nmax, x) / (mx - mn))
    L = codes(nmax, mn)
    terms = torch.empty((x.shape[0], 3, x.shape[1]), device=x.device)
    best = wsse(scale, mn, L)
    for step in range(nstep + 1):
        # as in C, later steps measure from the best min found so far, not from the block min
        l = codes(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax), mn)
        wl = torch.mul(w, l, out=terms[:, 0])
        torch.mul(wl, l, out=terms[:, 1])
        torch.mul(wl, x, out=terms[:, 2])
        sum_l, sum_l2, sum_xl = _seqsum(terms).unbind(0)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0  # the fit wants a positive offset: pin min at 0, refit the scale alone
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        mad = wsse(this_scale, this_min, l)
        better = (D > 0) & (mad < best)
        L, best = torch.where(better, l, L), torch.where(better, mad, best)
        scale, mn = torch.where(better, this_scale, scale), torch.where(better, this_min, mn)
    zero = torch.zeros_like(scale)
    L = torch.where(flat, torch.zeros_like(L), L)
    return L, torch.where(flat, zero, scale), torch.where(flat, mn0, mn)


# ---- block types ----------------------------------------------------------------------------------------

def _bit_weights(device) -> torch.Tensor:
    """[32, 4] matrix taking 32 bits (0/1) to 4 bytes, bit j -> byte j//8 weight 2^(j%8) (exact in fp32)."""
    j = torch.arange(QK)
    w = torch.zeros(QK, 4)
    w[j, j // 8] = (2.0 ** (j % 8)).float()
    return w.to(device)


class _Legacy(Quantizer):
    """Q4_0/Q4_1/Q5_0/Q5_1: d (and m) as fp16, low nibbles of elements j and j+16 in qs[j], bit 4 in qh."""

    bits: int = 4
    has_min: bool = False

    def quantize(self, x, imatrix=None):
        """As Quantizer.quantize, plus the row-global sigma2 the imatrix search needs."""
        if imatrix is None:
            return super().quantize(x)
        x = x.float().contiguous()
        rows, n = x.shape
        if n % QK:
            raise ValueError(f"{self.name}: row length {n} is not a multiple of {QK}")
        qw = imatrix.float().to(x.device).reshape(1, n).expand(rows, n).reshape(-1, QK)
        sigma2 = row_sigma2(x).repeat_interleave(n // QK)
        return self.quantize_blocks(x.view(-1, QK), qw, sigma2).view(rows, -1)

    def quantize_blocks(self, x, qw, sigma2=None):
        """sigma2: per-block copy of the row's mean x^2; if missing, each block is taken as its own row."""
        nb = self.type.block_bytes
        if qw is None:
            return _chunked(lambda out, xc: self._pack(out, *self._reference(xc)), nb, CHUNK_REF, x)
        if sigma2 is None:
            sigma2 = row_sigma2(x)
        chunk = CHUNK_QKX3 if self.has_min else CHUNK_QX
        return _chunked(lambda out, *a: self._pack(out, *self._weighted(*a)), nb, chunk, x, qw, sigma2)

    def _reference(self, x):
        """quantize_row_qX_Y_ref: truncate x*id + offset (all args >= 0, so trunc = floor); id from fp32 d."""
        top = (1 << self.bits) - 1
        if self.has_min:
            mn, mx = _first_min_max(x)
            d = (mx - mn) / _const(top, x)
            q = (x - mn[:, None]) * _inverse(d)[:, None] + _const(0.5, x)
            return d, mn, q.to(torch.uint8).clamp_(max=top)  # float -> uint8 truncates
        half = 1 << (self.bits - 1)
        d = _signed_absmax(x)[1] / _const(-half, x)
        q = x * _inverse(d)[:, None] + _const(half + 0.5, x)
        return d, None, q.to(torch.uint8).clamp_(max=top)

    def _weighted(self, x, qw, sigma2):
        """quantize_row_qX_Y_impl: weights qw*sqrt(sigma2 + x^2), then the type's scale search."""
        # torch's fp32 sqrt is not always correctly rounded (vectorized approximation); an fp64 sqrt
        # rounded once to fp32 equals sqrtf exactly (double rounding is innocuous for sqrt)
        w = qw * torch.sqrt((sigma2[:, None] + x * x).double()).float()
        xt, wt = x.t().contiguous(), w.t().contiguous()
        if self.has_min:
            codes, d, mn = make_qkx3_quants(xt, wt, (1 << self.bits) - 1)
            return d, mn, codes.t()  # the C stores m = -the_min = min
        codes, d = make_qx_quants(xt, wt, 1 << (self.bits - 1))
        return d, None, codes.t()

    def _pack(self, out, d, m, codes):
        """Write blocks into out [n, block_bytes]: d, (m), (qh), qs."""
        codes = codes.to(torch.uint8)
        out[:, 0:2] = fp16_bytes(d[:, None])
        if self.has_min:
            out[:, 2:4] = fp16_bytes(m[:, None])
        if self.bits == 5:  # qh: little-endian u32, bit j = bit 4 of element j
            out[:, -20:-16] = ((codes >> 4).float() @ _bit_weights(codes.device)).to(torch.uint8)
            codes = codes & 15
        out[:, -16:] = codes[:, :16] | (codes[:, 16:] << 4)

    def dequantize_blocks(self, b):
        b = b.contiguous()
        d = fp16_from_bytes(b[:, 0:2])
        pos = 2
        if self.has_min:
            m = fp16_from_bytes(b[:, 2:4])
            pos = 4
        qs = b[:, -16:]
        q = torch.cat([qs & 15, qs >> 4], dim=1)
        if self.bits == 5:
            shifts = torch.arange(8, device=b.device, dtype=torch.uint8)
            hbit = (b[:, pos:pos + 4, None] >> shifts) & 1  # bit j of the LE u32 is element j
            q = q | (hbit.reshape(-1, QK) << 4)
        if self.has_min:
            return d * q.float() + m
        return d * (q.float() - (1 << (self.bits - 1)))


@register
class Q4_0(_Legacy):
    name, bits, has_min = "Q4_0", 4, False


@register
class Q4_1(_Legacy):
    name, bits, has_min = "Q4_1", 4, True


@register
class Q5_0(_Legacy):
    name, bits, has_min = "Q5_0", 5, False


@register
class Q5_1(_Legacy):
    name, bits, has_min = "Q5_1", 5, True


@register
class Q8_0(Quantizer):
    """d = max|x|/127 as fp16, 32 int8 codes roundf(x/d) (id from the fp32 d). The imatrix is unused."""

    name = "Q8_0"

    def quantize_blocks(self, x, qw=None):
        return _chunked(self._quantize, 34, CHUNK_REF, x)

    @staticmethod
    def _quantize(out, x):
        d = x.abs().amax(dim=1) / _const(127, x)
        out[:, 0:2] = fp16_bytes(d[:, None])
        out[:, 2:] = _roundf(x * _inverse(d)[:, None]).to(torch.int8).view(torch.uint8)

    def dequantize_blocks(self, b):
        b = b.contiguous()
        return fp16_from_bytes(b[:, 0:2]) * b[:, 2:].view(torch.int8).float()
