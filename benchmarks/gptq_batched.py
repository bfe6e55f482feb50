"""Batched GPTQ over the 8 experts of a projection versus one expert at a time (same results).

    python benchmarks/gptq_batched.py [--rows 512 --cols 1024 --experts 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from grokquant.quant.gptq import IntQuantConfig, gptq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    E, rows, cols = args.experts, args.rows, args.cols
    X = torch.randn(E, 4 * cols, cols, generator=g)
    H = X.transpose(1, 2) @ X
    W = torch.randn(E, rows, cols, generator=g)
    cfg = IntQuantConfig(bits=4, group_size=128, act_order=True)

    start = time.perf_counter()
    batched = gptq(W, H, cfg)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    looped = [gptq(W[e:e + 1], H[e:e + 1], cfg) for e in range(E)]
    t_loop = time.perf_counter() - start
    same = all(torch.equal(looped[e].codes[0], batched.codes[e]) for e in range(E))
    print(f"GPTQ w4 g128 act-order, {E} experts of [{rows}, {cols}] on {torch.get_num_threads()} threads")
    print(f"one at a time {t_loop:.2f} s, batched {t_batched:.2f} s: speed-up {t_loop / t_batched:.2f}x; "
          f"identical codes: {same}")


if __name__ == "__main__":
    main()
