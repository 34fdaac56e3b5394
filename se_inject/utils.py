"""Small helpers every layer of se_inject shares: module paths, error text, pytree clones,
training flags, warnings that point at the caller, and name mismatches."""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import sys
import warnings
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = [
    "join_path", "relative_path", "first_line", "describe_error", "clone_tensors", "kept_training_flags",
    "eval_mode", "gc_paused", "rng_kept", "torch_defaults", "warn", "version", "describe_mismatch",
]

#: Device types whose autocast :func:`torch_defaults` switches off (those torch knows by name).
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla")


def join_path(*parts: str) -> str:
    """Join module path parts, skipping empty ones (the root's path is ``""``).

    >>> join_path("", "layer1", "0")
    'layer1.0'
    """
    return ".".join(p for p in parts if p)


def relative_path(path: str, prefix: str) -> str:
    """``path`` relative to the module at ``prefix`` (``""`` is the root).

    >>> relative_path("layer1.0.conv1", "layer1.0"), relative_path("fc", "")
    ('conv1', 'fc')
    """
    return path[len(prefix) + 1:] if prefix else path


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message ('' when it has none)."""
    return (str(error).strip().splitlines() or [""])[0]


def describe_error(error: BaseException) -> str:
    """``"TypeName: first line of the message"``, for one-line error reports."""
    return f"{type(error).__name__}: {first_line(error)}"


def clone_tensors(tree: Any) -> Any:
    """A copy of a pytree (tuples, lists, dicts) whose tensors are cloned, other leaves shared."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


@contextlib.contextmanager
def kept_training_flags(model: nn.Module) -> Iterator[dict[int, bool]]:
    """Give every module under ``model`` its own training flag back on exit.

    Yields the saved flags, by ``id`` of the module.
    """
    flags = {id(m): m.training for m in model.modules()}
    try:
        yield flags
    finally:
        for m in model.modules():
            m.training = flags.get(id(m), m.training)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[dict[int, bool]]:
    """Put ``model`` in eval mode, then give every module back its own training flag."""
    with kept_training_flags(model) as flags:
        model.eval()
        yield flags


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: tracing makes many short-lived node cycles, and a
    full collection over a large model's objects stalls for a good fraction of a second."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _internal(frame: Any) -> bool:
    name = frame.f_globals.get("__name__", "")
    return name == "se_inject" or name.startswith("se_inject.")


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the first frame outside se_inject: the user's own line,
    whichever public function they called."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and _internal(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def version() -> str:
    """The installed version of se_inject (``"0+unknown"`` when run from a source tree)."""
    try:
        return importlib.metadata.version("se-inject")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _names(items: list[str], limit: int) -> str:
    return f"{items[:limit]}{' ...' if len(items) > limit else ''}"


def describe_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], *,
                      aliases: Iterable[str] = (), limit: int = 5, dtypes: bool = False) -> Optional[str]:
    """None if ``given`` has exactly the names and shapes of ``expected`` (and with ``dtypes``
    their dtypes), else what differs.

    ``aliases`` are expected names that may be absent (tied tensors stored once). At most
    ``limit`` names are shown per kind of difference.
    """
    missing = sorted(set(expected) - set(given) - set(aliases))
    extra = sorted(set(given) - set(expected))
    wrong = [f"{k}: {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
             for k in given if k in expected and tuple(given[k].shape) != tuple(expected[k].shape)]
    typed = [f"{k}: {str(given[k].dtype).removeprefix('torch.')} vs {str(expected[k].dtype).removeprefix('torch.')}"
             for k in given if dtypes and k in expected and given[k].dtype != expected[k].dtype]
    parts = [f"{label} {_names(items, limit)}" for label, items in
             (("missing tensors", missing), ("unexpected tensors", extra), ("tensors of the wrong shape", wrong),
              ("tensors of the wrong dtype", typed))
             if items]
    return "; ".join(parts) or None


@contextlib.contextmanager
def rng_kept(model: nn.Module) -> Iterator[None]:
    """Give back torch's random state (CPU, and the CUDA devices ``model`` is on) on exit."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def torch_defaults() -> Iterator[None]:
    """Run with torch's own defaults: no ambient default device and no autocast.

    A caller's ``with torch.device("meta"):`` or ``torch.set_default_device(...)`` (a
    ``DeviceContext`` on torch's function-mode stack) is taken off the stack for the duration, and
    put back on exit, so that factory calls without a device (se_inject's own, and those fx records
    while tracing) make CPU tensors as they would anywhere else, instead of tensors on a device the
    model is not on. Autocast is switched off on every device type where it is on, so that modules
    are built and checked in the dtype of the tensors they will see, and outputs are compared in
    the model's own dtype. Other function modes stay as they are. The stack is thread-local, as is
    autocast's state.
    """
    from torch.overrides import _pop_mode, _push_mode  # how torch's own DeviceContext moves itself
    from torch.utils import _device

    saved = [_pop_mode() for _ in range(torch._C._len_torch_function_stack())]  # innermost first
    for mode in reversed(saved):
        if not isinstance(mode, _device.DeviceContext):
            _push_mode(mode)
    current, _device.CURRENT_DEVICE = _device.CURRENT_DEVICE, None
    try:
        with contextlib.ExitStack() as stack:
            for device_type in _AUTOCAST_DEVICE_TYPES + (torch._C._get_privateuse1_backend_name(),):
                if (torch.amp.autocast_mode.is_autocast_available(device_type)
                        and torch.is_autocast_enabled(device_type)):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            yield
    finally:
        for _ in range(torch._C._len_torch_function_stack()):
            _pop_mode()
        for mode in reversed(saved):
            _push_mode(mode)
        _device.CURRENT_DEVICE = current
