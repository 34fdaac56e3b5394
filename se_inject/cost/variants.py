"""The variants of one model a benchmark compares, all built from one seed.

* ``original``: the model as timm (or transformers) builds it;
* ``se_inject``: :func:`se_inject.inject` of the original with the run's options, and copies of it
  forced to plain torch ops or to the fused op (``se_inject plain`` / ``se_inject fused``);
* ``timm``: timm's hand-written model with the same attention at the same place, its *twin*
  (seresnet50 for resnet50 with ``attn="se"``, ecaresnet50d for resnet50d with ``attn="eca"``,
  gcresnet33ts for resnet33ts with ``attn="gca", position="mid"``...). :data:`TWINS` is the one
  table of these pairs, by attention and position; a twin is timed only if timm has it and it
  has exactly the se_inject model's parameter count, else the result says why not.

Every variant is built after ``torch.manual_seed(seed)``, so two runs build the same weights.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ..api import default_example_inputs, inject
from ..errors import NoResidualAddsError, NoResidualAddsWarning
from ..io.sources import from_hf_directory, is_hf_directory, timm_source
from ..layers import ACT_LAYERS, GATE_LAYERS, resolve_layer
from ..modules.se_block import set_kernels
from ..options import SEOptions
from ..utils import eval_mode
from .report import build_report, count_flops
from .results import ModelBench, VariantInfo
from .settings import SE_VARIANTS

__all__ = ["TWINS", "timm_twin", "BuiltModel", "build_variants", "logits"]

#: timm's hand-written attention models, by (attn, position): the prefix timm puts before the
#: plain model's name, and the timm module that defines them (so seresnet50 is resnet.py's, with
#: SE before the add; seresnet33ts byobnet.py's, with SE after the 3x3 conv).
TWINS: dict[tuple[str, str], tuple[str, str]] = {
    ("se", "branch"): ("se", "resnet"),     # seresnet18/34/50/101/152, seresnext50_32x4d, seresnet50t, ...
    ("eca", "branch"): ("eca", "resnet"),   # ecaresnet26t, ecaresnet50d, ecaresnet101d, ...
    ("se", "mid"): ("se", "byobnet"),       # seresnet33ts, seresnext26ts
    ("eca", "mid"): ("eca_", "byobnet"),    # eca_resnet33ts, eca_resnext26ts
    ("gca", "mid"): ("gc", "byobnet"),      # gcresnet33ts, gcresnet50t, gcresnext26ts
}


def _timm_models(module: str) -> frozenset[str]:
    import timm

    return frozenset(timm.list_models(module=module))


def timm_twin(model: str, options: SEOptions) -> tuple[Optional[str], str]:
    """timm's hand-written model that ``model`` with ``options`` should equal, or why there is none.

    Returns ``(name, "")`` or ``(None, reason)``. The parameter count is checked by the caller,
    who has both models.

    >>> timm_twin("resnet50", SEOptions())
    ('seresnet50', '')
    >>> timm_twin("convnext_tiny", SEOptions())[0] is None
    True
    """
    attn = options.attn if isinstance(options.attn, str) else None
    entry = TWINS.get((attn, options.position)) if attn else None
    if entry is None:
        return None, f"timm has no hand-written models with attn={attn or 'a factory'!r} at {options.position!r}"
    if attn == "se":
        layers = (resolve_layer(options.act_layer, ACT_LAYERS, "act_layer"),
                  resolve_layer(options.gate_layer, GATE_LAYERS, "gate_layer"))
        if layers != (nn.ReLU, nn.Sigmoid):
            return None, "timm's SE models use a ReLU and a sigmoid gate, not these act_layer / gate_layer"
    elif options.given("act_layer") or options.given("gate_layer"):
        return None, f"timm's {attn} models use {attn}'s own layers, not the act_layer / gate_layer given"
    prefix, module = entry
    name = prefix + model
    if name not in _timm_models(module):
        return None, f"timm has no {name} (the {attn} models of timm's {module}.py)"
    return name, ""


@dataclass
class BuiltModel:
    """A model's variants, ready to move to the device, and what the result records of them."""

    record: ModelBench
    models: dict[str, nn.Module]
    classes: int


def logits(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, a transformers output's ``.logits``, or
    the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the logits in a {type(output).__name__} output")


def _original(source: Union[str, nn.Module], num_classes: Optional[int]) -> nn.Module:
    if isinstance(source, nn.Module):
        return copy.deepcopy(source)  # a training step changes the weights: never the caller's model
    if is_hf_directory(source):
        return from_hf_directory(source, num_labels=num_classes, weights=False)
    return timm_source(source, {} if num_classes is None else {"num_classes": num_classes}).build()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_variants(source: Union[str, nn.Module], *, variants: tuple[str, ...], options: Mapping[str, Any],
                   seed: int, img_size: Optional[int] = None, num_classes: Optional[int] = None,
                   strict: bool = False) -> BuiltModel:
    """Build the ``variants`` of ``source`` (a timm name, a Hugging Face directory or a module).

    The caller's random stream is left as it was.

    Raises:
        UnknownModelError, NoResidualAddsError, TraceError, ...: the model cannot be built or
            converted (an SE variant was asked for and it has no site).
    """
    with torch.random.fork_rng(devices=[]):
        return _build(source, variants, options, seed, img_size, num_classes, strict)


def _build(source: Union[str, nn.Module], variants: tuple[str, ...], options: Mapping[str, Any], seed: int,
           img_size: Optional[int], num_classes: Optional[int], strict: bool) -> BuiltModel:
    name = source if isinstance(source, str) else type(source).__name__
    opts = SEOptions.from_kwargs(options, caller="bench")
    torch.manual_seed(seed)
    original = _original(source, num_classes)
    example = default_example_inputs(original)
    if img_size is not None:
        example = (torch.randn((1, example[0].shape[1], img_size, img_size),
                               generator=torch.Generator().manual_seed(seed)),)
    with eval_mode(original), torch.no_grad():
        classes = logits(original(*example)).shape[-1]
    models: dict[str, nn.Module] = {"original": original} if "original" in variants else {}
    infos: dict[str, VariantInfo] = {}
    twin, note = None, None
    wanted_se = [v for v in variants if v in SE_VARIANTS]
    if not (wanted_se or "timm" in variants):
        infos["original"] = VariantInfo("original", name, _params(original), count_flops(original, example)[0])
    else:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoResidualAddsWarning)  # raised below, once
            result = inject(original, example_inputs=example, strict=strict, **options)
        if not result.plan.sites:
            raise NoResidualAddsError(f"{name} has no residual add that can take an SE block "
                                      f"({result.plan.skip_summary()}); `se-inject sites {name}` lists them")
        report = build_report(original, result, example, model_name=name)
        infos["original"] = VariantInfo("original", name, report.params_before, report.flops_before)
        for variant in wanted_se:
            model = result.model if variant == "se_inject" else set_kernels(copy.deepcopy(result.model),
                                                                              SE_VARIANTS[variant])
            kernels = SE_VARIANTS[variant] or opts.kernels
            models[variant] = model
            infos[variant] = VariantInfo(variant, name, report.params_after, report.flops_after,
                                         kernels if opts.attn == "se" else None)
        if "timm" in variants:
            twin, note = _twin(source, name, opts, report.params_after, num_classes, seed, example, models, infos)
    ordered = {v: models[v] for v in variants if v in models}
    record = ModelBench(model=name, input_size=tuple(example[0].shape[1:]),
                        variants=tuple(infos[v] for v in ordered), twin=twin, twin_note=note)
    return BuiltModel(record, ordered, int(classes))


def _twin(source: Union[str, nn.Module], name: str, opts: SEOptions, params: int, num_classes: Optional[int],
          seed: int, example: tuple[torch.Tensor, ...], models: dict[str, nn.Module],
          infos: dict[str, VariantInfo]) -> tuple[Optional[str], Optional[str]]:
    """Add timm's twin to ``models`` if there is one with ``params`` parameters; (twin, why not)."""
    if not isinstance(source, str) or is_hf_directory(source):
        return None, "a twin is looked up by timm model name"
    twin, reason = timm_twin(source, opts)
    if twin is None:
        return None, reason
    torch.manual_seed(seed)
    model = timm_source(twin, {} if num_classes is None else {"num_classes": num_classes}).build()
    if _params(model) != params:
        return None, (f"timm's {twin} has {_params(model):,} parameters and se_inject's {name} {params:,}: not "
                      f"the same model with these options, so it is left out")
    models["timm"] = model
    infos["timm"] = VariantInfo("timm", twin, params, count_flops(model, example)[0])
    return twin, None
