"""Peak resident memory of a child process (for memory tests and benchmarks)."""

from __future__ import annotations

import json
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


# Linux carries a process's peak RSS across fork and exec (exec_mmap keeps the old mm's high-water mark),
# so a job started straight from a large parent (pytest after many tests, a benchmark that imported torch)
# reports the parent's peak, not its own. The job is therefore started by this small stdlib-only
# interpreter (-I -S: no site, no environment-driven imports; a few MB), which reports the job's rusage.
_LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "maxrss": usage.ru_maxrss}, f)
"""


def run_measured(args: list[str], env: dict | None = None) -> Measured:
    """Run `args`, returning its exit code, output, its own peak RSS (ru_maxrss) and wall time."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "rusage.json")
        with open(os.path.join(tmp, "out"), "w+") as out, open(os.path.join(tmp, "err"), "w+") as err:
            launcher = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, report, *args],
                                      stdout=out, stderr=err, text=True, env=env)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if not os.path.exists(report):  # the job never started (e.g. no such program): the launcher said why
            return Measured(launcher.returncode or 1, stdout, stderr, 0, time.perf_counter() - start)
        with open(report) as f:
            usage = json.load(f)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux
    return Measured(usage["returncode"], stdout, stderr, usage["maxrss"] * scale, time.perf_counter() - start)


def python_measured(code: str, *argv: str) -> Measured:
    return run_measured([sys.executable, "-c", code, *argv])
