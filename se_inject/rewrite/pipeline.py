"""The steps from a model to its SE sites and rewritten blocks, and the swap that installs them.

1. :mod:`se_inject.trace.scopes` traces the model (or, where fx cannot, its submodules) and gives every
   node its shape from one forward on the example input;
2. :mod:`se_inject.sites.classify` classifies every add: residual (branch + shortcut) or skipped, and why;
   the options filter the residual ones;
3. :mod:`se_inject.rewrite.cut` cuts each residual add's block out of its scope's graph, with a copying
   identity where SE goes;
4. one eager forward records how the model calls each block; :mod:`se_inject.rewrite.signature` gives
   each rewritten block its module's call signature;
5. :mod:`se_inject.rewrite.verify` checks the blocks of scopes whose traced graph did not reproduce their
   module, and the blocks called with more than their input;
6. :func:`install` builds the SE blocks and the final GraphModules from the target model's own
   blocks, then swaps them in (undoing the swap if it fails half way), so the model keeps its
   class and every original state_dict key.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import fx, nn

from ..errors import GraphModuleRootWarning, OptionError, RefusedModuleWarning, VerificationError
from ..options import SEOptions
from ..plan import Site, SitePlan, Skip
from ..sites.classify import SkippedAdd, classify_adds
from ..sites.graph_index import GraphIndex
from ..sites.placement import locate
from ..trace.record import Recording, outputs_match, recording
from ..trace.scopes import Scope
from ..trace.search import runnable_scopes
from ..utils import join_path, warn
from .cut import BlockRewrite, Candidate, build_blocks, skip_name
from .rewritten import graph_module_like
from .signature import mirror_signature
from .site_modules import build_sites_modules, site_record
from .verify import verify_blocks

__all__ = ["analyse", "install"]


def _candidates(scopes: list[Scope], options: SEOptions, plan: SitePlan) -> list[Candidate]:
    """Classify every add; record the skipped ones in ``plan`` and return the residual ones."""
    candidates: list[Candidate] = []
    filtered_blocks: list[str] = []
    placeless: list[str] = []  # blocks without a place for the position (no-mid-point)
    for scope in scopes:
        if scope.args is None:
            continue
        index = GraphIndex(scope.gm) if options.position != "branch" else None
        for verdict in classify_adds(scope.gm, batch_size=scope.batch_size):
            if isinstance(verdict, SkippedAdd):
                plan.skipped.append(Skip(skip_name(scope, verdict.add), verdict.reason, verdict.detail))
                continue
            cand = Candidate.of(scope, verdict)
            block = cand.owner_path
            if scope.calls > 1 or any("@" in k for k in verdict.scope_keys):
                plan.skipped.append(Skip(cand.name, "shared-module", f"{block or '<root>'} runs more than once"))
                continue
            where = locate(index, verdict, options.position) if index is not None else None
            if isinstance(where, tuple):  # no such place in this block (position="mid": no-mid-point)
                plan.skipped.append(Skip(cand.name, *where))
                placeless.append(block)
                continue
            cand.place = where
            channels = where.channels if where is not None else verdict.channels
            if not options.selects(block):
                reason = f"block {block or '<root>'} not selected by include/exclude"
            elif channels < options.min_channels:
                reason = f"{channels} channels < min_channels={options.min_channels}"
            else:
                candidates.append(cand)
                continue
            plan.skipped.append(Skip(cand.name, "filtered", reason))
            filtered_blocks.append(block)
    _check_filters(options, filtered_blocks, [c.owner_path for c in candidates], placeless)
    return candidates


def _check_filters(options: SEOptions, filtered: list[str], selected: list[str], placeless: list[str]) -> None:
    """Refuse filters that cannot be meant: an include pattern matching no block, or no block left."""
    if options.include is not None:
        blocks = filtered + selected + placeless
        for pattern in options.include:
            if not any(fnmatch.fnmatchcase(b, pattern) for b in blocks):
                raise OptionError(f"include pattern {pattern!r} matches no block with a residual add; "
                                  f"blocks are e.g. {sorted(set(blocks))[:6]}")
    if filtered and not selected:
        raise OptionError(f"the filters (include={options.include}, exclude={list(options.exclude)}, "
                          f"min_channels={options.min_channels}) leave out all {len(filtered)} residual "
                          f"adds; loosen them")


def _refuse(rw: BlockRewrite, problem: str, plan: SitePlan, strict: bool) -> None:
    message = (f"the traced graph of {rw.path or '<root>'} ({type(rw.module).__name__}) does not "
               f"reproduce the module's output ({problem}); its residual adds get no SE.")
    if strict:
        raise VerificationError(message + " Exclude it with exclude=[...] or pass strict=False.")
    warn(message, RefusedModuleWarning)
    for placement in rw.placements:
        plan.skipped.append(Skip(placement.candidate.name, "unverified", problem))


def _add_sites(plan: SitePlan, verified: list[BlockRewrite], candidates: list[Candidate]) -> None:
    """Record the verified sites in the plan, in the order their adds were found."""
    order = {id(c): i for i, c in enumerate(candidates)}
    placed = sorted(((order[id(p.candidate)], rw, p.name, p.candidate) for rw in verified for p in rw.placements),
                    key=lambda t: t[0])
    for _, rw, name, cand in placed:
        v = cand.verdict
        plan.sites.append(Site(name=join_path(rw.path, name), block=rw.path,
                               shortcut=" > ".join(v.shortcut_ops) or "identity", add=v.add.name,
                               **site_record(cand, plan.options)))


def _keep_signatures(rewrites: list[BlockRewrite], calls: Recording, plan: SitePlan) -> list[BlockRewrite]:
    """Give each rewritten block its module's signature; pass frozen arguments on where an
    enclosing rewritten block calls it. Blocks that cannot keep their signature are skipped."""
    kept, frozen = [], {}
    for rw in rewrites:
        if rw.input_node is None:  # a scope root: its graph was traced with its own signature
            kept.append(rw)
            continue
        mirrored = mirror_signature(rw.gm, rw.module, calls.get(rw.module), rw.path)
        if mirrored.problem is None:
            kept.append(rw)
            frozen[rw.path] = mirrored.frozen
            continue
        for placement in rw.placements:
            plan.skipped.append(Skip(placement.candidate.name, "untraceable-block",
                                     f"block {rw.path}: {mirrored.problem}"))
    for rw in kept:
        changed = False
        for node in rw.gm.graph.nodes:
            inner = join_path(rw.path, str(node.target)) if node.op == "call_module" else None
            if frozen.get(inner):
                node.kwargs = {**node.kwargs, **frozen[inner]}
                changed = True
        if changed:
            rw.gm.recompile()
    return kept


def _needs_verifying(rw: BlockRewrite, call: Any) -> bool:
    extra_args = call is not None and (len(call.args) > 1 or bool(call.kwargs))
    return not rw.scope.faithful or extra_args


def analyse(model: nn.Module, options: SEOptions, example_inputs: tuple[Any, ...], strict: bool
            ) -> tuple[SitePlan, list[BlockRewrite]]:
    """Everything but the swap: find the sites, build and verify the rewritten blocks.

    ``model`` must be in eval mode, without hooks (see :func:`se_inject.api.inject`).
    """
    scopes, untraceable, traced_output = runnable_scopes(model, example_inputs)
    shapes = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]
    plan = SitePlan(type(model).__name__, shapes, options, untraceable=untraceable)
    candidates = _candidates(scopes, options, plan)
    rewrites = build_blocks(candidates, lambda cand, reason, detail: plan.skipped.append(
        Skip(cand.name, reason, detail)), fuse=options.fuses)
    with recording((rw.module for rw in rewrites), inputs="keep", outputs=False) as calls, torch.no_grad():
        output = model(*example_inputs)
    if scopes[0].path == "":  # the traced model must reproduce the model itself
        scopes[0].faithful = outputs_match(output, traced_output) is None
    rewrites = _keep_signatures(rewrites, calls, plan)
    problems = verify_blocks(model, [rw for rw in rewrites if _needs_verifying(rw, calls.get(rw.module))],
                             example_inputs)
    verified = []
    for rw in rewrites:
        if rw.path in problems:
            _refuse(rw, problems[rw.path], plan, strict)
        else:
            verified.append(rw)
    build_sites_modules(verified, options)  # built and checked here: an error leaves the model as it is
    _add_sites(plan, verified, candidates)
    return plan, verified


def _new_blocks(target: nn.Module, rewrites: list[BlockRewrite], options: SEOptions) -> dict[str, fx.GraphModule]:
    """The final GraphModule of each rewritten block, built from ``target``'s own block (its
    parameters, buffers, hooks and training flag) with new SE blocks; ``target`` is not touched."""
    built = {}
    for rw in rewrites:
        block = target.get_submodule(rw.path) if rw.path else target
        # the modules analyse built and checked (site_modules.build_sites_modules); SE that computes
        # the activation after its add stands for the block's own activation module
        se_blocks = {p.name: p.candidate.module.train(block.training) for p in rw.placements}
        for p in rw.placements:
            if p.activation is not None:
                se_blocks[p.name].stand_for_activation_(block.get_submodule(p.activation))
        built[rw.path] = graph_module_like(block, rw.gm.graph, extra=se_blocks)
    return built


def install(target: nn.Module, rewrites: list[BlockRewrite], options: SEOptions) -> nn.Module:
    """Swap the rewritten blocks, with their SE blocks, into ``target`` (parents first).

    Everything is built before the first change to ``target``; if a swap fails (a module
    registration hook raises), the swaps already made are undone. Returns ``target``, or the
    root's rewritten GraphModule when the root itself was rewritten.
    """
    built = _new_blocks(target, rewrites, options)
    done: list[tuple[nn.Module, str, nn.Module]] = []
    model = target
    try:
        for path in sorted(built, key=lambda p: (p.count(".") + bool(p), p)):
            if path == "":
                model = built[path]
                continue
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            done.append((parent, child, parent._modules[child]))
            setattr(parent, child, built[path])
    except BaseException:
        for parent, child, original in reversed(done):
            parent._modules[child] = original
        raise
    if "" in built:
        warn(f"{type(target).__name__}'s own forward holds a residual add, so the returned model is a "
             f"GraphModule: its state_dict is unchanged but methods of {type(target).__name__} are gone.",
             GraphModuleRootWarning)
    return model
