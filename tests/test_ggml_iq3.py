"""IQ3_XXS and IQ3_S against ggml itself (ggml_quantize_chunk via ctypes) and gguf-py's dequantizers.

ggml's C quantizers are plain scalar code: their bytes, and ours, do not depend on the CPU. Neither type
requires an importance matrix (quantize_row_iq3_xxs_impl / _s_impl weight by x^2 without one): both paths
are compared.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import torch

from grokquant.quant.ggml import iq3
from grokquant.quant.ggml.base import QUANTIZERS
from grokquant.quant.ggml.iq_grids import grid
from grokquant.quant.ggml.reference import ggml_quantize
from ggml_cases import compare, imatrix, random_blocks, edge_matrix as edge_cases

TYPES = ["IQ3_XXS", "IQ3_S"]

pytestmark = pytest.mark.usefixtures("one_thread")

# pieces of 4 (the codes' span), tiny rows 10^(-30, -6), blocks around GROUP_MAX_EPS_IQ3_XXS (1e-8); whole zero groups, which IQ3_S packs out
edge_matrix = functools.partial(edge_cases, piece=4, tiny=(-30, -6), small=3e-9, eps=3e-9, zero_piece=32, zero_share=0.06)


SHAPES = [(256, 256), (96, 2048), (48, 4096)]
IMATRIX = {"plain": None, "imatrix-a": 1, "imatrix-b": 2}


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows,n", SHAPES)
@pytest.mark.parametrize("path", IMATRIX)
def test_edge_matrix_matches_ggml(name, rows, n, path):
    imat = None if IMATRIX[path] is None else imatrix(n, seed=n + IMATRIX[path])
    assert compare(name, edge_matrix(rows, n, seed=n + 3), imat) == 1.0


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows,n", SHAPES)
@pytest.mark.parametrize("path", ["plain", "imatrix-a"])
def test_gaussian_matches_ggml(name, rows, n, path):
    x = np.random.default_rng(n).standard_normal((rows // 2, n)).astype(np.float32)
    imat = None if IMATRIX[path] is None else imatrix(n, seed=n + 7)
    assert compare(name, x, imat) == 1.0


@pytest.mark.parametrize("name", TYPES)
def test_constant_and_zero_rows(name):
    x = np.zeros((10, 512), np.float32)
    x[1], x[2], x[3] = 1.0, -3.5, 1e-30
    x[4, ::2] = -1.0
    x[5, 7] = 2.0  # one element: every other group of its block is zero
    x[6] = np.tile([1.0, -1.0], 256)
    x[7, 100:110] = 5.0
    x[7, 300:301] = -1e-9  # a group below IQ3_XXS's threshold next to zero ones
    x[8] = np.float32(1e-39) * np.arange(512)  # subnormal
    x[9] = np.linspace(-8, 8, 512, dtype=np.float32)
    for imat in [None, np.ones(512, np.float32), np.zeros(512, np.float32), imatrix(512, seed=3)]:
        assert compare(name, x, imat) == 1.0


@pytest.mark.parametrize("name", TYPES)
def test_neighbour_strips_are_ggml_lists_padded_with_their_first_point(name):
    """The kernel scores padded strips and keeps the first least score: a pad must be a copy of the list's
    first point (it ties with it and loses), and the listed points must keep ggml's order."""
    index, first, nbr_point, nbr_q, values = iq3._tables(name)
    nb = grid(name).neighbours.numpy()
    for u in range(len(index)):
        want = nb[u][nb[u] >= 0]
        got = nbr_point[first[u]:first[u + 1]].ravel()
        assert len(got) == -(-len(want) // iq3.LANES) * iq3.LANES
        np.testing.assert_array_equal(got[:len(want)], want)
        assert (got[len(want):] == want[:1]).all()
    np.testing.assert_array_equal(nbr_q.transpose(0, 2, 1).reshape(-1, 4), values[nbr_point.ravel()])


@pytest.mark.parametrize("name", TYPES)
def test_tied_neighbour_scores_match_ggml(name):
    """Magnitudes on a coarse lattice with equal weights: many listed neighbours score exactly alike, so the
    first of equal scores (over several strips for long lists) decides, as C's strict `<` does."""
    rng = np.random.default_rng(5)
    x = (rng.integers(1, 16, (64, 1024)) * rng.choice([-0.25, 0.25], (64, 1024))).astype(np.float32)
    x[:16] *= np.float32(1e-3)
    x[16:32, ::3] = 3.75  # repeated large values: high levels, the longest neighbour lists
    for imat in [None, np.ones(1024, np.float32), imatrix(1024, seed=6)]:
        assert compare(name, x, imat) == 1.0


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_gguf(name):
    for data in [ggml_quantize(name, edge_matrix(20, 2048, seed=9)), random_blocks(name, 20, 2048, seed=3)]:
        ours = QUANTIZERS[name].dequantize(torch.from_numpy(data), 2048).numpy()
        ref = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, name)).reshape(ours.shape)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_chunks_and_threads_give_the_same_bytes(name, monkeypatch):
    x = torch.from_numpy(edge_matrix(12, 1024, seed=21))
    im = torch.from_numpy(imatrix(1024, seed=22))
    q = QUANTIZERS[name]
    whole = q.quantize(x, im)
    monkeypatch.setattr(q, "chunk", 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split = q.quantize(x, im)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, split)


@pytest.mark.parametrize("name", TYPES)
def test_empty_input(name):
    q = QUANTIZERS[name]
    data = q.quantize(torch.zeros(0, 512))
    assert data.shape == (0, q.type.row_bytes(512)) and data.dtype == torch.uint8
    assert q.dequantize(data, 512).shape == (0, 512)


@pytest.mark.parametrize("name,limit", [("IQ3_XXS", 0.22), ("IQ3_S", 0.18)])
def test_gaussian_error_level(name, limit):
    t = torch.from_numpy(np.random.default_rng(1).standard_normal((16, 4096)).astype(np.float32))
    y = QUANTIZERS[name].dequantize(QUANTIZERS[name].quantize(t), 4096)
    rel = float((y - t).norm() / t.norm())
    print(f"{name}: relative RMSE {rel:.4f}")
    assert rel < limit


@pytest.mark.slow
@pytest.mark.parametrize("name", TYPES)
def test_large_random_sweep(name):
    """A 4096 x 4096 edge matrix (65536 super-blocks), plain and imatrix paths."""
    x = edge_matrix(4096, 4096, seed=11)
    assert compare(name, x, None) == 1.0
    assert compare(name, x, imatrix(4096, seed=12)) == 1.0
