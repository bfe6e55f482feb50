"""The work folder `.OUT.partial` of a job that goes through the model a decoder layer at a time
(`quantize`, `calibrate`): what a re-run after kill -9, a power loss, Ctrl-C or a full disk needs to go on
at the next layer and end with the uninterrupted run's bytes.

After each layer the caller's files for it and `hidden.safetensors` (the next layer's input) are written
and fsynced, then `progress.json` ({fingerprint, done, ...}) is replaced atomically: a record never
claims a layer whose files a power loss could have taken. A folder of other inputs or options (another
fingerprint) is started afresh; a damaged record is refused in one line rather than discarding the work.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from grokquant.errors import DiskFullError, GrokquantError
from grokquant.io.paths import fsync_file, is_disk_full, remove, write_json_durably

HIDDEN_FILE = "hidden.safetensors"  # safetensors: no unpickling, and a full disk reported as ENOSPC
STATE_FILE = "progress.json"


class LayerWork:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.dir = self.out.with_name(f".{self.out.name}.partial")
        self.state_file = self.dir / STATE_FILE

    def start(self, fingerprint: str) -> dict:
        """The state of an interrupted run with this fingerprint, or a fresh one (an empty folder)."""
        state = self.read_state()
        if state is None or state.get("fingerprint") != fingerprint:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            state = {"fingerprint": fingerprint, "done": 0}
        return state

    def read_state(self) -> dict | None:
        """The saved progress, or None; a damaged file (written by something else: ours are replaced
        atomically) is refused in one line."""
        if not self.state_file.exists():
            return None
        try:
            state = json.loads(self.state_file.read_text())
            if not isinstance(state, dict) or not isinstance(state.get("done"), int):
                raise ValueError("not a progress record")
            return state
        except (ValueError, UnicodeDecodeError) as e:
            raise GrokquantError(f"{self.state_file} is damaged ({e}): delete {self.dir} to start over") from None

    def hidden(self) -> list[torch.Tensor]:
        """The hidden states the last finished layer produced."""
        with safe_open(str(self.dir / HIDDEN_FILE), "pt") as f:
            return [f.get_tensor(str(i)) for i in range(len(f.keys()))]

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
        """A layer's own file in the folder (removed again if writing it fails, e.g. on a full disk)."""
        path = self.dir / name
        try:
            save_file(tensors, str(path), metadata=metadata)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def commit(self, state: dict, hidden: list[torch.Tensor], layer_files: list[Path] = ()) -> None:
        """Layer `state["done"] - 1` is finished: its files and `hidden` go to disk, then the record."""
        tmp = self.dir / "hidden.tmp"
        save_file({str(i): h.contiguous() for i, h in enumerate(hidden)}, str(tmp))
        for path in [*layer_files, tmp]:
            fsync_file(path)
        os.replace(tmp, self.dir / HIDDEN_FILE)
        write_json_durably(self.state_file, state)  # a kill mid-write leaves the previous state

    def done(self) -> int:
        """Layers the folder holds (0 if it holds no record)."""
        try:
            return json.loads(self.state_file.read_text())["done"]
        except FileNotFoundError:
            return 0

    def after_failure(self, exc: BaseException, n_layers: int, keep_also: bool = False) -> None:
        """Keep the folder only if it holds something to resume (finished layers, or `keep_also`); a full
        disk is said in one line, with what was kept."""
        try:
            done = self.done()
        except (OSError, ValueError, KeyError, TypeError):  # damaged: the error said what to do with it
            return
        kept = done > 0 or keep_also
        if not kept:
            remove(self.dir)
        if is_disk_full(exc):
            raise DiskFullError(f"no space left on device writing {self.out}: " + (
                f"{done} of {n_layers} layers are kept in {self.dir}; free space and run the same command to resume"
                if kept else "nothing was kept")) from None
