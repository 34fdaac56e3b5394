"""What ``se_inject.apply`` costs, against a bare fx trace plus one forward of the same model.

For each model, interleaved over rounds (median reported, with the range):

* ``trace+fwd``: ``torch.fx.symbolic_trace(model)`` and one forward of the traced module, no grad
  (for models plain fx cannot trace, se_inject's tracer with timm's leaves is used, and marked);
* ``apply``: ``se_inject.apply(model, example_inputs=x)``, everything included (the deep copy of
  the model, tracing, shape propagation, the eager forward that verifies the traced graph,
  building and installing the blocks);
* ``apply inplace``: the same with ``inplace=True`` on a copy made outside the timer, i.e. without
  the deep copy.

The default models show how the cost grows with depth (resnet18 -> 152) and on other shapes of
network; ``--sample`` adds one model of each family of the coverage sweep's CI subset.

``--hf`` instead times ``apply`` on Hugging Face's ResNet-50 (``ResNetConfig()``, which fx cannot
trace whole: the deep scope search, options baked in) against timm's ``resnet50``, same
1x3x224x224 input, interleaved, and writes ``apply-hf.md``.

    python benchmarks/bench_apply.py
    python benchmarks/bench_apply.py --models resnet50 --rounds 9
    python benchmarks/bench_apply.py --hf --rounds 7
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path
from typing import Optional

import timm
import torch
from rich.console import Console
from torch import fx

import se_inject
from se_inject.trace.tracer import trace

try:
    from .common import RESULTS, table, write_results
except ImportError:  # run as a script: python benchmarks/bench_apply.py
    from common import RESULTS, table, write_results  # type: ignore[no-redef]
DEFAULT = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "convnext_tiny", "hrnet_w18_small"]
SAMPLE = ["efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "res2net50_26w_4s", "nf_resnet50",
          "dla34", "ghostnet_100", "resnetv2_50", "mambaout_femto", "vit_tiny_patch16_224"]


def _trace_forward(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """fx trace + one forward; returns whether plain ``symbolic_trace`` could do it."""
    try:
        gm, plain = fx.symbolic_trace(model), True
    except Exception:
        gm, plain = trace(model), False
    with torch.no_grad():
        gm(x)
    return plain


def measure(name: str, rounds: int, console: Console) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = se_inject.default_example_inputs(model)[0]
    times: dict[str, list[float]] = {"trace+fwd": [], "apply": [], "apply inplace": []}
    plain = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_inject.SEInjectWarning)
        for r in range(rounds + 1):  # round 0 warms caches up and is not counted
            spare = copy.deepcopy(model)
            start = time.perf_counter()
            plain = _trace_forward(model, x)
            t0 = time.perf_counter()
            se_inject.apply(model, example_inputs=x)
            t1 = time.perf_counter()
            se_inject.apply(spare, example_inputs=x, inplace=True)
            t2 = time.perf_counter()
            if r:
                times["trace+fwd"].append(t0 - start)
                times["apply"].append(t1 - t0)
                times["apply inplace"].append(t2 - t1)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "input": list(x.shape),
           "plain_fx": plain, **{f"{k}_s": v for k, v in med.items()},
           "ranges_s": {k: [min(v), max(v)] for k, v in times.items()},
           "ratio": med["apply"] / med["trace+fwd"], "ratio_inplace": med["apply inplace"] / med["trace+fwd"]}
    console.log(f"{name}: trace+fwd {med['trace+fwd']:.3f}s apply {med['apply']:.3f}s ({row['ratio']:.2f}x)")
    return row


def measure_hf(rounds: int, console: Console) -> dict:
    """apply on HF ResNet-50 and on timm's resnet50, interleaved, same input."""
    import transformers

    torch.manual_seed(0)
    models = {"timm resnet50": timm.create_model("resnet50", pretrained=False).eval(),
              "HF ResNet-50": transformers.ResNetForImageClassification(
                  transformers.ResNetConfig()).eval()}
    x = torch.randn(1, 3, 224, 224)
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}  # process time: steadier on a shared machine
    forward: dict[str, list[float]] = {name: [] for name in models}
    sites = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_inject.SEInjectWarning)
        for r in range(rounds + 1):  # round 0 warms caches up and is not counted
            for name, model in models.items():
                start = time.perf_counter()
                with torch.no_grad():
                    model(x)
                t0, c0 = time.perf_counter(), time.process_time()
                sites[name] = len(se_inject.inject(model, example_inputs=x).plan.sites)
                t1, c1 = time.perf_counter(), time.process_time()
                if r:
                    forward[name].append(t0 - start)
                    times[name].append(t1 - t0)
                    cpu[name].append(c1 - c0)
    rows = [{"model": name, "sites": sites[name], "forward_s": statistics.median(forward[name]),
             "apply_s": statistics.median(times[name]), "ranges_s": [min(times[name]), max(times[name])],
             "apply_cpu_s": statistics.median(cpu[name])} for name in models]
    ratio = rows[1]["apply_s"] / rows[0]["apply_s"]
    cpu_ratio = rows[1]["apply_cpu_s"] / rows[0]["apply_cpu_s"]
    console.log(f"apply: timm {rows[0]['apply_s']:.3f}s, HF {rows[1]['apply_s']:.3f}s ({ratio:.2f}x; CPU time {cpu_ratio:.2f}x)")
    return {"rows": rows, "ratio": ratio, "cpu_ratio": cpu_ratio, "input": list(x.shape)}


def main_hf(args: argparse.Namespace, argv: Optional[list[str]], console: Console) -> None:
    result = measure_hf(args.rounds, console)
    cells = [(r["model"], str(r["sites"]), f"{r['forward_s']:.3f}", f"{r['apply_s']:.3f}",
              f"{r['ranges_s'][0]:.3f}–{r['ranges_s'][1]:.3f}", f"{r['apply_s'] / r['forward_s']:.1f}",
              f"{r['apply_cpu_s']:.3f}") for r in result["rows"]]
    md = table(console, f"apply on HF ResNet-50 vs timm resnet50 · 1x3x224x224 · CPU {torch.get_num_threads()} "
               f"threads · torch {torch.__version__}",
               ("model", "sites", "forward s", "apply s", "apply range s", "apply / forward", "apply CPU s"), cells)
    note = (f"HF / timm apply time: **{result['ratio']:.2f}x** wall, {result['cpu_ratio']:.2f}x CPU time. Medians "
            f"over {args.rounds} interleaved rounds (`inject`, deep copy included). The HF model needs the deep "
            f"scope search: its root traces only with `resnet.embedder` as a leaf and its options baked in, "
            f"which costs a forward that records every module's call, more trace attempts, and the proof of "
            f"the leaf's channel dim in the shape pass.")
    console.print(note)
    path = write_results("apply-hf", {"threads": torch.get_num_threads(), **result}, md + f"\n{note}\n",
                         script="bench_apply.py", argv=argv, out=args.out)
    console.print(f"wrote {path} and .json")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT)
    p.add_argument("--sample", action="store_true", help="also one model per family of a timm-wide sample")
    p.add_argument("--hf", action="store_true", help="HF ResNet-50 against timm resnet50 instead (apply-hf.md)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    console = Console()
    if args.hf:
        main_hf(args, argv, console)
        return
    names = args.models + (SAMPLE if args.sample else [])
    rows = [measure(n, args.rounds, console) for n in names]

    cols = ("model", "params", "input", "trace+fwd s", "apply s", "apply/trace+fwd", "apply inplace s", "inplace ratio")
    cells = [(r["model"] + ("" if r["plain_fx"] else " *"), f"{r['params'] / 1e6:.1f}M",
              "x".join(map(str, r["input"][1:])), f"{r['trace+fwd_s']:.3f}", f"{r['apply_s']:.3f}",
              f"{r['ratio']:.2f}x", f"{r['apply inplace_s']:.3f}", f"{r['ratio_inplace']:.2f}x") for r in rows]
    md = table(console, f"apply vs trace+forward · CPU {torch.get_num_threads()} threads · torch {torch.__version__}",
               cols, cells)
    note = ("Medians over rounds, interleaved. `*`: plain torch.fx.symbolic_trace fails on the model; the "
            "baseline uses se_inject's tracer (timm's leaves).")
    console.print(note)
    path = write_results("apply", {"threads": torch.get_num_threads(), "rows": rows}, md + f"\n{note}\n",
                         script="bench_apply.py", argv=argv, out=args.out)
    console.print(f"wrote {path} and .json")


if __name__ == "__main__":
    main()
