"""Which attention module goes at a site: the attentions by name, how se_inject's options map onto
each one's arguments, exact identity init, and the check every module passes before anything
changes.

``attn="se"`` (the default) is se_inject's own :class:`~se_inject.modules.se_block.SEBlock`. Every other
name is the channel attention timm's ``timm.layers.create_attn`` builds by that name, built by
timm with its own defaults; a callable (a class or a function) is a *factory* called with the
channel count. timm's modules are 2-D only; the check at each site says so where a model is not.

se_inject's ``reduction``, ``rd_divisor``, ``act_layer`` and ``gate_layer`` become timm's
``rd_ratio = 1 / reduction``, ``rd_divisor``, ``act_layer`` and ``gate_layer``, and are passed only
when the user gave them: the defaults differ between attentions (gc: ``rd_ratio`` 1/8 and
``rd_divisor`` 1; ese: a hard-sigmoid gate; coord: Hardswish), and a value se_inject picked would
silently change the module. An option an attention does not use is an error, from a table kept by
hand (:data:`ATTENTIONS`), since timm's signatures accept options they ignore.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from timm.layers import create_attn, get_act_layer, make_divisible
from timm.layers.gather_excite import GatherExcite
from timm.layers.mlp import ConvMlp
from torch import nn

from ..errors import OptionError
from ..layers import check_gate_module
from .se_block import ACT_LAYERS, GATE_LAYERS, SEBlock, resolve_layer
from ..utils import describe_error

__all__ = ["ATTENTIONS", "INSERTED_MARK", "InsertedAttention", "Attention", "AttentionDefault", "GainGate", "attention_label", "se_defaults", "check_options",
           "build_module", "check_module", "identity_check", "hidden_width", "OPTIONS_PER_ATTENTION", "given"]

#: The options whose meaning depends on the attention (see the module docstring).
OPTIONS_PER_ATTENTION = ("reduction", "rd_divisor", "act_layer", "gate_layer")


class AttentionDefault:
    """The default of an option that depends on the attention: ``se_value`` for ``attn="se"``; for
    any other attention the option is not passed, so the module keeps its own default."""

    def __init__(self, name: str, se_value: Any) -> None:
        self.name, self.se_value = name, se_value

    def __repr__(self) -> str:
        return f"<{self.se_value!r} for se, else the attention's own>"

    def __reduce__(self) -> tuple:  # copies and pickles are the one default of that name
        return _default_named, (self.name,)


DEFAULTS = {name: AttentionDefault(name, value)
            for name, value in zip(OPTIONS_PER_ATTENTION, (16, 8, "relu", "sigmoid"))}


def _default_named(name: str) -> AttentionDefault:
    return DEFAULTS[name]


def given(value: Any) -> bool:
    """Whether an option holds a value the user gave (not an :class:`AttentionDefault`)."""
    return not isinstance(value, AttentionDefault)


#: The attribute se_inject sets on every attention module it inserts (SEBlock aside).
INSERTED_MARK = "_se_inject_attention"


class _MarkedMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, nn.Module) and bool(obj.__dict__.get(INSERTED_MARK))


class InsertedAttention(metaclass=_MarkedMeta):
    """``isinstance(m, InsertedAttention)``: ``m`` is an attention module se_inject inserted (a timm
    module or a user factory's), whatever its class. Such modules are channel attention and leaves:
    a second ``apply`` sees them and never traces into them."""


class GainGate(nn.Module):
    """``gain * gate(x)``. With a gate that maps 0 to 0.5 and a gain of 2, a zero pre-activation
    gives a weight of exactly 1: how zeroed timm attention starts as an identity. The gain is a
    buffer (``<site>.gate.gain``), so such weights cannot be loaded into gain-1 modules unnoticed."""

    def __init__(self, gate: Callable[[], nn.Module], gain: float = 2.0) -> None:
        super().__init__()
        self.gate = gate()
        check_gate_module(self.gate)  # gate(0) = 0.5 exactly, which the identity relies on
        self.register_buffer("gain", torch.tensor(float(gain), device="cpu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x) * self.gain


@dataclass(frozen=True)
class Attention:
    """An attention by name.

    Attributes:
        name: the name (timm's ``create_attn`` name).
        takes: which of :data:`OPTIONS_PER_ATTENTION` the module uses.
        build: ``build(channels, kwargs)`` returns the module, kwargs in timm's spelling.
        zero: submodules whose weight and bias are zeroed for identity init; None: no exact
            identity exists, ``no_identity`` says why.
        gain: identity init also needs a gain-2 gate (:class:`GainGate`) as ``gate_layer``.
        default_gate: the gate the module uses when none is given (wrapped for identity init).
        hidden_at: the submodule whose output width is the hidden width (``Site.hidden``).
    """

    name: str
    takes: frozenset[str]
    build: Callable[[int, dict[str, Any]], nn.Module]
    zero: Optional[tuple[str, ...]] = None
    gain: bool = True
    default_gate: str = "sigmoid"
    hidden_at: Optional[str] = None
    no_identity: str = ""


def _timm(name: str) -> Callable[[int, dict[str, Any]], nn.Module]:
    return lambda channels, kwargs: create_attn(name, channels, **kwargs)


def _gather_excite(channels: int, kwargs: dict[str, Any]) -> nn.Module:
    """timm's GatherExcite; timm 1.0.31 cannot build its MLP (gather_excite.py passes ``*dd``
    positionally to ConvMlp: "got multiple values for argument 'act_layer'"), so where that fails
    it is built without the MLP and given the ConvMlp its constructor means to make."""
    try:
        return create_attn("ge", channels, **kwargs)
    except TypeError as e:
        if "multiple values for argument 'act_layer'" not in str(e):
            raise
    defaults = inspect.signature(GatherExcite).parameters
    kwargs = dict(kwargs)
    rd_ratio = kwargs.pop("rd_ratio", defaults["rd_ratio"].default)
    rd_divisor = kwargs.pop("rd_divisor", defaults["rd_divisor"].default)
    act_layer = get_act_layer(kwargs.pop("act_layer", defaults["act_layer"].default))
    module = GatherExcite(channels, use_mlp=False, **kwargs)
    module.mlp = ConvMlp(channels, make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0),
                         act_layer=act_layer)
    return module


_SE_LIKE = frozenset(OPTIONS_PER_ATTENTION)
_GATE = frozenset({"gate_layer"})

#: The attentions ``attn=`` takes by name, with the options each uses and how it starts as an identity.
ATTENTIONS: dict[str, Attention] = {a.name: a for a in (
    Attention("se", _SE_LIKE, _timm("se"), hidden_at="fc1"),  # built as SEBlock, see build_module
    Attention("ese", _GATE, _timm("ese"), zero=("fc",), default_gate="hard_sigmoid"),
    Attention("eca", _GATE, _timm("eca"), zero=("conv",)),
    Attention("ecam", _SE_LIKE, _timm("ecam"), zero=("conv2",), hidden_at="conv"),
    Attention("ceca", _GATE, _timm("ceca"), zero=("conv",)),
    Attention("ge", _SE_LIKE, _gather_excite, zero=("mlp.fc2",), hidden_at="mlp.fc1"),
    Attention("gc", _SE_LIKE, _timm("gc"), zero=("mlp_scale.fc2",), hidden_at="mlp_scale.fc1"),
    Attention("gca", _SE_LIKE - _GATE, _timm("gca"), zero=("mlp_add.fc2",), gain=False, hidden_at="mlp_add.fc1"),
    Attention("cbam", _SE_LIKE, _timm("cbam"), zero=("channel.fc2", "spatial.conv.bn"), hidden_at="channel.fc1"),
    Attention("lcbam", _SE_LIKE - _GATE, _timm("lcbam"), hidden_at="channel.fc1",
              no_identity="its gates are sigmoids it does not let you replace (gate_layer is not used), so "
                          "no initialisation makes it an identity"),
    Attention("coord", _SE_LIKE, _timm("coord"), zero=("conv_h", "conv_w"), hidden_at="conv1"),
    Attention("scoord", _SE_LIKE, _timm("scoord"), zero=("fc_h", "fc_w"), hidden_at="fc1"),
    Attention("ela", frozenset({"act_layer", "gate_layer"}), _timm("ela"), zero=("norm_h", "norm_w")),
    Attention("strip", _GATE, _timm("strip"), zero=("conv_h", "conv_w")),
)}

#: Names timm's create_attn knows that are not add-on channel attention.
NOT_CHANNEL_ATTENTION = {
    "sk": "SelectiveKernel replaces a conv", "splat": "SplitAttn replaces a conv",
    "lambda": "LambdaLayer replaces a conv", "bottleneck": "BottleneckAttn replaces a conv",
    "halo": "HaloAttn replaces a conv", "nl": "NonLocalAttn is spatial self-attention",
    "bat": "BatNonLocalAttn is spatial self-attention",
}


def attention_label(attn: Any) -> str:
    """How plans and errors name an attention: its name, or a factory's qualified name."""
    if isinstance(attn, str):
        return attn
    return getattr(attn, "__qualname__", None) or type(attn).__name__


def _spec(attn: Any) -> Optional[Attention]:
    """The named attention, None for a factory; OptionError for anything else."""
    if isinstance(attn, str):
        if attn in ATTENTIONS:
            return ATTENTIONS[attn]
        if attn.lower() in NOT_CHANNEL_ATTENTION:
            raise OptionError(f"attn={attn!r} is not an add-on channel attention "
                              f"({NOT_CHANNEL_ATTENTION[attn.lower()]}); use one of {sorted(ATTENTIONS)}, or a "
                              f"factory such as attn=lambda c: timm.layers.create_attn({attn.lower()!r}, c)")
        hint = f" (names are lower case: {attn.lower()!r})" if attn.lower() in ATTENTIONS else ""
        raise OptionError(f"attn={attn!r} is not a known attention{hint}; use one of {sorted(ATTENTIONS)} "
                          f"or a factory (a callable taking the channel count and returning an nn.Module)")
    if isinstance(attn, nn.Module):
        raise OptionError(f"attn must be a name or a factory, got a module instance ({type(attn).__name__}); "
                          f"pass its class or a function building one per site, e.g. attn=lambda c: ...(c)")
    if callable(attn):
        return None
    raise OptionError(f"attn must be a name from {sorted(ATTENTIONS)} or a factory, got {attn!r}")


def se_defaults(options: Any) -> dict[str, Any]:
    """Check ``options.attn`` is an attention; for ``"se"``, the values of the options left at their
    :class:`AttentionDefault` (se_inject's defaults), for any other attention nothing."""
    _spec(options.attn)
    if isinstance(options.attn, str) and options.attn == "se":
        return {n: DEFAULTS[n].se_value for n in OPTIONS_PER_ATTENTION if not given(getattr(options, n))}
    return {}


def check_options(options: Any) -> None:
    """Check the other options against ``options.attn`` (once they are valid on their own).

    An option the attention does not use is an :class:`OptionError`, as is identity init where no
    exact identity exists; a named timm attention is built once at 64 channels (and made an
    identity, if asked) so that bad combinations fail here, before any work.
    """
    spec = _spec(options.attn)
    label = attention_label(options.attn)
    if isinstance(options.attn, str) and options.attn == "se":
        return
    for name in OPTIONS_PER_ATTENTION:
        if not given(getattr(options, name)):
            continue
        if spec is None:
            raise OptionError(f"attn={label} is a factory, which builds its own module: {name} is not used; "
                              f"configure the factory instead")
        if name not in spec.takes:
            uses = ", ".join(sorted(spec.takes)) or "none of them"
            raise OptionError(f"attn={label!r} does not use {name} (of reduction, rd_divisor, act_layer and "
                              f"gate_layer it uses {uses}); leave {name} out")
    if given(options.rd_divisor) and options.rd_divisor is None:
        raise OptionError(f"rd_divisor=None (the paper's C // r) is for attn='se' only; give attn={label!r} "
                          f"a divisor (1: no rounding)")
    if spec is None:
        return
    if options.identity_init and spec.zero is None:
        raise OptionError(f"identity_init is not possible for attn={label!r}: {spec.no_identity}")
    try:
        with torch.random.fork_rng(devices=[]):  # a trial: it must not draw from the caller's RNG
            module = build_module(options, 64, 2)
    except OptionError:
        raise
    except Exception as e:
        raise OptionError(f"attn={label!r} cannot be built with these options: {describe_error(e)}") from e
    check_module(module, label, "a 64-channel test input", (2, 64, 8, 8), torch.float32, identity_check(options))


def identity_check(options: Any) -> Optional[str]:
    """How :func:`check_module` checks identity init: ``"exact"`` for named attentions (timm's are
    zeroed, se_inject's SE cancels exactly: the output is the input bit for bit), ``"close"`` for
    factories, None without it."""
    if not options.identity_init:
        return None
    return "exact" if isinstance(options.attn, str) else "close"


def _timm_kwargs(options: Any, spec: Attention) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if given(options.reduction):
        kwargs["rd_ratio"] = 1.0 / options.reduction
    if given(options.rd_divisor):
        kwargs["rd_divisor"] = options.rd_divisor
    if given(options.act_layer):
        kwargs["act_layer"] = resolve_layer(options.act_layer, ACT_LAYERS, "act_layer")
    gate = resolve_layer(options.gate_layer, GATE_LAYERS, "gate_layer") if given(options.gate_layer) else None
    if options.identity_init and spec.gain:
        kwargs["gate_layer"] = functools.partial(GainGate, gate or get_act_layer(spec.default_gate))
    elif gate is not None:
        kwargs["gate_layer"] = gate
    return kwargs


@torch.no_grad()
def _zero(module: nn.Module, paths: tuple[str, ...]) -> None:
    for path in paths:
        sub = module.get_submodule(path)
        for name in ("weight", "bias"):
            p = getattr(sub, name, None)
            if isinstance(p, torch.Tensor):
                p.zero_()


def build_module(options: Any, channels: int, spatial_dims: int, *, device: Any = None, dtype: Any = None,
                 residual: Optional[tuple[str, bool]] = None) -> nn.Module:
    """A new attention module for a site with ``channels`` channels, made an identity if asked.

    ``"se"`` is :meth:`SEOptions.make_block` (with ``residual``, an SE block that does the add
    after it, see :class:`~se_inject.modules.se_block.SEResidual`); a timm attention or a factory's module is moved to
    ``device`` and ``dtype`` and marked (:data:`INSERTED_MARK`) so that a later
    ``apply`` sees it as attention.
    """
    if options.attn == "se":
        return options.make_block(channels, spatial_dims, device=device, dtype=dtype, residual=residual)
    spec = _spec(options.attn)
    label = attention_label(options.attn)
    if spec is None:
        module = options.attn(channels)
        if not isinstance(module, nn.Module):
            raise OptionError(f"attn={label} returned {type(module).__name__} for {channels} channels, not an nn.Module")
    else:
        module = spec.build(channels, _timm_kwargs(options, spec))
    to = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    module = module.to(**to) if to else module
    if options.identity_init:
        if spec is not None:
            _zero(module, spec.zero or ())
        elif callable(getattr(module, "init_identity_", None)):
            module.init_identity_()
        else:
            raise OptionError(f"identity_init: attn={label} is a factory whose module ({type(module).__name__}) "
                              f"has no init_identity_() method; make the factory return an identity")
    if not isinstance(module, SEBlock):
        module.__dict__[INSERTED_MARK] = label
    return module


def check_module(module: nn.Module, label: str, site: str, shape: tuple[int, ...], dtype: torch.dtype,
                 identity: Optional[str], device: Any = None) -> None:
    """Run ``module`` (in eval mode, without gradients) on a random tensor of the site's shape and
    dtype: it must run and return that shape and dtype, and equal its input when identity init was
    asked for (exactly for timm attentions, which are zeroed; within float rounding otherwise)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    training = module.training
    try:
        with torch.no_grad():
            y = module.eval()(x)
    except Exception as e:
        raise OptionError(f"attn={label} does not run at {site} on its {list(shape)} {dtype} input: "
                          f"{describe_error(e)}" + (" (timm's attention modules take (N, C, H, W) inputs only)"
                                                    if len(shape) != 4 and label in ATTENTIONS else "")) from e
    finally:
        module.train(training)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
        got = f"{list(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise OptionError(f"attn={label} at {site} maps its {list(shape)} {dtype} input to {got}; an attention "
                          f"module must return the shape and dtype it is given")
    if identity is not None:
        close = torch.equal(y, x) if identity == "exact" else torch.allclose(y, x, rtol=1e-3, atol=1e-5)
        if not close:
            raise OptionError(f"identity_init: attn={label} at {site} does not return its input "
                              f"(max |out - in| = {float((y - x).abs().max()):.3g})")


def hidden_width(module: nn.Module, attn: Any) -> Optional[int]:
    """The hidden (excitation) width of an attention module, or None where it has none."""
    if isinstance(module, SEBlock):
        return module.rd_channels
    spec = ATTENTIONS.get(attn) if isinstance(attn, str) else None
    if spec is None or spec.hidden_at is None:
        return None
    layer = module.get_submodule(spec.hidden_at)
    width = getattr(layer, "out_channels", None) or getattr(layer, "out_features", None)
    return int(width) if width is not None else None
