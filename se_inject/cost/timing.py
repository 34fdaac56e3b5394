"""Timing several variants side by side: interleaved rounds, rotated order, paired ratios.

A shared machine drifts (other processes, clocks, thermal limits) by more than SE costs, so the
variants are never timed one after the other. Every *round* runs each variant for ``reps``
iterations, back to back, in an order rotated by one every round (no variant always runs first
or right after the same one); a round's figure is its mean time per iteration. A variant's time
is the median of its round figures, its spread their interquartile range, and the ratio of two
variants is the median of their per-round ratios: the two figures of a round are taken within
a second of each other, which cancels most of the drift between rounds.

On CUDA each round is bracketed by ``torch.cuda.synchronize``, so the time is that of the
kernels, not of their launch.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from .results import Spread

__all__ = ["spread", "paired", "rotated", "time_round", "interleaved", "Stop"]


def spread(values: Sequence[float]) -> Spread:
    """Median and quartiles (the inclusive method, as numpy's default percentiles).

    >>> spread([1.0, 2.0, 3.0, 4.0, 10.0])
    Spread(median=3.0, q1=2.0, q3=4.0)
    """
    values = list(values)
    if not values:
        raise ValueError("spread() needs at least one value")
    if len(values) == 1:
        return Spread(values[0], values[0], values[0])
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Spread(q2, q1, q3)


def paired(a: Sequence[float], b: Sequence[float], *, minus_one: bool = True) -> Spread:
    """The per-round ratios ``a[r] / b[r]`` (less 1 with ``minus_one``, an overhead), summarised.

    >>> paired([1.1, 2.2, 3.3], [1.0, 2.0, 3.0]).median  # doctest: +ELLIPSIS
    0.100000...
    """
    if len(a) != len(b):
        raise ValueError(f"paired() needs the same rounds on both sides, got {len(a)} and {len(b)}")
    ratios = [x / y - (1.0 if minus_one else 0.0) for x, y in zip(a, b)]
    return spread(ratios)


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round ``round_index``: ``names`` rotated left by that many places.

    >>> rotated(["a", "b", "c"], 1), rotated(["a", "b", "c"], 3)
    (['b', 'c', 'a'], ['a', 'b', 'c'])
    """
    k = round_index % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round(step: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Mean seconds per call of ``step`` over ``reps`` calls, queued work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / reps


class Stop:
    """When to stop adding rounds: after ``rounds``, or when the next round would end after
    ``deadline`` (a ``time.perf_counter()`` value; None: no deadline). One round always runs."""

    def __init__(self, rounds: int, deadline: Optional[float] = None) -> None:
        self.rounds, self.deadline = rounds, deadline

    def another(self, done: int, last_round_s: float) -> bool:
        if done == 0:
            return True
        if done >= self.rounds:
            return False
        return self.deadline is None or time.perf_counter() + last_round_s <= self.deadline


def interleaved(steps: Mapping[str, Callable[[], Any]], *, reps: int, stop: Stop, device: torch.device,
                on_round: Optional[Callable[[int], None]] = None) -> dict[str, list[float]]:
    """Time every step in interleaved rounds (order rotated each round); seconds per call, per round.

    Args:
        steps: the variants' steps, by name; they must be warmed up (compiled) already.
        reps: calls per step and round.
        stop: how many rounds, and until when.
        device: where the steps run (for synchronisation).
        on_round: called with the number of rounds done after each round.
    """
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    done, last = 0, 0.0
    while stop.another(done, last):
        started = time.perf_counter()
        for name in rotated(names, done):
            times[name].append(time_round(steps[name], reps, device))
        done, last = done + 1, time.perf_counter() - started
        if on_round is not None:
            on_round(done)
    return times
