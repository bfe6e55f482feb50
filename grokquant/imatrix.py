"""Importance matrices in llama.cpp's GGUF imatrix format (spec quant.md §9).

Per weight `<name>.in_sum2` (Σx², [n_mat, ne0]) and `<name>.counts` ([n_mat, 1]); the importance
of a column is in_sum2 / count, with 1.0 for experts that saw no tokens (as llama-quantize does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import GrokquantError
from .gguf_file import read_gguf


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
            sums = np.frombuffer(f.raw(name).tobytes(), dtype=np.float32).reshape(info.shape)
            counts = np.frombuffer(f.raw(counts_name).tobytes(), dtype=np.float32).reshape(-1)
            if sums.ndim == 1:
                sums = sums[None]
            imp = np.where(counts[:, None] > 0, sums / np.maximum(counts[:, None], 1e-30), 1.0)
            out[weight] = torch.from_numpy(imp.astype(np.float32))
        return out
    finally:
        f.close()
