import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from grokquant.cli import main
from grokquant.errors import GrokquantError
from grokquant.gguf.convert import convert as convert_gguf
from grokquant.quantize.recipe import GGUFRecipe
from grokquant.grok.config import GrokConfig


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_reports_exact_counts(tiny_tp8):
    res = invoke("inspect", tiny_tp8, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    cfg = GrokConfig.from_file(tiny_tp8 / "config.json")
    H, V, L, E = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.num_local_experts
    attn = 2 * H * cfg.q_dim + 2 * H * cfg.kv_dim
    dense = 3 * H * cfg.intermediate_size
    expert = 3 * H * cfg.moe_intermediate_size
    total = 2 * V * H + H + L * (attn + dense + E * expert + E * H + 4 * H)
    p = report["parameters"]
    assert p["total"] == total == report["parameters_expected"]
    assert p["experts"] == L * E * expert
    assert p["active_per_token"] == L * (attn + dense + 2 * expert + E * H + 4 * H) + V * H + H
    assert report["problems"] == [] and report["layout"] == "tp8"
    assert report["bytes_by_format"]["bf16"] == 2 * total
    text = invoke("inspect", tiny_tp8)
    assert f"{total:,}" in text.output and "q4_k_m" in text.output and "problems    none" in text.output


def test_inspect_damaged_exits_2_with_one_line(tiny_copy):
    (tiny_copy / "pytorch_model-00008-TP-007.safetensors").unlink()
    proc = subprocess.run([sys.executable, "-m", "grokquant", "inspect", str(tiny_copy)], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "missing rank file pytorch_model-00008-TP-007.safetensors" in proc.stderr
    assert "missing rank file" in proc.stdout  # the report lists every problem


def test_bad_paths_exit_2(tmp_path):
    res = invoke("inspect", tmp_path / "nope")
    assert res.exit_code == 2
    (tmp_path / "empty").mkdir()
    res = invoke("run", tmp_path / "empty", "--prompt", "x")
    assert res.exit_code == 2 and "error:" in res.output


def test_synth_and_run(tmp_path):
    out = tmp_path / "ck"
    res = invoke("synth", out, "--preset", "tiny", "--layers", "1")
    assert res.exit_code == 0, res.output
    assert invoke("synth", out).exit_code == 2  # refuses to overwrite
    res = invoke("run", out, "--prompt", "The quick brown fox", "--max-new-tokens", "5")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("The quick brown fox") and len(res.output) > len("The quick brown fox")
    res = invoke("run", out, "--prompt", "Hello", "--chat", "--max-new-tokens", "3", "--semantics", "llama.cpp")
    assert res.exit_code == 0 and res.output.startswith("Human: Hello<|separator|>\n\nAssistant:")


def test_calibrate_writes_stats_and_imatrix(tiny_tp8, tmp_path):
    out, im = tmp_path / "stats.safetensors", tmp_path / "imatrix.gguf"
    args = ["calibrate", tiny_tp8, "-o", out, "--imatrix", im, "--tokens", 512, "--seq-len", 64, "--min-tokens", 10]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert out.exists() and im.exists()
    assert "tokens per expert" in res.output and "512 tokens (8 x 64)" in res.output
    assert invoke(*args).exit_code == 2  # refuses to overwrite
    res = invoke("convert", tiny_tp8, "-o", tmp_path / "x.gguf", "--type", "q4_k_m", "--imatrix", im)
    assert res.exit_code == 0, res.output


def test_quantize_cli_with_mixed_bits(tiny_tp8, tmp_path):
    out = tmp_path / "gq"
    res = invoke("quantize", tiny_tp8, "-o", out, "--recipe", "gptq-w4g128-experts-w8-attn", "--tokens", 512,
                 "--seq-len", 64)
    assert res.exit_code == 0, res.output
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["bits"] == 4 and qc["dynamic"]["+:.*\\.self_attn\\..*"]["bits"] == 8
    assert invoke("quantize", tiny_tp8, "-o", out, "--tokens", 512, "--seq-len", 64).exit_code == 2
    res = invoke("convert", tiny_tp8, "-o", tmp_path / "x.gguf", "--recipe", "gptq-w4g128")
    assert res.exit_code == 2 and "grokquant quantize" in res.output


def test_quantize_cli_calibrated_gguf(tiny_tp8, tmp_path):
    out = tmp_path / "tiny-q4_k_m-imatrix.gguf"
    res = invoke("quantize", tiny_tp8, "-o", out, "--recipe", "q4_k_m-imatrix", "--tokens", 256, "--seq-len", 64,
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert out.is_file() and "experts" in res.output and "(imatrix, recipe q4_k_m-imatrix" in res.output
    res = invoke("quantize", tiny_tp8, "-o", tmp_path / "y.gguf", "--recipe", "q4_k_m", "--tokens", 256)
    assert res.exit_code == 2 and "grokquant convert" in res.output
    res = invoke("quantize", tiny_tp8, "-o", tmp_path / "z", "--device", "tpu", "--tokens", 256)
    assert res.exit_code == 2 and "--device tpu" in res.output


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_outputs_that_would_destroy_an_input_are_refused(tiny_copy, tmp_path):
    """-o the checkpoint itself, or a folder holding it, with --force: one line, exit 2, every input byte kept
    (quantize used to rmtree the checkpoint); an output of the wrong kind is refused before any work."""
    before = _tree(tiny_copy)
    cases = [("quantize", tiny_copy, "--recipe", "rtn-w4g128"), ("quantize", tmp_path, "--recipe", "rtn-w4g128"),
             ("quantize", tiny_copy, "--recipe", "q4_k_m-imatrix"), ("convert", tiny_copy, "--type", "q8_0"),
             ("convert", tmp_path, "--type", "q8_0")]
    for cmd, out, *rest in cases:
        extra = ["--tokens", 256, "--seq-len", 64] if cmd == "quantize" else []
        res = invoke(cmd, tiny_copy, "-o", out, *rest, *extra, "--force")
        assert res.exit_code == 2, (cmd, out, res.output)
        if cmd == "quantize":  # convert's -o is a file: click refuses a folder itself
            assert res.output.count("\n") == 1 and "the input" in res.output, (cmd, out, res.output)
    assert _tree(tiny_copy) == before
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"keep")
    res = invoke("quantize", tiny_copy, "-o", a_file, "--recipe", "rtn-w4g128", "--tokens", 256, "--seq-len", 64,
                 "--force")
    assert res.exit_code == 2 and "is a file" in res.output and a_file.read_bytes() == b"keep"
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    with pytest.raises(GrokquantError, match="is a folder"):  # the library's own check, below click's
        convert_gguf(tiny_copy, folder, GGUFRecipe("q8_0", "q8_0"), force=True)
    with pytest.raises(GrokquantError, match="the input"):
        convert_gguf(tiny_copy, tiny_copy, GGUFRecipe("q8_0", "q8_0"), force=True)
    assert folder.is_dir() and _tree(tiny_copy) == before


BAD_VALUES = [
    (["run", "{ckpt}", "--prompt", ""], "the prompt is empty"),
    (["run", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "-1"], "'--max-new-tokens': -1 is not in the range x>=0"),
    (["run", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "200000"], "the model's context of 131072 tokens"),
    (["run", "{ckpt}", "--prompt", "hi", "--gpu-memory", "abc"], "cannot parse memory size 'abc'"),
    (["run", "{ckpt}", "--prompt", "hi", "--temperature", "nan"], "temperature must be >= 0"),
    (["plan", "--context", "-1"], "'--context': -1 is not in the range x>=0"),
    (["plan", "--gpus", "-1"], "'--gpus': -1 is not in the range x>=0"),
    (["quantize", "{ckpt}", "-o", "{out}/q", "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
    (["quantize", "{ckpt}", "-o", "{out}/q", "--expert-batch", "0"], "'--expert-batch': 0 is not in the range x>=1"),
    (["quantize", "{ckpt}", "-o", "{out}/q", "--expert-batch", "9", "--tokens", "128", "--seq-len", "64"],
     "expert batch 9: between 1 and 8"),
    (["calibrate", "{ckpt}", "-o", "{out}/c.safetensors", "--batch-size", "0"], "'--batch-size': 0 is not in the range"),
    (["calibrate", "{ckpt}", "-o", "{out}/c.safetensors", "--tokens", "0"], "'--tokens': 0 is not in the range"),
    (["eval", "{ckpt}", "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
    (["calibrate", "{ckpt}", "-o", "{out}/c.safetensors", "--imatrix", "{out}/c.safetensors", "--tokens", "128",
      "--seq-len", "64"], "is the statistics output"),
    (["convert", "{ckpt}", "-o", "{out}/a.gguf", "--type", "q8_0", "--split-max-size", "0"], "at least 1M"),
    (["convert", "{ckpt}", "-o", "{out}/a.gguf", "--type", "q8_0", "--split-max-size", "1"], "at least 1M"),
    (["quantize", "{ckpt}", "-o", "{out}/q", "--calibration", "x"], "No such option '--calibration'"),
]


@pytest.mark.parametrize("args, message", BAD_VALUES, ids=[" ".join(a[:1] + a[2:5:2]) for a, _ in BAD_VALUES])
def test_bad_values_are_one_line_exit_2_and_write_nothing(tiny_tp8, tmp_path, args, message):
    res = CliRunner().invoke(main, [a.format(ckpt=tiny_tp8, out=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and message in res.stderr, res.stderr
    assert res.stdout == "" and list(tmp_path.iterdir()) == []
