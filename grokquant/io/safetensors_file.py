"""One safetensors file: header parsing with validation, and memory-mapped tensor reads.

We parse headers ourselves (rather than through `safetensors.safe_open`) so that a truncated or
corrupt file becomes a precise problem report, and so that reads can hand pages back to the kernel
(`madvise(MADV_DONTNEED)`) once copied: resident memory then stays bounded by what the caller holds,
not by how much of a 17 GB shard has been touched.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2), "F32": (torch.float32, 4),
    "F64": (torch.float64, 8), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
    "I16": (torch.int16, 2), "I32": (torch.int32, 4), "I64": (torch.int64, 8), "BOOL": (torch.bool, 1),
}
MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[list[TensorEntry], dict, list[str]]:
    """Parse a safetensors header. Returns (entries, metadata, problems); never raises on bad data."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return [], {}, [f"{name}: truncated: {size} bytes, too short for a safetensors header"]
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                return [], {}, [f"{name}: corrupt header: claims {n} header bytes in a {size}-byte file"]
            raw = f.read(n)
    except OSError as exc:
        return [], {}, [f"{name}: cannot read ({exc.strerror or exc})"]
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
        return [], {}, [f"{name}: corrupt header: not valid JSON"]
    if not isinstance(header, dict):
        return [], {}, [f"{name}: corrupt header: not a JSON object"]

    data_start = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        return [], {}, [f"{name}: corrupt header: __metadata__ is not a JSON object"]
    entries, problems = [], []
    data_end = 0
    for tname, info in header.items():
        if not tname.isprintable():  # names go into one-line problem reports; no tensor of ours has such a name
            problems.append(f"{name}: corrupt header: tensor name {tname[:40]!r} is not printable")
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ValueError
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: corrupt header entry for {tname}")
            continue
        if not isinstance(dtype, str) or dtype not in DTYPES:  # a list is unhashable; "\n" would break the line
            problems.append(f"{name}: {tname} has unsupported dtype {dtype!r:.40}")
            continue
        entry = TensorEntry(path, tname, dtype, tuple(shape), data_start + start, data_start + end)
        if entry.numel * DTYPES[dtype][1] != entry.nbytes:
            problems.append(f"{name}: corrupt header: {tname} {dtype}{list(shape)} needs "
                            f"{entry.numel * DTYPES[dtype][1]} bytes, offsets span {entry.nbytes}")
            continue
        data_end = max(data_end, entry.end)
        entries.append(entry)
    if data_end > size:
        problems.append(f"{name}: truncated: header promises {data_end} bytes, file has {size}")
    return entries, metadata, problems


class MappedFiles:
    """Lazily memory-maps files and copies tensors out of them."""

    def __init__(self):
        self._maps: dict[Path, mmap.mmap] = {}

    def _map(self, path: Path) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            fd = os.open(path, os.O_RDONLY)
            try:
                # ACCESS_COPY gives a writable (private) view, so torch.frombuffer needs no copy
                # and warns about nothing; nothing is ever written through it.
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)
            self._maps[path] = mm
        return mm

    def view(self, entry: TensorEntry) -> torch.Tensor:
        """A zero-copy tensor over the mapping; valid until `release` or `close`."""
        torch_dtype, _ = DTYPES[entry.dtype]
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=torch_dtype)
        mm = self._map(entry.file)
        return torch.frombuffer(mm, dtype=torch_dtype, count=entry.numel, offset=entry.start).view(entry.shape)

    def release(self, entry: TensorEntry) -> None:
        """Drop the pages of `entry` from this process (they stay in the page cache)."""
        mm = self._maps.get(entry.file)
        if mm is None or entry.nbytes == 0:
            return
        start = entry.start - entry.start % PAGE
        mm.madvise(mmap.MADV_DONTNEED, start, entry.end - start)

    def read_into(self, entry: TensorEntry, out: torch.Tensor) -> None:
        out.copy_(self.view(entry))
        self.release(entry)

    def read(self, entry: TensorEntry) -> torch.Tensor:
        out = torch.empty(entry.shape, dtype=DTYPES[entry.dtype][0])
        self.read_into(entry, out)
        return out

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()


def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], produce,
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor: header from `specs`, data from `produce(name)`.

    Only one tensor is in memory at a time, so files larger than RAM can be written.
    """
    names = {v[0]: k for k, v in DTYPES.items()}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * DTYPES[names[dtype]][1]
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in specs:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {t.dtype}{list(t.shape)}, declared {dtype}{list(shape)}")
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
