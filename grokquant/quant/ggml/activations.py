"""How ggml's CPU backend rounds activations before a matrix product.

ggml multiplies a weight of type T by activations first converted to T's "vec_dot type":
bf16 / fp16 for those weights, Q8_0 blocks of 32 for the legacy and IQ4_NL types, Q8_K blocks of
256 for the K-quants and the other i-quants (ggml-cpu.c's type_traits_cpu). Reproducing that rounding lets our model's logits on a quantized
GGUF match llama.cpp's to float tolerance (the weights themselves are bit-identical).
"""

from __future__ import annotations

import torch

VEC_DOT = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q4_0": "Q8_0", "Q4_1": "Q8_0", "Q5_0": "Q8_0",
           "Q5_1": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K",
           "Q5_K": "Q8_K", "Q6_K": "Q8_K", "IQ4_XS": "Q8_K",
           **{t: "Q8_K" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")}}


def _full(like: torch.Tensor, value: float) -> torch.Tensor:
    # torch computes `scalar / tensor` (and `tensor / scalar`) through a reciprocal, one ulp away from C's
    # division in about a quarter of blocks; tensor / tensor divides exactly as C does.
    return torch.full_like(like, value)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    # x86 quantize_row_q8_0: id = 127/amax (not 1/d), round half to even, d stored as fp16
    amax = x.abs().amax(-1, keepdim=True)
    d = amax / _full(amax, 127)
    inv = torch.where(amax > 0, _full(amax, 127) / amax, torch.zeros_like(amax))
    return torch.round(x * inv) * d.half().float()


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    # quantize_row_q8_K_ref: scale from the signed element of largest magnitude, d kept in fp32
    idx = x.abs().argmax(-1, keepdim=True)
    signed_max = torch.gather(x, -1, idx)
    iscale = torch.where(signed_max != 0, _full(signed_max, -127) / signed_max, torch.zeros_like(signed_max))
    q = torch.round(iscale * x).clamp(max=127)
    d = torch.where(iscale != 0, _full(iscale, 1) / iscale, torch.zeros_like(iscale))
    return q * d


def round_activations(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """x [..., n] float32 as ggml feeds it to a product with a `weight_type` matrix."""
    kind = VEC_DOT.get(weight_type, "F32")
    if kind == "F32":
        return x
    if kind == "F16":
        return x.half().to(x.dtype)
    if kind == "BF16":
        return x.bfloat16().to(x.dtype)
    block = 32 if kind == "Q8_0" else 256
    n = x.shape[-1]
    if n % block:
        return x
    blocks = x.float().reshape(*x.shape[:-1], n // block, block)
    out = _q8_0(blocks) if kind == "Q8_0" else _q8_k(blocks)
    return out.reshape(x.shape).to(x.dtype)
