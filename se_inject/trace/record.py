"""Record what modules receive and return in a real forward, and compare two outputs.

One mechanism for every forward se_inject watches. :func:`watch` hooks a set of modules (a
forward pre-hook and a forward hook each, always removed); :func:`recording` builds on it and
keeps the first call of each module as a :class:`Call`, with options for what it keeps:

* ``inputs``: ``"clone"`` (shape propagation and verification rerun a graph on what its module
  received, which the module may write in place afterwards), ``"keep"`` (enough to know how a
  block was called, for its signature) or None;
* ``outputs``: a clone of what the first call returned, to compare a graph's output with;
* ``bind``: the call bound to the forward's signature, which arguments held tensors and the values
  of the others (no tensor is kept), how many arguments were passed, and the structure of the
  output: how a module is traced with its options baked in (:mod:`se_inject.trace.specialize`),
  and how a cut block returns what its module returned;
* ``names``: the path of each module running, so that a failing forward says where it failed.

:func:`record_calls` is the search's forward: every module, ``bind``, ``names``.
:mod:`se_inject.trace.leaf_axis` watches the leaves with :func:`watch` to follow tensors by
identity. :func:`outputs_match` compares a recorded output with a graph's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ..utils import clone_tensors

__all__ = ["Call", "Recording", "ForwardFailed", "watch", "recording", "record_calls", "outputs_match"]

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
class Call:
    """The first call of a module in a forward, and how often it ran; what is filled depends on
    what :func:`recording` was asked to keep.

    Attributes:
        count: how many times the module ran.
        args / kwargs: what the first call received: clones, or the objects themselves
            (``inputs=``).
        output: a clone of what the first call returned (``outputs=True``; None until it returned).
        arguments: (``bind=True``) (name, value or None for a tensor argument, positional-only,
            holds a tensor), in signature order, ``**kwargs`` spread out; None when the call cannot
            be re-made by name (it passed ``*args``, or does not bind to the forward's signature).
        passed: (``bind=True``) how many arguments the caller passed (positional and keyword).
        returned: (``bind=True``) the structure of the first call's output and its leaves, tensors
            replaced by a marker (None when the output was a bare tensor).
    """

    count: int = 0
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    arguments: Optional[list[tuple[str, Any, bool, bool]]] = None
    passed: int = 0
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


class Recording(dict):
    """What :func:`recording` saw: ``id(module)`` -> the :class:`Call` of every module that ran.

    ``get`` takes a module or its id. ``output`` is the model's output (:func:`record_calls`);
    ``running`` the paths of the modules running, innermost last (with ``names``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None
        self.running: list[str] = []

    def ran(self, module: nn.Module) -> bool:
        return id(module) in self

    def get(self, key: Any, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(id(key) if isinstance(key, nn.Module) else key, default)


@contextlib.contextmanager
def watch(modules: Iterable[nn.Module], before: Optional[Callable[[nn.Module, tuple, dict], None]] = None,
          after: Optional[Callable[[nn.Module, tuple, Any], None]] = None) -> Iterator[None]:
    """For the ``with`` body, call ``before(module, args, kwargs)`` as each of ``modules`` starts
    and ``after(module, args, output)`` as it returns; the hooks are removed on exit, an error
    included. The one place se_inject hooks a forward."""
    handles = []
    try:
        for m in dict.fromkeys(modules):
            if before is not None:
                handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            if after is not None:
                handles.append(m.register_forward_hook(after))
        yield
    finally:
        for h in handles:
            h.remove()


_KEEP: dict[Optional[str], Optional[Callable[[Any], Any]]] = {"clone": clone_tensors, "keep": lambda tree: tree,
                                                              None: None}


@contextlib.contextmanager
def recording(modules: Iterable[nn.Module], *, inputs: Optional[str] = "clone", outputs: bool = True,
              bind: bool = False, names: Optional[Mapping[int, str]] = None) -> Iterator[Recording]:
    """Record the first call of each module while the ``with`` body runs a forward.

    Yields a :class:`Recording` filled as modules run (modules that never run have no entry).
    ``inputs`` (``"clone"``, ``"keep"`` or None), ``outputs``, ``bind`` and ``names`` (module id
    -> path) say what is kept: see the module docstring.
    """
    if inputs not in _KEEP:
        raise ValueError(f"inputs must be 'clone', 'keep' or None, got {inputs!r}")
    found = Recording()
    keep = _KEEP[inputs]

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if names is not None:
            found.running.append(names.get(id(module), "?"))
        call = found.setdefault(id(module), Call())
        call.count += 1
        if call.count > 1:
            return
        if keep is not None:
            call.args, call.kwargs = keep(args), keep(dict(kwargs))
        if bind:
            bound = _bind(module, args, kwargs)
            call.arguments = None if bound is None else [
                (name, None, positional, True) if _holds_tensor(value) else (name, value, positional, False)
                for name, value, positional in bound]
            call.passed = len(args) + len(kwargs)

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        if names is not None:
            found.running.pop()
        call = found[id(module)]
        if call.count != 1:
            return
        if outputs and call.output is None:
            call.output = clone_tensors(output)
        if bind and not isinstance(output, torch.Tensor):
            leaves, spec = tree_flatten(output)
            call.returned = (spec, [_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])

    with watch(modules, before, after if (outputs or bind or names is not None) else None):
        yield found


class ForwardFailed(Exception):
    """The model's own forward failed in :func:`record_calls`; ``path`` is the innermost module
    that was running."""

    def __init__(self, error: Exception, path: str) -> None:
        super().__init__(str(error))
        self.error, self.path = error, path


def record_calls(model: nn.Module, inputs: tuple[Any, ...]) -> Recording:
    """Run ``model(*inputs)`` once (no grad) and record every module's first call as the search
    needs it: bound to its signature, without tensors (``bind=True``), and the model's output.

    Raises:
        ForwardFailed: the forward raised; it carries the error and where it happened.
    """
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    with recording(model.modules(), inputs=None, outputs=False, bind=True, names=names) as found:
        try:
            with torch.no_grad():
                found.output = model(*inputs)
        except Exception as e:
            raise ForwardFailed(e, found.running[-1] if found.running else "") from e
    return found


def _plain(value: Any) -> Any:
    """A traced graph's output in plain containers: fx returns its own ``immutable_list`` and
    ``immutable_dict``, which pytree would take for leaves, not for the list or dict they are."""
    if type(value).__name__ == "immutable_list":
        return [_plain(v) for v in value]
    if type(value).__name__ == "immutable_dict":
        return {k: _plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(v) for v in value)
    if type(value) is dict:
        return {k: _plain(v) for k, v in value.items()}
    return value


def outputs_match(expected: Any, actual: Any) -> Optional[str]:
    """None if two outputs match (structure, shapes, values within rtol 1e-4 / atol 1e-5),
    else what differs."""
    exp_leaves, exp_spec = tree_flatten(_plain(expected))
    act_leaves, act_spec = tree_flatten(_plain(actual))
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
