"""Legacy 32-element GGML blocks: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: numba ports of ggml-quants.c, bytes identical to ggml's.

The kernels port quantize_row_q8_0_ref / q4_0_ref / q4_1_ref / q5_0_ref / q5_1_ref and, with an imatrix,
quantize_row_q4_0_impl / q5_0_impl (make_qx_quants, rmse_type 1) and q4_1_impl / q5_1_impl
(make_qkx3_quants(-0.9, 0.05, 36)) on weights qw * sqrtf(sigma2 + x^2), sigma2 = mean x^2 over the whole row
(so `quantize` computes it per row), in C's float32 arithmetic (compiled.kernel); the two searches are
lanes.py's ports of make_qx_quants / make_qkx3_quants, shared with the K-quants. C's float -> int8
casts keep x86's result (NaN or out of range -> 0x80000000, low byte 0); d and m are rounded to fp16 in the
kernel (compiled.put_fp16, integer ops as F16C does), so each block is written in one pass.
What differs from C, without changing a byte:
- the reference paths take a block's max/min as integer max/min of the float bits mapped to an order-keeping
  int (SIMD reductions; C's compare loops stay scalar). C keeps the first of equal values, which only shows
  in the sign of a zero result or in a +a/-a tie for max |x|: those blocks rerun C's loop, as do Q8_0 blocks
  holding a NaN (where C's MAX(amax, |x|) depends on the order).
- the importance searches run LANES blocks in lockstep, one per SIMD lane: each lane follows its block's C
  loop exactly (sums from 0 element by element, running best, `min` moved by every accepted fit), and the
  C branches become per-lane selects.
- sigma2 sums four rows at a time (independent chains overlap), each row's sum still in C's order.
"""

from __future__ import annotations

import numpy as np
import torch

from grokquant.quant.ggml.base import Quantizer, fp16_from_bytes, quantize_chunks
from grokquant.quant.ggml.compiled import F32, IMAX, INF_BITS, bits, inline, kernel, put_fp16
from grokquant.quant.ggml.lanes import lane_vectors, qkx_lanes, qx_lanes, qx_numerators, trial_numerators

QK = 32
LANES = 64  # blocks searched together, one per SIMD lane (4 AVX-512 vectors: independent sums overlap)
CHUNK_REF, CHUNK_IMATRIX = 1 << 14, 1 << 11  # blocks per quantize_chunk call
FLT_MAX = F32(np.finfo(np.float32).max)
HALF_DOWN = F32(np.nextafter(np.float32(0.5), np.float32(0)))  # roundf's addend: ties carry, 0.49999997 not
INT_RANGE = F32(2147483520.0)  # the largest float below 2^31: cvttss2si's range
BIT = np.array([1 << j for j in range(31)] + [-(1 << 31)], np.int32)  # bit j of an int32


# ---- the C casts, and float order as int order ----------------------------------------------------------

@inline
def _int8_cast(v):
    """(int8_t)v as x86 computes it: truncate to int32 (NaN, out of range -> 0x80000000), keep the low byte."""
    i = np.int32(v) if abs(v) <= INT_RANGE else np.int32(0)
    return np.int32(((i & 255) ^ 128) - 128)


@inline
def _roundf(v):
    """roundf (half away from zero) before an int cast: v + copysign(0.5 - ulp/4, v), truncated by the cast."""
    return v + HALF_DOWN if v >= F32(0) else v - HALF_DOWN


@inline
def _key(i):
    """The bits of a float (int32) -> an int32 in the floats' order (-0.0 just below +0.0; NaN above inf or
    below -inf). Integer max/min reduce in SIMD registers; float compare-selects would stay scalar."""
    return np.int32(i ^ ((i >> 31) & IMAX))


@inline
def _unkey(k):
    """Inverse of `_key`: the float."""
    return bits(np.int32(k ^ ((k >> 31) & IMAX)))


# ---- reference paths ------------------------------------------------------------------------------------

@kernel
def _q8_0_blocks(x, out):
    """quantize_row_q8_0_ref: d = max|x|/127, codes (int8_t)roundf(x * id) (bytes 2..33)."""
    for b in range(x.shape[0]):
        k = np.int32(0)
        for j in range(QK):
            k = np.int32(max(k, bits(x[b, j]) & IMAX))  # |x| as int: the same order
        if k > INF_BITS:  # a NaN: C's MAX(amax, |x|) then takes the element after it, so replay the loop
            amax = F32(0)
            for j in range(QK):
                a = abs(x[b, j])
                amax = amax if amax > a else a
        else:
            amax = bits(k)  # |x| >= 0: its bits are its key
        d = amax / F32(127)
        id_ = F32(1) / d if d != 0 else F32(0)
        put_fp16(out, b, 0, d)
        for j in range(QK):
            out[b, 2 + j] = np.uint8(_int8_cast(_roundf(x[b, j] * id_)) & 255)


@inline
def _ref_blocks(x, out, nbits, has_min):
    """quantize_row_q{4,5}_{0,1}_ref (nbits, has_min: constants) of blocks x [nb, 32] into out."""
    top = (1 << nbits) - 1
    itop = np.int32(top)
    half = 1 << (nbits - 1)
    o = 4 if has_min else 2
    # C's loops start from max = -FLT_MAX, min = FLT_MAX (with a min), else from max = min = 0
    k_lo = _key(bits(-FLT_MAX)) if has_min else np.int32(0)
    k_hi = _key(bits(FLT_MAX)) if has_min else np.int32(0)
    for b in range(x.shape[0]):
        kmx, kmn = k_lo, k_hi
        for j in range(QK):
            k = _key(bits(x[b, j]))
            nan = x[b, j] != x[b, j]  # NaN never wins C's strict comparisons
            kmx = np.int32(max(kmx, k_lo if nan else k))
            kmn = np.int32(min(kmn, k_hi if nan else k))
        mx, mn = _unkey(kmx), _unkey(kmn)
        if has_min:
            if mn == 0 or mx == 0:  # which zero C keeps is the first one: its loop
                mn, mx = FLT_MAX, -FLT_MAX
                for j in range(QK):
                    v = x[b, j]
                    if v < mn:
                        mn = v
                    if v > mx:
                        mx = v
            d = (mx - mn) / F32(top)
            off = F32(0.5)
        else:  # the first x of largest |x| (none positive: +0.0)
            p = mx if mx > 0 else F32(0)  # not -0.0
            n = mn
            top_x = n if -n > p else p  # a select: which sign wins is a coin flip, a branch would mispredict
            if p == -n and p > 0:  # a +a/-a tie: C keeps the first one
                amax, top_x = F32(0), F32(0)
                for j in range(QK):
                    v = x[b, j]
                    if amax < abs(v):
                        amax = abs(v)
                        top_x = v
            d = top_x / F32(-half)
            off = F32(half) + F32(0.5)
        id_ = F32(1) / d if d != 0 else F32(0)
        put_fp16(out, b, 0, d)
        if has_min:
            put_fp16(out, b, 2, mn)
        qh = np.int32(0)
        for j in range(QK // 2):
            x0, x1 = x[b, j], x[b, j + 16]
            if has_min:
                x0, x1 = x0 - mn, x1 - mn
            # C: uint8_t xi = MIN(top, (int8_t)...); its low bits are the int's, all that is stored
            q0 = min(itop, _int8_cast(x0 * id_ + off))
            q1 = min(itop, _int8_cast(x1 * id_ + off))
            if nbits == 5:
                out[b, o + 4 + j] = np.uint8((q0 & 15) | ((q1 & 15) << 4))
                qh = np.int32(qh | np.int32(BIT[j] & -((q0 >> 4) & 1)) | np.int32(BIT[j + 16] & -((q1 >> 4) & 1)))
            else:
                out[b, o + j] = np.uint8(q0 | (q1 << 4))
        if nbits == 5:
            for k in range(4):
                out[b, o + k] = np.uint8((qh >> (8 * k)) & 255)


# one kernel per type, so that the layout constants fold into the loops
@kernel
def _q4_0_blocks(x, out):
    _ref_blocks(x, out, 4, False)


@kernel
def _q4_1_blocks(x, out):
    _ref_blocks(x, out, 4, True)


@kernel
def _q5_0_blocks(x, out):
    _ref_blocks(x, out, 5, False)


@kernel
def _q5_1_blocks(x, out):
    _ref_blocks(x, out, 5, True)


# ---- importance paths -----------------------------------------------------------------------------------

@kernel
def _row_sigma2(x, s2):
    """s2[r] = (sum_j x[r, j]^2) / n, summed from 0 in order like quantize_row_q4_0_impl; four rows at a time
    (independent additions overlap)."""
    rows, n = x.shape
    r = 0
    while r < rows:
        k = min(4, rows - r)
        a0 = a1 = a2 = a3 = F32(0)
        for j in range(n):
            v = x[r, j]
            a0 += v * v
            if k > 1:
                v = x[r + 1, j]
                a1 += v * v
            if k > 2:
                v = x[r + 2, j]
                a2 += v * v
            if k > 3:
                v = x[r + 3, j]
                a3 += v * v
        fn = F32(n)
        s2[r] = a0 / fn
        if k > 1:
            s2[r + 1] = a1 / fn
        if k > 2:
            s2[r + 2] = a2 / fn
        if k > 3:
            s2[r + 3] = a3 / fn
        r += k


@kernel
def _legacy_imatrix_blocks(x, qw, s2, out, bits, has_min, nmax, nums, G):
    """quantize_row_q{4,5}_{0,1}_impl for blocks x [nb, 32]: block b has weights qw[b % len(qw)] and its
    row's sigma2 s2[b]; nums: the search's trial numerators. The searches are lanes.py's ports of
    make_qx_quants / make_qkx3_quants, on G blocks at a time (G passed at run time: a lane loop of unknown
    length is vectorized, not unrolled into the element loop around it)."""
    nb, nq = x.shape[0], qw.shape[0]
    o = 4 if has_min else 2
    X = np.zeros((QK, G), np.float32)  # element-major: X[i, l] is element i of block b0 + l
    W = np.zeros((QK, G), np.float32)
    La = np.zeros((QK, G), np.float32)
    L = np.zeros((QK, G), np.int32)
    st = lane_vectors(G)
    scale = np.zeros(G, np.float32)
    the_min = np.zeros(G, np.float32)
    for b0 in range(0, nb, G):
        nl = min(G, nb - b0)
        for l in range(nl):
            b = b0 + l
            for i in range(QK):
                xi = x[b, i]
                X[i, l] = xi
                W[i, l] = qw[b % nq, i] * np.sqrt(s2[b] + xi * xi)
        for l in range(nl, G):  # padding lanes: zero blocks
            for i in range(QK):
                X[i, l] = F32(0)
                W[i, l] = F32(0)
        if has_min:
            qkx_lanes(X, W, G, nmax, nums, False, L, scale, the_min, st, La)
        else:
            qx_lanes(X, W, G, nmax, nums, L, scale, st, La)
        for l in range(nl):  # C: qs[j] = L[j] | L[j + 16] << 4 (Q5: low nibbles, bit 4 into qh)
            b = b0 + l
            put_fp16(out, b, 0, scale[l])
            if has_min:
                put_fp16(out, b, 2, -the_min[l])  # m = -the_min
            qh = np.int32(0)
            for j in range(QK // 2):
                q0, q1 = L[j, l], L[j + 16, l]
                out[b, o + 4 * (bits == 5) + j] = np.uint8((q0 & 15) | ((q1 & 15) << 4))
                qh = np.int32(qh | np.int32(BIT[j] & -(q0 >> 4)) | np.int32(BIT[j + 16] & -(q1 >> 4)))
            if bits == 5:
                for k in range(4):
                    out[b, o + k] = np.uint8((qh >> (8 * k)) & 255)


# ---- block types ----------------------------------------------------------------------------------------

def _numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy(), dtype=np.float32)


class _Legacy(Quantizer):
    """Q4_0/Q4_1/Q5_0/Q5_1: d (and m) as fp16, (qh: bit 4 of element j in bit j of a LE u32), then qs[16]
    with element j in the low nibble of qs[j] and element j + 16 in the high one."""

    bits: int = 4
    has_min: bool = False
    fp16_scales = slice(0, 2)  # d; with a min, d and m

    def quantize(self, x, imatrix=None):
        """As Quantizer.quantize, plus the row-global sigma2 the imatrix search needs; every row shares the
        imatrix, so it is not copied per row."""
        if imatrix is None:
            return super().quantize(x)
        device = x.device
        x = x.detach().float().cpu().contiguous()
        rows, n = x.shape
        if n % QK:
            raise ValueError(f"{self.name}: row length {n} is not a multiple of {QK}")
        nq = n // QK
        qw = _numpy(imatrix.float().cpu().reshape(nq, QK))

        def run(out, xc, buf):  # whole rows: block b's weights are qw[b % nq], its sigma2 its row's
            xn = _numpy(xc)
            s2 = np.empty(len(xn) // nq, np.float32)
            _row_sigma2(xn.reshape(-1, n), s2)
            self._weighted(out, xn, qw, np.repeat(s2, nq))

        chunk = max(1, CHUNK_IMATRIX // nq) * nq if nq else 1
        return quantize_chunks(run, self.type.block_bytes, chunk, x.view(-1, QK)).view(rows, -1).to(device)

    def quantize_blocks(self, x, qw=None, sigma2=None):
        """sigma2: per-block copy of the row's mean x^2; if missing, each block is taken as its own row."""
        if x.device.type != "cpu":
            cpu = [None if t is None else t.cpu() for t in (qw, sigma2)]
            return self.quantize_blocks(x.cpu(), *cpu).to(x.device)
        if qw is None:
            return super().quantize_blocks(x)

        def run(out, xc, qwc, s2c, buf):
            xn = _numpy(xc)
            if s2c is None:
                s2 = np.empty(len(xn), np.float32)
                _row_sigma2(xn, s2)
            else:
                s2 = _numpy(s2c)
            self._weighted(out, xn, _numpy(qwc), s2)

        return quantize_chunks(run, self.type.block_bytes, CHUNK_IMATRIX, x, qw, sigma2)

    chunk = CHUNK_REF

    def quantize_chunk(self, out, x, qw, buf):
        """quantize_row_qX_Y_ref."""
        self.ref_kernel(_numpy(x), out.numpy())

    def _weighted(self, out, x, qw, sigma2):
        """quantize_row_qX_Y_impl on blocks x (numpy, as qw and sigma2) with weights qw[b % len(qw)] and
        their row's sigma2 per block."""
        _legacy_imatrix_blocks(x, qw, sigma2, out.numpy(), self.bits, self.has_min, self.nmax, self.nums, LANES)

    def _pack_codes(self, out, codes):
        codes = codes.to(torch.uint8)
        if self.bits == 5:
            qh = self.fp16_scales.stop
            out[:, qh:qh + 4] = ((codes >> 4).float() @ _bit_weights(codes.device)).to(torch.uint8)
            codes = codes & 15
        out[:, -16:] = codes[:, :16] | (codes[:, 16:] << 4)

    def __init__(self):
        n = 1 << self.bits
        self.nmax = n - 1 if self.has_min else n // 2  # of the imatrix search
        # make_qkx3_quants(rmin -0.9, rdelta 0.05, nstep 36) / make_qx_quants' trials
        self.nums = trial_numerators(self.nmax, -0.9, 0.05, 36) if self.has_min else qx_numerators(self.nmax)
        self.levels = torch.arange(n, dtype=torch.float32) - (0 if self.has_min else n // 2)

    def grid(self, b):
        dm = fp16_from_bytes(b[:, self.fp16_scales])
        return dm[:, :1].expand(-1, QK), dm[:, 1:].expand(-1, QK) if self.has_min else None

    def with_codes(self, b, codes):
        out = b.clone()
        self._pack_codes(out, codes)
        return out

    def dequantize_blocks(self, b):
        b = b.contiguous()
        dm = fp16_from_bytes(b[:, self.fp16_scales])
        qs = b[:, -16:]
        q = torch.cat([qs & 15, qs >> 4], dim=1)
        if self.bits == 5:
            qh = self.fp16_scales.stop
            shifts = torch.arange(8, device=b.device, dtype=torch.uint8)
            hbit = (b[:, qh:qh + 4, None] >> shifts) & 1  # bit j of the LE u32 is element j
            q = q | (hbit.reshape(-1, QK) << 4)
        if self.has_min:
            return dm[:, :1] * q.float() + dm[:, 1:]
        return dm * (q.float() - (1 << (self.bits - 1)))


def _bit_weights(device) -> torch.Tensor:
    """[32, 4] matrix taking 32 bits (0/1) to 4 bytes, bit j -> byte j//8 weight 2^(j%8) (exact in fp32)."""
    j = torch.arange(QK)
    w = torch.zeros(QK, 4)
    w[j, j // 8] = (2.0 ** (j % 8)).float()
    return w.to(device)


class Q4_0(_Legacy, name="Q4_0"):
    """The base layout: fp16 d, qs[16]; y = d * (q - 8)."""

    ref_kernel = staticmethod(_q4_0_blocks)


class Q5_0(_Legacy, name="Q5_0"):
    bits = 5
    ref_kernel = staticmethod(_q5_0_blocks)


class Q4_1(_Legacy, name="Q4_1"):
    has_min, fp16_scales = True, slice(0, 4)  # d, m
    ref_kernel = staticmethod(_q4_1_blocks)


class Q5_1(_Legacy, name="Q5_1"):
    bits, has_min, fp16_scales = 5, True, slice(0, 4)
    ref_kernel = staticmethod(_q5_1_blocks)


class Q8_0(Quantizer, name="Q8_0"):
    """d = max|x|/127 as fp16, 32 int8 codes roundf(x/d) (id from the fp32 d). The imatrix is unused."""

    fp16_scales = slice(0, 2)
    chunk = CHUNK_REF

    def quantize(self, x, imatrix=None):
        """ggml ignores the imatrix of Q8_0: dropped here, not expanded to every row first."""
        return super().quantize(x)

    def quantize_blocks(self, x, qw=None):
        if x.device.type != "cpu":
            return super().quantize_blocks(x.cpu()).to(x.device)
        return super().quantize_blocks(x)

    def quantize_chunk(self, out, x, qw, buf):
        _q8_0_blocks(_numpy(x), out.numpy())

    def dequantize_blocks(self, b):
        b = b.contiguous()
        return fp16_from_bytes(b[:, self.fp16_scales]) * b[:, 2:].view(torch.int8).float()

    levels = torch.arange(-128, 128, dtype=torch.float32)

    def grid(self, b):
        return fp16_from_bytes(b[:, self.fp16_scales]).expand(-1, QK), None

    def with_codes(self, b, codes):
        out = b.clone()
        out[:, 2:] = codes.to(torch.uint8) ^ 0x80  # code c is the int8 c - 128
        return out
