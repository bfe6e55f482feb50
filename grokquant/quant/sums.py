"""Sums whose bits do not depend on the number of threads.

torch reduces a tensor into a single output (for example a stack of one matrix summed to [1]) by
splitting the input into one chunk per thread and adding the chunks' partial sums
(TensorIterator's two-pass reduction, aten/src/ATen/TensorIteratorReduce.cpp), so the result changes
with OMP_NUM_THREADS. A reduction into several outputs gives each output to one thread and sums it in a
fixed order. `stack_sum` only ever asks torch for the second kind.
"""

from __future__ import annotations

import torch

WIDTH = 1024  # elements per partial sum: a reduction of up to this many into one output runs serially


def stack_sum(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Σ over everything but the first dimension, [B, ...] -> [B], in an order fixed by x's shape."""
    y = x.reshape(x.shape[0], -1)
    while y.shape[1] > WIDTH:
        pad = -y.shape[1] % WIDTH
        if pad:  # zeros: the sum is unchanged and the chunks stay whole
            y = torch.nn.functional.pad(y, (0, pad))
        y = y.view(y.shape[0], -1, WIDTH).sum(-1, dtype=dtype)  # [B, n / WIDTH]: several outputs
    return y.sum(-1, dtype=dtype)  # at most WIDTH values into each output: below torch's grain, serial


def stack_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of each x[b] in x's own dtype, as stack_sum."""
    return (stack_sum(x, torch.float64) / x[0].numel()).to(x.dtype)
