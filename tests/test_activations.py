"""Our emulation of ggml's CPU arithmetic against ggml's own compiled routines (libggml-cpu, through ctypes):
the activation quantizers (`from_float` of Q8_0 / Q8_K), RMSNorm's order and the GELU table, bit for bit.
One float32 ulp off any of these decides a rounding tie now and then, and a tie rounded differently is
what made llama.cpp and our model part on some files (docs/gguf.md)."""

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from grokquant.grok.model import RMSNorm, ggml_gelu_table
from grokquant.quant.ggml.activations import round_activations

llama_cpp = pytest.importorskip("llama_cpp")


class _Traits(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


@pytest.fixture(scope="module")
def libcpu():
    lib = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu.so*"))))
    lib.ggml_cpu_init()
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_Traits)
    return lib


def ggml_from_float(lib, type_id: int, x: np.ndarray) -> bytes:
    block_bytes = {8: 34, 15: 292}[type_id]  # Q8_0: fp16 d + 32 int8; Q8_K: f32 d + 256 int8 + 16 int16 sums
    block = {8: 32, 15: 256}[type_id]
    out = np.zeros(x.size // block * block_bytes, np.uint8)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(
        lib.ggml_get_type_traits_cpu(type_id).contents.from_float)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out.reshape(-1, block_bytes)


def activations(seed: int) -> np.ndarray:
    """Blocks at many scales, plus lattice values (a quantized embedding times bf16 norm weights) full of
    exact rounding ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((512, 256)) * rng.uniform(1e-3, 30, (512, 1))
    lattice = rng.integers(-127, 128, (64, 256)) * 0.0123 * (1 + rng.integers(-4, 5, (1, 256)) / 128)
    return np.concatenate([x, lattice]).astype(np.float32)


@pytest.mark.parametrize("weight_type,type_id", [("Q4_0", 8), ("Q4_K", 15)])
def test_activation_rounding_equals_ggml(libcpu, weight_type, type_id):
    x = activations(1)
    blocks = ggml_from_float(libcpu, type_id, x)
    if type_id == 8:
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
    else:
        d = blocks[:, :4].copy().view(np.float32)
        q = blocks[:, 4:260].view(np.int8).astype(np.float32)
    theirs = (q * d).reshape(x.shape)
    ours = round_activations(torch.from_numpy(x), weight_type).numpy()
    assert np.array_equal(ours, theirs)


def test_gelu_table_equals_ggml(libcpu):
    table = np.frombuffer((ctypes.c_uint16 * 65536).in_dll(libcpu, "ggml_table_gelu_f16"), np.uint16)
    theirs = table.view(np.float16).astype(np.float32)
    x = np.arange(65536, dtype=np.uint16).view(np.float16)
    used = np.isfinite(x) & (np.abs(x) < 10)  # ggml answers 0 and x itself outside (-10, 10)
    assert np.array_equal(ggml_gelu_table().numpy()[used], theirs[used])


def test_rms_norm_in_ggml_order():
    """ggml_compute_forward_rms_norm_f32: float32 squares summed in double, scale = 1.0f/sqrtf(mean + eps)."""
    x = torch.from_numpy(activations(2))
    norm = RMSNorm(x.shape[1], 1e-5)
    norm.ggml_order = True
    xs = x.numpy()
    expected = np.empty_like(xs)
    for i, row in enumerate(xs):
        total = 0.0
        for v in row:
            total += float(np.float32(v) * np.float32(v))
        mean = np.float32(total / len(row))
        expected[i] = row * (np.float32(1) / np.sqrt(mean + np.float32(1e-5)))
    assert np.array_equal(norm(x).numpy(), expected)
