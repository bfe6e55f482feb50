"""A measured job's peak RSS is its own, however large the process that starts it."""

import sys

import numpy as np

from grokquant.profiling import python_measured, run_measured


def test_peak_is_the_jobs_own_not_the_parents():
    ballast = np.ones(512 * 2**20 // 8)  # 512 MiB touched in this process: a job forked from here starts above it
    small = python_measured("pass").peak_rss
    big = python_measured("x = bytearray(300 * 2**20)").peak_rss
    del ballast
    assert small < 200 * 2**20, small
    assert 300 * 2**20 < big < small + 400 * 2**20, (small, big)


def test_exit_codes_and_output_come_through():
    m = python_measured("import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)")
    assert (m.returncode, m.stdout, m.stderr) == (3, "out\n", "err\n")
    killed = python_measured("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode == -9
    missing = run_measured([sys.executable + "-no-such-program"])
    assert missing.returncode != 0 and "no-such-program" in missing.stderr
