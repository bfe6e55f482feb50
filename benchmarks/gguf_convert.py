"""GGUF conversion speed and memory, measured against llama.cpp in the same run.

    python benchmarks/gguf_convert.py [--rows 4096 --cols 4096] [--layers 2 --hidden 1024 --moe 4096]

1. Quantizer throughput on the same float32 matrix: ours (torch, all cores) versus ggml's C
   quantizer (`ggml_quantize_chunk` from llama-cpp-python's libggml, run on all cores in row chunks
   as llama-quantize does), plain and with an importance matrix, bytes compared, for every type in
   --types (default: Q8_0, Q4_K, Q6_K and the seven 1-3 bit i-quants).
2. End to end on a synthetic checkpoint: `grokquant convert --type q4_k_m` from the original bf16
   shards versus `llama_model_quantize` (Q4_K_M) from our bf16 GGUF of the same checkpoint: wall
   time and peak RSS, each in its own process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from grokquant.profiling import run_measured
from grokquant.quant.ggml.base import quantize
from grokquant.quant.ggml.reference import ggml_quantize
from grokquant.grok.synth import synth

RUNNER = Path(__file__).resolve().parent.parent / "tests" / "llama_runner.py"


def best_of(fn, repeat=3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ggml_parallel(type_name: str, x: np.ndarray, imatrix: np.ndarray | None, threads: int) -> np.ndarray:
    chunks = np.array_split(x, threads)
    with ThreadPoolExecutor(threads) as pool:  # ctypes releases the GIL during the C call
        return np.concatenate(list(pool.map(lambda c: ggml_quantize(type_name, c, imatrix), chunks)))


DEFAULT_TYPES = "Q8_0,Q4_K,Q6_K,IQ3_S,IQ3_XXS,IQ2_S,IQ2_XS,IQ2_XXS,IQ1_M,IQ1_S"
# ggml_quantize_requires_imatrix (ggml.c): ggml asserts on these without importance
PLAIN_REFUSED = {"IQ2_XXS", "IQ2_XS", "IQ1_S"}


def quantizer_table(rows: int, cols: int, types: list[str]) -> None:
    """Ours against ggml's C on the same matrix, plain and importance-weighted, bytes compared."""
    threads = os.cpu_count() or 1
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=gen)
    # a calibration-like importance: positive, spread over orders of magnitude
    imatrix = torch.exp(2 * torch.randn(cols, generator=gen))
    xn, qn = x.numpy(), imatrix.numpy()
    mb = x.numel() * 4 / 1e6
    print(f"quantizer throughput on a {rows}x{cols} float32 matrix ({mb:.0f} MB), {threads} cores")
    print(f"{'type':<9}{'path':<9}{'ours MB/s':>10}{'ggml MB/s':>10}{'ggml 1-thr':>11}{'ours/ggml':>10}  bytes")
    for t in types:
        for path, qw in (("plain", None), ("imatrix", imatrix)):
            if qw is None and t in PLAIN_REFUSED:
                continue  # ggml refuses to quantize these without importance
            ours_bytes = quantize(x, t, qw)  # warm-up (grids, compiled kernels) and the bytes to compare
            ref_bytes = ggml_parallel(t, xn, None if qw is None else qn, threads)
            same = np.array_equal(ours_bytes.numpy(), ref_bytes)
            ours = best_of(lambda: quantize(x, t, qw))
            ref = best_of(lambda: ggml_parallel(t, xn, None if qw is None else qn, threads))
            ref1 = best_of(lambda: ggml_quantize(t, xn, None if qw is None else qn), repeat=1)
            print(f"{t:<9}{path:<9}{mb / ours:>10.1f}{mb / ref:>10.1f}{mb / ref1:>11.1f}{ref / ours:>9.2f}x  "
                  f"{'identical' if same else 'DIFFER'}", flush=True)


def end_to_end(layers: int, hidden: int, moe: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = synth(tmp / "ckpt", "small", num_hidden_layers=layers, hidden_size=hidden,
                     moe_intermediate_size=moe, intermediate_size=moe, num_attention_heads=hidden // 64)
        gq = [sys.executable, "-m", "grokquant", "convert", str(ckpt)]
        ours = run_measured(gq + ["-o", str(tmp / "ours.gguf"), "--type", "q4_k_m"])
        bf16 = run_measured(gq + ["-o", str(tmp / "bf16.gguf"), "--type", "bf16"])
        ref = run_measured([sys.executable, str(RUNNER), "quantize", str(tmp / "bf16.gguf"), str(tmp / "ref.gguf"),
                            "15", "0"])
        for m in (ours, bf16, ref):
            if m.returncode:
                sys.exit(m.stderr[-2000:])
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        print(f"\nend to end: {layers} layers, hidden {hidden}, experts 8 x {moe}; {size / 1e9:.2f} GB of bf16 shards")
        print(f"{'job':<44}{'seconds':>9}{'peak RSS MB':>13}")
        print(f"{'grokquant convert --type q4_k_m (from shards)':<44}{ours.seconds:>9.1f}{ours.peak_rss / 1e6:>13.0f}")
        print(f"{'grokquant convert --type bf16':<44}{bf16.seconds:>9.1f}{bf16.peak_rss / 1e6:>13.0f}")
        print(f"{'llama_model_quantize Q4_K_M (from bf16 GGUF)':<44}{ref.seconds:>9.1f}{ref.peak_rss / 1e6:>13.0f}")
        print(f"ratio: ours / llama.cpp time {ours.seconds / ref.seconds:.2f}, "
              f"peak RSS {ours.peak_rss / ref.peak_rss:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--moe", type=int, default=4096)
    ap.add_argument("--types", default=DEFAULT_TYPES, help="comma-separated GGML types for the quantizer table")
    ap.add_argument("--no-end-to-end", action="store_true", help="only the quantizer table")
    args = ap.parse_args()
    quantizer_table(args.rows, args.cols, args.types.split(","))
    if not args.no_end_to_end:
        end_to_end(args.layers, args.hidden, args.moe)


if __name__ == "__main__":
    main()
