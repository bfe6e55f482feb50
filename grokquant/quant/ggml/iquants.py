"""GGML IQ4_NL and IQ4_XS (4-bit non-linear codebook): bit-exact, vectorized ports of ggml-quants.c, with the
shared rounding rules of `common`. Every search runs on all blocks at once, element-major [32, S]."""

from __future__ import annotations

import torch

from grokquant.quant.ggml.base import Quantizer, fp16_bytes, fp16_from_bytes
from grokquant.quant.ggml.common import (GROUP_MAX_EPS, const, elements, f32, first_absmax, imatrix_weights,
                                         inverse, nearest_int, seqsum, sum_squares)

KVALUES = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                       dtype=torch.float32)
# best_index_int8 picks the lower entry iff (x - lo) < (hi - x) in float32. Near every midpoint both
# differences are exact (they stay within x's binade), so this equals "x < midpoint", a tie going to the
# upper entry. All midpoints are halves, so the index depends only on floor(2x) (exact): two 513-entry
# tables indexed by clamp(floor(2x), -256, 256) give code and value, several times faster than bucketize.
_HALVES = torch.arange(-256, 257, dtype=torch.float32) / 2
IQ4_INDEX = torch.bucketize(_HALVES, (KVALUES[:-1] + KVALUES[1:]) / 2, right=True).to(torch.uint8)
IQ4_VALUE = KVALUES[IQ4_INDEX.long()]


def _iq4_slot(al: torch.Tensor) -> torch.Tensor:
    """Table row clamp(floor(2*al), -256, 256) + 256 per element, computed in place in al (NaN, from 0*inf
    in all-zero groups, -> row 0)."""
    return al.mul_(2).floor_().nan_to_num_(-256.0).clamp_(-256, 256).add_(256).to(torch.int32).view(-1)


def iq4_index(x: torch.Tensor) -> torch.Tensor:
    """best_index_int8(16, kvalues_iq4nl, x) for every element (uint8 codes)."""
    return IQ4_INDEX.to(x.device).index_select(0, _iq4_slot(x.clone())).view(x.shape)


def _iq4_value(al: torch.Tensor) -> torch.Tensor:
    """kvalues_iq4nl[best_index_int8(al)] as float32; overwrites al."""
    return IQ4_VALUE.to(al.device).index_select(0, _iq4_slot(al)).view(al.shape)


def _iq4_scales(x: torch.Tensor, w: torch.Tensor, ntry: int = 7) -> torch.Tensor:
    """Per-sub-block scale of quantize_row_iq4_nl_impl's search; x, w element-major [32, S]."""
    amax, mx = first_absmax(x, 0)

    def fit(idv):
        q = _iq4_value(idv * x)
        wq = w * q
        return seqsum(wq * x), seqsum(wq * q)

    sqx, sq2 = fit(const(1, x) / (-mx / const(-127, x)))  # C: d = -max/values[0], id = 1/d
    d = torch.where(sq2 > 0, sqx / sq2, 0.0)
    best = d * sqx
    for itry in range(-ntry, ntry + 1):
        sqx, sq2 = fit(const(itry - 127, x) / mx)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = torch.where(better, sqx / sq2, d)
        best = torch.where(better, d * sqx, best)
    return torch.where(amax < GROUP_MAX_EPS, 0.0, d)


def _iq4_weights(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """x^2 without imatrix, else qw * sqrt(sigma2 + x^2) with sigma2 = 2*sum(x^2)/block."""
    if qw is None:
        xe = elements(x, 32)
        return xe * xe
    return imatrix_weights(x, qw, 32, sum_squares(x) * f32(2 / x.shape[1]))


def _nibbles(L: torch.Tensor) -> torch.Tensor:
    """Codes [S, 32] -> bytes [S, 16]: lo nibble element j, hi nibble element j + 16."""
    L = L.to(torch.uint8)
    return L[:, :16] | (L[:, 16:] << 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of `_nibbles`: [S, 16] bytes -> [S, 32] codes (int64, for indexing)."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1).long()


class IQ4_NL(Quantizer, name="IQ4_NL"):
    """32-blocks: fp16 d, 16 codebook nibbles; y = d * kvalues[q]."""

    fp16_scales = slice(0, 2)
    chunk = 8192  # 2^18 elements, like the 256-blocks: the many passes of a search then stay in cache

    def quantize_chunk(self, out, x, qw, buf):
        xe = elements(x, 32)
        d = _iq4_scales(xe, _iq4_weights(x, qw))
        L = iq4_index(inverse(d) * xe)
        torch.cat([fp16_bytes(d[:, None]), _nibbles(L.t())], dim=1, out=out)

    def dequantize_blocks(self, b):
        return fp16_from_bytes(b[:, self.fp16_scales]) * KVALUES.to(b.device)[_unnibble(b[:, 2:])]

    levels = KVALUES

    def grid(self, b):
        return fp16_from_bytes(b[:, self.fp16_scales]).expand(-1, 32), None

    def with_codes(self, b, codes):
        return torch.cat([b[:, :2], _nibbles(codes)], 1)


class IQ4_XS(Quantizer, name="IQ4_XS"):
    """256-blocks of 8 x 32: fp16 d, 6-bit signed sub-scales (scales_h u16 + scales_l[4]), IQ4 nibbles."""

    fp16_scales = slice(0, 2)

    def quantize_chunk(self, out, x, qw, buf):
        nb = x.shape[0]
        xe = elements(x, 32)
        s = _iq4_scales(xe, _iq4_weights(x, qw)).view(nb, 8)
        d = -first_absmax(s, 1)[1] / 32  # all-zero block: d = -0.0, as in C
        l = nearest_int(inverse(d)[:, None] * s).clamp(-32, 31)
        idl = inverse(d[:, None] * l.float())  # codes come from the fp32 d, not the fp16 copy
        L = iq4_index(idl.view(1, -1) * xe)
        u = (l + 32).to(torch.uint8)
        shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=x.device)
        h = ((u >> 4).int() << shifts).sum(1, dtype=torch.int32)  # scales_h: bits 2ib..2ib+1
        sl = (u[:, 0::2] & 0xF) | ((u[:, 1::2] & 0xF) << 4)
        sh = torch.stack([h & 0xFF, h >> 8], dim=1).to(torch.uint8)
        torch.cat([fp16_bytes(d[:, None]), sh, sl, _nibbles(L.t()).reshape(nb, 128)], dim=1, out=out)

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

    levels = KVALUES

    def grid(self, b):
        return self._sub_scales(b).repeat_interleave(32, 1), None

    def with_codes(self, b, codes):
        return torch.cat([b[:, :8], _nibbles(codes.reshape(-1, 32)).reshape(-1, 128)], 1)
