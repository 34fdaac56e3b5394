"""The excitation MLP of an SE block on the squeezed (N, C) means, forward and written-out backward.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

The MLP is tiny (N x C), so it runs as plain torch ops, in fp32 (or float64 for float64 inputs)
with autocast switched off: a custom op's body otherwise sees the caller's autocast state, and
``F.linear`` would run in bf16. The backward is written with aten's own backward ops
(``threshold_backward``, ``sigmoid_backward``, ...) so AOTAutograd can trace it; it never calls
``torch.autograd.grad``.
"""

import contextlib
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from ..layers import ACTIVATIONS
from ..layers import GATES as _GATE_LAYERS

__all__ = ["ACTS", "GATES", "MLPState", "MLPGrads", "check_names", "mlp_forward", "mlp_backward"]

aten = torch.ops.aten

#: Activations between fc1 and fc2, by name (:data:`se_inject.layers.ACTIVATIONS`).
ACTS: dict[str, Callable[[Tensor], Tensor]] = {name: layer.function for name, layer in ACTIVATIONS.items()}

#: Gates after fc2, by name (:data:`se_inject.layers.GATES`).
GATES: dict[str, Callable[[Tensor], Tensor]] = {name: layer.function for name, layer in _GATE_LAYERS.items()}


def check_names(act: str, gate: str) -> None:
    """Raise ``ValueError`` naming ``act`` or ``gate`` when it is not a supported name."""
    if act not in ACTS:
        raise ValueError(f"act={act!r} is not supported; use one of {sorted(ACTS)}")
    if gate not in GATES:
        raise ValueError(f"gate={gate!r} is not supported; use one of {sorted(GATES)}")


class MLPState(NamedTuple):
    """Everything the MLP backward needs, in the accumulation dtype; ``g`` is the channel gate."""

    s: Tensor
    pre_act: Tensor
    hidden: Tensor
    pre_gate: Tensor
    gate: Tensor
    g: Tensor


class MLPGrads(NamedTuple):
    """Gradients of the squeeze ``s`` and of the four parameters, shaped like the parameters."""

    s: Tensor
    fc1_weight: Tensor
    fc1_bias: Tensor
    fc2_weight: Tensor
    fc2_bias: Tensor


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``device``, where it is on (entering a disabled autocast costs
    microseconds per call, a large part of a batch-1 forward)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def mlp_forward(s: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor,
                fc2_bias: Tensor, gain: Optional[Tensor], act: str, gate: str) -> MLPState:
    """``g = gate(fc2(act(fc1(s)))) * gain`` in ``s``'s dtype, with the 1x1 conv weights flattened.

    >>> zeros = torch.zeros
    >>> st = mlp_forward(zeros(2, 4), zeros(2, 4, 1, 1), zeros(2), zeros(4, 2, 1, 1), zeros(4),
    ...                  torch.tensor(2.0), "relu", "sigmoid")
    >>> st.g
    tensor([[1., 1., 1., 1.],
            [1., 1., 1., 1.]])
    """
    dt = s.dtype
    with _no_autocast(s.device):
        pre_act = F.linear(s, _as(fc1_weight.flatten(1), dt), _as(fc1_bias, dt))
        hidden = ACTS[act](pre_act)
        pre_gate = F.linear(hidden, _as(fc2_weight.flatten(1), dt), _as(fc2_bias, dt))
        gated = GATES[gate](pre_gate)
        g = gated * _as(gain, dt) if gain is not None else gated
    return MLPState(s, pre_act, hidden, pre_gate, gated, g)


def mlp_backward(dg: Tensor, st: MLPState, fc1_weight: Tensor, fc1_bias: Tensor,
                 fc2_weight: Tensor, fc2_bias: Tensor, gain: Optional[Tensor], act: str,
                 gate: str) -> MLPGrads:
    """Backpropagate ``dg`` (dL/dg, (N, C)) through :func:`mlp_forward`, op by op."""
    dt = st.s.dtype
    with _no_autocast(st.s.device):
        dgated = _as(dg, dt) * _as(gain, dt) if gain is not None else _as(dg, dt)
        dpre_gate = _GATE_LAYERS[gate].backward(dgated, st.pre_gate, st.gate)
        dw2 = dpre_gate.t().mm(st.hidden)
        dhidden = dpre_gate.mm(_as(fc2_weight.flatten(1), dt))
        dpre_act = ACTIVATIONS[act].backward(dhidden, st.pre_act, st.hidden)
        dw1 = dpre_act.t().mm(st.s)
        ds = dpre_act.mm(_as(fc1_weight.flatten(1), dt))
        db1, db2 = dpre_act.sum(0), dpre_gate.sum(0)
    return MLPGrads(
        s=ds,
        fc1_weight=_as(dw1.reshape(fc1_weight.shape), fc1_weight.dtype),
        fc1_bias=_as(db1, fc1_bias.dtype),
        fc2_weight=_as(dw2.reshape(fc2_weight.shape), fc2_weight.dtype),
        fc2_bias=_as(db2, fc2_bias.dtype),
    )
