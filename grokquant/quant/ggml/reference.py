"""ggml's own C quantizer (`ggml_quantize_chunk` in the libggml-base that llama-cpp-python ships),
called through ctypes: the reference our quantizers are tested and benchmarked against.
Needs the `llama` extra."""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import numpy as np

from grokquant.quant.ggml.types import TYPES


@lru_cache(maxsize=1)
def libggml():
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(next(lib_dir.glob("libggml-base.so*"))))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    return lib


def ggml_quantize(type_name: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 [rows, n] -> uint8 [rows, row_bytes], exactly as llama-quantize writes it."""
    t = TYPES[type_name]
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    out = np.zeros((rows, t.row_bytes(n)), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    size = libggml().ggml_quantize_chunk(t.id, x.ctypes.data, out.ctypes.data, 0, rows, n,
                                         None if qw is None else qw.ctypes.data)
    assert size == out.nbytes, (size, out.nbytes)
    return out


def ggml_validate(type_name: str, data: np.ndarray) -> bool:
    data = np.ascontiguousarray(data)
    return bool(libggml().ggml_validate_row_data(TYPES[type_name].id, data.ctypes.data, data.nbytes))
