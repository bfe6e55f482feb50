"""GGML IQ4_NL, IQ4_XS, Q2_K and Q3_K: bit-exact, vectorized ports of ggml-quants.c (spec quant.md §3-§7).

Every search runs on all (sub-)blocks at once. Tensors inside the searches are element-major, [n, S]:
row i holds element i of every one of the S sub-blocks, so the C code's sequential float sums become a
short Python loop over n contiguous rows (`_seqsum`), which reproduces ggml's float32 rounding exactly.
Operand order of every product and sum follows the C source; ggml is built without FMA contraction.
Scalar constants are float32 values, and `c / tensor` is spelled `_div(c, tensor)` because torch computes
`python_scalar / tensor` as `tensor.reciprocal() * scalar`, which rounds differently (CUDA does the same for
`tensor / scalar`, hence `_over`). Bit-exactness is verified on CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from grokquant.quant.ggml.base import Quantizer, for_each_chunk, fp16_bytes, fp16_from_bytes, fp16_round, register

EPS = float(np.float32(1e-15))  # GROUP_MAX_EPS
KVALUES = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                       dtype=torch.float32)
# best_index_int8 picks the lower entry iff (x - lo) < (hi - x) in float32. Near every midpoint both
# differences are exact (they stay within x's binade), so this equals "x < midpoint", a tie going to the
# upper entry. All midpoints are halves, so the index depends only on floor(2x) (exact): two 513-entry
# tables indexed by clamp(floor(2x), -256, 256) give code and value, several times faster than bucketize.
_HALVES = torch.arange(-256, 257, dtype=torch.float32) / 2
IQ4_INDEX = torch.bucketize(_HALVES, (KVALUES[:-1] + KVALUES[1:]) / 2, right=True).to(torch.uint8)
IQ4_VALUE = KVALUES[IQ4_INDEX.long()]


def _f32(v: float) -> float:
    """The float32 value nearest v, as a Python float (what a C `float` constant holds)."""
    return float(np.float32(v))


def _div(c: float, t: torch.Tensor) -> torch.Tensor:
    """float32 c / t, correctly rounded (unlike torch's `c / t`)."""
    return torch.full_like(t, c) / t


def _over(t: torch.Tensor, c: float) -> torch.Tensor:
    """float32 t / c, correctly rounded on every device."""
    return t / torch.full_like(t, c)


def _recip_or_zero(t: torch.Tensor) -> torch.Tensor:
    """C's `t ? 1/t : 0`."""
    return torch.where(t != 0, _div(1.0, t), 0.0)


def nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: add 1.5*2^23 and read the mantissa (half to even; same garbage when |f| >= 2^22)."""
    return ((f + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000


def _seqsum(t: torch.Tensor, start_with_first: bool = False) -> torch.Tensor:
    """t[0] + t[1] + ... summed in order along dim 0, in float32 (C: `float s = 0; for (...) s += t[i];`)."""
    s = t[0].clone() if start_with_first else t[0] + 0.0
    for i in range(1, t.shape[0]):
        s.add_(t[i])
    return s


def _signed_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x|, the first element reaching it, sign kept) along dim 0; C: `if (ax > amax) {...}`."""
    a = x.abs()
    idx = a.argmax(0, keepdim=True)  # first occurrence, as the strict '>' in C
    return a.gather(0, idx)[0], x.gather(0, idx)[0]


def _elements(x: torch.Tensor, n: int) -> torch.Tensor:
    """[blocks, k*n] -> element-major [n, blocks*k] (sub-block s = block*k + j)."""
    return x.reshape(-1, n).t().contiguous()


def _blocks(t: torch.Tensor, nb: int) -> torch.Tensor:
    """Inverse of `_elements`: [n, nb*k] -> [nb, k*n]."""
    return t.t().reshape(nb, -1)


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (torch's vectorized float32 sqrt is not; float64 then round is)."""
    return torch.sqrt(t.double()).float()


def _sumsq(x: torch.Tensor) -> torch.Tensor:
    """Sequential sum of x^2 over each [nb, block] row."""
    return _seqsum((x * x).t().contiguous())


def _imatrix_weights(x: torch.Tensor, qw: torch.Tensor, n_sub: int, sigma2: torch.Tensor) -> torch.Tensor:
    """qw * sqrt(sigma2 + x^2) for [nb, block] rows (sigma2 per row), element-major [n_sub, S]."""
    xe = _elements(x, n_sub)
    sig = sigma2.repeat_interleave(x.shape[1] // n_sub)
    return _elements(qw, n_sub) * _sqrt(sig + xe * xe)


class _Chunked(Quantizer):
    """Runs `quantize_chunk` on slices of ~2^18 elements: the many passes of a search then stay in cache
    (whole-tensor operations on a 4096x4096 matrix ran about 2x slower)."""

    chunk_elements = 1 << 18

    def quantize_blocks(self, x, qw):
        if not len(x):
            return torch.empty(0, self.type.block_bytes, dtype=torch.uint8, device=x.device)
        out = torch.empty(x.shape[0], self.type.block_bytes, dtype=torch.uint8, device=x.device)

        def run(start, stop):
            out[start:stop] = self.quantize_chunk(x[start:stop], None if qw is None else qw[start:stop])

        for_each_chunk(run, x.shape[0], max(1, self.chunk_elements // x.shape[1]), x.device)
        return out

    def quantize_chunk(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


# ---- IQ4: non-linear 4-bit codebook --------------------------------------------------------------

def _iq4_slot(al: torch.Tensor) -> torch.Tensor:
    """Table row clamp(floor(2*al), -256, 256) + 256 per element, computed in place in al (NaN, from 0*inf
    in all-zero groups, -> row 0)."""
    return al.mul_(2).floor_().nan_to_num_(-256.0).clamp_(-256, 256).add_(256).to(torch.int32).view(-1)


def iq4_index(x: torch.Tensor) -> torch.Tensor:
    """best_index_int8(16, kvalues_iq4nl, x) for every element (uint8 codes)."""
    return IQ4_INDEX.to(x.device).index_select(0, _iq4_slot(x.clone())).view(x.shape)


def _iq4_value(al: torch.Tensor) -> torch.Tensor:
    """kvalues_iq4nl[best_index_int8(al)] as float32; overwrites al."""
    return IQ4_VALUE.to(al.device).index_select(0, _iq4_slot(al)).view(al.shape)


def _iq4_scales(x: torch.Tensor, w: torch.Tensor, ntry: int = 7) -> torch.Tensor:
    """Per-sub-block scale of quantize_row_iq4_nl_impl's search; x, w element-major [32, S]."""
    amax, mx = _signed_max(x)

    def fit(idv):
        q = _iq4_value(idv * x)
        wq = w * q
        return _seqsum(wq * x), _seqsum(wq * q)

    sqx, sq2 = fit(_div(1.0, _over(-mx, -127.0)))
    d = torch.where(sq2 > 0, sqx / sq2, 0.0)
    best = d * sqx
    for itry in range(-ntry, ntry + 1):
        sqx, sq2 = fit(_div(float(itry - 127), mx))
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = torch.where(better, sqx / sq2, d)
        best = torch.where(better, d * sqx, best)
    return torch.where(amax < EPS, 0.0, d)


def _iq4_weights(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """x^2 without imatrix, else qw * sqrt(sigma2 + x^2) with sigma2 = 2*sum(x^2)/block."""
    if qw is None:
        xe = _elements(x, 32)
        return xe * xe
    return _imatrix_weights(x, qw, 32, _sumsq(x) * _f32(2 / x.shape[1]))


def _nibbles(L: torch.Tensor) -> torch.Tensor:
    """Codes [S, 32] -> bytes [S, 16]: lo nibble element j, hi nibble element j + 16."""
    L = L.to(torch.uint8)
    return L[:, :16] | (L[:, 16:] << 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of `_nibbles`: [S, 16] bytes -> [S, 32] codes (int64, for indexing)."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1).long()


@register
class IQ4_NL(_Chunked):
    """32-blocks: fp16 d, 16 codebook nibbles; y = d * kvalues[q]."""

    name = "IQ4_NL"

    def quantize_chunk(self, x, qw):
        xe = _elements(x, 32)
        d = _iq4_scales(xe, _iq4_weights(x, qw))
        L = iq4_index(_recip_or_zero(d) * xe)
        return torch.cat([fp16_bytes(d[:, None]), _nibbles(L.t())], dim=1)

    def dequantize_blocks(self, b):
        return fp16_from_bytes(b[:, :2]) * KVALUES.to(b.device)[_unnibble(b[:, 2:])]


@register
class IQ4_XS(_Chunked):
    """256-blocks of 8 x 32: fp16 d, 6-bit signed sub-scales (scales_h u16 + scales_l[4]), IQ4 nibbles."""

    name = "IQ4_XS"

    def quantize_chunk(self, x, qw):
        nb = x.shape[0]
        xe = _elements(x, 32)
        s = _iq4_scales(xe, _iq4_weights(x, qw)).view(nb, 8)
        amax, ms = _signed_max(s.t())
        d = -torch.where(amax > 0, ms, 0.0) / 32  # all-zero block: d = -0.0, as in C
        l = nearest_int(_recip_or_zero(d)[:, None] * s).clamp(-32, 31)
        idl = _recip_or_zero(d[:, None] * l.float())  # codes come from the fp32 d, not the fp16 copy
        L = iq4_index(idl.view(1, -1) * xe)
        u = (l + 32).to(torch.uint8)
        shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=x.device)
        h = ((u >> 4).int() << shifts).sum(1, dtype=torch.int32)  # scales_h: bits 2ib..2ib+1
        sl = (u[:, 0::2] & 0xF) | ((u[:, 1::2] & 0xF) << 4)
        sh = torch.stack([h & 0xFF, h >> 8], dim=1).to(torch.uint8)
        return torch.cat([fp16_bytes(d[:, None]), sh, sl, _nibbles(L.t()).reshape(nb, 128)], dim=1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        sh = b[:, 2].int() | (b[:, 3].int() << 8)
        lo = torch.stack([b[:, 4:8] & 0xF, b[:, 4:8] >> 4], dim=2).view(nb, 8).int()
        hi = (sh[:, None] >> torch.arange(0, 16, 2, dtype=torch.int32, device=b.device)) & 3
        dl = fp16_from_bytes(b[:, :2]) * ((lo | (hi << 4)) - 32).float()
        q = KVALUES.to(b.device)[_unnibble(b[:, 8:].reshape(nb * 8, 16))].view(nb, 8, 32)
        return (dl[:, :, None] * q).view(nb, 256)


# ---- K-quant scale searches (element-major [n, S]) ----------------------------------------------

def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric fit (rmse_type 1, weights w): codes L in 0..2*nmax-1 (0 for an all-zero group), scale."""
    amax, mx = _signed_max(x)
    wx = w * x

    def fit(iscale):
        l = nearest_int(iscale * x).clamp_(-nmax, nmax - 1).float()
        return l, _seqsum(wx * l), _seqsum(w * l * l)

    l, slx, sl2 = fit(_div(float(-nmax), mx))
    scale = torch.where(sl2 != 0, slx / sl2, 0.0)
    best = scale * slx
    for i in range(-9, 10):
        if i:
            lt, slx, sl2 = fit(_div(-_f32(nmax + _f32(_f32(0.1) * i)), mx))
            better = (sl2 > 0) & (slx * slx > best * sl2)
            l = torch.where(better, lt, l)
            scale = torch.where(better, slx / sl2, scale)
            best = torch.where(better, scale * slx, best)
    zero = amax < EPS
    return torch.where(zero, 0, l.int() + nmax), torch.where(zero, 0.0, scale)


def _descend(x, w, l, slx, sl2, lo, hi, qp):
    """Up to 5 coordinate-descent passes of make_q3_quants (qp=False) / make_qp_quants (qp=True): per element,
    in order, move its code to nearest_int(x*sl2/slx) if that raises slx^2/sl2. Updates l in place."""
    wx = w * x
    act = torch.arange(x.shape[1], device=x.device)  # a group whose pass changed nothing would repeat it: drop it
    for _ in range(5):
        xa, wa, wxa, la, s_lx, s_l2 = x[:, act], w[:, act], wx[:, act], l[:, act], slx[act], sl2[act]
        changed = torch.zeros_like(s_lx, dtype=torch.bool)
        for i in range(x.shape[0]):  # sequential: an accepted change updates the sums used next
            li = la[i]
            s1 = s_lx - wxa[i] * li
            s2 = s_l2 - wa[i] * li * li
            new = nearest_int(xa[i] * s2 / s1).clamp_(lo, hi).float()
            s1n = s1 + wxa[i] * new
            s2n = s2 + wa[i] * new * new
            ok = (s1 > 0) & (new != li) & (s2 > 0 if qp else s2n > 0)
            ok &= s1n * s1n * s_l2 > s_lx * s_lx * s2n
            la[i] = torch.where(ok, (new.int() & 0xFF).float() if qp else new, li)  # qp stores uint8
            s_lx = torch.where(ok, s1n, s_lx)
            s_l2 = torch.where(ok, s2n, s_l2)
            changed |= ok
        l[:, act], slx[act], sl2[act] = la, s_lx, s_l2
        act = act[changed]
        if not len(act):
            break
    return slx, sl2


def make_q3_quants(x: torch.Tensor, nmax: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K reference sub-block fit: weights x^2, then coordinate descent. Returns codes (0..7) and scale."""
    amax, mx = _signed_max(x)
    w = x * x
    l = nearest_int(_div(float(-nmax), mx) * x).clamp_(-nmax, nmax - 1).float()
    slx, sl2 = _descend(x, w, l, _seqsum(w * x * l), _seqsum(w * l * l), -nmax, nmax - 1, qp=False)
    zero = amax < EPS
    return torch.where(zero, 0, l.int() + nmax), torch.where(zero | ~(sl2 > 0), 0.0, slx / sl2)


def make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad, le_degenerate):
    """Asymmetric fit x ~ scale*L - the_min: make_qkx2_quants, or make_qkx3_quants with le_degenerate.

    Returns codes L (float, 0..nmax), scale and the_min (>= 0)."""
    mn = x.min(0).values
    mn = mn0 = torch.where(mn > 0, 0.0, mn)
    mx = x.max(0).values
    degenerate = (mx <= mn) if le_degenerate else (mx == mn)
    sum_w = _seqsum(w, start_with_first=True)
    sum_x = _seqsum(w * x, start_with_first=True)

    def error(scale, m, lf):
        diff = scale * lf + m - x
        return _seqsum(w * (diff.abs() if use_mad else diff * diff))

    iscale = _div(float(nmax), mx - mn)
    L = nearest_int(iscale * (x - mn)).clamp_(0, nmax).float()
    scale = _div(1.0, iscale)
    best = error(scale, mn, L)
    for i in range(nstep + 1):
        c = _f32(_f32(_f32(rmin) + _f32(_f32(rdelta) * i)) + nmax)
        # C keeps using `min`, which an accepted step has replaced by the fitted this_min
        la = nearest_int(_div(c, mx - mn) * (x - mn)).clamp_(0, nmax).float()
        wl = w * la
        sl, sl2, sxl = _seqsum(wl), _seqsum(wl * la), _seqsum(wl * x)
        D = sum_w * sl2 - sl * sl
        ts = (sum_w * sxl - sum_x * sl) / D
        tm = (sl2 * sum_x - sl * sxl) / D
        pos = tm > 0
        tm = torch.where(pos, 0.0, tm)
        ts = torch.where(pos, sxl / sl2, ts)
        err = error(ts, tm, la)
        better = (D > 0) & (err < best)
        best = torch.where(better, err, best)
        L = torch.where(better, la, L)
        scale = torch.where(better, ts, scale)
        mn = torch.where(better, tm, mn)
    the_min = -torch.where(degenerate, mn0, mn)
    return torch.where(degenerate, 0.0, L), torch.where(degenerate, 0.0, scale), the_min


def make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (0..nmax) for non-negative sub-scales/mins and the super-block scale."""
    mx = x.max(0).values
    zero = mx < EPS  # C: max = MAX(max, x[i]) from 0; a non-positive group is all zero

    def codes(iscale):  # clamped above only: a negative input gives a negative code
        return nearest_int(iscale * x).clamp_(max=nmax)

    def mse(iscale, l):
        diff = x - _div(1.0, iscale) * l.float()
        return _seqsum(w * diff * diff)

    iscale = _div(float(nmax), mx)
    best = mse(iscale, nearest_int(iscale * x) & 0xFF)  # first pass: uint8 codes, no clamp
    for i in range(-4, 5):
        if i:
            its = _div(_f32(_f32(_f32(0.1) * i) + nmax), mx)
            err = mse(its, codes(its))
            better = err < best
            best = torch.where(better, err, best)
            iscale = torch.where(better, its, iscale)
    l = codes(iscale).float()
    slx, sl2 = _seqsum(w * x * l), _seqsum(w * l * l)  # C sums the int codes but stores them as uint8
    L = (l.int() & 0xFF).float()
    slx, sl2 = _descend(x, w, L, slx, sl2, None, nmax, qp=True)
    return torch.where(zero, 0, L.int()), torch.where(zero | ~(sl2 > 0), 0.0, slx / sl2)


# ---- Q2_K / Q3_K ----------------------------------------------------------------------------------

def _pack2(L: torch.Tensor) -> torch.Tensor:
    """2-bit codes [nb, 256] -> qs [nb, 64]: byte 32h+l holds elements 128h+l, +32, +64, +96."""
    L = L.to(torch.uint8).view(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _unpack2(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack2`: [nb, 64] -> [nb, 256] (uint8)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).view(1, 1, 4, 1)
    return ((qs.view(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def _requantize(x, L, d, lo, hi, offset=0.0, shift=0):
    """C: `if (!d) continue; L = clamp(nearest_int((x + offset)/d), lo, hi) + shift` with the stored scale d."""
    new = nearest_int((x + offset) / d).clamp_(lo, hi).float() + shift
    return torch.where(d != 0, new, L.float())


@register
class Q2_K(_Chunked):
    """16 x 16 sub-blocks, 4-bit scale and min codes; y = d*sc*q - dmin*m, q in 0..3."""

    name = "Q2_K"

    def quantize_chunk(self, x, qw):
        nb = x.shape[0]
        xe = _elements(x, 16)
        if qw is None:  # quantize_row_q2_K_ref
            L, scales, mins = make_qkx_quants(xe, xe.abs(), 3, -0.5, 0.1, 15, True, False)
            scales, mins = scales.view(nb, 16), mins.view(nb, 16)
            ms, mm = scales.max(1).values, mins.max(1).values
            ls = torch.where(ms[:, None] > 0, nearest_int(_div(15.0, ms)[:, None] * scales), 0)
            lm = torch.where(mm[:, None] > 0, nearest_int(_div(15.0, mm)[:, None] * mins), 0)
            d, dmin = torch.where(ms > 0, _over(ms, 15.0), 0.0), torch.where(mm > 0, _over(mm, 15.0), 0.0)
        else:  # quantize_row_q2_K_impl
            w = _imatrix_weights(x, qw, 16, _sumsq(x) / 256)
            L, scales, mins = make_qkx_quants(xe, w, 3, -0.9, 0.05, 36, False, True)
            sw = _elements(_seqsum(w).view(nb, 16), 16)
            ls, d = make_qp_quants(_elements(scales.view(nb, 16), 16), 15, sw)
            lm, dmin = make_qp_quants(_elements(mins.view(nb, 16), 16), 15, sw)
            ls, lm = _blocks(ls, nb), _blocks(lm, nb)
        sc = (ls | (lm << 4)) & 0xFF  # C: uint8 scales[j] = l, then |= l << 4
        d, dmin = fp16_round(d)[:, None], fp16_round(dmin)[:, None]
        dl = (d * (sc & 0xF).float()).reshape(1, -1)
        L = _requantize(xe, L, dl, 0, 3, offset=(dmin * (sc >> 4).float()).reshape(1, -1))
        return torch.cat([sc.to(torch.uint8), _pack2(_blocks(L, nb)), fp16_bytes(d), fp16_bytes(dmin)], dim=1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        sc = b[:, :16]
        d, dmin = fp16_from_bytes(b[:, 80:82]), fp16_from_bytes(b[:, 82:84])
        dl = (d * (sc & 0xF).float()).view(nb, 16, 1)
        ml = (dmin * (sc >> 4).float()).view(nb, 16, 1)
        return (dl * _unpack2(b[:, 16:80]).float().view(nb, 16, 16) - ml).view(nb, 256)


def _pack_q3_scales(c: torch.Tensor) -> torch.Tensor:
    """Six-bit codes [nb, 16] -> 12 bytes: low nibbles in 0..7 (j >= 8 high half), top 2 bits in 8..11."""
    c = c.to(torch.uint8)
    hi = (c >> 4).view(-1, 4, 4)  # [nb, j // 4, j % 4]
    top = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return torch.cat([(c[:, :8] & 0xF) | ((c[:, 8:] & 0xF) << 4), top], dim=1)


def _unpack_q3_scales(s: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack_q3_scales`: [nb, 12] -> codes [nb, 16] (int32, 0..63)."""
    lo = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1).int()
    shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=s.device)
    hi = (s[:, 8:12, None].int() >> shifts) & 3  # [nb, j % 4, j // 4]
    return lo | (hi.transpose(1, 2).reshape(-1, 16) << 4)


@register
class Q3_K(_Chunked):
    """16 x 16 sub-blocks, signed 6-bit scale codes; y = d*(c - 32)*q, q in -4..3 (2 low bits + hmask bit)."""

    name = "Q3_K"

    def quantize_chunk(self, x, qw):
        nb = x.shape[0]
        xe = _elements(x, 16)
        if qw is None:  # quantize_row_q3_K_ref
            L, scales = make_q3_quants(xe)
            scales = scales.view(nb, 16)
            amax, ms = _signed_max(scales.t())
            ms = torch.where(amax > 0, ms, 0.0)
            iscale = _div(-32.0, ms)
            c = torch.where(ms[:, None] != 0, nearest_int(iscale[:, None] * scales).clamp_(-32, 31) + 32, 0)
            d = torch.where(ms != 0, _div(1.0, iscale), 0.0)
        else:  # quantize_row_q3_K_impl
            w = _imatrix_weights(x, qw, 16, 2 * _sumsq(x) / 256)
            L, scales = make_qx_quants(xe, 4, w)
            sw = _elements(_seqsum(w).view(nb, 16), 16)
            c, d = make_qx_quants(_elements(scales.view(nb, 16), 16), 32, sw)
            c = _blocks(c, nb)
        d = fp16_round(d)[:, None]
        L = _requantize(xe, L, (d * (c - 32).float()).reshape(1, -1), -4, 3, shift=4)
        L = _blocks(L, nb).to(torch.uint8)
        high = L > 3
        bits = torch.arange(8, dtype=torch.uint8, device=x.device).view(1, 8, 1)
        hmask = (high.view(nb, 8, 32).to(torch.uint8) << bits).sum(1)  # element 32b + m -> hmask[m] bit b
        return torch.cat([hmask.to(torch.uint8), _pack2(torch.where(high, L - 4, L)), _pack_q3_scales(c),
                          fp16_bytes(d)], dim=1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        dl = (fp16_from_bytes(b[:, 108:110]) * (_unpack_q3_scales(b[:, 96:108]) - 32).float()).view(nb, 16, 1)
        hbit = (b[:, :32].view(nb, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)) & 1
        q = _unpack2(b[:, 32:96]).int() + (hbit.reshape(nb, 256).int() << 2) - 4
        return (dl * q.float().view(nb, 16, 16)).view(nb, 256)
