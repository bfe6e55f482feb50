"""Every llama.cpp file type and every recipe, measured on the trained fixture: the quality order that
`grokquant plan` recommends by (docs/quality.md, "Every file type and recipe").

    python benchmarks/mix_quality.py [--work benchmarks/.quality-cache/mixes] [--chunks 64] [--only a,b]

1. `grokquant calibrate` on the built-in corpus's training split (8192 tokens of 256): statistics and
   llama.cpp's GGUF imatrix.
2. `grokquant convert --type T` for every file type (f32/f16 left out), with `--imatrix` where llama.cpp
   requires one (iq3_xs and below, q2_k_s); `grokquant quantize --recipe R` for every other recipe under
   recipes/ (calibrated ones on the same training text).
3. `grokquant eval --baseline` the bf16 original on the first --chunks held-out windows of 256 tokens:
   GGUF files through llama.cpp and through our torch engine, GPTQ directories through our loader.

Prints a markdown table (size, bpw, PPL, mean KLD, top-1, per engine) and writes results.json in --work.
Artifacts are kept in --work and reused by a later run (delete them to remake).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from grokquant.gguf.convert import needs_imatrix  # noqa: E402
from grokquant.quant.ggml.mixes import FTYPES  # noqa: E402
from grokquant.grok.checkpoint import Checkpoint  # noqa: E402
from grokquant.runtime.choose import candidates  # noqa: E402
from grokquant.runtime.plan import recipe_from  # noqa: E402
from grokquant.quantize.recipe import GGUFRecipe  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "grok2-trained"
GROKQUANT = [sys.executable, "-m", "grokquant"]


def run(*args) -> str:
    start = time.perf_counter()
    proc = subprocess.run([*GROKQUANT, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    print(f"  {' '.join(map(str, args[:2]))} ... {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if proc.returncode:
        raise SystemExit(f"failed: grokquant {' '.join(map(str, args))}\n{proc.stderr[-2000:]}")
    return proc.stdout


def make(name: str, work: Path, cfg, train: Path, imatrix: Path) -> Path:
    rec = recipe_from(name)
    gguf = isinstance(rec, GGUFRecipe)
    out = work / (f"{name}.gguf" if gguf else name)
    if out.exists():
        return out
    if gguf and not rec.calibrated:
        spec = ["--type", name] if name in FTYPES else ["--recipe", name]
        extra = ["--imatrix", imatrix] if needs_imatrix(cfg, rec) else []
        run("convert", FIXTURE, "-o", out, *spec, *extra)
    else:
        run("quantize", FIXTURE, "-o", out, "--recipe", name, "--data", train, "--seq-len", 256)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".quality-cache" / "mixes")
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--only", help="comma-separated names (default: every candidate of `plan`)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    cfg = Checkpoint.open(FIXTURE).config
    train = a.work / "train.txt"
    if not train.exists():
        from grokquant.data.corpus import builtin_text

        train.write_text(builtin_text("train"))
    stats, imatrix = a.work / "stats.safetensors", a.work / "imatrix.gguf"
    if not imatrix.exists():
        run("calibrate", FIXTURE, "-o", stats, "--data", train, "--seq-len", 256, "--imatrix", imatrix)
    names = a.only.split(",") if a.only else candidates()
    artifacts = {name: make(name, a.work, cfg, train, imatrix) for name in names}
    rows = []
    gguf = [str(p) for p in artifacts.values() if p.suffix == ".gguf"]
    gptq = [str(p) for p in artifacts.values() if p.suffix != ".gguf"]
    common = ["--baseline", FIXTURE, "--ctx", 256, "--chunks", a.chunks, "--json"]
    if gguf:
        rows += json.loads(run("eval", *gguf, *common, "--engine", "both"))["results"]
    if gptq:
        rows += json.loads(run("eval", *gptq, *common))["results"]
    (a.work / "results.json").write_text(json.dumps(rows, indent=1))
    by_path = {str(p): n for n, p in artifacts.items()}
    print("| artifact | engine | MB | bits/weight | PPL | mean KLD | KLD 99% | top-1 % |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["kld"], r["engine"])):
        name = by_path.get(r["path"], Path(r["path"]).name)
        engine = r["engine"] if r["path"].endswith(".gguf") else "torch (GPTQ)"
        print(f"| {name} | {engine} | {r['size_bytes'] / 1e6:.2f} | {r['bits_per_weight']:.2f} | "
              f"{r['ppl']:.3f} | {r['kld']:.5f} | {r['kld_p99']:.4f} | {r['top1'] * 100:.2f} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    sys.exit(main())
