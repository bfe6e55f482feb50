"""auto-gptq's own QuantLinear reads our GPTQ artifacts the way we wrote them (auto-gptq's checkpoint
format: qweight, qzeros, scales, g_idx).

Runs only where auto-gptq is importable (`make test-interop` builds such a venv); skipped otherwise. On CPU
auto-gptq 0.7.1 picks qlinear_cuda_old (contiguous groups, g_idx ignored) or qlinear_cuda (desc_act: groups
through g_idx), both of which unpack in torch when the CUDA extension is absent.
"""

import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("auto_gptq")

from auto_gptq.modeling._base import BaseQuantizeConfig  # noqa: E402
from auto_gptq.utils.import_utils import dynamically_import_QuantLinear  # noqa: E402
from safetensors import safe_open  # noqa: E402

from grokquant.data.documents import calibration_tokens  # noqa: E402
from grokquant.grok.checkpoint import Checkpoint  # noqa: E402
from grokquant.quantize.run import GPTQRecipe, quantize  # noqa: E402
from grokquant.quantize.recipe import load_recipe  # noqa: E402
from grokquant.grok.synth import synth  # noqa: E402
from grokquant.grok.tokenizer import load_tokenizer  # noqa: E402
from test_gptq_format import unpack_v1  # noqa: E402

PARTS = ("qweight", "qzeros", "scales", "g_idx")

# Experts int4 asymmetric with act_order (permuted g_idx); attention int8 per channel; dense MLP int8 with
# act_order. The experts' config becomes quantize_config.json's main one, the others `dynamic` overrides.
MIXED_RECIPE = """\
name: interop-mixed
format: gptq
method: gptq
experts: {bits: 4, group_size: 128, sym: false, act_order: true}
attention: {bits: 8, group_size: -1, sym: true}
dense_mlp: {bits: 8, group_size: 128, sym: false, act_order: true}
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny preset with one layer: every tensor class, half the GPTQ time of two layers."""
    return synth(tmp_path_factory.mktemp("interop") / "tiny-1layer", "tiny", seed=1, num_hidden_layers=1)


@pytest.fixture(scope="module")
def tokens(checkpoint):
    return calibration_tokens(load_tokenizer(checkpoint / "tokenizer.tok.json"), "builtin", 1024, 64, seed=1)


@pytest.fixture(scope="module")
def w4g128(checkpoint, tokens, tmp_path_factory):
    return quantize(checkpoint, tmp_path_factory.mktemp("interop") / "w4g128", GPTQRecipe(), tokens)


@pytest.fixture(scope="module")
def mixed(checkpoint, tokens, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interop")
    (tmp / "mixed.yaml").write_text(MIXED_RECIPE)
    return quantize(checkpoint, tmp / "mixed", load_recipe(tmp / "mixed.yaml"), tokens)


def module_tensors(artifact, prefix: str) -> dict[str, torch.Tensor]:
    index = json.loads((artifact / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for k in PARTS:
        with safe_open(str(artifact / index[f"{prefix}.{k}"]), "pt") as sf:
            out[k] = sf.get_tensor(f"{prefix}.{k}")
    return out


def module_config(artifact, prefix: str) -> tuple[int, int, bool]:
    """(bits, group_size, desc_act) of one module: auto-gptq's parse of quantize_config.json, then the
    GPTQModel-style `dynamic` overrides (auto-gptq 0.7.1 ignores them; our mixed recipes need them)."""
    main = BaseQuantizeConfig.from_pretrained(str(artifact))
    bits, group_size, desc_act = main.bits, main.group_size, main.desc_act
    dynamic = json.loads((artifact / "quantize_config.json").read_text()).get("dynamic", {})
    for pattern, override in dynamic.items():
        sign, regex = pattern.split(":", 1)
        if re.match(regex, prefix):
            assert sign == "+", f"{prefix} is marked unquantized but has GPTQ tensors"
            bits = override.get("bits", bits)
            group_size = override.get("group_size", group_size)
            desc_act = override.get("desc_act", desc_act)
            break
    return bits, group_size, desc_act


def auto_gptq_linear(tensors: dict[str, torch.Tensor], bits: int, group_size: int, desc_act: bool):
    """auto-gptq's QuantLinear as its loader would pick it on CPU, with our tensors loaded strictly."""
    cls = dynamically_import_QuantLinear(use_triton=False, desc_act=desc_act, group_size=group_size, bits=bits,
                                         disable_exllama=True, disable_exllamav2=True)
    in_features, out_features = tensors["g_idx"].shape[0], tensors["scales"].shape[1]
    layer = cls(bits, group_size, in_features, out_features, bias=False)
    layer.load_state_dict(tensors)  # strict: every buffer present, no extra key, shapes equal
    return layer.eval()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def reference_output(tensors, bits: int, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Our own dequantization (the independent unpacker) and x @ W_dequantized.T in float64."""
    W = unpack_v1(tensors, bits, tensors["g_idx"].shape[0])
    return W, x.double() @ torch.from_numpy(W).double().T


# fp16 scales × codes are rounded to fp16 (rel. 2^-11) before an fp16 matmul; measured errors are ~3e-4, and
# any format slip (zero off by one, wrong nibble order, ignored g_idx) costs > 1e-2.
FP16_TOLERANCE = 2e-3

CASES = [  # artifact fixture, module, expected (bits, group_size, desc_act), weight error bound vs the checkpoint
    ("w4g128", "model.layers.0.self_attn.q_proj", (4, 128, False), 0.25),
    ("w4g128", "model.layers.0.block_sparse_moe.experts.6.w2", (4, 128, False), 0.25),
    ("w4g128", "model.layers.0.block_sparse_moe.experts.3.w1", (4, 128, False), 0.25),
    ("w4g128", "model.layers.0.mlp.down_proj", (4, 128, False), 0.25),
    ("mixed", "model.layers.0.self_attn.k_proj", (8, -1, False), 0.02),
    ("mixed", "model.layers.0.mlp.up_proj", (8, 128, True), 0.02),
    ("mixed", "model.layers.0.block_sparse_moe.experts.2.w1", (4, 128, True), 0.25),
    ("mixed", "model.layers.0.block_sparse_moe.experts.5.w2", (4, 128, True), 0.25),
]


@pytest.mark.parametrize("fixture,prefix,config,weight_bound", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_auto_gptq_forward_matches_our_dequantization(request, checkpoint, fixture, prefix, config, weight_bound):
    artifact = request.getfixturevalue(fixture)
    assert module_config(artifact, prefix) == config
    bits, group_size, desc_act = config
    tensors = module_tensors(artifact, prefix)
    g_idx = tensors["g_idx"].long()
    if desc_act and group_size != -1:  # the act-order case must really exercise a permuted g_idx
        assert (g_idx.diff() < 0).any()
    else:
        in_features = g_idx.shape[0]
        assert torch.equal(g_idx, torch.arange(in_features) // (in_features if group_size == -1 else group_size))

    x = torch.randn(16, g_idx.shape[0], generator=torch.Generator().manual_seed(0)).half()
    W, ref = reference_output(tensors, bits, x)
    W_orig = Checkpoint.open(checkpoint).tensor(prefix + ".weight").float().numpy()
    assert np.linalg.norm(W - W_orig) / np.linalg.norm(W_orig) < weight_bound  # the reference is not trivial

    with torch.no_grad():
        out = auto_gptq_linear(tensors, *config)(x)
    assert out.dtype == torch.float16 and out.shape == ref.shape
    assert relative_error(out, ref) < FP16_TOLERANCE


def test_the_comparison_catches_format_slips(w4g128, mixed):
    """The tolerance is not loose: two plausible misreadings of our files are far outside it."""
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(1)).half()

    # v2 zeros (no "- 1"): reading our symmetric int4 words 0x77777777 as zero 7 instead of 8
    t = module_tensors(w4g128, "model.layers.0.block_sparse_moe.experts.6.w2")
    _, ref = reference_output(t, 4, x)
    v2 = dict(t, qzeros=(t["qzeros"].to(torch.int64) - 0x11111111).to(torch.int32))
    with torch.no_grad():
        assert relative_error(auto_gptq_linear(v2, 4, 128, False)(x), ref) > 10 * FP16_TOLERANCE

    # act-order weights through the contiguous-group kernel, which ignores g_idx
    t = module_tensors(mixed, "model.layers.0.block_sparse_moe.experts.5.w2")
    _, ref = reference_output(t, 4, x)
    with torch.no_grad():
        assert relative_error(auto_gptq_linear(t, 4, 128, False)(x), ref) > 10 * FP16_TOLERANCE
        assert relative_error(auto_gptq_linear(t, 4, 128, True)(x), ref) < FP16_TOLERANCE
