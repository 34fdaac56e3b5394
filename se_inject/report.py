"""What did SE cost? Parameters and FLOPs before and after, per site and in total.

:func:`build_report` returns plain data (:class:`Report`, whose :meth:`Report.to_dict` is the JSON
form); :func:`render_report` and :func:`render_summary` draw it with rich. FLOPs come from
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
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .injection import Injection, Site, eval_mode
from .se_block import SEBlock
from .sites import SKIP_REASONS

__all__ = ["SiteCost", "Report", "build_report", "count_flops", "render_report", "render_summary", "FLOPS_NOTE"]

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
        channels, hidden: C and the excitation width.
        feature_map: spatial size at the site (e.g. ``(56, 56)``).
        params: parameters added (``2*C*hidden + hidden + C``).
        flops: FLOPs FlopCounterMode counts for the block (its two 1x1 layers).
        elementwise_flops: squeeze mean + ReLU + gate (+ gain) + reweighting product.
    """

    name: str
    block: str
    channels: int
    hidden: int
    feature_map: tuple[int, ...]
    params: int
    flops: int
    elementwise_flops: int


@dataclass
class Report:
    """Parameters and FLOPs of a model before and after SE, per site and in total."""

    model: str
    input_shape: list[int]
    reduction: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    sites: list[SiteCost] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    untraceable: list[dict[str, str]] = field(default_factory=list)

    @property
    def params_added(self) -> int:
        return self.params_after - self.params_before

    @property
    def flops_added(self) -> int:
        return self.flops_after - self.flops_before

    @property
    def elementwise_flops(self) -> int:
        return sum(s.elementwise_flops for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: plain dicts, lists, strings and integers."""
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "reduction": self.reduction,
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
                }
                for s in self.sites
            ],
            "skipped": list(self.skipped),
            "untraceable": list(self.untraceable),
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
    relu, gate = batch * site.hidden, batch * channels
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
            flops=per_module.get(site.name, 0), elementwise_flops=_elementwise_flops(site, gain),
        ))
    shape = next((list(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)), [])
    return Report(
        model=model_name or type(original).__name__,
        input_shape=shape,
        reduction=result.plan.options.reduction,
        params_before=sum(p.numel() for p in original.parameters()),
        params_after=sum(p.numel() for p in result.model.parameters()),
        flops_before=flops_before,
        flops_after=flops_after,
        sites=sites,
        skipped=[{"name": s.name, "reason": s.reason, "detail": s.detail} for s in result.plan.skipped],
        untraceable=[{"path": u.path or "<root>", "error": u.error} for u in result.plan.untraceable],
    )


def _si(value: float, unit: str = "") -> str:
    """3 significant figures with k/M/G/T, e.g. ``8.18 G``."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()


def _pct(added: int, before: int) -> str:
    if not before:
        return "n/a"
    pct = 100.0 * added / before
    return f"+{pct:.3f}%" if abs(pct) < 0.1 else f"+{pct:.2f}%"


def render_report(report: Report, console: Console, *, show_skipped: bool = False) -> None:
    """Draw ``report``: totals, one row per site, skipped adds collapsed by reason."""
    shape = "x".join(str(s) for s in report.input_shape)
    totals = Table(title=f"{report.model}  ·  input {shape}  ·  reduction {report.reduction}",
                   title_justify="left", show_edge=False)
    for col in ("", "before", "after", "added", ""):
        totals.add_column(col, justify="right")
    totals.add_row("parameters", f"{report.params_before:,}", f"{report.params_after:,}",
                   f"{report.params_added:,}", _pct(report.params_added, report.params_before))
    totals.add_row("", _si(report.params_before), _si(report.params_after), _si(report.params_added), "",
                   style="dim")
    totals.add_row("FLOPs (counter)", f"{report.flops_before:,}", f"{report.flops_after:,}",
                   f"{report.flops_added:,}", _pct(report.flops_added, report.flops_before))
    totals.add_row("", _si(report.flops_before), _si(report.flops_after), _si(report.flops_added), "",
                   style="dim")
    with_elementwise = report.flops_added + report.elementwise_flops
    totals.add_row("FLOPs + SE elementwise", "", f"{report.flops_after + report.elementwise_flops:,}",
                   f"{with_elementwise:,}", _pct(with_elementwise, report.flops_before))
    console.print(totals)
    console.print(f"[dim]{FLOPS_NOTE}[/dim]")

    if report.sites:
        table = Table(title=f"{len(report.sites)} SE blocks", title_justify="left", show_edge=False)
        for col, justify in (("site", "left"), ("C", "right"), ("hidden", "right"), ("map", "right"),
                             ("params", "right"), ("FLOPs", "right"), ("elementwise", "right")):
            table.add_column(col, justify=justify)
        for s in report.sites:
            table.add_row(s.name, f"{s.channels:,}", f"{s.hidden:,}", "x".join(map(str, s.feature_map)),
                          f"{s.params:,}", f"{s.flops:,}", f"{s.elementwise_flops:,}")
        table.add_section()
        table.add_row("total", "", "", "", f"{sum(s.params for s in report.sites):,}",
                      f"{sum(s.flops for s in report.sites):,}", f"{report.elementwise_flops:,}", style="bold")
        console.print(table)
    render_skipped(report.skipped, console, show_paths=show_skipped)
    for u in report.untraceable:
        console.print(f"[yellow]not traceable as a whole[/yellow] {u['path']}: {u['error']} "
                      f"(its submodules were analysed)")


def render_skipped(skipped: Sequence[dict[str, str]], console: Console, *, show_paths: bool = False) -> None:
    """Skipped adds, one line per reason (with every add's name when ``show_paths``)."""
    if not skipped:
        return
    groups: dict[str, list[dict[str, str]]] = {}
    for s in skipped:
        groups.setdefault(s["reason"], []).append(s)
    table = Table(title=f"{len(skipped)} adds skipped", title_justify="left", show_edge=False)
    table.add_column("adds", justify="right")
    table.add_column("reason")
    table.add_column("e.g." if not show_paths else "where")
    for reason, items in groups.items():
        where = "\n".join(f"{i['name']}  [dim]{i['detail']}[/dim]" for i in items) if show_paths else items[0]["name"]
        table.add_row(str(len(items)), f"[bold]{reason}[/bold]: {SKIP_REASONS.get(reason, '')}", where)
    console.print(table)


def render_summary(reports: Sequence[Report], console: Console) -> None:
    """One table for several models: sites, +params %, +FLOPs %."""
    table = Table(title="summary", title_justify="left", show_edge=False)
    for col, justify in (("model", "left"), ("sites", "right"), ("skipped", "right"), ("params", "right"),
                         ("+params", "right"), ("FLOPs", "right"), ("+FLOPs", "right"),
                         ("+FLOPs incl. elementwise", "right")):
        table.add_column(col, justify=justify)
    for r in reports:
        table.add_row(r.model, str(len(r.sites)), str(len(r.skipped)), _si(r.params_after),
                      _pct(r.params_added, r.params_before), _si(r.flops_after),
                      _pct(r.flops_added, r.flops_before),
                      _pct(r.flops_added + r.elementwise_flops, r.flops_before))
    console.print(table)
