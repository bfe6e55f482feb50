"""GGML IQ4_NL and IQ4_XS (4-bit non-linear codebook): numba ports of ggml-quants.c, bytes identical to ggml's.

quantize_row_iq4_nl_impl (ntry = 7) per block in C's order and C's float32 arithmetic (compiled.kernel):
sigma2 = 2 * mean x^2 over the (super-)block, weights x^2 or qw * sqrtf(sigma2 + x^2), per 32-group the first
x of largest |x|, then 16 trial scales (C's first -max/values[0], then (itry + values[0])/max) each scored by
sum w*q*x, sum w*q*q over the group's codes, the best `sumqx^2 / sumq2` kept; IQ4_XS then rounds the 8 group
scales to 6 bits of the super-block's d and requantizes with them.
What differs from C, without changing a byte:
- best_index_int8(16, kvalues_iq4nl, x) is a table lookup: C picks the lower neighbour iff (x - lo) < (hi - x)
  in float32, and near every midpoint both differences are exact, so the code is "x below the midpoint". All
  midpoints are halves, so it depends only on floor(2x): a 513-entry table over clamp(floor(2x), -256, 256)
  (NaN gives 15, as C's binary search does).
- the 16 trials of a group run as 16 SIMD lanes over the group's elements, each lane summing in C's order.
"""

from __future__ import annotations

import numpy as np
import torch

from grokquant.quant.ggml.base import Quantizer, fp16_bytes, fp16_from_bytes, quantize_chunks
from grokquant.quant.ggml.compiled import F32, inline, kernel, nearest_int_bits

KVALUES = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                       dtype=torch.float32)
_KV = KVALUES.numpy()
_HALVES = np.arange(-256, 257, dtype=np.float32) / 2
INDEX = np.searchsorted((_KV[:-1] + _KV[1:]) / 2, _HALVES, side="right").astype(np.int32)  # code of slot s
VALUE = _KV[INDEX]  # kvalues_iq4nl[code] of slot s
GROUP_MAX_EPS = F32(1e-15)
NTRY = 7


@inline
def _slot(al):
    """Table slot clamp(floor(2*al), -256, 256) + 256; NaN and anything from 128 up -> the top slot."""
    t = F32(2) * al
    t = t if t < F32(256) else F32(256)
    t = t if t > F32(-256) else F32(-256)
    return np.int32(np.floor(t)) + np.int32(256)


@kernel
def iq4_index(x, out):
    """out[i] = best_index_int8(16, kvalues_iq4nl, x[i]) (the kernels' lookup, for tests)."""
    for i in range(x.shape[0]):
        out[i] = INDEX[_slot(x[i])]


@inline
def _group_scale(x, b, o, w, T, ids, sqx, sq2):
    """The scale of quantize_row_iq4_nl_impl's search for the group x[b, o:o + 32] with weights w; T = 16
    trials, passed at run time so that the trial loop is vectorized rather than unrolled."""
    amax = F32(0)
    mx = F32(0)
    for j in range(32):  # the first x of largest |x|
        v = x[b, o + j]
        take = abs(v) > amax
        amax = abs(v) if take else amax
        mx = v if take else mx
    if amax < GROUP_MAX_EPS:
        return F32(0)
    ids[0] = F32(1) / (-mx / F32(-127))  # C: d = -max/values[0], id = 1/d
    for t in range(1, T):
        ids[t] = F32(t - 1 - NTRY - 127) / mx  # (itry + values[0])/max
    for t in range(T):
        sqx[t] = F32(0)
        sq2[t] = F32(0)
    for j in range(32):
        xj = x[b, o + j]
        wj = w[j]
        for t in range(T):
            q = VALUE[_slot(ids[t] * xj)]
            wq = wj * q
            sqx[t] += wq * xj
            sq2[t] += wq * q
    d = sqx[0] / sq2[0] if sq2[0] > 0 else F32(0)
    best = d * sqx[0]
    for t in range(1, T):
        if sq2[t] > 0 and sqx[t] * sqx[t] > best * sq2[t]:
            d = sqx[t] / sq2[t]
            best = d * sqx[t]
    return d


@inline
def _weights(x, b, o, qw, use_qw, nq, sigma2, w):
    """C's weight[j] for the group at o: x^2, or qw * sqrtf(sigma2 + x^2); qw row b % nq."""
    for j in range(32):
        v = x[b, o + j]
        w[j] = qw[b % nq, o + j] * np.sqrt(sigma2 + v * v) if use_qw else v * v


@inline
def _sigma2(x, b, n):
    s = F32(0)
    for j in range(n):
        s += x[b, j] * x[b, j]
    return s * (F32(2) / F32(n))


@inline
def _pack(out, b, o, L, src):
    """q4[16*i + j] = L[32*i + j] | L[32*i + 16 + j] << 4 for the group at src, into out[b, o:o + 16]."""
    for j in range(16):
        out[b, o + j] = np.uint8(L[src + j] | (L[src + 16 + j] << 4))


@kernel
def _iq4_nl_blocks(x, qw, use_qw, out, dsc, T):
    """quantize_iq4_nl: blocks x [nb, 32]; qw [nq, 32] (row b % nq), used if use_qw; d into dsc."""
    nq = qw.shape[0]
    w = np.empty(32, np.float32)
    ids, sqx, sq2 = np.empty(T, np.float32), np.empty(T, np.float32), np.empty(T, np.float32)
    L = np.empty(32, np.int32)
    for b in range(x.shape[0]):
        _weights(x, b, 0, qw, use_qw, nq, _sigma2(x, b, 32), w)
        d = _group_scale(x, b, 0, w, T, ids, sqx, sq2)
        dsc[b] = d
        id_ = F32(1) / d if d != 0 else F32(0)
        for j in range(32):
            L[j] = INDEX[_slot(id_ * x[b, j])]
        _pack(out, b, 2, L, 0)


@kernel
def _iq4_xs_blocks(x, qw, use_qw, out, dsc, T):
    """quantize_iq4_xs: super-blocks x [nb, 256]; qw [nq, 256] (row b % nq), used if use_qw; d into dsc."""
    nq = qw.shape[0]
    w = np.empty(32, np.float32)
    ids, sqx, sq2 = np.empty(T, np.float32), np.empty(T, np.float32), np.empty(T, np.float32)
    scales = np.empty(8, np.float32)
    L = np.empty(32, np.int32)
    for b in range(x.shape[0]):
        sigma2 = _sigma2(x, b, 256)
        max_scale = F32(0)
        amax_scale = F32(0)
        for ib in range(8):
            _weights(x, b, 32 * ib, qw, use_qw, nq, sigma2, w)
            s = _group_scale(x, b, 32 * ib, w, T, ids, sqx, sq2)
            scales[ib] = s
            if abs(s) > amax_scale:
                amax_scale = abs(s)
                max_scale = s
        d = -max_scale / F32(32)  # all-zero block: -0.0, as in C
        dsc[b] = d
        id_ = F32(1) / d if d != 0 else F32(0)
        sh = 0
        for ib in range(8):
            l = max(-32, min(31, nearest_int_bits(id_ * scales[ib])))
            dl = d * F32(l)  # the codes come from the fp32 d, not its fp16 copy
            idl = F32(1) / dl if dl != 0 else F32(0)
            for j in range(32):
                L[j] = INDEX[_slot(idl * x[b, 32 * ib + j])]
            _pack(out, b, 8 + 16 * ib, L, 0)
            l += 32
            if ib % 2 == 0:
                out[b, 4 + ib // 2] = np.uint8(l & 15)
            else:
                out[b, 4 + ib // 2] |= np.uint8((l & 15) << 4)
            sh |= (l >> 4) << (2 * ib)
        out[b, 2] = np.uint8(sh & 255)
        out[b, 3] = np.uint8(sh >> 8)


def _nibbles(L: torch.Tensor) -> torch.Tensor:
    """Codes [S, 32] -> bytes [S, 16]: lo nibble element j, hi nibble element j + 16."""
    L = L.to(torch.uint8)
    return L[:, :16] | (L[:, 16:] << 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of `_nibbles`: [S, 16] bytes -> [S, 32] codes (int64, for indexing)."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1).long()


_NO_WEIGHTS = np.zeros((1, 256), np.float32)


class _IQ4(Quantizer):
    fp16_scales = slice(0, 2)

    def quantize(self, x, imatrix=None):
        """As Quantizer.quantize; every row shares the imatrix, so it is not copied per row."""
        if imatrix is None:
            return super().quantize(x)
        device = x.device
        x = x.detach().float().cpu().contiguous()
        rows, n = x.shape
        bs = self.type.block
        if n % bs:
            raise ValueError(f"{self.name}: row length {n} is not a multiple of {bs}")
        nq = n // bs
        qw = np.ascontiguousarray(imatrix.detach().float().cpu().numpy().reshape(nq, bs))

        def run(out, xc, buf):  # whole rows: block b's weights are qw[b % nq]
            self._run(out, xc, qw, True)

        chunk = max(1, self.chunk // nq) * nq if nq else 1
        return quantize_chunks(run, self.type.block_bytes, chunk, x.view(-1, bs)).view(rows, -1).to(device)

    def quantize_blocks(self, x, qw=None):
        if x.device.type != "cpu":
            return super().quantize_blocks(x.cpu(), None if qw is None else qw.cpu()).to(x.device)
        return super().quantize_blocks(x, qw)

    def quantize_chunk(self, out, x, qw, buf):
        wn = _NO_WEIGHTS if qw is None else np.ascontiguousarray(qw.detach().numpy(), dtype=np.float32)
        self._run(out, x, wn, qw is not None)

    def _run(self, out, x, qw, use_qw):
        xn = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        d = np.empty(xn.shape[0], np.float32)
        self.kernel(xn, qw, use_qw, out.numpy(), d, 2 * NTRY + 2)
        out[:, 0:2] = fp16_bytes(torch.from_numpy(d)[:, None])

    levels = KVALUES


class IQ4_NL(_IQ4, name="IQ4_NL"):
    """32-blocks: fp16 d, 16 codebook nibbles; y = d * kvalues[q]."""

    chunk = 8192
    kernel = staticmethod(_iq4_nl_blocks)

    def dequantize_blocks(self, b):
        return fp16_from_bytes(b[:, self.fp16_scales]) * KVALUES.to(b.device)[_unnibble(b[:, 2:])]

    def grid(self, b):
        return fp16_from_bytes(b[:, self.fp16_scales]).expand(-1, 32), None

    def with_codes(self, b, codes):
        return torch.cat([b[:, :2], _nibbles(codes)], 1)


class IQ4_XS(_IQ4, name="IQ4_XS"):
    """256-blocks of 8 x 32: fp16 d, 6-bit signed sub-scales (scales_h u16 + scales_l[4]), IQ4 nibbles."""

    chunk = 1024
    kernel = staticmethod(_iq4_xs_blocks)

    def _sub_scales(self, b: torch.Tensor) -> torch.Tensor:
        nb = b.shape[0]
        sh = b[:, 2].int() | (b[:, 3].int() << 8)
        lo = torch.stack([b[:, 4:8] & 0xF, b[:, 4:8] >> 4], dim=2).view(nb, 8).int()
        hi = (sh[:, None] >> torch.arange(0, 16, 2, dtype=torch.int32, device=b.device)) & 3
        return fp16_from_bytes(b[:, self.fp16_scales]) * ((lo | (hi << 4)) - 32).float()  # [nb, 8]

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        q = KVALUES.to(b.device)[_unnibble(b[:, 8:].reshape(nb * 8, 16))].view(nb, 8, 32)
        return (self._sub_scales(b)[:, :, None] * q).view(nb, 256)

    def grid(self, b):
        return self._sub_scales(b).repeat_interleave(32, 1), None

    def with_codes(self, b, codes):
        return torch.cat([b[:, :8], _nibbles(codes.reshape(-1, 32)).reshape(-1, 128)], 1)
