"""Importance matrices in llama.cpp's GGUF imatrix format (llama.cpp `tools/imatrix`, PR #9400).

Per weight `<name>.in_sum2` (Σx², [n_mat, ne0]) and `<name>.counts` ([n_mat, 1]); the importance
of a column is in_sum2 / count, with 1.0 for experts that saw no tokens (as llama-quantize does).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from grokquant.errors import GrokquantError
from grokquant.gguf.file import read_gguf


def load_imatrix(path: str | Path) -> dict[str, torch.Tensor]:
    """GGUF weight name -> importance [n_mat, ne0] (n_mat = experts for stacked tensors, else 1)."""
    f = read_gguf(path)
    try:
        if f.metadata.get("general.type") != "imatrix":
            raise GrokquantError(f"{path}: not an imatrix GGUF (general.type = {f.metadata.get('general.type')!r})")
        out = {}
        for name, info in f.tensors.items():
            if not name.endswith(".in_sum2"):
                continue
            weight = name[: -len(".in_sum2")]
            counts_name = weight + ".counts"
            if counts_name not in f.tensors:
                raise GrokquantError(f"{path}: {weight} has in_sum2 but no counts")
            counts_info = f.tensors[counts_name]
            n_mat = info.shape[0] if len(info.shape) == 2 else 1
            # what llama.cpp writes: F32 sums [n_mat, ne0] and one F32 count per matrix
            if info.type.name != "F32" or counts_info.type.name != "F32" or len(info.shape) > 2 \
                    or math.prod(counts_info.shape) != n_mat:
                raise GrokquantError(f"{path}: {weight}: in_sum2 {info.type.name}{list(info.shape)} and counts "
                                     f"{counts_info.type.name}{list(counts_info.shape)} are not F32 [n, columns] "
                                     f"and [n, 1]")
            sums = np.frombuffer(f.raw(name).tobytes(), dtype=np.float32).reshape(n_mat, info.shape[-1])
            counts = np.frombuffer(f.raw(counts_name).tobytes(), dtype=np.float32).reshape(-1)
            if not (np.isfinite(sums).all() and np.isfinite(counts).all() and (sums >= 0).all() and (counts >= 0).all()):
                raise GrokquantError(f"{path}: {weight}: sums of squares and counts must be finite and non-negative")
            imp = np.where(counts[:, None] > 0, sums / np.maximum(counts[:, None], 1e-30), 1.0)
            out[weight] = torch.from_numpy(imp.astype(np.float32))
        return out
    finally:
        f.close()


def save_imatrix(path: str | Path, sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor],
                 datasets: list[str] = (), chunk_count: int = 0, chunk_size: int = 0) -> None:
    """Write llama.cpp's GGUF imatrix: per weight `in_sum2` [n_mat, n] and `counts` [n_mat, 1]."""
    from grokquant.gguf.file import GGUFWriter
    from grokquant.quant.ggml.types import TYPES

    w = GGUFWriter(path)
    w.add_str("general.type", "imatrix")
    w.add_array("imatrix.datasets", list(datasets), 8)
    w.add_u32("imatrix.chunk_count", chunk_count)
    w.add_u32("imatrix.chunk_size", chunk_size)
    data = []
    for name in sums:
        s = sums[name].float().reshape(-1, sums[name].shape[-1])
        c = counts[name].float().reshape(-1, 1)
        if c.shape[0] != s.shape[0]:
            raise ValueError(f"{name}: {s.shape[0]} sums but {c.shape[0]} counts")
        for suffix, t in ((".in_sum2", s), (".counts", c)):
            w.add_tensor(name + suffix, tuple(t.shape), TYPES["F32"])
            data.append((name + suffix, t.contiguous().numpy()))
    w.write_header()
    try:
        for name, arr in data:
            w.write(name, arr)
        w.close()
    except BaseException:
        w.abort()
        raise
