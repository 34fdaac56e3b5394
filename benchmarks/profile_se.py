"""Where an SE block's time goes, op by op: se_inject's SEBlock against timm's SEModule.

Both blocks hold the same weights (their state_dicts are interchangeable) and run on the
feature maps SE sees in ResNet-50 (one per stage). ``torch.profiler`` attributes time to each
aten op; the table lists the ops of each block, and the totals per block and stage, interleaved
over rounds.

    python benchmarks/profile_se.py                       # CPU, batch 2, 160 px feature maps
    python benchmarks/profile_se.py --device cuda --batch-size 256 --img-size 224 --channels-last

Findings (CPU) are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch
from rich.console import Console
from timm.layers import SEModule
from torch import nn
from torch.profiler import ProfilerActivity, profile

from se_inject import SEBlock

try:
    from .common import table
except ImportError:  # run as a script: python benchmarks/profile_se.py
    from common import table  # type: ignore[no-redef]

STAGES = [(256, 4), (512, 8), (1024, 16), (2048, 32)]  # (channels, stride) of ResNet-50's stages


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_blocks(blocks: dict[str, nn.Module], x: torch.Tensor, iters: int, rounds: int) -> dict[str, float]:
    """Median µs per call of each block, interleaved over rounds (order alternating)."""
    for block in blocks.values():
        for _ in range(10):
            block(x)
    times: dict[str, list[float]] = {k: [] for k in blocks}
    for r in range(rounds):
        for name in (list(blocks) if r % 2 == 0 else list(blocks)[::-1]):
            _sync(x.device)
            start = time.perf_counter()
            for _ in range(iters):
                blocks[name](x)
            _sync(x.device)
            times[name].append((time.perf_counter() - start) / iters * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def profile_ops(block: nn.Module, x: torch.Tensor, iters: int) -> dict[str, float]:
    """Self time per aten op, µs per call of the block."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            block(x)
    out = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            self_us = event.self_device_time_total if x.device.type == "cuda" else event.self_cpu_time_total
            out[event.key] = self_us / iters
    return out


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--img-size", type=int, default=160)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    totals, op_times = [], {}
    for stage, (channels, stride) in enumerate(STAGES, 1):
        side = args.img_size // stride
        x = torch.randn(args.batch_size, channels, side, side, device=device).contiguous(memory_format=memory)
        timm_se = SEModule(channels).to(device).eval()
        ours = SEBlock(channels).to(device).eval()
        ours.load_state_dict(timm_se.state_dict())
        blocks = {"timm SEModule": timm_se, "se_inject SEBlock": ours}
        medians = time_blocks(blocks, x, args.iters, args.rounds)
        for name, block in blocks.items():
            for op, us in profile_ops(block, x, args.iters).items():
                op_times.setdefault(op, {}).setdefault(name, 0.0)
                op_times[op][name] += us
        theirs, mine = medians["timm SEModule"], medians["se_inject SEBlock"]
        totals.append((str(stage), f"{channels}x{side}x{side}", f"{theirs:.1f}", f"{mine:.1f}", f"{theirs / mine:.2f}x"))
    console = Console()
    table(console, f"SE block time per call (µs), {device.type}, batch {args.batch_size}",
          ("stage", "shape", "timm SEModule", "se_inject SEBlock", "timm / se_inject"), totals)
    ops = [(op, f"{by.get('timm SEModule', 0.0):.1f}", f"{by.get('se_inject SEBlock', 0.0):.1f}")
           for op, by in sorted(op_times.items(), key=lambda kv: -max(kv[1].values()))]
    table(console, "aten ops, self time summed over all stages (µs per call)",
          ("op", "timm SEModule", "se_inject SEBlock"), ops)


if __name__ == "__main__":
    main()
