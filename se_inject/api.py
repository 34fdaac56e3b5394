"""``apply``, ``inject`` and ``find_sites``: SE blocks on the residual branches of a whole model.

The three take the same options (:class:`se_inject.options.SEOptions`), listed in their
signatures and docstrings; the work is done by :mod:`se_inject.rewrite.pipeline`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from typing import Any, Iterator, Mapping, Union

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .errors import ExampleInputError, NoResidualAddsWarning, NotAModuleError, OptionError
from .modules.build import check_options
from .options import SEOptions, takes_options
from .plan import Injection, SitePlan
from .rewrite.cut import BlockRewrite
from .rewrite.pipeline import analyse, install
from .trace import hf
from .trace.tracer import TRACE_LOCK, global_hooks_suspended, restore_hooks, stash_hooks
from .utils import eval_mode, gc_paused, rng_kept, torch_defaults, warn

__all__ = ["apply", "inject", "find_sites", "default_example_inputs", "checked_options"]

#: se_inject's calls take turns: they share fx's process-wide patching (see tracer.TRACE_LOCK).
_LOCK = TRACE_LOCK


def _wrapper_classes() -> list[tuple[type, str, str]]:
    """The wrappers se_inject refuses, by class: (class, what it is, what to do instead). A class
    from a module not imported yet cannot have instances, so nothing is imported here."""
    found: list[tuple[type, str, str]] = []
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is not None and hasattr(dynamo, "OptimizedModule"):
        found.append((dynamo.OptimizedModule, "compiled by torch.compile, whose compiled code would not run the "
                                              "new SE blocks",
                      "apply se_inject to the original module, `._orig_mod`, and compile the result "
                      "(torch.compile(se_inject.apply(model._orig_mod)))"))
    unwrap = ("apply se_inject to its `.module` before wrapping it "
              "(model = Wrapper(se_inject.apply(model.module)))")
    found.append((nn.parallel.DistributedDataParallel, "wrapped in DistributedDataParallel, whose reducer would not "
                                                       "see the new SE parameters", unwrap))
    found.append((nn.DataParallel, "wrapped in DataParallel, whose replicas are made from the module it was given",
                  unwrap))
    fsdp = sys.modules.get("torch.distributed.fsdp")
    shard = ("apply se_inject to the unsharded model, then shard it (fully_shard(se_inject.apply(model)), "
             "or FSDP(se_inject.apply(model)))")
    for name in ("FullyShardedDataParallel", "FSDPModule"):  # FSDP1's wrapper, FSDP2's fully_shard class
        cls = getattr(fsdp, name, None) if fsdp is not None else None
        if isinstance(cls, type):
            found.append((cls, f"sharded by FSDP ({name}), whose flat or sharded parameters would not hold the "
                               f"new SE parameters", shard))
    return found


def default_example_inputs(model: nn.Module) -> tuple[torch.Tensor]:
    """One random image batch of size 1 matching the model.

    The size comes from timm's ``pretrained_cfg["input_size"]`` when the model has one, else from
    a Hugging Face model's ``config`` (``num_channels``, ``image_size``), else 3x224x224; device
    and dtype from the model's first floating parameter. A fixed seed keeps results reproducible.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(cfg.get("input_size") or hf.default_input_size(model) or (3, 224, 224))
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = torch.randn((1, *size), generator=torch.Generator().manual_seed(0), device="cpu")
    return (x.to(device=device, dtype=dtype),)


def _as_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is None:
        return default_example_inputs(model)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise OptionError(f"example_inputs must be a tensor or a non-empty tuple of inputs, got "
                      f"{type(example_inputs).__name__}")


def _check_model(model: Any) -> None:
    """Refuse what se_inject cannot rewrite, before any work: it names the module and the fix."""
    if not isinstance(model, nn.Module):
        raise NotAModuleError(f"se_inject needs a torch.nn.Module, got {type(model).__name__}; "
                              f"build the model first (e.g. timm.create_model(name)).")
    wrappers = _wrapper_classes()
    for path, m in model.named_modules():
        for cls, what, fix in wrappers:
            if isinstance(m, cls):
                where = "the model" if not path else f"{path}, a submodule of {type(model).__name__},"
                raise NotAModuleError(f"{where} ({type(m).__name__}) is {what}; {fix}.")
        lazy = isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
        if lazy:
            raise NotAModuleError(f"{path or '<root>'} ({type(m).__name__}) is a lazy module whose parameters do not "
                                  f"exist yet; run one forward of the model first, then apply se_inject.")
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise NotAModuleError(f"{type(model).__name__} has tensors on the meta device, which cannot run the example "
                              f"forward se_inject needs; materialise it first (model.to_empty(device='cpu') and "
                              f"load its weights).")


def _check_inputs(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    """The example inputs must fit the model's forward and be real, non-empty tensors.

    Every check se_inject makes compares outputs on the example input (the traced graph against
    the model, each rewritten block against its module), and on a tensor with no elements (a
    batch of 0, a 0x0 image) each comparison would pass whatever the graphs compute: such an
    input is refused. A batch of 1 (the default) is enough: the analysis runs in eval mode only
    (train mode is traced, never run), so BatchNorm's "more than 1 value per channel" rule for
    training never applies to the example.
    """
    leaves = [x for x in tree_flatten(list(inputs))[0] if isinstance(x, torch.Tensor)]
    if any(x.is_meta for x in leaves):
        raise ExampleInputError("example_inputs are on the meta device; pass real tensors (e.g. torch.randn(...)).")
    empty = next((x for x in leaves if x.numel() == 0), None)
    if empty is not None:
        raise ExampleInputError(
            f"example_inputs holds a tensor of shape {tuple(empty.shape)}, which has no elements: every output "
            f"se_inject compares to verify {type(model).__name__} would then match whatever it computes. Pass "
            f"a non-empty example (e.g. a batch of 1 or 2 of the model's input size).")
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*inputs)
    except TypeError:
        params = [p.name for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        raise ExampleInputError(
            f"{type(model).__name__}.forward takes {len(params)} input{'s' if len(params) != 1 else ''} "
            f"({', '.join(params)}) but example_inputs has {len(inputs)}; pass example_inputs=(...) with one "
            f"value per input.") from None


@contextlib.contextmanager
def _session() -> Iterator[None]:
    """What every call runs under: its turn on the lock, no GC pauses, real tensors (new
    parameters made under ``torch.inference_mode`` could never be trained), no global module
    hooks running in this thread (the model's own hooks are stashed by :func:`_analysed`), and
    torch's defaults (:func:`~se_inject.utils.torch_defaults`): a caller's ambient device (``with
    torch.device("meta")``, ``torch.set_default_device``) and autocast region are switched off,
    so that the model is analysed, traced and verified in its own dtype, and SE blocks are built
    on each site's device and in its dtype, not in the caller's autocast dtype."""
    with _LOCK, gc_paused(), torch.inference_mode(False), global_hooks_suspended(), torch_defaults():
        yield


def checked_options(options: Union[SEOptions, Mapping[str, Any]], caller: str = "SEOptions") -> SEOptions:
    """The options (keyword arguments of ``caller``, or options already built), checked in full
    before any analysis: each value on its own (:class:`SEOptions`), then against the attention
    (:func:`se_inject.modules.build.check_options`). ``apply`` / ``inject`` / ``find_sites`` call it
    once per call, and so do :func:`se_inject.bench` and the recipe reader, so that every way in
    fails the same way, before any work.

    The checks run layers and small attention modules, which global hooks must not see; and
    without gradients, since a global backward hook alone makes torch wrap every module output in
    a ``BackwardHookFunction``, on which the gate's in-place ops would fail.

    Raises:
        OptionError: an unknown option, a bad value, or options the attention cannot take.
    """
    with global_hooks_suspended(), torch.no_grad():
        built = options if isinstance(options, SEOptions) else SEOptions.from_kwargs(options, caller=caller)
        check_options(built)
    return built


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionError(f"{name} must be True or False, got {value!r}")


def _analysed(model: nn.Module, options: SEOptions, inputs: tuple[Any, ...], strict: bool):
    """Plan on a deep copy of ``model``, in eval mode and without its hooks (transformers'
    output-capturing hooks aside, which are part of what it computes: see :mod:`se_inject.trace.hf`):
    the analysis runs the model's code, which may write to it, and the caller's model must never
    see that."""
    _check_inputs(model, inputs)
    work = copy.deepcopy(model)
    hf.prepare(work)  # transformers' capturing hooks, which the analysis keeps (see se_inject.trace.hf)
    hooks = stash_hooks(work)
    try:
        with eval_mode(work):
            plan, rewrites = analyse(work, options, inputs, strict)
    finally:
        restore_hooks(work, hooks)
    return work, plan, rewrites


def _check_inplace_possible(model: nn.Module, plan: SitePlan, rewrites: list[BlockRewrite]) -> None:
    """``inplace=True`` must convert the object passed in completely. A residual add in the root's
    own forward rewrites the root into a new GraphModule, which cannot take the place of the
    caller's object: refuse, before anything is changed, rather than leave the caller's model
    half converted (its blocks with SE, its own add without)."""
    if not any(rw.path == "" for rw in rewrites):
        return
    adds = [s.add for s in plan.sites if s.block == ""]
    raise OptionError(
        f"inplace=True cannot convert {type(model).__name__} itself: its own forward holds a residual add "
        f"({', '.join(adds)}), so the converted model is a new GraphModule, and the object passed in would be "
        f"left half converted. Call with inplace=False (the default) and use the returned model; nothing was "
        f"changed.")


@takes_options
def inject(model: nn.Module, *, example_inputs: Any = None, inplace: bool = False, strict: bool = False,
           **options: Any) -> Injection:
    """Insert an SE block on the residual branch of every residual add of ``model``.

    Same as :func:`apply`, but returns the :class:`~se_inject.plan.SitePlan` it followed with the
    model (``result.model``, ``result.plan``).

    Options:
        {options}
    """
    opts = checked_options(options, "inject")
    _check_flag("inplace", inplace)
    _check_flag("strict", strict)
    _check_model(model)
    inputs = _as_inputs(model, example_inputs)
    with _session():
        work, plan, rewrites = _analysed(model, opts, inputs, strict)
        if inplace:
            _check_inplace_possible(model, plan, rewrites)
        target = model if inplace else work
        if plan.sites:
            with hf.prepared(target):  # transformers' lazy hooks, installed now so that rewritten blocks keep them
                return Injection(install(target, rewrites, opts), plan)
    warn(f"{type(model).__name__} has no residual add that can take an SE block ({plan.skip_summary()}); "
         f"it is returned unchanged.", NoResidualAddsWarning)
    return Injection(target, plan)


@takes_options
def apply(model: nn.Module, *, example_inputs: Any = None, inplace: bool = False, strict: bool = False,
          **options: Any) -> nn.Module:
    """Return ``model`` with an SE block before every residual add, on the residual branch.

    The model is traced with ``torch.fx``; each residual add ``F(x) + shortcut(x)`` becomes
    ``SE(F(x)) + shortcut(x)``, the shortcut untouched. Only the blocks that hold such adds are
    rewritten, each into a GraphModule swapped in place, so the model keeps its class, methods
    and every original state_dict key; each SE block adds ``<block>.se.fc1/fc2`` keys, the same
    keys as timm's hand-written SE models.

    Args:
        model: any ``nn.Module``; left untouched unless ``inplace=True``. The analysis always
            runs on a deep copy; with ``inplace=True`` only the final swap touches ``model``,
            and a failed call leaves it exactly as it was.
        inplace: rewrite ``model`` itself instead of a deep copy: every site goes into the object
            passed in, or none does. A model whose root forward holds a residual add cannot be
            converted in place (its rewritten root is a new GraphModule, not the object passed
            in): that is an :class:`OptionError`, raised before anything is changed.
        example_inputs: a tensor or tuple used to trace shapes and verify; by default one
            random (1, 3, H, W) image sized from timm's ``pretrained_cfg`` or 224x224.
        strict: raise :class:`VerificationError` when a block's traced graph does not reproduce
            it, instead of warning and leaving that block alone.

    Options (keyword-only, see :class:`~se_inject.options.SEOptions`):
        {options}

    Returns:
        The model with SE blocks (the same object when ``inplace=True``). A model with no
        residual add gives a :class:`NoResidualAddsWarning` and an unchanged copy (the model
        itself, unchanged, when ``inplace=True``).

    Raises:
        NotAModuleError, OptionError, TraceError, ExampleInputError, VerificationError.

    Example:
        >>> import timm, se_inject
        >>> se_model = se_inject.apply(timm.create_model("resnet18"), reduction=16)
        >>> type(se_model).__name__, sum(p.numel() for p in se_model.parameters())
        ('ResNet', 11779624)
    """
    return inject(model, example_inputs=example_inputs, inplace=inplace, strict=strict, **options).model


@takes_options
def find_sites(model: nn.Module, *, example_inputs: Any = None, strict: bool = False, **options: Any) -> SitePlan:
    """Dry run of :func:`apply`: where SE would go, which adds are skipped and why.

    Takes the options of :func:`apply` and changes nothing: the analysis, the verification
    included, runs on a copy of ``model``.

    Options:
        {options}

    Example:
        >>> import torchvision, se_inject
        >>> plan = se_inject.find_sites(torchvision.models.resnet18())
        >>> [s.name for s in plan.sites][:3]
        ['layer1.0.se', 'layer1.1.se', 'layer2.0.se']
    """
    if "inplace" in options:
        raise OptionError("find_sites() never changes the model, so it takes no inplace option; "
                          "apply() and inject() do")
    opts = checked_options(options, "find_sites")
    _check_flag("strict", strict)
    _check_model(model)
    inputs = _as_inputs(model, example_inputs)
    with _session(), rng_kept(model):  # the modules analyse builds must not draw from the caller's RNG
        _, plan, _ = _analysed(model, opts, inputs, strict)
    return plan
