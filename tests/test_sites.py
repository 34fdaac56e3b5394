"""Which residual adds get an SE block, and why the others are skipped.

The site finder on small hand-written graphs, one per reason code, and the graph index it walks;
every spelling of the add, the include / exclude / min_channels filters, attention already there;
blocks whose trace cannot be trusted (it does not reproduce the block, or train mode traces
otherwise); outputs in containers and features_only nets; and the sites of whole timm and
torchvision models (slow).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torchvision
from torch import fx, nn

import se_inject
from se_inject import NoResidualAddsWarning, RefusedModuleWarning, VerificationError
from se_inject.plan import SKIP_REASONS
from se_inject.sites.classify import ResidualAdd, SkippedAdd, classify_adds
from se_inject.sites.graph_index import GraphIndex
from se_inject.trace.scopes import ShapeRecorder
from tests.helpers import (
    DlaLike,
    ResBlock,
    assert_same_snapshot,
    assert_shortcuts_untouched,
    count_params,
    snapshot,
    upstream,
)

X = torch.randn(2, 8, 6, 6)
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
X64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# -- the site finder on small graphs, one per reason code ------------------------------------------
# Each graph is a tiny module traced with plain torch.fx, with shapes from se_inject's
# ShapeRecorder; nothing here depends on timm's or torchvision's models.

def verdicts(module: nn.Module, *inputs: torch.Tensor, batch_size: int = 2) -> list:
    gm = fx.symbolic_trace(module.eval())
    ShapeRecorder(gm).run(*inputs)
    return classify_adds(gm, batch_size=batch_size)


def only(module: nn.Module, *inputs: torch.Tensor, **kw):
    (v,) = verdicts(module, *inputs, **kw)
    return v


class Basic(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(torch.relu(x))) + x


def test_a_plain_residual_add_is_found_with_its_parts():
    v = only(Basic(), X)
    assert isinstance(v, ResidualAdd)
    assert (v.branch.name, v.shortcut.name, v.fork.name, v.tail.name, v.consumer.name) == ("bn", "x", "x", "bn", "add")
    assert (v.channels, v.shape, v.branch_index, v.shortcut_ops) == (8, (2, 8, 6, 6), 0, ())


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2, 8, 6, 6))

    def forward(self, x):
        return x + 1.0, x + self.bias


class Broadcast(nn.Module):
    def forward(self, x):
        return x + x.mean((2, 3), keepdim=True)


class NoSpatial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(torch.relu(x)) + x


class NotFloat(nn.Module):
    def forward(self, x):
        i = x.long()
        return i + i


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x, y):
        return torch.relu(self.conv(x)) + y


class Heavy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.a(x)) + torch.relu(self.b(x))


class SplitSlice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a, b = torch.split(x, 4, dim=1)
        return torch.relu(self.conv(a)) + b


class NoConv(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2 + x


class LinearBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + x


class TokensLast(nn.Module):  # (B, H, W, C) with a linear over the last dim: NHWC
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(torch.relu(x)) + x


class UnknownChannels(nn.Module):  # the branch ends in a layer that moves channels into space
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.shuffle = nn.Conv2d(8, 32, 3, stride=2, padding=1), nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(torch.relu(self.conv(x))) + x


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True))) + x


CASES = [
    # (reason, module, inputs, batch size)
    ("scalar", Scalar(), (X,), 2),
    ("broadcast", Broadcast(), (X,), 2),
    ("no-spatial-dims", NoSpatial(), (torch.randn(2, 8),), 2),
    ("batch-dim", Basic(), (X,), 4),
    ("not-float", NotFloat(), (X,), 2),
    ("no-common-input", TwoInputs(), (X, X), 2),
    ("heavy-paths", Heavy(), (X,), 2),
    ("split-slice", SplitSlice(), (X,), 2),
    ("no-conv-branch", NoConv(), (X,), 2),
    ("linear-branch", LinearBranch(), (X,), 2),
    ("channels-last", TokensLast(), (X,), 2),
    ("channel-dim-unknown", UnknownChannels(), (torch.randn(2, 8, 12, 12),), 2),
    ("has-attention", SqueezeExcite(), (X,), 2),
]


@pytest.mark.parametrize("reason, module, inputs, batch", CASES, ids=[c[0] for c in CASES])
def test_each_reason_code_from_a_small_graph(reason, module, inputs, batch):
    found = verdicts(module, *inputs, batch_size=batch)
    assert found and all(isinstance(v, SkippedAdd) for v in found)
    assert reason in {v.reason for v in found}, [(v.reason, v.detail) for v in found]
    assert all(v.reason in SKIP_REASONS and v.detail for v in found)


def test_every_reason_code_of_the_site_finder_has_a_case():
    pipeline_only = {"filtered", "shared-module", "untraceable-block", "train-eval-differ", "unverified",
                     "no-mid-point", "in-place-write"}  # no-mid-point, in-place-write: tests/test_attention.py
    assert {c[0] for c in CASES} == set(SKIP_REASONS) - pipeline_only


def test_the_reason_does_not_depend_on_operand_order():
    class Reversed(LinearBranch):
        def forward(self, x):
            return x + self.bn(self.conv(x))

    assert only(Reversed(), X).reason == only(LinearBranch(), X).reason == "linear-branch"


def test_a_projection_shortcut_is_light_and_labelled():
    class Projection(Basic):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

        def forward(self, x):
            return self.bn(self.conv(torch.relu(x))) + self.down(x)

    v = only(Projection(), X)
    assert isinstance(v, ResidualAdd) and v.shortcut_ops == ("Conv2d", "BatchNorm2d")


def test_trailing_dropout_stays_after_the_site():
    class Dropped(Basic):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            return self.drop(self.bn(self.conv(torch.relu(x)))) + x

    v = only(Dropped(), X)
    assert (v.tail.name, v.consumer.name) == ("bn", "drop")


# -- the graph index -------------------------------------------------------------------------------

def test_graph_index_ancestors_agree_with_a_plain_walk():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 16, 1), ResBlock(16, 16), ResBlock(16, 32, stride=2)))
    index = GraphIndex(gm)
    for a in index.nodes:
        for b in index.nodes:
            assert index.reaches(a, b) == (a in upstream(b)), (a.name, b.name)


def test_graph_index_tells_data_from_parameters():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.w + self.w

    index = GraphIndex(fx.symbolic_trace(M()))
    assert {n.name: index.is_data[n] for n in index.nodes} == {
        "x": True, "w": False, "mul": True, "add": True, "output": True}


# -- filters, and attention already there ----------------------------------------------------------

def test_include_exclude_and_min_channels():
    model = torchvision.models.resnet18()
    names = lambda **kw: [s.name for s in se_inject.find_sites(model, **kw).sites]  # noqa: E731
    assert names(include="layer4.*") == ["layer4.0.se", "layer4.1.se"]
    assert names(exclude=["layer1.*", "layer2.*", "layer3.*"]) == ["layer4.0.se", "layer4.1.se"]
    assert names(min_channels=256) == ["layer3.0.se", "layer3.1.se", "layer4.0.se", "layer4.1.se"]
    plan = se_inject.find_sites(model, include="layer4.*")
    assert sum(s.reason == "filtered" for s in plan.skipped) == 6


def test_a_second_apply_adds_nothing():
    once = se_inject.apply(torchvision.models.resnet18())
    with pytest.warns(NoResidualAddsWarning, match=r"has-attention x8"):
        result = se_inject.inject(once)
    assert count_params(result.model) == count_params(once)
    assert {s.reason for s in result.plan.skipped} == {"has-attention"}


# -- blocks whose trace cannot be trusted are left alone -------------------------------------------

class AliasBlock(ResBlock):
    """fx turns `out += x` into an out-of-place add, so returning an alias of `out` traces wrong."""

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        alias = out
        out += x
        return self.relu(alias)


class TrainOnlyBlock(ResBlock):
    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.training:
            out = out * 0.9
        return self.relu(out + x)


def test_a_block_whose_trace_does_not_reproduce_it_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), AliasBlock(16, 16), ResBlock(16, 16)).eval()
    before = snapshot(model)
    with pytest.warns(RefusedModuleWarning, match=r"traced graph of 1 \(AliasBlock\) does not reproduce"):
        result = se_inject.inject(model, example_inputs=X32)
    assert [s.name for s in result.plan.sites] == ["2.se"]
    assert [(s.name, s.reason) for s in result.plan.skipped] == [("1:add", "unverified")]
    assert type(result.model[1]) is AliasBlock  # left as it was
    with torch.no_grad():
        torch.testing.assert_close(result.model[1](X32[:, :1].repeat(1, 16, 1, 1)),
                                   model[1](X32[:, :1].repeat(1, 16, 1, 1)))
    with pytest.raises(VerificationError, match=r"1 \(AliasBlock\).*exclude="):
        se_inject.apply(model, example_inputs=X32, strict=True)
    assert_same_snapshot(before, snapshot(model))


def test_a_block_that_traces_differently_in_train_mode_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), TrainOnlyBlock(16, 16), ResBlock(16, 16))
    plan = se_inject.find_sites(model, example_inputs=X32)
    assert [s.name for s in plan.sites] == ["2.se"]
    assert [(s.name, s.reason) for s in plan.skipped] == [("1:add", "train-eval-differ")]


class DropoutArgBlock(ResBlock):
    """The classic WideResNet block: dropout through a call argument, no ``if self.training``."""

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = nn.functional.dropout(out, p=0.3, training=self.training)
        return self.bn2(self.conv2(out)) + x


class FunctionalNormBlock(ResBlock):
    """``F.batch_norm(..., self.training, ...)``: normalises with batch statistics and updates the
    running ones in train mode only."""

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        bn = self.bn2
        out = nn.functional.batch_norm(self.conv2(out), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                       self.training, 0.1, bn.eps)
        return self.relu(out + x)


@pytest.mark.parametrize("block", [DropoutArgBlock, FunctionalNormBlock])
def test_a_training_flag_passed_as_an_argument_is_a_train_eval_difference(block):
    """Both modes trace to the same calls; only the frozen ``training=False`` differs. The block
    must be left alone, so that the converted model still drops out / updates its statistics."""
    model = nn.Sequential(nn.Conv2d(3, 16, 1), block(16, 16), ResBlock(16, 16)).eval()
    result = se_inject.inject(model, example_inputs=X32, identity_init=True)
    assert [s.name for s in result.plan.sites] == ["2.se"]
    assert [(s.name, s.reason) for s in result.plan.skipped] == [("1:add", "train-eval-differ")]
    assert type(result.model[1]) is block
    original, converted = copy.deepcopy(model).train(), copy.deepcopy(result.model).train()
    torch.manual_seed(0)
    expected = original(X32)
    torch.manual_seed(0)
    torch.testing.assert_close(converted(X32), expected, rtol=1e-5, atol=1e-5)  # the same dropout mask
    torch.testing.assert_close(converted[1].bn2.running_mean, original[1].bn2.running_mean)
    if block is FunctionalNormBlock:
        assert original[1].bn2.running_mean.abs().sum() > 0  # updated in train mode


# -- outputs in containers, features_only nets -----------------------------------------------------

@pytest.mark.parametrize("output", ["tensor", "tuple", "list", "dict"])
def test_the_output_container_does_not_change_the_sites(output):
    """The same network returning a tensor, a tuple, a list or a dict gets the same SE sites, with no
    refused module (fx returns its own immutable list / dict, which is not a different structure)."""
    torch.manual_seed(0)
    reference = [s.name for s in se_inject.find_sites(DlaLike("tensor").eval(), example_inputs=X32).sites]
    assert reference == ["top.mid.se", "top.se"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = se_inject.find_sites(DlaLike(output).eval(), example_inputs=X32)
    assert [s.name for s in plan.sites] == reference
    assert not [w for w in caught if issubclass(w.category, se_inject.RefusedModuleWarning)]


@pytest.mark.parametrize("feature_cls", ["list", "dict"])
def test_a_features_only_model_gets_the_sites_of_the_classifier(feature_cls):
    """timm's dla34 as a feature extractor (a list or dict of maps) and as a classifier: the same
    SE sites, and the classifier's SE weights load into the feature extractor."""
    torch.manual_seed(0)
    classifier = se_inject.inject(timm.create_model("dla34"), example_inputs=X64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        features = se_inject.inject(timm.create_model("dla34", features_only=True, feature_cls=feature_cls),
                                    example_inputs=X64)
    assert not [str(w.message)[:200] for w in caught if issubclass(w.category, se_inject.RefusedModuleWarning)]
    assert [s.name for s in features.plan.sites] == [s.name for s in classifier.plan.sites]
    se_state = {k: v for k, v in classifier.model.state_dict().items() if ".se." in k}
    missing, unexpected = features.model.load_state_dict(se_state, strict=False)
    assert not unexpected and not [k for k in missing if ".se." in k]


# -- whole timm and torchvision models: counts, shapes, identity init, clean shortcuts (slow) ------

MODELS = [
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


@pytest.mark.slow
@pytest.mark.parametrize("name, factory, input_shape, expected", MODELS, ids=[c[0] for c in MODELS])
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


@pytest.mark.slow
def test_channels_last_models_never_get_se_on_a_token_dim():
    plan = se_inject.find_sites(timm.create_model("vit_tiny_patch16_224"))
    assert not plan.sites
    assert all("at dim 2" in s.detail for s in plan.skipped if s.reason == "channels-last")


@pytest.mark.slow
def test_site_names_and_widths_for_torchvision_resnet50():
    plan = se_inject.find_sites(torchvision.models.resnet50())
    assert [s.name for s in plan.sites[:4]] == ["layer1.0.se", "layer1.1.se", "layer1.2.se", "layer2.0.se"]
    assert sorted({s.hidden for s in plan.sites}) == [16, 32, 64, 128]
    assert plan.sites[0].shortcut == "Conv2d > BatchNorm2d" and plan.sites[1].shortcut == "identity"
    assert plan.sites[0].shape == (1, 256, 56, 56)
