"""Where each ``position`` puts the attention module in a residual block's graph.

A residual add ``branch + shortcut`` (:class:`se_inject.sites.classify.ResidualAdd`) has a *fork*, where
the block's input splits into the branch and the shortcut. The five positions are the placements
of the SE paper's integration study (Hu et al., TPAMI version of arXiv:1709.01507, Sec. 6.5):

============  ===========================================================  ==========================================
position      the module reads                                             and what read that reads the module instead
============  ===========================================================  ==========================================
``branch``    the branch output, before trailing drop-path / dropout /     the add (or the first trailing regulariser)
              identity modules (the paper's standard SE block)
``pre``       the fork: the branch's input (SE-PRE)                        the fork's readers on the branch only; the
                                                                           shortcut still reads the un-attended fork
``post``      the activation that is the add's only reader, when that      every reader of it inside the block: the
              activation is inside the block; otherwise the add itself     block's output (SE-POST)
              (the paper puts SE-POST "after ReLU")
``identity``  the shortcut operand: after the projection (1x1 conv + norm) the add (SE-Identity)
              when there is one, else the fork itself
``mid``       the end of the chain that follows the branch's last spatial   the 1x1 conv that ends the chain (SE_3x3):
              (k>1) conv through norms, activations, identity / dropout /  the bottleneck's 3x3, timm's byobnet
              drop-block modules and pooling                               ``attn`` slot
============  ===========================================================  ==========================================

A branch without that mid shape (a basic block's two 3x3 convs, ConvNeXt's channels-last MLP
after its depthwise conv) gets nothing at ``mid``, with the reason ``no-mid-point``.
:func:`locate` finds the place in a scope's graph; :meth:`Place.resolve` finds it again in
the graph of the block cut out of that scope, where the module is inserted.

Where in-place ops touch the tensor the module reads, a place must still read what the block
reads (:mod:`se_inject.sites.aliasing`). ``pre`` moves past the in-place ops the branch starts with
(a pre-activation ``nn.ReLU(inplace=True)`` on the block input writes the tensor the shortcut
reads too, so the fork is its result); ``pre`` and ``identity`` are refused (``in-place-write``)
where an in-place op would then write the module's output instead of the tensor others read, or
write the tensor between the readers the module takes over. ``branch``, ``mid`` and ``post``
cannot meet either case: their module takes over every reader of a tensor read once (``mid``, and
``branch`` but for the in-place add, whose later readers the insertion rewires), or every reader
of the block's output (``post``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import fx

from ..trace import ops
from . import aliasing
from .classify import ResidualAdd
from .graph_index import GraphIndex, shape_of, tensor_meta

__all__ = ["Place", "locate", "describe"]


@dataclass(frozen=True)
class Place:
    """Where the module of one residual add goes, in its scope's graph.

    Attributes:
        position: one of :data:`~se_inject.options.POSITIONS`.
        tail: the node the module reads (``post``: the add; the activation after it, if any, is
            found in the block's graph).
        consumer: the node that reads the module instead of ``tail`` (None for ``pre`` and
            ``post``, whose readers are found in the block's graph).
        branch: the branch operand (``pre``: the fork's readers that lead to it).
        channels, shape, dtype: of the tensor the module takes.
        moved: ``pre``: the in-place ops on the fork the branch starts with, which ``tail`` is
            the last of (see :func:`se_inject.sites.aliasing.past_writes`).
    """

    position: str
    tail: fx.Node
    consumer: Optional[fx.Node]
    branch: fx.Node
    channels: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    moved: tuple[fx.Node, ...] = ()

    def resolve(self, env: dict[fx.Node, fx.Node], collapsed: set[fx.Node], gm: fx.GraphModule
                ) -> Optional[tuple[fx.Node, list[fx.Node]]]:
        """(tail, readers) in the block's graph ``gm`` (``env`` maps scope nodes to its nodes);
        None when the place is not inside the block. Readers come in graph order."""
        tail = env.get(self.tail)
        if tail is None or any(op not in env for op in self.moved):
            return None
        for op in self.moved:  # later reads of the fork read what the in-place op made of it
            _read_result_of_inplace(gm, env[op])
        index = GraphIndex(gm)
        if self.position == "pre":
            branch = env.get(self.branch)
            readers = [u for u in tail.users if branch is not None and index.reaches(u, branch)]
        elif self.position == "post":
            _read_result_of_inplace(gm, tail)
            readers = list(tail.users)
            if len(readers) == 1 and _is_activation(gm, readers[0]):
                tail = readers[0]
                _read_result_of_inplace(gm, tail)
                readers = list(tail.users)
        else:
            consumer = env.get(self.consumer)  # type: ignore[arg-type]
            readers = [consumer] if consumer is not None and self.consumer not in collapsed else []
        if not readers:
            return None
        return tail, sorted(readers, key=index.position.__getitem__)


def _read_result_of_inplace(gm: fx.GraphModule, node: fx.Node) -> None:
    """``out.add_(x); f(out)``: ``f`` reads the in-place op's result through ``out``. Make it read
    the op's node (the same tensor), so that the op's readers are its users."""
    module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    written = ops.written_input(node, module)
    if written is None:
        return
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    for user in list(written.users):
        if user is not node and order[user] > order[node]:
            user.replace_input_with(written, node)


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return ops.is_activation_module(gm.get_submodule(str(node.target)))
    return ops.is_activation_call(node.op, node.target)


def _kernel(g: GraphIndex, node: fx.Node) -> Optional[int]:
    m = g.module(node)
    return math.prod(m.kernel_size) if isinstance(m, ops.CONV_TYPES) else None


def _passes_channels_through(g: GraphIndex, node: fx.Node) -> bool:
    """A norm over dim 1, an activation, an identity / dropout / drop-block, or pooling."""
    m = g.module(node)
    if m is None:
        return ops.is_activation_call(node.op, node.target) or ops.is_regularizer(node, None)
    if isinstance(m, ops.NORM_TYPES):
        axis = ops.module_channel_axis(m, shape_of(node) or ())
        return axis is not None and axis[0] == 1
    return ops.is_activation_module(m) or isinstance(m, ops.REGULARIZER_TYPES) or ops.is_pool_module(m)


def _mid(g: GraphIndex, v: ResidualAdd) -> Union[tuple[fx.Node, fx.Node], tuple[str, str]]:
    """(tail, 1x1 conv) after the branch's last k>1 conv, or (reason, detail)."""
    spatial = [n for n in g.between(v.fork, v.branch) if (_kernel(g, n) or 1) > 1]
    if not spatial:
        return "no-mid-point", f"the branch of {v.add.name} has no conv with a kernel larger than 1"
    conv = cur = spatial[-1]
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return "no-mid-point", f"after {g.label(conv)} ({conv.name}), {cur.name} has {len(users)} readers"
        nxt = users[0]
        if _kernel(g, nxt) == 1:
            return cur, nxt
        if not _passes_channels_through(g, nxt):
            return "no-mid-point", (f"after {g.label(conv)} ({conv.name}) comes {g.label(nxt)} ({nxt.name}), "
                                    f"not a norm, activation or 1x1 conv")
        cur = nxt


def locate(g: GraphIndex, v: ResidualAdd, position: str) -> Union[Place, tuple[str, str]]:
    """Where ``position`` puts the module of residual add ``v`` in the scope graph indexed by ``g``,
    or (reason code, detail) when the block has no such place."""
    consumer: Optional[fx.Node]
    moved: tuple[fx.Node, ...] = ()
    problem: Optional[str] = None
    if position == "branch":
        tail, consumer = v.tail, v.consumer
    elif position == "identity":
        tail, consumer = v.shortcut, v.add
        problem = aliasing.write_problem(g, tail, [v.add], rewired=_rewired_by_insertion(v))
    elif position == "post":
        tail, consumer = v.add, None
    elif position == "pre":
        tail, readers, moved = aliasing.past_writes(g, v.fork, v.branch)
        consumer, problem = None, aliasing.write_problem(g, tail, readers)
    elif position == "mid":
        found = _mid(g, v)
        if isinstance(found[0], str):
            return found  # type: ignore[return-value]
        tail, consumer = found  # type: ignore[assignment]
    else:
        raise ValueError(position)
    if problem is not None:
        return "in-place-write", f"position={position!r}: {problem}"
    shape, meta = shape_of(tail), tensor_meta(tail)
    if shape is None or meta is None or len(shape) != len(v.shape) or not meta.dtype.is_floating_point:
        return "channel-dim-unknown", f"position={position!r}: {tail.name} is not a float tensor shaped like the add"
    return Place(position, tail, consumer, v.branch, int(shape[1]), shape, meta.dtype, moved)


def _rewired_by_insertion(v: ResidualAdd) -> Optional[Callable[[fx.Node], bool]]:
    """Where the add writes the shortcut in place (``shortcut.add_(branch)``), the insertion makes
    the shortcut's later readers inside the block read the add's result
    (:func:`se_inject.rewrite.insert_pass.insert_modules`): those see the write."""
    if not (ops.is_inplace_add(v.add) and v.add.args[0] is v.shortcut):
        return None
    key = v.scope_keys[-1] if v.scope_keys else None
    return lambda n: n in v.shortcut.users and (key is None or key in n.meta.get("nn_module_stack", {}))


def describe(tail: fx.Node, readers: list[fx.Node]) -> str:
    """``"bn3 -> add"``: what the module reads and what reads it, by module path or function name."""
    def label(n: fx.Node) -> str:
        if n.op in ("placeholder", "output"):
            return "input" if n.op == "placeholder" else "output"
        return str(n.target) if n.op == "call_module" else str(ops.target_name(n.target) or n.name)
    return f"{label(tail)} -> {', '.join(label(r) for r in readers)}"
