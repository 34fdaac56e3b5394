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

Results go to ``benchmarks/results/<name>-<device>.json`` and ``.md`` (``--name``, default ``models``).

    python benchmarks/bench_models.py                                  # CPU defaults, a few minutes
    python benchmarks/bench_models.py --models resnet18 resnet50 resnet101 convnext_tiny mobilenetv2_100
    python benchmarks/bench_models.py --device cuda --dtype bf16 --channels-last --batch-size 256 --img-size 224
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import timm
import torch
from rich.console import Console

import se_inject

try:
    from .common import RESULTS, table, write_results
except ImportError:  # run as a script: python benchmarks/bench_models.py
    from common import RESULTS, table, write_results  # type: ignore[no-redef]

NATIVE_SE = {
    "resnet18": "seresnet18",
    "resnet34": "seresnet34",
    "resnet50": "seresnet50",
    "resnet101": "seresnet101",
    "resnet152": "seresnet152",
    "resnext50_32x4d": "seresnext50_32x4d",
    "resnext101_32x8d": "seresnext101_32x8d",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


#: The variants a run can compare: se_inject's model with its default kernels ("auto": the fused op
#: on CUDA in eager mode, plain torch ops under torch.compile), forced to plain torch ops, or to
#: the fused op under torch.compile too; and timm's hand-written SE model where timm has one.
VARIANTS = ("original", "se_inject", "se_inject plain", "se_inject fused", "timm SE")
_KERNELS = {"se_inject": "auto", "se_inject plain": "plain", "se_inject fused": "fused"}


def build_variants(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    """The variants ``args.variants`` asks for (timm SE only where timm has one), same init seed."""
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False)
    example = torch.randn(1, 3, args.img_size, args.img_size)
    converted = se_inject.apply(original, example_inputs=example) if set(_KERNELS) & set(args.variants) else None
    variants: dict[str, torch.nn.Module] = {}
    for variant in args.variants:
        if variant == "original":
            variants[variant] = original
        elif variant in _KERNELS:
            copy = converted if variant == "se_inject" else se_inject.apply(original, example_inputs=example)
            variants[variant] = se_inject.set_kernels(copy, _KERNELS[variant])
        elif variant == "timm SE" and name in NATIVE_SE:
            variants[variant] = timm.create_model(NATIVE_SE[name], pretrained=False)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    return {k: m.to(device=device, memory_format=memory) for k, m in variants.items()}


def make_step(model: torch.nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
              compiled: bool, compile_mode: Optional[str] = None) -> Callable[[], Any]:
    """A closure running one inference or one training step."""
    autocast = dtype != torch.float32
    device_type = x.device.type
    if mode == "infer":
        model.eval()
        fn = torch.compile(model, mode=compile_mode) if compiled else model

        def step() -> Any:
            with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=autocast):
                return fn(x)
        return step

    model.train()
    fn = torch.compile(model, mode=compile_mode) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype, enabled=autocast):
            loss = loss_fn(fn(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round(step: Callable[[], Any], reps: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        step()
    sync(device)
    return (time.perf_counter() - start) / reps


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def bench_model(name: str, args: argparse.Namespace, device: torch.device, console: Console) -> list[dict]:
    dtype = DTYPES[args.dtype]
    variants = build_variants(name, args, device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    if not args.freeze:
        return _bench_modes(name, args, variants, x, y, dtype, device, console)
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        return _bench_modes(name, args, variants, x, y, dtype, device, console)


def _bench_modes(name: str, args: argparse.Namespace, variants: dict, x: torch.Tensor, y: torch.Tensor,
                 dtype: torch.dtype, device: torch.device, console: Console) -> list[dict]:
    rows = []
    for mode in args.modes:
        for compiled in args.compile:
            steps: dict[str, Callable[[], Any]] = {}
            for vname, model in variants.items():
                steps[vname] = make_step(model, mode, x, y, dtype, compiled, args.compile_mode)
                started = time.perf_counter()
                for _ in range(args.warmup):  # compiles on the first call
                    steps[vname]()
                sync(device)
                console.log(f"{name} {vname} {mode} {'compiled' if compiled else 'eager'}: "
                            f"warm-up {time.perf_counter() - started:.1f}s")
            times: dict[str, list[float]] = {v: [] for v in steps}
            order = list(steps)
            for r in range(args.rounds):
                rotated = order[r % len(order):] + order[: r % len(order)]
                for vname in rotated:
                    times[vname].append(time_round(steps[vname], args.reps, device))
            for vname, values in times.items():
                q1, med, q3 = quartiles(values)
                rows.append({"model": name, "variant": vname, "mode": mode,
                             "compiled": compiled, "median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
                             "rounds_ms": [v * 1e3 for v in values]})
    return rows


def _paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Quartiles of the per-round ratios a[r] / b[r]: pairing cancels drift between rounds."""
    return quartiles([x / y for x, y in zip(a, b)])


def ratios(rows: list[dict]) -> list[dict]:
    """Per (model, mode, compiled, SE variant): its overhead over the original and, where timm has
    a hand-written SE model, how it compares with it; all from paired rounds."""
    out = []
    keys = sorted({(r["model"], r["mode"], r["compiled"]) for r in rows}, key=str)
    for model, mode, compiled in keys:
        group = {r["variant"]: r["rounds_ms"] for r in rows
                 if (r["model"], r["mode"], r["compiled"]) == (model, mode, compiled)}
        for variant in (v for v in VARIANTS if v in group and v != "original"):
            q1, med, q3 = _paired(group[variant], group["original"])
            entry: dict[str, Any] = {"model": model, "mode": mode, "compiled": compiled, "variant": variant,
                                     "overhead": med - 1, "overhead_iqr": [q1 - 1, q3 - 1]}
            if "timm SE" in group and variant != "timm SE":
                q1, med, q3 = _paired(group["timm SE"], group[variant])
                entry["vs_timm"], entry["vs_timm_iqr"] = med, [q1, q3]
            out.append(entry)
    return out


def _pct(value: float, iqr: list[float]) -> str:
    return f"{100 * value:+.1f}% ({100 * iqr[0]:+.1f}…{100 * iqr[1]:+.1f})"


def render(rows: list[dict], summary: list[dict], console: Console, title: str) -> str:
    """Print the tables and return them as markdown."""
    times = [(r["model"], r["mode"], "compiled" if r["compiled"] else "eager", r["variant"],
              f"{r['median_ms']:.2f}", f"{r['q1_ms']:.2f}–{r['q3_ms']:.2f}") for r in rows]
    md = table(console, title, ("model", "mode", "", "variant", "median ms", "IQR ms"), times,
               align="llllrr", heading=f"### {title}")
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
