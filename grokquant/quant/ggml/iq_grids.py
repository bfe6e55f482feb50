"""The lattice codebooks of ggml's IQ1/IQ2/IQ3 types, with the lookup tables their quantizers search.

A codebook ("grid") is a list of points of `dim` coordinates, each coordinate a level index l in
0..levels-1 (ggml scores the odd value 2l+1). The points come from PyPI gguf, whose dequantizers hold the
same grids as ggml-common.h (`gguf.quants.IQ2_XXS.grid_hex`, ...). From them we build what ggml's
`iq2xs_init_impl` / `iq3xs_init_impl` (ggml-quants.c) build at start-up:

- `index`: for every packed word u = sum(l_i << bits*i), the grid point with exactly those levels, or -1;
- `neighbours`: for every word not on the grid, the grid points nearest to it in squared distance of the
  odd values, all of the `nwant` smallest distinct distances, ordered by (distance, grid index) — ggml's
  qsort comparator orders by both, so the order is total and ours equals it. ggml stores the lists flat;
  we pad them to a rectangle (-1) so a search can score every candidate of every group at once, and skip
  words no search forms (a level above levels-1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

# type -> (gguf-py class holding the grid, nwant) as in iq2xs_init_impl / iq3xs_init_impl
GRIDS = {
    "IQ2_XXS": ("IQ2_XXS", 2), "IQ2_XS": ("IQ2_XS", 2), "IQ2_S": ("IQ2_S", 1),
    "IQ1_S": ("IQ1_S", 3), "IQ1_M": ("IQ1_S", 3),  # IQ1_M shares IQ1_S's grid
    "IQ3_XXS": ("IQ3_XXS", 2), "IQ3_S": ("IQ3_S", 3),
}


@dataclass(frozen=True)
class Grid:
    codes: torch.Tensor  # [points, dim] int64 level index per coordinate
    values: torch.Tensor  # [points, dim] float32 odd values 2l+1, what the searches score
    index: torch.Tensor  # [words] int64 grid point of each packed word, -1 off the grid
    neighbours: torch.Tensor  # [words, most] int16 nearest grid points of off-grid words, -1 padded
    bits: int  # bits per coordinate in a packed word

    @property
    def dim(self) -> int:
        return self.codes.shape[1]

    def word(self, L: torch.Tensor) -> torch.Tensor:
        """Level indices [..., dim] -> packed words [...] (int64)."""
        shifts = torch.arange(0, self.bits * self.dim, self.bits, device=L.device)
        return (L.long() << shifts).sum(-1)


def _grid_codes(cls_name: str) -> tuple[np.ndarray, int]:
    """gguf-py's grid as level indices [points, dim], and the number of levels."""
    import gguf.quants

    cls = getattr(gguf.quants, cls_name)
    cls.init_grid()
    levels = np.asarray(cls.grid_map, dtype=np.float32)
    values = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    codes = np.searchsorted(levels, values)
    assert (levels[codes] == values).all(), cls_name
    return codes.astype(np.int64), len(levels)


def _build(cls_name: str, nwant: int) -> Grid:
    codes, levels = _grid_codes(cls_name)
    points, dim = codes.shape
    bits = math.ceil(math.log2(levels)) if levels > 2 else 2  # ggml packs 3-level coordinates in 2 bits
    words = 4096 if bits == 3 else 43692  # ggml's kmap_size: every word with levels clamped to levels-1
    shifts = np.arange(0, bits * dim, bits)
    word_of_point = (codes << shifts).sum(1)
    index = np.full(words, -1, dtype=np.int64)
    index[word_of_point] = np.arange(points)

    every = np.arange(words)
    all_levels = (every[:, None] >> shifts) & ((1 << bits) - 1)  # [words, dim] level per coordinate
    # ggml also lists words with a coordinate above levels-1; the searches clamp, so they never occur
    formed = (all_levels < levels).all(1)
    off = np.flatnonzero((index < 0) & formed)
    all_levels = all_levels[off]
    grid_odd = torch.from_numpy(2 * codes + 1).to(torch.int32)
    lists, most = [], 1
    for s in range(0, len(off), 4096):
        pos = torch.from_numpy(2 * all_levels[s:s + 4096] + 1).to(torch.int32)
        d2 = ((grid_odd[None] - pos[:, None]) ** 2).sum(-1)  # [chunk, points]
        d2, order = torch.sort(d2, dim=1, stable=True)  # ties keep ascending grid index
        distinct = torch.cat([torch.zeros_like(d2[:, :1]), (d2[:, 1:] > d2[:, :-1]).int()], 1).cumsum(1)
        keep = distinct < nwant
        n = int(keep.sum(1).max())
        most = max(most, n)
        lists.append(torch.where(keep, order, -1)[:, :n].to(torch.int16))
    table = torch.full((words, most), -1, dtype=torch.int16)
    table[torch.from_numpy(off)] = torch.cat([torch.nn.functional.pad(t, (0, most - t.shape[1]), value=-1)
                                              for t in lists])
    return Grid(codes=torch.from_numpy(codes), values=grid_odd.float(), index=torch.from_numpy(index),
                neighbours=table, bits=bits)


@lru_cache(maxsize=None)
def grid(type_name: str) -> Grid:
    """The codebook and lookup tables of an IQ type (built once per process)."""
    cls_name, nwant = GRIDS[type_name]
    return _build(cls_name, nwant)
