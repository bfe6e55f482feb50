"""GPU against CPU for the calibrated paths: GPTQ of one expert projection, Hessian accumulation, and the
GGML quantizers' throughput, each on --device and on the CPU in the same run, with how far the results agree.

    python benchmarks/gpu.py                                   # CUDA, a real-width expert w1 (16384 x 8192)
    python benchmarks/gpu.py --device cpu --rows 1024 --cols 1024 --tokens 4096    # the CPU check (~1 min)

1. `quant.gptq.gptq` (4-bit, group 128, act-order) on one [rows x cols] matrix with the Hessian of
   correlated inputs: seconds on each device, the share of identical codes and the relative objective gap
   (float32 reductions run in another order on a GPU, so a code near a rounding boundary may flip).
2. Hessian accumulation X^T X over --tokens tokens in batches of 512 (what `calibrate` and `quantize` do per
   linear): tokens/s on each device, max relative difference.
3. GGML quantizers (Q4_K, Q6_K, IQ4_XS, IQ2_XS with an imatrix): params/s. Their searches are compiled CPU
   kernels (numba, bytes identical to ggml's); on a GPU device the blocks are copied to the CPU and back, so
   this row measures that round trip, and the bytes must be identical.
"""

from __future__ import annotations

import argparse
import time

import torch

from grokquant.quant.ggml.base import quantize
from grokquant.quant.gptq import IntQuantConfig, gptq


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def correlated_inputs(tokens: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """Inputs with a decaying spectrum and a few hot channels, like a real layer's."""
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    scale = torch.linspace(1, 0.05, cols) ** 2
    X = (torch.randn(tokens, cols, generator=g) * scale) @ mix
    X[:, torch.randint(0, cols, (8,), generator=g)] *= 20
    return X


def bench_gptq(args, devices, g) -> None:
    X = correlated_inputs(args.tokens, args.cols, g)
    H = (X.T @ X)[None]
    W = torch.randn(1, args.rows, args.cols, generator=g) * 0.02
    cfg = IntQuantConfig(bits=4, group_size=128, act_order=True)
    results = {}
    for dev in devices:
        (q, sec) = timed(lambda: gptq(W.to(dev), H.to(dev), cfg), dev)
        results[dev.type] = (q, sec)
        print(f"gptq [{args.rows}x{args.cols}]  {dev.type:5s} {sec:9.2f} s   objective {float(q.hessian_error[0]):.6g}")
    if len(devices) == 2:
        (qc, sc), (qd, sd) = results["cpu"], results[devices[0].type]
        same = (qc.codes.cpu() == qd.codes.cpu()).float().mean().item()
        gap = abs(float(qd.hessian_error[0]) - float(qc.hessian_error[0])) / float(qc.hessian_error[0])
        print(f"  {devices[0].type} / cpu speed {sc / sd:.1f}x, identical codes {100 * same:.3f}%, objective gap {gap:.2e}")


def bench_hessian(args, devices, g) -> None:
    X = correlated_inputs(args.tokens, args.cols, g)
    out = {}
    for dev in devices:
        Xd = X.to(dev)

        def run():
            H = torch.zeros(args.cols, args.cols, device=dev)
            for s in range(0, Xd.shape[0], 512):
                H.addmm_(Xd[s:s + 512].T, Xd[s:s + 512])
            return H

        H, sec = timed(run, dev)
        out[dev.type] = H.cpu()
        print(f"hessian [{args.tokens} tokens x {args.cols}] {dev.type:5s} {args.tokens / sec:12.0f} tokens/s")
    if len(devices) == 2:
        a, b = out["cpu"], out[devices[0].type]
        print(f"  max relative difference {((a - b).abs().max() / a.abs().max()).item():.2e}")


def bench_quantizers(args, devices, g) -> None:
    x = torch.randn(args.qrows, 4096, generator=g)
    im = torch.rand(4096, generator=g) + 0.1
    for name in ("Q4_K", "Q6_K", "IQ4_XS", "IQ2_XS"):
        ref = None
        for dev in devices[::-1]:  # the CPU first: its bytes are the reference
            xd, imd = x.to(dev), im.to(dev)
            quantize(xd[:256], name, imd)  # compile / warm up
            data, sec = timed(lambda: quantize(xd, name, imd), dev)
            ref = data.cpu() if ref is None else ref
            same = "identical" if torch.equal(data.cpu(), ref) else "DIFFER"
            print(f"{name:7s} {dev.type:5s} {x.numel() / sec / 1e6:9.1f} Mparams/s  bytes {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--qrows", type=int, default=2048, help="rows of 4096 for the quantizer rows")
    ap.add_argument("--parts", default="gptq,hessian,quantizers")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: use --device cpu")
    devices = [dev] if dev.type == "cpu" else [dev, torch.device("cpu")]
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"{torch.get_num_threads()} CPU threads")
    g = torch.Generator().manual_seed(0)
    parts = args.parts.split(",")
    if "gptq" in parts:
        bench_gptq(args, devices, g)
    if "hessian" in parts:
        bench_hessian(args, devices, g)
    if "quantizers" in parts:
        bench_quantizers(args, devices, g)


if __name__ == "__main__":
    main()
