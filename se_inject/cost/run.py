"""The run itself: models one by one, and for each its grid of cells, within the time budget.

Each cell (model, batch size, mode, compiled) builds one step per variant, runs each step's
warm-up (compilation happens there, so it is timed apart), counts what a training step saves
for backward and, on CUDA, its peak memory, then times the variants in interleaved rounds
(:func:`se_inject.cost.timing.interleaved`). A finished cell goes to ``on_cell`` at once, so a
caller can write it before the next one starts.

The budget (``budget_s``) bounds the whole run. A cell gets an equal share of what is left when
it starts, and stops adding rounds when the next one would overrun its share (it always runs one);
a cell is skipped, and recorded as such, when what is left is less than the cheapest finished
cell of the same kind (eager or compiled) took for its warm-up and one round.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import BenchError, SEInjectError
from ..utils import describe_error, version
from .memory import cuda_step_peak, saved_for_backward
from .results import BenchResult, Cell, ModelBench, Timing
from .settings import SE_VARIANTS, BenchSettings
from .steps import Step, freezing, fresh_compiles, make_step, no_recompiles, recompile_guard
from .timing import Stop, interleaved, paired, spread, synchronize
from .variants import BuiltModel, build_variants

__all__ = ["run", "environment", "device_name"]

#: ``on_progress(description, done, total)``: ``done`` of ``total`` units (a cell's warm-up and
#: each of its rounds) are finished.
ProgressFn = Callable[[str, int, int], None]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with torch's thread count."""
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


def _installed(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """The device and the versions a result depends on (read without importing Triton)."""
    import timm

    env: dict[str, Any] = {"device": device_name(device), "device_type": device.type,
                           "python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
                           "se_inject": version()}
    for package in ("torchvision", "triton", "transformers"):
        env[package] = _installed(package)
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


@dataclass
class _Clock:
    """The run's deadline and what finished cells cost (warm-up plus one round), by kind."""

    deadline: Optional[float]
    cheapest: dict[bool, float]

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()

    def skip_reason(self, compiled: bool) -> Optional[str]:
        left = self.left()
        need = self.cheapest.get(compiled, 0.0)
        if left <= 0 or left < need:
            return f"time budget: {max(left, 0):.0f} s left, a {'compiled' if compiled else 'eager'} cell needs {need:.0f} s"
        return None


class _Progress:
    """Units of work for a progress bar: per cell, its warm-up and each of its rounds."""

    def __init__(self, fn: Optional[ProgressFn], cells: int, rounds: int) -> None:
        self.fn, self.per_cell, self.total, self.done, self.cells = fn, rounds + 1, cells * (rounds + 1), 0, 0

    def tell(self, description: str, units: int = 0) -> None:
        self.done = min(self.total, self.done + units)
        if self.fn is not None:
            self.fn(description, self.done, self.total)

    def cells_done(self, description: str, cells: int = 1) -> None:
        """``cells`` more cells are finished (or will not run), however many rounds they had."""
        self.cells += cells
        self.done = 0
        self.tell(description, self.cells * self.per_cell)


def run(models: Sequence[Union[str, nn.Module]], options: Mapping[str, Any], settings: BenchSettings, *,
        on_cell: Optional[Callable[[Cell], None]] = None, on_progress: Optional[ProgressFn] = None) -> BenchResult:
    """Benchmark ``models`` (already resolved names, or modules) with checked ``settings``."""
    device = settings.torch_device
    start = time.perf_counter()
    clock = _Clock(None if settings.budget_s is None else start + settings.budget_s, {})
    per_model = len(settings.batch_sizes) * len(settings.modes) * len(settings.compiled)
    cells_left = len(models) * per_model
    progress = _Progress(on_progress, cells_left, settings.rounds)
    records: list[ModelBench] = []
    cells: list[Cell] = []
    for source in models:
        name = source if isinstance(source, str) else type(source).__name__
        progress.tell(f"{name}: building the variants")
        try:
            built = build_variants(source, variants=settings.variants, options=options, seed=settings.seed,
                                   img_size=settings.img_size, num_classes=settings.num_classes,
                                   strict=settings.strict)
        except SEInjectError as e:
            records.append(ModelBench(model=name, input_size=(), error=str(e)))
            cells_left -= per_model
            progress.cells_done(f"{name}: failed", per_model)
            continue
        records.append(built.record)
        memory = torch.channels_last if settings.channels_last else torch.contiguous_format
        for variant, model in built.models.items():
            built.models[variant] = model.to(device=device, memory_format=memory)
        for batch in settings.batch_sizes:
            x, y = _batch(built, batch, settings, device)
            for mode in settings.modes:
                for compiled in settings.compiled:
                    label = f"{name} b{batch} {mode} {'compiled' if compiled else 'eager'}"
                    skipped = clock.skip_reason(compiled)
                    if skipped is None:
                        cell = _cell(built, name, batch, mode, compiled, x, y, settings, clock, cells_left,
                                     progress, label)
                    else:
                        cell = Cell(name, batch, mode, compiled, rounds=0, skipped=skipped)
                    progress.cells_done(f"{label}: {'skipped' if skipped else 'done'}")
                    cells_left -= 1
                    cells.append(cell)
                    if on_cell is not None:
                        on_cell(cell)
        built.models.clear()  # free the device memory before the next model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return BenchResult(settings=settings.to_dict() | {"options": _options_json(options)},
                       environment=environment(device), models=tuple(records), cells=tuple(cells))


def _options_json(options: Mapping[str, Any]) -> dict[str, Any]:
    from ..options import SEOptions

    return SEOptions.from_kwargs(options, caller="bench").to_dict()


def _batch(built: BuiltModel, batch: int, settings: BenchSettings, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.randn((batch, *built.record.input_size), generator=generator)
    y = torch.randint(0, built.classes, (batch,), generator=generator)
    memory = torch.channels_last if settings.channels_last and x.dim() == 4 else torch.contiguous_format
    return x.to(device).contiguous(memory_format=memory), y.to(device)


def _cell(built: BuiltModel, name: str, batch: int, mode: str, compiled: bool, x: torch.Tensor, y: torch.Tensor,
          settings: BenchSettings, clock: _Clock, cells_left: int, progress: _Progress, label: str) -> Cell:
    """Warm up, measure memory, and time every variant of one cell."""
    device = settings.torch_device
    started = time.perf_counter()
    share = clock.left() / max(cells_left, 1)
    stop = Stop(settings.rounds, None if share == float("inf") else started + share)
    if compiled:
        fresh_compiles()
    steps: dict[str, Step] = {}
    warmup: dict[str, float] = {}
    with freezing(settings.freeze and compiled and mode == "infer"), recompile_guard():
        for variant, model in built.models.items():
            progress.tell(f"{label}: warm-up {variant}")
            steps[variant] = make_step(model, f"{name}_{variant}", mode=mode, x=x, y=y,
                                       dtype=settings.autocast_dtype, compiled=compiled,
                                       compile_mode=settings.compile_mode, backend=settings.backend)
            warmup[variant] = _guarded(lambda: _warm_up(steps[variant], settings.warmup, device), label, variant)
        saved = {v: _guarded(lambda: _saved(s), label, v) for v, s in steps.items()} if mode == "train" else {}
        peaks = {v: _guarded(lambda: _peak(s, device), label, v) for v, s in steps.items()}
        progress.tell(f"{label}: timing", 1)
        first_round: list[float] = []

        def on_round(done: int) -> None:
            if done == 1:
                first_round.append(time.perf_counter() - round_start)
            progress.tell(f"{label}: round {done}/{settings.rounds}", 1)

        round_start = time.perf_counter()
        with no_recompiles(compiled):
            times = _guarded(lambda: interleaved(steps, reps=settings.reps, stop=stop, device=device,
                                                 on_round=on_round), label, "the timed rounds")
    cost = sum(warmup.values()) + (first_round[0] if first_round else 0.0)
    clock.cheapest[compiled] = min(clock.cheapest.get(compiled, cost), cost)
    return _summary(name, batch, mode, compiled, times, warmup, saved, peaks)


_HINTS = {
    "FailOnRecompileLimitHit": "; past torch._dynamo.config.recompile_limit dynamo would have run it eagerly and "
                               "timed eager code as compiled: raise the limit, or see why it recompiles with "
                               "TORCH_LOGS=recompiles",
    "RecompileError": "; a timed round would have recompiled, timing the compiler: something the compiled code "
                      "guards on changes between calls (TORCH_LOGS=recompiles says what)",
}


def _guarded(fn: Callable[[], Any], label: str, what: str) -> Any:
    """``fn()``; an error becomes a BenchError naming the cell and the variant."""
    try:
        return fn()
    except SEInjectError:
        raise
    except Exception as e:
        raise BenchError(f"{label}, {what}: {describe_error(e)}{_HINTS.get(type(e).__name__, '')}") from e


def _warm_up(step: Step, iterations: int, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    for _ in range(iterations):
        step()
    synchronize(device)
    return time.perf_counter() - started


def _saved(step: Step) -> int:
    step.clear_grads()
    with saved_for_backward() as counter:
        step.forward()
    return counter.bytes


def _peak(step: Step, device: torch.device) -> Optional[int]:
    step.clear_grads()
    return cuda_step_peak(step, device)


def _summary(name: str, batch: int, mode: str, compiled: bool, times: dict[str, list[float]],
             warmup: dict[str, float], saved: dict[str, int], peaks: dict[str, Optional[int]]) -> Cell:
    ms = {v: [t * 1e3 for t in ts] for v, ts in times.items()}
    timings = tuple(Timing(variant=v, rounds_ms=tuple(r), ms=spread(r), images_per_s=spread([batch * 1e3 / t for t in r]),
                           warmup_s=warmup[v], saved_bytes=saved.get(v), cuda_peak_bytes=peaks.get(v))
                    for v, r in ms.items())
    overhead = {v: paired(r, ms["original"]) for v, r in ms.items() if v != "original"} if "original" in ms else {}
    vs_twin = {v: paired(r, ms["timm"]) for v, r in ms.items() if v in SE_VARIANTS} if "timm" in ms else {}
    return Cell(name, batch, mode, compiled, rounds=len(next(iter(ms.values()))), timings=timings,
                overhead=overhead, vs_twin=vs_twin)
