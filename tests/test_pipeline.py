"""io.pipeline: read-ahead and write-behind threads keep order, bound their queues, hand errors back, stop
early; convert through them writes every byte in order and leaves nothing behind when a stage fails."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from grokquant.errors import DiskFullError, GrokquantError
from grokquant.gguf.convert import convert
from grokquant.gguf.file import GGUFWriter, read_gguf
from grokquant.io.pipeline import WriteBehind, read_ahead
from grokquant.quantize.recipe import GGUFRecipe


def test_read_ahead_keeps_order_and_stays_bounded():
    made = []

    def items():
        for i in range(50):
            made.append(i)
            yield i

    seen = []
    for i in read_ahead(items(), depth=2):
        time.sleep(0.002)  # a slow consumer: the producer must wait for it
        assert len(made) <= i + 1 + 3  # the consumer's item, two queued, one being made
        seen.append(i)
    assert seen == list(range(50))


def test_read_ahead_raises_the_producers_error_in_order():
    def items():
        yield 1
        yield 2
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for i in read_ahead(items()):
            got.append(i)
    assert got == [1, 2]


def test_read_ahead_stops_the_producer_when_the_consumer_leaves():
    made = []

    def items():
        for i in range(10_000):
            made.append(i)
            yield i

    for i in read_ahead(items(), depth=1):
        if i == 3:
            break
    time.sleep(0.3)
    assert len(made) <= 6
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]


def test_write_behind_writes_in_order():
    out = []
    w = WriteBehind(lambda item: (time.sleep(0.001), out.append(item)), depth=2)
    for i in range(100):
        w.submit(i)
    w.close()
    assert out == list(range(100))


def test_write_behind_raises_the_writers_error():
    def write(item):
        if item == 5:
            raise OSError(28, "No space left on device")  # said as one line: DiskFullError

    w = WriteBehind(write, depth=1)
    with pytest.raises(OSError, match="No space"):
        for i in range(1000):
            w.submit(i)
        w.close()
    w.abort()  # after an error: returns at once
    assert not [t for t in threading.enumerate() if t.name == "write-behind" and t.is_alive()]


def test_write_behind_abort_drops_the_queue():
    out = []
    gate = threading.Event()

    def write(item):
        gate.wait(5)
        out.append(item)

    w = WriteBehind(write, depth=3)
    for i in range(4):
        w.submit(i)
    gate.set()
    w.abort()
    assert len(out) <= 1  # at most the one being written when abort came


def test_convert_write_failure_leaves_nothing(tiny_tp8, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = GGUFWriter.write

    def failing(self, name, data):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(28, "No space left on device")  # said as one line: DiskFullError
        real(self, name, data)

    monkeypatch.setattr(GGUFWriter, "write", failing)
    with pytest.raises(DiskFullError, match="no space left on device writing .*out.gguf"):
        convert(tiny_tp8, tmp_path / "out.gguf", GGUFRecipe("q8_0", "q8_0"))
    assert list(tmp_path.iterdir()) == []


def test_convert_non_finite_chunk_is_refused_before_writing(tiny_tp8, tmp_path, monkeypatch):
    import grokquant.gguf.convert as conv

    real = conv.quantize

    def poisoned(x, type_name, qw=None):
        out = real(x, type_name, qw)
        if type_name == "Q8_0" and x.shape[-1] > 0:
            out[0, 0:2] = torch.from_numpy(np.frombuffer(np.float16(np.inf).tobytes(), np.uint8).copy())  # d
        return out

    monkeypatch.setattr(conv, "quantize", poisoned)
    with pytest.raises(GrokquantError, match="non-finite"):
        convert(tiny_tp8, tmp_path / "out.gguf", GGUFRecipe("q8_0", "q8_0"))
    assert list(tmp_path.iterdir()) == []


def test_convert_reader_failure_leaves_nothing(tiny_tp8, tmp_path, monkeypatch):
    from grokquant.grok.checkpoint import Checkpoint

    real = Checkpoint.tensor
    calls = {"n": 0}

    def failing(self, name):
        calls["n"] += 1
        if calls["n"] == 5:
            raise GrokquantError("shard truncated")
        return real(self, name)

    monkeypatch.setattr(Checkpoint, "tensor", failing)
    with pytest.raises(GrokquantError, match="truncated"):
        convert(tiny_tp8, tmp_path / "out.gguf", GGUFRecipe("q8_0", "q8_0"))
    assert list(tmp_path.iterdir()) == []


def test_convert_progress_sees_every_tensor_in_order(tiny_tp8, tmp_path):
    events = []
    convert(tiny_tp8, tmp_path / "out.gguf", GGUFRecipe("q4_k_m", "q4_k_m"),
            progress=lambda t, n: events.append((t.name, n)))
    names = list(read_gguf(tmp_path / "out.gguf").tensors)
    assert [n for n, b in events if b == 0] == names
    assert [n for n, b in events if b > 0] == names
    for i in range(len(names)):  # started, then written, before the next starts
        assert events[2 * i][0] == events[2 * i + 1][0] and events[2 * i][1] == 0 < events[2 * i + 1][1]


def test_validate_without_data_still_catches_a_truncated_file(tiny_tp8, tmp_path):
    from grokquant.gguf.convert import plan, validate
    from grokquant.grok.checkpoint import Checkpoint

    out = tmp_path / "out.gguf"
    convert(tiny_tp8, out, GGUFRecipe("q8_0", "q8_0"))
    expected = plan(Checkpoint.open(tiny_tp8).config, GGUFRecipe("q8_0", "q8_0"))
    validate(out, expected, data=False)
    out.write_bytes(out.read_bytes()[:-100])
    with pytest.raises(GrokquantError, match="truncated"):
        validate(out, expected, data=False)
