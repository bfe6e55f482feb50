"""convert resumes: after kill -9 at several points, a full disk or Ctrl-C a re-run continues from the last
record and writes the bytes of an uninterrupted run; leftovers that do not fit are removed, saying so."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from grokquant.errors import DiskFullError, GrokquantError
from grokquant.gguf import resume
from grokquant.gguf.convert import convert
from grokquant.gguf.file import GGUFWriter
from grokquant.quantize.recipe import GGUFRecipe

# the CLI, killed (SIGKILL, no cleanup runs) just before the N-th write of one tensor's chunks; a record
# after every source, so that each kill point has recorded work behind it
KILLED_CLI = """
import os, signal, sys
import grokquant.gguf.resume as resume
from grokquant.gguf.file import GGUFWriter
resume.RECORD_BYTES = 0
name, nth = sys.argv.pop(1), int(sys.argv.pop(1))
real, seen = GGUFWriter.write, [0]
def write(self, tensor, data):
    if tensor == name:
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    real(self, tensor, data)
GGUFWriter.write = write
from grokquant.cli import main
main(prog_name="grokquant")
"""

Q4 = GGUFRecipe("q4_k_m", "q4_k_m")


@pytest.fixture(scope="module")
def clean_q4(tiny_tp8, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("clean") / "clean.gguf"
    convert(tiny_tp8, out, Q4)
    return out.read_bytes()


@pytest.fixture
def every_source(monkeypatch):
    monkeypatch.setattr(resume, "RECORD_BYTES", 0)


def _cli(*args, kill_at=None):
    pre = [sys.executable, "-c", KILLED_CLI, *kill_at] if kill_at else [sys.executable, "-m", "grokquant"]
    return subprocess.run([*pre, *map(str, args)], capture_output=True, text=True)


def _failing_write(monkeypatch, name: str, nth: int, exc: BaseException) -> None:
    real, seen = GGUFWriter.write, [0]

    def write(self, tensor, data):
        if tensor == name:
            seen[0] += 1
            if seen[0] == nth:
                raise exc
        real(self, tensor, data)

    monkeypatch.setattr(GGUFWriter, "write", write)


def test_kill_9_at_three_points_then_resume_gives_the_uninterrupted_bytes(tiny_tp8, tmp_path, clean_q4):
    """Killed mid-way through an expert stack (3rd of 8 experts), at the first chunk of a later tensor, and
    at the very last write of the file, each run resuming the one before; the last run completes."""
    out = tmp_path / "k.gguf"
    args = ["convert", tiny_tp8, "-o", out, "--type", "q4_k_m"]
    record = tmp_path / ".k.gguf.resume"
    offsets = []
    for point in [("blk.0.ffn_up_exps.weight", "3"), ("blk.1.attn_q.weight", "1"),
                  ("blk.1.ffn_down_exps.weight", "8")]:
        killed = _cli(*args, kill_at=point)
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert not out.exists() and (tmp_path / ".k.gguf.incomplete").exists()
        offsets.append(json.loads(record.read_text())["offset"])
    assert offsets[0] < offsets[1] < offsets[2], offsets  # each run went on from the one before
    done = _cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from .k.gguf.resume" in done.stderr
    assert out.read_bytes() == clean_q4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.gguf"]  # record, partial and lock gone


def test_lost_tail_and_garbage_after_the_record_are_cut(tiny_tp8, tmp_path, clean_q4, every_source, monkeypatch):
    """What a power loss can do after the last record: the file shorter than what was written (but not than
    the fsynced record), or holding other bytes past the recorded offset."""
    out = tmp_path / "p.gguf"
    _failing_write(monkeypatch, "blk.1.ffn_gate_exps.weight", 5, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_tp8, out, Q4)
    monkeypatch.undo()
    partial = tmp_path / ".p.gguf.incomplete"
    offset = json.loads((tmp_path / ".p.gguf.resume").read_text())["offset"]
    assert partial.stat().st_size >= offset > 0
    with open(partial, "r+b") as f:
        f.truncate(offset)
        f.seek(offset)
        f.write(b"\xff" * 5000)
    convert(tiny_tp8, out, Q4)
    assert out.read_bytes() == clean_q4


def test_split_output_resumes_in_its_second_shard(tiny_tp8, tmp_path, every_source, monkeypatch):
    recipe = GGUFRecipe("q8_0", "q8_0")
    (tmp_path / "clean").mkdir()
    clean = convert(tiny_tp8, tmp_path / "clean" / "s.gguf", recipe, split_max_bytes=2_000_000)
    assert len(clean) >= 2
    notices = []
    out = tmp_path / "s.gguf"
    _failing_write(monkeypatch, "blk.1.ffn_up_exps.weight", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_tp8, out, recipe, split_max_bytes=2_000_000, notice=notices.append)
    monkeypatch.undo()
    assert any("of finished work is kept in" in n for n in notices), notices
    state = json.loads((tmp_path / ".s.gguf.resume").read_text())
    assert state["shard"] >= 1, state  # the first shard is complete and kept
    done_bytes = []
    paths = convert(tiny_tp8, out, recipe, split_max_bytes=2_000_000, notice=notices.append,
                    on_plan=lambda tensors, done: done_bytes.append(done))
    assert done_bytes[0] > 0 and any(n.startswith("resuming from") for n in notices)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in clean]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", *sorted(p.name for p in paths)]


def test_full_disk_keeps_finished_work_and_the_earlier_output(tiny_tp8, tmp_path, clean_q4, every_source,
                                                              monkeypatch):
    out = tmp_path / "d.gguf"
    out.write_bytes(b"an earlier good output")
    _failing_write(monkeypatch, "blk.1.attn_q.weight", 1, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(DiskFullError) as err:
        convert(tiny_tp8, out, Q4, force=True)
    monkeypatch.undo()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"no space left on device writing {out}")
    assert "nothing was replaced; " in message and "of finished work is kept in" in message, message
    assert out.read_bytes() == b"an earlier good output"
    convert(tiny_tp8, out, Q4, force=True)
    assert out.read_bytes() == clean_q4


def test_leftovers_of_other_options_or_a_damaged_record_are_removed(tiny_tp8, tmp_path, every_source, monkeypatch):
    out = tmp_path / "o.gguf"
    _failing_write(monkeypatch, "blk.0.ffn_up_exps.weight", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_tp8, out, Q4)
    monkeypatch.undo()
    notices = []
    convert(tiny_tp8, out, GGUFRecipe("q8_0", "q8_0"), notice=notices.append)
    assert notices == [f"removed {tmp_path / '.o.gguf.incomplete'} ({notices[0].split('(')[1].split(')')[0]}), "
                       f"left by an earlier run (made with other inputs or options)"], notices
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf"]

    out2 = tmp_path / "r.gguf"
    monkeypatch.setattr(resume, "RECORD_BYTES", 0)  # undo() above also undid every_source
    _failing_write(monkeypatch, "blk.0.ffn_up_exps.weight", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_tp8, out2, Q4)
    monkeypatch.undo()
    (tmp_path / ".r.gguf.resume").write_text('{"fingerprint": 3, "shard": "x"')
    notices.clear()
    convert(tiny_tp8, out2, Q4, notice=notices.append)
    assert len(notices) == 1 and "its record is damaged" in notices[0], notices


def test_a_refusal_of_the_inputs_keeps_nothing(tiny_tp8, tmp_path, every_source, monkeypatch):
    """A run that stops because of what it read (here a non-finite chunk) would stop there again: its
    records are no use, and everything goes."""
    _failing_write(monkeypatch, "blk.1.attn_q.weight", 1, GrokquantError("blk.1.attn_q.weight has non-finite values"))
    with pytest.raises(GrokquantError):
        convert(tiny_tp8, tmp_path / "n.gguf", Q4)
    assert list(tmp_path.iterdir()) == []


def test_a_second_convert_to_the_same_output_is_refused(tiny_tp8, tmp_path):
    from grokquant.io.paths import exclusive

    out = tmp_path / "l.gguf"
    with exclusive(tmp_path / ".l.gguf.lock", str(out)):
        refused = _cli("convert", tiny_tp8, "-o", out, "--type", "q8_0")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "is writing" in refused.stderr and sorted(p.name for p in tmp_path.iterdir()) == []
