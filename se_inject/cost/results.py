"""What :func:`se_inject.bench` returns: plain, typed records with a ``to_dict()`` for JSON.

A run is a grid of *cells*, one per (model, batch size, mode, compiled); each cell times every
*variant* of its model (the original, se_inject's, timm's hand-written twin) in interleaved rounds
and holds their timings, memory figures and ratios. Nothing here measures anything: the numbers
come from :mod:`se_inject.cost.timing` and :mod:`se_inject.cost.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Spread", "VariantInfo", "Timing", "Cell", "ModelBench", "BenchResult", "MODES"]

#: What a cell runs: "infer" (a forward under ``torch.no_grad``, eval mode) or "train" (forward,
#: cross-entropy, backward and an SGD step, train mode).
MODES = ("infer", "train")


@dataclass(frozen=True)
class Spread:
    """The median and the interquartile range (first and third quartile) of some values."""

    median: float
    q1: float
    q3: float

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3}


@dataclass(frozen=True)
class VariantInfo:
    """One variant of a model, as built.

    Attributes:
        name: the variant (``"original"``, ``"se_inject"``, ``"se_inject plain"``,
            ``"se_inject fused"``, ``"timm"``).
        model: what was built: the model's name, or timm's twin's (``"seresnet50"``).
        params: its parameter count.
        flops: FLOPs of one image at the benchmark's input size, from
            :func:`se_inject.cost.report.count_flops` (``FlopCounterMode``).
        kernels: how its SE blocks run (:data:`se_inject.KERNELS`); None for the others.
    """

    name: str
    model: str
    params: int
    flops: int
    kernels: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "params": self.params, "flops": self.flops,
                "kernels": self.kernels}


@dataclass(frozen=True)
class Timing:
    """One variant in one cell.

    Attributes:
        variant: the variant's name.
        rounds_ms: the mean milliseconds per iteration of each timed round, in round order.
        ms: median and IQR of ``rounds_ms``.
        images_per_s: ``batch_size / ms``, per round, summarised the same way.
        warmup_s: seconds of the untimed first iterations; compilation happens there, so under
            torch.compile it is (about) the compile time.
        saved_bytes: training only: bytes of the tensors autograd saves for the backward of one
            forward, each storage counted once (exact, any device); None in inference.
        cuda_peak_bytes: CUDA only: the most memory one step allocated beyond what was allocated
            before it (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``);
            the model's weights are resident before the step and not included. None on the CPU.
    """

    variant: str
    rounds_ms: tuple[float, ...]
    ms: Spread
    images_per_s: Spread
    warmup_s: float
    saved_bytes: Optional[int] = None
    cuda_peak_bytes: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "rounds_ms": list(self.rounds_ms), "ms": self.ms.to_dict(),
                "images_per_s": self.images_per_s.to_dict(), "warmup_s": self.warmup_s,
                "saved_bytes": self.saved_bytes, "cuda_peak_bytes": self.cuda_peak_bytes}


@dataclass(frozen=True)
class Cell:
    """One (model, batch size, mode, compiled) of a run, every variant timed in the same rounds.

    Attributes:
        overhead: per variant but the original, time(variant) / time(original) - 1: the median
            and IQR over rounds of the per-round paired ratio.
        vs_twin: per se_inject variant, time(variant) / time(timm's twin) - 1, paired the same
            way (below 0: se_inject is faster); empty where there is no twin.
        skipped: why the cell did not run (the time budget), else None; a skipped cell has no
            timings.
    """

    model: str
    batch_size: int
    mode: str
    compiled: bool
    rounds: int
    timings: tuple[Timing, ...] = ()
    overhead: dict[str, Spread] = field(default_factory=dict)
    vs_twin: dict[str, Spread] = field(default_factory=dict)
    skipped: Optional[str] = None

    def timing(self, variant: str) -> Timing:
        """The timing of ``variant``; KeyError if the cell has none."""
        for t in self.timings:
            if t.variant == variant:
                return t
        raise KeyError(f"{self.model} {self.mode} has no timing of {variant!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "batch_size": self.batch_size, "mode": self.mode, "compiled": self.compiled,
                "rounds": self.rounds, "timings": [t.to_dict() for t in self.timings],
                "overhead": {k: v.to_dict() for k, v in self.overhead.items()},
                "vs_twin": {k: v.to_dict() for k, v in self.vs_twin.items()}, "skipped": self.skipped}


@dataclass(frozen=True)
class ModelBench:
    """One model of a run: its variants as built, its timm twin (or why there is none).

    Attributes:
        input_size: (C, H, W) of every input.
        twin: the name of timm's hand-written model with this attention, when one was timed.
        twin_note: why no twin was timed (none in timm, different parameters, not asked for).
        error: why the model could not be benchmarked (it could not be converted); its cells
            are then missing.
    """

    model: str
    input_size: tuple[int, ...]
    variants: tuple[VariantInfo, ...] = ()
    twin: Optional[str] = None
    twin_note: Optional[str] = None
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "input_size": list(self.input_size),
                "variants": [v.to_dict() for v in self.variants], "twin": self.twin, "twin_note": self.twin_note,
                "error": self.error}


@dataclass(frozen=True)
class BenchResult:
    """Everything a run measured, with what it ran on.

    Attributes:
        settings: the run's settings (devices, dtype, sizes, rounds, the SE options as JSON).
        environment: the device's name and the versions of the libraries measured.
        models: one record per model, in order.
        cells: every cell, in the order they ran.
    """

    settings: dict[str, Any]
    environment: dict[str, Any]
    models: tuple[ModelBench, ...] = ()
    cells: tuple[Cell, ...] = ()

    @property
    def failures(self) -> dict[str, str]:
        """The models that could not be benchmarked, with why."""
        return {m.model: m.error for m in self.models if m.error is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"settings": dict(self.settings), "environment": dict(self.environment),
                "models": [m.to_dict() for m in self.models], "cells": [c.to_dict() for c in self.cells]}
