"""IQ2_XXS, IQ2_XS, IQ2_S against ggml itself (ggml_quantize_chunk via ctypes) and gguf-py's dequantizers.

ggml's IQ2 quantizers are plain scalar C (no SIMD paths), so the reference bytes do not depend on this
machine's CPU; ours repeat their float order. IQ2_XXS and IQ2_XS require an importance matrix
(ggml_quantize_requires_imatrix: without one ggml aborts the process, so it is never called that way here);
quantize_row_iq2_s_impl accepts none.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import torch

from grokquant.quant.ggml.base import QUANTIZERS, quantize
from grokquant.quant.ggml.compiled import nearest_int_bits
from grokquant.quant.ggml.reference import ggml_quantize
from ggml_cases import compare, imatrix, positive_imatrix, random_blocks, edge_matrix as edge_cases

TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S"]

pytestmark = pytest.mark.usefixtures("one_thread")

# pieces of 8 (the codes' span), tiny rows 10^(-30, -6), blocks around GROUP_MAX_EPS_IQ2_S
edge_matrix = functools.partial(edge_cases, piece=8, tiny=(-30, -6), small=3e-9, eps=1e-8)


SHAPES = [(64, 256), (16, 2048), (8, 4096)]


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows,n", SHAPES)
def test_imatrix_path_matches_ggml(name, rows, n):
    x = edge_matrix(rows, n, seed=n + 2)
    assert compare(name, x, imatrix(n, seed=n)) == 1.0
    assert compare(name, x, positive_imatrix(n, seed=n + 1)) == 1.0


@pytest.mark.parametrize("rows,n", SHAPES)
def test_iq2_s_without_imatrix_matches_ggml(rows, n):
    assert compare("IQ2_S", edge_matrix(rows, n, seed=n + 1), None) == 1.0


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ2_XS"])
def test_imatrix_required(name):
    with pytest.raises(ValueError, match="importance matrix"):
        QUANTIZERS[name].quantize(torch.zeros(1, 256))


@pytest.mark.parametrize("name", TYPES)
def test_constant_and_zero_rows(name):
    x = np.zeros((9, 512), np.float32)
    x[1], x[2], x[3] = 1.0, -3.5, 1e-30
    x[4, ::2] = -1.0
    x[5, 7] = 2.0
    x[6] = np.tile([1.0, -1.0], 256)  # equal magnitudes, opposite signs
    v = np.random.default_rng(4).standard_normal(16).astype(np.float32)
    x[7] = np.tile(np.r_[v[:8], -v[:8]], 32)
    x[8] = np.tile(np.r_[v, -v], 16)
    for imat in [np.ones(512, np.float32), np.zeros(512, np.float32), imatrix(512, seed=3)]:
        assert compare(name, x, imat) == 1.0
    if name == "IQ2_S":
        assert compare(name, x, None) == 1.0


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_gguf(name):
    im = positive_imatrix(2048, seed=8)
    for data in [ggml_quantize(name, edge_matrix(8, 2048, seed=9), im), random_blocks(name, 20, 2048, seed=3)]:
        ours = QUANTIZERS[name].dequantize(torch.from_numpy(data), 2048).numpy()
        ref = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, name)).reshape(ours.shape)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_chunks_and_threads_give_the_same_bytes(name, monkeypatch):
    x = torch.from_numpy(edge_matrix(10, 1024, seed=21))
    im = torch.from_numpy(imatrix(1024, seed=22))
    whole = quantize(x, name, im)
    monkeypatch.setattr(type(QUANTIZERS[name]), "chunk", 3)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parts = quantize(x, name, im)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("name", TYPES)
def test_empty_input(name):
    q = QUANTIZERS[name]
    data = q.quantize(torch.zeros(0, 512), torch.ones(512))
    assert data.shape == (0, 2 * q.type.block_bytes)
    assert q.dequantize(data, 512).shape == (0, 512)


@pytest.mark.parametrize("name,limit", [("IQ2_XXS", 0.42), ("IQ2_XS", 0.38), ("IQ2_S", 0.34)])
def test_gaussian_error_level(name, limit):
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((8, 4096)).astype(np.float32))
    q = QUANTIZERS[name]
    y = q.dequantize(q.quantize(x, torch.ones(4096)), 4096)
    rel = float((y - x).norm() / x.norm())
    print(f"{name}: relative RMSE {rel:.4f}")
    assert rel < limit


def test_nearest_int_bits_out_of_range():
    v = np.float32([0.5, 1.5, 2.5, -0.5, 4194303.0, 4194303.5, -4194304.5, 1e9, -1e9, 1e30, np.inf, -np.inf, np.nan,
                    -12582912.0, 3e38])
    with np.errstate(over="ignore", invalid="ignore"):  # C: add 1.5 * 2^23 in float32, read the low 23 bits
        expect = ((v + np.float32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000
    np.testing.assert_array_equal([nearest_int_bits(f) for f in v], expect)


@pytest.mark.parametrize("name", TYPES)
def test_strided_blocks_give_the_contiguous_bytes(name):
    """quantize_blocks on strided views (column-major blocks, an imatrix expanded with stride 0) gives the
    bytes of their contiguous copies."""
    x = torch.from_numpy(edge_matrix(8, 512, seed=31)).view(-1, 256)
    im = torch.from_numpy(positive_imatrix(256, seed=32)).expand(x.shape[0], 256)
    q = QUANTIZERS[name]
    assert torch.equal(q.quantize_blocks(x.t().contiguous().t(), im), q.quantize_blocks(x, im.contiguous()))


@pytest.mark.slow
@pytest.mark.parametrize("name", TYPES)
def test_large_random_sweep(name):
    """A 4096 x 4096 edge matrix (65536 blocks) with both imatrices, and IQ2_S without one."""
    x = edge_matrix(4096, 4096, seed=11)
    compare(name, x, imatrix(4096, seed=12))
    compare(name, x, positive_imatrix(4096, seed=13))
    if name == "IQ2_S":
        compare(name, x, None)
