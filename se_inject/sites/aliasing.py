"""Does a module put between a tensor and its readers read what they read?

A placement (:mod:`se_inject.sites.placement`) inserts the attention module right before the first of
the *readers* it takes over, and they read the module's output, a new tensor, instead of the
*tail*. Without in-place ops that changes nothing but the values SE scales. With them it can
change what the block computes, and fx records the graph faithfully, so no comparison of the
traced graph with the module sees it:

* a reader that writes the tail in place (``nn.ReLU(inplace=True)`` on a pre-activated block's
  input) wrote the tensor the shortcut reads afterwards; rewired, it writes the module's output,
  and the shortcut reads the tensor before the write;
* an op that writes the tail between two readers changed what the later reader sees; rewired,
  that reader sees the module's output, computed before the write;
* a reader that takes a view of the tail, written through afterwards, is the first case again.

:func:`past_writes` moves ``position="pre"`` past the in-place ops the branch starts with (what
the block reads, its shortcut included, is their result); :func:`write_problem` says why a
placement would not read what the block reads, for the cases left. Both work on a scope's
:class:`~se_inject.sites.graph_index.GraphIndex`. In-place ops are recognised by
:func:`se_inject.trace.ops.written_input`, views by :func:`se_inject.trace.ops.is_view`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from torch import fx

from ..trace import ops
from .graph_index import GraphIndex, shape_of

__all__ = ["past_writes", "write_problem"]


def _name(node: fx.Node) -> str:
    """A node as the messages name it: a module call by its path, the input, or the node's name."""
    if node.op == "call_module":
        return str(node.target)
    return "the input" if node.op == "placeholder" else node.name


def _op(g: GraphIndex, node: fx.Node) -> str:
    """An op as the messages name it: ``ReLU 1.act0`` for a module, the node's name otherwise."""
    return f"{g.label(node)} {node.target}" if node.op == "call_module" else node.name


def _written(g: GraphIndex, node: fx.Node) -> Optional[fx.Node]:
    return ops.written_input(node, g.module(node))


def _shares_memory(g: GraphIndex, node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node``'s result shares ``source``'s memory: a view of it, or an op that wrote it
    in place and returned it (``setitem`` returns None)."""
    if ops.is_view(node) and node.args[0] is source:
        return True
    return _written(g, node) is source and shape_of(node) == shape_of(source)


def _base(g: GraphIndex, node: fx.Node) -> fx.Node:
    """The tensor whose memory ``node``'s result is: back through views and in-place results."""
    while True:
        written = _written(g, node)
        source = written if written is not None else node.args[0] if ops.is_view(node) else None
        if not isinstance(source, fx.Node) or not _shares_memory(g, node, source):
            return node
        node = source


def _aliases(g: GraphIndex, start: fx.Node, stop: Iterable[fx.Node] = ()) -> list[fx.Node]:
    """``start`` and the nodes whose results share its memory, forward through views and in-place
    results, not past ``stop``; in graph order."""
    stopped, found, todo = set(stop), [start], [start]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user not in stopped and user not in found and _shares_memory(g, user, node):
                found.append(user)
                todo.append(user)
    return sorted(found, key=g.position.__getitem__)


def _writes(g: GraphIndex, nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """The readers of ``nodes`` that write one of them in place."""
    return [u for n in nodes for u in n.users if _written(g, u) is n]


def _branch_readers(g: GraphIndex, nodes: Iterable[fx.Node], branch: fx.Node, after: int) -> list[fx.Node]:
    readers = {u for n in nodes for u in n.users if g.position[u] > after and g.reaches(u, branch)}
    return sorted(readers, key=g.position.__getitem__)


def past_writes(g: GraphIndex, fork: fx.Node, branch: fx.Node) -> tuple[fx.Node, list[fx.Node], tuple[fx.Node, ...]]:
    """Where ``position="pre"`` reads: (tail, its readers on the branch, in graph order, and the
    in-place ops moved past, in order).

    The tail is the fork, or, where the branch's first reader of it writes it in place and
    returns it (a pre-activation ``nn.ReLU(inplace=True)``), that op's result: both operands of
    the add read the written tensor, so that is what the block reads. Later branch readers of the
    fork read it too (the same memory); the block's graph makes them read the op's node.
    """
    tail, chain, after = fork, (), -1
    readers = _branch_readers(g, [fork], branch, after)
    while readers and _written(g, readers[0]) is tail and shape_of(readers[0]) == shape_of(tail):
        after = g.position[readers[0]]
        chain += (readers[0],)
        tail = readers[0]
        readers = _branch_readers(g, [fork, *chain], branch, after)
    return tail, readers, chain


def write_problem(g: GraphIndex, tail: fx.Node, readers: list[fx.Node], *,
                  rewired: Optional[Callable[[fx.Node], bool]] = None) -> Optional[str]:
    """Why a module read right before ``readers[0]``, whose output ``readers`` read instead of
    ``tail``, would not read or leave what the block's ops read (see the module docstring); None
    when it would.

    ``rewired(node)``: later readers of the tail that the insertion makes read the result of an
    in-place add it takes over (:func:`se_inject.rewrite.insert_pass.insert_modules` does that for the
    add it reads into), which therefore see the write.
    """
    if not readers:
        return None
    taken = set(readers)
    first, last = g.position[readers[0]], g.position[readers[-1]]
    memory = _aliases(g, _base(g, tail), stop=taken)  # what shares the tail's memory, as the block runs
    shared = set(memory)
    for reader in readers:
        if _written(g, reader) in shared:
            at = g.position[reader]
            later = sorted({n for m in memory for n in (m, *m.users) if g.position[n] > at and n not in taken
                            and not (rewired is not None and rewired(n))}, key=g.position.__getitem__)
            if later or memory[0].op == "placeholder":
                seen_by = f"{_name(later[0])} reads it afterwards" if later else "the caller may read it afterwards"
                return (f"{_op(g, reader)} writes {_name(tail)} in place and {seen_by}; with the "
                        f"module before it, it would write the module's output instead")
        elif ops.is_view(reader) and _writes(g, _aliases(g, reader)):
            return (f"{_name(reader)} is a view of {_name(tail)} that is written in place afterwards; with the "
                    f"module before it, the write would go to the module's output instead")
    for write in _writes(g, memory):
        if write not in taken and first < g.position[write] < last:
            return (f"{_op(g, write)} writes {_name(_written(g, write))} in place between the "
                    f"readers the module takes over; the later ones would not see the write")
    return None
