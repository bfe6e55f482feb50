"""GGML IQ2_XXS, IQ2_XS and IQ2_S (2-bit lattice codebooks): bit-exact numba ports of ggml-quants.c.

The three quantizers (quantize_row_iq2_{xxs,xs,s}_impl) share one search: a 256-block is cut into scale groups
of 32 (XXS) or 16 (XS, S) elements and these into octets; at each of 13 or 19 trial scales the magnitudes of an
octet are rounded to a word of three levels per coordinate, a word off the grid is replaced by its listed
neighbour of least weighted error (iq2_find_best_neighbour), and the trial whose codes fit best is kept; the
group is then requantized at the scale it found. Nearly all of ggml's time goes to the neighbour scoring.

The kernels run C's loops in C's order in float32 (numba, no fast-math), so every comparison sees the floats C
sees and the bytes are ggml's. They differ from C only in what they compute once: the neighbour score of a
candidate is a sum of 8 terms w_i (s q_i - x_i)^2, each a function of (coordinate, level) only, so the 24
possible terms of an octet are computed once per trial (C's float ops exactly) and a candidate's score is 8
table reads summed in C's order (where each term lies among the 24 is packed per listed neighbour, 5 bits a
coordinate); likewise the products w x q and w q q of the fit sums per (element, level). The levels of all
trials of a group are rounded first in one branch-free loop (exact while |id*x| < 2^22; otherwise C's bit
trick per octet, as before). A trial whose octets land on the same points (on or off the grid alike) as the
trial before it has the same fit sums, so its fit and test are skipped: had the earlier trial been rejected,
the best has not moved and this one is rejected too; had it been accepted, accepting the same sums again
writes the same scale, best, levels and points. No byte depends on these shortcuts. The tables enter the
kernel `borrowed` (compiled.py): the inlined helpers would otherwise reference-count them at every octet.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from grokquant.quant.ggml.base import Quantizer, fp16_from_bytes
from grokquant.quant.ggml.compiled import (F32, borrowed, inline, kernel, make_qp_quants, nearest_int_bits,
                                           octet_signs)
from grokquant.quant.ggml.iq_grids import grid

QK_K = 256
FLT_MAX = F32(3.4028234663852886e38)


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: int  # the kernel's switch: 0 XXS, 1 XS, 2 S
    tries: tuple[int, ...]  # C's `is`: trial inverse scales (5 + 0.1*is) / base

    @property
    def nums(self) -> np.ndarray:
        """C's `2*kMaxQ-1 + is*0.1f` (int + float: evaluated in float32)."""
        return np.array([F32(5) + F32(i) * F32(0.1) for i in self.tries], dtype=np.float32)


XXS = _Spec("IQ2_XXS", 0, tuple(range(-6, 7)))  # groups of 32, trials relative to make_qp_quants' scale
XS = _Spec("IQ2_XS", 1, tuple(range(-9, 10)))  # groups of 16, trials relative to the group max
S = _Spec("IQ2_S", 2, tuple(range(-9, 10)))  # as XS, 8 free sign bits, GROUP_MAX_EPS_IQ2_S, imatrix optional


@lru_cache(maxsize=None)
def _tables(name: str) -> tuple[np.ndarray, ...]:
    """The grid as the kernels read it: kmap [words] (grid point of a packed word u = sum l_i << 2i, or -1),
    start, length [words] (its neighbour list in `flat`, C's order), flat (int16 grid points), slots
    [len(flat)] (per listed neighbour, the place 8l + i of each coordinate's term among an octet's 24, 5 bits
    each, coordinate i at bit 5i), codes [points, 8]."""
    g = grid(name)
    codes = g.codes.numpy().astype(np.uint8)
    nb = g.neighbours.numpy()
    length = (nb >= 0).sum(1).astype(np.int32)
    start = (np.cumsum(length) - length).astype(np.int32)
    flat = nb[nb >= 0].astype(np.int16)  # row-major: each list in order
    place = codes[flat].astype(np.int64) * 8 + np.arange(8)  # 8l + i: coordinate i's term at level l
    slots = (place << (5 * np.arange(8))).sum(1)
    return g.index.numpy().astype(np.int32), start, length, flat, slots, codes


# ---- the kernels ----------------------------------------------------------------------------------------------

@inline
def _word(id_, xval, o, L):
    """Levels MAX(0, MIN(2, nearest_int(0.5f*(id*x - 1)))) of the octet xval[o:o+8] into L[o:o+8] -> its word.
    For |y| < 2^22, y = id*x: y - 1 and the halving are exact, so the level is [y > 2] + [y >= 4] (a tie at
    y = 2 or 4 goes to the even level); beyond, C's nearest_int bit trick decides."""
    u = 0
    for i in range(8):
        y = id_ * xval[o + i]
        if abs(y) < F32(4194304.0):
            l = (1 if y > F32(2.0) else 0) + (1 if y >= F32(4.0) else 0)
        else:
            l = max(0, min(2, nearest_int_bits(F32(0.5) * (y - F32(1.0)))))
        L[o + i] = l
        u |= l << (2 * i)
    return u


@inline
def _best_neighbour(u, s, xval, waux, o, terms, start, length, flat, slots):
    """iq2_find_best_neighbour for word u at scale s: the first listed point of least sum over i of
    waux_i*(s*q_i - x_i)^2 (C: `d2 < best_d2` from FLT_MAX), or -1 if none scores below FLT_MAX (ggml aborts).
    terms[8l + i] is C's term of coordinate i at level l (three branch-free loops of 8); a score sums a
    point's 8 terms in C's order (C adds them to d2 = 0: the same floats, as 0 + t = t for t >= 0), their
    places read from the neighbour's slots word (5 bits per coordinate)."""
    sq1 = s  # s * q for q = 2l + 1
    sq3 = s * F32(3.0)
    sq5 = s * F32(5.0)
    for i in range(8):
        d = sq1 - xval[o + i]
        terms[i] = waux[o + i] * d * d
    for i in range(8):
        d = sq3 - xval[o + i]
        terms[8 + i] = waux[o + i] * d * d
    for i in range(8):
        d = sq5 - xval[o + i]
        terms[16 + i] = waux[o + i] * d * d
    best = FLT_MAX
    pick = -1
    for j in range(start[u], start[u] + length[u]):
        t = slots[j]
        d2 = (terms[t & 31] + terms[(t >> 5) & 31] + terms[(t >> 10) & 31] + terms[(t >> 15) & 31]
              + terms[(t >> 20) & 31] + terms[(t >> 25) & 31] + terms[(t >> 30) & 31] + terms[(t >> 35) & 31])
        if d2 < best:
            best = d2
            pick = j
    return pick if pick < 0 else flat[pick]


@inline
def _place(u, s, xval, waux, o, L, terms, kmap, start, length, flat, slots, codes):
    """Word u (levels in L[o:o+8]) at scale s onto the grid -> its grid point, -1 - point if it was off the
    grid (then L holds the neighbour's levels), or -1 - npoints if no neighbour scored."""
    gi = kmap[u]
    if gi >= 0:
        return gi
    gi = _best_neighbour(u, s, xval, waux, o, terms, start, length, flat, slots)
    if gi < 0:
        return -1 - codes.shape[0]
    for i in range(8):
        L[o + i] = codes[gi, i]
    return -1 - gi


@inline
def _octet(id_, s, xval, waux, o, L, terms, kmap, start, length, flat, slots, codes):
    """Round octet o at inverse scale id_ (scale s) onto the grid: its levels into L -> as `_place`."""
    return _place(_word(id_, xval, o, L), s, xval, waux, o, L, terms, kmap, start, length, flat, slots, codes)


@inline
def _trial_words(nums, base, xval, G, Lv, U):
    """The levels of every trial (Lv [trials, G]) and their words (U [trials, octets]), as `_word` computes
    them, branch-free for |id*x| < 2^22 -> False if some |id*x| is not (then `_word` must decide)."""
    ok = True
    for t in range(nums.shape[0]):
        id_ = nums[t] / base
        for i in range(G):
            y = id_ * xval[i]
            ok &= abs(y) < F32(4194304.0)
            Lv[t, i] = (1 if y > F32(2.0) else 0) + (1 if y >= F32(4.0) else 0)
        for k in range(G // 8):
            u = 0
            for i in range(8):
                u |= Lv[t, 8 * k + i] << (2 * i)
            U[t, k] = u
    return ok


@inline
def _fit(L, wxq, wqq, n):
    """C's sumqx, sumq2 over q = 2L+1: `sumqx += w*xval[i]*q; sumq2 += w*q*q` from tables per (element, level)."""
    sumqx = F32(0.0)
    sumq2 = F32(0.0)
    for i in range(n):
        sumqx += wxq[3 * i + L[i]]
        sumq2 += wqq[3 * i + L[i]]
    return sumqx, sumq2


@kernel
def _quantize(x, qw, use_qw, kind, nums, out, d, kmap, start, length, flat, slots, codes):
    """quantize_row_iq2_{xxs,xs,s}_impl (kind 0, 1, 2) over blocks x [nb, 256] (weights qw if use_qw) -> the
    blocks' bytes in out [nb, block_bytes], but for the fp16 scale (bytes 0, 1), which goes to d [nb] as float32.
    Returns -1, or the first block where ggml would abort (no neighbour scored below FLT_MAX)."""
    kmap, start, length, flat, slots, codes = (borrowed(kmap), borrowed(start), borrowed(length), borrowed(flat),
                                               borrowed(slots), borrowed(codes))
    G = 32 if kind == 0 else 16
    ngroups = QK_K // G
    nk = G // 8
    ntry = nums.shape[0]
    parity = kind != 2  # 7 sign bits and an even number of flips
    eps = F32(1e-8) if kind == 2 else F32(1e-15)  # GROUP_MAX_EPS_IQ2_S, GROUP_MAX_EPS
    npoints = codes.shape[0]
    weight = np.empty(G, np.float32)
    waux = np.empty(G, np.float32)
    xval = np.empty(G, np.float32)
    wxq = np.empty(3 * G, np.float32)
    wqq = np.empty(3 * G, np.float32)
    L = np.empty(G, np.int64)
    Laux = np.empty(G, np.int64)
    qpL = np.empty(G, np.uint8)
    terms = np.empty(24, np.float32)
    Lv = np.empty((ntry, G), np.int64)
    U = np.empty((ntry, nk), np.int64)
    gsel = np.empty(nk, np.int64)
    gaux = np.empty(nk, np.int64)
    signs = np.empty((ngroups, nk), np.int64)
    points = np.empty((ngroups, nk), np.int64)
    scales = np.empty(ngroups, np.float32)
    for b in range(x.shape[0]):
        xb = x[b]
        sumx2 = F32(0.0)
        for i in range(QK_K):
            sumx2 += xb[i] * xb[i]
        sigma2 = (F32(2.0) * sumx2 if kind == 2 else sumx2) / F32(QK_K)
        max_scale = F32(0.0)
        for g in range(ngroups):
            o = g * G
            for i in range(G):
                xi = xb[o + i]
                if use_qw:
                    weight[i] = qw[b, o + i] * np.sqrt(sigma2 + xi * xi)
                else:  # IQ2_S only
                    weight[i] = F32(0.25) * sigma2 + xi * xi
                waux[i] = np.sqrt(weight[i])
            for k in range(nk):
                sg = octet_signs(xb, o + 8 * k, weight, xval, 8 * k, parity)
                signs[g, k] = sg & 127 if parity else sg
            mx = xval[0]
            for i in range(1, G):
                mx = mx if mx > xval[i] else xval[i]  # MAX(max, xval[i])
            base = mx
            scale = mx / F32(5.0)
            zero = mx < eps
            if kind == 0 and not zero:  # XXS: trials around make_qp_quants' scale, as eff_max = 3 * scale
                scale = make_qp_quants(32, 4, xval, qpL, weight)
                base = scale * F32(3.0)
                zero = base <= F32(0.0)
            if zero:
                scales[g] = F32(0.0)
                for k in range(nk):
                    signs[g, k] = 0
                    points[g, k] = 0
                continue
            for i in range(G):
                wx = weight[i] * xval[i]
                for l in range(3):
                    q = F32(2 * l + 1)
                    wxq[3 * i + l] = wx * q
                    wqq[3 * i + l] = weight[i] * q * q
            # the trials; on the grid: gsel >= 0, off it: -1 - point (XS, S requantize those)
            best = F32(0.0)
            for k in range(nk):
                gsel[k] = kmap[0]
            for i in range(G):
                L[i] = 0
            fast = _trial_words(nums, base, xval, G, Lv, U)
            for t in range(ntry):
                id_ = nums[t] / base
                s = F32(1.0) / id_
                same = t > 0  # the same points (and on/off the grid) as the trial before: its fit and test
                for k in range(nk):
                    if fast:
                        for i in range(8 * k, 8 * k + 8):
                            Laux[i] = Lv[t, i]
                        gk = _place(U[t, k], s, xval, waux, 8 * k, Laux, terms, kmap, start, length, flat, slots,
                                    codes)
                    else:
                        gk = _octet(id_, s, xval, waux, 8 * k, Laux, terms, kmap, start, length, flat, slots, codes)
                    if gk == -1 - npoints:
                        return b
                    same &= gk == gaux[k]
                    gaux[k] = gk
                if same:  # the same sums: rejected again, or accepted again into the same state
                    continue
                sumqx, sumq2 = _fit(Laux, wxq, wqq, G)
                if sumq2 > F32(0.0) and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    for i in range(G):
                        L[i] = Laux[i]
                    for k in range(nk):
                        gsel[k] = gaux[k]
            redo = False
            for k in range(nk):
                redo |= kind == 0 or gsel[k] < 0
            if redo and scale > F32(0.0):  # requantize at the chosen scale: XXS every octet, else those off the grid
                id_ = F32(1.0) / scale
                for k in range(nk):
                    if kind == 0 or gsel[k] < 0:
                        gsel[k] = _octet(id_, scale, xval, waux, 8 * k, L, terms, kmap, start, length, flat, slots,
                                         codes)
                        if gsel[k] == -1 - npoints:
                            return b
                sumqx, sumq2 = _fit(L, wxq, wqq, G)
                if sumq2 > F32(0.0):
                    scale = sumqx / sumq2
            if scale < F32(0.0):  # C: "should never happen": flip the scale and every sign
                scale = -scale
                for k in range(nk):
                    signs[g, k] = ~signs[g, k] & (127 if parity else 255)
            for k in range(nk):
                points[g, k] = gsel[k] if gsel[k] >= 0 else -1 - gsel[k]
            scales[g] = scale
            max_scale = max_scale if max_scale > scale else scale  # MAX(max_scale, scale)

        ob = out[b]  # the fp16 scale (bytes 0, 1) is written by the caller
        ob[2:] = 0
        if max_scale == F32(0.0):  # C: if (!max_scale): an all-zero block
            d[b] = F32(0.0)
            continue
        db = max_scale / F32(31.0)
        d[b] = db * F32(0.9875) if kind == 2 else db
        idb = F32(1.0) / db
        for g in range(ngroups):
            l = max(0, min(15, nearest_int_bits(F32(0.5) * (idb * scales[g] - F32(1.0)))))
            if kind == 0:  # per group two uint32: 4 grid bytes; 4 x 7 sign bits | scale << 28
                aux = l << 28
                for k in range(4):
                    ob[2 + 8 * g + k] = points[g, k]
                    aux |= signs[g, k] << (7 * k)
                for j in range(4):
                    ob[2 + 8 * g + 4 + j] = (aux >> (8 * j)) & 255
            elif kind == 1:  # uint16 per octet: 9-bit point | signs << 9; then 4-bit scales
                for k in range(2):
                    v = points[g, k] | (signs[g, k] << 9)
                    ob[2 + 4 * g + 2 * k] = v & 255
                    ob[2 + 4 * g + 2 * k + 1] = v >> 8
                ob[66 + g // 2] |= l << (4 * (g % 2))
            else:  # 32 low point bytes, 32 sign bytes, 8 bytes of 2 high point bits, 8 of 4-bit scales
                for k in range(2):
                    i8 = 2 * g + k
                    ob[2 + i8] = points[g, k] & 255
                    ob[34 + i8] = signs[g, k]
                    ob[66 + i8 // 4] |= (points[g, k] >> 8) << (2 * (i8 % 4))
                ob[74 + g // 2] |= l << (4 * (g % 2))
    return -1


_NO_WEIGHTS = np.zeros((1, QK_K), np.float32)


class _IQ2(Quantizer):
    spec: _Spec
    fp16_scales = slice(0, 2)
    chunk = 128

    def quantize_blocks(self, x, qw=None):
        if x.device.type != "cpu":  # the kernels run on CPU
            return super().quantize_blocks(x.cpu(), None if qw is None else qw.cpu()).to(x.device)
        return super().quantize_blocks(x, qw)

    def quantize_chunk(self, out, x, qw, buf):
        spec = self.spec
        if qw is None and spec is not S:
            raise ValueError(f"{spec.name} needs an importance matrix (ggml_quantize_requires_imatrix)")
        o = out.numpy()
        d = np.empty(o.shape[0], np.float32)
        w = _NO_WEIGHTS if qw is None else np.ascontiguousarray(qw.numpy())
        bad = _quantize(np.ascontiguousarray(x.numpy()), w, qw is not None, spec.kind, spec.nums, o, d,
                        *_tables(spec.name))
        if bad >= 0:
            raise ValueError(f"{spec.name}: block {bad} has no finite neighbour score (ggml aborts on it)")
        o[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)  # round to nearest even, as ggml

    def _grid_values(self, gi: torch.Tensor) -> torch.Tensor:
        levels = torch.tensor([8.0, 25.0, 43.0], device=gi.device)  # the dequantizer's grid bytes
        return levels[grid(self.spec.name).codes.to(gi.device)][gi.long()]  # [..., 8]


class IQ2_XXS(_IQ2, name="IQ2_XXS"):
    """256-blocks: fp16 d, 8 groups of 32 as two uint32: 4 grid bytes | 4 x 7 sign bits, 4-bit scale << 28."""

    spec = XXS

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
