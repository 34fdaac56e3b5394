"""What a training step keeps in memory: the tensors saved for backward, and CUDA's peak.

SE saves one more feature map per block for its backward (the branch's output, which the gate's
product needs), so a training step holds more activations: that is a smaller batch for everyone
who trains. :func:`saved_for_backward` counts those bytes exactly, on any device, with
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd packs is seen, and each
*storage* is counted once at its full size (a view and its base, or a tensor saved by two ops,
are one allocation). Parameters saved by the ops that read them (a convolution's weight) are
storages too and are counted. Under ``torch.compile`` the hooks see what the compiled graph
saves, which may be less: inductor recomputes cheap ops in the backward instead of saving them.

:func:`cuda_step_peak` is the allocator's view: the most memory one step allocated beyond what was
allocated before it (activations, workspaces, gradients), on CUDA only.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["SavedBytes", "saved_for_backward", "cuda_step_peak"]


class SavedBytes:
    """The storages autograd saved while the context was open, counted once each."""

    def __init__(self) -> None:
        self._storages: dict[tuple[str, int], int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        self._storages[key] = max(self._storages.get(key, 0), storage.nbytes())
        return tensor

    @property
    def bytes(self) -> int:
        """Bytes of the distinct storages saved."""
        return sum(self._storages.values())

    @property
    def storages(self) -> int:
        """How many distinct storages were saved."""
        return len(self._storages)


@contextlib.contextmanager
def saved_for_backward() -> Iterator[SavedBytes]:
    """Count what autograd saves for backward inside the block.

    >>> import torch
    >>> x = torch.randn(4, 8, requires_grad=True)
    >>> with saved_for_backward() as saved:
    ...     y = (x * x).sum()  # the product saves x (once, though it is both operands)
    >>> saved.bytes, saved.storages
    (128, 1)
    """
    counter = SavedBytes()
    with saved_tensors_hooks(counter.pack, _unpack):
        yield counter


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def cuda_step_peak(step: Callable[[], Any], device: torch.device) -> Optional[int]:
    """The most bytes ``step()`` allocated on ``device`` at once beyond what was allocated before
    it; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
