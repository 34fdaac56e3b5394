"""Host time per call of the fused SE op with its kernel launches stubbed, now and at an older
commit, side by side: what batch-1 latency on a GPU is made of.

On a GPU at batch 1 the kernels take microseconds and the CPU work around them (argument checks,
custom-op and autograd dispatch, launch planning, the tiny MLP's torch ops) sets the time. This
measures that work on the CPU: the op runs its Triton path on CPU tensors with every kernel
launch replaced by a no-op (``se_inject.fused._common.launch``, or ``wrap_triton`` before it
existed), so what is timed is everything but the kernels and Triton's own launcher. The plain
torch ops of the same tail (``se_residual_reference``: mean, two linears, act, gate, mul, add,
act) are timed beside it; on the CPU they also compute, on tiny tensors. The launchers alone
(the squeeze and scale launchers of the forward, K1 and K2 of the backward, called directly)
are the per-call launch planning and output allocation.

    python benchmarks/host_overhead.py                    # this checkout against 460f34a
    python benchmarks/host_overhead.py --against none

Each (variant, case) is timed over interleaved rounds (``--rounds`` of ``--calls`` calls) in a
worker process per checkout; the workers alternate (``--repeats`` each, so a change of load on
the machine hits both), and the median over every round of a checkout is reported with its IQR,
in microseconds, on one thread. Timings of a shared machine are noisy: compare within one run,
and re-measure on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

try:
    from .at_commit import ROOT, head_commit, run_worker, source_at
except ImportError:  # run as a script: python benchmarks/host_overhead.py
    from at_commit import ROOT, head_commit, run_worker, source_at  # type: ignore[no-redef]

RESULTS = ROOT / "benchmarks" / "results"
BASE = "460f34a"
SHAPE = (1, 256, 14, 14)  # batch 1, a mid ResNet stage


def _stub_launches() -> None:
    """Make the fused modules take their Triton path on CPU tensors and launch nothing."""
    import importlib

    from se_inject.fused import backward, scale, squeeze

    se_residual = importlib.import_module("se_inject.fused.se_residual")  # the package's attribute is the function

    class _NoKernel:  # se_inject before '_common.launch': wrap_triton(kernel)[grid](...)
        def __getitem__(self, grid: Any) -> Callable[..., None]:
            return lambda *args, **kwargs: None

    for module in (squeeze, scale, backward, se_residual):
        if hasattr(module, "launch"):
            module.launch = lambda kernel, programs, args, meta: None
        if hasattr(module, "wrap_triton"):
            module.wrap_triton = lambda kernel: _NoKernel()
        if hasattr(module, "tensors_supported"):
            module.tensors_supported = lambda *args, **kwargs: True


def _cases(layout: str) -> dict[str, Callable[[], Any]]:
    import torch

    import se_inject.fused as fused

    gen = torch.Generator().manual_seed(0)
    N, C = SHAPE[:2]
    x = torch.randn(SHAPE, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    params = [torch.randn(16, C, 1, 1, generator=gen), torch.randn(16, generator=gen),
              torch.randn(C, 16, 1, 1, generator=gen), torch.randn(C, generator=gen)]
    gain, sc, grad = torch.tensor(2.0), torch.randn_like(x), torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, sc, *params)]
    names = ("relu", "sigmoid", "relu")

    def forward(fn: Callable) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return fn(x, sc, *params, gain, *names)
        return run

    def training(fn: Callable) -> Callable[[], Any]:
        def run() -> None:
            fn(*leaves, gain, *names).backward(grad)
        return run

    from se_inject.fused import backward, scale, squeeze

    g, out = torch.rand(N, C, generator=gen), torch.relu(x + sc)

    def launchers_forward() -> None:  # the per-call planning and allocation of the forward
        squeeze.squeeze_launch(x)
        scale.scale_launch(x, g, sc, "relu")

    def launchers_backward() -> None:
        _, dz = backward.gate_grad_launch(grad, x, sc, out, g, "relu")
        backward.input_grad_launch(dz, x, g, g)

    return {"fused forward": forward(fused.se_residual), "fused forward+backward": training(fused.se_residual),
            "plain forward": forward(fused.se_residual_reference),
            "plain forward+backward": training(fused.se_residual_reference),
            "launchers of the forward (squeeze, scale)": launchers_forward,
            "launchers of the backward (K1, K2)": launchers_backward}


def worker(layout: str, calls: int, rounds: int) -> dict[str, list[float]]:
    """Microseconds per call of every case in each of ``rounds`` interleaved rounds."""
    import torch

    torch.set_num_threads(1)
    _stub_launches()
    cases = _cases(layout)
    for fn in cases.values():  # warm up: first calls import, register and plan
        for _ in range(20):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return times


def summary(rounds: list[dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Median and IQR (microseconds per call) of each case over every worker's rounds."""
    out = {}
    for name in rounds[0]:
        ts = [t for r in rounds for t in r[name]]
        q1, median, q3 = statistics.quantiles(ts, n=4)
        out[name] = {"us": round(median, 1), "iqr_us": round(q3 - q1, 1), "min_us": round(min(ts), 1)}
    return out


def render(runs: dict[str, dict[str, dict]], layout: str) -> str:
    labels = list(runs)
    names = list(next(iter(runs.values())))
    head = ["per call"] + [f"{label}: median µs (IQR), min" for label in labels]
    md = [f"| {' | '.join(head)} |", "|---|" + "---:|" * len(labels)]
    for name in names:
        cells = [f"{runs[lb][name]['us']:.1f} ({runs[lb][name]['iqr_us']:.1f}), {runs[lb][name]['min_us']:.1f}"
                 for lb in labels]
        md.append("| " + " | ".join([name] + cells) + " |")
    return f"x {SHAPE}, {layout}, fp32, relu/sigmoid/relu, shortcut, gain; one thread\n\n" + "\n".join(md) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default=BASE, help="a commit to measure side by side ('none': skip)")
    p.add_argument("--layout", default="channels_last", choices=["channels_last", "nchw"])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--repeats", type=int, default=3, help="worker processes per checkout, alternating")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    wargs = ["--layout", args.layout, "--calls", str(args.calls), "--rounds", str(args.rounds)]
    if args.worker:
        print(json.dumps(worker(args.layout, args.calls, args.rounds)))
        return 0
    import platform

    import torch

    script = Path(__file__).resolve()
    sources = {head_commit(): ROOT}
    if args.against != "none":
        sources = {args.against: source_at(args.against), **sources}
    rounds: dict[str, list] = {label: [] for label in sources}
    for _ in range(args.repeats):
        for label, source in sources.items():
            rounds[label].append(run_worker(script, wargs, source))
    runs = {label: summary(r) for label, r in rounds.items()}
    md = ("# Host time per call of the fused SE op, kernel launches stubbed\n\n"
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, CPU tensors, "
          "one thread; each worker imports se_inject as it was at its commit.\n\n" + render(runs, args.layout))
    cmd = "python benchmarks/host_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host-overhead.md").write_text(md + f"\nCommand: `{cmd.strip()}`\n")
    (args.out / "host-overhead.json").write_text(json.dumps(
        {"shape": SHAPE, "layout": args.layout, "torch": torch.__version__, "runs": runs,
         "rounds": rounds, "command": cmd.strip()}, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
