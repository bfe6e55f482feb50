"""IQ1_S and IQ1_M against ggml itself (ggml_quantize_chunk via ctypes) and gguf-py's dequantizers.

The C quantizers in libggml-base are plain scalar code (their only library call, glibc's qsort, sorts these
16/32-element groups with a stable merge sort), so ggml's bytes do not depend on the CPU running the tests.
IQ1_S needs an importance matrix: ggml aborts the process without one (ggml_quantize_requires_imatrix), so the
tests never call it so; IQ1_M quantizes with or without one.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import torch

from grokquant.quant.ggml.base import QUANTIZERS, dequantize, quantize
from grokquant.quant.ggml.reference import ggml_quantize
from ggml_cases import compare, imatrix, positive_imatrix, random_blocks, edge_matrix as edge_cases

TYPES = ["IQ1_S", "IQ1_M"]

pytestmark = pytest.mark.usefixtures("one_thread")

# pieces of 8 (the codes' span), tiny rows 10^(-14, -5), blocks around GROUP_MAX_EPS_IQ1_S
edge_matrix = functools.partial(edge_cases, piece=8, tiny=(-14, -5), small=3e-8, eps=1e-13)


SHAPES = [(256, 256), (64, 2048), (32, 4096)]


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows,n", SHAPES)
def test_imatrix_path_matches_ggml(name, rows, n):
    x = edge_matrix(rows, n, seed=n + 2)
    assert compare(name, x, imatrix(n, seed=n)) == 1.0
    assert compare(name, x, positive_imatrix(n, seed=n + 1)) == 1.0


@pytest.mark.parametrize("rows,n", SHAPES)
def test_iq1_m_without_imatrix_matches_ggml(rows, n):
    assert compare("IQ1_M", edge_matrix(rows, n, seed=n + 1), None) == 1.0


@pytest.mark.parametrize("name", TYPES)
def test_gaussian_rows_match_ggml(name):
    x = np.random.default_rng(3).standard_normal((64, 4096)).astype(np.float32)
    assert compare(name, x, positive_imatrix(4096, seed=4)) == 1.0


@pytest.mark.parametrize("name", TYPES)
def test_constant_and_zero_rows(name):
    x = np.zeros((9, 512), np.float32)
    x[1], x[2], x[3] = 1.0, -3.5, 1e-30
    x[4, ::2] = -1.0
    x[5, 7] = 2.0
    x[6] = np.tile([1.0, -1.0], 256)  # all-equal |x|: every split scores alike
    v = np.random.default_rng(4).standard_normal(32).astype(np.float32)
    x[7] = np.tile(np.r_[v[:16], -v[:16]], 16)
    x[8] = np.tile(np.r_[v, -v], 8)
    for imat in [np.ones(512, np.float32), np.zeros(512, np.float32), imatrix(512, seed=5)]:
        assert compare(name, x, imat) == 1.0
    if name == "IQ1_M":
        assert compare(name, x, None) == 1.0


def random_iq1_blocks(name: str, rows: int, n: int, seed: int) -> np.ndarray:
    """Arbitrary blocks with a finite fp16 scale: IQ1_S's at bytes 0-1, IQ1_M's in the top nibbles of its
    four u16 scale words."""
    if name == "IQ1_S":
        return random_blocks(name, rows, n, seed)
    data = random_blocks(name, rows, n, seed, fp16_offsets=()).reshape(-1, QUANTIZERS[name].type.block_bytes)
    d = np.random.default_rng(seed).uniform(-2, 2, len(data)).astype(np.float16).view(np.uint16)
    sc = data[:, 48:56].copy().view(np.uint16) & 0x0FFF
    for i in range(4):
        sc[:, i] |= ((d >> (4 * i)) & 0xF) << 12
    data[:, 48:56] = sc.view(np.uint8)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_gguf(name):
    x = edge_matrix(20, 2048, seed=9)
    for data in [ggml_quantize(name, x, imatrix(2048, seed=9)), random_iq1_blocks(name, 20, 2048, seed=3)]:
        ours = QUANTIZERS[name].dequantize(torch.from_numpy(data), 2048).numpy()
        ref = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, name)).reshape(ours.shape)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_chunks_and_threads_give_the_same_bytes(name, monkeypatch):
    """Chunks of 3 blocks on two worker threads (the kernels release the GIL) change no byte."""
    x = torch.from_numpy(edge_matrix(16, 1024, seed=10))
    im = torch.from_numpy(imatrix(1024, seed=10))
    q = QUANTIZERS[name]
    whole = q.quantize(x, im)
    monkeypatch.setattr(q, "chunk", 3)
    torch.set_num_threads(2)  # two worker threads over the chunks
    try:
        assert torch.equal(q.quantize(x, im), whole)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("name", TYPES)
def test_strided_blocks_give_the_same_bytes(name):
    """quantize_blocks on non-contiguous views (every other block, a transposed copy) equals the contiguous run."""
    x = torch.from_numpy(edge_matrix(16, 1024, seed=12)).view(-1, 256)
    im = torch.from_numpy(imatrix(1024, seed=12)).view(4, 256).repeat(16, 1)
    q = QUANTIZERS[name]
    want = q.quantize_blocks(x[::2].contiguous(), im[::2].contiguous())
    assert torch.equal(q.quantize_blocks(x[::2], im[::2]), want)
    assert torch.equal(q.quantize_blocks(x.t().contiguous().t(), im), q.quantize_blocks(x, im))


@pytest.mark.parametrize("name", TYPES)
def test_empty_input(name):
    out = QUANTIZERS[name].quantize(torch.zeros(0, 256), torch.ones(256))
    assert out.shape == (0, QUANTIZERS[name].type.block_bytes)


def test_iq1_s_refuses_a_missing_imatrix():
    with pytest.raises(ValueError):
        QUANTIZERS["IQ1_S"].quantize(torch.randn(2, 256))


def test_module_entry_points_take_stacked_tensors():
    x = edge_matrix(12, 512, seed=7)
    im = imatrix(512, seed=7)
    data = quantize(torch.from_numpy(x).view(3, 4, 512), "IQ1_M", torch.from_numpy(im))
    np.testing.assert_array_equal(data.numpy(), ggml_quantize("IQ1_M", x, im))
    assert dequantize(data, "IQ1_M", (3, 4, 512)).shape == (3, 4, 512)


@pytest.mark.parametrize("name,limit", [("IQ1_S", 0.52), ("IQ1_M", 0.48)])
def test_gaussian_error_level(name, limit):
    x = np.random.default_rng(1).standard_normal((16, 4096)).astype(np.float32)
    t = torch.from_numpy(x)
    y = QUANTIZERS[name].dequantize(QUANTIZERS[name].quantize(t, torch.ones(4096)), 4096)
    rel = float(((y - t).norm() / t.norm()))
    print(f"{name}: relative RMSE {rel:.4f}")
    assert rel < limit


@pytest.mark.slow
@pytest.mark.parametrize("name", TYPES)
def test_large_random_sweep(name):
    """A 4096 x 4096 edge matrix (65536 super-blocks) with both imatrices (and none for IQ1_M)."""
    x = edge_matrix(4096, 4096, seed=11)
    compare(name, x, imatrix(4096, seed=12))
    compare(name, x, positive_imatrix(4096, seed=13))
    if name == "IQ1_M":
        compare(name, x, None)
