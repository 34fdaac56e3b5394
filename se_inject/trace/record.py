"""Record what modules receive and return during a real forward, and compare two outputs.

Shape propagation records the inputs of nested scopes with it, and verification records the
inputs and outputs of rewritten blocks; both go through :func:`recording`, which clones what it
records (a module may modify its input in place afterwards) and always removes its hooks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..utils import clone_tensors

__all__ = ["Call", "recording", "outputs_match"]


@dataclass
class Call:
    """The first call of a module in a forward, and how often it was called.

    Attributes:
        args / kwargs: clones of what the first call received.
        output: a clone of what it returned (None until it returned).
        count: how many times the module ran.
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    count: int = 0


@contextlib.contextmanager
def recording(modules: Iterable[nn.Module], *, outputs: bool = True, clone: bool = True
              ) -> Iterator[dict[int, Call]]:
    """Record the first call of each module while the ``with`` body runs a forward.

    Yields a dict filled as modules run: ``id(module)`` -> :class:`Call` (modules that never run
    have no entry). With ``outputs=False`` only inputs and counts are recorded; with
    ``clone=False`` the inputs are kept as given (enough to know how a module was called).
    """
    calls: dict[int, Call] = {}
    copy = clone_tensors if clone else (lambda tree: tree)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = calls.setdefault(id(module), Call())
        call.count += 1
        if call.count == 1:
            call.args, call.kwargs = copy(args), copy(dict(kwargs))

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        call = calls[id(module)]
        if call.count == 1 and call.output is None:
            call.output = clone_tensors(output)

    handles = []
    try:
        for m in dict.fromkeys(modules):
            handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
            if outputs:
                handles.append(m.register_forward_hook(post_hook))
        yield calls
    finally:
        for h in handles:
            h.remove()


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
