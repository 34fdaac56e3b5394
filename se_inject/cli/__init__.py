"""The ``se-inject`` command: convert timm models by name (or Hugging Face models saved in a local
directory), report what SE costs, save the result.

Exit codes: 0 done; 1 a model has no residual add, cannot be traced, or a file is bad; 2 an
unknown model name or a usage error.

The room holds the command and nothing of the library needs it:

* ``__init__.py`` (this module): :func:`main` and :func:`build_parser`, the ``report``, ``sites``
  and ``convert`` subcommands.
* ``flags.py``: the SE options as flags (metavar, choices, help notes: the CLI's own metadata).
* ``render.py``: reports, plans, skipped adds, summaries and benchmarks drawn with rich.
* ``bench.py``: the ``se-inject bench`` subcommand's flags and its run with a progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import timm
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..api import default_example_inputs, inject
from ..cost.report import Report, build_report
from ..errors import (CheckpointError, NoResidualAddsError, NoResidualAddsWarning, SEInjectError, SEInjectWarning,
                     UnknownModelError)
from ..io.checkpoint import load_checkpoint
from ..io.recipe import save
from ..io.sources import Source, from_hf_directory, hf_source, is_hf_directory, resolve_models, timm_source
from ..plan import Injection
from ..utils import first_line, version
from . import bench as command
from .flags import add_options, options_from
from .render import render_plan, render_report, render_summary

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
  se-inject report ./my-resnet                   a Hugging Face model: a directory with config.json
  se-inject convert ./my-resnet --out se_my_resnet --identity-init
  se-inject bench resnet50 --batch-size 8 --img-size 128   time and memory: original, se_inject, timm's seresnet50
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="timm model name(s), a quoted glob such as 'resnet*', or a directory holding a "
                             "Hugging Face config.json (and optionally its weights, which are then loaded)")
    add_options(parser)
    parser.add_argument("--input-size", type=_positive_int, nargs=3, metavar=("C", "H", "W"),
                        help="example input size (default: the model's pretrained_cfg, else 3 224 224)")
    parser.add_argument("--num-classes", type=int, metavar="N",
                        help="build the model with N classes (timm's num_classes, transformers' num_labels)")
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
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
    command.add_parser(sub, add_options, EXAMPLES)
    return parser


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


def build_model(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, Source]:
    """The model ``name`` with the weights the arguments ask for, and where it comes from."""
    if is_hf_directory(name):
        if args.pretrained and not any(Path(name).glob("*.safetensors")):
            raise CheckpointError(f"{name} holds no weights (model.safetensors); --pretrained loads the weights "
                                  f"of a Hugging Face directory, which are loaded anyway when present")
        model = from_hf_directory(name, num_labels=args.num_classes, weights=args.checkpoint is None)
        if args.checkpoint is not None:
            load_checkpoint(model, args.checkpoint)
        return model, hf_source(model)
    kwargs: dict[str, Any] = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.pretrained:
        try:
            with _quiet_hub():
                model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:
            raise CheckpointError(
                f"could not fetch pretrained weights for {name} ({type(e).__name__}: "
                f"{first_line(e) or type(e).__name__}); without internet, download them elsewhere and pass "
                f"--checkpoint PATH") from None
        return model, timm_source(name, kwargs)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
    return model, timm_source(name, kwargs)


def _inputs(model: torch.nn.Module, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    if args.input_size:
        return (torch.randn((1, *args.input_size), generator=torch.Generator().manual_seed(0)),)
    return default_example_inputs(model)


def _convert(name: str, args: argparse.Namespace, err: Console
             ) -> tuple[torch.nn.Module, Injection, tuple[torch.Tensor, ...], Source]:
    model, source = build_model(name, args)
    inputs = _inputs(model, args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SEInjectWarning)
        result = inject(model, example_inputs=inputs, strict=args.strict, **options_from(args))
    if not result.plan.sites and args.command != "sites":  # the dry run explains why instead
        raise NoResidualAddsError(f"{name} has no residual add that can take an SE block "
                                  f"({result.plan.skip_summary()}); `se-inject sites {name}` lists them")
    for w in caught:
        if not issubclass(w.category, NoResidualAddsWarning):
            err.print(f"[yellow]warning[/yellow] {name}: {escape(str(w.message))}", soft_wrap=True)
    return model, result, inputs, source


def _run_one(name: str, args: argparse.Namespace, out: Console, err: Console, several: bool
             ) -> tuple[Optional[Report], Optional[dict[str, Any]]]:
    """Do the command for one model; returns its report (report/convert) or its plan (sites)."""
    model, result, inputs, source = _convert(name, args, err)
    if args.command == "sites":
        if not args.json:
            render_plan(name, result.plan, out)
        return None, result.plan.to_dict(name)
    report = build_report(model, result, inputs, model_name=name)
    if args.command == "convert":
        target = args.out / Path(name).name if several else args.out
        recipe = save(result, target, source=source, overwrite=args.overwrite)
        err.print(escape(f"saved {name} to {target} ({recipe.name}, model.safetensors); "
                         f"load it with se_inject.load({str(target)!r})"))
    if not args.json and (not several or getattr(args, "details", False) or args.command == "convert"):
        render_report(report, out, show_skipped=getattr(args, "show_skipped", False))
    return report, None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``se-inject`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "convert" and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; pass a directory to save into")
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if args.command == "bench":
        return command.run(args, argv, options_from(args), out, err)
    try:
        models = resolve_models(args.models)
    except UnknownModelError as e:
        err.print(f"[red]error[/red] {escape(str(e))}")
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
                    err.print(f"[red]error[/red] {escape(str(e))}")
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
        err.print(f"[red]error[/red] {escape(message)}")
    return 1 if failures else 0

