"""Acceptance 2: site counts across timm and torchvision, shapes, identity init, clean shortcuts."""

import warnings

import pytest
import timm
import torch
import torchvision

import se_inject
from tests.helpers import assert_shortcuts_untouched, count_params

pytestmark = pytest.mark.slow

CASES = [
    # (id, factory, example input or None for the default, expected sites)
    ("tv-resnet18", lambda: torchvision.models.resnet18(), None, 8),
    ("tv-resnet50", lambda: torchvision.models.resnet50(), None, 16),
    ("tv-mobilenet_v2", lambda: torchvision.models.mobilenet_v2(), None, 10),
    ("tv-convnext_tiny", lambda: torchvision.models.convnext_tiny(), None, 18),
    ("tv-r3d_18", lambda: torchvision.models.video.r3d_18(), (1, 3, 8, 64, 64), 8),
    ("timm-convnext_tiny", lambda: timm.create_model("convnext_tiny"), None, 18),
    ("timm-convnextv2_atto", lambda: timm.create_model("convnextv2_atto"), None, 12),
    ("timm-res2net50_26w_4s", lambda: timm.create_model("res2net50_26w_4s"), None, 16),
    ("timm-hrnet_w18_small", lambda: timm.create_model("hrnet_w18_small"), None, 23),
    ("timm-densenet121", lambda: timm.create_model("densenet121"), None, 0),
    ("timm-vit_tiny_patch16_224", lambda: timm.create_model("vit_tiny_patch16_224"), None, 0),
    ("timm-seresnet50", lambda: timm.create_model("seresnet50"), None, 0),
    # Found by the coverage sweep (benchmarks/coverage.py):
    ("timm-mixer_s16_224", lambda: timm.create_model("mixer_s16_224"), None, 0),  # token MLP: dim 1 is tokens
    ("timm-dla34", lambda: timm.create_model("dla34"), (1, 3, 64, 64), 12),  # blocks nested in blocks
    ("timm-dpn68", lambda: timm.create_model("dpn68"), (1, 3, 64, 64), 18),  # cat(...)[:, :n] shortcuts
    ("timm-ghostnet_100", lambda: timm.create_model("ghostnet_100"), (1, 3, 64, 64), 9),  # cat + slice branch
]

# Why the zero-site and partial models skip what they skip.
EXPECTED_SKIPS = {
    "timm-convnextv2_atto": {"no-conv-branch": 12},  # GRN's `x + gamma * (x * Nx) + beta`
    "timm-res2net50_26w_4s": {"split-slice": 24},  # the hierarchical `sp + spx[i]` adds
    "timm-hrnet_w18_small": {"heavy-paths": 23},  # fuse layers merge two resolutions
    "timm-vit_tiny_patch16_224": {"channels-last": 24},  # (B, N, C) tokens
    "timm-seresnet50": {"has-attention": 16},  # SE is already there
    "timm-mixer_s16_224": {"channels-last": 16},  # both MLPs, the token one included
    "timm-dpn68": {"split-slice": 4},  # stage entries: the shortcut is a slice of a pre-activated projection
}


@pytest.mark.parametrize("name, factory, input_shape, expected", CASES, ids=[c[0] for c in CASES])
def test_sites_shapes_identity_and_shortcuts(name, factory, input_shape, expected):
    model = factory().eval()
    x = torch.randn(input_shape) if input_shape else se_inject.default_example_inputs(model)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_inject.NoResidualAddsWarning)
        result = se_inject.inject(model, reduction=16, identity_init=True,
                                  example_inputs=x if input_shape else None)
    plan, injected = result.plan, result.model.eval()
    assert len(plan.sites) == expected
    for reason, count in EXPECTED_SKIPS.get(name, {}).items():
        assert sum(s.reason == reason for s in plan.skipped) == count, plan.skipped_by_reason().keys()
    assert count_params(injected) - count_params(model) == sum(s.params for s in plan.sites)
    with torch.no_grad():
        before, after = model(x), injected(x)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    if expected:
        assert_shortcuts_untouched(injected, plan)


def test_channels_last_models_never_get_se_on_a_token_dim():
    plan = se_inject.find_sites(timm.create_model("vit_tiny_patch16_224"))
    assert not plan.sites
    assert all("at dim 2" in s.detail for s in plan.skipped if s.reason == "channels-last")


def test_site_names_and_widths_for_torchvision_resnet50():
    plan = se_inject.find_sites(torchvision.models.resnet50())
    assert [s.name for s in plan.sites[:4]] == ["layer1.0.se", "layer1.1.se", "layer1.2.se", "layer2.0.se"]
    assert sorted({s.hidden for s in plan.sites}) == [16, 32, 64, 128]
    assert plan.sites[0].shortcut == "Conv2d > BatchNorm2d" and plan.sites[1].shortcut == "identity"
    assert plan.sites[0].shape == (1, 256, 56, 56)
