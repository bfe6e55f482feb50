"""Every artifact kind written by two versions of grokquant, compared byte for byte.

    python scripts/artifact_bytes.py REV            # REV (e.g. a commit before a refactor) vs the working tree
    python scripts/artifact_bytes.py REV --keep DIR # and keep both output trees under DIR

The working tree is copied first (tracked and untracked, not ignored), so editing on meanwhile is safe.

Both versions run through the command line only (the interface a refactor keeps), in child processes
with the same thread count, on the same small synthetic checkpoints: `synth`, `convert` to every file
type and recipe (with and without an imatrix), `calibrate` (statistics, Hessians, imatrix), `quantize`
to GPTQ directories and calibrated GGUF (all experts at once and one at a time), and `eval`'s saved
baseline. Prints one line per differing file and exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
          "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs"]
CALIBRATION = ["--tokens", "1024", "--seq-len", "64", "--seed", "1"]


def jobs() -> list[list[str]]:
    """grokquant command lines, relative to the output folder."""
    out = [["synth", "tiny", "--preset", "tiny", "--seed", "1"],
           ["synth", "odd", "--preset", "odd", "--seed", "2"],
           ["synth", "merged", "--preset", "tiny", "--seed", "1", "--layout", "merged"]]
    out += [["convert", "tiny", "-o", f"tiny-{t}.gguf", "--type", t] for t in FTYPES]
    out += [["convert", "odd", "-o", f"odd-{t}.gguf", "--type", t] for t in ("q4_k_m", "q6_k", "iq4_xs", "q4_0")]
    out += [["convert", "merged", "-o", "merged-q4_k_m.gguf", "--type", "q4_k_m"],
            ["convert", "tiny", "-o", "tiny-attn-q8.gguf", "--recipe", "q4_k_m-attn-q8"],
            ["convert", "tiny", "-o", "tiny-yarn.gguf", "--type", "q8_0", "--rope", "yarn"],
            ["convert", "tiny", "-o", "tiny-split.gguf", "--type", "f16", "--split-max-size", "2M"],
            ["calibrate", "tiny", "-o", "stats.safetensors", "--imatrix", "imatrix.gguf", "--hessians",
             "--device", "cpu", *CALIBRATION]]
    out += [["convert", "tiny", "-o", f"tiny-{t}-imatrix.gguf", "--type", t, "--imatrix", "imatrix.gguf"]
            for t in ("q4_k_m", "iq4_xs", "q4_0", "q2_k", "q6_k")]
    for recipe in ("gptq-w4g128", "rtn-w4g128", "int8", "gptq-w4g128-experts-w8-attn", "q4_k_m-imatrix",
                   "q4_k_m-gptq", "q2_k-gptq"):
        suffix = ".gguf" if "q4_k_m" in recipe or "q2_k" in recipe else ""
        out.append(["quantize", "tiny", "-o", f"q-{recipe}{suffix}", "--recipe", recipe, "--device", "cpu",
                    *CALIBRATION])
    out += [["quantize", "tiny", "-o", "q-gptq-one-expert", "--expert-batch", "1", "--device", "cpu", *CALIBRATION],
            ["quantize", "odd", "-o", "q-gptq-odd", "--device", "cpu", "--tokens", "1024", "--seq-len", "32"],
            ["eval", "q-gptq-w4g128", "--baseline", "tiny", "--save-baseline", "baseline.safetensors",
             "--ctx", "64", "--chunks", "4"]]
    return out


def write_all(source: Path, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(source), OMP_NUM_THREADS="2", PYTHONHASHSEED="0")
    for args in jobs():
        proc = subprocess.run([sys.executable, "-m", "grokquant", *args], cwd=out, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{source}: grokquant {' '.join(args)} failed:\n{proc.stderr[-2000:]}")


def snapshot(dst: Path) -> None:
    """A copy of the working tree's files (tracked, and untracked but not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the version to compare with (a commit, tag or branch)")
    ap.add_argument("--keep", type=Path, help="keep both output trees here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep or tmp)
        old_src, new_src, old_out, new_out = tmp / "src", tmp / "src-new", tmp / "old", tmp / "new"
        snapshot(new_src)
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old_src), args.rev], cwd=REPO, check=True)
        try:
            for d in (old_out, new_out):
                d.mkdir(parents=True)
            write_all(old_src, old_out)
            write_all(new_src, new_out)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_src)], cwd=REPO, check=True)
        old, new = digests(old_out), digests(new_out)
        differ = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
        for name in differ:
            print(f"differs: {name}" if name in old and name in new else f"only in {'old' if name in old else 'new'}: {name}")
        print(f"{len(old.keys() & new.keys()) - len([n for n in differ if n in old and n in new])} of "
              f"{len(old.keys() | new.keys())} files identical")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
