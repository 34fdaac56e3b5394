"""The SE block, and identity init.

SEBlock: shapes, hidden widths, state_dict layout, equivalence with timm's SEModule. Identity init:
the block returns its input and every parameter learns; the gate is exactly 1 at any scale and in
any dtype; the gradients SEBlock.init_identity_ states arrive when it says, in single blocks and in
whole converted models.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from timm.layers import SEModule
from torch import nn

import se_inject
from se_inject import OptionError, SEBlock, se_hidden_channels
from se_inject.layers import ACT_LAYERS, alive_point, resolve_layer
from tests.helpers import randomize_norms


# -- the block: shapes, widths, state_dict ---------------------------------------------------------

@pytest.mark.parametrize(
    "shape, dims, conv",
    [((2, 64, 50), 1, nn.Conv1d), ((2, 64, 56, 56), 2, nn.Conv2d), ((2, 64, 4, 14, 14), 3, nn.Conv3d)],
)
def test_shape_is_preserved_for_1d_2d_3d(shape, dims, conv):
    se = SEBlock(64, spatial_dims=dims)
    assert se(torch.randn(shape)).shape == shape
    assert isinstance(se.fc1, conv) and isinstance(se.fc2, conv)


def test_seed_notebook_sanity_check():
    # seed-notes.md: x of shape (2, 64, 56, 56) keeps its shape through SEBlock(64).
    assert SEBlock(64)(torch.randn(2, 64, 56, 56)).shape == (2, 64, 56, 56)


@pytest.mark.parametrize("channels, hidden", [(64, 8), (128, 8), (256, 16), (512, 32), (1024, 64), (2048, 128), (24, 8)])
def test_hidden_width_follows_timm(channels, hidden):
    assert se_hidden_channels(channels, 16) == hidden
    assert SEBlock(channels).rd_channels == hidden


@pytest.mark.parametrize("channels, reduction, hidden", [(64, 16, 4), (8, 16, 1), (48, 8, 6), (2048, 16, 128)])
def test_hidden_width_paper_rule(channels, reduction, hidden):
    assert se_hidden_channels(channels, reduction, divisor=None) == hidden


def test_paper_hidden_width_option():
    model = torchvision.models.resnet18()
    plan = se_inject.find_sites(model, reduction=8, rd_divisor=None)
    assert [s.hidden for s in plan.sites][::2] == [8, 16, 32, 64]


def test_state_dict_matches_timm_semodule_and_so_does_the_output():
    ours, theirs = SEBlock(256), SEModule(256).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 256, 7, 7)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_parameter_count_is_2ch_plus_h_plus_c():
    se = SEBlock(256)  # hidden 16
    assert sum(p.numel() for p in se.parameters()) == 2 * 256 * 16 + 16 + 256


def test_unknown_layer_names_list_the_valid_ones():
    with pytest.raises(OptionError, match="act_layer='swishy'.*'relu'"):
        SEBlock(32, act_layer="swishy")
    with pytest.raises(OptionError, match="gate_layer='step'.*'hard_sigmoid', 'sigmoid'"):
        SEBlock(32, gate_layer="step")


def test_bad_spatial_dims():
    with pytest.raises(OptionError, match="spatial_dims must be 1, 2 or 3"):
        SEBlock(32, spatial_dims=4)


# -- identity init ---------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "hard_swish"])
@pytest.mark.parametrize("hidden", [8, 7, 1])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_identity_init_returns_the_input(hidden, mode, act):
    se = SEBlock(64, rd_channels=hidden, act_layer=act).init_identity_().train(mode == "train")
    x = torch.randn(4, 64, 9, 9) * 3
    torch.testing.assert_close(se(x), x, rtol=1e-6, atol=1e-6)
    assert float(se.gain) == 2.0


@pytest.mark.parametrize("hidden", [8, 7, 1])
def test_identity_init_lets_every_parameter_learn(hidden):
    se = SEBlock(64, rd_channels=hidden).init_identity_()
    x = torch.randn(8, 64, 5, 5)
    (se(x) * torch.randn_like(x)).sum().backward()
    for name, p in se.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_identity_init_with_hard_sigmoid_gate():
    se = SEBlock(32, gate_layer="hard_sigmoid").init_identity_()
    x = torch.randn(2, 32, 4, 4)
    torch.testing.assert_close(se(x), x, rtol=1e-6, atol=1e-6)


def test_identity_init_refuses_a_gate_that_is_not_one_half_at_zero():
    with pytest.raises(OptionError, match="gate\\(0\\) = 0.5.*Tanh"):
        SEBlock(32, gate_layer=nn.Tanh).init_identity_()


def test_identity_init_gain_is_state_so_mixing_it_up_fails_loudly():
    plain, warm = SEBlock(64), SEBlock(64).init_identity_()
    assert "gain" not in plain.state_dict() and float(warm.state_dict()["gain"]) == 2.0
    with pytest.raises(RuntimeError, match="Unexpected key.*gain"):
        plain.load_state_dict(warm.state_dict())
    with pytest.raises(RuntimeError, match="Missing key.*gain"):
        SEBlock(64).init_identity_().load_state_dict(plain.state_dict())
    restored = SEBlock(64).init_identity_()
    restored.load_state_dict(warm.state_dict())
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(restored(x), warm(x))


ACTS = ["relu", "relu6", "silu", "gelu", "hard_swish", "mish", nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid,
        nn.Softplus]


def _name(act) -> str:
    return act if isinstance(act, str) else act.__name__


@pytest.mark.parametrize("act", ACTS, ids=_name)
@pytest.mark.parametrize("scale", [1.0, 1e4, 1e6])
def test_identity_init_gate_is_exactly_one_at_large_squeezed_means(act, scale):
    """The gate is 1 bit for bit, for every width, and the block returns its input, even at squeezed
    means of 1e4 (mirrored hidden units cancelling inside one matrix product leave it 2e-4 off 1)."""
    gen = torch.Generator().manual_seed(0)
    for width in (1, 2, 3, 8, 16):
        se = SEBlock(64, rd_channels=width, act_layer=act).init_identity_()
        for mode in (True, False):
            se.train(mode)
            x = torch.randn(4, 64, 7, 7, generator=gen) * scale + scale
            with torch.no_grad():
                gate, out = se.gate_of(x), se(x)
            assert torch.equal(gate, torch.ones_like(gate)), (width, float((gate - 1).abs().max()))
            assert torch.equal(out, x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_identity_init_is_exact_in_every_float_dtype_and_after_a_cast(dtype, act):
    """Built in the dtype, or built in float32 and cast afterwards (model.half()): the alive unit's
    fc2 column is rounded so that w * 1 - w stays exactly 0."""
    big = 60.0 if dtype == torch.float16 else 1e4  # float16's range
    x = (torch.randn(3, 32, 5, 5, generator=torch.Generator().manual_seed(1)) * big + big).to(dtype)
    for se in (SEBlock(32, rd_channels=4, act_layer=act, dtype=dtype).init_identity_(),
               SEBlock(32, rd_channels=4, act_layer=act).init_identity_().to(dtype)):
        with torch.no_grad():
            assert torch.equal(se.gate_of(x), torch.ones(3, 32, dtype=dtype))
            assert torch.equal(se(x), x)


def _grads(se: SEBlock, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    se.zero_grad(set_to_none=True)
    out = se(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))).mean().backward()
    return {n: p.grad.clone() for n, p in se.named_parameters()}


def _sgd_step(se: SEBlock, lr: float = 0.1) -> None:
    with torch.no_grad():
        for p in se.parameters():
            p -= lr * p.grad


@pytest.mark.parametrize("act", ["relu", "relu6", "silu", "gelu", nn.Sigmoid], ids=_name)
@pytest.mark.parametrize("width", [1, 2, 7, 8])
def test_identity_init_gradients_are_the_ones_the_docstring_states_over_many_seeds(act, width):
    """SEBlock.init_identity_: with an alive point of 1 (ReLU) every parameter gets a non-zero
    gradient on the first backward pass, even with every other hidden unit dead for the batch; with
    an alive point of 0 (SiLU, GELU) fc1 and fc2.bias do, and fc2.weight too unless the width is 1
    (then from the second step); without an alive point (Sigmoid) fc2 does, and fc1 from the second
    step. Over 40 seeds; for ReLU-like activations half of them with every hidden unit but the alive
    one forced dead."""
    point = alive_point(resolve_layer(act, ACT_LAYERS, "act_layer"))
    for seed in range(40):
        torch.manual_seed(seed)
        se = SEBlock(16, rd_channels=width, act_layer=act).init_identity_()
        if seed % 2 and width > 1 and point == 1.0:
            with torch.no_grad():
                se.fc1.bias[:-1] = -1e3  # every hidden unit but the alive one is dead
        x = torch.randn(4, 16, 5, 5, generator=torch.Generator().manual_seed(seed)) + 0.5
        first = _grads(se, x, seed)
        nonzero = {n for n, g in first.items() if g.any()}
        if point == 1.0:
            expected = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
        elif point == 0.0:
            expected = {"fc1.weight", "fc1.bias", "fc2.bias"} | ({"fc2.weight"} if width > 1 else set())
        else:
            expected = {"fc2.weight", "fc2.bias"}
        assert nonzero == expected, (seed, sorted(nonzero))
        _sgd_step(se)
        second = _grads(se, x, seed + 1000)
        assert all(g.any() for g in second.values()), (seed, [n for n, g in second.items() if not g.any()])


def test_every_se_block_of_a_resnet_gets_an_fc1_gradient_on_the_first_step():
    """Mirrored units alone leave some SE blocks (4 of these 96) with exactly zero fc1 gradient on the
    first step (every hidden ReLU dead for the batch). The alive unit has a gradient always."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model = timm.create_model("resnet18", num_classes=5).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)  # no zero-init last BN
    with torch.no_grad():
        expected = model(x)
    blocks = zero = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(6):
            for position in ("branch", "pre"):
                torch.manual_seed(seed)
                se = se_inject.apply(model, example_inputs=x[:1], identity_init=True, position=position)
                with torch.no_grad():
                    assert torch.equal(se.eval()(x), expected)
                se.train()(x).sum().backward()
                for mod in se.modules():
                    if isinstance(mod, SEBlock):
                        blocks += 1
                        zero += int(not all(p.grad.any() for p in mod.parameters()))
    assert (blocks, zero) == (96, 0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_identity_init_keeps_outputs_and_all_se_parameters_learn(mode):
    model = randomize_norms(torchvision.models.resnet18())
    injected = se_inject.apply(model, identity_init=True)
    model.train(mode == "train")
    injected.train(mode == "train")
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    actual = injected(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    actual.square().sum().backward()
    se_params = [(n, p) for n, p in injected.named_parameters() if ".se." in n]
    assert len(se_params) == 8 * 4
    for name, p in se_params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
