"""Cut the block that holds a residual add out of its scope's graph, as a GraphModule of its own.

The *block* of a residual add is the innermost module holding the whole residual block (the
fork excluded), e.g. ``layer1.0``. Its nodes are copied out of the scope's graph (no second
trace); blocks already rewritten inside it collapse into one ``call_module`` each; a copying
identity goes before each add, where the SE block will go, so that verification can run the new
graph. A block that cannot stand on its own (it reads several outside values, returns several,
or uses a module outside itself) is retried at the next enclosing module.

Where SE sits right before the add (no trailing drop-path between), the SE block takes the add
over, and the activation module that is the add's only reader: ``se(branch, shortcut)`` computes
``act(SE(branch) + shortcut)``, one fused pass on CUDA (see :class:`se_inject.modules.se_block.SEBlock`).
The module stays in the block, and SE calls it where traces and hooks need it
(:meth:`~se_inject.modules.se_block.SEResidual.stand_for_activation_`); a functional activation has no
module to call, so it stays in the graph, under its node name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import fx, nn

from ..layers import OUT_ACTS
from ..sites.classify import ResidualAdd
from ..sites.placement import Place, describe
from ..trace.ops import is_inplace_add, residual_activation
from ..trace.scopes import Scope
from ..trace.train_mode import TrainModeCheck
from ..utils import join_path, relative_path
from .insert_pass import InsertionPoint, free_attribute_name, insert_modules
from .rewritten import graph_module_like

__all__ = ["Candidate", "Placement", "BlockRewrite", "skip_name", "build_blocks"]


class StandIn(nn.Module):
    """Stands in for SE during verification: a copying identity (copying exposes in-place ops that
    alias the branch), which also does the residual add and activation SE takes over."""

    def __init__(self, out_act: str = "none", add_in_place: bool = False) -> None:
        super().__init__()
        self.out_act, self.add_in_place = out_act, add_in_place

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = x.clone()
        if shortcut is not None:
            y = y.add_(shortcut) if self.add_in_place else y + shortcut
        return OUT_ACTS[self.out_act].function(y)


class Placement(NamedTuple):
    """An SE block in a rewritten block: its attribute name, its add, and the residual tail it
    takes over (``fused``: the activation after the add, ``"none"`` for none; None when SE sits
    before the add and the add stays). ``activation`` is the path, in the block, of the
    activation module SE computes for (see :meth:`SEResidual.stand_for_activation_`)."""

    name: str
    candidate: "Candidate"
    fused: Optional[str]
    add_in_place: bool
    activation: Optional[str] = None


def skip_name(scope: Scope, node: fx.Node) -> str:
    """``"<module path>:<node name>"`` of a node of ``scope``'s graph, as the plan reports adds."""
    stack = node.meta.get("nn_module_stack", {})
    inner = list(stack.values())[-1][0] if stack else ""
    return f"{join_path(scope.path, inner) or '<root>'}:{node.name}"


@dataclass
class Candidate:
    """A residual add on its way to a block: which modules could hold it, innermost first.

    ``owners`` holds (``nn_module_stack`` key, or None for the scope root; module path) pairs;
    ``level`` is the one currently tried. ``place`` is where a ``position`` other than
    ``"branch"`` puts the module (None: before the add, at ``verdict.tail``); ``where`` describes
    it in the block, and ``module`` is the module built for it.
    """

    scope: Scope
    verdict: ResidualAdd
    owners: list[tuple[Optional[str], str]]
    level: int = 0
    place: Optional[Place] = None
    where: str = ""
    module: Optional[nn.Module] = None

    @classmethod
    def of(cls, scope: Scope, verdict: ResidualAdd) -> "Candidate":
        stack = verdict.add.meta.get("nn_module_stack", {})
        inner = [(k, join_path(scope.path, stack[k][0])) for k in reversed(verdict.scope_keys)]
        return cls(scope, verdict, inner + [(None, scope.path)])

    @property
    def owner_key(self) -> Optional[str]:
        return self.owners[self.level][0]

    @property
    def owner_path(self) -> str:
        return self.owners[self.level][1]

    @property
    def name(self) -> str:
        return skip_name(self.scope, self.verdict.add)


@dataclass
class BlockRewrite:
    """A block, its rewritten GraphModule, and the SE names it holds (one per candidate).

    ``region`` holds the block's nodes in its scope's graph, ``input_node`` the one node outside
    it that the block reads (None for a scope root), ``output_node`` the one node read outside it.
    """

    path: str
    scope: Scope
    module: nn.Module
    gm: fx.GraphModule
    placements: list[Placement]
    region: set[fx.Node]
    input_node: Optional[fx.Node]
    output_node: Optional[fx.Node]


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


class _Cannot(Exception):
    """The block cannot stand on its own as a GraphModule."""


class _Extraction:
    """The copy of one block's region into a graph of its own (see :func:`extract_block`)."""

    def __init__(self, path: str, key: Optional[str], scope: Scope, inner: list[BlockRewrite]) -> None:
        self.path, self.key, self.scope = path, key, scope
        self.owner = relative_path(path, scope.path) if path != scope.path else ""
        self.module = scope.module.get_submodule(self.owner) if self.owner else scope.module
        self.nodes = list(scope.gm.graph.nodes)
        if key is None:
            self.region = [n for n in self.nodes if n.op not in ("placeholder", "output")]
        else:
            self.region = [n for n in self.nodes if key in n.meta.get("nn_module_stack", {})]
        self.region_set = set(self.region)
        # Blocks already rewritten inside this one become single calls; only the outermost of
        # them (a block nested in another inner block is inside that block's call).
        inside = [rw for rw in inner if rw.scope is scope and rw.region <= self.region_set]
        outermost = [rw for rw in inside if not any(rw is not o and rw.region < o.region for o in inside)]
        self.collapsed = set().union(*(rw.region for rw in outermost)) if outermost else set()
        self.by_output = {rw.output_node: rw for rw in outermost}
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        # How the module was really called and what it returned, when the search recorded it.
        self.call = scope.recording.get(self.module) if scope.recording is not None else None

    def inputs(self) -> Optional[fx.Node]:
        """Placeholders: the scope's own, or one for the single outside value the block reads."""
        if self.key is None:
            if self.scope.specialised:  # its graph takes only tensors: callers passing options would break
                raise _Cannot
            for n in self.nodes:
                if n.op == "placeholder":
                    self.env[n] = self.graph.node_copy(n)
            return None
        outside = {i for n in self.region for i in n.all_input_nodes if i not in self.region_set}
        name = _single_input_forward(self.module)
        if len(outside) != 1 or name is None or (self.call is not None and self.call.passed != 1):
            raise _Cannot  # the graph takes one input; a caller passing options too would break
        (input_node,) = outside
        self.env[input_node] = self.graph.placeholder(name)
        return input_node

    def body(self) -> None:
        """Copy the region's nodes, collapsing inner rewritten blocks into single calls."""
        for n in self.region:
            if n in self.collapsed:
                if n in self.by_output:
                    rw = self.by_output[n]
                    self.env[n] = self.graph.call_module(relative_path(rw.path, self.path),
                                                         (self.env[rw.input_node],))  # type: ignore[index]
                continue
            new = self.graph.node_copy(n, lambda x: self.env[x])
            if n.op in ("call_module", "get_attr"):
                if self.owner and not n.target.startswith(self.owner + "."):  # type: ignore[union-attr]
                    raise _Cannot
                new.target = relative_path(n.target, self.owner)  # type: ignore[arg-type]
            self.env[n] = new

    def output(self) -> Optional[fx.Node]:
        """The output: the scope's own, or the one node of the region read outside it."""
        if self.key is None:
            output = next(n for n in self.nodes if n.op == "output")
            self.graph.output(fx.map_arg(output.args[0], lambda x: self.env[x]))
            return None
        read_outside = [n for n in self.region if any(u not in self.region_set for u in n.users)]
        if len(read_outside) != 1:
            raise _Cannot
        # The caller may have read the module's output through a tuple or ModelOutput that fx
        # resolved while tracing (``layer(x)[0]``): return that structure again.
        output = self.env[read_outside[0]]
        if self.call is not None:
            output = self.call.output_like(output)
        if output is None or isinstance(output, dict):  # a ModelOutput would come back a plain dict
            raise _Cannot
        self.graph.output(output)
        return read_outside[0]

    def identities(self, gm: fx.GraphModule, candidates: list[Candidate], fuse: bool) -> list[Placement]:
        """Insert a stand-in before each candidate's add, where SE will go; where SE can take the
        add over (and the activation after it), the stand-in does that too."""
        points, placements, taken = [], [], set()
        for cand in candidates:
            v = cand.verdict
            if cand.place is not None:
                found = cand.place.resolve(self.env, self.collapsed, gm)
                if found is None:
                    raise _Cannot
                tail, (consumer, *also) = found
            else:
                tail, consumer, also = self.env.get(v.tail), self.env.get(v.consumer), []
                if tail is None or consumer is None or v.consumer in self.collapsed:
                    raise _Cannot
            name = free_attribute_name(gm, "se", taken)
            taken.add(name)
            cand.where = describe(tail, [consumer, *also])
            point = InsertionPoint(tail, consumer, name, StandIn(), also=tuple(also))
            fusable = (fuse and cand.place is None and v.consumer is v.add
                       and not (is_inplace_add(consumer) and consumer.args[0] is not tail))
            if fusable:
                out_act = residual_activation(consumer, lambda n: gm.get_submodule(str(n.target)))
                activation = next(iter(consumer.users)) if out_act else None
                if activation is not None and activation.op != "call_module":
                    # A functional activation would vanish from traces of the converted model
                    # (its node name, which feature extractors ask for): it stays in the graph.
                    out_act, activation = None, None
                in_place = is_inplace_add(consumer)
                point = InsertionPoint(tail, consumer, name, StandIn(out_act or "none", in_place),
                                       shortcut=self.env[v.shortcut], activation=activation)
                placements.append(Placement(name, cand, out_act or "none", in_place,
                                            str(activation.target) if activation is not None else None))
            else:
                placements.append(Placement(name, cand, None, False))
            points.append(point)
        insert_modules(gm, points)
        return placements


def extract_block(path: str, key: Optional[str], candidates: list[Candidate],
                  inner: list[BlockRewrite], fuse: bool = True) -> Optional[BlockRewrite]:
    """The block at ``path`` as a GraphModule of its own, copied out of its scope's graph, with a
    copying identity before each candidate's add; None when the block cannot stand on its own.

    The block's nodes are those of its module call (``key`` in their ``nn_module_stack``), or the
    whole scope graph when the block is the scope's root (``key`` None).
    """
    x = _Extraction(path, key, candidates[0].scope, inner)
    try:
        input_node = x.inputs()
        x.body()
        output_node = x.output()
        gm = graph_module_like(x.module, x.graph)
        placements = x.identities(gm, candidates, fuse)
    except _Cannot:
        return None
    return BlockRewrite(path, x.scope, x.module, gm, placements, x.region_set, input_node, output_node)


def build_blocks(candidates: list[Candidate], skip: Callable[[Candidate, str, str], None], *,
                 fuse: bool = True) -> list[BlockRewrite]:
    """Rewrite the block of every candidate, deepest blocks first.

    Building deepest first lets a block keep the blocks inside it as they are. A candidate whose
    block cannot stand on its own moves to the next enclosing module; one whose block traces
    differently in train mode is skipped (a GraphModule runs one graph, so the block would lose
    its train behaviour). ``skip(candidate, reason, detail)`` is called for each candidate left out.
    With ``fuse``, SE takes over the residual add where it sits right before it.
    """
    train_mode = TrainModeCheck()
    built: dict[str, BlockRewrite] = {}
    waiting: dict[str, list[Candidate]] = {}
    for cand in candidates:
        waiting.setdefault(cand.owner_path, []).append(cand)
    while waiting:
        path = max(waiting, key=lambda p: (p.count(".") + bool(p), p))
        group = waiting.pop(path)
        scope, key = group[0].scope, group[0].owner_key
        result: Union[BlockRewrite, str, None] = "train-eval-differ" if train_mode.differs(scope, key) else None
        if result is None:
            inner = [r for p, r in built.items() if path == "" or p.startswith(path + ".")]
            result = extract_block(path, key, group, inner, fuse) or "untraceable-block"
        if isinstance(result, BlockRewrite):
            built[path] = result
            continue
        for cand in group:
            if result == "untraceable-block" and cand.level + 1 < len(cand.owners):
                cand.level += 1
                waiting.setdefault(cand.owner_path, []).append(cand)
            else:
                skip(cand, result, f"block {path or '<root>'}")
    return list(built.values())
