"""From the options to the module at a site: the one builder, and the one check of the options
against the attention they name.

:func:`check_options` runs once per call, before any analysis (:func:`se_inject.api.checked_options`):
what :class:`~se_inject.options.SEOptions` cannot know without the modules (the attention is
known, it uses the options given, it can start as an identity, timm builds it with them).
:func:`build_module` builds the module of a site; :func:`check_module` runs it once on a tensor of
the site's shape, for every site, before the model changes (:mod:`se_inject.rewrite.site_modules`).

The attention's own defaults are resolved here: se_inject's ``reduction``, ``rd_divisor``,
``act_layer`` and ``gate_layer`` become timm's ``rd_ratio = 1 / reduction``, ``rd_divisor``,
``act_layer`` and ``gate_layer``, and are passed only when the user gave them
(:meth:`SEOptions.given`): the defaults differ between attentions (gc: ``rd_ratio`` 1/8 and
``rd_divisor`` 1; ese: a hard-sigmoid gate; coord: Hardswish), and a value se_inject picked would
silently change the module. For ``attn="se"`` they reach :class:`SEBlock` as its hidden width
(:func:`~se_inject.modules.se_block.se_hidden_channels` of ``reduction`` and ``rd_divisor``). An
option an attention does not use is an error, from the table kept by hand
(:data:`~se_inject.modules.attentions.ATTENTIONS`), since timm's signatures accept options they
ignore.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from timm.layers import get_act_layer
from torch import nn

from ..errors import OptionError
from ..layers import ACT_LAYERS, GATE_LAYERS, resolve_layer
from ..options import ATTENTION_OPTIONS, SEOptions, attention_label
from ..utils import describe_error
from .attentions import ATTENTIONS, INSERTED_MARK, Attention, GainGate, spec_of, zero_for_identity
from .se_block import SEBlock, SEResidual, se_hidden_channels

__all__ = ["check_options", "build_module", "check_module", "identity_check"]


def check_options(options: SEOptions) -> None:
    """Check the options against the attention they name: the one check that needs the modules,
    run once per call of ``apply`` / ``inject`` / ``find_sites`` / ``bench`` and per recipe read,
    before any analysis (:func:`se_inject.api.checked_options`). Each value was checked on its own
    when the options were built.

    The attention must be known (a name of :data:`~se_inject.modules.attentions.ATTENTIONS`, or a
    factory); an option it does not use is an :class:`OptionError`, as is identity init where no
    exact identity exists; a named timm attention is built once at 64 channels (and made an
    identity, if asked) so that bad combinations fail here, before any work. ``attn="se"`` needs
    nothing more: its layers were checked by behaviour when the options were built.
    """
    spec = spec_of(options.attn)
    label = attention_label(options.attn)
    if options.is_se:
        return
    for name in ATTENTION_OPTIONS:
        if not options.given(name):
            continue
        if spec is None:
            raise OptionError(f"attn={label} is a factory, which builds its own module: {name} is not used; "
                              f"configure the factory instead")
        if name not in spec.takes:
            uses = ", ".join(sorted(spec.takes)) or "none of them"
            raise OptionError(f"attn={label!r} does not use {name} (of reduction, rd_divisor, act_layer and "
                              f"gate_layer it uses {uses}); leave {name} out")
    if options.given("rd_divisor") and options.rd_divisor is None:
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


def identity_check(options: SEOptions) -> Optional[str]:
    """How :func:`check_module` checks identity init: ``"exact"`` for named attentions (timm's are
    zeroed, se_inject's SE cancels exactly: the output is the input bit for bit), ``"close"`` for
    factories, None without it."""
    if not options.identity_init:
        return None
    return "exact" if isinstance(options.attn, str) else "close"


def _timm_kwargs(options: SEOptions, spec: Attention) -> dict[str, Any]:
    """The options given, in timm's spelling (``rd_ratio = 1 / reduction``: timm's attentions take a
    ratio), identity init's gain-2 gate where the attention needs one."""
    kwargs: dict[str, Any] = {}
    if options.given("reduction"):
        kwargs["rd_ratio"] = 1.0 / options.reduction
    if options.given("rd_divisor"):
        kwargs["rd_divisor"] = options.rd_divisor
    if options.given("act_layer"):
        kwargs["act_layer"] = resolve_layer(options.act_layer, ACT_LAYERS, "act_layer")
    gate = resolve_layer(options.gate_layer, GATE_LAYERS, "gate_layer") if options.given("gate_layer") else None
    if options.identity_init and spec.gain:
        kwargs["gate_layer"] = functools.partial(GainGate, gate or get_act_layer(spec.default_gate))
    elif gate is not None:
        kwargs["gate_layer"] = gate
    return kwargs


def _se_block(options: SEOptions, channels: int, spatial_dims: int, device: Any, dtype: Any,
              residual: Optional[tuple[str, bool]]) -> SEBlock:
    """se_inject's SE block for a site: its hidden width from ``reduction`` and ``rd_divisor``
    (:func:`~se_inject.modules.se_block.se_hidden_channels`); with ``residual`` (the activation
    after the add, whether the add was in place) an :class:`SEResidual` that does the add."""
    kwargs = dict(rd_channels=se_hidden_channels(channels, options.reduction, options.rd_divisor),
                  act_layer=options.act_layer, gate_layer=options.gate_layer, spatial_dims=spatial_dims,
                  device=device, dtype=dtype, kernels=options.kernels)
    block = (SEBlock(channels, **kwargs) if residual is None
             else SEResidual(channels, out_act=residual[0], add_in_place=residual[1], **kwargs))
    return block.init_identity_() if options.identity_init else block


def build_module(options: SEOptions, channels: int, spatial_dims: int, *, device: Any = None, dtype: Any = None,
                 residual: Optional[tuple[str, bool]] = None) -> nn.Module:
    """A new attention module for a site with ``channels`` channels, made an identity if asked:
    the one builder from the options to a module.

    ``"se"`` is an :class:`~se_inject.modules.se_block.SEBlock` (with ``residual``, an
    :class:`~se_inject.modules.se_block.SEResidual` that does the add after it); a timm attention
    or a factory's module is moved to ``device`` and ``dtype`` and marked
    (:data:`~se_inject.modules.attentions.INSERTED_MARK`) so that a later ``apply`` sees it as
    attention.
    """
    if options.is_se:
        return _se_block(options, channels, spatial_dims, device, dtype, residual)
    spec = spec_of(options.attn)
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
            zero_for_identity(module, spec)
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
