"""GPTQ onto GGML grids: valid GGML bytes, lower output error than importance-weighted rounding."""

import pytest
import torch

from grokquant.quant.ggml.base import QUANTIZERS
from grokquant.quant.gptq_ggml import ggml_rtn, gptq_ggml


def correlated_inputs(B, n, tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 2 * torch.randn(n, n, generator=gen) / n ** 0.5
    X = torch.randn(B, tokens, n, generator=gen) @ mix
    X[..., : n // 64] *= 8  # a few outlier channels, as real activations have
    return X


def relative_error(data, W, X, type_name):
    B, rows, n = W.shape
    Wq = QUANTIZERS[type_name].dequantize(data.reshape(B * rows, -1), n).view(B, rows, n)
    return float((X @ (Wq - W).transpose(1, 2)).norm() / (X @ W.transpose(1, 2)).norm())


@pytest.mark.parametrize("type_name", ["Q4_K", "Q2_K", "Q4_0", "IQ4_XS", "Q6_K"])
def test_beats_importance_weighted_rounding_on_held_out_inputs(type_name):
    B, rows, n = 2, 64, 512
    X = correlated_inputs(B, n, 2048)
    train, held = X[:, :1024], X[:, 1024:]
    W = torch.randn(B, rows, n, generator=torch.Generator().manual_seed(1))
    H = train.transpose(1, 2) @ train
    plain = relative_error(ggml_rtn(W, type_name), W, held, type_name)
    weighted = relative_error(ggml_rtn(W, type_name, torch.diagonal(H, dim1=1, dim2=2)), W, held, type_name)
    ours = relative_error(gptq_ggml(W, H, type_name).data, W, held, type_name)
    print(f"{type_name}: reference {plain:.4f} imatrix {weighted:.4f} gptq {ours:.4f}")
    assert ours < 0.95 * weighted and weighted < plain


def test_batched_equals_one_matrix_at_a_time():
    B, rows, n = 3, 32, 512
    X = correlated_inputs(B, n, 1024, seed=2)
    W = torch.randn(B, rows, n, generator=torch.Generator().manual_seed(3))
    H = X.transpose(1, 2) @ X
    batched = gptq_ggml(W, H, "Q4_K").data
    single = torch.cat([gptq_ggml(W[b:b + 1], H[b:b + 1], "Q4_K").data for b in range(B)])
    blocks = batched.view(-1, 144) == single.view(-1, 144)
    assert blocks.all(dim=1).float().mean() > 0.99  # float summation order may flip a rare rounding


def test_unused_columns_and_zero_rows_stay_finite():
    rows, n = 16, 256
    W = torch.randn(1, rows, n)
    W[0, 3] = 0
    X = torch.randn(1, 300, n)
    X[..., 100:200] = 0  # columns no calibration token touches
    data = gptq_ggml(W, X.transpose(1, 2) @ X, "Q4_K").data
    Wq = QUANTIZERS["Q4_K"].dequantize(data[0], n)
    assert torch.isfinite(Wq).all() and (Wq[3] == 0).all()
    dead = slice(100, 200)  # kept (rounded), not zeroed: inputs outside the calibration still work
    assert (Wq[:, dead] - W[0, :, dead]).norm() / W[0, :, dead].norm() < 0.2


@pytest.mark.parametrize("type_name", ["Q4_K", "Q8_0"])
def test_hessian_error_is_the_error_on_the_given_hessian(type_name):
    B, rows, n = 2, 16, 512
    X = correlated_inputs(B, n, 1024, seed=4)
    X[..., 7] = 0  # a dead column
    W = torch.randn(B, rows, n, generator=torch.Generator().manual_seed(5))
    H = X.transpose(1, 2) @ X
    q = gptq_ggml(W, H.clone(), type_name, overwrite_h=True)
    D = (QUANTIZERS[type_name].dequantize(q.data.reshape(B * rows, -1), n).view(B, rows, n) - W).double()
    expected = torch.einsum("boi,bij,boj->b", D, H.double(), D)
    assert torch.allclose(q.hessian_error, expected, rtol=1e-3), (q.hessian_error, expected)


def test_row_length_must_fit_the_block():
    with pytest.raises(ValueError, match="multiple of 256"):
        gptq_ggml(torch.randn(1, 4, 96), torch.eye(96)[None], "Q4_K")


GRID_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


@pytest.mark.parametrize("type_name", GRID_TYPES)
def test_grid_is_what_the_dequantizer_reads(type_name):
    q = QUANTIZERS[type_name]
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(48, q.type.block, generator=gen)
    x[0] = 0  # a block of zeros: zero scale
    for qw in (None, torch.rand(48, q.type.block, generator=gen)):
        data = q.quantize_blocks(x, qw)
        scale, offset = q.grid(data)
        offset = torch.zeros_like(scale) if offset is None else offset
        codes = torch.randint(0, len(q.levels), x.shape, generator=gen)
        changed = q.with_codes(data, codes)
        assert torch.equal(q.dequantize_blocks(changed), scale * q.levels[codes] + offset)
        assert torch.equal(q.grid(changed)[0], scale)  # the parameters stay as they were
        # the quantizer's own codes, read back through the grid, give the same tensor
        values = scale[..., None] * q.levels + offset[..., None]
        own = (q.dequantize_blocks(data)[..., None] - values).abs().argmin(-1)
        assert torch.equal(q.dequantize_blocks(q.with_codes(data, own)), q.dequantize_blocks(data))


@pytest.mark.parametrize("type_name", GRID_TYPES)
def test_rounding_inside_blocks_lowers_the_objective_on_every_type(type_name):
    """The column sweep compensates each column's error inside its block: a lower calibration objective
    than handing a block's error on as a whole (and no worse on held-out inputs)."""
    B, rows, n = 2, 32, 512
    X = correlated_inputs(B, n, 2048, seed=7)
    train, held = X[:, :1024], X[:, 1024:]
    W = torch.randn(B, rows, n, generator=torch.Generator().manual_seed(8))
    H = train.transpose(1, 2) @ train
    blocks = gptq_ggml(W, H, type_name, sweep="blocks")
    columns = gptq_ggml(W, H, type_name)
    refit = gptq_ggml(W, H, type_name, refits=1)
    print(type_name, blocks.hessian_error.sum().item(), columns.hessian_error.sum().item(),
          refit.hessian_error.sum().item())
    assert (columns.hessian_error < blocks.hessian_error).all()
    assert (refit.hessian_error <= columns.hessian_error * 1.001).all()
    assert relative_error(columns.data, W, held, type_name) < relative_error(blocks.data, W, held, type_name)
