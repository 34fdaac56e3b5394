"""Hugging Face transformers vision models (issue 14): sites, the kept class, what fx cannot follow,
save_pretrained, recipes from a local config directory, the CLI, and the import boundary.

Every model is built from a config with random weights; nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import se_inject
from se_inject.specialize import trace_as

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    ConvNextConfig,
    ConvNextForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(2, 3, 64, 64)
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

CASES = {  # id: (class, config, sites, classes fx cannot follow)
    "resnet50": (ResNetForImageClassification, lambda: ResNetConfig(), 16, {"ResNetEmbeddings"}),
    "resnet18-basic": (ResNetForImageClassification, lambda: ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]), 8, {"ResNetEmbeddings"}),
    "convnext": (ConvNextForImageClassification, lambda: ConvNextConfig(), 18, {"ConvNextEmbeddings"}),
    "mobilenet_v2": (MobileNetV2ForImageClassification, lambda: MobileNetV2Config(), 10, {"MobileNetV2ConvLayer"}),
}


def build(case: str) -> torch.nn.Module:
    cls, config, _, _ = CASES[case]
    torch.manual_seed(0)
    return cls(config()).eval()


def test_import_se_inject_does_not_import_transformers():
    code = "import se_inject, se_inject.cli, sys; assert 'transformers' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_sites_identity_outputs_kept_class_and_untraceable(case):
    cls, _, sites, opaque = CASES[case]
    model = build(case)
    result = se_inject.inject(model, example_inputs=X, identity_init=True)
    assert len(result.plan.sites) == sites
    converted = result.model.eval()
    assert type(converted) is cls and converted.config is not None
    with torch.no_grad():
        expected, got = model(X), converted(X)
        # identity init is exact up to float rounding; HF ResNet-50's logits reach ~16 (rtol)
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
        hidden = converted(X, output_hidden_states=True).hidden_states
        assert len(hidden) == len(model(X, output_hidden_states=True).hidden_states)
    assert {type(model.get_submodule(u.path)).__name__ for u in result.plan.untraceable} == opaque
    for u in result.plan.untraceable:  # fx fails on the module's own code, its children kept whole
        module = model.get_submodule(u.path)
        with pytest.raises(Exception):
            trace_as(module, list(module.children()))


@pytest.mark.slow
def test_forward_with_labels_save_pretrained_and_loading_back(tmp_path):
    model = se_inject.apply(build("resnet18-basic"), example_inputs=X, reduction=8)
    loss = model(pixel_values=X, labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert loss.ndim == 0 and model.resnet.encoder.stages[0].layers[0].se.fc1.weight.grad is not None
    model.eval().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["ResNetForImageClassification"]
    import safetensors.torch

    state = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert set(state) == set(model.state_dict()) and "resnet.encoder.stages.0.layers.0.se.fc1.weight" in state
    # The README's way back: build from the config, apply with the same options, load strictly.
    config = transformers.AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    again = se_inject.apply(ResNetForImageClassification(config).eval(), example_inputs=X, reduction=8)
    again.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(X).logits, model(X).logits)


@pytest.mark.slow
def test_save_records_the_config_and_load_rebuilds_offline(tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(num_labels=5)).eval()
    result = se_inject.inject(model, example_inputs=X, identity_init=True)
    se_inject.save(result, tmp_path)  # the source comes from the model's class and config
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["format_version"] == 1 and recipe["source"]["library"] == "transformers"
    assert recipe["source"]["model"] == "ResNetForImageClassification"
    assert recipe["source"]["config"]["num_labels"] == 5 and "transformers" in recipe["versions"]
    loaded = se_inject.load(tmp_path)
    assert type(loaded) is ResNetForImageClassification
    with torch.no_grad():
        torch.testing.assert_close(loaded(X).logits, result.model.eval()(X).logits, rtol=0, atol=0)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "se_inject", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})


@pytest.mark.slow
def test_cli_report_and_convert_a_local_directory_then_load_the_recipe(tmp_path):
    source = tmp_path / "my-resnet"
    torch.manual_seed(0)
    original = ResNetForImageClassification(ResNetConfig(num_labels=3)).eval()
    original.save_pretrained(source)
    done = cli("report", str(source), "--json", "--input-size", "3", "64", "64")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["sites"]) == 16 and [u["path"] for u in report["untraceable"]] == ["resnet.embedder"]
    out = tmp_path / "se-resnet"
    done = cli("convert", str(source), "--out", str(out), "--identity-init", "--input-size", "3", "64", "64")
    assert done.returncode == 0, done.stderr
    loaded = se_inject.load(out)  # built from the recipe alone, with the directory's weights converted
    with torch.no_grad():
        torch.testing.assert_close(loaded(X).logits, original(X).logits, rtol=1e-4, atol=1e-5)


def test_cli_refuses_a_directory_without_config(tmp_path):
    done = cli("sites", str(tmp_path))
    assert done.returncode == 2 and "without config.json" in done.stderr
