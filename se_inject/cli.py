"""The ``se-inject`` command: convert timm models by name, report what SE costs, save the result.

Exit codes: 0 done; 1 a model has no residual add, cannot be traced, or a file is bad; 2 an
unknown model name or a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import fnmatch
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import timm
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import NoResidualAddsWarning, SEInjectError, SEInjectWarning, UnknownModelError
from .injection import Injection, SitePlan, default_example_inputs, inject
from .checkpoint import load_checkpoint
from .recipe import save
from .report import Report, build_report, render_report, render_skipped, render_summary

__all__ = ["main", "build_parser"]

EXAMPLES = """\
examples:
  se-inject report resnet50                      parameters and FLOPs before/after, per site
  se-inject report resnet50 --json               the same as JSON
  se-inject report resnet18 resnet50 convnext_tiny
  se-inject report 'resnet*'                     every timm model matching the glob, then a summary
  se-inject sites hrnet_w18_small --json         dry run: sites, and skipped adds with reasons
  se-inject convert resnet50 --out se_resnet50 --identity-init
  se-inject convert resnet50 --checkpoint resnet50.safetensors --out se_resnet50
"""


class UsageError(Exception):
    """A command-line problem that exits with status 2."""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="timm model name(s), or a quoted glob such as 'resnet*'")
    parser.add_argument("--reduction", type=int, default=16, metavar="R",
                        help="SE reduction ratio r: hidden width about C/r (default 16)")
    parser.add_argument("--rd-divisor", type=int, default=8, metavar="N",
                        help="round hidden widths to multiples of N as timm does (default 8); "
                             "0 for the paper's max(1, C // r)")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                        help="example input size (default: the model's pretrained_cfg, else 3 224 224)")
    parser.add_argument("--identity-init", action="store_true",
                        help="start every SE block as an exact identity (for fine-tuning pretrained weights)")
    parser.add_argument("--include", action="append", metavar="PATTERN",
                        help="only blocks whose path matches this glob (repeatable), e.g. 'layer4.*'")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="leave out blocks whose path matches this glob (repeatable)")
    parser.add_argument("--min-channels", type=int, default=1, metavar="N",
                        help="leave out blocks with fewer than N channels (default 1)")
    parser.add_argument("--num-classes", type=int, metavar="N",
                        help="build the model with N classes (timm's num_classes)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="load timm's pretrained weights (needs internet or a local hub cache)")
    weights.add_argument("--checkpoint", type=Path, metavar="PATH",
                         help="load weights for the source model from a .safetensors file or a "
                              "torch state_dict (read with weights_only=True)")
    parser.add_argument("--strict", action="store_true",
                        help="fail instead of skipping a block whose traced graph does not reproduce it")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``se-inject`` (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="se-inject",
        description="Add Squeeze-and-Excitation to the residual branches of timm models and report what it costs.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = sub.add_parser("report", help="parameters and FLOPs before and after SE, per site",
                            description="Apply SE and print parameters and FLOPs before and after, per site.",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(report)
    report.add_argument("--json", action="store_true", help="print JSON instead of tables")
    report.add_argument("--show-skipped", action="store_true", help="list every skipped add, not one line per reason")
    report.add_argument("--details", action="store_true",
                        help="with several models, print each model's full report before the summary")

    sites = sub.add_parser("sites", help="dry run: where SE would go, and which adds are skipped and why",
                           description="Dry run: list the sites SE would go to, and every skipped add with its reason.",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(sites)
    sites.add_argument("--json", action="store_true", help="print JSON instead of tables")

    convert = sub.add_parser("convert", help="apply SE and save weights (safetensors) and a JSON recipe",
                             description="Apply SE, print the report, and save DIR/model.safetensors and "
                                         "DIR/recipe.json; se_inject.load(DIR) rebuilds the model.",
                             epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(convert)
    convert.add_argument("--out", type=Path, required=True, metavar="DIR",
                         help="output directory (with several models, one subdirectory per model)")
    convert.add_argument("--overwrite", action="store_true", help="replace a model already saved in DIR")
    convert.add_argument("--json", action="store_true", help="print the report as JSON")
    convert.add_argument("--show-skipped", action="store_true", help="list every skipped add")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def resolve_models(names: Sequence[str]) -> list[str]:
    """Expand globs and check every name against timm; raise UnknownModelError with suggestions."""
    resolved: list[str] = []
    for name in names:
        if any(c in name for c in "*?["):
            matches = timm.list_models(name)
            if not matches:
                raise UnknownModelError(f"no timm model matches {name!r}")
            resolved.extend(matches)
        elif timm.is_model(name):
            resolved.append(name)
        else:
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
            raise UnknownModelError(f"unknown model {name!r}{hint}")
    return list(dict.fromkeys(resolved))


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence the hub's retry chatter: a failed download becomes one line of ours."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "timm")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def build_model(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The timm model ``name`` with the weights the arguments ask for, and its creation kwargs."""
    kwargs: dict[str, Any] = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.pretrained:
        try:
            with _quiet_hub():
                model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SEInjectError(
                f"could not fetch pretrained weights for {name} ({type(e).__name__}: {reason}); "
                f"without internet, download them elsewhere and pass --checkpoint PATH") from None
        return model, kwargs
    model = timm.create_model(name, pretrained=False, **kwargs)
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
    return model, kwargs


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "reduction": args.reduction,
        "rd_divisor": None if args.rd_divisor == 0 else args.rd_divisor,
        "identity_init": args.identity_init,
        "include": args.include,
        "exclude": args.exclude,
        "min_channels": args.min_channels,
        "strict": args.strict,
    }


def _inputs(model: torch.nn.Module, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    if args.input_size:
        return (torch.randn((1, *args.input_size), generator=torch.Generator().manual_seed(0)),)
    return default_example_inputs(model)


def _convert(name: str, args: argparse.Namespace, err: Console
             ) -> tuple[torch.nn.Module, Injection, tuple[torch.Tensor, ...], dict[str, Any]]:
    model, kwargs = build_model(name, args)
    inputs = _inputs(model, args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SEInjectWarning)
        result = inject(model, example_inputs=inputs, **_options(args))
    if not result.plan.sites:
        reasons = ", ".join(f"{len(s)} {r}" for r, s in result.plan.skipped_by_reason().items()) or "no adds at all"
        raise SEInjectError(f"{name} has no residual add that can take an SE block ({reasons}); "
                            f"`se-inject sites {name}` lists them")
    for w in caught:
        if not issubclass(w.category, NoResidualAddsWarning):
            err.print(f"[yellow]warning[/yellow] {name}: {w.message}", soft_wrap=True)
    return model, result, inputs, kwargs


def plan_to_dict(name: str, plan: SitePlan) -> dict[str, Any]:
    """JSON form of a dry run."""
    return {
        "model": name,
        "input_shape": list(plan.input_shapes[0]) if plan.input_shapes else [],
        "reduction": plan.options.reduction,
        "sites": [{"name": s.name, "block": s.block, "channels": s.channels, "hidden": s.hidden,
                   "feature_map": list(s.shape[2:]), "shortcut": s.shortcut, "params": s.params}
                  for s in plan.sites],
        "skipped": [{"name": s.name, "reason": s.reason, "detail": s.detail} for s in plan.skipped],
        "untraceable": [{"path": u.path or "<root>", "error": u.error} for u in plan.untraceable],
    }


def _render_sites(name: str, plan: SitePlan, console: Console) -> None:
    table = Table(title=f"{name}: {len(plan.sites)} SE sites", title_justify="left", show_edge=False)
    for col, justify in (("site", "left"), ("C", "right"), ("hidden", "right"), ("map", "right"),
                         ("shortcut", "left")):
        table.add_column(col, justify=justify)
    for s in plan.sites:
        table.add_row(s.name, str(s.channels), str(s.hidden), "x".join(map(str, s.shape[2:])), s.shortcut)
    console.print(table)
    render_skipped([{"name": s.name, "reason": s.reason, "detail": s.detail} for s in plan.skipped],
                   console, show_paths=True)
    for u in plan.untraceable:
        console.print(f"[yellow]not traceable as a whole[/yellow] {u.path or '<root>'}: {u.error}")


def _run_one(name: str, args: argparse.Namespace, out: Console, err: Console, several: bool
             ) -> tuple[Optional[Report], Optional[dict[str, Any]]]:
    """Do the command for one model; returns its report (report/convert) or its plan (sites)."""
    model, result, inputs, kwargs = _convert(name, args, err)
    if args.command == "sites":
        data = plan_to_dict(name, result.plan)
        if not args.json:
            _render_sites(name, result.plan, out)
        return None, data
    report = build_report(model, result, inputs, model_name=name)
    if args.command == "convert":
        target = args.out / name if several else args.out
        recipe = save(result, target, model_name=name, model_kwargs=kwargs, overwrite=args.overwrite)
        err.print(f"saved {name} to {target} ({recipe.name}, model.safetensors); "
                  f"load it with se_inject.load({str(target)!r})")
    if not args.json and (not several or getattr(args, "details", False) or args.command == "convert"):
        render_report(report, out, show_skipped=getattr(args, "show_skipped", False))
    return report, None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``se-inject`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        models = resolve_models(args.models)
    except UnknownModelError as e:
        err.print(f"[red]error[/red] {e}")
        return 2
    several = len(models) > 1
    reports: list[Report] = []
    payloads: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, transient=True, disable=not several)
    with progress:
        task = progress.add_task("converting", total=len(models))
        for name in models:
            progress.update(task, description=f"converting {name}")
            try:
                report, plan = _run_one(name, args, out, err, several)
            except SEInjectError as e:
                failures[name] = str(e)
                if not several:
                    err.print(f"[red]error[/red] {e}")
            else:
                if report is not None:
                    reports.append(report)
                    payloads.append(report.to_dict())
                if plan is not None:
                    payloads.append(plan)
            progress.advance(task)
    if args.json:
        print(json.dumps(payloads[0] if not several and payloads else payloads, indent=2))
    elif several and reports:
        render_summary(reports, out)
    for name, message in failures.items() if several else ():
        err.print(f"[red]error[/red] {message}")
    return 1 if failures else 0

