"""Saving and loading converted models: exact round trip, and every bad file refused clearly."""

import json

import pytest
import safetensors.torch
import timm
import torch

import se_inject
from se_inject import CheckpointError, RecipeError, UnknownModelError
from se_inject.recipe import RECIPE_FILE, WEIGHTS_FILE, _sha256, read_recipe

X64 = torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("se_resnet18")
    model = timm.create_model("resnet18", num_classes=10)
    result = se_inject.inject(model, identity_init=True, example_inputs=torch.randn(1, 3, 64, 64))
    se_inject.save(result, directory, model_name="resnet18", model_kwargs={"num_classes": 10})
    return directory, result.model.eval()


def copy_dir(src, dst):
    dst.mkdir()
    for name in (RECIPE_FILE, WEIGHTS_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_round_trip_is_exact(saved):
    directory, model = saved
    loaded = se_inject.load(directory)
    assert type(loaded) is type(model)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert float(loaded.layer1[0].se.gain) == 2.0  # identity init is part of the recipe
    with torch.no_grad():
        assert torch.equal(loaded(X64), model(X64))


def test_recipe_records_source_options_sites_and_versions(saved):
    recipe = json.loads((saved[0] / RECIPE_FILE).read_text())
    assert recipe["format"] == "se_inject.recipe" and recipe["format_version"] == 1
    assert recipe["source"] == {"library": "timm", "model": "resnet18", "kwargs": {"num_classes": 10}}
    assert recipe["options"]["identity_init"] is True and recipe["options"]["reduction"] == 16
    assert recipe["sites"][:2] == ["layer1.0.se", "layer1.1.se"] and len(recipe["sites"]) == 8
    assert set(recipe["versions"]) == {"se_inject", "torch", "timm", "torchvision"}


def test_save_refuses_to_overwrite_unless_asked(saved, tmp_path):
    directory, _ = saved
    target = copy_dir(directory, tmp_path / "again")
    result = se_inject.inject(timm.create_model("resnet18", num_classes=10), example_inputs=torch.randn(1, 3, 64, 64))
    with pytest.raises(RecipeError, match="already holds a saved model.*overwrite"):
        se_inject.save(result, target, model_name="resnet18", model_kwargs={"num_classes": 10})
    se_inject.save(result, target, model_name="resnet18", model_kwargs={"num_classes": 10}, overwrite=True)
    assert not torch.equal(se_inject.load(target).layer1[0].se.fc1.weight, saved[1].layer1[0].se.fc1.weight)


def test_save_refuses_options_it_cannot_record(tmp_path):
    result = se_inject.inject(timm.create_model("resnet18"), act_layer=torch.nn.SiLU,
                              example_inputs=torch.randn(1, 3, 64, 64))
    with pytest.raises(RecipeError, match="act_layer=.*SiLU.*is a class"):
        se_inject.save(result, tmp_path, model_name="resnet18")


def edit_recipe(directory, **changes):
    recipe = json.loads((directory / RECIPE_FILE).read_text())
    recipe.update(changes)
    (directory / RECIPE_FILE).write_text(json.dumps(recipe))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / RECIPE_FILE).unlink(), "recipe.json does not exist"),
        (lambda d: (d / RECIPE_FILE).write_text('{"format": "se_inject.re'), "not valid JSON"),
        (lambda d: (d / RECIPE_FILE).write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON"),
        (lambda d: (d / RECIPE_FILE).write_text('{"model_type": "bert"}'), "no \"format\": \"se_inject.recipe\""),
        (lambda d: (d / RECIPE_FILE).write_text("[1, 2]"), "no \"format\""),
        (lambda d: edit_recipe(d, format_version=2), "format version 2.*Upgrade se_inject"),
        (lambda d: edit_recipe(d, sites="layer1.0.se"), "sites must be a list"),
        (lambda d: edit_recipe(d, source={"library": "hf", "model": "x"}), "source must name a timm model"),
        (lambda d: edit_recipe(d, weights={"file": "../model.safetensors", "sha256": "0"}), "plain file name"),
        (lambda d: edit_recipe(d, options={"reduction": 0}), "invalid options.*reduction"),
        (lambda d: edit_recipe(d, options={"colour": "red"}), "invalid options.*colour"),
        (lambda d: edit_recipe(d, sites=["layer1.0.se"]), "other SE sites than the recipe in .* records"),
        (lambda d: (d / WEIGHTS_FILE).unlink(), "model.safetensors does not exist"),
        (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:1000]), "does not match the SHA-256"),
    ],
)
def test_bad_directories_are_refused(saved, tmp_path, damage, message):
    directory = copy_dir(saved[0], tmp_path / "copy")
    damage(directory)
    with pytest.raises(RecipeError, match=message):
        se_inject.load(directory)


def rewrite_weights(directory, edit):
    tensors = safetensors.torch.load_file(str(directory / WEIGHTS_FILE))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(directory / WEIGHTS_FILE))
    edit_recipe(directory, weights={"file": WEIGHTS_FILE, "sha256": _sha256(directory / WEIGHTS_FILE)})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("layer1.0.se.fc1.weight"), r"missing tensors \['layer1.0.se.fc1.weight'\]"),
        (lambda t: t.update(extra=torch.zeros(3)), r"unexpected tensors \['extra'\]"),
        (lambda t: t.update({"fc.bias": torch.zeros(11)}), r"wrong shape.*fc.bias: \(11,\) vs \(10,\)"),
    ],
)
def test_weights_with_missing_extra_or_misshaped_tensors_are_refused(saved, tmp_path, edit, message):
    directory = copy_dir(saved[0], tmp_path / "copy")
    rewrite_weights(directory, edit)
    with pytest.raises(RecipeError, match=message):
        se_inject.load(directory)


def test_a_weights_file_that_is_not_safetensors_is_refused(saved, tmp_path):
    directory = copy_dir(saved[0], tmp_path / "copy")
    (directory / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    edit_recipe(directory, weights={"file": WEIGHTS_FILE, "sha256": _sha256(directory / WEIGHTS_FILE)})
    with pytest.raises(RecipeError, match="not a readable safetensors file"):
        se_inject.load(directory)


def test_an_unknown_model_in_the_recipe(saved, tmp_path):
    directory = copy_dir(saved[0], tmp_path / "copy")
    edit_recipe(directory, source={"library": "timm", "model": "resnet9000", "kwargs": {}})
    with pytest.raises(UnknownModelError, match="names 'resnet9000'"):
        se_inject.load(directory)


def test_checkpoints_are_read_without_pickle(tmp_path):
    model = timm.create_model("resnet18")
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    target = timm.create_model("resnet18")
    se_inject.load_checkpoint(target, tmp_path / "wrapped.pth")
    assert torch.equal(target.fc.weight, model.fc.weight)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*this torch.save file fails with "
                                              ".*UnpicklingError"):
        se_inject.read_state_dict(tmp_path / "evil.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .* as a .safetensors or torch.save file: "
                                              "this file fails"):
        se_inject.read_state_dict(tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        se_inject.read_state_dict(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        se_inject.read_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit ResNet: missing tensors \['layer1.0.bn3.bias'.*"
                       r"wrong shape \['layer1.0.conv1.weight: \(64, 64, 3, 3\) vs \(64, 64, 1, 1\)'"):
        se_inject.load_checkpoint(timm.create_model("resnet50"), tmp_path / "wrapped.pth")


def _tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=5, **kwargs)
    return se_inject.inject(model, example_inputs=torch.randn(1, 3, 64, 64), identity_init=True)


# -- a recipe names a model and its options, nothing else (issue 23 rows 2 and 3) -------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoint_path": "/etc/hostname"}, r"source\.kwargs\.checkpoint_path='/etc/hostname' would make timm read a "
                                           r"file or download"),
    ({"pretrained": True}, r"source\.kwargs\.pretrained=True would make timm read a file or download"),
    ({"pretrained_cfg": "a1_in1k"}, r"source\.kwargs\.pretrained_cfg='a1_in1k' would make timm read"),
    ({"pretrained_cfg_overlay": {"file": "/tmp/w.pth"}}, r"source\.kwargs\.pretrained_cfg_overlay=.* would make timm"),
    ({"cache_dir": "hub"}, r"source\.kwargs\.cache_dir='hub' would make timm read"),
    ({"block_args": {"attn_layer": "se"}}, r"source\.kwargs\.block_args is a dict: timm kwargs are recorded only as "
                                           r"numbers, strings, booleans, null and lists of them"),
    ({"act_layer": "../../x"}, r"source\.kwargs\.act_layer='\.\./\.\./x' names a file or a hub location"),
    ({"img_size": [64, "hf-hub:x"]}, r"source\.kwargs\.img_size=\[64, 'hf-hub:x'\] names a file or a hub location"),
], ids=["checkpoint_path", "pretrained", "pretrained_cfg", "overlay", "cache_dir", "object", "path", "scheme"])
def test_a_recipe_whose_kwargs_read_files_or_download_is_refused_before_anything_is_read(
        saved, tmp_path, monkeypatch, kwargs, message):
    directory = copy_dir(saved[0], tmp_path / "copy")
    edit_recipe(directory, source={"library": "timm", "model": "resnet18", "kwargs": {"num_classes": 10, **kwargs}})
    read = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: read.append(a) or {})
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: read.append(a))
    with pytest.raises(RecipeError, match=message):
        se_inject.load(directory)
    with pytest.raises(RecipeError, match=message):
        read_recipe(directory)
    assert read == []


def test_a_model_name_naming_a_hub_or_a_directory_is_refused(saved, tmp_path):
    directory = copy_dir(saved[0], tmp_path / "copy")
    for name in ("hf-hub:timm/resnet18.a1_in1k", "local-dir:/tmp/model"):
        edit_recipe(directory, source={"library": "timm", "model": name, "kwargs": {}})
        with pytest.raises(RecipeError, match=r"source\.model=.* names a hub or file location"):
            se_inject.load(directory)


@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoint_path": "w.pth"}, r"cannot record this source: model\.kwargs\.checkpoint_path='w\.pth' would make "
                                   r"timm read a file"),
    ({"block_args": {"attn_layer": "se"}}, r"model\.kwargs\.block_args is a dict"),
])
def test_save_never_writes_kwargs_load_would_refuse(tmp_path, kwargs, message):
    with pytest.raises(RecipeError, match=message):
        se_inject.save(_tiny(), tmp_path / "out", model_name="test_resnet", model_kwargs=kwargs)
    assert not (tmp_path / "out").exists()
