"""The whole SE residual tail as one operator: squeeze, excitation MLP, scale, add, activation.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

``se_inject::se_residual`` computes, for x of shape (N, C, *spatial) with S positions::

    s   = mean over spatial dims of x (fp32)        g = gate(fc2(act(fc1(s)))) * gain
    out = out_act(x * g[:, :, None...] + shortcut)

in two passes over x (a Triton squeeze, then a Triton scale-add-act), the MLP in torch in fp32.
It returns ``(out, s)``: the squeeze means are saved for the backward, which recomputes the tiny
MLP from them instead of reading x again. The backward is K1 (``dg = sum_s dz * x``), the MLP
backward in aten ops, and K2 (``dx = dz * g + ds / S``): see :mod:`se_inject.fused.backward`.

Two ways in, one set of functions: :func:`se_residual` called in plain eager mode runs the op's
forward, setup and backward as an autograd Function (``_eager``: the dispatcher's custom-op and
autograd layers cost more host time than the rest of a batch-1 call; the Function also keeps the
MLP's state for the backward); anything that traces (torch.compile, export, make_fx, fake
tensors, modes) calls ``torch.ops.se_inject.se_residual``, one node. :func:`use_fused` is the one
decision between the kernels and plain torch ops.

Autocast: custom ops are not autocast-aware, and no autocast rule is registered, on purpose. The
op takes x and the shortcut in whatever dtypes they come (bf16 from a conv under autocast, often
fp32 for a shortcut), computes in fp32 and stores ``promote_types(x.dtype, shortcut.dtype)``, as
the eager ``x * g + shortcut`` would (x's dtype for ``in_place``, as ``x += shortcut``); the MLP
runs in fp32 with autocast switched off inside.
"""

from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from ..layers import OUT_ACTS as LAYER_OUT_ACTS
from ._common import OUT_ACTS, check_out_act, register_op, tensors_supported
from .backward import compute_gate_grad, compute_input_grad
from .mlp import ACTS, GATES, MLPState, check_names, mlp_backward, mlp_forward
from .scale import scale
from .squeeze import squeeze

__all__ = ["se_residual", "se_residual_op", "se_residual_reference", "supports", "use_fused"]


def use_fused(kernels: str, x: Tensor, shortcut: Optional[Tensor], act: Optional[str],
              gate: Optional[str], out_act: str) -> bool:
    """Whether an SE tail runs the Triton kernels: the one place that decides, for SEBlock
    (``kernels`` as set on the block), for :func:`supports` and inside the op (both ``"fused"``).

    ================  ==================  =========================================
    ``kernels``       under torch.compile  Triton kernels when
    ================  ==================  =========================================
    ``"plain"``       either              never (plain torch ops)
    ``"auto"``        no                  the names and tensors are supported
    ``"auto"``        yes                 never: inductor fuses the plain ops itself
    ``"fused"``       either              the names and tensors are supported
    ================  ==================  =========================================

    Supported names: ``act`` in ``ACTS``, ``gate`` in ``GATES``, ``out_act`` in ``OUT_ACTS``
    (None, a layer class without a name, is not). Supported tensors:
    :func:`~se_inject.fused._common.tensors_supported`, which includes the GPU's capability
    (Triton's minimum, and bf16 only from Ampere on). Any other ``kernels`` string is "plain";
    callers validate it once, when it is set.
    """
    if kernels != "fused" and (kernels != "auto" or torch.compiler.is_compiling()):
        return False
    if act not in ACTS or gate not in GATES or out_act not in OUT_ACTS:
        return False
    return tensors_supported(x, shortcut)


@register_op("se_inject::se_residual")
def se_residual_op(x: Tensor, shortcut: Optional[Tensor], fc1_weight: Tensor, fc1_bias: Tensor,
                   fc2_weight: Tensor, fc2_bias: Tensor, gain: Optional[Tensor], act: str,
                   gate: str, out_act: str, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """``(out, s)``: the SE residual tail and the fp32 squeeze means (saved for backward).

    Triton on CUDA tensors (fp32/bf16/fp16), the same maths in torch ops elsewhere; the choice is
    made once per call by :func:`use_fused`. ``in_place``: the add was ``x += shortcut``, so out
    keeps x's dtype (stored so by the kernel, not cast afterwards).
    """
    check_names(act, gate)
    check_out_act(out_act)
    out, s, _ = _forward(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gain, act, gate,
                         out_act, in_place)
    return out, s


def _forward(x: Tensor, shortcut: Optional[Tensor], fc1_weight: Tensor, fc1_bias: Tensor,
             fc2_weight: Tensor, fc2_bias: Tensor, gain: Optional[Tensor], act: str, gate: str,
             out_act: str, in_place: bool) -> tuple[Tensor, Tensor, MLPState]:
    """``(out, s, the MLP's state)``: the op's maths, without its argument checks."""
    use_triton = use_fused("fused", x, shortcut, act, gate, out_act)
    s = squeeze(x, use_triton)
    state = mlp_forward(s, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gain, act, gate)
    return scale(x, state.g, shortcut, out_act, use_triton, in_place), s, state


def _setup(ctx, inputs: tuple, output: tuple) -> None:
    x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gain, act, gate, out_act, _ = inputs
    out, s = output
    ctx.names = (act, gate, out_act)
    ctx.sc_dtype = shortcut.dtype if shortcut is not None else None
    ctx.save_for_backward(x, shortcut if out_act == "silu" else None, fc1_weight, fc1_bias,
                          fc2_weight, fc2_bias, gain, out if out_act == "relu" else None, s)


def _backward(ctx, grad_out: Tensor, grad_s: Optional[Tensor]) -> tuple:
    x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gain, out, s = ctx.saved_tensors
    act, gate, out_act = ctx.names
    weights = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    # the op recomputes the tiny MLP from s (its setup sees only inputs and outputs); the eager
    # Function kept it
    state = getattr(ctx, "mlp_state", None) or mlp_forward(s, *weights, gain, act, gate)
    dg, dz = compute_gate_grad(grad_out, x, shortcut, out, state.g, out_act)
    dz = grad_out if out_act == "none" else dz
    grads = mlp_backward(dg, state, *weights, gain, act, gate)
    ds = grads.s if grad_s is None else grads.s + grad_s
    dx = compute_input_grad(dz, x, state.g, ds) if ctx.needs_input_grad[0] else None
    dsc = dz.to(ctx.sc_dtype) if ctx.needs_input_grad[1] else None
    return (dx, dsc, grads.fc1_weight, grads.fc1_bias, grads.fc2_weight, grads.fc2_bias,
            None, None, None, None, None)


se_residual_op.register_autograd(_backward, setup_context=_setup)


class _SEResidualFunction(torch.autograd.Function):
    """The op's forward, setup and backward as a plain autograd Function, for :func:`_eager`
    calls: the same functions, without the dispatcher's custom-op and autograd layers (in eager
    mode those cost more host time than the rest of the call, at batch 1 the whole latency)."""

    @staticmethod
    def forward(ctx, *inputs: Any) -> tuple[Tensor, Tensor]:
        out, s, ctx.mlp_state = _forward(*inputs)
        _setup(ctx, inputs, (out, s))
        return out, s

    backward = staticmethod(_backward)


def _eager(*tensors: Optional[Tensor]) -> bool:
    """Whether this call is plain eager PyTorch, where the op's body can run without the
    dispatcher with the same result: nothing traces, compiles or exports (no dispatch or
    torch-function mode, no functorch transform, no jit trace), and every tensor is a plain
    tensor or parameter (not fake, functional, or another subclass). Otherwise the call goes
    through ``torch.ops.se_inject.se_residual``, which every tracer sees as one op."""
    if torch.compiler.is_compiling() or not all(t is None or type(t) in _PLAIN for t in tensors):
        return False  # (dynamo reads is_compiling() first, as a constant)
    return not (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
                or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _check_shapes(x: Tensor, shortcut: Optional[Tensor], fc1_weight: Tensor, fc1_bias: Tensor,
                  fc2_weight: Tensor, fc2_bias: Tensor, gain: Optional[Tensor]) -> None:
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"x must be (N, C, *spatial) with 1 to 3 spatial dims, "
                         f"got shape {tuple(x.shape)}")
    C, hidden = x.shape[1], fc1_weight.shape[0]
    ones = (1,) * (fc1_weight.dim() - 2)
    w1, w2 = (hidden, C) + ones, (C, hidden) + ones
    if (fc1_weight.shape == w1 and fc2_weight.shape == w2 and fc1_bias.shape == (hidden,)
            and fc2_bias.shape == (C,) and (shortcut is None or shortcut.shape == x.shape)
            and (gain is None or gain.dim() == 0)):
        return  # the common case, checked without building messages
    expected = {"fc1_weight": (fc1_weight, w1), "fc1_bias": (fc1_bias, (hidden,)),
                "fc2_weight": (fc2_weight, w2), "fc2_bias": (fc2_bias, (C,))}
    if shortcut is not None:
        expected["shortcut"] = (shortcut, tuple(x.shape))
    if gain is not None:
        expected["gain"] = (gain, ())
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x of shape {tuple(x.shape)} "
                             f"and fc1_weight of shape {tuple(fc1_weight.shape)}; "
                             f"got {tuple(tensor.shape)}")


def se_residual(x: Tensor, shortcut: Optional[Tensor], fc1_weight: Tensor, fc1_bias: Tensor,
                fc2_weight: Tensor, fc2_bias: Tensor, gain: Optional[Tensor] = None,
                act: str = "relu", gate: str = "sigmoid", out_act: str = "none",
                in_place: bool = False) -> Tensor:
    """``out_act(SE(x) + shortcut)`` by the fused op ``se_inject::se_residual``.

    Args:
        x: the residual branch, (N, C, L), (N, C, H, W) or (N, C, T, H, W), any layout.
        shortcut: added after the scale (x's shape; its dtype may differ), or ``None``.
        fc1_weight, fc1_bias, fc2_weight, fc2_bias: SEBlock's 1x1 conv parameters,
            (hidden, C, 1...), (hidden,), (C, hidden, 1...), (C,).
        gain: a 0-dim tensor the gate is multiplied by, or ``None`` for 1.
        act, gate, out_act: names from ``ACTS``, ``GATES`` and ``OUT_ACTS``.
        in_place: the add was written ``x += shortcut``: the result keeps x's dtype.

    Returns:
        A tensor like x in x's layout, of dtype ``promote_types(x.dtype, shortcut.dtype)`` (x's
        dtype when ``in_place``).

    Raises:
        ValueError: a name is unknown or a shape does not fit; the message names the argument.

    >>> x = torch.randn(2, 8, 5, 5)
    >>> w1, b1 = torch.randn(4, 8, 1, 1), torch.randn(4)
    >>> w2, b2 = torch.randn(8, 4, 1, 1), torch.randn(8)
    >>> out = se_residual(x, x, w1, b1, w2, b2, out_act="relu")
    >>> torch.allclose(out, se_residual_reference(x, x, w1, b1, w2, b2, out_act="relu"), atol=1e-6)
    True
    """
    check_names(act, gate)
    check_out_act(out_act)
    _check_shapes(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gain)
    args = (x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gain, act, gate, out_act, in_place)
    tensors = args[:7]
    if not _eager(*tensors):
        return se_residual_op(*args)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _SEResidualFunction.apply(*args)[0]
    return _forward(*args)[0]


def supports(x: Tensor, shortcut: Optional[Tensor], act: str, gate: str, out_act: str) -> bool:
    """Whether :func:`se_residual` runs its Triton kernels for these arguments:
    ``use_fused("fused", ...)``.

    Triton importable; x a CUDA tensor on a GPU Triton supports for x's dtype (a CPU tensor when
    the kernels are interpreted, for tests) with 3 to 5 dims in fp32/bf16/fp16; the shortcut
    likewise; supported names. When it is false, :func:`se_residual` still works (in torch ops)
    as long as the names are valid.
    """
    return use_fused("fused", x, shortcut, act, gate, out_act)


def se_residual_reference(x: Tensor, shortcut: Optional[Tensor], fc1_weight: Tensor,
                          fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                          gain: Optional[Tensor] = None, act: str = "relu", gate: str = "sigmoid",
                          out_act: str = "none", in_place: bool = False) -> Tensor:
    """The same maths as :func:`se_residual` in plain, autograd-differentiable torch ops, written
    as today's ``SEBlock.forward`` (mean, F.linear on the flattened weights, act, F.linear, gate,
    ``* gain``), then ``x * g`` and ``+ shortcut`` and ``out_act``: the CPU path and the oracle."""
    check_names(act, gate)
    check_out_act(out_act)
    s = x.mean(dim=tuple(range(2, x.dim())))
    s = F.linear(s, fc1_weight.flatten(1), fc1_bias)
    s = ACTS[act](s)
    s = F.linear(s, fc2_weight.flatten(1), fc2_bias)
    g = GATES[gate](s)
    if gain is not None:
        g = g * gain
    z = x * g.view(g.shape + (1,) * (x.dim() - 2))
    if shortcut is not None:
        z = z + shortcut
        z = z.to(x.dtype) if in_place else z  # `x += shortcut` keeps x's dtype
    return LAYER_OUT_ACTS[out_act].function(z)
