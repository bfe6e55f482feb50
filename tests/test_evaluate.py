import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from grokquant.grok.checkpoint import Checkpoint
from grokquant.data.corpus import split_documents
from grokquant.cli import main
from grokquant.evaluate.engines import open_artifact, scored_logits
from grokquant.evaluate.metrics import DEFAULT_TOP_K, Baseline, BaselineLogits, mean_and_se, percentile, score_pass
from grokquant.evaluate.run import evaluate, run_eval
from grokquant.evaluate.windows import Windows, document_tokens, evaluation_tokens, make_windows
from grokquant.gguf.convert import convert
from grokquant.quantize.run import quantize
from grokquant.quantize.recipe import GGUFRecipe, load_recipe
from grokquant.grok.tokenizer import load_tokenizer

FIXTURE = Path(__file__).parent / "data" / "grok2-trained"
CTX, CHUNKS = 256, 16  # 16 windows, 2032 scored held-out tokens


# ---- windows and statistics --------------------------------------------------------------------------

def test_windows_score_like_llama_perplexity():
    ids = torch.arange(100)
    w = make_windows(ids, ctx=16)  # llama-perplexity: logits 8..14 predict tokens 9..15 of each chunk
    assert w.tokens.shape == (6, 16) and w.n_score == 7
    assert w.logit_span == slice(8, 15)
    assert w.targets()[0].tolist() == list(range(9, 16)) and w.targets()[1, 0] == 25
    tiled = make_windows(ids, ctx=16, stride=4)  # smaller strides: the scored tails tile the text
    scored = tiled.targets().reshape(-1).tolist()
    assert scored == list(range(12, 12 + len(scored)))
    assert len(make_windows(ids, ctx=16, max_windows=2).tokens) == 2


def test_artifacts_are_recognised_or_refused(tmp_path):
    from grokquant.errors import GrokquantError

    art = open_artifact(FIXTURE)
    assert (art.kind, art.semantics) == ("checkpoint", "sglang")
    (tmp_path / "notes.txt").write_text("x")
    for path, engine, message in ((tmp_path / "missing", "torch", "no such file"),
                                  (tmp_path / "notes.txt", "torch", "expected a .gguf"),
                                  (FIXTURE, "llama.cpp", "GGUF files only"), (FIXTURE, "onnx", "unknown engine")):
        with pytest.raises(GrokquantError, match=message):
            open_artifact(path, engine)


def test_windows_refuse_short_text():
    with pytest.raises(Exception, match="fewer than one window"):
        make_windows(torch.arange(10), ctx=16)


def test_statistics_use_llama_perplexity_formulas():
    x = torch.tensor([0.5, 1.5, 2.0, 4.0, 7.0, 1.0, 0.0, 3.0, 2.5, 9.0, 4.5])
    mean, se = mean_and_se(x)
    n = len(x)
    assert mean == pytest.approx(x.double().mean().item())
    assert se == pytest.approx(math.sqrt(((x.double() ** 2).mean() - x.double().mean() ** 2).item() / (n - 1)))
    v = x.sort().values
    assert percentile(v, 0.5) == pytest.approx(float(np.percentile(x.numpy(), 50)))
    assert percentile(v, 0.99) == pytest.approx(float(np.percentile(x.numpy(), 99)), rel=1e-6)


def _fake_pass(logits: torch.Tensor, windows: Windows, base=None, k=None):
    return score_pass(iter([logits]), windows, base, compress_k=k)


def test_kld_exact_with_full_vocab_and_a_lower_bound_with_top_k():
    torch.manual_seed(0)
    V, n = 300, 40
    windows = Windows(torch.randint(0, V, (1, 2 * n + 2)), 2 * n + 2, n)
    p_logits = torch.randn(1, n, V) * 3
    q_logits = p_logits + 0.3 * torch.randn(1, n, V)
    exact = torch.nn.functional.kl_div(q_logits.double().log_softmax(-1), p_logits.double().log_softmax(-1),
                                       log_target=True, reduction="none").sum(-1).reshape(-1)
    full = _fake_pass(p_logits, windows, k=V).baseline()
    assert torch.allclose(_fake_pass(q_logits, windows, full).cat("kld"), exact, atol=1e-6)
    top = _fake_pass(p_logits, windows, k=16).baseline()
    approx = _fake_pass(q_logits, windows, top).cat("kld")
    assert (approx <= exact + 1e-9).all() and approx.mean() > 0.5 * exact.mean()
    # the rest mass keeps the target's probability exact even when it is outside the top k
    nll = _fake_pass(q_logits, windows, top).cat("nll")
    assert torch.allclose(nll, -q_logits.double().log_softmax(-1).reshape(n, V).gather(1, windows.targets().T)[:, 0])


def test_identical_artifacts_agree_perfectly():
    torch.manual_seed(1)
    windows = Windows(torch.randint(0, 50, (1, 20)), 20, 9)
    logits = torch.randn(1, 9, 50)
    base = _fake_pass(logits, windows, k=8).baseline()
    s = _fake_pass(logits, windows, base)
    # the baseline is stored in float32: agreement to its rounding
    assert s.cat("kld").abs().max() < 1e-6 and s.cat("same_top").all() and s.cat("dp").abs().max() < 1e-6


# ---- the trained fixture and its artifacts -------------------------------------------------------------

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """bf16 fixture, three GGUF mixes, GPTQ and RTN w4g128 (calibrated on training text only)."""
    out = tmp_path_factory.mktemp("artifacts")
    paths = {"bf16": FIXTURE}
    for ftype in ("f32", "q8_0", "q4_k_m", "q2_k"):
        (paths[ftype],) = convert(FIXTURE, out / f"grok2-trained-{ftype}.gguf", GGUFRecipe(name=ftype, ftype=ftype))
    tok = load_tokenizer(FIXTURE / "tokenizer.tok.json")
    calib = document_tokens(tok, split_documents("train"))[: 32 * 256].view(32, 256)
    for recipe in ("gptq-w4g128", "rtn-w4g128"):
        paths[recipe] = quantize(FIXTURE, out / f"grok2-trained-{recipe}", load_recipe(recipe), calib)
    return paths


@pytest.fixture(scope="module")
def windows():
    tok = load_tokenizer(FIXTURE / "tokenizer.tok.json")
    return make_windows(evaluation_tokens(tok, "builtin"), CTX, max_windows=CHUNKS)


def truncate(b: BaselineLogits, k: int) -> BaselineLogits:
    """The top-k compression of a baseline kept whole (k = vocabulary)."""
    rest = torch.logaddexp(b.rest_logp.double(), b.top_logp[:, k:].double().logsumexp(1)).float()
    return BaselineLogits(b.top_ids[:, :k], b.top_logp[:, :k], rest, b.target_logp)


@pytest.fixture(scope="module")
def exact_baseline(windows) -> Baseline:
    """The fixture's log-probabilities over the whole vocabulary, in both semantics."""
    base = Baseline(windows, 512, "bf16", artifact=open_artifact(FIXTURE))
    for sem in ("sglang", "llama.cpp"):
        base.for_semantics(sem)
    return base


@pytest.fixture(scope="module")
def results(artifacts, windows, exact_baseline) -> dict[str, dict]:
    arts = [open_artifact(artifacts[k]) for k in ("bf16", "q8_0", "q4_k_m", "q2_k", "gptq-w4g128", "rtn-w4g128")]
    arts.append(open_artifact(artifacts["q4_k_m"], "llama.cpp"))
    top_k = {sem: truncate(b, DEFAULT_TOP_K) for sem, b in exact_baseline.logits.items()}
    baseline = Baseline(windows, DEFAULT_TOP_K, "bf16", top_k, open_artifact(FIXTURE), exact_baseline.scores)
    rows = evaluate(arts, windows, baseline)
    keys = ["bf16", "q8_0", "q4_k_m", "q2_k", "gptq-w4g128", "rtn-w4g128", "q4_k_m@llama.cpp"]
    return dict(zip(keys, rows))


def test_fixture_is_a_trained_model(results):
    record = json.loads((FIXTURE / "training.json").read_text())
    assert Checkpoint.open(FIXTURE).layout == "tp8"
    assert results["bf16"]["ppl"] < record["unigram_ppl"] / 3  # far better than token frequencies
    for share in record["expert_share"]:
        assert min(share) > 0.02  # every expert is used


def test_quality_ordering_on_the_fixture(results):
    kld = {k: r["kld"] for k, r in results.items()}
    assert kld["bf16"] == 0 and results["bf16"]["top1"] == 1
    assert kld["q8_0"] < kld["q4_k_m"] / 3 and kld["q8_0"] < kld["gptq-w4g128"] / 3
    assert 1 / 3 < kld["q4_k_m"] / kld["gptq-w4g128"] < 3  # q4_k_m ≈ gptq-w4g128
    assert max(kld["q4_k_m"], kld["gptq-w4g128"]) * 3 < kld["q2_k"]
    assert kld["gptq-w4g128"] < kld["rtn-w4g128"]  # error feedback beats round-to-nearest
    q2 = results["q2_k"]  # perplexity clearly above bf16's (paired over tokens)
    assert q2["ppl"] > q2["ppl_base"] and q2["ln_ppl_ratio"] > 5 * q2["ln_ppl_ratio_se"]
    assert results["q8_0"]["top1"] > results["q4_k_m"]["top1"] > results["q2_k"]["top1"]


def test_gguf_perplexity_equals_llamacpp(results, artifacts, windows):
    # f32: the same logits up to float summation order, so the same perplexity
    f32 = [score_pass(scored_logits(open_artifact(artifacts["f32"], engine), windows), windows).cat("nll")
           for engine in ("torch", "llama.cpp")]
    assert math.exp(f32[0].mean()) == pytest.approx(math.exp(f32[1].mean()), rel=1e-5)
    # quantized: ggml rounds activations too, and single roundings flip with summation order (a few
    # tokens per thousand), so agreement is to a few 1e-4 (3e-5 on the whole held-out split)
    ours, theirs = results["q4_k_m"], results["q4_k_m@llama.cpp"]
    assert theirs["engine"] == "llama.cpp" and theirs["tokens"] == ours["tokens"]
    assert ours["ppl"] == pytest.approx(theirs["ppl"], rel=2e-3)
    assert ours["kld"] == pytest.approx(theirs["kld"], rel=0.05)


def test_top_k_compression_is_close_to_exact(artifacts, windows, exact_baseline):
    art = open_artifact(artifacts["q2_k"])
    logits = list(scored_logits(art, windows))
    exact_base = exact_baseline.logits[art.semantics]
    exact = score_pass(iter(logits), windows, exact_base).cat("kld")
    for k, fraction in ((64, 0.9), (DEFAULT_TOP_K, 0.99)):  # a lower bound, tighter as k grows
        approx = score_pass(iter(logits), windows, truncate(exact_base, k)).cat("kld")
        assert (approx <= exact + 1e-9).all()
        assert approx.mean() > fraction * exact.mean()


# ---- CLI: table, JSON, saved baseline ------------------------------------------------------------------

def test_cli_table_json_and_saved_baseline(artifacts, tmp_path):
    runner = CliRunner()
    common = ["--ctx", "128", "--chunks", "4"]
    saved = tmp_path / "base.safetensors"
    r = runner.invoke(main, ["eval", str(artifacts["gptq-w4g128"]), "--baseline", str(FIXTURE),
                             "--save-baseline", str(saved), "--json", *common])
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)
    assert first["baseline"] == FIXTURE.name and first["results"][0]["kind"] == "gptq"
    r = runner.invoke(main, ["eval", str(artifacts["gptq-w4g128"]), str(artifacts["q8_0"]), "--baseline", str(saved),
                             *common])
    assert r.exit_code == 0, r.output
    assert "mean KLD" in r.stdout and "grok2-trained-q8_0.gguf" in r.stdout
    again = run_eval([artifacts["gptq-w4g128"]], ctx=128, chunks=4, baseline=saved)[0][0]
    assert again["kld"] == pytest.approx(first["results"][0]["kld"], rel=1e-6)
    # the saved logits hold both semantics (a GGUF above needed no baseline model), for these windows only
    r = runner.invoke(main, ["eval", str(artifacts["q8_0"]), "--baseline", str(saved), "--ctx", "128", "--chunks", "3"])
    assert r.exit_code == 2 and r.output.startswith("error:") and "other windows" in r.output
    # a baseline can be saved with nothing else to evaluate
    r = runner.invoke(main, ["eval", "--baseline", str(FIXTURE), "--save-baseline", str(tmp_path / "only.safetensors"),
                             "--ctx", "64", "--chunks", "1"])
    assert r.exit_code == 0, r.output
    assert set(Baseline.load(tmp_path / "only.safetensors").logits) == {"sglang", "llama.cpp"}


def test_cli_errors_are_one_line(artifacts, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["eval", str(tmp_path)])  # an empty directory
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error:")
    r = runner.invoke(main, ["eval", str(FIXTURE), "--save-baseline", str(tmp_path / "b.safetensors")])
    assert r.exit_code == 2 and "--save-baseline needs --baseline" in r.output
    # an existing file is never overwritten without --force, checked before any work
    kept = tmp_path / "kept.safetensors"
    kept.write_bytes(b"earlier output")
    r = runner.invoke(main, ["eval", "--baseline", str(FIXTURE), "--save-baseline", str(kept), "--ctx", "64",
                             "--chunks", "1"])
    assert r.exit_code == 2 and "exists (use --force" in r.output and kept.read_bytes() == b"earlier output"
    for flag in ("--stride", "--chunks", "--batch-size", "--ctx"):
        r = runner.invoke(main, ["eval", str(FIXTURE), flag, "0"])
        assert r.exit_code == 2 and r.output.count("\n") == 1 and f"'{flag}': 0 is not in the range x>=1" in r.output
    # a file llama.cpp cannot load fails in the child process, not in ours
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(artifacts["q8_0"].read_bytes()[:-4096])
    r = runner.invoke(main, ["eval", str(cut), "--engine", "llama.cpp", "--ctx", "64", "--chunks", "1"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("error:") and "llama.cpp" in r.output


def test_plot_or_clear_error(artifacts, tmp_path):
    import importlib.util

    out = tmp_path / "q.png"
    r = CliRunner().invoke(main, ["eval", str(artifacts["q8_0"]), "--baseline", str(FIXTURE), "--ctx", "64",
                                  "--chunks", "2", "--plot", str(out)])
    if importlib.util.find_spec("matplotlib") is None:
        assert r.exit_code == 2 and "needs matplotlib" in r.output
    else:
        assert r.exit_code == 0, r.output
        assert out.read_bytes()[:4] == b"\x89PNG"
