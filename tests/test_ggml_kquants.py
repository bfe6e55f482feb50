"""Q4_K / Q5_K / Q6_K against ggml itself: quantization bytes vs `ggml_quantize_chunk` (the code llama-quantize
runs), dequantization vs PyPI gguf. Reference path (no imatrix): every block identical. Imatrix path: at least
99.9% of blocks identical and any other block no worse in imatrix-weighted squared error.
Q2_K and Q3_K (test_ggml_iquants.py) share the kernels' module; its own tests here cover all five types."""

from __future__ import annotations

import time

import gguf
import numpy as np
import pytest
import torch

from grokquant.quant.ggml.reference import ggml_quantize, ggml_validate
from grokquant.quant.ggml.compiled import fp16_bits, fp16_value
from grokquant.quant.ggml import kquants as K

TYPES = ["Q4_K", "Q5_K", "Q6_K"]
ALL_TYPES = ["Q2_K", "Q3_K", *TYPES]
QUANT = {t: getattr(K, t)() for t in ALL_TYPES}


def edge_rows(n: int, seed: int) -> np.ndarray:
    """Rows that stress the searches: outliers, zero (sub-)blocks, tiny and constant values, one-signed
    blocks, exact rounding ties, +a/-a ties for the largest |x|."""
    rng = np.random.default_rng(seed)
    g = lambda scale=1.0: rng.standard_normal(n) * scale  # noqa: E731
    outliers = g()
    outliers[rng.integers(0, n, n // 64)] *= 100
    zero_parts = g()
    zero_parts[:256] = 0  # whole super-block
    zero_parts[256 + 32:256 + 64] = 0  # one 32-sub-block
    zero_parts[512 + 16:512 + 32] = 0  # one 16-sub-block
    zero_parts[5::32] = 0
    ties = g()
    for b in range(0, n, 16):  # +3 and -3 both largest, in either order
        ties[b + 3], ties[b + 9] = (3.0, -3.0) if rng.random() < 0.5 else (-3.0, 3.0)
    rows = [
        g(), g(0.02), outliers, rng.standard_t(2, n), zero_parts, np.zeros(n),
        g(1e-6), g(1e-20), g(1e-30), g(1e-40), g(3e4), g(1e20),  # 1e-40: subnormal; 1e20: x^3 overflows
        np.full(n, 0.37), np.full(n, -1.5), np.repeat(rng.standard_normal(n // 256), 256),
        -np.abs(g()), np.abs(g()) + 0.5, rng.integers(-8, 8, n) / 2, ties,
        g() * (rng.random(n) < 0.1), np.repeat(rng.standard_normal(n // 32), 32),
    ]
    return np.stack(rows).astype(np.float32)


def gaussian(rows: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, n), dtype=np.float32)


def imatrices(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    varied = np.exp(rng.standard_normal(n) * 2)  # spans orders of magnitude
    varied[rng.random(n) < 0.1] = 0  # dead columns
    sparse = np.where(rng.random(n) < 0.5, 0.0, rng.random(n))
    sparse[:64] = 0  # a whole sub-block of zero weight
    return [varied.astype(np.float32), sparse.astype(np.float32)]


def ours(t: str, x: np.ndarray, im: np.ndarray | None = None) -> np.ndarray:
    return QUANT[t].quantize(torch.from_numpy(x), None if im is None else torch.from_numpy(im)).numpy()


def deq(t: str, data: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # arbitrary bytes hold inf scales: inf * 0
        return gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, t))


def identical_blocks(t: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    bb = QUANT[t].type.block_bytes
    return (a.reshape(-1, bb) == b.reshape(-1, bb)).all(1)


def check(t: str, x: np.ndarray, im: np.ndarray | None, label: str) -> float:
    got, ref = ours(t, x, im), ggml_quantize(t, x, im)
    same = identical_blocks(t, got, ref)
    frac = float(same.mean())
    print(f"{t} {label}: {same.sum()}/{same.size} blocks identical ({frac:.6f})")
    if im is None:
        assert frac == 1.0
    else:
        assert frac >= 0.999
        diff = ~same  # a differing block must be at least as good in imatrix-weighted squared error
        if diff.any():
            w = np.broadcast_to(im, x.shape).reshape(-1, 256)[diff].astype(np.float64)
            xb = x.reshape(-1, 256)[diff].astype(np.float64)
            bb = QUANT[t].type.block_bytes
            err = lambda d: (w * (deq(t, d.reshape(-1, bb)[diff]) - xb) ** 2).sum(1)  # noqa: E731
            assert (err(got) <= err(ref) * (1 + 1e-6)).all()
    # ggml's row check (finite fp16 scales) agrees; rows of ~1e20 overflow fp16 in ggml too
    assert [ggml_validate(t, r) for r in got] == [ggml_validate(t, r) for r in ref]
    return frac


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("n", [256, 2048, 4096])
def test_reference_path_bit_exact(t, n):
    x = np.concatenate([edge_rows(n, seed=n), gaussian(max(1, 8192 // n), n, seed=n + 1)])
    check(t, x, None, f"reference, edge cases n={n}")


@pytest.mark.parametrize("t", TYPES)
def test_reference_path_gaussian(t):
    check(t, gaussian(128, 4096, seed=7) * 0.02, None, "reference, gaussian 128x4096")


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("n", [256, 2048, 4096])
def test_imatrix_path(t, n):
    x = np.concatenate([edge_rows(n, seed=2 * n), gaussian(max(1, 4096 // n), n, seed=n + 2)])
    for k, im in enumerate(imatrices(n, seed=n)):
        check(t, x, im, f"imatrix {k}, edge cases n={n}")


@pytest.mark.parametrize("t", TYPES)
def test_imatrix_path_gaussian(t):
    x = gaussian(64, 4096, seed=11)
    im = np.random.default_rng(12).random(4096, dtype=np.float32) ** 4 + 1e-3
    check(t, x, im, "imatrix, gaussian 64x4096")


@pytest.mark.parametrize("t", TYPES)
def test_dequantize_matches_gguf(t):
    x = np.concatenate([edge_rows(2048, seed=3), gaussian(16, 2048, seed=4)])
    data = ggml_quantize(t, x)
    rng = np.random.default_rng(5)  # plus arbitrary bytes: every code and scale bit pattern
    noise = rng.integers(0, 256, (64, data.shape[1]), dtype=np.uint8)
    for d in (noise, data):
        got = QUANT[t].dequantize(torch.from_numpy(d), 2048).numpy()
        ref = deq(t, d)
        nan = np.isnan(ref)
        assert (np.isnan(got) == nan).all()
        assert (got.view(np.uint32)[~nan] == ref.view(np.uint32)[~nan]).all()  # bitwise, sign of zero too


@pytest.mark.parametrize("t", ALL_TYPES)
def test_chunks_threads_and_strided_input(t, monkeypatch):
    """Chunks of 5 blocks (tiles of the lanes cut short) on two worker threads, and blocks given as a strided
    view, give ggml's bytes; torch's thread count is kept."""
    x = np.concatenate([edge_rows(1024, seed=9), gaussian(13, 1024, seed=10)])
    im = imatrices(1024, seed=9)[0]
    wide = np.zeros((2 * x.size // 256, 512), np.float32)
    wide[::2, 128:384] = x.reshape(-1, 256)  # every other row, columns 128..383: neither row nor column dense
    blocks = torch.from_numpy(wide)[::2, 128:384]
    assert not blocks.is_contiguous()
    qw = torch.from_numpy(np.tile(im, x.shape[0]).reshape(-1, 256).T.copy()).t()  # strided too
    q = QUANT[t]
    monkeypatch.setattr(q, "chunk", 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert (ours(t, x) == ggml_quantize(t, x)).all()
        assert (ours(t, x, im) == ggml_quantize(t, x, im)).all()
        strided = q.quantize_blocks(blocks).numpy().reshape(x.shape[0], -1)
        strided_im = q.quantize_blocks(blocks, qw).numpy().reshape(x.shape[0], -1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert (strided == ggml_quantize(t, x)).all()
    assert (strided_im == ggml_quantize(t, x, im)).all()


@pytest.mark.parametrize("t", ALL_TYPES)
def test_non_finite_input_matches_ggml(t):
    """NaN, +-inf and values near FLT_MAX go through C's nearest_int bit trick as in C: still ggml's bytes."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    x[0, 5], x[1, 7], x[2, 9] = np.nan, np.inf, -np.inf
    x[3, :16] = np.nan
    x[4, 300], x[5, ::3] = 3e38, -3e38
    x[6, 17], x[7] = 1e-45, 1e-39 * x[7]
    im = imatrices(512, seed=23)[0]
    for m in (None, im):
        assert (ours(t, x, m) == ggml_quantize(t, x, m)).all()


def test_fp16_conversion_matches_numpy():
    """The kernels' GGML_FP32_TO_FP16 (round to nearest even) and its read-back, against numpy's float16."""
    rng = np.random.default_rng(24)
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    finite = halves[np.isfinite(halves)]
    up = np.nextafter(finite, np.float32(np.inf))
    down = np.nextafter(finite, np.float32(-np.inf))
    mids = (finite[:-1].astype(np.float64) + finite[1:]) / 2  # exact ties (as float32 where representable)
    v = np.concatenate([halves, up, down, mids.astype(np.float32), rng.standard_normal(20000).astype(np.float32)
                        * np.float32(10.0) ** rng.uniform(-10, 6, 20000).astype(np.float32),
                        np.float32([65504, 65519.996, 65520, 1e38, -1e38, np.inf, -np.inf, 0.0, -0.0, 1e-45])])
    v = v[~np.isnan(v)].astype(np.float32)
    with np.errstate(over="ignore"):
        want = v.astype(np.float16).view(np.uint16)
    got = np.array([fp16_bits(f) for f in v], np.uint16)
    np.testing.assert_array_equal(got, want)
    back = np.array([fp16_value(int(h)) for h in want], np.float32)
    np.testing.assert_array_equal(back.view(np.uint32), want.view(np.float16).astype(np.float32).view(np.uint32))
    assert fp16_bits(np.float32(np.nan)) & 0x7FFF == 0x7E00


def test_roundtrip_quality():
    """Sanity: relative RMSE on Gaussian data is where ggml's K-quants put it (about 8%, 4% and 2%)."""
    x = gaussian(32, 4096, seed=21)
    expect = {"Q4_K": 0.078, "Q5_K": 0.038, "Q6_K": 0.019}
    for t, e in expect.items():
        y = QUANT[t].dequantize(torch.from_numpy(ours(t, x)), 4096).numpy()
        rel = np.sqrt(((y - x) ** 2).mean() / (x**2).mean())
        assert 0.7 * e < rel < 1.2 * e, (t, rel)


def test_empty_input():
    for t in ALL_TYPES:
        assert ours(t, np.zeros((0, 256), np.float32)).shape == (0, QUANT[t].type.block_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("t", TYPES)
def test_full_matrix_and_speed(t):
    """4096x4096, both paths: all blocks compared; prints our time against ggml's (single-threaded) C."""
    x = gaussian(4096, 4096, seed=31) * 0.02
    im = np.random.default_rng(32).random(4096, dtype=np.float32) ** 2
    for label, m in (("reference", None), ("imatrix", im)):
        t0 = time.perf_counter()
        got = ours(t, x, m)
        t1 = time.perf_counter()
        ref = ggml_quantize(t, x, m)
        t2 = time.perf_counter()
        frac = identical_blocks(t, got, ref).mean()
        print(f"{t} {label} 4096x4096: identical {frac:.6f}; ours {t1 - t0:.2f}s "
              f"({torch.get_num_threads()} threads), ggml C {t2 - t1:.2f}s, ratio {(t1 - t0) / (t2 - t1):.2f}")
        assert frac == 1.0 if m is None else frac >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("t", TYPES)
def test_random_stress(t):
    """Many random mixtures of scales, offsets, outliers, sparsity and quantized grids, every block compared."""
    rng = np.random.default_rng(41)
    parts = []
    for _ in range(400):
        n = 256 * int(rng.integers(1, 5))
        kind = rng.integers(0, 6)
        r = rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 4)
        if kind == 1:
            r += rng.uniform(-3, 3) * np.abs(r).max()  # offset: one-signed blocks
        elif kind == 2:
            r[rng.random(n) < 0.05] *= 10.0 ** rng.uniform(1, 3)  # outliers
        elif kind == 3:
            r *= rng.random(n) < rng.uniform(0.02, 0.5)  # sparse
        elif kind == 4:
            r = np.round(r / np.abs(r).max() * rng.integers(1, 40)) * 10.0 ** rng.uniform(-3, 1)  # grids: ties
        elif kind == 5:
            r = rng.standard_t(rng.uniform(1, 5), n)
        parts.append(r.astype(np.float32).reshape(-1, 256))
    blocks = np.concatenate(parts)
    x = blocks[: len(blocks) // 4 * 4].reshape(-1, 1024)  # rows of 4 super-blocks
    check(t, x, None, "random stress")
    check(t, x, imatrices(1024, seed=42)[0], "random stress, imatrix")
