"""`torchrun -m grokquant quantize` with 2 gloo processes: the same bytes as one process, and resumable
after a rank dies."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from grokquant.quantize.distributed import assign

# the bytes do not depend on the thread count (tests/test_thread_count.py): one process on 2 threads and
# two ranks on 1 each (torchrun's default) must agree
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SINGLE_ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
QUANTIZE = ["quantize", "--tokens", "512", "--seq-len", "64", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single(ckpt, out, recipe):
    proc = subprocess.run([sys.executable, "-m", "grokquant", *QUANTIZE, str(ckpt), "-o", str(out), "--recipe",
                           str(recipe)], env=SINGLE_ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def torchrun(ckpt, out, recipe, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "grokquant", *QUANTIZE, str(ckpt), "-o", str(out),
           "--recipe", str(recipe)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def files(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_assignment_balances_cost_deterministically():
    costs = [1, 1, 1, 4, 8, 8, 8, 64, 64, 128]
    owner = assign(costs, 2)
    assert owner == assign(costs, 2)
    load = [sum(c for c, r in zip(costs, owner) if r == k) for k in range(2)]
    assert max(load) - min(load) <= 64 and set(owner) == {0, 1}
    assert assign(costs, 1) == [0] * len(costs)


@pytest.mark.parametrize("recipe", [pytest.param("sequential-gptq", marks=pytest.mark.slow), "q4_k_m-gptq"])
def test_two_gloo_ranks_write_the_bytes_of_one_process(tiny_tp8, tmp_path, recipe):
    if recipe == "sequential-gptq":  # all ranks need every layer's result: the all-gather path
        path = tmp_path / "seq.yaml"
        path.write_text("name: seq\nformat: gptq\nmethod: gptq\nsequential: true\n")
        recipe, suffix = path, ""
    else:
        suffix = ".gguf"
    one, two = tmp_path / f"one{suffix}", tmp_path / f"two{suffix}"
    single(tiny_tp8, one, recipe)
    proc = torchrun(tiny_tp8, two, recipe)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert files(one) == files(two)


@pytest.mark.slow  # long: `make test-slow` (keeps the default run under 10 min on 2 cores)
def test_dead_rank_fails_the_job_which_then_resumes(tiny_tp8, tmp_path):
    out = tmp_path / "resumed"
    reference = tmp_path / "reference"
    single(tiny_tp8, reference, "gptq-w4g128")
    proc = torchrun(tiny_tp8, out, "gptq-w4g128", start_new_session=True)
    progress = tmp_path / ".resumed.partial" / "progress.json"
    victim = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and '"done": 1' in progress.read_text():
            workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                       if c.environ().get("RANK") == "1"]
            if workers:
                victim = workers[0]
                victim.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=600)
    assert victim is not None, "layer 1 finished before rank 1 could be stopped"
    assert proc.returncode != 0 and not out.exists()
    single(tiny_tp8, out, "gptq-w4g128")  # resumes after layer 0 (written by rank 0), in one process
    assert files(out) == files(reference)
