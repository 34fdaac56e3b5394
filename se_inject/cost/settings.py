"""What a benchmark run is asked to do, checked before any model is built.

:class:`BenchSettings` holds everything :func:`se_inject.bench` takes but the models and the SE
options; :meth:`BenchSettings.checked` refuses what cannot run (an empty list, a batch size of 0,
CUDA without a GPU, fp16 autocast on the CPU, an unknown variant or compile mode) with an
:class:`~se_inject.errors.OptionError` that names the setting, so that a bad call fails in a
second instead of after the first model's conversion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch

from ..errors import OptionError
from .results import MODES

__all__ = ["BenchSettings", "VARIANTS", "DEFAULT_VARIANTS", "SE_VARIANTS", "DTYPES", "default_device"]

#: The variants a run can time. "se_inject" runs SE blocks with the options' ``kernels``;
#: "se_inject plain" and "se_inject fused" force plain torch ops or the fused op
#: (:func:`se_inject.set_kernels`); "timm" is timm's hand-written model with the same attention,
#: where one exists (:func:`se_inject.cost.variants.timm_twin`).
VARIANTS = ("original", "se_inject", "se_inject plain", "se_inject fused", "timm")
DEFAULT_VARIANTS = ("original", "se_inject", "timm")
#: The se_inject variants and the kernels each forces (None: the options' own).
SE_VARIANTS: dict[str, Optional[str]] = {"se_inject": None, "se_inject plain": "plain", "se_inject fused": "fused"}
#: Autocast dtypes by name; fp32 runs without autocast.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> str:
    """``"cuda"`` where a GPU is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{name} must be a positive integer, got {value!r}")


def _choices(name: str, values: Sequence[Any], allowed: Sequence[Any]) -> tuple[Any, ...]:
    values = (values,) if isinstance(values, (str, bool)) else tuple(values)
    if not values:
        raise OptionError(f"{name} must name at least one of {list(allowed)}")
    for v in values:
        if v not in allowed:
            raise OptionError(f"{name}: {v!r} is not one of {list(allowed)}")
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class BenchSettings:
    """The settings of a run (see :func:`se_inject.bench` for each one's meaning)."""

    variants: tuple[str, ...] = DEFAULT_VARIANTS
    modes: tuple[str, ...] = MODES
    compiled: tuple[bool, ...] = (False, True)
    compile_mode: Optional[str] = None
    backend: str = "inductor"
    freeze: bool = False
    device: str = "cpu"
    dtype: str = "fp32"
    channels_last: bool = False
    batch_sizes: tuple[int, ...] = (8,)
    img_size: Optional[int] = None
    rounds: int = 7
    reps: int = 5
    warmup: int = 3
    budget_s: Optional[float] = None
    seed: int = 0
    num_classes: Optional[int] = None
    strict: bool = False

    def checked(self) -> "BenchSettings":
        """These settings, normalised (lists to tuples, duplicates dropped), or an OptionError
        naming the first that cannot run."""
        variants = _choices("variants", self.variants, VARIANTS)
        modes = _choices("modes", self.modes, MODES)
        compiled = _choices("compiled", self.compiled, (False, True))
        batch_sizes = (self.batch_sizes,) if isinstance(self.batch_sizes, int) else tuple(self.batch_sizes)
        if not batch_sizes:
            raise OptionError("batch_sizes must hold at least one batch size")
        for b in batch_sizes:
            _positive("batch size", b)
        for name in ("rounds", "reps", "warmup"):
            _positive(name, getattr(self, name))
        if self.img_size is not None:
            _positive("img_size", self.img_size)
        if self.num_classes is not None:
            _positive("num_classes", self.num_classes)
        if self.budget_s is not None and (isinstance(self.budget_s, bool) or not self.budget_s > 0):
            raise OptionError(f"budget_s must be a positive number of seconds, got {self.budget_s!r}")
        if self.dtype not in DTYPES:
            raise OptionError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        device = self._device()
        if self.dtype == "fp16" and device.type == "cpu":
            raise OptionError("dtype 'fp16' is for CUDA: the CPU has no fast float16 kernels, so the figures would "
                              "not be what anyone runs; use bf16 or fp32 on the CPU")
        if self.compile_mode is not None and True in compiled:
            self._check_compile_mode()
        return BenchSettings(**{**asdict(self), "variants": variants, "modes": modes, "compiled": compiled,
                                "batch_sizes": batch_sizes, "device": str(device)})

    def _device(self) -> torch.device:
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise OptionError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise OptionError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise OptionError("device 'cuda' asked for, but torch sees no CUDA GPU here "
                                  f"(torch {torch.__version__}); run on a GPU machine or pass device='cpu'")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise OptionError(f"device {self.device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        return device

    def _check_compile_mode(self) -> None:
        import torch._inductor

        modes = list(torch._inductor.list_mode_options())
        if self.compile_mode not in modes:
            raise OptionError(f"compile_mode must be one of {modes} (torch.compile's modes), got {self.compile_mode!r}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def autocast_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
