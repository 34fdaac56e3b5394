"""SE squeeze: the fp32 mean of an (N, C, *spatial) tensor over its spatial dims, one read of x.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

Each program sums a block of channels of one sample over a range of positions, with an fp32
accumulator tile. The kernel reads x through its own (N, C, S) strides, so NCHW and channels_last
run without a copy. When N x channel blocks are too few programs to fill the GPU (batch-1
latency), the positions are split across programs and a torch ``sum`` adds the partial results:
deterministic, unlike atomics.
"""

from typing import Optional

import torch
from torch import Tensor

from ._common import at, launch, reduction_rows, split_ids, tl, triton
from ._plan import ncs, reduction_grid

__all__ = ["squeeze", "squeeze_launch", "squeeze_mean_reference"]


@triton.jit
def _squeeze_kernel(x_ptr, out_ptr, N, C, S, CS, stride_n, stride_c, stride_s, s_per_split,
                    n_cblocks, splits, MEAN: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_C: tl.constexpr, ALIGN: tl.constexpr):
    """out[split, n, c] = sum of x[n, c, s] over split's positions, in fp32, divided by the
    integer S when MEAN; ALIGN: see reduction_rows."""
    n, split, offs_c, mask_c, s_lo, s_hi = split_ids(tl.program_id(0), n_cblocks, splits, s_per_split, C, S,
                                                     BLOCK_C)
    base = x_ptr + n.to(tl.int64) * stride_n
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for step in range(0, s_hi - s_lo + ALIGN - 1, BLOCK_S):
        rows, load, keep = reduction_rows(step, offs_c, mask_c, s_lo, s_hi, S, CS, BLOCK_S, ALIGN)
        x = tl.load(base + at(rows, offs_c, stride_s, stride_c, ALIGN > 1), mask=load, other=0.0)
        if ALIGN > 1:  # a window's edges belong to the neighbouring channels
            x = tl.where(keep, x, 0.0)
        acc += x.to(tl.float32)
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total / S
    tl.store(out_ptr + (split * N + n) * C + offs_c, total, mask=mask_c)


def squeeze_launch(x: Tensor, *, mean: bool = True, splits: Optional[int] = None) -> Tensor:
    """fp32 (N, C) means (sums if not ``mean``) of ``x`` over its spatial dims, by Triton.

    ``splits`` forces the number of programs per (n, channel block) (tests); by default
    :func:`~se_inject.fused._plan.num_splits` picks it from the device's size.
    """
    v = ncs(x)
    grid = reduction_grid(x, (v,), splits)
    partial = grid.partial(x.device)
    launch(_squeeze_kernel, grid.programs,
           (v.tensor, partial, grid.N, grid.C, grid.S, grid.C * grid.S, *v.strides, grid.s_per_split,
            grid.n_cblocks, grid.splits),
           {"MEAN": mean, "BLOCK_S": grid.tile.block_s, "BLOCK_C": grid.tile.block_c,
            "ALIGN": grid.align, "num_warps": grid.num_warps})
    return grid.total(partial)


def squeeze(x: Tensor, use_triton: bool) -> Tensor:
    """The squeeze by the Triton kernel or by :func:`squeeze_mean_reference`."""
    return squeeze_launch(x) if use_triton else squeeze_mean_reference(x)


def squeeze_mean_reference(x: Tensor) -> Tensor:
    """``x.mean`` over the spatial dims, accumulated and returned in fp32 (float64 stays)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return x.mean(dim=tuple(range(2, x.dim())), dtype=acc)
