"""GGUF export, checked against llama.cpp itself (llama-cpp-python, run in child processes)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from grokquant.errors import GrokquantError
from grokquant.gguf.convert import convert, plan, validate
from grokquant.gguf.file import read_gguf
from grokquant.gguf.weights import GGUFWeights
from grokquant.grok.model import Grok2ForCausalLM
from grokquant.quantize.recipe import GGUFRecipe, load_recipe
from grokquant.grok.tokenizer import format_chat, load_tokenizer

RUNNER = str(Path(__file__).with_name("llama_runner.py"))
TOKENS = [5, 77, 300, 12, 9, 401, 2, 33, 150, 151, 260, 7]


def llama(cmd, *args):
    proc = subprocess.run([sys.executable, RUNNER, cmd, *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def llama_logits(path, tokens, tmp_path):
    tj, out = tmp_path / "tokens.json", tmp_path / "logits.npy"
    tj.write_text(json.dumps(tokens))
    llama("logits", path, tj, out)
    return np.load(out)


# How closely llama.cpp can agree with our model on a GGUF's dequantized weights, on any x86-64 build.
# GGUFWeights.model() rounds each product's activations exactly as ggml's CPU backend does (Q8_0 / Q8_K
# blocks, bf16, fp16: quant/activations.py), with RMSNorm and the GELU table in ggml's operation order
# (model.py). What is left is the float32 summation order inside ggml's kernels, which changes with the
# SIMD width llama.cpp was built for (AVX2, AVX-512, VNNI): about 1e-6 on these logits. That order
# decides an activation's last ulp, and where an activation sits on a rounding tie (they are frequent
# where quantized embeddings meet bf16 norm weights, and occur anywhere now and then) the two engines
# pick neighbouring codes. Such a flip moves one activation by one step and can move later roundings
# with it: measured on AVX2, AVX-512 and AVX-512-VNNI/BF16 builds it stays within 1.1x of the effect
# that rounding the activations has on the logits at all (our model with it minus without it), hence
# 2x that effect. A wrong block of weights moves logits by several times as much
# (test_quantize.py::test_gguf_gptq_loads_in_llamacpp_with_our_logits corrupts one and checks).
FLOAT_ORDER = 1e-4


def logits_and_bound(weights: GGUFWeights, tokens) -> tuple[np.ndarray, float]:
    """Our logits on a GGUF, and the bound on their distance from llama.cpp's (see above)."""
    x = torch.tensor(tokens)
    ours = weights.model()(x)[0].numpy()
    unrounded = Grok2ForCausalLM.from_checkpoint(weights, weights.semantics)(x)[0].numpy()
    return ours, max(FLOAT_ORDER, 2 * float(np.abs(ours - unrounded).max()))


def our_logits(source, semantics, tokens):
    return Grok2ForCausalLM.from_checkpoint(source, semantics)(torch.tensor(tokens))[0].numpy()


@pytest.fixture(scope="module")
def f32_gguf(tiny_tp8, tmp_path_factory):
    return convert(tiny_tp8, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", GGUFRecipe("f32", "f32"))[0]


def test_f32_logits_match_llamacpp(tiny_tp8, f32_gguf, tmp_path):
    from grokquant.grok.checkpoint import Checkpoint

    ref = llama_logits(f32_gguf, TOKENS, tmp_path)
    ckpt = Checkpoint.open(tiny_tp8)
    ours = our_logits(ckpt, "llama.cpp", TOKENS)
    assert np.abs(ours - ref).max() < 1e-3
    # the reference runtime's semantics differ measurably, and plain RoPE is the closer choice
    sglang = our_logits(ckpt, "sglang", TOKENS)
    yarn_path = convert(tiny_tp8, tmp_path / "yarn.gguf", GGUFRecipe("f32", "f32"), rope="yarn")[0]
    yarn_ref = llama_logits(yarn_path, TOKENS, tmp_path)
    assert np.abs(our_logits(ckpt, "llama.cpp-yarn", TOKENS) - yarn_ref).max() < 1e-3
    assert np.abs(sglang - ref).mean() < np.abs(sglang - yarn_ref).mean()


def test_f16_logits(tiny_tp8, tmp_path):
    path = convert(tiny_tp8, tmp_path / "t-f16.gguf", GGUFRecipe("f16", "f16"))[0]
    ours, bound = logits_and_bound(GGUFWeights(path), TOKENS)
    assert np.abs(ours - llama_logits(path, TOKENS, tmp_path)).max() < bound


def test_metadata_and_tensor_list(f32_gguf, tiny_tp8):
    f = read_gguf(f32_gguf)
    meta = f.metadata
    assert meta["general.architecture"] == "grok"
    assert meta["grok.expert_count"] == 8 and meta["grok.expert_used_count"] == 2
    assert meta["grok.final_logit_softcapping"] == 50.0
    cfg = GGUFWeights(f32_gguf).config
    assert abs(meta["grok.embedding_scale"] - json.loads((tiny_tp8 / "config.json").read_text())[
        "embedding_multiplier_scale"]) < 1e-5
    assert "grok.rope.scaling.type" not in meta
    assert meta["tokenizer.ggml.pre"] == "grok-2" and meta["tokenizer.ggml.eos_token_id"] == 2
    assert len(meta["tokenizer.ggml.tokens"]) == 512
    assert len(f.tensors) == 3 + 15 * cfg.num_hidden_layers
    assert f.tensors["blk.1.ffn_down_exps.weight"].shape == (8, 256, 512)
    assert f.tensors["blk.0.ffn_gate_inp.weight"].type.name == "F32"


SAMPLES = ["Hello, world! The quick brown fox.", "Digits 3.14159 and 2026-11-28", "  spaces\n\n\ttabs\r\n",
           "Ünïcödé naïve café 日本語 русский 🚀", "I'm sure they'll say it's fine; WE'VE DONE IT.",
           "def f(x):\n    return {'a': [1, 2]}\n", "Human: hi<|separator|>\n\nAssistant:"]


def test_tokenization_matches_llamacpp(f32_gguf, tiny_tp8, tmp_path):
    tok = load_tokenizer(tiny_tp8 / "tokenizer.tok.json")
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(SAMPLES))
    out = tmp_path / "ids.json"
    llama("tokenize", f32_gguf, texts, out)
    assert json.loads(out.read_text()) == [tok.encode(t) for t in SAMPLES]


def test_chat_template_recognised_by_llamacpp(f32_gguf, tmp_path):
    msgs = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi there?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More"}]
    (tmp_path / "m.json").write_text(json.dumps(msgs))
    llama("chat", f32_gguf, tmp_path / "m.json", tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["text"] == format_chat(msgs)


def test_split_files_load_in_llamacpp(tiny_tp8, f32_gguf, tmp_path):
    paths = convert(tiny_tp8, tmp_path / "split.gguf", GGUFRecipe("f32", "f32"), split_max_bytes=4_000_000)
    assert len(paths) > 2 and paths[0].name == f"split-00001-of-{len(paths):05d}.gguf"
    assert np.array_equal(llama_logits(paths[0], TOKENS, tmp_path), llama_logits(f32_gguf, TOKENS, tmp_path))


def test_refuses_overwrite_and_cleans_up_on_interrupt(tiny_tp8, tmp_path):
    out = tmp_path / "x.gguf"
    convert(tiny_tp8, out, GGUFRecipe("f16", "f16"))
    with pytest.raises(GrokquantError, match="exists"):
        convert(tiny_tp8, out, GGUFRecipe("f16", "f16"))
    out2 = tmp_path / "y.gguf"

    def interrupt(t, n):
        if t.name == "blk.0.ffn_up_exps.weight":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_tp8, out2, GGUFRecipe("f16", "f16"), progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]


def test_terminated_process_says_so_and_leaves_no_output(wide_tp8, tmp_path):
    out = tmp_path / "k.gguf"
    # q4_k_m: seconds of quantizing after the temporary appears (f16 can finish before the signal lands)
    proc = subprocess.Popen([sys.executable, "-m", "grokquant", "convert", str(wide_tp8), "-o", str(out),
                             "--type", "q4_k_m"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / ".k.gguf.incomplete").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.terminate()  # mid-write: the temporary file exists, the output does not yet
    _, err = proc.communicate()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing recorded yet: nothing kept


def test_validate_rejects_non_finite_scales(tiny_tp8, f32_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    data = bytearray(f32_gguf.read_bytes())
    f = read_gguf(f32_gguf)
    info = f.tensors["blk.0.attn_q.weight"]
    data[f.data_start + info.offset: f.data_start + info.offset + 4] = np.float32(np.nan).tobytes()
    bad.write_bytes(bytes(data))
    from grokquant.grok.checkpoint import Checkpoint
    with pytest.raises(GrokquantError, match="non-finite"):
        validate(bad, plan(Checkpoint.open(tiny_tp8).config, GGUFRecipe("f32", "f32")))


def test_recipes_load_and_override():
    rec = load_recipe("q4_k_m-attn-q8")
    assert rec.ftype == "q4_k_m" and rec.override_for("blk.3.attn_q.weight") == "Q8_0"
    assert rec.override_for("blk.3.ffn_up_exps.weight") is None
    for name in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs"):
        assert load_recipe(name).ftype == name
    with pytest.raises(GrokquantError, match="unknown tensor class"):
        GGUFRecipe("x", "q4_k_m", {"routers": "Q8_0"})


def test_leftovers_without_a_record_are_removed_by_the_next_convert(wide_tp8, tmp_path):
    """kill -9 before the first record (RECORD_BYTES of output) leaves `.NAME.incomplete` with nothing to
    resume: the next convert removes it, saying so, with a `.NAME.tmp-PID` of an older version, and
    writes the same bytes as an uninterrupted run."""
    out = tmp_path / "out.gguf"
    cmd = [sys.executable, "-m", "grokquant", "convert", str(wide_tp8), "-o", str(out), "--type", "q4_k_m"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / ".out.gguf.incomplete"
    deadline = time.time() + 120
    while not (partial.exists() and partial.stat().st_size > 100_000) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert partial.exists() and not out.exists(), "the run ended before it could be interrupted"
    legacy = tmp_path / ".out.gguf.tmp-4242"
    legacy.write_bytes(b"x")

    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"removed {partial}" in done.stderr and "no record of finished work" in done.stderr
    assert f"removed {legacy}" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
    clean = tmp_path.parent / f"{tmp_path.name}-clean.gguf"
    convert(wide_tp8, clean, GGUFRecipe("q4_k_m", "q4_k_m"))
    assert clean.read_bytes() == out.read_bytes()
    clean.unlink()


def _gguf_header(kvs=b"", n_kv=0, tensors=b"", n_tensors=0, pad=64):
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors + b"\0" * pad


def _gguf_string(s: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(s)) + s


def _hostile_headers():
    import struct

    t = lambda name, dims, type_id=0, offset=0: (_gguf_string(name) + struct.pack("<I", len(dims))
                                                  + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id, offset))
    return {
        "n_dims 2^31": (_gguf_header(tensors=_gguf_string(b"x") + struct.pack("<I", 2**31), n_tensors=1),
                        "2147483648 dimensions"),
        "string of 2^62 bytes": (_gguf_header(kvs=struct.pack("<Q", 2**62), n_kv=1), "string length"),
        "array of 2^60 floats": (_gguf_header(kvs=_gguf_string(b"k") + struct.pack("<IIQ", 9, 6, 2**60), n_kv=1),
                                 "array length"),
        "array of 2^60 strings": (_gguf_header(kvs=_gguf_string(b"k") + struct.pack("<IIQ", 9, 8, 2**60), n_kv=1),
                                  "array length"),
        "2^60 keys": (_gguf_header(n_kv=2**60), "key count"),
        "2^60 tensors": (_gguf_header(n_tensors=2**60), "tensor count"),
        "tensor larger than the file": (_gguf_header(tensors=t(b"w", [2**20, 2**20]), n_tensors=1),
                                        "cannot be F32 data"),
        "row not a whole block": (_gguf_header(tensors=t(b"w", [33, 2], type_id=8), n_tensors=1),
                                  "cannot be Q8_0 data"),
        "tensor twice": (_gguf_header(tensors=t(b"w", [4]) * 2, n_tensors=2), "tensor w twice"),
        "alignment 0": (_gguf_header(kvs=_gguf_string(b"general.alignment") + struct.pack("<II", 4, 0), n_kv=1),
                        "not a power of two"),
        "unknown type": (_gguf_header(tensors=t(b"w", [4], type_id=999), n_tensors=1), "unsupported ggml type"),
        "truncated": (_gguf_header(kvs=_gguf_string(b"k") + struct.pack("<I", 4), n_kv=1, pad=0), "truncated"),
    }


@pytest.mark.parametrize("case", list(_hostile_headers()))
def test_hostile_gguf_headers_are_one_line_errors(tmp_path, case):
    """Counts and lengths in a header are checked against the file's size before anything is allocated
    for them: a corrupt or hostile file is refused at once, never a MemoryError or an endless loop."""
    data, message = _hostile_headers()[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GrokquantError, match=message) as err:
        read_gguf(path)
    assert "\n" not in str(err.value)


def test_hostile_gguf_through_run_and_eval_exits_2(tmp_path):
    data, message = _hostile_headers()["n_dims 2^31"]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    for args in (["run", path, "--prompt", "hi"], ["eval", path, "--chunks", 1]):
        proc = subprocess.run([sys.executable, "-m", "grokquant", *map(str, args)], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
