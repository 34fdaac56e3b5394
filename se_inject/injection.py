"""``apply``, ``inject`` and ``find_sites``: SE blocks on the residual branches of a whole model.

The steps, each in its own module:

1. :mod:`se_inject.scopes` traces the model (or, where fx cannot, its submodules) and gives every
   node its shape from one forward on the example input;
2. :mod:`se_inject.sites` classifies every add: residual (branch + shortcut) or skipped, and why;
3. here, each residual add is assigned to the innermost module that holds its whole block (the
   *block*, e.g. ``layer1.0``); that module alone is re-traced, with the blocks inside it kept as
   leaves, and :mod:`se_inject.insert_pass` inserts the SE block before the add;
4. every rewritten block is verified: on the input it received in a real forward, its new graph
   (with a copying identity in place of SE) must reproduce the original module's output;
5. the verified blocks replace the originals in place, so the model keeps its class and every
   original state_dict key.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import gc
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Type, Union

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from .errors import (
    GraphModuleRootWarning,
    NoResidualAddsWarning,
    NotAModuleError,
    OptionError,
    RefusedModuleWarning,
    TraceError,
    VerificationError,
)
from .insert_pass import InsertionPoint, free_attribute_name, insert_modules
from .scopes import (
    Scope,
    TracedRootFails,
    Untraceable,
    discover_scopes,
    join_path,
    outputs_match,
    propagate_shapes,
)
from .se_block import ACT_LAYERS, GATE_LAYERS, SEBlock, resolve_layer, se_hidden_channels
from .sites import SKIP_REASONS, ResidualAdd, SkippedAdd, classify_adds
from .tracer import copy_hooks, graph_module_like, restore_hooks, stash_hooks, trace

__all__ = ["SEOptions", "Site", "Skip", "SitePlan", "Injection", "apply", "inject", "find_sites",
           "default_example_inputs"]

LayerSpec = Union[str, Type[nn.Module]]


@dataclass(frozen=True)
class SEOptions:
    """How SE blocks are built and where they go. Validated on construction.

    Attributes:
        reduction: reduction ratio r (hidden width about C / r); a positive integer.
        rd_divisor: round the hidden width to a multiple of this, as timm does (8); ``None`` for
            the paper's plain ``max(1, C // r)``.
        act_layer: activation of the excitation MLP, a name in ``ACT_LAYERS`` or a class.
        gate_layer: gate, a name in ``GATE_LAYERS`` or a class.
        identity_init: make every new block an exact identity at insertion (see
            :meth:`SEBlock.init_identity_`).
        include: glob patterns (``fnmatch``) on the block path, e.g. ``"layer4.*"``; only
            matching blocks get SE. ``None`` means all.
        exclude: glob patterns on the block path; matching blocks get no SE.
        min_channels: blocks with fewer channels at the add get no SE.
    """

    reduction: int = 16
    rd_divisor: Optional[int] = 8
    act_layer: LayerSpec = "relu"
    gate_layer: LayerSpec = "sigmoid"
    identity_init: bool = False
    include: Optional[tuple[str, ...]] = None
    exclude: tuple[str, ...] = ()
    min_channels: int = 1

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{name} must be a positive integer, got {value!r}")

        positive_int("reduction", self.reduction)
        if self.rd_divisor is not None:
            positive_int("rd_divisor", self.rd_divisor)
        positive_int("min_channels", self.min_channels)
        if not isinstance(self.identity_init, bool):
            raise OptionError(f"identity_init must be True or False, got {self.identity_init!r}")
        object.__setattr__(self, "include", None if self.include is None else _patterns("include", self.include))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))
        resolve_layer(self.act_layer, ACT_LAYERS, "act_layer")
        gate = resolve_layer(self.gate_layer, GATE_LAYERS, "gate_layer")
        if self.identity_init:
            SEBlock(8, rd_channels=2, gate_layer=gate).init_identity_()  # raises for a bad gate

    def hidden(self, channels: int) -> int:
        """Hidden width of the SE block for ``channels`` channels."""
        return se_hidden_channels(channels, self.reduction, self.rd_divisor)

    def make_block(self, channels: int, spatial_dims: int, *, device: Any = None, dtype: Any = None) -> SEBlock:
        """A new SE block for a site with ``channels`` channels."""
        block = SEBlock(channels, rd_channels=self.hidden(channels), act_layer=self.act_layer,
                        gate_layer=self.gate_layer, spatial_dims=spatial_dims, device=device, dtype=dtype)
        return block.init_identity_() if self.identity_init else block

    def selects(self, block: str) -> bool:
        """Whether the include / exclude patterns let ``block`` get SE."""
        if self.include is not None and not any(fnmatch.fnmatchcase(block, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(block, p) for p in self.exclude)


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise OptionError(f"{name} must be a glob pattern or a list of them, got {value!r}") from None
    if not all(isinstance(p, str) and p for p in patterns):
        raise OptionError(f"{name} must hold non-empty strings, got {value!r}")
    return patterns


@dataclass(frozen=True)
class Site:
    """A residual add that receives an SE block.

    Attributes:
        name: module path of the SE block (``"layer1.0.se"``); its state_dict keys start with it.
        block: module path of the block it goes into (``"layer1.0"``; ``""`` for the root).
        channels: channels C at the add; ``hidden``: the excitation width.
        shape: shape of the branch output at the add, for the example input (N, C, *spatial).
        shortcut: ``"identity"`` or the ops on the shortcut path (``"Conv2d > BatchNorm2d"``).
        add: name of the add node in the traced block.
    """

    name: str
    block: str
    channels: int
    hidden: int
    shape: tuple[int, ...]
    shortcut: str
    add: str

    @property
    def params(self) -> int:
        """Parameters of the SE block: ``2*C*hidden + hidden + C``."""
        return 2 * self.channels * self.hidden + self.hidden + self.channels


@dataclass(frozen=True)
class Skip:
    """An add that gets no SE block.

    Attributes:
        name: ``"<module path>:<add node>"`` of the add (``"<root>"`` for the root module).
        reason: a key of :data:`se_inject.sites.SKIP_REASONS`.
        detail: what was found, in words.
    """

    name: str
    reason: str
    detail: str

    @property
    def explanation(self) -> str:
        return SKIP_REASONS[self.reason]


@dataclass
class SitePlan:
    """The dry run's answer: where SE goes, which adds were skipped and why, what fx could not trace.

    Attributes:
        model: class name of the model.
        input_shapes: shapes of the example inputs used.
        options: the options the plan was made with.
        sites: residual adds that receive SE, in graph order.
        skipped: adds that do not, each with a reason.
        untraceable: modules fx could not trace whole (their children were analysed instead).
    """

    model: str
    input_shapes: list[tuple[int, ...]]
    options: SEOptions
    sites: list[Site] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    untraceable: list[Untraceable] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, list[Skip]]:
        """Skipped adds grouped by reason code, in order of first appearance."""
        groups: dict[str, list[Skip]] = {}
        for s in self.skipped:
            groups.setdefault(s.reason, []).append(s)
        return groups


@dataclass
class Injection:
    """What :func:`inject` returns: the new model and the plan it followed."""

    model: nn.Module
    plan: SitePlan


def default_example_inputs(model: nn.Module) -> tuple[torch.Tensor]:
    """One random image batch of size 1 matching the model.

    The size comes from timm's ``pretrained_cfg["input_size"]`` when the model has one, else
    3x224x224; device and dtype from the model's first floating parameter. A fixed seed keeps
    results reproducible.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = torch.randn((1, *size), generator=torch.Generator().manual_seed(0))
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


class _CopyingIdentity(nn.Module):
    """Stands in for SE during verification; copying exposes in-place ops that alias the branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


@dataclass
class _Candidate:
    """A residual add on its way to a block: which modules could hold it, innermost first."""

    scope: Scope
    verdict: ResidualAdd
    owners: list[tuple[Optional[str], str]]  # (nn_module_stack key or None for the scope root, path)
    level: int = 0

    @property
    def owner_path(self) -> str:
        return self.owners[self.level][1]


@dataclass
class _Rewrite:
    """A block, its rewritten GraphModule, and the SE names it holds (one per candidate).

    ``region`` holds the block's nodes in its scope's graph, ``input_node`` the one node outside
    it that the block reads (None for a scope root), ``output_node`` the one node read outside it.
    """

    path: str
    scope: Scope
    module: nn.Module
    gm: fx.GraphModule
    placements: list[tuple[str, _Candidate]]
    region: set[fx.Node]
    input_node: Optional[fx.Node]
    output_node: Optional[fx.Node]
    problem: Optional[str] = None


def _skip_name(scope: Scope, node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack", {})
    inner = list(stack.values())[-1][0] if stack else ""
    return f"{join_path(scope.path, inner) or '<root>'}:{node.name}"


def _owners_innermost_first(scope: Scope, verdict: ResidualAdd) -> list[tuple[Optional[str], str]]:
    stack = verdict.add.meta.get("nn_module_stack", {})
    inner = [(k, join_path(scope.path, stack[k][0])) for k in reversed(verdict.scope_keys)]
    return inner + [(None, scope.path)]


def _relative(path: str, prefix: str) -> str:
    return path[len(prefix) + 1 :] if prefix else path


def _calls_by_key(graph: fx.Graph) -> dict[Optional[str], list[tuple[str, Any]]]:
    """The (op, target) of every call, for the whole graph (key None) and per module call key."""
    calls: dict[Optional[str], list[tuple[str, Any]]] = {None: []}
    for node in graph.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            entry = (node.op, node.target)
            calls[None].append(entry)
            for key in node.meta.get("nn_module_stack", {}):
                calls.setdefault(key, []).append(entry)
    return calls


@functools.lru_cache(maxsize=None)
def _reads_training(cls: type) -> bool:
    """Whether the source of ``cls`` mentions ``training`` (True when the source is unknown)."""
    try:
        return "training" in inspect.getsource(cls)
    except (OSError, TypeError):
        return True


def _may_differ_in_train_mode(scope: Scope, key: Optional[str]) -> bool:
    """Whether any module whose code runs inline in the block (not leaves) reads ``training``.

    A block's traced graph can only differ between train and eval mode through Python code that
    reads ``self.training``; leaves run their own forward at run time and need no check.
    """
    for node in scope.gm.graph.nodes:
        stack = node.meta.get("nn_module_stack", {})
        if key is not None and key not in stack:
            continue
        entries = list(stack.items())
        if node.op == "call_module" and entries:
            entries = entries[:-1]  # the leaf itself
        if key is not None:
            entries = entries[[k for k, _ in entries].index(key):]
        if any(_reads_training(cls) for _, (_, cls) in entries if isinstance(cls, type)):
            return True
    return key is None and _reads_training(type(scope.module))


def _train_mode_calls(scope: Scope) -> Optional[dict[Optional[str], list[tuple[str, Any]]]]:
    """The calls of ``scope`` traced in train mode (None if it cannot be traced in train mode)."""
    flags = {id(m): m.training for m in scope.module.modules()}
    scope.module.train()
    try:
        return _calls_by_key(trace(scope.module).graph)
    except Exception:
        return None
    finally:
        for m in scope.module.modules():
            m.training = flags[id(m)]


def _single_input_forward(module: nn.Module) -> Optional[str]:
    """Name of the first parameter of ``module.forward`` if every other one has a default."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].kind not in positional:
        return None
    if any(p.default is inspect.Parameter.empty and p.kind in positional for p in params[1:]):
        return None
    return params[0].name


def _extract_block(
    path: str, key: Optional[str], candidates: list[_Candidate], inner: list[_Rewrite]
) -> Union[_Rewrite, str]:
    """The block at ``path`` as a GraphModule of its own, copied out of its scope's graph.

    The block's nodes are those of its module call (``key`` in their ``nn_module_stack``), or the
    whole scope graph when the block is the scope's root (``key`` None). Blocks already rewritten
    inside it collapse into one ``call_module`` each. A copying identity goes before each
    candidate's add. Returns a skip reason code when the block cannot stand on its own (it reads
    several outside values, returns several, or uses a constant of an enclosing module).
    """
    scope = candidates[0].scope
    owner_rel = _relative(path, scope.path) if path != scope.path else ""
    module = scope.module.get_submodule(owner_rel) if owner_rel else scope.module
    nodes = list(scope.gm.graph.nodes)
    if key is None:
        region = [n for n in nodes if n.op not in ("placeholder", "output")]
    else:
        region = [n for n in nodes if key in n.meta.get("nn_module_stack", {})]
    region_set = set(region)
    # Blocks already rewritten inside this one become single calls; only the outermost of them
    # (a block nested in another inner block is inside that block's call).
    inside = [rw for rw in inner if rw.scope is scope and rw.region <= region_set]
    outermost = [rw for rw in inside if not any(rw is not o and rw.region < o.region for o in inside)]
    collapsed: set[fx.Node] = set()
    by_output: dict[fx.Node, _Rewrite] = {}
    for rw in outermost:
        collapsed |= rw.region
        by_output[rw.output_node] = rw  # type: ignore[index]

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    input_node = None
    if key is None:
        for n in nodes:
            if n.op == "placeholder":
                env[n] = graph.node_copy(n)
    else:
        outside = {i for n in region for i in n.all_input_nodes if i not in region_set}
        name = _single_input_forward(module)
        if len(outside) != 1 or name is None:
            return "untraceable-block"
        (input_node,) = outside
        env[input_node] = graph.placeholder(name)
    for n in region:
        if n in collapsed:
            if n in by_output:
                rw = by_output[n]
                env[n] = graph.call_module(_relative(rw.path, path), (env[rw.input_node],))  # type: ignore[index]
            continue
        new = graph.node_copy(n, lambda x: env[x])
        if n.op in ("call_module", "get_attr"):
            if owner_rel and not n.target.startswith(owner_rel + "."):
                return "untraceable-block"
            new.target = _relative(n.target, owner_rel)
        env[n] = new
    if key is None:
        output = next(n for n in nodes if n.op == "output")
        graph.output(fx.map_arg(output.args[0], lambda x: env[x]))
        output_node = None
    else:
        read_outside = [n for n in region if any(u not in region_set for u in n.users)]
        if len(read_outside) != 1:
            return "untraceable-block"
        output_node = read_outside[0]
        graph.output(env[output_node])

    gm = graph_module_like(module, graph)
    points, placements, taken = [], [], set()
    for cand in candidates:
        v = cand.verdict
        tail, consumer = env.get(v.tail), env.get(v.consumer)
        if tail is None or consumer is None or v.consumer in collapsed:
            return "untraceable-block"
        name = free_attribute_name(gm, "se", taken)
        taken.add(name)
        points.append(InsertionPoint(tail, consumer, name, _CopyingIdentity()))
        placements.append((name, cand))
    insert_modules(gm, points)
    return _Rewrite(path, scope, module, gm, placements, region_set, input_node, output_node)


def _verify(model: nn.Module, rewrites: list[_Rewrite], example_inputs: tuple[Any, ...]) -> None:
    """Run the model once; at each block compare the rewritten graph with the module's output.

    SE stands as a copying identity in each rewritten graph, so a mismatch also exposes in-place
    ops that would alias the branch output. Sets ``problem`` on the blocks that do not match.
    """
    pending: dict[int, list[tuple[tuple, dict]]] = {}
    clone = (lambda t: t.clone() if isinstance(t, torch.Tensor) else t)

    def pre_hook(rw: _Rewrite):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            pending.setdefault(id(rw), []).append((tree_map(clone, args), tree_map(clone, kwargs)))
        return hook

    def post_hook(rw: _Rewrite):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            saved_args, saved_kwargs = pending[id(rw)].pop()
            if rw.problem is not None:
                return
            try:
                rw.problem = outputs_match(output, rw.gm(*saved_args, **saved_kwargs))
            except Exception as e:
                rw.problem = f"the traced graph fails: {type(e).__name__}: {e}"
        return hook

    if not rewrites:
        return
    handles = []
    for rw in rewrites:
        handles.append(rw.module.register_forward_pre_hook(pre_hook(rw), with_kwargs=True))
        handles.append(rw.module.register_forward_hook(post_hook(rw), with_kwargs=True))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()


def _runnable_scopes(model: nn.Module, example_inputs: tuple[Any, ...]
                     ) -> tuple[list[Scope], list[Untraceable], Any]:
    """Trace ``model`` into scopes that all run on what their modules receive, with shapes.

    Where a traced graph does not run, that module's children are traced instead, and again,
    until every scope runs. Returns the scopes, what could not be traced whole, and the output of
    the top scope's graph (or of the model, when its root is not traced).
    """
    skip: dict[str, str] = {}
    while True:
        scopes, untraceable = discover_scopes(model, skip=skip)
        if not scopes:
            first = untraceable[0].error if untraceable else "no module"
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__} (path '<root>') or any submodule that "
                f"could hold a residual add: {first}. Make the forward free of data-dependent control "
                f"flow, or apply se_inject to a traceable submodule."
            )
        try:
            traced_output, failed = propagate_shapes(model, scopes, example_inputs)
        except TracedRootFails as e:
            skip[""] = str(e)
            continue
        if not failed:
            return scopes, untraceable, traced_output
        skip.update({f.path: f.error for f in failed})


def _candidates(scopes: list[Scope], options: SEOptions, plan: SitePlan) -> list[_Candidate]:
    """Classify every add; record the skipped ones in ``plan`` and return the residual ones."""
    candidates: list[_Candidate] = []
    filtered_blocks: list[str] = []
    for scope in scopes:
        if scope.args is None:
            continue
        for verdict in classify_adds(scope.gm, batch_size=scope.batch_size):
            name = _skip_name(scope, verdict.add)
            if isinstance(verdict, SkippedAdd):
                plan.skipped.append(Skip(name, verdict.reason, verdict.detail))
                continue
            cand = _Candidate(scope, verdict, _owners_innermost_first(scope, verdict))
            block = cand.owner_path
            if scope.calls > 1 or any("@" in k for k in verdict.scope_keys):
                plan.skipped.append(Skip(name, "shared-module", f"{block or '<root>'} runs more than once"))
                continue
            if not options.selects(block):
                reason = f"block {block or '<root>'} not selected by include/exclude"
            elif verdict.channels < options.min_channels:
                reason = f"{verdict.channels} channels < min_channels={options.min_channels}"
            else:
                candidates.append(cand)
                continue
            plan.skipped.append(Skip(name, "filtered", reason))
            filtered_blocks.append(block)
    _check_filters(options, filtered_blocks, [c.owner_path for c in candidates])
    return candidates


def _build_blocks(candidates: list[_Candidate], plan: SitePlan) -> list[_Rewrite]:
    """Rewrite the block of every candidate, deepest blocks first.

    Building deepest first lets a block keep the blocks inside it as they are. A candidate whose
    block cannot stand on its own moves to the next enclosing module; one whose block traces
    differently in train mode is skipped (a GraphModule runs one graph, so the block would lose
    its train behaviour). A scope is traced again in train mode only when a block's inline code
    reads ``training``.
    """
    train_mode_calls: dict[int, Any] = {}

    def differs_in_train_mode(scope: Scope, key: Optional[str]) -> bool:
        if not _may_differ_in_train_mode(scope, key):
            return False
        if id(scope) not in train_mode_calls:
            train_mode_calls[id(scope)] = (_calls_by_key(scope.gm.graph), _train_mode_calls(scope))
        evaluated, trained = train_mode_calls[id(scope)]
        return trained is None or trained.get(key) != evaluated.get(key)

    built: dict[str, _Rewrite] = {}
    waiting: dict[str, list[_Candidate]] = {}
    for cand in candidates:
        waiting.setdefault(cand.owner_path, []).append(cand)
    while waiting:
        path = max(waiting, key=lambda p: (p.count(".") + bool(p), p))
        group = waiting.pop(path)
        scope, key = group[0].scope, group[0].owners[group[0].level][0]
        if differs_in_train_mode(scope, key):
            result: Union[_Rewrite, str] = "train-eval-differ"
        else:
            inner = [r for p, r in built.items() if path == "" or p.startswith(path + ".")]
            result = _extract_block(path, key, group, inner)
        if isinstance(result, _Rewrite):
            built[path] = result
            continue
        for cand in group:
            if result == "untraceable-block" and cand.level + 1 < len(cand.owners):
                cand.level += 1
                waiting.setdefault(cand.owner_path, []).append(cand)
            else:
                plan.skipped.append(Skip(_skip_name(cand.scope, cand.verdict.add), result, f"block {path or '<root>'}"))
    return list(built.values())


def _plan(
    model: nn.Module, options: SEOptions, example_inputs: tuple[Any, ...], strict: bool
) -> tuple[SitePlan, list[_Rewrite]]:
    """Everything but the swap: find the sites, build and verify the rewritten blocks."""
    scopes, untraceable, traced_output = _runnable_scopes(model, example_inputs)
    if scopes[0].path == "":  # the traced model must reproduce the model itself
        with torch.no_grad():
            scopes[0].faithful = outputs_match(model(*example_inputs), traced_output) is None
    plan = SitePlan(type(model).__name__, [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)],
                    options, untraceable=untraceable)
    candidates = _candidates(scopes, options, plan)
    rewrites = _build_blocks(candidates, plan)

    # Scopes whose traced graph did not reproduce their module: verify each block on its own.
    _verify(model, [rw for rw in rewrites if not rw.scope.faithful], example_inputs)
    verified = []
    for rw in rewrites:
        if rw.problem is None:
            verified.append(rw)
            continue
        message = (f"the traced graph of {rw.path or '<root>'} ({type(rw.module).__name__}) does not "
                   f"reproduce the module's output ({rw.problem}); its residual adds get no SE.")
        if strict:
            raise VerificationError(message + " Exclude it with exclude=[...] or pass strict=False.")
        warnings.warn(message, RefusedModuleWarning, stacklevel=4)
        for _, cand in rw.placements:
            plan.skipped.append(Skip(_skip_name(cand.scope, cand.verdict.add), "unverified", rw.problem))

    order = {id(c): i for i, c in enumerate(candidates)}
    placed = sorted(((order[id(cand)], rw, name, cand) for rw in verified for name, cand in rw.placements),
                    key=lambda t: t[0])
    for _, rw, name, cand in placed:
        v = cand.verdict
        plan.sites.append(Site(
            name=join_path(rw.path, name), block=rw.path, channels=v.channels,
            hidden=options.hidden(v.channels), shape=v.shape,
            shortcut=" > ".join(v.shortcut_ops) or "identity", add=v.add.name,
        ))
    return plan, verified


def _check_filters(options: SEOptions, filtered: list[str], selected: list[str]) -> None:
    """Refuse filters that cannot be meant: an include pattern matching no block, or no block left."""
    if options.include is not None:
        blocks = filtered + selected
        for pattern in options.include:
            if not any(fnmatch.fnmatchcase(b, pattern) for b in blocks):
                raise OptionError(f"include pattern {pattern!r} matches no block with a residual add; "
                                  f"blocks are e.g. {sorted(set(blocks))[:6]}")
    if filtered and not selected:
        raise OptionError(f"the filters (include={options.include}, exclude={list(options.exclude)}, "
                          f"min_channels={options.min_channels}) leave out all {len(filtered)} residual "
                          f"adds; loosen them")


def _install(model: nn.Module, rewrites: list[_Rewrite], options: SEOptions,
             training: dict[int, bool]) -> nn.Module:
    """Swap the SE blocks in, then the rewritten blocks into the model (parents first)."""
    for rw in rewrites:
        mode = training.get(id(rw.module), False)
        param = next((p for p in rw.module.parameters() if p.is_floating_point()), None)
        for name, cand in rw.placements:
            v = cand.verdict
            se = options.make_block(v.channels, len(v.shape) - 2, device=param.device if param is not None else None,
                                    dtype=v.dtype)
            setattr(rw.gm, name, se.train(mode))
        rw.gm.training = mode
        copy_hooks(rw.module, rw.gm)
    for rw in sorted(rewrites, key=lambda r: (r.path.count(".") + bool(r.path))):
        if rw.path == "":
            warnings.warn(
                f"{type(model).__name__}'s own forward holds a residual add, so the returned model is a "
                f"GraphModule: its state_dict is unchanged but methods of {type(model).__name__} are gone.",
                GraphModuleRootWarning, stacklevel=3)
            model = rw.gm
            continue
        parent_path, _, child = rw.path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, rw.gm)
    return model


def _options(reduction: int = 16, rd_divisor: Optional[int] = 8, act_layer: LayerSpec = "relu",
             gate_layer: LayerSpec = "sigmoid", identity_init: bool = False,
             include: Union[str, Sequence[str], None] = None, exclude: Union[str, Sequence[str]] = (),
             min_channels: int = 1) -> SEOptions:
    return SEOptions(reduction, rd_divisor, act_layer, gate_layer, identity_init,
                     None if include is None else _patterns("include", include),
                     _patterns("exclude", exclude), min_channels)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise NotAModuleError(f"se_inject needs a torch.nn.Module, got {type(model).__name__}; "
                              f"build the model first (e.g. timm.create_model(name)).")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[dict[int, bool]]:
    """Put ``model`` in eval mode, then give every module back its own training flag.

    Yields the saved flags, by ``id`` of the module.
    """
    training = {id(m): m.training for m in model.modules()}
    model.eval()
    try:
        yield training
    finally:
        for m in model.modules():
            m.training = training.get(id(m), m.training)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: tracing makes many short-lived node cycles, and
    a full collection over a large model's objects stalls for a good fraction of a second."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _planned(model: nn.Module, options: SEOptions, inputs: tuple[Any, ...], strict: bool
             ) -> tuple[SitePlan, list[_Rewrite], dict[int, bool]]:
    """Plan on ``model`` in eval mode without its hooks, then restore both."""
    if not isinstance(strict, bool):
        raise OptionError(f"strict must be True or False, got {strict!r}")
    hooks = stash_hooks(model)
    try:
        with eval_mode(model) as training:
            plan, rewrites = _plan(model, options, inputs, strict)
    finally:
        restore_hooks(model, hooks)
    return plan, rewrites, training


def inject(
    model: nn.Module,
    *,
    reduction: int = 16,
    rd_divisor: Optional[int] = 8,
    act_layer: LayerSpec = "relu",
    gate_layer: LayerSpec = "sigmoid",
    identity_init: bool = False,
    include: Union[str, Sequence[str], None] = None,
    exclude: Union[str, Sequence[str]] = (),
    min_channels: int = 1,
    example_inputs: Any = None,
    inplace: bool = False,
    strict: bool = False,
) -> Injection:
    """Insert an SE block on the residual branch of every residual add of ``model``.

    Same as :func:`apply`, but returns the :class:`SitePlan` it followed with the model.
    """
    _check_model(model)
    options = _options(reduction, rd_divisor, act_layer, gate_layer, identity_init, include, exclude,
                       min_channels)
    if not isinstance(inplace, bool):
        raise OptionError(f"inplace must be True or False, got {inplace!r}")
    inputs = _as_inputs(model, example_inputs)
    with _gc_paused():
        target = model if inplace else copy.deepcopy(model)
        plan, rewrites, training = _planned(target, options, inputs, strict)
        if plan.sites:
            return Injection(_install(target, rewrites, options, training), plan)
    reasons = ", ".join(f"{r} x{len(s)}" for r, s in plan.skipped_by_reason().items()) or "no adds at all"
    warnings.warn(f"{type(model).__name__} has no residual add that can take an SE block ({reasons}); "
                  f"it is returned unchanged.", NoResidualAddsWarning, stacklevel=2)
    return Injection(target, plan)


def apply(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Return ``model`` with an SE block before every residual add, on the residual branch.

    The model is traced with ``torch.fx``; each residual add ``F(x) + shortcut(x)`` becomes
    ``SE(F(x)) + shortcut(x)``, the shortcut untouched. Only the blocks that hold such adds are
    rewritten, each into a GraphModule swapped in place, so the model keeps its class, methods
    and every original state_dict key; each SE block adds ``<block>.se.fc1/fc2`` keys, the same
    keys as timm's hand-written SE models.

    Args:
        model: any ``nn.Module``; left untouched unless ``inplace=True``.
        reduction: SE reduction ratio r (default 16).
        rd_divisor: round hidden widths to multiples of this (timm's rule, default 8); ``None``
            for ``max(1, C // r)``.
        act_layer, gate_layer: excitation activation and gate (names or classes).
        identity_init: start every SE block as an exact identity (outputs unchanged, all SE
            parameters still get gradients); see :meth:`SEBlock.init_identity_`.
        include, exclude: glob patterns on block paths (``"layer4.*"``) to select blocks.
        min_channels: leave out blocks with fewer channels.
        example_inputs: a tensor or tuple used to trace shapes and verify; by default one
            random (1, 3, H, W) image sized from timm's ``pretrained_cfg`` or 224x224.
        inplace: rewrite ``model`` itself instead of a deep copy.
        strict: raise :class:`VerificationError` when a block's traced graph does not reproduce
            it, instead of warning and leaving that block alone.

    Returns:
        The model with SE blocks (the same object when ``inplace=True``). A model with no
        residual add gives a :class:`NoResidualAddsWarning` and an unchanged copy.

    Raises:
        NotAModuleError, OptionError, TraceError, ExampleInputError, VerificationError.

    Example:
        >>> import timm, se_inject
        >>> se_model = se_inject.apply(timm.create_model("resnet18"), reduction=16)
        >>> type(se_model).__name__, sum(p.numel() for p in se_model.parameters())
        ('ResNet', 11779624)
    """
    return inject(model, **kwargs).model


def find_sites(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    strict: bool = False,
    **options: Any,
) -> SitePlan:
    """Dry run of :func:`apply`: where SE would go, which adds are skipped and why.

    Takes the options of :func:`apply` and changes nothing: the analysis, the verification
    included, runs on a copy of ``model``.

    Example:
        >>> import torchvision, se_inject
        >>> plan = se_inject.find_sites(torchvision.models.resnet18())
        >>> [s.name for s in plan.sites][:3]
        ['layer1.0.se', 'layer1.1.se', 'layer2.0.se']
    """
    _check_model(model)
    opts = _options(**options)
    inputs = _as_inputs(model, example_inputs)
    with _gc_paused():
        plan, _, _ = _planned(copy.deepcopy(model), opts, inputs, strict)
    return plan
