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

import math

import llvmlite.ir
import numba
import numba.extending
import numpy as np

kernel = numba.njit(nogil=True, cache=True, error_model="numpy")
# small helpers of a kernel, compiled into it (no call overhead in the innermost loops)
inline = numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")

F32 = np.float32


@kernel
def nearest_int(fval: np.float32) -> int:
    """ggml's nearest_int: round half to even (|fval| < 2^22), as adding 1.5 * 2^23 in float32 does."""
    return int(np.rint(fval))


@numba.extending.intrinsic
def bits(typingctx, v):
    """float32 -> its bits as int32, and int32 -> the float32 of those bits (C's memcpy between them)."""
    if v == numba.types.float32:
        return numba.types.int32(v), lambda ctx, b, sig, args: b.bitcast(args[0], llvmlite.ir.IntType(32))
    if v == numba.types.int32:
        return numba.types.float32(v), lambda ctx, b, sig, args: b.bitcast(args[0], llvmlite.ir.FloatType())
    return None


@numba.extending.intrinsic
def borrowed(typingctx, arr):
    """The same array without its reference count (a null meminfo): every use numba reference-counts, such as
    passing it to an inlined helper (two atomic operations a call, which can cost more than the helper's
    work), then does nothing. Only for arrays something else keeps alive while it is used: a kernel's
    arguments, which its caller holds."""
    if not isinstance(arr, numba.types.Array):
        return None

    def codegen(context, builder, sig, args):
        src = context.make_array(arr)(context, builder, value=args[0])
        dst = context.make_array(arr)(context, builder)
        for field in ("data", "shape", "strides", "itemsize", "nitems"):
            setattr(dst, field, getattr(src, field))
        dst.meminfo = llvmlite.ir.Constant(dst.meminfo.type, None)
        dst.parent = llvmlite.ir.Constant(dst.parent.type, None)
        return dst._getvalue()

    return arr(arr), codegen


IMAX = np.int32(0x7FFFFFFF)
INF_BITS = np.int32(0x7F800000)


@inline
def fp16_bits(f):
    """GGML_FP32_TO_FP16 as x86's vcvtps2ph computes it (round to nearest even, NaN quieted keeping its top
    payload bits), as int32 bits; integer ops only (the scales of memory-bound quantizers go through it)."""
    u = bits(f)
    a = u & IMAX
    if a > INF_BITS:
        h = np.int32(0x7E00 | ((a >> 13) & 0x3FF))
    elif a >= np.int32(0x477FF000):  # rounds to 65536 or more: inf
        h = np.int32(0x7C00)
    elif a >= np.int32(0x38800000):  # normal: rebias the exponent, round the 13 dropped bits to even
        h = np.int32((a - np.int32(0x38000000) + np.int32(0xFFF) + ((a >> 13) & 1)) >> 13)
    else:  # subnormal or zero: adding 0.5 rounds |f| to a multiple of 2^-24 in the FPU
        h = np.int32(bits(abs(f) + F32(0.5)) - np.int32(0x3F000000))
    return np.int32(h | ((u >> 16) & np.int32(0x8000)))


@inline
def fp16_value(h):
    """IEEE half bits -> float32 (exact). A normal half is its float32 bits rebuilt, not math.ldexp: that is a
    libm call the compiler cannot drop when the value goes unused, and it cost Q4_1 40% of its time."""
    e = (h >> 10) & 31
    m = h & 1023
    if 0 < e < 31:
        return bits(np.int32(((h & 0x8000) << 16) | ((e + 112) << 23) | (m << 13)))
    if e == 31:
        v = math.inf if m == 0 else math.nan
    else:
        v = float(m) * 2.0 ** -24  # exact
    return F32(-v if h & 0x8000 else v)


@inline
def put_fp16(out, b, o, v):
    """GGML_FP32_TO_FP16 of v into out[b, o:o+2] (little endian) -> the value read back (GGML_FP16_TO_FP32)."""
    h = fp16_bits(v)
    out[b, o] = np.uint8(h & 255)
    out[b, o + 1] = np.uint8((h >> 8) & 255)
    return fp16_value(h)


@kernel
def nearest_int_bits(fval: np.float32) -> int:
    """ggml's nearest_int exactly as C computes it, for every input: add 1.5 * 2^23 and read the low 23 bits.
    Equals `nearest_int` for |fval| < 2^22; beyond that (huge, inf, NaN) it gives C's garbage, which a clamp
    after it turns into a level, so searches that may meet such values use this one."""
    return (bits(fval + F32(12582912.0)) & 0x7FFFFF) - 0x400000


@inline
def octet_signs(x, xo, weight, xval, vo, even):
    """The sign bits of x[xo:xo+8], their magnitudes into xval[vo:vo+8]. With `even` (IQ2_XXS, IQ2_XS and
    IQ3_XXS store 7 sign bits, the 8th makes the count even) an odd count leaves the least important element
    (least weight * x^2, the first of equals) its sign: its magnitude goes negative instead (ggml's order)."""
    s = 0
    nflip = 0
    for i in range(8):
        xi = x[xo + i]
        if xi >= F32(0.0):
            xval[vo + i] = xi
        else:
            xval[vo + i] = -xi
            nflip += 1
            s |= 1 << i
    if even and nflip % 2 == 1:
        imin = 0
        xi = x[xo]
        least = weight[vo] * xi * xi
        for i in range(1, 8):
            xi = x[xo + i]
            ax = weight[vo + i] * xi * xi
            if ax < least:
                least = ax
                imin = i
        xval[vo + imin] = -xval[vo + imin]
        s ^= 1 << imin
    return s


@kernel
def make_qp_quants(n, nmax, x, L, w):
    """ggml's make_qp_quants(n, nmax, x, L, w) (codes 0..nmax for x >= 0) -> the scale; L (uint8) gets the
    codes. C's float order: products left to right, sums from 0 element by element; C stores the codes as
    uint8, so a negative x (nearest_int < 0) is kept modulo 256 and read back that way."""
    mx = F32(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]  # MAX(max, x[i])
    if mx < F32(1e-15):  # GROUP_MAX_EPS
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    fmax = F32(nmax)
    iscale = fmax / mx
    for i in range(n):
        L[i] = nearest_int_bits(iscale * x[i]) & 255
    scale = F32(1.0) / iscale
    best = F32(0.0)
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        best += w[i] * diff * diff
    for k in range(-4, 5):
        if k == 0:
            continue
        its = (F32(0.1) * F32(k) + fmax) / mx
        s = F32(1.0) / its
        mse = F32(0.0)
        for i in range(n):
            diff = x[i] - s * F32(min(nmax, nearest_int_bits(its * x[i])))
            mse += w[i] * diff * diff
        if mse < best:
            best = mse
            iscale = its
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        li = min(nmax, nearest_int_bits(iscale * x[i]))
        L[i] = li & 255
        fl = F32(li)  # the sums see the int code, L its uint8 copy
        sumlx += w[i] * x[i] * fl
        suml2 += w[i] * fl * fl
    for _ in range(5):  # coordinate descent: move one code at a time while slx^2/sl2 grows
        changed = False
        for i in range(n):
            li = F32(L[i])
            slx = sumlx - w[i] * x[i] * li
            sl2 = suml2 - w[i] * li * li
            if slx > F32(0.0) and sl2 > F32(0.0):
                new = min(nmax, nearest_int_bits(x[i] * sl2 / slx))
                if new != L[i]:
                    fn = F32(new)
                    slx += w[i] * x[i] * fn
                    sl2 += w[i] * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new & 255
                        sumlx = slx
                        suml2 = sl2
                        changed = True
        if not changed:
            break
    return sumlx / suml2 if suml2 > F32(0.0) else F32(0.0)
