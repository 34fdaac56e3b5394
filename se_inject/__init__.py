"""se_inject: add Squeeze-and-Excitation to the residual branches of existing PyTorch networks.

>>> import timm, se_inject
>>> se_model = se_inject.apply(timm.create_model("resnet50"), reduction=16)  # doctest: +SKIP
"""

from .errors import (
    ExampleInputError,
    GraphModuleRootWarning,
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
from .injection import (
    Injection,
    SEOptions,
    Site,
    SitePlan,
    Skip,
    apply,
    default_example_inputs,
    find_sites,
    inject,
)
from .scopes import Untraceable
from .se_block import SEBlock, se_hidden_channels
from .sites import SKIP_REASONS

__version__ = "0.1.0"

__all__ = [
    "apply", "inject", "find_sites", "default_example_inputs", "SEBlock", "se_hidden_channels", "SEOptions", "Site", "Skip",
    "SitePlan", "Injection", "Untraceable", "SKIP_REASONS", "SEInjectError", "NotAModuleError",
    "OptionError", "TraceError", "ExampleInputError", "VerificationError", "RecipeError",
    "UnknownModelError", "SEInjectWarning", "NoResidualAddsWarning", "RefusedModuleWarning",
    "GraphModuleRootWarning", "__version__",
]
