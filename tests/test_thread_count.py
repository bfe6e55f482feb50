"""Bytes independent of the thread count (issue #17): every long command, run with OMP_NUM_THREADS=1 and
with 2 in one process each, writes the same bytes, so a run resumed or spread over ranks on another
machine matches.

Sources of thread-dependent bits this guards against: MKL's parallel spotrf/strtri (quant/cholesky.py now
factorises by blocks), torch's reductions into one output (quant/sums.py), and anything new. The tiny
checkpoint is large enough to reach both on the code before the fix: its 256- and 512-wide Hessians
factorise differently on two threads, and a 256-row GPTQ block holds 32768 values, torch's grain for a
parallel reduction.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


SCRIPT = r"""
import json, sys
from pathlib import Path
from grokquant.cli import main

ckpt, out = sys.argv[1], Path(sys.argv[2])
data = ["--tokens", "512", "--seq-len", "64", "--device", "cpu"]
steps = [
    ["calibrate", ckpt, "-o", out / "stats.safetensors", "--imatrix", out / "imatrix.gguf", "--hessians", *data],
    ["convert", ckpt, "-o", out / "q4_k_m.gguf", "--type", "q4_k_m", "--imatrix", out / "imatrix.gguf"],
    ["quantize", ckpt, "-o", out / "gptq", "--recipe", "gptq-w4g128", *data],
    ["quantize", ckpt, "-o", out / "q4_k_m-gptq.gguf", "--recipe", "q4_k_m-gptq", *data],
    ["eval", out / "q4_k_m.gguf", out / "gptq", "--baseline", ckpt, "--save-baseline", out / "baseline.safetensors",
     "--ctx", "128", "--chunks", "4", "--json"],
]
for step in steps:
    try:
        main([str(a) for a in step], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
"""


def start(ckpt: Path, out: Path, threads: int) -> subprocess.Popen:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(ckpt), str(out)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def outputs(proc: subprocess.Popen, out: Path) -> dict[str, bytes]:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    results = json.loads(stdout[stdout.index("{"):])["results"]  # after the other commands' lines
    files["eval"] = json.dumps([{**r, "path": Path(r["path"]).name} for r in results]).encode()
    return files


def test_one_and_two_threads_write_the_same_bytes(tiny_tp8, tmp_path):
    # side by side: the thread count is what OpenMP and MKL are told, not what the cores are doing
    runs = {threads: start(tiny_tp8, tmp_path / f"threads-{threads}", threads) for threads in (1, 2)}
    one, two = (outputs(proc, tmp_path / f"threads-{threads}") for threads, proc in runs.items())
    assert one.keys() == two.keys() and len(one) >= 10
    assert [name for name in one if one[name] != two[name]] == []
