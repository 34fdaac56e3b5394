"""Acceptance 3: what apply guarantees, each with a test, and every bad input it refuses."""

import copy
import warnings

import pytest
import timm
import torch
import torchvision
from torch import fx, nn

import se_inject
from se_inject import (
    ExampleInputError,
    GraphModuleRootWarning,
    NoResidualAddsWarning,
    NotAModuleError,
    OptionError,
    RefusedModuleWarning,
    SEBlock,
    TraceError,
    VerificationError,
)
from tests.helpers import (
    ResBlock,
    assert_same_snapshot,
    assert_shortcuts_untouched,
    count_params,
    randomize_norms,
    small_resnet,
    snapshot,
)

X32 = torch.randn(2, 3, 32, 32)


# -- the model keeps its class, its keys, and the caller's model is untouched ---------------------

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


def test_input_model_is_untouched_by_apply_and_find_sites():
    model = timm.create_model("resnet18").train()
    model.layer1[0].bn1.eval()  # a mixed train/eval state must survive too
    before = snapshot(model)
    se_inject.apply(model, identity_init=True)
    se_inject.find_sites(model)
    assert_same_snapshot(before, snapshot(model))


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


def test_user_hooks_do_not_run_during_apply_and_still_fire_after():
    model = torchvision.models.resnet18().eval()
    seen = []
    model.layer1[0].register_forward_hook(lambda m, i, o: seen.append(o * 2))  # even one that edits
    out = se_inject.apply(model)
    assert seen == []
    out(torch.randn(1, 3, 64, 64))
    assert [t.shape for t in seen] == [torch.Size([1, 64, 16, 16])]


# -- SE on the branch, the shortcut clean ---------------------------------------------------------

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


# -- identity init --------------------------------------------------------------------------------

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


# -- verification, train/eval, where adds live ----------------------------------------------------

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


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(ResBlock(16, 16), ResBlock(16, 16))

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace the root
            x = x * 1.0
        return self.blocks(x)


def test_adds_are_found_inside_traceable_submodules_of_an_untraceable_root():
    model = UntraceableRoot().eval()
    result = se_inject.inject(model, example_inputs=X32, identity_init=True)
    assert [u.path for u in result.plan.untraceable] == [""]
    assert [s.name for s in result.plan.sites] == ["blocks.0.se", "blocks.1.se"]
    assert type(result.model) is UntraceableRoot
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(X32), model(X32))


def test_adds_inside_timm_no_trace_leaves_are_found():
    # timm registers NormFreeBlock as a leaf that fx must not trace into; its add is inside it.
    result = se_inject.inject(timm.create_model("nf_resnet50"), identity_init=True)
    assert len(result.plan.sites) == 16
    assert result.plan.sites[0].name == "stages.0.0.se"
    assert isinstance(result.model.stages[0][0].se, SEBlock)


def _mutates_its_list(sizes, x):
    sizes.append(0)  # fx hands a traced call an immutable list: the traced graph fails to run
    return x


torch.fx.wrap("_mutates_its_list")


class TracedRootFails(UntraceableRoot):
    def forward(self, x):
        return self.blocks(_mutates_its_list([1, 2], self.stem(x)))


def test_a_traced_graph_that_fails_to_run_falls_back_to_the_children():
    model = TracedRootFails().eval()
    result = se_inject.inject(model, example_inputs=X32, identity_init=True)
    assert result.plan.untraceable[0].path == ""
    assert "the traced graph fails at <root>" in result.plan.untraceable[0].error
    assert [s.name for s in result.plan.sites] == ["blocks.0.se", "blocks.1.se"]
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(X32), model(X32))


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


class BlocksAndRootAdd(nn.Module):
    """Residual blocks below, and a residual add in the root's own forward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(ResBlock(8, 8), ResBlock(8, 8))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return x + torch.relu(self.conv(x))


@pytest.mark.parametrize("call", [se_inject.apply, se_inject.inject])
def test_inplace_on_a_model_whose_root_holds_an_add_is_refused_before_changing_it(call):
    """The rewritten root is a new GraphModule, which cannot become the caller's object: converting
    the blocks in place and returning the new root left the caller's model half converted (blocks
    with SE, the root's add without). inplace=True must convert all or refuse before any change."""
    model = BlocksAndRootAdd().eval()
    before = snapshot(model)
    with pytest.raises(OptionError, match=r"inplace=True cannot convert BlocksAndRootAdd itself: its own forward "
                                          r"holds a residual add \(add_2\).*half converted.*inplace=False"):
        call(model, example_inputs=X32, inplace=True)
    assert_same_snapshot(before, snapshot(model))
    assert not any(isinstance(m, (SEBlock, fx.GraphModule)) for m in model.modules())
    with pytest.warns(GraphModuleRootWarning):
        out = se_inject.apply(model, example_inputs=X32)
    assert sorted(n for n, m in out.named_modules() if isinstance(m, SEBlock)) == ["blocks.0.se", "blocks.1.se", "se"]
    # Without a root add, inplace=True still converts the object itself.
    inner = nn.Sequential(nn.Conv2d(3, 8, 1), ResBlock(8, 8))
    assert se_inject.apply(inner, example_inputs=X32, inplace=True) is inner and isinstance(inner[1].se, SEBlock)


# -- idempotence and options ----------------------------------------------------------------------

def test_a_second_apply_adds_nothing():
    once = se_inject.apply(torchvision.models.resnet18())
    with pytest.warns(NoResidualAddsWarning, match=r"has-attention x8"):
        result = se_inject.inject(once)
    assert count_params(result.model) == count_params(once)
    assert {s.reason for s in result.plan.skipped} == {"has-attention"}


def test_include_exclude_and_min_channels():
    model = torchvision.models.resnet18()
    names = lambda **kw: [s.name for s in se_inject.find_sites(model, **kw).sites]  # noqa: E731
    assert names(include="layer4.*") == ["layer4.0.se", "layer4.1.se"]
    assert names(exclude=["layer1.*", "layer2.*", "layer3.*"]) == ["layer4.0.se", "layer4.1.se"]
    assert names(min_channels=256) == ["layer3.0.se", "layer3.1.se", "layer4.0.se", "layer4.1.se"]
    plan = se_inject.find_sites(model, include="layer4.*")
    assert sum(s.reason == "filtered" for s in plan.skipped) == 6


def test_paper_hidden_width_option():
    model = torchvision.models.resnet18()
    plan = se_inject.find_sites(model, reduction=8, rd_divisor=None)
    assert [s.hidden for s in plan.sites][::2] == [8, 16, 32, 64]


def test_example_input_size_comes_from_timm_pretrained_cfg():
    plan = se_inject.find_sites(timm.create_model("resnet50d"))
    assert plan.input_shapes == [(1, 3, 224, 224)]
    plan = se_inject.find_sites(timm.create_model("resnet18", pretrained_cfg_overlay={"input_size": (3, 96, 96)}))
    assert plan.input_shapes == [(1, 3, 96, 96)] and plan.sites[0].shape == (1, 64, 24, 24)


# -- bad input: clear errors, model unchanged -----------------------------------------------------

@pytest.mark.parametrize("bad", [None, "resnet50", torch.randn(3), lambda x: x])
def test_non_modules_are_refused(bad):
    with pytest.raises(NotAModuleError, match="needs a torch.nn.Module, got"):
        se_inject.apply(bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reduction": 0}, "reduction must be a positive integer, got 0"),
        ({"reduction": -4}, "reduction must be a positive integer"),
        ({"reduction": 1.5}, "reduction must be a positive integer, got 1.5"),
        ({"reduction": True}, "reduction must be a positive integer, got True"),
        ({"reduction": "16"}, "reduction must be a positive integer, got '16'"),
        ({"rd_divisor": 0}, "rd_divisor must be a positive integer"),
        ({"min_channels": 0}, "min_channels must be a positive integer"),
        ({"act_layer": "swishy"}, "act_layer='swishy' is not a known name"),
        ({"gate_layer": nn.Tanh, "identity_init": True}, r"gate\(0\) = 0.5"),
        ({"include": "layer9.*"}, r"include pattern 'layer9.\*' matches no block.*layer1.0"),
        ({"include": [""]}, "include must hold non-empty strings"),
        ({"exclude": "*"}, "leave out all 8 residual adds"),
        ({"min_channels": 4096}, "leave out all 8 residual adds"),
        ({"inplace": "yes"}, "inplace must be True or False"),
        ({"strict": 1}, "strict must be True or False"),
        ({"example_inputs": []}, "example_inputs must be a tensor or a non-empty tuple"),
    ],
)
def test_impossible_options_raise_and_leave_the_model_alone(kwargs, message):
    model = torchvision.models.resnet18()
    before = snapshot(model)
    with pytest.raises(OptionError, match=message):
        se_inject.apply(model, **kwargs)
    assert_same_snapshot(before, snapshot(model))


def test_a_wrong_example_input_names_the_model_and_the_fix():
    model = torchvision.models.video.r3d_18()
    with pytest.raises(ExampleInputError, match=r"VideoResNet does not run on an example input of shape \[\(1, 3, 224, 224\)\] \(at stem.0\): RuntimeError: .*example_inputs="):
        se_inject.apply(model)


class AliasingSumBlock(nn.Module):
    """``out += x`` on an alias of ``out``: fx records a plain add (pytorch issue 68301), so the
    traced graph computes something else, which only an output comparison can see."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        feat = out
        out += x
        return torch.relu(out) + feat


@pytest.mark.parametrize("shape", [(0, 3, 16, 16), (1, 3, 0, 0)], ids=["batch-0", "image-0x0"])
def test_an_example_input_without_elements_is_refused_before_any_work(shape):
    """On an empty input every output comparison passes vacuously: the block above, refused with a
    real batch, would be installed and compute something else. It must be refused up front."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), AliasingSumBlock(), nn.Conv2d(8, 4, 1)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = se_inject.find_sites(model, example_inputs=torch.randn(1, 3, 16, 16))
    assert not plan.sites and "unverified" in [s.reason for s in plan.skipped]
    assert RefusedModuleWarning in [w.category for w in caught]
    before = snapshot(model)
    for call in (se_inject.apply, se_inject.inject, se_inject.find_sites):
        with pytest.raises(ExampleInputError, match=rf"shape \({', '.join(map(str, shape))}\), which has no "
                                                    rf"elements.*Pass a non-empty example"):
            call(model, example_inputs=torch.randn(shape))
    with pytest.raises(ExampleInputError, match="no elements"):  # inside a tuple too
        se_inject.apply(model, example_inputs=(torch.randn(shape),))
    assert_same_snapshot(before, snapshot(model))


def test_a_batch_of_one_is_enough_for_a_model_with_batch_norm_in_train_mode():
    """The analysis traces train mode but runs only eval mode, so BatchNorm's training rule (more
    than one value per channel) never meets the default batch of 1, even at a 1x1 feature map."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ResBlock(8, 8), nn.AdaptiveAvgPool2d(1),
                          ResBlock(8, 8)).train()
    result = se_inject.inject(model, example_inputs=torch.randn(1, 3, 8, 8))
    assert [s.name for s in result.plan.sites] == ["1.se", "3.se"]
    assert result.model.training and result.model[3].training


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x) + x
        return x


def test_an_untraceable_model_is_refused_with_the_reason():
    model = Untraceable()
    before = snapshot(model)
    with pytest.raises(TraceError, match=r"could not trace Untraceable \(path '<root>'\).*control flow"):
        se_inject.apply(model, example_inputs=X32)
    assert_same_snapshot(before, snapshot(model))


def test_a_model_without_residual_adds_warns_and_returns_an_unchanged_copy():
    model = torchvision.models.vgg11()
    with pytest.warns(NoResidualAddsWarning, match="VGG has no residual add"):
        out = se_inject.apply(model, example_inputs=torch.randn(1, 3, 32, 32))
    assert out is not model and type(out) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), out.state_dict().values()))
