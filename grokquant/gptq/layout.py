"""GPTQ checkpoint tensors in auto-gptq's "v1" layout: written and read back.

Per quantized linear `<prefix>`, as auto-gptq's QuantLinear (`qlinear_cuda_old.pack`) stores it:
`qweight` int32 [in·bits/32, out] (codes packed along the input dimension, LSB first), `qzeros`
int32 [n_groups, out·bits/32] (stored zero points, packed along the output dimension), `scales` fp16
[n_groups, out] and `g_idx` int32 [in] (the group of each input column). A weight is
W[o, i] = scales[g, o] · (code[i, o] − zero[g, o]) with g = g_idx[i].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from grokquant.errors import GrokquantError

if TYPE_CHECKING:
    from grokquant.quant.gptq import IntQuantized

PACKABLE_BITS = (2, 4, 8)
PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx")


# ---- the v1 zero rule ----------------------------------------------------------------------------
# auto-gptq's packer stores zero − 1 (`zeros -= 1`) and its kernels add the 1 back; GPTQModel calls
# this checkpoint_format "gptq" (its "gptq_v2" stores the zero itself).

def stored_zero(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The `bits`-bit field that holds integer zero point `zero` (wrapping as auto-gptq's uint32 cast)."""
    return (zero - 1) & (2 ** bits - 1)


def zero_from_stored(stored: torch.Tensor | int) -> torch.Tensor | int:
    """The zero point a stored field means, as auto-gptq's kernels read it."""
    return stored + 1


# zero 0 would be stored as 2^bits − 1 and read back as 2^bits: quantizers keep zero ≥ MIN_ZERO
MIN_ZERO = zero_from_stored(0)


# ---- bit fields in int32 words ---------------------------------------------------------------------

def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ints [n, m] along dim 0 into int32 [n·bits/32, m]: value k of a word at bits·k."""
    per = 32 // bits
    n, m = values.shape
    if n % per:
        raise ValueError(f"{n} values do not pack into 32-bit words of {per}")
    v = values.view(n // per, per, m)
    words = torch.zeros(n // per, m, dtype=torch.int64)
    for k in range(per):  # one bit field at a time: an int64 copy of every value would be 8 bytes each
        words |= v[:, k].to(torch.int64) << (bits * k)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits, signed


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 [n·bits/32, m] -> int32 [n, m], the inverse of `pack_rows`."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device).view(1, per, 1)
    # arithmetic shifts sign-extend the top field; the mask keeps only the field's own bits
    values = (words.to(torch.int32)[:, None, :] >> shifts) & (2 ** bits - 1)
    values = values.reshape(-1, words.shape[1])
    if values.shape[0] != n:
        raise GrokquantError(f"packed rows hold {values.shape[0]} values, expected {n}")
    return values


def packable(out_features: int, in_features: int, bits: int) -> bool:
    per = 32 // bits
    return bits in PACKABLE_BITS and in_features % per == 0 and out_features % per == 0


# ---- one matrix: codes, scales, zeros, g_idx <-> the four tensors -------------------------------------

def gptq_tensors(q: "IntQuantized", index: int, bits: int) -> dict[str, torch.Tensor]:
    """The four tensors of matrix `index` of a batched result, keyed by PACKED_PARTS."""
    codes = q.codes[index]  # [out, in]
    zeros = stored_zero(q.zeros[index].round().to(torch.int64), bits)  # [n_groups, out]
    return {
        "qweight": pack_rows(codes.t().contiguous(), bits),
        "qzeros": pack_rows(zeros.t().contiguous(), bits).t().contiguous(),
        "scales": q.scales[index].to(torch.float16).contiguous(),
        "g_idx": q.g_idx[index].to(torch.int32).contiguous(),
    }


@dataclass
class PackedLinear:
    """The four stored tensors of one quantized linear and the settings that read them."""

    qweight: torch.Tensor  # int32 [in·bits/32, out]
    qzeros: torch.Tensor  # int32 [n_groups, out·bits/32]
    scales: torch.Tensor  # fp16 [n_groups, out]
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    group_size: int  # -1: one group per row
    sym: bool

    @classmethod
    def read(cls, prefix: str, parts: dict[str, torch.Tensor], bits: int, group_size: int,
             sym: bool) -> "PackedLinear":
        """The tensors of linear `prefix` (keyed by PACKED_PARTS), checked against `bits`-bit codes."""
        qweight, qzeros, scales, g_idx = (parts[p] for p in PACKED_PARTS)
        if (qweight.dim(), qzeros.dim(), scales.dim(), g_idx.dim()) != (2, 2, 2, 1) or not g_idx.numel() \
                or qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or not scales.is_floating_point():
            raise GrokquantError(f"{prefix}: not GPTQ tensors (qweight {list(qweight.shape)} {qweight.dtype}, qzeros "
                                 f"{list(qzeros.shape)}, scales {list(scales.shape)}, g_idx {list(g_idx.shape)})")
        in_features, out_features = g_idx.shape[0], scales.shape[1]
        stored_bits = 32 * qweight.shape[0] // in_features  # what the shapes say; must agree with the config
        if stored_bits != bits or qweight.shape[1] != out_features or qzeros.shape[1] * 32 // bits != out_features \
                or qzeros.shape[0] != scales.shape[0]:
            raise GrokquantError(f"{prefix}: packed shapes {list(qweight.shape)}/{list(qzeros.shape)} do not fit "
                                 f"{bits}-bit codes for a [{out_features}, {in_features}] matrix")
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]:
            raise GrokquantError(f"{prefix}: g_idx names groups outside 0..{scales.shape[0] - 1}")
        return cls(qweight, qzeros, scales, g_idx, bits, -1 if scales.shape[0] == 1 else group_size, sym)

    @property
    def in_features(self) -> int:
        return self.g_idx.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def columns_per_group(self) -> int:
        return self.group_size if self.group_size > 0 else self.in_features

    def plain_g_idx(self) -> torch.Tensor:
        """`i // group_size`: the g_idx of groups visited in column order."""
        return torch.arange(self.in_features, device=self.g_idx.device) // self.columns_per_group

    @property
    def act_order(self) -> bool:
        """True when g_idx is not the plain `i // group_size` (groups visited in activation order)."""
        return not torch.equal(self.g_idx.long(), self.plain_g_idx())

    def codes(self) -> torch.Tensor:
        """Unsigned codes, uint8 [in, out]."""
        return unpack_rows(self.qweight, self.bits, self.in_features).to(torch.uint8)

    def zeros(self) -> torch.Tensor:
        """Integer zero points, [n_groups, out] int32."""
        stored = unpack_rows(self.qzeros.t(), self.bits, self.out_features).t()
        return zero_from_stored(stored).to(torch.int32)

    def dequantize(self) -> torch.Tensor:
        """W [out, in] float32: scale[g(i), o] · (code[i, o] − zero[g(i), o])."""
        g = self.g_idx.long()
        W = self.scales.float()[g] * (self.codes().float() - self.zeros()[g].float())
        return W.t().contiguous()

    def to(self, device) -> "PackedLinear":
        return PackedLinear(self.qweight.to(device), self.qzeros.to(device), self.scales.to(device),
                            self.g_idx.to(device), self.bits, self.group_size, self.sym)
