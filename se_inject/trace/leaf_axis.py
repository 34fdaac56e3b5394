"""Prove the channel dim of an opaque leaf's output from a real forward.

A module fx cannot follow becomes a leaf (:mod:`se_inject.trace.search`), and the site finder
cannot see inside it: Hugging Face's ``MobileNetV2ConvLayer`` (TF-style padding computed with
``int()`` of the input size, then a conv, a BatchNorm and a ReLU6) would leave every add after it
``channel-dim-unknown``. But in a real forward the leaf's output is the very tensor object one of
its own layers returned: the ReLU6's, whose input is the BatchNorm's output, whose channels are at
dim 1. Following object identity back through shape-keeping layers (activations, regularisers,
pooling) to a conv or norm proves the channel dim for that call; a leaf whose every call gives
the same dim has that dim. Nothing is guessed from shapes alone.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from . import ops
from .record import watch

__all__ = ["META_KEY", "proving_leaf_axes"]

#: ``node.meta`` key of a ``call_module`` node whose leaf's channel dim was proven.
META_KEY = "se_inject_channel_dim"


def _keeps_channels(m: nn.Module) -> bool:
    return ops.is_regularizer_module(m) or ops.is_activation_module(m) or ops.is_pool_module(m)


def _prove(output: Any, records: list[tuple[nn.Module, Any, Any]]) -> Optional[int]:
    """The channel dim of ``output``, followed back through ``records`` (module, first tensor
    input, output) of the leaf's descendants in the order they finished; None if not proven."""
    if not isinstance(output, torch.Tensor):
        return None
    producers: dict[int, tuple[nn.Module, Any, Any]] = {}
    for record in records:  # the first module to finish with an object made it (in-place ops return it too)
        if isinstance(record[2], torch.Tensor):
            producers.setdefault(id(record[2]), record)
    shape, t = tuple(output.shape), output
    for _ in range(32):
        record = producers.get(id(t))
        if record is None:
            return None
        module, first_input, out = record
        if out.dim() != len(shape):
            return None
        found = ops.module_channel_axis(module, tuple(out.shape))
        if found is not None:
            return found[0] if shape[found[0]] == found[1] else None
        if not _keeps_channels(module) or not isinstance(first_input, torch.Tensor):
            return None
        t = first_input
    return None


@contextlib.contextmanager
def proving_leaf_axes(leaves: Iterable[nn.Module]) -> Iterator[dict[int, int]]:
    """While the body runs a forward, watch ``leaves``; on exit the yielded dict holds, by
    ``id``, the channel dim of every leaf whose every call was proven with the same dim."""
    leaves = list(dict.fromkeys(leaves))
    proven: dict[int, int] = {}
    dims: dict[int, set] = {id(leaf): set() for leaf in leaves}
    records: list[tuple[nn.Module, Any, Any]] = []
    starts: list[int] = []
    leaf_ids = set(dims)

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        if starts:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            records.append((module, first, output))

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        starts.append(len(records))

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        start = starts.pop()
        dims[id(module)].add(_prove(output, records[start:]))
        record(module, args, output)  # an enclosing leaf may read through this one
        if not starts:
            records.clear()

    inner = {id(m): m for leaf in leaves for m in leaf.modules() if id(m) not in leaf_ids}
    try:
        with watch(leaves, enter, leave), watch(inner.values(), after=record):
            yield proven
    finally:
        records.clear()
    proven.update({key: next(iter(found)) for key, found in dims.items() if len(found) == 1 and None not in found})
