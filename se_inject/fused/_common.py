"""Shared pieces of the fused SE ops: the Triton import, the (N, C, S) view, tiles and splits.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

Every kernel of this package walks an (N, C, *spatial) tensor as an (N, C, S) array with its own
three strides, so one kernel serves NCHW (``stride_s == 1``) and channels_last (``stride_c ==
1``, ``stride_s == C``) without a copy: Triton specialises integer arguments equal to 1, so the
contiguous axis is known at compile time and the loads along it are vectorised.
"""

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only torch builds ship without Triton: kernels are defined, never run

    class _NoTriton:
        """Stand-in for ``triton`` and ``triton.language`` when Triton is not installed."""

        constexpr = int

        @staticmethod
        def jit(fn: Callable) -> Callable:
            return fn

    triton = tl = _NoTriton()  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON", "INTERPRETED", "triton", "tl", "OUT_ACTS", "DTYPES", "NCS", "Tile",
    "ncs", "collapsible", "empty_ncs", "pick_tile", "num_splits", "target_programs",
    "tensors_supported", "check_out_act",
    "register_op", "cdiv", "tile_ids", "split_ids", "ReductionGrid", "reduction_grid",
]

#: Activations after the residual add, with the code the kernels use as a ``tl.constexpr``.
OUT_ACTS: dict[str, int] = {"none": 0, "relu": 1, "silu": 2}

#: Dtypes the Triton kernels take (they accumulate in fp32 and store in the output's dtype).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Elements per program: reductions keep a 2-D fp32 accumulator, elementwise kernels do not.
REDUCE_ELEMS = 2048
POINTWISE_ELEMS = 4096


@triton.jit
def _probe() -> None:
    pass


#: True when TRITON_INTERPRET=1 was set before this package was imported: every kernel here is
#: then an interpreted function that runs on CPU tensors (slowly; for tests only).
INTERPRETED: bool = HAS_TRITON and type(_probe).__name__ == "InterpretedFunction"


@triton.jit
def tile_ids(pid, n_cblocks, n_sblocks, C_FAST: tl.constexpr):
    """(n, channel block, position block) of elementwise program ``pid``: the block index along
    the memory-fastest axis varies fastest between neighbouring programs."""
    if C_FAST:
        cb = pid % n_cblocks
        rest = pid // n_cblocks
        sb = rest % n_sblocks
        n = rest // n_sblocks
    else:
        sb = pid % n_sblocks
        rest = pid // n_sblocks
        cb = rest % n_cblocks
        n = rest // n_cblocks
    return n, cb, sb


@triton.jit
def split_ids(pid, n_cblocks, splits, s_per_split, C, S, BLOCK_C: tl.constexpr):
    """(n, split, channel offsets, channel mask, first and past-the-last position) of reduction
    program ``pid``: a block of channels of sample n over split's share of the positions; the
    result goes to row ``split * N + n`` of a (splits * N, C) buffer."""
    cb = pid % n_cblocks
    rest = pid // n_cblocks
    split = rest % splits
    n = rest // splits
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s_lo = split * s_per_split
    return n, split, offs_c, offs_c < C, s_lo, tl.minimum(s_lo + s_per_split, S)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_out_act(out_act: str) -> int:
    """The kernel code of ``out_act``; ``ValueError`` naming the valid names otherwise."""
    if out_act not in OUT_ACTS:
        raise ValueError(f"out_act={out_act!r} is not supported; use one of {sorted(OUT_ACTS)}")
    return OUT_ACTS[out_act]


@dataclass(frozen=True)
class NCS:
    """A tensor seen as (N, C, S): the tensor to pass to a kernel and its three strides."""

    tensor: torch.Tensor
    stride_n: int
    stride_c: int
    stride_s: int


def _spatial(t: torch.Tensor) -> list[tuple[int, int]]:
    return [(t.size(i), t.stride(i)) for i in range(2, t.dim()) if t.size(i) != 1]


def collapsible(t: torch.Tensor) -> bool:
    """Whether ``t``'s spatial dims collapse into one dim with one stride.

    True when each non-trivial spatial dim's stride is the next one's stride times its size: NCHW,
    channels_last, channels_last_3d, slices along N or C, and expanded gradients (all strides 0).
    """
    dims = _spatial(t)
    return all(outer[1] == inner[1] * inner[0] for outer, inner in zip(dims, dims[1:]))


def ncs(t: torch.Tensor) -> NCS:
    """View ``t`` (N, C, *spatial) as (N, C, S) through its strides; a copy only if not
    :func:`collapsible` (then contiguous)."""
    if not collapsible(t):
        t = t.contiguous()
    dims = _spatial(t)
    return NCS(t, t.stride(0), t.stride(1), dims[-1][1] if dims else 1)


def empty_ncs(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output shaped like ``like``, in its layout (``empty_like`` keeps channels_last), or
    contiguous when that layout would not be :func:`collapsible`."""
    out = torch.empty_like(like, dtype=dtype)
    if not collapsible(out):
        out = torch.empty(like.shape, dtype=dtype, device=like.device)
    return out


@dataclass(frozen=True)
class Tile:
    """A program's block of ``block_s`` positions x ``block_c`` channels (powers of 2).

    ``c_fast``: channels are the memory-fastest axis (channels_last), so consecutive programs
    walk channel blocks first; otherwise positions first (NCHW).
    """

    block_s: int
    block_c: int
    c_fast: bool


def pick_tile(C: int, S: int, stride_c: int, stride_s: int, elems: int) -> Tile:
    """Fixed, untuned tiles of about ``elems`` elements along the contiguous axis.

    channels_last: 64 channels x (elems / 64) positions (the 32 x 64 squeeze tile measured on an
    H100 in gpu-notes.md ran at torch's speed). NCHW: up to 1024 positions x the channels that
    fill the rest. Small dims shrink the tile to their next power of 2.
    """
    c_fast = S == 1 or (C > 1 and stride_c <= stride_s)
    if c_fast:
        block_c = min(_next_pow2(C), 64)
        block_s = min(_next_pow2(S), max(1, elems // block_c))
    else:
        block_s = min(_next_pow2(S), 1024)
        block_c = min(_next_pow2(C), max(1, elems // block_s))
    return Tile(max(block_s, 2), max(block_c, 2), c_fast)


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
class ReductionGrid:
    """How a reduction over the positions of an (N, C, S) tensor is cut into programs: ``tile``,
    ``n_cblocks`` channel blocks, ``splits`` programs per (n, channel block), each over
    ``s_per_split`` positions (see :func:`split_ids`); ``programs`` is the launch grid's size."""

    N: int
    C: int
    S: int
    tile: Tile
    n_cblocks: int
    splits: int
    s_per_split: int

    @property
    def programs(self) -> int:
        return self.N * self.n_cblocks * self.splits

    def partial(self, device: torch.device) -> torch.Tensor:
        """The fp32 buffer the programs write: (N, C), or (splits, N, C) to be summed over dim 0."""
        shape = (self.N, self.C) if self.splits == 1 else (self.splits, self.N, self.C)
        return torch.empty(shape, dtype=torch.float32, device=device)


def reduction_grid(x: torch.Tensor, view: NCS, splits: Optional[int] = None) -> ReductionGrid:
    """The :class:`ReductionGrid` for ``x`` read through ``view``; ``splits`` forces the number
    of programs per (n, channel block) (tests), else :func:`num_splits` picks it for the device.
    No split is left without positions."""
    N, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    tile = pick_tile(C, S, view.stride_c, view.stride_s, REDUCE_ELEMS)
    n_cblocks, s_tiles = cdiv(C, tile.block_c), cdiv(S, tile.block_s)
    if splits is None:
        splits = num_splits(N * n_cblocks, s_tiles, target_programs(x.device))
    tiles_per_split = cdiv(s_tiles, max(1, min(splits, s_tiles)))
    return ReductionGrid(N, C, S, tile, n_cblocks, cdiv(s_tiles, tiles_per_split), tiles_per_split * tile.block_s)


def _is_real(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def _fits_int32(t: torch.Tensor) -> bool:
    # Kernels offset by n in int64 and within one sample in int32.
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
    return extent < 2**31


def tensors_supported(x: torch.Tensor, shortcut: Optional[torch.Tensor]) -> bool:
    """Whether the Triton kernels can take ``x`` (and ``shortcut``); names are checked elsewhere.

    CUDA tensors of 3 to 5 dims in fp32/bf16/fp16 (or real CPU tensors when the kernels are
    interpreted, for tests), non-empty, each sample spanning under 2**31 elements, and a shortcut
    of x's shape on x's device in one of those dtypes.
    """
    if not HAS_TRITON or x.dim() not in (3, 4, 5) or x.dtype not in DTYPES or x.numel() == 0:
        return False
    if not (_fits_int32(x) and (shortcut is None or _fits_int32(shortcut))):
        return False
    if not (x.is_cuda or (INTERPRETED and x.device.type == "cpu" and _is_real(x))):
        return False
    if shortcut is None:
        return True
    return (shortcut.shape == x.shape and shortcut.device == x.device
            and shortcut.dtype in DTYPES)


def register_op(name: str) -> Callable:
    """``torch.library.triton_op`` (inductor sees the kernels), or ``custom_op`` without Triton.

    Either way the function itself is the fake (meta) kernel, so it must be traceable: only torch
    ops and kernels launched as ``wrap_triton(kernel)[grid](...)``. Interpreted kernels are
    launched raw (torch 2.14's ``wrap_triton`` passes them through, older versions reject them).
    """

    def register(fn: Callable) -> torch.library.CustomOpDef:
        if HAS_TRITON:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op

    return register

