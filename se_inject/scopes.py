"""Trace a model as a tree of scopes, and give every scope's nodes their shapes.

A *scope* is a module traced as its own root. The model is one scope when fx can trace it whole;
when it cannot, each child is tried in turn. Leaves that are not primitive (timm's no-trace
blocks such as ``NormFreeBlock``) become scopes of their own, since they can hold residual adds.

Shapes come from one forward on the example input: :class:`ShapeRecorder` runs the top scope,
forward pre-hooks record the inputs each nested scope receives, and the recorder runs those
scopes on what they received.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils._pytree import tree_flatten, tree_map

from .errors import ExampleInputError
from .ops import is_primitive_leaf
from .tracer import trace

__all__ = ["Scope", "Untraceable", "ShapeRecorder", "TracedRootFails", "discover_scopes", "propagate_shapes", "outputs_match", "join_path"]


def join_path(*parts: str) -> str:
    """Join module path parts, skipping empty ones (the root's path is ``""``)."""
    return ".".join(p for p in parts if p)


@dataclass
class Scope:
    """A module traced as its own root.

    Attributes:
        path: module path from the model root (``""`` for the root).
        module: the module.
        gm: its traced GraphModule (shapes in ``tensor_meta`` after :func:`propagate_shapes`).
        args / kwargs: the inputs it received in the example forward (None if never called).
        calls: how many times it ran in the example forward.
        faithful: whether its traced graph reproduced the module's output in that forward.
    """

    path: str
    module: nn.Module
    gm: fx.GraphModule
    args: Optional[tuple[Any, ...]] = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    calls: int = 0
    faithful: bool = True

    @property
    def batch_size(self) -> Optional[int]:
        """Dim 0 of the first tensor input."""
        for a in list(self.args or ()) + list(self.kwargs.values()):
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                return int(a.shape[0])
        return None


@dataclass(frozen=True)
class Untraceable:
    """A module fx could not trace (its children were tried instead), with the reason."""

    path: str
    error: str


def discover_scopes(
    model: nn.Module, *, skip: Optional[dict[str, str]] = None
) -> tuple[list[Scope], list[Untraceable]]:
    """Trace ``model`` into scopes, parents before children; report what could not be traced.

    Args:
        skip: module paths not to trace as a whole (their children are tried), with the reason
            to report; used for modules whose traced graph turned out not to run.
    """
    skip = skip or {}
    scopes: list[Scope] = []
    untraceable: list[Untraceable] = []
    seen: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        if id(module) in seen or (path and is_primitive_leaf(module)):
            return
        seen.add(id(module))
        try:
            if path in skip:
                raise _NotTraced(skip[path])
            gm = trace(module)
        except Exception as e:  # fx raises many types; all mean "not traceable as a whole"
            reason = str(e) if isinstance(e, _NotTraced) else f"{type(e).__name__}: {e}".splitlines()[0]
            untraceable.append(Untraceable(path, reason))
            for name, child in module.named_children():
                visit(child, join_path(path, name))
            return
        scopes.append(Scope(path, module, gm))
        for node in gm.graph.nodes:
            if node.op == "call_module":
                visit(module.get_submodule(node.target), join_path(path, node.target))

    visit(model, "")
    return scopes, untraceable


class _NotTraced(Exception):
    """The root is known not to run as a traced graph."""


class TracedRootFails(Exception):
    """The model's traced graph fails on the example input although the model itself runs."""


def _run_scope(scope: Scope) -> Any:
    signature = inspect.signature(scope.gm.forward)
    bound = signature.bind(*(scope.args or ()), **scope.kwargs)
    bound.apply_defaults()
    return ShapeRecorder(scope.gm).run(*bound.arguments.values())


class ShapeRecorder(fx.Interpreter):
    """Run a GraphModule and record the shape and dtype of every node's output.

    Records ``node.meta["tensor_meta"]`` as ``torch.fx.passes.shape_prop.ShapeProp`` does (same
    ``TensorMetadata`` type, so the site finder reads either), with two differences that matter
    in a library: a failing node is not printed to stderr (ShapeProp prints a traceback before
    re-raising), and strides and memory formats, which se_inject does not use, are not computed.
    ``current`` is the node being run, to say where a failure happened.
    """

    current: Optional[fx.Node] = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        found = False

        def describe(value: Any) -> Any:
            nonlocal found
            if isinstance(value, torch.Tensor):
                found = True
                return TensorMetadata(value.shape, value.dtype, value.requires_grad, (), None, False, {})
            return value

        meta = map_aggregate(result, describe)
        if found:
            n.meta["tensor_meta"] = meta
        return result


def _node_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack", {})
    return f"{list(stack.values())[-1][0] if stack else '<root>'} ({node.name})"


def _clone(value: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, value)


def propagate_shapes(
    model: nn.Module, scopes: list[Scope], example_inputs: tuple[Any, ...]
) -> tuple[Any, list[Untraceable]]:
    """Annotate every scope's nodes with shapes from one forward of ``model`` on the inputs.

    The top scope (the model itself, when traced) runs under :class:`ShapeRecorder`; nested
    scopes run under it on the inputs they received, and each is checked against the output its
    module gave in that forward (``Scope.faithful``). Nested scopes whose graph fails to run are
    removed from ``scopes`` and returned as :class:`Untraceable`.

    Returns:
        (output of the top scope's graph, or of the model when its root is not traced;
        the nested scopes whose graph failed to run, which callers can trace child by child).

    Raises:
        ExampleInputError: the model does not run on ``example_inputs``.
    """
    top = scopes[0] if scopes and scopes[0].path == "" else None
    nested = [s for s in scopes if s is not top]
    outputs: dict[int, Any] = {}

    def pre_hook(scope: Scope):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            scope.calls += 1
            if scope.args is None:
                scope.args, scope.kwargs = _clone(args), _clone(dict(kwargs))
        return hook

    def post_hook(scope: Scope):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if id(scope) not in outputs:
                outputs[id(scope)] = _clone(output)
        return hook

    handles = [s.module.register_forward_pre_hook(pre_hook(s), with_kwargs=True) for s in nested]
    handles += [s.module.register_forward_hook(post_hook(s)) for s in nested]
    prop = ShapeRecorder(top.gm) if top is not None else None
    try:
        with torch.no_grad():
            if prop is not None:
                top.args, top.calls = example_inputs, 1  # type: ignore[union-attr]
                result = prop.run(*example_inputs)
            else:
                result = model(*example_inputs)
    except Exception as e:
        if prop is not None:
            try:
                model(*example_inputs)
            except Exception:
                pass
            else:  # fx traced something the model does not do: trace its children instead
                failing = _node_path(prop.current) if prop.current is not None else "<root>"
                raise TracedRootFails(f"the traced graph fails at {failing}: {type(e).__name__}: "
                                      f"{(str(e).strip().splitlines() or [''])[0]}") from e
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        where = f" (at {_node_path(prop.current)})" if prop is not None and prop.current is not None else ""
        reason = (str(cause).strip().splitlines() or [""])[0]
        raise ExampleInputError(
            f"{type(model).__name__} does not run on an example input of shape {shapes}{where}: "
            f"{type(cause).__name__}: {reason} Pass example_inputs= with inputs the model accepts "
            f"(e.g. a (1, 3, 16, 112, 112) tensor for a video model)."
        ) from e
    finally:
        for h in handles:
            h.remove()

    failed: list[Untraceable] = []
    with torch.no_grad():
        for scope in nested:
            if scope.args is None:
                continue
            try:
                traced_output = _run_scope(scope)
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]
                failed.append(Untraceable(scope.path, f"the traced graph fails to run: {type(e).__name__}: {first}"))
                continue
            scope.faithful = outputs_match(outputs.get(id(scope)), traced_output) is None
    failed_paths = {f.path for f in failed}
    scopes[:] = [s for s in scopes if s.path not in failed_paths]
    return result, failed


def outputs_match(expected: Any, actual: Any) -> Optional[str]:
    """None if two outputs match (structure, shapes, values within rtol 1e-4 / atol 1e-5),
    else what differs."""
    exp_leaves, exp_spec = tree_flatten(expected)
    act_leaves, act_spec = tree_flatten(actual)
    if exp_spec != act_spec:
        return "the output structure differs"
    worst = 0.0
    for e, a in zip(exp_leaves, act_leaves):
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor) or e.shape != a.shape:
                return "an output shape differs"
            if e.is_floating_point():
                if not torch.allclose(e, a, rtol=1e-4, atol=1e-5, equal_nan=True):
                    worst = max(worst, float((e.float() - a.float()).abs().max()))
            elif not torch.equal(e, a):
                return "an integer output differs"
    return None if worst == 0.0 else f"max |difference| {worst:.3g}"
