"""The fused SE kernels compiled for an H100 (sm_90) on the CPU, no GPU and no launch: what the
code generator made of them at ResNet-50's four stage shapes.

For each stage (N=256; C, HxW = 256 56x56, 512 28x28, 1024 14x14, 2048 7x7), dtype (bf16, fp32)
and layout (channels_last, contiguous NCHW), the four launchers of ``se_inject.fused`` (squeeze,
scale + add + relu, K1 gate gradient with relu, K2 input gradient) are run on fake CUDA tensors
with their launches captured instead of run; each captured launch (kernel, integer arguments,
tiles, ``num_warps``) is specialised as Triton would at that launch (arguments equal to 1 or
divisible by 16, 16-byte aligned pointers as CUDA allocations are) and compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)``. Reported from the PTX and the cubin: the
global loads and stores by width in bytes (16 = ``ld.global.v4.b32``, 2 = ``ld.global.b16``,
...), registers per thread and local memory (spills), as ``cuobjdump -res-usage`` reads them.

    python benchmarks/kernel_asm.py                       # this checkout and 460f34a, side by side
    python benchmarks/kernel_asm.py --against none        # this checkout only

Widths are per instruction: a flat NCHW kernel also loads its gate with one 4-byte load per
element (a gather from the (N, C) gates, in L1), next to the 16-byte loads of the big tensors.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

try:
    from .at_commit import ROOT, head_commit, run_worker, source_at
except ImportError:  # run as a script: python benchmarks/kernel_asm.py
    from at_commit import ROOT, head_commit, run_worker, source_at  # type: ignore[no-redef]

STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # ResNet-50 (channels, side)
RESULTS = ROOT / "benchmarks" / "results"
BASE = "460f34a"


class _Ptr:
    """What Triton's launcher reads from a tensor argument: a dtype and a 16-byte aligned address."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 0


def _capture(fused_modules: list) -> list:
    """Replace every launch in the fused modules by a recorder; returns the list it fills."""
    launches: list = []

    def record(kernel: Any, programs: int, args: Any, meta: dict) -> None:
        launches.append((kernel, tuple(args), dict(meta)))

    class _Wrapped:  # se_inject before commit 'tuned launches': wrap_triton(kernel)[grid](...)
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: Any) -> Any:
            return lambda *args, **meta: record(self.kernel, grid[0], args, meta)

    for module in fused_modules:
        if hasattr(module, "launch"):
            module.launch = record
        elif hasattr(module, "wrap_triton"):
            module.wrap_triton = _Wrapped
    return launches


def _compile(kernel: Any, args: tuple, meta: dict) -> Any:
    """``triton.compile`` for sm_90 with the specialisation a launch with ``args`` would get."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    args = tuple(_Ptr(a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


_MEM = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")


def _widths(ptx: str) -> dict[str, dict[int, int]]:
    """Global loads and stores of the PTX: {"ld": {bytes per instruction: count}, "st": ...}."""
    found: dict[str, Counter] = {"ld": Counter(), "st": Counter()}
    for op, suffix in _MEM.findall(ptx):
        parts = suffix.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 0)
        found[op][vec * bits // 8] += 1
    return {op: dict(sorted(c.items(), reverse=True)) for op, c in found.items()}


def _resources(cubin: bytes) -> dict[str, int]:
    """REG, LOCAL (spill bytes), SHARED of the cubin's kernel, by ``cuobjdump -res-usage``."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = Path(f"/tmp/kernel_asm_{time.monotonic_ns()}.cubin")
    try:
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    finally:
        path.unlink(missing_ok=True)
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", text)}


def _layout(name: str) -> Any:
    import torch

    return {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}[name]


def worker(batch: int) -> list[dict]:
    """Every (stage, dtype, layout, kernel) compiled, as rows."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from se_inject.fused import backward, scale, squeeze

    launches = _capture([squeeze, scale, backward])
    rows = []
    for C, side in STAGES:
        for dtype in (torch.bfloat16, torch.float32):
            for layout in ("channels_last", "nchw"):
                with FakeTensorMode():
                    def big() -> torch.Tensor:
                        t = torch.empty(batch, C, side, side, device="cuda", dtype=dtype)
                        return t.contiguous(memory_format=_layout(layout))

                    x, sc, dout, g = big(), big(), big(), torch.empty(batch, C, device="cuda")
                    launches.clear()
                    squeeze.squeeze_launch(x)
                    out = scale.scale_launch(x, g, sc, "relu")
                    _, dz = backward.gate_grad_launch(dout, x, sc, out, g, "relu")
                    backward.input_grad_launch(dz, x, g, g)
                for kernel, args, meta in list(launches):
                    compiled = _compile(kernel, args, meta)
                    rows.append({
                        "stage": f"{C}x{side}x{side}", "dtype": str(dtype).replace("torch.", ""),
                        "layout": layout, "kernel": kernel.fn.__name__.strip("_").replace("_kernel", ""),
                        "flat": bool(meta.get("FLAT", False)),
                        "tile": [meta.get("BLOCK_S"), meta.get("BLOCK_C")],
                        "num_warps": compiled.metadata.num_warps, **_resources(compiled.asm["cubin"]),
                        **_widths(compiled.asm["ptx"]),
                    })
    return rows


def _fmt(widths: dict) -> str:
    return " ".join(f"{w}B×{n}" for w, n in widths.items()) or "-"


def render(runs: dict[str, list[dict]]) -> str:
    """One markdown table per stage: every kernel's loads, stores, registers, spills per run."""
    labels = list(runs)
    keyed = {label: {(r["stage"], r["dtype"], r["layout"], r["kernel"]): r for r in rows}
             for label, rows in runs.items()}
    keys = list(dict.fromkeys(k for rows in keyed.values() for k in rows))
    md = []
    for stage in dict.fromkeys(k[0] for k in keys):
        md += [f"### N=256, {stage}", ""]
        head = ["dtype", "layout", "kernel"]
        for label in labels:
            head += [f"{label}: tile / warps", f"{label}: loads", f"{label}: stores", f"{label}: regs",
                     f"{label}: spill B"]
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in (k for k in keys if k[0] == stage):
            cells = list(key[1:])
            for label in labels:
                r = keyed[label].get(key)
                if r is None:
                    cells += ["-"] * 5
                    continue
                tile = f"flat {r['tile'][0]}" if r["flat"] else f"{r['tile'][0]}x{r['tile'][1]}"
                cells += [f"{tile} / {r['num_warps']}", _fmt(r["ld"]), _fmt(r["st"]), str(r["reg"]),
                          str(r["local"])]
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
    return "\n".join(md)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default=BASE, help="a commit to compile side by side ('none': skip)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.batch_size)))
        return 0
    import triton

    script, wargs = Path(__file__).resolve(), ["--batch-size", str(args.batch_size)]
    now = head_commit()
    runs = {}
    if args.against != "none":
        runs[args.against] = run_worker(script, wargs, source_at(args.against))
    runs[now] = run_worker(script, wargs, ROOT)
    provenance = (f"Compiled for sm_90 on the CPU, no launch (`triton.compile`, `GPUTarget('cuda', 90, 32)`), "
                  f"Triton {triton.__version__}, se_inject at {' and '.join(runs)}; widths are bytes per "
                  f"global load/store instruction (x count), regs per thread, spill = local memory bytes.")
    md = "# The fused SE kernels compiled for sm_90\n\n" + provenance + "\n\n" + render(runs)
    cmd = "python benchmarks/kernel_asm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel-asm-sm90.md").write_text(md + f"\nCommand: `{cmd.strip()}`\n")
    (args.out / "kernel-asm-sm90.json").write_text(json.dumps(
        {"provenance": provenance, "triton": triton.__version__, "commits": list(runs), "runs": runs,
         "command": cmd.strip()}, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
