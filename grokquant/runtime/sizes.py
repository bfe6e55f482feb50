"""Parameter counts and artifact sizes, from tensor shapes alone (no weights are read); byte sizes
written by people ("24GiB", "50G")."""

from __future__ import annotations

import math
import re

from grokquant.errors import GrokquantError
from grokquant.grok.config import GrokConfig
from grokquant.grok.names import CLASSES, tensor_class

GPTQ_GROUP = 128


def param_counts(shapes: dict[str, tuple[int, ...]], cfg: GrokConfig) -> dict[str, int]:
    """Counts per tensor class, total, always-on and active per token (top-k experts)."""
    counts = dict.fromkeys(CLASSES, 0)
    for name, shape in shapes.items():
        counts[tensor_class(name)] += math.prod(shape)
    counts["total"] = sum(counts.values())
    counts["always_on"] = counts["attention"] + counts["dense_mlp"] + counts["embedding"] + counts["lm_head"]
    per_expert = counts["experts"] // max(1, cfg.num_local_experts)
    counts["active_per_token"] = (counts["attention"] + counts["dense_mlp"] + counts["router"] + counts["norms"]
                                  + counts["lm_head"] + per_expert * cfg.num_experts_per_tok)
    return counts


def _int8_bytes(shape) -> int:  # int8 per output channel + one fp16 scale per row
    return math.prod(shape) + 2 * shape[0]


def gptq_bytes(shape, bits: int = 4, group: int = GPTQ_GROUP) -> int:
    out, inp = shape
    groups = -(-inp // group)
    return (inp * bits // 8) * out + groups * out * 2 + groups * out * bits // 8 + inp * 4


def format_bytes(cfg: GrokConfig) -> dict[str, int]:
    """Weight bytes of the checkpoint in each format.

    bf16: everything 2 bytes. int8 / GPTQ int4-g128 (weight-only): attention, dense MLP and experts
    (and lm_head for int8) quantized, the rest bf16. GGUF: llama.cpp's mixes, norms and router F32.
    """
    shapes = cfg.all_shapes()
    out = {"bf16": 2 * sum(math.prod(s) for s in shapes.values())}
    int8 = gptq = 0
    for name, shape in shapes.items():
        cls = tensor_class(name)
        int8 += _int8_bytes(shape) if cls in ("attention", "dense_mlp", "experts", "lm_head") else 2 * math.prod(shape)
        gptq += gptq_bytes(shape) if cls in ("attention", "dense_mlp", "experts") else 2 * math.prod(shape)
    out["int8"] = int8
    out["gptq_int4_g128"] = gptq
    for ftype in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs"):
        out[ftype] = gguf_bytes(cfg, ftype)
    return out


def gguf_bytes(cfg: GrokConfig, ftype: str, has_imatrix: bool = False) -> int:
    from grokquant.gguf.convert import plan
    from grokquant.quantize.recipe import GGUFRecipe

    return sum(t.nbytes for t in plan(cfg, GGUFRecipe(ftype, ftype), has_imatrix))


# ---- sizes written by people -----------------------------------------------------------------------

UNIT_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_bytes(value: int | float | str, bare_base: int) -> int | None:
    """Bytes from a count or a string, None when it is neither.

    The rule: KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000, and a bare K/M/G/T
    (or none) a power of `bare_base`; a trailing B alone is bytes. Case does not matter.
    """
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", str(value).upper())
    if not m or (m[3] == "IB" and not m[2]):
        return None
    base = {None: bare_base, "B": 1000, "IB": 1024}[m[3]] if m[2] else 1
    return int(float(m[1]) * base ** UNIT_POWERS[m[2]])


def parse_memory(value: int | float | str) -> int:
    """Memory sizes (max_memory, --gpu-memory, --ram): a bare 24G is 24GiB, as in torch and accelerate."""
    n = parse_bytes(value, 1024)
    if n is None:
        raise GrokquantError(f"cannot parse memory size {value!r} (e.g. 24GiB, 192GB, 512MiB)")
    return n


def parse_split_size(text: str | None) -> int | None:
    """--split-max-size: a bare 50G is 50 * 1000^3 bytes, as llama-gguf-split reads it."""
    if text is None:
        return None
    n = parse_bytes(text, 1000)
    if n is None:
        raise GrokquantError(f"cannot parse size {text!r} (e.g. 500M, 2G)")
    if n < 1000**2:  # llama-gguf-split's smallest unit; below it every tensor would be a file of its own
        raise GrokquantError(f"--split-max-size {text}: at least 1M")
    return n
