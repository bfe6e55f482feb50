"""GGML K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-element super-blocks): block layouts, dequantization and
the grid views GPTQ rounds onto; quantization runs the numba ports of ggml-quants.c in `kquant_kernels`
(bytes identical to ggml's).

Without importance weights each type follows `quantize_row_q*_K_ref`, with them `quantize_row_q*_K_impl`.
Chunks of super-blocks run on all CPU threads (base.quantize_chunks); the kernels release the GIL.
"""

from __future__ import annotations

import numpy as np
import torch

from grokquant.quant.ggml import kquant_kernels as kk
from grokquant.quant.ggml.lanes import qx_numerators, trial_numerators
from grokquant.quant.ggml.base import Quantizer, fp16_from_bytes

QK_K = 256
IMATRIX_SEARCH = (-0.9, 0.05, 36)  # (rmin, rdelta, nstep) of make_qkx3_quants in the _impl paths
_NO_WEIGHTS = np.zeros((0, QK_K), np.float32)


class _KQuant(Quantizer):
    """A K-quant whose blocks `kernel` writes: kernel(x, qw, use_qw, out, *kernel_args(use_qw)) on contiguous
    float32 numpy copies of a chunk's blocks and weights, into the chunk's bytes."""

    kernel = None  # staticmethod(one of kquant_kernels' quantize_*)

    def kernel_args(self, use_qw: bool) -> tuple:
        raise NotImplementedError

    def quantize_blocks(self, x, qw=None):
        if x.device.type != "cpu":  # the kernels run on the CPU
            return super().quantize_blocks(x.cpu(), None if qw is None else qw.cpu()).to(x.device)
        return super().quantize_blocks(x, qw)

    def quantize_chunk(self, out, x, qw, buf):
        xn = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        wn = _NO_WEIGHTS if qw is None else np.ascontiguousarray(qw.detach().numpy(), dtype=np.float32)
        self.kernel(xn, wn, qw is not None, out.numpy(), *self.kernel_args(qw is not None))


# ---- Q4_K / Q5_K / Q6_K ---------------------------------------------------------------------------------

class _KQuant45(_KQuant):
    """Q4_K / Q5_K: fp16 d and dmin, 12 bytes of six-bit sub-block scales and mins, then the codes;
    8 sub-blocks of 32, y = d*sc_j*q - dmin*m_j with q in 0..nmax."""

    nmax = 15
    ref_search = (-1.0, 0.1, 20)  # (rmin, rdelta, nstep) of make_qkx2_quants in the _ref path
    clamp_qp_codes = False  # Q5_K's _impl applies MIN(63, .) to the make_qp_quants codes, Q4_K's does not
    fp16_scales = slice(0, 4)  # d, dmin
    kernel = staticmethod(kk.quantize_q45)

    def kernel_args(self, use_qw):
        search = IMATRIX_SEARCH if use_qw else self.ref_search
        return self.nmax, trial_numerators(self.nmax, *search), self.clamp_qp_codes

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


class Q6_K(_KQuant, name="Q6_K"):
    """ql[128], qh[64], int8 scales[16], fp16 d; 16 sub-blocks of 16, y = d*scale_j*(q - 32), q in 0..63."""

    fp16_scales = slice(208, 210)
    kernel = staticmethod(kk.quantize_q6)

    def kernel_args(self, use_qw):
        return (qx_numerators(32),)

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

class _KQuant2(_KQuant):
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
    kernel = staticmethod(kk.quantize_q2)

    def kernel_args(self, use_qw):
        return (trial_numerators(3, *(IMATRIX_SEARCH if use_qw else (-0.5, 0.1, 15))),)

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
    kernel = staticmethod(kk.quantize_q3)

    def kernel_args(self, use_qw):
        return qx_numerators(4), qx_numerators(32)

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
