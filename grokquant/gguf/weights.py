"""A GGUF file seen as a checkpoint: config from its metadata, release-named tensors dequantized.

`Grok2ForCausalLM.from_checkpoint(GGUFWeights(path), weights.semantics)` runs a GGUF's own
weights in our model, which is how llama.cpp's logits are checked against ours.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from grokquant.grok.config import GrokConfig, parse_expert_name
from grokquant.errors import GrokquantError
from grokquant.gguf.file import GGUFFile, read_gguf
from grokquant.grok.names import gguf_name, gguf_tensors
from grokquant.quant.ggml.base import dequantize


MAX_SHARDS = 99999  # llama-gguf-split numbers shards in five digits


def _split_paths(path: Path, meta: dict) -> Iterator[Path]:
    """The shards after the first (a generator: a corrupt count is refused when the next shard is missing)."""
    n = meta.get("split.count", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_SHARDS:
        raise GrokquantError(f"{path}: split.count {n!r:.40} is not a shard count (0 to {MAX_SHARDS})")
    stem = path.name.rsplit("-00001-of-", 1)[0]
    return (path.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(1, n))


class GGUFWeights:
    def __init__(self, path: str | Path):
        first = read_gguf(path)
        meta = first.metadata
        if meta.get("general.architecture") != "grok":
            raise GrokquantError(f"{path}: architecture {meta.get('general.architecture')!r}, expected 'grok'")
        self.files: list[GGUFFile] = [first] + [read_gguf(p) for p in _split_paths(Path(path), meta)]
        self.where = {name: f for f in self.files for name in f.tensors}
        self.metadata = meta
        embd = first.tensors.get("token_embd.weight")
        if embd is None or len(embd.shape) != 2:
            raise GrokquantError(f"{path}: no token_embd.weight matrix (not a Grok 2 GGUF)")
        self.config = config_from_metadata(meta, embd.shape[0], str(path))
        self.rope = "yarn" if meta.get("grok.rope.scaling.type") == "yarn" else "plain"
        # every tensor the metadata implies, of the shape it implies: a damaged file is refused here, not by a
        # shape error inside the model
        for gname, shape in gguf_tensors(self.config):
            f = self.where.get(gname)
            if f is None:
                raise GrokquantError(f"{path}: no tensor {gname} (the metadata says {self.config.num_hidden_layers} "
                                     f"layers of {self.config.num_local_experts} experts)")
            if f.tensors[gname].shape != tuple(shape):
                raise GrokquantError(f"{path}: tensor {gname} has shape {list(f.tensors[gname].shape)}, the "
                                     f"metadata implies {list(shape)}")

    @property
    def semantics(self) -> str:
        return "llama.cpp-yarn" if self.rope == "yarn" else "llama.cpp"

    def tensor(self, name: str) -> torch.Tensor:
        """A release-named tensor, dequantized to float32 (one expert of a stacked tensor)."""
        gname = gguf_name(name)
        f = self.where.get(gname)
        if f is None:
            raise GrokquantError(f"{gname} not in the GGUF file")
        info = f.tensors[gname]
        parsed = parse_expert_name(name)
        if parsed:
            out_rows = info.shape[1]
            raw = f.raw(gname, parsed[1] * out_rows, out_rows)
            shape = info.shape[1:]
        else:
            raw = f.raw(gname)
            shape = info.shape
        return dequantize(torch.from_numpy(raw), info.type.name, tuple(shape))

    def type_of(self, name: str) -> str:
        gname = gguf_name(name)
        return self.where[gname].tensors[gname].type.name

    def round_activations_like_ggml(self, model) -> None:
        """Make each linear of `model` round its input as ggml does for this file's weight type."""
        from grokquant.quant.ggml.activations import round_activations

        for module_name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or module_name.endswith("block_sparse_moe.gate"):
                continue  # the router is F32 in every GGUF
            weight_type = self.type_of(f"{module_name}.weight")
            module.register_forward_pre_hook(lambda m, args, t=weight_type: (round_activations(args[0], t),))

    def model(self, semantics: str | None = None):
        """Our model on this file's dequantized weights, computing as llama.cpp's CPU backend does."""
        from grokquant.grok.model import Grok2ForCausalLM

        model = Grok2ForCausalLM.from_checkpoint(self, semantics or self.semantics)
        if (semantics or self.semantics).startswith("llama.cpp"):
            self.round_activations_like_ggml(model)
        return model

    def close(self) -> None:
        for f in self.files:
            f.close()


def config_from_metadata(meta: dict, vocab_size: int, source: str = "GGUF metadata") -> GrokConfig:
    """The config the metadata describes, validated (values of the wrong type or range are refused)."""
    a = "grok."

    def get(key, default=None):
        value = meta.get(a + key, default)
        if value is None:
            raise GrokquantError(f"GGUF metadata lacks {a + key}")
        return value

    head_dim = meta.get(a + "attention.key_length")
    if head_dim is None:
        width, heads = get("embedding_length"), get("attention.head_count")
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, heads))
        head_dim = width // heads if ok else 0  # 0: validate() names the bad key first
    cfg = replace(
        GrokConfig(),
        vocab_size=vocab_size,
        hidden_size=get("embedding_length"),
        intermediate_size=get("feed_forward_length"),
        moe_intermediate_size=get("expert_feed_forward_length", get("feed_forward_length")),
        num_local_experts=get("expert_count"),
        num_experts_per_tok=get("expert_used_count"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=get("attention.head_count"),
        num_key_value_heads=get("attention.head_count_kv"),
        head_dim=head_dim,
        max_position_embeddings=get("context_length"),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_theta=get("rope.freq_base", 10000.0),
        attn_temperature_len=get("attention.temperature_length", 1024),
        attn_logit_softcapping=get("attn_logit_softcapping", 30.0),
        router_logit_softcapping=get("router_logit_softcapping", 30.0),
        final_logit_softcapping=get("final_logit_softcapping", 0.0),
        embedding_multiplier_scale=get("embedding_scale", 78.38367176906169),
        output_multiplier_scale=get("logit_scale", 0.5773502691896257),
    )
    if meta.get(a + "rope.scaling.type") == "yarn":
        cfg = replace(cfg, scaling_factor=get("rope.scaling.factor"),
                      original_max_position_embeddings=get("rope.scaling.original_context_length"),
                      extrapolation_factor=get("rope.scaling.yarn_ext_factor", 1.0),
                      attn_factor=get("rope.scaling.yarn_attn_factor", 1.0),
                      beta_fast=get("rope.scaling.yarn_beta_fast", 32.0), beta_slow=get("rope.scaling.yarn_beta_slow", 1.0))
    cfg.validate(source)
    return cfg
