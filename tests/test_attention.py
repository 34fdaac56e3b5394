"""Any channel attention (``attn=``) at any of the SE paper's placements (``position=``).

The fast part uses small bottleneck nets; whole timm models are marked slow: timm's attention
models out of their plain counterparts, the five positions on ResNet-50, ConvNeXt, the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import fx, nn

import se_inject
from se_inject import OptionError, SEBlock, SEOptions
from se_inject.modules.attentions import ATTENTIONS, GainGate
from se_inject.trace.ops import ATTENTION_TYPES
from se_inject.options import POSITIONS
from tests.helpers import (
    ATTENTION_PAIRS,
    assert_same_snapshot,
    count_params,
    randomize_norms,
    small_resnet,
    snapshot,
)

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(2, 3, 32, 32)
OLD_DEFAULT_OPTIONS = {"reduction": 16, "rd_divisor": 8, "act_layer": "relu", "gate_layer": "sigmoid",
                       "identity_init": False, "include": None, "exclude": [], "min_channels": 1}
#: What SEOptions() records: the options above, the fused residual tail and the kernel choice.
DEFAULT_OPTIONS = {**OLD_DEFAULT_OPTIONS, "fuse_residual": True, "kernels": "auto"}
IDENTITY_ATTENTIONS = sorted(a for a, spec in ATTENTIONS.items() if spec.zero is not None or a == "se")


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 with BN and ReLU, a projection shortcut when the shape changes, ReLU after
    the add; ``spelling`` picks how the add is written."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, spelling: str = "plus") -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.act1, self.act2, self.act3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.spelling == "iadd":
            out += shortcut
        elif self.spelling == "add_":
            out.add_(shortcut)
        else:
            out = out + shortcut
        return self.act3(out)


def bottleneck_net(spelling: str = "plus") -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Bottleneck(16, 8, 32, spelling=spelling),
                        Bottleneck(32, 8, 32, spelling=spelling), Bottleneck(32, 16, 64, 2, spelling=spelling))
    with torch.no_grad():  # non-trivial norms, so that every placement shows in the output
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def reference(block: Bottleneck, se: nn.Module, position: str, x: torch.Tensor) -> torch.Tensor:
    """The block's forward written by hand with ``se`` at ``position`` (the documented semantics)."""
    inp = se(x) if position == "pre" else x
    out = block.act2(block.bn2(block.conv2(block.act1(block.bn1(block.conv1(inp))))))
    out = block.bn3(block.conv3(se(out) if position == "mid" else out))
    out = se(out) if position == "branch" else out
    shortcut = x if block.downsample is None else block.downsample(x)
    out = block.act3(out + (se(shortcut) if position == "identity" else shortcut))
    return se(out) if position == "post" else out


def block_node(model: nn.Module, site: se_inject.Site) -> tuple[fx.GraphModule, fx.Node]:
    gm = model.get_submodule(site.block)
    assert isinstance(gm, fx.GraphModule)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == site.name.rsplit(".", 1)[-1]]
    return gm, node


def label(n: fx.Node) -> str:
    if n.op in ("placeholder", "output"):
        return "input" if n.op == "placeholder" else "output"
    return str(n.target) if n.op == "call_module" else n.target.__name__


# -- options: defaults unchanged, JSON round trip, errors --------------------------------------------

def test_default_options_record_what_they_always_did():
    assert SEOptions().to_dict() == DEFAULT_OPTIONS
    old = SEOptions.from_dict(OLD_DEFAULT_OPTIONS)  # a recipe written before attn / position existed
    assert (old.attn, old.position) == ("se", "branch") and old == SEOptions()


@pytest.mark.parametrize("kwargs", [dict(attn="eca", position="mid"), dict(attn="gc", reduction=4, rd_divisor=1),
                                    dict(position="pre", reduction=8), dict(attn="cbam", act_layer="silu",
                                                                             identity_init=True, position="post")])
def test_new_options_round_trip_through_json(kwargs):
    options = SEOptions(**kwargs)
    data = json.loads(json.dumps(options.to_dict()))
    assert SEOptions.from_dict(data) == options
    assert {k: data[k] for k in kwargs} == kwargs
    if kwargs.get("attn", "se") != "se":  # options not given stay the attention's own
        assert set(data) & {"reduction", "rd_divisor", "act_layer", "gate_layer"} <= set(kwargs)


def test_other_attentions_keep_their_own_defaults_and_replace_keeps_them_unset():
    eca = SEOptions().replace(attn="eca")  # se's defaults were not given, so eca takes none of them
    assert eca == SEOptions(attn="eca") and "reduction" not in eca.to_dict()
    assert SEOptions(attn="gc").replace(attn="se") == SEOptions()


def test_a_factory_cannot_be_recorded():
    def my_attention(channels):
        return SEBlock(channels)

    with pytest.raises(OptionError, match="attn=.*my_attention is a factory; only attention names"):
        SEOptions(attn=my_attention).to_dict()


@pytest.mark.parametrize("kwargs, message", [
    (dict(attn="foo"), r"attn='foo' is not a known attention; use one of \['cbam', 'ceca', .*'se', 'strip'\]"),
    (dict(attn="ECA"), r"names are lower case: 'eca'"),
    (dict(attn="sk"), r"attn='sk' is not an add-on channel attention \(SelectiveKernel replaces a conv\)"),
    (dict(attn=SEBlock(8)), r"got a module instance \(SEBlock\); pass its class"),
    (dict(position="after"), r"position must be one of \['branch', 'pre', 'post', 'identity', 'mid'\]"),
    (dict(attn="eca", reduction=8), r"attn='eca' does not use reduction .* it uses gate_layer"),
    (dict(attn="ese", act_layer="silu"), r"attn='ese' does not use act_layer"),
    (dict(attn="gca", gate_layer="sigmoid"), r"attn='gca' does not use gate_layer"),
    (dict(attn="lcbam", gate_layer="hard_sigmoid"), r"attn='lcbam' does not use gate_layer"),
    (dict(attn=SEBlock, reduction=4), r"attn=SEBlock is a factory, which builds its own module: reduction"),
    (dict(attn="gc", rd_divisor=None), r"rd_divisor=None .* is for attn='se' only"),
    (dict(attn="lcbam", identity_init=True), r"identity_init is not possible for attn='lcbam': its gates"),
    (dict(attn="cbam", act_layer="gelu"), r"attn='cbam' cannot be built with these options: TypeError"),
    (dict(attn="eca", kernels="fused"), r"kernels='fused' is for attn='se' .* leave kernels out"),
])
def test_bad_values_are_clear_option_errors_and_leave_the_model_untouched(kwargs, message):
    model = bottleneck_net()
    before = snapshot(model)
    with pytest.raises(OptionError, match=message):
        se_inject.apply(model, example_inputs=X, inplace=True, **kwargs)
    assert_same_snapshot(before, snapshot(model))


class WrongShape(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, x):
        return x.mean((2, 3))


class WrongDtype(nn.Module):
    def __init__(self, channels):
        super().__init__()

    def forward(self, x):
        return x.double()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("attn, message", [
    (WrongShape, r"attn=WrongShape at \d\.se maps its \[2, (\d+), \d+, \d+\] torch.float32 input to \[2, \1\] "),
    (WrongDtype, r"attn=WrongDtype at \d\.se maps .* to \[2, \d+, \d+, \d+\] torch.float64"),
    (lambda c: "not a module", r"attn=.*<lambda> returned str for \d+ channels, not an nn.Module"),
    (lambda c: nn.Conv2d(c + 1, c, 1), r"attn=.*<lambda> does not run at \d\.se on its \[2, \d+, \d+, \d+\] .*RuntimeError"),
    (SEBlock, None),  # SEBlock by class: a factory that works
])
def test_every_module_is_checked_at_its_site_before_the_model_changes(attn, message, inplace):
    model = bottleneck_net()
    before = snapshot(model)
    if message is None:
        out = se_inject.apply(model, example_inputs=X, attn=attn, inplace=inplace)
        assert sum(isinstance(m, SEBlock) for m in out.modules()) == 3
        return
    with pytest.raises(OptionError, match=message):
        se_inject.apply(model, example_inputs=X, attn=attn, inplace=inplace)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("dims, shape", [(1, (2, 3, 40)), (3, (2, 3, 4, 16, 16))])
def test_timm_attention_is_2d_only_and_says_so(dims, shape):
    model = small_resnet(dims=dims).eval()
    before = snapshot(model)
    with pytest.raises(OptionError, match=r"attn=eca does not run at \d\.se on its .*\(N, C, H, W\) inputs only"):
        se_inject.apply(model, example_inputs=torch.randn(shape), attn="eca")
    assert_same_snapshot(before, snapshot(model))
    for position in ("pre", "post", "identity"):  # se_inject's own SE takes 1-D and 3-D
        out = se_inject.apply(model, example_inputs=torch.randn(shape), position=position, identity_init=True)
        with torch.no_grad():
            x = torch.randn(shape)
            torch.testing.assert_close(out.eval()(x), model(x), rtol=1e-5, atol=1e-5)


def test_identity_init_of_a_factory_needs_init_identity():
    with pytest.raises(OptionError, match=r"identity_init: attn=WrongDtype is a factory whose module"):
        se_inject.apply(bottleneck_net(), example_inputs=X, attn=WrongDtype, identity_init=True)
    out = se_inject.apply(bottleneck_net(), example_inputs=X, attn=SEBlock, identity_init=True)
    assert all(float(m.gain) == 2.0 for m in out.modules() if isinstance(m, SEBlock))


def test_gather_excite_builds_despite_timms_bug_and_gain_gates_refuse_bad_gates():
    ge = se_inject.apply(bottleneck_net(), example_inputs=X, attn="ge").get_submodule("1.se")
    assert sorted(ge.state_dict()) == ["mlp.fc1.bias", "mlp.fc1.weight", "mlp.fc2.bias", "mlp.fc2.weight"]
    with pytest.raises(OptionError, match=r"gate\(0\) = 0.5"):
        GainGate(nn.Tanh)


# -- positions: where the module lands, numerically and in the graph --------------------------------

EXPECTED_WHERE = {  # (what the module reads, what reads it), per block: projection, identity, projection
    "branch": [("bn3", "add")] * 3,
    "pre": [("input", "conv1")] * 3,
    "post": [("act3", "output")] * 3,
    "identity": [("downsample.1", "add"), ("input", "add"), ("downsample.1", "add")],
    "mid": [("act2", "conv3")] * 3,
}


@pytest.mark.parametrize("position", POSITIONS)
def test_each_position_puts_the_module_where_documented(position):
    model = bottleneck_net()
    # fuse_residual=False: at "branch" SE would otherwise take the add over (tests/test_fused_model.py)
    result = se_inject.inject(model, example_inputs=X, position=position, fuse_residual=False)
    plan = result.plan
    assert [s.name for s in plan.sites] == ["1.se", "2.se", "3.se"] and not plan.skipped
    assert {(s.attn, s.position) for s in plan.sites} == {("se", position)}
    for site, (reads, read_by) in zip(plan.sites, EXPECTED_WHERE[position]):
        gm, node = block_node(result.model, site)
        assert (label(node.args[0]), [label(u) for u in node.users]) == (reads, [read_by]), site.name
        assert site.where == f"{reads} -> {read_by}"
    # Numerically: the rewritten blocks compute the hand-written forward with the same modules.
    for site in plan.sites:
        se = result.model.get_submodule(site.name)
        nn.init.normal_(se.fc2.bias, 2.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = x
        y = model[0](y)
        for i in (1, 2, 3):
            y = reference(model[i], result.model.get_submodule(f"{i}.se"), position, y)
        torch.testing.assert_close(result.model(x), y, rtol=0, atol=0)
        assert not torch.allclose(result.model(x), model(x))


@pytest.mark.parametrize("attn, position", [("eca", "branch"), ("se", "post"), ("se", "identity")])
def test_only_se_on_the_branch_takes_the_add_over(attn, position):
    result = se_inject.inject(bottleneck_net(), example_inputs=X, attn=attn, position=position)
    for site in result.plan.sites:
        gm, node = block_node(result.model, site)
        assert len(node.args) == 1 and not isinstance(result.model.get_submodule(site.name), se_inject.SEResidual)
    fused = se_inject.inject(bottleneck_net(), example_inputs=X)
    assert all(isinstance(fused.model.get_submodule(s.name), se_inject.SEResidual) for s in fused.plan.sites)


def test_mid_is_skipped_with_a_reason_where_the_branch_has_no_mid_point():
    plan = se_inject.find_sites(small_resnet(), example_inputs=X, position="mid")  # basic blocks: 3x3, 3x3
    assert not plan.sites and {s.reason for s in plan.skipped} == {"no-mid-point"}
    assert all("not a norm, activation or 1x1 conv" in s.detail for s in plan.skipped), plan.skipped[0].detail
    assert "no-mid-point" in se_inject.SKIP_REASONS


class PreActInPlace(nn.Module):
    """A pre-activation block whose first op writes its input in place: the shortcut reads the
    activated tensor. ``late`` writes the input between two branch readers instead."""

    def __init__(self, c: int = 8, late: bool = False) -> None:
        super().__init__()
        self.late = late
        self.act0 = nn.ReLU(inplace=True)
        self.conv1, self.bn1, self.act1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(2 * c if late else c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        if not self.late:
            y = self.act0(x)  # x itself is now relu(x)
            return self.bn2(self.conv2(self.act1(self.bn1(self.conv1(y))))) + x
        h = self.act1(self.bn1(self.conv1(x)))  # reads x before the write
        self.act0(x)  # the shortcut and the next reader see relu(x)
        return self.bn2(self.conv2(torch.cat([h, x], 1))) + x


def in_place_net(late: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PreActInPlace(late=late), nn.Conv2d(8, 4, 1)).eval()


@pytest.mark.parametrize("position", POSITIONS)
def test_a_placement_reads_what_the_block_reads_past_an_in_place_pre_activation(position):
    """``position="pre"`` put the module between the input and an ``nn.ReLU(inplace=True)`` that
    writes it: the ReLU then wrote the module's output, and the shortcut read the un-activated
    input (identity init off by 0.825). The module must go after the in-place op, whose result is
    what the branch and the shortcut both read; every position must equal the original."""
    model = in_place_net()
    result = se_inject.inject(model, example_inputs=X[:, :, :16, :16], position=position, identity_init=True)
    if position == "mid":  # two 3x3 convs: no mid point
        assert [s.reason for s in result.plan.skipped] == ["no-mid-point"]
        return
    (site,) = result.plan.sites
    if position == "pre":
        assert site.where == "act0 -> conv1"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x.clone()), model(x.clone()), rtol=1e-5, atol=1e-5)
        se = result.model.get_submodule(site.name)
        nn.init.normal_(se.fc2.bias, 2.0)
        if position == "pre":  # and with a module that is not the identity: the hand-written SE-PRE
            block, h = model[1], model[0](x)
            a = se(block.act0(h))
            expected = model[2](block.bn2(block.conv2(block.act1(block.bn1(block.conv1(a))))) + h)
            torch.testing.assert_close(result.model(x), expected, rtol=0, atol=0)


def test_a_placement_whose_tensor_is_written_between_its_readers_is_refused_with_a_reason():
    """The input is written in place between two branch reads: a module read before the first one
    cannot give the second what it reads. ``pre`` is refused (in-place-write); the others stand."""
    model = in_place_net(late=True)
    plan = se_inject.find_sites(model, example_inputs=X[:, :, :16, :16], position="pre")
    assert not plan.sites and [s.reason for s in plan.skipped] == ["in-place-write"]
    assert plan.skipped[0].detail == ("position='pre': ReLU 1.act0 writes 0 in place between the readers the module "
                                      "takes over; the later ones would not see the write")
    assert "in-place-write" in se_inject.SKIP_REASONS
    x = torch.randn(2, 3, 16, 16)
    for position in ("branch", "post", "identity"):
        out = se_inject.apply(model, example_inputs=X[:, :, :16, :16], position=position, identity_init=True)
        with torch.no_grad():
            torch.testing.assert_close(out(x.clone()), model(x.clone()), rtol=1e-5, atol=1e-5)


class AddsIntoItsInput(nn.Module):
    """``x.add_(branch)``: the block writes the sum into its input, which its caller reads again."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        x.add_(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return torch.relu(x)


class ReadsTheInputAgain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 8, 3, padding=1), AddsIntoItsInput(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        y = self.block(h)
        return self.head(y * h)  # h holds the block's sum


def test_identity_on_a_shortcut_written_in_place_that_the_caller_reads_again_is_refused():
    """At ``identity`` the module reads the shortcut, so ``x.add_(branch)`` would write the
    module's output instead of ``x``, which the caller reads again afterwards."""
    torch.manual_seed(0)
    model = ReadsTheInputAgain().eval()
    plan = se_inject.find_sites(model, example_inputs=X[:, :, :16, :16], position="identity")
    assert not plan.sites and [s.reason for s in plan.skipped] == ["in-place-write"]
    assert plan.skipped[0].detail == ("position='identity': add_ writes stem in place and mul reads it afterwards; "
                                      "with the module before it, it would write the module's output instead")
    x = torch.randn(2, 3, 16, 16)
    for position in ("branch", "pre", "post"):
        out = se_inject.apply(model, example_inputs=X[:, :, :16, :16], position=position, identity_init=True)
        with torch.no_grad():
            torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spelling", ["iadd", "add_"])
@pytest.mark.parametrize("position", POSITIONS)
def test_positions_with_in_place_adds_compute_what_the_plain_add_does(spelling, position):
    plain = se_inject.apply(bottleneck_net(), example_inputs=X, position=position)
    for m in plain.modules():
        if isinstance(m, SEBlock):
            nn.init.normal_(m.fc2.bias, 2.0)
    other = se_inject.apply(bottleneck_net(spelling), example_inputs=X, position=position)
    other.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), plain.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("attn", IDENTITY_ATTENTIONS)
@pytest.mark.parametrize("position", ["branch", "post", "mid"])
def test_identity_init_is_exact_for_every_attention_that_allows_it(attn, position):
    model = bottleneck_net()
    out = se_inject.apply(model, example_inputs=X, attn=attn, position=position, identity_init=True)
    x = torch.randn(2, 3, 32, 32)
    for mode in (False, True):
        model.train(mode), out.train(mode)
        with torch.no_grad():
            expected, actual = model(x), out(x)
        if attn == "se":  # mirrored hidden units: equal up to float rounding
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        else:  # a zeroed last layer and a gain-2 gate: bit for bit
            assert torch.equal(actual, expected), (attn, position, mode)
    model.eval()


@pytest.mark.parametrize("attn", ["se", "eca", "gca", "cbam", "ge", "strip", SEBlock, lambda c: nn.Identity()])
@pytest.mark.parametrize("position", POSITIONS)
def test_a_second_apply_adds_nothing_whatever_the_first_did(attn, position):
    net = bottleneck_net()
    once = se_inject.apply(net, example_inputs=X, attn=attn, position=position)
    assert sum(isinstance(m, ATTENTION_TYPES) for m in once.modules()) >= 3
    for second in ("branch", "mid", "post"):
        plan = se_inject.find_sites(once, example_inputs=X, position=second)
        assert not plan.sites and {s.reason for s in plan.skipped} == {"has-attention"}, plan.skip_summary()


def test_plan_and_report_json_carry_the_attention_and_its_real_parameter_count():
    model = bottleneck_net()
    result = se_inject.inject(model, example_inputs=X, attn="cbam", position="mid")
    plan = json.loads(json.dumps(result.plan.to_dict()))
    assert (plan["attn"], plan["position"], plan["reduction"]) == ("cbam", "mid", None)
    assert [s["where"] for s in plan["sites"]] == ["act2 -> conv3"] * 3
    assert sum(s["params"] for s in plan["sites"]) == count_params(result.model) - count_params(model)
    report = se_inject.build_report(model, result, (X[:1],)).to_dict()
    assert (report["attn"], report["position"], report["flops"]["se_elementwise"]) == ("cbam", "mid", None)
    assert [s["hidden"] for s in report["sites"]] == [1, 1, 1]  # timm's CBAM: rd_divisor 1, mid widths 8, 8, 16
    assert sum(s["params"] for s in report["sites"]) == report["params"]["added"]
    eca = se_inject.find_sites(model, example_inputs=X, attn="eca").to_dict()
    assert [s["hidden"] for s in eca["sites"]] == [None] * 3 and [s["params"] for s in eca["sites"]] == [3, 3, 3]


def test_recipes_round_trip_the_new_options_and_old_recipes_still_load(tmp_path):
    model = timm.create_model("resnet14t")
    x = torch.randn(1, 3, 32, 32)
    result = se_inject.inject(model, example_inputs=x, attn="eca", position="mid", identity_init=True)
    se_inject.save(result, tmp_path / "eca", model_name="resnet14t")
    recipe = json.loads((tmp_path / "eca" / "recipe.json").read_text())
    assert recipe["options"]["attn"] == "eca" and recipe["options"]["position"] == "mid"
    loaded = se_inject.load(tmp_path / "eca")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model.eval()(x), rtol=0, atol=0)
    # A recipe saved before attn / position existed: format_version 1, options without them (nor
    # fuse_residual / kernels, which came later).
    plain = se_inject.inject(model, example_inputs=x)
    se_inject.save(plain, tmp_path / "old", model_name="resnet14t")
    path = tmp_path / "old" / "recipe.json"
    old = json.loads(path.read_text())
    assert old["format_version"] == 1 and old["options"] == DEFAULT_OPTIONS
    old["options"] = OLD_DEFAULT_OPTIONS
    path.write_text(json.dumps(old, indent=2))
    assert isinstance(se_inject.load(tmp_path / "old").layer1[0].se, SEBlock)
    with pytest.raises(se_inject.RecipeError, match="cannot record.*factory"):
        se_inject.save(se_inject.inject(model, example_inputs=x, attn=SEBlock), tmp_path / "f", model_name="resnet14t")


# -- whole timm models (slow) ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("plain, attention, attn, position, before, after", ATTENTION_PAIRS,
                         ids=[p[1] for p in ATTENTION_PAIRS])
def test_timms_attention_models_come_out_of_their_plain_counterparts(plain, attention, attn, position, before, after):
    model, ref = timm.create_model(plain).eval(), timm.create_model(attention).eval()
    out = se_inject.apply(model, attn=attn, position=position).eval()
    assert (count_params(model), count_params(ref), count_params(out)) == (before, after, after)
    # timm's byobnet models name the module `attn`; se_inject names it `se` (`attn` is taken by an Identity).
    state = {k.replace(".attn.", ".se."): v for k, v in ref.state_dict().items()}
    out.load_state_dict(state, strict=True)
    x = torch.randn(2, *ref.pretrained_cfg["input_size"])
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref(x), rtol=0, atol=1e-5)


def _timm_reference(block: nn.Module, se: nn.Module, position: str, x: torch.Tensor) -> torch.Tensor:
    """timm's Bottleneck.forward (resnet.py) with ``se`` at ``position``."""
    inp = se(x) if position == "pre" else x
    y = block.act1(block.bn1(block.conv1(inp)))
    y = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(y)))))
    y = block.bn3(block.conv3(se(y) if position == "mid" else y))
    y = se(y) if position == "branch" else y
    shortcut = x if block.downsample is None else block.downsample(x)
    y = block.drop_path(y) if block.drop_path is not None else y
    y = block.act3(y + (se(shortcut) if position == "identity" else shortcut))
    return se(y) if position == "post" else y


RESNET50 = {"branch": (2_530_992, ("bn3", "add")), "pre": (2_005_624, ("input", "conv1")),
            "post": (2_530_992, ("act3", "output")), "identity": (2_530_992, ("downsample.1", "add")),
            "mid": (162_744, ("aa", "conv3"))}


@pytest.mark.slow
@pytest.mark.parametrize("position", POSITIONS)
def test_resnet50_each_position_16_modules_at_the_documented_places(position):
    model = randomize_norms(timm.create_model("resnet50")).eval()
    with torch.no_grad():  # timm zero-inits bn3: give it weight, or branch-side placements would not show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 64)
    result = se_inject.inject(model, example_inputs=x, position=position, fuse_residual=False)
    added, (reads, read_by) = RESNET50[position]
    assert len(result.plan.sites) == 16 and count_params(result.model) - count_params(model) == added
    for site in result.plan.sites:
        gm, node = block_node(result.model, site)
        first_of_stage = site.block.endswith(".0")
        expected = ("input" if position == "identity" and not first_of_stage else reads, [read_by])
        assert (label(node.args[0]), [label(u) for u in node.users]) == expected, site.name
        nn.init.normal_(result.model.get_submodule(site.name).fc2.bias, 2.0)
    with torch.no_grad():
        y = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        for stage in (1, 2, 3, 4):
            for i, block in enumerate(getattr(model, f"layer{stage}")):
                y = _timm_reference(block, result.model.get_submodule(f"layer{stage}.{i}.se"), position, y)
        torch.testing.assert_close(result.model.forward_features(x), y, rtol=0, atol=0)


@pytest.mark.slow
def test_resnet50_mid_adds_fewer_parameters_than_branch_and_each_attention_fits():
    model = timm.create_model("resnet50")
    x = torch.randn(1, 3, 64, 64)
    added = {(attn, pos): sum(s.params for s in se_inject.find_sites(model, example_inputs=x, attn=attn,
                                                                      position=pos).sites)
             for attn in ("eca", "gca", "cbam") for pos in ("branch", "pre", "mid")}
    assert added == {("eca", "branch"): 86, ("eca", "pre"): 82, ("eca", "mid"): 74,
                     ("gca", "branch"): 5_065_776, ("gca", "pre"): 4_013_512, ("gca", "mid"): 323_352,
                     ("cbam", "branch"): 2_516_544, ("cbam", "pre"): 1_992_768, ("cbam", "mid"): 158_784}


@pytest.mark.slow
@pytest.mark.parametrize("conv_mlp", [False, True])
def test_convnext_tiny_per_position(conv_mlp):
    model = timm.create_model("convnext_tiny", conv_mlp=conv_mlp)
    x = torch.randn(1, 3, 64, 64)
    for position in POSITIONS:
        plan = se_inject.find_sites(model, example_inputs=x, position=position)
        if position == "mid" and not conv_mlp:  # depthwise conv -> permute -> LayerNorm -> Linear: channels last
            assert not plan.sites and {s.reason for s in plan.skipped} == {"no-mid-point"}
            continue
        assert len(plan.sites) == 18 and sum(s.params for s in plan.sites) == 417_168, position


@pytest.mark.slow
def test_cli_report_with_attn_and_position():
    done = subprocess.run([sys.executable, "-m", "se_inject", "report", "resnet50", "--attn", "eca", "--position",
                           "mid", "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert (r["attn"], r["position"], r["reduction"]) == ("eca", "mid", None)
    assert r["params"] == {"before": 25_557_032, "after": 25_557_106, "added": 74}
    assert len(r["sites"]) == 16 and {s["where"] for s in r["sites"]} == {"aa -> conv3"}
    assert [s["channels"] for s in r["sites"]][:4] == [64, 64, 64, 128]
    text = subprocess.run([sys.executable, "-m", "se_inject", "report", "resnet50", "--attn", "eca", "--position",
                           "mid"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "200"})
    assert text.returncode == 0, text.stderr
    assert "attn eca  ·  position mid" in text.stdout and "16 eca modules at position mid" in text.stdout
