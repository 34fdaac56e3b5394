"""Launch planning for the fused SE kernels: the (N, C, S) view of a tensor, tiles, ``num_warps``
and grids, from shapes, strides, dtypes and the device alone, cached per distinct key.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

Every kernel walks an (N, C, *spatial) tensor as an (N, C, S) array with its own three strides
(:func:`ncs`). The tiles follow the contiguous axis: channels for channels_last, positions for
NCHW, whose rows of S positions are not 16-byte aligned at S = 196 or 49 (ResNet's stages 3 and
4): there the elementwise kernels walk the flat C * S axis (:func:`flat_ok`) and the reductions
read aligned windows (:func:`align_for`). The rules are written out (:func:`pointwise_warps`,
:func:`flat_block`, :func:`reduction_tile`), as Liger-Kernel's ``calculate_settings``, not
autotuned: one plan per key, the same under the interpreter, torch.compile and torch.export.
Under symbolic shapes (tracing with dynamic shapes) the tiles are chosen from the example sizes
without guards, and the integers passed to the kernels stay symbolic.
"""

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch

__all__ = [
    "NCS", "Tile", "PointwisePlan", "ReductionGrid", "cdiv", "cached_plan", "ncs", "collapsible",
    "empty_ncs", "as_fp32", "flat_ok", "align_for", "pick_tile", "reduction_tile",
    "pointwise_warps", "flat_block", "num_splits", "target_programs", "pointwise_plan",
    "reduction_grid",
]

#: Elements per program: reductions keep a 2-D fp32 accumulator, elementwise kernels do not.
REDUCE_ELEMS = 2048
POINTWISE_ELEMS = 4096
#: Elementwise tiles shrink (down to this) until the grid has :func:`target_programs` programs.
MIN_POINTWISE_ELEMS = 256


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _hint(v: Any, default: int = 1024) -> int:
    """``v`` as an int, for choosing tiles: a symbolic size (tracing with dynamic shapes) gives
    its example value without adding a guard, so the tiles never specialise the graph."""
    if isinstance(v, torch.SymInt):
        node = v.node
        return int(node.hint) if node.has_hint() else default
    return int(v)


def _known(cond: Any) -> bool:
    """True only if ``cond`` holds for every size the trace stands for (no guard added)."""
    if isinstance(cond, torch.SymBool):
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return statically_known_true(cond)
    return bool(cond)


def cached_plan(fn: Callable) -> Callable:
    """Memoise a planning function of hashable keys (shapes, strides, dtypes, devices).

    Symbolic sizes (tracing with dynamic shapes) are not hashable: those calls plan afresh, and
    only once per trace anyway.
    """
    cached = functools.lru_cache(maxsize=4096)(fn)

    @functools.wraps(fn)
    def plan(*key: Any) -> Any:
        try:
            return cached(*key)
        except TypeError:  # an unhashable SymInt in the key
            return fn(*key)

    plan.cache_info = cached.cache_info  # type: ignore[attr-defined]
    plan.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return plan


class NCS(NamedTuple):
    """A tensor seen as (N, C, S): the tensor to pass to a kernel and its three strides."""

    tensor: torch.Tensor
    stride_n: int
    stride_c: int
    stride_s: int

    @property
    def strides(self) -> tuple:
        return self.stride_n, self.stride_c, self.stride_s


@cached_plan
def _ncs_strides(shape: tuple, strides: tuple) -> Optional[tuple]:
    """(stride_n, stride_c, stride_s), or None when the spatial dims do not collapse."""
    dims = [(shape[i], strides[i]) for i in range(2, len(shape)) if shape[i] != 1]
    if not all(outer[1] == inner[1] * inner[0] for outer, inner in zip(dims, dims[1:])):
        return None
    return strides[0], strides[1], dims[-1][1] if dims else 1


def collapsible(t: torch.Tensor) -> bool:
    """Whether ``t``'s spatial dims collapse into one dim with one stride.

    True when each non-trivial spatial dim's stride is the next one's stride times its size: NCHW,
    channels_last, channels_last_3d, slices along N or C, and expanded gradients (all strides 0).
    """
    return _ncs_strides(tuple(t.shape), t.stride()) is not None


def ncs(t: torch.Tensor) -> NCS:
    """View ``t`` (N, C, *spatial) as (N, C, S) through its strides; a copy only if not
    :func:`collapsible` (then contiguous)."""
    strides = _ncs_strides(tuple(t.shape), t.stride())
    if strides is None:
        t = t.contiguous()
        strides = _ncs_strides(tuple(t.shape), t.stride())
    return NCS(t, *strides)


def empty_ncs(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output shaped like ``like``, in its layout (``empty_like`` keeps channels_last), or
    contiguous when that layout would not be :func:`collapsible`."""
    out = torch.empty_like(like, dtype=dtype)
    if not collapsible(out):
        out = torch.empty(like.shape, dtype=dtype, device=like.device)
    return out


def as_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous fp32 tensor (itself when it already is one): gates, squeeze grads."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def flat_ok(S: int, *strides: tuple) -> bool:
    """Whether every (stride_n, stride_c, stride_s) view has each sample's (C, S) block contiguous
    (NCHW, NCL, NCDHW, slices along N), so elementwise kernels can walk its flat C * S axis."""
    return all(_known(s[2] == 1) and _known(s[1] == S) for s in strides)


# ---- tiles, warps and grids ------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """A program's block of ``block_s`` positions x ``block_c`` channels (powers of 2).

    ``c_fast``: channels are the memory-fastest axis (channels_last), so consecutive programs
    walk channel blocks first; otherwise positions first (NCHW).
    """

    block_s: int
    block_c: int
    c_fast: bool


def _c_fast(C: int, S: int, stride_c: int, stride_s: int) -> bool:
    return _hint(S) == 1 or (_hint(C) > 1 and _hint(stride_c) <= _hint(stride_s))


def pick_tile(C: int, S: int, stride_c: int, stride_s: int, elems: int) -> Tile:
    """Tiles of about ``elems`` elements with the contiguous axis inside, for the 2-D kernels.

    channels_last: 64 channels x (elems / 64) positions (the 32 x 64 squeeze tile measured on an
    H100, docs/gpu.md, ran at torch's speed). NCHW: up to 1024 positions x the channels that
    fill the rest. Small dims shrink the tile to their next power of 2.
    """
    C, S = _hint(C), _hint(S)
    c_fast = _c_fast(C, S, stride_c, stride_s)
    if c_fast:
        block_c = min(_next_pow2(C), 64)
        block_s = min(_next_pow2(S), max(1, elems // block_c))
    else:
        block_s = min(_next_pow2(S), 1024)
        block_c = min(_next_pow2(C), max(1, elems // block_s))
    return Tile(max(block_s, 2), max(block_c, 2), c_fast)


def reduction_tile(C: int, S: int, stride_c: int, stride_s: int, align: int = 1) -> tuple[Tile, int]:
    """The squeeze's and the gate gradient's tile and ``num_warps``, by a written-out rule.

    channels_last, S >= 512 (ResNet stages 1-2): 32 positions x 64 channels (measured at torch's
    speed on an H100). Smaller maps (S = 196, 49): 8 positions x up to 256 channels, so a program
    reads 8 x 512 contiguous bytes per step and its last step wastes at most 7 rows (the 32 x 64
    tile left 15 of 64 rows idle at 7x7 and was slower than torch's mean there). NCHW: whole rows
    of positions (up to 1024; with ``align`` > 1, rows of the aligned windows of
    :func:`reduction_rows`, S + align - 1 long) x the channels that fill 2048 elements. 4 warps:
    16 fp32 accumulators per thread; 8 when the loads stay scalar (each element then carries its
    own 64-bit address: 8 elements per thread instead of 16).
    """
    C, S, stride_c, stride_s = _hint(C), _hint(S), _hint(stride_c), _hint(stride_s)
    if _c_fast(C, S, stride_c, stride_s):
        block_c = min(_next_pow2(C), 64 if S >= 512 else 256)
        block_s = min(_next_pow2(S), REDUCE_ELEMS // block_c)
        return Tile(max(block_s, 2), max(block_c, 2), True), 4
    block_s = min(_next_pow2(S + align - 1), 1024)
    block_c = min(_next_pow2(C), max(1, REDUCE_ELEMS // block_s))
    vectorised = align > 1 or S == 1 or stride_c % 16 == 0
    return Tile(max(block_s, 2), max(block_c, 2), False), (4 if vectorised else 8)


def align_for(S: int, CS: int, itemsize: int, *views: tuple) -> int:
    """The ``ALIGN`` of :func:`reduction_rows` for a reduction over tensors read through
    ``views``: the elements of a 16-byte vector when they are all NCHW (:func:`flat_ok`) with
    rows that Triton cannot see aligned (S % 16) and C * S a whole number of vectors; else 1."""
    vec = 16 // itemsize
    if not flat_ok(S, *views) or not _known(S % 16 != 0) or not _known(CS % vec == 0):
        return 1
    return vec


def pointwise_warps(elems: int) -> int:
    """``num_warps`` for an elementwise tile: 16 elements per thread (two 16-byte vectors of
    bf16, four of fp32), 1 to 8 warps; Liger-Kernel's rule gives 8 from 2048 elements up too."""
    return max(1, min(8, elems // 512))


def flat_block(N: int, CS: int, target: int) -> int:
    """Elements per program along the flat C * S axis: 4096, halved (down to 256) while the grid
    would have fewer than ``target`` programs (batch-1 latency)."""
    block = POINTWISE_ELEMS
    while block > MIN_POINTWISE_ELEMS and _hint(N) * cdiv(_hint(CS), block) < target:
        block //= 2
    return block


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs that fill the device: 4 per SM on a GPU; 8 under the interpreter, or when CUDA
    tensors are only fake (tracing on a machine without a GPU)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return 4 * _sm_count(device.index if device.index is not None else 0)
    return 8


def num_splits(rows: int, s_tiles: int, target: int, min_tiles: int = 2) -> int:
    """How many programs share one (n, channel block)'s positions in a reduction.

    With ``rows`` = N x channel blocks below ``target`` (batch-1 latency), the positions are cut
    into up to ``target / rows`` chunks of at least ``min_tiles`` tiles each, so the GPU fills;
    the partial sums are added by a tiny torch ``sum``. One split otherwise.

    >>> num_splits(rows=1024, s_tiles=98, target=528), num_splits(rows=4, s_tiles=98, target=528)
    (1, 49)
    """
    if rows >= target:
        return 1
    return max(1, min(cdiv(target, rows), s_tiles // min_tiles))


@dataclass(frozen=True)
class PointwisePlan:
    """One elementwise launch: grid size, tile (``tile.block_s`` is the flat block when
    ``flat``), ``num_warps``, and the integer arguments after the pointers (``args``)."""

    programs: int
    tile: Tile
    flat: bool
    num_warps: int
    args: tuple
    meta: dict  # the launch's constexprs and num_warps


def _pointwise(programs: int, tile: Tile, flat: bool, args: tuple) -> PointwisePlan:
    warps = pointwise_warps(tile.block_s * tile.block_c)
    meta = {"BLOCK_S": tile.block_s, "BLOCK_C": tile.block_c, "C_FAST": tile.c_fast, "FLAT": flat,
            "num_warps": warps}
    return PointwisePlan(programs, tile, flat, warps, args, meta)


@cached_plan
def pointwise_plan(shape: tuple, views: tuple, device: torch.device) -> PointwisePlan:
    """The launch of an elementwise kernel over tensors shaped ``shape`` whose (stride_n,
    stride_c, stride_s) are ``views`` (the first is the layout the tiles follow). Its ``args``
    are ``C, S, n_cblocks, n_sblocks`` and then every view's three strides."""
    N, C, S = shape[0], shape[1], math.prod(shape[2:])
    strides = tuple(s for view in views for s in view)
    target = target_programs(device)
    if flat_ok(S, *views) and not _known(S % 16 == 0):
        # NCHW rows that are not 16-element aligned: the flat walk vectorises (aligned rows do in
        # the 2-D tiles already, which load each gate once per channel instead of per element)
        block = flat_block(N, C * S, target)
        n_blocks = cdiv(C * S, block)
        return _pointwise(N * n_blocks, Tile(block, 1, False), True, (C, S, 1, n_blocks, *strides))
    tile = pick_tile(C, S, views[0][1], views[0][2], POINTWISE_ELEMS)
    while (tile.block_s * tile.block_c > MIN_POINTWISE_ELEMS
           and _hint(N) * cdiv(_hint(C), tile.block_c) * cdiv(_hint(S), tile.block_s) < target):
        # too few programs for the device (batch 1): halve the tile along its shorter side
        if tile.block_s >= tile.block_c and tile.block_s > 2:
            tile = Tile(tile.block_s // 2, tile.block_c, tile.c_fast)
        elif tile.block_c > 2:
            tile = Tile(tile.block_s, tile.block_c // 2, tile.c_fast)
        else:
            break
    n_cblocks, n_sblocks = cdiv(C, tile.block_c), cdiv(S, tile.block_s)
    return _pointwise(N * n_cblocks * n_sblocks, tile, False, (C, S, n_cblocks, n_sblocks, *strides))


@dataclass(frozen=True)
class ReductionGrid:
    """How a reduction over the positions of an (N, C, S) tensor is cut into programs: ``tile``,
    ``n_cblocks`` channel blocks, ``splits`` programs per (n, channel block), each over
    ``s_per_split`` positions (see :func:`split_ids`); ``programs`` is the launch grid's size.
    ``split`` is False when one program per (n, channel block) covers every position."""

    N: int
    C: int
    S: int
    tile: Tile
    n_cblocks: int
    splits: int
    s_per_split: int
    num_warps: int = 4
    split: bool = True
    align: int = 1  # the ALIGN of reduction_rows

    @property
    def programs(self) -> int:
        return self.N * self.n_cblocks * self.splits

    def partial(self, device: torch.device) -> torch.Tensor:
        """The fp32 buffer the programs write: (N, C), or (splits, N, C) to be summed over dim 0."""
        shape = (self.splits, self.N, self.C) if self.split else (self.N, self.C)
        return torch.empty(shape, dtype=torch.float32, device=device)

    def total(self, partial: torch.Tensor) -> torch.Tensor:
        """The (N, C) result from what the programs wrote into :meth:`partial`."""
        return partial.sum(0) if self.split else partial


@cached_plan
def _reduction_grid(shape: tuple, views: tuple, itemsize: int, device: torch.device,
                    splits: Optional[int]) -> ReductionGrid:
    N, C, S = shape[0], shape[1], math.prod(shape[2:])
    align = align_for(S, C * S, itemsize, *views)
    tile, warps = reduction_tile(C, S, views[0][1], views[0][2], align)
    n_cblocks = cdiv(C, tile.block_c)
    s_tiles = cdiv(_hint(S), tile.block_s)
    if splits is None:
        splits = num_splits(_hint(N) * _hint(n_cblocks), s_tiles, target_programs(device))
    splits = max(1, min(splits, s_tiles))
    if splits == 1:  # one program per (n, channel block) over all positions, whatever S is
        return ReductionGrid(N, C, S, tile, n_cblocks, 1, S, warps, split=False, align=align)
    tiles_per_split = cdiv(s_tiles, splits)
    s_per_split = tiles_per_split * tile.block_s
    return ReductionGrid(N, C, S, tile, n_cblocks, cdiv(S, s_per_split), s_per_split, warps, align=align)


def reduction_grid(x: torch.Tensor, views: Sequence[NCS], splits: Optional[int] = None) -> ReductionGrid:
    """The :class:`ReductionGrid` for a reduction over ``x``'s positions that reads the tensors
    ``views`` (x's first: the tiles follow its layout), with the ``align`` of :func:`align_for`;
    ``splits`` forces the number of programs per (n, channel block) (tests), else
    :func:`num_splits` picks it for the device. No split is left without positions."""
    key = tuple(v.strides for v in views)
    return _reduction_grid(tuple(x.shape), key, x.element_size(), x.device, splits)
