"""GGML K-quants Q4_K, Q5_K, Q6_K: bit-exact, vectorized ports of ggml-quants.c (spec quant.md §4-§7).

Without importance weights each type follows `quantize_row_q*_K_ref`, with them `quantize_row_q*_K_impl`.
How exactness is kept:
- libggml-base is plain SSE code (no FMA contraction, no reassociation), so every float op here is one
  fp32 torch op in the C order, and sums over a (sub-)block run element by element (`_seqsum`), vectorized
  across sub-blocks. Data is element-major ([elements, ..., sub-blocks]) so each step is contiguous.
- `make_qkx2/3_quants` is sequential over its candidate scales (an accepted fit moves `min`, which shifts
  later candidates); `make_qx_quants` candidates are independent, so they are evaluated all at once and the
  C running comparison is replayed on the [candidates, sub-blocks] sums.
- Divisors are tensors, never Python scalars (on CUDA `x / scalar` becomes a multiply by the reciprocal);
  sqrt goes through float64 (torch's fp32 sqrt is not always correctly rounded, C sqrtf is).
- Codes go through C's integer types: uint8 / int8 wrap-around is reproduced with masks; nearest_int is
  emulated bit for bit where its argument can leave the int range (tiny fp16 scales).
Speed: super-blocks are processed in chunks on torch.get_num_threads() Python threads, each running
serial torch ops on cache-sized, reused scratch buffers (see `ggml.for_each_chunk`, `Scratch`). The
make_qkx search, most of the work, runs as TorchScript, without the GIL (see `_scripted`): as eager ops,
two threads spent much of their time handing the GIL to each other and ran barely faster than one.
"""

from __future__ import annotations

import math
import threading
import warnings
from functools import lru_cache
from typing import Tuple

import numpy as np
import torch

from grokquant.quant.ggml.base import Quantizer, for_each_chunk, fp16_bytes, fp16_from_bytes, register

QK_K = 256
GROUP_MAX_EPS = 1e-15
MAGIC = 12582912.0  # 1.5 * 2^23: nearest_int adds it and reads the low mantissa bits


def _f32(v: float) -> float:
    """A C float literal or float expression value, rounded to fp32 (still exact as a Python float)."""
    return float(np.float32(v))


def _const(v, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(_f32(v), dtype=torch.float32, device=like.device)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml nearest_int: round half to even, with C's bits even when |v| is out of range (tiny fp16 scales)."""
    return ((v + MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000


def _nearest_int_(v: torch.Tensor) -> torch.Tensor:
    """In-place nearest_int on a float buffer; returns the int32 view of it."""
    i = v.add_(MAGIC).view(torch.int32)
    return i.bitwise_and_(0x7FFFFF).sub_(0x400000)


class Scratch:
    """Named scratch tensors reused from chunk to chunk: a fresh multi-MB tensor page-faults on first touch,
    which costs more than the arithmetic done on it."""

    def __init__(self, device: torch.device):
        self.device, self.bufs = device, {}

    def __call__(self, name: str, *shape: int, dtype=torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        b = self.bufs.get(name)
        if b is None or b.numel() < n or b.dtype != dtype:
            b = self.bufs[name] = torch.empty(n, dtype=dtype, device=self.device)
        return b[:n].view(shape)


def _sqrtf_(v: torch.Tensor, buf: Scratch) -> torch.Tensor:
    """In-place correctly rounded fp32 sqrt, as C sqrtf (double rounding through float64 is exact)."""
    d = buf("f64", *v.shape, dtype=torch.float64)
    d.copy_(v).sqrt_()
    return v.copy_(d)


@lru_cache(maxsize=None)
def _scripted(fn):
    """fn compiled by TorchScript, run without graph optimizations (thread-local flag), else fn itself.

    A scripted call runs all its ops without the GIL: chunks on Python threads (`for_each_chunk`) then never
    wait for each other to hand the GIL over between ops (thousands per chunk), and per-op overhead drops.
    No optimizations means no fusion or rewriting: the graph runs the same aten kernels as eager mode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script is deprecated (still supported)
            compiled = torch.jit.script(fn)
    except Exception:  # TorchScript unavailable: eager mode gives the same bytes, only slower
        return fn

    def run(*args):
        with torch.jit.optimized_execution(False):
            return compiled(*args)

    return run


# ---- sums in C order ------------------------------------------------------------------------------------

def _loop_sum(t: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    acc = t[0] + 0.0 if from_zero else t[0].clone()
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


@lru_cache(maxsize=None)
def _zeros_index(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def _index_add_sum(t: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    acc = torch.zeros_like(t[:1]) if from_zero else t[:1].clone()
    src = t if from_zero else t[1:]
    return acc.index_add_(0, _zeros_index(src.shape[0]), src.contiguous())[0]


@lru_cache(maxsize=1)
def _index_add_in_order() -> bool:
    """CPU index_add_ adds source rows in index order (documented; one vectorized add per row): the C loop
    in one call. Checked once against a plain loop; should that ever change, the loop is used instead."""
    g = torch.Generator().manual_seed(0)
    for shape in [(33, 3, 40), (32, 3, 2048), (16, 2, 19, 256), (256, 7)]:
        t = torch.randn(shape, generator=g) * torch.logspace(-4, 4, shape[0]).view(-1, *[1] * (len(shape) - 1))
        for from_zero in (True, False):
            if not torch.equal(_loop_sum(t, from_zero), _index_add_sum(t, from_zero)):
                return False
    return True


def _seqsum(t: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """Sum over dim 0 in C loop order. `from_zero`: `s = 0; s += t[i]` (0 + -0.0 = +0.0), else s = t[0]."""
    if t.device.type == "cpu" and _index_add_in_order():
        return _index_add_sum(t, from_zero)
    return _loop_sum(t, from_zero)  # CUDA index_add_ uses atomics: order not kept


def _c_max(x: torch.Tensor) -> torch.Tensor:
    """max over the last dim as the C loops take it: `max = 0; if (v > max) max = v` (+0.0, NaN never wins)."""
    m = torch.where(x.isnan(), float("-inf"), x).amax(-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _first_absmax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x|, the signed element): the first such element when +a and -a tie, as the C loops keep the
    first strictly larger |x|. (Found from max and min: argmax over a strided dim is slow.)"""
    pmax, nmin = x.amax(dim), x.amin(dim)
    amax = torch.maximum(pmax, -nmin)
    mx = torch.where(pmax >= -nmin, pmax, nmin)
    tie = (pmax == -nmin) & (amax > 0)
    if tie.any():
        xt = x.movedim(dim, -1)[tie]
        mx[tie] = xt.gather(-1, xt.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return amax, mx


# ---- scale searches, on element-major tensors x, w [n, M] (M sub-blocks) ----------------------------------

def make_qkx(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, buf: Scratch):
    """make_qkx2_quants / make_qkx3_quants (same code given weights, no MAD) -> scale, the_min [M], L [n, M].

    Sequential over candidates like C: an accepted fit also moves `min`, which shifts the iscale and the
    codes of every later candidate. L lives in `buf`. The search runs as TorchScript (see `_scripted`)."""
    n, M = x.shape
    nums = _iscale_numerators(nmax, rmin, rdelta, nstep, x.device)
    ordered = x.device.type == "cpu" and _index_add_in_order()
    return _scripted(_qkx_search)(x, w, nmax, nums, buf("L", n, M), buf("P", n, 3, M), buf("R", 5, M),
                                  _zeros_index(n).to(x.device), ordered)


@lru_cache(maxsize=None)
def _iscale_numerators(nmax: int, rmin: float, rdelta: float, nstep: int, device: torch.device) -> torch.Tensor:
    """[nmax, then C's `rmin + rdelta*is + nmax` for is = 0..nstep] as fp32."""
    nums = [_f32(nmax)] + [_f32(_f32(_f32(rmin) + _f32(_f32(rdelta) * i)) + nmax) for i in range(nstep + 1)]
    return torch.tensor(nums, dtype=torch.float32, device=device)


def _seqsum_into(out: torch.Tensor, t: torch.Tensor, zidx: torch.Tensor, ordered: bool) -> torch.Tensor:
    """out = `s = 0; s += t[i]` over dim 0 of t, in C order (TorchScript version of `_seqsum`)."""
    out.zero_()
    if ordered:
        out.unsqueeze(0).index_add_(0, zidx, t)
    else:
        for i in range(t.shape[0]):
            out.add_(t[i])
    return out


def _qkx_search(x: torch.Tensor, w: torch.Tensor, nmax: int, nums: torch.Tensor, L: torch.Tensor, P: torch.Tensor,
                R: torch.Tensor, zidx: torch.Tensor, ordered: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of make_qkx. Scratch: L [n, M] (codes, then their error terms, in place), P [n, 3, M] (the
    three products per code), R [5, M] (sum_w, sum_x and the three sums of the candidate)."""
    sum_w, sum_x, sums = R[0], R[1], R[2:]
    wx = torch.mul(w, x, out=P[:, 0])
    sum_w.copy_(w[0])  # C starts these two sums from the first term
    sum_x.copy_(wx[0])
    if ordered:
        sum_w.unsqueeze(0).index_add_(0, zidx[1:], w[1:])
        sum_x.unsqueeze(0).index_add_(0, zidx[1:], wx[1:])
    else:
        for i in range(1, x.shape[0]):
            sum_w.add_(w[i])
            sum_x.add_(wx[i])
    mn0 = x.amin(0).clamp_max(0.0)
    mn = mn0
    mx = x.amax(0)
    iscale = nums[0] / (mx - mn)
    scale = 1 / iscale
    torch.sub(x, mn, out=L).mul_(iscale).round_().clamp_(0, nmax)  # round = nearest_int here
    best = _seqsum_into(torch.empty_like(mx), _sq_err_(L, scale, mn, x, w), zidx, ordered)
    keep_is, keep_mn = iscale, mn  # (iscale, min) that reproduce the kept codes
    wl, wll, wlx = P[:, 0], P[:, 1], P[:, 2]
    cur = torch.empty_like(mx)
    for step in range(1, nums.shape[0]):
        isc = nums[step] / (mx - mn)
        torch.sub(x, mn, out=L).mul_(isc).round_().clamp_(0, nmax)
        torch.mul(w, L, out=wl)
        torch.mul(wl, L, out=wll)
        torch.mul(wl, x, out=wlx)
        sl, sl2, sxl = _seqsum_into(sums, P, zidx, ordered).unbind(0)
        D = sum_w * sl2 - sl * sl
        this_scale = (sum_w * sxl - sum_x * sl) / D
        this_min = (sl2 * sum_x - sl * sxl) / D
        pos = this_min > 0  # C: min = 0, scale = sum_xl / sum_l2
        this_min.clamp_max_(0.0)
        this_scale = torch.where(pos, sxl / sl2, this_scale)
        _seqsum_into(cur, _sq_err_(L, this_scale, this_min, x, w), zidx, ordered)
        better = (D > 0) & (cur < best)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        keep_is = torch.where(better, isc, keep_is)
        keep_mn = torch.where(better, mn, keep_mn)
        mn = torch.where(better, this_min, mn)
    torch.sub(x, keep_mn, out=L).mul_(keep_is).round_().clamp_(0, nmax)
    # all equal (after min <= 0): zero codes, scale 0, the_min = -min. A range so tiny that iscale = inf
    # gives nearest_int(inf or nan) = (clamped) 0 in C, and then no fit is ever accepted.
    zero_codes = (mx == mn0) | keep_is.isinf()
    if bool(zero_codes.any()):
        L.masked_fill_(zero_codes, 0.0)
    flat = mx == mn0
    return torch.where(flat, torch.zeros_like(scale), scale), torch.where(flat, -mn0, -mn), L


def _sq_err_(L: torch.Tensor, scale: torch.Tensor, m: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The terms w_i*(scale*l_i + m - x_i)^2 in C's op order, computed in place in L."""
    return L.mul_(scale).add_(m).sub_(x).mul_(L).mul_(w)


_scripted(_qkx_search)  # compiled at import (~30 ms): TorchScript reads the source file, best while it is fresh


def make_qx_quants(x, w, nmax: int, buf: Scratch, sub: int = 1024):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=w) -> scale [M], codes L + nmax [n, M] (in `buf`).

    The 19 candidates iscale = -(nmax + 0.1*is)/max are independent: their sums are computed together,
    `sub` sub-blocks at a time (cache-sized), then C's running best is replayed candidate by candidate."""
    n, M = x.shape
    amax, mx = _first_absmax(x, 0)
    num = [_f32(nmax)] + [_f32(nmax + _f32(_f32(0.1) * i)) for i in range(-9, 10) if i]
    S = len(num)
    iscale = -(torch.tensor(num, device=x.device)[:, None] / mx)  # [S, M]; -(a/b) == (-a)/b exactly
    wx = torch.mul(w, x, out=buf("wx", n, M))
    sums = buf("sums", 2, S, M)
    for j in range(0, M, sub):
        k = slice(j, min(j + sub, M))
        m = k.stop - k.start
        L = torch.mul(x[:, None, k], iscale[:, k], out=buf("qxL", n, S, m)).round_().clamp_(-nmax, nmax - 1)
        prods = buf("qxP", n, 2, S, m)
        torch.mul(wx[:, None, k], L, out=prods[:, 0])  # (w*x)*l
        torch.mul(w[:, None, k], L, out=prods[:, 1]).mul_(L)  # (w*l)*l
        sums[:, :, k] = _seqsum(prods)
    sumlx, suml2 = sums

    zero = torch.zeros_like(mx)
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], zero)
    best = scale * sumlx[0]
    ok = torch.gt(suml2, 0, out=buf("ok", S, M, dtype=torch.bool))
    sq = torch.mul(sumlx, sumlx, out=buf("sq", S, M))
    cand = torch.div(sumlx, suml2, out=buf("cand", S, M))
    pick = torch.zeros(M, dtype=torch.long, device=x.device)
    for c in range(1, S):
        better = ok[c] & (sq[c] > best * suml2[c])
        scale = torch.where(better, cand[c], scale)
        best = torch.where(better, scale * sumlx[c], best)
        pick = torch.where(better, c, pick)
    L = torch.mul(x, iscale.gather(0, pick[None]), out=buf("L", n, M)).round_().clamp_(-nmax, nmax - 1).add_(nmax)
    tiny = amax < GROUP_MAX_EPS  # C returns 0 with all codes 0
    if tiny.any():
        L[:, tiny] = 0
    return torch.where(tiny, zero, scale), L


def make_qp_quants(x, w, nmax: int):
    """make_qp_quants(n, nmax, x >= 0, L, w) on x [n, ...] (w broadcasts) -> scale [...], codes [n, ...] (int,
    uint8-wrapped as C stores them)."""
    n = x.shape[0]
    mx = x.amax(0).clamp_min(0.0)
    iscale = _const(nmax, x) / mx
    L = nearest_int(iscale * x) & 0xFF  # L[] is uint8
    d = x - (1 / iscale) * L
    best = _seqsum(w * d * d)
    for i in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = _const(_f32(_f32(0.1) * i) + nmax, x) / mx
        d = x - (1 / isc) * nearest_int(isc * x).clamp_max(nmax)
        mse = _seqsum(w * d * d)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, isc, iscale)
    l = nearest_int(iscale * x).clamp_max(nmax)
    L = l & 0xFF
    wx = w * x
    sumlx, suml2 = _seqsum(wx * l), _seqsum(w * l * l)  # the sums see the int l, later steps the uint8 L
    # coordinate descent; a pass that changes nothing leaves the state as is, so always running 5 is exact
    for _ in range(5):
        for i in range(n):
            slx = sumlx - wx[i] * L[i]
            sl2 = suml2 - w[i] * L[i] * L[i]
            new = nearest_int(x[i] * sl2 / slx).clamp_max(nmax)
            change = (slx > 0) & (sl2 > 0) & (new != L[i])
            slx = slx + wx[i] * new
            sl2 = sl2 + w[i] * new * new
            take = change & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(take, new & 0xFF, L[i])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    zero = torch.zeros_like(mx)
    scale = torch.where(suml2 > 0, sumlx / suml2, zero)
    tiny = mx < GROUP_MAX_EPS
    return torch.where(tiny, zero, scale), torch.where(tiny, 0, L)


# ---- byte layouts ------------------------------------------------------------------------------------------

def pack_scale_min(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight six-bit scales and mins (int [nb, 8], 0..255 as C's uint8) -> 12 bytes, as the K-quant writers."""
    b_s = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b_m = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    b_sm = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return (torch.cat([b_s, b_m, b_sm], 1) & 0xFF).to(torch.uint8)


def unpack_scale_min(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for all j: uint8 [nb, 12] -> sc, m int32 [nb, 8]."""
    b = b.to(torch.int32)
    s, m, sm = b[:, :4], b[:, 4:8], b[:, 8:]
    sc = torch.cat([s & 63, (sm & 0xF) | ((s >> 6) << 4)], 1)
    mn = torch.cat([m & 63, (sm >> 4) | ((m >> 6) << 4)], 1)
    return sc, mn


def _requantize(x, L, d, dm, lo: int, hi: int, buf: Scratch) -> torch.Tensor:
    """Final codes from the stored scales: clamp(nearest_int((x + dm) / d), lo, hi) - lo on element-major
    x [n, M] with per-sub-block d, dm [M] (dm None: no offset); sub-blocks with d == 0 keep the search codes
    L. Returns block-major uint8 codes [M / (256 / n), 256]."""
    n, M = x.shape
    t = torch.add(x, dm, out=buf("e", n, M)) if dm is not None else buf("e", n, M).copy_(x)
    q = _nearest_int_(t.div_(d)).clamp_(lo, hi).sub_(lo)
    q8 = buf("q8", n, M, dtype=torch.uint8).copy_(q)
    keep = d == 0
    if keep.any():
        q8[:, keep] = L[:, keep].to(torch.uint8)
    return q8.t().reshape(-1, QK_K)


class _KQuant(Quantizer):
    """Runs `_quantize` on `chunk` super-blocks at a time, on all CPU threads, reusing scratch buffers."""

    chunk = 1024

    def quantize_blocks(self, x, qw):
        out = torch.empty(x.shape[0], self.type.block_bytes, dtype=torch.uint8, device=x.device)
        local = threading.local()  # scratch buffers per worker thread, reused across its chunks

        def run(start, stop):
            if not hasattr(local, "buf"):
                local.buf = Scratch(x.device)
            out[start:stop] = self._quantize(x[start:stop], None if qw is None else qw[start:stop], local.buf)

        for_each_chunk(run, x.shape[0], self.chunk, x.device)
        return out


class _KQuant45(_KQuant):
    """Q4_K / Q5_K: 8 sub-blocks of 32, y = d*sc_j*q - dmin*m_j with six-bit sc_j, m_j and q in 0..nmax."""

    nmax = 15
    ref_search = (-1.0, 0.1, 20)  # (rmin, rdelta, nstep) of make_qkx2_quants in the _ref path
    clamp_qp_codes = False  # Q5_K's _impl applies MIN(63, .) to the make_qp_quants codes, Q4_K's does not

    def _quantize(self, x, qw, buf):
        nb = x.shape[0]
        M = nb * 8
        xs = buf("x", 32, M).copy_(x.reshape(M, 32).t())  # [32, sub-blocks]
        w = buf("w", 32, M)
        x2 = torch.mul(xs, xs, out=buf("t", 32, M))
        if qw is None:  # quantize_row_q*_K_ref
            av_x = _sqrtf_(_seqsum(x2) / _const(32, x), buf)
            torch.abs(xs, out=w).add_(av_x)
            search = self.ref_search
        else:  # quantize_row_q*_K_impl: sigma2 over the whole super-block, in its element order
            xt = buf("xt", QK_K, nb).copy_(x.t())
            sigma2 = (2 * _seqsum(xt.mul_(xt)) / _const(QK_K, x)).repeat_interleave(8)
            torch.mul(qw.reshape(M, 32).t(), _sqrtf_(x2.add_(sigma2), buf), out=w)
            search = (-0.9, 0.05, 36)
        scales, mins, L = make_qkx(xs, w, self.nmax, *search, buf)
        scales, mins = scales.view(nb, 8), mins.view(nb, 8)

        if qw is None:
            zero = torch.zeros(nb, device=x.device)
            max_scale, max_min = _c_max(scales), _c_max(mins)
            c63 = _const(63, x)
            inv_scale = torch.where(max_scale > 0, c63 / max_scale, zero)
            inv_min = torch.where(max_min > 0, c63 / max_min, zero)
            ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_max(63)
            lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_max(63)
            d, dmin = max_scale / c63, max_min / c63
        else:  # one make_qp_quants call for scales and mins: x [8, 2, nb], weights [8, 1, nb]
            sw = _seqsum(w).view(nb, 8).t()[:, None]
            dd, lsm = make_qp_quants(torch.stack([scales.t(), mins.t()], 1), sw, 63)
            (d, dmin), ls, lm = dd, lsm[:, 0].t(), lsm[:, 1].t()
            if self.clamp_qp_codes:
                ls, lm = ls.clamp_max(63), lm.clamp_max(63)

        head = torch.cat([fp16_bytes(d[:, None]), fp16_bytes(dmin[:, None]), pack_scale_min(ls, lm)], 1)
        sc, m = unpack_scale_min(head[:, 4:16])  # C re-reads the packed codes (get_scale_min_k4)
        dj = (fp16_from_bytes(head[:, 0:2]) * sc.float()).view(M)
        dmj = (fp16_from_bytes(head[:, 2:4]) * m.float()).view(M)
        q = _requantize(xs, L, dj, dmj, 0, self.nmax, buf)
        return torch.cat([head, self._pack_q(q.view(nb, 4, 2, 32))], 1)

    def _pack_q(self, q):  # uint8 q [nb, 4 chunks of 64, 2 halves, 32] -> qs (and qh)
        raise NotImplementedError

    def _codes(self, b):  # -> q [nb, 4 chunks, 2 halves, 32]
        raise NotImplementedError

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        sc, m = unpack_scale_min(b[:, 4:16])
        d = (fp16_from_bytes(b[:, 0:2]) * sc.float()).view(nb, 8, 1)
        dm = (fp16_from_bytes(b[:, 2:4]) * m.float()).view(nb, 8, 1)
        return (d * self._codes(b).reshape(nb, 8, 32).float() - dm).view(nb, QK_K)


@register
class Q4_K(_KQuant45):
    name = "Q4_K"

    def _pack_q(self, q):
        return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)

    def _codes(self, b):
        qs = b[:, 16:].view(-1, 4, 1, 32)
        return torch.cat([qs & 0xF, qs >> 4], 2)


@register
class Q5_K(_KQuant45):
    name = "Q5_K"
    nmax = 31
    ref_search = (-0.5, 0.1, 15)
    clamp_qp_codes = True

    @staticmethod
    def _bit(device):  # qh bit of chunk c, half h: 2c + h
        return torch.arange(8, dtype=torch.uint8, device=device).view(1, 4, 2, 1)

    def _pack_q(self, q):
        ql = (q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)
        qh = ((q >> 4) << self._bit(q.device)).sum((1, 2), dtype=torch.uint8)  # distinct bits: sum = OR
        return torch.cat([qh, ql.reshape(q.shape[0], 128)], 1)

    def _codes(self, b):
        qs = b[:, 48:].view(-1, 4, 1, 32)
        qh = b[:, 16:48].view(-1, 1, 1, 32)
        return torch.cat([qs & 0xF, qs >> 4], 2) | (((qh >> self._bit(b.device)) & 1) << 4)


@register
class Q6_K(_KQuant):
    """16 sub-blocks of 16, y = d*scale_j*(q - 32) with int8 scale_j and q in 0..63."""

    name = "Q6_K"

    def _quantize(self, x, qw, buf):
        nb = x.shape[0]
        M = nb * 16
        xs = buf("x", 16, M).copy_(x.reshape(M, 16).t())  # [16, sub-blocks]
        w = buf("w", 16, M)
        if qw is None:
            torch.mul(xs, xs, out=w)
        else:
            w.copy_(qw.reshape(M, 16).t())  # _impl uses qw as is
        scales, L = make_qx_quants(xs, w, 32, buf)
        scales = scales.view(nb, 16)
        amax, max_scale = _first_absmax(torch.where(scales.isnan(), 0.0, scales), 1)  # C skips NaN (overflow)
        iscale = _const(-128, x) / max_scale
        d16 = fp16_bytes((1 / iscale)[:, None])
        codes = nearest_int(iscale[:, None] * scales).clamp_max(127) & 0xFF  # stored as int8
        dj = (fp16_from_bytes(d16) * ((codes ^ 0x80) - 0x80).float()).view(M)
        q = _requantize(xs, L, dj, None, -32, 31, buf).view(nb, 2, 4, 32)  # half, quarter, l
        lo = q & 0xF
        ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2)
        qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
        out = torch.cat([ql.reshape(nb, 128), qh.reshape(nb, 64), codes.to(torch.uint8), d16], 1)
        out[amax < GROUP_MAX_EPS] = 0  # all sub-scales ~0: the whole block is written as zeros
        return out

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        d = (fp16_from_bytes(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()).view(nb, 16, 1)
        ql = b[:, :128].view(nb, 2, 1, 64)
        ql = torch.cat([ql & 0xF, ql >> 4], 2).view(nb, 2, 4, 32)
        shift = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
        qh = b[:, 128:192].view(nb, 2, 1, 32) >> shift
        q = (ql | ((qh & 3) << 4)).to(torch.int32) - 32
        return (d * q.float().view(nb, 16, 16)).view(nb, QK_K)
