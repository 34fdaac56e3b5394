"""Does a model rebuilt from a recipe compute what the model being saved computes?

:func:`se_inject.save` rebuilds the model from the source it is about to record and compares it
with the model it saves. Equal tensor names and shapes are not enough: a timm kwarg such as
``act_layer="silu"``, ``global_pool="max"`` or ``output_stride=16`` changes the computation but
no tensor. So the rebuilt model gets the saved model's weights and both run once on the example
input (:func:`output_difference`); when they differ, :func:`likely_cause` says what probably
differs: the kwargs timm recorded on the model (``model._model_args``) that the recipe lacks, and
the first modules whose type or settings differ.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..errors import RecipeError
from ..trace.record import outputs_match
from ..trace.tracer import restore_hooks, stash_hooks
from ..utils import describe_error, eval_mode

__all__ = ["floating_dtype", "check_one_dtype", "output_difference", "likely_cause"]


def floating_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the first floating parameter of ``model`` (float32 when it has none)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return param.dtype if param is not None else torch.float32


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_one_dtype(model: nn.Module) -> None:
    """A recipe records one floating dtype: refuse a model whose floating tensors do not share it
    (``load`` would cast them silently)."""
    dtype = floating_dtype(model)
    other = [f"{k}: {_name(v.dtype)}" for k, v in model.state_dict().items()
             if v.is_floating_point() and v.dtype != dtype]
    if other:
        raise RecipeError(f"{type(model).__name__} mixes floating dtypes ({len(other)} tensors are not "
                          f"{_name(dtype)}, e.g. {other[:3]}); a recipe records one dtype for the whole model: "
                          f"cast it first, e.g. model.to({dtype})")


def output_difference(rebuilt: nn.Module, model: nn.Module, inputs: tuple[Any, ...]) -> Optional[str]:
    """How ``rebuilt``, given ``model``'s weights, differs from ``model`` on ``inputs`` (CPU
    tensors); None when the outputs match (see :func:`se_inject.trace.record.outputs_match`).

    Both run in eval mode without gradients on ``model``'s device; ``model`` runs without its
    hooks and is left as it was (its training flags, hooks and tensors).
    """
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.to(device)
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    hooks = stash_hooks(model)
    try:
        with torch.no_grad(), eval_mode(model):
            expected = model(*inputs)
            got = rebuilt.eval()(*inputs)
    except Exception as e:  # whatever the model raises; it ran in inject() on this very input
        return f"running it fails with {describe_error(e)}"
    finally:
        restore_hooks(model, hooks)
    return outputs_match(expected, got)


def _as_json(value: Any) -> Any:
    """``value`` as a recipe would record it (tuples become lists), or its repr if it has no JSON form."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return repr(value)


def likely_cause(rebuilt: nn.Module, model: nn.Module, kwargs: Optional[Mapping[str, Any]]) -> str:
    """What probably makes ``rebuilt`` compute something else than ``model``: for a timm source
    (``kwargs``, the recorded kwargs), the kwargs timm recorded in ``model._model_args`` that
    differ from them; then the first leaf modules whose type or ``extra_repr`` differ. Empty when
    nothing is found; else ``": ..."``, to append to a message."""
    parts = []
    built_with = getattr(model, "_model_args", None)
    if kwargs is not None and isinstance(built_with, dict):
        missing = {k: v for k, v in built_with.items() if k not in kwargs or _as_json(kwargs[k]) != _as_json(v)}
        if missing:
            parts.append(f"model_kwargs probably lack {missing} (the kwargs timm recorded in model._model_args)")
    mine = dict(model.named_modules())
    differ = []
    for name, module in rebuilt.named_modules():
        other = mine.get(name)
        if other is None or next(module.children(), None) is not None:
            continue
        a, b = f"{type(module).__name__}({module.extra_repr()})", f"{type(other).__name__}({other.extra_repr()})"
        if a != b:
            differ.append(f"{name or '<root>'} is {b}, rebuilt as {a}")
    if differ:
        counted = f"{len(differ)} modules differ" if len(differ) > 1 else "1 module differs"
        parts.append(f"{counted}, e.g. {'; '.join(differ[:2])}")
    return f": {'; '.join(parts)}" if parts else ""
