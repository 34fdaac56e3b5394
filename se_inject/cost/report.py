"""What did SE cost? Parameters and FLOPs before and after, per site and in total.

:func:`build_report` returns plain data (:class:`Report`, whose :meth:`Report.to_dict` is the JSON
form); :mod:`se_inject.cli.render` draws it with rich. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per multiply-add of convs and
matmuls and nothing for pooling, activations and elementwise ops; SE's own elementwise work (the
squeeze mean, the activations, the gate scaling and the reweighting product) is reported
separately, one FLOP per element and op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..modules.se_block import SEBlock
from ..options import attention_label
from ..plan import Injection, Site, Skip, Untraceable
from ..utils import eval_mode

__all__ = ["SiteCost", "Report", "build_report", "count_flops", "FLOPS_NOTE"]

FLOPS_NOTE = (
    "FLOPs from torch.utils.flop_counter.FlopCounterMode: 2 per multiply-add of convs and matmuls; "
    "pooling, activations and elementwise products count 0. SE's elementwise work (squeeze mean, "
    "ReLU, gate, reweighting product) is shown apart, 1 FLOP per element and op."
)


@dataclass(frozen=True)
class SiteCost:
    """One SE block and what it costs at the example input.

    Attributes:
        name: module path of the SE block; ``block``: the block it sits in.
        channels, hidden: C and the excitation width (None where the attention has none).
        feature_map: spatial size at the site (e.g. ``(56, 56)``).
        params: parameters added (SE: ``2*C*hidden + hidden + C``).
        flops: FLOPs FlopCounterMode counts for the block (SE: its two 1x1 layers).
        elementwise_flops: squeeze mean + ReLU + gate (+ gain) + reweighting product; None for
            attentions other than SE, whose elementwise work is not estimated.
        position, where: where the module sits (see :class:`se_inject.plan.Site`).
    """

    name: str
    block: str
    channels: int
    hidden: Optional[int]
    feature_map: tuple[int, ...]
    params: int
    flops: int
    elementwise_flops: Optional[int]
    position: str = "branch"
    where: str = ""


@dataclass
class Report:
    """Parameters and FLOPs of a model before and after SE, per site and in total."""

    model: str
    input_shape: list[int]
    reduction: Optional[int]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    sites: list[SiteCost] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    untraceable: list[Untraceable] = field(default_factory=list)
    attn: str = "se"
    position: str = "branch"

    @property
    def params_added(self) -> int:
        return self.params_after - self.params_before

    @property
    def flops_added(self) -> int:
        return self.flops_after - self.flops_before

    @property
    def elementwise_flops(self) -> Optional[int]:
        """SE's elementwise work over all sites; None when it is not estimated (other attentions)."""
        if any(s.elementwise_flops is None for s in self.sites):
            return None
        return sum(s.elementwise_flops or 0 for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: plain dicts, lists, strings and integers."""
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "reduction": self.reduction,
            "attn": self.attn,
            "position": self.position,
            "params": {"before": self.params_before, "after": self.params_after, "added": self.params_added},
            "flops": {
                "before": self.flops_before,
                "after": self.flops_after,
                "added": self.flops_added,
                "se_elementwise": self.elementwise_flops,
                "counter": "torch.utils.flop_counter.FlopCounterMode",
            },
            "sites": [
                {
                    "name": s.name,
                    "block": s.block,
                    "channels": s.channels,
                    "hidden": s.hidden,
                    "feature_map": list(s.feature_map),
                    "params": s.params,
                    "flops": s.flops,
                    "elementwise_flops": s.elementwise_flops,
                    "position": s.position,
                    "where": s.where,
                }
                for s in self.sites
            ],
            "skipped": [s.to_dict() for s in self.skipped],
            "untraceable": [u.to_dict() for u in self.untraceable],
        }


def count_flops(model: nn.Module, example_inputs: Sequence[Any]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one forward of ``model`` in eval mode, and FLOPs per module path.

    Module paths are relative to ``model`` (``"layer1.0.se"``), as in ``named_modules``.
    """
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*example_inputs)
    prefix = type(model).__name__ + "."
    per_module = {
        name[len(prefix):]: int(sum(ops.values()))
        for name, ops in counter.get_flop_counts().items()
        if name.startswith(prefix)
    }
    return int(counter.get_total_flops()), per_module


def _elementwise_flops(site: Site, gain: float) -> int:
    batch, channels, *spatial = site.shape
    elements = batch * channels * math.prod(spatial)
    squeeze, reweight = elements, elements
    relu, gate = batch * (site.hidden or 0), batch * channels
    return squeeze + reweight + relu + gate + (batch * channels if gain != 1.0 else 0)


def build_report(original: nn.Module, result: Injection, example_inputs: Sequence[Any], *,
                 model_name: Optional[str] = None) -> Report:
    """Measure ``original`` and ``result.model`` on ``example_inputs`` and describe the difference.

    Args:
        original: the model before SE (left unchanged).
        result: what :func:`se_inject.inject` returned for it.
        example_inputs: the inputs to count FLOPs on (a batch of 1 gives per-image figures).
        model_name: name shown in the report (default: the model's class name).
    """
    flops_before, _ = count_flops(original, example_inputs)
    flops_after, per_module = count_flops(result.model, example_inputs)
    sites = []
    for site in result.plan.sites:
        se = result.model.get_submodule(site.name)
        gain = float(se.gain) if isinstance(se, SEBlock) else 1.0
        sites.append(SiteCost(
            name=site.name, block=site.block, channels=site.channels, hidden=site.hidden,
            feature_map=tuple(site.shape[2:]), params=sum(p.numel() for p in se.parameters()),
            flops=per_module.get(site.name, 0),
            elementwise_flops=_elementwise_flops(site, gain) if isinstance(se, SEBlock) else None,
            position=site.position, where=site.where,
        ))
    shape = next((list(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)), [])
    options = result.plan.options
    return Report(
        model=model_name or type(original).__name__,
        input_shape=shape,
        reduction=options.reduction if options.given("reduction") else None,
        params_before=sum(p.numel() for p in original.parameters()),
        params_after=sum(p.numel() for p in result.model.parameters()),
        flops_before=flops_before,
        flops_after=flops_after,
        sites=sites,
        skipped=list(result.plan.skipped),
        untraceable=list(result.plan.untraceable),
        attn=attention_label(options.attn),
        position=options.position,
    )
