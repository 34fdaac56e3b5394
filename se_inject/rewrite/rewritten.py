"""The GraphModule that stands in for a rewritten block, keeping everything the block had.

``fx.GraphModule`` only copies what its graph references, replaces intermediate containers with
bare modules, and loses its class name and other attributes when deep-copied (timm's model EMA
deep-copies models). :class:`RewrittenBlock` keeps every child module, parameter, buffer, hook
and public attribute of the module it replaces, under its own names and in its own order, also
through ``copy.deepcopy``.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from typing import Any, Callable, Mapping, Optional

from torch import fx, nn

from ..trace.tracer import HOOK_DICTS

__all__ = ["RewrittenBlock", "graph_module_like", "share_hooks"]


def share_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the module hooks of ``source`` (forward, backward and state_dict hooks).

    The hook dicts themselves are shared, so a handle taken on ``source`` before the swap still
    removes its hook from ``target``.
    """
    for name in HOOK_DICTS:
        if hasattr(source, name):
            setattr(target, name, getattr(source, name))



def _adopt(gm: nn.Module, module: nn.Module) -> None:
    """Give ``gm`` every child, parameter, buffer, hook and public attribute of ``module``."""
    for table in ("_modules", "_parameters", "_buffers"):
        original = getattr(module, table)
        merged = OrderedDict(original)
        merged.update((k, v) for k, v in getattr(gm, table).items() if k not in original)
        setattr(gm, table, merged)
    # Constants fx lifted out of the code (``_tensor_constant0``) are not state: keep them out
    # of state_dict so that keys stay those of the original module.
    gm._non_persistent_buffers_set = set(module._non_persistent_buffers_set) | (
        set(gm._buffers) - set(module._buffers))
    share_hooks(module, gm)
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training" or callable(value) or value is None:
            continue
        if not hasattr(gm, name):
            setattr(gm, name, value)
    gm.training = module.training


class RewrittenBlock(fx.GraphModule):
    """A GraphModule named like the block it replaces, that keeps all of it through deep copies."""

    def _deepcopy_init(self) -> Callable[..., None]:
        return functools.partial(fx.GraphModule.__init__, class_name=type(self).__name__)

    def __deepcopy__(self, memo: dict[int, Any]) -> "RewrittenBlock":
        res = super().__deepcopy__(memo)
        body = copy.deepcopy(self.__dict__, memo)  # the copies fx just made, from memo
        source = nn.Module()
        source.__dict__.update(body)
        _adopt(res, source)
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        _, (body, import_block) = super().__reduce__()
        return (_unpickle, (body, import_block, type(self).__name__))


def _unpickle(body: dict[str, Any], import_block: str, name: str) -> RewrittenBlock:
    """Rebuild a pickled :class:`RewrittenBlock`: fx rebuilds the GraphModule, this keeps its name
    and everything else."""
    gm = fx.graph_module.reduce_graph_module(body, import_block)
    return graph_module_like(gm, gm.graph, name=name)

def _graph_targets(module: nn.Module, graph: fx.Graph, extra: Mapping[str, Any]) -> dict[str, Any]:
    """What the graph's call_module / get_attr nodes refer to: ``extra`` first, then ``module``."""
    found: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            found[target] = extra[target] if target in extra else (
                module.get_submodule(target) if node.op == "call_module" else _get_attr(module, target))
    return found


def _get_attr(module: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def graph_module_like(module: nn.Module, graph: fx.Graph, extra: Optional[Mapping[str, Any]] = None, *,
                      name: Optional[str] = None) -> RewrittenBlock:
    """A GraphModule running ``graph`` that keeps everything ``module`` has.

    ``fx.GraphModule`` only copies what the graph references, and replaces intermediate
    containers (``downsample`` of ``downsample.0``) with bare modules. Here every child module,
    parameter and buffer (persistence included) of ``module`` is kept under its own name and in
    its own order, so state_dict keys do not change, ``block.downsample[0]`` still indexes, hooks
    still fire (the hook dicts are shared), and public non-callable attributes remain readable.
    The class name is kept for ``repr``; the object is a GraphModule, not an instance of
    ``type(module)``. ``extra`` gives modules the graph calls that ``module`` does not have yet
    (the SE blocks), by attribute name. ``name`` replaces the class name.
    """
    gm = RewrittenBlock(_graph_targets(module, graph, extra or {}), graph, name or type(module).__name__)
    _adopt(gm, module)
    return gm
