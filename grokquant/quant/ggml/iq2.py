"""GGML IQ2_XXS, IQ2_XS and IQ2_S (2-bit lattice codebooks): bit-exact, vectorized ports of ggml-quants.c.

The three quantizers (quantize_row_iq2_{xxs,xs,s}_impl) share one search, `_search`: a 256-block is cut into
scale groups of 32 (XXS) or 16 (XS, S) elements and these into octets; at each of 13 or 19 trial scales s the
magnitudes of an octet are rounded to a word of three levels per coordinate, and a word off the grid is
replaced by its listed neighbour of least weighted error (iq2_find_best_neighbour), nearly all of ggml's time.

Ours scores a neighbour by the error it adds to the word's, divided by 4s: a sum over its changed coordinates
of closed-form terms, each linear in s (`_steps`). Consecutive trials usually round an octet to the same word,
so these lines are summed once per such run and evaluated at each of its trials. The list's points at its
first distance are scored; the further ones add at least the cheapest steps that reach their distance
(`_far_bound`), which usually rules them out unscored. A point that beats every other one by more than a
bound on the rounding of our scores and of C's float sums is C's choice; closer calls (ties on zero weights,
mostly) are scored again in C's float order (`_exact`).

Bytes are independent of the CPU: ggml's C quantizers are scalar code, and ours repeat their float order. The
search runs as TorchScript (common._scripted); on CPU torch.where / masked_fill / sort cost ~30x an arithmetic
op and gathers along a row ~10x one across rows, so the hot paths select with float masks and keep tables
row-major by word.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Tuple

import torch

from grokquant.quant.ggml.base import Quantizer, fp16_bytes, fp16_from_bytes
from grokquant.quant.ggml.common import (GROUP_MAX_EPS, _index_add_in_order, _scripted, _seqsum_into, _zeros_index,
                                         const, elements, f32, imatrix_weights, sum_squares)
from grokquant.quant.ggml.iq_grids import grid

QK_K = 256
# A score within TOL * sum w*(5s + |x|)^2 of the best may be C's choice: the rounding of C's sum (< 2^-21 of
# that) and of our error differences (< 2^-17.8), twice, stays below it. (A literal in the code below:
# TorchScript takes no float globals.)
TOL = 2.0 ** -15


@dataclass(frozen=True)
class _Spec:
    name: str
    group: int  # elements per scale
    tries: tuple[int, ...]  # C's `is`: trial inverse scales (5 + 0.1*is) / base
    eps: float  # groups whose largest magnitude is below this are zero
    parity: bool  # 7 sign bits + an even number of flips (XXS, XS), else 8 free sign bits (S)
    qp_base: bool  # XXS: the trials are relative to make_qp_quants' scale, else to the group max


XXS = _Spec("IQ2_XXS", 32, tuple(range(-6, 7)), GROUP_MAX_EPS, True, True)
XS = _Spec("IQ2_XS", 16, tuple(range(-9, 10)), GROUP_MAX_EPS, True, False)
S = _Spec("IQ2_S", 16, tuple(range(-9, 10)), f32(1e-8), False, False)  # GROUP_MAX_EPS_IQ2_S


@lru_cache(maxsize=None)
def _tables(name: str, device: torch.device) -> List[torch.Tensor]:
    """The grid as the search reads it, by base-3 word u = sum l_i 3^i (ggml packs 2 bits per level):
    values [8, points + 1]: odd values 2l+1 of each point's coordinates (last column: padding); index [words]:
    grid point or -1; digits [words, 8]: the levels; lists [words, most]: the neighbour lists in C's order
    (padded with `points`); length [words]; far [words]: the list's second distance (sum of squared level
    steps; 99: none); count [words]: its points at the first distance, listed first; nch [words]: their most
    changed coordinates; slots [8, points + 1]: the level slot 3i + l of each point's coordinates (padding:
    24); then for c = 1, 2, ..: [words, c * points]: for the words whose near points change c coordinates,
    those changes (change-major) as step codes (i, +1: i; -1: 8+i; +2: 16+i; -2: 24+i; none: 32; padding point: 33)."""
    g = grid(name)
    points = g.codes.shape[0]
    digits = torch.stack(torch.meshgrid(*[torch.arange(3)] * 8, indexing="ij")[::-1], -1).reshape(-1, 8)
    index = g.index[g.word(digits)]
    nb = g.neighbours.long()[g.word(digits)]
    valid = nb >= 0
    diff = g.codes[nb.clamp(min=0)] - digits[:, None]  # [words, most, 8]
    dist = torch.where(valid, (diff ** 2).sum(-1), 99)
    near = dist.amin(1)
    far = torch.where(dist > near[:, None], dist, 99).amin(1)
    innear = (dist == near[:, None]) & valid  # a prefix of each list (none for words on the grid)
    count = innear.sum(1)
    code = torch.where(diff == 1, 0, torch.where(diff == -1, 8, torch.where(diff == 2, 16, 24))) + torch.arange(8)
    code = torch.where(diff != 0, code, 32).sort(-1).values
    nch = torch.where(innear, (diff != 0).sum(-1), 0).amax(1)
    changes = code[:, :int(count.max()), :int(nch.max())].clone()
    pad = ~innear[:, :changes.shape[1]]
    changes[pad] = 32
    changes[..., 0][pad] = 33
    slots = torch.cat([g.codes + torch.arange(0, 24, 3), torch.full((1, 8), 24)]).t()
    values = torch.cat([g.values, torch.zeros(1, 8)]).t()
    tabs = [values, index, digits.float(), torch.where(valid, nb, points).int(), valid.sum(1), far, count, nch,
            slots.int()]
    for c in range(1, changes.shape[2] + 1):  # only as many points as the words with c changes have
        P = int(torch.where(nch == c, count, 1).max())
        tabs.append(changes[:, :P, :c].transpose(1, 2).reshape(len(digits), c * P).int())
    return [t.contiguous().to(device) for t in tabs]


def _nint(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int as float: round half to even, and out of range C's bit trick (the low mantissa bits
    of v + 1.5*2^23; TorchScript cannot view floats as ints, so they are read off frexp)."""
    r = torch.round(v)
    if not bool(v.abs().amax() <= 4194303.0):
        big = ~(v.abs() <= 4194303.0)
        y = (v + 12582912.0)[big]
        m, e = torch.frexp(y.abs().double())
        bits = torch.where(torch.isfinite(y) & (y != 0), (m * 2 - 1) * 8388608.0, torch.zeros_like(m))
        bits = torch.where(torch.isnan(y), torch.full_like(bits, 4194304.0), bits)  # the default NaN
        r[big] = (bits - 4194304.0).float()
    return r


# Comparisons into float masks (1.0 / 0.0) and selections by them: on CPU several times faster than bool
# results, torch.where or masked_fill. A selection x*m + y*(1-m) is exact for finite x, y.

def _gt(a: torch.Tensor, b: float) -> torch.Tensor:
    return torch.gt(a, b, out=torch.empty_like(a))


def _ge(a: torch.Tensor, b: float) -> torch.Tensor:
    return torch.ge(a, b, out=torch.empty_like(a))


def _le(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.le(a, b, out=torch.empty_like(a))


def _sel(m: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * m + y * (1 - m)


def _sums(t: torch.Tensor, zidx: torch.Tensor, ordered: bool) -> torch.Tensor:
    """Sum over dim 0 in C order (`s = 0; s += t[i]`)."""
    return _seqsum_into(torch.empty_like(t[0]), t, zidx, ordered)


def _levels(y: torch.Tensor) -> torch.Tensor:
    """MAX(0, MIN(2, nearest_int(0.5f*(y - 1)))) for y = id*x, as float. y - 1 is exact for y in [1, 8), so below
    2^22 (nearest_int's range) this is [y > 2] + [y >= 4]: ties go to the even level."""
    if bool(y.abs().amax() < 4194303.0):
        return _gt(y, 2.0) + _ge(y, 4.0)
    return _nint((y - 1) * 0.5).clamp_(0, 2)


# ---- make_qp_quants, the base of IQ2_XXS's trial scales -------------------------------------------------------

def _qp_scale(x: torch.Tensor, w: torch.Tensor, nmax: int, zidx: torch.Tensor, ordered: bool) -> torch.Tensor:
    """The scale make_qp_quants(n, nmax, x, L, w) returns, x, w element-major [n, M]: the float steps of
    common.make_qp_quants (codes stored as uint8, summed as int), in an order that suits TorchScript."""
    n, M = x.shape
    mx = x.amax(0).clamp(min=0.0)  # C: max = 0; max = MAX(max, x[i])
    zero = _gt(mx, -1.0) - _ge(mx, 1e-15)  # GROUP_MAX_EPS (TorchScript takes no float globals)
    mx = mx + zero
    iscale = torch.full_like(mx, float(nmax)) / mx
    L = (_nint(iscale * x).int() & 255).float()  # uint8 L[i]
    diff = x - torch.ones_like(mx) / iscale * L
    best = _sums(w * diff * diff, zidx, ordered)
    for i in range(-4, 5):
        if i != 0:
            its = (torch.tensor(0.1, device=x.device) * i + nmax) / mx  # in float32, as C
            diff = x - torch.ones_like(mx) / its * _nint(its * x).clamp(max=float(nmax))
            mse = _sums(w * diff * diff, zidx, ordered)
            better = _gt(best - mse, 0.0)
            best = _sel(better, mse, best)
            iscale = _sel(better, its, iscale)
    l = _nint(iscale * x).clamp(max=float(nmax))
    wx = w * x
    slx, sl2 = _sums(wx * l, zidx, ordered), _sums(w * l * l, zidx, ordered)
    L = (l.int() & 255).float()
    # The coordinate descent (up to 5 passes over the elements, each step on the sums the steps before left)
    # in rounds: a round scores every element of a group at once on the current sums; up to the first accepted
    # change, that is what C's steps compute; the change is made and the next round starts after it.
    # A group changes about once, so a few rounds replace 32 dependent steps per pass.
    xt, wt, wxt, Lt = x.t().contiguous(), w.t().contiguous(), wx.t().contiguous(), L.t().contiguous()  # [M, n]
    rows = torch.arange(n, device=x.device).float()[None]
    act = torch.arange(M, device=x.device)
    pos = torch.zeros(M, 1, device=x.device)
    passes = torch.zeros_like(act)
    changed = torch.zeros_like(act, dtype=torch.bool)
    while act.shape[0] > 0:
        xa, wa, wxa, La = xt.index_select(0, act), wt.index_select(0, act), wxt.index_select(0, act), Lt[act]
        sx, s2 = slx[act][:, None], sl2[act][:, None]
        ea = sx - wxa * La
        eb = s2 - wa * La * La
        new = _nint(xa * eb / ea).clamp(max=float(nmax))
        a2 = ea + wxa * new
        b2 = eb + wa * new * new
        ok = _gt(ea, 0.0) * _gt(eb, 0.0) * _gt((new - La).abs(), 0.0) * _gt(a2 * a2 * s2 - sx * sx * b2, 0.0)
        ok = ok * _ge(rows - pos, 0.0)  # (a2*a2*s2 > sx*sx*b2 as a difference: both finite, so the same)
        i = (rows * ok + n * (1 - ok)).amin(1).long()
        has = i < n
        h = has.nonzero().squeeze(1)
        if h.shape[0] > 0:
            ih, gh = i[h], act[h]
            Lt.view(-1)[gh * n + ih] = (new[h, ih].int() & 255).float()
            slx[gh] = a2[h, ih]
            sl2[gh] = b2[h, ih]
        more = ~has & changed & (passes < 4)  # the pass ended with changes: another one
        keep = (has | more).nonzero().squeeze(1)
        passes = torch.where(more, passes + 1, passes)
        pos = torch.where(has, i + 1, torch.zeros_like(i)).float()[:, None]
        changed = has | (changed & ~more)
        act, pos, passes, changed = act[keep], pos[keep], passes[keep], changed[keep]
    return torch.where((zero > 0) | ~(sl2 > 0), torch.zeros_like(slx), slx / sl2)


# ---- the neighbour search -----------------------------------------------------------------------------------
# A point is scored by the error it adds to the word's, divided by 4s: the sum over its changed coordinates of
# a line sigma*s + tau per change. From level l (q = 2l+1) a step +1 adds 4ws(s(q+1) - x), -1: 4ws(x - s(q-1)),
# +2: 8ws(s(q+2) - x), -2: 8ws(x - s(q-2)). Impossible changes get tau = BIG.

def _steps(x: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lines of the 32 step codes (+ none, padding) of octets with levels v [8, R] -> sigma, tau [34, R]."""
    wx = w * x
    zero = torch.zeros_like(wx[:1])
    big = torch.full_like(wx[:1], 1e30)
    sg = torch.cat([w * (v * 2 + 2), w * v * -2, w * (v * 4 + 6), w * (v * -4 + 2), zero, zero])
    ta = torch.cat([_ge(v, 2.0) * 1e30 - wx, _gt(1.0 - v, 0.0) * 1e30 + wx, _ge(v, 1.0) * 1e30 - wx * 2,
                    _gt(2.0 - v, 0.0) * 1e30 + wx * 2, zero, big])
    return sg, ta


def _slots(x: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lines by level slot 3i + l (the change from v_i to l; slot 24: padding) -> sigma, tau [25, R]."""
    wx = w * x
    h = v * v + v
    sg = torch.stack([w * -h, w * (2 - h), w * (6 - h)], 1).view(24, -1)  # w * ((l^2 + l) - (v^2 + v))
    ta = torch.stack([wx * v, wx * (v - 1), wx * (v - 2)], 1).view(24, -1)  # wx * (v - l)
    return torch.cat([sg, torch.zeros_like(sg[:1])]), torch.cat([ta, torch.full_like(ta[:1], 1e30)])


def _gather(sg: torch.Tensor, ta: torch.Tensor, code: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lines of points: sums over `dim` (0 or 1) of the lines sg, ta [rows, R] at rows `code` (int [R, c,
    points] or [c, R, points]: column r of row r) -> [points, R]."""
    R = sg.shape[1]
    cols = torch.arange(R, device=sg.device).int().view([1, R, 1] if dim == 0 else [R, 1, 1])
    flat = (code * R + cols).reshape(-1)
    return (sg.view(-1).index_select(0, flat).view(code.shape).sum(dim).t().contiguous(),
            ta.view(-1).index_select(0, flat).view(code.shape).sum(dim).t().contiguous())


def _far_bound(lines: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """Least score of a point at level distance `far` [n] (sum of squared steps; 99: no such point) from the
    step lines [32, n] (+1, -1, +2, -2 per coordinate): k single steps and j double ones, k + 4j = far, add at
    least the k cheapest single steps and j times the cheapest double one."""
    m = torch.minimum(lines[:8], lines[8:16])
    double = torch.minimum(lines[16:24], lines[24:32]).amin(0)
    e = [m[i] for i in range(8)]
    for p, q in [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (1, 2), (5, 6), (0, 4), (1, 5),
                 (2, 6), (3, 7), (2, 4), (3, 5), (1, 2), (3, 4), (5, 6)]:  # a sorting network
        e[p], e[q] = torch.minimum(e[p], e[q]), torch.maximum(e[p], e[q])
    cheap = torch.cumsum(torch.stack([torch.zeros_like(e[0])] + e), 0)  # [9, n]: the k cheapest
    bound = torch.full_like(double, 1e30)
    for j in range(4):
        k = far - 4 * j
        fit = ((k >= 0) & (k <= 8) & (far < 99)).float()
        b = cheap.gather(0, k.clamp(0, 8)[None])[0] + double * j
        bound = torch.minimum(bound, _sel(fit, b, torch.full_like(b, 1e30)))
    return bound


def _pick(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, tol: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                        torch.Tensor]:
    """Least score a*s + b per column of [points, n] -> its row, the number of scores within tol of it, it."""
    score = torch.addcmul(b, a, s)
    best = score.amin(0)
    P = a.shape[0]
    cp = torch.mm(torch.stack([torch.ones(P, device=a.device), torch.arange(P, device=a.device).float()]),
                  _le(score, best + tol))
    return cp[1].long().clamp(0, P - 1), cp[0], best


def _neighbours(o: torch.Tensor, word: torch.Tensor, s: torch.Tensor, n: torch.Tensor, x: torch.Tensor,
                w: torch.Tensor, W: torch.Tensor, tabs: List[torch.Tensor]) -> torch.Tensor:
    """C's neighbour choices (iq2_find_best_neighbour) for runs of n trials (scales s [runs, n.max()]) that round
    octet o (magnitudes x, sqrt-weights w [8, N]; W [3, N] sums for the rounding bound) to the same off-grid
    `word` -> the grid index of every trial, run after run.

    The points at the list's first distance are scored at every trial; one further away adds at least the
    cheapest changes that reach its distance: bounded once per run from the lines at both ends of its scales,
    then, where that is too loose, at the trial's own scale.
    A point that beats all others by more than the rounding bound is C's choice; where a far point could win,
    the whole list is scored; what stays close is scored in C's float order (`_exact`)."""
    values, index, digits, lists, length, far, count, nch, slots = tabs[:9]
    R = o.shape[0]
    dev = o.device
    most = lists.shape[1]
    xo, wo = x.index_select(1, o), w.index_select(1, o)
    v = digits.index_select(0, word).t()  # [8, R]
    sg, ta = _steps(xo, wo, v)
    # the trials
    r = torch.repeat_interleave(torch.arange(R, device=dev), n)
    first = torch.cumsum(n, 0) - n
    j = torch.arange(r.shape[0], device=dev) - first.index_select(0, r)
    T = s.shape[1]
    st = s.view(-1).index_select(0, r * T + j)
    Wt = W.index_select(1, o.index_select(0, r))
    tol = (Wt[0] * st + Wt[1] + Wt[2] / st) * 7.62939453125e-06  # TOL/4 * sum w*(5s + |x|)^2 / s
    good = _gt(st, 0.0) * _gt(1e30 - tol, 0.0)  # a positive scale, a finite bound
    fw = far.index_select(0, word)
    bound = torch.full([R], 1e30, device=dev)
    if bool((fw < 99).any()):  # bounded over the run's scales: the lines at both ends
        ends = torch.stack([s[:, 0], s.view(-1).index_select(0, torch.arange(R, device=dev) * T + n - 1)])
        bound = _far_bound(torch.minimum(sg[:32] * ends[0] + ta[:32], sg[:32] * ends[1] + ta[:32]), fw)
    out = torch.full_like(r, -1)
    cw = count.index_select(0, word)
    nw = nch.index_select(0, word)
    undecided: List[torch.Tensor] = []
    for c in range(1, len(tabs) - 8):  # by the number of changed coordinates of the near points
        sel = (nw == c).nonzero().squeeze(1)
        if sel.shape[0] > 0:
            P = int(cw[sel].max().item())
            ws = word[sel]
            code = tabs[8 + c].index_select(0, ws).view(sel.shape[0], c, -1)[:, :, :P]  # [runs, c, P]
            a, b = _gather(sg.index_select(1, sel), ta.index_select(1, sel), code, 1)
            col = torch.repeat_interleave(torch.arange(sel.shape[0], device=dev), n[sel])  # trials of these runs
            tr = first[sel][col] + torch.arange(col.shape[0], device=dev) - (torch.cumsum(n[sel], 0) - n[sel])[col]
            pos, cnt, best = _pick(a.index_select(1, col), b.index_select(1, col), st[tr], tol[tr])
            uniq = (cnt == 1) & (good[tr] > 0)
            clear = uniq & (best + tol[tr] < bound[sel][col])
            got = lists.view(-1).index_select(0, ws[col] * most + pos).long()
            out[tr] = torch.where(clear, got, torch.full_like(got, -1))
            more = (uniq & ~clear).nonzero().squeeze(1)
            undecided.append(tr[more])
            if more.shape[0] > 0:  # the run's bound was too loose: bound at the trial's own scale
                tm = tr[more]
                rm = r[tm]
                lines = sg[:32].index_select(1, rm) * st[tm] + ta[:32].index_select(1, rm)
                ok2 = best[more] + tol[tm] < _far_bound(lines, fw.index_select(0, rm))
                out[tm] = torch.where(ok2, got[more], out[tm])
                undecided[-1] = tm[~ok2]
    rest = torch.cat(undecided) if len(undecided) > 0 else torch.zeros(0, dtype=torch.long, device=dev)
    if rest.shape[0] > 0:  # a far point might win: score the whole lists of those runs
        runs, inv = torch.unique(r[rest], return_inverse=True)
        fs, ft = _slots(xo.index_select(1, runs), wo.index_select(1, runs), v.index_select(1, runs))
        ln = length.index_select(0, word.index_select(0, runs))
        lo_ = 0
        for hi in [8, 16, 32, 64, 128, 256, 512]:  # lists padded to the next of these lengths
            sel = ((ln > lo_) & (ln <= hi)).nonzero().squeeze(1)
            lo_ = hi
            if sel.shape[0] > 0:
                L = min(hi, most)
                cand = lists.index_select(0, word[runs[sel]])[:, :L].contiguous()  # [runs', L]
                code = slots.index_select(1, cand.view(-1)).view(8, sel.shape[0], L)
                fa, fb = _gather(fs.index_select(1, sel), ft.index_select(1, sel), code, 0)
                back = torch.full([runs.shape[0]], -1, dtype=torch.long, device=dev)
                back[sel] = torch.arange(sel.shape[0], device=dev)
                at = (back.index_select(0, inv) >= 0).nonzero().squeeze(1)
                col = back[inv[at]]
                tr = rest[at]
                p2, c2, b2 = _pick(fa.index_select(1, col), fb.index_select(1, col), st[tr], tol[tr])
                got = cand.view(-1).index_select(0, col * L + p2).long()
                out[tr] = torch.where(c2 == 1, got, torch.full_like(got, -1))
    close = (out < 0).nonzero().squeeze(1)
    if close.shape[0] > 0:  # calls too close for our scores: C's float order decides
        rc = r[close]
        out[close] = _exact(o[rc], word[rc], st[close], x, w, values, lists, length)
    return out


def _exact(o: torch.Tensor, word: torch.Tensor, s: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
           values: torch.Tensor, lists: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """iq2_find_best_neighbour as C computes it: the first listed candidate of least sum w*(s*q - x)^2."""
    out = torch.zeros_like(o)
    ln = length.index_select(0, word)
    lo = 0
    for hi in [8, 16, 32, 64, 128, 256, 512]:  # lists padded to the next of these lengths
        sel = ((ln > lo) & (ln <= hi)).nonzero().squeeze(1)
        lo = hi
        if sel.shape[0] > 0:
            cand = lists.index_select(0, word[sel])[:, :hi].t().long()  # [L, n]
            os = o[sel]
            xo, wo, ss = x.index_select(1, os), w.index_select(1, os), s[sel]
            d2 = torch.zeros(cand.shape, device=o.device)
            for i in range(8):
                diff = ss * values[i].index_select(0, cand.reshape(-1)).view(cand.shape) - xo[i]
                d2 += wo[i] * diff * diff
            d2 = d2.masked_fill(cand == values.shape[1] - 1, float("inf"))
            out[sel] = cand.gather(0, d2.argmin(0)[None])[0]
    return out


# ---- the search shared by the three types ---------------------------------------------------------------------

def _search(xe: torch.Tensor, w: torch.Tensor, nums: torch.Tensor, eps: float, parity: bool, qp_base: bool,
            tabs: List[torch.Tensor], zidx: torch.Tensor,
            ordered: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The common part of quantize_row_iq2_{xxs,xs,s}_impl on element-major x and weights [m, G] (G groups of
    K = m/8 octets) with trial numerators `nums` -> grid index and sign bits per octet [K, G], scale [G]."""
    values, index = tabs[0], tabs[1]
    m, G = xe.shape
    K = m // 8
    T = nums.shape[0]
    dev = xe.device
    waux = torch.sqrt(w.double()).float()  # sqrtf, correctly rounded
    neg = 1 - _ge(xe, 0.0)  # C: x >= 0 keeps the sign (so does -0.0)
    xval = xe * (1 - 2 * neg)
    bits = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0], device=dev).view(1, 8, 1)
    signs = (neg.view(K, 8, G) * bits).sum(1).long()
    if parity:  # an odd number of flips: the least important element keeps its sign instead
        odd = neg.view(K, 8, G).sum(1).long() % 2
        imin = (w * xe * xe).view(K, 8, G).argmin(1)  # the first of the least, as C's strict `<`
        flip = torch.zeros(K, 8, G, device=dev).scatter_(1, imin[:, None], odd[:, None].float())
        xval = xval * (1 - 2 * flip.view(m, G))
        signs = (signs ^ (odd << imin)) & 127
    mx = xval.amax(0)
    zero = mx < eps
    if qp_base:
        scale0 = _qp_scale(xval, w, 4, zidx, ordered)
        base = scale0 * 3  # eff_max
        zero |= base <= 0
    else:
        base = mx
        scale0 = mx / torch.full_like(mx, 5.0)
    base = torch.where(zero, torch.ones_like(base), base)
    ids = nums[:, None] / base  # [T, G]
    s = (torch.ones_like(ids) / ids).t().contiguous()  # this_scale [G, T]
    wx = w * xval
    xo = xval.view(K, 8, G).transpose(0, 1).reshape(8, K * G)  # octet o = k*G + g
    wo = waux.view(K, 8, G).transpose(0, 1).reshape(8, K * G)
    ax = xo.abs()
    W = torch.stack([wo.sum(0) * 25, (wo * ax).sum(0) * 10, (wo * ax * ax).sum(0)])
    p3 = torch.tensor([[1.0, 3.0, 9.0, 27.0, 81.0, 243.0, 729.0, 2187.0]], device=dev)

    # every trial at once: words [K, G, T] from the levels [m, G, T], in slices of groups that stay in cache
    span = max(1, 131072 // (m * T))
    idt = ids.t().contiguous()
    u = torch.empty(K, G, T, dtype=torch.long, device=dev)
    for g0 in range(0, G, span):
        g1 = min(G, g0 + span)
        L = _levels(xval[:, g0:g1, None] * idt[None, g0:g1]).view(K, 8, (g1 - g0) * T)
        u[:, g0:g1] = torch.matmul(p3, L).view(K, g1 - g0, T)
    u = u.view(K * G * T)
    gi = index.index_select(0, u)
    entries = (gi < 0).nonzero().squeeze(1)  # off the grid; a run: consecutive trials of an octet, one word
    if entries.shape[0] > 0:
        ue = u.index_select(0, entries)
        start = torch.ones_like(entries, dtype=torch.bool)
        start[1:] = (entries[1:] != entries[:-1] + 1) | (ue[1:] != ue[:-1]) | (entries[1:] % T == 0)
        first = start.nonzero().squeeze(1)
        n = torch.diff(torch.cat([first, torch.full_like(first[:1], entries.shape[0])]))
        e0 = entries.index_select(0, first)
        o = e0 // T
        tr = (e0 % T)[:, None] + torch.arange(T, device=dev)
        sr = s.index_select(0, o % G).gather(1, tr.clamp(max=T - 1))  # the runs' scales
        gi[entries] = _neighbours(o, ue.index_select(0, first), sr, n, xo, wo, W, tabs)
    gi = gi.view(K, G, T)

    # sumqx, sumq2 of every trial
    sumqx = torch.empty(G, T, device=dev)
    sumq2 = torch.empty(G, T, device=dev)
    for g0 in range(0, G, span):
        g1 = min(G, g0 + span)
        gs = gi[:, g0:g1].reshape(-1)
        q = torch.stack([values[i].index_select(0, gs).view(K, g1 - g0, T) for i in range(8)], 1).view(m, -1, T)
        sumqx[g0:g1] = _sums(wx[:, g0:g1, None] * q, zidx, ordered)
        sumq2[g0:g1] = _sums(w[:, g0:g1, None] * q * q, zidx, ordered)

    best = torch.zeros_like(mx)
    scale = scale0
    pick = torch.full([G], -1.0, device=dev)
    ratio = sumqx / (sumq2 + (1 - _gt(sumq2, 0.0)))  # sumqx/sumq2, and no 0/0 where sumq2 = 0
    for t in range(T):  # C's running best
        sx, s2 = sumqx[:, t], sumq2[:, t]
        ok = _gt(s2, 0.0) * _gt(sx * sx - best * s2, 0.0)
        scale = _sel(ok, ratio[:, t], scale)
        best = _sel(ok, scale * sx, best)
        pick = _sel(ok, torch.full_like(pick, float(t)), pick)
    tp = pick.clamp(min=0).long().view(1, G, 1).expand(K, G, 1)
    picked = gi.gather(2, tp)[:, :, 0]
    onbest = (pick < 0) | (index.index_select(0, u.view(K, G, T).gather(2, tp).view(-1)).view(K, G) >= 0)
    gbest = torch.where(pick >= 0, picked, torch.zeros_like(picked))  # none accepted: L = 0

    # requantize at the chosen scale: XXS every octet, XS/S those that were off the grid
    redo = (scale > 0) & (torch.ones_like(onbest) if qp_base else ~onbest)
    if bool(redo.any()):
        sc = torch.where(scale > 0, scale, torch.ones_like(scale))
        L1 = _levels(xval * (torch.ones_like(sc) / sc)).view(K, 8, G)
        u1 = torch.matmul(p3, L1).view(K * G).long()
        g1 = index.index_select(0, u1)
        fix = ((g1 < 0) & redo.view(-1)).nonzero().squeeze(1)
        if fix.shape[0] > 0:
            g1[fix] = _neighbours(fix, u1[fix], sc[fix % G][:, None], torch.ones_like(fix), xo, wo, W, tabs)
        gbest = torch.where(redo, g1.view(K, G), gbest)
        q1 = torch.stack([values[i].index_select(0, gbest.view(-1)).view(K, G) for i in range(8)], 1).view(m, G)
        sx, s2 = _sums(wx * q1, zidx, ordered), _sums(w * q1 * q1, zidx, ordered)
        refit = redo.any(0) & (s2 > 0)
        scale = torch.where(refit, sx / s2, scale)
    flipped = scale < 0
    scale = torch.where(flipped, -scale, scale)
    signs = torch.where(flipped, ~signs & (127 if parity else 255), signs)
    gbest = gbest.masked_fill(zero, 0)
    return gbest, signs.masked_fill(zero, 0), scale.masked_fill(zero, 0.0)


# ---- the types ---------------------------------------------------------------------------------------------

def _weights(x: torch.Tensor, qw: torch.Tensor | None, spec: _Spec) -> torch.Tensor:
    """qw * sqrtf(sigma2 + x^2), sigma2 = sum x^2 / 256 (S: 2 * sum x^2 / 256; without qw 0.25*sigma2 + x^2)."""
    sigma2 = sum_squares(x)
    if spec is S:
        sigma2 = sigma2 * 2
    sigma2 = sigma2 / const(QK_K, x)
    if qw is not None:
        return imatrix_weights(x, qw, spec.group, sigma2)
    xe = elements(x, spec.group)
    return (sigma2 * 0.25).repeat_interleave(QK_K // spec.group) + xe * xe


class _IQ2(Quantizer):
    spec: _Spec
    fp16_scales = slice(0, 2)
    chunk = 256

    def quantize_chunk(self, out, x, qw, buf):
        spec = self.spec
        if qw is None and spec is not S:
            raise ValueError(f"{spec.name} needs an importance matrix (ggml_quantize_requires_imatrix)")
        nb = x.shape[0]
        nums = torch.tensor([f32(5 + f32(i * f32(0.1))) for i in spec.tries], device=x.device)
        ordered = x.device.type == "cpu" and _index_add_in_order()
        gi, signs, scale = _scripted(_search)(elements(x, spec.group), _weights(x, qw, spec), nums, spec.eps,
                                              spec.parity, spec.qp_base, _tables(spec.name, x.device),
                                              _zeros_index(spec.group).to(x.device), ordered)
        scale = scale.view(nb, -1)
        d = scale.amax(1) / const(31, x)  # max_scale/31; 0: an empty block
        l = _nint(((torch.ones_like(d) / d)[:, None] * scale - 1) * 0.5).clamp_(0, 15).long()
        out.copy_(self.pack(d, l, gi.t().reshape(nb, -1).long(), signs.t().reshape(nb, -1).long(), d == 0))

    def _grid_values(self, gi: torch.Tensor) -> torch.Tensor:
        levels = torch.tensor([8.0, 25.0, 43.0], device=gi.device)  # the dequantizer's grid bytes
        return levels[grid(self.spec.name).codes.to(gi.device)][gi.long()]  # [..., 8]


class IQ2_XXS(_IQ2, name="IQ2_XXS"):
    """256-blocks: fp16 d, 8 groups of 32 as two uint32: 4 grid bytes | 4 x 7 sign bits, 4-bit scale << 28."""

    spec = XXS

    def pack(self, d, l, gi, signs, empty):
        nb = d.shape[0]
        aux = (signs.view(nb, 8, 4) << torch.arange(0, 28, 7, device=d.device)).sum(2) | (l << 28)
        aux = aux[..., None] >> torch.arange(0, 32, 8, device=d.device)  # little-endian bytes
        body = (torch.cat([gi.view(nb, 8, 4), aux], 2).view(nb, 64) & 255).to(torch.uint8)
        return torch.cat([fp16_bytes(d[:, None]), body.masked_fill(empty[:, None], 0)], 1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        d = fp16_from_bytes(b[:, :2])
        q = b[:, 2:].reshape(nb, 8, 8).long()  # per group: 4 grid bytes, then a little-endian uint32
        aux = (q[..., 4:] << torch.arange(0, 32, 8, device=b.device)).sum(-1)
        db = d * ((aux >> 28).float() + 0.5) * 0.25  # [nb, 8]
        gv = self._grid_values(q[..., :4])  # [nb, 8, 4, 8]
        s7 = (aux[..., None] >> torch.arange(0, 28, 7, device=b.device)) & 127  # [nb, 8, 4]
        return (db[..., None, None] * gv * _sign(s7, True)).view(nb, QK_K)


class IQ2_XS(_IQ2, name="IQ2_XS"):
    """256-blocks: fp16 d, 32 uint16 (9-bit grid index | 7 sign bits << 9), 8 bytes of 4-bit group scales."""

    spec = XS

    def pack(self, d, l, gi, signs, empty):
        nb = d.shape[0]
        qs = gi | (signs << 9)
        qs = torch.stack([qs & 255, qs >> 8], 2).view(nb, 64)
        body = torch.cat([qs, l[:, 0::2] | (l[:, 1::2] << 4)], 1).to(torch.uint8)
        return torch.cat([fp16_bytes(d[:, None]), body.masked_fill(empty[:, None], 0)], 1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        d = fp16_from_bytes(b[:, :2])
        qs = b[:, 2:66].contiguous().view(torch.int16).long() & 0xFFFF  # [nb, 32]
        sc = b[:, 66:74].long()
        db = d * (torch.stack([sc & 15, sc >> 4], 2).view(nb, 16).float() + 0.5) * 0.25  # [nb, 16]
        gv = self._grid_values((qs & 511).view(nb, 16, 2))
        return (db[..., None, None] * gv * _sign((qs >> 9).view(nb, 16, 2), True)).view(nb, QK_K)


class IQ2_S(_IQ2, name="IQ2_S"):
    """256-blocks: fp16 d, 32 low grid bytes, 32 sign bytes, 8 bytes of 2 high grid bits, 8 of group scales."""

    spec = S

    def pack(self, d, l, gi, signs, empty):
        nb = d.shape[0]
        qh = ((gi >> 8).view(nb, 8, 4) << torch.arange(0, 8, 2, device=d.device)).sum(2)
        body = torch.cat([gi & 255, signs, qh, l[:, 0::2] | (l[:, 1::2] << 4)], 1).to(torch.uint8)
        return torch.cat([fp16_bytes(d[:, None] * const(0.9875, d)), body.masked_fill(empty[:, None], 0)], 1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        d = fp16_from_bytes(b[:, :2])
        qs, sg, qh, sc = b[:, 2:34].long(), b[:, 34:66].long(), b[:, 66:74].long(), b[:, 74:82].long()
        hi = (qh[..., None] >> torch.arange(0, 8, 2, device=b.device)) & 3  # [nb, 8, 4]
        gi = qs | (hi.view(nb, 32) << 8)
        db = d * (torch.stack([sc & 15, sc >> 4], 2).view(nb, 16).float() + 0.5) * 0.25
        gv = self._grid_values(gi.view(nb, 16, 2))
        return (db[..., None, None] * gv * _sign(sg.view(nb, 16, 2), False)).view(nb, QK_K)


def _sign(s: torch.Tensor, parity: bool) -> torch.Tensor:
    """Sign bytes [...] -> +-1.0 [..., 8]; with parity, bit 7 makes the number of set bits even (ksigns_iq2xs)."""
    bits = (s[..., None] >> torch.arange(8, device=s.device)) & 1
    if parity:
        bits[..., 7] = bits[..., :7].sum(-1) & 1
    return 1.0 - 2.0 * bits.float()
