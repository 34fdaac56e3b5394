"""One iteration of a variant, eager or under ``torch.compile``, and the guards that keep a
compiled figure honest.

torch.compile keeps what it compiled on the *code object* it ran (``ResNet.forward``), shared by
every model of that class: each converted model brings new classes, so each adds an entry to the
same code's cache, and past ``torch._dynamo.config.recompile_limit`` (8) dynamo silently runs
the model eagerly. A benchmark that compiles variant after variant in one process then reports
eager times as compiled ones (issue 21). Three things prevent that here:

* every cell starts with ``torch._dynamo.reset()``: nothing compiled for an earlier cell is
  reused or counted;
* within a cell, each variant is compiled through its own function with its own code object
  (:func:`own_frame`), with ``dynamic=False``: its compiled entries, its recompile count and its
  dynamic-shape state are its own, as in a fresh process. (A reset before each variant cannot
  do this: it throws away the compiled code of the variants already compiled, which the
  interleaved rounds then recompile while being timed.);
* compiling runs under :func:`recompile_guard` (``fail_on_recompile_limit_hit``): a variant
  that hits the limit raises instead of running eagerly, and the timed rounds run under
  :func:`no_recompiles` (``error_on_recompile``): a round that would compile raises instead of
  timing the compiler.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import types
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .variants import logits

__all__ = ["Step", "make_step", "own_frame", "recompile_guard", "no_recompiles", "fresh_compiles", "freezing"]

_FRAMES = itertools.count()
#: torch.compile modes that capture CUDA graphs, which need each iteration marked.
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def own_frame(model: nn.Module, label: str) -> Callable[..., Any]:
    """``lambda *args: model(*args)`` with a code object of its own, named for ``label``.

    Dynamo caches compiled code, counts recompiles and keeps its automatic-dynamic state per code
    object (and per code name): compiled through this function, ``model`` shares none of them
    with any other model, though their ``forward`` is the same code.
    """
    def call(*args: Any) -> Any:
        return model(*args)

    name = f"bench_{next(_FRAMES)}_{re.sub(r'[^0-9a-zA-Z_]', '_', label)}"
    names = {"co_name": name, **({"co_qualname": name} if hasattr(call.__code__, "co_qualname") else {})}
    code = call.__code__.replace(**names)
    return types.FunctionType(code, call.__globals__, name, call.__defaults__, call.__closure__)


@contextlib.contextmanager
def recompile_guard() -> Iterator[None]:
    """Within: a recompile-limit hit raises (``FailOnRecompileLimitHit``) instead of running eagerly."""
    import torch._dynamo

    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


@contextlib.contextmanager
def no_recompiles(active: bool = True) -> Iterator[None]:
    """Within (when ``active``): compiling code that was compiled before raises
    (``error_on_recompile``), so a timed round never times the compiler."""
    if not active:
        yield
        return
    import torch._dynamo

    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def fresh_compiles() -> None:
    """Forget everything torch.compile compiled in this process (``torch._dynamo.reset()``)."""
    import torch._dynamo

    torch._dynamo.reset()


@contextlib.contextmanager
def freezing(active: bool) -> Iterator[None]:
    """Within (when ``active``): inductor freezes weights into compiled inference graphs."""
    if not active:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        yield


class Step:
    """One iteration of a variant: ``step()`` runs it; ``forward()`` only its forward, as the
    iteration runs it (for counting what it saves for backward)."""

    def __init__(self, run: Callable[[], Any], forward: Callable[[], Any], model: nn.Module,
                 optimizer: Optional[torch.optim.Optimizer]) -> None:
        self.run, self.forward, self.model, self.optimizer = run, forward, model, optimizer

    def __call__(self) -> Any:
        return self.run()

    def clear_grads(self) -> None:
        """Free the gradients the last training step left (before measuring a step's memory)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)


def make_step(model: nn.Module, label: str, *, mode: str, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
              compiled: bool, compile_mode: Optional[str] = None, backend: str = "inductor") -> Step:
    """The iteration ``mode`` ("infer" or "train") of ``model`` on ``x`` (targets ``y``), under
    autocast to ``dtype`` (none for float32), compiled (the forward) when ``compiled``."""
    fn = own_frame(model, label)
    if compiled:
        fn = torch.compile(fn, mode=compile_mode, backend=backend, dynamic=False)
    device_type = x.device.type
    autocast = dtype != torch.float32
    mark = compiled and compile_mode in _CUDAGRAPH_MODES and device_type == "cuda"

    def forward() -> Any:
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device_type, dtype=dtype, enabled=autocast):
            return fn(x)

    if mode == "infer":
        model.eval()

        def infer() -> Any:
            with torch.no_grad():
                return forward()
        return Step(infer, forward, model, None)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train() -> Any:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits(forward()).float(), y)
        loss.backward()
        optimizer.step()
        return loss
    return Step(train, forward, model, optimizer)
