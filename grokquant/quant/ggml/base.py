"""GGML block quantizers: one small class per type, vectorized over every block of a tensor.

A quantizer turns float32 rows [rows, n] into the type's bytes [rows, row_bytes] (uint8) and back.
The reference path (no importance weights) is bit-identical to ggml's `quantize_row_*_ref`; with
`imatrix` (one weight per column, spec quant.md §7) it follows ggml's `quantize_*_impl` routines.
Types register themselves in `QUANTIZERS` by GGML name.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from grokquant.quant.ggml.types import TYPES, GGMLType

QUANTIZERS: dict[str, "Quantizer"] = {}


class Quantizer:
    """Base class: subclasses set `name` and implement `quantize_blocks` / `dequantize_blocks`."""

    name: str = ""

    @property
    def type(self) -> GGMLType:
        return TYPES[self.name]

    def quantize(self, x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """float rows [rows, n] -> uint8 [rows, n / block * block_bytes]."""
        x = x.float().contiguous()
        rows, n = x.shape
        t = self.type
        if n % t.block:
            raise ValueError(f"{t.name}: row length {n} is not a multiple of {t.block}")
        blocks = x.view(rows * (n // t.block), t.block)
        qw = None
        if imatrix is not None:
            qw = imatrix.float().reshape(1, n // t.block, t.block).expand(rows, -1, -1).reshape(-1, t.block)
        out = self.quantize_blocks(blocks, qw)
        return out.view(rows, n // t.block * t.block_bytes)

    def dequantize(self, data: torch.Tensor, n: int) -> torch.Tensor:
        """uint8 [rows, row_bytes] -> float32 [rows, n]."""
        t = self.type
        rows = data.shape[0]
        blocks = data.reshape(rows * (n // t.block), t.block_bytes)
        return self.dequantize_blocks(blocks).view(rows, n)

    # per-type work, on [n_blocks, block] floats / [n_blocks, block_bytes] bytes
    def quantize_blocks(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_blocks(self, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def register(cls):
    QUANTIZERS[cls.name] = cls()
    return cls


# ---- running over chunks of blocks ---------------------------------------------------------------

_worker = threading.local()


def for_each_chunk(fn: Callable[[int, int], None], total: int, chunk: int, device: torch.device) -> None:
    """Call fn(start, stop) on consecutive ranges of `total` blocks.

    On CPU the ranges run on torch.get_num_threads() Python threads whose own torch ops are serial,
    not on torch's intra-op threads: the searches issue thousands of mid-sized ops, an OpenMP team
    meets at a barrier after each, and on a busy machine one descheduled member stalls every barrier
    (measured up to 100x slower on 2 shared cores). Independent threads never wait for each other.
    """
    ranges = [(s, min(s + chunk, total)) for s in range(0, total, chunk)]
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1 or len(ranges) < 2:
        for start, stop in ranges:
            fn(start, stop)
        return

    def run(r):
        if not getattr(_worker, "serial", False):
            torch.set_num_threads(1)  # OpenMP's setting is per thread
            _worker.serial = True
        fn(*r)

    try:
        with ThreadPoolExecutor(min(n, len(ranges))) as pool:
            list(pool.map(run, ranges))
    finally:
        torch.set_num_threads(n)  # the default new threads start from


# ---- shared bit-level helpers -------------------------------------------------------------------

def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float [..., k] -> little-endian fp16 bytes [..., 2k] (round to nearest even, as ggml)."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2k] -> float32 [..., k]."""
    return b.contiguous().view(torch.float16).float()


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


# ---- float types ------------------------------------------------------------------------------------

@register
class F32(Quantizer):
    name = "F32"

    def quantize_blocks(self, x, qw):
        return x.contiguous().view(torch.uint8)

    def dequantize_blocks(self, b):
        return b.contiguous().view(torch.float32)


@register
class F16(Quantizer):
    name = "F16"

    def quantize_blocks(self, x, qw):
        return fp16_bytes(x)

    def dequantize_blocks(self, b):
        return fp16_from_bytes(b)


@register
class BF16(Quantizer):
    name = "BF16"

    def quantize_blocks(self, x, qw):
        return x.to(torch.bfloat16).contiguous().view(torch.uint8)

    def dequantize_blocks(self, b):
        return b.contiguous().view(torch.bfloat16).float()


def quantize(x: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize a tensor in torch order (last dim = row); leading dims are flattened into rows."""
    q = QUANTIZERS[type_name]
    rows = x.reshape(-1, x.shape[-1])
    return q.quantize(rows, imatrix)


def dequantize(data: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    q = QUANTIZERS[type_name]
    rows = data.reshape(-1, q.type.row_bytes(shape[-1]))
    return q.dequantize(rows, shape[-1]).view(shape)


# Each module below registers its types on import.
from grokquant.quant.ggml import kquants as ggml_kquants  # noqa: E402,F401
from grokquant.quant.ggml import legacy as ggml_legacy  # noqa: E402,F401
from grokquant.quant.ggml import iquants as ggml_iquants  # noqa: E402,F401
