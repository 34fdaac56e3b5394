"""The param/FLOP report: the known resnet50 figures, consistency of the parts, JSON shape."""

import json

import pytest
import timm
import torch
import torchvision

import se_inject
from se_inject.cost.report import build_report, count_flops

REQUIRED_KEYS = {"model", "input_shape", "reduction", "params", "flops", "sites", "skipped"}


@pytest.fixture(scope="module")
def resnet50_report():
    model = timm.create_model("resnet50")
    inputs = se_inject.default_example_inputs(model)
    result = se_inject.inject(model, reduction=16, example_inputs=inputs)
    return build_report(model, result, inputs, model_name="resnet50")


def test_resnet50_figures(resnet50_report):
    r = resnet50_report.to_dict()
    assert r["input_shape"] == [1, 3, 224, 224] and r["reduction"] == 16
    assert r["params"] == {"before": 25_557_032, "after": 28_088_024, "added": 2_530_992}
    assert (r["flops"]["before"], r["flops"]["after"]) == (8_178_368_512, 8_183_398_400)
    assert len(r["sites"]) == 16
    assert {s["hidden"] for s in r["sites"]} == {16, 32, 64, 128}


def test_parts_add_up_to_the_totals(resnet50_report):
    r = resnet50_report.to_dict()
    assert sum(s["params"] for s in r["sites"]) == r["params"]["added"]
    assert sum(s["flops"] for s in r["sites"]) == r["flops"]["added"]
    for s in r["sites"]:
        assert s["params"] == 2 * s["channels"] * s["hidden"] + s["hidden"] + s["channels"]
        assert s["flops"] == 4 * s["channels"] * s["hidden"]  # two matmuls, 2 FLOPs per multiply-add
        h, w = s["feature_map"]
        assert s["elementwise_flops"] == 2 * s["channels"] * h * w + s["hidden"] + s["channels"]


def test_json_has_the_documented_keys_and_only_plain_types(resnet50_report):
    r = json.loads(json.dumps(resnet50_report.to_dict()))
    assert REQUIRED_KEYS <= set(r)
    assert set(r["params"]) >= {"before", "after", "added"} and set(r["flops"]) >= {"before", "after", "added"}
    assert all({"name", "channels", "hidden", "params", "flops"} <= set(s) for s in r["sites"])
    assert all(isinstance(s["params"], int) and isinstance(s["flops"], int) for s in r["sites"])


def test_resnet18_params():
    model = timm.create_model("resnet18")
    inputs = (torch.randn(1, 3, 64, 64),)
    report = build_report(model, se_inject.inject(model, example_inputs=inputs), inputs)
    assert (report.params_before, report.params_after) == (11_689_512, 11_779_624)


def test_skipped_adds_are_listed_with_reasons():
    model = timm.create_model("res2net50_26w_4s")
    inputs = (torch.randn(1, 3, 64, 64),)
    report = build_report(model, se_inject.inject(model, example_inputs=inputs), inputs)
    assert len(report.sites) == 16
    assert {s.reason for s in report.skipped} == {"split-slice"} and len(report.skipped) == 24
    assert {s["reason"] for s in report.to_dict()["skipped"]} == {"split-slice"}


def test_identity_init_gain_counts_in_the_elementwise_work():
    model = torchvision.models.resnet18()
    inputs = (torch.randn(1, 3, 64, 64),)
    plain = build_report(model, se_inject.inject(model, example_inputs=inputs), inputs)
    warm = build_report(model, se_inject.inject(model, example_inputs=inputs, identity_init=True), inputs)
    assert warm.elementwise_flops - plain.elementwise_flops == sum(s.channels for s in plain.sites)


def test_count_flops_restores_training_flags():
    model = torchvision.models.resnet18().train()
    model.layer1[0].bn1.eval()
    count_flops(model, (torch.randn(1, 3, 32, 32),))
    assert model.training and not model.layer1[0].bn1.training and model.layer1[0].bn2.training
