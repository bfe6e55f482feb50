"""The searches the K-quants and the legacy imatrix paths share, on SIMD "lanes": ports of ggml-quants.c's
make_qkx2_quants / make_qkx3_quants, make_qx_quants and make_q3_quants, bytes identical.

The sub-blocks (or blocks) of a tile sit side by side, element-major ([n, lanes]); each step of a C loop runs
for every lane in one loop over the lanes, which the compiler vectorizes. Each lane keeps its own sums in C's
order; C's per-group branches become per-lane selects, and a lane that C would have left early computes on
with its results unused. make_qkx2/3_quants keep the (iscale, min) of the best trial instead of copying its
codes, and recompute the codes from them at the end: the same float ops, so the same codes. make_q3_quants'
coordinate descent (up to 5 passes, until one moves no code) runs its first pass on all lanes, then only on
the lanes that moved, gathered side by side.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from grokquant.quant.ggml.compiled import F32, inline, kernel, nearest_int_bits

QK_K = 256
GROUP_MAX_EPS = F32(1e-15)


@lru_cache(maxsize=None)
def trial_numerators(nmax: int, rmin: float, rdelta: float, nstep: int) -> np.ndarray:
    """make_qkx2/3_quants' iscale numerators: nmax, then `rmin + rdelta*is + nmax` for is = 0..nstep (float32)."""
    r, d = F32(rmin), F32(rdelta)
    return np.array([F32(nmax)] + [(r + d * F32(i)) + F32(nmax) for i in range(nstep + 1)], np.float32)


@lru_cache(maxsize=None)
def qx_numerators(nmax: int) -> np.ndarray:
    """make_qx_quants' `nmax` and `nmax + 0.1f*is` for is = -9..9 (is != 0), in C's order (float32)."""
    return np.array([F32(nmax)] + [F32(nmax) + F32(0.1) * F32(i) for i in range(-9, 10) if i], np.float32)


# ---- the searches, on lanes: x, w [n, lanes], lanes 0..G-1 ----------------------------------------------
# Per-lane scratch comes as tuples of separately allocated arrays: rows of one 2D array would share a base
# pointer at an unknown distance, and the compiler then gives up vectorizing the loops that use two of them.

@inline
def lane_vectors(G):
    """16 float32 scratch vectors of length G."""
    return (np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32),
            np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32),
            np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32),
            np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32))


@inline
def _lanes_absmax(x, G, amax, mx):
    """`if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }` from 0, per lane."""
    for g in range(G):
        amax[g] = F32(0)
        mx[g] = F32(0)
    for i in range(x.shape[0]):
        for g in range(G):
            v = x[i, g]
            a = abs(v)
            up = a > amax[g]
            amax[g] = a if up else amax[g]
            mx[g] = v if up else mx[g]


@kernel
def qkx_lanes(x, w, G, nmax, nums, mad, L, scale, the_min, st, La):
    """make_qkx2_quants / make_qkx3_quants(n, nmax, x, w, L, &the_min, ..., rmin, rdelta, nstep, use_mad) per
    lane -> L (int32 codes), scale, the_min. nums: `trial_numerators`. The two C functions differ only in the
    degenerate test (`max == min` / `max <= min`), which agree since min <= max (both false on a NaN max).
    st: `lane_vectors` (>= G); La: float32 [n, >= G]."""
    n = x.shape[0]
    mn, mx, sw, sx, isc, sc, best, kis = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]
    kmn, mn0, sl, sl2, sxl, ts, tm, cur = st[8], st[9], st[10], st[11], st[12], st[13], st[14], st[15]
    zero = F32(0)
    for g in range(G):
        mn[g] = x[0, g]
        mx[g] = x[0, g]
        sw[g] = w[0, g]
        sx[g] = w[0, g] * x[0, g]
    for i in range(1, n):
        for g in range(G):
            v = x[i, g]
            mn[g] = v if v < mn[g] else mn[g]
            mx[g] = v if v > mx[g] else mx[g]
            sw[g] += w[i, g]
            sx[g] += w[i, g] * v
    for g in range(G):
        m = zero if mn[g] > zero else mn[g]
        mn[g] = m
        mn0[g] = m
        isc[g] = F32(nums[0]) / (mx[g] - m)
        sc[g] = F32(1) / isc[g]
        kis[g] = isc[g]
        kmn[g] = m
        best[g] = zero
    for i in range(n):
        for g in range(G):
            l = min(nmax, max(0, nearest_int_bits(isc[g] * (x[i, g] - mn[g]))))
            diff = sc[g] * F32(l) + mn[g] - x[i, g]
            e = abs(diff) if mad else diff * diff
            best[g] += w[i, g] * e
    for s in range(1, nums.shape[0]):
        num = nums[s]
        for g in range(G):
            isc[g] = num / (mx[g] - mn[g])
            sl[g] = zero
            sl2[g] = zero
            sxl[g] = zero
            cur[g] = zero
        for i in range(n):
            for g in range(G):
                fl = F32(min(nmax, max(0, nearest_int_bits(isc[g] * (x[i, g] - mn[g])))))
                La[i, g] = fl
                wl = w[i, g] * fl
                sl[g] += wl
                sl2[g] += wl * fl
                sxl[g] += wl * x[i, g]
        for g in range(G):
            D = sw[g] * sl2[g] - sl[g] * sl[g]
            a = (sw[g] * sxl[g] - sx[g] * sl[g]) / D
            b = (sl2[g] * sx[g] - sl[g] * sxl[g]) / D
            pos = b > zero  # C: this_min = 0, this_scale = sum_xl / sum_l2
            ts[g] = sxl[g] / sl2[g] if pos else a
            tm[g] = zero if pos else b
            sl[g] = D  # kept for the test below
        for i in range(n):
            for g in range(G):
                diff = ts[g] * La[i, g] + tm[g] - x[i, g]
                e = abs(diff) if mad else diff * diff
                cur[g] += w[i, g] * e
        for g in range(G):
            ok = (sl[g] > zero) & (cur[g] < best[g])
            best[g] = cur[g] if ok else best[g]
            sc[g] = ts[g] if ok else sc[g]
            kis[g] = isc[g] if ok else kis[g]
            kmn[g] = mn[g] if ok else kmn[g]
            mn[g] = tm[g] if ok else mn[g]
    for i in range(n):
        for g in range(G):
            L[i, g] = min(nmax, max(0, nearest_int_bits(kis[g] * (x[i, g] - kmn[g]))))
    for g in range(G):
        flat = mx[g] == mn0[g]  # C returns early: codes 0, scale 0, the_min = -min
        scale[g] = zero if flat else sc[g]
        the_min[g] = -(mn0[g] if flat else mn[g])
        if flat:
            for i in range(n):
                L[i, g] = 0


@kernel
def qx_lanes(x, w, G, nmax, nums, L, scale, st, wx):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, w) per lane -> L (int32 codes + nmax), scale.
    nums: `qx_numerators`. st: `lane_vectors` (>= G); wx: float32 [n, >= G]."""
    n = x.shape[0]
    amax, mx, slx, sl2, isc, sc, best, kis = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]
    zero = F32(0)
    _lanes_absmax(x, G, amax, mx)
    for i in range(n):
        for g in range(G):
            wx[i, g] = w[i, g] * x[i, g]
    for s in range(nums.shape[0]):
        num = nums[s]
        for g in range(G):
            isc[g] = -(num / mx[g])  # C's -(nmax + 0.1f*is)/max: negation commutes with the rounding
            slx[g] = zero
            sl2[g] = zero
        for i in range(n):
            for g in range(G):
                fl = F32(min(nmax - 1, max(-nmax, nearest_int_bits(isc[g] * x[i, g]))))
                slx[g] += wx[i, g] * fl
                sl2[g] += w[i, g] * fl * fl
        if s == 0:
            for g in range(G):
                sc[g] = slx[g] / sl2[g] if sl2[g] != zero else zero
                best[g] = sc[g] * slx[g]
                kis[g] = isc[g]
        else:
            for g in range(G):
                ok = (sl2[g] > zero) & (slx[g] * slx[g] > best[g] * sl2[g])
                t = slx[g] / sl2[g]
                sc[g] = t if ok else sc[g]
                best[g] = t * slx[g] if ok else best[g]
                kis[g] = isc[g] if ok else kis[g]
    for i in range(n):
        for g in range(G):
            L[i, g] = nmax + min(nmax - 1, max(-nmax, nearest_int_bits(kis[g] * x[i, g])))
    for g in range(G):
        tiny = amax[g] < GROUP_MAX_EPS  # C: all codes 0, scale 0
        scale[g] = zero if tiny else sc[g]
        if tiny:
            for i in range(n):
                L[i, g] = 0


@inline
def _q3_pass(x, w, wx, Lf, slx, sl2, moved, G, nmax):
    """One pass of make_q3_quants' coordinate descent over lanes 0..G-1: element by element, the code moves to
    nearest_int(x*sl2/slx) where that raises slx^2/sl2. moved[g] counts the lane's moves; returns their total."""
    zero = F32(0)
    for g in range(G):
        moved[g] = 0
    total = 0
    for i in range(x.shape[0]):
        for g in range(G):
            li = Lf[i, g]
            s1 = slx[g] - wx[i, g] * li
            s2 = sl2[g] - w[i, g] * li * li
            fn = F32(min(nmax - 1, max(-nmax, nearest_int_bits(x[i, g] * s2 / s1))))
            n1 = s1 + wx[i, g] * fn
            n2 = s2 + w[i, g] * fn * fn
            ok = (s1 > zero) & (fn != li) & (n2 > zero) & (n1 * n1 * sl2[g] > slx[g] * slx[g] * n2)
            Lf[i, g] = fn if ok else li
            slx[g] = n1 if ok else slx[g]
            sl2[g] = n2 if ok else sl2[g]
            moved[g] += ok
            total += ok
    return total


@kernel
def q3_lanes(x, G, nmax, L, scale, st, Lf, w, wx, xc, wc, wxc, Lc, moved, idx):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) per lane -> L (int32 codes + nmax), scale.
    st: `lane_vectors` (>= G); Lf, w, wx and xc, wc, wxc, Lc (the lanes still moving): float32 [n, >= G];
    moved, idx: int32 [>= G].
    Most groups settle in C's first pass (4 in 5 on Gaussian data): after each pass only the lanes that moved
    go on, gathered side by side, and each one's state is put back once it settles."""
    n = x.shape[0]
    amax, mx, slx, sl2 = st[0], st[1], st[2], st[3]
    zero = F32(0)
    _lanes_absmax(x, G, amax, mx)
    for g in range(G):
        mx[g] = F32(-nmax) / mx[g]  # iscale
        slx[g] = zero
        sl2[g] = zero
    for i in range(n):
        for g in range(G):
            v = x[i, g]
            wi = v * v
            w[i, g] = wi
            wx[i, g] = wi * v
            fl = F32(min(nmax - 1, max(-nmax, nearest_int_bits(mx[g] * v))))
            Lf[i, g] = fl
            slx[g] += wx[i, g] * fl
            sl2[g] += wi * fl * fl
    slc, s2c = st[4], st[5]
    if _q3_pass(x, w, wx, Lf, slx, sl2, moved, G, nmax):
        K = 0  # gather the lanes that moved
        for g in range(G):
            if moved[g]:
                idx[K] = g
                K += 1
        for i in range(n):
            for k in range(K):
                g = idx[k]
                xc[i, k] = x[i, g]
                wc[i, k] = w[i, g]
                wxc[i, k] = wx[i, g]
                Lc[i, k] = Lf[i, g]
        for k in range(K):
            slc[k] = slx[idx[k]]
            s2c[k] = sl2[idx[k]]
        for p in range(4):
            last = _q3_pass(xc, wc, wxc, Lc, slc, s2c, moved, K, nmax) == 0 or p == 3
            K2 = 0  # lanes that settled go back; the others close up
            for k in range(K):
                if moved[k] and not last:
                    if K2 != k:
                        for i in range(n):
                            xc[i, K2] = xc[i, k]
                            wc[i, K2] = wc[i, k]
                            wxc[i, K2] = wxc[i, k]
                            Lc[i, K2] = Lc[i, k]
                        slc[K2] = slc[k]
                        s2c[K2] = s2c[k]
                        idx[K2] = idx[k]
                    K2 += 1
                else:
                    g = idx[k]
                    for i in range(n):
                        Lf[i, g] = Lc[i, k]
                    slx[g] = slc[k]
                    sl2[g] = s2c[k]
            K = K2
            if K == 0:
                break
    for i in range(n):
        for g in range(G):
            L[i, g] = 0 if amax[g] < GROUP_MAX_EPS else nmax + int(Lf[i, g])
    for g in range(G):
        scale[g] = slx[g] / sl2[g] if amax[g] >= GROUP_MAX_EPS and sl2[g] > zero else zero


# ---- gathering a tile into lanes ------------------------------------------------------------------

@inline
def to_lanes(x, b0, nbt, n, xs):
    """Blocks b0..b0+nbt-1 -> element-major lanes: xs[i, (b - b0)*S + j] = x[b, n*j + i], S = 256 / n."""
    S = QK_K // n
    for bb in range(nbt):
        for j in range(S):
            for i in range(n):
                xs[i, bb * S + j] = x[b0 + bb, n * j + i]


@inline
def lane_sums(v, G, acc):
    """acc[g] = sum over i of v[i, g], from 0 in i order."""
    for g in range(G):
        acc[g] = F32(0)
    for i in range(v.shape[0]):
        for g in range(G):
            acc[g] += v[i, g]


@inline
def block_sigma2(x, b0, nbt, sig):
    """sig[bb] = sum of x^2 over block b0 + bb, from 0 in element order (the blocks' chains interleave)."""
    for bb in range(nbt):
        sig[bb] = F32(0)
    for k in range(QK_K):
        for bb in range(nbt):
            v = x[b0 + bb, k]
            sig[bb] += v * v


@inline
def imatrix_weights(xs, qw, b0, nbt, n, sig, ws):
    """ws[i, lane] = qw * sqrtf(sigma2 + x*x), sigma2 = sig[block]."""
    S = QK_K // n
    for bb in range(nbt):
        s2 = sig[bb]
        for j in range(S):
            g = bb * S + j
            for i in range(n):
                v = xs[i, g]
                ws[i, g] = qw[b0 + bb, n * j + i] * np.sqrt(s2 + v * v)
