"""Give a rewritten block the call signature of the module it replaces.

A block copied out of its scope's graph takes one input, but its module's ``forward`` may take
more (timm's DLA blocks take ``shortcut`` and ``children``; a block may take ``scale``), and its
parent calls it that way. The rewritten block takes every parameter the module takes. Values that
were not tensors when the model called the block (``scale=0.5``, ``None``) are frozen into the
traced graph, so the block checks them, by type and value: called with another value, or with a
value of another kind (a tensor, even one equal to the number: the graph would ignore it and its
gradient; an ``int`` where a ``float`` was frozen; a ``bool`` for an ``int``), it raises an
``AssertionError`` that names the argument, instead of silently computing what the traced call
computed. The guards (:func:`require_none`, :func:`require_kind`, then ``==``) survive
TorchScript; a scripted block raises ``torch.jit.Error`` with the same message instead, since
TorchScript re-raises every exception as that class. Tensors the block received besides its
input are not read by its graph (else it could not be cut out), so any value is accepted for them.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, NamedTuple, Optional

import torch
from torch import fx, nn

from ..trace.record import Call

__all__ = ["Mirrored", "mirror_signature", "require_none", "require_kind"]


class Mirrored(NamedTuple):
    """What :func:`mirror_signature` did: why it could not (``problem``), or the frozen arguments
    the model passes to the block (``frozen``, by name), which an enclosing rewritten block that
    calls this one must pass too."""

    problem: Optional[str]
    frozen: dict[str, Any]

@fx.wrap
def require_none(value: Optional[torch.Tensor], message: str) -> None:
    """Raise an ``AssertionError`` with ``message`` unless ``value`` is None (scriptable)."""
    if value is not None:
        raise AssertionError(message)


#: The types a frozen argument may have, by the name :func:`require_kind` takes.
_KINDS = {bool: "bool", int: "int", float: "float", str: "str"}


@torch.jit.unused
def _is_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` is a plain ``kind`` (``int`` excluding ``bool``, which changes what ops
    compute: ``torch.full(s, True)`` is a bool tensor)."""
    if isinstance(value, bool):
        return kind == "bool"
    return isinstance(value, {"bool": bool, "int": int, "float": float, "str": str}[kind])


@fx.wrap
def require_kind(value: Any, kind: str, message: str) -> None:
    """Raise an ``AssertionError`` with ``message`` unless ``value`` is of ``kind`` (``"bool"``,
    ``"int"``, ``"float"`` or ``"str"``). TorchScript checks the type from the signature itself,
    so there this is a no-op; checked before the value, so that a tensor never meets ``==``."""
    if not torch.jit.is_scripting():
        if not _is_kind(value, kind):
            raise AssertionError(message)


def _guard(graph: fx.Graph, placeholder: fx.Node, value: Any, default: Any, message: str) -> bool:
    """Insert a check that ``placeholder`` is ``value`` (same kind, equal); False when it cannot be checked."""
    if isinstance(value, torch.Tensor):  # not read by the graph: any tensor will do
        placeholder.type = Optional[torch.Tensor] if default is None else torch.Tensor
        return True
    if value is None:
        placeholder.type = Optional[torch.Tensor]  # what TorchScript needs to see for a None default
        graph.call_function(require_none, (placeholder, message))
        return True
    kind = _KINDS.get(type(value))
    if kind is None:
        return False
    placeholder.type = type(value)
    graph.call_function(require_kind, (placeholder, kind, message))
    same = graph.call_function(operator.eq, (placeholder, value))
    graph.call_function(torch._assert, (same, message))
    return True


def mirror_signature(gm: fx.GraphModule, module: nn.Module, call: Optional[Call], path: str) -> Mirrored:
    """Give ``gm`` (one placeholder: the block's input) the other parameters of ``module.forward``,
    each checked against the value the model called the block with.

    The result's ``problem`` says why the block cannot keep its signature (it was never called,
    is called with ``*args``/``**kwargs`` or with a value that cannot be checked).
    """
    if call is None:
        return Mirrored("the block did not run in the example forward", {})
    signature = inspect.signature(module.forward)
    params = list(signature.parameters.values())[1:]
    if not params:
        return Mirrored(None, {})
    try:
        bound = signature.bind(*call.args, **call.kwargs)
    except TypeError as e:
        return Mirrored(f"its recorded call does not fit its forward: {e}", {})
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and bound.arguments.get(p.name) for p in params):
        return Mirrored("it is called with *args or **kwargs", {})
    graph = gm.graph
    body = next(n for n in graph.nodes if n.op != "placeholder")
    placeholders = []
    with graph.inserting_before(body):  # in order, after the input's placeholder
        for p in params:
            star = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
            default = p.default if not star else inspect.Signature.empty
            placeholders.append((p, graph.placeholder(star + p.name, default_value=default)))
        for p, ph in placeholders:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            value = bound.arguments.get(p.name, p.default)
            kind = "" if value is None or isinstance(value, torch.Tensor) else f" (a {type(value).__name__})"
            message = (f"{path} was rewritten by se_inject for calls with {p.name}={value!r}{kind}, which its "
                       f"traced graph fixes; call it so, or leave it out with exclude=[{path!r}]")
            if not _guard(graph, ph, value, p.default, message):
                return Mirrored(f"it is called with {p.name}={type(value).__name__}, which cannot be checked", {})
    graph.lint()
    gm.recompile()
    frozen = {p.name: bound.arguments[p.name] for p, _ in placeholders if p.name in bound.arguments
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and not isinstance(bound.arguments[p.name], torch.Tensor) and bound.arguments[p.name] is not p.default}
    return Mirrored(None, frozen)
