"""Squeeze-and-Excitation block for 1-D, 2-D and 3-D feature maps.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

The block squeezes each channel by global average pooling over every spatial dim, excites with a
small MLP written as two 1x1 convolutions with bias (``fc1``: C -> hidden, ``act``, ``fc2``:
hidden -> C, ``gate``), and reweights the channels with the gate. Submodule names and parameter
shapes are those of timm's ``SEModule``, so an SE block inserted at ``layer1.0.se`` has the same
state_dict keys and shapes as timm's hand-written SE-ResNets.

Where se_inject puts the block right before a residual add, it uses :class:`SEResidual`, the same
block that also does the add and the activation that reads only the add: ``out_act(SE(x) +
shortcut)``. On CUDA that whole tail runs as one fused op (:mod:`se_inject.fused`); elsewhere,
under TorchScript and when fx traces the block, it runs as plain torch ops with the same results.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Type, Union

import torch
from timm.layers import make_divisible
from torch import fx, nn
from torch.nn.modules import module as _module_module  # where torch keeps its global module hooks
from torch.nn import functional as F

from ..errors import OptionError
from ..layers import ACT_LAYERS, GATE_LAYERS, OUT_ACTS, alive_point, layer_name, new_layer, resolve_layer
from ..options import check_kernels

__all__ = ["SEBlock", "SEResidual", "se_hidden_channels", "set_kernels"]

_CONV_BY_DIMS: dict[int, Type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_FUSED: Any = None  # se_inject.fused once loaded (it imports Triton: seconds, so only on CUDA)


def _load_fused() -> Any:
    global _FUSED
    if _FUSED is None:
        _FUSED = importlib.import_module("se_inject.fused")
    return _FUSED


def se_hidden_channels(channels: int, reduction: float = 16, divisor: Optional[int] = 8) -> int:
    """Width of the excitation MLP for ``channels`` input channels, never above ``channels``.

    With a ``divisor`` (default 8) this is timm's rule, ``make_divisible(channels / reduction,
    divisor, round_limit=0)``: 64 -> 8, 256 -> 16, 2048 -> 128, never below ``divisor``. With
    ``divisor=None`` it is the paper's and the seed notebook's plain ``max(1, channels //
    reduction)``. A divisor larger than ``channels`` would make the "reduction" an expansion, so
    the width is capped at ``channels``.

    >>> se_hidden_channels(64), se_hidden_channels(256), se_hidden_channels(64, divisor=None)
    (8, 16, 4)
    >>> se_hidden_channels(4, 16, divisor=8)
    4
    """
    if divisor is None:
        return max(1, int(channels // reduction))
    return min(channels, int(make_divisible(channels / reduction, divisor, round_limit=0.0)))


class SEBlock(nn.Module):
    """Squeeze-and-Excitation over every spatial dim of an (N, C, *spatial) tensor.

    Args:
        channels: number of input (and output) channels C.
        rd_ratio: reduction ratio as a fraction (1/16 gives C/16 hidden channels before rounding).
        rd_channels: hidden width; overrides ``rd_ratio`` and ``rd_divisor`` when given.
        rd_divisor: round the hidden width to a multiple of this (timm's rule); ``None`` gives the
            paper's ``max(1, C // r)``. See :func:`se_hidden_channels`.
        act_layer: activation between ``fc1`` and ``fc2`` (a class or a name in ``layers.ACT_LAYERS``).
        gate_layer: gate producing the channel weights (a class or a name in ``GATE_LAYERS``).
        spatial_dims: 1, 2 or 3 for (N, C, L), (N, C, H, W) or (N, C, T, H, W) inputs.
        gain: constant the gate is multiplied by (2.0 after :meth:`init_identity_`); see
            :meth:`set_gain_`.
        kernels: one of :data:`~se_inject.options.KERNELS`: how the block runs (see :func:`set_kernels`).

    Example:
        >>> se = SEBlock(64)
        >>> se(torch.randn(2, 64, 56, 56)).shape
        torch.Size([2, 64, 56, 56])
        >>> sorted(k for k in se.state_dict())
        ['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight']
    """

    _act_module = None  # the model's activation module that an SEResidual stands for, if any

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: Optional[int] = None,
        rd_divisor: Optional[int] = 8,
        act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
        gate_layer: Union[str, Type[nn.Module]] = nn.Sigmoid,
        spatial_dims: int = 2,
        gain: float = 1.0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        kernels: str = "auto",
    ) -> None:
        super().__init__()
        if spatial_dims not in _CONV_BY_DIMS:
            raise OptionError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        rd_channels = rd_channels or se_hidden_channels(channels, 1.0 / rd_ratio, rd_divisor)
        conv = _CONV_BY_DIMS[spatial_dims]
        dd = {"device": device, "dtype": dtype}
        self.channels, self.rd_channels, self.spatial_dims = channels, rd_channels, spatial_dims
        self.squeeze_dims: list[int] = list(range(2, 2 + spatial_dims))
        self.fc1 = conv(channels, rd_channels, kernel_size=1, bias=True, **dd)
        act_cls = resolve_layer(act_layer, ACT_LAYERS, "act_layer")
        self.act = new_layer(act_cls)
        self.fc2 = conv(rd_channels, channels, kernel_size=1, bias=True, **dd)
        gate_cls = resolve_layer(gate_layer, GATE_LAYERS, "gate_layer")
        self.gate = gate_cls()
        self.act_name = layer_name(act_cls, ACT_LAYERS)
        self.gate_name = layer_name(gate_cls, GATE_LAYERS)
        self.out_act = "none"
        self.add_in_place = False
        self.kernels = "auto"
        self.set_kernels_(kernels)
        self.set_gain_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, None)

    def _forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor]) -> torch.Tensor:
        if not torch.jit.is_scripting():  # (TorchScript compiles nothing under this test)
            if not self._act_as_module(x):
                fused = self._fused(x, shortcut)
                if fused is not None:
                    return fused
        return self._plain(x, shortcut)

    @torch.jit.unused
    def _act_as_module(self, x: torch.Tensor) -> bool:
        """Whether the activation after the add must run as the model's own module (see
        :meth:`SEResidual.stand_for_activation_`): while fx traces the block, so that the trace
        holds the module's call under its own path, and while that module has hooks (its own or
        global ones), so that they fire as in the original model."""
        module = self._act_module
        if module is None:
            return False
        return isinstance(x, fx.Proxy) or any(
            bool(hooks) for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                                      module._backward_pre_hooks, _module_module._global_forward_hooks,
                                      _module_module._global_forward_pre_hooks,
                                      _module_module._global_backward_hooks,
                                      _module_module._global_backward_pre_hooks))

    @torch.jit.unused
    def _run_act_module(self, y: torch.Tensor) -> torch.Tensor:
        return self._act_module(y)

    def gate_of(self, x: torch.Tensor) -> torch.Tensor:
        """The channel weights, (N, C), that the block multiplies ``x`` by."""
        # Squeeze: one value per (sample, channel). The excitation runs as F.linear on the 1x1
        # conv weights viewed as matrices: the same maths and state_dict as 1x1 convolutions,
        # without the conv dispatch on a (N, C, 1, 1) tensor.
        s = x.mean(self.squeeze_dims)
        s = F.linear(s, self.fc1.weight.flatten(1), self.fc1.bias)
        s = self.act(s)
        s = F.linear(s, self.fc2.weight.flatten(1), self.fc2.bias)
        g = self.gate(s)
        if self.has_gain:
            g = g * self.gain
        return g

    def _plain(self, x: torch.Tensor, shortcut: Optional[torch.Tensor]) -> torch.Tensor:
        g = self.gate_of(x)
        for _ in range(self.spatial_dims):
            g = g.unsqueeze(-1)
        if shortcut is None:
            y = x * g
        elif torch.compiler.is_compiling():
            # Inductor fuses the tail into one kernel however it is written, but plans its buffers
            # from the formulation. Written as the original add (the branch's product first), it
            # reuses buffers as it does for the original model; addcmul(shortcut, ...) made it
            # write into the shortcut's buffer, with ~45% more page faults per call and ~10% more
            # time for resnet50 on the CPU (benchmarks/README.md, "Compiled SE on the CPU").
            y = x * g
            y = y.add_(shortcut) if self.add_in_place else y + shortcut
        else:  # eager: one pass and one new tensor instead of two (on the CPU the extra one cost ~15%)
            y = torch.addcmul(shortcut, x, g)
        if shortcut is not None and self.add_in_place:
            y = y.to(x.dtype)  # `x += shortcut` keeps x's dtype (a no-op where they agree)
        return self._activate(y)

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        """The activation after the add (``out_act``), on this block's own new tensor ``y``. The
        names of :data:`~se_inject.layers.OUT_ACTS` are written out here because TorchScript
        compiles this method, and it cannot call a function from a table."""
        if not torch.jit.is_scripting():
            if self.out_act != "none" and self._act_as_module(y):
                return self._run_act_module(y)
        if self.out_act == "relu":
            return torch.relu_(y)  # neither op that made y saves it
        if self.out_act == "silu":
            return F.silu(y)
        return y

    @torch.jit.unused
    def _fused(self, x: torch.Tensor, shortcut: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The fused op's result, or None where the plain path runs: ``se_inject.fused.use_fused``
        decides (see :data:`~se_inject.options.KERNELS`). The fused package is imported on the first eager call
        with a CUDA tensor, or before any call when the block is put on (or built on) CUDA."""
        if not isinstance(x, torch.Tensor):  # an fx Proxy: se_inject is tracing the block
            return None
        fused = _FUSED
        if fused is None:
            if self.kernels == "plain" or not x.is_cuda or torch.compiler.is_compiling():
                return None  # no Triton import for tensors it cannot take, nor while tracing
            fused = _load_fused()
        if not fused.use_fused(self.kernels, x, shortcut, self.act_name, self.gate_name, self.out_act):
            return None
        return fused.se_residual(x, shortcut, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                 self.gain if self.has_gain else None, self.act_name, self.gate_name, self.out_act,
                                 in_place=self.add_in_place)

    def _apply(self, fn: Any, recurse: bool = True) -> "SEBlock":
        module = super()._apply(fn, recurse)
        self._load_fused_if_on_cuda()
        return module

    def _load_fused_if_on_cuda(self) -> None:
        # torch.compile cannot import while it traces, so a block that may run the fused op on CUDA
        # imports it as soon as its parameters are on CUDA: built there, moved there, or switched
        # to kernels that use it
        if self.kernels != "plain" and self.fc1.weight.is_cuda:
            _load_fused()

    def set_kernels_(self, kernels: str) -> "SEBlock":
        """Choose how the block runs: one of :data:`~se_inject.options.KERNELS`."""
        check_kernels(kernels)
        self._set_kernels(kernels)
        return self

    def _set_kernels(self, kernels: str) -> None:
        self.kernels = kernels
        self._load_fused_if_on_cuda()

    def set_gain_(self, gain: float) -> "SEBlock":
        """Set the constant the gate is multiplied by.

        A gain of 1 is a plain attribute, so the state_dict is exactly timm's ``SEModule``'s.
        Any other gain is a buffer named ``gain``: a state_dict of such a block does not load
        into a gain-1 block (or the reverse) without an error, because the two compute different
        functions with the same weights.
        """
        gain = float(gain)
        if "gain" in self._buffers:
            del self._buffers["gain"]
        self.has_gain = gain != 1.0
        if not self.has_gain:
            self.__dict__["gain"] = 1.0
        else:
            self.__dict__.pop("gain", None)
            self.register_buffer("gain", torch.tensor(gain, device=self.fc1.weight.device))
        return self

    @torch.no_grad()
    def init_identity_(self) -> "SEBlock":
        """Make the block an exact identity at initialisation, at any input scale, in any dtype.

        The gate is multiplied by a gain of 2 (as NFNets do), so a gate pre-activation of 0 gives
        ``2 * gate(0) = 2 * 0.5 = 1`` and the block returns its input bit for bit. The
        pre-activation ``fc2(act(fc1(s)))`` is made exactly 0 for *every* squeeze ``s``:

        * ``fc2``'s columns are zero except the last one, and its bias is zero, so every hidden
          unit but the last adds ``0 * act(h) = 0``, exactly;
        * the last hidden unit is made *alive for every input*: its ``fc1`` row is zero and its bias
          is a point ``z`` where the activation's value is exact (:func:`~se_inject.layers.
          alive_point`): ``z = 1`` where ``act(1) = 1`` (ReLU, ReLU6, ELU, LeakyReLU), and then
          ``fc2``'s bias is minus that column, so the unit adds ``w * 1 - w = 0``; ``z = 0`` where
          ``act(0) = 0`` (SiLU, GELU, Hardswish, Mish, Tanh), and the unit adds ``w * 0 = 0``. Its
          ``fc2`` column keeps its random values, rounded to bfloat16 so that ``w * 1`` is exact
          wherever a matmul rounds its inputs (TF32, bfloat16, float16).

        So the sum is a sum of exact zeros and of ``w`` and ``-w``: 0 in every summation order,
        with or without FMA, on every device and in every dtype, however large the squeezed means
        (mirrored hidden units, which this replaces, cancelled only up to rounding inside one matrix
        product: 5e-5 off at means of 1e4). An activation with neither point (Sigmoid, Softplus)
        gets a zero ``fc2`` and no alive unit.

        Gradients. Wherever the loss depends on the gate (``dL/dgate != 0``; it does not where SE's
        input is all zero, e.g. after a zero-initialised last BatchNorm), on the *first* backward
        pass:

        * ``fc2.bias`` gets ``dL/dpre``;
        * with an activation whose alive point is 1 (ReLU): ``fc1.weight``, ``fc1.bias`` (the
          alive unit's row, through its non-zero ``fc2`` column and ``act'(1) != 0``) and
          ``fc2.weight`` (the alive unit's column, ``dL/dpre * act(1)``) get non-zero gradients
          too, even when every other hidden ReLU is dead for the batch;
        * with an alive point of 0 (SiLU, GELU): ``fc1`` gets one through the alive unit
          (``act'(0) != 0``), and ``fc2.weight`` through the other hidden units, whose activations
          are not zero; with a hidden width of 1 there are none, and ``fc2.weight``'s first
          gradient comes on the second step, once ``fc1`` has moved the unit off 0;
        * without an alive point: ``fc2.weight`` from the first step, ``fc1`` from the second (once
          ``fc2`` is no longer zero).

        The other hidden units' ``fc1`` rows get gradients once their ``fc2`` columns have moved
        off zero (from the second step), like any zero-initialised last layer. Outputs equal the
        input in train and eval mode.

        Returns:
            ``self``, for chaining.

        Raises:
            OptionError: the block is not an exact identity afterwards (a gate or activation that
                computes something else on this device or dtype than on the CPU probes).
        """
        last = self.rd_channels - 1
        w1, b1 = self.fc1.weight, self.fc1.bias
        w2, b2 = self.fc2.weight, self.fc2.bias
        point = alive_point(type(self.act))
        w2[:, :last] = 0.0
        b2.zero_()
        if point is None:
            w2.zero_()
        else:
            w1[last] = 0.0
            b1[last] = point
            if point != 0.0:  # act(z) = z = 1: the unit adds w * 1, which the bias takes back
                w2[:, last] = w2[:, last].to(torch.bfloat16).to(w2.dtype)
                b2.copy_(-w2[:, last].flatten())
        self.set_gain_(2.0)
        self._check_identity()
        return self

    def _check_identity(self) -> None:
        """Raise an OptionError unless the gate is exactly 1 on a probe input, on the block's own
        device and dtype (meta blocks are not checked)."""
        w = self.fc1.weight
        if w.device.type == "meta":
            return
        x = torch.randn((2, self.channels) + (3,) * self.spatial_dims, device="cpu",
                        generator=torch.Generator(device="cpu").manual_seed(0)).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            g = self.gate_of(x)
        if not torch.equal(g, torch.ones_like(g)):
            raise OptionError(f"identity init is not exact with act_layer={type(self.act).__name__} and "
                              f"gate_layer={type(self.gate).__name__} on {w.device} {w.dtype} (the gate is off 1 by "
                              f"up to {float((g - 1).abs().max()):.3g}); use an activation and a gate such as "
                              f"'relu' and 'sigmoid'")

    def extra_repr(self) -> str:
        parts = [f"gain={float(self.gain)}"] if self.has_gain else []
        parts += [f"out_act={self.out_act!r}"] if self.out_act != "none" else []
        return ", ".join(parts)


class SEResidual(SEBlock):
    """An SE block that also does the residual add after it, and the activation after the add:
    ``forward(x, shortcut) = out_act(SE(x) + shortcut)``. Same parameters and state_dict as
    :class:`SEBlock`; se_inject uses it where SE sits right before the add.

    Args:
        out_act: the activation after the add, one of :data:`~se_inject.layers.OUT_ACTS`.
        add_in_place: the add was written in place (``x += shortcut``), so the result keeps x's
            dtype (under autocast the shortcut may be wider).
        *args, **kwargs: those of :class:`SEBlock`.

    Example:
        >>> se = SEResidual(64, out_act="relu")
        >>> x = torch.randn(2, 64, 8, 8)
        >>> bool((se(x, x) >= 0).all()), sorted(se.state_dict()) == sorted(SEBlock(64).state_dict())
        (True, True)
    """

    def __init__(self, *args: Any, out_act: str = "none", add_in_place: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if out_act not in OUT_ACTS:
            raise OptionError(f"out_act must be one of {list(OUT_ACTS)}, got {out_act!r}")
        self.out_act, self.add_in_place = out_act, add_in_place

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self._forward(x, shortcut)

    def stand_for_activation_(self, module: nn.Module) -> "SEResidual":
        """Compute ``out_act`` for ``module``, the model's own activation module after the add
        (``layer1.0.act2``), which the rewritten block no longer calls itself.

        The block keeps a reference to it, not a child (it stays where it is, so state_dict keys
        and module paths do not change): where the fused op or plain ops compute the activation,
        they do so by name; while fx traces the block, and while the module has hooks, the block
        calls the module instead, so a trace (``create_feature_extractor(model,
        return_nodes=["layer1.0.act2"])``) holds it under its own path and its hooks fire as in the
        original model. ``copy.deepcopy`` and pickling keep the two pointing at one module.
        """
        if self.out_act == "none":
            raise OptionError("stand_for_activation_ is for an SEResidual that computes the activation after its "
                              "add (out_act='relu' or 'silu'); this one has out_act='none'")
        self.__dict__["_act_module"] = module  # not nn.Module.__setattr__: not a child
        return self


def set_kernels(model: nn.Module, kernels: str) -> nn.Module:
    """Choose how every SE block in ``model`` runs: one of :data:`~se_inject.options.KERNELS` ("auto", "plain",
    "fused"). Returns ``model``.

    >>> model = set_kernels(nn.Sequential(SEBlock(8)), "plain")
    >>> model[0].kernels
    'plain'
    """
    check_kernels(kernels)
    for m in model.modules():
        if isinstance(m, SEBlock):
            m._set_kernels(kernels)
    return model

