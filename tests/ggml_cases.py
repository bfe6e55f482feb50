"""Test inputs and the byte comparison shared by the GGML quantizer tests (test_ggml_iq*.py, test_ggml_iquants.py).

Each test module fixes the family's parameters (the piece its codes cover, the group-max threshold its search
skips below) with functools.partial over `edge_matrix`, so every family sees the same kinds of awkward rows.
"""

from __future__ import annotations

import numpy as np
import torch

from grokquant.quant.ggml.base import QUANTIZERS
from grokquant.quant.ggml.reference import ggml_quantize, ggml_validate


def edge_matrix(rows: int, n: int, seed: int, *, piece: int, tiny: tuple[int, int], small: float, eps: float,
                zero_piece: int | None = None, zero_share: float = 0.08) -> np.ndarray:
    """Gaussian rows plus the awkward cases, each spread over whole 256-blocks and over `piece`-element pieces.

    tiny: the exponent range of the tiny rows; small: the smallest non-zero value among the constant pieces;
    eps: the factor that puts whole blocks around the family's GROUP_MAX_EPS; zero_piece (default `piece`):
    the size of the pieces set to zero in every row, `zero_share` of them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    k = rows // 10 or 1
    x[k:2 * k] *= rng.standard_t(2, size=(k, n)).astype(np.float32) ** 2  # heavy tails
    x[2 * k:3 * k, rng.integers(0, n, 8)] = 1e4 * rng.standard_normal(8).astype(np.float32)  # outliers
    x[3 * k:4 * k] *= np.float32(10.0) ** rng.integers(*tiny, size=(k, 1)).astype(np.float32)  # tiny
    x[4 * k:5 * k] = -np.abs(x[4 * k:5 * k])  # negative only: every sign flips
    x[5 * k:6 * k] = np.abs(x[5 * k:6 * k])  # positive only
    pieces = rng.choice(np.float32([0.5, -2.0, 0.0, small, 7.0]), size=(k, n // piece))
    x[6 * k:7 * k] = np.repeat(pieces, piece, axis=1)  # constant pieces: ties in the searches
    x[7 * k:8 * k] = np.round(x[7 * k:8 * k] * 2) / 2  # few distinct values: ties
    zp = zero_piece or piece
    z = rng.random((rows, n // zp)) < zero_share  # zero pieces everywhere
    x.reshape(rows, -1, zp)[z] = 0
    z0 = min(8 * k, rows - 1)  # under 10 rows the last case rows give way
    x[z0, : min(n, 256)] = 0  # an all-zero block
    x[z0 + 1:9 * k, : min(n, 256)] *= np.float32(eps)  # blocks below / around GROUP_MAX_EPS
    return x


def imatrix(n: int, seed: int) -> np.ndarray:
    """Column weights spanning 12 orders of magnitude, with zero columns and one zero 32-piece."""
    rng = np.random.default_rng(seed)
    w = (10.0 ** rng.uniform(-6, 6, n)).astype(np.float32)
    w[rng.random(n) < 0.05] = 0
    w[32:64] = 0
    return w


def positive_imatrix(n: int, seed: int) -> np.ndarray:
    """An imatrix as calibration gives one: positive, within two orders of magnitude."""
    return np.random.default_rng(seed).uniform(0.1, 10, n).astype(np.float32)


def compare(name: str, x: np.ndarray, imat: np.ndarray | None) -> float:
    """Identical-block fraction of ours vs ggml (asserted >= 0.999); differing blocks must be no worse in
    weighted squared error. Validity must agree with ggml's own (without an imatrix ggml's d can overflow fp16)."""
    q = QUANTIZERS[name]
    ref = ggml_quantize(name, x, imat)
    ours = q.quantize(torch.from_numpy(x), None if imat is None else torch.from_numpy(imat)).numpy()
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    assert ggml_validate(name, ours) == ggml_validate(name, ref)
    bb = q.type.block_bytes
    same = (ours.reshape(-1, bb) == ref.reshape(-1, bb)).all(1)
    frac = float(same.mean())
    print(f"{name} n={x.shape[1]} {'imatrix' if imat is not None else 'plain'}: "
          f"{same.sum()}/{same.size} blocks identical ({frac:.6f})")
    if not same.all():
        w = np.ones(x.shape[1], np.float32) if imat is None else imat
        w = np.broadcast_to(w, x.shape).reshape(same.size, -1)
        xb = x.reshape(same.size, -1)

        def err(data):
            y = q.dequantize(torch.from_numpy(data), x.shape[1]).numpy().reshape(same.size, -1)
            return (w * (xb - y) ** 2).astype(np.float64).sum(1)

        e_ours, e_ref = err(ours), err(ref)
        assert np.all(e_ours[~same] <= e_ref[~same] * (1 + 1e-6)), "a differing block is worse than ggml's"
    assert frac >= 0.999
    return frac


def random_blocks(name: str, rows: int, n: int, seed: int, fp16_offsets=(0,)) -> np.ndarray:
    """Arbitrary block bytes with finite fp16 scales at `fp16_offsets` (NaN payloads need not survive both
    dequantizers alike)."""
    rng = np.random.default_rng(seed)
    t = QUANTIZERS[name].type
    data = rng.integers(0, 256, (rows * n // t.block, t.block_bytes), dtype=np.uint8)
    for off in fp16_offsets:
        data[:, off:off + 2] = rng.uniform(-2, 2, (len(data), 1)).astype(np.float16).view(np.uint8)
    return data.reshape(rows, -1)
