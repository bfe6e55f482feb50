"""IQ2_XXS, IQ2_XS, IQ2_S against ggml itself (ggml_quantize_chunk via ctypes) and gguf-py's dequantizers.

ggml's IQ2 quantizers are plain scalar C (no SIMD paths), so the reference bytes do not depend on this
machine's CPU; ours repeat their float order. IQ2_XXS and IQ2_XS require an importance matrix
(ggml_quantize_requires_imatrix: without one ggml aborts the process, so it is never called that way here);
quantize_row_iq2_s_impl accepts none.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from grokquant.quant.ggml import common as C
from grokquant.quant.ggml.base import QUANTIZERS, quantize
from grokquant.quant.ggml.compiled import make_qp_quants, nearest_int_bits
from grokquant.quant.ggml.reference import ggml_quantize, ggml_validate

TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S"]

pytestmark = pytest.mark.usefixtures("one_thread")


def edge_matrix(rows: int, n: int, seed: int) -> np.ndarray:
    """Gaussian rows plus the awkward cases, each spread over whole 256-blocks and over 8/16/32-element pieces."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    k = rows // 10 or 1
    x[k:2 * k] *= rng.standard_t(2, size=(k, n)).astype(np.float32) ** 2  # heavy tails
    x[2 * k:3 * k, rng.integers(0, n, 8)] = 1e4 * rng.standard_normal(8).astype(np.float32)  # outliers
    x[3 * k:4 * k] *= np.float32(10.0) ** rng.integers(-30, -6, size=(k, 1)).astype(np.float32)  # tiny
    x[4 * k:5 * k] = -np.abs(x[4 * k:5 * k])  # negative only: every octet flips
    x[5 * k:6 * k] = np.abs(x[5 * k:6 * k])  # positive only
    pieces = rng.choice(np.float32([0.5, -2.0, 0.0, 3e-9, 7.0]), size=(k, n // 8))
    x[6 * k:7 * k] = np.repeat(pieces, 8, axis=1)  # constant octets: ties everywhere
    z = rng.random((rows, n // 8)) < 0.08  # zero octets everywhere
    x.reshape(rows, -1, 8)[z] = 0
    x[7 * k, : min(n, 256)] = 0  # an all-zero block
    x[7 * k + 1:8 * k, : min(n, 256)] *= 1e-8  # blocks around GROUP_MAX_EPS_IQ2_S
    return x


def imatrix(n: int, seed: int) -> np.ndarray:
    """Column weights spanning 12 orders of magnitude, with zero columns and one zero 32-piece."""
    rng = np.random.default_rng(seed)
    w = (10.0 ** rng.uniform(-6, 6, n)).astype(np.float32)
    w[rng.random(n) < 0.05] = 0
    w[32:64] = 0
    return w


def positive_imatrix(n: int, seed: int) -> np.ndarray:
    """A plain imatrix: positive, within two orders of magnitude."""
    return np.random.default_rng(seed).uniform(0.1, 10, n).astype(np.float32)


def compare(name: str, x: np.ndarray, imat: np.ndarray | None) -> float:
    """Identical-block fraction of ours vs ggml; differing blocks must be no worse in weighted squared error."""
    q = QUANTIZERS[name]
    ref = ggml_quantize(name, x, imat)
    ours = q.quantize(torch.from_numpy(x), None if imat is None else torch.from_numpy(imat)).numpy()
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    assert ggml_validate(name, ours)
    bb = q.type.block_bytes
    same = (ours.reshape(-1, bb) == ref.reshape(-1, bb)).all(1)
    frac = float(same.mean())
    print(f"{name} n={x.shape[1]} {'imatrix' if imat is not None else 'no imatrix'}: "
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


FP16_FIELDS = {"IQ2_XXS": [0], "IQ2_XS": [0], "IQ2_S": [0]}  # byte offsets of fp16 d in a block


def random_blocks(name: str, rows: int, n: int, seed: int) -> np.ndarray:
    """Arbitrary bytes with a finite fp16 scale (NaN payloads need not survive both computations alike)."""
    rng = np.random.default_rng(seed)
    t = QUANTIZERS[name].type
    data = rng.integers(0, 256, (rows * n // t.block, t.block_bytes), dtype=np.uint8)
    for off in FP16_FIELDS[name]:
        data[:, off:off + 2] = rng.uniform(-2, 2, (len(data), 1)).astype(np.float16).view(np.uint8)
    return data.reshape(rows, -1)


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


def test_make_qp_quants_kernel_is_common_make_qp_quants():
    """IQ2_XXS's trial base: the numba make_qp_quants gives common.make_qp_quants' scale and uint8 codes,
    negative magnitudes (the flipped sign of an odd octet), zero weights and tiny groups included."""
    rng = np.random.default_rng(5)
    x = np.abs(rng.standard_normal((32, 3000))).astype(np.float32)
    x[rng.integers(0, 32, 3000), np.arange(3000)] *= -1
    x[:, :50] *= 1e-16
    w = (10.0 ** rng.uniform(-6, 6, (32, 3000))).astype(np.float32)
    w[rng.random((32, 3000)) < 0.1] = 0
    w[:, 50:60] = 0
    codes, scale = C.make_qp_quants(torch.from_numpy(x), torch.from_numpy(w), 4)
    xt, wt = np.ascontiguousarray(x.T), np.ascontiguousarray(w.T)
    L = np.zeros((3000, 32), np.uint8)
    ours = np.array([make_qp_quants(32, 4, xt[g], L[g], wt[g]) for g in range(3000)], np.float32)
    np.testing.assert_array_equal(ours.view(np.int32), scale.numpy().view(np.int32))
    np.testing.assert_array_equal(L.T, codes.numpy() & 255)


def test_nearest_int_bits_out_of_range():
    v = np.float32([0.5, 1.5, 2.5, -0.5, 4194303.0, 4194303.5, -4194304.5, 1e9, -1e9, 1e30, np.inf, -np.inf, np.nan,
                    -12582912.0, 3e38])
    np.testing.assert_array_equal([nearest_int_bits(f) for f in v], C.nearest_int(torch.from_numpy(v)).numpy())


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
