"""What the converted model is and computes.

It keeps its class, methods, keys and training flags; SE sits on the branch and the shortcut stays
clean, for every spelling of the add and for 1-D to 3-D convs; an add in the root's own forward
makes the root a GraphModule; blocks called with extra arguments keep their signature and refuse a
call their traced graph would get wrong; timm's ResNets become exactly timm's SE-ResNets (slow).
Then the passes under the rewrite: the insert pass, GraphModules built like the original, block
extraction.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from torch import fx, nn

import se_inject
from se_inject import GraphModuleRootWarning, SEBlock
from se_inject.rewrite.cut import Candidate, build_blocks
from se_inject.rewrite.insert_pass import InsertionPoint, free_attribute_name, insert_modules
from se_inject.rewrite.rewritten import graph_module_like
from se_inject.sites.classify import ResidualAdd, classify_adds
from se_inject.trace.search import runnable_scopes
from se_inject.trace.tracer import trace
from tests.client_helpers import assert_unchanged, full_snapshot, se_blocks
from tests.helpers import (
    SE_PAIRS,
    DlaLike,
    ResBlock,
    assert_shortcuts_untouched,
    count_params,
    randomize_norms,
    small_resnet,
)

X = torch.randn(2, 3, 16, 16)
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# -- the model keeps its class, its methods, its keys and its flags --------------------------------

def test_model_keeps_its_class_and_methods():
    model = timm.create_model("resnet50")
    out = se_inject.apply(model)
    assert type(out) is type(model)
    assert out.pretrained_cfg == model.pretrained_cfg
    assert out.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 2, 2)
    out.reset_classifier(7)
    assert out(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    # Only blocks holding a residual add became GraphModules; containers did not.
    assert isinstance(out.layer1[0], fx.GraphModule) and type(out.layer1) is nn.Sequential
    assert isinstance(out.layer1[0].downsample, nn.Sequential)  # block children keep their types
    assert type(out.layer1[0]).__name__ == "Bottleneck"


def test_original_keys_survive_unchanged_and_new_keys_are_se_only():
    model = torchvision.models.resnet18()
    out = se_inject.apply(model)
    before, after = model.state_dict(), out.state_dict()
    assert set(before) <= set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    new = set(after) - set(before)
    assert len(new) == 8 * 4 and all(".se.fc1." in k or ".se.fc2." in k for k in new)


def test_training_flags_are_kept_on_the_result():
    model = torchvision.models.resnet18().train()
    model.layer2[1].bn2.eval()
    out = se_inject.apply(model)
    assert out.training and out.layer1[0].training and out.layer1[0].se.training
    assert not out.layer2[1].bn2.training
    assert not se_inject.apply(model.eval()).layer1[0].se.training


def test_inplace_rewrites_the_given_model():
    model = torchvision.models.resnet18()
    out = se_inject.apply(model, inplace=True)
    assert out is model and isinstance(model.layer1[0].se, SEBlock)


class RootAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.conv1(x)
        return x + self.conv2(torch.relu(x))


def test_an_add_in_the_root_forward_makes_the_root_a_graph_module():
    model = RootAdd()
    with pytest.warns(GraphModuleRootWarning, match="RootAdd's own forward"):
        out = se_inject.apply(model, example_inputs=X32)
    assert isinstance(out, fx.GraphModule) and isinstance(out.se, SEBlock)
    assert set(model.state_dict()) | {"se.fc1.weight", "se.fc1.bias", "se.fc2.weight", "se.fc2.bias"} == set(out.state_dict())


# -- SE on the branch, the shortcut clean ----------------------------------------------------------

def test_se_sits_on_the_branch_numerically():
    # With the last BN of every branch zeroed, branches output 0. SE(0) = 0 wherever SE is on the
    # branch, so the SE model must equal the original; SE on a shortcut would change the output.
    model = randomize_norms(torchvision.models.resnet18()).eval()
    for block in (*model.layer1, *model.layer2, *model.layer3, *model.layer4):
        nn.init.zeros_(block.bn2.weight)
        nn.init.zeros_(block.bn2.bias)
    injected = se_inject.apply(model).eval()
    for se in (m for m in injected.modules() if isinstance(m, SEBlock)):
        nn.init.normal_(se.fc2.bias, 3.0)  # a gate far from 1: visible anywhere but on a zero branch
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(injected(x), model(x))


@pytest.mark.parametrize("spelling", ["plus", "reversed", "torch.add", "iadd", "add_"])
def test_every_spelling_of_the_add(spelling):
    model = randomize_norms(small_resnet(spelling=spelling)).eval()
    result = se_inject.inject(model, example_inputs=X32, identity_init=True)
    assert [s.name for s in result.plan.sites] == ["1.se", "2.se", "3.se"]
    assert_shortcuts_untouched(result.model, result.plan)
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(X32), model(X32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims, shape", [(1, (2, 3, 40)), (3, (2, 3, 6, 16, 16))])
def test_1d_and_3d_conv_nets(dims, shape):
    model = small_resnet(dims=dims).eval()
    x = torch.randn(shape)
    result = se_inject.inject(model, example_inputs=x, identity_init=True)
    assert len(result.plan.sites) == 3
    assert result.model[1].se.spatial_dims == dims
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(x), model(x), rtol=1e-5, atol=1e-5)


# -- blocks called with extra arguments ------------------------------------------------------------

class ScaledBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x, scale: float = 1.0):
        return x + torch.relu(self.bn(self.c(x))) * scale


class CallsWithScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = ScaledBlock(16)
        self.b2 = ScaledBlock(16)

    def forward(self, x):
        h = self.stem(x)
        h = self.b1(h, scale=0.5)
        return self.b2(h)


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_a_block_called_with_an_extra_argument_keeps_its_signature(strict):
    """b1 is called with ``scale=0.5``, b2 with the default. Each converted block takes the
    arguments its module takes, computes what the module computes for the call the model
    makes, and refuses (AssertionError naming the argument) a call whose value its traced graph
    would silently ignore; it never computes something else."""
    model = randomize_norms(CallsWithScale()).eval()
    before = full_snapshot(model)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = se_inject.inject(model, example_inputs=X32, identity_init=True, strict=strict)
    assert_unchanged(before, model)
    assert [s.name for s in result.plan.sites] == ["b1.se", "b2.se"]
    converted = result.model.eval()
    h = model.stem(X32)
    with torch.no_grad():
        torch.testing.assert_close(converted(X32), model(X32))
        for block, used in (("b1", 0.5), ("b2", 1.0)):
            torch.testing.assert_close(converted.get_submodule(block)(h, scale=used),
                                       model.get_submodule(block)(h, scale=used), msg=block)
            with pytest.raises(AssertionError, match=rf"{block} was rewritten by se_inject for calls with "
                                                     rf"scale={used}.*exclude=\['{block}'\]"):
                converted.get_submodule(block)(h, scale=3.0)
    scripted = torch.jit.script(converted)  # the checks and the signature survive TorchScript
    with torch.no_grad():
        torch.testing.assert_close(scripted(X32), model(X32))


@pytest.mark.parametrize("value", [torch.tensor(0.5, requires_grad=True), torch.tensor([0.5, 2.0]).view(2, 1, 1, 1),
                                   1, True, "0.5"], ids=["0-dim-tensor", "per-sample-tensor", "int", "bool", "str"])
def test_a_frozen_number_is_guarded_by_type_as_well_as_value(value):
    """b1 was rewritten for ``scale=0.5``: its graph multiplies by the constant 0.5. A tensor equal
    to it passed ``value == 0.5`` and was then ignored (its gradient silently lost); a per-sample
    tensor raised a raw RuntimeError. Every value of another kind must fail the guard with the
    AssertionError naming the argument, where the original module computes with it."""
    model = randomize_norms(CallsWithScale()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = se_inject.apply(model, example_inputs=X32, identity_init=True).eval()
    h = model.stem(X32)
    with pytest.raises(AssertionError, match=r"b1 was rewritten by se_inject for calls with scale=0.5 \(a float\), "
                                             r"which its traced graph fixes.*exclude=\['b1'\]"):
        converted.b1(h, scale=value)
    torch.testing.assert_close(converted.b1(h, scale=0.5), model.b1(h, scale=0.5))
    if isinstance(value, torch.Tensor) and value.requires_grad:  # what the guard protects
        model.b1(h, scale=value).sum().backward()
        assert value.grad is not None and value.grad != 0


def test_a_converted_block_still_takes_an_argument_it_ignores():
    """timm's DlaTree pattern: ``mid(x, shortcut)`` ignores ``shortcut``. Once converted, the block
    must still accept the call its parent makes (a GraphModule taking ``x`` only could be called by
    the rewritten parent alone; a user's own call or hook would get a TypeError)."""
    model = randomize_norms(DlaLike("tensor")).eval()
    converted = se_inject.apply(model, example_inputs=X32, identity_init=True).eval()
    assert "top.mid.se" in se_blocks(converted)
    h = model.stem(X32)
    with torch.no_grad():
        torch.testing.assert_close(converted.top.mid(h, h), model.top.mid(h, h))
        torch.testing.assert_close(converted.top.mid(h, shortcut=None), model.top.mid(h))


# -- timm's ResNets become timm's SE-ResNets, exactly (slow) ---------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("base, native, params", SE_PAIRS, ids=[p[0] for p in SE_PAIRS])
def test_injected_resnet_is_timms_se_resnet(base, native, params):
    ours = se_inject.apply(timm.create_model(base, pretrained=False), reduction=16)
    theirs = timm.create_model(native, pretrained=False).eval()
    assert count_params(ours) == count_params(theirs) == params
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_se_goes_before_drop_path_as_in_timm():
    ours = se_inject.apply(timm.create_model("resnet50", drop_path_rate=0.1))
    code = ours.layer4[2].code
    assert code.index("self.se(") < code.index("self.drop_path(") < code.index(" + ")
    ours.load_state_dict(timm.create_model("seresnet50", drop_path_rate=0.1).state_dict(), strict=True)


# -- the passes under the rewrite ------------------------------------------------------------------

def test_insert_modules_rewires_only_the_consumer():
    block = ResBlock(8, 8).eval()
    gm = fx.symbolic_trace(block)
    (add,) = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in n.name]
    bn2 = add.args[0]
    created = insert_modules(gm, [InsertionPoint(bn2, add, "extra", nn.Identity())])
    assert list(created) == ["extra"] and created["extra"].args == (bn2,)
    assert add.args[0] is created["extra"] and list(bn2.users) == [created["extra"]]
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(gm(x), block(x))


def test_insert_modules_redirects_readers_of_an_in_place_add():
    gm = fx.symbolic_trace(ResBlock(8, 8, spelling="add_"))
    (add,) = [n for n in gm.graph.nodes if n.target == "add_"]
    bn2 = add.args[0]
    created = insert_modules(gm, [InsertionPoint(bn2, add, "se", nn.Identity())])
    relu = next(iter(add.users))
    assert add.args[0] is created["se"] and relu.args[0] is add  # what read `out` reads the add now


def test_insert_modules_refuses_a_consumer_that_does_not_read_the_tail():
    gm = fx.symbolic_trace(ResBlock(8, 8))
    x, conv1 = list(gm.graph.nodes)[:2]
    relu = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "relu"][-1]
    with pytest.raises(ValueError, match="does not read"):
        insert_modules(gm, [InsertionPoint(conv1, relu, "se", nn.Identity())])


def test_free_attribute_name_takes_none_placeholders_and_skips_taken_names():
    block = ResBlock(8, 8)
    block.se = None  # timm's `self.se = None`
    assert free_attribute_name(block, "se", set()) == "se"
    assert free_attribute_name(block, "se", {"se"}) == "se_1"
    assert free_attribute_name(block, "conv1", set()) == "conv1_1"


def test_graph_module_like_keeps_children_buffers_hooks_and_attributes():
    block = ResBlock(8, 16, stride=2)
    block.register_buffer("scratch", torch.zeros(1), persistent=False)
    block.note = "kept"
    handle = block.register_forward_hook(lambda m, i, o: None)
    gm = graph_module_like(block, trace(block).graph)
    assert type(gm).__name__ == "ResBlock" and isinstance(gm.downsample, nn.Sequential)
    assert list(gm.state_dict()) == list(block.state_dict())
    assert gm.note == "kept" and len(gm._forward_hooks) == 1
    assert "scratch" not in gm.state_dict()
    handle.remove()


def test_build_blocks_cuts_each_block_out_with_an_identity_before_its_add():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ResBlock(8, 8), ResBlock(8, 8)).eval()
    scopes, _, _ = runnable_scopes(model, (X,))
    (scope,) = scopes
    cands = [Candidate.of(scope, v) for v in classify_adds(scope.gm, batch_size=2) if isinstance(v, ResidualAdd)]
    skipped = []
    rewrites = build_blocks(cands, lambda c, reason, detail: skipped.append(reason))
    assert skipped == [] and sorted(rw.path for rw in rewrites) == ["1", "2"]
    for rw in rewrites:
        assert [(p.name, p.fused) for p in rw.placements] == [("se", "relu")]
        x = torch.randn(1, 8, 4, 4)
        torch.testing.assert_close(rw.gm(x), rw.module(x))
