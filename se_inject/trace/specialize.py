"""What each module received in one real forward, and tracing a module with its non-tensor options
baked in.

Many modules (every Hugging Face model among them) take options besides their tensors:
``output_hidden_states``, ``return_dict``, ``labels=None``. fx turns every parameter into a Proxy,
so ``if output_hidden_states:`` stops the trace, and transformers' decorated forwards
(``wrapper(self, *args, **kwargs)``) make fx patch the wrong function, whatever ``concrete_args``
say. So a module is traced through a *signature shim*: for the time of the trace it gets a
throwaway subclass whose ``forward`` takes only the tensors the module really received and calls
the original forward with the options it really received. The graph then has one placeholder per
tensor and no option at all; such a graph is a *specialised* scope, which se_inject analyses but
never installs as a module of its own (only blocks cut out of it, which take one tensor).

:func:`record_calls` runs one forward with a pre-hook on every module and keeps, for each module's
first call, which arguments held tensors and the values of the others (no tensor is kept).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import fx, nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from .tracer import trace

__all__ = ["RecordedCall", "Recording", "record_calls", "trace_as", "takes_options"]

_POSITIONAL_ONLY = inspect.Parameter.POSITIONAL_ONLY
_VAR_POSITIONAL = inspect.Parameter.VAR_POSITIONAL
_VAR_KEYWORD = inspect.Parameter.VAR_KEYWORD
_TENSOR = object()  # stands for a tensor in a recorded output


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in tree_flatten(value)[0])


@functools.lru_cache(maxsize=1024)
def _signature(forward: Any) -> inspect.Signature:
    """The signature of an unbound ``forward`` without ``self`` (signatures are slow to compute)."""
    signature = inspect.signature(forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> Optional[list[tuple[str, Any, bool]]]:
    """The call's arguments as (name, value, positional-only), ``**kwargs`` spread out, defaults
    applied; None if the call does not bind to the signature or passes ``*args``."""
    try:
        forward = type(module).forward
        signature = _signature(forward) if "forward" not in vars(module) else inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    out: list[tuple[str, Any, bool]] = []
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind == _VAR_POSITIONAL:
            if value:
                return None
        elif kind == _VAR_KEYWORD:
            out.extend((key, item, False) for key, item in value.items())
        else:
            out.append((name, value, kind == _POSITIONAL_ONLY))
    return out


@dataclass
class RecordedCall:
    """The first call of one module: which arguments held tensors, and the other values.

    Attributes:
        arguments: (name, value or None for a tensor argument, positional-only, holds a tensor),
            in signature order, ``**kwargs`` spread out; None when the call cannot be re-made by
            name (it passed ``*args``, or does not bind to the forward's signature).
        passed: how many arguments the caller passed (positional and keyword).
        count: how many times the module ran.
        returned: the structure of the first call's output and its leaves, tensors replaced by a
            marker (None when the output was a bare tensor).
    """

    arguments: Optional[list[tuple[str, Any, bool, bool]]]
    passed: int
    count: int = 1
    returned: Optional[tuple[TreeSpec, list[Any]]] = None

    def output_like(self, tensor: Any) -> Any:
        """The call's output structure with ``tensor`` in place of its one tensor: the module
        returned ``(x,)`` or a ModelOutput holding only ``x``. ``tensor`` itself for a bare tensor
        (or nothing recorded); None when the output held several tensors or none."""
        if self.returned is None:
            return tensor
        spec, leaves = self.returned
        if sum(leaf is _TENSOR for leaf in leaves) != 1:
            return None
        return tree_unflatten([tensor if leaf is _TENSOR else leaf for leaf in leaves], spec)

    @property
    def tensor_names(self) -> list[str]:
        return [name for name, _, _, is_tensor in self.arguments or () if is_tensor]

    @property
    def options(self) -> dict[str, Any]:
        return {name: value for name, value, _, is_tensor in self.arguments or () if not is_tensor}

    def graph_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
        """The inputs of the module's specialised graph for a real call ``module(*args, **kwargs)``."""
        bound = _bind(module, args, kwargs)
        if bound is None:
            raise TypeError(f"the call of {type(module).__name__} does not match its forward's signature")
        values = {name: value for name, value, _ in bound}
        return [values[name] for name in self.tensor_names]


@dataclass
class Recording:
    """What :func:`record_calls` saw: the call of every module that ran, and the model's output."""

    calls: dict[int, RecordedCall] = field(default_factory=dict)
    output: Any = None

    def ran(self, module: nn.Module) -> bool:
        return id(module) in self.calls

    def get(self, module: nn.Module) -> Optional[RecordedCall]:
        return self.calls.get(id(module))


class ForwardFailed(Exception):
    """The model's own forward failed in :func:`record_calls`; ``path`` is the innermost module
    that was running."""

    def __init__(self, error: Exception, path: str) -> None:
        super().__init__(str(error))
        self.error, self.path = error, path


def record_calls(model: nn.Module, inputs: tuple[Any, ...]) -> Recording:
    """Run ``model(*inputs)`` once (no grad) and record every module's first call.

    Raises:
        ForwardFailed: the forward raised; it carries the error and where it happened.
    """
    recording = Recording()
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    stack: list[str] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stack.append(names.get(id(module), "?"))
        call = recording.calls.get(id(module))
        if call is not None:
            call.count += 1
            return
        bound = _bind(module, args, kwargs)
        arguments = None if bound is None else [
            (name, None, positional, True) if _holds_tensor(value) else (name, value, positional, False)
            for name, value, positional in bound]
        recording.calls[id(module)] = RecordedCall(arguments, len(args) + len(kwargs))

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        stack.pop()
        call = recording.calls[id(module)]
        if call.count == 1 and not isinstance(output, torch.Tensor):
            leaves, spec = tree_flatten(output)
            call.returned = (spec, [_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])

    handles = []
    try:
        for m in dict.fromkeys(model.modules()):
            handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(post_hook))
        with torch.no_grad():
            recording.output = model(*inputs)
    except Exception as e:
        raise ForwardFailed(e, stack[-1] if stack else "") from e
    finally:
        for h in handles:
            h.remove()
    return recording


def takes_options(module: nn.Module) -> bool:
    """Whether ``module.forward`` can take anything besides one input: more parameters, ``*args``
    or ``**kwargs``, or a decorator (transformers' ``wrapper(self, *args, **kwargs)``)."""
    forward = getattr(type(module), "forward", None)
    if hasattr(forward, "__wrapped__"):
        return True
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return True
    return len(params) > 1 or any(p.kind in (_VAR_POSITIONAL, _VAR_KEYWORD) for p in params)


def _shim_class(cls: type, call: RecordedCall) -> type:
    """A subclass of ``cls`` whose forward takes the call's tensors by name and makes the call."""
    names = call.tensor_names
    arguments = call.arguments or []

    def invoke(self: nn.Module, values: tuple) -> Any:
        tensors = dict(zip(names, values))
        args, kwargs = [], {}
        for name, value, positional, is_tensor in arguments:
            value = tensors[name] if is_tensor else value
            if positional:
                args.append(value)
            else:
                kwargs[name] = value
        return cls.forward(self, *args, **kwargs)

    namespace: dict[str, Any] = {"_invoke": invoke}
    exec(f"def forward(self, {', '.join(names)}):\n    return _invoke(self, ({', '.join(names)},))\n", namespace)
    return type(cls.__name__, (cls,), {"forward": namespace["forward"], "__module__": cls.__module__,
                                        "__qualname__": cls.__qualname__})


def trace_as(module: nn.Module, leaves: Iterable[nn.Module] = (), call: Optional[RecordedCall] = None
             ) -> fx.GraphModule:
    """Trace ``module`` with ``leaves`` kept whole: plainly, or with ``call``'s options baked in.

    With a call, the graph takes the call's tensors (by their parameter names) and nothing else.
    """
    if call is None:
        return trace(module, extra_leaves=leaves)
    if call.arguments is None or not call.tensor_names:
        raise TypeError(f"{type(module).__name__} cannot be traced with its options: its call passed "
                        f"*args, no tensor, or does not match its forward's signature")
    cls = type(module)
    module.__class__ = _shim_class(cls, call)
    try:
        gm = trace(module, extra_leaves=leaves)
    finally:
        module.__class__ = cls
    return gm
