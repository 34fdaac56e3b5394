"""Fresh memory a compiled model touches per call: minor page faults, original against se_inject.

On the CPU, a compiled model's time depends on how inductor plans its buffers as well as on its
kernels: a buffer that the allocator has given back to the kernel must be faulted in again, page by
page, on the next call. Page faults are counted exactly (``getrusage``), so they show a change of
plan that the timings of a shared machine blur. se_inject's SE tail is written under
``torch.compile`` so that its buffers are planned as the original model's: same count.

The count depends on the allocator's history in the process as well (which sizes it holds, and
when it gives memory back), so the variants are all compiled and warmed up before any is counted,
counted over interleaved rounds (the median round is reported), and read as a comparison
within one run: a variant whose plan keeps more buffers alive, or in a
different order, shows up as a higher count in every order tried.

    python benchmarks/page_faults.py                      # resnet50, batch 2, 160 px, 2 threads
    python benchmarks/page_faults.py --models resnet50 resnet101 --batch-size 4

To compare with an older se_inject, run this file with that checkout first on the path:
``PYTHONPATH=<old checkout> python benchmarks/page_faults.py --out /tmp/old``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import warnings
from pathlib import Path

import timm
import torch
from rich.console import Console

import se_inject

try:
    from .common import RESULTS, table, write_results
    from .bench_models import device_name, slug
except ImportError:  # run as a script: python benchmarks/page_faults.py
    from common import RESULTS, table, write_results  # type: ignore[no-redef]
    from bench_models import device_name, slug  # type: ignore[no-redef]


def faults_per_call(model: torch.nn.Module, x: torch.Tensor, calls: int) -> int:
    """Minor page faults per call of ``model(x)`` (compiled and warmed up by the caller)."""
    with torch.no_grad():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            model(x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=4, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the median is reported)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    console = Console()
    rows, data = [], []
    for name in args.models:
        torch.manual_seed(0)
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
        original = timm.create_model(name, pretrained=False).eval()
        variants = {
            "original": original,
            "se_inject": se_inject.apply(original, example_inputs=x).eval(),
            "se_inject, fuse_residual=False": se_inject.apply(original, example_inputs=x,
                                                              fuse_residual=False).eval(),
        }
        # Every variant compiled and warmed up before any is counted (see the module's docstring).
        compiled = {label: torch.compile(m) for label, m in variants.items()}
        with torch.no_grad():
            for m in compiled.values():
                for _ in range(3):
                    m(x)
        # Interleaved rounds, as bench_models.py times them; the median round per variant.
        per_round: dict[str, list[int]] = {label: [] for label in compiled}
        for _ in range(args.rounds):
            for label, m in compiled.items():
                per_round[label].append(faults_per_call(m, x, args.calls))
        counts = {label: int(statistics.median(v)) for label, v in per_round.items()}
        base = counts["original"]
        for label, count in counts.items():
            rows.append([name, label, f"{count}", f"{count / base:.3f}" if base else "–"])
            data.append({"model": name, "variant": label, "faults_per_call": count,
                         "per_round": per_round[label]})
        torch._dynamo.reset()
    device = device_name(torch.device("cpu"))
    heading = (f"### {device} · batch {args.batch_size} · {args.img_size}px · fp32 · "
               f"torch.compile · se_inject {se_inject.__version__}")
    md = table(console, "minor page faults per compiled forward", ["model", "variant", "faults/call", "vs original"],
               rows, align="llrr", heading=heading)
    path = write_results(f"page-faults-{slug('cpu-' + device)}", {"results": data}, md,
                         script="page_faults.py", argv=argv, out=args.out)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
