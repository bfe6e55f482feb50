import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from grokquant.grok.checkpoint import Checkpoint, scan
from grokquant.grok.config import GrokConfig, expert_name
from grokquant.errors import CheckpointError


def test_tp8_inventory_is_complete(tiny_tp8):
    ckpt = scan(tiny_tp8)
    assert ckpt.problems == []
    assert ckpt.layout == "tp8"
    cfg = ckpt.config
    assert len(ckpt.entries) == 3 + cfg.num_hidden_layers * (12 + 3 * cfg.num_local_experts)
    assert len(ckpt.files) == 15 + 3 * 8
    w2 = expert_name(0, 0, "w2")
    assert sorted(ckpt.entries[w2]) == list(range(8))


def _raw(path, name, file_glob):
    """Read every stored copy of `name` with the safetensors library (independent of our reader)."""
    out = {}
    for f in sorted(path.glob(file_glob)):
        with safe_open(f, "pt") as sf:
            if name in sf.keys():
                out[f.name] = sf.get_tensor(name)
    return out


@pytest.mark.parametrize("proj,dim", [("w1", 0), ("w2", 1), ("w3", 0)])
def test_expert_merges_rank_slices_in_order(tiny_tp8, proj, dim):
    name = expert_name(1, 5, proj)
    slices = _raw(tiny_tp8, name, "*-TP-0*.safetensors")
    assert len(slices) == 8
    expected = torch.cat([slices[k] for k in sorted(slices)], dim=dim)
    with Checkpoint.open(tiny_tp8) as ckpt:
        got = ckpt.tensor(name)
        assert torch.equal(got, expected)
        assert got.dtype == torch.bfloat16
        assert torch.equal(ckpt.experts(1, proj)[5], expected)
        assert torch.equal(ckpt.expert(1, 5, proj), expected)
        assert torch.equal(ckpt.tensor_slice(name, 3), slices[sorted(slices)[3]])


def test_merged_and_tp8_hold_identical_tensors(tiny_tp8, tiny_merged):
    a, b = Checkpoint.open(tiny_tp8), Checkpoint.open(tiny_merged)
    assert b.layout == "merged"
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert torch.equal(a.tensor(name), b.tensor(name)), name


def test_merged_without_index(tiny_merged, tmp_path):
    import shutil
    dst = tmp_path / "noindex"
    shutil.copytree(tiny_merged, dst)
    (dst / "model.safetensors.index.json").unlink()
    assert scan(dst).problems == []


def test_iter_layers_yields_each_layer_once(tiny_tp8):
    ckpt = Checkpoint.open(tiny_tp8)
    seen = [layer for layer, tensors in ckpt.iter_layers()]
    assert seen == list(range(ckpt.config.num_hidden_layers))


# ---- damaged copies: each gives a precise problem and Checkpoint.open raises one line ----------

def _problems(path):
    ckpt = scan(path)
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(path)
    assert "\n" not in str(err.value)
    return ckpt.problems, str(err.value)


def test_missing_rank_file(tiny_copy):
    (tiny_copy / "pytorch_model-00007-TP-003.safetensors").unlink()
    problems, line = _problems(tiny_copy)
    assert problems == ["missing rank file pytorch_model-00007-TP-003.safetensors"]
    assert "pytorch_model-00007-TP-003.safetensors" in line


def test_truncated_shard(tiny_copy):
    f = tiny_copy / "pytorch_model-00006-TP-002.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    problems, line = _problems(tiny_copy)
    assert len(problems) == 1 and "truncated" in problems[0] and f.name in problems[0]


def test_corrupt_and_absurd_headers(tiny_copy):
    f1 = tiny_copy / "pytorch_model-00009-TP-common.safetensors"
    f1.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    f2 = tiny_copy / "pytorch_model-00010-TP-common.safetensors"
    data = f2.read_bytes()
    f2.write_bytes(data[:8] + b"#" + data[9:])
    f3 = tiny_copy / "pytorch_model-00011-TP-common.safetensors"
    nested = b"[" * 50_000  # json.loads recurses per bracket: a RecursionError unless caught
    f3.write_bytes(struct.pack("<Q", len(nested)) + nested)
    problems, _ = _problems(tiny_copy)
    assert any(f1.name in p and "corrupt header" in p for p in problems)
    assert any(f2.name in p and "not valid JSON" in p for p in problems)
    assert any(f3.name in p and "not valid JSON" in p for p in problems)


def _rewrite(path, mutate):
    tensors = {}
    with safe_open(path, "pt") as sf:
        for k in sf.keys():
            tensors[k] = sf.get_tensor(k)
    mutate(tensors)
    save_file(tensors, path)


def test_wrong_shape_dtype_and_extra_tensor(tiny_copy):
    q = "model.layers.1.self_attn.q_proj.weight"
    _rewrite(tiny_copy / "pytorch_model-00011-TP-common.safetensors",
             lambda t: t.__setitem__(q, t[q][:-1].clone()))
    w3 = expert_name(0, 2, "w3")
    _rewrite(tiny_copy / "pytorch_model-00008-TP-005.safetensors",
             lambda t: t.__setitem__(w3, t[w3].float()))
    _rewrite(tiny_copy / "pytorch_model-00002-TP-common.safetensors",
             lambda t: t.__setitem__("model.extra.weight", torch.zeros(3, dtype=torch.bfloat16)))
    problems, _ = _problems(tiny_copy)
    assert any(q in p and "shape" in p for p in problems)
    assert any(w3 in p and "F32" in p and "TP-005" in p for p in problems)
    assert any("unexpected tensor" in p and "model.extra.weight" in p for p in problems)
    assert len(problems) == 3


def test_missing_tensor_and_expert_slice(tiny_copy):
    name = "model.layers.0.post_moe_norm.weight"
    _rewrite(tiny_copy / "pytorch_model-00016-TP-common.safetensors", lambda t: t.pop(name))
    w1 = expert_name(1, 7, "w1")
    _rewrite(tiny_copy / "pytorch_model-00006-TP-006.safetensors", lambda t: t.pop(w1))
    problems, _ = _problems(tiny_copy)
    assert any("missing 1 tensor" in p and name in p for p in problems)
    assert any(w1 in p and "[6]" in p for p in problems)


def test_config_missing_key(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    del cfg["moe_intermediate_size"]
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    problems, line = _problems(tiny_copy)
    assert "config.json: missing key(s) moe_intermediate_size" in problems[0]


@pytest.mark.parametrize("content", [b"not json", b'{"regular_tokens": [], "word_split": "V2"}', None])
def test_unreadable_tokenizer(tiny_copy, content):
    tok = tiny_copy / "tokenizer.tok.json"
    if content is None:
        tok.unlink()
    else:
        tok.write_bytes(content)
    problems, line = _problems(tiny_copy)
    assert len(problems) == 1 and "tokenizer.tok.json" in problems[0]


def test_config_values_are_validated():
    with pytest.raises(CheckpointError, match="moe_intermediate_size"):
        GrokConfig.from_dict({**GrokConfig().to_dict(), "moe_intermediate_size": 12})
