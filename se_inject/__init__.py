"""se_inject: add Squeeze-and-Excitation to the residual branches of existing PyTorch networks.

>>> import timm, se_inject
>>> se_model = se_inject.apply(timm.create_model("resnet50"), reduction=16)  # doctest: +SKIP

``apply`` / ``inject`` / ``find_sites`` rewrite or analyse a model; ``build_report`` measures what
SE cost; ``bench`` times it against the original and timm's hand-written twin; ``save`` / ``load``
store a converted model as safetensors plus a JSON recipe.
"""

from .api import apply, default_example_inputs, find_sites, inject
from .cost.bench import BenchResult, bench
from .io.checkpoint import load_checkpoint, read_state_dict
from .errors import (
    BenchError,
    CheckpointError,
    ExampleInputError,
    GraphModuleRootWarning,
    NoResidualAddsError,
    NoResidualAddsWarning,
    NotAModuleError,
    OptionError,
    RecipeError,
    RefusedModuleWarning,
    SEInjectError,
    SEInjectWarning,
    TraceError,
    UnknownModelError,
    VerificationError,
)
from .options import KERNELS, SEOptions
from .plan import SKIP_REASONS, Injection, Site, SitePlan, Skip, Untraceable
from .io.recipe import load, save
from .cost.report import Report, build_report
from .modules.se_block import SEBlock, SEResidual, se_hidden_channels, set_kernels
from .utils import version as _version

__version__ = _version()

__all__ = [
    # rewriting
    "apply", "inject", "find_sites", "default_example_inputs", "SEOptions", "Injection", "SitePlan",
    "Site", "Skip", "Untraceable", "SKIP_REASONS",
    # the block
    "SEBlock", "SEResidual", "se_hidden_channels", "set_kernels", "KERNELS",
    # reporting and files
    "Report", "build_report", "save", "load", "read_state_dict", "load_checkpoint",
    # benchmarking
    "bench", "BenchResult",
    # errors and warnings
    "SEInjectError", "NotAModuleError", "OptionError", "TraceError", "ExampleInputError",
    "VerificationError", "RecipeError", "CheckpointError", "UnknownModelError", "NoResidualAddsError", "BenchError",
    "SEInjectWarning", "NoResidualAddsWarning", "RefusedModuleWarning", "GraphModuleRootWarning",
    "__version__",
]
