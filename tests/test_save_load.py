"""Saving and loading converted models.

Exact round trips (bf16 too); checkpoints read without pickle; save checking what it writes (the
model it names, kwargs that change the computation but no tensor, mixed dtypes); overwrites that
replace a saved directory whole, or leave the previous save as it was; and every bad directory,
weights file or recipe refused clearly, before anything is read, run, downloaded or allocated.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import se_inject
import se_inject.io.recipe as recipe_module
from se_inject import CheckpointError, RecipeError, SEInjectError, UnknownModelError
from se_inject.io import atomic_dir
from se_inject.io.recipe import RECIPE_FILE, WEIGHTS_FILE, _sha256, read_recipe

X64 = torch.randn(2, 3, 64, 64)
X64_1 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # a batch of one


# -- round trips and checkpoints -------------------------------------------------------------------

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


def test_a_bf16_model_loads_back_as_bf16(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t").to(torch.bfloat16)
    result = se_inject.inject(model, example_inputs=X64_1.to(torch.bfloat16))
    se_inject.save(result, tmp_path / "bf16", model_name="resnet10t")
    loaded = se_inject.load(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (k, a), b in zip(result.model.state_dict().items(), loaded.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k


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


def test_a_legacy_torch_save_state_dict_is_read(tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) writes the pre-1.6 format, which
    torch.load(weights_only=True) reads safely; a pickle that runs code must still be refused."""
    state = timm.create_model("resnet10t").state_dict()
    path = tmp_path / "legacy.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    read = se_inject.read_state_dict(path)
    assert list(read) == list(state) and all(torch.equal(read[k], v) for k, v in state.items())

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": Evil()}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(se_inject.CheckpointError):
        se_inject.read_state_dict(evil)


# -- save checks the model it names and what the rebuilt model computes ----------------------------

def _resnet10t_result(**kw):
    torch.manual_seed(0)
    return se_inject.inject(timm.create_model("resnet10t", **kw), example_inputs=X64_1)


@pytest.mark.parametrize("model_name, model_kwargs, message", [
    ("resnet1Ot", {}, r"resnet1Ot"),                      # not a timm model
    ("resnet18", {}, r"resnet18"),                        # a timm model, but not this one
    ("resnet10t", {"num_classes": 10}, r"num_classes|model_kwargs"),  # not how it was built
    ("resnet10t", {"no_such_kwarg": 1}, r"no_such_kwarg"),
], ids=["unknown-name", "other-model", "other-num-classes", "bad-kwarg"])
def test_save_checks_the_name_and_kwargs_before_writing(tmp_path, model_name, model_kwargs, message):
    result = _resnet10t_result()
    out = tmp_path / "saved"
    with pytest.raises(SEInjectError, match=message):
        se_inject.save(result, out, model_name=model_name, model_kwargs=model_kwargs)
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def _tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=5, **kwargs)
    return se_inject.inject(model, example_inputs=torch.randn(1, 3, 64, 64), identity_init=True)


@pytest.mark.parametrize("kwargs", [{"act_layer": "silu"}, {"global_pool": "max"}, {"output_stride": 16}],
                         ids=["act_layer", "global_pool", "output_stride"])
def test_save_refuses_kwargs_that_change_the_computation_but_no_tensor(tmp_path, kwargs):
    """The kwarg is left out of model_kwargs: the rebuilt model has the same tensors, but not the
    same outputs. save names the missing kwarg and writes nothing; with it, the round trip is exact."""
    result = _tiny(**kwargs)
    (name, value), = kwargs.items()
    with pytest.raises(RecipeError, match=rf"computes something else \(max \|difference\| .*probably lack "
                                          rf"\{{'{name}': {value!r}\}}"):
        se_inject.save(result, tmp_path / "out", model_name="test_resnet", model_kwargs={"num_classes": 5})
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    se_inject.save(result, tmp_path / "out", model_name="test_resnet", model_kwargs={"num_classes": 5, **kwargs})
    with torch.no_grad():
        assert torch.equal(se_inject.load(tmp_path / "out")(X64), result.model.eval()(X64))


def test_the_refusal_names_the_modules_that_differ_when_timm_recorded_no_kwargs(tmp_path):
    result = _tiny(act_layer="silu")
    del result.model._model_args  # a model timm did not build, or an older timm
    with pytest.raises(RecipeError, match=r"12 modules differ, e\.g\. conv1\.2 is SiLU\(inplace=True\), rebuilt as "
                                          r"ReLU\(inplace=True\)"):
        se_inject.save(result, tmp_path / "out", model_name="test_resnet", model_kwargs={"num_classes": 5})


def test_the_output_check_leaves_the_model_its_mode_hooks_and_weights(tmp_path):
    result = _tiny()
    model = result.model.train()
    calls = []
    model.fc.register_forward_hook(lambda *args: calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    se_inject.save(result, tmp_path / "out", model_name="test_resnet", model_kwargs={"num_classes": 5})
    assert calls == [] and model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model(torch.randn(2, 3, 32, 32))
    assert calls == [1]


def test_save_refuses_a_model_of_mixed_floating_dtypes(tmp_path):
    result = _tiny()
    result.model.fc.half()
    with pytest.raises(RecipeError, match=r"mixes floating dtypes \(2 tensors are not float32, e\.g\. "
                                          r"\['fc\.weight: float16', 'fc\.bias: float16'\]\).*"
                                          r"model\.to\(torch\.float32\)"):
        se_inject.save(result, tmp_path / "out", model_name="test_resnet", model_kwargs={"num_classes": 5})
    assert not (tmp_path / "out").exists()


# -- an overwrite replaces the directory as a whole ------------------------------------------------

# Every call save makes that writes, renames or creates something.
STEPS = [(os, "rename"), (os, "replace"), (os, "mkdir"), (shutil, "copymode"), (safetensors.torch, "save_model"),
         (Path, "write_text"), (atomic_dir, "_exchange")]


class Faults:
    """Counts the calls of STEPS and makes the ``fail_at``-th one raise (0: none fails)."""

    def __init__(self, monkeypatch, fail_at=0):
        self.calls, self.fail_at = [], fail_at
        for owner, name in STEPS:
            if owner is not None and hasattr(owner, name):
                monkeypatch.setattr(owner, name, self.wrap(name, getattr(owner, name)))

    def wrap(self, name, real):
        def call(*args, **kwargs):
            self.calls.append(name)
            if len(self.calls) == self.fail_at:
                raise OSError(5, f"injected failure in {name}")
            return real(*args, **kwargs)
        return call


def _weights_of(directory):
    return safetensors.torch.load_file(str(directory / WEIGHTS_FILE))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_a_failure_at_any_step_of_an_overwrite_leaves_the_previous_save_whole(tmp_path, monkeypatch, exchange):
    """Each step of the write fails in turn (a full disk, a crash): the previous save still loads
    with its own weights, and no temporary directory is left beside it. Without a failure, the new
    save is in place. With and without the one-step directory exchange."""
    first, second = _tiny(seed=0), _tiny(seed=1)
    pristine = tmp_path / "pristine"
    se_inject.save(first, pristine, model_name="test_resnet", model_kwargs={"num_classes": 5})
    old = _weights_of(pristine)
    out = tmp_path / "saved"
    monkeypatch.setattr(recipe_module, "_check_rebuilds", lambda result, recipe: None)  # tested above; quick tries
    if not exchange:
        monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)

    def overwrite():
        se_inject.save(second, out, model_name="test_resnet", model_kwargs={"num_classes": 5}, overwrite=True)

    with monkeypatch.context() as m:
        copy_dir(pristine, out)
        faults = Faults(m)
        overwrite()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pristine", "saved"]
    assert torch.equal(se_inject.load(out).fc.weight, second.model.fc.weight)

    new = {k: v.clone() for k, v in second.model.state_dict().items()}
    failed = []
    for step in range(1, len(faults.calls) + 1):
        shutil.rmtree(out)
        copy_dir(pristine, out)
        with monkeypatch.context() as m:
            Faults(m, fail_at=step)
            try:
                overwrite()
            except OSError as e:
                assert str(e) == f"[Errno 5] injected failure in {faults.calls[step - 1]}"
                failed.append(faults.calls[step - 1])
                expected = old
            else:  # Path.mkdir(exist_ok=True) of the parent takes an OSError for "it exists"
                assert faults.calls[step - 1] == "mkdir"
                expected = new
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pristine", "saved"], step
        assert sorted(p.name for p in out.iterdir()) == sorted([RECIPE_FILE, WEIGHTS_FILE]), step
        loaded = se_inject.load(out).state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in old), (step, faults.calls[step - 1])
    assert failed == faults.calls[1:], failed  # every step after the parent's mkdir fails the write
    assert ("_exchange" in faults.calls) and (("rename" in faults.calls) != exchange), faults.calls


def test_an_overwrite_through_save_fails_whole_and_then_succeeds_whole(tmp_path, monkeypatch):
    out = tmp_path / "saved"
    first, second = _tiny(seed=0), _tiny(seed=1)
    se_inject.save(first, out, model_name="test_resnet", model_kwargs={"num_classes": 5})
    with monkeypatch.context() as m:
        Faults(m, fail_at=4)  # mkdir (parent), mkdir (new), save_model, write_text: the recipe
        with pytest.raises(OSError, match="injected failure in write_text"):
            se_inject.save(second, out, model_name="test_resnet", model_kwargs={"num_classes": 5}, overwrite=True)
    assert torch.equal(se_inject.load(out).fc.weight, first.model.fc.weight)
    se_inject.save(second, out, model_name="test_resnet", model_kwargs={"num_classes": 5}, overwrite=True)
    assert torch.equal(se_inject.load(out).fc.weight, second.model.fc.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_a_failed_overwrite_keeps_the_previous_save(tmp_path, monkeypatch):
    """save(overwrite=True) fails after it has started writing (here: writing the recipe fails, as on
    a full disk). The previous save must still load, with its own weights: write beside, then
    rename (weights replaced first would no longer match the old recipe's checksum)."""
    out = tmp_path / "saved"
    torch.manual_seed(0)
    small = se_inject.inject(timm.create_model("test_resnet"), example_inputs=X64_1)
    se_inject.save(small, out, model_name="test_resnet")
    expected = {k: v.clone() for k, v in small.model.state_dict().items()}
    big = _resnet10t_result()

    def disk_full(real):
        def write(obj, *args, **kwargs):
            if isinstance(obj, dict) and "format_version" in obj:
                raise OSError(28, "No space left on device")
            return real(obj, *args, **kwargs)
        return write

    monkeypatch.setattr(json, "dumps", disk_full(json.dumps))
    monkeypatch.setattr(json, "dump", disk_full(json.dump))
    with pytest.raises(OSError, match="No space left"):
        se_inject.save(big, out, model_name="resnet10t", overwrite=True)
    monkeypatch.undo()
    loaded = se_inject.load(out)
    state = loaded.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


def test_a_saved_directory_has_the_usual_permissions_and_an_overwrite_keeps_them(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    out = tmp_path / "saved"
    se_inject.save(_tiny(), out, model_name="test_resnet", model_kwargs={"num_classes": 5})
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    out.chmod(0o750)
    se_inject.save(_tiny(seed=1), out, model_name="test_resnet", model_kwargs={"num_classes": 5}, overwrite=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750


def test_an_overwrite_refuses_a_directory_holding_other_files(tmp_path):
    out = tmp_path / "saved"
    first = _tiny()
    se_inject.save(first, out, model_name="test_resnet", model_kwargs={"num_classes": 5})
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match=r"holds other files besides a saved model \(\['notes.txt'\]\)"):
        se_inject.save(_tiny(seed=1), out, model_name="test_resnet", model_kwargs={"num_classes": 5}, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert torch.equal(se_inject.load(out).fc.weight, first.model.fc.weight)


def test_a_first_save_into_a_directory_of_other_files_keeps_them(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    se_inject.save(_tiny(), tmp_path, model_name="test_resnet", model_kwargs={"num_classes": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "notes.txt", "recipe.json"]
    se_inject.load(tmp_path)


# -- a recipe names a model and its options, nothing else ------------------------------------------

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


def test_load_refuses_a_recipe_dtype_other_than_the_weights(saved, tmp_path):
    directory = copy_dir(saved[0], tmp_path / "copy")
    edit_recipe(directory, dtype="float16")
    with pytest.raises(RecipeError, match=r"recipe\.json records dtype 'float16' but the weights in model\.safetensors "
                                          r"hold float32 tensors"):
        se_inject.load(directory)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"fc.bias": torch.arange(10)}), r"tensors of the wrong dtype \['fc\.bias: int64 vs float32'\]"),
    (lambda t: t.update({"fc.bias": t["fc.bias"].half()}), r"records dtype 'float32' but the weights .* hold float16 "
                                                             r"and float32 tensors"),
    (lambda t: t.update({"bn1.num_batches_tracked": torch.tensor(3.0)}),
     r"records dtype 'float32'.*|wrong dtype \['bn1\.num_batches_tracked: float32 vs int64'\]"),
    (lambda t: t.update({"bn1.num_batches_tracked": torch.tensor(3, dtype=torch.int32)}),
     r"tensors of the wrong dtype \['bn1\.num_batches_tracked: int32 vs int64'\]"),
], ids=["int64-for-float", "one-half-tensor", "float-for-int", "int32-for-int64"])
def test_load_refuses_tensors_of_another_dtype_than_the_model(saved, tmp_path, edit, message):
    directory = copy_dir(saved[0], tmp_path / "copy")
    rewrite_weights(directory, edit)
    with pytest.raises(RecipeError, match=message):
        se_inject.load(directory)


def test_load_bounds_the_model_size_before_allocating_it(saved, tmp_path, monkeypatch):
    """num_classes edited to 10**9 asks for a 512-billion-parameter classifier: refused from the
    meta-device count, before anything is allocated; a caller can lower or lift the bound."""
    directory = copy_dir(saved[0], tmp_path / "copy")
    assert sum(p.numel() for p in se_inject.load(directory, max_parameters=20_000_000).parameters()) > 11_000_000
    # resnet18 with 10 classes: 11,181,642 parameters and 9,620 elements of BatchNorm buffers, before SE
    with pytest.raises(RecipeError, match=r"describes a resnet18 of 11,191,262 parameter and buffer elements, "
                                          r"more than the 1,000,000 load\(\) builds \(max_parameters\); pass "
                                          r"max_parameters=11191262 if you trust this recipe"):
        se_inject.load(directory, max_parameters=1_000_000)
    edit_recipe(directory, source={"library": "timm", "model": "resnet18", "kwargs": {"num_classes": 10 ** 9}})
    real_empty = torch.empty
    allocated = []

    def empty(*size, **kwargs):  # what nn.Linear allocates its weight with
        t = real_empty(*size, **kwargs)
        if not t.is_meta:
            allocated.append(t.numel())
        return t

    monkeypatch.setattr(torch, "empty", empty)
    # 11,176,512 + 9,620 elements without the classifier, 512 * 10**9 + 10**9 with it
    with pytest.raises(RecipeError, match=rf"describes a resnet18 of 513,011,186,132 parameter and buffer elements, "
                                          rf"more than the {se_inject.io.recipe.MAX_PARAMETERS:,}"):
        se_inject.load(directory)
    assert max(allocated, default=0) < 10 ** 8
    with pytest.raises(se_inject.OptionError, match="max_parameters must be a positive integer or None"):
        se_inject.load(directory, max_parameters=True)


def test_a_tampered_recipe_input_shape_is_refused_before_allocating(tmp_path):
    """example_input_shape [1, 3, 10**6, 10**6] asks for 12 TB: load must refuse the recipe
    (RecipeError naming the field), not try to allocate it (a RuntimeError from the allocator;
    a shape a little smaller would take all the memory of the machine)."""
    result = _resnet10t_result()
    out = tmp_path / "saved"
    se_inject.save(result, out, model_name="resnet10t")
    recipe = json.loads((out / "recipe.json").read_text())
    recipe["example_input_shape"] = [1, 3, 10 ** 6, 10 ** 6]
    (out / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(RecipeError, match=r"example_input_shape"):
        se_inject.load(out)


@pytest.mark.parametrize("changes, message", [
    ({"format_version": True}, r"format_version must be a positive integer, got True"),
    ({"format_version": "1"}, r"format_version must be a positive integer, got '1'"),
    ({"format_version": 0}, r"format_version must be a positive integer, got 0"),
    ({"weights": {"file": WEIGHTS_FILE, "sha256": "x" * 64}}, r"weights\.sha256 must be 64 hex digits"),
    ({"weights": {"file": WEIGHTS_FILE, "sha256": "0" * 64, "url": "https://x"}}, r"a file and its sha256, only"),
    ({"versions": {"timm": 1}}, r"versions must map library names to version strings"),
    ({"options": []}, r"options is missing"),
    ({"options": {"reduction": "16"}}, r"invalid options.*reduction"),
    ({"dtype": 32}, r"dtype 32 is not a floating torch dtype"),
    ({"script": "import os"}, r"it has fields se_inject does not write: \['script'\]"),
    ({"source": {"library": "timm", "model": "resnet18", "kwargs": {}, "config": {}}},
     r"source has fields se_inject does not write: \['config'\]"),
], ids=["version-bool", "version-str", "version-0", "sha-not-hex", "weights-extra", "versions", "options-list",
        "option-type", "dtype-int", "unknown-field", "source-field"])
def test_every_recipe_field_is_checked_for_its_type(saved, tmp_path, changes, message):
    directory = copy_dir(saved[0], tmp_path / "copy")
    edit_recipe(directory, **changes)
    with pytest.raises(RecipeError, match=message):
        read_recipe(directory)
    with pytest.raises(RecipeError, match=message):
        se_inject.load(directory)
