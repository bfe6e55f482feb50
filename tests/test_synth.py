import json
import re

import pytest
import torch

from grokquant.grok.checkpoint import Checkpoint, scan
from grokquant.grok.config import GrokConfig
from grokquant.errors import GrokquantError
from grokquant.grok.synth import PRESETS, synth, synth_config

RELEASE_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_local_experts", "num_experts_per_tok", "residual_moe", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_type",
    "original_max_position_embeddings", "scaling_factor", "extrapolation_factor", "attn_factor", "beta_fast",
    "beta_slow", "attn_temperature_len", "attn_logit_softcapping", "router_logit_softcapping",
    "final_logit_softcapping", "embedding_multiplier_scale", "output_multiplier_scale", "sliding_window_size",
    "global_attn_every_n", "torch_dtype",
}


def test_layout_matches_release(tiny_tp8):
    names = sorted(p.name for p in tiny_tp8.iterdir())
    weights = [n for n in names if n.endswith(".safetensors")]
    assert len(weights) == 39
    for n in weights:
        m = re.fullmatch(r"pytorch_model-(\d{5})-TP-(common|\d{3})\.safetensors", n)
        assert m, n
        assert (m[2] == "common") == (int(m[1]) not in (6, 7, 8))
    assert {"config.json", "tokenizer.tok.json"} <= set(names)
    cfg = json.loads((tiny_tp8 / "config.json").read_text())
    assert RELEASE_KEYS <= set(cfg)
    assert cfg["architectures"] == ["Grok1ForCausalLM"] and cfg["rope_type"] == "original"
    ckpt = Checkpoint.open(tiny_tp8)
    assert all(e.dtype == "BF16" for s in ckpt.entries.values() for e in s.values())


def test_presets_shapes():
    for name in ("tiny", "small"):
        cfg = synth_config(name)
        for shape in cfg.all_shapes().values():
            assert len(shape) == 1 or shape[-1] % 256 == 0, (name, shape)
    odd = synth_config("odd")
    assert any(s[-1] % 32 for s in odd.all_shapes().values() if len(s) == 2)


def test_overrides_and_odd_preset(odd_tp8, tmp_path):
    assert scan(odd_tp8).problems == []
    path = synth(tmp_path / "x", "tiny", num_hidden_layers=1, num_local_experts=4, vocab_size=400)
    cfg = GrokConfig.from_file(path / "config.json")
    assert (cfg.num_hidden_layers, cfg.num_local_experts, cfg.vocab_size) == (1, 4, 400)
    assert scan(path).problems == []


def test_deterministic_and_refuses_overwrite(tmp_path, tiny_tp8):
    path = synth(tmp_path / "again", "tiny", seed=1)
    a, b = Checkpoint.open(path), Checkpoint.open(tiny_tp8)
    for name in ["lm_head.weight", "model.layers.1.block_sparse_moe.experts.7.w2.weight"]:
        assert torch.equal(a.tensor(name), b.tensor(name))
    with pytest.raises(GrokquantError, match="exists"):
        synth(path, "tiny")
    assert not list(tmp_path.glob(".again.tmp-*"))
