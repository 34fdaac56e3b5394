"""The ``torch.fx`` tracer se_inject uses, and the GraphModule that stands in for a module.

:class:`SETracer` extends torchvision's ``LeafModuleAwareTracer``. Its leaves are:

* every convolution, linear, norm and regulariser module, subclasses included (so timm's
  ``StdConv2d`` stays one node instead of a conv plus weight-standardisation ops, and
  ``DropPath`` / ``StochasticDepth`` keep their train-mode behaviour);
* the modules and functions of timm's no-trace registry (``timm.layers._fx``), which is what makes
  timm models traceable; se_inject looks inside those leaves separately;
* se_inject's own :class:`~se_inject.se_block.SEBlock`, and other libraries' ``*DropPath``
  modules (:func:`~se_inject.ops.is_regularizer_module`);
* any module object passed in ``extra_leaves``.

A dict that is also a dataclass (transformers' ``ModelOutput``) stays that class in the graph's
output instead of becoming a plain dict.

Each node records its module path in ``node.meta["nn_module_stack"]`` (fx does this itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import OrderedDict
from typing import Any, Iterable, Iterator

import torchvision.ops
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import fx, nn
from torchvision.models.feature_extraction import LeafModuleAwareTracer

from .ops import LEAF_TYPES, is_regularizer_module

__all__ = ["SETracer", "trace", "graph_module_like", "copy_hooks", "stash_hooks", "restore_hooks"]


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

    def create_arg(self, a: Any) -> Any:
        # fx checks ``isinstance(a, dict)`` before dataclasses, so a ModelOutput would come out of
        # the graph as a plain dict: build the same class instead.
        if isinstance(a, dict) and dataclasses.is_dataclass(a) and not isinstance(a, type):
            kwargs = {f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a)}
            return self.create_node("call_function", type(a), (), kwargs)
        return super().create_arg(a)


def trace(module: nn.Module, *, extra_leaves: Iterable[nn.Module] = ()) -> fx.GraphModule:
    """Symbolically trace ``module`` with :class:`SETracer`.

    Tracing stores constant tensors it meets as attributes of ``module`` (fx's behaviour), so
    trace a copy when the module must stay untouched. Exceptions from fx propagate unchanged.
    """
    tracer = SETracer(extra_leaves)
    with _kept_containers(module):
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


_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def copy_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the module hooks of ``source`` (forward, backward and state_dict hooks)."""
    for name in _HOOK_DICTS:
        if hasattr(source, name):
            setattr(target, name, OrderedDict(getattr(source, name)))


def stash_hooks(model: nn.Module) -> dict[int, dict[str, OrderedDict]]:
    """Remove every module hook under ``model`` and return them for :func:`restore_hooks`.

    User hooks must not run (on Proxies) while se_inject traces, nor be baked into a graph.
    """
    stash = {}
    for m in model.modules():
        stash[id(m)] = {name: getattr(m, name) for name in _HOOK_DICTS if hasattr(m, name)}
        for name in stash[id(m)]:
            setattr(m, name, OrderedDict())
    return stash


def restore_hooks(model: nn.Module, stash: dict[int, dict[str, OrderedDict]]) -> None:
    """Put back the hooks :func:`stash_hooks` removed."""
    for m in model.modules():
        for name, hooks in stash.get(id(m), {}).items():
            setattr(m, name, hooks)


def graph_module_like(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running ``graph`` that keeps everything ``module`` has.

    ``fx.GraphModule`` only copies what the graph references, and replaces intermediate
    containers (``downsample`` of ``downsample.0``) with bare modules. Here every child module,
    parameter and buffer (persistence included) of ``module`` is kept under its own name and in
    its own order, so state_dict keys do not change, ``block.downsample[0]`` still indexes, hooks
    still fire, and public non-callable attributes remain readable. The class name is kept for
    ``repr``; the object is a GraphModule, not an instance of ``type(module)``.
    """
    gm = fx.GraphModule(module, graph, type(module).__name__)
    for table in ("_modules", "_parameters", "_buffers"):
        original = getattr(module, table)
        merged = OrderedDict(original)
        merged.update((k, v) for k, v in getattr(gm, table).items() if k not in original)
        setattr(gm, table, merged)
    # Constants fx lifted out of the code (``_tensor_constant0``) are not state: keep them out
    # of state_dict so that keys stay those of the original module.
    gm._non_persistent_buffers_set = set(module._non_persistent_buffers_set) | (
        set(gm._buffers) - set(module._buffers)
    )
    copy_hooks(module, gm)
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training" or callable(value) or value is None:
            continue
        if not hasattr(gm, name):
            setattr(gm, name, value)
    gm.training = module.training
    return gm
