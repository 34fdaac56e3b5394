"""A structural index of a traced graph: node order, ancestors, and which nodes carry data.

Ancestor sets are Python ints used as bitsets (bit ``i`` is the ``i``-th node), so "is ``a`` an
ancestor of ``b``" is O(1) and building the index is linear in the graph size. A node *carries
data* when it depends on a placeholder (the module's inputs): parameters, buffers and constants
do not, which is how a bias add is told from a residual add.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..trace import ops

__all__ = ["GraphIndex", "tensor_meta", "shape_of"]


def tensor_meta(node: Any) -> Optional[TensorMetadata]:
    """The ``tensor_meta`` a shape pass recorded on ``node`` (None for non-tensors or non-nodes)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if isinstance(meta, TensorMetadata) else None


def shape_of(node: Any) -> Optional[tuple[int, ...]]:
    """The shape of ``node``'s tensor output, or None."""
    meta = tensor_meta(node)
    return tuple(int(s) for s in meta.shape) if meta is not None else None


class GraphIndex:
    """Per-graph lookups shared by every add: modules, order, ancestor bitsets, data-ness.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
        >>> index = GraphIndex(gm)
        >>> x, conv, relu, out = index.nodes
        >>> index.reaches(x, relu), index.reaches(relu, x), index.is_data[conv]
        (True, False, True)
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.modules = dict(gm.named_modules())
        self.nodes = list(gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self._ancestors: list[int] = []
        self.is_data: dict[fx.Node, bool] = {}
        for n in self.nodes:
            bits, data = 0, n.op == "placeholder"
            for inp in n.all_input_nodes:
                i = self.position[inp]
                bits |= self._ancestors[i] | (1 << i)
                data = data or self.is_data[inp]
            self._ancestors.append(bits)
            self.is_data[n] = data

    def reaches(self, a: fx.Node, b: fx.Node) -> bool:
        """Whether ``a`` is ``b`` or one of its ancestors."""
        return a is b or bool((self._ancestors[self.position[b]] >> self.position[a]) & 1)

    def between(self, fork: fx.Node, end: fx.Node) -> list[fx.Node]:
        """Nodes after ``fork`` on some path from ``fork`` to ``end`` (``end`` included)."""
        lo, hi = self.position[fork], self.position[end]
        return [n for n in self.nodes[lo + 1 : hi + 1] if self.reaches(fork, n) and self.reaches(n, end)]

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        """The module a ``call_module`` node calls (None for other nodes)."""
        return self.modules.get(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The inputs of ``node`` that carry data."""
        return [i for i in node.all_input_nodes if self.is_data[i]]

    def first_data_input(self, node: fx.Node) -> Optional[fx.Node]:
        """The first input carrying data from the graph's inputs (not a parameter, not a shape)."""
        for inp in node.all_input_nodes:
            if self.is_data[inp] and tensor_meta(inp) is not None:
                return inp
        data = self.data_inputs(node)
        return data[0] if data else None

    def is_data_product(self, node: fx.Node) -> bool:
        """A product of two data tensors (a gate), as opposed to scaling by a constant."""
        return ops.is_mul(node) and len([a for a in node.args if isinstance(a, fx.Node) and self.is_data[a]]) >= 2

    def is_nonlinear(self, node: fx.Node) -> bool:
        """An activation, a leaf that is not a primitive layer, or a product of two data tensors."""
        return ops.is_nonlinear(node, self.module(node)) or self.is_data_product(node)

    def is_conv_like(self, node: fx.Node) -> bool:
        """A conv, linear or matmul (see :func:`se_inject.trace.ops.is_conv_like`)."""
        return ops.is_conv_like(node, self.module(node))

    def label(self, node: fx.Node) -> str:
        """A short label of what ``node`` does: the module's class name, or the call's name."""
        m = self.module(node)
        return type(m).__name__ if m is not None else str(ops.target_name(node.target))
