"""What SE costs: parameters and FLOPs, and time and memory against the original and timm's twin.

* ``report.py``: :func:`build_report`: parameters and FLOPs before and after, per site, as data.
* ``bench.py``: :func:`bench`, the benchmark (``se_inject.bench``, ``se-inject bench``).
* ``settings.py``: what a benchmark run is asked to do (:class:`BenchSettings`), checked first.
* ``variants.py``: the variants compared, built from one seed: the original, se_inject's model,
  timm's hand-written twin (:data:`TWINS`, the one table of twins).
* ``steps.py``: one inference or training iteration, eager or compiled, and the guards that keep
  compiled figures compiled (fresh compiles, no silent eager fallback).
* ``timing.py``: interleaved rounds in rotated order, medians, IQRs, paired per-round ratios.
* ``memory.py``: bytes saved for backward (each storage once) and CUDA's peak per step.
* ``run.py``: the grid of cells within the time budget.
* ``results.py``: the typed records :func:`bench` returns, with ``to_dict()`` for JSON.
"""
