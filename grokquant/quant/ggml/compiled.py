"""Compiled scalar kernels (numba) for the quantizers whose searches are branchy, per-block loops.

ggml's 1-3 bit i-quant searches try trial scales per block, round groups onto a lattice and look up
neighbours with early exits; in torch every branch becomes masked work over all blocks. numba compiles the
same loops in C's order to machine code (LLVM, no fast-math: IEEE float32, no fused multiply-add, `sqrt`
correctly rounded), so the bytes equal ggml's and the speed is a C compiler's. It ships wheels on PyPI for
every platform torch does, so installing needs nothing beyond the package registries. Kernels release the
GIL (`nogil`) and run on base.quantize_chunks' worker threads; their machine code is cached on disk
(`cache`), so only the first run on a machine compiles.
"""

from __future__ import annotations

import numba
import numpy as np

kernel = numba.njit(nogil=True, cache=True, error_model="numpy")

F32 = np.float32


@kernel
def nearest_int(fval: np.float32) -> int:
    """ggml's nearest_int: round half to even (|fval| < 2^22), as adding 1.5 * 2^23 in float32 does."""
    return int(np.rint(fval))
