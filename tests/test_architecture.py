"""The package's architecture, stated as tests: rooms whose imports point one way, each room
saying what it holds, the names kept from before the rooms, and options that flow one way.

The rooms, lowest first (a room imports only rooms before it, and the core modules)::

    fused < modules < trace < sites < rewrite < api < io < cost < cli

The core modules (errors, utils, layers, options, plan) import only each other. Every import in
se_inject/ counts: ``from .x import``, ``from ..x import``, ``import se_inject.x``, the ones inside
functions, under ``TYPE_CHECKING``, and ``importlib.import_module("se_inject....")``.
"""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "se_inject"

#: The rooms, lowest first; ``api`` is the module se_inject/api.py.
ORDER = ("fused", "modules", "trace", "sites", "rewrite", "api", "io", "cost", "cli")
#: Top-level modules every room may import; they import only each other.
CORE = ("errors", "utils", "layers", "options", "plan")
#: The package's own entry points, above every room: the public API and ``python -m se_inject``.
TOP = ("se_inject", "se_inject.__main__")
#: Imports allowed against the order, each with the reason. (None needed.)
ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every se_inject module that ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # ``from . import ops`` imports the module se_inject.<package>.ops
                sub = f"{module}.{alias.name}"
                targets.append(sub if sub in known else module)
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        found += [(node.lineno, t) for t in targets if t == "se_inject" or t.startswith("se_inject.")]
    return found


def room_of(module: str) -> str:
    """``core``, ``top``, a room of :data:`ORDER`, or ``unknown`` (not a module of the package)."""
    if module in TOP:
        return "top"
    parts = module.split(".")
    if len(parts) == 2 and parts[1] in CORE:
        return "core"
    if len(parts) >= 2 and parts[1] in ORDER:
        return parts[1]
    return "unknown"


def _edges() -> list[tuple[str, int, str]]:
    modules = _library_modules()
    return [(name, line, target) for name, path in modules.items()
            for line, target in _imports(name, path, set(modules))]


def _wrong(source: str, target: str) -> bool:
    a, b = room_of(source), room_of(target)
    if b == "unknown" or (b == "top" and a != "top"):
        return True
    if a == "top" or a == b:
        return False
    if a == "core":
        return b != "core"
    return b != "core" and ORDER.index(b) > ORDER.index(a)


def test_the_edges_the_test_reads_are_the_real_ones():
    """The import finder sees relative, absolute, lazy and importlib imports alike."""
    edges = {(s, t) for s, _, t in _edges()}
    assert ("se_inject.sites.placement", "se_inject.sites.aliasing") in edges  # from . import aliasing
    assert ("se_inject.sites.classify", "se_inject.trace.ops") in edges  # from ..trace import ops
    assert ("se_inject.cost.bench", "se_inject.cost.run") in edges  # inside a function
    assert ("se_inject.cost.bench", "se_inject.io.sources") in edges  # inside a function
    assert ("se_inject.modules.se_block", "se_inject.fused") in edges  # importlib.import_module
    assert ("se_inject.cli.render", "se_inject.cost.bench") in edges  # under TYPE_CHECKING
    assert _wrong("se_inject.trace.tracer", "se_inject.rewrite.rewritten")
    assert _wrong("se_inject.options", "se_inject.modules.attentions")
    assert _wrong("se_inject.sites.classify", "se_inject.ops")  # the old name: a room must use the new one
    assert not _wrong("se_inject.cli", "se_inject.fused") and not _wrong("se_inject.fused", "se_inject.layers")


def test_every_import_points_down_the_rooms():
    wrong = [f"{source}:{line} imports {target} ({room_of(source)} -> {room_of(target)})"
             for source, line, target in _edges()
             if _wrong(source, target) and (source, target) not in ALLOWED]
    assert not wrong, "\n".join(wrong)


def test_every_module_is_in_a_room_or_the_core():
    assert {name for name in _library_modules() if room_of(name) == "unknown"} == set()
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(
        r for r in ORDER if r != "api")


def test_options_and_plan_import_no_room_and_build_no_module():
    for name in ("se_inject.options", "se_inject.plan", "se_inject.layers"):
        targets = {t for _, t in _imports(name, _library_modules()[name], set(_library_modules()))}
        assert {room_of(t) for t in targets} <= {"core"}, (name, targets)
    source = (PACKAGE / "options.py").read_text()
    assert not re.search(r"^\s*import argparse|^from argparse", source, re.M)


@pytest.mark.parametrize("room", [r for r in ORDER if r != "api"])
def test_each_room_says_what_it_holds_naming_every_module(room):
    init = PACKAGE / room / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc, f"se_inject/{room}/__init__.py has no docstring"
    for path in sorted((PACKAGE / room).glob("*.py")):
        if path.name != "__init__.py":
            assert f"``{path.name}``" in doc, f"se_inject/{room}/__init__.py's docstring does not name {path.name}"


def test_the_top_level_docstring_names_every_room_and_core_module():
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text()))
    for room in ORDER:
        assert (f"``{room}.py``" if room == "api" else f"{room}/") in doc, room
    for core in CORE:
        assert f"``{core}.py``" in doc, core


def test_the_names_from_before_the_rooms_are_the_same_modules():
    """``se_inject.ops`` and ``se_inject.sources``, as the README documents them, in a fresh
    interpreter: both spellings of a name give the same object."""
    code = ("import se_inject.ops, se_inject.sources\n"
            "from se_inject.ops import InsertedAttention\n"
            "from se_inject.sources import Source\n"
            "import se_inject.trace.ops as ops, se_inject.io.sources as sources\n"
            "assert se_inject.ops is ops and se_inject.sources is sources\n"
            "assert InsertedAttention is ops.InsertedAttention and Source is sources.Source\n"
            "print('same')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.stdout.strip() == "same", done.stderr[-3000:]


def test_the_public_api_keeps_its_names():
    import se_inject

    for name in ("apply", "inject", "find_sites", "SEOptions", "SEBlock", "SEResidual", "set_kernels", "save",
                 "load", "load_checkpoint", "build_report", "bench", "KERNELS", "SEInjectError", "OptionError"):
        assert name in se_inject.__all__ and getattr(se_inject, name) is not None, name
    assert callable(se_inject.bench) and importlib.import_module("se_inject.cli").main is not None


# -- options that flow one way ----------------------------------------------------------------

def test_the_attention_options_share_one_sentinel_settled_to_se_values_for_se():
    import copy
    import pickle

    from se_inject import SEOptions
    from se_inject.options import ATTENTION_DEFAULT, ATTENTION_OPTIONS, SE_DEFAULTS

    for name in ATTENTION_OPTIONS:
        assert SEOptions.__dataclass_fields__[name].default is ATTENTION_DEFAULT
    se, eca = SEOptions(), SEOptions(attn="eca")
    assert {n: getattr(se, n) for n in ATTENTION_OPTIONS} == SE_DEFAULTS and se.reduction == 16
    assert all(se.given(n) for n in ATTENTION_OPTIONS) and not any(eca.given(n) for n in ATTENTION_OPTIONS)
    assert pickle.loads(pickle.dumps(eca)).reduction is ATTENTION_DEFAULT
    assert copy.deepcopy(eca).gate_layer is ATTENTION_DEFAULT


def test_options_are_plain_data_and_the_attention_check_runs_once_per_call_before_any_analysis(monkeypatch):
    """SEOptions builds no attention module: a combination timm cannot build is refused by the one
    check of modules/build.py, which apply runs once, before it looks at the model."""
    import torch
    from torch import nn

    import se_inject
    from se_inject import OptionError, SEOptions
    from se_inject.modules import build

    options = SEOptions(attn="cbam", act_layer="gelu")  # timm's cbam cannot take it: not known here
    assert options.attn == "cbam"
    calls = []
    real = build.check_options
    monkeypatch.setattr(se_inject.api, "check_options", lambda opts: calls.append(opts) or real(opts))

    class MustNotRun(nn.Module):
        def forward(self, x):
            raise AssertionError("the model ran before its options were checked")

    with pytest.raises(OptionError, match=r"attn='cbam' cannot be built with these options"):
        se_inject.apply(MustNotRun(), example_inputs=torch.randn(1, 3, 8, 8), attn="cbam", act_layer="gelu")
    assert calls == [options]
    with pytest.raises(OptionError, match=r"attn='eca' does not use reduction"):
        se_inject.bench(MustNotRun(), device="cpu", attn="eca", reduction=8)
    assert len(calls) == 2  # bench checks through the same function, before building anything
