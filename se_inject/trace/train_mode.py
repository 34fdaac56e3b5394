"""Does a block trace differently in train mode than in eval mode?

A GraphModule runs one graph, so a block whose Python code branches on ``self.training`` would
lose its train-mode behaviour once rewritten. Leaves run their own forward at run time and need
no check; only modules whose code runs inline in the traced graph do (those that emitted nodes,
and those inside the block that emitted none in eval mode but might in train mode), and only
those whose code reads ``training`` (comments and strings do not count) are traced again in train
mode, with the leaves and options of their scope.

The two graphs are compared call by call with their constant arguments, not only their targets:
``F.dropout(x, p, training=self.training)`` or ``F.batch_norm(..., self.training, ...)`` trace to
the same calls in both modes, and only the frozen ``training=False`` tells them apart. Arguments
that are nodes are compared by their place in the block (or as "from outside it"), so the
comparison does not depend on node names, which an earlier block's extra train-mode nodes shift.
"""

from __future__ import annotations

import functools
import inspect
import io
import tokenize
from typing import Any, Optional

from torch import fx, nn

from ..utils import kept_training_flags
from .scopes import Scope
from .search import is_container
from .tracer import SETracer

__all__ = ["TrainModeCheck"]

Calls = dict[Optional[str], list[tuple[Any, ...]]]

_CALLS = ("call_module", "call_function", "call_method")


def _ref(seen: dict[fx.Node, int], node: fx.Node) -> tuple[Any, ...]:
    """A node argument as the comparison sees it: its index among the nodes of the module call
    (``seen``), or what it is when it comes from outside that call."""
    if node in seen:
        return ("node", seen[node])
    return ("outside", node.op, None if node.op == "call_module" else node.target)


def _calls_by_key(graph: fx.Graph) -> Calls:
    """The (op, target, args, kwargs) of every call, for the whole graph (key None) and per module
    call key, node arguments as :func:`_ref` gives them."""
    calls: Calls = {None: []}
    local: dict[Optional[str], dict[fx.Node, int]] = {None: {}}
    for node in graph.nodes:
        for key in (None, *node.meta.get("nn_module_stack", {})):
            seen = local.setdefault(key, {})
            if node.op in _CALLS:
                ref = functools.partial(_ref, seen)
                calls.setdefault(key, []).append(
                    (node.op, node.target, fx.node.map_arg(node.args, ref), fx.node.map_arg(node.kwargs, ref)))
            seen[node] = len(seen)
    return calls


def _same(a: Optional[list[tuple[Any, ...]]], b: Optional[list[tuple[Any, ...]]]) -> bool:
    """Whether two call lists are equal (a constant whose ``==`` fails or is not a bool: not equal)."""
    try:
        return bool(a == b)
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def _reads_training(cls: type) -> bool:
    """Whether the code of ``cls`` names ``training`` (True when the source is unknown)."""
    try:
        source = inspect.getsource(cls)
        if "training" not in source:
            return False
        tokens = tokenize.generate_tokens(io.StringIO(inspect.cleandoc("\n" + source)).readline)
        return any(t.type == tokenize.NAME and t.string == "training" for t in tokens)
    except (OSError, TypeError, tokenize.TokenError, IndentationError, SyntaxError):
        return True


def _silent_modules(scope: Scope, key: Optional[str]) -> list[nn.Module]:
    """Modules inside the block whose code runs inline but emitted no node in eval mode (an HF
    drop-path computes nothing in eval mode, but would in train mode)."""
    emitted: set[str] = set()
    path: Optional[str] = "" if key is None else None
    for node in scope.gm.graph.nodes:
        stack = node.meta.get("nn_module_stack", {})
        emitted.update(p for p, _ in stack.values())
        if path is None and key in stack:
            path = stack[key][0]
    if path is None:
        return []
    tracer = SETracer(scope.leaves)
    silent, todo = [], [(f"{path}.{name}" if path else name, child)
                        for name, child in scope.module.get_submodule(path).named_children()]
    while todo:
        p, m = todo.pop()
        if not is_container(m) and tracer.is_leaf_module(m, p):
            continue
        if p not in emitted and not is_container(m):
            silent.append(m)
        todo.extend((f"{p}.{name}", child) for name, child in m.named_children())
    return silent


def _may_differ(scope: Scope, key: Optional[str]) -> bool:
    """Whether any module whose code runs inline in the block (not leaves) reads ``training``."""
    for node in scope.gm.graph.nodes:
        stack = node.meta.get("nn_module_stack", {})
        if key is not None and key not in stack:
            continue
        entries = list(stack.items())
        if node.op == "call_module" and entries:
            entries = entries[:-1]  # the leaf itself
        if key is not None:
            entries = entries[[k for k, _ in entries].index(key):]
        if any(_reads_training(cls) for _, (_, cls) in entries if isinstance(cls, type)):
            return True
    if any(_reads_training(type(m)) for m in _silent_modules(scope, key)):
        return True
    return key is None and _reads_training(type(scope.module))


def _train_mode_calls(scope: Scope) -> Optional[Calls]:
    """The calls of ``scope`` traced in train mode (None if it cannot be traced in train mode)."""
    with kept_training_flags(scope.module):
        scope.module.train()
        try:
            return _calls_by_key(scope.retrace().graph)
        except Exception:
            return None


class TrainModeCheck:
    """Answers "does this block trace differently in train mode?", tracing each scope in train
    mode at most once, and only when a block's inline code reads ``training``."""

    def __init__(self) -> None:
        self._calls: dict[int, tuple[Calls, Optional[Calls]]] = {}

    def differs(self, scope: Scope, key: Optional[str]) -> bool:
        """Whether the block of ``scope`` under module call ``key`` (None: the scope root)
        calls other things, or the same things with other constant arguments, in train mode
        than in eval mode."""
        if not _may_differ(scope, key):
            return False
        if id(scope) not in self._calls:
            self._calls[id(scope)] = (_calls_by_key(scope.gm.graph), _train_mode_calls(scope))
        evaluated, trained = self._calls[id(scope)]
        return trained is None or not _same(trained.get(key), evaluated.get(key))
