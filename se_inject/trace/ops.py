"""What se_inject knows about the ops it meets in a graph.

One place for the tables the tracer and the site finder share: which modules are convolutions,
linears and norms (and where their channel dim is), which are activations, gates, regularisers or
channel attention, and which functions and methods are shape-only or elementwise. Classes are
matched with ``isinstance``, so subclasses (timm's ``StdConv2d``, ``BatchNormAct2d``) count too.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import operator
from typing import Any, Optional

import timm.layers as timm_layers
import torch
import torchvision.ops as tv_ops
from torch import fx, nn
from torch.nn import functional as F

from ..layers import OUT_ACTS
from ..modules.attentions import INSERTED_MARK, InsertedAttention
from ..modules.se_block import SEBlock

__all__ = [
    "CONV_TYPES",
    "LINEAR_TYPES",
    "NORM_TYPES",
    "REGULARIZER_TYPES",
    "ATTENTION_TYPES",
    "INSERTED_MARK",
    "InsertedAttention",
    "is_primitive_leaf",
    "is_regularizer_module",
    "module_channel_axis",
    "is_activation_module",
    "is_gate_module",
    "module_has_weight_matrix",
    "target_name",
    "add_operands",
    "is_inplace_add",
    "written_input",
    "is_view",
    "is_mul",
    "is_conv_like",
    "is_nonlinear",
    "is_regularizer",
]


def _timm(*names: str) -> tuple[type, ...]:
    """The timm layer classes among ``names`` that this timm version has."""
    return tuple(getattr(timm_layers, n) for n in names if hasattr(timm_layers, n))


CONV_TYPES: tuple[type, ...] = (nn.modules.conv._ConvNd,)
LINEAR_TYPES: tuple[type, ...] = (nn.Linear,)

# Norms whose channel dim is 1 (N, C, *spatial). Checked before the channels-last table, which
# holds nn.LayerNorm, the base class of timm's LayerNorm2d.
_CHANNELS_FIRST_NORMS: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LocalResponseNorm,
    tv_ops.FrozenBatchNorm2d,
) + _timm(
    "LayerNorm2d", "LayerNorm2dFp32", "LayerNormAct2d", "LayerNormAct2dFp32", "RmsNorm2d",
    "RmsNorm2dFp32", "RmsNormAct2d", "RmsNormAct2dFp32", "SimpleNorm2d", "SimpleNorm2dFp32",
    "FrozenBatchNormAct2d", "GroupNormAct", "GroupNorm1Act", "EvoNorm2dB0", "EvoNorm2dB1",
    "EvoNorm2dB2", "EvoNorm2dS0", "EvoNorm2dS0a", "EvoNorm2dS1", "EvoNorm2dS1a", "EvoNorm2dS2",
    "EvoNorm2dS2a", "FilterResponseNormAct2d", "FilterResponseNormTlu2d",
)
try:  # torchvision's ConvNeXt LayerNorm2d: an nn.LayerNorm that permutes to normalise dim 1
    from torchvision.models.convnext import LayerNorm2d as _TvLayerNorm2d

    _CHANNELS_FIRST_NORMS += (_TvLayerNorm2d,)
except ImportError:  # pragma: no cover
    pass
# Norms over the last dim, by exact type: a subclass may permute (as the LayerNorm2d classes do).
_CHANNELS_LAST_NORMS: tuple[type, ...] = (nn.LayerNorm, nn.RMSNorm) + _timm(
    "LayerNorm", "LayerNormFp32", "LayerNormAct", "LayerNormActFp32", "RmsNorm", "RmsNormFp32",
    "RmsNormAct", "RmsNormActFp32", "SimpleNorm", "SimpleNormFp32",
)
NORM_TYPES: tuple[type, ...] = _CHANNELS_FIRST_NORMS + _CHANNELS_LAST_NORMS

# Identity at inference; per-sample or per-element noise in training.
REGULARIZER_TYPES: tuple[type, ...] = (
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    tv_ops.StochasticDepth,
    tv_ops.DropBlock2d,
    tv_ops.DropBlock3d,
) + _timm("DropPath", "DropBlock2d")

_POOL_TYPES: tuple[type, ...] = (
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
) + _timm("AvgPool2dSame", "MaxPool2dSame", "BlurPool2d")

_UPSAMPLE_TYPES: tuple[type, ...] = (nn.Upsample,)

# Channel attention, by module: a branch holding one of these already has it.
ATTENTION_TYPES: tuple[type, ...] = (SEBlock, tv_ops.SqueezeExcitation) + _timm(
    "SEModule", "SqueezeExcite", "EffectiveSEModule", "EffectiveSqueezeExcite", "EcaModule",
    "EfficientChannelAttn", "CecaModule", "CircularEfficientChannelAttn", "GatherExcite",
    "GlobalContext", "CbamModule", "LightCbamModule", "SelectiveKernel", "SplitAttn",
)
try:  # EfficientNet / MobileNetV3 blocks in timm use their own SqueezeExcite class.
    from timm.models._efficientnet_blocks import SqueezeExcite as _EffSE

    ATTENTION_TYPES += (_EffSE,)
except ImportError:  # pragma: no cover - older or newer timm layouts
    pass
# What timm's create_attn builds but timm.layers does not export (so _timm() cannot see it).
for _module, _names in (("cbam", ("CbamModule", "LightCbamModule")),
                        ("coord_attn", ("CoordAttn", "SimpleCoordAttn", "EfficientLocalAttn", "StripAttn"))):
    try:
        _found = importlib.import_module(f"timm.layers.{_module}")
    except ImportError:  # pragma: no cover
        continue
    ATTENTION_TYPES += tuple(getattr(_found, n) for n in _names
                             if hasattr(_found, n) and getattr(_found, n) not in ATTENTION_TYPES)

ATTENTION_TYPES += (InsertedAttention,)

# Modules se_inject never traces into. torch.nn's own modules are leaves by fx's default rule.
LEAF_TYPES: tuple[type, ...] = CONV_TYPES + LINEAR_TYPES + NORM_TYPES + REGULARIZER_TYPES + (SEBlock, InsertedAttention)

_ACTIVATION_MODULE_TYPES: tuple[type, ...] = tuple(
    cls
    for name, cls in vars(nn.modules.activation).items()
    if isinstance(cls, type) and issubclass(cls, nn.Module)
    and cls not in (nn.Module, nn.MultiheadAttention, nn.modules.activation.NonDynamicallyQuantizableLinear)
)
_GATE_MODULE_TYPES: tuple[type, ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softmax2d)

_ACTIVATION_NAMES = frozenset({
    "relu", "relu_", "relu6", "elu", "elu_", "selu", "celu", "gelu", "silu", "mish", "hardswish",
    "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "prelu", "rrelu",
    "softplus", "softsign", "tanh", "tanh_", "sigmoid", "sigmoid_", "logsigmoid", "softmax",
    "log_softmax", "softmin", "glu", "threshold", "swish", "hard_swish", "hard_sigmoid",
    "hard_mish", "gelu_tanh", "quick_gelu", "erf", "exp", "sqrt", "rsqrt", "reciprocal",
    "scaled_dot_product_attention",
})
_GATE_NAMES = frozenset({"sigmoid", "sigmoid_", "hardsigmoid", "hard_sigmoid", "softmax"})


def target_name(target: Any) -> Optional[str]:
    """The bare name of a call target (``"permute"`` for ``torch.permute`` or a method)."""
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", None)


def is_activation_call(op: str, target: Any) -> bool:
    """Whether a ``call_function`` / ``call_method`` node applies a pointwise nonlinearity."""
    if op not in ("call_function", "call_method"):
        return False
    name = target_name(target)
    if name is None or name not in _ACTIVATION_NAMES:
        return False
    if op == "call_method":
        return True
    module = getattr(target, "__module__", "") or ""
    return module.startswith(("torch", "timm")) or target in (torch.sigmoid, torch.tanh, torch.relu)


def is_gate_call(op: str, target: Any) -> bool:
    """Whether a ``call_function`` / ``call_method`` node is a sigmoid-like or softmax gate."""
    return is_activation_call(op, target) and target_name(target) in _GATE_NAMES


def is_activation_module(m: nn.Module) -> bool:
    """An activation module, or a norm-activation layer whose activation is not the identity."""
    if isinstance(m, _ACTIVATION_MODULE_TYPES):
        return True
    if type(m).__module__.startswith("timm.layers.activations"):
        return True
    act = getattr(m, "act", None)
    if act is None:  # Hugging Face's norm-activation layers (BiT's BitGroupNormActivation)
        act = getattr(m, "activation", None)
    return isinstance(m, NORM_TYPES) and isinstance(act, nn.Module) and not isinstance(act, nn.Identity)


def is_gate_module(m: nn.Module) -> bool:
    """A sigmoid, hard-sigmoid or softmax module (timm's, torch's, or one named like them)."""
    if isinstance(m, _GATE_MODULE_TYPES):
        return True
    name = type(m).__name__.lower()
    return "sigmoid" in name or name in ("softmax", "radixsoftmax")


def module_has_weight_matrix(m: nn.Module) -> bool:
    """Whether ``m`` holds a parameter of 2+ dims (a conv or linear weight, inside or not)."""
    return any(p.dim() >= 2 for p in m.parameters())


def is_regularizer_module(m: nn.Module) -> bool:
    """Identity at inference: dropout, drop-path, ``nn.Identity``; also the ``*DropPath`` classes of
    other libraries (every Hugging Face model has its own), which in eval mode emit no op at all
    and so must stay whole to keep their train-mode behaviour."""
    if isinstance(m, REGULARIZER_TYPES):
        return True
    return type(m).__name__.endswith("DropPath") and not m._parameters and not m._modules


def is_primitive_leaf(m: nn.Module) -> bool:
    """A leaf that cannot hold a residual add: a conv, linear, norm, regulariser, torch.nn layer.

    Leaves that are not primitive (timm's no-trace blocks such as ``NormFreeBlock``) are traced on
    their own to look for residual adds inside them.
    """
    if isinstance(m, LEAF_TYPES) or isinstance(m, _POOL_TYPES + _UPSAMPLE_TYPES) or is_regularizer_module(m):
        return True
    if isinstance(m, nn.Sequential):
        return False
    return type(m).__module__.startswith(("torch.nn", "torch.ao.nn")) or is_activation_module(m)


def is_channels_last_norm(m: nn.Module, shape: tuple[int, ...]) -> bool:
    """A norm over the last dim (LayerNorm, RMSNorm) of a ``shape`` tensor: channels are last."""
    axis = module_channel_axis(m, shape) if isinstance(m, NORM_TYPES) else None
    return axis is not None and len(shape) > 2 and axis[0] == len(shape) - 1


def module_channel_axis(m: nn.Module, out_shape: tuple[int, ...]) -> Optional[tuple[int, int]]:
    """Channel dim and channel count of the output of leaf module ``m``, or None if unknown.

    Convolutions (and conv-like leaves with ``out_channels`` and a weight of 3+ dims) and
    channels-first norms put channels at dim 1; linears and channels-last norms at the last dim.
    """
    ndim = len(out_shape)
    if isinstance(m, CONV_TYPES) or (
        hasattr(m, "out_channels") and getattr(getattr(m, "weight", None), "dim", lambda: 0)() >= 3
    ):
        return 1, int(m.out_channels)
    if isinstance(m, LINEAR_TYPES):
        return ndim - 1, int(m.out_features)
    if isinstance(m, _CHANNELS_FIRST_NORMS):
        return (1, int(out_shape[1])) if ndim >= 2 else None
    if type(m) in _CHANNELS_LAST_NORMS:
        return ndim - 1, int(out_shape[-1])
    if isinstance(m, _CHANNELS_LAST_NORMS):
        # A subclass with a forward of its own: the normalised size says where the channels are,
        # since the layer_norm it calls can only act on a last dim of that size.
        size = getattr(m, "normalized_shape", None) or (getattr(m, "weight", None) is not None and m.weight.shape)
        size = tuple(size) if size else ()
        if len(size) != 1 or ndim < 3:
            return None
        last, first = out_shape[-1] == size[0], out_shape[1] == size[0]
        if last != first:
            return (ndim - 1, size[0]) if last else (1, size[0])
    return None


# Ops that only move or re-view data, never mix values across elements.
SHAPE_OPS = frozenset({
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as",
    "contiguous", "clone", "to", "type", "float", "half", "bfloat16", "permute", "transpose",
    "movedim", "swapaxes", "view_as", "reshape_as", "detach",
})
PERMUTING_OPS = frozenset({"permute", "transpose", "movedim", "swapaxes"})
RESHAPING_OPS = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                           "view_as", "reshape_as"})
SPLIT_OPS = frozenset({"split", "chunk", "unbind", "tensor_split", "split_with_sizes"})
MUL_TARGETS = (operator.mul, operator.imul, torch.mul, torch.Tensor.mul)
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
POOL_FUNCTIONS = frozenset({
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "interpolate", "pad",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "drop_path", "stochastic_depth",
})
CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d)
MATMUL_NAMES = frozenset({"matmul", "bmm", "mm", "einsum", "baddbmm", "addmm", "linear"})


def is_pool_module(m: nn.Module) -> bool:
    return isinstance(m, _POOL_TYPES + _UPSAMPLE_TYPES)


# -- node predicates ---------------------------------------------------------------------------

def add_operands(node: fx.Node) -> Optional[tuple[Any, Any]]:
    """The two operands of an add node (``+``, ``+=``, ``torch.add``, ``Tensor.add``/``add_``).

    Returns None for nodes that are not adds, and for ``torch.add`` with an ``alpha``.
    """
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        args = list(node.args) + [node.kwargs[k] for k in ("input", "other") if k in node.kwargs]
    elif node.op == "call_method" and node.target in ("add", "add_"):
        args = list(node.args) + [node.kwargs[k] for k in ("other",) if k in node.kwargs]
    else:
        return None
    if node.kwargs.get("alpha", 1) != 1 or len(args) != 2:
        return None
    return args[0], args[1]


def is_inplace_add(node: fx.Node) -> bool:
    """Whether ``node`` adds in place into its first operand (``a.add_(b)``, ``a += b``)."""
    return (node.op == "call_method" and node.target == "add_") or (
        node.op == "call_function" and node.target is operator.iadd)


# Python's augmented assignments and item assignment: they write their first operand in place.
_INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.setitem,
})
# Trailing-underscore methods that change a tensor's metadata, not its values.
_METADATA_METHODS = frozenset({"requires_grad_", "share_memory_", "record_stream", "resize_", "set_"})


@functools.lru_cache(maxsize=None)
def _inplace_parameter(target: Any) -> Optional[inspect.Signature]:
    """The signature of a function that takes an ``inplace`` parameter (``F.relu``), else None."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    return signature if "inplace" in signature.parameters else None


def written_input(node: fx.Node, module: Optional[nn.Module] = None) -> Optional[fx.Node]:
    """The node whose tensor ``node`` writes in place (its first argument), or None.

    In place are: Tensor methods and torch functions named with a trailing underscore
    (``x.relu_()``, ``torch.relu_``, ``out.add_(x)``), augmented and item assignment
    (``operator.iadd``, ``operator.setitem``), calls with ``inplace=True`` (``F.relu(x, True)``),
    and modules built with ``inplace=True`` (``nn.ReLU(inplace=True)``, timm's activations);
    ``module`` is the module a ``call_module`` node calls.
    """
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_module":
        return first if getattr(module, "inplace", False) is True else None
    if node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return first
    name = target_name(node.target)
    if name and name.endswith("_") and not name.startswith("_") and name not in _METADATA_METHODS:
        return first
    if node.kwargs.get("inplace") is True:
        return first
    signature = _inplace_parameter(node.target) if node.op == "call_function" and callable(node.target) else None
    if signature is not None:
        try:
            return first if signature.bind(*node.args, **node.kwargs).arguments.get("inplace") is True else None
        except TypeError:
            return None
    return None


#: Ops whose result may share its input's memory (views, and reshapes that may be views).
VIEW_OPS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
    "expand_as", "permute", "transpose", "t", "movedim", "swapaxes", "narrow", "select", "diagonal",
    "as_strided", "unfold", "detach", "contiguous", "split", "chunk", "unbind", "tensor_split", "getitem",
})


def is_view(node: fx.Node) -> bool:
    """Whether ``node``'s result may share memory with its first argument (a view of it)."""
    return (node.op in ("call_function", "call_method") and target_name(node.target) in VIEW_OPS
            and bool(node.args) and isinstance(node.args[0], fx.Node))


def is_mul(node: fx.Node) -> bool:
    """Whether ``node`` is a product (``*``, ``*=``, ``torch.mul``, ``Tensor.mul``/``mul_``)."""
    return (node.op == "call_function" and node.target in MUL_TARGETS) or (
        node.op == "call_method" and node.target in ("mul", "mul_"))


def is_conv_like(node: fx.Node, module: Optional[nn.Module]) -> bool:
    """A conv or linear: a module (or a leaf holding a weight matrix), ``F.conv*``/``F.linear``, a matmul.

    ``module`` is the module a ``call_module`` node calls (None for other nodes).
    """
    if module is not None:
        return isinstance(module, CONV_TYPES + LINEAR_TYPES) or module_has_weight_matrix(module)
    if node.op == "call_function" and node.target in CONV_FUNCTIONS:
        return True
    return node.op in ("call_function", "call_method") and target_name(node.target) in MATMUL_NAMES


def is_nonlinear(node: fx.Node, module: Optional[nn.Module]) -> bool:
    """An activation (module or call), or a leaf that is not a primitive layer.

    Products of two data tensors are nonlinear too; that needs the graph
    (:meth:`se_inject.sites.graph_index.GraphIndex.is_data_product`).
    """
    if module is not None:
        return is_activation_module(module) or not is_primitive_leaf(module)
    return is_activation_call(node.op, node.target)


def is_regularizer(node: fx.Node, module: Optional[nn.Module]) -> bool:
    """Identity at inference: drop-path, dropout, ``nn.Identity`` (modules or functions)."""
    if module is not None:
        return is_regularizer_module(module)
    return node.op == "call_function" and target_name(node.target) in ("dropout", "stochastic_depth", "drop_path")


def residual_activation(add: fx.Node, module_of: Any) -> Optional[str]:
    """The activation applied to ``add``'s result when that activation is the add's only reader and
    one an SE block can take over: a name of :data:`se_inject.layers.OUT_ACTS` but ``"none"``
    (``"relu"``, ``"silu"``: their modules by exact type, their functions and methods), else None.

    ``module_of(node)`` returns the module a ``call_module`` node calls.
    """
    if len(add.users) != 1:
        return None
    (act,) = add.users
    if not act.args or act.args[0] is not add or len(act.args) > 1 or set(act.kwargs) - {"inplace"}:
        return None
    if act.op == "call_module":
        m = module_of(act)
        return next((name for name, o in OUT_ACTS.items() if o.module is not None and type(m) is o.module), None)
    if act.op == "call_function":
        return next((name for name, o in OUT_ACTS.items() if any(act.target is f for f in o.functions)), None)
    if act.op == "call_method":
        return next((name for name, o in OUT_ACTS.items() if act.target in o.methods), None)
    return None
