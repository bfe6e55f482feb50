"""eval resumes (evaluate/resume.py): killed with SIGKILL at several points, each re-run goes on from the
last save and the last one prints the numbers of an uninterrupted run; the work folder is gone after."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grokquant.evaluate.engines as engines
from grokquant.data.corpus import builtin_text
from grokquant.evaluate.report import to_json
from grokquant.evaluate.run import run_eval
from grokquant.gguf.convert import convert
from grokquant.quantize.recipe import GGUFRecipe, load_recipe
from grokquant.quantize.run import quantize

import killed_cli

# the CLI with a save after every batch of windows (or layer, when streaming), killed right after the
# N-th save reaches the disk
KILLED_CLI = killed_cli.script("""
import grokquant.evaluate.engines as engines
import grokquant.evaluate.resume as resume
resume.SAVE_SECONDS = 0
if sys.argv.pop(1) == "streamed":
    engines.WHOLE_MODEL_BYTES = 0  # the checkpoint and the GPTQ artifact go through a layer at a time
""")
COMMIT = "grokquant.evaluate.resume:EvalWork.commit"


OPTIONS = dict(ctx=64, chunks=8, batch_size=2)  # 4 batches of windows per pass


@pytest.fixture(scope="module")
def artifacts(tiny_tp8, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    convert(tiny_tp8, out / "q4.gguf", GGUFRecipe("q4_k_m", "q4_k_m"))
    quantize(tiny_tp8, out / "gptq", load_recipe("rtn-w4g128"), torch.zeros(1, 8, dtype=torch.long))
    (out / "text.txt").write_text(builtin_text("heldout", 20_000))  # tokenized faster than the whole split
    return out


def killed_eval(args, kill_at: int, mode: str, cache: Path) -> subprocess.CompletedProcess:
    options = [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items()]
    return subprocess.run([sys.executable, "-c", KILLED_CLI, COMMIT, str(kill_at), mode, "eval", *map(str, args), *options,
                           "--json"], capture_output=True, text=True, env={**os.environ, "GROKQUANT_CACHE": str(cache)})


@pytest.mark.parametrize("mode, artifact, kills", [
    ("whole", "q4.gguf", [2, 3]),  # half the baseline's windows; the rest of it, then killed as it completes
    ("streamed", "gptq", [1, 3]),  # after the baseline's first layer; mid-way through the artifact's layers
])
def test_kill_9_then_resume_prints_the_uninterrupted_numbers(tiny_tp8, artifacts, tmp_path, monkeypatch, mode,
                                                              artifact, kills):
    art, data = artifacts / artifact, artifacts / "text.txt"
    if mode == "streamed":
        monkeypatch.setattr(engines, "WHOLE_MODEL_BYTES", 0)
    monkeypatch.setenv("GROKQUANT_CACHE", str(tmp_path / "clean-cache"))
    results, _ = run_eval([art], data, baseline=tiny_tp8, **OPTIONS)
    clean = json.loads(json.dumps(to_json(results)))
    cache = tmp_path / "cache"
    for n in kills:
        killed = killed_eval([art, "--baseline", tiny_tp8, "--data", data], n, mode, cache)
        assert killed.returncode == -9, killed.stderr[-2000:]
    done = killed_eval([art, "--baseline", tiny_tp8, "--data", data], 0, mode, cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming an interrupted evaluation" in done.stderr
    assert json.loads(done.stdout)["results"] == clean
    assert list(cache.iterdir()) == []  # the work folder and its lock are gone


def test_leftovers_without_a_record_are_removed_and_a_damaged_record_is_refused(tmp_path, monkeypatch):
    from grokquant.errors import GrokquantError
    from grokquant.evaluate.resume import EvalWork, resumable

    monkeypatch.setenv("GROKQUANT_CACHE", str(tmp_path))
    work = EvalWork("ab" * 32)
    work.dir.mkdir()
    (work.dir / "pass-000-00000.safetensors").write_bytes(b"half a file")  # killed before its first record
    said = []
    with resumable("ab" * 32, said.append) as got:
        assert got is not None and not work.dir.exists()
    assert len(said) == 1 and said[0].startswith(f"removed {work.dir}")
    work.dir.mkdir()
    (work.dir / "progress.json").write_text('{"fingerprint": "' + "ab" * 32 + '", "passes": {"000": {}}}')
    with pytest.raises(GrokquantError, match="damaged.*delete") as err:
        with resumable("ab" * 32):
            pass
    assert "\n" not in str(err.value) and work.dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [work.dir.name]  # the lock went with the refusal
