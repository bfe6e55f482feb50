"""Quantized GGUF files versus llama.cpp's own `llama_model_quantize` on the same model."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from grokquant.gguf.convert import convert, plan
from grokquant.gguf.file import read_gguf
from grokquant.gguf.weights import GGUFWeights
from grokquant.grok.model import Grok2ForCausalLM
from grokquant.quant.ggml.mixes import FTYPES, requires_imatrix
from grokquant.quantize.recipe import GGUFRecipe
from grokquant.grok.synth import synth
from test_export_gguf import RUNNER, TOKENS, llama, llama_logits, logits_and_bound

# GGML type -> a llama.cpp file type whose default it is (used with --pure)
PURE = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q4_K": "q4_k_m",
        "Q5_K": "q5_k_m", "Q6_K": "q6_k", "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs", "Q2_K": "q2_k", "Q3_K": "q3_k_m"}
MIXES = ["q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "iq4_xs", "q3_k_m", "q2_k", "q4_0"]


@pytest.fixture(scope="module")
def f32(tiny_tp8, tmp_path_factory):
    return convert(tiny_tp8, tmp_path_factory.mktemp("q") / "f32.gguf", GGUFRecipe("f32", "f32"))[0]


def compare_files(ours, ref):
    """Fraction of identical blocks over all tensors; tensor names and types must match."""
    a, b = read_gguf(ours), read_gguf(ref)
    assert sorted(a.tensors) == sorted(b.tensors)  # llama-quantize writes its own order
    same = total = 0
    for name, info in a.tensors.items():
        assert info.type.name == b.tensors[name].type.name, name
        x = a.raw(name).reshape(-1, info.type.block_bytes)
        y = b.raw(name).reshape(-1, info.type.block_bytes)
        same += int((x == y).all(axis=1).sum())
        total += x.shape[0]
    return same / total


@pytest.mark.parametrize("type_name", list(PURE))
def test_bytes_equal_llama_quantize(tiny_tp8, f32, tmp_path, type_name):
    ftype = PURE[type_name]
    ref = tmp_path / "ref.gguf"
    llama("quantize", f32, ref, FTYPES[ftype][0], 1)
    ours = convert(tiny_tp8, tmp_path / "ours.gguf", GGUFRecipe(ftype, ftype, pure=True))[0]
    fraction = compare_files(ours, ref)
    print(f"{type_name}: {fraction:.6%} of blocks identical to llama-quantize")
    assert fraction >= 0.999


def test_odd_shapes_fall_back_like_llama_quantize(odd_tp8, tmp_path):
    f32 = convert(odd_tp8, tmp_path / "odd-f32.gguf", GGUFRecipe("f32", "f32"))[0]
    ref = tmp_path / "ref.gguf"
    llama("quantize", f32, ref, FTYPES["q4_k_m"][0], 0)
    ours = convert(odd_tp8, tmp_path / "ours.gguf", GGUFRecipe("q4_k_m", "q4_k_m"))[0]
    types = {t.type.name for t in read_gguf(ours).tensors.values()}
    assert "F16" in types or "Q5_0" in types or "Q8_0" in types  # fallbacks were exercised
    assert compare_files(ours, ref) >= 0.999


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """16 layers so that llama.cpp's per-layer rules (use_more_bits, first eighth) all show."""
    path = synth(tmp_path_factory.mktemp("deep") / "deep", "tiny", num_hidden_layers=16, moe_intermediate_size=256,
                 intermediate_size=256)
    return path, convert(path, path.parent / "deep-f32.gguf", GGUFRecipe("f32", "f32"))[0]


@pytest.mark.parametrize("ftype", MIXES)
def test_mix_types_equal_llama_quantize(deep, tmp_path, ftype):
    path, f32 = deep
    ref = tmp_path / "ref.gguf"
    llama("quantize", f32, ref, FTYPES[ftype][0], 0)
    ref_types = {n: i.type.name for n, i in read_gguf(ref).tensors.items()}
    cfg = GGUFWeights(f32).config
    assert {t.name: t.type.name for t in plan(cfg, GGUFRecipe(ftype, ftype))} == ref_types


@pytest.mark.parametrize("ftype", ["q4_k_m", "q6_k", "q8_0", "iq4_xs", "q4_0", "bf16"])
def test_quantized_logits_match_llamacpp(tiny_tp8, tmp_path, ftype):
    """Our model on the file's own dequantized weights, rounding activations as ggml's CPU backend does:
    within the bound test_export_gguf.py justifies, and far closer than quantization moves the logits."""
    from grokquant.grok.checkpoint import Checkpoint

    path = convert(tiny_tp8, tmp_path / f"{ftype}.gguf", GGUFRecipe(ftype, ftype))[0]
    ours, bound = logits_and_bound(GGUFWeights(path), TOKENS)
    ref = llama_logits(path, TOKENS, tmp_path)
    original = Grok2ForCausalLM.from_checkpoint(Checkpoint.open(tiny_tp8), "llama.cpp")(torch.tensor(TOKENS))[0]
    gap, effect = np.abs(ours - ref), np.abs(original.numpy() - ref)
    print(f"{ftype}: |logit diff| vs llama.cpp max {gap.max():.3g} mean {gap.mean():.3g} (bound {bound:.3g}); "
          f"quantization moves logits max {effect.max():.3g} mean {effect.mean():.3g}")
    assert gap.max() < bound
    assert gap.mean() < 0.75 * effect.mean()


@pytest.mark.parametrize("ftype", ["q4_k_m", "iq4_xs", "q4_0"])
def test_imatrix_conversion_equals_llama_quantize(tiny_tp8, f32, tmp_path, ftype):
    """Per-expert importance from a GGUF imatrix: our file equals llama_model_quantize given the same data."""
    from grokquant.calibrate.imatrix import load_imatrix, save_imatrix

    cfg = GGUFWeights(f32).config
    gen = torch.Generator().manual_seed(5)
    sums, counts = {}, {}
    for t in plan(cfg, GGUFRecipe(ftype, ftype)):
        if t.type.name == "F32":
            continue
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        counts[t.name] = torch.randint(0, 50, (n_mat,), generator=gen).float()
        if n_mat > 1:
            counts[t.name][3] = 0  # an expert that saw no tokens: llama.cpp uses 1.0 for it
        sums[t.name] = torch.rand(n_mat, t.shape[-1], generator=gen) ** 4 * counts[t.name][:, None] * 10
    path = tmp_path / "imatrix.gguf"
    save_imatrix(path, sums, counts, ["synthetic"], 1, 512)
    imatrix = load_imatrix(path)
    np.savez(tmp_path / "imatrix.npz", **{k: v.numpy() for k, v in imatrix.items()})
    ref = tmp_path / "ref.gguf"
    llama("quantize", f32, ref, FTYPES[ftype][0], 0, tmp_path / "imatrix.npz")
    ours = convert(tiny_tp8, tmp_path / "ours.gguf", GGUFRecipe(ftype, ftype), imatrix=imatrix)[0]
    fraction = compare_files(ours, ref)
    print(f"{ftype} with imatrix: {fraction:.6%} of blocks identical to llama-quantize")
    assert fraction >= 0.999
    without = convert(tiny_tp8, tmp_path / "plain.gguf", GGUFRecipe(ftype, ftype))[0]
    assert compare_files(without, ref) < 0.9  # the importance really changed the result


LOW_BIT_MIXES = ["iq3_m", "iq3_s", "iq3_xs", "iq3_xxs", "q2_k_s", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m",
                 "iq1_s"]
# llama_model_quantize really quantizes the 16-layer model (ggml's slow IQ2/IQ3 searches): the default run
# checks one mix per family with its own rules, `make test-slow` all of them
FAST_MIXES = {"iq3_m", "q2_k_s", "iq2_m", "iq1_s"}


def synthetic_imatrix(cfg, ftype: str, out, seed: int = 7) -> dict[str, torch.Tensor]:
    """Per-expert importance for every quantizable tensor, saved as llama_runner's npz as well."""
    gen = torch.Generator().manual_seed(seed)
    imatrix = {}
    for t in plan(cfg, GGUFRecipe(ftype, ftype), has_imatrix=True):
        if t.type.name != "F32":
            n_mat = t.shape[0] if len(t.shape) == 3 else 1
            imatrix[t.name] = torch.rand(n_mat, t.shape[-1], generator=gen) ** 4 + 1e-3
    np.savez(out, **{k: v.numpy() for k, v in imatrix.items()})
    return imatrix


@pytest.mark.parametrize("ftype", [f if f in FAST_MIXES else pytest.param(f, marks=pytest.mark.slow)
                                   for f in LOW_BIT_MIXES])
def test_low_bit_mix_types_equal_llama_quantize(deep, tmp_path, ftype):
    """The 1-3 bit mixes, given an importance matrix as they require: the same per-tensor types as
    llama_model_quantize on a 16-layer 8-expert model (its first-eighth and use_more_bits rules show)."""
    path, f32 = deep
    cfg = GGUFWeights(f32).config
    synthetic_imatrix(cfg, ftype, tmp_path / "imatrix.npz")
    ref = tmp_path / "ref.gguf"
    llama("quantize", f32, ref, FTYPES[ftype][0], 0, tmp_path / "imatrix.npz")
    ref_types = {n: i.type.name for n, i in read_gguf(ref).tensors.items()}
    assert {t.name: t.type.name for t in plan(cfg, GGUFRecipe(ftype, ftype), has_imatrix=True)} == ref_types


@pytest.mark.parametrize("ftype", ["iq2_xxs", "iq3_xxs", "q2_k_s"])
def test_low_bit_mix_without_imatrix_is_refused_like_llama_quantize(deep, tmp_path, ftype):
    """llama-quantize refuses these without importance data; so do we, in one line, writing nothing."""
    from grokquant.errors import GrokquantError

    path, f32 = deep
    proc = subprocess.run([sys.executable, RUNNER, "quantize", f32, tmp_path / "ref.gguf", str(FTYPES[ftype][0]), "0"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    with pytest.raises(GrokquantError, match="needs an importance matrix") as err:
        convert(path, tmp_path / "ours.gguf", GGUFRecipe(ftype, ftype))
    assert "\n" not in str(err.value)
    cfg = GGUFWeights(f32).config
    partial = synthetic_imatrix(cfg, ftype, tmp_path / "imatrix.npz")
    needy = [t.name for t in plan(cfg, GGUFRecipe(ftype, ftype), has_imatrix=True)
             if requires_imatrix(t.type.name, t.name, ftype)]
    partial.pop(needy[-1])
    with pytest.raises(GrokquantError, match="has no entry"):
        convert(path, tmp_path / "ours.gguf", GGUFRecipe(ftype, ftype), imatrix=partial)
    assert not list(tmp_path.glob("*ours*")) and not list(tmp_path.glob(".ours*"))


# each 1-3 bit type through a llama.cpp file type whose default it is (llama_ftype_get_default_type)
LOW_BIT_PURE = {"IQ1_S": "iq1_s", "IQ1_M": "iq1_m", "IQ2_XXS": "iq2_xxs", "IQ2_XS": "iq2_xs", "IQ2_S": "iq2_m",
                "IQ3_XXS": "iq3_xxs", "IQ3_S": "iq3_s"}


@pytest.mark.parametrize("type_name", list(LOW_BIT_PURE))
def test_low_bit_file_equals_llama_quantize_pure_and_its_logits(tiny_tp8, f32, tmp_path, type_name):
    """A whole file in one 1-3 bit type with an importance matrix: every block equals
    llama_model_quantize --pure given the same importance, and llama.cpp's logits on it equal our model's
    on the file's own dequantized weights within the bound test_export_gguf.py justifies."""
    ftype = LOW_BIT_PURE[type_name]
    cfg = GGUFWeights(f32).config
    imatrix = synthetic_imatrix(cfg, ftype, tmp_path / "imatrix.npz")
    ref = tmp_path / "ref.gguf"
    llama("quantize", f32, ref, FTYPES[ftype][0], 1, tmp_path / "imatrix.npz")
    ours = convert(tiny_tp8, tmp_path / "ours.gguf", GGUFRecipe(ftype, ftype, pure=True), imatrix=imatrix)[0]
    types = {i.type.name for i in read_gguf(ours).tensors.values()}
    assert type_name in types, types
    fraction = compare_files(ours, ref)
    print(f"{type_name}: {fraction:.6%} of blocks identical to llama-quantize --pure")
    assert fraction == 1.0  # the quantizers are bit-exact ports; any differing block is a bug

    logits, bound = logits_and_bound(GGUFWeights(ours), TOKENS)
    gap = np.abs(logits - llama_logits(ours, TOKENS, tmp_path))
    print(f"{type_name}: |logit diff| vs llama.cpp max {gap.max():.3g} mean {gap.mean():.3g} (bound {bound:.3g})")
    assert gap.max() < bound
