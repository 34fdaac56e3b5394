"""Find the residual adds of a traced graph: which operand is the branch, which the shortcut.

:func:`classify_adds` is a pure function over a ``GraphModule`` whose nodes carry shapes
(``node.meta["tensor_meta"]``, from :class:`se_inject.scopes.ShapeRecorder` or torch's ``ShapeProp``). For every add it
returns either a :class:`ResidualAdd` (where an SE block goes) or a :class:`SkippedAdd` with a
reason code from :data:`SKIP_REASONS`. The rules, and why each exists, are in the README
("What counts as a residual add"). In short, an add ``a + b`` is residual when:

* both operands are floating tensors of one shape, with spatial dims and the batch at dim 0;
* walking back from one operand (the shortcut) along its first data input reaches an ancestor of
  the other (the fork) through linear ops only: identity, norm, pooling, dropout / drop-path,
  scaling, and at most one projection (a 1x1 conv, optionally with a depthwise conv);
* the other operand (the branch) holds a conv or linear *and* a nonlinearity between the fork and
  the add;
* the branch's channel dim is proven to be dim 1, by following the last conv / linear / norm
  through permutes and reshapes (anything unproven is skipped, never guessed);
* the branch holds no channel attention yet (SE / ECA / SK modules, or a product with a pooled,
  sigmoid- or softmax-gated tensor).

Ancestor sets are Python ints used as bitsets, so the analysis stays linear in the graph size.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from . import ops

__all__ = ["ResidualAdd", "SkippedAdd", "SKIP_REASONS", "classify_adds", "add_operands"]

#: Why an add gets no SE block: reason code -> explanation (shown by the dry run and the report).
SKIP_REASONS: dict[str, str] = {
    "scalar": "an operand is a constant: a scalar, parameter or buffer (bias, embedding, eps)",
    "broadcast": "operand shapes differ (broadcast add: bias, position embedding, eps)",
    "no-spatial-dims": "fewer than 3 dims, so nothing to squeeze",
    "batch-dim": "dim 0 is not the batch size (attention-internal add)",
    "not-float": "operands are not floating point",
    "no-common-input": "the operands share no input (not a residual connection)",
    "heavy-paths": "no operand is a light shortcut (merge of two heavy paths, e.g. HRNet fuse)",
    "split-slice": "the shortcut is a slice of a split tensor (hierarchical add, e.g. Res2Net)",
    "no-conv-branch": "the branch has no conv or linear layer (e.g. GRN, pooling mixer)",
    "linear-branch": "the branch has no nonlinearity (parallel linear convs, e.g. RepVGG)",
    "channels-last": "channels are not at dim 1 (channels-last layout: tokens, NHWC)",
    "channel-dim-unknown": "the branch's channel dim could not be proven to be dim 1",
    "has-attention": "the branch already has channel attention",
    "filtered": "left out by include / exclude / min_channels",
    "shared-module": "the block is called more than once (shared weights)",
    "untraceable-block": "the block holding the add cannot be traced on its own",
    "train-eval-differ": "the block traces differently in train and eval mode",
    "unverified": "the traced block does not reproduce the module's output",
}


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


def add_operands(node: fx.Node) -> Optional[tuple[Any, Any]]:
    """The two operands of an add node (``+``, ``+=``, ``torch.add``, ``Tensor.add``/``add_``).

    Returns None for nodes that are not adds, and for ``torch.add`` with an ``alpha``.
    """
    if node.op == "call_function" and node.target in ops.ADD_FUNCTIONS:
        args = list(node.args) + [node.kwargs[k] for k in ("input", "other") if k in node.kwargs]
    elif node.op == "call_method" and node.target in ("add", "add_"):
        args = list(node.args) + [node.kwargs[k] for k in ("other",) if k in node.kwargs]
    else:
        return None
    if node.kwargs.get("alpha", 1) != 1 or len(args) != 2:
        return None
    return args[0], args[1]


def _tensor_meta(node: Any) -> Optional[TensorMetadata]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if isinstance(meta, TensorMetadata) else None


def _shape(node: Any) -> Optional[tuple[int, ...]]:
    meta = _tensor_meta(node)
    return tuple(int(s) for s in meta.shape) if meta is not None else None


def _stack_keys(node: fx.Node) -> list[str]:
    return list(node.meta.get("nn_module_stack", {}).keys())


class _Graph:
    """Per-graph lookups shared by every add: modules, ancestor bitsets, data-ness."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.ancestors: list[int] = []
        self.is_data: dict[fx.Node, bool] = {}
        for n in self.nodes:
            bits = 0
            data = n.op == "placeholder"
            for inp in n.all_input_nodes:
                bits |= self.ancestors[self.index[inp]] | (1 << self.index[inp])
                data = data or self.is_data[inp]
            self.ancestors.append(bits)
            self.is_data[n] = data
        self._axis_memo: dict[fx.Node, Optional[tuple[int, int]]] = {}

    # -- structure -------------------------------------------------------------------------
    def reaches(self, a: fx.Node, b: fx.Node) -> bool:
        """Whether ``a`` is ``b`` or one of its ancestors."""
        return a is b or bool((self.ancestors[self.index[b]] >> self.index[a]) & 1)

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [i for i in node.all_input_nodes if self.is_data[i]]

    def first_data_input(self, node: fx.Node) -> Optional[fx.Node]:
        """The first input carrying data from the graph's inputs (not a parameter, not a shape)."""
        for inp in node.all_input_nodes:
            if self.is_data[inp] and _tensor_meta(inp) is not None:
                return inp
        data = self.data_inputs(node)
        return data[0] if data else None

    def between(self, fork: fx.Node, end: fx.Node) -> list[fx.Node]:
        """Nodes after ``fork`` on some path from ``fork`` to ``end`` (``end`` included)."""
        lo, hi = self.index[fork], self.index[end]
        return [n for n in self.nodes[lo + 1 : hi + 1] if self.reaches(fork, n) and self.reaches(n, end)]

    # -- op kinds --------------------------------------------------------------------------
    def is_conv_like(self, node: fx.Node) -> bool:
        m = self.module(node)
        if m is not None:
            return isinstance(m, ops.CONV_TYPES + ops.LINEAR_TYPES) or ops.module_has_weight_matrix(m)
        if node.op == "call_function" and node.target in ops.CONV_FUNCTIONS:
            return True
        return node.op in ("call_function", "call_method") and ops.target_name(node.target) in ops.MATMUL_NAMES

    def is_nonlinear(self, node: fx.Node) -> bool:
        m = self.module(node)
        if m is not None:
            return ops.is_activation_module(m) or not ops.is_primitive_leaf(m)
        if ops.is_activation_call(node.op, node.target):
            return True
        return self.is_data_product(node)

    def is_data_product(self, node: fx.Node) -> bool:
        """A product of two data tensors (a gate), as opposed to scaling by a constant."""
        if not self._is_mul(node):
            return False
        return len([a for a in node.args if isinstance(a, fx.Node) and self.is_data[a]]) >= 2

    @staticmethod
    def _is_mul(node: fx.Node) -> bool:
        return (node.op == "call_function" and node.target in ops.MUL_TARGETS) or (
            node.op == "call_method" and node.target in ("mul", "mul_")
        )

    # -- channel dim -----------------------------------------------------------------------
    def channel_axis(self, node: fx.Node) -> Optional[tuple[int, int]]:
        """(dim, channel count) of ``node``'s output, proven from the ops that made it."""
        if node not in self._axis_memo:
            self._axis_memo[node] = None  # guards cycles through malformed graphs
            self._axis_memo[node] = self._channel_axis(node)
        return self._axis_memo[node]

    def _channel_axis(self, node: fx.Node) -> Optional[tuple[int, int]]:
        shape = _shape(node)
        if shape is None:
            return None
        parent = self.first_data_input(node)
        m = self.module(node)
        if m is not None:
            found = ops.module_channel_axis(m, shape)
            if found is not None:
                return found
            shape_keeping = (
                isinstance(m, ops.REGULARIZER_TYPES + ops.ATTENTION_TYPES)
                or ops.is_activation_module(m)
                or ops.is_pool_module(m)
            )
            if shape_keeping and parent is not None:
                return self._same_rank_axis(parent, shape)
            return None
        if node.op == "call_function" and node.target in ops.CONV_FUNCTIONS:
            return (len(shape) - 1, shape[-1]) if ops.target_name(node.target) == "linear" else (1, shape[1])
        if node.op not in ("call_function", "call_method") or parent is None:
            return None
        name = ops.target_name(node.target)
        parent_axis = self.channel_axis(parent)
        parent_shape = _shape(parent)
        if parent_axis is None or parent_shape is None:
            return None
        if name in ops.PERMUTING_OPS:
            return self._permuted_axis(node, parent_axis, parent_shape)
        if name in ops.RESHAPING_OPS or name == "flatten":
            return _reshaped_axis(parent_axis, parent_shape, shape)
        if name in ("cat", "concat", "concatenate"):
            return self._concatenated_axis(node, shape)
        if node.target is operator.getitem:
            return _sliced_axis(node, parent_axis, shape)
        # Elementwise or shape-keeping ops: the channel dim is the one of the input of that shape.
        for inp in self.data_inputs(node):
            if _shape(inp) == shape:
                return self.channel_axis(inp)
        return None

    def _concatenated_axis(self, node: fx.Node, shape: tuple[int, ...]) -> Optional[tuple[int, int]]:
        """Through ``cat``: the channel dim of the result is the one all the inputs agree on."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        if not isinstance(tensors, (list, tuple)) or not tensors:
            return None
        axes = {self.channel_axis(t)[0] if isinstance(t, fx.Node) and self.channel_axis(t) else None
                for t in tensors}
        if len(axes) != 1 or None in axes:
            return None
        (axis,) = axes
        return axis, shape[axis]

    def _same_rank_axis(self, parent: fx.Node, shape: tuple[int, ...]) -> Optional[tuple[int, int]]:
        axis = self.channel_axis(parent)
        parent_shape = _shape(parent)
        if axis is None or parent_shape is None or len(parent_shape) != len(shape):
            return None
        return axis if shape[axis[0]] == axis[1] else None

    def _permuted_axis(
        self, node: fx.Node, axis: tuple[int, int], parent_shape: tuple[int, ...]
    ) -> Optional[tuple[int, int]]:
        """Follow the channel dim through permute / transpose / movedim / swapaxes.

        The op is replayed on a meta tensor whose dims have distinct sizes; where the channel
        dim's size lands is where the channel dim went.
        """
        args = node.args[1:] if node.op == "call_method" or isinstance(node.args[0], fx.Node) else node.args
        if any(isinstance(a, fx.Node) for a in _flatten(args) + _flatten(list(node.kwargs.values()))):
            return None
        probe_sizes = [2 + i for i in range(len(parent_shape))]
        probe = torch.empty(probe_sizes, device="meta")
        try:
            moved = getattr(torch.Tensor, ops.target_name(node.target))(probe, *args, **node.kwargs)
        except Exception:  # an unexpected signature: leave the channel dim unproven
            return None
        sizes = list(moved.shape)
        target = probe_sizes[axis[0]]
        return (sizes.index(target), axis[1]) if target in sizes else None


def _flatten(values: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _reshaped_axis(
    axis: tuple[int, int], before: tuple[int, ...], after: tuple[int, ...]
) -> Optional[tuple[int, int]]:
    """Follow the channel dim through a reshape: the same dim is the one of the same size with
    the same number of elements before it (in row-major order, that is the same axis)."""
    dim, channels = axis
    leading = math.prod(before[:dim])
    for d, size in enumerate(after):
        if size == channels and math.prod(after[:d]) == leading:
            return d, channels
    return None


def _sliced_axis(
    node: fx.Node, axis: tuple[int, int], shape: tuple[int, ...]
) -> Optional[tuple[int, int]]:
    """Through basic slicing (``x[:, :c]``, ``x[..., 1:]``): slices keep every dim in place."""
    index = node.args[1] if len(node.args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) or i is Ellipsis for i in items) or list(items).count(Ellipsis) > 1:
        return None
    if any(isinstance(v, fx.Node) for i in items if isinstance(i, slice) for v in (i.start, i.stop, i.step)):
        return None
    return axis[0], shape[axis[0]]


def _reselects_cat_input(node: fx.Node) -> bool:
    """Whether ``node`` is a slice of a ``cat`` that selects exactly one of its inputs."""
    source, index = node.args[0], node.args[1] if len(node.args) > 1 else None
    if not (isinstance(source, fx.Node) and ops.target_name(source.target) in ("cat", "concat")):
        return False
    tensors = source.args[0] if source.args else source.kwargs.get("tensors")
    dim = source.args[1] if len(source.args) > 1 else source.kwargs.get("dim", 0)
    shape = _shape(source)
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
        size = (_shape(t) or (0,) * (dim + 1))[dim]
        if step == 1 and (start, stop) == (offset, offset + size):
            return True
        offset += size
    return False


def _read_by_channels_last_norm(g: _Graph, node: fx.Node) -> bool:
    """Whether a LayerNorm-like norm over the last dim reads ``node`` (a channels-last tensor)."""
    shape = _shape(node)
    for user in node.users:
        m = g.module(user)
        if m is not None and shape and _shape(user) == shape and ops.is_channels_last_norm(m, shape):
            return True
    return False


def _op_label(g: _Graph, node: fx.Node) -> str:
    m = g.module(node)
    if m is not None:
        return type(m).__name__
    return str(ops.target_name(node.target))


def _shortcut_problem(g: _Graph, path: Sequence[fx.Node]) -> Optional[tuple[str, str]]:
    """None if ``path`` is a light shortcut, else (reason code, detail)."""
    pointwise = depthwise = 0
    for node in path:
        m = g.module(node)
        if m is not None:
            if isinstance(m, ops.CONV_TYPES):
                kernel = math.prod(m.kernel_size)
                if kernel == 1:
                    pointwise += 1
                elif m.groups == m.in_channels and m.groups > 1:
                    depthwise += 1
                else:
                    return "heavy-paths", f"shortcut has a {m.kernel_size} convolution ({node.target})"
                if pointwise > 1 or depthwise > 1:
                    return "heavy-paths", f"shortcut has more than one projection ({node.target})"
                continue
            if isinstance(m, ops.NORM_TYPES) and not ops.is_activation_module(m):
                continue
            if isinstance(m, ops.REGULARIZER_TYPES) or ops.is_pool_module(m):
                continue
            return "heavy-paths", f"shortcut goes through {type(m).__name__} ({node.target})"
        name = ops.target_name(node.target)
        if node.op == "call_function" and node.target is operator.getitem:
            source = node.args[0]
            if _reselects_cat_input(node):
                continue  # cat([a, b], 1)[:, :len(a)] is a again (DPN's dual paths)
            is_split = isinstance(source, fx.Node) and (
                ops.target_name(source.target) in ops.SPLIT_OPS or _tensor_meta(source) is not None
            )
            if is_split:
                return "split-slice", f"shortcut is {node.name}, a slice of {source.name}"
            continue  # an element of a tuple output: the walk goes on to what produced it
        if node.op in ("call_function", "call_method"):
            if name in ops.SHAPE_OPS or name in ops.POOL_FUNCTIONS:
                continue
            if name in ("mul", "truediv", "div", "imul", "add", "sub", "iadd") and len(g.data_inputs(node)) <= 1:
                continue  # scaling or bias by a constant or parameter
            if name in ("mul", "truediv", "div", "add", "sub", "iadd", "imul", "cat"):
                return "heavy-paths", f"shortcut merges several tensors at {node.name}"
        return "heavy-paths", f"shortcut goes through {_op_label(g, node)} ({node.name})"
    return None


def _has_attention(g: _Graph, add: fx.Node, branch_nodes: Sequence[fx.Node]) -> Optional[str]:
    """A description of the channel attention found on the branch, or None."""
    outer = set(_stack_keys(add))
    for node in branch_nodes:
        m = g.module(node)
        if m is not None and isinstance(m, ops.ATTENTION_TYPES):
            return f"{type(m).__name__} at {node.target}"
        for key, (path, cls) in node.meta.get("nn_module_stack", {}).items():
            if key not in outer and isinstance(cls, type) and issubclass(cls, ops.ATTENTION_TYPES):
                return f"{cls.__name__} at {path}"
    for node in branch_nodes:
        if not g.is_data_product(node):
            continue
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        full = max((_numel(a) for a in operands), default=0)
        for operand in operands:
            gate = _gate_behind(g, operand)
            if gate is not None and 4 * _min_numel_to(g, operand, gate) <= full:
                return f"a gated product at {node.name} (gate {gate.name})"
    return None


def _numel(node: fx.Node) -> int:
    shape = _shape(node)
    return math.prod(shape) if shape is not None else 0


def _walk_shape_ops(g: _Graph, node: fx.Node) -> list[fx.Node]:
    chain = [node]
    while True:
        cur = chain[-1]
        name = ops.target_name(cur.target) if cur.op in ("call_function", "call_method") else None
        scalar_scale = g._is_mul(cur) and len(g.data_inputs(cur)) == 1
        if (name in ops.SHAPE_OPS or scalar_scale) and g.first_data_input(cur) is not None:
            chain.append(g.first_data_input(cur))
        else:
            return chain


def _gate_behind(g: _Graph, operand: fx.Node) -> Optional[fx.Node]:
    """The sigmoid / hard-sigmoid / softmax node behind ``operand`` through shape ops, if any."""
    last = _walk_shape_ops(g, operand)[-1]
    m = g.module(last)
    if (m is not None and ops.is_gate_module(m)) or ops.is_gate_call(last.op, last.target):
        return last
    return None


def _min_numel_to(g: _Graph, operand: fx.Node, gate: fx.Node) -> int:
    sizes = [_numel(n) for n in _walk_shape_ops(g, operand)]
    return min(s for s in sizes if s > 0) if any(sizes) else 0


def _trailing_regularizers(g: _Graph, add: fx.Node, branch: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Step back from the branch operand over drop-path / dropout / identity modules.

    Returns (tail, consumer): SE takes ``tail`` and feeds ``consumer``.
    """
    consumer, tail = add, branch
    if _is_inplace_on(add, branch):
        # `out.add_(x); return out`: what reads `out` after the add reads the add's result.
        later = [u for u in branch.users if u is not add and g.index[u] > g.index[add]]
        if len(branch.users) - len(later) != 1:
            return tail, consumer
    elif len(tail.users) != 1:
        return tail, consumer
    while True:
        m = g.module(tail)
        is_regularizer = (m is not None and isinstance(m, ops.REGULARIZER_TYPES)) or (
            tail.op == "call_function" and ops.target_name(tail.target) in ("dropout", "stochastic_depth", "drop_path")
        )
        previous = g.first_data_input(tail)
        if not is_regularizer or previous is None or _shape(previous) != _shape(tail):
            break
        consumer, tail = tail, previous
        if len(tail.users) != 1:
            break
    return tail, consumer


def _is_inplace_on(add: fx.Node, operand: fx.Node) -> bool:
    """Whether ``add`` adds in place into ``operand`` (``operand.add_(x)``, ``operator.iadd``)."""
    inplace = (add.op == "call_method" and add.target == "add_") or (
        add.op == "call_function" and add.target is operator.iadd)
    return inplace and bool(add.args) and add.args[0] is operand


def _common_prefix(stacks: Sequence[list[str]]) -> tuple[str, ...]:
    prefix: list[str] = []
    for keys in zip(*stacks):
        if all(k == keys[0] for k in keys):
            prefix.append(keys[0])
        else:
            break
    return tuple(prefix)


_SHORTCUT_PROBLEMS = frozenset({"heavy-paths", "split-slice"})


def _classify(g: _Graph, add: fx.Node, batch_size: Optional[int]) -> Verdict:
    def skip(reason: str, detail: str, keys: tuple[str, ...] = tuple(_stack_keys(add))) -> SkippedAdd:
        return SkippedAdd(add, reason, detail, keys)

    a, b = add_operands(add)  # type: ignore[misc]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or _shape(a) is None or _shape(b) is None:
        return skip("scalar", f"{add.format_node()}")
    if not (g.is_data[a] and g.is_data[b]):
        return skip("scalar", f"{add.format_node()}")
    shape_a, shape_b = _shape(a), _shape(b)
    if shape_a != shape_b:
        return skip("broadcast", f"{list(shape_a)} + {list(shape_b)}")  # type: ignore[arg-type]
    shape = shape_a
    if len(shape) < 3:  # type: ignore[arg-type]
        return skip("no-spatial-dims", f"shape {list(shape)}")  # type: ignore[arg-type]
    if batch_size is not None and shape[0] != batch_size:  # type: ignore[index]
        return skip("batch-dim", f"shape {list(shape)}, batch size {batch_size}")  # type: ignore[arg-type]
    dtype = _tensor_meta(a).dtype  # type: ignore[union-attr]
    if not dtype.is_floating_point:
        return skip("not-float", f"dtype {dtype}")

    # Each orientation: walk back from the would-be shortcut to the fork.
    candidates = []
    for index, (branch, shortcut) in enumerate(((b, a), (a, b))):
        branch_index = 1 - index
        path: list[fx.Node] = []
        cur: Optional[fx.Node] = shortcut
        while cur is not None and not g.reaches(cur, branch):
            path.append(cur)
            cur = g.first_data_input(cur)
        if cur is None:
            continue
        fork = cur
        branch_nodes = g.between(fork, branch)
        problem = _shortcut_problem(g, path)
        if problem is None:
            if not any(g.is_conv_like(n) for n in branch_nodes):
                problem = ("no-conv-branch", f"branch {branch.name} has no conv or linear")
            elif not any(g.is_nonlinear(n) for n in branch_nodes):
                problem = ("linear-branch", f"branch {branch.name} has only linear ops")
        candidates.append((problem is not None, len(path), branch_index, branch, shortcut, fork, path,
                           branch_nodes, problem))
    if not candidates:
        return skip("no-common-input", f"{a.name} and {b.name} come from different inputs")
    # A valid orientation first; among invalid ones, prefer the one whose shortcut passed, so that
    # the reason names what is wrong with the branch whichever way round the add is written.
    candidates.sort(key=lambda c: (0 if c[8] is None else 2 if c[8][0] in _SHORTCUT_PROBLEMS else 1, c[1]))
    _, _, branch_index, branch, shortcut, fork, path, branch_nodes, problem = candidates[0]
    keys = _common_prefix([_stack_keys(n) for n in [add, *path, *branch_nodes]])
    if problem is not None:
        return skip(problem[0], problem[1], keys)

    axis = g.channel_axis(branch)
    stream = g.channel_axis(fork)
    if axis is None:
        if stream is not None and stream[0] == len(_shape(fork) or ()) - 1 or _read_by_channels_last_norm(g, fork):
            return skip("channels-last", f"the residual stream {fork.name} has its channels last", keys)
        return skip("channel-dim-unknown", f"no conv, linear or norm found that fixes the channel dim of "
                                           f"{branch.name}", keys)
    if axis[0] != 1 or axis[1] != shape[1]:  # type: ignore[index]
        return skip("channels-last", f"channels ({axis[1]}) at dim {axis[0]} of {list(shape)}", keys)  # type: ignore[arg-type]
    if stream is not None and len(_shape(fork) or ()) == len(shape) and stream[0] != 1:  # type: ignore[arg-type]
        # The branch's last layer makes features at dim 1, but the stream it adds to keeps its
        # channels elsewhere: the branch mixes tokens or positions (MLP-Mixer's token MLP).
        return skip("channels-last", f"the branch's features are at dim 1 but the residual stream "
                                     f"{fork.name} has its channels at dim {stream[0]} (token mixing)", keys)
    attention = _has_attention(g, add, branch_nodes)
    if attention is not None:
        return skip("has-attention", attention, keys)

    tail, consumer = _trailing_regularizers(g, add, branch)
    return ResidualAdd(
        add=add,
        branch_index=branch_index,
        branch=branch,
        shortcut=shortcut,
        fork=fork,
        tail=tail,
        consumer=consumer,
        channels=int(shape[1]),  # type: ignore[index]
        shape=shape,  # type: ignore[arg-type]
        dtype=dtype,
        shortcut_ops=tuple(_op_label(g, n) for n in reversed(path)),
        scope_keys=keys,
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
        >>> from se_inject.scopes import ShapeRecorder
        >>> from se_inject.tracer import trace
        >>> gm = trace(torchvision.models.resnet18().eval())
        >>> _ = ShapeRecorder(gm).run(torch.randn(1, 3, 64, 64))
        >>> verdicts = classify_adds(gm, batch_size=1)
        >>> sum(isinstance(v, ResidualAdd) for v in verdicts)
        8
    """
    g = _Graph(gm)
    return [_classify(g, n, batch_size) for n in g.nodes if add_operands(n) is not None]
