"""Helpers for the tests that use models as clients do (tests/test_clients.py) and the ones that
check what a call leaves alone (tests/test_caller_state.py, tests/test_api.py, tests/test_rewrite.py),
and for running the command line (tests/test_cli.py).

* :class:`Family`: one timm model family, built once per variant and handed out as deep copies, in
  two flavours: the original model and the model converted by ``se_inject.apply``.
* :func:`on_both`: run a client check on the original, then on the converted model; the converted
  model's test is skipped only where the original fails the same check ("converted models work
  wherever the original works").
* :func:`create_fx_model`: timm's own ``_create_fx_model`` (tests/test_models.py), unchanged.
* :func:`full_snapshot` / :func:`assert_unchanged`: everything about a model that a failed call must
  leave alone, by identity as well as by value (parameters, buffers, attributes, hooks, flags).
* :func:`convert_in_threads`: several threads converting at once, meant for a subprocess (a race
  can leave the torch globals that ``torch.fx`` patches while tracing patched for the whole process).
* :func:`run_cli`: the ``se-inject`` command in a subprocess, on this checkout, off a terminal.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
from timm.layers import set_scriptable
from torch import nn

import se_inject

ROOT = Path(__file__).resolve().parents[1]

#: Input of the conversion (apply's example_inputs): small, so that apply is cheap.
CONVERT_INPUT = (1, 3, 64, 64)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class Family:
    """The models of one timm family, original and converted, built once per set of kwargs.

    ``original(**kw)`` and ``converted(**kw)`` return fresh deep copies, so a check may train,
    reset or script its model without affecting the next check. ``scriptable=True`` builds the
    model under ``timm.layers.set_scriptable(True)``, as timm's TorchScript tests do.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._built: dict[Any, nn.Module] = {}

    def _build(self, converted: bool, scriptable: bool, kwargs: dict[str, Any]) -> nn.Module:
        key = (converted, scriptable, _freeze(kwargs))
        if key in self._built:
            return copy.deepcopy(self._built[key])
        if converted:
            base = self._build(False, scriptable, kwargs)
            torch.manual_seed(0)
            model = se_inject.apply(base, example_inputs=torch.randn(CONVERT_INPUT))
            if isinstance(model, torch.fx.GraphModule):
                # fx's GraphModule.__deepcopy__ drops attributes its graph does not use (e.g.
                # feature_info): hand out fresh conversions; test_deepcopy_... checks copies.
                return model
        else:
            torch.manual_seed(0)
            with set_scriptable(scriptable):
                model = timm.create_model(self.name, pretrained=False, **kwargs)
        self._built[key] = model
        return copy.deepcopy(model)

    def original(self, scriptable: bool = False, **kwargs: Any) -> nn.Module:
        return self._build(False, scriptable, kwargs)

    def converted(self, scriptable: bool = False, **kwargs: Any) -> nn.Module:
        return self._build(True, scriptable, kwargs)

    def maker(self, converted: bool) -> Callable[..., nn.Module]:
        return self.converted if converted else self.original


def on_both(family: Family, check: Callable[..., None], *args: Any) -> None:
    """Run ``check(make, *args)`` on the original models, then on the converted ones.

    ``make(**create_kwargs)`` builds the model. If the check fails on the original, the test is
    skipped (timm's own test would fail too); otherwise a failure on the converted model fails.
    """
    try:
        check(family.maker(converted=False), *args)
    except Exception as e:  # pytest.skip / fail are BaseExceptions and pass through
        first = (str(e).strip().splitlines() or [""])[0][:300]
        pytest.skip(f"the original {family.name} fails this check too: {type(e).__name__}: {first}")
    check(family.maker(converted=True), *args)


def se_blocks(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, se_inject.SEBlock)]


# -- timm's tests/test_models.py, as it is --------------------------------------------------------

def create_fx_model(model: nn.Module, train: bool = False) -> nn.Module:
    """timm's ``_create_fx_model``: a torchvision feature extractor returning the last node(s)."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import (NodePathTracer, create_feature_extractor,
                                                       get_graph_node_names)

    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(),
        autowrap_functions=get_notrace_functions(),
        param_shapes_constant=True,
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes = [eval_nodes[-1]]
    train_return_nodes = [train_nodes[-1]]
    if train:
        tracer = NodePathTracer(**tracer_kwargs)
        graph = tracer.trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        output_node_indices = [-graph_node_names.index(node_name) for node_name in output_node_names]
        train_return_nodes = [train_nodes[ix] for ix in output_node_indices]
    return create_feature_extractor(
        model,
        train_return_nodes=train_return_nodes,
        eval_return_nodes=eval_return_nodes,
        tracer_kwargs=tracer_kwargs,
    )


# -- "exactly as it was" ----------------------------------------------------------------------------

_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def full_snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything about ``model`` that a failed (or dry) call must leave alone.

    Modules, parameters and buffers are recorded by identity and by value; each module's
    attributes by name and by identity of the value (a cached ``None`` that became an fx
    ``Proxy`` shows); hooks by identity of the dict and of each hook function.
    """
    modules = list(model.named_modules(remove_duplicate=False))
    return {
        "modules": [(name, id(m), type(m)) for name, m in modules],
        "params": [(name, id(p), p.requires_grad, p.dtype, p.device, p.detach().clone())
                   for name, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(name, id(b), b.dtype, b.device, b.detach().clone())
                    for name, b in model.named_buffers(remove_duplicate=False)],
        "training": [(name, m.training) for name, m in modules],
        "attrs": [(name, {k: (id(v), type(v)) for k, v in vars(m).items()}) for name, m in modules],
        "children": [(name, [(k, id(c)) for k, c in m._modules.items()]) for name, m in modules],
        "hooks": [(name, {h: (id(getattr(m, h)), [(k, id(f)) for k, f in getattr(m, h).items()])
                          for h in _HOOK_DICTS if hasattr(m, h)}) for name, m in modules],
    }


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = full_snapshot(model)
    assert [m[:3] for m in after["modules"]] == [m[:3] for m in before["modules"]], "modules changed"
    assert after["children"] == before["children"], "child modules replaced"
    assert after["training"] == before["training"], "training flags changed"
    assert after["hooks"] == before["hooks"], "hooks changed"
    for (name, a), (_, b) in zip(after["attrs"], before["attrs"]):
        assert a == b, f"attributes of {name or '<root>'} changed: " \
                       f"{sorted(set(a.items()) ^ set(b.items()), key=str)[:6]}"
    for kind in ("params", "buffers"):
        assert [x[:-1] for x in after[kind]] == [x[:-1] for x in before[kind]], f"{kind} replaced"
        for x, y in zip(after[kind], before[kind]):
            assert torch.equal(x[-1], y[-1]), f"{kind[:-1]} {x[0]} changed"


# -- torch.fx's process-wide patches ----------------------------------------------------------------

def fx_globals() -> dict[str, Any]:
    """The torch globals ``torch.fx`` patches while it traces (and must put back)."""
    import torch.fx._symbolic_trace as st

    return {
        "Module.__call__": torch.nn.Module.__call__,
        "Module.__getattr__": torch.nn.Module.__getattr__,
        "is_fx_tracing": getattr(st, "_is_fx_tracing_flag", None),
    }


# -- the command line, as users run it ------------------------------------------------------------

def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m se_inject ARGS`` in a subprocess, on this checkout, with pipes (not a terminal)."""
    base = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")}
    base.update({"PYTHONPATH": str(ROOT), "COLUMNS": "200", "TERM": "xterm-256color"})
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "se_inject", *args], capture_output=True, text=True,
                          timeout=timeout, env=base, cwd=cwd)


# -- several threads converting at once (run in a subprocess: a race can leave torch patched) -------

def convert_in_threads(rounds: int = 3, timeout: float = 300.0) -> dict[str, Any]:
    """Six threads each convert one of six models at once, ``rounds`` times; returns what went wrong.

    Every conversion must succeed, give the sites a serial conversion gives, and run; afterwards
    torch's process-wide state (``nn.Module.__call__`` / ``__getattr__``, fx's is-tracing flag)
    must be as before. Meant to run in a subprocess (see tests/test_caller_state.py).
    """
    import threading
    import warnings

    import torchvision

    from tests.helpers import small_resnet

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    models = {
        "resnet18": timm.create_model("resnet18"),
        "resnet10t": timm.create_model("resnet10t"),
        "regnetx_002": timm.create_model("regnetx_002"),
        "mobilenetv2_050": timm.create_model("mobilenetv2_050"),
        "tv_resnet18": torchvision.models.resnet18(),
        "small_resnet": small_resnet(),
    }
    serial = {n: [s.name for s in se_inject.find_sites(m, example_inputs=x).sites] for n, m in models.items()}
    saved = fx_globals()
    report: dict[str, Any] = {"serial": serial, "failures": [], "mismatches": [], "hung": False}
    for _ in range(rounds):
        barrier = threading.Barrier(len(models))

        def work(name: str) -> None:
            try:
                barrier.wait(timeout=60)
                result = se_inject.inject(models[name], example_inputs=x, identity_init=True)
                with torch.no_grad():
                    result.model.eval()(x)
                sites = [s.name for s in result.plan.sites]
                if sites != serial[name]:
                    report["mismatches"].append(f"{name}: {sites} != {serial[name]}")
            except Exception as e:  # noqa: BLE001 - reported
                report["failures"].append(f"{name}: {type(e).__name__}: {str(e)[:200]}")

        threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout)
        report["hung"] = report["hung"] or any(t.is_alive() for t in threads)
    after = fx_globals()
    report["globals_restored"] = {k: after[k] is saved[k] or after[k] == saved[k] for k in saved}
    return report
