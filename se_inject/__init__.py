"""se_inject: add Squeeze-and-Excitation to the residual branches of existing PyTorch networks.

>>> import timm, se_inject
>>> se_model = se_inject.apply(timm.create_model("resnet50"), reduction=16)  # doctest: +SKIP

``apply`` / ``inject`` / ``find_sites`` rewrite or analyse a model; ``build_report`` measures what
SE cost; ``bench`` times it against the original and timm's hand-written twin; ``save`` / ``load``
store a converted model as safetensors plus a JSON recipe.

The package's top level is its architecture. The core modules: ``api.py`` (the three entry points
and the checks before any work), ``options.py`` (:class:`SEOptions`, plain data), ``plan.py`` (what
a dry run finds), ``layers.py`` (the activation and gate vocabulary and its behaviour check),
``errors.py``, ``utils.py``. The rooms, each importing only the rooms before it
(``tests/test_architecture.py`` holds the order)::

    fused/    the Triton kernels and the torch.library op
    modules/  what se_inject inserts: the SE block, the other attentions, the builder
    trace/    torch.fx: the tracer, the forward recorder, the scope search, shapes
    sites/    where SE can go: the residual-add classifier, placement
    rewrite/  cutting blocks out, verifying them, the pipeline and the swap
    io/       save / load, sources, checkpoints
    cost/     what SE costs: the report and the benchmark
    cli/      the se-inject command

``se_inject.ops`` and ``se_inject.sources`` are the modules ``se_inject.trace.ops`` and
``se_inject.io.sources`` under the names they had before the rooms (``import se_inject.ops`` works).
"""

import sys as _sys

from .api import apply, default_example_inputs, find_sites, inject
from .cost.bench import BenchResult, bench
from .cost.report import Report, build_report
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
from .io import sources
from .io.checkpoint import load_checkpoint, read_state_dict
from .io.recipe import load, save
from .modules.se_block import SEBlock, SEResidual, se_hidden_channels, set_kernels
from .options import KERNELS, SEOptions
from .plan import SKIP_REASONS, Injection, Site, SitePlan, Skip, Untraceable
from .trace import ops
from .utils import version as _version

# The names these two modules had before the rooms, which the docs use (docs/attentions.md:
# se_inject.ops.InsertedAttention; docs/saving.md: se_inject.sources.Source): the same module objects.
_sys.modules[__name__ + ".ops"] = ops
_sys.modules[__name__ + ".sources"] = sources

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
