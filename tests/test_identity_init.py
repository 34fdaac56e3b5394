"""Identity init (issue 22 row 13, issue 23 row 7): the gate is exactly 1 at any scale and in any
dtype, and the gradients SEBlock.init_identity_ states arrive when it says.

Run:  PYTHONPATH=$PWD python -m pytest -q tests/test_identity_init.py -p no:cacheprovider
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

import se_inject
from se_inject import SEBlock
from se_inject.layers import ACT_LAYERS, alive_point, resolve_layer

ACTS = ["relu", "relu6", "silu", "gelu", "hard_swish", "mish", nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid,
        nn.Softplus]


def _name(act) -> str:
    return act if isinstance(act, str) else act.__name__


@pytest.mark.parametrize("act", ACTS, ids=_name)
@pytest.mark.parametrize("scale", [1.0, 1e4, 1e6])
def test_identity_init_gate_is_exactly_one_at_large_squeezed_means(act, scale):
    """Mirrored hidden units cancelled inside one matrix product: with squeezed means of 1e4 the gate
    was 2e-4 off 1. Now it is 1 bit for bit, for every width, and the block returns its input."""
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
    """Issue 23 row 7's repro: mirrored units left 4 of 96 SE blocks with exactly zero fc1 gradient
    on the first step (every hidden ReLU dead for the batch). The alive unit has a gradient always."""
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
