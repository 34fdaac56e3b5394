"""Whether a residual block already has channel attention.

By module: SE / ESE / ECA / CBAM / GE / GC / SK / SplitAttn modules (timm's, torchvision's
``SqueezeExcitation``, se_inject's own ``SEBlock``) on the branch, called as leaves or holding
branch nodes in their ``nn_module_stack``. By pattern: a product of two data tensors where one
operand, walked back through shape ops and scalar scaling, is a sigmoid / hard-sigmoid / softmax
gate on a tensor at least 4x smaller than the product (a pooled, per-channel gate). Softmax split
attention (SK, ResNeSt) counts: it reweights channels from pooled statistics, as SE would. After
the add: an attention module reading the add, or the one activation that reads it (where
``position="post"`` puts it); on the shortcut, :mod:`se_inject.sites.shortcut` reports it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import fx

from ..trace import ops
from .graph_index import GraphIndex, shape_of

__all__ = ["find_attention"]


def _numel(node: fx.Node) -> int:
    shape = shape_of(node)
    return math.prod(shape) if shape is not None else 0


def _walk_shape_ops(g: GraphIndex, node: fx.Node) -> list[fx.Node]:
    """``node`` and what it was made from through shape ops and scaling by a constant."""
    chain = [node]
    while True:
        cur = chain[-1]
        name = ops.target_name(cur.target) if cur.op in ("call_function", "call_method") else None
        scalar_scale = ops.is_mul(cur) and len(g.data_inputs(cur)) == 1
        source = g.first_data_input(cur)
        if not (name in ops.SHAPE_OPS or scalar_scale) or source is None:
            return chain
        chain.append(source)


def _gate_behind(g: GraphIndex, chain: list[fx.Node]) -> Optional[fx.Node]:
    """The sigmoid / hard-sigmoid / softmax node at the end of ``chain``, if it is one."""
    last = chain[-1]
    m = g.module(last)
    if (m is not None and ops.is_gate_module(m)) or ops.is_gate_call(last.op, last.target):
        return last
    return None


def _attention_module(g: GraphIndex, add: fx.Node, branch_nodes: Sequence[fx.Node]) -> Optional[str]:
    outer = set(add.meta.get("nn_module_stack", {}))
    for node in branch_nodes:
        m = g.module(node)
        if m is not None and isinstance(m, ops.ATTENTION_TYPES):
            return f"{type(m).__name__} at {node.target}"
        for key, (path, cls) in node.meta.get("nn_module_stack", {}).items():
            if key not in outer and isinstance(cls, type) and issubclass(cls, ops.ATTENTION_TYPES):
                return f"{cls.__name__} at {path}"
    return None


def _gated_product(g: GraphIndex, branch_nodes: Sequence[fx.Node]) -> Optional[str]:
    for node in branch_nodes:
        if not g.is_data_product(node):
            continue
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        full = max((_numel(a) for a in operands), default=0)
        for operand in operands:
            chain = _walk_shape_ops(g, operand)
            gate = _gate_behind(g, chain)
            smallest = min((s for s in map(_numel, chain) if s > 0), default=0)
            if gate is not None and 4 * smallest <= full:
                return f"a gated product at {node.name} (gate {gate.name})"
    return None


def _readers(g: GraphIndex, node: fx.Node) -> list[fx.Node]:
    """What reads ``node``'s result: its users, and for an in-place add, later users of its target."""
    readers = list(node.users)
    if ops.is_inplace_add(node) and node.args and isinstance(node.args[0], fx.Node):
        readers += [u for u in node.args[0].users if u is not node and g.position[u] > g.position[node]]
    return readers


def _after_add(g: GraphIndex, add: fx.Node) -> Optional[str]:
    """An attention module that is the add's only reader, or the only reader of the one activation
    that reads the add: where ``apply(position="post")`` puts it."""
    node = add
    for _ in range(2):
        readers = _readers(g, node)
        if len(readers) != 1:
            return None
        node = readers[0]
        m = g.module(node)
        if m is not None and isinstance(m, ops.ATTENTION_TYPES):
            return f"{type(m).__name__} at {node.target} after {add.name}"
        if not ((m is not None and ops.is_activation_module(m)) or ops.is_activation_call(node.op, node.target)):
            return None
    return None


def find_attention(g: GraphIndex, add: fx.Node, branch_nodes: Sequence[fx.Node]) -> Optional[str]:
    """A description of the channel attention found on the branch of ``add`` or right after it
    (after its activation), or None. Attention on the shortcut is found by
    :func:`se_inject.sites.shortcut.shortcut_problem`."""
    return _attention_module(g, add, branch_nodes) or _gated_product(g, branch_nodes) or _after_add(g, add)
