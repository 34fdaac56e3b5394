"""act_layer and gate_layer are checked by what they do (issue 23 row 5): an activation is
elementwise and nonlinear, a gate maps 0 to 0.5 and everything into [0, 1], monotonically. The check
lives in se_inject.layers and every way in (SEOptions, apply, SEBlock, timm attentions, the
gain gates of identity init) goes through it.

Run:  PYTHONPATH=$PWD python -m pytest -q tests/test_layer_checks.py -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import se_inject
from se_inject import OptionError, SEBlock
from se_inject.modules.attentions import GainGate
from tests.helpers import small_resnet

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class Scaled(nn.Module):
    def forward(self, x):
        return 3 * x + 1


class RowSoftmax(nn.Module):
    def forward(self, x):
        return x.softmax(-1)


class CumSum(nn.Module):
    def forward(self, x):
        return x.cumsum(-1)


class BatchCentred(nn.Module):  # depends on the other rows of the batch
    def forward(self, x):
        return torch.relu(x - x.mean(0, keepdim=True))


class HalfTanh(nn.Module):  # maps 0 to 0.5 but leaves [0, 1]
    def forward(self, x):
        return 0.5 + torch.tanh(x)


class Bump(nn.Module):  # in [0, 1], 0.5 at 0, but not monotone
    def forward(self, x):
        return 0.5 + 0.5 * torch.sin(x)


class Shifted(nn.Module):  # a sigmoid that is not 0.5 at 0
    def forward(self, x):
        return torch.sigmoid(x + 1)


class MySigmoid(nn.Module):  # a user's own gate: accepted
    def forward(self, x):
        return 1 / (1 + torch.exp(-x))


class Squareplus(nn.Module):  # a user's own activation: accepted
    def forward(self, x):
        return 0.5 * (x + torch.sqrt(x * x + 4))


BAD_ACTS = [(nn.Identity, "is linear"), (Zero, "is linear"), (Scaled, "is linear"), (RowSoftmax, "is not elementwise"),
            (nn.Softmax, "is not elementwise"), (CumSum, "is not elementwise"), (BatchCentred, "is not elementwise"),
            (nn.Conv2d, "cannot be built"), (nn.Flatten, "maps a")]
BAD_GATES = [(nn.Identity, "gives gate(0) = 0"), (nn.ReLU, "gives gate(0) = 0"), (nn.Tanh, "gives gate(0) = 0"),
             (Shifted, "gives gate(0) = 0.731"), (HalfTanh, "leaves [0, 1]"), (Bump, "is not non-decreasing"),
             (RowSoftmax, "is not elementwise"), (nn.Linear, "cannot be built")]


CASES = [("act_layer", c, why) for c, why in BAD_ACTS] + [("gate_layer", c, why) for c, why in BAD_GATES]


@pytest.mark.parametrize("option, layer, why", CASES, ids=[f"{o}-{c.__name__}" for o, c, _ in CASES])
def test_a_layer_that_does_not_behave_as_its_option_says_is_refused_with_what_to_pass(option, layer, why):
    """Every way in: the options, SEBlock itself, and a timm attention that takes the layer."""
    name, is_act = layer.__name__, option == "act_layer"
    start = f"{option}={name} is not " + ("an activation: " if is_act else "a gate: a gate needs gate(0) = 0.5")
    hint = "pass one such as 'gelu'" if is_act else "pass 'hard_sigmoid' or 'sigmoid'"
    for make in (lambda: se_inject.SEOptions(**{option: layer}), lambda: SEBlock(16, **{option: layer}),
                 lambda: se_inject.SEOptions(**{option: layer}, attn="gc" if is_act else "eca")):
        with pytest.raises(OptionError) as info:
            make()
        message = str(info.value)
        assert message.startswith(start) and f" {name} {why}" in message and hint in message, message


def test_the_repro_layers_are_refused_before_any_analysis():
    """Issue 23 row 5's repro: nn.Identity and nn.ReLU as gates and a module returning zeros as the
    activation were accepted by apply."""
    for kwargs in ({"gate_layer": nn.Identity}, {"act_layer": Zero}, {"gate_layer": nn.ReLU}):
        with pytest.raises(OptionError, match=r"is not an? (gate|activation)"):
            se_inject.apply(small_resnet(), example_inputs=X32, **kwargs)


def test_the_gain_gate_of_identity_init_uses_the_same_check():
    with pytest.raises(OptionError, match=r"gate_layer=Tanh is not a gate: .* but Tanh gives gate\(0\) = 0;"):
        GainGate(nn.Tanh)
    assert float(GainGate(nn.Sigmoid)(torch.zeros(1))) == 1.0


@pytest.mark.parametrize("act", ["relu", "relu6", "silu", "swish", "gelu", "hard_swish", "mish", nn.Tanh,
                                 nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Softplus, Squareplus])
@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid", MySigmoid])
def test_real_activations_and_gates_are_accepted_and_run(act, gate):
    se = SEBlock(16, act_layer=act, gate_layer=gate)
    x = torch.randn(2, 16, 4, 4)
    g = se.gate_of(x)
    assert g.shape == (2, 16) and bool(((g >= 0) & (g <= 1)).all())
    se.init_identity_()
    assert torch.equal(se(x), x)


def test_the_check_runs_with_torchs_defaults_inside_autocast_and_an_ambient_meta_device():
    """The probes make their own CPU float32 tensors: a caller's autocast region or ambient device
    must not turn them into bfloat16 or meta tensors (issue 22 rows 7 and 11)."""
    class Fresh(nn.Module):  # a class never checked before, so the probes run here
        def forward(self, x):
            return torch.nn.functional.silu(x)

    class FreshGate(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)

    with torch.device("meta"), torch.autocast("cpu", dtype=torch.bfloat16):
        options = se_inject.SEOptions(act_layer=Fresh, gate_layer=FreshGate, identity_init=True)
    assert options.act_layer is Fresh
