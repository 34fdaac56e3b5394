"""Find the residual adds of a traced graph: which operand is the branch, which the shortcut.

:func:`classify_adds` is a pure function over a ``GraphModule`` whose nodes carry shapes
(``node.meta["tensor_meta"]``, from :class:`se_inject.trace.scopes.ShapeRecorder` or torch's
``ShapeProp``). For every add it returns either a :class:`ResidualAdd` (where an SE block goes)
or a :class:`SkippedAdd` with a reason code from :data:`se_inject.plan.SKIP_REASONS`. The rules,
and why each exists, are in docs/how-it-works.md ("What counts as a residual add"). In short, an add
``a + b`` is residual when:

* both operands are floating tensors of one shape, with spatial dims and the batch at dim 0;
* walking back from one operand (the shortcut) along its first data input reaches an ancestor of
  the other (the fork) through linear ops only (:mod:`se_inject.sites.shortcut`);
* the other operand (the branch) holds a conv or linear *and* a nonlinearity between the fork and
  the add;
* the branch's channel dim is proven to be dim 1 (:mod:`se_inject.sites.channel_axis`);
* the branch holds no channel attention yet (:mod:`se_inject.sites.existing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import fx

from ..trace import ops
from .channel_axis import ChannelAxes, read_by_channels_last_norm
from .existing import find_attention
from .graph_index import GraphIndex, shape_of, tensor_meta
from .shortcut import SHORTCUT_PROBLEMS, shortcut_problem, trailing_regularizers

__all__ = ["ResidualAdd", "SkippedAdd", "Verdict", "classify_adds"]


@dataclass(frozen=True)
class ResidualAdd:
    """A residual add where an SE block goes.

    Attributes:
        add: the add node.
        branch_index: position (0 or 1) of the branch operand in the add.
        branch: the branch operand; ``shortcut`` the other one; ``fork`` where they split.
        tail: the node whose output the SE block takes (the branch output before trailing
            drop-path / dropout / identity modules, which stay after SE as in timm's SE-ResNets).
        consumer: the node that reads ``tail`` and will read the SE output instead.
        channels: channel count C at the site; ``shape`` the full tensor shape.
        shortcut_ops: short labels of the ops on the shortcut path (empty for identity).
        scope_keys: ``nn_module_stack`` keys of the modules holding the whole block (the fork
            excluded), outermost first; the last one is the block the SE block goes into.
    """

    add: fx.Node
    branch_index: int
    branch: fx.Node
    shortcut: fx.Node
    fork: fx.Node
    tail: fx.Node
    consumer: fx.Node
    channels: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    shortcut_ops: tuple[str, ...]
    scope_keys: tuple[str, ...]


@dataclass(frozen=True)
class SkippedAdd:
    """An add that gets no SE block, with a reason code (a key of :data:`SKIP_REASONS`)."""

    add: fx.Node
    reason: str
    detail: str
    scope_keys: tuple[str, ...]


Verdict = Union[ResidualAdd, SkippedAdd]


@dataclass(frozen=True)
class _Orientation:
    """One way of reading an add: ``branch + shortcut``, and what is wrong with it, if anything."""

    branch_index: int
    branch: fx.Node
    shortcut: fx.Node
    fork: fx.Node
    path: tuple[fx.Node, ...]  # the shortcut path, from the shortcut operand back to the fork
    branch_nodes: tuple[fx.Node, ...]
    problem: Optional[tuple[str, str]]  # (reason code, detail)

    @property
    def rank(self) -> tuple[int, int]:
        """Sort key: a valid orientation first; among invalid ones, the one whose shortcut passed
        (so the reason names what is wrong with the branch whichever way round the add is
        written); then the shorter shortcut."""
        kind = 0 if self.problem is None else 2 if self.problem[0] in SHORTCUT_PROBLEMS else 1
        return kind, len(self.path)


def _stack_keys(node: fx.Node) -> list[str]:
    return list(node.meta.get("nn_module_stack", {}).keys())


def _common_prefix(stacks: Sequence[list[str]]) -> tuple[str, ...]:
    prefix: list[str] = []
    for keys in zip(*stacks):
        if any(k != keys[0] for k in keys):
            break
        prefix.append(keys[0])
    return tuple(prefix)


def _orientation(g: GraphIndex, branch: fx.Node, shortcut: fx.Node, branch_index: int) -> Optional[_Orientation]:
    """Walk back from ``shortcut`` to the fork; None if it never reaches an ancestor of ``branch``."""
    path: list[fx.Node] = []
    cur: Optional[fx.Node] = shortcut
    while cur is not None and not g.reaches(cur, branch):
        path.append(cur)
        cur = g.first_data_input(cur)
    if cur is None:
        return None
    branch_nodes = g.between(cur, branch)
    problem = shortcut_problem(g, path)
    if problem is None and not any(g.is_conv_like(n) for n in branch_nodes):
        problem = ("no-conv-branch", f"branch {branch.name} has no conv or linear")
    elif problem is None and not any(g.is_nonlinear(n) for n in branch_nodes):
        problem = ("linear-branch", f"branch {branch.name} has only linear ops")
    return _Orientation(branch_index, branch, shortcut, cur, tuple(path), tuple(branch_nodes), problem)


def _operands(add: fx.Node) -> tuple[Any, Any]:
    operands = ops.add_operands(add)
    assert operands is not None, add.format_node()
    return operands


def _operand_problem(g: GraphIndex, add: fx.Node, batch_size: Optional[int]) -> Optional[tuple[str, str]]:
    """Why the operands of ``add`` cannot be a residual pair (reason, detail), or None."""
    a, b = _operands(add)
    meta_a, meta_b = tensor_meta(a), tensor_meta(b)
    if meta_a is None or meta_b is None or not (g.is_data[a] and g.is_data[b]):
        return "scalar", add.format_node()
    shape_a, shape_b = shape_of(a), shape_of(b)
    if shape_a != shape_b:
        return "broadcast", f"{list(shape_a)} + {list(shape_b)}"
    if len(shape_a) < 3:
        return "no-spatial-dims", f"shape {list(shape_a)}"
    if batch_size is not None and shape_a[0] != batch_size:
        return "batch-dim", f"shape {list(shape_a)}, batch size {batch_size}"
    if not meta_a.dtype.is_floating_point:
        return "not-float", f"dtype {meta_a.dtype}"
    return None


def _channel_problem(axes: ChannelAxes, o: _Orientation, shape: tuple[int, ...]) -> Optional[tuple[str, str]]:
    """Why SE cannot squeeze dim 1 of the branch (reason, detail), or None when dim 1 is proven."""
    axis, stream = axes.axis(o.branch), axes.axis(o.fork)
    fork_rank = len(shape_of(o.fork) or ())
    if axis is None:
        if (stream is not None and stream[0] == fork_rank - 1) or read_by_channels_last_norm(axes.index, o.fork):
            return "channels-last", f"the residual stream {o.fork.name} has its channels last"
        return "channel-dim-unknown", f"no conv, linear or norm found that fixes the channel dim of {o.branch.name}"
    if axis[0] != 1 or axis[1] != shape[1]:
        return "channels-last", f"channels ({axis[1]}) at dim {axis[0]} of {list(shape)}"
    if stream is not None and fork_rank == len(shape) and stream[0] != 1:
        # The branch's last layer makes features at dim 1, but the stream it adds to keeps its
        # channels elsewhere: the branch mixes tokens or positions (MLP-Mixer's token MLP).
        return "channels-last", (f"the branch's features are at dim 1 but the residual stream {o.fork.name} "
                                 f"has its channels at dim {stream[0]} (token mixing)")
    return None


def _classify(g: GraphIndex, axes: ChannelAxes, add: fx.Node, batch_size: Optional[int]) -> Verdict:
    problem = _operand_problem(g, add, batch_size)
    if problem is not None:
        return SkippedAdd(add, *problem, tuple(_stack_keys(add)))
    a, b = _operands(add)
    orientations = [o for o in (_orientation(g, b, a, 1), _orientation(g, a, b, 0)) if o is not None]
    if not orientations:
        return SkippedAdd(add, "no-common-input", f"{a.name} and {b.name} come from different inputs",
                          tuple(_stack_keys(add)))
    o = min(orientations, key=lambda o: o.rank)
    keys = _common_prefix([_stack_keys(n) for n in (add, *o.path, *o.branch_nodes)])
    shape, meta = shape_of(a), tensor_meta(a)
    assert shape is not None and meta is not None
    problem = o.problem or _channel_problem(axes, o, shape)
    if problem is None:
        attention = find_attention(g, add, o.branch_nodes)
        problem = ("has-attention", attention) if attention is not None else None
    if problem is not None:
        return SkippedAdd(add, *problem, keys)
    tail, consumer = trailing_regularizers(g, add, o.branch)
    return ResidualAdd(
        add=add, branch_index=o.branch_index, branch=o.branch, shortcut=o.shortcut, fork=o.fork, tail=tail,
        consumer=consumer, channels=int(shape[1]), shape=shape, dtype=meta.dtype,
        shortcut_ops=tuple(g.label(n) for n in reversed(o.path)), scope_keys=keys,
    )


def classify_adds(gm: fx.GraphModule, *, batch_size: Optional[int] = None) -> list[Verdict]:
    """Classify every add of ``gm``'s graph, in graph order.

    Args:
        gm: a traced module whose nodes carry ``tensor_meta`` (run ``ShapeRecorder`` or
            ``torch.fx.passes.shape_prop.ShapeProp`` first).
        batch_size: the batch size of the example input; adds whose dim 0 differs are skipped.

    Returns:
        One :class:`ResidualAdd` or :class:`SkippedAdd` per add node.

    Example:
        >>> import torchvision
        >>> from se_inject.trace.scopes import ShapeRecorder
        >>> from se_inject.trace.tracer import trace
        >>> gm = trace(torchvision.models.resnet18().eval())
        >>> _ = ShapeRecorder(gm).run(torch.randn(1, 3, 64, 64))
        >>> verdicts = classify_adds(gm, batch_size=1)
        >>> sum(isinstance(v, ResidualAdd) for v in verdicts)
        8
    """
    g = GraphIndex(gm)
    axes = ChannelAxes(g)
    verdicts: list[Verdict] = []
    for n in g.nodes:
        if ops.add_operands(n) is not None:
            verdicts.append(_classify(g, axes, n, batch_size))
        elif isinstance(g.module(n), ops.ATTENTION_TYPES) and len(n.args) == 2:  # SE that does its add
            verdicts.append(SkippedAdd(n, "has-attention", f"{type(g.module(n)).__name__} at {n.target}, "
                                                           f"which does the residual add itself",
                                       tuple(_stack_keys(n))))
    return verdicts
