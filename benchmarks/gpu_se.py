"""The one GPU command: the fused kernels checked first, then what SE costs, side by side, in one run.

    python benchmarks/gpu_se.py --commit $(git rev-parse HEAD)   # at most 8 minutes on an H100
    python benchmarks/gpu_se.py --smoke                          # every section on the CPU, tiny sizes

Every model timing is :func:`se_inject.bench`'s (``se_inject/cost/``, ``se-inject bench``):
interleaved rounds, medians and IQRs, overheads as paired per-round ratios; each compiled cell
starts from ``torch._dynamo.reset()``, each variant compiles through a code object of its own,
a recompile-limit hit raises instead of timing eager code as compiled, and a timed round that
would recompile raises too. ``tests/test_gpu_commands.py`` replays this command's compiles
in order (tiny models, ``backend="eager"``, a recompile limit of 1) and checks that every
variant of every compiled cell ran its own freshly compiled graph in every timed iteration.

Sections, in priority order. A section starts only if its estimate (scaled by how long the
model sections so far took against theirs) fits in what is left of ``--budget-s`` (430 s), so
what a short budget drops first is the end of this list; a section that does not fit is recorded
as skipped, with the reason. Estimates are for an H100 from ``docs/gpu.md``:
resnet50 bf16 compile warm-ups of 13-15 s (inference) and 36-49 s (training) per variant;
eager batch 256 at 20-25 ms (inference) and 64-92 ms (training step) per iteration.

==  ==================  ============================================================  ======  =====
#   section             what (variants)                                               est. s    sum
==  ==================  ============================================================  ======  =====
..  start               imports, CUDA                                                     10     10
1   kernels             ``gpu_kernels.py --no-timings``, own process: the op against     110    120
                        its reference (12 cases, forward and every gradient),
                        compiled op, compiled training step with kernels="fused" vs
                        plain, torch.export (at most ``--kernels-budget-s``, 150)
2   check               converted resnet50, batch 8, channels_last: forward, loss,        30    150
                        every gradient, fused vs plain in fp32 and both vs fp32
                        under bf16; fused ops in its fullgraph trace
3   resnet50            batch 256, infer + train, eager + compiled (original,            200    350
                        se_inject, timm's seresnet50): compiles 3x14 + 3x42, build
                        10, timing (5 rounds x 5 reps) 20
4   latency             batch 1, infer, eager + compiled (original, se_inject plain,      70    420
                        se_inject fused, timm): compiles 4x13, build 10, timing 8
5   kernel timings      ``gpu_kernels.py --timings-only``: do_bench at ResNet-50's        45    465
                        four stage shapes, channels_last and NCHW
6   cuda graphs         batch 1, infer, compiled with mode="reduce-overhead"              60    525
                        (original, se_inject plain, se_inject fused): compiles 3x15
7   freezing            batch 256, infer, compiled with inductor's freezing               45    570
                        (original, se_inject): compiles 2x16
8   more models         convnext_tiny and mobilenetv2_100, batch 256, infer, eager +      70    640
                        compiled (original, se_inject): compiles 2x15 + 2x10
9   resnet50 b1 train   the rest of issue 20's command: batch 1, train, eager +          135    775
                        compiled (original, se_inject, timm): compiles 3x40
==  ==================  ============================================================  ======  =====

At those compile times sections 1-4 fill the 430 s (issue 20's batch-256 cells and batch-1
latency, the must-haves); 5-9 (about 355 s more) run in this order as far as what the earlier
sections leave allows, and each one that does not fit is recorded as skipped. On the GPU, rounds
and repetitions are few (5 x 5 at batch 256, 7 x 20 at batch 1): the H100 rounds' IQRs were
under 0.3%. ``se_inject`` runs the options' default kernels ("auto"): the fused op in eager mode
on CUDA, plain torch ops under torch.compile (inductor fuses them), so at batch 1 ``se_inject
plain`` and ``se_inject fused`` stand for it, eager and compiled.

A kernel check that fails (or does not finish, or whose process dies) switches every later
section to plain kernels (``se_inject.fused.use_fused`` answers False), leaves ``se_inject
fused`` out of the model sections and says so in the results; so does a failed ``check``. A CUDA
error in this process (which leaves its CUDA context unusable) restarts the remaining sections
in a fresh process with plain kernels (``--resume``), appending to the same results.

Results go to ``--out`` (``benchmarks/results/gpu/``) as each cell (model, batch size, mode,
eager or compiled) finishes: ``gpu-se.json`` (device, versions, commit, command line, every
section's status, every cell) and ``gpu-se.md`` (the same as tables), each rewritten whole and
replaced atomically, and ``gpu-se.jsonl``, one line per event; ``gpu-kernels.jsonl`` is
gpu_kernels.py's log. A section still marked ``running`` was cut off there. At ``--hard-limit-s``
(470 s) the process writes what it has and ends, whatever is running. Exit status: 0 every
section done or skipped for time, 1 a section failed or a check did not pass, 3 the hard limit.

Without a CUDA device (and without ``--smoke``) it says so and exits 0. ``--smoke`` runs every
section on the CPU (resnet18, convnext_atto and mobilenetv2_050 for resnet50, convnext_tiny and
mobilenetv2_100; 64 px; batch 2 for 256; torch.compile's "eager" backend; gpu_kernels.py under
TRITON_INTERPRET=1) to check the command itself, not inductor, and without a time budget.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # before torch's import: the budget and the hard limit count from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import torch  # noqa: E402

try:
    from . import gpu_kernels
    from .common import RESULTS
    from .gpu_check import check
    from .gpu_report import markdown
except ImportError:  # run as a script: python benchmarks/gpu_se.py
    import gpu_kernels  # type: ignore[no-redef]
    from common import RESULTS  # type: ignore[no-redef]
    from gpu_check import check  # type: ignore[no-redef]
    from gpu_report import markdown  # type: ignore[no-redef]

import se_inject  # noqa: E402
from se_inject.cost.run import environment  # noqa: E402
from se_inject.utils import describe_error  # noqa: E402

__all__ = ["Section", "plan", "Run", "plain_kernels_only", "main"]

BUDGET_S, HARD_LIMIT_S, KERNELS_BUDGET_S = 430.0, 470.0, 150.0
#: Seconds before the first section (imports, CUDA), counted in the budget table.
START_S = 10.0
#: The factor on a model section's estimate: how long the finished model sections took against
#: their estimates, within this range.
SCALE_RANGE = (0.5, 3.0)
EXIT_HARD_LIMIT = 3
R50 = ("original", "se_inject", "timm")
B1 = ("original", "se_inject plain", "se_inject fused", "timm")
GPU = dict(device="cuda", dtype="bf16", channels_last=True, img_size=224, backend="inductor")
#: --smoke: the same sections on the CPU, small: models of the same families, 64 px (batch 1
#: still leaves resnet18's last stage 2x2, so train-mode BatchNorm has more than one value).
SMOKE = dict(device="cpu", dtype="fp32", channels_last=False, img_size=64, backend="eager")
SMOKE_MODELS = {"resnet50": "resnet18", "convnext_tiny": "convnext_atto", "mobilenetv2_100": "mobilenetv2_050"}


@dataclass(frozen=True)
class Section:
    """One part of the run.

    Attributes:
        name: as the results name it.
        kind: ``"kernels"`` / ``"kernel timings"`` (gpu_kernels.py in a process of its own),
            ``"check"`` (:func:`check`), ``"bench"`` (:func:`se_inject.bench` with ``bench``).
        estimate_s: its expected cost on an H100, compile and timing (the docstring's table).
        about: one line for the results.
        bench: :func:`se_inject.bench`'s keyword arguments, for ``"bench"`` sections.
    """

    name: str
    kind: str
    estimate_s: float
    about: str
    bench: dict[str, Any] = field(default_factory=dict)


def plan(smoke: bool = False, backend: Optional[str] = None) -> list[Section]:
    """The sections, in priority order; ``smoke``: their CPU versions; ``backend``: torch.compile's
    backend instead of the default (inductor on the GPU, "eager" for the smoke run)."""
    def bench(models: tuple, variants: tuple, modes: tuple, compiled: tuple, batch: int, rounds: int, reps: int,
              warmup: int, **extra: Any) -> dict[str, Any]:
        settings = {**(SMOKE if smoke else GPU), "models": list(models), "variants": list(variants),
                    "modes": list(modes), "compiled": list(compiled), "batch_sizes": [batch], "rounds": rounds,
                    "reps": reps, "warmup": warmup, **extra}
        if smoke:
            settings.update(models=[SMOKE_MODELS[m] for m in models], batch_sizes=[min(batch, 2)], rounds=2, reps=1,
                            warmup=1)
        if backend is not None:
            settings["backend"] = backend
        return settings

    both, infer = (False, True), ("infer",)
    return [
        Section("kernels", "kernels", 110, "gpu_kernels.py --no-timings: the fused op against its reference, "
                "compiled, in a compiled training step and exported"),
        Section("check", "check", 30, "a converted resnet50 on the device: fused and plain kernels against fp32, "
                "forward, loss and every gradient; fused ops in its fullgraph trace"),
        Section("resnet50", "bench", 200, "issue 20's cells at batch 256: inference and a training step, eager and "
                "compiled", bench(("resnet50",), R50, ("infer", "train"), both, 256, 5, 5, 2)),
        Section("latency", "bench", 70, "batch 1 inference, eager and compiled: the fused op's host time beside "
                "plain ops", bench(("resnet50",), B1, infer, both, 1, 7, 20, 3)),
        Section("kernel timings", "kernel timings", 45, "gpu_kernels.py --timings-only: do_bench at ResNet-50's "
                "stage shapes, channels_last and NCHW"),
        Section("cuda graphs", "bench", 60, "batch 1 inference compiled with mode='reduce-overhead' (CUDA graphs)",
                bench(("resnet50",), ("original", "se_inject plain", "se_inject fused"), infer, (True,), 1, 7, 20, 3,
                      compile_mode="reduce-overhead")),
        Section("freezing", "bench", 45, "batch 256 inference compiled with inductor's freezing (the documented "
                "inference recipe)", bench(("resnet50",), ("original", "se_inject"), infer, (True,), 256, 5, 5, 2,
                                           freeze=True)),
        Section("more models", "bench", 70, "convnext_tiny and mobilenetv2_100 at batch 256, inference, eager and "
                "compiled", bench(("convnext_tiny", "mobilenetv2_100"), ("original", "se_inject"), infer, both, 256,
                                  5, 5, 2)),
        Section("resnet50 b1 train", "bench", 135, "the rest of issue 20's command: a batch-1 training step, eager "
                "and compiled", bench(("resnet50",), R50, ("train",), both, 1, 5, 10, 2)),
    ]


def plain_kernels_only() -> None:
    """Every SE block of this process runs plain torch ops from now on: ``use_fused``, which
    each block asks (eager or while torch.compile traces), answers False."""
    import se_inject.fused

    se_inject.fused.use_fused = lambda *args, **kwargs: False


def _kernels_section(command: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run gpu_kernels.py; unless its kernel checks all passed, switch every SE block of this
    process to plain kernels (a kernel that faults must not kill the model sections)."""
    try:
        exit_code: Any = subprocess.run(command, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        exit_code = "timeout"
    records = _records(log)
    start = max((i for i, r in enumerate(records) if r.get("kind") == "env"), default=0)
    verdicts = [r["kernels_ok"] for r in records[start:] if r.get("kind") == "checks done"]
    if exit_code != 2 and verdicts and verdicts[-1]:
        return {"exit": exit_code, "kernels_ok": True}
    plain_kernels_only()
    return {"exit": exit_code, "kernels_ok": False, "plain_kernels_from_here": "the fused kernels failed or did not "
            "finish their checks: every later section runs plain kernels, and 'se_inject fused' is left out"}


def _records(log: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``log`` (none if it does not exist; a line cut off by a kill is left out)."""
    out = []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


class Run:
    """The run: its clock and budget, its sections' states, and its results, written as they come.

    Args:
        out: the results folder.
        budget_s: no section starts unless its (scaled) estimate fits in what is left (None: no
            budget, as the smoke run).
        hard_limit_s: at this many seconds from the start, write what there is and end the process.
        kernels_budget_s: the most the kernel checks (gpu_kernels.py) may take.
        smoke: the CPU versions of the sections.
        argv: the command line's arguments, recorded and passed on to a restart.
        commit: the se_inject commit measured.
        backend: torch.compile's backend for the model sections (default: the plan's).
        resume: the index of the first section to run; the results so far are read back from
            ``out`` (a restart after a CUDA error).
        clock: seconds since the epoch (``time.time``; tests pass their own).
        started: when the run started, on ``clock`` (default: now); budget and hard limit count
            from there.
    """

    def __init__(self, out: Path, *, budget_s: Optional[float], hard_limit_s: Optional[float] = None,
                 kernels_budget_s: float = KERNELS_BUDGET_S, smoke: bool = False, argv: Optional[list[str]] = None,
                 commit: str = "unknown", backend: Optional[str] = None, resume: int = 0,
                 clock: Callable[[], float] = time.time, started: Optional[float] = None) -> None:
        self.out, self.budget_s, self.hard_limit_s = out, budget_s, hard_limit_s
        self.kernels_budget_s = kernels_budget_s
        self.smoke, self.argv, self.clock, self.resume = smoke, list(argv or []), clock, resume
        self.device = torch.device("cpu" if smoke else "cuda")
        self.sections = plan(smoke, backend)
        self.lock = threading.RLock()
        self.json_path, self.md_path, self.log_path = out / "gpu-se.json", out / "gpu-se.md", out / "gpu-se.jsonl"
        self.kernel_log = out / "gpu-kernels.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.state = json.loads(self.json_path.read_text())
        else:
            for stale in (self.log_path, self.kernel_log):  # one run per folder: logs start empty
                stale.unlink(missing_ok=True)
            self.state = {
                "command": shlex.join(["python", "benchmarks/gpu_se.py", *self.argv]), "commit": commit,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "started_epoch": clock() if started is None else started,
                "environment": environment(self.device), "budget_s": budget_s, "hard_limit_s": hard_limit_s,
                "smoke": smoke, "plain_kernels": None, "stopped": None,
                "sections": [{"name": s.name, "kind": s.kind, "about": s.about, "estimate_s": s.estimate_s,
                              "status": "pending", **({"settings": s.bench} if s.bench else {})}
                             for s in self.sections],
                "models": [], "cells": []}
        self.start = self.state["started_epoch"]
        if self.state["plain_kernels"]:
            plain_kernels_only()
        self.write()

    # -- the clock ---------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds left of the budget (infinite without one)."""
        return float("inf") if self.budget_s is None else self.budget_s - self.elapsed()

    def scale(self) -> float:
        """How long the finished model sections took against their estimates (1 before any)."""
        done = [s for s in self.state["sections"] if s["kind"] == "bench" and s["status"] == "done"]
        if not done:
            return 1.0
        ratio = sum(s["seconds"] for s in done) / sum(s["estimate_s"] for s in done)
        return min(max(ratio, SCALE_RANGE[0]), SCALE_RANGE[1])

    def needed(self, section: Section) -> float:
        """What ``section`` must find left to start: its estimate, scaled for model sections."""
        return section.estimate_s * (self.scale() if section.kind == "bench" else 1.0)

    # -- the sections ------------------------------------------------------------------------------

    def run(self) -> int:
        """Every section from ``resume`` on, in order; the exit status."""
        timer = None
        if self.hard_limit_s is not None:
            timer = threading.Timer(max(0.0, self.hard_limit_s - self.elapsed()), self.hard_stop)
            timer.daemon = True
            timer.start()
        try:
            for index in range(self.resume, len(self.sections)):
                self.section(index)
        finally:
            if timer is not None:
                timer.cancel()
        self.event({"event": "done", "elapsed_s": round(self.elapsed(), 1)})
        failed = [s["name"] for s in self.state["sections"] if s["status"] == "error" or s.get("kernels_ok") is False
                  or (s.get("result") or {}).get("ok") is False]
        return 1 if failed else 0

    def section(self, index: int) -> None:
        """Run section ``index`` if it fits in what is left, and record what became of it."""
        section, record = self.sections[index], self.state["sections"][index]
        needed, left = self.needed(section), self.left()
        if needed > left:
            scaled = f" (estimate {section.estimate_s:.0f} s x {self.scale():.2f}, as the model sections so far ran)" \
                if needed != section.estimate_s else ""
            self.update(record, status="skipped", reason=f"time budget: needs about {needed:.0f} s{scaled}, "
                                                         f"{max(left, 0):.0f} s left")
            if section.kind == "kernels":
                self.plain("the kernel checks did not run (time budget): the fused kernels are unchecked")
            return
        self.update(record, status="running", started_s=round(self.elapsed(), 1))
        started = self.clock()
        try:
            result = getattr(self, "_" + section.kind.replace(" ", "_"))(section)
        except Exception as e:  # one failing section must not cost the others
            error = describe_error(e)
            self.update(record, status="error", seconds=round(self.clock() - started, 1), error=error,
                        traceback=traceback.format_exc()[-3000:])
            if section.kind in ("kernels", "check"):
                self.plain(f"the {section.name} section failed ({error})")
            if any(marker in f"{type(e).__name__}: {e}" for marker in gpu_kernels.CUDA_ERRORS):
                self.restart(index + 1, error)
            return
        self.update(record, status="done", seconds=round(self.clock() - started, 1), **result)

    def _kernels(self, section: Section) -> dict[str, Any]:
        budget = min(self.kernels_budget_s, self.left()) - 10  # what the process start takes
        result = _kernels_section(self._kernels_command(budget, "--no-timings"), self.kernel_log,
                                  self._timeout(budget + 40))
        if not result["kernels_ok"]:
            self.plain(result["plain_kernels_from_here"])
        return result | _kernel_summary(self.kernel_log)

    def _kernel_timings(self, section: Section) -> dict[str, Any]:
        budget = min(section.estimate_s * 1.5, self.left()) - 5
        extra = ["--timings-only"] + (["--plain-only"] if self.state["plain_kernels"] else [])
        try:
            exit_code: Any = subprocess.run(self._kernels_command(budget, *extra),
                                            timeout=self._timeout(budget + 30)).returncode
        except subprocess.TimeoutExpired:
            exit_code = "timeout"
        return {"exit": exit_code, "timings": sum(r.get("kind") == "time" for r in _records(self.kernel_log))}

    def _kernels_command(self, budget: float, *extra: str) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("gpu_kernels.py")), "--out", str(self.kernel_log),
                "--budget-s", f"{max(budget, 1.0):.0f}", *(["--interpret-smoke"] if self.smoke else []), *extra]

    def _timeout(self, seconds: float) -> float:
        """``seconds``, or less: a subprocess must end before this process's hard limit."""
        if self.hard_limit_s is None:
            return seconds
        return max(1.0, min(seconds, self.hard_limit_s - self.elapsed() - 5))

    def _check(self, section: Section) -> dict[str, Any]:
        size, batch = (64, 2) if self.smoke else (224, 8)
        result = check(self.device, SMOKE_MODELS["resnet50"] if self.smoke else "resnet50", size, batch,
                       fused=not self.state["plain_kernels"])
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the check's model is gone: its blocks go back before the timings
        if not result["ok"]:
            self.plain("the converted resnet50's fused kernels did not match plain ones (the check section)")
        return {"result": result}

    def _bench(self, section: Section) -> dict[str, Any]:
        settings = dict(section.bench)
        notes = []
        if self.state["plain_kernels"]:
            left_out = "se_inject fused" in settings["variants"]
            settings["variants"] = [v for v in settings["variants"] if v != "se_inject fused"]
            notes.append("plain kernels" + (", 'se_inject fused' left out" if left_out else "")
                         + f": {self.state['plain_kernels']}")
        if self.budget_s is not None:  # the harness skips (and records) cells that no longer fit
            settings["budget_s"] = max(1.0, self.left())
        models = settings.pop("models")
        result = se_inject.bench(models, on_cell=lambda cell: self.cell(section, cell), **settings)
        with self.lock:
            self.state["models"] += [{"section": section.name, **m.to_dict()} for m in result.models]
        return {"failures": result.failures, "notes": notes} if notes or result.failures else {}

    # -- the results -------------------------------------------------------------------------------

    def cell(self, section: Section, cell: Any) -> None:
        """A finished cell (a :class:`se_inject.bench.Cell`): into the results, written at once."""
        with self.lock:
            self.state["cells"].append({"section": section.name, **cell.to_dict()})
            self.write()
        kind = "compiled" if cell.compiled else "eager"
        summary = cell.skipped or ", ".join(f"{t.variant} {t.ms.median:.2f} ms" for t in cell.timings)
        self.event({"event": "cell", "section": section.name, "cell": f"{cell.model} b{cell.batch_size} {cell.mode} "
                                                                      f"{kind}", "summary": summary})

    def plain(self, reason: str) -> None:
        """Plain kernels for the rest of the run, and the results say why (the first reason stays)."""
        with self.lock:
            if not self.state["plain_kernels"]:
                self.state["plain_kernels"] = reason
                plain_kernels_only()
                self.write()
                self.event({"event": "plain kernels", "reason": reason})

    def update(self, record: dict[str, Any], **fields: Any) -> None:
        with self.lock:
            record.update(fields)
            self.write()
        self.event({"event": "section", "section": record["name"], **{k: v for k, v in fields.items()
                                                                      if k not in ("traceback", "result")}})

    def event(self, record: dict[str, Any]) -> None:
        line = json.dumps({"t": round(self.elapsed(), 1), **record}, default=str)
        with self.lock, self.log_path.open("a") as log:
            log.write(line + "\n")
        print(line[:600], flush=True)

    def write(self) -> None:
        """The JSON and the markdown, each replaced whole (a kill leaves the last complete one)."""
        with self.lock:
            self.state["kernel_log"] = _kernel_summary(self.kernel_log)
            for path, text in ((self.json_path, json.dumps(self.state, indent=2, default=str) + "\n"),
                               (self.md_path, markdown(self.state, _records(self.kernel_log)))):
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(text)
                os.replace(tmp, path)

    def hard_stop(self) -> None:
        """At the hard limit: mark what was running as cut off, write everything, end the process."""
        acquired = self.lock.acquire(timeout=10)
        try:
            self.state["stopped"] = f"hard limit: the process ended itself at {self.hard_limit_s:.0f} s"
            for record in self.state["sections"]:
                if record["status"] == "running":
                    record["status"] = "cut off"
            self.write()
            self.event({"event": "hard limit", "elapsed_s": round(self.elapsed(), 1)})
        finally:
            if acquired:
                self.lock.release()
            os._exit(EXIT_HARD_LIMIT)

    def restart(self, index: int, error: str) -> None:
        """After a CUDA error: sections ``index`` on in a fresh process, plain kernels, same results."""
        self.plain(f"a CUDA error ({error}): the rest runs in a fresh process with plain kernels")
        self.event({"event": "restart", "from_section": index})
        args = []
        skip = False
        for arg in self.argv:  # an earlier --resume N is replaced
            if skip or arg == "--resume":
                skip = not skip
                continue
            args.append(arg)
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *args, "--resume", str(index)])


def _kernel_summary(log: Path) -> dict[str, Any]:
    """gpu_kernels.py's log in short: checks passed, compile checks, errors, skips, timings."""
    records = _records(log)
    checks = [r for r in records if r.get("kind") == "check"]
    return {"checks": len(checks), "checks_ok": sum(bool(r.get("ok")) for r in checks),
            "compile": [{k: r.get(k) for k in ("what", "ok", "seconds")} for r in records
                        if r.get("kind") == "compile"],
            "errors": [f"{r.get('section')}: {r.get('error')}" for r in records if r.get("kind") == "error"],
            "skipped": [f"{r.get('what')}: {r.get('reason')}" for r in records if r.get("kind") == "skipped"],
            "timings": sum(r.get("kind") == "time" for r in records)}


def _commit() -> str:
    """The checkout's commit (with " (modified)" if it has changes), or "unknown" without git."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS / "gpu", help="results folder (default benchmarks/results/gpu)")
    p.add_argument("--budget-s", type=float,
                   help=f"start no section whose estimate does not fit (default {BUDGET_S:.0f}; none with --smoke)")
    p.add_argument("--hard-limit-s", type=float, help=f"write and end the process at this many seconds (default "
                                                      f"{HARD_LIMIT_S:.0f}; none with --smoke)")
    p.add_argument("--kernels-budget-s", type=float, default=KERNELS_BUDGET_S,
                   help="the most the kernel checks (benchmarks/gpu_kernels.py) may take")
    p.add_argument("--commit", help="the se_inject commit measured (default: git's, where there is a checkout)")
    p.add_argument("--smoke", action="store_true", help="every section on the CPU with tiny sizes")
    p.add_argument("--resume", type=int, default=0, help=argparse.SUPPRESS)  # the restart after a CUDA error
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_se.py: no CUDA device here, nothing to measure (run it on a GPU machine, or pass --smoke)")
        return 0
    default = (lambda value, gpu: value if value is not None else (None if args.smoke else gpu))
    run = Run(args.out, budget_s=default(args.budget_s, BUDGET_S),
              hard_limit_s=default(args.hard_limit_s, HARD_LIMIT_S),
              kernels_budget_s=args.kernels_budget_s, smoke=args.smoke,
              argv=list(sys.argv[1:] if argv is None else argv), commit=args.commit or _commit(), resume=args.resume,
              started=PROCESS_START)
    return run.run()


if __name__ == "__main__":
    sys.exit(main())
