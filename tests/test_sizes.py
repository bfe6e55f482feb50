import pytest

from grokquant.errors import GrokquantError
from grokquant.grok.config import GrokConfig
from grokquant.grok.names import gguf_tensors
from grokquant.runtime.sizes import format_bytes, param_counts, parse_memory, parse_split_size
from grokquant.quant.ggml.mixes import tensor_type


def test_real_grok2_sizes_match_spec():
    cfg = GrokConfig()
    p = param_counts(cfg.all_shapes(), cfg)
    assert p["total"] == 269_515_497_472
    assert p["active_per_token"] == 113_822_932_992
    b = format_bytes(cfg)
    assert round(b["bf16"] / 1e9, 1) == 539.0
    assert round(b["q8_0"] / 1e9, 1) == 286.4
    assert round(b["q4_k_m"] / 1e9, 1) == 164.0
    assert round(b["q6_k"] / 1e9, 1) == 221.4



def test_real_grok2_gguf_tensor_list():
    cfg = GrokConfig()
    tensors = dict(gguf_tensors(cfg))
    assert len(tensors) == 963  # as llama.cpp's conversion of the release writes (PR #15539)
    assert tensors["blk.0.ffn_down_exps.weight"] == (8, 8192, 16384)
    assert tensors["blk.63.ffn_gate_inp.weight"] == (8, 8192)


def test_q4_k_m_choices_for_eight_experts():
    pick = lambda name, shape: tensor_type("q4_k_m", name, shape, 64, 8).name
    assert pick("blk.5.attn_k.weight", (1024, 8192)) == "Q8_0"
    assert pick("blk.5.attn_v.weight", (1024, 8192)) == "Q8_0"
    assert pick("blk.5.attn_output.weight", (8192, 8192)) == "Q5_K"
    assert pick("output.weight", (131072, 8192)) == "Q6_K"
    assert pick("blk.0.ffn_norm.weight", (8192,)) == "F32"
    assert pick("blk.0.ffn_gate_inp.weight", (8, 8192)) == "F32"
    assert pick("blk.9.ffn_gate_exps.weight", (8, 16384, 8192)) == "Q4_K"
    assert pick("blk.9.ffn_down.weight", (8192, 100)) == "F16"  # no block divides 100


def test_one_rule_for_byte_sizes():
    # KiB..TiB are powers of 1024 and KB..TB powers of 1000 everywhere; bare K..T follow the option's
    # convention: memory as torch and accelerate (1024), split shards as llama-gguf-split (1000)
    for text, memory, split in (("24GiB", 24 << 30, 24 << 30), ("192GB", 192 * 10**9, 192 * 10**9),
                                ("24G", 24 << 30, 24 * 10**9), ("500m", 500 << 20, 500 * 10**6),
                                (" 1.5 T ", int(1.5 * 2**40), int(1.5 * 10**12)), ("1M", 1 << 20, 10**6),
                                ("4096", 4096, None), ("64B", 64, None), ("0", 0, None)):
        assert parse_memory(text) == memory, text
        if split is None:  # below llama-gguf-split's smallest unit every tensor would be a shard of its own
            with pytest.raises(GrokquantError, match="at least 1M"):
                parse_split_size(text)
        else:
            assert parse_split_size(text) == split, text
    assert parse_memory(3 << 30) == 3 << 30 and parse_split_size(None) is None
    for bad in ("lots", "2iB", "GB", "-1G", "2GiBs"):
        with pytest.raises(GrokquantError, match="cannot parse memory size"):
            parse_memory(bad)
        with pytest.raises(GrokquantError, match="cannot parse size"):
            parse_split_size(bad)
