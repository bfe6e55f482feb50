"""What `grokquant eval` keeps so that a run killed (kill -9, a power loss, Ctrl-C) goes on where it stopped.

An evaluation is a fixed sequence of scoring passes (the baseline under each semantics, then each
artifact), each over the same windows. The work folder, `eval-FINGERPRINT` in the cache
($GROKQUANT_CACHE, else $XDG_CACHE_HOME/grokquant or ~/.cache/grokquant), holds the per-token scores of
the windows each pass has finished, and for a pass that streams the model a decoder layer at a time the
hidden states after its last finished layer. Files are fsynced before `progress.json`, replaced
atomically, claims them. Work is saved at most every SAVE_SECONDS, and only at the points an
uninterrupted run passes through (a whole batch of windows, a whole layer), so the resumed run computes
exactly the same numbers. The fingerprint covers every option and every input file's name, size and
mtime; the folder is removed when the evaluation completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from grokquant.errors import GrokquantError
from grokquant.io.paths import fsync_file, output_lock, write_json_durably

SAVE_SECONDS = 30.0  # the most work a kill can cost; each save writes the new scores and fsyncs
FORMAT_VERSION = 1  # part of the fingerprint: bump when the scores for the same inputs change
SCORES = ("nll", "kld", "dp", "same_top")
COMPRESSED = ("top_ids", "top_logp", "rest_logp", "target_logp")


def cache_root() -> Path:
    if os.environ.get("GROKQUANT_CACHE"):
        return Path(os.environ["GROKQUANT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grokquant"


def file_identity(path: str | Path) -> str:
    """Name, size and mtime of a file, or of every file under a folder."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = []
    for p in files:
        st = p.stat()
        parts.append(f"{p.relative_to(path.parent)}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def fingerprint(options: dict, inputs: list[str | Path], window_tokens: torch.Tensor) -> str:
    h = hashlib.sha256(f"eval {FORMAT_VERSION} {json.dumps(options, sort_keys=True, default=str)}".encode())
    for path in inputs:
        h.update(file_identity(path).encode())
    h.update(window_tokens.numpy().tobytes())
    return h.hexdigest()


@contextmanager
def resumable(fingerprint: str, on_message=None) -> Iterator["EvalWork | None"]:
    """The evaluation's work folder, locked against a second run of the same evaluation; None (and a
    message) where the cache cannot be written: the evaluation then runs without resume."""
    work = EvalWork(fingerprint)
    try:
        work.dir.parent.mkdir(parents=True, exist_ok=True)
        lock = output_lock(work.dir)
        lock.__enter__()
    except OSError as e:
        if on_message:
            on_message(f"note: this evaluation cannot resume if interrupted ({work.dir.parent}: {e.strerror})")
        yield None
        return
    try:
        message = work.read() or work.summary()
        if message and on_message:
            on_message(message)
        yield work
    finally:
        lock.__exit__(None, None, None)


class EvalWork:
    """The work folder of one evaluation; passes are numbered in the order the evaluation runs them."""

    def __init__(self, fingerprint: str, root: Path | None = None):
        self.dir = (root or cache_root()) / f"eval-{fingerprint[:32]}"
        self.fingerprint = fingerprint
        self.state = {"fingerprint": fingerprint, "passes": {}}
        self.passes_started = 0
        self.last_save = time.monotonic()

    def read(self) -> str | None:
        """Take up an interrupted run's record; returns a message when leftovers without one were removed."""
        record = self.dir / "progress.json"
        if not record.exists():
            if self.dir.exists():  # files of a run killed before its first record: nothing to resume
                shutil.rmtree(self.dir, ignore_errors=True)
                return f"removed {self.dir}: an interrupted evaluation that had finished nothing"
            return None
        try:
            state = json.loads(record.read_text())
            passes = state.get("passes")
            if state.get("fingerprint") != self.fingerprint or not isinstance(passes, dict) or not all(
                    isinstance(p, dict) and {"label", "complete", "windows", "files"} <= p.keys() for p in passes.values()):
                raise ValueError("not this evaluation's record")
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise GrokquantError(f"{record} is damaged ({e}): delete {self.dir} to start over") from None
        self.state = state
        return None

    def summary(self) -> str | None:
        """What an interrupted run left, for a message; None if nothing."""
        passes = self.state["passes"]
        if not passes:
            return None
        whole = sum(p["complete"] for p in passes.values())
        windows = sum(p["windows"] for p in passes.values() if not p["complete"])
        layers = [p["layer"] for p in passes.values() if not p["complete"] and p.get("layer")]
        return (f"resuming an interrupted evaluation ({self.dir}): {whole} pass(es) done"
                + (f", {windows} window(s) of the next" if windows else "")
                + (f", {layers[0]} layer(s) of the next" if layers else ""))

    # ---- a pass -----------------------------------------------------------------------------------

    def next_pass(self, label: str) -> "PassWork":
        key = f"{self.passes_started:03d}"
        self.passes_started += 1
        entry = self.state["passes"].setdefault(key, {"label": label, "complete": False, "windows": 0, "files": []})
        if entry["label"] != label:
            raise GrokquantError(f"{self.dir}: pass {key} was {entry['label']}, now {label}: delete it to start over")
        return PassWork(self, key, entry)

    def due(self) -> bool:
        return time.monotonic() - self.last_save >= SAVE_SECONDS

    def commit(self, files: list[Path]) -> None:
        for path in files:
            fsync_file(path)
        write_json_durably(self.dir / "progress.json", self.state)
        self.last_save = time.monotonic()

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class PassWork:
    """One scoring pass's saved windows (scores) or, while it streams, its hidden states."""

    def __init__(self, work: EvalWork, key: str, entry: dict):
        self.work, self.key, self.entry = work, key, entry
        self.streaming = False  # set by a pass that streams the model: it saves layers, its scores once at the end

    @property
    def windows_done(self) -> int:
        return self.entry["windows"]

    def saved_scores(self) -> list[dict[str, torch.Tensor]]:
        """The scores of the finished windows, as the chunks they were saved in."""
        out = []
        for name in self.entry["files"]:
            with safe_open(str(self.work.dir / name), "pt") as f:
                out.append({k: f.get_tensor(k) for k in f.keys()})
        return out

    def save_scores(self, tensors: dict[str, torch.Tensor], windows_done: int, complete: bool = False) -> None:
        """Scores of the windows since the last save; `windows_done` in all."""
        self.work.dir.mkdir(exist_ok=True)
        files = []
        if tensors:
            name = f"pass-{self.key}-{len(self.entry['files']):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.work.dir / name))
            files.append(self.work.dir / name)
            self.entry["files"].append(name)
        self.entry.update(windows=windows_done, complete=complete)
        self.work.commit(files)
        if complete and self.entry.pop("layer", None):
            self.work.commit([])
            self._hidden_file().unlink(missing_ok=True)

    # streamed passes: all windows go through one layer at a time, so the saved point is a layer

    def saved_hidden(self) -> tuple[int, list[torch.Tensor]] | None:
        layer = self.entry.get("layer")
        if not layer:
            return None
        with safe_open(str(self._hidden_file()), "pt") as f:
            return layer, [f.get_tensor(str(i)) for i in range(len(f.keys()))]

    def save_hidden(self, layers_done: int, hidden: list[torch.Tensor]) -> None:
        self.work.dir.mkdir(exist_ok=True)
        tmp = self.work.dir / f"pass-{self.key}-hidden.tmp"
        save_file({str(i): h.contiguous() for i, h in enumerate(hidden)}, str(tmp))
        fsync_file(tmp)
        os.replace(tmp, self._hidden_file())
        self.entry["layer"] = layers_done
        self.work.commit([])

    def _hidden_file(self) -> Path:
        return self.work.dir / f"pass-{self.key}-hidden.safetensors"
