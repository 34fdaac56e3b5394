"""Squeeze-and-Excitation block for 1-D, 2-D and 3-D feature maps.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

The block squeezes each channel by global average pooling over every spatial dim, excites with a
small MLP written as two 1x1 convolutions with bias (``fc1``: C -> hidden, ``act``, ``fc2``:
hidden -> C, ``gate``), and reweights the channels with the gate. Submodule names and parameter
shapes are those of timm's ``SEModule``, so an SE block inserted at ``layer1.0.se`` has the same
state_dict keys and shapes as timm's hand-written SE-ResNets.
"""

from __future__ import annotations

from typing import Optional, Type, Union

import torch
from timm.layers import make_divisible
from torch import nn
from torch.nn import functional as F

from .errors import OptionError

__all__ = ["SEBlock", "se_hidden_channels", "ACT_LAYERS", "GATE_LAYERS", "resolve_layer"]

#: Activations accepted by name for the excitation MLP (``act_layer``).
ACT_LAYERS: dict[str, Type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "hard_swish": nn.Hardswish,
    "mish": nn.Mish,
}

#: Gates accepted by name (``gate_layer``); each maps 0 to 0.5, which identity init relies on.
GATE_LAYERS: dict[str, Type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": nn.Hardsigmoid,
}

_CONV_BY_DIMS: dict[int, Type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def resolve_layer(
    layer: Union[str, Type[nn.Module]], registry: dict[str, Type[nn.Module]], option: str
) -> Type[nn.Module]:
    """Return the module class named by ``layer`` in ``registry``, or ``layer`` itself if a class.

    Raises:
        OptionError: ``layer`` is an unknown name or not an ``nn.Module`` subclass; the message
            lists the valid names.
    """
    if isinstance(layer, str):
        try:
            return registry[layer.lower()]
        except KeyError:
            raise OptionError(
                f"{option}={layer!r} is not a known name; use one of {sorted(registry)} "
                f"or pass an nn.Module class"
            ) from None
    if isinstance(layer, type) and issubclass(layer, nn.Module):
        return layer
    raise OptionError(f"{option} must be a name from {sorted(registry)} or an nn.Module class, "
                      f"got {layer!r}")


def se_hidden_channels(channels: int, reduction: int = 16, divisor: Optional[int] = 8) -> int:
    """Width of the excitation MLP for ``channels`` input channels.

    With a ``divisor`` (default 8) this is timm's rule, ``make_divisible(channels / reduction,
    divisor, round_limit=0)``: 64 -> 8, 256 -> 16, 2048 -> 128, never below ``divisor``. With
    ``divisor=None`` it is the paper's and the seed notebook's plain ``max(1, channels //
    reduction)``.

    >>> se_hidden_channels(64), se_hidden_channels(256), se_hidden_channels(64, divisor=None)
    (8, 16, 4)
    """
    if divisor is None:
        return max(1, channels // reduction)
    return int(make_divisible(channels / reduction, divisor, round_limit=0.0))


class SEBlock(nn.Module):
    """Squeeze-and-Excitation over every spatial dim of an (N, C, *spatial) tensor.

    Args:
        channels: number of input (and output) channels C.
        rd_ratio: reduction ratio as a fraction (1/16 gives C/16 hidden channels before rounding).
        rd_channels: hidden width; overrides ``rd_ratio`` and ``rd_divisor`` when given.
        rd_divisor: round the hidden width to a multiple of this (timm's rule); ``None`` gives the
            paper's ``max(1, int(C * rd_ratio))``.
        act_layer: activation between ``fc1`` and ``fc2`` (a class or a name in ``ACT_LAYERS``).
        gate_layer: gate producing the channel weights (a class or a name in ``GATE_LAYERS``).
        spatial_dims: 1, 2 or 3 for (N, C, L), (N, C, H, W) or (N, C, T, H, W) inputs.
        gain: constant the gate is multiplied by (2.0 after :meth:`init_identity_`); see
            :meth:`set_gain_`.

    Example:
        >>> se = SEBlock(64)
        >>> se(torch.randn(2, 64, 56, 56)).shape
        torch.Size([2, 64, 56, 56])
        >>> sorted(k for k in se.state_dict())
        ['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight']
    """

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
    ) -> None:
        super().__init__()
        if spatial_dims not in _CONV_BY_DIMS:
            raise OptionError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if not rd_channels:
            if rd_divisor is None:
                rd_channels = max(1, int(channels * rd_ratio))
            else:
                rd_channels = int(make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0))
        conv = _CONV_BY_DIMS[spatial_dims]
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.rd_channels = rd_channels
        self.spatial_dims = spatial_dims
        self.fc1 = conv(channels, rd_channels, kernel_size=1, bias=True, **dd)
        act_cls = resolve_layer(act_layer, ACT_LAYERS, "act_layer")
        try:
            self.act = act_cls(inplace=True)
        except TypeError:
            self.act = act_cls()
        self.fc2 = conv(rd_channels, channels, kernel_size=1, bias=True, **dd)
        self.gate = resolve_layer(gate_layer, GATE_LAYERS, "gate_layer")()
        self.set_gain_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Squeeze: one value per (sample, channel). The excitation runs as F.linear on the 1x1
        # conv weights viewed as matrices: the same maths and state_dict as 1x1 convolutions,
        # without the conv dispatch on a (N, C, 1, 1) tensor.
        s = x.mean(dim=tuple(range(2, x.dim())))
        s = F.linear(s, self.fc1.weight.flatten(1), self.fc1.bias)
        s = self.act(s)
        s = F.linear(s, self.fc2.weight.flatten(1), self.fc2.bias)
        g = self.gate(s)
        if "gain" in self._buffers:
            g = g * self.gain
        return x * g.view(g.shape + (1,) * (x.dim() - 2))

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
        if gain == 1.0:
            self.__dict__["gain"] = 1.0
        else:
            self.__dict__.pop("gain", None)
            self.register_buffer("gain", torch.tensor(gain, device=self.fc1.weight.device))
        return self

    @torch.no_grad()
    def init_identity_(self) -> "SEBlock":
        """Make the block an exact identity at initialisation while every parameter still learns.

        The gate is multiplied by a gain of 2 (as NFNets do), so a gate pre-activation of 0 gives
        ``2 * sigmoid(0) = 1`` and the block returns its input. A zero pre-activation for *every*
        input is obtained with "mirrored" hidden units (as in looks-linear initialisation):
        hidden unit ``k + j`` copies the ``fc1`` row and bias of unit ``j``, and ``fc2`` gives it
        the opposite weight, so each pair contributes ``w * relu(u) - w * relu(u) = 0``; ``fc2``'s
        bias is zero. Unlike zeroing ``fc2`` (which leaves ``fc1`` without gradient until ``fc2``
        has moved), every parameter gets a non-zero gradient on the first backward pass: the
        pair's ``fc1`` rows receive opposite gradients, which breaks the symmetry. With an odd
        hidden width the unpaired unit is made a constant (zero ``fc1`` row, bias 1: ``act(1)``)
        whose contribution ``fc2``'s bias cancels; it too gets gradients. Outputs equal the input up
        to float rounding (the terms cancel inside one matrix product), in train and eval mode.

        Returns:
            ``self``, for chaining.
        """
        gate_at_zero = float(self.gate(torch.zeros(1)).item())
        if abs(gate_at_zero - 0.5) > 1e-6:
            raise OptionError(
                f"identity init needs a gate with gate(0) = 0.5 (sigmoid, hard_sigmoid); "
                f"{type(self.gate).__name__} gives {gate_at_zero}"
            )
        k = self.rd_channels // 2
        w1, b1 = self.fc1.weight, self.fc1.bias
        w2, b2 = self.fc2.weight, self.fc2.bias
        w1[k : 2 * k] = w1[:k]
        b1[k : 2 * k] = b1[:k]
        w2[:, k : 2 * k] = -w2[:, :k]
        b2.zero_()
        if self.rd_channels % 2:
            # The unpaired unit: a zero fc1 row and a bias of 1 make it the constant act(1), which
            # fc2's bias cancels; its fc1 row still gets a gradient (through its fc2 column).
            w1[-1] = 0.0
            b1[-1] = 1.0
            b2 -= w2[:, -1].flatten() * self.act(torch.ones((), dtype=b2.dtype, device=b2.device))
        return self.set_gain_(2.0)

    def extra_repr(self) -> str:
        return f"gain={float(self.gain)}" if "gain" in self._buffers else ""
