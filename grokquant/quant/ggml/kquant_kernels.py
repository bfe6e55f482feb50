"""numba kernels of the K-quant quantizers Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: ports of ggml-quants.c, bytes identical.

Each kernel runs quantize_row_q*_K_ref (no importance) or quantize_row_q*_K_impl (importance weights) over a
chunk of 256-blocks and writes the whole blocks, fp16 fields included: C's searches (make_qkx2_quants /
make_qkx3_quants, make_qx_quants, make_q3_quants, and compiled.make_qp_quants), the quantization of the
sub-block scales, the requantization from the scales as stored, and the bit packing, all in C's float32
arithmetic (compiled.kernel: no fast-math, every float op rounds as C's does, every sum runs from 0 element by
element in C's order, nearest_int is C's bit trick, so even NaN, inf and huge inputs give C's bytes).

What differs from C is only the order in which independent work is done, never a float operation: the
searches run on lanes (lanes.py), the sub-blocks (or, for the scales' own search, the blocks) of up to TILE
blocks side by side.
"""

from __future__ import annotations

import numpy as np

from grokquant.quant.ggml.compiled import F32, inline, kernel, make_qp_quants, nearest_int_bits, put_fp16
from grokquant.quant.ggml.lanes import (GROUP_MAX_EPS, QK_K, block_sigma2, imatrix_weights, lane_sums, lane_vectors,
                                        q3_lanes, qkx_lanes, qx_lanes, to_lanes)

TILE = 8  # blocks searched together: 64 (Q4_K, Q5_K) or 128 (Q2_K, Q3_K, Q6_K) lanes


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
        to_lanes(x, b0, nbt, 32, xs)
        if use_qw:  # sigma2 = 2*sum_x2/QK_K over the block
            block_sigma2(x, b0, nbt, sig)
            for bb in range(nbt):
                sig[bb] = F32(2) * sig[bb] / F32(QK_K)
            imatrix_weights(xs, qw, b0, nbt, 32, sig, ws)
            lane_sums(ws, G, sw)
        else:  # weights av_x + |x|, av_x = sqrtf(sum_x2/32) of the sub-block
            for i in range(32):
                for g in range(G):
                    La[i, g] = xs[i, g] * xs[i, g]
            lane_sums(La, G, sw)
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
        to_lanes(x, b0, nbt, 16, xs)
        if use_qw:
            to_lanes(qw, b0, nbt, 16, ws)
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
        to_lanes(x, b0, nbt, 16, xs)
        if use_qw:  # sigma2 = sum_x2/QK_K
            block_sigma2(x, b0, nbt, sig)
            for bb in range(nbt):
                sig[bb] = sig[bb] / F32(QK_K)
            imatrix_weights(xs, qw, b0, nbt, 16, sig, ws)
            lane_sums(ws, G, sw)
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
        to_lanes(x, b0, nbt, 16, xs)
        if use_qw:  # sigma2 = 2*sum_x2/QK_K
            block_sigma2(x, b0, nbt, sig)
            for bb in range(nbt):
                sig[bb] = F32(2) * sig[bb] / F32(QK_K)
            imatrix_weights(xs, qw, b0, nbt, 16, sig, ws)
            lane_sums(ws, G, sw)
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
