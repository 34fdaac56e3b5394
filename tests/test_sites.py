"""The site finder on its own: one small hand-written graph per reason code of classify_adds.

Each graph is a tiny module traced with plain torch.fx, with shapes from se_inject's ShapeRecorder;
nothing here depends on timm's or torchvision's models.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from se_inject.plan import SKIP_REASONS
from se_inject.trace.scopes import ShapeRecorder
from se_inject.sites.classify import ResidualAdd, SkippedAdd, classify_adds


def verdicts(module: nn.Module, *inputs: torch.Tensor, batch_size: int = 2) -> list:
    gm = fx.symbolic_trace(module.eval())
    ShapeRecorder(gm).run(*inputs)
    return classify_adds(gm, batch_size=batch_size)


def only(module: nn.Module, *inputs: torch.Tensor, **kw):
    (v,) = verdicts(module, *inputs, **kw)
    return v


X = torch.randn(2, 8, 6, 6)


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
