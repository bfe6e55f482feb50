"""Peak resident memory of a child process (for memory tests and benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes
    seconds: float


def run_measured(args: list[str], env: dict | None = None) -> Measured:
    """Run `args`, returning its exit code, output, peak RSS (ru_maxrss) and wall time."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4 gives this child's own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux
    return Measured(proc.returncode, stdout, stderr, usage.ru_maxrss * scale, time.perf_counter() - start)


def python_measured(code: str, *argv: str) -> Measured:
    return run_measured([sys.executable, "-c", code, *argv])
