"""The coverage sweep's CI subset: ~15 timm families of every kind, and 5 transformers models, each
verified end to end."""

import pytest

from benchmarks import coverage as coverage_module

# One worker runs the whole module (its fixture is the CI subset sweep), under pytest-xdist too.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("coverage")]


@pytest.fixture(scope="module")
def coverage():
    return coverage_module


@pytest.fixture(scope="module")
def outcomes(coverage):
    return {o.family: o for o in coverage.sweep(coverage.CI_FAMILIES)}


EXPECTED = {  # family: (sites, reasons that must appear among the skipped adds)
    "resnet": (16, set()),
    "convnext": (12, set()),
    "efficientnet": (0, {"has-attention"}),  # SE is already there
    "mobilenetv3": (1, {"has-attention"}),  # the one block without SE gets it
    "regnet": (13, set()),
    "res2net": (16, {"split-slice"}),
    "hrnet": (23, {"heavy-paths"}),
    "nfnet": (16, set()),  # inside timm's no-trace NormFreeBlock
    "sknet": (0, {"has-attention"}),  # selective-kernel attention counts as channel attention
    "mambaout": (0, {"channels-last"}),
    "vision_transformer": (0, {"channels-last"}),
    "densenet": (0, set()),
    "dla": (12, set()),
    "ghostnet": (9, {"has-attention"}),
    "resnetv2": (16, set()),
}


def test_ci_subset_is_the_expected_families(coverage):
    assert sorted(coverage.CI_FAMILIES) == sorted(EXPECTED)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_family_outcome(outcomes, family):
    outcome = outcomes[family]
    sites, reasons = EXPECTED[family]
    assert outcome.status == ("handled" if sites else "no-residual"), outcome.message
    assert outcome.sites == sites
    assert reasons <= set(outcome.skipped)
    if sites:
        assert outcome.max_rel_diff is not None and outcome.max_rel_diff <= 1e-4


def test_every_family_with_conv_residual_blocks_is_handled_and_none_is_wrong(coverage, outcomes):
    summary = coverage.summarize(list(outcomes.values()))
    assert summary["silently_wrong"] == 0 and "bug" not in summary["by_status"]
    assert summary["handled"] == summary["with_conv_residual_blocks"] == sum(1 for s, _ in EXPECTED.values() if s)


HF_EXPECTED = {  # transformers model type: (sites, reasons that must appear among the skipped adds)
    "resnet": (16, set()),
    "convnext": (18, set()),
    "mobilenet_v2": (10, set()),  # inside opaque TF-padding conv layers, channel dim proven
    "poolformer": (12, {"no-conv-branch"}),  # blocks return (x,); the pooling mixer has no conv
    "mobilenet_v1": (0, set()),  # no residual add at all
}


@pytest.fixture(scope="module")
def hf_outcomes(coverage):
    pytest.importorskip("transformers")
    return {o.model: o for o in coverage.sweep_hf(coverage.HF_CI)}


def test_hf_ci_subset_is_the_expected_models(coverage):
    assert sorted(coverage.HF_CI) == sorted(HF_EXPECTED)


@pytest.mark.parametrize("model_type", sorted(HF_EXPECTED))
def test_hf_model_outcome(coverage, hf_outcomes, model_type):
    (outcome,) = [o for o in hf_outcomes.values() if o.model == coverage.hf_jobs([model_type])[0][1]]
    sites, reasons = HF_EXPECTED[model_type]
    assert outcome.status == ("handled" if sites else "no-residual"), outcome.message
    assert outcome.sites == sites and reasons <= set(outcome.skipped)
    if sites:
        assert outcome.max_rel_diff is not None and outcome.max_rel_diff <= 1e-4
