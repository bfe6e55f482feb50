"""ggml's shared bit-exact helpers: float32 constants and rounding, sums in C loop order, first-max searches,
and the scale searches of ggml-quants.c (make_qx_quants, make_qkx2/3_quants, make_qp_quants, make_q3_quants).

How exactness is kept (libggml-base is plain SSE code: no FMA contraction, no reassociation):
- every float op is one fp32 torch op in the C order, and sums over a (sub-)block run element by element
  (`seqsum`), vectorized across (sub-)blocks. Search tensors are element-major, [n, groups]: row i holds
  element i of every group, so each step of a sum is contiguous.
- constants are fp32 (`f32`, `const`) and divisors are tensors: torch computes `scalar / t` as
  `t.reciprocal() * scalar`, and CUDA `t / scalar` as `t * (1 / scalar)`; both round differently.
- sqrtf goes through float64 (torch's vectorized fp32 sqrt is not always correctly rounded).
- ties keep the first element, as the C loops compare with strict `<` / `>`.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Tuple

import numpy as np
import torch

GROUP_MAX_EPS = float(np.float32(1e-15))
MAGIC = 12582912.0  # 1.5 * 2^23: nearest_int adds it and reads the low mantissa bits


def f32(v: float) -> float:
    """A C float literal or float expression value, rounded to fp32 (still exact as a Python float)."""
    return float(np.float32(v))


def const(v: float, like: torch.Tensor) -> torch.Tensor:
    """A C float constant as a 0-dim fp32 tensor on like's device (a true divisor or dividend)."""
    return torch.tensor(f32(v), dtype=torch.float32, device=like.device)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml nearest_int: round half to even, with C's bits even out of range (NaN -> 0, +-inf -> -2^22)."""
    return ((v + MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000


def nearest_int_(v: torch.Tensor) -> torch.Tensor:
    """In-place nearest_int on a float buffer; returns the int32 view of it."""
    i = v.add_(MAGIC).view(torch.int32)
    return i.bitwise_and_(0x7FFFFF).sub_(0x400000)


def inverse(d: torch.Tensor) -> torch.Tensor:
    """C's `d ? 1.0f/d : 0.0f`."""
    return torch.where(d != 0, torch.ones_like(d) / d, torch.zeros_like(d))


def sqrtf_(v: torch.Tensor, buf=None) -> torch.Tensor:
    """In-place correctly rounded fp32 sqrt, as C sqrtf (double rounding through float64 is exact).
    `buf` (a Scratch) holds the float64 copy."""
    d = v.double() if buf is None else buf("f64", *v.shape, dtype=torch.float64).copy_(v)
    return v.copy_(d.sqrt_())


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


def seqsum(t: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """Sum over dim 0 in C loop order. `from_zero`: `s = 0; s += t[i]` (0 + -0.0 = +0.0), else s = t[0]."""
    if t.device.type == "cpu" and _index_add_in_order():
        return _index_add_sum(t, from_zero)
    return _loop_sum(t, from_zero)  # CUDA index_add_ uses atomics: order not kept


def _seqsum_into(out: torch.Tensor, t: torch.Tensor, zidx: torch.Tensor, ordered: bool) -> torch.Tensor:
    """out = `s = 0; s += t[i]` over dim 0 of t, in C order (the TorchScript form of `seqsum`)."""
    out.zero_()
    if ordered:
        out.unsqueeze(0).index_add_(0, zidx, t)
    else:
        for i in range(t.shape[0]):
            out.add_(t[i])
    return out


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    """Sequential sum of x^2 over each [blocks, n] row."""
    return seqsum((x * x).t().contiguous())


# ---- maxima as the C loops take them ------------------------------------------------------------------

def c_max(x: torch.Tensor) -> torch.Tensor:
    """max over the last dim as `max = 0; if (v > max) max = v` (+0.0 if none is positive; NaN never wins)."""
    m = torch.where(x.isnan(), float("-inf"), x).amax(-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def first_absmax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x|, the signed element) over `dim`, as `amax = max = 0; if (|v| > amax) {amax = |v|; max = v}`:
    on a +a/-a tie the first one, +0.0 where no |x| is positive, and NaN never wins.
    Found from amax and amin: argmax over a strided dim is slow; only tied groups need it."""
    pmax, nmin = x.amax(dim), x.amin(dim)
    amax = torch.maximum(pmax, -nmin)
    if amax.isnan().any():  # groups holding a NaN: as if it were 0, which never wins either
        return first_absmax(x.nan_to_num(nan=0.0, posinf=float("inf"), neginf=float("-inf")), dim)
    mx = torch.where(pmax >= -nmin, pmax, nmin)
    tie = (pmax == -nmin) & (amax > 0)
    if tie.any():
        xt = x.movedim(dim, -1)[tie]
        mx[tie] = xt.gather(-1, xt.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return amax, torch.where(amax > 0, mx, torch.zeros_like(mx))


# ---- element-major layout -------------------------------------------------------------------------------

def elements(x: torch.Tensor, n: int) -> torch.Tensor:
    """[blocks, k*n] -> element-major [n, blocks*k] (group s = block*k + j)."""
    return x.reshape(-1, n).t().contiguous()


def blocks(t: torch.Tensor, nb: int) -> torch.Tensor:
    """Inverse of `elements`: [n, nb*k] -> [nb, k*n]."""
    return t.t().reshape(nb, -1)


def imatrix_weights(x: torch.Tensor, qw: torch.Tensor, n: int, sigma2: torch.Tensor) -> torch.Tensor:
    """qw * sqrtf(sigma2 + x^2) for [blocks, block] rows (sigma2 per row), element-major [n, groups]."""
    xe = elements(x, n)
    sig = sigma2.repeat_interleave(x.shape[1] // n)
    return elements(qw, n) * sqrtf_(sig + xe * xe)


# ---- TorchScript ------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _scripted(fn):
    """fn compiled by TorchScript, run without graph optimizations (thread-local flag), else fn itself.

    A scripted call runs all its ops without the GIL: chunks on Python threads (base.quantize_chunks) then
    never wait for each other to hand the GIL over between ops (thousands per chunk), and per-op overhead
    drops. No optimizations means no fusion or rewriting: the graph runs the same aten kernels as eager mode."""
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


# ---- scale searches, on element-major x, w [n, M] (M groups) ---------------------------------------------

def make_qkx(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, buf, use_mad: bool = False):
    """make_qkx2_quants / make_qkx3_quants with weights w -> codes L [n, M] (float, in `buf`), scale and
    the_min [M] (x ~ scale*L - the_min). The two C functions are the same code given weights: qkx3's
    degenerate test `max <= min` equals qkx2's `max == min`, as min <= max. use_mad: sum w*|err|, not w*err^2.

    Sequential over candidates like C: an accepted fit also moves `min`, which shifts the iscale and the
    codes of every later candidate. The search runs as TorchScript (see `_scripted`)."""
    n, M = x.shape
    nums = _iscale_numerators(nmax, rmin, rdelta, nstep, x.device)
    ordered = x.device.type == "cpu" and _index_add_in_order()
    return _scripted(_qkx_search)(x, w, nmax, nums, use_mad, buf("L", n, M), buf("P", n, 3, M), buf("R", 5, M),
                                  _zeros_index(n).to(x.device), ordered)


@lru_cache(maxsize=None)
def _iscale_numerators(nmax: int, rmin: float, rdelta: float, nstep: int, device: torch.device) -> torch.Tensor:
    """[nmax, then C's `rmin + rdelta*is + nmax` for is = 0..nstep] as fp32."""
    nums = [f32(nmax)] + [f32(f32(f32(rmin) + f32(f32(rdelta) * i)) + nmax) for i in range(nstep + 1)]
    return torch.tensor(nums, dtype=torch.float32, device=device)


def _qkx_search(x: torch.Tensor, w: torch.Tensor, nmax: int, nums: torch.Tensor, use_mad: bool, L: torch.Tensor,
                P: torch.Tensor, R: torch.Tensor, zidx: torch.Tensor,
                ordered: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    mn0, mx = x.amin(0), x.amax(0)
    odd = (mn0 == 0) | mn0.isnan()  # amin may differ from C's `if (x[i] < min)` loop: sign of 0, NaN
    if bool(odd.any()):
        cols = odd.nonzero().squeeze(1)
        xo = x.index_select(1, cols)
        lo, hi = xo[0].clone(), xo[0].clone()
        for i in range(1, xo.shape[0]):
            lo = torch.where(xo[i] < lo, xo[i], lo)
            hi = torch.where(xo[i] > hi, xo[i], hi)
        mn0 = mn0.index_copy(0, cols, lo)
        mx = mx.index_copy(0, cols, hi)
    mn0 = torch.where(mn0 > 0, torch.zeros_like(mn0), mn0)
    mn = mn0
    # round = nearest_int while iscale*(x - min) is finite, i.e. no NaN or inf in x (the sum tells, cheaply)
    # and max - min does not overflow; C's nearest_int(NaN or +-inf) is 0 or -2^22, clamped to 0
    finite = bool(torch.isfinite(x.sum())) and bool(torch.isfinite(mx - mn0).all())
    iscale = nums[0] / (mx - mn)
    scale = 1 / iscale
    _codes_(torch.sub(x, mn, out=L).mul_(iscale), nmax, finite)
    best = _seqsum_into(torch.empty_like(mx), _error_terms_(L, scale, mn, x, w, use_mad), zidx, ordered)
    keep_is, keep_mn = iscale, mn  # (iscale, min) that reproduce the kept codes
    wl, wll, wlx = P[:, 0], P[:, 1], P[:, 2]
    cur = torch.empty_like(mx)
    for step in range(1, nums.shape[0]):
        isc = nums[step] / (mx - mn)
        _codes_(torch.sub(x, mn, out=L).mul_(isc), nmax, finite)
        torch.mul(w, L, out=wl)
        torch.mul(wl, L, out=wll)
        torch.mul(wl, x, out=wlx)
        sl, sl2, sxl = _seqsum_into(sums, P, zidx, ordered).unbind(0)
        D = sum_w * sl2 - sl * sl
        this_scale = (sum_w * sxl - sum_x * sl) / D
        this_min = (sl2 * sum_x - sl * sxl) / D
        pos = this_min > 0  # C: min = 0, scale = sum_xl / sum_l2
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sxl / sl2, this_scale)
        _seqsum_into(cur, _error_terms_(L, this_scale, this_min, x, w, use_mad), zidx, ordered)
        better = (D > 0) & (cur < best)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        keep_is = torch.where(better, isc, keep_is)
        keep_mn = torch.where(better, mn, keep_mn)
        mn = torch.where(better, this_min, mn)
    _codes_(torch.sub(x, keep_mn, out=L).mul_(keep_is), nmax, finite)
    # all equal (after min <= 0): zero codes, scale 0, the_min = -min. A range so tiny that iscale = inf
    # gives nearest_int(inf or nan) = (clamped) 0 in C, and then no fit is ever accepted.
    zero_codes = (mx == mn0) | keep_is.isinf()
    if bool(zero_codes.any()):
        L.masked_fill_(zero_codes, 0.0)
    flat = mx == mn0
    return L, torch.where(flat, torch.zeros_like(scale), scale), torch.where(flat, -mn0, -mn)


def _codes_(v: torch.Tensor, nmax: int, finite: bool) -> torch.Tensor:
    """MAX(0, MIN(nmax, nearest_int(v))) in place, v = iscale*(x - min)."""
    if not finite:
        v.nan_to_num_(0.0, 0.0, 0.0)
    return v.round_().clamp_(0, nmax)


def _error_terms_(L: torch.Tensor, scale: torch.Tensor, m: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                  use_mad: bool) -> torch.Tensor:
    """The terms w_i*(scale*l_i + m - x_i)^2 (w_i*|...| with use_mad) in C's op order, in place in L."""
    diff = L.mul_(scale).add_(m).sub_(x)
    return diff.abs_().mul_(w) if use_mad else diff.mul_(diff).mul_(w)


_scripted(_qkx_search)  # compiled at import (~30 ms): TorchScript reads the source file, best while it is fresh


def make_qx_quants(x, w, nmax: int, buf, sub: int = 1024):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=w) -> codes L + nmax [n, M] (float, in `buf`), scale [M].

    The 19 candidates iscale = -(nmax + 0.1*is)/max are independent: their sums are computed together,
    `sub` groups at a time (cache-sized), then C's running best is replayed candidate by candidate."""
    n, M = x.shape
    amax, mx = first_absmax(x, 0)
    num = [f32(nmax)] + [f32(nmax + f32(f32(0.1) * i)) for i in range(-9, 10) if i]
    S = len(num)
    iscale = -(torch.tensor(num, device=x.device)[:, None] / mx)  # [S, M]; -(a/b) == (-a)/b exactly
    wx = torch.mul(w, x, out=buf("wx", n, M))
    sums = buf("sums", 2, S, M)
    finite = bool(torch.isfinite(x.sum()))  # no NaN or inf in x: then every iscale*x is finite
    for j in range(0, M, sub):
        k = slice(j, min(j + sub, M))
        m = k.stop - k.start
        L = _qx_codes_(torch.mul(x[:, None, k], iscale[:, k], out=buf("qxL", n, S, m)), nmax, finite)
        prods = buf("qxP", n, 2, S, m)
        torch.mul(wx[:, None, k], L, out=prods[:, 0])  # (w*x)*l
        torch.mul(w[:, None, k], L, out=prods[:, 1]).mul_(L)  # (w*l)*l
        sums[:, :, k] = seqsum(prods)
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
    L = _qx_codes_(torch.mul(x, iscale.gather(0, pick[None]), out=buf("L", n, M)), nmax, finite).add_(nmax)
    tiny = amax < GROUP_MAX_EPS  # C returns 0 with all codes 0
    if tiny.any():
        L[:, tiny] = 0
    return L, torch.where(tiny, zero, scale)


def _qx_codes_(v: torch.Tensor, nmax: int, finite: bool) -> torch.Tensor:
    """MAX(-nmax, MIN(nmax-1, nearest_int(v))) in place (round = nearest_int for finite products)."""
    if not finite:
        v.nan_to_num_(0.0, -nmax, -nmax)  # C's nearest_int(NaN) = 0, of +-inf -2^22
    return v.round_().clamp_(-nmax, nmax - 1)


def _descend(x, w, l, slx, sl2, lo, hi, qp: bool):
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
    """make_q3_quants(n, nmax, x, L, do_rmse=true): weights x^2, then coordinate descent -> codes L + nmax
    (int), scale."""
    amax, mx = first_absmax(x, 0)
    w = x * x
    l = nearest_int(const(-nmax, x) / mx * x).clamp_(-nmax, nmax - 1).float()
    slx, sl2 = _descend(x, w, l, seqsum(w * x * l), seqsum(w * l * l), -nmax, nmax - 1, qp=False)
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, 0, l.int() + nmax), torch.where(zero | ~(sl2 > 0), 0.0, slx / sl2)


def make_qp_quants(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants(n, nmax, x >= 0, L, w) -> codes (int, 0..nmax, uint8-wrapped as C stores them), scale."""
    mx = x.max(0).values
    zero = mx < GROUP_MAX_EPS  # C: max = MAX(max, x[i]) from 0; a non-positive group is all zero

    def codes(iscale):  # clamped above only: a negative input gives a negative code
        return nearest_int(iscale * x).clamp_(max=nmax)

    def mse(iscale, l):
        diff = x - const(1, x) / iscale * l.float()
        return seqsum(w * diff * diff)

    iscale = const(nmax, x) / mx
    best = mse(iscale, nearest_int(iscale * x) & 0xFF)  # first pass: uint8 codes, no clamp
    for i in range(-4, 5):
        if i:
            its = const(f32(f32(0.1) * i) + nmax, x) / mx
            err = mse(its, codes(its))
            better = err < best
            best = torch.where(better, err, best)
            iscale = torch.where(better, its, iscale)
    l = codes(iscale).float()
    slx, sl2 = seqsum(w * x * l), seqsum(w * l * l)  # C sums the int codes but stores them as uint8
    L = (l.int() & 0xFF).float()
    slx, sl2 = _descend(x, w, L, slx, sl2, None, nmax, qp=True)
    return torch.where(zero, 0, L.int()), torch.where(zero | ~(sl2 > 0), 0.0, slx / sl2)
