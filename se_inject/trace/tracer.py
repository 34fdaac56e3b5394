"""The ``torch.fx`` tracer se_inject uses.

:class:`SETracer` extends torchvision's ``LeafModuleAwareTracer``. Its leaves are:

* every convolution, linear, norm and regulariser module, subclasses included (so timm's
  ``StdConv2d`` stays one node instead of a conv plus weight-standardisation ops, and
  ``DropPath`` / ``StochasticDepth`` keep their train-mode behaviour);
* the modules and functions of timm's no-trace registry (``timm.layers._fx``), which is what makes
  timm models traceable; se_inject looks inside those leaves separately;
* se_inject's own :class:`~se_inject.modules.se_block.SEBlock`, and other libraries' ``*DropPath``
  modules (:func:`~se_inject.trace.ops.is_regularizer_module`);
* any module object passed in ``extra_leaves``.

A dict that is also a dataclass (transformers' ``ModelOutput``) stays that class in the graph's
output instead of becoming a plain dict.

Each node records its module path in ``node.meta["nn_module_stack"]`` (fx does this itself).

Tracing runs a module's Python code on Proxies, and that code may write to the module (torchvision's
``MultiScaleRoIAlign`` caches ``scales`` on first use): :func:`trace` gives every module its
attributes back afterwards, and its public dicts, lists and sets their content (HF LeViT caches
Proxies in one), so a traced module is left as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, Optional

import torchvision.ops
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import fx, nn
from torch.nn.modules import module as _torch_module
from torchvision.models.feature_extraction import LeafModuleAwareTracer

from . import hf
from .ops import LEAF_TYPES, is_regularizer_module

#: The hook dicts of an ``nn.Module``: forward, backward and state_dict hooks (:func:`stash_hooks`,
#: and the rewritten blocks that share them with the modules they replace).
HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)

#: fx patches ``torch.nn.Module.__call__`` and ``__getattr__`` for the whole process while it
#: traces; two traces at once would restore each other's patches. se_inject traces one at a time.
TRACE_LOCK = threading.RLock()

__all__ = ["SETracer", "TRACE_LOCK", "HOOK_DICTS", "trace", "attributes_kept", "stash_hooks", "restore_hooks",
           "global_hooks_suspended"]


class SETracer(LeafModuleAwareTracer):
    """An fx tracer that keeps convs, norms, regularisers and timm's no-trace modules as leaves.

    Args:
        extra_leaves: module objects (not classes) to keep as leaves as well, e.g. blocks that
            were already rewritten.
    """

    def __init__(self, extra_leaves: Iterable[nn.Module] = ()) -> None:
        super().__init__(
            leaf_modules=list(LEAF_TYPES) + list(get_notrace_modules()),
            autowrap_modules=(math, torchvision.ops),
            autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)),
        )
        self._extra_leaf_ids = {id(m) for m in extra_leaves}

    def is_leaf_module(self, m: nn.Module, module_qualname: str) -> bool:
        if id(m) in self._extra_leaf_ids or is_regularizer_module(m):
            return True
        return super().is_leaf_module(m, module_qualname)

    # While fx traces, every thread's module calls and attribute reads go through the tracer (fx
    # patches them process-wide); those of other threads are passed straight through.
    def trace(self, root: Any, concrete_args: Optional[dict[str, Any]] = None) -> fx.Graph:
        self._thread = threading.get_ident()
        with TRACE_LOCK:
            return super().trace(root, concrete_args)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        # fx checks ``isinstance(a, dict)`` before dataclasses, so a ModelOutput would come out of
        # the graph as a plain dict: build the same class instead.
        if isinstance(a, dict) and dataclasses.is_dataclass(a) and not isinstance(a, type):
            kwargs = {f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a)}
            return self.create_node("call_function", type(a), (), kwargs)
        return super().create_arg(a)


_TABLES = ("_parameters", "_buffers", "_modules")


@contextlib.contextmanager
def attributes_kept(module: nn.Module) -> Iterator[None]:
    """Give every module under ``module`` its attributes back on exit: what was set is restored,
    what was added is removed (including parameters, buffers and submodules)."""
    saved = [(m, dict(vars(m)), {t: dict(getattr(m, t)) for t in _TABLES}) for m in module.modules()]
    try:
        yield
    finally:
        for m, attrs, tables in saved:
            for name in set(vars(m)) - set(attrs):
                del m.__dict__[name]
            m.__dict__.update(attrs)
            for table, entries in tables.items():
                current = getattr(m, table)
                if current != entries:
                    current.clear()
                    current.update(entries)


def trace(module: nn.Module, *, extra_leaves: Iterable[nn.Module] = ()) -> fx.GraphModule:
    """Symbolically trace ``module`` with :class:`SETracer`, leaving ``module`` as it was.

    Exceptions from fx propagate unchanged.
    """
    with attributes_kept(module), _kept_containers(module):
        tracer = SETracer(extra_leaves)
        graph = tracer.trace(module)
        return fx.GraphModule(tracer.root, graph, type(module).__name__)


@contextlib.contextmanager
def _kept_containers(module: nn.Module) -> Iterator[None]:
    """Give every public dict, list or set attribute under ``module`` back its content after a
    trace: caches filled during tracing hold Proxies (HF LeViT's ``attention_bias_cache``), which
    a later trace would pick up as nodes of a finished graph."""
    kept = [(value, copy) for m in module.modules() for name, value in vars(m).items()
            if not name.startswith("_") and type(value) in (dict, list, set)
            for copy in (type(value)(value),)]
    try:
        yield
    finally:
        for value, copy in kept:
            value.clear()
            (value.update if isinstance(value, (dict, set)) else value.extend)(copy)


def stash_hooks(model: nn.Module) -> dict[int, dict[str, OrderedDict]]:
    """Remove every module hook under ``model`` and return them for :func:`restore_hooks`.

    User hooks must not run (on Proxies) while se_inject traces, nor be baked into a graph.
    transformers' output-capturing hooks stay (:func:`se_inject.trace.hf.is_output_capturing_hook`):
    they are part of what the model computes (a backbone's feature maps are the hidden states
    they collect), so without them the traced graph would compute something else. Hook dicts are
    keyed by handle ids, which are unique in the process, so a kept hook's entries in the other
    dicts (``_forward_hooks_with_kwargs``, ...) are found by its id.
    """
    stash = {}
    for m in model.modules():
        stash[id(m)] = {name: getattr(m, name) for name in HOOK_DICTS if hasattr(m, name)}
        kept = {k for k, hook in getattr(m, "_forward_hooks", {}).items() if hf.is_output_capturing_hook(hook)}
        for name, hooks in stash[id(m)].items():
            setattr(m, name, OrderedDict((k, v) for k, v in hooks.items() if k in kept))
    return stash


def restore_hooks(model: nn.Module, stash: dict[int, dict[str, OrderedDict]]) -> None:
    """Put back the hooks :func:`stash_hooks` removed."""
    for m in model.modules():
        for name, hooks in stash.get(id(m), {}).items():
            setattr(m, name, hooks)


#: torch's process-wide module hooks that run user code while a module runs: forward, forward-pre
#: (``torch.nn.modules.module.register_module_forward_hook`` ...) and backward hooks.
GLOBAL_RUN_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                    "_global_backward_hooks")


def _skipping(hook: Callable[..., Any], thread: int) -> Callable[..., Any]:
    """``hook``, except in ``thread``, where it does nothing."""
    @functools.wraps(hook)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == thread:
            return None
        return hook(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def global_hooks_suspended() -> Iterator[None]:
    """Keep torch's global forward, forward-pre and backward module hooks from running in this
    thread for the ``with`` body, as :func:`stash_hooks` does for the hooks of one model.

    The hooks are process-wide, so they are not removed: each is wrapped, under its own id, in a
    function that does nothing in this thread and calls it in every other thread, whose forwards
    keep their hooks. Their handles keep working: one removed meanwhile stays removed, one
    registered meanwhile stays registered, and on exit (an error included) every hook still
    registered is itself again. The global *registration* hooks (buffers, modules, parameters)
    are left alone: they describe how modules are built, and the SE blocks se_inject installs are
    built during the analysis, so a hook that, say, moves every new parameter must see them.
    """
    thread = threading.get_ident()
    wrapped: list[tuple[dict, Any, Callable[..., Any], Callable[..., Any]]] = []
    for name in GLOBAL_RUN_HOOKS:
        hooks = getattr(_torch_module, name)
        for key, hook in list(hooks.items()):
            wrapper = _skipping(hook, thread)
            hooks[key] = wrapper
            wrapped.append((hooks, key, hook, wrapper))
    try:
        yield
    finally:
        for hooks, key, hook, wrapper in wrapped:
            if hooks.get(key) is wrapper:
                hooks[key] = hook
