"""The one GPU command: correctness on CUDA first, then what SE costs, side by side, in one run.

    python benchmarks/gpu_se.py --commit <sha>          # about 7 minutes on an H100

Sections, in order of priority; each writes its results as soon as it ends (JSON lines in
``<out>/gpu-se.jsonl``, tables in ``<out>/*.md``), and a section that would not fit in what is left
of ``--budget-s`` is recorded as skipped rather than cut off:

1. ``kernels``: ``benchmarks/gpu_kernels.py`` (the fused op against its reference on CUDA, then
   per-stage timings against the floor, at ResNet-50's stage shapes);
2. ``check``: a converted resnet50 on CUDA, bf16 autocast, channels_last: the fused path
   (``kernels="auto"``) against plain torch ops, forward and a training step's gradients, and
   ``torch.compile(fullgraph=True)`` with the default and with the fused op;
3. ``resnet50-infer``, ``resnet50-train``: original vs se_inject (default, plain, fused under
   compile) vs timm's seresnet50, eager and compiled, batch 256, 224 px, bf16, channels_last;
4. ``more-infer``: convnext_tiny and mobilenetv2_100, original vs se_inject;
5. ``latency``, ``latency-cudagraphs``: resnet50 at batch 1, eager, compiled and compiled with
   ``mode="reduce-overhead"`` (CUDA graphs), where kernel launches, not bandwidth, set the cost;
6. ``freezing``: compiled inference with inductor's freezing, the documented inference recipe.

Without a CUDA device it says so and exits 0; ``--smoke`` runs every section on the CPU with tiny
sizes instead (the kernels section under TRITON_INTERPRET=1 only), to check the command itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

try:
    from . import bench_models
    from .common import RESULTS, versions, write_results
except ImportError:  # run as a script: python benchmarks/gpu_se.py
    import bench_models  # type: ignore[no-redef]
    from common import RESULTS, versions, write_results  # type: ignore[no-redef]

import se_inject

FULL = dict(batch_size=256, img_size=224, dtype="bf16", channels_last=True, threads=None, device="cuda",
            compile_mode=None, freeze=False)
#: (name, estimated seconds on an H100, bench_models settings)
SECTIONS: list[tuple[str, float, dict[str, Any]]] = [
    ("resnet50-infer", 110, dict(models=["resnet50"], modes=["infer"], rounds=6, reps=8, warmup=3,
                                 variants=["original", "se_inject", "se_inject plain", "se_inject fused", "timm SE"])),
    ("resnet50-train", 170, dict(models=["resnet50"], modes=["train"], rounds=5, reps=4, warmup=3,
                                 variants=["original", "se_inject", "timm SE"])),
    ("more-infer", 70, dict(models=["convnext_tiny", "mobilenetv2_100"], modes=["infer"], rounds=5, reps=6,
                            warmup=3, variants=["original", "se_inject"])),
    ("latency", 60, dict(models=["resnet50"], modes=["infer"], rounds=10, reps=30, warmup=5, batch_size=1,
                         variants=["original", "se_inject", "timm SE"])),
    ("latency-cudagraphs", 60, dict(models=["resnet50"], modes=["infer"], rounds=10, reps=30, warmup=5,
                                    batch_size=1, compile=[True], compile_mode="reduce-overhead",
                                    variants=["original", "se_inject", "timm SE"])),
    ("freezing", 50, dict(models=["resnet50"], modes=["infer"], rounds=6, reps=8, warmup=3, freeze=True,
                          compile=[True], variants=["original", "se_inject", "timm SE"])),
]


class Run:
    """The run's clock, its JSON-lines log and its output folder."""

    def __init__(self, out: Path, budget_s: float, commit: str, device: str) -> None:
        self.out, self.budget_s, self.start, self.device = out, budget_s, time.perf_counter(), device
        out.mkdir(parents=True, exist_ok=True)
        self.log = (out / "gpu-se.jsonl").open("a")
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
        self.put({"section": "env", "commit": commit, "device": name,
                  **versions(), "triton": _triton_version(), "budget_s": budget_s})

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def put(self, record: dict[str, Any]) -> None:
        self.log.write(json.dumps({"t": round(time.perf_counter() - self.start, 1), **record}) + "\n")
        self.log.flush()
        print(json.dumps(record)[:400], flush=True)

    def section(self, name: str, estimate: float, fn: Callable[[], Optional[dict[str, Any]]]) -> None:
        if self.left() < estimate:
            self.put({"section": name, "skipped": f"needs about {estimate:.0f} s, {self.left():.0f} s left"})
            return
        started = time.perf_counter()
        try:
            result = fn() or {}
            self.put({"section": name, "seconds": round(time.perf_counter() - started, 1), **result})
        except Exception as e:  # one failing section must not cost the others
            self.put({"section": name, "error": f"{type(e).__name__}: {e}"[:500],
                      "trace": traceback.format_exc()[-1500:]})


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-12))


def check(device: str = "cuda", name: str = "resnet50", size: int = 224, batch: int = 8) -> dict[str, Any]:
    """The fused path against plain torch ops on a converted resnet50, eager and compiled."""
    import timm

    torch.manual_seed(0)
    model = se_inject.apply(timm.create_model(name, zero_init_last=False), example_inputs=torch.randn(1, 3, size, size))
    model = model.to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    out: dict[str, Any] = {}
    with torch.autocast(device, dtype=torch.bfloat16):
        for mode in ("plain", "auto"):
            se_inject.set_kernels(model, mode)
            model.train()
            model.zero_grad(set_to_none=True)
            y = model(x)
            y.float().square().mean().backward()
            out[mode] = (y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if ".se." in n})
        model.eval()
        with torch.no_grad():
            eager = model(x)
            for mode in ("auto", "fused"):
                se_inject.set_kernels(model, mode)
                torch._dynamo.reset()
                compiled = torch.compile(model, fullgraph=True)(x)
                out[f"compiled_{mode}_rel_err"] = _rel(compiled, eager)
    (y_plain, g_plain), (y_auto, g_auto) = out.pop("plain"), out.pop("auto")
    out["forward_rel_err"] = _rel(y_auto, y_plain)
    out["se_grad_rel_err_max"] = max(_rel(g_auto[n], g_plain[n]) for n in g_plain)
    out["ok"] = out["forward_rel_err"] < 3e-2 and out["se_grad_rel_err_max"] < 1e-1
    return out


def _kernels_section(command: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run gpu_kernels.py; unless its kernel checks all passed, switch every SE block of this
    process to plain kernels (a kernel that faults must not kill the model sections)."""
    try:
        exit_code: Any = subprocess.run(command, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        exit_code = "timeout"
    lines = log.read_text().splitlines() if log.exists() else []
    records = [json.loads(line) for line in lines]
    start = max((i for i, r in enumerate(records) if r.get("kind") == "env"), default=0)
    verdicts = [r["kernels_ok"] for r in records[start:] if r.get("kind") == "checks done"]
    if exit_code != 2 and verdicts and verdicts[-1]:
        return {"exit": exit_code, "kernels_ok": True}
    import se_inject.fused

    se_inject.fused.use_fused = lambda *args, **kwargs: False  # what every SE block asks
    return {"exit": exit_code, "kernels_ok": False, "plain_kernels_from_here": "the fused kernels failed or did not "
            "finish their checks: every later section runs plain kernels, 'se_inject fused' rows included"}


SMOKE = dict(device="cpu", batch_size=2, img_size=32, dtype="fp32", channels_last=False, rounds=1, reps=1,
             warmup=1, models=["resnet10t"])


def bench(run: Run, name: str, settings: dict[str, Any]) -> dict[str, Any]:
    extra = SMOKE if run.device == "cpu" else {}
    args = argparse.Namespace(**{**FULL, "compile": [False, True], **settings, **extra})
    device = torch.device(args.device)
    from rich.console import Console

    console = Console()
    rows = [r for model in args.models for r in bench_models.bench_model(model, args, device, console)]
    summary = bench_models.ratios(rows)
    device_name = bench_models.device_name(device)
    title = (f"{device_name} · {name} · batch {args.batch_size} · {args.img_size}px · {args.dtype}"
             f"{' · channels_last' if args.channels_last else ''} · torch {torch.__version__}")
    markdown = bench_models.render(rows, summary, console, title)
    write_results(f"gpu-{name}", {"device": device_name, "config": vars(args), "rows": rows,
                                  "ratios": summary}, markdown, script="gpu_se.py", out=run.out)
    return {"ratios": [{k: v for k, v in s.items() if not k.endswith("_iqr")} for s in summary]}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS / "gpu")
    p.add_argument("--budget-s", type=float, default=450.0, help="start no section that would end after this")
    p.add_argument("--kernels-budget-s", type=float, default=150.0, help="time for benchmarks/gpu_kernels.py")
    p.add_argument("--commit", default="unknown", help="the se_inject commit measured (recorded)")
    p.add_argument("--smoke", action="store_true", help="every section on the CPU with tiny sizes")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device: nothing to measure (run this on a GPU machine, or pass --smoke)")
        return 0
    device = "cpu" if args.smoke else "cuda"
    run = Run(args.out, args.budget_s, args.commit, device)
    kernels = [sys.executable, str(Path(__file__).with_name("gpu_kernels.py")), "--out", str(args.out / "gpu-kernels.jsonl"),
               "--budget-s", str(args.kernels_budget_s - 10)] + (["--interpret-smoke"] if args.smoke else [])
    # its own process: TRITON_INTERPRET (smoke) must be set before Triton is imported, and a
    # kernel that crashes must not take the model benchmarks with it; if its kernel checks failed
    # (exit 2) or it died, every later section runs plain kernels and the log says so
    run.section("kernels", args.kernels_budget_s,
                lambda: _kernels_section(kernels, args.out / "gpu-kernels.jsonl", args.kernels_budget_s + 60))
    run.section("check", 40, (lambda: check("cpu", "resnet10t", 32, 2)) if args.smoke else check)
    for name, estimate, settings in SECTIONS:
        run.section(name, estimate, lambda name=name, settings=settings: bench(run, name, settings))
    run.put({"section": "done", "total_s": round(time.perf_counter() - run.start, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
