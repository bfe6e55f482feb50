"""Legacy GGML blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) against ggml itself and gguf-py.

Quantization is compared byte for byte with `ggml_quantize_chunk` from libggml-base (the code
llama-quantize runs), with and without an importance matrix; dequantization with gguf-py's numpy code.
"""

from __future__ import annotations

from functools import lru_cache

import gguf
import numpy as np
import pytest
import torch
from grokquant.quant.ggml.reference import ggml_quantize, ggml_validate

from grokquant.quant.ggml import legacy as ggml_legacy
from grokquant.quant.ggml.base import QUANTIZERS, dequantize, quantize

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
QK = 32


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run single-threaded like the C oracle: the searches are thousands of small ops, and on a shared
    2-core box intra-op threads mostly add synchronization cost (often 10x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tie_blocks(rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """Half-integer blocks whose anchors make the scale exactly 1 (then times a power of two) for some
    type, so x*id + 8.5 etc. land exactly on integers and roundf / nearest_int see exact .5 ties."""
    out = []
    for anchor, (lo, hi) in [([-8.0], (-8, 8)), ([-16.0], (-16, 16)), ([127.0], (-127, 127)),
                             ([-127.0], (-127, 127)), ([0.0, 15.0], (0, 15)), ([0.0, 31.0], (0, 31)),
                             ([8.0, -8.0], (-8, 8)), ([-8.0, 8.0], (-8, 8))]:  # last two: |max| ties
        b = rng.integers(lo, hi, (n_blocks, QK)) + 0.5
        b[:, : len(anchor)] = anchor
        out.append(b * 2.0 ** rng.integers(-6, 7, (n_blocks, 1)))
    return np.concatenate(out).astype(np.float32)


def _special_blocks(rng: np.random.Generator) -> np.ndarray:
    """Degenerate blocks: zeros of both signs, tiny, subnormal, huge and constant values, one-signed and
    single-spike blocks. Subnormal scales make ggml's 1/d or iscale infinite; huge ones overflow fp16."""
    g = rng.standard_normal((8, QK))
    blocks = [
        np.zeros(QK), -np.zeros(QK), np.where(rng.random(QK) < 0.5, 0.0, -0.0), np.r_[-0.0, np.zeros(QK - 1)],
        g[0] * 1e-30, g[1] * 1e-20, np.full(QK, 1e-30),
        np.full(QK, 1.5), np.full(QK, -2.25), np.full(QK, 0.1),
        -np.abs(g[2]), np.abs(g[3]), -np.abs(g[4]) - 3.0, np.abs(g[5]) + 3.0,
        np.r_[np.zeros(QK - 1), 5.0], np.r_[np.zeros(QK - 1), -5.0], np.r_[0.0, 1e-30, np.zeros(QK - 2)],
        np.r_[np.full(QK - 1, 0.25), -0.0], np.r_[-0.0, np.full(QK - 1, 0.25)],
        np.r_[np.full(16, 3.0), np.full(16, -3.0)], np.r_[np.full(16, -3.0), np.full(16, 3.0)],
        g[6] * 1e-38, g[7] * 1e-41, np.r_[1e-45, np.zeros(QK - 1)], g[0] * 1e30, g[1] * 3e37,
    ]
    return np.stack(blocks).astype(np.float32)


@lru_cache(maxsize=1)
def cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (x [rows, n] float32, imatrix [n] float32); seeded."""
    rng = np.random.default_rng(20240531)
    out = {}

    def imatrix(n):  # per-column E[x^2]: spans ~6 decades, some exact zeros and one all-zero block
        im = (10.0 ** rng.uniform(-3, 3, n)) * rng.random(n)
        im[rng.random(n) < 0.05] = 0.0
        if n >= 2 * QK:
            im[QK:2 * QK] = 0.0
        return im.astype(np.float32)

    out["gauss_4096"] = (rng.standard_normal((40, 4096)) * 0.02).astype(np.float32)
    x = rng.standard_normal((24, 1024))
    x[rng.random(x.shape) < 0.01] *= 300.0  # heavy outliers
    x[rng.random(x.shape) < 0.001] *= 1e4
    out["outliers"] = x.astype(np.float32)
    for shape in [(1, 32), (3, 96), (7, 320), (2, 8192)]:
        out[f"shape_{shape[0]}x{shape[1]}"] = rng.standard_normal(shape).astype(np.float32)
    ties = _tie_blocks(rng, 16)
    out["ties"] = ties.reshape(-1, 8 * QK)
    special = _special_blocks(rng)  # 21 blocks: a row each, padded by gaussian blocks (row-global sigma2)
    pad = rng.standard_normal((len(special), 3 * QK)).astype(np.float32)
    out["special"] = np.concatenate([special, pad], axis=1)
    out["special_alone"] = special  # rows of one block: sigma2 comes from the degenerate block itself
    out["subnormal_rows"] = (rng.standard_normal((4, 256)) * 1e-40).astype(np.float32)
    out["negative"] = -np.abs(rng.standard_normal((8, 512))).astype(np.float32)
    return {k: (v, imatrix(v.shape[1])) for k, v in out.items()}


def _ours(type_name, x, im=None) -> np.ndarray:
    return quantize(torch.from_numpy(x), type_name, None if im is None else torch.from_numpy(im)).numpy()


def _deq(type_name, data: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # blocks with d = inf decode to inf/NaN
        return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]).reshape(data.shape[0], -1)


def _identical_fraction(type_name, x, im, ours, ref) -> float:
    """Fraction of identical blocks; any differing block must not be worse in weighted squared error."""
    bb = QUANTIZERS[type_name].type.block_bytes
    same = (ours.reshape(-1, bb) == ref.reshape(-1, bb)).all(1)
    if not same.all():
        w = np.ones(x.shape[1]) if im is None else im.astype(np.float64)
        err = [((_deq(type_name, q).astype(np.float64) - x) ** 2 * w).reshape(-1, QK).sum(1)
               for q in (ours, ref)]
        worse = ~same & (err[0] > err[1] * (1 + 1e-6))
        assert not worse.any(), f"{type_name}: {worse.sum()} differing blocks are worse than ggml's"
    return float(same.mean())


@pytest.mark.parametrize("type_name", TYPES)
def test_reference_path_bit_exact(type_name):
    for name, (x, _) in cases().items():
        ours, ref = _ours(type_name, x), ggml_quantize(type_name, x)
        frac = _identical_fraction(type_name, x, None, ours, ref)
        print(f"{type_name} reference {name}: identical blocks {frac:.6f}")
        assert frac == 1.0, (name, frac)
        assert ggml_validate(type_name, ours) or name.startswith("special")  # huge blocks: d = inf in fp16


@pytest.mark.parametrize("type_name", TYPES)
def test_imatrix_path_matches_ggml(type_name):
    n_same = n_all = 0
    for name, (x, im) in cases().items():
        ours, ref = _ours(type_name, x, im), ggml_quantize(type_name, x, im)
        frac = _identical_fraction(type_name, x, im, ours, ref)
        print(f"{type_name} imatrix {name}: identical blocks {frac:.6f}")
        n_blocks = x.size // QK
        n_same, n_all = n_same + round(frac * n_blocks), n_all + n_blocks
        assert frac >= 0.999, (name, frac)
    print(f"{type_name} imatrix overall: identical blocks {n_same}/{n_all} = {n_same / n_all:.6f}")


def test_q8_0_ignores_imatrix():
    x, im = cases()["gauss_4096"]
    assert np.array_equal(_ours("Q8_0", x, im), _ours("Q8_0", x))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantize_blocks_without_sigma2_treats_each_block_as_a_row(type_name):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, QK)).astype(np.float32)
    im = rng.random(QK).astype(np.float32)
    q = QUANTIZERS[type_name]
    ours = q.quantize_blocks(torch.from_numpy(x), torch.from_numpy(im).expand(64, QK)).numpy()
    assert np.array_equal(ours, ggml_quantize(type_name, x, im))


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_gguf(type_name):
    rng = np.random.default_rng(11)
    t = QUANTIZERS[type_name].type
    quantized = np.concatenate([_ours(type_name, x).reshape(-1, t.block_bytes) for x, _ in cases().values()])
    noise = rng.integers(0, 256, (4096, t.block_bytes), dtype=np.uint8)  # every code pattern
    n_fp16 = 2 if type_name in ("Q4_0", "Q5_0", "Q8_0") else 4
    scales = (rng.standard_normal((4096, n_fp16 // 2)) * 10.0 ** rng.uniform(-6, 4, (4096, 1)))
    noise[:, :n_fp16] = scales.astype(np.float16).view(np.uint8)  # finite d (and m)
    blocks = np.concatenate([quantized, noise])
    ours = QUANTIZERS[type_name].dequantize_blocks(torch.from_numpy(blocks)).numpy()
    ref = _deq(type_name, blocks).reshape(ours.shape)
    assert ours.dtype == np.float32 and np.array_equal(ours, ref, equal_nan=True)  # NaN: inf d times 0
    num = ~np.isnan(ref)
    assert np.array_equal(ours.view(np.uint32)[num], ref.view(np.uint32)[num])  # signs of zero too


@pytest.mark.parametrize("type_name, tol", [("Q8_0", 0.008), ("Q4_0", 0.12), ("Q4_1", 0.10),
                                            ("Q5_0", 0.06), ("Q5_1", 0.05)])
def test_roundtrip_nd_shapes(type_name, tol):
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 3, 256)).astype(np.float32))
    data = quantize(x, type_name)
    assert data.dtype == torch.uint8 and data.shape == (6, QUANTIZERS[type_name].type.row_bytes(256))
    y = dequantize(data, type_name, tuple(x.shape))
    assert y.shape == x.shape
    assert ((y - x).pow(2).mean() / x.pow(2).mean()).sqrt() < tol
    with pytest.raises(ValueError):
        quantize(torch.zeros(2, 48), type_name)


def test_q8_0_rounds_half_away_from_zero():
    """Blocks whose max is 127 have d = id = 1, so the codes are C's (int8_t)roundf(x) of the values themselves:
    exact halves round away from zero, their float neighbours to the nearest."""
    halves = np.arange(-253, 254, dtype=np.float32) / 2
    near = [np.nextafter(halves, np.float32(s)) for s in (-1e9, 1e9)]
    v = np.concatenate([halves, *near, np.random.default_rng(5).uniform(-127, 127, 3000).astype(np.float32)])
    v = np.resize(v, (len(v) + 30) // 31 * 31).reshape(-1, 31)
    x = np.concatenate([np.full((len(v), 1), 127, np.float32), v], axis=1).astype(np.float32)
    ours = _ours("Q8_0", x)
    assert np.array_equal(ours, ggml_quantize("Q8_0", x))
    expect = np.sign(x) * np.floor(np.abs(x.astype(np.float64)) + 0.5)  # exact in float64
    assert np.array_equal(ours.reshape(-1, 34)[:, 2:].view(np.int8), expect.astype(np.int8))


def _non_finite_rows() -> np.ndarray:
    """Blocks with NaN and +-inf (where C's NaN-skipping compares, int8 casts and nearest_int show), next to
    gaussian ones, two blocks a row."""
    g = np.random.default_rng(8).standard_normal((12, QK)).astype(np.float32)
    inf, nan = np.inf, np.nan
    blocks = [np.full(QK, inf), np.full(QK, -inf), np.full(QK, nan), np.r_[nan, g[0, 1:]], np.r_[g[1, :31], nan],
              np.r_[g[2, :5], nan, g[2, 6:]], np.r_[g[3, :5], inf, g[3, 6:]], np.r_[g[4, :5], -inf, g[4, 6:]],
              np.r_[inf, -inf, g[5, 2:]], np.r_[nan, inf, np.zeros(30)], np.r_[-inf, nan, np.full(30, -inf)],
              np.r_[np.zeros(16), np.full(16, nan)], np.r_[-np.zeros(16), nan, np.zeros(15)],
              np.full(QK, 3e38), np.r_[3e38, -3e38, g[6, 2:]], np.r_[-3.4e38, g[7, 1:]], *g[8:]]
    return np.stack(blocks).astype(np.float32).reshape(-1, 2 * QK)


@pytest.mark.parametrize("type_name", TYPES)
def test_non_finite_blocks_match_ggml(type_name):
    x = _non_finite_rows()
    im = np.random.default_rng(9).uniform(0.1, 2, x.shape[1]).astype(np.float32)
    for imatrix in (None, im):
        with np.errstate(all="ignore"):
            ref = ggml_quantize(type_name, x, imatrix)
        assert np.array_equal(_ours(type_name, x, imatrix), ref), imatrix is None


@pytest.mark.parametrize("type_name", TYPES)
def test_strided_input_and_chunk_splits_give_the_same_bytes(type_name, monkeypatch):
    """Non-contiguous rows and blocks, and chunks that split the rows over two worker threads, change no byte."""
    x, im = cases()["outliers"]
    X = torch.from_numpy(x)
    q = QUANTIZERS[type_name]
    blocks = X.reshape(-1, QK)
    qw = torch.from_numpy(im).view(-1, QK).repeat(x.shape[0], 1)  # per block: each block its own row
    want = {}
    for path, imatrix in (("plain", None), ("imatrix", torch.from_numpy(im))):
        whole = want[path] = quantize(X, type_name, imatrix)
        assert np.array_equal(whole.numpy(), ggml_quantize(type_name, x, None if imatrix is None else im))
        assert torch.equal(quantize(X.t().contiguous().t(), type_name, imatrix), whole)  # column-major rows
        assert torch.equal(quantize(X[::2], type_name, imatrix), whole[::2])  # every other row
        w = None if imatrix is None else qw
        want[path + " blocks"] = q.quantize_blocks(blocks, w)
        w3 = None if w is None else w[::3]
        dense = q.quantize_blocks(blocks[::3].contiguous(), None if w3 is None else w3.contiguous())
        assert torch.equal(q.quantize_blocks(blocks[::3], w3), dense)
    monkeypatch.setattr(ggml_legacy, "CHUNK_IMATRIX", 7)  # quantize() rounds a chunk up to whole rows
    monkeypatch.setattr(q, "chunk", 5)
    torch.set_num_threads(2)  # two worker threads over the chunks
    try:
        for path, imatrix in (("plain", None), ("imatrix", torch.from_numpy(im))):
            assert torch.equal(quantize(X, type_name, imatrix), want[path])
            assert torch.equal(q.quantize_blocks(blocks, None if imatrix is None else qw), want[path + " blocks"])
    finally:
        torch.set_num_threads(1)


def test_imatrix_lowers_weighted_error():
    """Sanity of the wiring: the imatrix search beats the reference on the error it optimizes."""
    x, im = cases()["gauss_4096"]
    for type_name in ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]:
        quants = (_ours(type_name, x, im), _ours(type_name, x))
        err = [float(((_deq(type_name, q) - x) ** 2 * im).sum()) for q in quants]
        assert err[0] < err[1], type_name


@pytest.mark.slow
@pytest.mark.parametrize("type_name", TYPES)
def test_large_random_matrices(type_name):
    """~64k blocks per type: per-row scales over 8 decades, Student-t tails, imatrix over 6 decades."""
    rng = np.random.default_rng(99)
    x = rng.standard_t(3, (256, 8192)) * 10.0 ** rng.uniform(-4, 4, (256, 1))
    x = x.astype(np.float32)
    im = (10.0 ** rng.uniform(-3, 3, 8192) * (rng.random(8192) > 0.02)).astype(np.float32)
    for imatrix in (None, im):
        ours, ref = _ours(type_name, x, imatrix), ggml_quantize(type_name, x, imatrix)
        frac = _identical_fraction(type_name, x, imatrix, ours, ref)
        path = "reference" if imatrix is None else "imatrix"
        print(f"{type_name} {path} large: identical blocks {frac:.6f}")
        assert frac == 1.0 if imatrix is None else frac >= 0.999
