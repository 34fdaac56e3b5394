"""The options of ``apply`` / ``inject`` / ``find_sites``, defined once, as plain data.

:class:`SEOptions` is the one place the option list exists: its fields (with their defaults and
documentation) make the keyword-only parameters of the public functions (:func:`takes_options`
writes them into their signatures and docstrings), the ``se-inject`` command's flags (the CLI
adds its own flag metadata, :mod:`se_inject.cli.flags`), and the recipe's JSON
(:meth:`SEOptions.to_dict` / :meth:`SEOptions.from_dict`).

The options flow one way: this module imports nothing of the rooms of se_inject, only the core
modules :mod:`se_inject.errors` and :mod:`se_inject.layers` (the layer names and their behaviour
check). :class:`SEOptions` validates each value on its own when it is built (types, ranges, names,
and a layer class by what it does); what needs the modules se_inject builds (is the attention
known, does it use the options given, can it start as an identity) is checked once per call,
before any analysis, by :func:`se_inject.modules.build.check_options`.

Four options mean something different for each attention: ``reduction``, ``rd_divisor``,
``act_layer`` and ``gate_layer`` (:data:`ATTENTION_OPTIONS`). Left out, they hold
:data:`ATTENTION_DEFAULT`, "the attention's own default": for ``attn="se"`` that is se's own value
(:data:`SE_DEFAULTS`, settled when the options are built, so ``SEOptions().reduction == 16``); any
other attention is built without them, and keeps its own defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Optional, Type, TypeVar, Union

from torch import nn

from .errors import OptionError
from .layers import ACT_LAYERS, GATE_LAYERS, resolve_layer

__all__ = ["SEOptions", "LayerSpec", "takes_options", "option_names", "attention_label", "check_kernels",
           "POSITIONS", "KERNELS", "ATTENTION_OPTIONS", "ATTENTION_DEFAULT", "SE_DEFAULTS"]

LayerSpec = Union[str, Type[nn.Module]]

#: Where in each residual block the module goes, the default first (see :mod:`se_inject.sites.placement`).
POSITIONS = ("branch", "pre", "post", "identity", "mid")

#: How SE blocks run: "auto" runs the fused Triton op on CUDA tensors in eager mode and plain
#: torch ops elsewhere (under torch.compile too, where inductor fuses them itself); "plain"
#: always runs torch ops (for debugging and comparisons); "fused" uses the fused op wherever it
#: supports the tensors, under torch.compile too. Either way only on GPUs Triton supports (compute
#: capability 7.0, and 8.0 for bf16): ``se_inject.fused.use_fused`` decides.
KERNELS = ("auto", "plain", "fused")

#: The options whose meaning depends on the attention.
ATTENTION_OPTIONS = ("reduction", "rd_divisor", "act_layer", "gate_layer")

#: se's own values of :data:`ATTENTION_OPTIONS` (timm's SE-ResNets: 1/16, rounded to 8, ReLU, sigmoid).
SE_DEFAULTS: dict[str, Any] = {"reduction": 16, "rd_divisor": 8, "act_layer": "relu", "gate_layer": "sigmoid"}


class _AttentionDefault:
    """The type of :data:`ATTENTION_DEFAULT`; its one instance survives copies and pickles."""

    _instance: Optional["_AttentionDefault"] = None

    def __new__(cls) -> "_AttentionDefault":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<the attention's own default>"

    def __reduce__(self) -> str:
        return "ATTENTION_DEFAULT"


#: The default of an option of :data:`ATTENTION_OPTIONS`: the attention's own value (se's is in
#: :data:`SE_DEFAULTS`).
ATTENTION_DEFAULT = _AttentionDefault()


def _option(default: Any, doc: str) -> Any:
    """A dataclass field carrying its documentation."""
    return field(default=default, metadata={"doc": doc})


def check_kernels(kernels: Any) -> None:
    """The one check of a ``kernels`` name (options, :class:`~se_inject.modules.se_block.SEBlock`,
    :func:`~se_inject.modules.se_block.set_kernels`; ``se_inject.fused.use_fused`` trusts it)."""
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise OptionError(f"kernels must be one of {list(KERNELS)}, got {kernels!r}")


def attention_label(attn: Any) -> str:
    """How plans and errors name an attention: its name, or a factory's qualified name."""
    if isinstance(attn, str):
        return attn
    return getattr(attn, "__qualname__", None) or type(attn).__name__


@dataclass(frozen=True)
class SEOptions:
    """How SE blocks are built and where they go: plain, frozen data, each value checked on its own
    when built (see the module docstring for what is checked later, once per call).

    Build it by keyword (``SEOptions(reduction=8)``), from the keyword arguments of a public
    function (:meth:`from_kwargs`) or from JSON (:meth:`from_dict`).
    """

    reduction: int = _option(ATTENTION_DEFAULT, "reduction ratio r of the excitation MLP: hidden width about "
                                                "C / r (timm's rd_ratio = 1 / r).")
    rd_divisor: Optional[int] = _option(
        ATTENTION_DEFAULT, "round hidden widths to multiples of this, as timm does (64 -> 8, 256 -> 16); "
                           "None gives the paper's max(1, C // r) (se only).")
    act_layer: LayerSpec = _option(ATTENTION_DEFAULT, "activation of the excitation MLP: a name or an "
                                                      "nn.Module class.")
    gate_layer: LayerSpec = _option(ATTENTION_DEFAULT, "gate of the excitation: a name or an nn.Module class.")
    identity_init: bool = _option(False, "start every SE block as an exact identity (outputs unchanged bit for "
                                         "bit; every SE parameter gets gradients from the first step, or the "
                                         "second: see SEBlock.init_identity_).")
    include: Optional[tuple[str, ...]] = _option(
        None, "glob patterns on block paths (e.g. 'layer4.*'): only matching blocks get SE. None: all.")
    exclude: tuple[str, ...] = _option((), "glob patterns on block paths: matching blocks get no SE.")
    min_channels: int = _option(1, "sites with fewer channels (where the module goes) get none.")
    attn: Union[str, Callable[[int], nn.Module]] = _option(
        "se", "the attention: 'se' (se_inject's SEBlock), a name timm's create_attn builds (eca, ese, gc, gca, "
              "cbam, ...), or a factory: a callable taking the channel count. reduction, rd_divisor, act_layer "
              "and gate_layer go to it where it uses them; left out, other attentions keep their own defaults.")
    position: str = _option(
        "branch", "where in each residual block: 'branch' (before the add), 'pre' (the branch's input), 'post' "
                  "(after the add and its activation), 'identity' (on the shortcut, after its projection) or "
                  "'mid' (after the branch's k>1 conv, before its 1x1 conv).")
    fuse_residual: bool = _option(
        True, "attn='se' at position 'branch': let each SE block right before a residual add do the add, "
              "and the activation that reads only the add, itself (se(branch, shortcut)): one fused pass on CUDA, the same ops elsewhere. False "
              "keeps SE -> add -> activation as separate nodes.")
    kernels: str = _option("auto", "how SE blocks (attn='se') run: 'auto' (the fused Triton op on CUDA in eager "
                                   "mode, plain torch ops elsewhere and under torch.compile), 'plain' (always torch ops, "
                                   "for debugging and comparisons), 'fused' (the fused op under torch.compile too); "
                                   "se_inject.set_kernels(model, ...) changes it later.")

    def __post_init__(self) -> None:
        _check_attn(self.attn)
        if not isinstance(self.position, str) or self.position not in POSITIONS:
            raise OptionError(f"position must be one of {list(POSITIONS)}, got {self.position!r}")
        settled = {n: v for n, v in SE_DEFAULTS.items() if self.is_se and getattr(self, n) is ATTENTION_DEFAULT}
        for name, value in settled.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_defaulted", frozenset(settled))
        for name in ("reduction", "min_channels") + (("rd_divisor",) if self.rd_divisor is not None else ()):
            value = getattr(self, name)
            if value is ATTENTION_DEFAULT:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{name} must be a positive integer, got {value!r}")
        for name in ("identity_init", "fuse_residual"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_kernels(self.kernels)
        object.__setattr__(self, "include", None if self.include is None else _patterns("include", self.include))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))
        if not self.is_se and self.kernels != "auto":
            raise OptionError(f"kernels={self.kernels!r} is for attn='se' (se_inject's SE blocks); "
                              f"attn={attention_label(self.attn)!r} runs as its own module, leave kernels out")
        for name, table in (("act_layer", ACT_LAYERS), ("gate_layer", GATE_LAYERS)):
            if self.given(name):  # a name it knows, or a class that behaves as an activation / a gate
                resolve_layer(getattr(self, name), table, name)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], *, caller: str = "SEOptions") -> "SEOptions":
        """Options from keyword arguments; an unknown name is an :class:`OptionError` with a hint."""
        _check_names(kwargs, caller)
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SEOptions":
        """Options from their JSON form (:meth:`to_dict`); lists become tuples."""
        if not isinstance(data, Mapping):
            raise OptionError(f"options must be a mapping of names to values, got {type(data).__name__}")
        _check_names(data, "SEOptions.from_dict")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: names, numbers, booleans and lists. Layer classes and attention factories
        cannot be recorded. Options left to the attention's own default are left out, and so are
        ``attn`` and ``position`` at their defaults, so plain SE records what it always did."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not self.given(f.name) or (f.name in ("attn", "position") and value == f.default):
                continue
            if f.name == "attn" and not isinstance(value, str):
                raise OptionError(f"attn={attention_label(value)} is a factory; only attention names "
                                  f"(such as 'se' or 'eca') can be recorded")
            if isinstance(value, type):
                raise OptionError(f"{f.name}={value!r} is a class; only layer names (e.g. "
                                  f"{sorted(ACT_LAYERS if f.name == 'act_layer' else GATE_LAYERS)}) can be recorded")
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> "SEOptions":
        """A copy with some options changed (validated like the original). Options that took
        se's defaults stay "not given", so ``SEOptions().replace(attn="eca")`` is valid."""
        _check_names(changes, "SEOptions.replace")
        kept = {n: ATTENTION_DEFAULT for n in getattr(self, "_defaulted", ()) if n not in changes}
        return dataclasses.replace(self, **kept, **changes)

    # -- use -----------------------------------------------------------------------------------
    def given(self, name: str) -> bool:
        """Whether option ``name`` holds a value: one the user gave, or se's own (:data:`SE_DEFAULTS`)
        for ``attn="se"``; False where it is :data:`ATTENTION_DEFAULT`, the attention's own."""
        return getattr(self, name) is not ATTENTION_DEFAULT

    @property
    def is_se(self) -> bool:
        """Whether the attention is se_inject's own SE block (``attn="se"``)."""
        return isinstance(self.attn, str) and self.attn == "se"

    @property
    def fuses(self) -> bool:
        """Whether SE blocks take the residual add over (``fuse_residual``, for SE at ``"branch"``)."""
        return self.fuse_residual and self.is_se and self.position == "branch"

    def selects(self, block: str) -> bool:
        """Whether the include / exclude patterns let ``block`` get SE."""
        if self.include is not None and not any(fnmatch.fnmatchcase(block, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(block, p) for p in self.exclude)


def _check_attn(attn: Any) -> None:
    """``attn`` is a name or a factory (a callable), and not a module instance."""
    if isinstance(attn, nn.Module):
        raise OptionError(f"attn must be a name or a factory, got a module instance ({type(attn).__name__}); "
                          f"pass its class or a function building one per site, e.g. attn=lambda c: ...(c)")
    if not isinstance(attn, str) and not callable(attn):
        raise OptionError(f"attn must be an attention name (such as 'se' or 'eca') or a factory, got {attn!r}")


def option_names() -> list[str]:
    """The option names, in declaration order."""
    return [f.name for f in fields(SEOptions)]


def _check_names(kwargs: Mapping[str, Any], caller: str) -> None:
    names = option_names()
    for name in kwargs:
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the options are {', '.join(names)}"
            raise OptionError(f"{caller}() got an unknown option {name!r}; {hint}")


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise OptionError(f"{name} must be a glob pattern or a list of them, got {value!r}") from None
    if not all(isinstance(p, str) and p for p in patterns):
        raise OptionError(f"{name} must hold non-empty strings, got {value!r}")
    return patterns


def default_text(name: str) -> str:
    """An option's default as the documentation says it (``16 for se, else the attention's own``)."""
    default = SEOptions.__dataclass_fields__[name].default
    if default is ATTENTION_DEFAULT:
        return f"{SE_DEFAULTS[name]!r} for se, else the attention's own"
    return repr(default)


def _options_doc(indent: str) -> str:
    return f"\n{indent}".join(f"{f.name} (default {default_text(f.name)}): {f.metadata['doc']}"
                              for f in fields(SEOptions))


F = TypeVar("F", bound=Callable[..., Any])


def takes_options(func: F) -> F:
    """Give ``func(model, *, ..., **options)`` a signature and docstring listing every option.

    The options come right after the first parameter, keyword-only, with their defaults and
    types; ``{options}`` in the docstring is replaced by their documentation.
    """
    signature = inspect.signature(func)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    hints = typing.get_type_hints(SEOptions)
    options = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
               for f in fields(SEOptions)]
    func.__signature__ = signature.replace(parameters=[own[0], *options, *own[1:]])  # type: ignore[attr-defined]
    for line in (func.__doc__ or "").splitlines():
        if "{options}" in line:
            indent = line[: len(line) - len(line.lstrip())]
            func.__doc__ = func.__doc__.replace("{options}", _options_doc(indent))  # type: ignore[union-attr]
    return func
