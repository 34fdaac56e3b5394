"""Tracing a module with the non-tensor options of its real call baked in.

Many modules (every Hugging Face model among them) take options besides their tensors:
``output_hidden_states``, ``return_dict``, ``labels=None``. fx turns every parameter into a Proxy,
so ``if output_hidden_states:`` stops the trace, and transformers' decorated forwards
(``wrapper(self, *args, **kwargs)``) make fx patch the wrong function, whatever ``concrete_args``
say. So a module is traced through a *signature shim*: for the time of the trace it gets a
throwaway subclass whose ``forward`` takes only the tensors the module really received and calls
the original forward with the options it really received. The graph then has one placeholder per
tensor and no option at all; such a graph is a *specialised* scope, which se_inject analyses but
never installs as a module of its own (only blocks cut out of it, which take one tensor).

The call comes from :func:`se_inject.trace.record.record_calls`, which runs one forward and keeps,
for each module's first call, which arguments held tensors and the values of the others (no tensor
is kept).
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Optional

from torch import fx, nn

from .record import Call
from .tracer import trace

__all__ = ["trace_as", "takes_options"]

_VAR_POSITIONAL = inspect.Parameter.VAR_POSITIONAL
_VAR_KEYWORD = inspect.Parameter.VAR_KEYWORD


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


def _shim_class(cls: type, call: Call) -> type:
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


def trace_as(module: nn.Module, leaves: Iterable[nn.Module] = (), call: Optional[Call] = None
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
