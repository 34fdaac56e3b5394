"""Draw what se_inject found and what SE cost, with rich: the report, the dry run's plan, the
adds that were skipped, a summary over several models, and a benchmark's timings. Data comes from
:mod:`se_inject.cost.report` and :mod:`se_inject.plan`; nothing here computes anything."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..cost.report import FLOPS_NOTE, Report
from ..plan import SKIP_REASONS, SitePlan, Skip, Untraceable

if TYPE_CHECKING:
    from ..cost.bench import BenchResult, Cell, ModelBench, Spread

__all__ = ["render_report", "render_plan", "render_skipped", "render_untraceable", "render_summary", "render_bench"]


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


def _table(title: str, columns: Sequence[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False)
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    return table


def _what(attn: str, position: str, reduction: Optional[int]) -> str:
    """``"reduction 16"`` for plain SE; the attention, position and reduction otherwise."""
    parts = ([] if attn == "se" else [f"attn {attn}"]) + ([] if position == "branch" else [f"position {position}"])
    return "  ·  ".join(parts + ([f"reduction {reduction}"] if reduction is not None else []))


def _opt(value: Optional[int]) -> str:
    return "–" if value is None else f"{value:,}"


def _totals(report: Report) -> Table:
    shape = "x".join(str(s) for s in report.input_shape)
    what = _what(report.attn, report.position, report.reduction)
    totals = _table(f"{report.model}  ·  input {shape}" + (f"  ·  {what}" if what else ""),
                    [(c, "right") for c in ("", "before", "after", "added", "")])
    totals.add_row("parameters", f"{report.params_before:,}", f"{report.params_after:,}",
                   f"{report.params_added:,}", _pct(report.params_added, report.params_before))
    totals.add_row("", _si(report.params_before), _si(report.params_after), _si(report.params_added), "",
                   style="dim")
    totals.add_row("FLOPs (counter)", f"{report.flops_before:,}", f"{report.flops_after:,}",
                   f"{report.flops_added:,}", _pct(report.flops_added, report.flops_before))
    totals.add_row("", _si(report.flops_before), _si(report.flops_after), _si(report.flops_added), "",
                   style="dim")
    if report.elementwise_flops is not None:
        with_elementwise = report.flops_added + report.elementwise_flops
        totals.add_row("FLOPs + SE elementwise", "", f"{report.flops_after + report.elementwise_flops:,}",
                       f"{with_elementwise:,}", _pct(with_elementwise, report.flops_before))
    return totals


def render_report(report: Report, console: Console, *, show_skipped: bool = False) -> None:
    """Draw ``report``: totals, one row per site, skipped adds collapsed by reason."""
    console.print(_totals(report))
    console.print(f"[dim]{FLOPS_NOTE}[/dim]" + ("" if report.elementwise_flops is not None else
                  f"[dim] The elementwise work of {escape(report.attn)} is not estimated.[/dim]"))
    if report.sites:
        kind = "SE blocks" if report.attn == "se" else f"{escape(report.attn)} modules"
        at = "" if report.position == "branch" else f" at position {report.position}"
        table = _table(f"{len(report.sites)} {kind}{at}", [("site", "left")] + [
            (c, "right") for c in ("C", "hidden", "map", "params", "FLOPs", "elementwise")])
        for s in report.sites:
            table.add_row(s.name, f"{s.channels:,}", _opt(s.hidden), "x".join(map(str, s.feature_map)),
                          f"{s.params:,}", f"{s.flops:,}", _opt(s.elementwise_flops))
        table.add_section()
        table.add_row("total", "", "", "", f"{sum(s.params for s in report.sites):,}",
                      f"{sum(s.flops for s in report.sites):,}", _opt(report.elementwise_flops), style="bold")
        console.print(table)
    render_skipped(report.skipped, console, show_paths=show_skipped)
    render_untraceable(report.untraceable, console)


def render_plan(name: str, plan: SitePlan, console: Console) -> None:
    """Draw a dry run: every site with its shortcut and where the module goes (what it reads ->
    what reads it), then every skipped add with its reason."""
    if not plan.sites:
        console.print(f"{escape(name)}: no SE site ({plan.skip_summary()})")
        render_skipped(plan.skipped, console, show_paths=True)
        render_untraceable(plan.untraceable, console)
        return
    attn = plan.sites[0].attn
    kind = "SE sites" if attn == "se" else f"{escape(attn)} sites"
    table = _table(f"{name}: {len(plan.sites)} {kind}, position {plan.sites[0].position}",
                   [("site", "left"), ("C", "right"), ("hidden", "right"), ("map", "right"), ("shortcut", "left"),
                    ("where", "left")])
    for s in plan.sites:
        table.add_row(s.name, str(s.channels), _opt(s.hidden), "x".join(map(str, s.shape[2:])), s.shortcut,
                      escape(s.where))
    console.print(table)
    render_skipped(plan.skipped, console, show_paths=True)
    render_untraceable(plan.untraceable, console)


def render_skipped(skipped: Sequence[Skip], console: Console, *, show_paths: bool = False) -> None:
    """Skipped adds, one line per reason (with every add's name when ``show_paths``)."""
    if not skipped:
        return
    groups: dict[str, list[Skip]] = {}
    for s in skipped:
        groups.setdefault(s.reason, []).append(s)
    table = _table(f"{len(skipped)} adds skipped", [("adds", "right"), ("reason", "left"),
                                                    ("where" if show_paths else "e.g.", "left")])
    for reason, items in groups.items():
        where = ("\n".join(f"{escape(i.name)}  [dim]{escape(i.detail)}[/dim]" for i in items) if show_paths
                 else escape(items[0].name))
        table.add_row(str(len(items)), f"[bold]{reason}[/bold]: {SKIP_REASONS.get(reason, '')}", where)
    console.print(table)


def render_untraceable(untraceable: Sequence[Untraceable], console: Console) -> None:
    """Modules fx could not trace whole, with why (their submodules were analysed instead)."""
    for u in untraceable:
        console.print(f"[yellow]not traceable as a whole[/yellow] {escape(u.path or '<root>')}: "
                      f"{escape(u.error)} (its submodules were analysed)")


def render_summary(reports: Sequence[Report], console: Console) -> None:
    """One table for several models: sites, +params %, +FLOPs %."""
    table = _table("summary", [("model", "left")] + [(c, "right") for c in (
        "sites", "skipped", "params", "+params", "FLOPs", "+FLOPs", "+FLOPs incl. elementwise")])
    for r in reports:
        table.add_row(r.model, str(len(r.sites)), str(len(r.skipped)), _si(r.params_after),
                      _pct(r.params_added, r.params_before), _si(r.flops_after),
                      _pct(r.flops_added, r.flops_before),
                      "–" if r.elementwise_flops is None else _pct(r.flops_added + r.elementwise_flops,
                                                                   r.flops_before))
    console.print(table)


def _spread_pct(value: "Spread") -> str:
    return f"{100 * value.median:+.1f}% ({100 * value.q1:+.1f}…{100 * value.q3:+.1f})"


def _mib(value: Optional[int], base: Optional[int] = None) -> str:
    if value is None:
        return "–"
    relative = f" ({100 * (value / base - 1):+.1f}%)" if base and value != base else ""
    return f"{value / 2 ** 20:.1f} MiB{relative}"


def render_bench(result: "BenchResult", console: Console) -> None:
    """Draw a benchmark: per model its variants (parameters, FLOPs), then one table per batch
    size with every cell's timings, overheads and memory; skipped cells and twins left out below."""
    env, settings = result.environment, result.settings
    what = "  ·  ".join([env["device"], settings["dtype"]] + (["channels_last"] if settings["channels_last"] else [])
                        + [f"torch {env['torch']}"])
    for model in result.models:
        if model.error is not None:
            continue
        shape = "x".join(map(str, model.input_size))
        built = _table(f"{model.model}  ·  input {shape}",
                       [("variant", "left"), ("model", "left"), ("params", "right"), ("FLOPs / image", "right")])
        for v in model.variants:
            built.add_row(v.name + (f" ({v.kernels})" if v.kernels and v.name == "se_inject" else ""), v.model,
                          f"{v.params:,}", _si(v.flops))
        console.print(built)
        cells = [c for c in result.cells if c.model == model.model]
        for batch in dict.fromkeys(c.batch_size for c in cells):
            console.print(_bench_table(model, [c for c in cells if c.batch_size == batch], batch, what))
        if model.twin_note and "timm" in settings["variants"]:
            console.print(f"[dim]no timm twin: {escape(model.twin_note)}[/dim]")
    console.print("[dim]ms: median over rounds of the mean per iteration (IQR in brackets); overheads: median (IQR) of "
                  "the per-round paired ratios; saved: bytes autograd keeps for backward, each storage once; "
                  "peak: CUDA memory one step allocates beyond the resident models. Warm-up includes compilation.[/dim]")


def _bench_table(model: "ModelBench", cells: Sequence["Cell"], batch: int, what: str) -> Table:
    timings = [t for c in cells for t in c.timings]
    saved = any(t.saved_bytes is not None for t in timings)
    peak = any(t.cuda_peak_bytes is not None for t in timings)
    columns = ["ms (IQR)", "images/s", "vs original", "vs timm", "warm-up s"] + ["saved"] * saved + ["peak"] * peak
    table = _table(f"{model.model}  ·  batch {batch}  ·  {what}",
                   [("mode", "left"), ("", "left"), ("variant", "left")] + [(c, "right") for c in columns])
    for cell in cells:
        kind = "compiled" if cell.compiled else "eager"
        if cell.skipped is not None:
            table.add_row(cell.mode, kind, "[dim]skipped[/dim]", f"[dim]{escape(cell.skipped)}[/dim]")
            table.add_section()
            continue
        base = {t.variant: (t.saved_bytes, t.cuda_peak_bytes) for t in cell.timings}.get("original", (None, None))
        for t in cell.timings:
            row = [f"{t.ms.median:.2f} ({t.ms.q1:.2f}–{t.ms.q3:.2f})", f"{t.images_per_s.median:,.1f}",
                   _spread_pct(cell.overhead[t.variant]) if t.variant in cell.overhead else "",
                   _spread_pct(cell.vs_twin[t.variant]) if t.variant in cell.vs_twin else "", f"{t.warmup_s:.1f}"]
            row += [_mib(t.saved_bytes, base[0])] * saved + [_mib(t.cuda_peak_bytes, base[1])] * peak
            table.add_row(cell.mode, kind, t.variant, *row)
        table.add_section()
    return table
