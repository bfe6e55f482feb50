"""llama.cpp's per-tensor type choice for its file types ("quant mixes"), for an 8-expert model.

Mirrors `llama_tensor_get_type` in llama.cpp's `src/llama-quant.cpp` as summarised in spec quant.md §8:
categories by GGUF name substring; norms and the router stay F32; row lengths that a block type
cannot divide fall back to a compatible type.
"""

from __future__ import annotations

from grokquant.quant.ggml.types import TYPES, GGMLType

# file type name -> (llama_ftype id, default type)
FTYPES = {
    "f32": (0, "F32"), "f16": (1, "F16"), "bf16": (32, "BF16"), "q8_0": (7, "Q8_0"),
    "q4_0": (2, "Q4_0"), "q4_1": (3, "Q4_1"), "q5_0": (8, "Q5_0"), "q5_1": (9, "Q5_1"),
    "q4_k_s": (14, "Q4_K"), "q4_k_m": (15, "Q4_K"), "q5_k_s": (16, "Q5_K"), "q5_k_m": (17, "Q5_K"),
    "q6_k": (18, "Q6_K"), "iq4_xs": (30, "IQ4_XS"), "iq4_nl": (25, "IQ4_NL"),
    "q2_k": (10, "Q2_K"), "q3_k_s": (11, "Q3_K"), "q3_k_m": (12, "Q3_K"), "q3_k_l": (13, "Q3_K"),
}
# file types whose attn_output becomes Q5_K in an 8-expert model
ATTN_OUTPUT_Q5K = {"q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq4_xs"}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}
FLOAT_TYPES = {"F32", "F16", "BF16"}


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def is_quantizable(gguf_name: str, n_dims: int) -> bool:
    return n_dims >= 2 and gguf_name.endswith("weight") and "_norm.weight" not in gguf_name \
        and "ffn_gate_inp.weight" not in gguf_name


def _layer(gguf_name: str) -> int:
    return int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1


def tensor_type(ftype: str, gguf_name: str, shape: tuple[int, ...], n_layer: int, n_expert: int,
                has_imatrix: bool = False, n_gqa: int = 8) -> GGMLType:
    """The GGML type llama-quantize picks for one tensor (torch shape; last dim = row length)."""
    if not is_quantizable(gguf_name, len(shape)):
        return TYPES["F32"]
    default = FTYPES[ftype][1]
    if default in FLOAT_TYPES:
        return TYPES[default]
    name = default
    i_layer = _layer(gguf_name)
    if gguf_name == "output.weight":
        if shape[-1] % TYPES[default].block:
            name = "Q8_0"
        elif name != "Q8_0":
            name = "Q6_K"
    elif "attn_v.weight" in gguf_name or "attn_k.weight" in gguf_name:
        # 8-expert models (Mixtral, Grok) always get Q8_0 here, whatever the file type
        if n_expert == 8:
            name = "Q8_0"
        elif "attn_v.weight" in gguf_name:
            name = _attn_v(ftype, name, i_layer, n_layer, n_gqa)
    elif "attn_output.weight" in gguf_name:
        if n_expert == 8:
            name = "Q5_K" if ftype in ATTN_OUTPUT_Q5K else name
        else:
            name = {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(ftype, name)
    elif "ffn_down" in gguf_name:
        name = _ffn_down(ftype, name, i_layer, n_layer, has_imatrix)
    return fallback(TYPES[name], shape[-1])


def _attn_v(ftype: str, name: str, i: int, n: int, n_gqa: int) -> str:
    """attn_v of a model without 8 experts; i counts attn_v tensors, i.e. layers."""
    if ftype == "q2_k":
        return "Q4_K" if n_gqa >= 4 else "Q3_K"
    if ftype == "q3_k_m":
        return "Q5_K" if i < 2 else "Q4_K"
    if ftype == "q3_k_l":
        return "Q5_K"
    if ftype in ("iq4_nl", "iq4_xs") and n_gqa >= 4:
        return "Q5_K"
    if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
        return "Q6_K"
    if ftype == "q4_k_s" and i < 4:
        return "Q5_K"
    return name


def _ffn_down(ftype: str, name: str, i: int, n: int, has_imatrix: bool) -> str:
    """Dense ffn_down and ffn_down_exps alike; n is the model's layer count."""
    if ftype == "q2_k":
        return "Q3_K"
    if ftype == "q3_k_m":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if ftype == "q3_k_l":
        return "Q5_K"
    if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
        return "Q6_K"
    if ftype in ("iq4_nl", "iq4_xs") and i < n // 8 and not has_imatrix:
        return "Q5_K"
    if ftype == "q4_k_s" and i < n // 8:
        return "Q5_K"
    if ftype in ("q4_0", "q5_0") and has_imatrix and i < n // 8:
        return "Q4_1" if ftype == "q4_0" else "Q5_1"
    return name


def fallback(t: GGMLType, row: int) -> GGMLType:
    """A type whose block divides `row` (llama.cpp's tensor_type_fallback)."""
    if row % t.block == 0:
        return t
    alt = TYPES[FALLBACK.get(t.name, "F16")]
    return alt if row % alt.block == 0 else TYPES["F16"]
