"""numba kernels of the K-quant quantizers Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: ports of ggml-quants.c, bytes identical.

Each kernel runs quantize_row_q*_K_ref (no importance) or quantize_row_q*_K_impl (importance weights) over a
chunk of 256-blocks and writes the whole blocks, fp16 fields included: C's searches (make_qkx2_quants /
make_qkx3_quants, make_qx_quants, make_q3_quants, and compiled.make_qp_quants), the quantization of the
sub-block scales, the requantization from the scales as stored, and the bit packing, all in C's float32
arithmetic (compiled.kernel: no fast-math, every float op rounds as C's does, every sum runs from 0 element by
element in C's order, nearest_int is C's bit trick, so even NaN, inf and huge inputs give C's bytes).

What differs from C is only the order in which independent work is done, never a float operation:
- the searches run on "lanes": the sub-blocks (or, for the scales' own search, the blocks) of up to TILE
  blocks side by side, element-major ([n, lanes]), each step of a C loop done for every lane in one loop over
  the lanes, which the compiler vectorizes. Each lane keeps its own sums in C's order; C's per-group branches
  become per-lane selects, and a lane that C would have left early computes on with its results unused.
- make_qkx2/3_quants keep the (iscale, min) of the best trial instead of copying its codes, and recompute the
  codes from them at the end: the same float ops, so the same codes.
- make_q3_quants' coordinate descent (up to 5 passes, until one moves no code) runs its first pass on all
  lanes, then only on the lanes that moved, gathered side by side; a lane leaves once a pass moves nothing.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from grokquant.quant.ggml.compiled import F32, inline, kernel, make_qp_quants, nearest_int_bits, put_fp16

QK_K = 256
TILE = 8  # blocks searched together: 64 (Q4_K, Q5_K) or 128 (Q2_K, Q3_K, Q6_K) lanes
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
def _to_lanes(x, b0, nbt, n, xs):
    """Blocks b0..b0+nbt-1 -> element-major lanes: xs[i, (b - b0)*S + j] = x[b, n*j + i], S = 256 / n."""
    S = QK_K // n
    for bb in range(nbt):
        for j in range(S):
            for i in range(n):
                xs[i, bb * S + j] = x[b0 + bb, n * j + i]


@inline
def _lane_sums(v, G, acc):
    """acc[g] = sum over i of v[i, g], from 0 in i order."""
    for g in range(G):
        acc[g] = F32(0)
    for i in range(v.shape[0]):
        for g in range(G):
            acc[g] += v[i, g]


@inline
def _block_sigma2(x, b0, nbt, sig):
    """sig[bb] = sum of x^2 over block b0 + bb, from 0 in element order (the blocks' chains interleave)."""
    for bb in range(nbt):
        sig[bb] = F32(0)
    for k in range(QK_K):
        for bb in range(nbt):
            v = x[b0 + bb, k]
            sig[bb] += v * v


@inline
def _imatrix_weights(xs, qw, b0, nbt, n, sig, ws):
    """ws[i, lane] = qw * sqrtf(sigma2 + x*x), sigma2 = sig[block]."""
    S = QK_K // n
    for bb in range(nbt):
        s2 = sig[bb]
        for j in range(S):
            g = bb * S + j
            for i in range(n):
                v = xs[i, g]
                ws[i, g] = qw[b0 + bb, n * j + i] * np.sqrt(s2 + v * v)


# ---- Q4_K / Q5_K --------------------------------------------------------------------------------------

@kernel
def quantize_q45(x, qw, use_qw, out, nmax, nums, clamp_qp):
    """quantize_row_q4_K / q5_K (nmax 15 / 31), _ref or (use_qw) _impl, into out [nb, 144 or 176].
    nums: the make_qkx search's `trial_numerators`; clamp_qp: MIN(63, .) on make_qp_quants' codes (Q5_K)."""
    nb = x.shape[0]
    GM = TILE * 8
    xs = np.empty((32, GM), np.float32)
    ws = np.empty((32, GM), np.float32)
    La = np.empty((32, GM), np.float32)
    L = np.empty((32, GM), np.int32)
    st = lane_vectors(GM)
    scale = np.empty(GM, np.float32)
    the_min = np.empty(GM, np.float32)
    sw = np.empty(GM, np.float32)
    sig = np.empty(TILE, np.float32)
    bs = np.empty(8, np.float32)
    bw = np.empty(8, np.float32)
    Ls = np.empty(8, np.int64)  # make_qp_quants' codes, uint8 values as C stores them
    Lm = np.empty(8, np.int64)
    ls = np.empty(8, np.int64)
    lm = np.empty(8, np.int64)
    sb = np.empty(12, np.int64)  # the packed scale bytes
    q = np.empty(QK_K, np.int32)
    q5 = nmax == 31
    head = 48 if q5 else 16  # where qs starts
    for b0 in range(0, nb, TILE):
        nbt = min(TILE, nb - b0)
        G = nbt * 8
        _to_lanes(x, b0, nbt, 32, xs)
        if use_qw:  # sigma2 = 2*sum_x2/QK_K over the block
            _block_sigma2(x, b0, nbt, sig)
            for bb in range(nbt):
                sig[bb] = F32(2) * sig[bb] / F32(QK_K)
            _imatrix_weights(xs, qw, b0, nbt, 32, sig, ws)
            _lane_sums(ws, G, sw)
        else:  # weights av_x + |x|, av_x = sqrtf(sum_x2/32) of the sub-block
            for i in range(32):
                for g in range(G):
                    La[i, g] = xs[i, g] * xs[i, g]
            _lane_sums(La, G, sw)
            for g in range(G):
                sw[g] = np.sqrt(sw[g] / F32(32))
            for i in range(32):
                for g in range(G):
                    ws[i, g] = sw[g] + abs(xs[i, g])
        qkx_lanes(xs, ws, G, nmax, nums, False, L, scale, the_min, st, La)
        for bb in range(nbt):
            b = b0 + bb
            g0 = bb * 8
            if use_qw:
                for j in range(8):
                    bs[j] = scale[g0 + j]
                    bw[j] = sw[g0 + j]
                d = make_qp_quants(8, 63, bs, Ls, bw)
                for j in range(8):
                    bs[j] = the_min[g0 + j]
                dm = make_qp_quants(8, 63, bs, Lm, bw)
                for j in range(8):
                    ls[j] = min(63, Ls[j]) if clamp_qp else Ls[j]
                    lm[j] = min(63, Lm[j]) if clamp_qp else Lm[j]
            else:
                ms = F32(0)
                mm = F32(0)
                for j in range(8):
                    ms = scale[g0 + j] if scale[g0 + j] > ms else ms
                    mm = the_min[g0 + j] if the_min[g0 + j] > mm else mm
                inv_s = F32(63) / ms if ms > 0 else F32(0)
                inv_m = F32(63) / mm if mm > 0 else F32(0)
                for j in range(8):  # uint8 ls = nearest_int(.); ls = MIN(63, ls)
                    ls[j] = min(63, nearest_int_bits(inv_s * scale[g0 + j]) & 255)
                    lm[j] = min(63, nearest_int_bits(inv_m * the_min[g0 + j]) & 255)
                d = ms / F32(63)
                dm = mm / F32(63)
            for j in range(4):
                sb[j] = (ls[j] | ((ls[j + 4] >> 4) << 6)) & 255
                sb[4 + j] = (lm[j] | ((lm[j + 4] >> 4) << 6)) & 255
                sb[8 + j] = ((ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4)) & 255
            for k in range(12):
                out[b, 4 + k] = sb[k]
            dv = put_fp16(out, b, 0, d)
            dmv = put_fp16(out, b, 2, dm)
            for j in range(8):
                if j < 4:  # get_scale_min_k4: C requantizes with the scales as stored
                    sc = sb[j] & 63
                    m = sb[j + 4] & 63
                else:
                    sc = (sb[j + 4] & 15) | ((sb[j - 4] >> 6) << 4)
                    m = (sb[j + 4] >> 4) | ((sb[j] >> 6) << 4)
                dj = dv * F32(sc)
                if dj == 0:  # C: `if (!d) continue`, keeping the search's codes
                    for i in range(32):
                        q[32 * j + i] = L[i, g0 + j]
                    continue
                dmj = dmv * F32(m)
                for i in range(32):
                    q[32 * j + i] = min(nmax, max(0, nearest_int_bits((x[b, 32 * j + i] + dmj) / dj)))
            if q5:
                for i in range(32):
                    out[b, 16 + i] = 0
            for c in range(4):
                for i in range(32):
                    lo = q[64 * c + i]
                    hi = q[64 * c + 32 + i]
                    out[b, head + 32 * c + i] = (lo & 15) | ((hi & 15) << 4)
                    if q5:
                        out[b, 16 + i] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1))


# ---- Q6_K ---------------------------------------------------------------------------------------------

@kernel
def quantize_q6(x, qw, use_qw, out, nums):
    """quantize_row_q6_K_ref / _impl (weights qw as they are) into out [nb, 210]. nums: qx_numerators(32)."""
    nb = x.shape[0]
    GM = TILE * 16
    xs = np.empty((16, GM), np.float32)
    ws = np.empty((16, GM), np.float32)
    wx = np.empty((16, GM), np.float32)
    L = np.empty((16, GM), np.int32)
    st = lane_vectors(GM)
    scale = np.empty(GM, np.float32)
    sc = np.empty(16, np.int64)
    q = np.empty(QK_K, np.int32)
    for b0 in range(0, nb, TILE):
        nbt = min(TILE, nb - b0)
        G = nbt * 16
        _to_lanes(x, b0, nbt, 16, xs)
        if use_qw:
            _to_lanes(qw, b0, nbt, 16, ws)
        else:
            for i in range(16):
                for g in range(G):
                    ws[i, g] = xs[i, g] * xs[i, g]
        qx_lanes(xs, ws, G, 32, nums, L, scale, st, wx)
        for bb in range(nbt):
            b = b0 + bb
            g0 = bb * 16
            amax = F32(0)
            ms = F32(0)
            for j in range(16):
                s = scale[g0 + j]
                a = abs(s)
                if a > amax:
                    amax = a
                    ms = s
            if amax < GROUP_MAX_EPS:  # the whole block is written as zeros
                for k in range(210):
                    out[b, k] = 0
                continue
            iscale = F32(-128) / ms
            dv = put_fp16(out, b, 208, F32(1) / iscale)
            for j in range(16):
                c = min(127, nearest_int_bits(iscale * scale[g0 + j]))
                sc[j] = ((c + 128) & 255) - 128  # int8
                out[b, 192 + j] = c & 255
            for j in range(16):
                dj = dv * F32(sc[j])
                if dj == 0:
                    for i in range(16):
                        q[16 * j + i] = L[i, g0 + j]
                    continue
                for i in range(16):
                    q[16 * j + i] = 32 + min(31, max(-32, nearest_int_bits(x[b, 16 * j + i] / dj)))
            for h in range(2):
                for i in range(32):
                    q1 = q[128 * h + i]
                    q2 = q[128 * h + 32 + i]
                    q3 = q[128 * h + 64 + i]
                    q4 = q[128 * h + 96 + i]
                    out[b, 64 * h + i] = (q1 & 15) | ((q3 & 15) << 4)
                    out[b, 64 * h + 32 + i] = (q2 & 15) | ((q4 & 15) << 4)
                    out[b, 128 + 32 * h + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


# ---- Q2_K / Q3_K --------------------------------------------------------------------------------------

@inline
def _pack_qs(q, out, b, o):
    """2-bit codes (q & 3) -> qs at out[b, o:o+64]: byte 32h + l holds elements 128h + l, +32, +64, +96."""
    for h in range(2):
        for i in range(32):
            k = 128 * h + i
            out[b, o + 32 * h + i] = ((q[k] & 3) | ((q[k + 32] & 3) << 2) | ((q[k + 64] & 3) << 4)
                                      | ((q[k + 96] & 3) << 6))


@kernel
def quantize_q2(x, qw, use_qw, out, nums):
    """quantize_row_q2_K_ref / _impl into out [nb, 84]. nums: trial_numerators(3, -0.5, 0.1, 15) (_ref) or
    (3, -0.9, 0.05, 36) (_impl)."""
    nb = x.shape[0]
    GM = TILE * 16
    xs = np.empty((16, GM), np.float32)
    ws = np.empty((16, GM), np.float32)
    La = np.empty((16, GM), np.float32)
    L = np.empty((16, GM), np.int32)
    st = lane_vectors(GM)
    scale = np.empty(GM, np.float32)
    the_min = np.empty(GM, np.float32)
    sw = np.empty(GM, np.float32)
    sig = np.empty(TILE, np.float32)
    bs = np.empty(16, np.float32)
    bw = np.empty(16, np.float32)
    Ls = np.empty(16, np.int64)  # make_qp_quants' codes, uint8 values as C stores them
    Lm = np.empty(16, np.int64)
    sb = np.empty(16, np.int64)  # the scale bytes
    q = np.empty(QK_K, np.int32)
    for b0 in range(0, nb, TILE):
        nbt = min(TILE, nb - b0)
        G = nbt * 16
        _to_lanes(x, b0, nbt, 16, xs)
        if use_qw:  # sigma2 = sum_x2/QK_K
            _block_sigma2(x, b0, nbt, sig)
            for bb in range(nbt):
                sig[bb] = sig[bb] / F32(QK_K)
            _imatrix_weights(xs, qw, b0, nbt, 16, sig, ws)
            _lane_sums(ws, G, sw)
        else:
            for i in range(16):
                for g in range(G):
                    ws[i, g] = abs(xs[i, g])
        qkx_lanes(xs, ws, G, 3, nums, not use_qw, L, scale, the_min, st, La)
        for bb in range(nbt):
            b = b0 + bb
            g0 = bb * 16
            if use_qw:
                for j in range(16):
                    bs[j] = scale[g0 + j]
                    bw[j] = sw[g0 + j]
                d = make_qp_quants(16, 15, bs, Ls, bw)
                for j in range(16):
                    bs[j] = the_min[g0 + j]
                dm = make_qp_quants(16, 15, bs, Lm, bw)
                for j in range(16):
                    sb[j] = (Ls[j] | (Lm[j] << 4)) & 255  # uint8 scales[j] = Ls | Lm << 4
            else:
                ms = F32(0)
                mm = F32(0)
                for j in range(16):
                    ms = scale[g0 + j] if scale[g0 + j] > ms else ms
                    mm = the_min[g0 + j] if the_min[g0 + j] > mm else mm
                d = F32(0)
                dm = F32(0)
                for j in range(16):
                    sb[j] = 0
                if ms > 0:
                    iscale = F32(15) / ms
                    for j in range(16):
                        sb[j] = nearest_int_bits(iscale * scale[g0 + j]) & 255
                    d = ms / F32(15)
                if mm > 0:
                    iscale = F32(15) / mm
                    for j in range(16):
                        sb[j] = (sb[j] | (nearest_int_bits(iscale * the_min[g0 + j]) << 4)) & 255
                    dm = mm / F32(15)
            for j in range(16):
                out[b, j] = sb[j]
            dv = put_fp16(out, b, 80, d)
            dmv = put_fp16(out, b, 82, dm)
            for j in range(16):
                dj = dv * F32(sb[j] & 15)
                if dj == 0:
                    for i in range(16):
                        q[16 * j + i] = L[i, g0 + j]
                    continue
                mj = dmv * F32(sb[j] >> 4)
                for i in range(16):
                    q[16 * j + i] = min(3, max(0, nearest_int_bits((x[b, 16 * j + i] + mj) / dj)))
            _pack_qs(q, out, b, 16)


@kernel
def quantize_q3(x, qw, use_qw, out, nums, nums32):
    """quantize_row_q3_K_ref / _impl into out [nb, 110]. nums, nums32: qx_numerators(4), qx_numerators(32)."""
    nb = x.shape[0]
    GM = TILE * 16
    xs = np.empty((16, GM), np.float32)
    ws = np.empty((16, GM), np.float32)
    wx = np.empty((16, GM), np.float32)
    Lf = np.empty((16, GM), np.float32)
    L = np.empty((16, GM), np.int32)
    st = lane_vectors(GM)
    xc = np.empty((16, GM), np.float32)
    wc = np.empty((16, GM), np.float32)
    wxc = np.empty((16, GM), np.float32)
    Lc = np.empty((16, GM), np.float32)
    moved = np.empty(GM, np.int32)
    idx = np.empty(GM, np.int32)
    scale = np.empty(GM, np.float32)
    sw = np.empty(GM, np.float32)
    sig = np.empty(TILE, np.float32)
    # the block-level make_qx_quants(16, 32, scales, Ls, sw) of _impl, on lanes = blocks
    bx = np.empty((16, TILE), np.float32)
    bw = np.empty((16, TILE), np.float32)
    bwx = np.empty((16, TILE), np.float32)
    bL = np.empty((16, TILE), np.int32)
    bst = lane_vectors(TILE)
    bd = np.empty(TILE, np.float32)
    c = np.empty(16, np.int64)
    q = np.empty(QK_K, np.int32)
    for b0 in range(0, nb, TILE):
        nbt = min(TILE, nb - b0)
        G = nbt * 16
        _to_lanes(x, b0, nbt, 16, xs)
        if use_qw:  # sigma2 = 2*sum_x2/QK_K
            _block_sigma2(x, b0, nbt, sig)
            for bb in range(nbt):
                sig[bb] = F32(2) * sig[bb] / F32(QK_K)
            _imatrix_weights(xs, qw, b0, nbt, 16, sig, ws)
            _lane_sums(ws, G, sw)
            qx_lanes(xs, ws, G, 4, nums, L, scale, st, wx)
            for bb in range(nbt):
                for j in range(16):
                    bx[j, bb] = scale[bb * 16 + j]
                    bw[j, bb] = sw[bb * 16 + j]
            qx_lanes(bx, bw, nbt, 32, nums32, bL, bd, bst, bwx)
        else:
            q3_lanes(xs, G, 4, L, scale, st, Lf, ws, wx, xc, wc, wxc, Lc, moved, idx)
        for bb in range(nbt):
            b = b0 + bb
            g0 = bb * 16
            if use_qw:
                for j in range(16):
                    c[j] = bL[j, bb]
                d = bd[bb]
            else:
                amax = F32(0)
                ms = F32(0)
                for j in range(16):
                    s = scale[g0 + j]
                    a = abs(s)
                    if a > amax:
                        amax = a
                        ms = s
                d = F32(0)
                for j in range(16):
                    c[j] = 0
                if ms != 0:
                    iscale = F32(-32) / ms
                    for j in range(16):  # int8_t l = nearest_int(.); MAX(-32, MIN(31, l)) + 32
                        l8 = ((nearest_int_bits(iscale * scale[g0 + j]) + 128) & 255) - 128
                        c[j] = min(31, max(-32, l8)) + 32
                    d = F32(1) / iscale
            for k in range(12):
                out[b, 96 + k] = 0
            for j in range(16):
                if j < 8:
                    out[b, 96 + j] = c[j] & 15
                else:
                    out[b, 96 + j - 8] |= (c[j] & 15) << 4
                out[b, 104 + j % 4] |= (c[j] >> 4) << (2 * (j // 4))
            dv = put_fp16(out, b, 108, d)
            for j in range(16):
                dj = dv * F32(c[j] - 32)
                if dj == 0:
                    for i in range(16):
                        q[16 * j + i] = L[i, g0 + j]
                    continue
                for i in range(16):
                    q[16 * j + i] = 4 + min(3, max(-4, nearest_int_bits(x[b, 16 * j + i] / dj)))
            for m in range(32):  # hmask: element 32k + m sets bit k of byte m when its code is > 3
                h = 0
                for k in range(8):
                    h |= (q[32 * k + m] >> 2) << k
                out[b, m] = h
            _pack_qs(q, out, b, 32)
