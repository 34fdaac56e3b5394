"""The two ends of a residual branch: what a shortcut may hold, and where SE meets the add.

A shortcut is linear: identity, norm, pooling, dropout / drop-path, scaling by a constant or
parameter, and at most one projection (a 1x1 conv, optionally with one depthwise conv). A slice
of a split tensor is a hierarchical add (Res2Net), not a block's shortcut; a slice of a ``cat``
that re-selects exactly one of its inputs is that input again (DPN's dual paths).
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence

from torch import fx, nn

from ..trace import ops
from .graph_index import GraphIndex, shape_of, tensor_meta

__all__ = ["SHORTCUT_PROBLEMS", "shortcut_problem", "trailing_regularizers"]

#: Reason codes that condemn the shortcut rather than the branch.
SHORTCUT_PROBLEMS = frozenset({"heavy-paths", "split-slice"})

_ARITHMETIC = ("mul", "truediv", "div", "imul", "add", "sub", "iadd")


def _reselects_cat_input(node: fx.Node) -> bool:
    """Whether ``node`` is a slice of a ``cat`` that selects exactly one of its inputs."""
    source, index = node.args[0], node.args[1] if len(node.args) > 1 else None
    if not (isinstance(source, fx.Node) and ops.target_name(source.target) in ("cat", "concat")):
        return False
    tensors = source.args[0] if source.args else source.kwargs.get("tensors")
    dim = source.args[1] if len(source.args) > 1 else source.kwargs.get("dim", 0)
    shape = shape_of(source)
    items = index if isinstance(index, tuple) else (index,)
    if shape is None or not isinstance(dim, int) or not isinstance(tensors, (list, tuple)):
        return False
    dim %= len(shape)
    if len(items) <= dim or not all(isinstance(i, slice) for i in items):
        return False
    if any(item != slice(None) for d, item in enumerate(items) if d != dim):
        return False
    start, stop, step = items[dim].indices(shape[dim])
    offset = 0
    for t in tensors:
        size = (shape_of(t) or (0,) * (dim + 1))[dim]
        if step == 1 and (start, stop) == (offset, offset + size):
            return True
        offset += size
    return False


def _module_problem(node: fx.Node, m: nn.Module, counts: dict[str, int]) -> Optional[tuple[str, str]]:
    """Whether a module on the shortcut path keeps it light; counts projections in ``counts``."""
    if isinstance(m, ops.ATTENTION_TYPES):  # e.g. from apply(position="identity"): the block has attention
        return "has-attention", f"{type(m).__name__} at {node.target} on the shortcut"
    if isinstance(m, ops.CONV_TYPES):
        if math.prod(m.kernel_size) == 1:
            counts["pointwise"] += 1
        elif m.groups == m.in_channels and m.groups > 1:
            counts["depthwise"] += 1
        else:
            return "heavy-paths", f"shortcut has a {m.kernel_size} convolution ({node.target})"
        if counts["pointwise"] > 1 or counts["depthwise"] > 1:
            return "heavy-paths", f"shortcut has more than one projection ({node.target})"
        return None
    if isinstance(m, ops.NORM_TYPES) and not ops.is_activation_module(m):
        return None
    if ops.is_regularizer_module(m) or ops.is_pool_module(m):
        return None
    return "heavy-paths", f"shortcut goes through {type(m).__name__} ({node.target})"


def _call_problem(g: GraphIndex, node: fx.Node) -> Optional[tuple[str, str]]:
    """Whether a function or method call on the shortcut path keeps it light."""
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0]
        if _reselects_cat_input(node) or not isinstance(source, fx.Node):
            return None  # cat([a, b], 1)[:, :len(a)] is a again (DPN's dual paths)
        if ops.target_name(source.target) in ops.SPLIT_OPS or tensor_meta(source) is not None:
            return "split-slice", f"shortcut is {node.name}, a slice of {source.name}"
        return None  # an element of a tuple output: the walk goes on to what produced it
    if node.op in ("call_function", "call_method"):
        name = ops.target_name(node.target)
        if name in ops.SHAPE_OPS or name in ops.POOL_FUNCTIONS:
            return None
        if name in _ARITHMETIC and len(g.data_inputs(node)) <= 1:
            return None  # scaling or bias by a constant or parameter
        if name in _ARITHMETIC + ("cat",):
            return "heavy-paths", f"shortcut merges several tensors at {node.name}"
    return "heavy-paths", f"shortcut goes through {g.label(node)} ({node.name})"


def shortcut_problem(g: GraphIndex, path: Sequence[fx.Node]) -> Optional[tuple[str, str]]:
    """None if ``path`` (from the shortcut operand back to the fork) is a light shortcut, else
    (reason code, detail)."""
    counts = {"pointwise": 0, "depthwise": 0}
    for node in path:
        m = g.module(node)
        problem = _module_problem(node, m, counts) if m is not None else _call_problem(g, node)
        if problem is not None:
            return problem
    return None


def trailing_regularizers(g: GraphIndex, add: fx.Node, branch: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Step back from the branch operand over drop-path / dropout / identity modules.

    Returns (tail, consumer): SE takes ``tail`` and feeds ``consumer``.
    """
    consumer, tail = add, branch
    if ops.is_inplace_add(add) and add.args and add.args[0] is branch:
        # `out.add_(x); return out`: what reads `out` after the add reads the add's result.
        later = [u for u in branch.users if u is not add and g.position[u] > g.position[add]]
        if len(branch.users) - len(later) != 1:
            return tail, consumer
    elif len(tail.users) != 1:
        return tail, consumer
    while True:
        previous = g.first_data_input(tail)
        if not ops.is_regularizer(tail, g.module(tail)) or previous is None or shape_of(previous) != shape_of(tail):
            break
        consumer, tail = tail, previous
        if len(tail.users) != 1:
            break
    return tail, consumer
