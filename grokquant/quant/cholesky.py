"""The factor GPTQ needs, in the Hessian's own storage: R upper triangular with H = R Rᵀ.

GPTQ's reference computes the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): a Cholesky, an inverse from it
and a second Cholesky, 4n³/3 flops and, through torch.linalg, a hidden n×n copy in each call (4.3 GB for
the 32768-wide down projection). U⁻¹ = R is the factor of H itself with rows and columns in reverse order
(H = J L Lᵀ J for the Cholesky L of JHJ, J the reversal, so R = JLJ), and GPTQ's column recursion can be
written in R alone (quant/gptq.py): one factorisation, n³/3 flops, 4x less than the reference.

On CPU the factorisations work in place through the BLAS and LAPACK torch itself links (MKL in the x86
wheels; torch.linalg.cholesky(out=H) copies the matrix and took 2.3x as long at n = 4096 on one core),
by blocks of BLOCK columns: gemm and trsm on all of torch's threads, and spotrf/strtri only on the small
diagonal blocks, on one thread. MKL's own parallel spotrf and strtri give different bits on one and two
threads; gemm and trsm do not (tests/test_cholesky.py checks it), so GPTQ's output does not depend on
OMP_NUM_THREADS. The blocked factor took 1.07x spotrf's time at n = 8192 on two cores, the inverse the
same as strtri. Elsewhere (CUDA, a torch without MKL's symbols) torch.linalg is used.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

_CHUNK = 1 << 22  # elements per step of the in-place reversal (16 MB of float32 at a time)
BLOCK = 256  # columns per step of the blocked factorisations (1.07x spotrf at 8192; 128 and 512 no faster)


@functools.cache
def _lapack(name: str, restype=None):
    """BLAS/LAPACK routine `name` (e.g. spotrf_) from the library torch links, or None."""
    try:
        fn = getattr(ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")), name)
    except (OSError, AttributeError):
        return None
    fn.restype = restype
    return fn


def _routines(a: torch.Tensor, *names: str):
    """The routines for an in-place call on `a`, or None (not a contiguous float32 CPU matrix, or a torch
    without MKL's symbols: then torch.linalg is used)."""
    ok = a.device.type == "cpu" and a.dtype == torch.float32 and a.is_contiguous() and a.shape[0] < 1 << 31
    found = [_lapack(n) for n in names] + [_lapack("MKL_Set_Num_Threads_Local", ctypes.c_int)]
    return found if ok and all(f is not None for f in found) else None


def _at(a: torch.Tensor, i: int, j: int) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.data_ptr() + (i * a.shape[1] + j) * a.element_size())


def _int(v: int):
    return ctypes.byref(ctypes.c_int(v))


def _char(c: str):
    return ctypes.c_char_p(c.encode())


def _on_one_thread(threads_local, fn, *args) -> None:
    """fn(*args) with MKL on this thread alone: its parallel factorisations split the work by thread
    count, so their bits would depend on OMP_NUM_THREADS; on one thread they do not."""
    before = threads_local(1)
    try:
        fn(*args)
    finally:
        threads_local(before)


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
    a's lower triangle; the strict upper triangle is left undefined.

    Left-looking by blocks of BLOCK columns: each block column is updated by one gemm with the columns to
    its left, its diagonal block factorised by spotrf on one thread, and the rows below solved by strsm.
    gemm and trsm give the same bits on any number of threads where MKL's own spotrf does not, so the
    factor, and everything GPTQ computes from it, is independent of OMP_NUM_THREADS."""
    n = a.shape[0]
    found = _routines(a, "spotrf_", "strsm_")
    if found is None:
        return torch.linalg.cholesky(a, out=a)
    potrf, trsm, threads_local = found
    info, one = ctypes.c_int(0), ctypes.byref(ctypes.c_float(1.0))
    for j in range(0, n, BLOCK):
        e = min(j + BLOCK, n)
        if j:
            a[j:, j:e].addmm_(a[j:, :j], a[j:e, :j].t(), alpha=-1)
        # row-major lower is column-major upper: Fortran's "U" factor of the block (= its transpose) is L
        _on_one_thread(threads_local, potrf, _char("U"), _int(e - j), _at(a, j, j), _int(n), ctypes.byref(info))
        if info.value > 0:
            raise torch.linalg.LinAlgError(f"the leading minor of order {j + info.value} of the damped Hessian "
                                           "is not positive-definite")
        if info.value < 0:
            raise RuntimeError(f"spotrf: argument {-info.value} is invalid")
        if e < n:  # rows below: X L11ᵀ = A21, in column-major terms L11 Xᵀ = A21ᵀ
            trsm(_char("L"), _char("U"), _char("T"), _char("N"), _int(e - j), _int(n - e), one,
                 _at(a, j, j), _int(n), _at(a, e, j), _int(n))
    return a


def reversed_cholesky_(H: torch.Tensor) -> torch.Tensor:
    """R upper triangular with H = R Rᵀ, for each matrix of a stack H [B, n, n], in H's own storage (the
    strict lower triangle is left undefined)."""
    for h in H:
        reverse_(lower_cholesky_(reverse_(h)))
    return H


def upper_inverse_(r: torch.Tensor) -> torch.Tensor:
    """R⁻¹ of an upper triangular float32 matrix (its strict lower triangle undefined), over R's upper
    triangle; the strict lower triangle is zeroed.

    By blocks as LAPACK's strtri, with two gemms per block column in place of its trmm and trsm: column
    block [j, e) of R⁻¹ is −R⁻¹[:j, :j] R[:j, j:e] R⁻¹[j:e, j:e], the diagonal blocks inverted by strtri on
    one thread, so the bits do not depend on the thread count (see lower_cholesky_)."""
    n = r.shape[0]
    found = _routines(r, "strtri_")
    if found is None:
        r.copy_(torch.linalg.solve_triangular(r.triu(), torch.eye(n, device=r.device), upper=True))
        return r
    trtri, threads_local = found
    info = ctypes.c_int(0)
    r.triu_()  # the gemms read whole blocks
    for j in range(0, n, BLOCK):
        e = min(j + BLOCK, n)
        # row-major upper is column-major lower
        _on_one_thread(threads_local, trtri, _char("L"), _char("N"), _int(e - j), _at(r, j, j), _int(n),
                       ctypes.byref(info))
        if info.value:
            raise torch.linalg.LinAlgError(f"strtri: the factor is singular (info {j + info.value})")
        if j:
            r[:j, j:e] = torch.mm(torch.mm(r[:j, :j], r[:j, j:e]), r[j:e, j:e]).neg_()
    return r


def upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """U upper triangular with UᵀU = H⁻¹ for each matrix of a stack [B, n, n], in H's own storage: U = R⁻¹
    for H = R Rᵀ (2n³/3 flops, where Cholesky, inverse and Cholesky again take 4n³/3)."""
    for h in reversed_cholesky_(H):
        upper_inverse_(h)
    return H
