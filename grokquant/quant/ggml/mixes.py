"""llama.cpp's per-tensor type choice for its file types ("quant mixes"), for an 8-expert model.

Mirrors `llama_tensor_get_type` in llama.cpp's `src/llama-quant.cpp`: categories by GGUF name substring;
norms and the router stay F32; row lengths that a block type cannot divide fall back to a compatible type.
"""

from __future__ import annotations

from grokquant.quant.ggml.types import TYPES, GGMLType

# file type name -> (llama_ftype id, default type)
FTYPES = {
    "f32": (0, "F32"), "f16": (1, "F16"), "bf16": (32, "BF16"), "q8_0": (7, "Q8_0"),
    "q4_0": (2, "Q4_0"), "q4_1": (3, "Q4_1"), "q5_0": (8, "Q5_0"), "q5_1": (9, "Q5_1"),
    "q4_k_s": (14, "Q4_K"), "q4_k_m": (15, "Q4_K"), "q5_k_s": (16, "Q5_K"), "q5_k_m": (17, "Q5_K"),
    "q6_k": (18, "Q6_K"), "iq4_xs": (30, "IQ4_XS"), "iq4_nl": (25, "IQ4_NL"),
    "q2_k": (10, "Q2_K"), "q2_k_s": (21, "Q2_K"), "q3_k_s": (11, "Q3_K"), "q3_k_m": (12, "Q3_K"),
    "q3_k_l": (13, "Q3_K"), "iq3_xs": (22, "IQ3_S"), "iq3_xxs": (23, "IQ3_XXS"), "iq3_s": (26, "IQ3_S"),
    "iq3_m": (27, "IQ3_S"), "iq2_xxs": (19, "IQ2_XXS"), "iq2_xs": (20, "IQ2_XS"), "iq2_s": (28, "IQ2_XS"),
    "iq2_m": (29, "IQ2_S"), "iq1_s": (24, "IQ1_S"), "iq1_m": (31, "IQ1_M"),
}
# the 1-2 bit file types, which llama.cpp's type choice treats as one family
LOW_BIT = {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m"}
# file types whose attn_output becomes Q5_K in an 8-expert model
ATTN_OUTPUT_Q5K = {"q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq4_xs", "iq3_xs", "iq3_xxs",
                   "iq3_s", "iq3_m"}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
            **{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")}}
FLOAT_TYPES = {"F32", "F16", "BF16"}
# types whose searches are garbage without importance weights (llama-quant.cpp's tensor_requires_imatrix)
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def is_quantizable(gguf_name: str, n_dims: int) -> bool:
    return n_dims >= 2 and gguf_name.endswith("weight") and "_norm.weight" not in gguf_name \
        and "ffn_gate_inp.weight" not in gguf_name


def requires_imatrix(type_name: str, gguf_name: str, ftype: str) -> bool:
    """llama-quantize refuses these tensors without importance data: the i-quants below 3.5 bits, and Q2_K
    inside a Q2_K_S file; never the embedding or output."""
    if gguf_name in ("token_embd.weight", "output.weight"):
        return False
    return type_name in NEEDS_IMATRIX or (type_name == "Q2_K" and ftype == "q2_k_s")


def _layer(gguf_name: str) -> int:
    return int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1


def _ffn_down_index(gguf_name: str, per_layer: int) -> int:
    """Position of an ffn_down tensor in llama-quantize's walk (by layer, then by name: ffn_down before
    ffn_down_exps), the counter its 1-2 bit rule compares with n_layer / 8."""
    return _layer(gguf_name) * per_layer + (per_layer - 1 if "ffn_down_exps" in gguf_name else 0)


def tensor_type(ftype: str, gguf_name: str, shape: tuple[int, ...], n_layer: int, n_expert: int,
                has_imatrix: bool = False, n_gqa: int = 8, ffn_down_per_layer: int = 2) -> GGMLType:
    """The GGML type llama-quantize picks for one tensor (torch shape; last dim = row length).

    Mirrors `llama_tensor_get_type_impl` (src/llama-quant.cpp). `ffn_down_per_layer` is how many ffn_down
    tensors a layer has: Grok's dense residual MLP and its experts give 2."""
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
        elif ftype in LOW_BIT or ftype == "iq3_xxs":
            name = "Q5_K"
        elif name != "Q8_0":
            name = "Q6_K"
    elif gguf_name == "token_embd.weight":  # untied: its own rule, for the low-bit types only
        name = {"iq2_xxs": "Q2_K", "iq2_xs": "Q2_K", "iq1_s": "Q2_K", "iq1_m": "Q2_K", "iq2_s": "IQ3_S",
                "iq2_m": "IQ3_S", "iq3_xxs": "IQ3_S"}.get(ftype, name)
    elif ftype in LOW_BIT:
        name = _low_bit(ftype, name, gguf_name, n_layer, n_expert, n_gqa, ffn_down_per_layer)
    elif "attn_v.weight" in gguf_name:
        # 8-expert models (Mixtral, Grok) always get Q8_0 here, whatever the file type
        name = "Q8_0" if n_expert == 8 else _attn_v(ftype, name, i_layer, n_layer, n_gqa, has_imatrix)
    elif "attn_k.weight" in gguf_name:
        name = "Q8_0" if n_expert == 8 else {"iq3_xs": "IQ3_XXS", "iq3_xxs": "IQ2_S"}.get(ftype, name)
    elif "attn_q.weight" in gguf_name:
        name = {"iq3_xs": "IQ3_XXS", "iq3_xxs": "IQ2_S"}.get(ftype, name)
    elif "attn_output.weight" in gguf_name:
        if n_expert == 8:
            name = "Q5_K" if ftype in ATTN_OUTPUT_Q5K else name
        else:
            name = {"q2_k": "Q3_K", "iq3_xxs": "IQ3_S", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K",
                    "iq3_m": "Q4_K"}.get(ftype, name)
    elif "ffn_down" in gguf_name:
        name = _ffn_down(ftype, name, i_layer, n_layer, n_expert, has_imatrix)
    elif "ffn_gate" in gguf_name or "ffn_up" in gguf_name:
        if ftype == "iq3_xs" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            name = "IQ3_XXS"
    return fallback(TYPES[name], shape[-1])


def _low_bit(ftype: str, name: str, gguf_name: str, n_layer: int, n_expert: int, n_gqa: int,
             ffn_down_per_layer: int) -> str:
    """The 1-2 bit file types: a few small tensors get 3-5 bits."""
    more = "IQ3_S" if ftype in ("iq2_s", "iq2_m") else "Q2_K"
    if "attn_v.weight" in gguf_name:
        return "Q4_K" if n_gqa >= 4 or n_expert >= 4 else more
    if "attn_k.weight" in gguf_name and n_expert == 8:
        return "Q4_K"
    if "ffn_down" in gguf_name:
        return more if _ffn_down_index(gguf_name, ffn_down_per_layer) < n_layer // 8 else name
    if "attn_output.weight" in gguf_name:
        if n_expert == 8:
            return "Q5_K"
        return {"iq1_s": "IQ2_XXS", "iq1_m": "IQ2_XXS", "iq2_s": "IQ3_S", "iq2_m": "IQ3_S"}.get(ftype, name)
    return name


def _attn_v(ftype: str, name: str, i: int, n: int, n_gqa: int, has_imatrix: bool) -> str:
    """attn_v of a model without 8 experts; i counts attn_v tensors, i.e. layers."""
    if ftype == "q2_k":
        return "Q4_K" if n_gqa >= 4 else "Q3_K"
    if ftype == "q2_k_s" and n_gqa >= 4:
        return "Q4_K"
    if ftype == "iq3_xxs":
        return "Q4_K" if n_gqa >= 4 else "IQ3_XXS" if has_imatrix else "IQ3_S"
    if ftype in ("iq3_xs", "iq3_s") and n_gqa >= 4:
        return "Q4_K"
    if ftype == "iq3_m":
        return "Q4_K"
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


def _ffn_down(ftype: str, name: str, i: int, n: int, n_expert: int, has_imatrix: bool) -> str:
    """Dense ffn_down and ffn_down_exps alike; n is the model's layer count."""
    if ftype == "q2_k":
        return "Q3_K"
    if ftype == "q2_k_s":
        return "Q4_K" if i < n // 8 else name
    if ftype == "iq3_xxs" and not has_imatrix:
        return "Q4_K" if i < n // 8 else "Q3_K"
    if ftype == "q3_k_m":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if ftype == "iq3_m" and (i < n // 8 or (n_expert == 8 and use_more_bits(i, n))):
        return "Q4_K"
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
