"""Checks on an output path made before any work: never overwrite or delete what a job reads."""

from __future__ import annotations

from pathlib import Path

from grokquant.errors import GrokquantError


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
    if out.exists():
        if not force:
            raise GrokquantError(f"{out} exists (use --force to overwrite)")
        if out.is_dir() != directory:
            raise GrokquantError(f"{out} exists and is a {'folder' if out.is_dir() else 'file'}; "
                                 f"this writes a {'folder' if directory else 'file'} there: remove it first")
    return out
