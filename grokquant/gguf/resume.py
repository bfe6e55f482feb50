"""Resumable GGUF output: what lets `convert` continue after kill -9, a power loss or a full disk.

Each output file is written as `.NAME.incomplete` beside it, and `.OUT.resume` records how far those
files hold finished work: a fingerprint of everything the bytes depend on, and a position (the shard,
the first unfinished tensor in it, how many of its sources, i.e. experts, are written, and the byte
offset where that work ends). The record is replaced atomically, and only after the data it claims has
been fsynced, so a power loss leaves an older record, never one that claims lost data. Records are made
every RECORD_BYTES of output (at real width a few seconds of work) and at the end of each shard.

A re-run with the same fingerprint truncates the partial file to the recorded offset and writes on from
the next source; the quantizers are deterministic, so the result is the uninterrupted run's bytes.
Leftovers of other inputs or options, or without a record, are removed with a message.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from grokquant.errors import GrokquantError
from grokquant.io.paths import fsync_file, is_disk_full, write_json_durably

RECORD_BYTES = 1 << 28  # output between two records
FORMAT_VERSION = 1  # part of the fingerprint: bump when the bytes written for the same inputs change


@dataclass(frozen=True)
class Position:
    shard: int = 0
    tensor: int = 0  # index in the shard of the first unfinished tensor
    sources: int = 0  # of its sources, how many are written
    offset: int = 0  # bytes of the shard's file that hold them (0: not started)


def fingerprint(*parts: bytes | str) -> str:
    h = hashlib.sha256(f"gguf-convert {FORMAT_VERSION}".encode())
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))  # so that no two splits of the same bytes collide
        h.update(data)
    return h.hexdigest()


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.incomplete")


class Resumable:
    """The partial files and the record of one convert to `out` (whose files are `paths`).

    fingerprint None: a job that never resumes (its inputs cannot be fingerprinted cheaply); it still
    writes through the partial files and removes leftovers of earlier runs."""

    def __init__(self, out: Path, paths: list[Path], fingerprint: str | None,
                 notice: Callable[[str], None] | None = None):
        self.partials = [partial_path(p) for p in paths]
        self.record = out.with_name(f".{out.name}.resume")
        self.fingerprint = fingerprint
        self.notice = notice or (lambda message: None)
        self.position = Position()
        self._recorded_at = 0  # offset in the current shard of the last record

    # ---- before writing ------------------------------------------------------------------------
    def start(self, headers: list[bytes]) -> Position:
        """Where to continue: the recorded position if the record and the partial files fit these inputs
        (their headers are `headers`), else the start, with every leftover removed."""
        pos, why = self._recorded(headers)
        if pos is None:
            self._remove_leftovers(why)
            pos = Position()
        else:
            done = sum(p.stat().st_size for p in self.partials[:pos.shard]) + pos.offset
            self.notice(f"resuming from {self.record.name}: {done / 1e9:.3f} GB already written "
                        f"(shard {pos.shard + 1}, tensor {pos.tensor + 1})")
        self.position = pos
        self._recorded_at = pos.offset
        return pos

    def _recorded(self, headers: list[bytes]) -> tuple[Position | None, str]:
        if self.fingerprint is None:
            return None, "this run does not resume"
        try:
            data = json.loads(self.record.read_text())
            if data.pop("fingerprint") != self.fingerprint:
                return None, "made with other inputs or options"
            pos = Position(**data)
            if not all(isinstance(v, int) and v >= 0 for v in asdict(pos).values()) or pos.shard > len(headers):
                raise ValueError
        except FileNotFoundError:
            return None, "no record of finished work"
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None, "its record is damaged"
        for i, header in enumerate(headers[:pos.shard + 1]):
            if i == pos.shard and pos.offset == 0:
                break  # that shard is not started
            try:
                with open(self.partials[i], "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    same = f.read(len(header)) == header
            except FileNotFoundError:
                return None, f"{self.partials[i].name} is missing"
            if not same or (i == pos.shard and size < pos.offset):
                return None, f"{self.partials[i].name} does not hold what the record says"
        return pos, ""

    def _remove_leftovers(self, why: str) -> None:
        for p in [*self.partials, self.record]:
            if p.exists():
                size = p.stat().st_size
                p.unlink()
                if p != self.record:
                    self.notice(f"removed {p} ({size / 1e9:.3f} GB), left by an earlier run ({why})")

    # ---- while writing -------------------------------------------------------------------------
    def reached(self, file, pos: Position, force: bool = False) -> None:
        """The writer's file holds everything before `pos` (its offset in that file); record it if
        RECORD_BYTES were written since the last record (or `force`)."""
        if self.fingerprint is None or (not force and pos.offset - self._recorded_at < RECORD_BYTES):
            return
        if file is not None:
            file.flush()
            os.fsync(file.fileno())  # the data first: a record never claims what a power loss took
        write_json_durably(self.record, {"fingerprint": self.fingerprint, **asdict(pos)})
        self.position = pos
        self._recorded_at = pos.offset

    def shard_done(self, shard: int) -> None:
        """Shard `shard` is complete and closed: the next record starts at the next shard."""
        fsync_file(self.partials[shard])
        self._recorded_at = 0
        self.reached(None, Position(shard + 1), force=True)

    # ---- at the end ----------------------------------------------------------------------------
    def finish(self, paths: list[Path]) -> None:
        for tmp, p in zip(self.partials, paths):
            os.replace(tmp, p)
        self.record.unlink(missing_ok=True)

    def after_failure(self, exc: BaseException) -> str | None:
        """Keep the partial files if they hold recorded work worth resuming (after an interruption, a full
        disk, any failure a re-run may not repeat; not after a refusal of the inputs) and say so; else
        remove them (None)."""
        kept = (self.fingerprint is not None and self.record.exists()
                and (not isinstance(exc, GrokquantError) or is_disk_full(exc)))
        if not kept:
            for p in [*self.partials, self.record, self.record.with_name(self.record.name + ".tmp")]:
                p.unlink(missing_ok=True)
            return None
        pos = self.position
        held = sum(p.stat().st_size for p in self.partials[:pos.shard] if p.exists()) + pos.offset
        for p in self.partials[pos.shard + 1:]:
            p.unlink(missing_ok=True)
        where = self.partials[min(pos.shard, len(self.partials) - 1)]
        return f"{held / 1e9:.3f} GB of finished work is kept in {where}: run the same command to resume"
