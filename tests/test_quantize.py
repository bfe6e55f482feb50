import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from grokquant.data.documents import calibration_tokens
from grokquant.grok.checkpoint import Checkpoint
from grokquant.errors import GrokquantError
from grokquant.quantize.run import GPTQRecipe, quantize
from grokquant.grok.tokenizer import load_tokenizer
import killed_cli
from test_gptq_format import unpack_v1


@pytest.fixture(scope="module")
def tokens(tiny_tp8):
    return calibration_tokens(load_tokenizer(tiny_tp8 / "tokenizer.tok.json"), "builtin", 1024, 64, seed=1)


@pytest.fixture(scope="module")
def artifact(tiny_tp8, tokens, tmp_path_factory):
    return quantize(tiny_tp8, tmp_path_factory.mktemp("q") / "gptq", GPTQRecipe(), tokens)


def read_all(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def test_artifact_layout_and_unpacking(artifact, tiny_tp8):
    tensors = read_all(artifact)
    cfg = json.loads((artifact / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["quantization_config"]["bits"] == 4
    assert (artifact / "quantize_config.json").exists() and (artifact / "tokenizer.tok.json").exists()
    index = json.loads((artifact / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(tensors)
    prefix = "model.layers.1.block_sparse_moe.experts.6.w2"
    assert {f"{prefix}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")} <= set(tensors)
    assert "model.layers.0.block_sparse_moe.gate.weight" in tensors  # the router stays unquantized
    assert tensors["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.bfloat16
    ckpt = Checkpoint.open(tiny_tp8)
    for base in (prefix, "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        W = ckpt.tensor(base + ".weight").float().numpy()
        parts = {k: tensors[f"{base}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        Wq = unpack_v1(parts, 4, W.shape[1])
        # GPTQ trades weight error for output error; int4 round-to-nearest alone is ~0.1 here
        assert np.linalg.norm(Wq - W) / np.linalg.norm(W) < 0.25


def test_interrupted_run_resumes_to_identical_bytes(artifact, tiny_tp8, tokens, tmp_path):
    out = tmp_path / "resumed"

    def stop_after_first(layer):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_tp8, out, GPTQRecipe(), tokens, on_layer=stop_after_first)
    assert not out.exists() and (tmp_path / ".resumed.partial" / "progress.json").exists()
    done = []
    quantize(tiny_tp8, out, GPTQRecipe(), tokens, on_layer=done.append)
    assert done == [1]  # layer 0 was not redone
    for f in sorted(p.name for p in artifact.iterdir()):
        assert (out / f).read_bytes() == (artifact / f).read_bytes(), f
    with pytest.raises(GrokquantError, match="exists"):
        quantize(tiny_tp8, out, GPTQRecipe(), tokens)


def test_damaged_progress_is_one_line_and_keeps_the_work(tiny_tp8, tokens, tmp_path):
    """A progress.json that is not ours (truncated, garbage) is refused with what to delete; the written
    layers stay. Ours is replaced atomically, so a kill mid-write cannot produce one."""
    out = tmp_path / "x"
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_tp8, out, GPTQRecipe(), tokens, on_layer=lambda l: (_ for _ in ()).throw(KeyboardInterrupt))
    state = tmp_path / ".x.partial" / "progress.json"
    good = state.read_text()
    assert not list(state.parent.glob("progress.tmp"))
    for bad in (good[: len(good) // 2].encode(), b"[1, 2]", b"\xff\xfe"):
        state.write_bytes(bad)
        with pytest.raises(GrokquantError, match="damaged.*delete") as err:
            quantize(tiny_tp8, out, GPTQRecipe(), tokens)
        assert "\n" not in str(err.value) and (state.parent / "model-00001-of-00003.safetensors").exists()
    state.write_text(good)
    done = []
    quantize(tiny_tp8, out, GPTQRecipe(), tokens, on_layer=done.append)
    assert done == [1]  # the restored record resumes


def test_changed_options_restart_from_scratch(tiny_tp8, tokens, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_tp8, out, GPTQRecipe(), tokens, on_layer=lambda l: (_ for _ in ()).throw(KeyboardInterrupt))
    done = []
    quantize(tiny_tp8, out, GPTQRecipe(method="rtn"), tokens, on_layer=done.append)
    assert done == [0, 1]


def test_report_and_sequential_mode(artifact, tiny_tp8, tokens, tmp_path):
    report = {r["class"]: r for r in json.loads((artifact / "quantize_report.json").read_text())}
    assert set(report) == {"attention", "dense_mlp", "experts"}
    for r in report.values():
        assert r["bits"] == 4 and r["error"] < r["rtn_error"]  # GPTQ below round-to-nearest on calibration data
    seq = quantize(tiny_tp8, tmp_path / "seq", GPTQRecipe(sequential=True), tokens)
    same = (seq / "model-00001-of-00003.safetensors").read_bytes() == (artifact / "model-00001-of-00003.safetensors").read_bytes()
    differs = (seq / "model-00002-of-00003.safetensors").read_bytes() != (artifact / "model-00002-of-00003.safetensors").read_bytes()
    assert same and differs  # layer 0 sees the same inputs; layer 1 sees the quantized layer 0's outputs


@pytest.mark.parametrize("policy", ["rtn", "all-tokens", "prior"])
def test_experts_without_tokens_are_never_zeroed(tmp_path, policy):
    """A router that never picks experts 4..7: each policy quantizes them to finite, non-zero weights."""
    from grokquant.quant.gptq import IntQuantConfig, rtn
    from grokquant.grok.synth import random_slice, synth_config, write_checkpoint

    cfg = synth_config("tiny", num_hidden_layers=1)
    base = random_slice(cfg, 0)
    scale = torch.tensor([3, 2, -2, -3, 0.5, 0, -0.5, 0.25])

    def tensors(name, rank):
        t = base(name, rank)
        return (scale[:, None] * t[0].float()[None]).bfloat16() if name.endswith("gate.weight") else t

    ckpt_path = write_checkpoint(tmp_path / "dead", cfg, tensors)
    toks = calibration_tokens(load_tokenizer(ckpt_path / "tokenizer.tok.json"), "builtin", 512, 64)
    out = quantize(ckpt_path, tmp_path / policy, GPTQRecipe(under_covered=policy), toks)
    t = read_all(out)
    report = {r["class"]: r for r in json.loads((out / "quantize_report.json").read_text())}
    assert report["experts"]["min_tokens"] == 0
    ckpt = Checkpoint.open(ckpt_path)
    for e in (4, 5):
        base_name = f"model.layers.0.block_sparse_moe.experts.{e}.w2"
        W = ckpt.tensor(base_name + ".weight").float()
        Wq = torch.from_numpy(unpack_v1({k: t[f"{base_name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")},
                                        4, W.shape[1])).float()
        assert torch.isfinite(Wq).all() and Wq.abs().sum() > 0
        assert (Wq - W).norm() / W.norm() < 0.3
        r = rtn(W[None], IntQuantConfig()).dequantize()[0]
        assert torch.allclose(Wq, r, atol=1e-3) == (policy == "rtn")  # only the rtn policy skips GPTQ


# ---- calibrated GGUF -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_gptq(tiny_tp8, tokens, tmp_path_factory):
    from grokquant.quantize.recipe import load_recipe

    return quantize(tiny_tp8, tmp_path_factory.mktemp("qg") / "tiny-q4_k_m-gptq.gguf", load_recipe("q4_k_m-gptq"),
                    tokens)


def test_gguf_gptq_loads_in_llamacpp_with_our_logits(gguf_gptq, tmp_path):
    """The GPTQ-rounded file is an ordinary Q4_K_M GGUF: llama.cpp computes what our model computes on it,
    within the bound that test_export_gguf.py justifies; one wrong block of weights breaks that bound."""
    from grokquant.gguf.convert import plan
    from grokquant.gguf.file import read_gguf
    from grokquant.gguf.weights import GGUFWeights
    from grokquant.quantize.recipe import GGUFRecipe
    from test_export_gguf import TOKENS, llama_logits, logits_and_bound

    weights = GGUFWeights(gguf_gptq)
    types = {n: i.type.name for f in weights.files for n, i in f.tensors.items()}
    assert types == {t.name: t.type.name for t in plan(weights.config, GGUFRecipe("q4_k_m", "q4_k_m"), True)}
    ours, bound = logits_and_bound(weights, TOKENS)
    assert np.abs(ours - llama_logits(gguf_gptq, TOKENS, tmp_path)).max() < bound

    # the same file with the 4-bit codes of one Q4_K block (256 weights of one row of blk.0.attn_q) redrawn
    info = read_gguf(gguf_gptq).tensors["blk.0.attn_q.weight"]
    assert info.type.name == "Q4_K"
    start = read_gguf(gguf_gptq).data_start + info.offset + 16  # past d, dmin and the 12 bytes of scales
    data = bytearray(gguf_gptq.read_bytes())
    data[start: start + 128] = np.random.default_rng(0).integers(0, 256, 128, dtype=np.uint8).tobytes()
    (tmp_path / "corrupt.gguf").write_bytes(bytes(data))
    assert np.abs(ours - llama_logits(tmp_path / "corrupt.gguf", TOKENS, tmp_path)).max() > bound


def test_gguf_gptq_report_beats_rounding(gguf_gptq):
    from grokquant.quantize.run import read_report

    report = {r["class"]: r for r in read_report(gguf_gptq)}
    assert set(report) == {"attention", "dense_mlp", "experts"}
    for r in report.values():
        # calibration output error, GPTQ vs llama-quantize's rounding: a few % on this random-weight model
        # (near-isotropic inputs; tests/test_gptq_ggml.py measures correlated ones)
        assert r["error"] < 0.985 * r["rtn_error"], r


def test_gguf_imatrix_method_equals_convert_with_our_imatrix(tiny_tp8, tokens, tmp_path):
    """method: imatrix rounds exactly as convert --imatrix (itself byte-identical to llama-quantize)."""
    from grokquant.calibrate.statistics import calibrate
    from grokquant.gguf.convert import convert
    from grokquant.calibrate.imatrix import load_imatrix
    from grokquant.quantize.recipe import GGUFRecipe
    from test_export_quantized import compare_files

    ours = quantize(tiny_tp8, tmp_path / "ours.gguf", GGUFRecipe("q", "q4_k_m", method="imatrix", min_tokens=0),
                    tokens)
    calibrate(tiny_tp8, tmp_path / "stats.safetensors", tokens, imatrix_out=tmp_path / "im.gguf")
    ref = convert(tiny_tp8, tmp_path / "ref.gguf", GGUFRecipe("q4_k_m", "q4_k_m"),
                  imatrix=load_imatrix(tmp_path / "im.gguf"))[0]
    assert compare_files(ours, ref) >= 0.999


def test_gguf_interrupted_run_resumes_to_identical_bytes(gguf_gptq, tiny_tp8, tokens, tmp_path):
    from grokquant.quantize.recipe import load_recipe

    out = tmp_path / "resumed.gguf"
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_tp8, out, load_recipe("q4_k_m-gptq"), tokens,
                 on_layer=lambda l: (_ for _ in ()).throw(KeyboardInterrupt))
    assert not out.exists() and (tmp_path / ".resumed.gguf.partial" / "progress.json").exists()
    done = []
    quantize(tiny_tp8, out, load_recipe("q4_k_m-gptq"), tokens, on_layer=done.append)
    assert done == [1] and out.read_bytes() == gguf_gptq.read_bytes()
    assert not (tmp_path / ".resumed.gguf.partial").exists()


def test_recipes_go_to_the_right_command(tiny_tp8, tokens, tmp_path):
    from grokquant.gguf.convert import convert
    from grokquant.quantize.recipe import load_recipe

    with pytest.raises(GrokquantError, match="grokquant quantize"):
        convert(tiny_tp8, tmp_path / "x.gguf", load_recipe("q4_k_m-imatrix"))
    with pytest.raises(GrokquantError, match="grokquant convert"):
        quantize(tiny_tp8, tmp_path / "y.gguf", load_recipe("q4_k_m"), tokens)
    assert not any(tmp_path.iterdir())


def test_experts_one_at_a_time(artifact, tiny_tp8, tokens, tmp_path):
    """expert_batch=1 holds one expert at a time: the same artifact as the batched pass (up to float
    summation order inside batched GPTQ), and bit-identical for round-to-nearest."""
    rtn_all = quantize(tiny_tp8, tmp_path / "rtn8", GPTQRecipe(method="rtn"), tokens)
    rtn_one = quantize(tiny_tp8, tmp_path / "rtn1", GPTQRecipe(method="rtn"), tokens, expert_batch=1)
    for f in sorted(p.name for p in rtn_all.glob("*.safetensors")):
        assert (rtn_one / f).read_bytes() == (rtn_all / f).read_bytes(), f
    one = read_all(quantize(tiny_tp8, tmp_path / "gptq1", GPTQRecipe(), tokens, expert_batch=1))
    batched = read_all(artifact)
    assert one.keys() == batched.keys()
    same = [torch.equal(one[k], batched[k]) for k in one if k.endswith(".qweight")]
    assert sum(same) / len(same) > 0.5  # most matrices identical; the rest differ in a few rounding decisions
    with pytest.raises(GrokquantError, match="expert batch"):
        quantize(tiny_tp8, tmp_path / "bad", GPTQRecipe(), tokens, expert_batch=9)


# ---- --target-bpw: per-tensor types from the measured sensitivities --------------------------------------

@pytest.fixture(scope="module")
def gguf_target(tiny_tp8, tokens, tmp_path_factory):
    from grokquant.quantize.recipe import load_recipe, with_target_bpw

    recipe = with_target_bpw(load_recipe("q4_k_m-gptq"), 5.0)
    return quantize(tiny_tp8, tmp_path_factory.mktemp("qt") / "tiny-target.gguf", recipe, tokens)


def test_target_bpw_file_fits_and_says_what_it_chose(gguf_target):
    from grokquant.gguf.file import read_gguf
    from grokquant.quantize.run import ALLOCATION_KEY

    f = read_gguf(gguf_target)
    assert 4.8 < f.matrix_bpw() <= 5.0  # the budget is used, not exceeded
    allocation = json.loads(f.metadata[ALLOCATION_KEY])
    assert allocation["target_bpw"] == 5.0
    chosen = {a["tensor"]: a["type"] for a in allocation["tensors"]}
    assert {n: f.tensors[n].type.name for n in chosen} == chosen  # the file holds what the report says
    assert len(set(chosen.values())) >= 3  # a mix fitted to the model, not one type
    assert f.tensors["blk.0.ffn_gate_inp.weight"].type.name == "F32"


def test_target_bpw_file_runs_in_llamacpp_with_our_logits(gguf_target, tmp_path):
    from grokquant.gguf.weights import GGUFWeights
    from test_export_gguf import TOKENS, llama_logits, logits_and_bound

    ours, bound = logits_and_bound(GGUFWeights(gguf_target), TOKENS)
    assert np.abs(ours - llama_logits(gguf_target, TOKENS, tmp_path)).max() < bound


def test_target_bpw_resumes_with_the_same_allocation(gguf_target, tiny_tp8, tokens, tmp_path):
    from grokquant.quantize.recipe import load_recipe, with_target_bpw

    recipe = with_target_bpw(load_recipe("q4_k_m-gptq"), 5.0)
    out = tmp_path / "resumed.gguf"
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_tp8, out, recipe, tokens, on_layer=lambda l: (_ for _ in ()).throw(KeyboardInterrupt))
    assert (tmp_path / ".resumed.gguf.partial" / "allocation.json").exists()
    probes = []
    quantize(tiny_tp8, out, recipe, tokens, on_probe=lambda done, total: probes.append(done))
    assert probes == [] and out.read_bytes() == gguf_target.read_bytes()  # no second measurement


def test_target_bpw_refuses_what_it_cannot_do(tiny_tp8, tokens, tmp_path):
    from grokquant.quantize.recipe import load_recipe, with_target_bpw

    with pytest.raises(GrokquantError, match="GGUF recipes"):
        with_target_bpw(GPTQRecipe(), 4.0)
    with pytest.raises(GrokquantError, match="calibrated method"):
        with_target_bpw(load_recipe("q4_k_m"), 4.0)
    with pytest.raises(GrokquantError, match="below the smallest"):
        quantize(tiny_tp8, tmp_path / "x.gguf", with_target_bpw(load_recipe("q4_k_m-gptq"), 1.5), tokens)  # IQ1_S is 1.5625
    assert list(tmp_path.iterdir()) == []  # refused before any work: no output, no work folder


def test_full_disk_after_finished_layers_keeps_them_and_resumes(tiny_tp8, tokens, artifact, tmp_path, monkeypatch):
    """ENOSPC writing layer 1 (as safetensors' Rust writer reports it): one line saying what was kept, layer
    1's half-written file removed; once there is space the same call resumes to the uninterrupted bytes."""
    import grokquant.io.layer_work as layer_work
    from grokquant.errors import DiskFullError

    real_save = layer_work.save_file

    def full_at_layer_1(tensors, path, metadata=None):
        if "model-00002" in path:
            open(path, "wb").write(b"half")
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(layer_work, "save_file", full_at_layer_1)
    out = tmp_path / "x"
    with pytest.raises(DiskFullError) as err:
        quantize(tiny_tp8, out, GPTQRecipe(), tokens)
    work = tmp_path / ".x.partial"
    assert str(err.value) == (f"no space left on device writing {out}: 1 of 2 layers are kept in {work}; "
                              f"free space and run the same command to resume")
    assert not (work / "model-00002-of-00003.safetensors").exists() and not (tmp_path / ".x.lock").exists()
    monkeypatch.setattr(layer_work, "save_file", real_save)
    done = []
    quantize(tiny_tp8, out, GPTQRecipe(), tokens, on_layer=done.append)
    assert done == [1]
    for f in sorted(p.name for p in artifact.iterdir()):
        assert (out / f).read_bytes() == (artifact / f).read_bytes(), f


@pytest.mark.parametrize("recipe, message", [
    ("experts: {bits: 4, group_size: '128'}", "experts.group_size must be an integer, got '128'"),
    ("experts: {bits: 4, sym: maybe}", "experts.sym must be true or false, got 'maybe'"),
    ("experts: {bits: 4, group_size: -5}", "experts.group_size must be -1 (one group per row) or positive"),
    ("experts: {bits: 4, group_size: 0}", "experts.group_size must be -1 (one group per row) or positive"),
    ("experts: {bits: 4, damp: 2}", "experts.damp must be in [0, 1)"),
    ("experts: {bits: 3}", "experts bits must be 2, 4 or 8"),
    ("min_tokens: lots", "min_tokens must be an integer, got 'lots'"),
    ("sequential: 'no'", "sequential must be true or false"),
    ("experts: {bits: 4, group_size: 7}", "experts group_size 7 does not divide the input width 256"),
])
def test_bad_gptq_recipe_is_one_line_before_any_work(tiny_tp8, tokens, tmp_path, recipe, message):
    from grokquant.quantize.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("format: gptq\n" + recipe + "\n")
    with pytest.raises(GrokquantError) as err:
        quantize(tiny_tp8, tmp_path / "out", load_recipe(path), tokens)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no .partial, no lock


@pytest.mark.parametrize("recipe, message", [
    ("damp: x", "damp must be a number, got 'x'"),
    ("pure: maybe", "pure must be true or false, got 'maybe'"),
    ("refits: 1.5", "refits must be an integer, got 1.5"),
    ("target_bpw: '4'", "target_bpw must be a number, got '4'"),
    ("overrides: [attention]", "overrides is a mapping"),
])
def test_bad_gguf_recipe_is_one_line(tmp_path, recipe, message):
    from grokquant.quantize.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("format: gguf\nftype: q4_k_m\nmethod: gptq\n" + recipe + "\n")
    with pytest.raises(GrokquantError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(path)


def test_batch_sizes_below_one_are_refused(tiny_tp8, tokens, tmp_path):
    with pytest.raises(GrokquantError, match="batch size 0: at least 1"):
        quantize(tiny_tp8, tmp_path / "a", GPTQRecipe(), tokens, batch_size=0)
    with pytest.raises(GrokquantError, match="expert batch 0: between 1 and 8"):
        quantize(tiny_tp8, tmp_path / "a", GPTQRecipe(), tokens, expert_batch=0)
    assert list(tmp_path.iterdir()) == []


# the CLI killed right after the N-th call of one function: `gptq` (mid-layer, before any of the layer is
# kept) or LayerWork.commit (right after a layer's record reached the disk)
KILLED_QUANTIZE = killed_cli.script()
GPTQ, COMMIT = "grokquant.quantize.items:gptq", "grokquant.io.layer_work:LayerWork.commit"


def test_kill_9_at_three_points_then_resume_gives_the_uninterrupted_bytes(tiny_tp8, tmp_path):
    import subprocess
    import sys

    def cli(out, kill=(COMMIT, "0")):
        return subprocess.run([sys.executable, "-c", KILLED_QUANTIZE, *kill, "quantize", str(tiny_tp8), "-o", str(out),
                               "--tokens", "512", "--seq-len", "64", "--device", "cpu"], capture_output=True, text=True)

    clean = cli(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    out, record = tmp_path / "killed", tmp_path / ".killed.partial" / "progress.json"
    # mid-way through layer 0 (its 3rd GPTQ stack); after layer 0; after layer 1, before the artifact is assembled
    for kill, layers_done in (((GPTQ, "3"), 0), ((COMMIT, "1"), 1), ((COMMIT, "1"), 2)):
        killed = cli(out, kill)
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert not out.exists()
        assert (json.loads(record.read_text())["done"] if record.exists() else 0) == layers_done
    done = cli(out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())
    for f in (tmp_path / "clean").iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "killed"]  # work folder and lock gone
