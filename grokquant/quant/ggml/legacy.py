"""Legacy 32-element GGML blocks: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, bit-exact with ggml-quants.c.

Beyond the rules of `common`: ties keep the first element (the C loops compare with strict `<`), which
decides the sign of max|x| and of a zero min/max, and float -> uint8 truncation stands for the C casts.
With an imatrix, Q4_0/Q5_0 run `make_qx_quants` and Q4_1/Q5_1 `make_qkx3_quants` on weights
qw * sqrt(sigma2 + x^2), sigma2 = mean x^2 over the whole row (so `quantize` computes it per row).
"""

from __future__ import annotations

import numpy as np
import torch

from grokquant.quant.ggml.base import Quantizer, fp16_bytes, fp16_from_bytes, quantize_chunks
from grokquant.quant.ggml.common import const, first_absmax, inverse, make_qkx, make_qx_quants, seqsum, sqrtf_

QK = 32
# Blocks per chunk: small enough that temporaries stay in cache (a fresh 64 MB temporary per op costs
# more in page faults than the arithmetic), large enough to amortize per-op overhead.
CHUNK_REF, CHUNK_QKX, CHUNK_QX = 1 << 15, 1 << 13, 1 << 12


def _first_of(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, idx).squeeze(-1)


def _first_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block min and max; the C keeps the first of equal values, which only matters for the sign of 0."""
    mn, mx = x.amin(dim=-1), x.amax(dim=-1)
    z = ((mn == 0) | (mx == 0)).nonzero().squeeze(1)
    if z.numel():
        xz = x[z]
        mn[z] = _first_of(xz, xz.argmin(dim=-1, keepdim=True))
        mx[z] = _first_of(xz, xz.argmax(dim=-1, keepdim=True))
    return mn, mx


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf, half away from zero (torch.round is half to even): trunc(v + copysign(0.5 - ulp/4, v)).
    With the largest float below 0.5 a tie still carries up and 0.49999997 does not (floor(v + 0.5) fails)."""
    return (v + torch.copysign(const(np.nextafter(np.float32(0.5), np.float32(0)), v), v)).trunc_()


def row_sigma2(rows: torch.Tensor) -> torch.Tensor:
    """sigma2 = (sum_j x_j*x_j) / n per row, summed sequentially like `quantize_row_q4_0_impl`."""
    n = rows.shape[1]
    sq = (rows * rows).t().contiguous()
    return seqsum(sq) / const(n, rows)


# ---- block types ----------------------------------------------------------------------------------------

class _Legacy(Quantizer):
    """Q4_0/Q4_1/Q5_0/Q5_1: d (and m) as fp16, (qh: bit 4 of element j in bit j of a LE u32), then qs[16]
    with element j in the low nibble of qs[j] and element j + 16 in the high one."""

    bits: int = 4
    has_min: bool = False
    fp16_scales = slice(0, 2)  # d; with a min, d and m

    def quantize(self, x, imatrix=None):
        """As Quantizer.quantize, plus the row-global sigma2 the imatrix search needs."""
        if imatrix is None:
            return super().quantize(x)
        x = x.float().contiguous()
        rows, n = x.shape
        if n % QK:
            raise ValueError(f"{self.name}: row length {n} is not a multiple of {QK}")
        qw = imatrix.float().to(x.device).reshape(1, n).expand(rows, n).reshape(-1, QK)
        sigma2 = row_sigma2(x).repeat_interleave(n // QK)
        return self.quantize_blocks(x.view(-1, QK), qw, sigma2).view(rows, -1)

    def quantize_blocks(self, x, qw=None, sigma2=None):
        """sigma2: per-block copy of the row's mean x^2; if missing, each block is taken as its own row."""
        nb = self.type.block_bytes
        if qw is None:
            return quantize_chunks(self._reference, nb, CHUNK_REF, x)
        if sigma2 is None:
            sigma2 = row_sigma2(x)
        return quantize_chunks(self._weighted, nb, CHUNK_QKX if self.has_min else CHUNK_QX, x, qw, sigma2)

    def _reference(self, out, x, buf):
        """quantize_row_qX_Y_ref: truncate x*id + offset (all args >= 0, so trunc = floor); id from fp32 d."""
        top = (1 << self.bits) - 1
        if self.has_min:
            mn, mx = _first_min_max(x)
            d = (mx - mn) / const(top, x)
            q = (x - mn[:, None]) * inverse(d)[:, None] + const(0.5, x)
            return self._pack(out, d, mn, q.to(torch.uint8).clamp_(max=top))  # float -> uint8 truncates
        half = 1 << (self.bits - 1)
        d = first_absmax(x, 1)[1] / const(-half, x)
        q = x * inverse(d)[:, None] + const(half + 0.5, x)
        self._pack(out, d, None, q.to(torch.uint8).clamp_(max=top))

    def _weighted(self, out, x, qw, sigma2, buf):
        """quantize_row_qX_Y_impl: weights qw*sqrtf(sigma2 + x^2), then the type's scale search."""
        w = qw * sqrtf_(sigma2[:, None] + x * x)
        xt, wt = x.t().contiguous(), w.t().contiguous()
        if self.has_min:
            codes, d, the_min = make_qkx(xt, wt, (1 << self.bits) - 1, -0.9, 0.05, 36, buf)
            return self._pack(out, d, -the_min, codes.t())  # the C stores m = -the_min
        codes, d = make_qx_quants(xt, wt, 1 << (self.bits - 1), buf)
        self._pack(out, d, None, codes.t())

    def _pack(self, out, d, m, codes):
        """Write blocks into out [n, block_bytes]: d, (m), (qh), qs."""
        out[:, self.fp16_scales] = fp16_bytes(d[:, None] if m is None else torch.stack([d, m], 1))
        self._pack_codes(out, codes)

    def _pack_codes(self, out, codes):
        codes = codes.to(torch.uint8)
        if self.bits == 5:
            qh = self.fp16_scales.stop
            out[:, qh:qh + 4] = ((codes >> 4).float() @ _bit_weights(codes.device)).to(torch.uint8)
            codes = codes & 15
        out[:, -16:] = codes[:, :16] | (codes[:, 16:] << 4)

    def __init__(self):
        n = 1 << self.bits
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


class Q5_0(_Legacy, name="Q5_0"):
    bits = 5


class Q4_1(_Legacy, name="Q4_1"):
    has_min, fp16_scales = True, slice(0, 4)  # d, m


class Q5_1(_Legacy, name="Q5_1"):
    bits, has_min, fp16_scales = 5, True, slice(0, 4)


class Q8_0(Quantizer, name="Q8_0"):
    """d = max|x|/127 as fp16, 32 int8 codes roundf(x/d) (id from the fp32 d). The imatrix is unused."""

    fp16_scales = slice(0, 2)
    chunk = CHUNK_REF

    def quantize_chunk(self, out, x, qw, buf):
        d = x.abs().amax(dim=1) / const(127, x)
        out[:, self.fp16_scales] = fp16_bytes(d[:, None])
        out[:, 2:] = _roundf(x * inverse(d)[:, None]).to(torch.int8).view(torch.uint8)

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
