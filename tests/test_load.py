"""grokquant.load: GPTQ artifacts, GGUF files and bitsandbytes on the fly, against dequantized references."""

import pytest
import torch
from click.testing import CliRunner

import grokquant
from grokquant.grok.checkpoint import Checkpoint
from grokquant.cli import main
from grokquant.errors import GrokquantError
from grokquant.gguf.convert import convert
from grokquant.runtime.generate import pick_token, sample_iter
from grokquant.runtime.load import open_source
from grokquant.gguf.weights import GGUFWeights
from grokquant.gptq.weights import GPTQWeights
from grokquant.grok.model import Grok2ForCausalLM
from grokquant.runtime.qlinear import GPTQLinear, Int4Linear, Int8Linear
from grokquant.quantize.recipe import GGUFRecipe
from test_gptq_weights import make_artifact

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def int4_artifact(tiny_tp8, tmp_path_factory):
    return make_artifact(tiny_tp8, tmp_path_factory.mktemp("load") / "w4g128")


@pytest.fixture(scope="module")
def mixed_artifact(tiny_tp8, tmp_path_factory):
    return make_artifact(tiny_tp8, tmp_path_factory.mktemp("load") / "mixed", "gptq-w4g128-experts-w8-attn")


def tokens(vocab, n=12, batch=2):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(0))


def kinds(model):
    return {type(m) for m in model.modules()}


def test_gptq_int4_artifact_matches_its_dequantized_weights(int4_artifact):
    reference = Grok2ForCausalLM.from_checkpoint(GPTQWeights(int4_artifact))
    x = tokens(reference.cfg.vocab_size)
    expected = reference(x)
    fast = grokquant.load(int4_artifact)  # the package-level entry point
    assert Int4Linear in kinds(fast) and fast.placement.layers == ["cpu", "cpu"]
    assert fast.tokenizer_path.name == "tokenizer.tok.json"
    torch.testing.assert_close(fast(x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    fallback = grokquant.load(int4_artifact, kernel="dequant")
    assert GPTQLinear in kinds(fallback) and Int4Linear not in kinds(fallback)
    torch.testing.assert_close(fallback(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast(x), fallback(x), rtol=0, atol=1e-5 * expected.abs().max().item())


def test_per_class_settings_pick_their_kernels(mixed_artifact):
    reference = Grok2ForCausalLM.from_checkpoint(GPTQWeights(mixed_artifact))
    model = grokquant.load(mixed_artifact)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Int8Linear) and isinstance(layer.mlp.up_proj, Int8Linear)
    assert isinstance(layer.block_sparse_moe.experts[3].w2, Int4Linear)
    assert isinstance(model.lm_head, torch.nn.Linear)  # stored bf16, kept so
    x = tokens(reference.cfg.vocab_size)
    expected = reference(x)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_open_source_recognises_every_artifact_and_refuses_the_rest(tiny_tp8, int4_artifact, tmp_path):
    text = "The quick brown fox"
    with open_source(tiny_tp8) as ckpt, open_source(int4_artifact) as gptq:
        assert (ckpt.kind, ckpt.semantics, gptq.kind) == ("checkpoint", "sglang", "gptq")
        expected = ckpt.tokenizer().encode(text)
        assert gptq.tokenizer().encode(text) == expected
        assert gptq.size_bytes() == sum(f.stat().st_size for f in int4_artifact.glob("*.safetensors"))
    shards = convert(tiny_tp8, tmp_path / "split.gguf", GGUFRecipe("q8_0", "q8_0"), split_max_bytes=1_000_000)
    assert len(shards) > 2
    with open_source(shards[0]) as gguf:  # the first shard stands for the set
        assert (gguf.kind, gguf.semantics, gguf.files()) == ("gguf", "llama.cpp", shards)
        assert gguf.size_bytes() == sum(p.stat().st_size for p in shards)
        assert gguf.tokenizer().encode(text) == expected
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for path, message in ((shards[1], "shard 2 of a split GGUF; open the first, split-00001-of-"),
                          (tmp_path / "missing", "no such file"), (tmp_path / "notes.txt", "expected a .gguf"),
                          (tmp_path / "empty", "no \\*.safetensors")):
        with pytest.raises(GrokquantError, match=message) as info:
            open_source(path)
        assert "\n" not in str(info.value)
    shards[-1].unlink()
    with pytest.raises(GrokquantError, match="cannot open"):
        open_source(shards[0])


def test_gguf_keeps_4bit_tensors_quantized(tiny_tp8, tmp_path):
    path = convert(tiny_tp8, tmp_path / "m.gguf", GGUFRecipe("q4_k_m", "q4_k_m"))[0]
    w = GGUFWeights(path)
    model = grokquant.load(path)
    assert model.sem.name == "llama.cpp"
    assert isinstance(model.model.layers[0].block_sparse_moe.experts[0].w1, Int4Linear)  # Q4_K
    assert type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear  # Q8_0: dequantized at load
    # The kernels compared under a continuous GELU: llama.cpp's looks its input up in fp16, so the int4
    # kernel's float order (which depends on the CPU's ISA) moves an output by 1e-3 now and then.
    model = grokquant.load(path, semantics="sglang")
    reference = Grok2ForCausalLM.from_checkpoint(w, "sglang")  # every tensor dequantized
    x = tokens(reference.cfg.vocab_size)
    expected = reference(x)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_bitsandbytes_on_the_fly(tiny_tp8):
    bnb = pytest.importorskip("bitsandbytes")
    reference = Grok2ForCausalLM.from_checkpoint(Checkpoint.open(tiny_tp8))
    x = tokens(reference.cfg.vocab_size)
    expected = reference(x)
    for kind, module, bound in (("nf4", bnb.nn.Linear4bit, 0.15), ("int8", bnb.nn.Linear8bitLt, 0.03)):
        model = grokquant.load(tiny_tp8, quantize=kind)
        assert isinstance(model.model.layers[1].block_sparse_moe.experts[7].w3, module)
        assert type(model.lm_head) is torch.nn.Linear
        logits = model(x)
        assert (logits - expected).norm() / expected.norm() < bound


def test_bad_requests(int4_artifact, tiny_tp8, tmp_path):
    with pytest.raises(GrokquantError, match="original checkpoint"):
        grokquant.load(int4_artifact, quantize="nf4")
    with pytest.raises(GrokquantError, match="kernel"):
        grokquant.load(int4_artifact, kernel="fastest")
    with pytest.raises(GrokquantError, match="no such file"):
        grokquant.load(tmp_path / "missing")
    with pytest.raises(GrokquantError, match="memory size"):
        grokquant.load(int4_artifact, device_map="auto", max_memory={"cpu": "lots"})


def test_sampling(int4_artifact):
    model = grokquant.load(int4_artifact)
    prompt = [5, 17, 42, 99]
    greedy = list(sample_iter(model, prompt, 6))
    seq = list(prompt)
    for token in greedy:  # temperature 0 is greedy: each token is the argmax after the ones before
        assert int(model(torch.tensor([seq]))[0, -1].argmax()) == token
        seq.append(token)
    assert list(sample_iter(model, prompt, 6, top_p=1e-6, temperature=1.0)) == greedy  # the nucleus is the argmax
    a = list(sample_iter(model, prompt, 12, temperature=1.5, seed=7))
    assert a == list(sample_iter(model, prompt, 12, temperature=1.5, seed=7)) and a != greedy
    probs = torch.tensor([0.5, 0.3, 0.2]).log()
    draws = {pick_token(probs, 1.0, 0.6, torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {0, 1}  # 0.5 alone is short of 0.6; token 2 is outside the nucleus


def test_run_streams_from_a_gptq_directory(int4_artifact):
    res = CliRunner().invoke(main, ["run", str(int4_artifact), "--prompt", "The quick", "--max-new-tokens", "4",
                                    "--temperature", "0.7", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("The quick") and len(res.output) > len("The quick\n")
    res = CliRunner().invoke(main, ["run", str(int4_artifact), "--prompt", "x", "--top-p", "0"])
    assert res.exit_code == 2 and "top-p" in res.output
