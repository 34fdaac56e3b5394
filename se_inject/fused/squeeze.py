"""SE squeeze: the fp32 mean of an (N, C, *spatial) tensor over its spatial dims, one read of x.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

Each program sums a block of channels of one sample over a range of positions, with an fp32
accumulator tile. The kernel reads x through its own (N, C, S) strides, so NCHW and channels_last
run without a copy. When N x channel blocks are too few programs to fill the GPU (batch-1
latency), the positions are split across programs and a torch ``sum`` adds the partial results:
deterministic, unlike atomics.
"""

import math
from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton

from ._common import INTERPRETED, ncs, reduction_grid, register_op, split_ids, tensors_supported, tl, triton

__all__ = ["squeeze", "squeeze_launch", "squeeze_mean", "squeeze_mean_reference"]


@triton.jit
def _squeeze_kernel(x_ptr, out_ptr, N, C, S, stride_n, stride_c, stride_s, s_per_split, scale,
                    n_cblocks, splits, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[split, n, c] = scale * sum of x[n, c, s] over split's positions, in fp32."""
    n, split, offs_c, mask_c, s_lo, s_hi = split_ids(tl.program_id(0), n_cblocks, splits, s_per_split, C, S,
                                                     BLOCK_C)
    base = x_ptr + n.to(tl.int64) * stride_n
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_s < s_hi)[:, None] & mask_c[None, :]
        ptrs = base + offs_s[:, None] * stride_s + offs_c[None, :] * stride_c
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0) * scale
    tl.store(out_ptr + (split * N + n) * C + offs_c, total, mask=mask_c)


def squeeze_launch(x: Tensor, *, mean: bool = True, splits: Optional[int] = None) -> Tensor:
    """fp32 (N, C) means (sums if not ``mean``) of ``x`` over its spatial dims, by Triton.

    ``splits`` forces the number of programs per (n, channel block) (tests); by default
    :func:`~se_inject.fused._common.num_splits` picks it from the device's size.
    """
    v = ncs(x)
    grid = reduction_grid(x, v, splits)
    partial = grid.partial(x.device)
    kernel = _squeeze_kernel if INTERPRETED else wrap_triton(_squeeze_kernel)
    kernel[(grid.programs,)](
        v.tensor, partial, grid.N, grid.C, grid.S, v.stride_n, v.stride_c, v.stride_s,
        grid.s_per_split, 1.0 / grid.S if mean else 1.0, grid.n_cblocks, grid.splits,
        BLOCK_S=grid.tile.block_s, BLOCK_C=grid.tile.block_c,
    )
    return partial if grid.splits == 1 else partial.sum(0)


def squeeze(x: Tensor, use_triton: bool) -> Tensor:
    """The squeeze by the Triton kernel or by :func:`squeeze_mean_reference`."""
    return squeeze_launch(x) if use_triton else squeeze_mean_reference(x)


@register_op("se_inject::squeeze_mean")
def squeeze_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` (N, C, *spatial) over the spatial dims, as an fp32 (float64 for float64
    input) (N, C) tensor: Triton on CUDA, :func:`squeeze_mean_reference` elsewhere."""
    return squeeze(x, tensors_supported(x, None))


def _squeeze_setup(ctx, inputs: tuple, output: Tensor) -> None:
    (x,) = inputs
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype


def _squeeze_backward(ctx, grad: Tensor) -> Tensor:
    spatial = ctx.x_shape[2:]
    dx = (grad / math.prod(spatial)).to(ctx.x_dtype)
    return dx.view(dx.shape + (1,) * len(spatial)).expand(ctx.x_shape)


squeeze_mean.register_autograd(_squeeze_backward, setup_context=_squeeze_setup)


def squeeze_mean_reference(x: Tensor) -> Tensor:
    """``x.mean`` over the spatial dims, accumulated and returned in fp32 (float64 stays)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return x.mean(dim=tuple(range(2, x.dim())), dtype=acc)
