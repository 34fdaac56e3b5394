"""The layers se_inject knows by name, and what it takes as an activation or a gate: one vocabulary
for the options, the SE block, the fused kernels and the graph passes, and one behaviour check.

**The vocabulary.** :data:`ACTIVATIONS` (``act_layer``: ``relu``, ``relu6``, ``silu``/``swish``,
``gelu``, ``hard_swish``, ``mish``) and :data:`GATES` (``gate_layer``: ``sigmoid``,
``hard_sigmoid``) give each name its module class (what :class:`~se_inject.modules.se_block.SEBlock`
builds), its function (what the fused op and its reference compute) and its backward in aten ops
(what the fused op's written-out backward runs). :data:`OUT_ACTS` are the activations after a
residual add that an SE block can take over (``none``, ``relu``, ``silu``): their code in the
Triton kernels, their function, and how a traced graph spells them (the module class, the
functions, the Tensor methods). Everything else that needs these names reads them here.

**The behaviour check.** A class given instead of a name is checked for what it does, since a class
that runs is not yet an activation: ``nn.Identity`` as a gate turns SE into an unbounded linear
scale, and a module returning zeros switches the excitation off. So a layer class is built the way
SE builds it (:func:`new_layer`) and run on a few fixed probe tensors, on the CPU in float32, with
torch's defaults (:func:`se_inject.utils.torch_defaults`: no ambient device, no autocast), once per
class:

* an **activation** is *elementwise* (each output depends on the input at its own position only,
  through the same function at every position and batch row, for 2-D ``(N, C)`` and 4-D
  ``(N, C, 1, 1)`` inputs), *nonlinear* (its values at -8 ... 8 are not on one line) and finite;
* a **gate** is elementwise, maps 0 to exactly 0.5, maps every input (-1e30 ... 1e30) into
  [0, 1], and is non-decreasing and not constant there (``sigmoid``, ``hard_sigmoid``).

Every way a layer class enters se_inject goes through :func:`resolve_layer`, which calls
:func:`check_activation` or :func:`check_gate`: :class:`~se_inject.options.SEOptions` when it is
built, :class:`~se_inject.modules.se_block.SEBlock`, and the timm attentions' layers;
:class:`se_inject.modules.attentions.GainGate` checks the gate module it builds with
:func:`check_gate_module`.

:func:`alive_point` is what identity init needs to know about an activation: a point where its
value is known exactly in every float dtype and its slope is not zero (see
:meth:`se_inject.modules.se_block.SEBlock.init_identity_`).

This is a core module (like :mod:`se_inject.options`): it imports only :mod:`se_inject.errors`
and :mod:`se_inject.utils`, so that the options, the modules and the fused kernels can all read it.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Type, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import OptionError
from .utils import describe_error, torch_defaults

__all__ = ["Layer", "OutAct", "ACTIVATIONS", "GATES", "OUT_ACTS", "ACT_LAYERS", "GATE_LAYERS", "resolve_layer",
           "layer_name", "new_layer", "check_activation", "check_gate", "check_gate_module", "alive_point"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Layer:
    """An activation or gate by name: the module class SE builds, the function the fused op and its
    reference compute, and ``backward(grad, pre, post)``: the gradient of the layer's input from
    that of its output, given its input ``pre`` and its output ``post``, in aten's backward ops
    (so that AOTAutograd can trace it)."""

    module: Type[nn.Module]
    function: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor, Tensor], Tensor]


def _silu_backward(g: Tensor, pre: Tensor, post: Tensor) -> Tensor:
    return aten.silu_backward.default(g, pre)


#: Activations of the excitation MLP, by name (``act_layer``).
ACTIVATIONS: dict[str, Layer] = {
    "relu": Layer(nn.ReLU, F.relu, lambda g, pre, post: aten.threshold_backward.default(g, post, 0)),
    "relu6": Layer(nn.ReLU6, F.relu6, lambda g, pre, post: aten.hardtanh_backward.default(g, pre, 0.0, 6.0)),
    "silu": Layer(nn.SiLU, F.silu, _silu_backward),
    "swish": Layer(nn.SiLU, F.silu, _silu_backward),
    "gelu": Layer(nn.GELU, F.gelu, lambda g, pre, post: aten.gelu_backward.default(g, pre, approximate="none")),
    "hard_swish": Layer(nn.Hardswish, F.hardswish, lambda g, pre, post: aten.hardswish_backward.default(g, pre)),
    "mish": Layer(nn.Mish, F.mish, lambda g, pre, post: aten.mish_backward.default(g, pre)),
}

#: Gates of the excitation, by name (``gate_layer``); each maps 0 to 0.5, which identity init relies on.
GATES: dict[str, Layer] = {
    "sigmoid": Layer(nn.Sigmoid, torch.sigmoid, lambda g, pre, post: aten.sigmoid_backward.default(g, post)),
    "hard_sigmoid": Layer(nn.Hardsigmoid, F.hardsigmoid,
                          lambda g, pre, post: aten.hardsigmoid_backward.default(g, pre)),
}


@dataclass(frozen=True)
class OutAct:
    """An activation after the residual add that an SE block can compute itself (``out_act``).

    Attributes:
        code: its ``OUT_ACT`` value in the Triton kernels (``tl.constexpr``).
        function: what it computes, out of place.
        module: the module class that computes it in a model (matched by exact type), if any.
        functions / methods: the functions and the Tensor methods (by name) that compute it in a
            traced graph.
    """

    code: int
    function: Callable[[Tensor], Tensor]
    module: Optional[Type[nn.Module]] = None
    functions: tuple[Callable[..., Tensor], ...] = ()
    methods: tuple[str, ...] = ()


#: Activations after the residual add that an SE block can take over, in the order of their codes.
OUT_ACTS: dict[str, OutAct] = {
    "none": OutAct(0, lambda z: z),
    "relu": OutAct(1, F.relu, nn.ReLU, (F.relu, F.relu_, torch.relu, torch.relu_), ("relu", "relu_")),
    "silu": OutAct(2, F.silu, nn.SiLU, (F.silu,)),
}

#: The module classes of :data:`ACTIVATIONS` and :data:`GATES`, by name.
ACT_LAYERS: dict[str, Type[nn.Module]] = {name: layer.module for name, layer in ACTIVATIONS.items()}
GATE_LAYERS: dict[str, Type[nn.Module]] = {name: layer.module for name, layer in GATES.items()}


def layer_name(cls: type, registry: dict[str, Type[nn.Module]]) -> Optional[str]:
    """The registry name of a layer class (the first, for aliases), or None for other classes."""
    return next((name for name, c in registry.items() if c is cls), None)


def resolve_layer(
    layer: Union[str, Type[nn.Module]], registry: dict[str, Type[nn.Module]], option: str
) -> Type[nn.Module]:
    """Return the module class named by ``layer`` in ``registry``, or ``layer`` itself if a class.

    A class given for :data:`ACT_LAYERS` must behave as an activation and one for
    :data:`GATE_LAYERS` as a gate (:func:`check_activation`, :func:`check_gate`): every layer
    class se_inject uses passes through here.

    Raises:
        OptionError: ``layer`` is an unknown name, not an ``nn.Module`` subclass, or a class that
            is not an activation (a gate); the message lists the valid names.
    """
    if isinstance(layer, str):
        try:
            return registry[layer.lower()]
        except KeyError:
            raise OptionError(
                f"{option}={layer!r} is not a known name; use one of {sorted(registry)} "
                f"or pass an nn.Module class"
            ) from None
    if not (isinstance(layer, type) and issubclass(layer, nn.Module)):
        raise OptionError(f"{option} must be a name from {sorted(registry)} or an nn.Module class, "
                          f"got {layer!r}")
    if registry is GATE_LAYERS:
        check_gate(layer, option, sorted(registry))
    elif registry is ACT_LAYERS:
        check_activation(layer, option, sorted(registry))
    return layer


#: Where an activation is probed: its values here must not lie on one line.
_POINTS = (-8.0, -4.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Where a gate is probed for its range and monotonicity, beyond :data:`_POINTS`.
_FAR = (1e30, 1e4, 100.0, 10.0)
#: Dtypes in which an alive point's value must be exact.
_EXACT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Per class: the reason it is not an activation / a gate (None: it is one), and its alive point.
_VERDICTS: "weakref.WeakKeyDictionary[type, dict[str, Optional[str]]]" = weakref.WeakKeyDictionary()
_ALIVE: "weakref.WeakKeyDictionary[type, Optional[float]]" = weakref.WeakKeyDictionary()


def new_layer(cls: Callable[..., nn.Module]) -> nn.Module:
    """An activation as SE builds it: ``inplace=True`` where the class takes it (its input is SE's
    own intermediate tensor), else without arguments. (Gates are built without arguments.)"""
    try:
        return cls(inplace=True)
    except TypeError:
        return cls()


def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = module(x.clone())
    if not isinstance(y, torch.Tensor):
        raise _NotIt(f"returns {type(y).__name__}, not a tensor")
    if y.shape != x.shape or y.dtype != x.dtype:
        raise _NotIt(f"maps a {list(x.shape)} {x.dtype} tensor to {list(y.shape)} {y.dtype}")
    return y


class _NotIt(Exception):
    """The layer is not what it is used as; the message says why."""


def _elementwise(module: nn.Module) -> torch.Tensor:
    """The module's values at :data:`_POINTS`, after checking it is elementwise; raises _NotIt."""
    v = torch.tensor(_POINTS)
    n, h = v.numel(), v.numel() // 2
    other = torch.linspace(3.0, -3.0, n)
    rows = torch.stack([v, torch.cat([other[:h], v[h:]]), torch.cat([v[:h], other[h:]]), v.flip(0)])
    y = _run(module, rows)
    if not torch.isfinite(y).all():
        raise _NotIt(f"gives non-finite values on inputs in [-8, 8] ({y[0].tolist()})")
    ref = y[0]
    as_4d = _run(module, rows.view(4, n, 1, 1)).view(4, n)
    same = [(y[1, h:], ref[h:]), (y[2, :h], ref[:h]), (y[3], ref.flip(0)), (as_4d, y)]
    if not all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in same):
        raise _NotIt("is not elementwise (an output depends on inputs at other positions, or its "
                     "function differs between positions or between 2-D and 4-D inputs)")
    return ref


def _activation_problem(module: nn.Module) -> Optional[str]:
    ref = _elementwise(module)
    v = torch.tensor(_POINTS)
    lo, hi = _POINTS.index(-1.0), _POINTS.index(1.0)
    line = ref[lo] + (v + 1.0) * (ref[hi] - ref[lo]) / 2.0
    if float((ref - line).abs().max()) <= 1e-4 * (1.0 + float(ref.abs().max())):
        at = {p: round(float(ref[_POINTS.index(p)]), 4) for p in (-1.0, 0.0, 1.0, 8.0)}
        return "is linear on [-8, 8] (" + ", ".join(f"f({p:g}) = {y:g}" for p, y in at.items()) + ")"
    return None


def _gate_problem(module: nn.Module) -> Optional[str]:
    ref = _elementwise(module)
    at_zero = float(ref[_POINTS.index(0.0)])
    if at_zero != 0.5:
        return f"gives gate(0) = {at_zero:.6g}"
    far = torch.tensor([-f for f in _FAR] + list(_POINTS) + list(reversed(_FAR)))
    y = _run(module, far.view(1, -1))[0]
    if not ((y >= 0) & (y <= 1)).all():
        return f"leaves [0, 1] (from {float(y.min()):.4g} to {float(y.max()):.4g} on [-1e30, 1e30])"
    if not (y[1:] >= y[:-1]).all() or not y[-1] > y[0]:
        return "is not non-decreasing, or is constant, on [-1e30, 1e30]"
    return None


def _verdict(cls: type, kind: str, build: Callable[[], nn.Module],
             probe: Callable[[nn.Module], Optional[str]]) -> Optional[str]:
    cached = _VERDICTS.setdefault(cls, {})
    if kind not in cached:
        cached[kind] = _problem_of(build, probe)
    return cached[kind]


@contextlib.contextmanager
def _probing() -> Iterator[None]:
    """torch's defaults, real tensors (no caller's dispatch mode either: a layer built inside a
    ``FakeTensorMode`` is still probed on real values), and the layer's own warnings (nn.Softmax's
    implicit dim) kept to itself: they belong to the model's forward, not to the check."""
    from torch.utils._python_dispatch import _disable_current_modes

    with (torch_defaults(), _disable_current_modes(), torch.inference_mode(False), torch.no_grad(),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore")
        yield


def _problem_of(build: Callable[[], nn.Module], probe: Callable[[nn.Module], Optional[str]]) -> Optional[str]:
    with _probing():
        try:
            module = build()
        except Exception as e:
            return f"cannot be built without arguments ({describe_error(e)})"
        training = module.training
        try:
            return probe(module.eval())
        except _NotIt as e:
            return str(e)
        except Exception as e:
            return f"fails on a small float32 tensor ({describe_error(e)})"
        finally:
            module.train(training)


def _label(layer: object) -> str:
    return getattr(layer, "__name__", None) or type(layer).__name__


def check_activation(cls: type, option: str = "act_layer", names: Sequence[str] = ()) -> None:
    """Raise an :class:`OptionError` unless ``cls`` builds an elementwise, nonlinear activation.

    ``names`` are the activation names to suggest. The verdict is kept per class.

    >>> check_activation(nn.ReLU)
    >>> check_activation(nn.Identity)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    se_inject.errors.OptionError: act_layer=Identity is not an activation: Identity is linear on [-8, 8] ...
    """
    problem = _verdict(cls, "activation", lambda: new_layer(cls), _activation_problem)
    if problem is not None:
        hint = f" such as {', '.join(repr(n) for n in names)}" if names else ""
        label = _label(cls)
        raise OptionError(f"{option}={label} is not an activation: {label} {problem}; an activation maps each "
                          f"value on its own through one nonlinear function: pass one{hint} (a name, or such an "
                          f"nn.Module class)")


def _gate_error(label: str, problem: str, option: str, names: Sequence[str]) -> OptionError:
    hint = " or ".join(repr(n) for n in names) if names else "'sigmoid' or 'hard_sigmoid'"
    return OptionError(f"{option}={label} is not a gate: a gate needs gate(0) = 0.5 (identity init relies on it) "
                       f"and non-decreasing values in [0, 1], elementwise, but {label} {problem}; pass {hint} (a "
                       f"name, or such an nn.Module class)")


def check_gate(cls: type, option: str = "gate_layer", names: Sequence[str] = ()) -> None:
    """Raise an :class:`OptionError` unless ``cls`` builds a gate: elementwise, ``gate(0) = 0.5``
    exactly, values in [0, 1], non-decreasing and not constant. The verdict is kept per class.

    >>> check_gate(nn.Sigmoid)
    """
    problem = _verdict(cls, "gate", cls, _gate_problem)
    if problem is not None:
        raise _gate_error(_label(cls), problem, option, names)


def check_gate_module(module: nn.Module, option: str = "gate_layer") -> None:
    """:func:`check_gate` for a gate module already built (e.g. from a ``functools.partial``)."""
    problem = _problem_of(lambda: module, _gate_problem)
    if problem is not None:
        raise _gate_error(type(module).__name__, problem, option, ())


def _exact_at(cls: type, point: float, value: float) -> bool:
    """Whether the activation gives exactly ``value`` at ``point`` in every float dtype it runs in
    (float32 must be one), and a non-zero slope there."""
    module = new_layer(cls)
    ran_float32 = False
    for dtype in _EXACT_DTYPES:
        try:
            y = module(torch.full((1, 1), point, dtype=dtype))
        except Exception:
            continue
        if not isinstance(y, torch.Tensor) or float(y.flatten()[0]) != value:
            return False
        ran_float32 |= dtype == torch.float32
    x = torch.full((1, 1), point, requires_grad=True)
    with torch.enable_grad():
        try:
            (grad,) = torch.autograd.grad(module(x.clone()).sum(), x)
        except Exception:
            return False
    return ran_float32 and float(grad.flatten()[0]) != 0.0


def alive_point(cls: type) -> Optional[float]:
    """Where identity init can put a hidden unit that is alive for every input: 1.0 when the
    activation gives exactly ``act(1) = 1`` (ReLU, ReLU6, ELU, LeakyReLU), else 0.0 when it gives
    exactly ``act(0) = 0`` (SiLU, GELU, Hardswish, Mish, Tanh), each in float32, float64, bfloat16
    and float16 and with a non-zero slope there; None when it has neither (Sigmoid, Softplus).

    >>> alive_point(nn.ReLU), alive_point(nn.SiLU), alive_point(nn.Sigmoid)
    (1.0, 0.0, None)
    """
    if cls not in _ALIVE:
        with _probing():
            try:
                _ALIVE[cls] = next((p for p in (1.0, 0.0) if _exact_at(cls, p, p)), None)
            except Exception:
                _ALIVE[cls] = None
    return _ALIVE[cls]
