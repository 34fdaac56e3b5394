"""``se-inject bench``: the subcommand's flags, and the run with a progress bar on stderr.

The command itself (:mod:`se_inject.cli`) owns the SE-option flags and hands them in
(:func:`add_parser` takes the function that adds those flags, :func:`run` the options parsed), so
this module never imports the package it is part of (which imports it). Exit status: 0 done; 1 a model could not be converted or a
variant failed (one line each); 2 a bad setting or an unknown model (one line).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..cost.results import MODES
from ..cost.settings import DEFAULT_VARIANTS, DTYPES, VARIANTS
from ..errors import OptionError, SEInjectError, UnknownModelError
from ..utils import first_line

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, add_options: Callable[[argparse.ArgumentParser], None], epilog: str) -> None:
    """Add the ``bench`` subcommand to ``sub`` (argparse's subparsers), SE flags by ``add_options``."""
    p = sub.add_parser("bench", help="time and memory of the original, se_inject's model and timm's twin",
                       description="Time the original model, se_inject's model and timm's hand-written SE model "
                                   "(where one exists) side by side, eager and compiled, in inference and in a "
                                   "training step, and count the memory a training step keeps for backward.",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="timm model name(s), a quoted glob such as 'resnet*', or a Hugging Face model directory")
    add_options(p)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS), metavar="NAME",
                   help=f"what to time, of {', '.join(repr(v) for v in VARIANTS)} (default: original se_inject timm; "
                        f"timm is timm's hand-written twin, where one exists)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="infer (no_grad) and/or train (forward, loss, backward, SGD step); default both")
    p.add_argument("--compile", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"],
                   help="eager and/or under torch.compile (default both)")
    p.add_argument("--compile-mode", metavar="MODE", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--freeze", action="store_true", help="compiled inference with inductor's freezing")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype (default fp32: none)")
    p.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    p.add_argument("--batch-size", type=int, nargs="+", default=[8], metavar="N", help="batch size(s) (default 8)")
    p.add_argument("--img-size", type=int, metavar="PX", help="input height and width (default: the model's)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds at most (default 7)")
    p.add_argument("--reps", type=int, default=5, help="iterations per variant and round (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first, compilation included (default 3)")
    p.add_argument("--budget-s", type=float, metavar="S", help="seconds the whole run may take")
    p.add_argument("--seed", type=int, default=0, help="seed of every variant and input (default 0)")
    p.add_argument("--num-classes", type=int, metavar="N", help="build the models with N classes")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)")
    p.add_argument("--strict", action="store_true",
                   help="fail instead of skipping a block whose traced graph does not reproduce it")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--out", type=Path, metavar="FILE", help="also write the result as JSON, with the command line")


def run(args: argparse.Namespace, argv: Optional[Sequence[str]], options: dict[str, Any], out: Console,
        err: Console) -> int:
    """Run :func:`se_inject.bench` as ``args`` ask, with a progress bar on ``err``; draw or print
    the result on ``out``. Returns the exit status."""
    from .render import render_bench
    from ..cost.bench import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not err.is_terminal)
    task = progress.add_task("bench", total=None)

    def advance(description: str, done: int, total: int) -> None:
        progress.update(task, description=escape(description), completed=done, total=total)

    try:
        with progress:
            result = bench(args.models, variants=args.variants, modes=args.modes,
                           compiled=[c == "compiled" for c in args.compile], compile_mode=args.compile_mode,
                           backend=args.backend, freeze=args.freeze, device=args.device, dtype=args.dtype,
                           channels_last=args.channels_last, batch_sizes=args.batch_size, img_size=args.img_size,
                           rounds=args.rounds, reps=args.reps, warmup=args.warmup, budget_s=args.budget_s,
                           seed=args.seed, num_classes=args.num_classes, strict=args.strict, on_progress=advance,
                           **options)
    except SEInjectError as e:
        err.print(f"[red]error[/red] {escape(first_line(e))}")
        return 2 if isinstance(e, (OptionError, UnknownModelError)) else 1
    payload = {**result.to_dict(), "command": shlex.join(["se-inject", *(sys.argv[1:] if argv is None else argv)])}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        render_bench(result, out)
    for name, message in result.failures.items():
        err.print(f"[red]error[/red] {escape(name)}: {escape(message.splitlines()[0])}")
    if args.out is not None:
        err.print(escape(f"wrote {args.out}"))
    return 1 if result.failures else 0
