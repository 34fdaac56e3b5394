"""Trace a model as a tree of scopes, and give every scope's nodes their shapes.

A *scope* is a module traced as its own root. :mod:`se_inject.trace.search` finds them: the model
itself when fx can trace it whole, else the traceable modules below it, however deep, with the
modules fx cannot follow kept as leaves and non-tensor options baked in where a forward takes
them. Leaves that are not primitive (timm's no-trace blocks such as ``NormFreeBlock``) become
scopes of their own, since they can hold residual adds.

Shapes come from one forward on the example input: :class:`ShapeRecorder` runs the top scope,
the inputs each nested scope receives are recorded (:func:`se_inject.trace.record.recording`), and
the recorder runs those scopes on what they received. Where a traced graph does not run on what
its module really receives, that module's children are traced instead
(:func:`se_inject.trace.search.runnable_scopes`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata

from ..errors import ExampleInputError
from ..plan import Untraceable
from ..utils import describe_error, first_line
from .leaf_axis import META_KEY, proving_leaf_axes
from .record import Call, Recording, outputs_match, recording
from .specialize import trace_as

__all__ = ["Scope", "ShapeRecorder", "propagate_shapes", "TracedRootFails", "example_input_error"]


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
        leaves: modules inside it that fx could not follow, kept whole in ``gm``.
        call: the recorded call whose non-tensor options are baked into ``gm`` (None when traced
            plainly); ``gm`` then takes only that call's tensors.
        recording: every module's recorded call, when the search ran the forward that records them.
    """

    path: str
    module: nn.Module
    gm: fx.GraphModule
    args: Optional[tuple[Any, ...]] = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    calls: int = 0
    faithful: bool = True
    leaves: tuple[nn.Module, ...] = ()
    call: Optional[Call] = None
    recording: Optional[Recording] = None

    @property
    def specialised(self) -> bool:
        """Whether options are baked into the graph (it is then never installed as a module)."""
        return self.call is not None

    def graph_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The inputs of ``gm`` for a real call ``module(*args, **kwargs)``."""
        if self.call is not None:
            return self.call.graph_inputs(self.module, args, kwargs)
        bound = inspect.signature(self.gm.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())

    def retrace(self) -> fx.GraphModule:
        """Trace the module again as ``gm`` was traced (same leaves, same options)."""
        return trace_as(self.module, self.leaves, self.call)

    @property
    def batch_size(self) -> Optional[int]:
        """Dim 0 of the first tensor input."""
        for a in list(self.args or ()) + list(self.kwargs.values()):
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                return int(a.shape[0])
        return None


class TracedRootFails(Exception):
    """The model's traced graph fails on the example input although the model itself runs."""


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


def _node_path(node: Union[fx.Node, str, None]) -> str:
    if isinstance(node, str):
        return node or "<root>"
    if node is None:
        return "<root>"
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack", {})
    return f"{list(stack.values())[-1][0] if stack else '<root>'} ({node.name})"


def _run_scope(scope: Scope) -> Any:
    return ShapeRecorder(scope.gm).run(*scope.graph_inputs(scope.args or (), scope.kwargs))


def example_input_error(model: nn.Module, inputs: tuple[Any, ...], error: Exception,
                         where: Union[fx.Node, str, None]) -> ExampleInputError:
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
            return recorder.run(*top.graph_inputs(inputs, {}))  # type: ignore[union-attr]
    except Exception as e:
        if recorder is not None:
            try:
                with torch.no_grad():
                    model(*inputs)
            except Exception:
                pass
            else:  # fx traced something the model does not do: trace its children instead
                raise TracedRootFails(f"the traced graph fails at {_node_path(recorder.current)}: "
                                       f"{describe_error(e)}") from e
        raise example_input_error(model, inputs, e, recorder.current if recorder else None) from e


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
    with proving_leaf_axes(leaf for s in scopes for leaf in s.leaves) as leaf_dims:
        with recording(s.module for s in nested) as calls:
            result = _run_top(model, top, example_inputs)
        failed = _run_nested(nested, calls)
    _mark_leaf_dims(scopes, leaf_dims)
    failed_paths = {f.path for f in failed}
    scopes[:] = [s for s in scopes if s.path not in failed_paths]
    return result, failed


def _run_nested(nested: list[Scope], calls: Recording) -> list[Untraceable]:
    """Run each nested scope's graph on what its module received; the scopes whose graph fails."""
    failed: list[Untraceable] = []
    with torch.no_grad():
        for scope in nested:
            call = calls.get(scope.module)
            if call is None:
                continue
            scope.args, scope.kwargs, scope.calls = call.args, call.kwargs, call.count
            try:
                traced_output = _run_scope(scope)
            except Exception as e:
                failed.append(Untraceable(scope.path, f"the traced graph fails to run: {describe_error(e)}"))
                continue
            scope.faithful = outputs_match(call.output, traced_output) is None
    return failed


def _mark_leaf_dims(scopes: list[Scope], leaf_dims: dict[int, int]) -> None:
    """Give the call of every leaf whose channel dim was proven that dim (see :mod:`se_inject.trace.leaf_axis`)."""
    if not leaf_dims:
        return
    for scope in scopes:
        for node in scope.gm.graph.nodes:
            if node.op == "call_module" and id(scope.gm.get_submodule(node.target)) in leaf_dims:
                node.meta[META_KEY] = leaf_dims[id(scope.gm.get_submodule(node.target))]
