"""The steps from a model to its SE sites and rewritten blocks, and the swap that installs them.

1. :mod:`se_inject.scopes` traces the model (or, where fx cannot, its submodules) and gives every
   node its shape from one forward on the example input;
2. :mod:`se_inject.sites` classifies every add: residual (branch + shortcut) or skipped, and why;
   the options filter the residual ones;
3. :mod:`se_inject.blocks` cuts each residual add's block out of its scope's graph, with a copying
   identity where SE goes;
4. :mod:`se_inject.verify` checks the blocks of scopes whose traced graph did not reproduce their
   module;
5. :func:`install` swaps SE blocks in, and the rewritten blocks into the model, in place, so the
   model keeps its class and every original state_dict key.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from .attention import build_sites_modules, site_record
from .blocks import BlockRewrite, Candidate, build_blocks, skip_name
from .capture import outputs_match
from .errors import GraphModuleRootWarning, OptionError, RefusedModuleWarning, VerificationError
from .graph_index import GraphIndex
from .options import SEOptions
from .placement import locate
from .plan import Site, SitePlan, Skip
from .scopes import Scope, runnable_scopes
from .sites import SkippedAdd, classify_adds
from .tracer import copy_hooks
from .utils import join_path, warn
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
            cand.placement = where
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
    for _, cand in rw.placements:
        plan.skipped.append(Skip(cand.name, "unverified", problem))


def _add_sites(plan: SitePlan, verified: list[BlockRewrite], candidates: list[Candidate]) -> None:
    """Record the verified sites in the plan, in the order their adds were found."""
    order = {id(c): i for i, c in enumerate(candidates)}
    placed = sorted(((order[id(cand)], rw, name, cand) for rw in verified for name, cand in rw.placements),
                    key=lambda t: t[0])
    for _, rw, name, cand in placed:
        v = cand.verdict
        plan.sites.append(Site(name=join_path(rw.path, name), block=rw.path,
                               shortcut=" > ".join(v.shortcut_ops) or "identity", add=v.add.name,
                               **site_record(cand, plan.options)))


def analyse(model: nn.Module, options: SEOptions, example_inputs: tuple[Any, ...], strict: bool
            ) -> tuple[SitePlan, list[BlockRewrite]]:
    """Everything but the swap: find the sites, build and verify the rewritten blocks.

    ``model`` must be in eval mode, without hooks (see :func:`se_inject.api.inject`).
    """
    scopes, untraceable, traced_output = runnable_scopes(model, example_inputs)
    if scopes[0].path == "":  # the traced model must reproduce the model itself
        with torch.no_grad():
            scopes[0].faithful = outputs_match(model(*example_inputs), traced_output) is None
    shapes = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]
    plan = SitePlan(type(model).__name__, shapes, options, untraceable=untraceable)
    candidates = _candidates(scopes, options, plan)
    rewrites = build_blocks(candidates, lambda cand, reason, detail: plan.skipped.append(
        Skip(cand.name, reason, detail)))
    # Scopes whose traced graph did not reproduce their module: verify each block on its own.
    problems = verify_blocks(model, [rw for rw in rewrites if not rw.scope.faithful], example_inputs)
    verified = []
    for rw in rewrites:
        if rw.path in problems:
            _refuse(rw, problems[rw.path], plan, strict)
        else:
            verified.append(rw)
    build_sites_modules(verified, options)  # built and checked here: an error leaves the model as it is
    _add_sites(plan, verified, candidates)
    return plan, verified


def install(model: nn.Module, rewrites: list[BlockRewrite], options: SEOptions,
            training: dict[int, bool]) -> nn.Module:
    """Swap the SE blocks in, then the rewritten blocks into the model (parents first).

    ``training`` holds each module's training flag (by ``id``), which the new blocks take over.
    Returns the model, or the root's rewritten GraphModule when the root itself was rewritten.
    """
    for rw in rewrites:
        mode = training.get(id(rw.module), False)
        for name, cand in rw.placements:
            se = cand.module  # built and checked by analyse (attention.build_sites_modules)
            setattr(rw.gm, name, se.train(mode))
        rw.gm.training = mode
        copy_hooks(rw.module, rw.gm)
    for rw in sorted(rewrites, key=lambda r: (r.path.count(".") + bool(r.path))):
        if rw.path == "":
            warn(f"{type(model).__name__}'s own forward holds a residual add, so the returned model is a "
                 f"GraphModule: its state_dict is unchanged but methods of {type(model).__name__} are gone.",
                 GraphModuleRootWarning)
            model = rw.gm
            continue
        parent_path, _, child = rw.path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, rw.gm)
    return model
