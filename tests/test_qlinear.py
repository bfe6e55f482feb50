"""Quantized linears: torch int4/int8 kernels against the dequantize-then-matmul fallback."""

import pytest
import torch

from grokquant.gptq.layout import PackedLinear, gptq_tensors
from grokquant.runtime.qlinear import (GPTQLinear, Int4Linear, Int8Linear, bnb_linear, gptq_linear, int4_from_ggml,
                               linear_bytes, module_bytes)
from grokquant.quant.ggml.base import dequantize, quantize
from grokquant.quant.gptq import IntQuantConfig, gptq

pytestmark = pytest.mark.usefixtures("one_thread")


def packed_linear(cfg, out=64, inp=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(1, out, inp, generator=g) * 0.02
    X = torch.randn(1, 1024, inp, generator=g)
    q = gptq(W, X.transpose(1, 2) @ X, cfg)
    t = gptq_tensors(q, 0, cfg.bits)
    return PackedLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], cfg.bits, cfg.group_size, cfg.sym)


def inputs(inp=512):
    return torch.randn(3, 5, inp, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cfg,kind", [
    (IntQuantConfig(bits=4, group_size=128), Int4Linear),
    (IntQuantConfig(bits=4, group_size=64, sym=False, act_order=True), Int4Linear),
    (IntQuantConfig(bits=4, group_size=-1), Int4Linear),
    (IntQuantConfig(bits=8, group_size=-1), Int8Linear),
    (IntQuantConfig(bits=8, group_size=-1, sym=False), Int8Linear),
    (IntQuantConfig(bits=8, group_size=128), GPTQLinear),  # group-wise int8: no torch kernel
    (IntQuantConfig(bits=2, group_size=32), GPTQLinear),
    (IntQuantConfig(bits=4, group_size=16), GPTQLinear),  # the int4 kernel takes groups of 32..256
])
def test_kernel_path_agrees_with_the_fallback(cfg, kind):
    p = packed_linear(cfg)
    x = inputs()
    reference = x @ p.dequantize().T
    fallback = gptq_linear(p, "cpu", torch.float32, kernel="dequant")
    fast = gptq_linear(p, "cpu", torch.float32, kernel="auto")
    assert isinstance(fallback, GPTQLinear) and isinstance(fast, kind)
    assert torch.equal(fallback(x), reference)  # the same weights, the same matmul
    scale = reference.abs().max()
    assert (fast(x) - reference).abs().max() < 1e-5 * scale
    if kind is Int4Linear:
        assert (fast.perm is not None) == cfg.act_order
        assert module_bytes(fast) == linear_bytes("int4", 64, 512, 4, group_size=cfg.group_size, act_order=cfg.act_order)
    assert module_bytes(fallback) == linear_bytes("gptq", 64, 512, bits=cfg.bits, group_size=cfg.group_size)


def test_bf16_activations():
    p = packed_linear(IntQuantConfig(bits=4, group_size=128, sym=False))
    x = inputs()
    reference = x @ p.dequantize().T
    y = gptq_linear(p, "cpu", torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert (y.float() - reference).norm() / reference.norm() < 0.02


def test_rows_the_kernel_cannot_tile_fall_back():
    p = packed_linear(IntQuantConfig(bits=4, group_size=128), out=40)  # the CPU kernel wants rows by 16
    m = gptq_linear(p, "cpu", torch.float32)
    assert isinstance(m, GPTQLinear)
    assert isinstance(gptq_linear(p, "cpu", torch.float32, kernel="dense"), torch.nn.Linear)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_4bit_blocks_on_the_int4_kernel(type_name):
    W = torch.randn(64, 512, generator=torch.Generator().manual_seed(2)) * 0.02
    raw = quantize(W, type_name)
    module = int4_from_ggml(raw, type_name, (64, 512), "cpu", torch.float32)
    x = inputs()
    reference = x @ dequantize(raw, type_name, (64, 512)).T
    assert (module(x) - reference).abs().max() < 1e-5 * reference.abs().max()
    assert int4_from_ggml(quantize(W, "Q8_0"), "Q8_0", (64, 512), "cpu", torch.float32) is None


@pytest.mark.parametrize("kind,bound", [("nf4", 0.15), ("int8", 0.02)])
def test_bitsandbytes_on_cpu(kind, bound):
    bnb = pytest.importorskip("bitsandbytes")
    W = torch.randn(64, 512, generator=torch.Generator().manual_seed(3)) * 0.02
    x = inputs()
    m = bnb_linear(W, kind, "cpu", torch.float32)
    y = m(x)
    assert y.shape == (3, 5, 64) and y.dtype == torch.float32
    exact = x @ W.T
    assert (y - exact).norm() / exact.norm() < bound
    if kind == "nf4":
        assert isinstance(m, bnb.nn.Linear4bit)
        Wq = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        assert (y - x @ Wq.T).abs().max() < 1e-4 * exact.abs().max()  # the layer computes its own nf4 weights
        assert module_bytes(m) < W.numel() * 0.6  # 4 bits plus statistics
    else:
        assert isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8
