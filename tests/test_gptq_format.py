"""The GPTQ tensors, unpacked by an independent numpy implementation of the auto-gptq v1 format."""

import numpy as np
import pytest
import torch

from grokquant.gptq.layout import gptq_tensors, packable
from grokquant.quant.gptq import IntQuantConfig, gptq, rtn


def unpack_v1(t: dict, bits: int, in_features: int) -> np.ndarray:
    """Dequantized W [out, in] from qweight/qzeros/scales/g_idx, following the format description."""
    qweight = t["qweight"].numpy().view(np.uint32)
    qzeros = t["qzeros"].numpy().view(np.uint32)
    scales = t["scales"].numpy().astype(np.float32)
    g_idx = t["g_idx"].numpy()
    mask, per = (1 << bits) - 1, 32 // bits
    codes = np.zeros((in_features, qweight.shape[1]), dtype=np.int64)
    for i in range(in_features):  # input i sits in word i // per at bit offset bits * (i % per)
        codes[i] = (qweight[i // per] >> np.uint32(bits * (i % per))) & mask
    n_groups, out = scales.shape
    zeros = np.zeros((n_groups, out), dtype=np.int64)
    for o in range(out):
        zeros[:, o] = ((qzeros[:, o // per] >> np.uint32(bits * (o % per))) & mask) + 1  # v1: stored zero - 1
    return (scales[g_idx] * (codes - zeros[g_idx])).T


@pytest.mark.parametrize("bits,cfg", [(4, IntQuantConfig(bits=4)), (4, IntQuantConfig(bits=4, sym=False, act_order=True)),
                                      (8, IntQuantConfig(bits=8, group_size=-1)),
                                      (4, IntQuantConfig(bits=4, group_size=32, act_order=True, static_groups=True))])
def test_unpacked_weights_equal_the_quantizer(bits, cfg):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 64, 256, generator=g) * 0.02
    X = torch.randn(2, 512, 256, generator=g)
    q = gptq(W, X.transpose(1, 2) @ X, cfg)
    for b in range(2):
        t = gptq_tensors(q, b, bits)
        assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (256 * bits // 32, 64)
        assert t["qzeros"].shape == (q.scales.shape[1], 64 * bits // 32) and t["scales"].dtype == torch.float16
        W_unpacked = unpack_v1(t, bits, 256)
        ours = (q.scales[b].half().float()[q.g_idx[b].long()].T * (q.codes[b].float() - q.zeros[b][q.g_idx[b].long()].T))
        assert np.allclose(W_unpacked, ours.numpy(), atol=1e-6)
        rel = np.linalg.norm(W_unpacked - W[b].numpy()) / np.linalg.norm(W[b].numpy())
        assert rel < (0.2 if bits == 4 else 0.02)


def test_symmetric_int4_zero_word():
    W = torch.randn(1, 8, 64)
    t = gptq_tensors(rtn(W, IntQuantConfig(bits=4, group_size=32)), 0, 4)
    assert (t["qzeros"].numpy().view(np.uint32) == 0x77777777).all()  # zero 8 stored as 7, as auto-gptq writes


def test_packable_shapes():
    assert packable(64, 256, 4) and not packable(64, 100, 4) and not packable(100, 256, 4) and not packable(64, 256, 3)
