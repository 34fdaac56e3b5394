"""The graph pass: put a module between a branch output and the node that reads it.

:func:`insert_modules` is the one mutation se_inject makes to a graph. It is a plain fx pass in the
style of ``torch.fx.subgraph_rewriter``: the caller collects the targets first, the pass inserts
``call_module`` nodes with ``graph.inserting_before``, rewires the consumer with
``replace_input_with``, lints the graph and recompiles the module.

A point may also hand the residual add to the module (``module(tail, shortcut)`` replaces the add),
and the activation that is the add's only reader: that is how SE runs its fused residual tail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import fx, nn

from ..trace.ops import is_inplace_add

__all__ = ["InsertionPoint", "insert_modules", "free_attribute_name"]


@dataclass(frozen=True)
class InsertionPoint:
    """Where a module goes: it reads ``tail`` and ``consumer`` reads it instead of ``tail``.

    Attributes:
        tail: the node whose output the new module takes.
        consumer: a user of ``tail`` (the residual add, or a drop-path in front of it).
        name: attribute name for the new module (see :func:`free_attribute_name`).
        module: the module to insert.
        shortcut: when given, ``consumer`` is the residual add ``tail + shortcut`` and the module
            replaces it: ``module(tail, shortcut)``.
        activation: with ``shortcut``, the activation node that is the add's only reader, which
            the module replaces too.
        also: more users of ``tail`` that read the module instead, after ``consumer`` in the graph
            (``position="post"``: every reader of a block's output; ``"pre"``: of its input).
    """

    tail: fx.Node
    consumer: fx.Node
    name: str
    module: nn.Module
    shortcut: Optional[fx.Node] = None
    activation: Optional[fx.Node] = None
    also: tuple[fx.Node, ...] = ()


def free_attribute_name(gm: nn.Module, base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2`` ... : the first name that ``gm`` does not use.

    An attribute that is ``None`` (timm blocks keep ``self.se = None``) counts as free; names in
    ``taken`` do not.
    """
    candidate, i = base, 0
    while candidate in taken or getattr(gm, candidate, None) is not None:
        i += 1
        candidate = f"{base}_{i}"
    return candidate


def insert_modules(gm: fx.GraphModule, points: Sequence[InsertionPoint]) -> dict[str, fx.Node]:
    """Insert each point's module between its ``tail`` and its ``consumer``, in place.

    If the consumer is an in-place add on the tail (``tail.add_(shortcut)``), later readers of the
    tail are redirected to the add's result, which is the tensor the in-place add produced.

    Args:
        gm: the GraphModule to rewrite; it is modified and recompiled.
        points: where to insert, all collected before the first mutation.

    Returns:
        The created ``call_module`` nodes, by module name.

    Raises:
        ValueError: a consumer does not read its tail, or a name is already a submodule; the
            message shows the node (``node.format_node()``).

    Example:
        >>> import torch
        >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU()))
        >>> conv, relu = [n for n in gm.graph.nodes if n.op == "call_module"]
        >>> insert_modules(gm, [InsertionPoint(conv, relu, "extra", torch.nn.Identity())])
        {'extra': extra}
        >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
        ['0', 'extra', '1']
    """
    graph = gm.graph
    _check_points(gm, points)
    position = {n: i for i, n in enumerate(graph.nodes)}
    created: dict[str, fx.Node] = {}
    replaced: dict[fx.Node, fx.Node] = {}  # nodes an earlier point removed -> what stands for them
    for point in points:
        if getattr(gm, point.name, None) is None and hasattr(gm, point.name):
            delattr(gm, point.name)  # a placeholder attribute such as timm's `self.se = None`
        gm.add_submodule(point.name, point.module)
        point = dataclasses.replace(point, tail=replaced.get(point.tail, point.tail),
                                    shortcut=replaced.get(point.shortcut, point.shortcut))  # type: ignore[arg-type]
        args = (point.tail,) if point.shortcut is None else (point.tail, point.shortcut)
        with graph.inserting_before(point.consumer):
            node = graph.call_module(point.name, args)
        in_place = is_inplace_add(point.consumer) and point.consumer.args[0] is point.tail
        result = node if point.shortcut is not None else point.consumer
        if in_place:  # what read the tail after `tail += shortcut` reads the add's result
            for user in [u for u in point.tail.users if position.get(u, -1) > position[point.consumer]]:
                if user not in point.also:
                    user.replace_input_with(point.tail, result)
        if point.shortcut is None:
            for reader in (point.consumer, *point.also):
                reader.replace_input_with(point.tail, node)
        else:
            _replace(graph, point, node)
            replaced.update({n: node for n in (point.consumer, point.activation) if n is not None})
        created[point.name] = node
    graph.lint()
    gm.recompile()
    return created


def _check_points(gm: fx.GraphModule, points: Sequence[InsertionPoint]) -> None:
    for point in points:
        for reader in (point.consumer, *point.also):
            if point.tail not in reader.all_input_nodes:
                raise ValueError(f"{reader.format_node()} does not read {point.tail.format_node()}")
        if point.name in dict(gm.named_children()):
            raise ValueError(f"{type(gm).__name__} already has a submodule named {point.name!r}")


def _replace(graph: fx.Graph, point: InsertionPoint, node: fx.Node) -> None:
    """Let ``node`` stand for the residual add (and the activation after it) and remove them."""
    last = point.activation or point.consumer
    last.replace_all_uses_with(node)
    if point.activation is not None:
        graph.erase_node(point.activation)
    graph.erase_node(point.consumer)
