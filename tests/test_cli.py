"""The command line.

The installed ``se-inject`` console script, run in a subprocess as users run it (slow): reports,
dry runs, conversions, several models, and each failure in one line with its exit status. Then
``se_inject.cli.main`` in this process, for what it prints: a dry run that explains a model without
sites, usage errors caught before any work, and plain text off a terminal.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import register_model
from torch import nn

import se_inject
from se_inject.cli import build_parser, main
from tests.client_helpers import run_cli

SCRIPT = Path(sys.executable).with_name("se-inject")
SMALL = ["--input-size", "3", "64", "64"]


# -- the console script, in a subprocess (slow) ----------------------------------------------------

def run(*args: str, env: dict = None) -> subprocess.CompletedProcess:
    assert SCRIPT.exists(), f"console script missing: {SCRIPT} (pip install -e .)"
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


@pytest.mark.slow
def test_report_json_reproduces_the_resnet50_figures():
    done = run("report", "resnet50", "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["model"] == "resnet50" and r["input_shape"] == [1, 3, 224, 224] and r["reduction"] == 16
    assert r["params"] == {"before": 25_557_032, "after": 28_088_024, "added": 2_530_992}
    assert (r["flops"]["before"], r["flops"]["after"], r["flops"]["added"]) == (8_178_368_512, 8_183_398_400, 5_029_888)
    assert len(r["sites"]) == 16 and {s["hidden"] for s in r["sites"]} == {16, 32, 64, 128}
    assert sum(s["params"] for s in r["sites"]) == r["params"]["added"]
    assert r["skipped"] == []


@pytest.mark.slow
def test_report_tables():
    done = run("report", "resnet18", *SMALL)
    assert done.returncode == 0, done.stderr
    for text in ("11,689,512", "11,779,624", "90,112", "layer1.0.se", "layer4.1.se", "FlopCounterMode", "8 SE blocks"):
        assert text in done.stdout, text


@pytest.mark.slow
def test_sites_dry_run_lists_skipped_adds_with_reasons():
    done = run("sites", "hrnet_w18_small", "--json", *SMALL)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert len(plan["sites"]) == 23
    assert [s["reason"] for s in plan["skipped"]] == ["heavy-paths"] * 23
    assert all(s["detail"] for s in plan["skipped"])


@pytest.mark.slow
def test_convert_then_load_round_trip_is_exact(tmp_path):
    base = timm.create_model("resnet18", num_classes=5)
    torch.save(base.state_dict(), tmp_path / "resnet18.pth")
    done = run("convert", "resnet18", "--num-classes", "5", "--checkpoint", str(tmp_path / "resnet18.pth"),
               "--identity-init", "--out", str(tmp_path / "out"), *SMALL)
    assert done.returncode == 0, done.stderr
    assert "saved resnet18 to" in done.stderr
    loaded = se_inject.load(tmp_path / "out")
    assert len([n for n, _ in loaded.named_modules() if n.endswith(".se")]) == 8
    for key, value in base.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), base.eval()(x), rtol=1e-5, atol=1e-5)
    again = run("convert", "resnet18", "--num-classes", "5", "--out", str(tmp_path / "out"), *SMALL)
    assert again.returncode == 1 and "--overwrite" in again.stderr


@pytest.mark.slow
def test_several_models_and_globs_end_with_a_summary():
    done = run("report", "resnet1[04]t", "densenet121", *SMALL)
    assert done.returncode == 1  # densenet121 has no residual add
    assert "summary" in done.stdout and "resnet10t" in done.stdout and "resnet14t" in done.stdout
    assert "densenet121 has no residual add" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_unknown_model_exits_2_with_suggestions():
    done = run("report", "resnt50")
    assert done.returncode == 2
    assert "unknown model 'resnt50'; did you mean resnet50" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    done = run("report", "nothing_like_this*")
    assert done.returncode == 2 and "no timm model matches" in done.stderr


@pytest.mark.slow
def test_no_residual_adds_exits_1_with_the_reason():
    done = run("report", "vgg11", *SMALL)
    assert done.returncode == 1
    assert "vgg11 has no residual add that can take an SE block (no adds at all)" in done.stderr


@pytest.mark.slow
def test_pretrained_weights_unreachable_is_one_line():
    done = run("report", "resnet18", "--pretrained", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not fetch pretrained weights for resnet18" in lines[0]
    assert "--checkpoint PATH" in lines[0]


@pytest.mark.slow
def test_bad_checkpoint_exits_1(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"junk")
    done = run("report", "resnet18", "--checkpoint", str(tmp_path / "junk.pth"), *SMALL)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "as a .safetensors or torch.save file: this file fails" in done.stderr


@pytest.mark.slow
def test_help_for_every_command_and_option():
    done = run("--help")
    assert done.returncode == 0 and "examples:" in done.stdout
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) == {"report", "sites", "convert", "bench"}
    for name, sub in commands.items():
        assert "examples:" in sub.format_help(), name
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    module = subprocess.run([sys.executable, "-m", "se_inject", "--version"], capture_output=True, text=True)
    assert module.stdout.strip() == f"se-inject {se_inject.__version__}"


class _Untraceable(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.pretrained_cfg = {"input_size": (3, 32, 32)}

    def forward(self, x):
        return self.conv(x) + x if x.mean() > 0 else x


@register_model
def se_inject_test_untraceable(pretrained=False, **kwargs):
    return _Untraceable(**kwargs)


@pytest.mark.slow
def test_untraceable_model_exits_1_naming_the_module(capsys):
    # A timm model that fx cannot trace at all has to be registered for the test, in-process.
    assert main(["report", "se_inject_test_untraceable"]) == 1
    err = capsys.readouterr().err
    assert "could not trace _Untraceable (path '<root>')" in err and "control flow" in err


# -- main() in this process: what it prints --------------------------------------------------------

def _main(argv: list[str]) -> int:
    from se_inject.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize("name", ["efficientnet_b0", "ese_vovnet19b_dw"])
def test_sites_explains_a_model_without_sites(name, capsys):
    """The dry run exists for exactly this case: it must list what was skipped and why (or say the
    model has no adds at all), in text and in JSON: not an error pointing at itself, nor
    ``[]`` for ``--json``."""
    plan = se_inject.find_sites(timm.create_model(name), example_inputs=torch.randn(1, 3, 64, 64))
    assert not plan.sites
    code = _main(["sites", name, *SMALL, "--json"])
    out = capsys.readouterr()
    assert code in (0, 1)
    data = json.loads(out.out)
    assert isinstance(data, dict) and data["model"] == name and data["sites"] == []
    assert [(s["name"], s["reason"]) for s in data["skipped"]] == [(s.name, s.reason) for s in plan.skipped]

    code = _main(["sites", name, *SMALL])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code in (0, 1)
    assert "lists them" not in text, text  # no pointing at itself
    for skip in plan.skipped:
        assert skip.name in text and skip.reason in text, (skip, text)
    if not plan.skipped:
        assert re.search(r"no (residual )?adds?", text), text


def test_a_negative_input_size_is_a_one_line_usage_error():
    done = run_cli("sites", "resnet18", "--input-size", "3", "-5", "64")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "--input-size" in errors[0], done.stderr


def test_convert_out_pointing_at_a_file_fails_before_converting(tmp_path, monkeypatch, capsys):
    """``convert --out FILE``: one error line naming the file, exit status 1 or 2, no traceback, the
    file untouched, and no conversion first (not a FileExistsError traceback after converting)."""
    import se_inject.cli

    target = tmp_path / "a_file"
    target.write_text("keep me")
    converted = []
    monkeypatch.setattr(se_inject.cli, "inject", lambda *a, **k: converted.append(1) or se_inject.inject(*a, **k))
    code = _main(["convert", "resnet10t", *SMALL, "--out", str(target)])  # an exception escaping fails here
    err = capsys.readouterr().err
    assert code in (1, 2), code
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and str(target) in errors[0], err
    assert target.read_text() == "keep me"
    assert not converted, "the model was converted before --out was checked"


@pytest.mark.parametrize("args", [
    ["report", "resnet10t", *SMALL],
    ["sites", "hrnet_w18_small", *SMALL],
    ["report", "resnet10t", "efficientnet_b0", *SMALL],
    ["report", "resnet10t", *SMALL, "--include", "[red]layer9*"],
    ["report", "resnt10t"],
], ids=["report", "sites-skipped", "several-with-error", "error-echoing-user-text", "unknown-model"])
def test_cli_output_off_a_terminal_is_plain_text(args, monkeypatch, capsys):
    """Off a terminal (captured output), the CLI prints no ANSI escape codes, and text the user gave
    is printed as given, not read as rich markup ('[red]layer9*' must not become a red 'layer9*')."""
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    _main(list(args))
    out = capsys.readouterr()
    for stream in (out.out, out.err):
        assert "\x1b" not in stream, repr(stream[:500])
    if "--include" in args:
        assert "'[red]layer9*'" in out.err, out.err
