"""Speed of the original model, the se_inject model and timm's hand-written SE model, side by side.

For each model the variants run interleaved in one process (round after round, the order rotated
each round), eager and under ``torch.compile``, for inference and for a training step
(forward + cross-entropy + backward + SGD step). Each figure is the median over rounds of the mean
time per iteration within a round; the spread is the interquartile range over rounds. Ratios are
taken between medians measured in the same run:

* ``overhead`` = time(SE variant) / time(original) - 1: what SE costs;
* ``vs timm`` = time(timm SE) / time(se_inject): above 1.00 se_inject is faster than timm's
  hand-written SE model.

Ratios are computed per round (the variants of a round run back to back) and summarised by
their median and interquartile range, which cancels the drift of a shared machine between rounds.

The measuring is ``se_inject.bench``'s (``se_inject/cost/``, also ``se-inject bench``): each
compiled variant compiled fresh, a recompile-limit hit an error instead of eager timings, the
bytes a training step saves for backward counted; this script keeps its command line and the
format of its results (rows now also carry ``warmup_s``, ``saved_bytes`` and ``cuda_peak_bytes``).

Results go to ``benchmarks/results/<name>-<device>.json`` and ``.md`` (``--name``, default ``models``).

    python benchmarks/bench_models.py                                  # CPU defaults, a few minutes
    python benchmarks/bench_models.py --models resnet18 resnet50 resnet101 convnext_tiny mobilenetv2_100
    python benchmarks/bench_models.py --device cuda --dtype bf16 --channels-last --batch-size 256 --img-size 224
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import torch
from rich.console import Console

import se_inject
from se_inject.cost import timing
from se_inject.cost.run import device_name
from se_inject.cost.settings import DTYPES

try:
    from .common import RESULTS, table, write_results
except ImportError:  # run as a script: python benchmarks/bench_models.py
    from common import RESULTS, table, write_results  # type: ignore[no-redef]

__all__ = ["VARIANTS", "bench_model", "ratios", "render", "device_name", "main"]

#: The variants a run can compare, as this script has always named them: se_inject's model with
#: its default kernels ("auto": the fused op on CUDA in eager mode, plain torch ops under
#: torch.compile), forced to plain torch ops, or to the fused op under torch.compile too; and
#: timm's hand-written SE model where timm has one (se_inject.bench's "timm" variant).
VARIANTS = ("original", "se_inject", "se_inject plain", "se_inject fused", "timm SE")
_LIBRARY = {"timm SE": "timm"}
_SCRIPT = {v: k for k, v in _LIBRARY.items()}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def bench_model(name: str, args: argparse.Namespace, device: torch.device, console: Console) -> list[dict]:
    """Time ``name``'s variants with ``se_inject.bench``; one row per (variant, mode, compiled)."""
    result = se_inject.bench(
        name, variants=[_LIBRARY.get(v, v) for v in args.variants], modes=args.modes, compiled=args.compile,
        compile_mode=args.compile_mode, freeze=args.freeze, device=str(device), dtype=args.dtype,
        channels_last=args.channels_last, batch_sizes=[args.batch_size], img_size=args.img_size, rounds=args.rounds,
        reps=args.reps, warmup=args.warmup, budget_s=getattr(args, "budget_s", None))
    for model, error in result.failures.items():
        console.log(f"{model}: {error}")
    rows = []
    for cell in result.cells:
        kind = "compiled" if cell.compiled else "eager"
        if cell.skipped:
            console.log(f"{name} {cell.mode} {kind}: skipped ({cell.skipped})")
        for t in cell.timings:
            console.log(f"{name} {_SCRIPT.get(t.variant, t.variant)} {cell.mode} {kind}: warm-up {t.warmup_s:.1f}s")
            rows.append({"model": name, "variant": _SCRIPT.get(t.variant, t.variant), "mode": cell.mode,
                         "compiled": cell.compiled, "median_ms": t.ms.median, "q1_ms": t.ms.q1, "q3_ms": t.ms.q3,
                         "rounds_ms": list(t.rounds_ms), "warmup_s": t.warmup_s, "saved_bytes": t.saved_bytes,
                         "cuda_peak_bytes": t.cuda_peak_bytes})
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Per (model, mode, compiled, SE variant): its overhead over the original and, where timm has
    a hand-written SE model, how it compares with it; all from paired rounds."""
    out = []
    keys = sorted({(r["model"], r["mode"], r["compiled"]) for r in rows}, key=str)
    for model, mode, compiled in keys:
        group = {r["variant"]: r["rounds_ms"] for r in rows
                 if (r["model"], r["mode"], r["compiled"]) == (model, mode, compiled)}
        for variant in (v for v in VARIANTS if v in group and v != "original" and "original" in group):
            over = timing.paired(group[variant], group["original"])
            entry: dict[str, Any] = {"model": model, "mode": mode, "compiled": compiled, "variant": variant,
                                     "overhead": over.median, "overhead_iqr": [over.q1, over.q3]}
            if "timm SE" in group and variant != "timm SE":
                vs = timing.paired(group["timm SE"], group[variant], minus_one=False)
                entry["vs_timm"], entry["vs_timm_iqr"] = vs.median, [vs.q1, vs.q3]
            out.append(entry)
    return out


def _pct(value: float, iqr: list[float]) -> str:
    return f"{100 * value:+.1f}% ({100 * iqr[0]:+.1f}…{100 * iqr[1]:+.1f})"


def render(rows: list[dict], summary: list[dict], console: Console, title: str) -> str:
    """Print the tables and return them as markdown."""
    times = [(r["model"], r["mode"], "compiled" if r["compiled"] else "eager", r["variant"],
              f"{r['median_ms']:.2f}", f"{r['q1_ms']:.2f}–{r['q3_ms']:.2f}",
              "–" if r.get("saved_bytes") is None else f"{r['saved_bytes'] / 2 ** 20:.1f}") for r in rows]
    md = table(console, title, ("model", "mode", "", "variant", "median ms", "IQR ms", "saved for backward MiB"),
               times, align="llllrrr", heading=f"### {title}")
    ratio_rows = [(s["model"], s["mode"], "compiled" if s["compiled"] else "eager", s["variant"],
                   _pct(s["overhead"], s["overhead_iqr"]),
                   f"{s['vs_timm']:.3f} ({s['vs_timm_iqr'][0]:.3f}…{s['vs_timm_iqr'][1]:.3f})" if "vs_timm" in s else "–")
                  for s in summary]
    md += "\n" + table(console, "ratios: median (IQR) over rounds of per-round paired ratios",
                       ("model", "mode", "", "variant", "SE overhead", "vs timm SE (×, >1 = faster)"),
                       ratio_rows, align="llllrr")
    return md


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50"], help="timm model names (default resnet50)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--img-size", type=int, default=160)
    p.add_argument("--reps", type=int, default=5, help="iterations per timed round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation happens here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (fp32: none)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--modes", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    p.add_argument("--compile", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"],
                   help="eager, compiled, or both (default both)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["original", "se_inject", "timm SE"],
                   help="what to compare (default: original, se_inject, timm SE)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--freeze", action="store_true",
                   help="compiled inference with inductor's freezing (constant-folds weights, folds BN into convs)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds per model (se_inject.bench's budget)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--name", default="models", help="results file stem: <out>/<name>-<device>.json/.md")
    args = p.parse_args(argv)
    args.compile = [c == "compiled" for c in args.compile]
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    console = Console()
    name = device_name(device)
    title = (f"{name} · batch {args.batch_size} · {args.img_size}px · {args.dtype}"
             f"{' · channels_last' if args.channels_last else ''} · torch {torch.__version__}")
    rows: list[dict] = []
    for model in args.models:
        rows += bench_model(model, args, device, console)
    summary = ratios(rows)
    markdown = render(rows, summary, console, title)
    stem = f"{args.name}-{slug(device.type + '-' + name)}"
    config = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    path = write_results(stem, {"device": name, "config": config, "rows": rows, "ratios": summary}, markdown,
                         script="bench_models.py", argv=argv, out=args.out)
    console.print(f"wrote {path} and .json")


if __name__ == "__main__":
    main()
