"""Shared pieces of the fused SE ops: the Triton import, where the kernels can run, the program
ids and offsets the kernels share, and the one launch function.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

Every kernel of this package walks an (N, C, *spatial) tensor as an (N, C, S) array with its own
three strides (``_plan.ncs``), so one kernel serves NCHW (``stride_s == 1``) and channels_last
(``stride_c == 1``, ``stride_s == C``) without a copy: Triton specialises integer arguments
equal to 1 (and those divisible by 16), so the contiguous axis is known at compile time and the
loads along it are vectorised when its rows are 16-byte aligned. Contiguous NCHW rows are S
elements long, so at S = 196 or 49 (ResNet's stages 3 and 4) they are not: the elementwise
kernels then walk each sample's flat C * S axis (``FLAT``; the channel of element ``i`` is
``i // S``) and the reductions read aligned windows (``ALIGN``), so their loads are whole
16-byte vectors whatever S is. ``_plan.py`` plans every launch.
"""

import functools
from typing import Any, Callable, Optional, Sequence

import torch

from ..layers import OUT_ACTS as _OUT_ACTS
from ._plan import cached_plan

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    HAS_TRITON = True
except ImportError:  # CPU-only torch builds ship without Triton: kernels are defined, never run

    class _NoTriton:
        """Stand-in for ``triton`` and ``triton.language`` when Triton is not installed."""

        constexpr = int

        @staticmethod
        def jit(fn: Callable) -> Callable:
            return fn

    triton = tl = _NoTriton()  # type: ignore[assignment]
    wrap_triton = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON", "INTERPRETED", "triton", "tl", "OUT_ACTS", "DTYPES", "MIN_CAPABILITY",
    "BF16_CAPABILITY", "device_supported", "tensors_supported", "check_out_act", "tile_ids",
    "pointwise_ids", "at", "per_channel", "split_ids", "reduction_rows", "launch", "register_op",
]

#: Activations after the residual add (:data:`se_inject.layers.OUT_ACTS`), with the code the kernels
#: use as a ``tl.constexpr``.
OUT_ACTS: dict[str, int] = {name: out_act.code for name, out_act in _OUT_ACTS.items()}

#: Dtypes the Triton kernels take (they accumulate in fp32 and store in the output's dtype).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: The oldest NVIDIA GPUs Triton compiles for (Volta); below it the op runs its torch ops.
MIN_CAPABILITY = (7, 0)
#: bf16 needs Ampere: on older GPUs bf16 tensors take the torch ops, fp32 and fp16 the kernels.
BF16_CAPABILITY = (8, 0)


@triton.jit
def _probe() -> None:
    pass


#: True when TRITON_INTERPRET=1 was set before this package was imported: every kernel here is
#: then an interpreted function that runs on CPU tensors (slowly; for tests only).
INTERPRETED: bool = HAS_TRITON and type(_probe).__name__ == "InterpretedFunction"


# ---- where the kernels can run ------------------------------------------------------------------

def _capability(index: int) -> Optional[tuple[int, int]]:
    """The compute capability of CUDA device ``index``; None when CUDA is not available (CUDA
    tensors that are only fake: tracing for a GPU on a machine without one)."""
    return torch.cuda.get_device_capability(index) if torch.cuda.is_available() else None


@functools.lru_cache(maxsize=None)
def _device_supported(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda":
        return INTERPRETED and device.type == "cpu"
    if torch.version.hip is not None:  # AMD GPUs: Triton's ROCm backend, no CUDA capabilities
        return True
    cap = _capability(device.index if device.index is not None else 0)
    if cap is None:
        return True
    return tuple(cap) >= (BF16_CAPABILITY if dtype == torch.bfloat16 else MIN_CAPABILITY)


@torch.compiler.assume_constant_result
def device_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels can run on ``device`` for tensors of ``dtype``.

    A CUDA GPU of compute capability :data:`MIN_CAPABILITY` or later, and
    :data:`BF16_CAPABILITY` for bf16; the CPU only when the kernels are interpreted (tests). The
    answer is cached per (device, dtype) (``device_supported.cache_clear()`` forgets it); with
    CUDA unavailable (fake CUDA tensors), any GPU is assumed. torch.compile reads the answer
    once, as a constant.
    """
    return _device_supported(device, dtype)


device_supported.cache_clear = _device_supported.cache_clear  # type: ignore[attr-defined]


def _is_real(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def _fits_int32(t: torch.Tensor) -> bool:
    # Kernels offset by n in int64 and within one sample in int32.
    return _sample_fits_int32(tuple(t.shape), t.stride())


@cached_plan
def _sample_fits_int32(shape: tuple, strides: tuple) -> bool:
    extent = sum((size - 1) * abs(stride) for size, stride in zip(shape[1:], strides[1:]))
    return extent < 2**31


def tensors_supported(x: torch.Tensor, shortcut: Optional[torch.Tensor]) -> bool:
    """Whether the Triton kernels can take ``x`` (and ``shortcut``); names are checked by
    :func:`~se_inject.fused.se_residual.use_fused`, which every decision goes through.

    Tensors (not fx proxies) of 3 to 5 dims in fp32/bf16/fp16, non-empty, each sample spanning
    under 2**31 elements, on a device :func:`device_supported` accepts for their dtype (real CPU
    tensors when the kernels are interpreted), and a shortcut of x's shape on x's device in one
    of those dtypes.
    """
    if not HAS_TRITON or not isinstance(x, torch.Tensor):
        return False
    if x.dim() not in (3, 4, 5) or x.dtype not in DTYPES or x.numel() == 0:
        return False
    if shortcut is not None and not (isinstance(shortcut, torch.Tensor) and shortcut.shape == x.shape
                                     and shortcut.device == x.device and shortcut.dtype in DTYPES):
        return False
    if not device_supported(x.device, x.dtype):
        return False
    if shortcut is not None and not device_supported(x.device, shortcut.dtype):
        return False
    if x.device.type == "cpu" and not _is_real(x):  # interpreted kernels need real data
        return False
    return _fits_int32(x) and (shortcut is None or _fits_int32(shortcut))


def check_out_act(out_act: str) -> int:
    """The kernel code of ``out_act``; ``ValueError`` naming the valid names otherwise."""
    if out_act not in OUT_ACTS:
        raise ValueError(f"out_act={out_act!r} is not supported; use one of {sorted(OUT_ACTS)}")
    return OUT_ACTS[out_act]


# ---- program ids and offsets inside the kernels ----------------------------------------------


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
def pointwise_ids(pid, C, S, n_cblocks, n_sblocks, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                  C_FAST: tl.constexpr, FLAT: tl.constexpr):
    """(n, rows, chans, mask, channel mask) of elementwise program ``pid``.

    FLAT: BLOCK_S consecutive elements of sample n's flat C * S axis; ``rows`` are their flat
    offsets and ``chans = rows // S`` their channels (both 1-D, like the masks). Otherwise a
    (BLOCK_S positions, BLOCK_C channels) tile: ``rows`` (BLOCK_S, 1), ``chans`` (BLOCK_C,) and
    its mask (BLOCK_C,), so a gate loads once per channel (``per_channel`` broadcasts it).
    Offsets into a tensor: :func:`at`.
    """
    if FLAT:
        n = pid // n_sblocks
        rows = (pid % n_sblocks) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = rows < C * S
        chans = rows // S
        cmask = mask
    else:
        n, cb, sb = tile_ids(pid, n_cblocks, n_sblocks, C_FAST)
        rows = (sb * BLOCK_S + tl.arange(0, BLOCK_S))[:, None]
        chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = chans < C
        mask = (rows < S) & cmask[None, :]
    return n, rows, chans, mask, cmask


@triton.jit
def at(rows, chans, stride_s, stride_c, FLAT: tl.constexpr):
    """Offsets within one sample of the elements :func:`pointwise_ids` (or
    :func:`reduction_rows`) named: ``rows`` themselves when FLAT, else the (rows, chans) tile."""
    if FLAT:
        offs = rows
    else:
        offs = rows * stride_s + chans[None, :] * stride_c
    return offs


@triton.jit
def per_channel(v, FLAT: tl.constexpr):
    """A per-channel value loaded at ``chans`` (see :func:`pointwise_ids`), shaped to combine
    with the tile."""
    if FLAT:
        out = v
    else:
        out = v[None, :]
    return out


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


@triton.jit
def reduction_rows(step, offs_c, mask_c, s_lo, s_hi, S, CS, BLOCK_S: tl.constexpr,
                   ALIGN: tl.constexpr):
    """(rows, load mask, keep mask) of the (BLOCK_S, BLOCK_C) tile at ``step`` (0, BLOCK_S, ...
    up to ``s_hi - s_lo + ALIGN - 1``) of a reduction over positions [s_lo, s_hi) of channels
    ``offs_c``. Offsets into a tensor: ``at(rows, offs_c, ..., ALIGN > 1)``.

    ALIGN == 1: rows are positions; load and keep are the positions in range. ALIGN > 1 (NCHW,
    S not a multiple of 16): rows are flat offsets in ALIGN-element aligned windows that cover
    each channel's [c * S + s_lo, c * S + s_hi), so the loads are whole 16-byte vectors; load
    masks whole vectors inside the sample's C * S elements (in bounds: ``CS % ALIGN == 0``),
    keep masks the channel's own elements (a window's edges belong to its neighbours).
    """
    if ALIGN > 1:
        first = offs_c * S + s_lo
        rows = ((first // ALIGN) * ALIGN)[None, :] + (step + tl.arange(0, BLOCK_S))[:, None]
        load = (rows < CS) & mask_c[None, :]
        keep = load & (rows >= first[None, :]) & (rows < (first + (s_hi - s_lo))[None, :])
    else:
        rows = (s_lo + step + tl.arange(0, BLOCK_S))[:, None]
        load = (rows < s_hi) & mask_c[None, :]
        keep = load
    return rows, load, keep


# ---- launching and registering -------------------------------------------------------------------


def launch(kernel: Any, programs: int, args: Sequence[Any], meta: dict) -> None:
    """Run ``kernel`` on a 1-D grid of ``programs``: through ``wrap_triton``, so make_fx, export
    and inductor record it (in eager, torch returns the kernel itself), or raw when interpreted
    (torch 2.14's ``wrap_triton`` passes interpreted kernels through, older versions reject
    them). The one place every launch goes through."""
    (kernel if INTERPRETED else wrap_triton(kernel))[(programs,)](*args, **meta)


def register_op(name: str) -> Callable:
    """``torch.library.triton_op`` (inductor sees the kernels), or ``custom_op`` without Triton.

    Either way the function itself is the fake (meta) kernel, so it must be traceable: only torch
    ops and kernels launched by :func:`launch`.
    """

    def register(fn: Callable) -> torch.library.CustomOpDef:
        if HAS_TRITON:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op

    return register
