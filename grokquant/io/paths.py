"""Output paths: checks made before any work (never overwrite or delete what a job reads), outputs that
appear whole or not at all, one writer per output, and a full disk reported as such."""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from grokquant.errors import DiskFullError, GrokquantError

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def check_output(out: str | Path, inputs: list[str | Path], directory: bool, force: bool) -> Path:
    """Refuse an output that is, or holds, one of `inputs` (with --force its rmtree/replace would destroy
    them), one that exists without `force`, and one of the wrong kind (a file where a directory is
    written, or the reverse), which would fail only after all the work."""
    out = Path(out)
    target = out.resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if src == target or target in src.parents:
            raise GrokquantError(f"{out} is {'' if src == target else 'a folder holding '}the input {inp}: "
                                 f"choose another output")
    if not out.parent.is_dir():
        raise GrokquantError(f"{out}: the folder {out.parent} does not exist")
    if out.exists():
        if not force:
            raise GrokquantError(f"{out} exists (use --force to overwrite)")
        if out.is_dir() != directory:
            raise GrokquantError(f"{out} exists and is a {'folder' if out.is_dir() else 'file'}; "
                                 f"this writes a {'folder' if directory else 'file'} there: remove it first")
    return out


def temporary_for(path: Path) -> Path:
    """`.NAME.tmp-PID` beside `path`: hidden, and naming the process that writes it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove(path: Path) -> None:
    """Remove a file or a folder, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def is_disk_full(exc: BaseException) -> bool:
    """A write failed because the disk (or quota, or file-size limit) is full; also when the error comes
    from safetensors' Rust writer, which reports the OS error only in its message."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _FULL
    text = str(exc)
    return any(f"os error {code})" in text for code in _FULL)


@contextmanager
def full_disk_is_an_error(out: Path, need_bytes: int | None = None,
                          kept: Callable[[], str | None] = lambda: None) -> Iterator[None]:
    """A full disk while writing `out` becomes one line saying so (and how much the output needs); the
    writer's own cleanup has run by then, so nothing half-written is left; `kept()` may add what the
    writer kept for a resumed run."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        target = Path(out).resolve().parent
        while not target.exists():
            target = target.parent
        free = shutil.disk_usage(target).free
        need = f"it needs {need_bytes / 1e9:.3f} GB, " if need_bytes else ""
        left = kept()
        raise DiskFullError(f"no space left on device writing {out} ({need}{free / 1e9:.3f} GB free there); "
                            f"nothing was replaced" + (f"; {left}" if left else "")) from None


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is renamed onto `path` (a file, or a folder that
    replaces an existing one), on any failure it is removed: `path` is the old output or the whole new one.
    A full disk is reported as such (DiskFullError)."""
    path = Path(path)
    tmp = temporary_for(path)
    remove(tmp)
    with full_disk_is_an_error(path):
        try:
            yield tmp
            if tmp.is_dir() and path.exists():
                remove(path)
            os.replace(tmp, path)
        finally:
            remove(tmp)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_json_durably(path: Path, obj) -> None:
    """`path` holds `obj` as JSON, the old content or the new, never half of either; the new is on disk
    (fsynced) before it replaces the old, so after a power loss a record claims nothing newer than itself."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def output_lock(out: Path):
    """The lock of one output, `.OUT.lock`: every command that writes `out` holds it (see `exclusive`)."""
    return exclusive(out.with_name(f".{out.name}.lock"), str(out))


@contextmanager
def exclusive(lock_file: Path, what: str) -> Iterator[None]:
    """Holds an advisory lock on `lock_file` (created if missing, removed on the way out): a second job on
    the same output is refused at once instead of sharing its files. The kernel drops the lock when the
    holder dies (kill -9, power loss), so a resumed run is never locked out by a stale file."""
    import fcntl

    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise GrokquantError(f"another run (pid {holder}) is writing {what}: wait for it, or stop it") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its holder had just removed on its way out: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            lock_file.unlink(missing_ok=True)  # before unlocking, so a waiting run locks a fresh file
    finally:
        os.close(fd)
