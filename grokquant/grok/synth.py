"""Synthetic Grok 2 checkpoints in exactly the release's layout (file names and numbering, tensor
names, 8-way expert slices, bf16, full config.json, xAI-format tokenizer), for tests and demos.

`write_checkpoint` is also how trained weights are saved in the original layout.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from grokquant.grok.config import EXPERT_MERGE_DIM, TP_RANKS, GrokConfig, parse_expert_name
from grokquant.errors import GrokquantError
from grokquant.io.paths import replacing
from grokquant.io.safetensors_file import write_safetensors

# File number of each tensor kind in the release (the `pytorch_model-NNNNN-TP-*.safetensors` files of xai-org/grok-2).
FILE_NUMBER = {
    "model.embed_tokens.weight": 0, "lm_head.weight": 1, "model.norm.weight": 2,
    "mlp.gate_proj.weight": 3, "mlp.down_proj.weight": 4, "mlp.up_proj.weight": 5,
    "w1.weight": 6, "w2.weight": 7, "w3.weight": 8,
    "self_attn.k_proj.weight": 9, "self_attn.o_proj.weight": 10, "self_attn.q_proj.weight": 11,
    "self_attn.v_proj.weight": 12, "pre_attn_norm.weight": 13, "post_attn_norm.weight": 14,
    "pre_moe_norm.weight": 15, "post_moe_norm.weight": 16, "block_sparse_moe.gate.weight": 17,
}
PREFIX = "pytorch_model"

# tiny/small: every row length a multiple of 256 (K-quants apply); odd: nothing divides nicely.
PRESETS = {
    "tiny": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 intermediate_size=512, moe_intermediate_size=512, num_hidden_layers=2, vocab_size=512),
    "small": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  intermediate_size=1024, moe_intermediate_size=1024, num_hidden_layers=4, vocab_size=1024),
    "odd": dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                intermediate_size=136, moe_intermediate_size=200, num_hidden_layers=2, vocab_size=300),
}
SPECIALS = ["<|pad|>", "<|separator|>", "<|eos|>", "<|mask|>", "<|control1|>", "<|control2|>"]
TOKENIZER_TEXT_CHARS = 200_000


def synth_config(preset: str = "tiny", **overrides) -> GrokConfig:
    if preset not in PRESETS:
        raise GrokquantError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = replace(GrokConfig(), **values)
    cfg.validate("synthetic config")
    return cfg


def file_name(tensor_name: str, rank: int | None) -> str:
    parsed = parse_expert_name(tensor_name)
    if parsed:
        key = f"{parsed[2]}.weight"
    elif tensor_name.startswith("model.layers."):
        key = tensor_name.split(".", 3)[3]
    else:
        key = tensor_name
    where = "common" if rank is None else f"{rank:03d}"
    return f"{PREFIX}-{FILE_NUMBER[key]:05d}-TP-{where}.safetensors"


@lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    from grokquant.data.corpus import builtin_text
    from grokquant.grok.tokenizer import train_bpe

    n = len(SPECIALS)
    ids = {s: i for i, s in enumerate(SPECIALS[:4])}
    ids.update({s: vocab_size - (n - i) for i, s in enumerate(SPECIALS) if i >= 4})
    tok = train_bpe(builtin_text("train", TOKENIZER_TEXT_CHARS), vocab_size, SPECIALS, ids)
    return json.dumps(tok)


# ---- random weights ---------------------------------------------------------------------------------

def random_slice(cfg: GrokConfig, seed: int) -> Callable[[str, int | None], torch.Tensor]:
    """Deterministic bf16 weights: each (name, rank) slice has its own generator, so a TP slice is
    generated alone and the merged tensor is the concatenation of the slices."""

    def make(name: str, rank: int | None) -> torch.Tensor:
        shape = list(cfg.all_shapes()[name])
        parsed = parse_expert_name(name)
        if parsed and rank is None:  # merged expert = its slices, concatenated
            return torch.cat([make(name, r) for r in range(TP_RANKS)], dim=EXPERT_MERGE_DIM[parsed[2]])
        if parsed:
            shape[EXPERT_MERGE_DIM[parsed[2]]] //= TP_RANKS
        digest = hashlib.sha256(f"{seed}/{name}/{rank}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        x = torch.randn(shape, generator=gen)
        if len(shape) == 1:  # norm weights near 1
            return (1 + 0.1 * x).bfloat16()
        fan_in = cfg.all_shapes()[name][1]
        std = fan_in ** -0.5
        if name.endswith("block_sparse_moe.gate.weight"):
            std *= 4  # a router with real preferences
        if name == "model.embed_tokens.weight":
            std = cfg.hidden_size ** -0.5  # times embedding_multiplier_scale = sqrt(hidden) -> O(1)
        return (x * std).bfloat16()

    return make


def slices_of(full: Callable[[str], torch.Tensor]) -> Callable[[str, int | None], torch.Tensor]:
    """Adapt a full-tensor source (e.g. trained weights) to `write_checkpoint`."""

    def make(name: str, rank: int | None) -> torch.Tensor:
        t = full(name)
        if rank is None:
            return t
        dim = EXPERT_MERGE_DIM[parse_expert_name(name)[2]]
        width = t.shape[dim] // TP_RANKS
        return t.narrow(dim, rank * width, width).contiguous()

    return make


# ---- writing ------------------------------------------------------------------------------------------

def write_checkpoint(out: str | Path, cfg: GrokConfig, tensors: Callable[[str, int | None], torch.Tensor],
                     tokenizer_json: str | None = None, layout: str = "tp8", force: bool = False,
                     index: bool = True) -> Path:
    """Write a complete checkpoint directory; files are built under a temporary name first."""
    out = Path(out)
    if out.exists() and not force:
        raise GrokquantError(f"{out} exists (use --force to replace it)")
    with replacing(out) as tmp:
        tmp.mkdir(parents=True)
        shapes = cfg.all_shapes()
        groups: dict[str, list[tuple[str, int | None]]] = {}
        if layout == "tp8":
            for name in shapes:
                ranks = range(TP_RANKS) if parse_expert_name(name) else [None]
                for rank in ranks:
                    groups.setdefault(file_name(name, rank), []).append((name, rank))
        elif layout == "merged":
            per_file = [list(cfg.global_shapes())] + [list(cfg.layer_shapes(l)) for l in range(cfg.num_hidden_layers)]
            total = len(per_file)
            for i, names in enumerate(per_file):
                groups[f"model-{i + 1:05d}-of-{total:05d}.safetensors"] = [(n, None) for n in names]
        else:
            raise GrokquantError(f"unknown layout {layout!r} (tp8 or merged)")

        weight_map = {}
        for fname, members in sorted(groups.items()):
            specs = []
            for name, rank in members:
                shape = list(shapes[name])
                parsed = parse_expert_name(name)
                if parsed and rank is not None:
                    shape[EXPERT_MERGE_DIM[parsed[2]]] //= TP_RANKS
                specs.append((name, torch.bfloat16, tuple(shape)))
                weight_map[name] = fname
            rank_of = dict(members)
            write_safetensors(tmp / fname, specs, lambda n: tensors(n, rank_of[n]).to(torch.bfloat16),
                              metadata={"format": "pt"})
        if layout == "merged" and index:
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (tmp / "tokenizer.tok.json").write_text(tokenizer_json or _tokenizer_json(cfg.vocab_size))
    return out


def synth(out: str | Path, preset: str = "tiny", seed: int = 0, layout: str = "tp8", force: bool = False,
          **overrides) -> Path:
    """Write a random synthetic checkpoint; `overrides` are config.json keys."""
    cfg = synth_config(preset, **overrides)
    return write_checkpoint(out, cfg, random_slice(cfg, seed), layout=layout, force=force)
