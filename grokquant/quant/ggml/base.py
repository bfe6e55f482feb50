"""GGML block quantizers: one small class per type, vectorized over every block of a tensor.

A quantizer turns float32 rows [rows, n] into the type's bytes [rows, row_bytes] (uint8) and back.
The reference path (no importance weights) is bit-identical to ggml's `quantize_row_*_ref`; with
`imatrix` (one weight per column) it follows ggml's `quantize_*_impl` routines (ggml-quants.c).
Types register themselves in `QUANTIZERS` by GGML name when their class is defined.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from grokquant.quant.ggml.types import TYPES, GGMLType

QUANTIZERS: dict[str, "Quantizer"] = {}


class Quantizer:
    """Base class: a type's class passes `name=` (which registers it), owns its block layout (`fp16_scales`,
    the packing methods) and implements `quantize_chunk` (or `quantize_blocks`) and `dequantize_blocks`."""

    name: str = ""
    fp16_scales: slice | None = None  # bytes of the block's fp16 scale fields (d, dmin), which must be finite
    chunk: int = 1024  # blocks per call of quantize_chunk

    def __init_subclass__(cls, name: str = "", **kwargs):
        """`class Q4_K(Quantizer, name="Q4_K")` registers an instance under the GGML name (gguf-py's style)."""
        super().__init_subclass__(**kwargs)
        if name:
            cls.name = name
            QUANTIZERS[name] = cls()

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
    def quantize_blocks(self, x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
        return quantize_chunks(self.quantize_chunk, self.type.block_bytes, self.chunk, x, qw)

    def quantize_chunk(self, out: torch.Tensor, x: torch.Tensor, qw: torch.Tensor | None, buf: "Scratch") -> None:
        """Write the bytes of blocks x (weights qw or None) into out, using scratch tensors from buf."""
        raise NotImplementedError

    def dequantize_blocks(self, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # The grid a block's stored parameters define, for rounding onto it one column at a time (GPTQ inside
    # GGML blocks, quant/gptq_ggml.py): element i of a block can take scale_i * levels[c] + offset_i for
    # each code c, and the block's bytes hold the codes apart from the parameters.
    levels: torch.Tensor | None = None  # code -> level (float32, ascending)

    def grid(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blocks [nb, block_bytes] -> per element (scale, offset or None) [nb, block], as the dequantizer
        reads them."""
        raise NotImplementedError(f"{self.name} has no fixed-grid rounding")

    def with_codes(self, b: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Blocks b with their codes replaced: codes [nb, block] index `levels`, in element order."""
        raise NotImplementedError(f"{self.name} has no fixed-grid rounding")


# ---- running over chunks of blocks ---------------------------------------------------------------

class Scratch:
    """Named scratch tensors reused from chunk to chunk: a fresh multi-MB tensor page-faults on first touch,
    which costs more than the arithmetic done on it."""

    def __init__(self, device: torch.device):
        self.device, self.bufs = device, {}

    def __call__(self, name: str, *shape: int, dtype=torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        b = self.bufs.get(name)
        if b is None or b.numel() < n or b.dtype != dtype:
            b = self.bufs[name] = torch.empty(n, dtype=dtype, device=self.device)
        return b[:n].view(shape)


_worker = threading.local()


def quantize_chunks(fn: Callable[..., None], block_bytes: int, chunk: int, *args: torch.Tensor | None) -> torch.Tensor:
    """uint8 [blocks, block_bytes] filled by fn(out[s:e], *(a[s:e] for a in args), scratch) over consecutive
    ranges of `chunk` blocks (args[0] holds the blocks; None args stay None).

    Each worker thread keeps one Scratch for all its ranges. On CPU the ranges run on torch.get_num_threads()
    Python threads whose own torch ops are serial, not on torch's intra-op threads: the searches issue
    thousands of mid-sized ops, an OpenMP team meets at a barrier after each, and on a busy machine one
    descheduled member stalls every barrier (measured up to 100x slower on 2 shared cores). Independent
    threads never wait for each other.
    """
    x = args[0]
    out = torch.empty(x.shape[0], block_bytes, dtype=torch.uint8, device=x.device)
    local = threading.local()

    def run(start: int, stop: int) -> None:
        if not hasattr(local, "buf"):
            local.buf = Scratch(x.device)
        fn(out[start:stop], *(None if a is None else a[start:stop] for a in args), local.buf)

    ranges = [(s, min(s + chunk, x.shape[0])) for s in range(0, x.shape[0], chunk)]
    n = torch.get_num_threads()
    if x.device.type != "cpu" or n == 1 or len(ranges) < 2:
        for start, stop in ranges:
            run(start, stop)
        return out

    def serial_run(r):
        if not getattr(_worker, "serial", False):
            torch.set_num_threads(1)  # OpenMP's setting is per thread
            _worker.serial = True
        run(*r)

    try:
        with ThreadPoolExecutor(min(n, len(ranges))) as pool:
            list(pool.map(serial_run, ranges))
    finally:
        torch.set_num_threads(n)  # the default new threads start from
    return out


# ---- fp16 fields ---------------------------------------------------------------------------------

def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float [..., k] -> little-endian fp16 bytes [..., 2k] (round to nearest even, as ggml)."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2k] -> float32 [..., k]."""
    return b.contiguous().view(torch.float16).float()


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


# ---- float types ------------------------------------------------------------------------------------

class F32(Quantizer, name="F32"):
    def quantize_blocks(self, x, qw):
        return x.contiguous().view(torch.uint8)

    def dequantize_blocks(self, b):
        return b.contiguous().view(torch.float32)


class F16(Quantizer, name="F16"):
    def quantize_blocks(self, x, qw):
        return fp16_bytes(x)

    def dequantize_blocks(self, b):
        return fp16_from_bytes(b)


class BF16(Quantizer, name="BF16"):
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
from grokquant.quant.ggml import iq2 as ggml_iq2  # noqa: E402,F401
from grokquant.quant.ggml import iq3 as ggml_iq3  # noqa: E402,F401
from grokquant.quant.ggml import iq1 as ggml_iq1  # noqa: E402,F401
