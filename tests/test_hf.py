"""Hugging Face transformers vision models: sites, the kept class, what fx cannot follow,
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
from se_inject import CheckpointError
from se_inject.cli import main
from se_inject.io.sources import from_hf_directory
from se_inject.trace.specialize import trace_as

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
        original = model(X, output_hidden_states=True).hidden_states
        assert len(hidden) == len(original)
        for got_h, expected_h in zip(hidden, original):  # relative: HF MobileNetV2's random init
            # shrinks its activations to ~1e-21, so its logits are the classifier's bias alone
            assert (got_h - expected_h).abs().max() <= 1e-4 * expected_h.abs().max()
    assert {type(model.get_submodule(u.path)).__name__ for u in result.plan.untraceable} == opaque
    for u in result.plan.untraceable:  # fx fails on the module's own code, its children kept whole
        module = model.get_submodule(u.path)
        with pytest.raises(Exception):
            trace_as(module, list(module.children()))


TOKEN_MODELS = {  # small configs of transformers whose residual adds are all on tokens
    "vit": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8),
    "dinov2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                   patch_size=8),
    "swin": dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4),
}


@pytest.mark.parametrize("model_type", sorted(TOKEN_MODELS))
def test_token_models_get_no_se_and_say_why(model_type):
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as names

    config = transformers.AutoConfig.for_model(model_type, **TOKEN_MODELS[model_type])
    model = getattr(transformers, names[model_type])(config).eval()
    plan = se_inject.find_sites(model, example_inputs=torch.randn(2, 3, 32, 32))
    assert not plan.sites and plan.skipped_by_reason().get("channels-last")


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
def test_recipe_round_trip_of_a_resnet50_from_a_local_config_directory_offline(tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    source = tmp_path / "resnet50"
    source.mkdir()
    ResNetConfig(num_labels=5, architectures=["ResNetForImageClassification"]).save_pretrained(source)  # config only
    model = from_hf_directory(source)
    result = se_inject.inject(model, example_inputs=X, identity_init=True)
    se_inject.save(result, tmp_path / "se")  # the source comes from the model's class and config
    recipe = json.loads((tmp_path / "se" / "recipe.json").read_text())
    assert recipe["format_version"] == 1 and recipe["source"]["library"] == "transformers"
    assert recipe["source"]["model"] == "ResNetForImageClassification"
    assert len(recipe["source"]["config"]["id2label"]) == 5 and "transformers" in recipe["versions"]
    assert len(recipe["sites"]) == 16
    loaded = se_inject.load(tmp_path / "se")
    assert type(loaded) is ResNetForImageClassification
    for key, value in result.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "se_inject", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})


SMALL = ResNetConfig(layer_type="basic", depths=[1, 1], hidden_sizes=[16, 32], embedding_size=16, num_labels=3)


@pytest.mark.slow
def test_cli_converts_a_local_directory_with_weights_and_the_recipe_loads(tmp_path):
    source = tmp_path / "my-resnet"
    torch.manual_seed(0)
    original = ResNetForImageClassification(SMALL).eval()
    original.save_pretrained(source)
    out = tmp_path / "se-resnet"
    done = cli("convert", str(source), "--out", str(out), "--identity-init", "--json", "--input-size", "3", "64", "64")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # what `se-inject report DIR --json` prints
    assert len(report["sites"]) == 2 and [u["path"] for u in report["untraceable"]] == ["resnet.embedder"]
    loaded = se_inject.load(out)  # built from the recipe alone, with the directory's weights converted
    with torch.no_grad():
        torch.testing.assert_close(loaded(X).logits, original(X).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_cli_report_and_convert_of_a_resnet50_config_directory_offline(tmp_path):
    source = tmp_path / "my-resnet"
    ResNetConfig(architectures=["ResNetForImageClassification"]).save_pretrained(source)  # config only
    shape = ("--input-size", "3", "64", "64")
    done = cli("report", str(source), "--json", *shape)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["sites"]) == 16 and [u["path"] for u in report["untraceable"]] == ["resnet.embedder"]
    out = tmp_path / "se-resnet50"
    done = cli("convert", str(source), "--out", str(out), "--identity-init", *shape)
    assert done.returncode == 0, done.stderr
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["source"]["model"] == "ResNetForImageClassification" and len(recipe["sites"]) == 16
    loaded = se_inject.load(out)
    assert type(loaded) is ResNetForImageClassification
    assert sum(name.endswith(".se") for name, _ in loaded.named_modules()) == 16
    loaded(pixel_values=X, labels=torch.tensor([0, 1])).loss.backward()


def test_cli_refuses_a_directory_without_config(tmp_path, capsys):
    assert main(["sites", str(tmp_path)]) == 2
    assert "without config.json" in capsys.readouterr().err


def test_a_directory_whose_weights_do_not_match_is_refused(tmp_path):
    ResNetForImageClassification(SMALL).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_sizes": [16, 48]}))
    with pytest.raises(CheckpointError, match="do not match|could not load"):
        from_hf_directory(tmp_path)


@pytest.mark.parametrize("model_cls, backbone_cls, config_cls", [
    ("ConvNextModel", "ConvNextBackbone", "ConvNextConfig"), ("ConvNextV2Model", "ConvNextV2Backbone", "ConvNextV2Config")])
@pytest.mark.parametrize("out_features", [["stage4"], ["stage2", "stage4"]])
def test_a_backbone_gets_the_se_blocks_of_its_model(model_cls, backbone_cls, config_cls, out_features):
    """A backbone builds its feature maps from the hidden states transformers' output-capturing
    hooks collect. The analysis stashed those hooks with the user's, so the traced backbone
    returned no feature maps and the last layer, read by nothing, was skipped (untraceable-block)."""
    config = getattr(transformers, config_cls)(hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 2, 2],
                                               out_features=out_features)
    torch.manual_seed(0)
    plain = se_inject.find_sites(getattr(transformers, model_cls)(config).eval(), example_inputs=X)
    backbone = getattr(transformers, backbone_cls)(config).eval()
    result = se_inject.inject(backbone, example_inputs=X, identity_init=True)
    assert [s.name for s in result.plan.sites] == [s.name for s in plain.sites]
    assert len(result.plan.sites) == 6
    assert [(k.name, k.reason) for k in result.plan.skipped] == [(k.name, k.reason) for k in plain.skipped]
    with torch.no_grad():
        expected, got = backbone(X, output_hidden_states=True), result.model(X, output_hidden_states=True)
    assert len(got.feature_maps) == len(out_features) and len(got.hidden_states) == 5
    for a, b in zip((*expected.feature_maps, *expected.hidden_states), (*got.feature_maps, *got.hidden_states)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


class AsksForHiddenStates(torch.nn.Module):
    """A user's model that reads a transformers model's hidden states: transformers installs its
    capturing hooks on that first call, which is the analysis' own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = transformers.ConvNextModel(ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2))

    def forward(self, x):
        return self.net(x, output_hidden_states=True).hidden_states[1]


def test_capturing_hooks_first_installed_during_the_analysis_are_kept():
    """Installed lazily into the stashed hook dicts, the hooks were dropped with them while
    transformers' "installed" flag stayed set: the converted model's hidden states were empty
    (IndexError). The analysis prepares its copy first and keeps these hooks."""
    torch.manual_seed(0)
    model = AsksForHiddenStates().eval()
    converted = se_inject.apply(model, example_inputs=X, identity_init=True)
    assert isinstance(converted.net.encoder.stages[1].layers[0].se, se_inject.SEBlock)
    with torch.no_grad():
        torch.testing.assert_close(converted(X), model(X), rtol=1e-4, atol=1e-5)


def test_a_failed_inplace_swap_takes_transformers_capture_hooks_off_again():
    """se_inject installs transformers' output-capturing hooks (ConvNeXt records its stages) just
    before the swap; when the swap fails (a registration hook raises), the model gets its hooks back
    as they were, and the swap goes through once nothing fails."""
    from torch.nn.modules.module import register_module_module_registration_hook

    torch.manual_seed(0)
    model = ConvNextForImageClassification(ConvNextConfig(depths=[1, 1], hidden_sizes=[16, 32], num_stages=2,
                                                          num_labels=3)).eval()

    def hooks(m: torch.nn.Module) -> list:
        return [(name, list(sub._forward_hooks), "_output_capturing_hooks_installed" in vars(sub))
                for name, sub in m.named_modules()]

    before = hooks(model)

    def fail(module, name, submodule):
        if type(submodule).__name__ == "ConvNextLayer":  # a rewritten block going in
            raise RuntimeError("injected fault")

    handle = register_module_module_registration_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            se_inject.apply(model, example_inputs=X, inplace=True)
    finally:
        handle.remove()
    assert hooks(model) == before
    se_inject.apply(model, example_inputs=X, inplace=True)
    assert hooks(model) != before  # the capture hooks really are installed by a swap that succeeds
    assert len(model(X, output_hidden_states=True).hidden_states) == 3


# -- nothing in a model directory or a recipe runs code, reads other files or downloads -----------

def _remote_code_directory(tmp_path: Path, config: dict) -> tuple[Path, Path]:
    """A directory whose config.json asks for custom code in x.py, which would create a marker."""
    directory, marker = tmp_path / "evil", tmp_path / "PWNED"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "x.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                    "from transformers import PretrainedConfig\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_remote'\n")
    return directory, marker


EVIL = {"model_type": "evil_remote", "auto_map": {"AutoConfig": "x.EvilConfig"}, "architectures": ["X"]}


@pytest.mark.parametrize("config", [EVIL, {**SMALL.to_dict(), "auto_map": {"AutoModel": "x.Evil"}},
                                    {**SMALL.to_dict(), "backbone_config": {"model_type": "resnet", "auto_map": {
                                        "AutoConfig": "x.EvilConfig"}}}],
                         ids=["unknown-type", "known-type", "nested"])
def test_a_directory_asking_for_custom_code_is_refused_and_runs_nothing(tmp_path, config):
    directory, marker = _remote_code_directory(tmp_path, config)
    with pytest.raises(se_inject.RecipeError, match=r"auto_map asks to run code from the model's files .*se_inject "
                                                    r"never runs such code \(trust_remote_code is off\)"):
        from_hf_directory(directory)
    assert not marker.exists()


def test_the_cli_refuses_custom_code_in_one_line_even_when_stdin_says_yes(tmp_path):
    directory, marker = _remote_code_directory(tmp_path, EVIL)
    done = subprocess.run([sys.executable, "-m", "se_inject", "sites", str(directory)], input="y\ny\n",
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), "COLUMNS": "300"})
    assert done.returncode == 1, done.stderr
    assert not marker.exists()
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error ") and "config.json.auto_map asks to run code" in lines[0], \
        done.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(auto_map={"AutoConfig": "x.C"}), r"source\.config\.auto_map asks to run code"),
    (lambda c: c.update(use_pretrained_backbone=True), r"source\.config\.use_pretrained_backbone=True would make "
                                                       r"transformers read a file or download"),
    (lambda c: c.update(backbone="microsoft/resnet-50"), r"source\.config\.backbone='microsoft/resnet-50' names a "
                                                         r"backbone that transformers would look up"),
    (lambda c: c.update(backbone_kwargs={"checkpoint_path": "/etc/hostname"}),
     r"source\.config\.backbone_kwargs\.checkpoint_path='/etc/hostname' would make transformers read a file"),
    (lambda c: c.update(model_args={"pretrained_cfg_overlay": {"file": "w.pth"}}),
     r"source\.config\.model_args\.pretrained_cfg_overlay=.* would make transformers read a file"),
    (lambda c: c.update(layer_type="~/basic"), r"source\.config\.layer_type='~/basic' names a file or a hub location"),
], ids=["auto_map", "use_pretrained_backbone", "hub-backbone", "backbone_kwargs", "model_args", "path"])
def test_a_transformers_recipe_whose_config_asks_for_code_files_or_downloads_is_refused(tmp_path, edit, message):
    torch.manual_seed(0)
    result = se_inject.inject(ResNetForImageClassification(SMALL).eval(), example_inputs=X)
    se_inject.save(result, tmp_path / "se")
    recipe = json.loads((tmp_path / "se" / "recipe.json").read_text())
    edit(recipe["source"]["config"])
    (tmp_path / "se" / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(se_inject.RecipeError, match=message):
        se_inject.load(tmp_path / "se")


@pytest.mark.parametrize("name, message", [
    ("PreTrainedModel", r"source\.model is 'PreTrainedModel', which is not a concrete transformers model"),
    ("ResNetPreTrainedModel", r"source\.model is 'ResNetPreTrainedModel', which is not a concrete transformers model"),
    ("AutoModel", r"source\.model is 'AutoModel', which is not a concrete transformers model"),
    ("ResNetConfig", r"source\.model is 'ResNetConfig', which is not a concrete transformers model"),
    ("ConvNextModel", r"source\.model is ConvNextModel, which takes a ConvNextConfig, but the config is a "
                      r"ResNetConfig \(model_type 'resnet'\)"),
])
def test_a_recipe_naming_a_class_that_is_not_a_concrete_model_for_its_config_is_a_recipe_error(tmp_path, name, message):
    torch.manual_seed(0)
    se_inject.save(se_inject.inject(ResNetForImageClassification(SMALL).eval(), example_inputs=X), tmp_path / "se")
    recipe = json.loads((tmp_path / "se" / "recipe.json").read_text())
    recipe["source"]["model"] = name
    (tmp_path / "se" / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(se_inject.RecipeError, match=message):
        se_inject.load(tmp_path / "se")


def test_a_transformers_recipe_asking_for_a_huge_model_is_refused_before_allocating(tmp_path):
    torch.manual_seed(0)
    se_inject.save(se_inject.inject(ResNetForImageClassification(SMALL).eval(), example_inputs=X), tmp_path / "se")
    recipe = json.loads((tmp_path / "se" / "recipe.json").read_text())
    recipe["source"]["config"].update(hidden_sizes=[2_000_000, 2_000_000])
    (tmp_path / "se" / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(se_inject.RecipeError, match=r"describes a ResNetForImageClassification of [\d,]{17,} "
                                                    r"parameter and buffer elements, more than the 2,000,000,000 "
                                                    r"load\(\) builds"):
        se_inject.load(tmp_path / "se")


# -- converted models pickle like the originals ----------------------------------------------------

@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_converted_convnext_pickles_and_computes_the_same_after_unpickling(how):
    """se_inject installs transformers' output-capturing hooks (closures, which pickle cannot save)
    at apply time; they are kept as CaptureHook objects that pickle, and still record the stages."""
    import io
    import pickle

    torch.manual_seed(0)
    model = ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                                                          num_labels=3)).eval()
    converted = se_inject.apply(model, example_inputs=X[:1])
    if how == "pickle":
        again = pickle.loads(pickle.dumps(converted))
    else:
        buffer = io.BytesIO()
        torch.save(converted, buffer)
        buffer.seek(0)
        again = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        expected, got = converted(X, output_hidden_states=True), again(X, output_hidden_states=True)
    assert torch.equal(got.logits, expected.logits)
    assert len(got.hidden_states) == len(expected.hidden_states) == 5
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, expected.hidden_states))
    assert len(model(X, output_hidden_states=True).hidden_states) == 5  # the original's stages, all kept
    assert type(again) is ConvNextForImageClassification
