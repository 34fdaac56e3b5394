"""The options of ``apply`` / ``inject`` / ``find_sites``, defined once.

:class:`SEOptions` is the one place the option list exists: its fields (with their defaults and
documentation) make the keyword-only parameters of the public functions (:func:`takes_options`
writes them into their signatures and docstrings), the ``se-inject`` command's flags, and the
recipe's JSON (:meth:`SEOptions.to_dict` / :meth:`SEOptions.from_dict`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import fnmatch
import inspect
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Optional, Type, TypeVar, Union

from torch import nn

from .modules import attentions as attention
from .modules.attentions import ATTENTIONS, DEFAULTS, attention_label, given
from .errors import OptionError
from .sites.placement import POSITIONS
from .modules.se_block import ACT_LAYERS, GATE_LAYERS, KERNELS, SEBlock, SEResidual, resolve_layer, se_hidden_channels

__all__ = ["SEOptions", "LayerSpec", "takes_options", "option_names"]

LayerSpec = Union[str, Type[nn.Module]]


def _option(default: Any, doc: str, **cli: Any) -> Any:
    """A dataclass field carrying its documentation and how the command line spells it."""
    return field(default=default, metadata={"doc": doc, "cli": cli})


def _from_cli_divisor(value: int) -> Optional[int]:
    return None if value == 0 else value


@dataclass(frozen=True)
class SEOptions:
    """How SE blocks are built and where they go. Validated on construction.

    Build it by keyword (``SEOptions(reduction=8)``), from the keyword arguments of a public
    function (:meth:`from_kwargs`) or from JSON (:meth:`from_dict`).
    """

    reduction: int = _option(DEFAULTS["reduction"], "reduction ratio r of the excitation MLP: hidden width about "
                                                    "C / r (timm's rd_ratio = 1 / r).", metavar="R", type=int)
    rd_divisor: Optional[int] = _option(
        DEFAULTS["rd_divisor"], "round hidden widths to multiples of this, as timm does (64 -> 8, 256 -> 16); "
                                "None gives the paper's max(1, C // r) (se only).",
        metavar="N", type=int, convert=_from_cli_divisor, note="0 for the paper's max(1, C // r)")
    act_layer: LayerSpec = _option(DEFAULTS["act_layer"], "activation of the excitation MLP: a name or an "
                                                          "nn.Module class.", metavar="NAME", choices=sorted(ACT_LAYERS))
    gate_layer: LayerSpec = _option(DEFAULTS["gate_layer"], "gate of the excitation: a name or an nn.Module class.",
                                    metavar="NAME", choices=sorted(GATE_LAYERS))
    identity_init: bool = _option(False, "start every SE block as an exact identity (outputs unchanged bit for "
                                         "bit; every SE parameter gets gradients from the first step, or the "
                                         "second: see SEBlock.init_identity_).", action="store_true")
    include: Optional[tuple[str, ...]] = _option(
        None, "glob patterns on block paths (e.g. 'layer4.*'): only matching blocks get SE. None: all.",
        action="append", metavar="PATTERN", note="repeatable")
    exclude: tuple[str, ...] = _option((), "glob patterns on block paths: matching blocks get no SE.",
                                       action="append", metavar="PATTERN", note="repeatable")
    min_channels: int = _option(1, "sites with fewer channels (where the module goes) get none.", metavar="N",
                                type=int)
    attn: Union[str, Callable[[int], nn.Module]] = _option(
        "se", "the attention: 'se' (se_inject's SEBlock), a name timm's create_attn builds (eca, ese, gc, gca, "
              "cbam, ...), or a factory: a callable taking the channel count. reduction, rd_divisor, act_layer "
              "and gate_layer go to it where it uses them; left out, other attentions keep their own defaults.",
        metavar="NAME", choices=sorted(ATTENTIONS))
    position: str = _option(
        "branch", "where in each residual block: 'branch' (before the add), 'pre' (the branch's input), 'post' "
                  "(after the add and its activation), 'identity' (on the shortcut, after its projection) or "
                  "'mid' (after the branch's k>1 conv, before its 1x1 conv).",
        metavar="WHERE", choices=list(POSITIONS))
    fuse_residual: bool = _option(
        True, "attn='se' at position 'branch': let each SE block right before a residual add do the add, "
              "and the activation that reads only the add, itself (se(branch, shortcut)): one fused pass on CUDA, the same ops elsewhere. False "
              "keeps SE -> add -> activation as separate nodes.", action=argparse.BooleanOptionalAction)
    kernels: str = _option("auto", "how SE blocks (attn='se') run: 'auto' (the fused Triton op on CUDA in eager "
                                   "mode, plain torch ops elsewhere and under torch.compile), 'plain' (always torch ops, "
                                   "for debugging and comparisons), 'fused' (the fused op under torch.compile too); "
                                   "se_inject.set_kernels(model, ...) changes it later.",
                           metavar="MODE", choices=list(KERNELS))

    def __post_init__(self) -> None:
        if not isinstance(self.position, str) or self.position not in POSITIONS:
            raise OptionError(f"position must be one of {list(POSITIONS)}, got {self.position!r}")
        settled = attention.se_defaults(self)  # "se": its defaults for the options not given
        for name, value in settled.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_defaulted", frozenset(settled))
        for name in ("reduction", "min_channels") + (("rd_divisor",) if self.rd_divisor is not None else ()):
            value = getattr(self, name)
            if not given(value):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{name} must be a positive integer, got {value!r}")
        for name in ("identity_init", "fuse_residual"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.kernels not in KERNELS:
            raise OptionError(f"kernels must be one of {list(KERNELS)}, got {self.kernels!r}")
        object.__setattr__(self, "include", None if self.include is None else _patterns("include", self.include))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))
        if isinstance(self.attn, str) and self.attn == "se":
            _check_layers(self)  # an activation and a gate, checked by behaviour
        else:
            if self.kernels != "auto":
                raise OptionError(f"kernels={self.kernels!r} is for attn='se' (se_inject's SE blocks); "
                                  f"attn={attention_label(self.attn)!r} runs as its own module, leave kernels out")
            for name, table in (("act_layer", ACT_LAYERS), ("gate_layer", GATE_LAYERS)):
                if given(getattr(self, name)):
                    resolve_layer(getattr(self, name), table, name)
        attention.check_options(self)  # the options against the attention

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
            if not given(value) or (f.name in ("attn", "position") and value == f.default):
                continue
            if f.name == "attn" and not isinstance(value, str):
                raise OptionError(f"attn={attention_label(value)} is a factory; only attention names "
                                  f"({sorted(ATTENTIONS)}) can be recorded")
            if isinstance(value, type):
                raise OptionError(f"{f.name}={value!r} is a class; only layer names (e.g. "
                                  f"{sorted(ACT_LAYERS if f.name == 'act_layer' else GATE_LAYERS)}) can be recorded")
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> "SEOptions":
        """A copy with some options changed (validated like the original). Options that took
        se's defaults stay "not given", so ``SEOptions().replace(attn="eca")`` is valid."""
        _check_names(changes, "SEOptions.replace")
        kept = {n: DEFAULTS[n] for n in getattr(self, "_defaulted", ()) if n not in changes}
        return dataclasses.replace(self, **kept, **changes)

    # -- use -----------------------------------------------------------------------------------
    def hidden(self, channels: int) -> int:
        """Hidden width of the SE block for ``channels`` channels."""
        return se_hidden_channels(channels, self.reduction, self.rd_divisor)

    def make_block(self, channels: int, spatial_dims: int, *, device: Any = None, dtype: Any = None,
                   residual: Optional[tuple[str, bool]] = None) -> SEBlock:
        """A new SE block for a site with ``channels`` channels; with ``residual`` (the activation
        after the add, whether the add was in place) an :class:`SEResidual` that does the add."""
        kwargs = dict(rd_channels=self.hidden(channels), act_layer=self.act_layer, gate_layer=self.gate_layer,
                      spatial_dims=spatial_dims, device=device, dtype=dtype, kernels=self.kernels)
        block = (SEBlock(channels, **kwargs) if residual is None
                 else SEResidual(channels, out_act=residual[0], add_in_place=residual[1], **kwargs))
        return block.init_identity_() if self.identity_init else block

    @property
    def fuses(self) -> bool:
        """Whether SE blocks take the residual add over (``fuse_residual``, for SE at ``"branch"``)."""
        return self.fuse_residual and isinstance(self.attn, str) and self.attn == "se" and self.position == "branch"

    def selects(self, block: str) -> bool:
        """Whether the include / exclude patterns let ``block`` get SE."""
        if self.include is not None and not any(fnmatch.fnmatchcase(block, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(block, p) for p in self.exclude)


def _check_layers(options: SEOptions) -> None:
    """Resolve the options' layers, so that a class that is not an activation or a gate
    (``act_layer=nn.Conv2d``, ``gate_layer=nn.Identity``) is refused before any analysis; the
    check is :mod:`se_inject.layers`'s, run by :func:`resolve_layer`."""
    resolve_layer(options.act_layer, ACT_LAYERS, "act_layer")
    resolve_layer(options.gate_layer, GATE_LAYERS, "gate_layer")


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


def _options_doc(indent: str) -> str:
    return f"\n{indent}".join(f"{f.name} (default {f.default!r}): {f.metadata['doc']}" for f in fields(SEOptions))


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
