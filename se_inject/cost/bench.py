"""``bench``: what SE costs on this machine, in time and in memory (``se-inject bench``).

:func:`bench` checks its settings and options before any work, resolves the models (names, globs,
Hugging Face directories, modules) and hands the grid of cells to :func:`se_inject.cost.run.run`;
``se_inject.bench`` is this function (the benchmark harness is the room ``se_inject.cost``, so the
function no longer shadows a package of its name). Importing this module is cheap: the variants,
the steps and torch.compile's machinery are imported when a run needs them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from torch import nn

from ..api import checked_options
from ..errors import OptionError
from ..options import takes_options
from .results import MODES, BenchResult, Cell, ModelBench, Spread, Timing, VariantInfo
from .settings import DEFAULT_VARIANTS, DTYPES, SE_VARIANTS, VARIANTS, BenchSettings, default_device

__all__ = ["bench", "BenchResult", "Cell", "Timing", "Spread", "ModelBench", "VariantInfo", "BenchSettings",
           "VARIANTS", "DEFAULT_VARIANTS", "MODES", "DTYPES"]


@takes_options
def bench(models: Union[str, nn.Module, Sequence[Union[str, nn.Module]]], *,
          variants: Sequence[str] = DEFAULT_VARIANTS, modes: Sequence[str] = MODES,
          compiled: Sequence[bool] = (False, True), compile_mode: Optional[str] = None, backend: str = "inductor",
          freeze: bool = False, device: Optional[str] = None, dtype: str = "fp32", channels_last: bool = False,
          batch_sizes: Union[int, Sequence[int]] = (8,), img_size: Optional[int] = None, rounds: int = 7,
          reps: int = 5, warmup: int = 3, budget_s: Optional[float] = None, seed: int = 0,
          num_classes: Optional[int] = None, strict: bool = False,
          on_cell: Optional[Callable[[Cell], None]] = None,
          on_progress: Optional[Callable[[str, int, int], None]] = None, **options: Any) -> BenchResult:
    """Time the original model, se_inject's model and timm's hand-written twin side by side.

    For every model, batch size, mode and compiled-or-not (a *cell*), each variant is warmed up
    (compile time reported apart), then all are timed in interleaved rounds of rotating order:
    a time is the median (and IQR) over rounds of the mean per iteration, an overhead the median
    of the per-round paired ratios. Nothing is printed: ``on_progress(description, done, total)``
    can draw a bar, and ``on_cell(cell)`` gets each :class:`Cell` as soon as it is finished.

    Args:
        models: timm names, globs (``"resnet*"``), Hugging Face directories (as ``se-inject
            report`` takes them) or modules (run on a copy: training changes the weights).
        variants: of :data:`VARIANTS`: ``original``, ``se_inject`` (the options' kernels),
            ``se_inject plain`` / ``se_inject fused`` (kernels forced), ``timm`` (the twin).
        modes: ``infer`` (no_grad, eval) and/or ``train`` (forward, cross-entropy, backward,
            SGD step). ``compiled``: False (eager) and/or True (the forward under torch.compile,
            each variant compiled fresh; a recompile-limit hit raises instead of running eager;
            each compiled cell resets torch.compile's caches, for the whole process).
        compile_mode, backend: torch.compile's (``"reduce-overhead"``: CUDA graphs; the
            ``"eager"`` backend checks the harness cheaply). ``freeze``: inductor's freezing.
        device: ``"cpu"`` or ``"cuda"`` (default: cuda when available). ``dtype``: ``"fp32"``,
            or autocast to ``"bf16"`` / ``"fp16"`` (CUDA). ``channels_last``: models and inputs.
        batch_sizes: one or several. ``img_size``: H = W (default: the model's own).
        rounds, reps, warmup: rounds at most, iterations per variant and round, untimed first.
        budget_s: seconds for the whole run: cells share what is left and stop adding rounds
            at their share; a cell that cannot fit is recorded as skipped.
        seed: every variant is built after ``torch.manual_seed(seed)``, inputs drawn from it;
            ``num_classes``, ``strict``: as ``se-inject report`` takes them.

    Options (keyword-only, those of :func:`se_inject.apply`):
        {options}

    Returns a :class:`BenchResult` (``to_dict()`` for JSON); a model that cannot be converted is
    in its ``failures``, and the others still run.

    Raises:
        OptionError (a setting that cannot run: batch size 0, CUDA without a GPU, fp16 on the
        CPU...), UnknownModelError, BenchError (a variant failed to compile or run).
    """
    settings = BenchSettings(variants=variants, modes=modes, compiled=compiled, compile_mode=compile_mode,
                             backend=backend, freeze=freeze, device=device or default_device(), dtype=dtype,
                             channels_last=channels_last, batch_sizes=batch_sizes, img_size=img_size, rounds=rounds,
                             reps=reps, warmup=warmup, budget_s=budget_s, seed=seed, num_classes=num_classes,
                             strict=strict).checked()
    opts = checked_options(options, "bench")
    forced = [v for v in settings.variants if SE_VARIANTS.get(v)]
    if forced and not opts.is_se:
        raise OptionError(f"the variants {forced} force SE kernels, which are for attn='se'; with attn="
                          f"{opts.attn!r} time 'se_inject' alone")
    from .run import run

    return run(_resolved(models), options, settings, on_cell=on_cell, on_progress=on_progress)


def _resolved(models: Union[str, nn.Module, Sequence[Union[str, nn.Module]]]) -> list[Union[str, nn.Module]]:
    """Modules as they are, names through the command line's resolution (globs, HF directories)."""
    from ..io.sources import resolve_models

    items = [models] if isinstance(models, (str, nn.Module)) else list(models)
    if not items:
        raise OptionError("bench() needs at least one model: a timm name, a glob, a Hugging Face directory or a module")
    out: list[Union[str, nn.Module]] = []
    for item in items:
        if isinstance(item, nn.Module):
            out.append(item)
        elif isinstance(item, str):
            out.extend(m for m in resolve_models([item]) if m not in out)
        else:
            raise OptionError(f"bench() takes model names and modules, got {type(item).__name__}")
    return out
