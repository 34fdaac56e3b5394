"""The graph pass: put a module between a branch output and the node that reads it.

:func:`insert_modules` is the one mutation se_inject makes to a graph. It is a plain fx pass in the
style of ``torch.fx.subgraph_rewriter``: the caller collects the targets first, the pass inserts
``call_module`` nodes with ``graph.inserting_before``, rewires the consumer with
``replace_input_with``, lints the graph and recompiles the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import fx, nn

from .ops import is_inplace_add

__all__ = ["InsertionPoint", "insert_modules", "free_attribute_name"]


@dataclass(frozen=True)
class InsertionPoint:
    """Where a module goes: it reads ``tail`` and ``consumer`` reads it instead of ``tail``.

    Attributes:
        tail: the node whose output the new module takes.
        consumer: a user of ``tail`` (the residual add, or a drop-path in front of it).
        name: attribute name for the new module (see :func:`free_attribute_name`).
        module: the module to insert.
        also: more users of ``tail`` that read the module instead, after ``consumer`` in the graph
            (``position="post"``: every reader of a block's output; ``"pre"``: of its input).
    """

    tail: fx.Node
    consumer: fx.Node
    name: str
    module: nn.Module
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
    for point in points:
        for reader in (point.consumer, *point.also):
            if point.tail not in reader.all_input_nodes:
                raise ValueError(f"{reader.format_node()} does not read {point.tail.format_node()}")
        if point.name in dict(gm.named_children()):
            raise ValueError(f"{type(gm).__name__} already has a submodule named {point.name!r}")

    position = {n: i for i, n in enumerate(graph.nodes)}
    created: dict[str, fx.Node] = {}
    for point in points:
        if getattr(gm, point.name, None) is None and hasattr(gm, point.name):
            delattr(gm, point.name)  # a placeholder attribute such as timm's `self.se = None`
        gm.add_submodule(point.name, point.module)
        with graph.inserting_before(point.consumer):
            node = graph.call_module(point.name, (point.tail,))
        for reader in (point.consumer, *point.also):
            reader.replace_input_with(point.tail, node)
        if is_inplace_add(point.consumer) and point.consumer.args[0] is node:
            later = [u for u in point.tail.users if position.get(u, -1) > position[point.consumer]]
            for user in later:
                user.replace_input_with(point.tail, point.consumer)
        created[point.name] = node
    graph.lint()
    gm.recompile()
    return created
