import pytest
import torch

import grokquant.quant.cholesky as cholesky
from grokquant.quant.cholesky import reverse_, reversed_cholesky_, upper_cholesky_of_inverse


def hessians(b: int, n: int) -> torch.Tensor:
    X = torch.randn(b, 3 * n + 4, n, generator=torch.Generator().manual_seed(n))
    return X.transpose(1, 2) @ X


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 7), (64, 33)])
def test_reverse_is_both_flips(shape, monkeypatch):
    monkeypatch.setattr(cholesky, "_CHUNK", 4)  # several chunks, an odd middle element
    m = torch.arange(shape[0] * shape[1], dtype=torch.float32).view(shape)
    assert torch.equal(reverse_(m.clone()), m.flip(0, 1))


@pytest.mark.parametrize("lapack", [True, False])
@pytest.mark.parametrize("n", [1, 2, 37, 300, 2 * cholesky.BLOCK + 1])
def test_factors_agree_with_torch(n, lapack, monkeypatch):
    if not lapack:  # the path of a torch without LAPACK symbols, and of CUDA
        monkeypatch.setattr(cholesky, "_lapack", lambda *_: None)
    H = hessians(2, n)
    R = reversed_cholesky_(H.clone()).triu()
    assert torch.allclose(R @ R.transpose(1, 2), H, rtol=1e-4, atol=1e-3 * float(H.abs().max()))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H.double())), upper=True)
    got = upper_cholesky_of_inverse(H.clone())
    assert float((got.double() - U).abs().max() / U.abs().max()) < 1e-5
    assert torch.equal(got, got.triu())


def test_not_positive_definite_is_an_error():
    H = -torch.eye(4)[None]
    with pytest.raises(torch.linalg.LinAlgError):
        reversed_cholesky_(H)


def test_the_factors_do_not_depend_on_the_thread_count():
    """MKL's own spotrf and strtri split their work by thread count (their bits change between one and two
    threads); the blocked factorisations must not, or GPTQ's output would depend on OMP_NUM_THREADS."""
    H = hessians(1, 3 * cholesky.BLOCK + 17)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((reversed_cholesky_(H.clone()).triu(), upper_cholesky_of_inverse(H.clone())))
    finally:
        torch.set_num_threads(before)
    for R, U in results[1:]:
        assert torch.equal(R, results[0][0]) and torch.equal(U, results[0][1])
