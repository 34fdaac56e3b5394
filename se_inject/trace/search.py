"""Find every traceable module that can hold a residual add, however deep fx must look.

A model is traced from the root down. Where a module traces, it is a *scope* and the modules it
inlines are done. Where it does not:

* a container without a forward of its own (``nn.ModuleList``, ``nn.ModuleDict``) is entered;
* a module whose forward takes options (``output_hidden_states=...``, a decorated forward) is
  traced again with the options it received in a real forward baked in
  (:mod:`se_inject.trace.specialize`); that real forward runs once, the first time it is needed;
* otherwise the traceback says which module's own code fx could not follow: the innermost module
  that was running. That module is traced alone. If it fails there too, its own code is what fx
  cannot follow (control flow on a tensor, ``int()`` of a size): it becomes a leaf, so that its
  parent can be traced around it, and is reported in ``plan.untraceable`` with the error; the
  other modules of its class under the failing module are tried the same way at once, instead of
  one failure per trace. If it traces alone, it failed only on what its caller passed (a size
  that is a Proxy there): it is kept whole in its caller's graph and is a scope of its own. Then
  the module is traced again, until it traces or fails in its own code.

Then the scopes are collected from the root down with the final leaves: a module inlined in a
traced ancestor is not a scope of its own; leaves that are not primitive layers (timm's no-trace
blocks, the leaves made here) are looked into, their children settled the same way. Each scope
carries the leaves and the options it was traced with, so that shape propagation, block
extraction and the train-mode re-trace see the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import fx, nn

from ..errors import TraceError
from ..plan import Untraceable
from ..utils import describe_error, join_path
from .ops import is_primitive_leaf
from .record import Call, ForwardFailed, Recording, record_calls
from .scopes import Scope, TracedRootFails, example_input_error, propagate_shapes
from .specialize import takes_options, trace_as

__all__ = ["Recorder", "SearchResult", "search", "discover_scopes", "runnable_scopes", "is_container"]


@dataclass
class SearchResult:
    """Scopes (parents before children), what fx cannot follow, and the leaves made for it."""

    scopes: list[Scope]
    untraceable: list[Untraceable]
    leaves: dict[str, nn.Module] = field(default_factory=dict)


class Recorder:
    """The real forward the search needs for options, run at most once and only when needed."""

    def __init__(self, model: nn.Module, inputs: Optional[tuple[Any, ...]]) -> None:
        self.model, self.inputs = model, inputs
        self.recording: Optional[Recording] = None

    def get(self) -> Optional[Recording]:
        """The recording (running the forward the first time); None without example inputs.

        Raises:
            se_inject.trace.record.ForwardFailed: the model fails on the inputs.
        """
        if self.recording is None and self.inputs is not None:
            self.recording = record_calls(self.model, self.inputs)
        return self.recording


def is_container(module: nn.Module) -> bool:
    """A module without a forward of its own (``nn.ModuleList``, ``nn.ModuleDict``)."""
    return getattr(type(module), "forward", None) is nn.Module.forward


def _culprit(error: BaseException, module: nn.Module) -> Optional[nn.Module]:
    """The innermost module inside ``module`` (not ``module`` itself) whose code was running when
    ``error`` was raised, from the traceback; None when it was ``module``'s own code."""
    inside = {id(m) for m in module.modules()}
    found = None
    for cause in (error, error.__cause__):
        tb = cause.__traceback__ if cause is not None else None
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in inside:
                found = owner
            tb = tb.tb_next
        if found is not None:
            break
    return None if found is None or found is module else found


class _Search:
    def __init__(self, skip: dict[str, str], recorder: Optional[Recorder]) -> None:
        self.skip, self.recorder = skip, recorder
        self.leaves: dict[int, tuple[str, nn.Module]] = {}
        self.untraceable: list[Untraceable] = []
        self.traced: dict[int, tuple[fx.GraphModule, Optional[Call], tuple[nn.Module, ...]]] = {}
        self.kept: dict[int, nn.Module] = {}  # traced alone, kept whole in their parent's graph
        self.settled: set[int] = set()
        self.collected: set[int] = set()
        self.found: list[Scope] = []

    def ran(self, module: nn.Module) -> bool:
        """False only for a module known not to run in the example forward (it holds no site)."""
        recording = self.recorder.recording if self.recorder else None
        return recording is None or recording.ran(module) or is_container(module)

    def all_leaves(self) -> list[nn.Module]:
        return [m for _, m in self.leaves.values()] + list(self.kept.values())

    def inner_leaves(self, module: nn.Module) -> list[nn.Module]:
        inside = {id(m) for m in module.modules()} - {id(module)}
        return [m for m in self.all_leaves() if id(m) in inside]

    def options_call(self, module: nn.Module) -> Optional[Call]:
        """The module's recorded call, when its forward takes options and the call can be re-made."""
        if self.recorder is None or not takes_options(module):
            return None
        recording = self.recorder.get()
        call = recording.get(module) if recording is not None else None
        return call if call is not None and call.arguments is not None and call.tensor_names else None

    def try_trace(self, module: nn.Module, path: str) -> tuple[Optional[str], Optional[nn.Module]]:
        """Trace ``module`` with the current leaves (with its options if plain fails).

        Returns (None, None) on success, else the error and the module inside ``module`` whose own
        code failed (None: ``module``'s own code).
        """
        if path in self.skip:
            return self.skip[path], None
        leaves = self.all_leaves()
        call = None
        try:
            gm = trace_as(module, leaves)
        except Exception as e:  # fx raises many types; all mean "not traceable as it stands"
            error, culprit = describe_error(e), _culprit(e, module)
            call = self.options_call(module)
            if call is None:
                return error, culprit
            try:
                gm = trace_as(module, leaves, call)
            except Exception as e2:
                return describe_error(e2), _culprit(e2, module)
        self.traced[id(module)] = (gm, call, tuple(self.inner_leaves(module)))
        return None, None

    def settle(self, module: nn.Module, path: str) -> None:
        """Decide whether ``module`` traces; where its own code cannot be followed, make it a leaf."""
        if id(module) in self.settled:
            return
        self.settled.add(id(module))
        if is_container(module):
            for name, child in module.named_children():
                self.settle(child, join_path(path, name))
            return
        if (path and is_primitive_leaf(module)) or not self.ran(module):
            return
        at, blamed = len(self.untraceable), set()
        while True:
            error, culprit = self.try_trace(module, path)
            if error is None:
                return
            if culprit is None or id(culprit) in blamed:  # its own code, or no progress
                break
            blamed.add(id(culprit))
            self.blame(module, path, culprit)
        self.leaves[id(module)] = (path, module)
        self.untraceable.insert(at, Untraceable(path, error))

    def blame(self, module: nn.Module, path: str, culprit: nn.Module) -> None:
        """Settle ``culprit`` (inside ``module``) and, when its own code fails, the other modules
        of its class inside ``module``; keep it whole if it traces alone."""
        names = {id(m): name for name, m in module.named_modules()}
        self.settle(culprit, join_path(path, names[id(culprit)]))
        if id(culprit) in self.leaves:
            for name, m in module.named_modules():
                if type(m) is type(culprit) and id(m) not in self.settled:
                    self.settle(m, join_path(path, name))
        elif id(culprit) in self.traced:  # fails only on what its caller passes it
            self.kept[id(culprit)] = culprit

    def collect(self, module: nn.Module, path: str) -> None:
        """Record the scopes under ``module`` with the final leaves, parents before children."""
        if id(module) in self.collected or not self.ran(module):
            return
        self.collected.add(id(module))
        if not is_container(module) and id(module) not in self.leaves:
            if path and is_primitive_leaf(module):
                return
            self.settle(module, path)  # a non-primitive leaf of a scope is settled only here
        if is_container(module) or id(module) in self.leaves:
            for name, child in module.named_children():
                self.collect(child, join_path(path, name))
            return
        gm, call, leaves = self.traced[id(module)]  # leaves never grow inside a module once it traced
        self.found.append(Scope(path, module, gm, leaves=leaves, call=call))
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.collect(module.get_submodule(node.target), join_path(path, node.target))


def search(model: nn.Module, *, skip: Optional[dict[str, str]] = None,
           recorder: Optional[Recorder] = None) -> SearchResult:
    """Trace ``model`` into scopes as the module docstring says.

    Args:
        skip: module paths never to trace whole, with the reason to report (their traced graph
            turned out not to run); they are treated as modules fx cannot follow.
        recorder: runs the real forward when options are needed; without it no options are baked.
    """
    s = _Search(skip or {}, recorder)
    s.settle(model, "")
    s.collect(model, "")
    recording = recorder.recording if recorder is not None else None
    for scope in s.found:
        scope.recording = recording
    return SearchResult(s.found, s.untraceable, {p: m for p, m in s.leaves.values()})


def discover_scopes(model: nn.Module, *, skip: Optional[dict[str, str]] = None,
                    recorder: Optional[Recorder] = None) -> tuple[list[Scope], list[Untraceable]]:
    """Trace ``model`` into scopes, parents before children; report what fx cannot follow.

    Args:
        skip: module paths not to trace as a whole (their children are tried), with the reason
            to report; used for modules whose traced graph turned out not to run.
        recorder: the real forward that gives non-tensor options (see :mod:`se_inject.trace.search`).
    """
    result = search(model, skip=skip, recorder=recorder)
    return result.scopes, result.untraceable




def runnable_scopes(model: nn.Module, example_inputs: tuple[Any, ...]
                    ) -> tuple[list[Scope], list[Untraceable], Any]:
    """Trace ``model`` into scopes that all run on what their modules receive, with shapes.

    Where a traced graph does not run, that module's children are traced instead, and again,
    until every scope runs. Returns the scopes, what could not be traced whole, and the output of
    the top scope's graph (or of the model, when its root is not traced); whether that graph
    reproduces the model is checked by :func:`se_inject.rewrite.pipeline.analyse`, in the forward it runs
    anyway.

    Raises:
        TraceError: no module that could hold a residual add can be traced.
        ExampleInputError: the model does not run on ``example_inputs``.
    """
    skip: dict[str, str] = {}
    recorder = Recorder(model, example_inputs)
    while True:
        try:
            scopes, untraceable = discover_scopes(model, skip=skip, recorder=recorder)
        except ForwardFailed as e:
            raise example_input_error(model, example_inputs, e.error, e.path) from e.error
        if not scopes:
            first = untraceable[0].error if untraceable else "no module"
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__} (path '<root>') or any submodule that "
                f"could hold a residual add: {first}. Make the forward free of data-dependent control "
                f"flow, or apply se_inject to a traceable submodule.")
        try:
            traced_output, failed = propagate_shapes(model, scopes, example_inputs)
        except TracedRootFails as e:
            skip[""] = str(e)
            continue
        if not failed:
            return scopes, untraceable, traced_output
        skip.update({f.path: f.error for f in failed})
