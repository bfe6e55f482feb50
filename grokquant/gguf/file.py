"""GGUF v3 files: a streaming writer and a header reader (the layout of ggml's `docs/gguf.md`).

The writer needs every tensor's name, shape and type before any data, then takes data tensor by
tensor (in chunks if wanted), so a file far larger than memory can be written. The reader parses
the header only; tensor bytes are read on request through a memory map whose pages are released
after each read.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grokquant.errors import GrokquantError
from grokquant.quant.ggml.types import BY_ID, GGMLType

MAGIC = b"GGUF"
VERSION = 3
ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS (ggml.h)

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _align(n: int, a: int = ALIGNMENT) -> int:
    return n + (-n % a)


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: last dim is the row (ggml ne0)
    type: GGMLType
    offset: int = 0  # relative to the data section

    @property
    def nbytes(self) -> int:
        return self.type.nbytes(self.shape)

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


class GGUFWriter:
    """Usage: add metadata and tensor infos, then `write_header()`, then `write(name, bytes)` in order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.kv: list[tuple[str, int, object, int | None]] = []
        self.tensors: list[TensorInfo] = []
        self._file = None
        self._next = 0  # index of the tensor being written
        self._written = 0  # bytes of it written so far
        self._data_bytes = 0  # the data section so far: the next tensor's offset (Grok 2 has 1,300 tensors)

    # ---- metadata ----------------------------------------------------------------------------
    def add(self, key: str, value, vtype: int, elem_type: int | None = None) -> None:
        if any(k == key for k, *_ in self.kv):
            raise ValueError(f"duplicate GGUF key {key}")
        self.kv.append((key, vtype, value, elem_type))

    def add_u32(self, key, v): self.add(key, int(v), U32)
    def add_u16(self, key, v): self.add(key, int(v), U16)
    def add_i32(self, key, v): self.add(key, int(v), I32)
    def add_f32(self, key, v): self.add(key, float(v), F32)
    def add_bool(self, key, v): self.add(key, bool(v), BOOL)
    def add_str(self, key, v): self.add(key, str(v), STRING)
    def add_array(self, key, values, elem_type): self.add(key, list(values), ARRAY, elem_type)

    def add_tensor(self, name: str, shape: tuple[int, ...], ggml_type: GGMLType) -> None:
        if len(name.encode()) >= 64:
            raise ValueError(f"tensor name too long for ggml: {name}")
        info = TensorInfo(name, tuple(shape), ggml_type)
        info.offset = self._data_bytes
        self._data_bytes += _align(info.nbytes)  # nbytes validates the row length against the block size
        self.tensors.append(info)

    # ---- writing -------------------------------------------------------------------------------
    def _value(self, vtype: int, value, elem_type: int | None) -> bytes:
        if vtype == STRING:
            return _string(value)
        if vtype == ARRAY:
            out = struct.pack("<IQ", elem_type, len(value))
            if elem_type == STRING:
                return out + b"".join(_string(v) for v in value)
            return out + np.asarray(value, dtype=np.dtype(_SCALAR[elem_type])).tobytes()
        return struct.pack(_SCALAR[vtype], value)

    def header_bytes(self) -> bytes:
        parts = [MAGIC, struct.pack("<IQQ", VERSION, len(self.tensors), len(self.kv))]
        for key, vtype, value, elem_type in self.kv:
            parts += [_string(key), struct.pack("<I", vtype), self._value(vtype, value, elem_type)]
        for t in self.tensors:
            parts += [_string(t.name), struct.pack("<I", len(t.ne)), struct.pack(f"<{len(t.ne)}Q", *t.ne),
                      struct.pack("<IQ", t.type.id, t.offset)]
        raw = b"".join(parts)
        return raw + b"\0" * (-len(raw) % ALIGNMENT)

    def write_header(self) -> None:
        self._file = open(self.path, "wb")
        self._file.write(self.header_bytes())

    def reopen(self, offset: int, tensor: int, written: int) -> None:
        """Continue a file whose first `offset` bytes hold this header and the data before tensor index
        `tensor`, plus `written` bytes of it (what a resumed convert recorded); anything after is cut."""
        self._file = open(self.path, "r+b")
        self._file.truncate(offset)
        self._file.seek(offset)
        self._next, self._written = tensor, written

    @property
    def file(self):
        """The open file (a resumed convert flushes and fsyncs it before recording its progress)."""
        return self._file

    def write(self, name: str, data) -> None:
        """Append bytes of tensor `name`; may be called several times per tensor, in file order."""
        info = self.tensors[self._next]
        if info.name != name:
            raise ValueError(f"expected data for {info.name}, got {name}")
        buf = memoryview(np.ascontiguousarray(data).view(np.uint8)).cast("B")
        self._file.write(buf)
        self._written += len(buf)
        if self._written > info.nbytes:
            raise ValueError(f"{name}: {self._written} bytes written, {info.nbytes} expected")
        if self._written == info.nbytes:
            self._file.write(b"\0" * (-info.nbytes % ALIGNMENT))
            self._next += 1
            self._written = 0

    def abort(self) -> None:
        """Close without the completeness check (the caller deletes the file)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is None:
            return
        complete = self._next == len(self.tensors)
        self._file.close()
        self._file = None
        if not complete:
            raise ValueError(f"{self.path}: only {self._next} of {len(self.tensors)} tensors written")


# ---- reading -------------------------------------------------------------------------------------

@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    data_start: int
    alignment: int = ALIGNMENT
    _mm: mmap.mmap | None = field(default=None, repr=False)

    def matrix_bpw(self) -> float:
        """Bits per weight over the tensors with two or more dimensions (what --target-bpw budgets)."""
        mats = [t for t in self.tensors.values() if len(t.shape) >= 2]
        return 8 * sum(t.nbytes for t in mats) / sum(math.prod(t.shape) for t in mats)

    def raw(self, name: str, first_row: int = 0, n_rows: int | None = None) -> np.ndarray:
        """Bytes of rows [first_row, first_row + n_rows) of a tensor (a copy), [rows, row_bytes] uint8.

        Rows count over all leading dims, so expert e of a stacked tensor is rows [e*out, (e+1)*out).
        """
        info = self.tensors[name]
        row_bytes = info.type.row_bytes(info.shape[-1])
        total_rows = math.prod(info.shape[:-1])  # not nbytes // row_bytes: rows of length 0 have no bytes
        n_rows = total_rows - first_row if n_rows is None else n_rows
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        start = self.data_start + info.offset + first_row * row_bytes
        size = n_rows * row_bytes
        if start + size > len(self._mm):
            raise GrokquantError(f"{self.path}: truncated (tensor {name} runs past the end of the file)")
        out = np.frombuffer(self._mm, dtype=np.uint8, count=size, offset=start).copy()
        if size:
            page = start - start % mmap.PAGESIZE
            self._mm.madvise(mmap.MADV_DONTNEED, page, start + size - page)
        return out.reshape(n_rows, row_bytes)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None


class _Cursor:
    """Reads the header of an untrusted file: every count is checked against the bytes left before anything
    is allocated for it, so a corrupt length is an error, not a MemoryError or an hour-long loop."""

    def __init__(self, f, path):
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size

    def need(self, count: int, item_bytes: int, what: str) -> None:
        """`count` items of at least `item_bytes` each must fit in the rest of the file."""
        if count * item_bytes > self.size - self.f.tell():
            raise GrokquantError(f"{self.path}: corrupt GGUF header ({what}: {count} does not fit in the "
                                 f"{self.size}-byte file)")

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise GrokquantError(f"{self.path}: truncated GGUF header")
        return struct.unpack(fmt, raw)

    def string(self) -> str:
        (n,) = self.take("<Q")
        self.need(n, 1, "string length")
        return self.f.read(n).decode("utf-8", errors="replace")

    def name(self, what: str, max_bytes: int) -> str:
        """A key or tensor name: printable and at most `max_bytes` long (it goes into one-line messages)."""
        name = self.string()
        if len(name.encode()) > max_bytes or not name.isprintable():
            raise GrokquantError(f"{self.path}: corrupt GGUF header ({what} {name[:40]!r} is not a name)")
        return name

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            elem, count = self.take("<IQ")
            if elem == STRING:
                self.need(count, 8, "array length")
                return [self.string() for _ in range(count)]
            if elem not in _SCALAR:
                raise GrokquantError(f"{self.path}: unsupported GGUF array type {elem}")
            dt = np.dtype(_SCALAR[elem])
            self.need(count, dt.itemsize, "array length")
            raw = self.f.read(dt.itemsize * count)
            return np.frombuffer(raw, dtype=dt).tolist()
        if vtype not in _SCALAR:
            raise GrokquantError(f"{self.path}: unsupported GGUF value type {vtype}")
        return self.take(_SCALAR[vtype])[0]


def read_gguf(path: str | Path) -> GGUFFile:
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise GrokquantError(f"{path}: cannot open ({exc.strerror})") from None
    with f:
        if f.read(4) != MAGIC:
            raise GrokquantError(f"{path}: not a GGUF file")
        cur = _Cursor(f, path)
        version, n_tensors, n_kv = cur.take("<IQQ")
        if version != VERSION:
            raise GrokquantError(f"{path}: GGUF version {version}, expected {VERSION}")
        cur.need(n_kv, 8 + 4 + 1, "key count")  # the smallest entry: an empty key, its type, one byte
        metadata = {}
        for _ in range(n_kv):
            key = cur.name("key", 65535)  # the spec's limit
            (vtype,) = cur.take("<I")
            if key in metadata:
                raise GrokquantError(f"{path}: corrupt GGUF header (key {key} twice)")
            metadata[key] = cur.value(vtype)
        cur.need(n_tensors, 8 + 4 + 8 + 4 + 8, "tensor count")  # name length, n_dims, one dim, type, offset
        tensors = {}
        for _ in range(n_tensors):
            name = cur.name("tensor name", 63)  # GGML_MAX_NAME is 64, with the terminating NUL
            (n_dims,) = cur.take("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GrokquantError(f"{path}: tensor {name} has {n_dims} dimensions (GGML allows 1 to {MAX_DIMS})")
            ne = cur.take(f"<{n_dims}Q")
            type_id, offset = cur.take("<IQ")
            if type_id not in BY_ID:
                raise GrokquantError(f"{path}: tensor {name} has unsupported ggml type {type_id}")
            if name in tensors:
                raise GrokquantError(f"{path}: corrupt GGUF header (tensor {name} twice)")
            ggml = BY_ID[type_id]
            if ne[0] % ggml.block or math.prod(ne) // ggml.block * ggml.block_bytes > cur.size:
                raise GrokquantError(f"{path}: tensor {name} of shape {list(reversed(ne))} cannot be {ggml.name} "
                                     f"data in a {cur.size}-byte file")
            tensors[name] = TensorInfo(name, tuple(reversed(ne)), ggml, offset)
        alignment = metadata.get("general.alignment", ALIGNMENT)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise GrokquantError(f"{path}: general.alignment {alignment!r} is not a power of two")
        data_start = _align(f.tell(), alignment)
    return GGUFFile(path, version, metadata, tensors, data_start, alignment)
