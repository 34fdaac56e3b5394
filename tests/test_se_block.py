"""The SE block: shapes, widths, state_dict layout, equivalence with timm, identity init."""

import pytest
import torch
from timm.layers import SEModule
from torch import nn

from se_inject import OptionError, SEBlock, se_hidden_channels


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


def test_state_dict_matches_timm_semodule_and_so_does_the_output():
    ours, theirs = SEBlock(256), SEModule(256).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 256, 7, 7)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_parameter_count_is_2ch_plus_h_plus_c():
    se = SEBlock(256)  # hidden 16
    assert sum(p.numel() for p in se.parameters()) == 2 * 256 * 16 + 16 + 256


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


def test_unknown_layer_names_list_the_valid_ones():
    with pytest.raises(OptionError, match="act_layer='swishy'.*'relu'"):
        SEBlock(32, act_layer="swishy")
    with pytest.raises(OptionError, match="gate_layer='step'.*'hard_sigmoid', 'sigmoid'"):
        SEBlock(32, gate_layer="step")


def test_bad_spatial_dims():
    with pytest.raises(OptionError, match="spatial_dims must be 1, 2 or 3"):
        SEBlock(32, spatial_dims=4)


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
