"""GGML IQ3_XXS and IQ3_S (3-bit D4-lattice codebooks): numba ports of ggml-quants.c, bytes identical to ggml's.

quantize_row_iq3_xxs_impl / quantize_row_iq3_s_impl per block in C's order and C's float32 arithmetic
(compiled.kernel): weights, sign folding (IQ3_XXS: an even number of flips, the least important element keeps
its sign), 31 (XXS) or 19 (S) trial inverse scales, each group of 32 rounded quad by quad onto the 256- or
512-point grid (off the grid: iq3_find_best_neighbour over ggml's neighbour list), the trial with the best
`sumqx^2 / sumq2` kept, off-grid quads requantized at its scale, then the 4-bit group scales.
What differs from C is only what is computed once or side by side: the fit sums of a trial resume after the
leading quads whose points equal the previous trial's (the same float additions in the same order give the
same partial sums), and every trial's levels are rounded in one branch-free loop. The neighbour search scores
its list in strips of LANES points in SIMD lanes (each lane C's float ops in C's order; lists padded with
copies of their first point, which tie with it and so are never kept), then takes the least score (a min is
exact in any order) and the first listed point holding it: C's "first strictly better than the best so far"
from FLT_MAX picks exactly that point. The requantization at the chosen scale runs as one more trial row.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from grokquant.quant.ggml.base import Quantizer, fp16_bytes, fp16_from_bytes
from grokquant.quant.ggml.compiled import F32, inline, kernel, nearest_int_bits, octet_signs
from grokquant.quant.ggml.iq_grids import grid

QK_K = 256
XXS_EPS = F32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
FLT_MAX = F32(np.finfo(np.float32).max)


LANES = 16  # neighbours scored side by side: a list is padded to whole strips of LANES


@lru_cache(maxsize=None)
def _tables(name: str):
    """(index, first, nbr_point, nbr_q, grid_q) numpy arrays: word u's neighbour list in strips
    first[u]:first[u+1] of LANES entries, nbr_point [strips, LANES] its grid points in ggml's order, nbr_q
    [strips, 4, LANES] their odd values per coordinate as int8 (C's grid type; a strip is one 64-byte cache
    line, and the table stays in L2). A list is padded with copies of its first point: a copy
    scores exactly as that point, and the search keeps the first of equal scores, so no copy is ever picked."""
    g = grid(name)
    index = g.index.numpy().astype(np.int32)
    nb = g.neighbours.numpy().astype(np.int32)
    count = (nb >= 0).sum(1)
    strips = -(-count // LANES)
    first = np.zeros(len(index) + 1, np.int32)
    first[1:] = np.cumsum(strips)
    width = -(-nb.shape[1] // LANES) * LANES
    padded = np.repeat(nb[:, :1], width, axis=1)
    padded[:, :nb.shape[1]] = np.where(nb >= 0, nb, nb[:, :1])
    used = np.arange(width // LANES) < strips[:, None]  # [words, strips of the widest list]
    nbr_point = padded.reshape(len(nb), -1, LANES)[used]
    values = np.ascontiguousarray(g.values.numpy(), dtype=np.float32)
    nbr_q = np.ascontiguousarray(values[nbr_point].transpose(0, 2, 1).astype(np.int8))
    return index, first, nbr_point, nbr_q, values


@inline
def _levels(xval, ids, Lv, t):
    """Row t of Lv: C's levels MAX(0, MIN(7, nearest_int(0.5f*(id*x - 1)))) at id = ids[t] (branch-free)."""
    for i in range(32):
        Lv[t, i] = max(0, min(7, nearest_int_bits(F32(0.5) * (ids[t] * xval[i] - F32(1)))))


@inline
def _least(d2, ns, lane):
    """The least non-NaN value of d2[:ns] (inf if none): per lane over the strips, then over the LANES = 16
    lanes in a tree of four halvings (SIMD; a min is exact, so its order does not matter)."""
    for j in range(LANES):
        lane[j] = np.inf
    for m in range(ns):
        for j in range(LANES):
            v = d2[m, j]
            lane[j] = v if v < lane[j] else lane[j]
    for j in range(8):
        lane[j] = lane[j + 8] if lane[j + 8] < lane[j] else lane[j]
    for j in range(4):
        lane[j] = lane[j + 4] if lane[j + 4] < lane[j] else lane[j]
    for j in range(2):
        lane[j] = lane[j + 2] if lane[j + 2] < lane[j] else lane[j]
    return lane[1] if lane[1] < lane[0] else lane[0]


@inline
def _points(xval, waux, Lv, sv, t0, t1, quads, index, first, nbr_point, nbr_q, P, ON, d2, lane):
    """Rows t0:t1 of Lv onto the grid for the quads in bitmask `quads`: P[t, k] the grid point (off the grid:
    iq3_find_best_neighbour at scale sv[t]), ON[t, k] whether the word was on the grid.

    The neighbour search scores each strip of LANES listed points in SIMD lanes (every lane C's float ops in
    C's order), then keeps the first point of least score below FLT_MAX (C: `d2 < best` from FLT_MAX; none
    below it: the first point). It is written out here rather than in a helper called per word: numba
    reference-counted that helper's array arguments at every call (two atomic operations each), which cost
    more than the search."""
    for k in range(8):
        if not (quads >> k) & 1:
            continue
        o = 4 * k
        x0, x1, x2, x3 = xval[o], xval[o + 1], xval[o + 2], xval[o + 3]
        w0, w1, w2, w3 = waux[o], waux[o + 1], waux[o + 2], waux[o + 3]
        for t in range(t0, t1):
            u = Lv[t, o] | (Lv[t, o + 1] << 3) | (Lv[t, o + 2] << 6) | (Lv[t, o + 3] << 9)
            p = index[u]
            ON[t, k] = p >= 0
            if p < 0:
                s = sv[t]
                a = first[u]
                ns = first[u + 1] - a
                for m in range(ns):
                    for j in range(LANES):
                        q0 = s * F32(nbr_q[a + m, 0, j]) - x0
                        q1 = s * F32(nbr_q[a + m, 1, j]) - x1
                        q2 = s * F32(nbr_q[a + m, 2, j]) - x2
                        q3 = s * F32(nbr_q[a + m, 3, j]) - x3
                        d = w0 * q0 * q0
                        d += w1 * q1 * q1
                        d += w2 * q2 * q2
                        d += w3 * q3 * q3
                        d2[m, j] = d
                p = nbr_point[a, 0]
                least = _least(d2, ns, lane)
                if least < FLT_MAX:
                    for m in range(ns * LANES):
                        if d2[m // LANES, m % LANES] == least:
                            p = nbr_point[a + m // LANES, m % LANES]
                            break
            P[t, k] = p


@kernel
def _sums(pts, weight, wx, grid_q):
    sumqx = F32(0)
    sumq2 = F32(0)
    for k in range(8):
        for i in range(4):
            q = grid_q[pts[k], i]
            sumqx += wx[4 * k + i] * q
            sumq2 += weight[4 * k + i] * q * q
    return sumqx, sumq2


@kernel
def _search(xval, weight, waux, mx, lo, hi, xxs, index, first, nbr_point, nbr_q, grid_q, P, ON, best_pts, d2,
            lane, wx, ids, sv, Lv, SQX, SQ2):
    """One group's trials -> its scale (best_pts gets its points). Scratch from the caller (an allocation per
    group costs more than the group's rounding): wx [32]; per trial t (and row T for the requantization) ids
    the inverse scale, sv the scale C passes to the neighbour search, Lv [T + 1, 32] the levels, P, ON
    [T + 1, 8] as `_points`; SQX, SQ2 [9] the fit sums after each quad (index 0 holds 0)."""
    T = hi - lo + 1
    for i in range(32):
        wx[i] = weight[i] * xval[i]
    for t in range(T):
        ids[t] = (F32(15) + F32(lo + t) * F32(0.2)) / mx
        sv[t] = F32(1) / ids[t]
        _levels(xval, ids, Lv, t)
    _points(xval, waux, Lv, sv, 0, T, 255, index, first, nbr_point, nbr_q, P, ON, d2, lane)
    best = F32(0)
    scale = mx / F32(15)
    pick = -1
    # C sums over the 32 elements from 0 each trial; the partial sums after the quads whose points did not
    # change since the previous trial are the same numbers, so each trial resumes after them
    kq = 0
    for t in range(T):
        if t > 0:
            kq = 0
            while kq < 8 and P[t, kq] == P[t - 1, kq]:
                kq += 1
        sqx = SQX[kq]
        sq2 = SQ2[kq]
        for k in range(kq, 8):
            g = P[t, k]
            for i in range(4):
                q = grid_q[g, i]
                sqx += wx[4 * k + i] * q
                sq2 += weight[4 * k + i] * q * q
            SQX[k + 1] = sqx
            SQ2[k + 1] = sq2
        sumqx, sumq2 = SQX[8], SQ2[8]
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            pick = t
    redo = 0  # the quads C requantizes at the chosen scale: IQ3_XXS those off the grid, IQ3_S all (if any is)
    for k in range(8):
        best_pts[k] = index[0] if pick < 0 else P[pick, k]
        on = xxs if pick < 0 else ON[pick, k]
        if not on:
            redo |= 1 << k
    if redo and scale > 0:
        if not xxs:
            redo = 255
        ids[T] = F32(1) / scale
        sv[T] = scale
        _levels(xval, ids, Lv, T)
        _points(xval, waux, Lv, sv, T, T + 1, redo, index, first, nbr_point, nbr_q, P, ON, d2, lane)
        for k in range(8):
            if (redo >> k) & 1:
                best_pts[k] = P[T, k]
        sumqx, sumq2 = _sums(best_pts, weight, wx, grid_q)
        if sumq2 > 0:
            scale = sumqx / sumq2
    return scale


@kernel
def _iq3_blocks(x, qw, use_qw, out, dsc, xxs, index, first, nbr_point, nbr_q, grid_q):
    nb = x.shape[0]
    weight = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    P = np.empty((32, 8), np.int32)
    ON = np.empty((32, 8), np.bool_)
    best_pts = np.empty(8, np.int32)
    d2 = np.empty((-(-64 // LANES), LANES), np.float32)
    lane = np.empty(LANES, np.float32)
    wx = np.empty(32, np.float32)
    ids = np.empty(32, np.float32)
    sv = np.empty(32, np.float32)
    Lv = np.empty((32, 32), np.int32)
    SQX = np.zeros(9, np.float32)
    SQ2 = np.zeros(9, np.float32)
    signs = np.empty(4, np.int64)
    scales = np.empty(8, np.float32)
    skip = np.empty(8, np.bool_)
    lo = -15 if xxs else -9
    for b in range(nb):
        xb = x[b]
        out[b, :] = 0
        sumx2 = F32(0)
        for i in range(QK_K):
            sumx2 += x[b, i] * x[b, i]
        sigma2 = F32(2) * sumx2 / F32(QK_K)
        max_scale = F32(0)
        nq = 0  # IQ3_S: groups written so far
        for ib in range(8):
            o = 32 * ib
            for i in range(32):
                xi = x[b, o + i]
                if use_qw:
                    weight[i] = qw[b, o + i] * np.sqrt(sigma2 + xi * xi)
                else:
                    weight[i] = xi * xi
                waux[i] = np.sqrt(weight[i])
            for k in range(4):
                s = octet_signs(xb, o + 8 * k, weight, xval, 8 * k, xxs)
                signs[k] = s & 127 if xxs else s
            mx = xval[0]
            for i in range(1, 32):
                mx = mx if mx > xval[i] else xval[i]
            skip[ib] = (mx < XXS_EPS) if xxs else (mx == 0)
            if skip[ib]:
                scales[ib] = 0
                continue
            scale = _search(xval, weight, waux, mx, lo, -lo, xxs, index, first, nbr_point, nbr_q, grid_q,
                            P, ON, best_pts, d2, lane, wx, ids, sv, Lv, SQX, SQ2)
            if scale < 0:
                scale = -scale
                for k in range(4):
                    signs[k] = (~signs[k]) & (127 if xxs else 255)
            if xxs:
                for k in range(8):
                    out[b, 2 + 8 * ib + k] = best_pts[k]
                word = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21)
                for j in range(4):
                    out[b, 66 + 4 * ib + j] = (word >> (8 * j)) & 255
            else:
                for k in range(8):
                    out[b, 2 + 8 * nq + k] = best_pts[k] & 255
                    out[b, 66 + ib] |= (best_pts[k] >> 8) << k
                for k in range(4):
                    out[b, 74 + 4 * nq + k] = signs[k]
                nq += 1
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if not max_scale:
            dsc[b] = 0
            if xxs:
                out[b, :] = 0
            continue
        d = max_scale / F32(31)
        dsc[b] = d * (F32(1.0125) if xxs else F32(1.033))
        id_ = F32(1) / d
        for ib in range(8):
            l = nearest_int_bits(F32(0.5) * (id_ * scales[ib] - F32(1)))
            l = max(0, min(15, l))
            if xxs:
                out[b, 66 + 4 * ib + 3] |= l << 4
            else:
                out[b, 106 + ib // 2] |= l << (4 * (ib % 2))


_NO_WEIGHTS = np.zeros((0, QK_K), np.float32)


class _IQ3(Quantizer):
    fp16_scales = slice(0, 2)
    chunk = 64
    xxs: bool

    def quantize_blocks(self, x, qw=None):
        if x.device.type != "cpu":
            return super().quantize_blocks(x.cpu(), None if qw is None else qw.cpu()).to(x.device)
        return super().quantize_blocks(x, qw)

    def quantize_chunk(self, out, x, qw, buf):
        xn = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        wn = _NO_WEIGHTS if qw is None else np.ascontiguousarray(qw.detach().numpy(), dtype=np.float32)
        d = np.empty(xn.shape[0], np.float32)
        _iq3_blocks(xn, wn, qw is not None, out.numpy(), d, self.xxs, *_tables(self.name))
        out[:, 0:2] = fp16_bytes(torch.from_numpy(d)[:, None])


@lru_cache(maxsize=None)
def _dequant_grid(name: str) -> torch.Tensor:
    import gguf.quants

    cls = getattr(gguf.quants, name)
    cls.init_grid()
    return torch.from_numpy(cls.grid.reshape(-1, 4).astype("float32"))


class IQ3_XXS(_IQ3, name="IQ3_XXS"):
    """fp16 d, 64 grid indices (256-point grid), per group a u32 of four 7-bit sign fields and a 4-bit scale
    on top; y = d * (0.5 + s) * 0.5 * grid * sign."""

    xxs = True

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        word = torch.empty(nb, 32, dtype=torch.uint8, device=b.device).copy_(b[:, 66:98]).view(torch.int32)
        db = fp16_from_bytes(b[:, 0:2]) * (0.5 + ((word >> 28) & 15).float()) * 0.5  # [nb, 8]
        s7 = (word[..., None] >> torch.tensor([0, 7, 14, 21], dtype=torch.int32, device=b.device)) & 127
        parity = s7.clone()
        for i in (4, 2, 1):
            parity ^= parity >> i
        s8 = s7 | ((parity & 1) << 7)  # ksigns_iq2xs: the 8th sign makes the count even
        return _magnitudes(self.name, b[:, 2:66].long(), db, s8)


class IQ3_S(_IQ3, name="IQ3_S"):
    """fp16 d, 64 low index bytes, 8 bytes of 9th index bits (512-point grid), 32 sign bytes, 4 bytes of
    4-bit scales; y = d * (1 + 2 s) * grid * sign."""

    xxs = False

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        bits = torch.arange(8, dtype=torch.int32, device=b.device)
        sc = b[:, 106:110].int()
        db = fp16_from_bytes(b[:, 0:2]) * (1 + 2 * torch.stack([sc & 15, sc >> 4], 2).view(nb, 8)).float()
        hi = ((b[:, 66:74, None].int() >> bits) & 1).view(nb, 64)
        return _magnitudes(self.name, (b[:, 2:66].int() | (hi << 8)).long(), db, b[:, 74:106].int().view(nb, 8, 4))


def _magnitudes(name: str, idx, db, s8):
    """dequantize_row_iq3_*: grid indices [nb, 64], group scales db [nb, 8], sign bytes [nb, 8, 4] -> y."""
    nb = idx.shape[0]
    grid_v = _dequant_grid(name).to(idx.device)[idx].view(nb, 8, 4, 8)
    neg = (s8[..., None] >> torch.arange(8, dtype=torch.int32, device=idx.device)) & 1  # [nb, 8, 4, 8]
    return (db[..., None, None] * grid_v * (1 - 2 * neg.float())).view(nb, QK_K)
