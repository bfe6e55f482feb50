"""GGUF conversion speed and memory, measured against llama.cpp in the same run.

    python benchmarks/gguf_convert.py [--rows 4096 --cols 4096] [--layers 2 --hidden 1024 --moe 4096]

1. Quantizer throughput on the same float32 matrix: ours (torch, all cores) versus ggml's C
   quantizer (`ggml_quantize_chunk` from llama-cpp-python's libggml, run on all cores in row chunks
   as llama-quantize does), for Q8_0, Q4_K and Q6_K.
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


def ggml_parallel(type_name: str, x: np.ndarray, threads: int) -> None:
    chunks = np.array_split(x, threads)
    with ThreadPoolExecutor(threads) as pool:  # ctypes releases the GIL during the C call
        list(pool.map(lambda c: ggml_quantize(type_name, c), chunks))


def quantizer_table(rows: int, cols: int) -> None:
    threads = os.cpu_count() or 1
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    mb = x.numel() * 4 / 1e6
    print(f"quantizer throughput on a {rows}x{cols} float32 matrix ({mb:.0f} MB), {threads} cores")
    print(f"{'type':<6}{'ours MB/s':>12}{'ggml MB/s':>12}{'ggml 1-thread':>15}{'ours / ggml':>13}")
    for t in ("Q8_0", "Q4_K", "Q6_K"):
        ours = best_of(lambda: quantize(x, t))
        ref = best_of(lambda: ggml_parallel(t, xn, threads))
        ref1 = best_of(lambda: ggml_quantize(t, xn), repeat=1)
        print(f"{t:<6}{mb / ours:>12.0f}{mb / ref:>12.0f}{mb / ref1:>15.0f}{ref / ours:>13.2f}x")


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
    args = ap.parse_args()
    quantizer_table(args.rows, args.cols)
    end_to_end(args.layers, args.hidden, args.moe)


if __name__ == "__main__":
    main()
