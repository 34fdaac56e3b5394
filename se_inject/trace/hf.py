"""What se_inject does differently for Hugging Face transformers models.

Nothing here imports transformers unless the model already comes from it (``import se_inject``
must not pull it in): a model is a transformers model only if transformers is already imported.

* :func:`prepared` installs transformers' output-capturing hooks before the swap. transformers
  installs them lazily, the first time ``output_hidden_states=True`` is asked for, on modules
  matched with ``isinstance``; a block that se_inject rewrote is a ``GraphModule`` and would be
  missed, and its hidden state silently dropped. Installed beforehand, the hooks move with the
  block like any other hook; if the swap fails, they are taken off again. transformers makes each
  hook a closure, which pickle cannot save; :class:`CaptureHook` stands in for it, rebuilding the
  same closure with transformers' own function, so converted models pickle like the originals.
* The capturing hooks are part of what a model computes, not user hooks: a backbone (which
  transformers hooks in ``post_init``) builds its feature maps from the hidden states they
  collect. :func:`is_output_capturing_hook` tells them apart, so that the analysis keeps them
  while it stashes the user's hooks (:func:`se_inject.trace.tracer.stash_hooks`), and the analysis
  :func:`prepare` s its copy first, so that transformers never installs them lazily into the
  stashed hook dicts (where they would be lost, with the "installed" flag left set).
* :func:`default_input_size` reads ``num_channels`` and ``image_size`` from the model's config.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections import OrderedDict
from typing import Any, Callable, Iterator, Optional

from torch import nn

__all__ = ["is_hf_model", "is_output_capturing_hook", "prepare", "prepared", "default_input_size", "CaptureHook"]


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (False when transformers is not imported)."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not type(model).__module__.startswith("transformers."):
        return False
    return isinstance(model, transformers.PreTrainedModel)


_CAPTURING = "transformers.utils.output_capturing"
_CLOSURE = "install_output_capuring_hook.<locals>.output_capturing_hook"  # transformers' spelling


def _install_function() -> Callable[..., None]:
    from transformers.utils.output_capturing import install_output_capuring_hook

    return install_output_capuring_hook


class CaptureHook:
    """transformers' output-capturing forward hook, as an object that pickles.

    ``install_output_capuring_hook(module, key, index, ...)`` registers a closure over its
    arguments; pickle cannot save a closure, so a model holding one cannot be pickled or
    ``torch.save``d. A ``CaptureHook`` keeps those arguments, builds the very same closure with
    transformers' function (on a throwaway module), and calls it; pickling records the arguments
    only, and unpickling builds the closure again.
    """

    def __init__(self, **arguments: Any) -> None:
        self.arguments = arguments
        probe = nn.Module()
        _install_function()(probe, **arguments)
        (self._hook,) = probe._forward_hooks.values()

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return self._hook(module, args, output)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_capture_hook, (self.arguments,))

    def __repr__(self) -> str:
        return f"CaptureHook({', '.join(f'{k}={v!r}' for k, v in self.arguments.items())})"


def _capture_hook(arguments: dict[str, Any]) -> CaptureHook:
    return CaptureHook(**arguments)


def _as_capture_hook(hook: Any) -> Optional[CaptureHook]:
    """The :class:`CaptureHook` doing what ``hook`` does, if it is transformers' capture closure."""
    if getattr(hook, "__module__", None) != _CAPTURING or getattr(hook, "__qualname__", None) != _CLOSURE:
        return None
    parameters = list(inspect.signature(_install_function()).parameters)[1:]  # after the module
    free = inspect.getclosurevars(hook).nonlocals
    if not set(parameters) <= set(free):  # a transformers whose closure no longer holds its arguments
        return None
    return CaptureHook(**{name: free[name] for name in parameters})


def is_output_capturing_hook(hook: Any) -> bool:
    """Whether ``hook`` is one of the forward hooks transformers installs to capture outputs
    (its own closure, or the :class:`CaptureHook` that stands in for it)."""
    return isinstance(hook, CaptureHook) or getattr(hook, "__module__", None) == _CAPTURING


def prepare(model: nn.Module) -> None:
    """Install transformers' output-capturing hooks on every transformers model under ``model``,
    each as a :class:`CaptureHook` (those transformers installed before are replaced too)."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers before the hook-based output capture
        return
    for m in model.modules():
        if is_hf_model(m) and getattr(m, "_can_record_outputs", None):
            maybe_install_capturing_hooks(m)
    for m in model.modules():
        hooks = m._forward_hooks
        for handle_id, hook in list(hooks.items()):
            replacement = _as_capture_hook(hook)
            if replacement is not None:
                hooks[handle_id] = replacement


_FORWARD_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_INSTALLED = "_output_capturing_hooks_installed"


@contextlib.contextmanager
def prepared(model: nn.Module) -> Iterator[None]:
    """:func:`prepare` ``model`` for the ``with`` body; if the body raises, every module gets its
    forward hooks (and transformers' installed flag) back as they were."""
    if "transformers" not in sys.modules:
        yield
        return
    saved = [(m, {name: OrderedDict(getattr(m, name)) for name in _FORWARD_HOOKS if hasattr(m, name)},
              vars(m).get(_INSTALLED, _INSTALLED)) for m in model.modules()]
    prepare(model)
    try:
        yield
    except BaseException:
        for m, hooks, flag in saved:
            for name, entries in hooks.items():
                getattr(m, name).clear()
                getattr(m, name).update(entries)
            if flag is _INSTALLED:
                vars(m).pop(_INSTALLED, None)
            else:
                m.__dict__[_INSTALLED] = flag
        raise


def default_input_size(model: nn.Module) -> Optional[tuple[int, int, int]]:
    """(channels, height, width) from a transformers model's config, or None."""
    if not is_hf_model(model):
        return None
    config = model.config
    channels = getattr(config, "num_channels", None) or 3
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(channels), int(size[0]), int(size[1])
    if isinstance(size, int) and size > 0:
        return int(channels), size, size
    return None
