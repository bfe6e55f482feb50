"""Outputs whole or not at all, one writer per output, and a full disk as one line (grokquant/io/paths.py)."""

import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from grokquant.errors import DiskFullError, GrokquantError
from grokquant.io.paths import exclusive, is_disk_full, replacing

SMALL_DISK = 3 << 20


def test_replacing_leaves_the_old_output_or_the_whole_new_one(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with replacing(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed midway")
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with replacing(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "old").write_text("x")
    with replacing(folder) as tmp:  # a folder replaces a folder
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert os.listdir(folder) == ["new"] and sorted(os.listdir(tmp_path)) == ["folder", "out.bin"]


def test_disk_full_is_recognised_from_os_and_safetensors_errors(tmp_path):
    import errno

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EFBIG, "File too large"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    # safetensors' Rust writer reports the OS error only in its message
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(Exception("Error while serializing: I/O error: Permission denied (os error 13)"))
    with pytest.raises(DiskFullError, match=r"no space left on device writing .*out.bin.*nothing was replaced"):
        with replacing(tmp_path / "out.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert os.listdir(tmp_path) == []


HOLD = """
import sys, time
from pathlib import Path
from grokquant.io.paths import exclusive
with exclusive(Path(sys.argv[1]), "out"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_exclusive_refuses_a_second_holder_and_is_freed_by_kill_9(tmp_path):
    lock = tmp_path / ".out.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GrokquantError, match=f"another run \\(pid {holder.pid}\\) is writing out"):
            with exclusive(lock, "out"):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the stale file stays
        holder.wait()
    assert lock.exists()
    with exclusive(lock, "out"):  # the kernel dropped the dead holder's lock
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


# ---- a full disk, end to end ------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """(folder, preexec) where the child's writes stop at 3 MB: a tmpfs of that size when this process may
    mount one, else a 3 MB limit on each file the child writes (RLIMIT_FSIZE: EFBIG instead of ENOSPC,
    which the code treats the same). The grow() callable lifts the limit, as freeing space would."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0 if shutil.which("mount") else False
    state = {"limited": True}

    def preexec():
        if state["limited"] and not mounted:
            resource.setrlimit(resource.RLIMIT_FSIZE, (SMALL_DISK, SMALL_DISK))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process

    def grow():
        state["limited"] = False
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=256m", str(folder)], check=True)

    yield folder, preexec, grow
    if mounted:
        subprocess.run(["umount", "-l", str(folder)])


def _cli(args, preexec=None):
    return subprocess.run([sys.executable, "-m", "grokquant", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=preexec)


def _one_line_full_disk(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("error: no space left on device"), lines[-1]
    return lines[-1]


def test_full_disk_convert_calibrate_synth_one_line_and_earlier_outputs_intact(tiny_tp8, small_disk):
    folder, preexec, _ = small_disk
    earlier = {name: f"an earlier {name}".encode() for name in ("a.gguf", "c.safetensors", "i.gguf")}
    for name, data in earlier.items():
        (folder / name).write_bytes(data)
    line = _one_line_full_disk(_cli(["convert", tiny_tp8, "-o", folder / "a.gguf", "--type", "f32", "--force"],
                                    preexec))
    assert "a.gguf" in line and "GB" in line
    _one_line_full_disk(_cli(["calibrate", tiny_tp8, "-o", folder / "c.safetensors", "--imatrix", folder / "i.gguf",
                              "--hessians", "--tokens", 256, "--seq-len", 64, "--force"], preexec))
    _one_line_full_disk(_cli(["synth", folder / "s", "--intermediate", 8192], preexec))  # 12 MB per layer file
    assert sorted(os.listdir(folder)) == sorted(earlier)  # no temporaries, nothing half-written
    for name, data in earlier.items():
        assert (folder / name).read_bytes() == data, name


def test_full_disk_quantize_is_one_line_and_leaves_nothing(tiny_tp8, small_disk, tmp_path):
    """4096 calibration tokens: the hidden states saved after layer 0 (4 MB) do not fit, so nothing is
    resumable and nothing stays (a failure after finished layers keeps them: test_quantize.py)."""
    folder, preexec, grow = small_disk
    args = ["quantize", tiny_tp8, "--tokens", 4096, "--seq-len", 64]
    line = _one_line_full_disk(_cli([*args, "-o", folder / "q"], preexec))
    assert line.endswith("nothing was kept") and str(folder / "q") in line
    assert os.listdir(folder) == []
    grow()
    assert _cli([*args, "-o", folder / "q"]).returncode == 0


def test_a_second_quantize_to_the_same_output_is_refused(tiny_tp8, tmp_path):
    """A run holding the output's lock (here this test process, so the timing is certain) makes another
    quantize to that output refuse before it touches `.q.partial`; the lock of a killed holder is
    dropped by the kernel (test_exclusive_refuses_a_second_holder_and_is_freed_by_kill_9)."""
    out = tmp_path / "q"
    args = ["quantize", tiny_tp8, "-o", out, "--tokens", 256, "--seq-len", 64]
    with exclusive(tmp_path / ".q.lock", str(out)):
        second = _cli(args)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines()[-1] == f"error: another run (pid {os.getpid()}) is writing {out}: " \
                                                     f"wait for it, or stop it"
    assert os.listdir(tmp_path) == []
    assert _cli(args).returncode == 0
    assert os.listdir(tmp_path) == ["q"]
