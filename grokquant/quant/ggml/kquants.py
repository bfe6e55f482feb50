"""GGML K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-element super-blocks): bit-exact, vectorized ports of
ggml-quants.c, with the shared searches and rounding rules of `common`.

Without importance weights each type follows `quantize_row_q*_K_ref`, with them `quantize_row_q*_K_impl`.
Codes go through C's integer types: uint8 / int8 wrap-around is reproduced with masks.
Speed: super-blocks are processed in chunks on all CPU threads (base.quantize_chunks), Q4_K-Q6_K on reused
scratch buffers. The make_qkx search, most of the work, runs as TorchScript without the GIL: as eager ops,
two threads spent much of their time handing the GIL to each other and ran barely faster than one.
"""

from __future__ import annotations

import torch

from grokquant.quant.ggml.base import Quantizer, Scratch, fp16_bytes, fp16_from_bytes, fp16_round
from grokquant.quant.ggml.common import (GROUP_MAX_EPS, blocks, c_max, const, elements, first_absmax,
                                         imatrix_weights, make_q3_quants, make_qkx, make_qp_quants, make_qx_quants,
                                         nearest_int, nearest_int_, seqsum, sqrtf_, sum_squares)

QK_K = 256


def _requantize(x, L, d, dm, lo: int, hi: int, buf: Scratch) -> torch.Tensor:
    """Final codes from the stored scales: clamp(nearest_int((x + dm) / d), lo, hi) - lo on element-major
    x [n, M] with per-sub-block d, dm [M] (dm None: no offset); sub-blocks with d == 0 keep the search codes
    L (C: `if (!d) continue`). Returns block-major uint8 codes [M / (256 / n), 256]."""
    n, M = x.shape
    t = torch.add(x, dm, out=buf("e", n, M)) if dm is not None else buf("e", n, M).copy_(x)
    q = nearest_int_(t.div_(d)).clamp_(lo, hi).sub_(lo)
    q8 = buf("q8", n, M, dtype=torch.uint8).copy_(q)
    keep = d == 0
    if keep.any():
        q8[:, keep] = L[:, keep].to(torch.uint8)
    return q8.t().reshape(-1, QK_K)


# ---- Q4_K / Q5_K / Q6_K ---------------------------------------------------------------------------------

class _KQuant45(Quantizer):
    """Q4_K / Q5_K: fp16 d and dmin, 12 bytes of six-bit sub-block scales and mins, then the codes;
    8 sub-blocks of 32, y = d*sc_j*q - dmin*m_j with q in 0..nmax."""

    nmax = 15
    ref_search = (-1.0, 0.1, 20)  # (rmin, rdelta, nstep) of make_qkx2_quants in the _ref path
    clamp_qp_codes = False  # Q5_K's _impl applies MIN(63, .) to the make_qp_quants codes, Q4_K's does not
    fp16_scales = slice(0, 4)  # d, dmin

    @staticmethod
    def pack_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
        """Eight six-bit scales and mins (int [nb, 8], 0..255 as C's uint8) -> the 12 bytes at 4..16."""
        b_s = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
        b_m = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
        b_sm = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
        return (torch.cat([b_s, b_m, b_sm], 1) & 0xFF).to(torch.uint8)

    @staticmethod
    def unpack_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """get_scale_min_k4 for all j: uint8 [nb, 12] -> sc, m int32 [nb, 8]."""
        b = b.to(torch.int32)
        s, m, sm = b[:, :4], b[:, 4:8], b[:, 8:]
        sc = torch.cat([s & 63, (sm & 0xF) | ((s >> 6) << 4)], 1)
        mn = torch.cat([m & 63, (sm >> 4) | ((m >> 6) << 4)], 1)
        return sc, mn

    def _sub_scales(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """d*sc_j and dmin*m_j as the dequantizer (and the C requantization) read them: float [nb, 8]."""
        sc, m = self.unpack_scales(b[:, 4:16])
        dd = fp16_from_bytes(b[:, self.fp16_scales])
        return dd[:, :1] * sc.float(), dd[:, 1:] * m.float()

    def quantize_chunk(self, out, x, qw, buf):
        nb = x.shape[0]
        M = nb * 8
        xs = buf("x", 32, M).copy_(x.reshape(M, 32).t())  # [32, sub-blocks]
        w = buf("w", 32, M)
        x2 = torch.mul(xs, xs, out=buf("t", 32, M))
        if qw is None:  # quantize_row_q*_K_ref
            av_x = sqrtf_(seqsum(x2) / const(32, x), buf)
            torch.abs(xs, out=w).add_(av_x)
            search = self.ref_search
        else:  # quantize_row_q*_K_impl: sigma2 over the whole super-block, in its element order
            xt = buf("xt", QK_K, nb).copy_(x.t())
            sigma2 = (2 * seqsum(xt.mul_(xt)) / const(QK_K, x)).repeat_interleave(8)
            torch.mul(qw.reshape(M, 32).t(), sqrtf_(x2.add_(sigma2), buf), out=w)
            search = (-0.9, 0.05, 36)
        L, scales, mins = make_qkx(xs, w, self.nmax, *search, buf)
        scales, mins = scales.view(nb, 8), mins.view(nb, 8)

        if qw is None:
            zero = torch.zeros(nb, device=x.device)
            max_scale, max_min = c_max(scales), c_max(mins)
            c63 = const(63, x)
            inv_scale = torch.where(max_scale > 0, c63 / max_scale, zero)
            inv_min = torch.where(max_min > 0, c63 / max_min, zero)
            ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_max(63)
            lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_max(63)
            d, dmin = max_scale / c63, max_min / c63
        else:  # one make_qp_quants call for scales and mins: groups [2, nb], weights shared
            sw = seqsum(w).view(nb, 8).t()[:, None].expand(8, 2, nb)
            lsm, dd = make_qp_quants(torch.stack([scales.t(), mins.t()], 1).reshape(8, -1), sw.reshape(8, -1), 63)
            lsm, (d, dmin) = lsm.view(8, 2, nb), dd.view(2, nb)
            ls, lm = lsm[:, 0].t(), lsm[:, 1].t()
            if self.clamp_qp_codes:
                ls, lm = ls.clamp_max(63), lm.clamp_max(63)

        head = torch.cat([fp16_bytes(torch.stack([d, dmin], 1)), self.pack_scales(ls, lm)], 1)
        dj, dmj = self._sub_scales(head)  # C re-reads the packed codes (get_scale_min_k4)
        q = _requantize(xs, L, dj.view(M), dmj.view(M), 0, self.nmax, buf)
        torch.cat([head, self._pack_q(q.view(nb, 4, 2, 32))], 1, out=out)

    def _pack_q(self, q):  # uint8 q [nb, 4 chunks of 64, 2 halves, 32] -> qs (and qh)
        raise NotImplementedError

    def _codes(self, b):  # -> q [nb, 4 chunks, 2 halves, 32]
        raise NotImplementedError

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        d, dm = self._sub_scales(b)
        return (d.view(nb, 8, 1) * self._codes(b).reshape(nb, 8, 32).float() - dm.view(nb, 8, 1)).view(nb, QK_K)

    def __init__(self):
        self.levels = torch.arange(self.nmax + 1, dtype=torch.float32)

    def grid(self, b):
        d, dm = self._sub_scales(b)
        return d.repeat_interleave(32, 1), -dm.repeat_interleave(32, 1)

    def with_codes(self, b, codes):
        return torch.cat([b[:, :16], self._pack_q(codes.to(torch.uint8).view(-1, 4, 2, 32))], 1)


class Q4_K(_KQuant45, name="Q4_K"):
    """qs[128]: chunk c of 64 codes holds sub-block 2c in its low nibbles, 2c + 1 in its high ones."""

    def _pack_q(self, q):
        return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)

    def _codes(self, b):
        qs = b[:, 16:].view(-1, 4, 1, 32)
        return torch.cat([qs & 0xF, qs >> 4], 2)


class Q5_K(_KQuant45, name="Q5_K"):
    """qh[32] (bit 4 of the codes), then qs[128] as Q4_K's."""

    nmax = 31
    ref_search = (-0.5, 0.1, 15)
    clamp_qp_codes = True

    @staticmethod
    def _bit(device):  # qh bit of chunk c, half h: 2c + h
        return torch.arange(8, dtype=torch.uint8, device=device).view(1, 4, 2, 1)

    def _pack_q(self, q):
        ql = (q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)
        qh = ((q >> 4) << self._bit(q.device)).sum((1, 2), dtype=torch.uint8)  # distinct bits: sum = OR
        return torch.cat([qh, ql.reshape(q.shape[0], 128)], 1)

    def _codes(self, b):
        qs = b[:, 48:].view(-1, 4, 1, 32)
        qh = b[:, 16:48].view(-1, 1, 1, 32)
        return torch.cat([qs & 0xF, qs >> 4], 2) | (((qh >> self._bit(b.device)) & 1) << 4)


class Q6_K(Quantizer, name="Q6_K"):
    """ql[128], qh[64], int8 scales[16], fp16 d; 16 sub-blocks of 16, y = d*scale_j*(q - 32), q in 0..63."""

    fp16_scales = slice(208, 210)

    def quantize_chunk(self, out, x, qw, buf):
        nb = x.shape[0]
        M = nb * 16
        xs = buf("x", 16, M).copy_(x.reshape(M, 16).t())  # [16, sub-blocks]
        w = buf("w", 16, M)
        if qw is None:
            torch.mul(xs, xs, out=w)
        else:
            w.copy_(qw.reshape(M, 16).t())  # _impl uses qw as is
        L, scales = make_qx_quants(xs, w, 32, buf)
        scales = scales.view(nb, 16)
        amax, max_scale = first_absmax(torch.where(scales.isnan(), 0.0, scales), 1)  # C skips NaN (overflow)
        iscale = const(-128, x) / max_scale
        d16 = fp16_bytes((1 / iscale)[:, None])
        codes = nearest_int(iscale[:, None] * scales).clamp_max(127) & 0xFF  # stored as int8
        dj = (fp16_from_bytes(d16) * ((codes ^ 0x80) - 0x80).float()).view(M)
        q = _requantize(xs, L, dj, None, -32, 31, buf)
        torch.cat([self._pack_q(q), codes.to(torch.uint8), d16], 1, out=out)
        out[amax < GROUP_MAX_EPS] = 0  # all sub-scales ~0: the whole block is written as zeros

    @staticmethod
    def _pack_q(q: torch.Tensor) -> torch.Tensor:
        """Codes 0..63 [nb, 256] -> ql[128], qh[64]."""
        q = q.view(-1, 2, 4, 32)  # half, quarter, l
        lo = q & 0xF
        ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2)
        qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
        return torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64)], 1)

    levels = torch.arange(-32, 32, dtype=torch.float32)

    def _sub_scales(self, b: torch.Tensor) -> torch.Tensor:
        return fp16_from_bytes(b[:, self.fp16_scales]) * b[:, 192:208].view(torch.int8).float()  # [nb, 16]

    def grid(self, b):
        return self._sub_scales(b).repeat_interleave(16, 1), None

    def with_codes(self, b, codes):
        return torch.cat([self._pack_q(codes.to(torch.uint8)), b[:, 192:]], 1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        d = self._sub_scales(b).view(nb, 16, 1)
        ql = b[:, :128].view(nb, 2, 1, 64)
        ql = torch.cat([ql & 0xF, ql >> 4], 2).view(nb, 2, 4, 32)
        shift = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
        qh = b[:, 128:192].view(nb, 2, 1, 32) >> shift
        q = (ql | ((qh & 3) << 4)).to(torch.int32) - 32
        return (d * q.float().view(nb, 16, 16)).view(nb, QK_K)


# ---- Q2_K / Q3_K ----------------------------------------------------------------------------------------

class _KQuant2(Quantizer):
    """Q2_K / Q3_K: 16 sub-blocks of 16 whose codes keep their low 2 bits in qs[64]."""

    @staticmethod
    def pack_qs(L: torch.Tensor) -> torch.Tensor:
        """2-bit codes [nb, 256] -> qs [nb, 64]: byte 32h+l holds elements 128h+l, +32, +64, +96."""
        L = L.to(torch.uint8).view(-1, 2, 4, 32)
        return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)

    @staticmethod
    def unpack_qs(qs: torch.Tensor) -> torch.Tensor:
        """Inverse of `pack_qs`: [nb, 64] -> [nb, 256] (uint8)."""
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).view(1, 1, 4, 1)
        return ((qs.view(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


class Q2_K(_KQuant2, name="Q2_K"):
    """scales[16] (scale code | min code << 4), qs[64], fp16 d and dmin; y = d*sc*q - dmin*m, q in 0..3."""

    fp16_scales = slice(80, 84)  # d, dmin

    def quantize_chunk(self, out, x, qw, buf):
        nb = x.shape[0]
        xe = elements(x, 16)
        if qw is None:  # quantize_row_q2_K_ref: weights |x|, mean absolute error
            L, scales, mins = make_qkx(xe, xe.abs(), 3, -0.5, 0.1, 15, buf, use_mad=True)
            scales, mins = scales.view(nb, 16), mins.view(nb, 16)
            ms, mm = scales.max(1).values, mins.max(1).values
            c15 = const(15, x)
            ls = torch.where(ms[:, None] > 0, nearest_int((c15 / ms)[:, None] * scales), 0)
            lm = torch.where(mm[:, None] > 0, nearest_int((c15 / mm)[:, None] * mins), 0)
            d, dmin = torch.where(ms > 0, ms / c15, 0.0), torch.where(mm > 0, mm / c15, 0.0)
        else:  # quantize_row_q2_K_impl
            w = imatrix_weights(x, qw, 16, sum_squares(x) / 256)
            L, scales, mins = make_qkx(xe, w, 3, -0.9, 0.05, 36, buf)
            sw = elements(seqsum(w).view(nb, 16), 16)
            ls, d = make_qp_quants(elements(scales.view(nb, 16), 16), sw, 15)
            lm, dmin = make_qp_quants(elements(mins.view(nb, 16), 16), sw, 15)
            ls, lm = blocks(ls, nb), blocks(lm, nb)
        sc = (ls | (lm << 4)) & 0xFF  # C: uint8 scales[j] = l, then |= l << 4
        d, dmin = fp16_round(d)[:, None], fp16_round(dmin)[:, None]
        q = _requantize(xe, L, (d * (sc & 0xF).float()).reshape(-1), (dmin * (sc >> 4).float()).reshape(-1), 0, 3, buf)
        torch.cat([sc.to(torch.uint8), self.pack_qs(q), fp16_bytes(torch.cat([d, dmin], 1))], 1, out=out)

    def _sub_scales(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sc = b[:, :16]
        dd = fp16_from_bytes(b[:, self.fp16_scales])
        return dd[:, :1] * (sc & 0xF).float(), dd[:, 1:] * (sc >> 4).float()  # [nb, 16] each

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        dl, ml = self._sub_scales(b)
        return (dl.view(nb, 16, 1) * self.unpack_qs(b[:, 16:80]).float().view(nb, 16, 16) - ml.view(nb, 16, 1)).view(nb, 256)

    levels = torch.arange(4, dtype=torch.float32)

    def grid(self, b):
        dl, ml = self._sub_scales(b)
        return dl.repeat_interleave(16, 1), -ml.repeat_interleave(16, 1)

    def with_codes(self, b, codes):
        return torch.cat([b[:, :16], self.pack_qs(codes), b[:, 80:]], 1)


class Q3_K(_KQuant2, name="Q3_K"):
    """hmask[32], qs[64], 12 bytes of signed six-bit scales, fp16 d; y = d*(c - 32)*q, q in -4..3
    (2 low bits in qs, the high bit in hmask)."""

    fp16_scales = slice(108, 110)

    @staticmethod
    def pack_scales(c: torch.Tensor) -> torch.Tensor:
        """Six-bit codes [nb, 16] -> 12 bytes: low nibbles in 0..7 (j >= 8 high half), top 2 bits in 8..11."""
        c = c.to(torch.uint8)
        hi = (c >> 4).view(-1, 4, 4)  # [nb, j // 4, j % 4]
        top = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
        return torch.cat([(c[:, :8] & 0xF) | ((c[:, 8:] & 0xF) << 4), top], dim=1)

    @staticmethod
    def unpack_scales(s: torch.Tensor) -> torch.Tensor:
        """Inverse of `pack_scales`: [nb, 12] -> codes [nb, 16] (int32, 0..63)."""
        lo = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1).int()
        shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=s.device)
        hi = (s[:, 8:12, None].int() >> shifts) & 3  # [nb, j % 4, j // 4]
        return lo | (hi.transpose(1, 2).reshape(-1, 16) << 4)

    def quantize_chunk(self, out, x, qw, buf):
        nb = x.shape[0]
        xe = elements(x, 16)
        if qw is None:  # quantize_row_q3_K_ref
            L, scales = make_q3_quants(xe)
            scales = scales.view(nb, 16)
            ms = first_absmax(scales, 1)[1]
            iscale = const(-32, x) / ms
            c = torch.where(ms[:, None] != 0, nearest_int(iscale[:, None] * scales).clamp_(-32, 31) + 32, 0)
            d = torch.where(ms != 0, const(1, x) / iscale, 0.0)
        else:  # quantize_row_q3_K_impl
            w = imatrix_weights(x, qw, 16, 2 * sum_squares(x) / 256)
            L, scales = make_qx_quants(xe, w, 4, buf)
            sw = elements(seqsum(w).view(nb, 16), 16)
            c, d = make_qx_quants(elements(scales.view(nb, 16), 16), sw, 32, Scratch(x.device))  # L stays in buf
            c = blocks(c, nb)
        d = fp16_round(d)[:, None]
        q = _requantize(xe, L, (d * (c - 32).float()).reshape(-1), None, -4, 3, buf)
        torch.cat([self._pack_q(q), self.pack_scales(c), fp16_bytes(d)], 1, out=out)

    @staticmethod
    def _pack_q(q: torch.Tensor) -> torch.Tensor:
        """Codes 0..7 (level + 4) [nb, 256] -> hmask[32] (set: level >= 0), qs[64] (the low 2 bits)."""
        nb = q.shape[0]
        high = q > 3
        bits = torch.arange(8, dtype=torch.uint8, device=q.device).view(1, 8, 1)
        hmask = (high.view(nb, 8, 32).to(torch.uint8) << bits).sum(1)  # element 32b + m -> hmask[m] bit b
        return torch.cat([hmask.to(torch.uint8), _KQuant2.pack_qs(torch.where(high, q - 4, q))], 1)

    def _sub_scales(self, b: torch.Tensor) -> torch.Tensor:
        return fp16_from_bytes(b[:, self.fp16_scales]) * (self.unpack_scales(b[:, 96:108]) - 32).float()

    levels = torch.arange(-4, 4, dtype=torch.float32)

    def grid(self, b):
        return self._sub_scales(b).repeat_interleave(16, 1), None

    def with_codes(self, b, codes):
        return torch.cat([self._pack_q(codes.to(torch.uint8)), b[:, 96:]], 1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        dl = self._sub_scales(b).view(nb, 16, 1)
        hbit = (b[:, :32].view(nb, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)) & 1
        q = self.unpack_qs(b[:, 32:96]).int() + (hbit.reshape(nb, 256).int() << 2) - 4
        return (dl * q.float().view(nb, 16, 16)).view(nb, 256)
