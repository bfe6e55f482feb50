"""Quantized linear layers that stand in for `nn.Linear` in our model.

- `Int4Linear`: PyTorch's own weight-only int4 kernels (`aten._weight_int4pack_mm_for_cpu` on CPU,
  `aten._weight_int4pack_mm` on CUDA, sm80+). They compute y = x Ŵᵀ with
  Ŵ[n, k] = (q − 8) · scale[g, n] + zero[g, n] for groups g of 32/64/128/256 inputs, so any
  affine 4-bit grid maps onto them exactly: GPTQ (scale · (q − z) ⇒ zero = scale · (8 − z)),
  GGUF Q4_0, Q4_1 and Q4_K (groups of 32). Act-order GPTQ weights (groups visited out of order)
  become contiguous groups by permuting the input columns once at load and the activations at run
  time. Per-row GPTQ (group_size −1) repeats the row's scale over groups of 256.
- `Int8Linear`: `aten._weight_int8pack_mm` (per output channel only); an asymmetric zero adds a
  rank-one correction x·1 · scale·(128 − z).
- `GPTQLinear`: the packed GPTQ tensors kept as stored and dequantized at every call; works on any
  device, any bits and group size (the fallback).
- `bnb_linear`: bitsandbytes nf4 / int8 from full-precision weights (CPU or CUDA).

The int4 layouts differ between CPU and CUDA; a module is packed for the device it computes on and
recognises its layout from the packed tensor's rank, so its weights may rest in CPU memory and move.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from grokquant.errors import GrokquantError
from grokquant.gptq.layout import PACKED_PARTS, PackedLinear

INT4_KERNEL_GROUPS = (256, 128, 64, 32)
KERNELS = ("auto", "dequant", "dense")  # auto: torch int4/int8 kernels where they apply, else dequant


def int4_kernel_available(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cpu":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0) \
            and _kernel_works("int4", device.index or 0)
    return False


def int8_kernel_available(device: torch.device | str) -> bool:
    device = torch.device(device)
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return False
    return device.type == "cpu" or (device.type == "cuda" and _kernel_works("int8", device.index or 0))


@functools.lru_cache(maxsize=None)
def _kernel_works(kind: str, cuda_index: int) -> bool:
    """Run a CUDA kernel once on a small matrix against plain arithmetic: packed layouts and supported
    dtypes have changed across PyTorch releases, and a wrong guess must fall back, not mis-compute."""
    device = torch.device("cuda", cuda_index)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=g)
    codes = torch.randint(0, 16 if kind == "int4" else 256, (64, 256), generator=g)
    scale = torch.rand(64, 2, generator=g) * 0.01 + 0.001
    try:
        if kind == "int4":
            offset = -8 * scale + (torch.rand(64, 2, generator=g) - 0.5) * 0.01
            W = scale.repeat_interleave(128, 1) * codes + offset.repeat_interleave(128, 1)
            module = Int4Linear.from_codes(codes, scale, offset, 128, device, torch.bfloat16)
        else:
            W = (codes - 128) * scale[:, :1]
            module = Int8Linear((codes - 128).to(torch.int8).to(device), scale[:, 0].to(device, torch.bfloat16))
        y = module(x.to(device, torch.bfloat16)).float().cpu()
    except RuntimeError as exc:
        warnings.warn(f"torch {kind} kernel unusable on {device} ({str(exc).splitlines()[0]}); dequantizing instead")
        return False
    ref = x.bfloat16().float() @ W.T
    ok = bool((y - ref).abs().max() <= 0.02 * ref.abs().max())
    if not ok:
        warnings.warn(f"torch {kind} kernel on {device} disagrees with plain arithmetic; dequantizing instead")
    return ok


def kernel_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The activation dtype a device's int4 kernel takes (CUDA's tinygemm computes in bf16 only)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else dtype


def _int4_kernel_group(group_size: int, in_features: int) -> int | None:
    for g in INT4_KERNEL_GROUPS:
        if group_size % g == 0 and in_features % g == 0:
            return g
    return None


def _inner_k_tiles(in_features: int) -> int | None:
    """CUDA tinygemm tiles K by 16·innerKTiles."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    return None


def int4_shape_ok(out_features: int, in_features: int, group_size: int, device) -> bool:
    if _int4_kernel_group(group_size, in_features) is None:
        return False
    if torch.device(device).type == "cuda":
        return out_features % 8 == 0 and _inner_k_tiles(in_features) is not None
    return out_features % 16 == 0 and in_features % 2 == 0


class Int4Linear(nn.Module):
    """y = x Ŵᵀ on PyTorch's int4 weight-only kernel; Ŵ = (q − 8)·scale + zero per group."""

    def __init__(self, in_features: int, out_features: int, group_size: int, weight: torch.Tensor,
                 scales_and_zeros: torch.Tensor, perm: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", weight)  # packed: uint8 [N, K/2] (CPU) or int32 4-d (CUDA)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K/group, N, 2]
        self.register_buffer("perm", perm)  # input columns in group order (act-order), or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        x2 = x2.to(self.scales_and_zeros.dtype).contiguous()
        if self.weight.dim() == 2:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, act_order={self.perm is not None}"

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                   device, dtype: torch.dtype, perm: torch.Tensor | None = None) -> "Int4Linear":
        """codes [N, K] in 0..15, scale/offset [N, K/group_size]: W = scale·q + offset per group."""
        device = torch.device(device)
        N, K = codes.shape
        kg = _int4_kernel_group(group_size, K)
        if kg is None or not int4_shape_ok(N, K, group_size, device):
            raise GrokquantError(f"int4 kernel cannot take a [{N}, {K}] matrix with groups of {group_size}")
        repeat = group_size // kg
        scale = scale.float().repeat_interleave(repeat, dim=1)
        offset = offset.float().repeat_interleave(repeat, dim=1)
        sz = torch.stack([scale, offset + 8 * scale], dim=-1).transpose(0, 1)  # [K/kg, N, 2]
        sz = sz.to(device=device, dtype=kernel_dtype(device, dtype)).contiguous()
        q = codes.to(device=device, dtype=torch.int32)
        if device.type == "cuda":  # since torch 2.5: uint8 [N, K/2], the even column in the high nibble
            q8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack(q8.contiguous(), _inner_k_tiles(K))
            except RuntimeError:  # older releases took the int32 codes
                packed = torch.ops.aten._convert_weight_to_int4pack(q.contiguous(), _inner_k_tiles(K))
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        return cls(K, N, kg, packed, sz, None if perm is None else perm.to(device))


def gptq_group_order(p: PackedLinear) -> tuple[int, torch.Tensor | None] | None:
    """(uniform group size, input permutation or None) that makes p's groups contiguous, else None."""
    gs, g_idx, plain = p.columns_per_group, p.g_idx.long(), p.plain_g_idx()
    if torch.equal(g_idx, plain):
        return gs, None
    perm = torch.argsort(g_idx, stable=True)
    return (gs, perm) if torch.equal(g_idx[perm], plain) else None


def int4_from_gptq(p: PackedLinear, device, dtype: torch.dtype) -> Int4Linear | None:
    """The GPTQ int4 matrix repacked for the int4 kernel, or None where the kernel cannot take it."""
    if p.bits != 4 or not int4_kernel_available(device):
        return None
    order = gptq_group_order(p)
    if order is None or not int4_shape_ok(p.out_features, p.in_features, order[0], device):
        return None
    gs, perm = order
    codes = p.codes().t()  # [N, K]
    if perm is not None:
        codes = codes[:, perm]
    scales = p.scales.float().t()  # [N, G]
    offset = -scales * p.zeros().float().t()
    return Int4Linear.from_codes(codes, scales, offset, gs, device, dtype, perm)


class Int8Linear(nn.Module):
    """Per-channel int8 weights on `aten._weight_int8pack_mm`: y = (x qᵀ)·scale + (Σx)·offset."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # int8 [N, K]
        self.register_buffer("scales", scales)  # [N], the activation dtype
        self.register_buffer("offset", offset)  # [N] or None (symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        if self.offset is not None:
            y = y + x2.sum(-1, keepdim=True) * self.offset
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def int8_from_gptq(p: PackedLinear, device, dtype: torch.dtype) -> Int8Linear | None:
    """A per-channel GPTQ int8 matrix on the int8 kernel, or None (group-wise int8 falls back)."""
    if p.bits != 8 or p.n_groups != 1 or not int8_kernel_available(device):
        return None
    dtype = kernel_dtype(device, dtype)
    q = (p.codes().t().to(torch.int16) - 128).to(torch.int8)  # same grid, centred: w = s·(q8 + 128 − z)
    scale = p.scales[0].float()
    offset = scale * (128 - p.zeros()[0].float())
    keep = offset.abs().max() > 0
    return Int8Linear(q.to(device).contiguous(), scale.to(device, dtype),
                      offset.to(device, dtype) if keep else None)


class GPTQLinear(nn.Module):
    """The stored GPTQ tensors, dequantized at every call: any bits, group size, order and device."""

    def __init__(self, p: PackedLinear):
        super().__init__()
        self.in_features, self.out_features = p.in_features, p.out_features
        self.bits, self.group_size, self.sym = p.bits, p.group_size, p.sym
        for name in PACKED_PARTS:
            self.register_buffer(name, getattr(p, name))

    def packed(self) -> PackedLinear:
        return PackedLinear(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.group_size, self.sym)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.packed().dequantize().to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"


def dense_linear(weight: torch.Tensor, device, dtype: torch.dtype) -> nn.Linear:
    out_features, in_features = weight.shape
    with torch.device("meta"):
        m = nn.Linear(in_features, out_features, bias=False)
    m.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    return m


def gptq_linear(p: PackedLinear, device, dtype: torch.dtype, kernel: str = "auto") -> nn.Module:
    """The module for one GPTQ linear: torch kernel where it applies (auto), else on-the-fly dequant."""
    if kernel not in KERNELS:
        raise GrokquantError(f"unknown kernel {kernel!r} (choose from {', '.join(KERNELS)})")
    if kernel == "dense":
        return dense_linear(p.dequantize(), device, dtype)
    if kernel == "auto":
        module = int4_from_gptq(p, device, dtype) or int8_from_gptq(p, device, dtype)
        if module is not None:
            return module
    return GPTQLinear(p.to(device))


# ---- GGUF 4-bit blocks -------------------------------------------------------------------------------

GGML_INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def ggml_int4_blocks(raw: torch.Tensor, type_name: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF rows uint8 [rows, row_bytes] -> (codes [rows, n], scale, offset [rows, n/32]), W = scale·q + offset."""
    from grokquant.quant.ggml.base import fp16_from_bytes
    from grokquant.quant.ggml.kquants import Q4_K

    rows = raw.shape[0]
    if type_name in ("Q4_0", "Q4_1"):
        b = raw.reshape(rows * (n // 32), -1)
        d = fp16_from_bytes(b[:, 0:2])[:, 0]
        offset = fp16_from_bytes(b[:, 2:4])[:, 0] if type_name == "Q4_1" else -8 * d
        qs = b[:, -16:]
        codes = torch.cat([qs & 15, qs >> 4], dim=1)  # element j in the low nibble of qs[j], j + 16 in the high
        return codes.reshape(rows, n), d.reshape(rows, -1), offset.reshape(rows, -1)
    if type_name == "Q4_K":
        b = raw.reshape(rows * (n // 256), 144)
        sc, m = Q4_K.unpack_scales(b[:, 4:16])  # [nb, 8] six-bit sub-block scales and mins
        d = fp16_from_bytes(b[:, 0:2]) * sc.float()
        offset = -fp16_from_bytes(b[:, 2:4]) * m.float()
        qs = b[:, 16:].reshape(-1, 4, 1, 32)  # 4 chunks of 64: sub-block 2c in low nibbles, 2c + 1 in high
        codes = torch.cat([qs & 15, qs >> 4], dim=2)
        return codes.reshape(rows, n), d.reshape(rows, -1), offset.reshape(rows, -1)
    raise GrokquantError(f"{type_name} is not a 4-bit block type the int4 kernel takes")


def int4_from_ggml(raw: torch.Tensor, type_name: str, shape: tuple[int, int], device,
                   dtype: torch.dtype) -> Int4Linear | None:
    """A GGUF Q4_0 / Q4_1 / Q4_K matrix kept 4-bit on the int4 kernel, or None."""
    N, K = shape
    if type_name not in GGML_INT4_TYPES or not int4_kernel_available(device) or not int4_shape_ok(N, K, 32, device):
        return None
    codes, scale, offset = ggml_int4_blocks(raw, type_name, K)
    return Int4Linear.from_codes(codes, scale, offset, 32, device, dtype)


# ---- bitsandbytes ------------------------------------------------------------------------------------

BNB_KINDS = ("nf4", "int8")


def bnb_linear(weight: torch.Tensor, kind: str, device, dtype: torch.dtype) -> nn.Module:
    """bitsandbytes Linear4bit (nf4) or Linear8bitLt (int8) from a full-precision weight [out, in].

    bitsandbytes quantizes when the module moves to its device (`.to("cpu")` too, since 0.45's CPU
    backend), so the weight is handed over in full precision and quantized by that move.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise GrokquantError("quantize=nf4/int8 needs bitsandbytes (pip install 'grokquant[bnb]')") from None
    out_features, in_features = weight.shape
    w = weight.to(torch.float32 if torch.device(device).type == "cpu" else dtype)
    if kind == "nf4":
        m = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4",
                              device="meta")
        m.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    elif kind == "int8":
        m = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, device="meta")
        m.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        raise GrokquantError(f"unknown bitsandbytes quantization {kind!r} (nf4 or int8)")
    return m.to(device)


def module_bytes(module: nn.Module) -> int:
    """Bytes a module's weights occupy (bitsandbytes' 4-bit quantization state included)."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += sum(v.numel() * v.element_size() for v in vars(state).values() if isinstance(v, torch.Tensor))
    return total


def linear_bytes(kind: str, out_features: int, in_features: int, dtype_bytes: int = 2, bits: int = 4,
                 group_size: int = 128, act_order: bool = False) -> int:
    """Bytes of one [out, in] linear as each module here holds it (for planning before loading).

    kind: int4 (kernel), int8 (kernel), gptq (packed, dequantized per call), nf4, bnb-int8, dense.
    """
    N, K = out_features, in_features
    if kind == "int4":
        kg = _int4_kernel_group(group_size if group_size > 0 else K, K) or 32
        return N * K // 2 + (K // kg) * N * 2 * dtype_bytes + (8 * K if act_order else 0)
    if kind == "int8":
        return N * K + 2 * N * dtype_bytes
    if kind == "gptq":
        groups = -(-K // group_size) if group_size > 0 else 1
        return K * N * bits // 8 + groups * N * bits // 8 + groups * N * 2 + 4 * K
    if kind == "nf4":  # 4-bit codes, absmax per 64 as uint8 plus an fp32 per 256 of those (nested statistics)
        return N * K // 2 + N * K // 64 + N * K // (64 * 256) * 4
    if kind == "bnb-int8":
        return N * K + 4 * N
    if kind == "dense":
        return N * K * dtype_bytes
    raise ValueError(f"unknown linear kind {kind!r}")
