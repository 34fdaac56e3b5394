"""SE excitation applied, fused with the residual add and the activation after it, in one pass.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

``out = out_act(x * g[n, c] + shortcut)``: one read of x (and of the shortcut), one write of out.
The arithmetic is fp32 and rounds once, at the store, to the output dtype
``torch.promote_types(x.dtype, shortcut.dtype)`` (x's dtype without a shortcut, or when the add
was written in place, ``x += shortcut``). x, shortcut and out each have their own (N, C, S)
strides, so mixed layouts need no copy; when all three are contiguous NCHW the kernel walks each
sample's flat C * S axis instead, so its loads are vectorised whatever S is.
"""

from typing import Optional

import torch
from torch import Tensor

from ..layers import OUT_ACTS
from ._common import at, check_out_act, launch, per_channel, pointwise_ids, tl, triton
from ._plan import as_fp32, empty_ncs, ncs, pointwise_plan

__all__ = ["scale", "scale_launch", "scale_residual_act_reference", "out_dtype"]


@triton.jit
def _scale_kernel(x_ptr, g_ptr, sc_ptr, out_ptr, C, S, n_cblocks, n_sblocks,
                  sxn, sxc, sxs, srn, src, srs, son, soc, sos,
                  HAS_SC: tl.constexpr, OUT_ACT: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_C: tl.constexpr, C_FAST: tl.constexpr, FLAT: tl.constexpr):
    """out = act(x * g + shortcut) on one tile (see pointwise_ids); OUT_ACT 0 none, 1 relu,
    2 silu."""
    n, rows, chans, mask, cmask = pointwise_ids(tl.program_id(0), C, S, n_cblocks, n_sblocks,
                                                BLOCK_S, BLOCK_C, C_FAST, FLAT)
    n64 = n.to(tl.int64)
    gate = per_channel(tl.load(g_ptr + n * C + chans, mask=cmask, other=0.0), FLAT)
    x = tl.load(x_ptr + n64 * sxn + at(rows, chans, sxs, sxc, FLAT), mask=mask)
    z = x.to(tl.float32) * gate
    if HAS_SC:
        sc = tl.load(sc_ptr + n64 * srn + at(rows, chans, srs, src, FLAT), mask=mask)
        z += sc.to(tl.float32)
    if OUT_ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)  # keeps NaN, as torch.relu does
    elif OUT_ACT == 2:
        z = z * tl.sigmoid(z)
    out_ptrs = out_ptr + n64 * son + at(rows, chans, sos, soc, FLAT)
    tl.store(out_ptrs, z.to(out_ptr.dtype.element_ty), mask=mask)


def out_dtype(x: Tensor, shortcut: Optional[Tensor], in_place: bool = False) -> torch.dtype:
    """The op's output dtype: x's, promoted with the shortcut's when there is one, unless the
    add was written in place (``x += shortcut`` keeps x's dtype)."""
    if shortcut is None or in_place:
        return x.dtype
    return torch.promote_types(x.dtype, shortcut.dtype)


def scale_launch(x: Tensor, g: Tensor, shortcut: Optional[Tensor], out_act: str,
                 in_place: bool = False) -> Tensor:
    """``out_act(x * g[:, :, None...] + shortcut)`` by Triton, stored once in
    :func:`out_dtype`; out is laid out like x."""
    code = check_out_act(out_act)
    out = empty_ncs(x, out_dtype(x, shortcut, in_place))
    vx, vo = ncs(x), ncs(out)
    vs = ncs(shortcut) if shortcut is not None else vx
    plan = pointwise_plan(tuple(x.shape), (vx.strides, vs.strides, vo.strides), x.device)
    launch(_scale_kernel, plan.programs, (vx.tensor, as_fp32(g), vs.tensor, out, *plan.args),
           {"HAS_SC": shortcut is not None, "OUT_ACT": code, **plan.meta})
    return out


def scale(x: Tensor, g: Tensor, shortcut: Optional[Tensor], out_act: str, use_triton: bool,
          in_place: bool = False) -> Tensor:
    """The fused scale by the Triton kernel or by :func:`scale_residual_act_reference`."""
    if use_triton:
        return scale_launch(x, g, shortcut, out_act, in_place)
    return scale_residual_act_reference(x, g, shortcut, out_act, in_place)


def scale_residual_act_reference(x: Tensor, g: Tensor, shortcut: Optional[Tensor],
                                 out_act: str, in_place: bool = False) -> Tensor:
    """The same maths in torch ops: fp32 (float64 stays) arithmetic, one rounding at the end, to
    :func:`out_dtype`."""
    check_out_act(out_act)
    dtype = out_dtype(x, shortcut, in_place)
    acc = torch.promote_types(out_dtype(x, shortcut), torch.float32)
    z = x.to(acc) * g.to(acc).reshape(g.shape + (1,) * (x.dim() - 2))
    if shortcut is not None:
        z = z + shortcut.to(acc)
    return OUT_ACTS[out_act].function(z).to(dtype)
