"""The factor GPTQ needs, in the Hessian's own storage: R upper triangular with H = R Rᵀ.

GPTQ's reference computes the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): a Cholesky, an inverse from it
and a second Cholesky, 4n³/3 flops and, through torch.linalg, a hidden n×n copy in each call (4.3 GB for
the 32768-wide down projection). U⁻¹ = R is the factor of H itself with rows and columns in reverse order
(H = J L Lᵀ J for the Cholesky L of JHJ, J the reversal, so R = JLJ), and GPTQ's column recursion can be
written in R alone (quant/gptq.py): one factorisation, n³/3 flops, 4x less than the reference.

On CPU the factorisation calls LAPACK's spotrf in place (and strtri for U = R⁻¹), from the LAPACK
torch itself links (MKL in the x86 wheels), which also follows torch's thread setting:
torch.linalg.cholesky(out=H) copies the matrix and took 2.3x as long at n = 4096 on one core. Elsewhere
(CUDA, a torch without exported LAPACK symbols) torch.linalg.cholesky is used.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

_CHUNK = 1 << 22  # elements per step of the in-place reversal (16 MB of float32 at a time)


@functools.cache
def _lapack(name: str):
    """LAPACK routine `name` (e.g. spotrf_) from the library torch links, or None."""
    try:
        fn = getattr(ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")), name)
    except (OSError, AttributeError):
        return None
    fn.restype = None
    return fn


def _in_place(a: torch.Tensor, name: str):
    ok = a.device.type == "cpu" and a.dtype == torch.float32 and a.is_contiguous() and a.shape[0] < 1 << 31
    return _lapack(name) if ok else None


def reverse_(m: torch.Tensor) -> torch.Tensor:
    """Reverse a contiguous matrix's rows and columns at once (element [i, j] <- [n-1-i, m-1-j]), in place:
    that is its flat storage reversed, done in chunks so no second matrix is ever held."""
    flat = m.view(-1)
    n = flat.numel()
    for start in range(0, n // 2, _CHUNK):
        stop = min(start + _CHUNK, n // 2)
        head = flat[start:stop].clone()
        flat[start:stop] = flat[n - stop:n - start].flip(0)
        flat[n - stop:n - start] = head.flip(0)
    return m


def lower_cholesky_(a: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor L (a = L Lᵀ) of a symmetric positive definite float32 matrix, written over
    a's lower triangle; the strict upper triangle is left undefined."""
    n = a.shape[0]
    fn = _in_place(a, "spotrf_")
    if fn is None:
        return torch.linalg.cholesky(a, out=a)
    # row-major lower is column-major upper: Fortran's "U" factor of a (= aᵀ) is our L
    size, info = ctypes.c_int(n), ctypes.c_int(0)
    fn(ctypes.c_char_p(b"U"), ctypes.byref(size), ctypes.c_void_p(a.data_ptr()), ctypes.byref(size),
       ctypes.byref(info))
    if info.value > 0:
        raise torch.linalg.LinAlgError(f"the leading minor of order {info.value} of the damped Hessian is not "
                                       "positive-definite")
    if info.value < 0:
        raise RuntimeError(f"spotrf: argument {-info.value} is invalid")
    return a


def reversed_cholesky_(H: torch.Tensor) -> torch.Tensor:
    """R upper triangular with H = R Rᵀ, for each matrix of a stack H [B, n, n], in H's own storage (the
    strict lower triangle is left undefined)."""
    for h in H:
        reverse_(lower_cholesky_(reverse_(h)))
    return H


def upper_inverse_(r: torch.Tensor) -> torch.Tensor:
    """R⁻¹ of an upper triangular float32 matrix (its strict lower triangle undefined), over R's upper
    triangle; the strict lower triangle is zeroed."""
    fn = _in_place(r, "strtri_")
    if fn is None:
        r.copy_(torch.linalg.solve_triangular(r.triu(), torch.eye(r.shape[0], device=r.device), upper=True))
        return r
    # row-major upper is column-major lower
    size, info = ctypes.c_int(r.shape[0]), ctypes.c_int(0)
    fn(ctypes.c_char_p(b"L"), ctypes.c_char_p(b"N"), ctypes.byref(size), ctypes.c_void_p(r.data_ptr()),
       ctypes.byref(size), ctypes.byref(info))
    if info.value:
        raise torch.linalg.LinAlgError(f"strtri: the factor is singular (info {info.value})")
    return r.triu_()


def upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """U upper triangular with UᵀU = H⁻¹ for each matrix of a stack [B, n, n], in H's own storage: U = R⁻¹
    for H = R Rᵀ (2n³/3 flops, where Cholesky, inverse and Cholesky again take 4n³/3)."""
    for h in reversed_cholesky_(H):
        upper_inverse_(h)
    return H
