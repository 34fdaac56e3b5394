"""SE excitation applied, fused with the residual add and the activation after it, in one pass.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

``out = out_act(x * g[n, c] + shortcut)``: one read of x (and of the shortcut), one write of out.
The arithmetic is fp32 and rounds once, at the store, to the output dtype
``torch.promote_types(x.dtype, shortcut.dtype)`` (x's dtype without a shortcut). x, shortcut and
out each have their own (N, C, S) strides, so mixed layouts need no copy.
"""

import math
from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton

from ._common import (
    INTERPRETED, POINTWISE_ELEMS, cdiv, check_out_act, empty_ncs, ncs, pick_tile, register_op,
    tensors_supported, tile_ids, tl, triton,
)
from .backward import gate_grad, input_grad

__all__ = ["scale", "scale_launch", "scale_residual_act", "scale_residual_act_reference",
           "out_dtype"]


@triton.jit
def _scale_kernel(x_ptr, g_ptr, sc_ptr, out_ptr, C, S, n_cblocks, n_sblocks,
                  sxn, sxc, sxs, srn, src, srs, son, soc, sos,
                  HAS_SC: tl.constexpr, OUT_ACT: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_C: tl.constexpr, C_FAST: tl.constexpr):
    """out = act(x * g + shortcut) on a (BLOCK_S, BLOCK_C) tile; OUT_ACT 0 none, 1 relu, 2 silu."""
    n, cb, sb = tile_ids(tl.program_id(0), n_cblocks, n_sblocks, C_FAST)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_c = offs_c < C
    mask = (offs_s < S)[:, None] & mask_c[None, :]
    n64 = n.to(tl.int64)
    gate = tl.load(g_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    x = tl.load(x_ptr + n64 * sxn + offs_s[:, None] * sxs + offs_c[None, :] * sxc, mask=mask)
    z = x.to(tl.float32) * gate[None, :]
    if HAS_SC:
        sc = tl.load(sc_ptr + n64 * srn + offs_s[:, None] * srs + offs_c[None, :] * src, mask=mask)
        z += sc.to(tl.float32)
    if OUT_ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)  # keeps NaN, as torch.relu does
    elif OUT_ACT == 2:
        z = z * tl.sigmoid(z)
    out_ptrs = out_ptr + n64 * son + offs_s[:, None] * sos + offs_c[None, :] * soc
    tl.store(out_ptrs, z.to(out_ptr.dtype.element_ty), mask=mask)


def out_dtype(x: Tensor, shortcut: Optional[Tensor]) -> torch.dtype:
    """The op's output dtype: x's, promoted with the shortcut's when there is one."""
    return x.dtype if shortcut is None else torch.promote_types(x.dtype, shortcut.dtype)


def scale_launch(x: Tensor, g: Tensor, shortcut: Optional[Tensor], out_act: str) -> Tensor:
    """``out_act(x * g[:, :, None...] + shortcut)`` by Triton; out is laid out like x."""
    code = check_out_act(out_act)
    out = empty_ncs(x, out_dtype(x, shortcut))
    vx, vo = ncs(x), ncs(out)
    vs = ncs(shortcut) if shortcut is not None else vx
    N, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    tile = pick_tile(C, S, vx.stride_c, vx.stride_s, POINTWISE_ELEMS)
    n_cblocks, n_sblocks = cdiv(C, tile.block_c), cdiv(S, tile.block_s)
    g = g.to(torch.float32).contiguous()
    kernel = _scale_kernel if INTERPRETED else wrap_triton(_scale_kernel)
    kernel[(N * n_cblocks * n_sblocks,)](
        vx.tensor, g, vs.tensor, out, C, S, n_cblocks, n_sblocks,
        vx.stride_n, vx.stride_c, vx.stride_s, vs.stride_n, vs.stride_c, vs.stride_s,
        vo.stride_n, vo.stride_c, vo.stride_s,
        HAS_SC=shortcut is not None, OUT_ACT=code, BLOCK_S=tile.block_s, BLOCK_C=tile.block_c,
        C_FAST=tile.c_fast,
    )
    return out


def scale(x: Tensor, g: Tensor, shortcut: Optional[Tensor], out_act: str,
          use_triton: bool) -> Tensor:
    """The fused scale by the Triton kernel or by :func:`scale_residual_act_reference`."""
    if use_triton:
        return scale_launch(x, g, shortcut, out_act)
    return scale_residual_act_reference(x, g, shortcut, out_act)


@register_op("se_inject::scale_residual_act")
def scale_residual_act(x: Tensor, g: Tensor, shortcut: Optional[Tensor], out_act: str) -> Tensor:
    """``out_act(x * g[:, :, None...] + shortcut)`` for a gate ``g`` of shape (N, C): Triton on
    CUDA, :func:`scale_residual_act_reference` elsewhere."""
    return scale(x, g, shortcut, out_act, tensors_supported(x, shortcut))


def _scale_setup(ctx, inputs: tuple, output: Tensor) -> None:
    x, g, shortcut, out_act = inputs
    ctx.out_act, ctx.g_dtype = out_act, g.dtype
    ctx.sc_dtype = shortcut.dtype if shortcut is not None else None
    ctx.save_for_backward(x, g, shortcut if out_act == "silu" else None,
                          output if out_act == "relu" else None)


def _scale_backward(ctx, grad: Tensor) -> tuple:
    x, g, shortcut, out = ctx.saved_tensors
    dg, dz = gate_grad(grad, x, shortcut, out, g, ctx.out_act)
    dz = grad if ctx.out_act == "none" else dz
    dx = input_grad(dz, x, g, None) if ctx.needs_input_grad[0] else None
    dsc = dz.to(ctx.sc_dtype) if ctx.needs_input_grad[2] else None
    return dx, dg.to(ctx.g_dtype), dsc, None


scale_residual_act.register_autograd(_scale_backward, setup_context=_scale_setup)


def scale_residual_act_reference(x: Tensor, g: Tensor, shortcut: Optional[Tensor],
                                 out_act: str) -> Tensor:
    """The same maths in torch ops: fp32 (float64 stays) arithmetic, one rounding at the end."""
    check_out_act(out_act)
    dtype = out_dtype(x, shortcut)
    acc = torch.promote_types(dtype, torch.float32)
    z = x.to(acc) * g.to(acc).reshape(g.shape + (1,) * (x.dim() - 2))
    if shortcut is not None:
        z = z + shortcut.to(acc)
    if out_act == "relu":
        z = torch.relu(z)
    elif out_act == "silu":
        z = torch.nn.functional.silu(z)
    return z.to(dtype)
