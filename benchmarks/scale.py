"""Full-width scale benchmark: the real Grok 2 layer widths, one and two layers, measured end to end.

    python benchmarks/scale.py            # real widths: ~8.4 GB of bf16 per layer, cached in /tmp/grokquant-scale
    python benchmarks/scale.py --small    # every stage at tiny widths (< 1 min cached): a smoke test
    python benchmarks/scale.py --report /tmp/grokquant-scale/results.json   # the tables of a saved run

Writes once (cached) synthetic checkpoints in the release's TP=8 layout with hidden 8192, 64 x 128 query
heads, 8 KV heads, a dense MLP of 32768 and 8 experts of 16384, a reduced vocabulary, and 1 or 2 decoder
layers. Then measures, each job in its own process (wall and CPU seconds, peak RSS, bytes in and out):

1. `grokquant convert` to q8_0 and q4_k_m on 1 and 2 layers (the difference is the per-layer cost; the
   peak must not grow with layers), and to bf16 (llama.cpp's input).
2. llama.cpp on the same layer: `llama_model_quantize` (q8_0, q4_k_m) from our bf16 GGUF, and its own
   converter `convert_hf_to_gguf.py` (bf16, q8_0). That converter reads neither the TP layout (the 8
   same-named expert slices overwrite each other) nor `tokenizer.tok.json`, so it gets a merged copy in
   `model-*.safetensors` files plus a SentencePiece `tokenizer.model` of the same vocabulary size (the
   vocabulary is metadata; the tensor work is the same). It needs `transformers` and `sentencepiece`,
   looked for in --llama-deps (a `pip install --target` folder), else the comparison says why it is skipped.
3. GPTQ: `quantize --recipe gptq-w4g128` on 1 layer at 1/8 and 1/4 of the widths (every weight and Hessian
   grows with the square of the width, so the peak over the interpreter's baseline is extrapolated by 1/f²),
   and `grokquant.quant.gptq.gptq` on one real-width expert w1 and w2 with a Hessian of correlated inputs,
   from which each linear of a layer is timed by rows x cols² (the lazy block update dominates).
4. `calibrate --imatrix` (part `calibrate`) on the 1-layer checkpoint: the statistics pass alone.
5. Part `gptq-full` (not in the default: ~40 min here): `quantize --recipe gptq-w4g128 --expert-batch 1` at
   the real widths through the library, printing seconds and RSS per work item, stopped after the dense
   linears and `--groups` expert groups (each further group repeats the same loads and frees).

Projection to 64 layers: seconds = per layer x (64 + the full-vocabulary embedding and lm_head in layer
equivalents), per layer = the run with the most layers divided by its layers (fixed costs included);
peak RSS = the largest measured peak (flat in layers) plus, where a tool would hold a larger tensor at the
full 131072-token vocabulary than any it held here, the difference (grokquant reads the embedding whole in bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from grokquant.quant.ggml.mixes import FTYPES

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "tests" / "llama_runner.py"
LLAMA_CPP = Path("/tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp")
FULL_LAYERS, FULL_VOCAB = 64, 131072
GB = 1e9


@dataclass(frozen=True)
class Width:
    name: str
    hidden: int
    head_dim: int
    dense: int
    moe: int

    def scaled(self, f: float) -> "Width":
        return Width(f"{self.name}/{round(1 / f)}" if f != 1 else self.name, int(self.hidden * f), self.head_dim,
                     int(self.dense * f), int(self.moe * f))

    def overrides(self, layers: int, vocab: int) -> dict:
        heads = self.hidden // self.head_dim
        return dict(num_hidden_layers=layers, vocab_size=vocab, hidden_size=self.hidden, head_dim=self.head_dim,
                    num_attention_heads=heads, num_key_value_heads=max(1, heads // 8),
                    intermediate_size=self.dense, moe_intermediate_size=self.moe)

    def linears(self) -> list[tuple[str, int, int, int]]:
        """(name, rows, cols, count) of every quantized matrix of one decoder layer."""
        h, kv = self.hidden, max(1, self.hidden // self.head_dim // 8) * self.head_dim
        return [("attn q/o", h, h, 2), ("attn k/v", kv, h, 2), ("dense gate/up", self.dense, h, 2),
                ("dense down", h, self.dense, 1), ("expert w1/w3", self.moe, h, 16), ("expert w2", h, self.moe, 8)]

    @property
    def layer_params(self) -> int:
        return sum(r * c * n for _, r, c, n in self.linears())


REAL = Width("full", 8192, 128, 32768, 16384)
SMALL = Width("small", 128, 64, 256, 256)


# ---- measured child processes ---------------------------------------------------------------------------

@dataclass
class Row:
    stage: str
    layers: int
    wall: float = 0.0
    cpu: float = 0.0
    peak_rss: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    disk_read: int = 0  # from the kernel's block counters: what missed the page cache
    disk_written: int = 0
    note: str = ""
    group: str = "convert"
    extra: dict = field(default_factory=dict)


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def measure(stage: str, layers: int, args: list[str], inputs=(), outputs=(), env: dict | None = None,
            rss_cap: float = 21 * GB, group: str = "convert") -> tuple[Row, str]:
    """Run `args`; a watchdog kills it if its RSS passes `rss_cap` (the machine is shared).

    A child's ru_maxrss starts from this process's RSS at fork, so this process never imports torch."""
    row = Row(stage, layers, group=group)
    killed = []
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})})

        def watch():
            try:
                p = psutil.Process(proc.pid)
                while proc.returncode is None:
                    if p.memory_info().rss > rss_cap:
                        killed.append(p.memory_info().rss)
                        p.kill()
                        return
                    time.sleep(0.2)
            except psutil.Error:  # gone (reaped) before or while we looked
                pass

        threading.Thread(target=watch, daemon=True).start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    row.wall = time.perf_counter() - start
    row.cpu = usage.ru_utime + usage.ru_stime
    row.peak_rss = usage.ru_maxrss * 1024
    row.disk_read, row.disk_written = usage.ru_inblock * 512, usage.ru_oublock * 512
    row.bytes_in = sum(size_of(Path(p)) for p in inputs)
    row.bytes_out = sum(size_of(Path(p)) for p in outputs)
    if killed:
        row.note = f"killed at {killed[0] / GB:.1f} GB RSS (cap {rss_cap / GB:.0f} GB)"
    elif proc.returncode < 0:
        row.note = f"stopped by signal {-proc.returncode}"
    elif proc.returncode:
        row.note = "failed: " + (text.strip().splitlines() or ["(no output)"])[-1][:160]
    print(f"  {stage:<44} L{layers} {row.wall:8.1f} s  cpu {row.cpu:8.1f} s  peak {row.peak_rss / GB:6.2f} GB  "
          f"in {row.bytes_in / GB:6.2f} GB  out {row.bytes_out / GB:6.2f} GB {row.note}", flush=True)
    return row, text


def python(code: str, *argv) -> list[str]:
    return [sys.executable, "-c", code, *map(str, argv)]


def remove(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


# ---- the jobs -------------------------------------------------------------------------------------------

SYNTH = """
import json, sys
from grokquant.grok.synth import synth
synth(sys.argv[1], "tiny", **json.loads(sys.argv[2]))
"""

MERGED_COPY = """
import sys
from pathlib import Path
from grokquant.grok.checkpoint import Checkpoint
from grokquant.grok.synth import slices_of, write_checkpoint
src, out = Path(sys.argv[1]), Path(sys.argv[2])
with Checkpoint.open(src) as ckpt:
    write_checkpoint(out, ckpt.config, slices_of(ckpt.tensor), (src / "tokenizer.tok.json").read_text(),
                     layout="merged", force=True)
"""

SENTENCEPIECE = """
import sys
import sentencepiece as spm
from grokquant.data.corpus import builtin_text
out, vocab = sys.argv[1], int(sys.argv[2])
open(out + ".txt", "w").write(builtin_text("train", 200_000))
spm.SentencePieceTrainer.train(input=out + ".txt", model_prefix=out, vocab_size=vocab, model_type="bpe",
                               hard_vocab_limit=False, minloglevel=2)
"""

BASELINE = "import torch, grokquant.quantize.run"

QUANTIZE = """
import sys, torch
from grokquant.quantize.run import quantize
from grokquant.quantize.recipe import load_recipe
ckpt, out, vocab, n_tokens, seq_len, expert_batch = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
g = torch.Generator().manual_seed(0)
tokens = torch.randint(vocab, (n_tokens // seq_len, seq_len), generator=g)
options = {"expert_batch": expert_batch} if expert_batch else {}
quantize(ckpt, out, load_recipe("gptq-w4g128"), tokens, force=True, **options)
"""

# the real CLI path at real width, one expert at a time, with a line per work item (its seconds, the RSS
# and the peak so far); it stops itself after the dense linears and `groups` expert groups, because each
# further group repeats the same loads and frees (the whole layer would take hours on 2 cores)
QUANTIZE_PROFILED = """
import os, resource, sys, time, psutil, torch
import grokquant.quantize.run as q
from grokquant.quantize.recipe import load_recipe
ckpt, out, vocab, n_tokens, seq_len, groups = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
g = torch.Generator().manual_seed(0)
tokens = torch.randint(vocab, (n_tokens // seq_len, seq_len), generator=g)
plain, start = q.quantize_items, time.perf_counter()

def profiled(items, *args, **kw):
    t = time.perf_counter()
    for item, result in zip(items, plain(items, *args, **kw)):
        name = item.linear or f"experts[{item.experts[0]}:{item.experts[1]}].{item.proj}"
        print(f"item {name} s {time.perf_counter() - t:.1f} at {time.perf_counter() - start:.1f} "
              f"rss_gb {psutil.Process().memory_info().rss / 1e9:.2f} "
              f"peak_gb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f}", flush=True)
        if item.proj == "w2" and item.experts[1] == groups:
            os._exit(0)
        yield result
        t = time.perf_counter()

q.quantize_items = profiled
q.quantize(ckpt, out, load_recipe("gptq-w4g128"), tokens, force=True, expert_batch=1)
"""

GPTQ_PIECE = """
import resource, sys, time, torch
from grokquant.quant.gptq import gptq
from grokquant.quantize.recipe import load_recipe
rows, cols = int(sys.argv[1]), int(sys.argv[2])
cfg = load_recipe("gptq-w4g128").config_for("experts")
g = torch.Generator().manual_seed(0)
W = torch.randn(1, rows, cols, generator=g) * cols ** -0.5
# inputs with correlated columns: a low-rank mix with a decaying spectrum, plus a little independent noise
rank = min(cols, 512)
mix = torch.randn(rank, cols, generator=g) * torch.logspace(0, -2, rank)[:, None]
H = (mix.T @ mix)[None]
del mix
H.diagonal(dim1=1, dim2=2).add_(1e-3 * H.diagonal(dim1=1, dim2=2).mean())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
gptq(W, H, cfg)
print(f"gptq_seconds {time.perf_counter() - start} setup_rss {before}")
"""


@dataclass
class Bench:
    width: Width
    vocab: int
    cache: Path
    llama_deps: Path
    keep: bool
    rows: list[Row] = field(default_factory=list)

    def ckpt(self, layers: int, width: Width | None = None) -> Path:
        width = width or self.width
        path = self.cache / f"ckpt-{width.name.replace('/', '_')}-L{layers}-v{self.vocab}"
        if not path.exists():
            row, text = measure("synth (setup, cached afterwards)", layers,
                                python(SYNTH, path, json.dumps(width.overrides(layers, self.vocab))),
                                outputs=[path], group="setup")
            self.rows.append(row)
            if not path.exists():
                sys.exit(f"synth failed:\n{text[-3000:]}")
        return path

    def run(self, *args, **kw) -> tuple[Row, str]:
        row, text = measure(*args, **kw)
        self.rows.append(row)
        return row, text

    def drop(self, *paths: Path) -> None:
        if not self.keep:
            remove(*paths)

    # 1. grokquant convert
    def convert(self, layers: int, types=("q8_0", "q4_k_m")) -> None:
        ckpt = self.ckpt(layers)
        for t in types:
            out = self.cache / f"ours-{t}-L{layers}.gguf"
            self.run(f"grokquant convert --type {t}", layers, self.grokquant("convert", ckpt, "-o", out,
                     "--type", t, "--force"), [ckpt], [out])
            if t != "bf16":
                self.drop(out)

    def calibrate(self, layers: int) -> None:
        """The imatrix pass (no Hessians) with the CLI's default 8192 calibration tokens."""
        ckpt = self.ckpt(layers)
        stats, imatrix = self.cache / f"stats-L{layers}.safetensors", self.cache / f"L{layers}.imatrix.gguf"
        self.run("grokquant calibrate --imatrix (8192 tokens)", layers,
                 self.grokquant("calibrate", ckpt, "-o", stats, "--imatrix", imatrix, "--device", "cpu", "--force"),
                 [ckpt], [stats, imatrix], group="calibrate")
        self.drop(stats, imatrix)

    def grokquant(self, *args) -> list[str]:
        return [sys.executable, "-m", "grokquant", *map(str, args)]

    # 2. llama.cpp on the same layer
    def llama(self) -> None:
        ckpt = self.ckpt(1)
        bf16 = self.cache / "ours-bf16-L1.gguf"
        self.convert(1, ("bf16",))
        for t in ("q8_0", "q4_k_m"):
            out = self.cache / f"llama-{t}-L1.gguf"
            self.run(f"llama_model_quantize {t} (from our bf16)", 1,
                     [sys.executable, str(RUNNER), "quantize", str(bf16), str(out), str(FTYPES[t][0]), "0"],
                     [bf16], [out], group="llama.cpp")
            self.drop(out)
        self.drop(bf16)

        why = self.llama_converter_missing()
        if why:
            self.rows.append(Row("llama.cpp convert_hf_to_gguf", 1, note=f"skipped: {why}", group="llama.cpp"))
            print(f"  llama.cpp's converter skipped: {why}")
            return
        merged = self.cache / "merged-L1"
        deps = {"PYTHONPATH": str(self.llama_deps)}
        self.run("merged, renamed copy (for llama.cpp)", 1, python(MERGED_COPY, ckpt, merged), [ckpt], [merged],
                 group="llama.cpp")
        self.run("SentencePiece tokenizer.model (for llama.cpp)", 1,
                 python(SENTENCEPIECE, merged / "tokenizer", self.vocab), env=deps, group="setup")
        for t in ("bf16", "q8_0"):
            out = self.cache / f"llama-convert-{t}-L1.gguf"
            self.run(f"llama.cpp convert_hf_to_gguf --outtype {t}", 1,
                     [sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(merged), "--outfile", str(out),
                      "--outtype", t], [merged], [out], env=deps, group="llama.cpp")
            self.drop(out)
        self.drop(merged)

    @staticmethod
    def quantize_has_expert_batch() -> bool:
        probe = "import inspect; from grokquant.quantize.run import quantize; " \
                "print('expert_batch' in inspect.signature(quantize).parameters)"
        return subprocess.run(python(probe), capture_output=True, text=True).stdout.strip() == "True"

    def llama_converter_missing(self) -> str | None:
        script = LLAMA_CPP / "convert_hf_to_gguf.py"
        if not script.exists():
            return f"{script} not found"
        probe = subprocess.run([sys.executable, "-c", "import transformers, sentencepiece"], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(self.llama_deps)})
        if probe.returncode:
            return (f"its imports fail ({probe.stderr.strip().splitlines()[-1]}); install them with "
                    f"`pip install --target {self.llama_deps} --no-deps transformers sentencepiece tokenizers "
                    f"huggingface-hub httpx2 httpcore2 h11 truststore`")
        return None

    # 3. GPTQ
    def gptq(self, fractions: list[float], n_tokens: int, seq_len: int) -> None:
        base, _ = self.run("interpreter + torch baseline", 0, python(BASELINE), group="gptq")
        # the experts quantized together: all 8 (the default), and one at a time where quantize() offers it
        batches = [0, 1] if self.quantize_has_expert_batch() else [0]
        for f in fractions:
            width = self.width.scaled(f)
            ckpt = self.ckpt(1, width)
            out = self.cache / f"gptq-{width.name.replace('/', '_')}"
            for eb in batches:
                row, _ = self.run(f"quantize gptq-w4g128, width {width.name}, experts x{eb or 8}", 1,
                                  python(QUANTIZE, ckpt, out, self.vocab, n_tokens, seq_len, eb), [ckpt], [out],
                                  group="gptq")
                row.extra = {"fraction": f, "full_peak": base.peak_rss + (row.peak_rss - base.peak_rss) / f ** 2}
                self.drop(out)
        h, moe = self.width.hidden, self.width.moe
        for name, rows, cols in (("expert w1", moe, h), ("expert w2", h, moe)):
            row, text = self.run(f"gptq() one {name} [{rows}x{cols}]", 1, python(GPTQ_PIECE, rows, cols),
                                 group="gptq")
            fields = text.split()
            if "gptq_seconds" in fields:
                row.extra = {"rows": rows, "cols": cols,
                             "seconds": float(fields[fields.index("gptq_seconds") + 1]),
                             "setup_rss": int(fields[fields.index("setup_rss") + 1])}


    def gptq_full(self, groups: int, n_tokens: int, seq_len: int) -> None:
        ckpt = self.ckpt(1)
        out = self.cache / "gptq-full"
        row, text = self.run(f"quantize gptq-w4g128, width {self.width.name}, experts x1, dense + {groups}/8 groups",
                             1, python(QUANTIZE_PROFILED, ckpt, out, self.vocab, n_tokens, seq_len, groups),
                             [ckpt], group="gptq-full")
        row.extra = {"items": [line.split(maxsplit=1)[1] for line in text.splitlines() if line.startswith("item ")],
                     "groups": groups}
        self.drop(out, out.with_name(f".{out.name}.partial"))


# ---- projections and the report ---------------------------------------------------------------------------

def embedding_layers(width: Width) -> float:
    """The full-vocabulary embedding and lm_head, in decoder-layer equivalents (by parameter count)."""
    return 2 * FULL_VOCAB * width.hidden / width.layer_params


def held_delta(stage: str, width: Width, vocab: int) -> int:
    """Extra peak at the full vocabulary: a bigger tensor held whole than any held here (derived)."""
    if stage.startswith("grokquant convert"):  # reads one source tensor (one expert) at a time, in bf16
        largest = max(width.dense, width.moe, vocab) * width.hidden
        return 2 * max(0, FULL_VOCAB * width.hidden - largest)
    if stage.startswith("llama"):  # holds one GGUF tensor (8 experts stacked) and its float32 copy
        largest = max(width.dense, 8 * width.moe, vocab) * width.hidden
        return 6 * max(0, FULL_VOCAB * width.hidden - largest)
    return 0


def projections(rows: list[Row], width: Width, vocab: int) -> dict[str, dict]:
    """Per stage: seconds per layer, projected 64-layer seconds and peak RSS."""
    out = {}
    extra = embedding_layers(width)
    for stage in dict.fromkeys(r.stage for r in rows if r.group in ("convert", "llama.cpp") and not r.note):
        runs = sorted((r for r in rows if r.stage == stage and not r.note), key=lambda r: r.layers)
        # the run with the most layers, fixed costs included: on shared cores the difference of two
        # runs is noise as often as it is the cost of a layer
        per_layer = runs[-1].wall / runs[-1].layers
        out[stage] = {"per_layer": per_layer, "seconds64": per_layer * (FULL_LAYERS + extra),
                      "peak64": max(r.peak_rss for r in runs) + held_delta(stage, width, vocab),
                      "layers": runs[-1].layers}
    return out


def width_fit(points: list[tuple[float, int]]) -> tuple[float, float] | None:
    """(a, b) with peak over baseline = a·f² + b·f through two (fraction, bytes) points: weights and
    Hessians grow with the square of the width, the calibration activations linearly."""
    if len(points) != 2 or points[0][0] == points[1][0]:
        return None
    (f1, y1), (f2, y2) = points
    a = (y1 / f1 - y2 / f2) / (f1 - f2)
    b = y1 / f1 - a * f1
    return (a, b) if a > 0 and b >= 0 else None


def gptq_layer_seconds(rows: list[Row], width: Width) -> tuple[float, list[tuple[str, float]]] | None:
    """One layer's GPTQ seconds from the measured pieces: each linear scaled from the measured matrix with
    the nearest input width by (rows x cols²), the cost of the lazy block update (the Cholesky, ∝ cols³,
    is under-counted for the dense down projection, whose 32768 columns no piece has)."""
    pieces = [r.extra for r in rows if r.group == "gptq" and "seconds" in r.extra]
    if not pieces:
        return None
    parts = []
    for name, r, c, n in width.linears():
        p = min(pieces, key=lambda p: (abs(math.log(c / p["cols"])), -p["cols"]))
        parts.append((name, n * p["seconds"] * (r * c * c) / (p["rows"] * p["cols"] ** 2)))
    return sum(s for _, s in parts), parts


def report(bench: Bench) -> None:
    rows, width = bench.rows, bench.width
    proj = projections(rows, width, bench.vocab)
    print(f"\n== {width.name} width: hidden {width.hidden}, {width.hidden // width.head_dim}x{width.head_dim} query "
          f"heads, dense MLP {width.dense}, 8 experts of {width.moe}; vocabulary {bench.vocab}; "
          f"{os.cpu_count()} cores; one layer = {width.layer_params / 1e9:.2f} B parameters ==")
    print(f"{'stage':<46}{'L':>2}{'wall s':>9}{'cpu s':>9}{'peak GB':>9}{'in GB':>8}{'out GB':>8}"
          f"{'disk r/w GB':>13}{'s/layer':>9}{'64L h':>8}{'64L peak':>9}")
    for r in rows:
        p = proj.get(r.stage)
        tail = (f"{p['per_layer']:>9.1f}{p['seconds64'] / 3600:>8.1f}{p['peak64'] / GB:>9.2f}"
                if p and r.layers == p["layers"] and not r.note else "")
        if r.note.startswith("skipped"):
            print(f"{r.stage:<46}{r.layers:>2}  {r.note}")
            continue
        print(f"{r.stage:<46}{r.layers:>2}{r.wall:>9.1f}{r.cpu:>9.1f}{r.peak_rss / GB:>9.2f}{r.bytes_in / GB:>8.2f}"
              f"{r.bytes_out / GB:>8.2f}{f'{r.disk_read / GB:.1f}/{r.disk_written / GB:.1f}':>13}{tail}"
              + (f"  {r.note}" if r.note else ""))

    def ratio(ours: str, theirs: str, what: str) -> None:
        a, b = stages.get(ours), stages.get(theirs)
        if a and b:
            print(f"  {what:<62} time {a.wall / b.wall:5.2f}x  cpu {a.cpu / b.cpu:5.2f}x  "
                  f"peak RSS {a.peak_rss / b.peak_rss:5.2f}x")

    stages = {r.stage: r for r in rows if r.layers == 1 and not r.note}
    print("\nours / llama.cpp on the same layer (below 1: ours is faster / smaller)")
    ratio("grokquant convert --type q8_0", "llama_model_quantize q8_0 (from our bf16)", "q8_0: convert from shards / llama_model_quantize from bf16")
    ratio("grokquant convert --type q4_k_m", "llama_model_quantize q4_k_m (from our bf16)",
          "q4_k_m: convert from shards / llama_model_quantize from bf16")
    ratio("grokquant convert --type bf16", "llama.cpp convert_hf_to_gguf --outtype bf16",
          "bf16: convert from shards / convert_hf_to_gguf from merged copy")
    ratio("grokquant convert --type q8_0", "llama.cpp convert_hf_to_gguf --outtype q8_0",
          "q8_0: convert from shards / convert_hf_to_gguf from merged copy")
    chain = ["merged, renamed copy (for llama.cpp)", "llama.cpp convert_hf_to_gguf --outtype bf16",
             "llama_model_quantize q4_k_m (from our bf16)"]
    if all(s in stages for s in chain) and "grokquant convert --type q4_k_m" in stages:
        theirs = sum(stages[s].wall for s in chain)
        print(f"  {'q4_k_m end to end: ours / (merged copy + convert_hf_to_gguf + quantize)':<62} "
              f"time {stages['grokquant convert --type q4_k_m'].wall / theirs:5.2f}x")

    quant = [r for r in rows if "fraction" in r.extra]
    if quant:
        print(f"\nGPTQ (`quantize --recipe gptq-w4g128`, 1 layer), peak over the baseline extrapolated to width "
              f"{width.name} by 1/f²:")
        for r in quant:
            print(f"  {r.stage:<50} {r.wall:8.1f} s  peak {r.peak_rss / GB:6.2f} GB -> {r.extra['full_peak'] / GB:6.1f} GB")
        base = next(r.peak_rss for r in rows if r.stage.startswith("interpreter"))
        for mode in dict.fromkeys(r.stage.rsplit(", ", 1)[1] for r in quant):
            fit = width_fit([(r.extra["fraction"], r.peak_rss - base) for r in quant if r.stage.endswith(mode)])
            if fit:
                a, b = fit
                print(f"  {mode}: peak over baseline = {a / GB:.1f} GB x f² (weights, Hessians) + {b / GB:.2f} GB x f "
                      f"(activations of the calibration tokens) -> at width {width.name}: {(base + a + b) / GB:.1f} GB")
    for r in rows:
        if r.group == "gptq-full" and r.extra.get("items"):
            print(f"\n{r.stage}: per work item (seconds, RSS after it, peak so far)")
            for line in r.extra["items"]:
                print(f"  {line}")
            at = {f[0]: float(f[4]) for f in map(str.split, r.extra["items"])}  # seconds since the start
            ends = [at["mlp.down_proj"]] + [at[f"experts[{e}:{e + 1}].w2"] for e in range(r.extra["groups"])
                                            if f"experts[{e}:{e + 1}].w2" in at]
            group = [b - a for a, b in zip(ends, ends[1:])]  # loading, routing, statistics and GPTQ of one expert
            if group:
                layer_s = ends[0] + 8 * max(group)
                print(f"  peak {r.peak_rss / GB:.2f} GB; dense part {ends[0]:.0f} s, expert groups "
                      f"{', '.join(f'{g:.0f}' for g in group)} s; a whole layer (8 groups, each as the slowest): "
                      f"{layer_s:.0f} s; 64 layers: {64 * layer_s / 3600:.0f} h on these cores")
    layer = gptq_layer_seconds(rows, width)
    if layer:
        total, parts = layer
        print(f"GPTQ seconds per layer at this width from the measured pieces: {total:.0f} s "
              f"({', '.join(f'{n} {s:.0f}' for n, s in parts)}); 64 layers: {64 * total / 3600:.1f} h")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny widths: a smoke test of every stage")
    ap.add_argument("--layers", type=int, nargs="+", help="layer counts for the convert path (default 1 2)")
    ap.add_argument("--vocab", type=int, help="reduced vocabulary (default 4096; --small 512)")
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_k_m"], help="convert types timed on every layer count")
    ap.add_argument("--parts", nargs="+", default=["convert", "calibrate", "llama", "gptq"],
                    choices=["convert", "calibrate", "llama", "gptq", "gptq-full"],
                    help="gptq-full: quantize at real width with one expert at a time, profiled per work item "
                         "(not in the default: hours)")
    ap.add_argument("--groups", type=int, default=2, help="gptq-full: expert groups to run before stopping")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/grokquant-scale"))
    ap.add_argument("--llama-deps", type=Path, help="folder with transformers + sentencepiece for llama.cpp's "
                                                    "converter (default CACHE/llpkgs)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (default: deleted once measured)")
    ap.add_argument("--report", type=Path, help="print the tables of a saved results.json and run nothing")
    args = ap.parse_args()
    width = SMALL if args.small else REAL
    vocab = args.vocab or (512 if args.small else 4096)
    cache = args.cache / "small" if args.small else args.cache
    bench = Bench(width, vocab, cache, args.llama_deps or args.cache / "llpkgs", args.keep)
    if args.report:
        bench.rows = [Row(**r) for r in json.loads(args.report.read_text())]
        report(bench)
        return
    cache.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "grokquant"], capture_output=True,
                           text=True)
    print(f"grokquant at {commit.stdout.strip() or '?'}{' with uncommitted changes' if dirty.stdout.strip() else ''}; "
          f"cache {cache}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    layers = args.layers or [1, 2]
    # llama.cpp's copies of the 1-layer checkpoint are made before the 2-layer one exists (disk)
    if "convert" in args.parts:
        bench.convert(layers[0], args.types)
    if "llama" in args.parts:
        bench.llama()
    if "convert" in args.parts:
        for n in layers[1:]:
            bench.convert(n, args.types)
    if "gptq" in args.parts:
        if args.small:
            bench.gptq([1.0], n_tokens=256, seq_len=64)
        else:
            bench.gptq([1 / 8, 1 / 4], n_tokens=8192, seq_len=512)
    if "calibrate" in args.parts:
        bench.calibrate(layers[0])
    if "gptq-full" in args.parts:
        bench.gptq_full(args.groups, n_tokens=256 if args.small else 8192, seq_len=64 if args.small else 512)
    report(bench)
    (cache / "results.json").write_text(json.dumps([asdict(r) for r in bench.rows], indent=1))


if __name__ == "__main__":
    main()
