"""GPTQ checkpoint tensors in the auto-gptq "v1" layout (spec quant.md §12).

Per quantized linear `<prefix>`: `qweight` int32 [in·bits/32, out] (codes packed along the input
dimension, LSB first), `qzeros` int32 [n_groups, out·bits/32] (zero − 1, packed along the output
dimension: the v1 convention), `scales` fp16 [n_groups, out], `g_idx` int32 [in].
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from grokquant.quant.gptq import IntQuantConfig, IntQuantized

PACKABLE_BITS = (2, 4, 8)


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


def packable(out_features: int, in_features: int, bits: int) -> bool:
    per = 32 // bits
    return bits in PACKABLE_BITS and in_features % per == 0 and out_features % per == 0


def gptq_tensors(q: IntQuantized, index: int, bits: int) -> dict[str, torch.Tensor]:
    """The four tensors of matrix `index` of a batched result."""
    codes = q.codes[index]  # [out, in]
    zeros = q.zeros[index].round().to(torch.int64) - 1  # v1: stored zero = zero - 1
    return {
        "qweight": pack_rows(codes.t().contiguous(), bits),
        "qzeros": pack_rows((zeros & (2**bits - 1)).t().contiguous(), bits).t().contiguous(),
        "scales": q.scales[index].to(torch.float16).contiguous(),
        "g_idx": q.g_idx[index].to(torch.int32).contiguous(),
    }


def write_metadata(work: Path, ckpt, recipe, files: list[str]) -> None:
    """Index, quantize_config.json, config.json with quantization_config, and the tokenizer."""
    from safetensors import safe_open

    weight_map = {}
    for f in files:
        with safe_open(str(work / f), "pt") as sf:
            weight_map.update({k: f for k in sf.keys()})
    (work / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    qc = recipe.experts or recipe.dense_mlp or recipe.attention or IntQuantConfig()
    dynamic = {}  # GPTQModel's per-module overrides, for classes that differ from the main config
    for cls, pattern in (("attention", r"+:.*\.self_attn\..*"), ("dense_mlp", r"+:.*\.mlp\..*"),
                         ("experts", r"+:.*\.experts\..*")):
        c = recipe.config_for(cls)
        if c is None:
            dynamic["-" + pattern[1:]] = {}
        elif c != qc:
            dynamic[pattern] = {"bits": c.bits, "group_size": c.group_size, "sym": c.sym, "desc_act": c.act_order}
    quant = {"bits": qc.bits, "group_size": qc.group_size, "damp_percent": qc.damp, "desc_act": qc.act_order,
             "static_groups": qc.static_groups, "sym": qc.sym, "true_sequential": False, "quant_method": "gptq",
             "checkpoint_format": "gptq", "model_file_base_name": "model",
             "meta": {"quantizer": "grokquant", "recipe": recipe.name, "method": recipe.method}}
    if dynamic:
        quant["dynamic"] = dynamic
    (work / "quantize_config.json").write_text(json.dumps(quant, indent=2))
    config = asdict(ckpt.config)
    config["quantization_config"] = quant
    (work / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(ckpt.tokenizer_path, work / "tokenizer.tok.json")
