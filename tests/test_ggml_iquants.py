"""IQ4_NL, IQ4_XS, Q2_K, Q3_K against ggml itself (ggml_quantize_chunk via ctypes) and gguf-py's dequantizers."""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import torch

from grokquant.quant.ggml.reference import ggml_quantize
from grokquant.quant.ggml.compiled import nearest_int_bits
from grokquant.quant.ggml import iquants as iq
from grokquant.quant.ggml.base import QUANTIZERS, dequantize, quantize
from ggml_cases import compare, imatrix, random_blocks, edge_matrix as edge_cases

TYPES = ["IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K"]


pytestmark = pytest.mark.usefixtures("one_thread")

# pieces of 16 (the codes' span), tiny rows 10^(-30, -12), blocks around GROUP_MAX_EPS
edge_matrix = functools.partial(edge_cases, piece=16, tiny=(-30, -12), small=3e-16, eps=1e-16)


KV = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


SHAPES = [(256, 256), (128, 2048), (64, 4096)]


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows,n", SHAPES)
def test_reference_path_matches_ggml(name, rows, n):
    assert compare(name, edge_matrix(rows, n, seed=n + 1), None) == 1.0


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows,n", SHAPES)
def test_imatrix_path_matches_ggml(name, rows, n):
    assert compare(name, edge_matrix(rows, n, seed=n + 2), imatrix(n, seed=n)) == 1.0


@pytest.mark.parametrize("imat", [False, True])
def test_iq4_nl_short_rows(imat):
    x = edge_matrix(30, 96, seed=5)
    assert compare("IQ4_NL", x, imatrix(96, seed=6) if imat else None) == 1.0


@pytest.mark.parametrize("name", TYPES)
def test_constant_and_zero_rows(name):
    x = np.zeros((9, 512), np.float32)
    x[1], x[2], x[3] = 1.0, -3.5, 1e-30
    x[4, ::2] = -1.0
    x[5, 7] = 2.0
    x[6] = np.tile([1.0, -1.0], 256)  # |x| ties of opposite sign: the first one sets the sign
    v = np.random.default_rng(4).standard_normal(32).astype(np.float32)
    x[7] = np.tile(np.r_[v[:16], -v[:16]], 16)  # sub-scales tied in magnitude, opposite in sign
    x[8] = np.tile(np.r_[v, -v], 8)
    for imat in [None, np.ones(512, np.float32), np.zeros(512, np.float32)]:
        assert compare(name, x, imat) == 1.0


def test_q2k_imatrix_negative_sub_scale():
    """make_qkx3_quants can return a negative sub-scale; make_qp_quants then sums the negative int code but
    stores it as uint8 (found by the 4096 x 4096 sweep). These rows contain such blocks."""
    x = -np.abs(np.random.default_rng(52).standard_normal((64, 256)).astype(np.float32))
    im = imatrix(256, seed=52)
    assert compare("Q2_K", x, im) == 1.0


FP16_FIELDS = {"IQ4_NL": [0], "IQ4_XS": [0], "Q2_K": [80, 82], "Q3_K": [108]}  # byte offsets in a block


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_gguf(name):
    for data in [ggml_quantize(name, edge_matrix(20, 2048, seed=9)), random_blocks(name, 20, 2048, seed=3, fp16_offsets=FP16_FIELDS[name])]:
        ours = QUANTIZERS[name].dequantize(torch.from_numpy(data), 2048).numpy()
        ref = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, name)).reshape(ours.shape)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


def test_module_entry_points_take_stacked_tensors():
    """ggml.quantize flattens leading dims into rows (e.g. [n_expert, out, in])."""
    x = edge_matrix(12, 512, seed=7)
    im = imatrix(512, seed=7)
    data = quantize(torch.from_numpy(x).view(3, 4, 512), "IQ4_XS", torch.from_numpy(im))
    np.testing.assert_array_equal(data.numpy(), ggml_quantize("IQ4_XS", x, im))
    y = dequantize(data, "IQ4_XS", (3, 4, 512))
    assert y.shape == (3, 4, 512)


def c_best_index(x: np.ndarray) -> np.ndarray:
    """best_index_int8 as written in C, in float32."""
    mu = np.clip(np.searchsorted(KV, x, side="right"), 1, 15)
    lo, hi = KV[mu - 1], KV[mu]
    idx = np.where((x - lo) < (hi - x), mu - 1, mu)
    return np.where(x <= KV[0], 0, np.where(x >= KV[15], 15, idx))


def test_iq4_lookup_matches_c_formula():
    rng = np.random.default_rng(0)
    mids = (KV[:-1] + KV[1:]) / 2
    near = np.concatenate([mids, KV, -mids, np.float32(0.0)[None]])
    x = np.concatenate([
        near, np.nextafter(near, np.float32(np.inf)), np.nextafter(near, np.float32(-np.inf)),
        rng.uniform(-140, 140, 100_000).astype(np.float32),
        (rng.standard_normal(10_000) * 1e-30).astype(np.float32), np.array([-1e30, 1e30], np.float32),
        np.array([np.nan, -np.nan, np.inf, -np.inf], np.float32),  # C's binary search ends at 15 for NaN
    ]).astype(np.float32)
    ours = np.empty(len(x), np.int32)
    iq.iq4_index(x, ours)
    np.testing.assert_array_equal(ours, c_best_index(x))


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
def test_iq4_strided_input_and_chunk_splits_give_the_same_bytes(name, monkeypatch):
    """Non-contiguous rows and blocks, and chunks split over two worker threads, change no byte."""
    x = torch.from_numpy(edge_matrix(24, 1024, seed=12))
    im = imatrix(1024, seed=12)
    q = QUANTIZERS[name]
    blocks = x.reshape(-1, q.type.block)
    qw = torch.from_numpy(im).view(-1, q.type.block).repeat(24, 1)
    want = {}
    for path, imat in (("plain", None), ("imatrix", torch.from_numpy(im))):
        whole = want[path] = q.quantize(x, imat)
        assert np.array_equal(whole.numpy(), ggml_quantize(name, x.numpy(), None if imat is None else im))
        assert torch.equal(q.quantize(x.t().contiguous().t(), imat), whole)  # column-major rows
        assert torch.equal(q.quantize(x[::2], imat), whole[::2])
        w = None if imat is None else qw
        want[path + " blocks"] = q.quantize_blocks(blocks, w)
        w3 = None if w is None else w[::3]
        dense = q.quantize_blocks(blocks[::3].contiguous(), None if w3 is None else w3.contiguous())
        assert torch.equal(q.quantize_blocks(blocks[::3], w3), dense)
    monkeypatch.setattr(q, "chunk", 3)  # quantize() rounds a chunk up to whole rows
    torch.set_num_threads(2)
    try:
        for path, imat in (("plain", None), ("imatrix", torch.from_numpy(im))):
            assert torch.equal(q.quantize(x, imat), want[path])
            assert torch.equal(q.quantize_blocks(blocks, None if imat is None else qw), want[path + " blocks"])
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
def test_iq4_non_finite_blocks_match_ggml(name):
    """NaN and +-inf in a block: C's NaN-skipping compares, nearest_int bits and its lookup of NaN."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    x[0, :256] = np.inf
    x[1, :32] = -np.inf
    x[2, 40:300] = np.nan
    x[3, ::37] = np.nan
    x[4, 5], x[4, 70], x[4, 300] = np.inf, -np.inf, np.nan
    x[5, :256] = 3e38
    x[6, 0], x[6, 1] = np.nan, np.inf
    for imat in (None, rng.uniform(0.1, 2, 512).astype(np.float32)):
        with np.errstate(all="ignore"):
            ref = ggml_quantize(name, x, imat)
            ours = QUANTIZERS[name].quantize(torch.from_numpy(x), None if imat is None else torch.from_numpy(imat))
        np.testing.assert_array_equal(ours.numpy(), ref)


def test_nearest_int_is_ggml_trick():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49999, -7.5, 4194303.0, 1e9, -1e9, 123.5], np.float32)
    expect = ((x + np.float32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000
    np.testing.assert_array_equal([nearest_int_bits(v) for v in x], expect)
    assert list(expect[:7]) == [0, 2, 2, 0, -2, 3, -8]


@pytest.mark.parametrize("name,limit", [("IQ4_NL", 0.09), ("IQ4_XS", 0.09), ("Q2_K", 0.33), ("Q3_K", 0.18)])
def test_gaussian_error_level(name, limit):
    x = np.random.default_rng(1).standard_normal((16, 4096)).astype(np.float32)
    t = torch.from_numpy(x)
    y = QUANTIZERS[name].dequantize(QUANTIZERS[name].quantize(t), 4096)
    rel = float(((y - t).norm() / t.norm()))
    print(f"{name}: relative RMSE {rel:.4f}")
    assert rel < limit


@pytest.mark.slow
@pytest.mark.parametrize("name", TYPES)
def test_large_random_sweep(name):
    """A 4096 x 4096 edge matrix (65536 super-blocks), reference and imatrix paths."""
    x = edge_matrix(4096, 4096, seed=11)
    compare(name, x, None)
    compare(name, x, imatrix(4096, seed=12))
