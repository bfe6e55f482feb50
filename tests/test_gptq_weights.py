"""GPTQ artifacts read back: packed tensors, dequantized weights, per-module settings."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from grokquant.data.documents import calibration_tokens
from grokquant.grok.checkpoint import Checkpoint
from grokquant.errors import GrokquantError
from grokquant.gptq.config import Quantization, quantization_config
from grokquant.gptq.layout import PackedLinear, gptq_tensors
from grokquant.gptq.weights import GPTQWeights, is_gptq_dir
from grokquant.grok.model import Grok2ForCausalLM
from grokquant.quant.gptq import IntQuantConfig, gptq, rtn
from grokquant.quantize.run import quantize
from grokquant.quantize.recipe import GPTQRecipe, load_recipe
from grokquant.grok.tokenizer import load_tokenizer
from test_gptq_format import unpack_v1


pytestmark = pytest.mark.usefixtures("one_thread")


def make_artifact(ckpt, out, recipe="gptq-w4g128", method="rtn"):
    tokens = calibration_tokens(load_tokenizer(ckpt / "tokenizer.tok.json"), "builtin", 256, 64, seed=1)
    return quantize(ckpt, out, replace(load_recipe(recipe), method=method), tokens)


@pytest.fixture(scope="module")
def mixed_artifact(tiny_tp8, tmp_path_factory):
    """Experts int4 g128, attention and dense MLP int8 per channel (dynamic overrides)."""
    return make_artifact(tiny_tp8, tmp_path_factory.mktemp("gw") / "mixed", "gptq-w4g128-experts-w8-attn")


def packed(q, b, cfg):
    t = gptq_tensors(q, b, cfg.bits)
    return PackedLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], cfg.bits, cfg.group_size, cfg.sym)


@pytest.mark.parametrize("cfg", [IntQuantConfig(bits=4), IntQuantConfig(bits=4, sym=False, act_order=True),
                                 IntQuantConfig(bits=8, group_size=-1), IntQuantConfig(bits=2, group_size=64, sym=False),
                                 IntQuantConfig(bits=4, group_size=32, act_order=True, static_groups=True)])
def test_unpacking_reproduces_the_quantizer_exactly(cfg):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 64, 256, generator=g) * 0.02
    X = torch.randn(2, 512, 256, generator=g)
    q = gptq(W, X.transpose(1, 2) @ X, cfg)
    for b in range(2):
        p = packed(q, b, cfg)
        assert (p.in_features, p.out_features) == (256, 64)
        assert p.act_order == (cfg.act_order and not cfg.static_groups)  # static groups keep g_idx plain
        expected = q.scales[b].half().float()[q.g_idx[b].long()].T * (
            q.codes[b].float() - q.zeros[b][q.g_idx[b].long()].T)
        assert torch.equal(p.dequantize(), expected)
        assert torch.equal(p.codes().T, q.codes[b])
        assert np.allclose(p.dequantize().numpy(), unpack_v1(gptq_tensors(q, b, cfg.bits), cfg.bits, 256), atol=1e-7)


def test_zero_points_read_as_auto_gptq_reads_them():
    # all-positive groups under asymmetric quantization: the quantizer keeps zero >= 1 (v1 stores zero - 1)
    W = torch.rand(1, 8, 64) + 0.1
    cfg = IntQuantConfig(bits=4, group_size=32, sym=False)
    q = rtn(W, cfg)
    assert (q.zeros == 1).all()
    p = packed(q, 0, cfg)
    assert (p.zeros() == 1).all()
    assert torch.allclose(p.dequantize(), q.dequantize()[0], atol=1e-3)


def test_dynamic_overrides():
    quant = Quantization.from_dict({"bits": 4, "group_size": 128, "sym": True, "quant_method": "gptq", "dynamic": {
        r"+:.*\.self_attn\..*": {"bits": 8, "group_size": -1}, r"-:.*\.mlp\..*": {}}})
    assert quant.for_module("model.layers.3.self_attn.q_proj").bits == 8
    assert quant.for_module("model.layers.3.self_attn.q_proj").group_size == -1
    assert quant.for_module("model.layers.3.mlp.up_proj") is None
    assert quant.for_module("model.layers.3.block_sparse_moe.experts.0.w1") == quant.default
    with pytest.raises(GrokquantError, match="awq"):
        Quantization.from_dict({"quant_method": "awq"})


def test_quantization_config_reads_back_as_written():
    experts = IntQuantConfig(bits=4, group_size=32, sym=False, act_order=True, static_groups=True, damp=0.05)
    recipe = GPTQRecipe(experts=experts, attention=None, dense_mlp=IntQuantConfig(bits=8, group_size=-1, act_order=True))
    raw = quantization_config(recipe)
    assert (raw["desc_act"], raw["damp_percent"]) == (True, 0.05) and "act_order" not in raw
    quant = Quantization.from_dict(raw)
    assert quant.default == experts
    assert quant.for_module("model.layers.0.block_sparse_moe.experts.3.w1") == experts
    assert quant.for_module("model.layers.0.self_attn.q_proj") is None
    assert quant.for_module("model.layers.0.mlp.up_proj") == replace(experts, bits=8, group_size=-1, sym=True)


def test_artifact_reads_lazily_and_matches_the_packer(mixed_artifact, tiny_tp8):
    with GPTQWeights(mixed_artifact) as w:
        cfg = w.config
        assert is_gptq_dir(mixed_artifact) and not is_gptq_dir(tiny_tp8)
        assert w.tokenizer_path.name == "tokenizer.tok.json"
        assert sorted(w.names()) == sorted(cfg.all_shapes())
        assert w._open == {}  # nothing read yet
        q = w.quantized("model.layers.0.self_attn.q_proj.weight")
        assert (q.bits, q.group_size, q.sym) == (8, -1, True)
        e = w.quantized("model.layers.1.block_sparse_moe.experts.5.w1.weight")
        assert (e.bits, e.group_size) == (4, 128)
        assert w.quantized("model.layers.0.block_sparse_moe.gate.weight") is None
        router = w.tensor("model.layers.0.block_sparse_moe.gate.weight")
        assert router.dtype == torch.bfloat16
        ckpt = Checkpoint.open(tiny_tp8)
        for name, spec in (("model.layers.0.self_attn.q_proj.weight", q),
                           ("model.layers.1.block_sparse_moe.experts.5.w1.weight", e)):
            W = w.tensor(name)
            assert W.dtype == torch.float32 and W.shape == cfg.layer_shapes(int(name.split(".")[2]))[name]
            parts = {k: getattr(spec, k) for k in ("qweight", "qzeros", "scales", "g_idx")}
            assert np.allclose(W.numpy(), unpack_v1(parts, spec.bits, W.shape[1]), atol=1e-7)
            ref = ckpt.tensor(name).float()
            assert (W - ref).norm() / ref.norm() < (0.02 if spec.bits == 8 else 0.15)


def test_model_runs_on_the_dequantized_artifact(mixed_artifact, tiny_tp8):
    quantized = Grok2ForCausalLM.from_checkpoint(GPTQWeights(mixed_artifact))
    reference = Grok2ForCausalLM.from_checkpoint(Checkpoint.open(tiny_tp8))
    tokens = torch.randint(0, quantized.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    a, b = quantized(tokens), reference(tokens)
    assert (a - b).abs().max() < 0.1 * b.abs().max()  # int4 experts: close, not equal
    assert not torch.equal(a, b)


def test_not_an_artifact(tiny_tp8, tmp_path):
    with pytest.raises(GrokquantError, match="quantization_config"):
        GPTQWeights(tiny_tp8)
    with pytest.raises(GrokquantError, match="config.json"):
        GPTQWeights(tmp_path)


def _damaged(artifact, tmp_path, damage):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(artifact, copy)
    damage(copy)
    return copy


def _truncate(path, size):
    data = path.read_bytes()
    path.write_bytes(data[:size])


SHARD = "model-00002-of-00003.safetensors"
DAMAGES = {
    "missing shard": (lambda d: (d / SHARD).unlink(), f"lists {SHARD}, which is missing"),
    "truncated shard": (lambda d: _truncate(d / SHARD, 5000), f"{SHARD}: corrupt header"),
    "truncated data": (lambda d: _truncate(d / SHARD, (d / SHARD).stat().st_size - 10), f"{SHARD}: truncated"),
    "broken index": (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": '), "not valid JSON"),
    "index without map": (lambda d: (d / "model.safetensors.index.json").write_text("[]"), "no weight_map"),
    "index naming the wrong file": (lambda d: (d / "model.safetensors.index.json").write_text(
        (d / "model.safetensors.index.json").read_text().replace("model-00001-of", "model-00003-of", 1)),
        "not in the file it names"),
    "garbage quantize_config.json": (lambda d: (d / "quantize_config.json").write_text("garbage"),
                                     "quantize_config.json: not valid JSON"),
    "quantize_config.json of other bits": (lambda d: (d / "quantize_config.json").write_text(
        (d / "quantize_config.json").read_text().replace('"bits": 4', '"bits": 8')), "disagrees with config.json"),
    "bits as a string": (lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"bits": 4', '"bits": "4"')), "bits is '4', expected int"),
    "broken config.json": (lambda d: _truncate(d / "config.json", 20), "not valid JSON"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_artifact_is_refused_when_opened(mixed_artifact, tmp_path, damage):
    mutate, message = DAMAGES[damage]
    copy = _damaged(mixed_artifact, tmp_path, mutate)
    with pytest.raises(GrokquantError, match=message.replace("(", r"\(")) as err:
        GPTQWeights(copy)
    assert "\n" not in str(err.value)


def test_damaged_artifact_run_and_eval_exit_2(mixed_artifact, tmp_path):
    import subprocess
    import sys

    copy = _damaged(mixed_artifact, tmp_path, lambda d: _truncate(d / SHARD, 5000))
    for args in (["run", copy, "--prompt", "hi"], ["eval", copy, "--chunks", 1, "--ctx", 32]):
        proc = subprocess.run([sys.executable, "-m", "grokquant", *map(str, args)], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-1000:]
        assert proc.stderr.count("\n") == 1 and f"{SHARD}: corrupt header" in proc.stderr


def test_packed_tensors_that_do_not_fit_are_refused():
    cfg = IntQuantConfig(bits=4, group_size=32)
    w = torch.randn(64, 128)
    t = gptq_tensors(rtn(w[None], cfg), 0, cfg.bits)
    PackedLinear.read("x", t, 4, 32, True)
    bad = dict(t, g_idx=t["g_idx"].clone())
    bad["g_idx"][5] = t["scales"].shape[0]  # a group that does not exist
    with pytest.raises(GrokquantError, match="g_idx names groups outside"):
        PackedLinear.read("x", bad, 4, 32, True)
    with pytest.raises(GrokquantError, match="not GPTQ tensors"):
        PackedLinear.read("x", dict(t, qweight=t["qweight"].float()), 4, 32, True)
    with pytest.raises(GrokquantError, match="not GPTQ tensors"):
        PackedLinear.read("x", dict(t, g_idx=t["g_idx"][:0]), 4, 32, True)
    with pytest.raises(GrokquantError, match="do not fit"):
        PackedLinear.read("x", dict(t, qzeros=t["qzeros"][:1]), 4, 32, True)
