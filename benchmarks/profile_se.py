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
from rich.table import Table
from timm.layers import SEModule
from torch.profiler import ProfilerActivity, profile

from se_inject import SEBlock

STAGES = [(256, 4), (512, 8), (1024, 16), (2048, 32)]  # (channels, stride) of ResNet-50's stages


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
    console = Console()
    memory = torch.channels_last if args.channels_last else torch.contiguous_format

    totals = Table(title=f"SE block time per call (µs), {device.type}, batch {args.batch_size}", title_justify="left")
    for col in ("stage", "shape", "timm SEModule", "se_inject SEBlock", "timm / se_inject"):
        totals.add_column(col, justify="right")
    ops = Table(title="aten ops, self time summed over all stages (µs per call)", title_justify="left")
    for col in ("op", "timm SEModule", "se_inject SEBlock"):
        ops.add_column(col, justify="right" if col != "op" else "left")
    op_times: dict[str, dict[str, float]] = {}
    for stage, (channels, stride) in enumerate(STAGES, 1):
        side = args.img_size // stride
        x = torch.randn(args.batch_size, channels, side, side, device=device).contiguous(memory_format=memory)
        timm_se = SEModule(channels).to(device).eval()
        ours = SEBlock(channels).to(device).eval()
        ours.load_state_dict(timm_se.state_dict())
        blocks = {"timm SEModule": timm_se, "se_inject SEBlock": ours}
        medians = {}
        with torch.no_grad():
            for block in blocks.values():
                for _ in range(10):
                    block(x)
            times: dict[str, list[float]] = {k: [] for k in blocks}
            for r in range(args.rounds):
                for name in (list(blocks) if r % 2 == 0 else list(blocks)[::-1]):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(args.iters):
                        blocks[name](x)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append((time.perf_counter() - start) / args.iters * 1e6)
            medians = {k: statistics.median(v) for k, v in times.items()}
            for name, block in blocks.items():
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=activities) as prof:
                    for _ in range(args.iters):
                        block(x)
                for event in prof.key_averages():
                    if event.key.startswith("aten::"):
                        self_us = (event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total)
                        op_times.setdefault(event.key, {}).setdefault(name, 0.0)
                        op_times[event.key][name] += self_us / args.iters
        totals.add_row(str(stage), f"{channels}x{side}x{side}", f"{medians['timm SEModule']:.1f}",
                       f"{medians['se_inject SEBlock']:.1f}",
                       f"{medians['timm SEModule'] / medians['se_inject SEBlock']:.2f}x")
    for op, by_block in sorted(op_times.items(), key=lambda kv: -max(kv[1].values())):
        ops.add_row(op, f"{by_block.get('timm SEModule', 0.0):.1f}", f"{by_block.get('se_inject SEBlock', 0.0):.1f}")
    console.print(totals)
    console.print(ops)


if __name__ == "__main__":
    main()
