"""Backward of the fused SE scale: two passes over the big tensors, as few as the maths allows.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

With ``z = x * g[n, c] + shortcut`` and ``out = out_act(z)``, and ``dz = dout * out_act'(z)``:

* K1, a reduction: ``dg[n, c] = sum_s dz * x`` in fp32. For ``relu`` the mask comes from the
  saved ``out`` (``out > 0``, as aten's ``threshold_backward``); for ``silu`` z is recomputed from
  x, g and the shortcut (saving z would cost a full write in the forward). When ``out_act`` is
  not ``"none"``, K1 also stores dz (in the output's dtype, x's layout): it is the shortcut's
  gradient, and K2 then reads one tensor instead of recomputing dz from two or three. For
  ``"none"``, dz is ``dout`` itself and nothing is stored.
* K2, elementwise: ``dx = dz * g[n, c] + ds[n, c] / S``, where ``ds`` is the gradient of the
  squeeze means (from the MLP backward, in torch); without ``ds`` it is the plain ``dz * g``.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from ._common import (
    at, check_out_act, launch, per_channel, pointwise_ids, reduction_rows, split_ids, tensors_supported, tl,
    triton,
)
from ._plan import as_fp32, empty_ncs, ncs, pointwise_plan, reduction_grid

__all__ = ["compute_gate_grad", "gate_grad_launch", "gate_grad_reference", "compute_input_grad",
           "input_grad_launch", "input_grad_reference"]


@triton.jit
def _gate_grad_kernel(dout_ptr, x_ptr, sc_ptr, out_ptr, g_ptr, dz_ptr, dg_ptr,
                      N, C, S, CS, s_per_split, n_cblocks, splits,
                      sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs, son, soc, sos, szn, szc, szs,
                      HAS_SC: tl.constexpr, OUT_ACT: tl.constexpr, STORE_DZ: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr):
    """K1: dg[split, n, c] = sum of dz * x over split's positions; optionally stores dz.

    ALIGN > 1 (see reduction_rows): the loads are whole aligned windows, and dz is stored for
    every element loaded, a window's edges too: those belong to the neighbouring channel, whose
    row (or program) stores the same value there, computed from the same inputs.
    """
    n, split, offs_c, mask_c, s_lo, s_hi = split_ids(tl.program_id(0), n_cblocks, splits, s_per_split, C, S,
                                                     BLOCK_C)
    n64 = n.to(tl.int64)
    gate = tl.load(g_ptr + n * C + offs_c, mask=mask_c, other=0.0)[None, :]  # per channel (strided)
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for step in range(0, s_hi - s_lo + ALIGN - 1, BLOCK_S):
        rows, load, keep = reduction_rows(step, offs_c, mask_c, s_lo, s_hi, S, CS, BLOCK_S, ALIGN)
        dz = tl.load(dout_ptr + n64 * sdn + at(rows, offs_c, sds, sdc, ALIGN > 1), mask=load, other=0.0)
        dz = dz.to(tl.float32)
        x = tl.load(x_ptr + n64 * sxn + at(rows, offs_c, sxs, sxc, ALIGN > 1), mask=load, other=0.0)
        x = x.to(tl.float32)
        if OUT_ACT == 1:
            out = tl.load(out_ptr + n64 * son + at(rows, offs_c, sos, soc, ALIGN > 1), mask=load, other=0.0)
            dz = tl.where(out.to(tl.float32) > 0.0, dz, 0.0)
        elif OUT_ACT == 2:
            if ALIGN > 1:  # each element's own channel, the window's edges included
                z = x * tl.load(g_ptr + n * C + rows // S, mask=load, other=0.0)
            else:
                z = x * gate
            if HAS_SC:
                sc = tl.load(sc_ptr + n64 * srn + at(rows, offs_c, srs, src, ALIGN > 1), mask=load, other=0.0)
                z += sc.to(tl.float32)
            sig = tl.sigmoid(z)
            dz = dz * sig * (1.0 + z * (1.0 - sig))
        if STORE_DZ:
            dz_ptrs = dz_ptr + n64 * szn + at(rows, offs_c, szs, szc, ALIGN > 1)
            tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=load)
        if ALIGN > 1:  # a window's edges belong to the neighbouring channels
            dz = tl.where(keep, dz, 0.0)
        acc += dz * x
    tl.store(dg_ptr + (split * N + n) * C + offs_c, tl.sum(acc, axis=0), mask=mask_c)


@triton.jit
def _input_grad_kernel(dz_ptr, g_ptr, ds_ptr, dx_ptr, C, S, n_cblocks, n_sblocks,
                       sxn, sxc, sxs, szn, szc, szs, HAS_DS: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, C_FAST: tl.constexpr,
                       FLAT: tl.constexpr):
    """K2: dx = dz * g[n, c] + ds[n, c] / S on one tile (see pointwise_ids); S is an integer."""
    n, rows, chans, mask, cmask = pointwise_ids(tl.program_id(0), C, S, n_cblocks, n_sblocks,
                                                BLOCK_S, BLOCK_C, C_FAST, FLAT)
    n64 = n.to(tl.int64)
    gate = tl.load(g_ptr + n * C + chans, mask=cmask, other=0.0)
    if HAS_DS:  # dx = dz * g + ds / S, the per-channel parts combined before the broadcast
        shift = per_channel(tl.load(ds_ptr + n * C + chans, mask=cmask, other=0.0) * (1.0 / S), FLAT)
    dz = tl.load(dz_ptr + n64 * szn + at(rows, chans, szs, szc, FLAT), mask=mask)
    dx = dz.to(tl.float32) * per_channel(gate, FLAT)
    if HAS_DS:
        dx += shift
    dx_ptrs = dx_ptr + n64 * sxn + at(rows, chans, sxs, sxc, FLAT)
    tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def gate_grad_launch(grad_out: Tensor, x: Tensor, shortcut: Optional[Tensor], out: Optional[Tensor],
                     g: Tensor, out_act: str, *, splits: Optional[int] = None
                     ) -> tuple[Tensor, Tensor]:
    """K1 by Triton: ``(dg, dz)``; dz is an empty tensor when ``out_act`` is ``"none"``."""
    code = check_out_act(out_act)
    if code == 1 and out is None:
        raise ValueError("out is required when out_act='relu'")
    store_dz = code != 0
    dz = empty_ncs(x, grad_out.dtype) if store_dz else grad_out.new_empty((0,))
    vd, vx = ncs(grad_out), ncs(x)
    vr = ncs(shortcut) if shortcut is not None and code == 2 else vx
    vo = ncs(out) if code == 1 else vx
    vz = ncs(dz) if store_dz else vx
    grid = reduction_grid(x, (vx, vd, vr, vo, vz), splits)
    dg = grid.partial(x.device)
    launch(_gate_grad_kernel, grid.programs,
           (vd.tensor, vx.tensor, vr.tensor, vo.tensor, as_fp32(g), vz.tensor if store_dz else vx.tensor,
            dg, grid.N, grid.C, grid.S, grid.C * grid.S, grid.s_per_split, grid.n_cblocks, grid.splits,
            *vd.strides, *vx.strides, *vr.strides, *vo.strides, *vz.strides),
           {"HAS_SC": shortcut is not None, "OUT_ACT": code, "STORE_DZ": store_dz,
            "BLOCK_S": grid.tile.block_s, "BLOCK_C": grid.tile.block_c, "ALIGN": grid.align,
            "num_warps": grid.num_warps})
    return grid.total(dg), dz


def input_grad_launch(dz: Tensor, x: Tensor, g: Tensor, ds: Optional[Tensor]) -> Tensor:
    """K2 by Triton: ``dz * g[n, c] (+ ds[n, c] / S)`` in x's dtype and layout."""
    dx = empty_ncs(x, x.dtype)
    vz, vx = ncs(dz), ncs(dx)
    plan = pointwise_plan(tuple(x.shape), (vx.strides, vz.strides), x.device)
    g = as_fp32(g)
    launch(_input_grad_kernel, plan.programs,
           (vz.tensor, g, as_fp32(ds) if ds is not None else g, dx, *plan.args),
           {"HAS_DS": ds is not None, **plan.meta})
    return dx


def compute_gate_grad(grad_out: Tensor, x: Tensor, shortcut: Optional[Tensor], out: Optional[Tensor],
                      g: Tensor, out_act: str) -> tuple[Tensor, Tensor]:
    """K1: ``(dg, dz)`` with dg = sum over positions of dz * x, fp32 (N, C); dz = dL/dz, like
    x in grad_out's dtype, or empty when ``out_act`` is ``"none"`` (dz is then grad_out).
    ``out`` is needed for relu, ``shortcut`` (if any) for silu. Triton where the tensors allow,
    :func:`gate_grad_reference` elsewhere; the fused op's backward calls it (under tracing its
    kernels are recorded all the same)."""
    if tensors_supported(x, shortcut) and tensors_supported(grad_out, out):
        return gate_grad_launch(grad_out, x, shortcut, out, g, out_act)
    return gate_grad_reference(grad_out, x, shortcut, out, g, out_act)


def compute_input_grad(dz: Tensor, x: Tensor, g: Tensor, ds: Optional[Tensor]) -> Tensor:
    """K2: ``dx = dz * g[n, c] + ds[n, c] / S`` in x's dtype and layout (x's values are not
    read)."""
    if tensors_supported(x, dz):
        return input_grad_launch(dz, x, g, ds)
    return input_grad_reference(dz, x, g, ds)



def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(v.shape + (1,) * (like.dim() - 2))


def gate_grad_reference(grad_out: Tensor, x: Tensor, shortcut: Optional[Tensor],
                        out: Optional[Tensor], g: Tensor, out_act: str) -> tuple[Tensor, Tensor]:
    """K1 in torch ops, in fp32 (float64 stays)."""
    code = check_out_act(out_act)
    acc = torch.promote_types(grad_out.dtype, torch.float32)
    dz = grad_out.to(acc)
    if code == 1:
        if out is None:
            raise ValueError("out is required when out_act='relu'")
        dz = torch.ops.aten.threshold_backward.default(dz, out.to(acc), 0)
    elif code == 2:
        z = x.to(acc) * _per_channel(g.to(acc), x)
        z = z + shortcut.to(acc) if shortcut is not None else z
        dz = torch.ops.aten.silu_backward.default(dz, z)
    dg = (dz * x.to(acc)).sum(dim=tuple(range(2, x.dim())))
    if code == 0:
        return dg, grad_out.new_empty((0,))
    return dg, dz.to(grad_out.dtype)


def input_grad_reference(dz: Tensor, x: Tensor, g: Tensor, ds: Optional[Tensor]) -> Tensor:
    """K2 in torch ops, in fp32 (float64 stays)."""
    acc = torch.promote_types(dz.dtype, torch.float32)
    dx = dz.to(acc) * _per_channel(g.to(acc), x)
    if ds is not None:
        dx = dx + _per_channel(ds.to(acc) / math.prod(x.shape[2:]), x)
    return dx.to(x.dtype)
