"""Does our calibrated GGUF quantization beat llama.cpp's own quantizer at the same size?

    python benchmarks/quality.py [--work benchmarks/.quality-cache] [--checkpoint DIR]
        [--layers 2 --hidden 512 --ffn 512 --vocab 512 --steps 250 --seed 0]
        [--tokens 8192 --seq-len 256] [--ctx 256 --chunks 128] [--threads 1] [--tiers default|low|q4_k_m,...]
        [--ours RECIPE[:BPW] ...] [--json-out quality.json]

One run, every step a child process (a crash of llama.cpp stops a step, not the benchmark):

1. A Grok-2-shaped model trained by `grokquant synth --train builtin` (cached in --work, keyed by its
   settings), or --checkpoint DIR.
2. `grokquant calibrate` on the built-in corpus's training split: llama.cpp's GGUF imatrix.
3. llama.cpp's quantizer: a bf16 GGUF (`grokquant convert --type bf16`), then `llama_model_quantize`
   (tests/llama_runner.py) to each tier's mix (default: Q4_K_M, IQ4_XS, Q2_K; `--tiers low`: IQ3_XXS, IQ2_M,
   IQ2_XXS, IQ1_M), each without and with the imatrix (the 1-3 bit mixes only with it: llama.cpp refuses
   them without).
4. Ours: `grokquant quantize --recipe TIER-gptq` (q4_k_m-gptq, iq2_m-gptq, ...) on the same calibration
   text, with `--target-bpw` = llama.cpp's matrix bits per weight of that mix where the CLI has it.
5. The baseline: the bf16 GGUF run by llama.cpp itself (f32 KV cache) on the held-out windows, kept
   top-k compressed; then `grokquant eval --engine llama.cpp --baseline` for every artifact, on the same
   windows.

Measured per artifact: file size, bits per weight of the whole file, matrix bits per weight
(8 x bytes / elements over the tensors of >= 2 dimensions), PPL, mean KLD, KLD 99%, same top-1 %.
Each of our files is compared with llama.cpp's files of its tier (the mix of nearest matrix bpw):
ratio = our mean KLD / the lowest mean KLD among those llama.cpp files whose matrix bpw is at least ours
- 0.005. PASS when the best ratio of every tier is <= 0.70.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from grokquant.errors import GrokquantError  # noqa: E402
RUNNER = ROOT / "tests" / "llama_runner.py"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
# tier -> llama.cpp's LLAMA_FTYPE_MOSTLY_*; the 1-3 bit tiers: python benchmarks/quality.py --tiers low
FTYPE_NAMES = {"q4_k_m": "Q4_K_M", "iq4_xs": "IQ4_XS", "q2_k": "Q2_K", "iq3_xxs": "IQ3_XXS", "iq2_m": "IQ2_M",
               "iq2_xxs": "IQ2_XXS", "iq1_m": "IQ1_M"}
TIER_SETS = {"default": "q4_k_m,iq4_xs,q2_k", "low": "iq3_xxs,iq2_m,iq2_xxs,iq1_m"}
BPW_SLACK = 0.0  # ours must be no larger: a llama.cpp file counts as "at least our size" only at >= our matrix bpw
PASS_RATIO = 0.70


class StepFailed(Exception):
    pass


PHASES: dict[str, float] = {}


@contextmanager
def phase(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - start


def run(cmd: list, what: str, live: bool = False) -> str:
    """stdout of a child process; StepFailed with the tail of its stderr if it fails; `live` echoes its
    stderr (progress)."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=ROOT)
    if live:  # for children whose stdout is a few lines: it waits in its pipe meanwhile
        lines = []
        for line in proc.stderr:
            lines.append(line)
            say("    " + line.rstrip())
        err = "".join(lines)
        out = proc.stdout.read()
        proc.wait()
    else:
        out, err = proc.communicate()
    if proc.returncode:
        tail = "\n".join("    " + line for line in err.strip().splitlines()[-12:])
        raise StepFailed(f"{what} failed (exit {proc.returncode})\n{tail}")
    return out


def grokquant(*args) -> list:
    return [sys.executable, "-m", "grokquant", *args]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the model -------------------------------------------------------------------------------------

def trained_checkpoint(a) -> Path:
    """Train with `grokquant synth --train builtin` unless the cache holds a checkpoint of these settings."""
    # the thread count is part of the key: it changes the bits (matmul reductions)
    key = f"grok2-L{a.layers}-h{a.hidden}-f{a.ffn}-v{a.vocab}-steps{a.steps}-seed{a.seed}-t{a.threads}"
    out = a.work / key
    record = out / "training.json"
    if record.is_file():
        rec = json.loads(record.read_text())
        say(f"trained checkpoint {out} cached (training took {rec['seconds']:.0f} s, "
            f"held-out PPL {rec['heldout_ppl']:.2f})")
        return out
    say(f"training {key} ({a.steps} steps) ...")
    start = time.perf_counter()
    run(grokquant("synth", out, "--train", "builtin", "--force", "--layers", a.layers, "--hidden", a.hidden,
                  "--heads", a.hidden // 64, "--head-dim", 64, "--intermediate", a.ffn, "--moe-intermediate", a.ffn,
                  "--vocab", a.vocab, "--steps", a.steps, "--seed", a.seed), "training (grokquant synth)", live=True)
    rec = json.loads(record.read_text())
    say(f"trained in {time.perf_counter() - start:.0f} s: held-out PPL {rec['heldout_ppl']:.2f} "
        f"(unigram {rec['unigram_ppl']:.1f})")
    return out


# ---- sizes -----------------------------------------------------------------------------------------

def sizes(path: Path) -> dict:
    """File MB, bits per weight of the whole file, and matrix bits per weight (tensors of >= 2 dims)."""
    from grokquant.gguf.file import read_gguf

    f = read_gguf(path)
    try:
        infos = list(f.tensors.values())
    finally:
        f.close()
    n = lambda t: math.prod(t.shape)
    mats = [t for t in infos if len(t.shape) >= 2]
    size = path.stat().st_size
    return {"file_mb": size / 1e6, "bpw": 8 * size / sum(map(n, infos)),
            "matrix_bpw": 8 * sum(t.nbytes for t in mats) / sum(map(n, mats))}


# ---- the baseline (child process) ------------------------------------------------------------------

def baseline_worker(gguf: str, out: str, data: str, ctx: str, chunks: str, top_k: str) -> None:
    """The bf16 GGUF through llama.cpp (f32 KV cache), saved as `grokquant eval --save-baseline` does;
    `eval --save-baseline` itself computes baselines with the torch engine only."""
    from grokquant.evaluate.engines import open_artifact, scored_logits
    from grokquant.evaluate.metrics import Baseline, score_pass, summarize
    from grokquant.evaluate.windows import evaluation_tokens, make_windows

    art = open_artifact(gguf, "llama.cpp")
    windows = make_windows(evaluation_tokens(art.tokenizer(), data), int(ctx), None, int(chunks) or None)
    scores = score_pass(scored_logits(art, windows), windows, compress_k=int(top_k))
    Baseline(windows, int(top_k), art.label, {art.semantics: scores.baseline()}).save(out)
    print(json.dumps(summarize(scores) | {"windows": len(windows.tokens), "semantics": art.semantics}))


# ---- the benchmark ---------------------------------------------------------------------------------

def parse_ours(spec: str) -> tuple[str, float | None]:
    recipe, _, bpw = spec.partition(":")
    try:
        return recipe, float(bpw) if bpw else None
    except ValueError:
        raise SystemExit(f"error: --ours {spec}: BPW must be a number") from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".quality-cache",
                   help="cache of trained checkpoints, and this run's files (run-<checkpoint>/)")
    p.add_argument("--checkpoint", type=Path, help="benchmark this checkpoint instead of training one")
    for name, default in (("layers", 2), ("hidden", 512), ("ffn", 512), ("vocab", 512), ("steps", 250), ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (imatrix and ours alike)")
    p.add_argument("--seq-len", type=int, help="calibration window [default: the checkpoint's training length, "
                   "else 256]")
    p.add_argument("--ctx", type=int, help="evaluation window [default: as --seq-len]")
    p.add_argument("--chunks", type=int, default=128, help="evaluation windows, the first of the held-out split "
                   "(0: all; 186 at ctx 256)")
    p.add_argument("--top-k", type=int, default=256, help="baseline log-probabilities kept per token")
    p.add_argument("--threads", type=int, default=1, help="threads of every step (torch and llama.cpp): 1 is "
                   "immune to a busy machine, where waiting threads slow down many times over")
    p.add_argument("--tiers", default="default", help="comma-separated tiers, or `default` / `low` (1-3 bit)")
    p.add_argument("--ours", action="append", default=[], metavar="RECIPE[:BPW]", help="an extra row of ours")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args()
    tiers = [t.strip() for t in TIER_SETS.get(a.tiers, a.tiers).split(",") if t.strip()]
    if not tiers or any(t not in FTYPE_NAMES for t in tiers):
        raise SystemExit(f"error: --tiers: give one or more of {', '.join(FTYPE_NAMES)}")
    extra = [parse_ours(s) for s in a.ours]
    ENV["OMP_NUM_THREADS"] = str(a.threads)  # torch's thread count, which the llama.cpp engine uses too
    a.work = a.work.resolve()  # children run in the repository root
    a.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    failures: dict[str, str] = {}
    try:
        with phase("train"):
            ckpt = a.checkpoint.resolve() if a.checkpoint else trained_checkpoint(a)
        if not (ckpt / "config.json").is_file():
            raise StepFailed(f"{ckpt}: not a checkpoint (no config.json)")
        record = ckpt / "training.json"
        trained_len = json.loads(record.read_text()).get("train", {}).get("seq_len", 256) if record.is_file() else 256
        a.seq_len = a.seq_len or trained_len
        a.ctx = a.ctx or a.seq_len
        out = a.work / f"run-{ckpt.resolve().name}"
        out.mkdir(exist_ok=True)
        rows = setup_and_llama(a, ckpt, out, tiers)
        rows += ours(a, ckpt, out, tiers, extra, rows, failures)
        with phase("baseline"):
            say("baseline: bf16 GGUF through llama.cpp ...")
            base_file = out / "baseline.safetensors"
            base = json.loads(run([sys.executable, __file__, "_baseline", out / "bf16.gguf", base_file, "builtin",
                                   a.ctx, a.chunks, a.top_k], "the baseline (bf16 through llama.cpp)"))
        with phase("eval"):
            evaluate(a, rows, base_file, failures)
    except (StepFailed, GrokquantError) as e:
        raise SystemExit(f"error: {e}")
    PHASES["total"] = time.perf_counter() - start
    bf16 = {"name": "bf16 (baseline)", "producer": "grokquant convert", "imatrix": False,
            **sizes(out / "bf16.gguf"), "ppl": base["ppl"], "ppl_se": base["ppl_se"], "kld": 0.0, "kld_p99": 0.0,
            "top1": 1.0}
    verdict = compare(rows, tiers)
    print(table([bf16] + rows, base, a, ckpt))
    print(verdict["text"])
    for name, err in failures.items():
        print(f"FAILED {name}: {err.splitlines()[0]}")
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in PHASES.items()))
    if a.json_out:
        a.json_out.write_text(json.dumps({
            "checkpoint": str(ckpt),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "scored_tokens": base["tokens"], "windows": base["windows"], "rows": [bf16] + rows,
            "tiers": verdict["tiers"], "pass": verdict["pass"], "failures": failures, "seconds": PHASES}, indent=1))
    return 0 if verdict["pass"] and not failures else 1


def setup_and_llama(a, ckpt: Path, out: Path, tiers: list[str]) -> list[dict]:
    """Calibration, the bf16 GGUF, and llama.cpp's quantized files (without and with the imatrix)."""
    import llama_cpp
    import numpy as np

    from grokquant.calibrate.imatrix import load_imatrix
    from grokquant.quant.ggml.mixes import FTYPES, NEEDS_IMATRIX

    with phase("calibrate"):
        say("calibrate ...")
        run(grokquant("calibrate", ckpt, "-o", out / "stats.safetensors", "--imatrix", out / "imatrix.gguf",
                      "--data", "builtin", "--tokens", a.tokens, "--seq-len", a.seq_len, "--force"), "calibrate")
        np.savez(out / "imatrix.npz", **{k: v.numpy() for k, v in load_imatrix(out / "imatrix.gguf").items()})
    with phase("convert bf16"):
        run(grokquant("convert", ckpt, "-o", out / "bf16.gguf", "--type", "bf16", "--force"), "convert --type bf16")
    rows = []
    with phase("llama.cpp quantize"):
        for tier in tiers:
            ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPE_NAMES[tier]}")
            for imatrix in (True,) if FTYPES[tier][1] in NEEDS_IMATRIX else (False, True):  # refused without
                name = f"{tier}" + ("-imatrix" if imatrix else "")
                path = out / f"llama-{name}.gguf"
                say(f"llama_model_quantize {name} ...")
                run([sys.executable, RUNNER, "quantize", out / "bf16.gguf", path, ftype, 0,
                     *([out / "imatrix.npz"] if imatrix else [])], f"llama_model_quantize {name}")
                rows.append({"name": f"llama.cpp {name}", "producer": "llama.cpp", "tier": tier, "imatrix": imatrix,
                             "path": str(path), **sizes(path)})
    return rows


def ours(a, ckpt: Path, out: Path, tiers: list[str], extra, llama_rows: list[dict], failures: dict) -> list[dict]:
    """`grokquant quantize` for each tier's -gptq recipe (and the extra rows), at llama.cpp's matrix bpw."""
    from grokquant.quantize.recipe import load_recipe

    has_target = "--target-bpw" in run(grokquant("quantize", "--help"), "quantize --help")
    if not has_target:
        say("note: `grokquant quantize` has no --target-bpw yet; our files keep their recipe's own mix")
    llama_bpw = {r["tier"]: r["matrix_bpw"] for r in llama_rows if r["imatrix"]}  # (1-3 bit tiers have no other)
    jobs = [(f"{t}-gptq", llama_bpw[t]) for t in tiers] + extra
    rows = []
    with phase("ours quantize"):
        for recipe, bpw in jobs:
            name = recipe + (f"@{bpw:.3f}" if bpw is not None and has_target else "")
            path = out / f"ours-{name}.gguf"
            if any(r["path"] == str(path) for r in rows):
                say(f"note: {name} is already a row (without --target-bpw the BPW of --ours changes nothing)")
                continue
            say(f"grokquant quantize {name} ...")
            try:
                load_recipe(recipe)
                target = ["--target-bpw", f"{bpw:.4f}"] if bpw and has_target else []
                run(grokquant("quantize", ckpt, "-o", path, "--recipe", recipe, "--data", "builtin", "--tokens",
                              a.tokens, "--seq-len", a.seq_len, "--force", *target), f"grokquant quantize {name}")
            except (StepFailed, GrokquantError) as e:  # a failing recipe is a line of the report, not the end
                failures[f"ours {name}"] = str(e)
                say(f"error: {e}")
                continue
            rows.append({"name": f"ours {name}", "producer": "grokquant", "imatrix": True, "path": str(path),
                         **sizes(path)})
    for row in rows:  # the tier: llama.cpp's mix of nearest matrix bpw
        row["tier"] = min(llama_bpw, key=lambda t: abs(llama_bpw[t] - row["matrix_bpw"]))
    return rows


def evaluate(a, rows: list[dict], base_file: Path, failures: dict) -> None:
    """`grokquant eval --engine llama.cpp` of every artifact in one run; if that fails, one at a time, so that
    a file llama.cpp cannot run costs its own row only."""
    def eval_cmd(paths):
        return grokquant("eval", *paths, "--engine", "llama.cpp", "--data", "builtin", "--ctx", a.ctx,
                         *(["--chunks", a.chunks] if a.chunks else []), "--baseline", base_file, "--json")

    def take(row, res):
        row.update({k: res[k] for k in ("ppl", "ppl_se", "kld", "kld_se", "kld_p99", "top1")})

    say(f"eval {len(rows)} artifacts through llama.cpp ...")
    try:
        for row, res in zip(rows, json.loads(run(eval_cmd([r["path"] for r in rows]), "eval"))["results"]):
            take(row, res)
        return
    except StepFailed as e:
        say(f"error: {e.args[0].splitlines()[0]}; evaluating one at a time")
    for row in rows:
        try:
            take(row, json.loads(run(eval_cmd([row["path"]]), f"eval {row['name']}"))["results"][0])
        except StepFailed as e:
            failures[row["name"]] = str(e)
            say(f"error: {e}")


def compare(rows: list[dict], tiers: list[str]) -> dict:
    """Each of our rows against the best llama.cpp file of its tier that is at least as large."""
    result, lines = {}, []
    for tier in tiers:
        theirs = [r for r in rows if r["producer"] == "llama.cpp" and r["tier"] == tier and "kld" in r]
        best_ratio = None
        for row in (r for r in rows if r["producer"] == "grokquant" and r["tier"] == tier and "kld" in r):
            ok = [r for r in theirs if r["matrix_bpw"] >= row["matrix_bpw"] - BPW_SLACK]
            if not ok:
                row["note"] = "larger than every llama.cpp file of its tier"
                continue
            ref = min(ok, key=lambda r: r["kld"])
            row.update(ratio=row["kld"] / ref["kld"] if ref["kld"] > 0 else float("inf"), vs=ref["name"],
                       d_bpw=row["matrix_bpw"] - ref["matrix_bpw"])
            best_ratio = row["ratio"] if best_ratio is None else min(best_ratio, row["ratio"])
        ok = best_ratio is not None and best_ratio <= PASS_RATIO
        result[tier] = {"best_ratio": best_ratio, "pass": ok}
        lines.append(f"  {tier:<7} best KLD ratio " + (f"{best_ratio:.3f}" if best_ratio is not None else "none") +
                     f" -> {'pass' if ok else 'fail'}")
    passed = bool(result) and all(t["pass"] for t in result.values())
    text = (f"{'PASS' if passed else 'FAIL'}: our mean KLD / llama.cpp's best at the same size <= {PASS_RATIO} "
            f"at every tier\n" + "\n".join(lines))
    return {"tiers": result, "pass": passed, "text": text}


def table(rows: list[dict], base: dict, a, ckpt: Path) -> str:
    f = lambda r, k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"
    lines = [f"\n{ckpt.name}: {base['windows']} held-out windows of {a.ctx} ({base['tokens']} scored tokens); "
             f"baseline bf16 through llama.cpp, PPL {base['ppl']:.3f}; calibration {a.tokens} tokens\n",
             "| artifact | producer | imatrix | MB | bpw | matrix bpw | PPL | mean KLD | KLD 99% | top-1 % "
             "| KLD ratio | vs | Δ matrix bpw (≤ theirs) |", "|---|---|---|" + "---:|" * 10]
    for r in rows:
        ppl = f"{r['ppl']:.3f} ± {r['ppl_se']:.3f}" if "ppl" in r else "failed"
        top1 = f"{100 * r['top1']:.2f}" if "top1" in r else "-"
        kld = (f"{r['kld']:.5f}" + (f" ± {r['kld_se']:.5f}" if r.get("kld_se") else "")) if "kld" in r else "-"
        d = (f"{r['d_bpw']:+.3f} ({'yes' if r['d_bpw'] <= 1e-9 else 'no'})" if "d_bpw" in r else r.get("note", ""))
        lines.append(f"| {r['name']} | {r['producer']} | {'yes' if r['imatrix'] else 'no'} | {r['file_mb']:.2f} "
                     f"| {r['bpw']:.3f} | {r['matrix_bpw']:.3f} | {ppl} | {kld} | {f(r, 'kld_p99', '.4f')} "
                     f"| {top1} | {f(r, 'ratio', '.3f')} | {r.get('vs', '')} | {d} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["_baseline"]:
        baseline_worker(*sys.argv[2:])
    else:
        sys.exit(main())
