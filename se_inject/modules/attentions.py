"""The attentions ``attn=`` takes by name, and what se_inject knows about each.

``attn="se"`` (the default) is se_inject's own :class:`~se_inject.modules.se_block.SEBlock`. Every
other name is the channel attention timm's ``timm.layers.create_attn`` builds by that name, built
by timm with its own defaults; a callable (a class or a function) is a *factory* called with the
channel count. timm's modules are 2-D only; the check at each site says so where a model is not.

:data:`ATTENTIONS` is the table, kept by hand since timm's signatures accept options they ignore:
for each name, which of se_inject's options it uses, how it starts as an exact identity (the
submodules to zero, :func:`zero_for_identity`, and a gain-2 gate, :class:`GainGate`) and where its
hidden width is (:func:`hidden_width`). Every module se_inject inserts that is not an
:class:`SEBlock` carries :data:`INSERTED_MARK` (:class:`InsertedAttention` matches it). How the
options become a module is :mod:`se_inject.modules.build`.
"""

from __future__ import annotations

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
from ..options import ATTENTION_OPTIONS
from .se_block import SEBlock

__all__ = ["ATTENTIONS", "NOT_CHANNEL_ATTENTION", "Attention", "GainGate", "INSERTED_MARK", "InsertedAttention",
           "spec_of", "zero_for_identity", "hidden_width"]

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
        takes: which of :data:`~se_inject.options.ATTENTION_OPTIONS` the module uses.
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


_SE_LIKE = frozenset(ATTENTION_OPTIONS)
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


def spec_of(attn: Any) -> Optional[Attention]:
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


@torch.no_grad()
def zero_for_identity(module: nn.Module, spec: Attention) -> None:
    """Make a timm attention an identity: zero the weights and biases of ``spec.zero``'s submodules."""
    for path in spec.zero or ():
        sub = module.get_submodule(path)
        for name in ("weight", "bias"):
            p = getattr(sub, name, None)
            if isinstance(p, torch.Tensor):
                p.zero_()


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
