"""Where a tensor keeps its channels, proven from the ops that made it.

The channel dim starts at the last conv (dim 1), linear (last dim) or norm (by type) and is
followed through permutes (replayed on a meta tensor), reshapes (the dim of that size with as
many elements before it), ``cat``, basic slicing and elementwise ops. Anything not proven is None:
se_inject never guesses the channel dim from shapes alone.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence

import torch
from torch import fx

from ..trace import ops
from ..trace.leaf_axis import META_KEY as LEAF_DIM
from .graph_index import GraphIndex, shape_of

__all__ = ["Axis", "ChannelAxes", "read_by_channels_last_norm"]

#: (dim, channel count)
Axis = tuple[int, int]


class ChannelAxes:
    """The channel dim of every node of one graph, computed on demand and memoised.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from se_inject.trace.scopes import ShapeRecorder
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU()))
        >>> _ = ShapeRecorder(gm).run(torch.randn(1, 3, 4, 4))
        >>> ChannelAxes(GraphIndex(gm)).axis(list(gm.graph.nodes)[2])  # the ReLU's output
        (1, 8)
    """

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self._memo: dict[fx.Node, Optional[Axis]] = {}

    def axis(self, node: fx.Node) -> Optional[Axis]:
        """(dim, channel count) of ``node``'s output, or None if it cannot be proven."""
        if node not in self._memo:
            self._memo[node] = None  # guards cycles through malformed graphs
            self._memo[node] = self._axis(node)
        return self._memo[node]

    def _axis(self, node: fx.Node) -> Optional[Axis]:
        shape = shape_of(node)
        if shape is None:
            return None
        parent = self.index.first_data_input(node)
        m = self.index.module(node)
        proven = node.meta.get(LEAF_DIM)  # an opaque leaf whose channel dim a real forward proved
        if m is not None and isinstance(proven, int) and proven < len(shape):
            return proven, shape[proven]
        if m is not None:
            return self._module_axis(m, parent, shape)
        if node.op == "call_function" and node.target in ops.CONV_FUNCTIONS:
            return (len(shape) - 1, shape[-1]) if ops.target_name(node.target) == "linear" else (1, shape[1])
        if node.op not in ("call_function", "call_method") or parent is None:
            return None
        parent_axis, parent_shape = self.axis(parent), shape_of(parent)
        if parent_axis is None or parent_shape is None:
            return None
        name = ops.target_name(node.target)
        if name in ops.PERMUTING_OPS:
            return _permuted_axis(node, parent_axis, parent_shape)
        if name in ops.RESHAPING_OPS or name == "flatten":
            return _reshaped_axis(parent_axis, parent_shape, shape)
        if name in ("cat", "concat", "concatenate"):
            return self._concatenated_axis(node, shape)
        if node.target is operator.getitem:
            return _sliced_axis(node, parent_axis, shape)
        # Elementwise or shape-keeping ops: the channel dim is the one of the input of that shape.
        for inp in self.index.data_inputs(node):
            if shape_of(inp) == shape:
                return self.axis(inp)
        return None

    def _module_axis(self, m: Any, parent: Optional[fx.Node], shape: tuple[int, ...]) -> Optional[Axis]:
        found = ops.module_channel_axis(m, shape)
        if found is not None:
            return found
        shape_keeping = (ops.is_regularizer_module(m) or isinstance(m, ops.ATTENTION_TYPES)
                         or ops.is_activation_module(m) or ops.is_pool_module(m))
        if not shape_keeping or parent is None:
            return None
        axis, parent_shape = self.axis(parent), shape_of(parent)
        if axis is None or parent_shape is None or len(parent_shape) != len(shape):
            return None
        return axis if shape[axis[0]] == axis[1] else None

    def _concatenated_axis(self, node: fx.Node, shape: tuple[int, ...]) -> Optional[Axis]:
        """Through ``cat``: the channel dim of the result is the one all the inputs agree on."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        if not isinstance(tensors, (list, tuple)) or not tensors:
            return None
        axes = set()
        for t in tensors:
            axis = self.axis(t) if isinstance(t, fx.Node) else None
            axes.add(axis[0] if axis else None)
        if len(axes) != 1 or None in axes:
            return None
        (dim,) = axes
        return dim, shape[dim]


def _flatten(values: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _permuted_axis(node: fx.Node, axis: Axis, parent_shape: tuple[int, ...]) -> Optional[Axis]:
    """Follow the channel dim through permute / transpose / movedim / swapaxes.

    The op is replayed on a meta tensor whose dims have distinct sizes; where the channel dim's
    size lands is where the channel dim went.
    """
    args = node.args[1:] if node.op == "call_method" or isinstance(node.args[0], fx.Node) else node.args
    if any(isinstance(a, fx.Node) for a in _flatten(args) + _flatten(list(node.kwargs.values()))):
        return None
    probe_sizes = [2 + i for i in range(len(parent_shape))]
    probe = torch.empty(probe_sizes, device="meta")
    try:
        moved = getattr(torch.Tensor, str(ops.target_name(node.target)))(probe, *args, **node.kwargs)
    except Exception:  # an unexpected signature: leave the channel dim unproven
        return None
    sizes = list(moved.shape)
    target = probe_sizes[axis[0]]
    return (sizes.index(target), axis[1]) if target in sizes else None


def _reshaped_axis(axis: Axis, before: tuple[int, ...], after: tuple[int, ...]) -> Optional[Axis]:
    """Follow the channel dim through a reshape: the same dim is the one of the same size with
    the same number of elements before it (in row-major order, that is the same axis)."""
    dim, channels = axis
    leading = math.prod(before[:dim])
    for d, size in enumerate(after):
        if size == channels and math.prod(after[:d]) == leading:
            return d, channels
    return None


def _sliced_axis(node: fx.Node, axis: Axis, shape: tuple[int, ...]) -> Optional[Axis]:
    """Through basic slicing (``x[:, :c]``, ``x[..., 1:]``): slices keep every dim in place."""
    index = node.args[1] if len(node.args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) or i is Ellipsis for i in items) or list(items).count(Ellipsis) > 1:
        return None
    if any(isinstance(v, fx.Node) for i in items if isinstance(i, slice) for v in (i.start, i.stop, i.step)):
        return None
    return axis[0], shape[axis[0]]


def read_by_channels_last_norm(index: GraphIndex, node: fx.Node) -> bool:
    """Whether a LayerNorm-like norm over the last dim reads ``node`` (a channels-last tensor)."""
    shape = shape_of(node)
    for user in node.users:
        m = index.module(user)
        if m is not None and shape and shape_of(user) == shape and ops.is_channels_last_norm(m, shape):
            return True
    return False
