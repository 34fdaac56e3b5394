"""Trace a model as a tree of scopes, and give every scope's nodes their shapes.

A *scope* is a module traced as its own root. The model is one scope when fx can trace it whole;
when it cannot, each child is tried in turn. Leaves that are not primitive (timm's no-trace
blocks such as ``NormFreeBlock``) become scopes of their own, since they can hold residual adds.

Shapes come from one forward on the example input: :class:`ShapeRecorder` runs the top scope,
the inputs each nested scope receives are recorded (:func:`se_inject.capture.recording`), and
the recorder runs those scopes on what they received. Where a traced graph does not run on what
its module really receives, that module's children are traced instead (:func:`runnable_scopes`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata

from .capture import outputs_match, recording
from .errors import ExampleInputError, TraceError
from .ops import is_primitive_leaf
from .plan import Untraceable
from .tracer import trace
from .utils import describe_error, first_line, join_path

__all__ = ["Scope", "ShapeRecorder", "discover_scopes", "propagate_shapes", "runnable_scopes"]


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


class _NotTraced(Exception):
    """The module is known not to run as a traced graph."""


class _TracedRootFails(Exception):
    """The model's traced graph fails on the example input although the model itself runs."""


def discover_scopes(model: nn.Module, *, skip: Optional[dict[str, str]] = None
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
            untraceable.append(Untraceable(path, str(e) if isinstance(e, _NotTraced) else describe_error(e)))
            for name, child in module.named_children():
                visit(child, join_path(path, name))
            return
        scopes.append(Scope(path, module, gm))
        for node in gm.graph.nodes:
            if node.op == "call_module":
                visit(module.get_submodule(node.target), join_path(path, node.target))

    visit(model, "")
    return scopes, untraceable


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


def _node_path(node: Optional[fx.Node]) -> str:
    if node is None:
        return "<root>"
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack", {})
    return f"{list(stack.values())[-1][0] if stack else '<root>'} ({node.name})"


def _run_scope(scope: Scope) -> Any:
    bound = inspect.signature(scope.gm.forward).bind(*(scope.args or ()), **scope.kwargs)
    bound.apply_defaults()
    return ShapeRecorder(scope.gm).run(*bound.arguments.values())


def _example_input_error(model: nn.Module, inputs: tuple[Any, ...], error: Exception,
                         where: Optional[fx.Node]) -> ExampleInputError:
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__  # type: ignore[assignment]
    at = f" (at {_node_path(where)})" if where is not None else ""
    return ExampleInputError(
        f"{type(model).__name__} does not run on an example input of shape {shapes}{at}: "
        f"{type(cause).__name__}: {first_line(cause)} Pass example_inputs= with inputs the model accepts "
        f"(e.g. a (1, 3, 16, 112, 112) tensor for a video model).")


def _run_top(model: nn.Module, top: Optional[Scope], inputs: tuple[Any, ...]) -> Any:
    """One forward: the top scope's graph under the shape recorder, or the model itself."""
    recorder = ShapeRecorder(top.gm) if top is not None else None
    try:
        with torch.no_grad():
            if recorder is None:
                return model(*inputs)
            top.args, top.calls = inputs, 1  # type: ignore[union-attr]
            return recorder.run(*inputs)
    except Exception as e:
        if recorder is not None:
            try:
                with torch.no_grad():
                    model(*inputs)
            except Exception:
                pass
            else:  # fx traced something the model does not do: trace its children instead
                raise _TracedRootFails(f"the traced graph fails at {_node_path(recorder.current)}: "
                                       f"{describe_error(e)}") from e
        raise _example_input_error(model, inputs, e, recorder.current if recorder else None) from e


def propagate_shapes(model: nn.Module, scopes: list[Scope], example_inputs: tuple[Any, ...]
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
    with recording(s.module for s in nested) as calls:
        result = _run_top(model, top, example_inputs)
    failed: list[Untraceable] = []
    with torch.no_grad():
        for scope in nested:
            call = calls.get(id(scope.module))
            if call is None:
                continue
            scope.args, scope.kwargs, scope.calls = call.args, call.kwargs, call.count
            try:
                traced_output = _run_scope(scope)
            except Exception as e:
                failed.append(Untraceable(scope.path, f"the traced graph fails to run: {describe_error(e)}"))
                continue
            scope.faithful = outputs_match(call.output, traced_output) is None
    failed_paths = {f.path for f in failed}
    scopes[:] = [s for s in scopes if s.path not in failed_paths]
    return result, failed


def runnable_scopes(model: nn.Module, example_inputs: tuple[Any, ...]
                    ) -> tuple[list[Scope], list[Untraceable], Any]:
    """Trace ``model`` into scopes that all run on what their modules receive, with shapes.

    Where a traced graph does not run, that module's children are traced instead, and again,
    until every scope runs. Returns the scopes, what could not be traced whole, and the output of
    the top scope's graph (or of the model, when its root is not traced).

    Raises:
        TraceError: no module that could hold a residual add can be traced.
        ExampleInputError: the model does not run on ``example_inputs``.
    """
    skip: dict[str, str] = {}
    while True:
        scopes, untraceable = discover_scopes(model, skip=skip)
        if not scopes:
            first = untraceable[0].error if untraceable else "no module"
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__} (path '<root>') or any submodule that "
                f"could hold a residual add: {first}. Make the forward free of data-dependent control "
                f"flow, or apply se_inject to a traceable submodule.")
        try:
            traced_output, failed = propagate_shapes(model, scopes, example_inputs)
        except _TracedRootFails as e:
            skip[""] = str(e)
            continue
        if not failed:
            return scopes, untraceable, traced_output
        skip.update({f.path: f.error for f in failed})
