"""GGML IQ1_S and IQ1_M (1-bit lattice codebooks): numba ports of ggml-quants.c, bytes identical to ggml's.

quantize_row_iq1_s_impl (groups of 32, one shift sign per group) and quantize_row_iq1_m_impl (groups of 16,
a shift sign per 8-element word) run here per block in C's order, compiled (compiled.kernel: IEEE float32,
no fused multiply-add, no reassociation, so every float op rounds as the C's does):
1. weights qw * sqrtf(sigma2 + x^2) (IQ1_M without imatrix: x^2); groups with max |x| < GROUP_MAX_EPS_* stay 0;
2. sort each group (glibc's qsort is a stable merge sort at these sizes: ties keep element order, -0.0 == 0.0),
   take prefix sums of w*x and w in sorted order (IQ1_M: per half), and try every split i1 <= i2 of the
   sorted values into the levels -1, 0, 1 (shifted by +-DELTA) with C's `sumqx^2 > best*sumq2` rule;
3. round each 8-element word onto the 2048-point grid (kmap, else iq1_find_best_neighbour2 over ggml's
   neighbour list), refit the group scale, pack the 3-bit group scales against the block scale.
Speed without changing a byte: the C loop keeps a candidate only when it passes the test against the best
so far, so a strip of candidates (one i1) where none passes against the best at its start is skipped after a
branch-free (vectorised) check, and only strips with a pass are replayed in order. The neighbour search sums
precomputed per-element error terms (the C's own float products), first-four-element partial sums from an
81-entry table; a neighbour whose partial or approximate total provably cannot beat the best is skipped.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from grokquant.quant.ggml import iq_grids
from grokquant.quant.ggml.base import Quantizer, fp16_from_bytes
from grokquant.quant.ggml.compiled import bits, kernel, nearest_int

F32 = np.float32
DELTA = 0.125  # IQ1S_DELTA = IQ1M_DELTA
# C's x_p (row 0, shift +DELTA) and x_m (row 1, shift -DELTA): the three level values, all exact in fp32
XS = np.array([[-1 + DELTA, DELTA, 1 + DELTA], [-1 - DELTA, -DELTA, 1 - DELTA]], dtype=np.float32)
FLT_MAX = F32(np.finfo(np.float32).max)
GROUP_MAX_EPS_IQ1_S = F32(1e-12)
GROUP_MAX_EPS_IQ1_M = F32(1e-7)


@lru_cache(maxsize=None)
def _tables():
    """The IQ1_S grid as numpy arrays: kmap (packed 2-bit word -> grid index or -1), the grid points' levels
    [2048, 8], and the neighbour lists of off-grid words (word u's at first[u]:first[u+1], in ggml's order)
    twice: their grid indices and, per neighbour, its levels packed for `_nearest_neighbour` (the base-3 code
    of levels 0..3 in bits 0..7, level j = 4..7 in bits 2j..2j+1)."""
    grid = iq_grids.grid("IQ1_S")
    codes = grid.codes.numpy().astype(np.uint8)
    kmap = grid.index.numpy().astype(np.int32)
    nb = grid.neighbours.numpy()
    first = np.zeros(len(nb) + 1, dtype=np.int32)
    np.cumsum((nb >= 0).sum(1), out=first[1:])
    flat = nb[nb >= 0].astype(np.int16)  # row-major: each word's list in order
    c = codes.astype(np.int32)
    packed = c[:, :4] @ np.array([1, 3, 9, 27]) + (c[:, 4:] << np.arange(8, 16, 2)).sum(1)
    return kmap, codes, first, flat, packed[flat].astype(np.uint16)


# ---- shared steps (per group, offset o into the block's x and weights) ----------------------------------

@kernel
def _weights(xb, qw, has_qw, w):
    """w[256] = qw * sqrtf(sigma2 + x^2), sigma2 = 2*sum(x^2)/QK_K (float, in element order); x^2 without qw."""
    sumx2 = F32(0)
    for i in range(256):
        sumx2 += xb[i] * xb[i]
    sigma2 = F32(2) * sumx2 / F32(256)
    for i in range(256):
        w[i] = qw[i] * np.sqrt(sigma2 + xb[i] * xb[i]) if has_qw else xb[i] * xb[i]


@kernel
def _group_max(xb, o, n):
    """C's max of fabsf over the group: max = MAX(max, fabsf(x))."""
    m = abs(xb[o])
    for i in range(1, n):
        a = abs(xb[o + i])
        m = m if m > a else a
    return m


@kernel
def _sort_group(xb, o, n, order, keys):
    """order[:n]: the group's positions by ascending value, ties in element order: the order of glibc's qsort
    with iq1_sort_helper (a stable merge sort at these sizes; `<` takes -0.0 as 0.0). Each element's place is
    the count of smaller keys, key = the value's bits made to sort as integers, then its position (a
    branch-free count over all n, which vectorises); with a NaN, counts are no order (and the group finds no
    split, so any order will do): then an insertion sort."""
    nan = False
    for i in range(n):
        nan |= xb[o + i] != xb[o + i]
    if nan:
        for i in range(n):
            j = i
            while j > 0 and xb[o + order[j - 1]] > xb[o + i]:
                order[j] = order[j - 1]
                j -= 1
            order[j] = i
        return
    for i in range(n):
        u = np.int64(bits(xb[o + i] + F32(0)))  # + 0: -0.0 becomes 0.0, as equal to it as `<` takes it
        u = u ^ np.int64(0x7FFFFFFF) if u < 0 else u  # negatives: larger magnitude, smaller integer
        keys[i] = (u << 6) | i
    for i in range(n):
        k = keys[i]
        r = 0
        for j in range(n):
            r += keys[j] < k
        order[r] = i


@kernel
def _nearest_neighbour(xb, w, o, scale, xx, row, first, last, flat, packed, e, lo4):
    """iq1_find_best_neighbour2: the first listed grid point with the least d2 = sum over the word of
    w*(scale*xx[row, level] - x)^2, summed in element order from 0 (`d2 < best`, best from FLT_MAX).

    e[3*j + l] is element j's term at level l, the C's own product (w*diff)*diff, and lo4 the 81 sums of the
    first four in C's order, so d2 = (((lo4 + e4) + e5) + e6) + e7 exactly: 5 lookups and 4 adds per
    neighbour, without branches but the rare `d2 < best`."""
    for j in range(8):
        for lv in range(3):
            diff = scale * xx[row, lv] - xb[o + j]
            e[3 * j + lv] = (w[o + j] * diff) * diff
    for c0 in range(3):  # lo4[c0 + 3*c1 + 9*c2 + 27*c3]
        s1 = F32(0) + e[c0]
        for c1 in range(3):
            s2 = s1 + e[3 + c1]
            for c2 in range(3):
                s3 = s2 + e[6 + c2]
                for c3 in range(3):
                    lo4[c0 + 3 * c1 + 9 * c2 + 27 * c3] = s3 + e[9 + c3]
    best = FLT_MAX
    index = -1
    for p in range(first, last):
        t = packed[p]
        d2 = (((lo4[t & 255] + e[12 + ((t >> 8) & 3)]) + e[15 + ((t >> 10) & 3)]) + e[18 + ((t >> 12) & 3)]) \
            + e[21 + (t >> 14)]
        if d2 < best:
            best = d2
            index = p
    # no neighbour below FLT_MAX: ggml goes on over the whole grid reading past the word (and then aborts);
    # we keep the first neighbour
    return flat[first] if index < 0 else flat[index]


@kernel
def _onto_grid(xb, w, o, n, L, scale, xx, word_neg, kmap, codes, first, flat, packed, e, lo4, index):
    """Grid index per 8-element word of the group's levels L (index[:n//8]); word k's level values are
    xx[word_neg[k]]. Returns the scale, refit over the grid points when a word was off the grid."""
    on_grid = True
    for k in range(n // 8):
        u = 0
        for j in range(8):
            u |= L[8 * k + j] << (2 * j)
        g = kmap[u]
        if g < 0:
            on_grid = False
            g = _nearest_neighbour(xb, w, o + 8 * k, scale, xx, word_neg[k], first[u], first[u + 1], flat,
                                   packed, e, lo4)
        index[k] = g
    if on_grid:
        return scale
    sumqx = F32(0)
    sumq2 = F32(0)
    for k in range(n // 8):
        v = xx[word_neg[k]]
        for j in range(8):
            q = v[codes[index[k], j]]
            wq = w[o + 8 * k + j] * q
            sumqx += wq * xb[o + 8 * k + j]
            sumq2 += wq * q
    return sumqx / sumq2 if sumqx > 0 and sumq2 > 0 else scale


@kernel
def _levels_of_split(order, n, i1, i2, L):
    """L[element] = 0, 1, 2 for sorted positions < i1, < i2, the rest."""
    for j in range(n):
        L[order[j]] = 0 if j < i1 else (1 if j < i2 else 2)


@kernel
def _scale_code(idv, scale):
    """The 3-bit group scale: nearest_int(0.5*(scale/d - 1)) clamped to 0..7."""
    return max(0, min(7, nearest_int(F32(0.5) * (idv * scale - F32(1)))))


# ---- IQ1_S --------------------------------------------------------------------------------------------

@kernel
def _iq1s_split(xb, w, o, order, S, W, T):
    """quantize_row_iq1_s_impl's search over i1 <= i2 <= 32, shift +DELTA then -DELTA per pair ->
    (i1 or -1, i2, shift 1 / -1, scale). S, W [33]: prefix sums; T [8, 33] scratch for the terms of sumqx
    and sumq2 that depend on i1 or i2 alone."""
    n = 32
    S[0] = F32(0)
    W[0] = F32(0)
    for j in range(n):
        i = o + order[j]
        S[j + 1] = S[j] + w[i] * xb[i]
        W[j + 1] = W[j] + w[i]
    p0, p1, p2 = XS[0, 0], XS[0, 1], XS[0, 2]
    m0, m2 = XS[1, 0], XS[1, 2]
    for i in range(n + 1):
        T[0, i] = (S[i] - S[0]) * p0
        T[1, i] = (S[i] - S[0]) * m0
        T[2, i] = (S[n] - S[i]) * p2
        T[3, i] = (S[n] - S[i]) * m2
        T[4, i] = ((W[i] - W[0]) * p0) * p0
        T[5, i] = ((W[i] - W[0]) * m0) * m0
        T[6, i] = ((W[n] - W[i]) * p2) * p2
        T[7, i] = ((W[n] - W[i]) * m2) * m2
    # middle level: (dS*x_m[1]) = -(dS*x_p[1]) and ((dW*x_m[1])*x_m[1]) = ((dW*x_p[1])*x_p[1]), exactly
    best = -FLT_MAX
    scale = F32(0)
    bi1, bi2, shift = -1, -1, 0
    for i1 in range(n + 1):
        s1, w1 = S[i1], W[i1]
        ap, am, awp, awm = T[0, i1], T[1, i1], T[4, i1], T[5, i1]
        hit = False
        for i2 in range(i1, n + 1):  # does any candidate pass against the best at the strip's start?
            t = (S[i2] - s1) * p1
            u = ((W[i2] - w1) * p1) * p1
            qp, q2p = (ap + t) + T[2, i2], (awp + u) + T[6, i2]
            qm, q2m = (am - t) + T[3, i2], (awm + u) + T[7, i2]
            hit |= ((q2p > 0) & (qp * qp > best * q2p)) | ((q2m > 0) & (qm * qm > best * q2m))
        if not hit:
            continue
        for i2 in range(i1, n + 1):  # C's loop over the strip
            t = (S[i2] - s1) * p1
            u = ((W[i2] - w1) * p1) * p1
            qp, q2p = (ap + t) + T[2, i2], (awp + u) + T[6, i2]
            if q2p > 0 and qp * qp > best * q2p:
                scale = qp / q2p
                best = scale * qp
                bi1, bi2, shift = i1, i2, 1
            qm, q2m = (am - t) + T[3, i2], (awm + u) + T[7, i2]
            if q2m > 0 and qm * qm > best * q2m:
                scale = qm / q2m
                best = scale * qm
                bi1, bi2, shift = i1, i2, -1
    return bi1, bi2, shift, scale


@kernel
def _quantize_iq1_s(x, qw, out, d_out, kmap, codes, first, flat, packed):
    """Blocks x, qw [nb, 256] -> out [nb, 50] (fp16 d left to the caller) and d_out [nb]: d*1.125, 0 where
    every group's scale is 0 (C writes d = 0 there and no scale bits)."""
    w = np.empty(256, np.float32)
    order = np.empty(32, np.int64)
    keys = np.empty(32, np.int64)
    L = np.empty(32, np.int64)
    S = np.empty(33, np.float32)
    W = np.empty(33, np.float32)
    T = np.empty((8, 33), np.float32)
    e = np.empty(24, np.float32)
    lo4 = np.empty(81, np.float32)
    index = np.empty(4, np.int64)
    word_neg = np.zeros(4, np.int64)
    scales = np.empty(8, np.float32)
    shifts = np.empty(8, np.int64)
    for b in range(x.shape[0]):
        xb, ob = x[b], out[b]
        ob[:] = 0
        _weights(xb, qw[b], True, w)
        max_scale = F32(0)
        for ib in range(8):
            o = 32 * ib
            scales[ib], shifts[ib] = 0, 1
            if _group_max(xb, o, 32) < GROUP_MAX_EPS_IQ1_S:
                continue
            _sort_group(xb, o, 32, order, keys)
            i1, i2, shift, scale = _iq1s_split(xb, w, o, order, S, W, T)
            if i1 < 0:
                continue
            _levels_of_split(order, 32, i1, i2, L)
            if scale < 0:
                for j in range(32):
                    L[j] = 2 - L[j]
                scale = -scale
                shift = -shift
            word_neg[:] = 0 if shift == 1 else 1
            scale = _onto_grid(xb, w, o, 32, L, scale, XS, word_neg, kmap, codes, first, flat, packed,
                               e, lo4, index)
            h = 0
            for k in range(4):
                ob[2 + 4 * ib + k] = index[k] & 255
                h |= (index[k] >> 8) << (3 * k)
            ob[34 + 2 * ib] = h & 255
            ob[35 + 2 * ib] = h >> 8
            scales[ib], shifts[ib] = scale, shift
            max_scale = max_scale if max_scale > scale else scale
        d_out[b] = 0
        if not max_scale != 0:  # C: `if (!max_scale) continue;` (a NaN goes on)
            continue
        d = max_scale / F32(15)
        d_out[b] = d * F32(1.125)
        idv = F32(1) / d
        for ib in range(8):
            l = _scale_code(idv, scales[ib]) | (8 if shifts[ib] == -1 else 0)
            ob[35 + 2 * ib] |= l << 4
    return d_out


# ---- IQ1_M --------------------------------------------------------------------------------------------

@kernel
def _iq1m_split(xb, w, o, order, P, PW, A2, B2, TX):
    """quantize_row_iq1_m_impl's search over i1 <= i2 <= 16 and k = 2*sign(half 0) + sign(half 1) (0: +DELTA,
    1: -DELTA) -> (i1 or -1, i2, k, scale). Per half h the C scores sumqx = txs*v2 - (px[i1] + px[i2]) and
    sumq2 = ((tws*v2)*v2 + pw[i1]*c1) + pw[i2]*c2 from prefix sums P, PW [2, 17] kept per half; A2, B2
    [2 halves, 2 signs, 17] hold the i1 and i2 terms of sumq2, TX [2, 2] txs*v2."""
    n = 16
    P[0, 0] = P[1, 0] = PW[0, 0] = PW[1, 0] = F32(0)
    for j in range(n):
        i = order[j]
        h = 0 if i < 8 else 1
        P[h, j + 1] = P[h, j] + w[o + i] * xb[o + i]
        P[1 - h, j + 1] = P[1 - h, j]
        PW[h, j + 1] = PW[h, j] + w[o + i]
        PW[1 - h, j + 1] = PW[1 - h, j]
    for s in range(2):
        v0, v1, v2 = XS[s, 0], XS[s, 1], XS[s, 2]
        c1, c2 = v0 * v0 - v1 * v1, v1 * v1 - v2 * v2
        for h in range(2):
            TX[h, s] = P[h, n] * v2
            a = (PW[h, n] * v2) * v2
            for i in range(n + 1):
                A2[h, s, i] = a + PW[h, i] * c1
                B2[h, s, i] = PW[h, i] * c2
    best = -FLT_MAX
    scale = F32(0)
    bi1, bi2, bk = -1, -1, -1
    for i1 in range(n + 1):
        hit = False
        for i2 in range(i1, n + 1):  # does any candidate pass against the best at the strip's start?
            sx0, sx1 = P[0, i1] + P[0, i2], P[1, i1] + P[1, i2]
            x0p, x0m, x1p, x1m = TX[0, 0] - sx0, TX[0, 1] - sx0, TX[1, 0] - sx1, TX[1, 1] - sx1
            w0p, w0m = A2[0, 0, i1] + B2[0, 0, i2], A2[0, 1, i1] + B2[0, 1, i2]
            w1p, w1m = A2[1, 0, i1] + B2[1, 0, i2], A2[1, 1, i1] + B2[1, 1, i2]
            for qx, q2 in ((x0p + x1p, w0p + w1p), (x0p + x1m, w0p + w1m),
                           (x0m + x1p, w0m + w1p), (x0m + x1m, w0m + w1m)):
                hit |= (q2 > 0) & (qx * qx > best * q2)
        if not hit:
            continue
        for i2 in range(i1, n + 1):  # C's loop over the strip
            sx0, sx1 = P[0, i1] + P[0, i2], P[1, i1] + P[1, i2]
            for k in range(4):
                a, c = k >> 1, k & 1
                qx = (TX[0, a] - sx0) + (TX[1, c] - sx1)
                q2 = (A2[0, a, i1] + B2[0, a, i2]) + (A2[1, c, i1] + B2[1, c, i2])
                if q2 > 0 and qx * qx > best * q2:
                    scale = qx / q2
                    best = scale * qx
                    bi1, bi2, bk = i1, i2, k
    return bi1, bi2, bk, scale


@kernel
def _quantize_iq1_m(x, qw, has_qw, out, d_out, live, kmap, codes, first, flat, packed):
    """Blocks x [nb, 256] (qw [nb, 256] if has_qw) -> out [nb, 56] without the fp16 d nibbles, d_out [nb]:
    d*1.1125 and live [nb]: whether the block has a nonzero group scale (C writes its scale bytes then)."""
    w = np.empty(256, np.float32)
    order = np.empty(16, np.int64)
    keys = np.empty(16, np.int64)
    L = np.empty(16, np.int64)
    P = np.empty((2, 17), np.float32)
    PW = np.empty((2, 17), np.float32)
    A2 = np.empty((2, 2, 17), np.float32)
    B2 = np.empty((2, 2, 17), np.float32)
    TX = np.empty((2, 2), np.float32)
    e = np.empty(24, np.float32)
    lo4 = np.empty(81, np.float32)
    index = np.empty(2, np.int64)
    word_neg = np.empty(2, np.int64)
    scales = np.empty(16, np.float32)
    shifts = np.empty(16, np.int64)
    grid_index = np.empty((16, 2), np.int64)
    masks = (0x00, 0x80, 0x08, 0x88)
    for b in range(x.shape[0]):
        xb, ob = x[b], out[b]
        ob[:] = 0
        _weights(xb, qw[b] if has_qw else xb, has_qw, w)
        max_scale = F32(0)
        for ib in range(16):
            o = 16 * ib
            scales[ib], shifts[ib] = 0, 0
            grid_index[ib, 0] = grid_index[ib, 1] = 0
            if _group_max(xb, o, 16) < GROUP_MAX_EPS_IQ1_M:
                continue
            _sort_group(xb, o, 16, order, keys)
            i1, i2, k, scale = _iq1m_split(xb, w, o, order, P, PW, A2, B2, TX)
            if i1 < 0:
                continue
            _levels_of_split(order, 16, i1, i2, L)
            if scale < 0:
                for j in range(16):
                    L[j] = 2 - L[j]
                scale = -scale
                k = 3 - k
            word_neg[0], word_neg[1] = k >> 1, k & 1
            scale = _onto_grid(xb, w, o, 16, L, scale, XS, word_neg, kmap, codes, first, flat, packed,
                               e, lo4, index)
            ob[2 * ib] = index[0] & 255
            ob[2 * ib + 1] = index[1] & 255
            ob[32 + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
            grid_index[ib, 0], grid_index[ib, 1] = index[0], index[1]
            scales[ib], shifts[ib] = scale, k
            max_scale = max_scale if max_scale > scale else scale
        live[b] = False
        d_out[b] = 0
        if not max_scale != 0:
            continue
        live[b] = True
        d = max_scale / F32(15)
        idv = F32(1) / d
        sumqx = F32(0)
        sumq2 = F32(0)
        for ib in range(16):  # refit d over the block's grid points and 3-bit scales
            l = _scale_code(idv, scales[ib])
            s = 48 + 2 * (ib // 4)
            v = l << (3 * (ib % 4))
            ob[s] |= v & 255
            ob[s + 1] |= v >> 8
            ob[32 + ib] |= masks[shifts[ib]]
            m = F32(2 * l + 1)
            for kw in range(2):
                xx = XS[shifts[ib] >> 1] if kw == 0 else XS[shifts[ib] & 1]
                for j in range(8):
                    i = 16 * ib + 8 * kw + j
                    q = xx[codes[grid_index[ib, kw], j]] * m
                    wq = w[i] * q
                    sumqx += wq * xb[i]
                    sumq2 += wq * q
        if sumq2 > 0:
            d = sumqx / sumq2
        d_out[b] = d * F32(1.1125)
    return d_out


# ---- the types ----------------------------------------------------------------------------------------

def _u16_bytes(v: torch.Tensor) -> torch.Tensor:
    """int [nb, k] < 2^16 -> little-endian bytes [nb, 2k]."""
    return torch.stack([v & 255, v >> 8], 2).view(v.shape[0], -1).to(torch.uint8)


def _levels(index: torch.Tensor) -> torch.Tensor:
    return iq_grids.grid("IQ1_S").codes[index]


def _arrays(x: torch.Tensor, qw: torch.Tensor | None):
    """Zero-copy numpy views of a chunk's blocks (contiguous float32 ones; others are copied once)."""
    xn = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    return xn, (xn if qw is None else np.ascontiguousarray(qw.numpy(), dtype=np.float32))


class _OnCPU(Quantizer):
    """The searches run on the CPU: a non-CPU input is quantized there and its bytes returned to its device."""

    chunk = 256  # blocks per kernel call: many calls keep the worker threads evenly busy

    def quantize_blocks(self, x, qw=None):
        if x.device.type != "cpu":
            return super().quantize_blocks(x.cpu(), None if qw is None else qw.cpu()).to(x.device)
        return super().quantize_blocks(x, qw)


class IQ1_S(_OnCPU, name="IQ1_S"):
    """256-blocks of 8 x 32: fp16 d, qs[32] low grid-index bytes, qh[8] u16 (3 high index bits per word, the
    3-bit scale s at bit 12, the shift sign at 15); y = d*(2s+1) * (grid +- DELTA). Needs an imatrix."""

    fp16_scales = slice(0, 2)

    def quantize_chunk(self, out, x, qw, buf):
        if qw is None:
            raise ValueError("IQ1_S needs an importance matrix (ggml_quantize_requires_imatrix)")
        o = out.numpy()
        d = _quantize_iq1_s(*_arrays(x, qw), o, np.empty(len(o), np.float32), *_tables())
        o[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)

    def dequantize_blocks(self, b):
        if b.device.type != "cpu":
            return self.dequantize_blocks(b.cpu()).to(b.device)
        nb = b.shape[0]
        d = fp16_from_bytes(b[:, 0:2])  # [nb, 1]
        qh = b[:, 34:50:2].long() | (b[:, 35:50:2].long() << 8)  # [nb, 8]
        index = b[:, 2:34].long().view(nb, 8, 4) | (((qh[:, :, None] >> torch.tensor([0, 3, 6, 9])) & 7) << 8)
        dl = d * (2 * ((qh >> 12) & 7) + 1).float()
        delta = torch.where((qh & 0x8000) != 0, -DELTA, DELTA)
        g = (_levels(index) - 1).float().view(nb, 8, 32)
        return (dl[:, :, None] * (g + delta[:, :, None])).view(nb, 256)


class IQ1_M(_OnCPU, name="IQ1_M"):
    """256-blocks of 16 x 16: qs[32] low grid-index bytes, qh[16] (3 high index bits and a shift sign per word),
    scales[8] = 4 u16 of 3-bit group scales s whose top nibbles hold the fp16 block scale d;
    y = d*(2s+1) * (grid +- DELTA). An imatrix is optional."""

    def quantize_chunk(self, out, x, qw, buf):
        o = out.numpy()
        nb = len(o)
        live = np.empty(nb, np.bool_)
        d = _quantize_iq1_m(*_arrays(x, qw), qw is not None, o, np.empty(nb, np.float32), live, *_tables())
        s16 = d.astype(np.float16).view(np.uint16)[live]
        sc = o[live, 48:56].copy().view(np.uint16)  # [live, 4]
        for i in range(4):  # nibble i of d on top of scale word i
            sc[:, i] |= ((s16 >> (4 * i)) & 0xF) << 12
        o[live, 48:56] = sc.view(np.uint8)

    @staticmethod
    def fp16_scale_bytes(b: torch.Tensor) -> torch.Tensor:
        """The fp16 block scale [nb, 2] bytes, gathered from the top nibbles of the scale words (this type has no
        contiguous fp16 field, so `fp16_scales` is None)."""
        sc = b[:, 48:56:2].long() | (b[:, 49:56:2].long() << 8)  # [nb, 4]
        s16 = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
        return _u16_bytes(s16[:, None])

    def dequantize_blocks(self, b):
        if b.device.type != "cpu":
            return self.dequantize_blocks(b.cpu()).to(b.device)
        nb = b.shape[0]
        qh = b[:, 32:48].long()  # [nb, 16]
        sc = b[:, 48:56:2].long() | (b[:, 49:56:2].long() << 8)  # [nb, 4]
        d = self.fp16_scale_bytes(b).view(torch.float16).float()  # [nb, 1]
        l = ((sc[:, :, None] >> torch.tensor([0, 3, 6, 9])) & 7).view(nb, 16)
        dl = d * (2 * l + 1).float()
        index = b[:, 0:32].long().view(nb, 16, 2) | (((qh[:, :, None] >> torch.tensor([0, 4])) & 7) << 8)
        delta = torch.where((qh[:, :, None] & torch.tensor([0x08, 0x80])) != 0, -DELTA, DELTA)  # [nb, 16, 2]
        g = (_levels(index) - 1).float()  # [nb, 16, 2, 8]
        return (dl[:, :, None, None] * (g + delta[..., None])).view(nb, 256)
