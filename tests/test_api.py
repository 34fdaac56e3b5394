"""The public API and everything it refuses.

Its shape: explicit signatures, one option list with a JSON form, errors that are also the built-ins
a caller would catch, warnings that point at the caller's line. Its refusals: option values it
cannot honour (act_layer and gate_layer are checked by what they do), example inputs that do not
fit, models it cannot convert, and wrapped or compiled models; each with a clear error, before any
change to the model.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import socket
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
    SEInjectError,
    SEOptions,
    TraceError,
)
from se_inject.modules.attentions import GainGate
from se_inject.options import option_names
from tests.client_helpers import assert_unchanged, full_snapshot
from tests.helpers import ResBlock, assert_same_snapshot, randomize_norms, small_resnet, snapshot

X = torch.randn(1, 3, 32, 32)
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
X64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# -- signatures, options, errors and the namespace -------------------------------------------------

RUN_PARAMETERS = {"apply": ["example_inputs", "inplace", "strict"], "inject": ["example_inputs", "inplace", "strict"],
                  "find_sites": ["example_inputs", "strict"]}


@pytest.mark.parametrize("name", list(RUN_PARAMETERS))
def test_signatures_list_every_option_keyword_only(name):
    func = getattr(se_inject, name)
    params = inspect.signature(func).parameters
    assert list(params) == ["model", *option_names(), *RUN_PARAMETERS[name]]
    for option in option_names():
        p = params[option]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY
        assert p.default == SEOptions.__dataclass_fields__[option].default
        assert f"{option} (default" in func.__doc__  # documented in the docstring


def test_the_option_list_is_the_dataclass_fields():
    assert option_names() == [f.name for f in dataclasses.fields(SEOptions)]
    assert all(f.metadata["doc"] for f in dataclasses.fields(SEOptions))


@pytest.mark.parametrize("func", [se_inject.apply, se_inject.inject, se_inject.find_sites])
def test_a_misspelt_option_is_an_option_error_with_a_hint(func):
    with pytest.raises(OptionError, match=r"got an unknown option 'reductoin'; did you mean 'reduction'\?"):
        func(nn.Sequential(ResBlock(3, 3)), reductoin=8)
    with pytest.raises(OptionError, match=r"unknown option 'colour'; the options are reduction, rd_divisor"):
        func(nn.Sequential(ResBlock(3, 3)), colour="red")


def test_find_sites_says_why_it_takes_no_inplace():
    with pytest.raises(OptionError, match=r"find_sites\(\) never changes the model.*apply\(\) and inject\(\) do"):
        se_inject.find_sites(nn.Sequential(ResBlock(3, 3)), inplace=True)


def test_options_round_trip_through_their_json_form():
    options = SEOptions(reduction=8, rd_divisor=None, act_layer="silu", identity_init=True, include="layer4.*",
                        exclude=["layer4.0"], min_channels=32)
    data = options.to_dict()
    assert data == {"reduction": 8, "rd_divisor": None, "act_layer": "silu", "gate_layer": "sigmoid",
                    "identity_init": True, "include": ["layer4.*"], "exclude": ["layer4.0"], "min_channels": 32,
                    "fuse_residual": True, "kernels": "auto"}
    assert SEOptions.from_dict(data) == options
    assert options.replace(reduction=4).reduction == 4
    with pytest.raises(OptionError, match="act_layer=.*SiLU.*is a class"):
        SEOptions(act_layer=nn.SiLU).to_dict()
    with pytest.raises(OptionError, match="unknown option 'size'"):
        SEOptions.from_dict({"size": 3})


@pytest.mark.parametrize("entry", ["apply", "inject"])
def test_warnings_point_at_the_callers_line(entry):
    model = torchvision.models.vgg11()
    with pytest.warns(se_inject.NoResidualAddsWarning) as caught:
        getattr(se_inject, entry)(model, example_inputs=X)
    assert caught[0].filename == __file__


@pytest.mark.parametrize("error, builtin", [
    (se_inject.NotAModuleError, TypeError), (se_inject.OptionError, ValueError),
    (se_inject.TraceError, RuntimeError), (se_inject.ExampleInputError, ValueError),
    (se_inject.VerificationError, RuntimeError), (se_inject.RecipeError, ValueError),
    (se_inject.CheckpointError, ValueError), (se_inject.UnknownModelError, ValueError),
    (se_inject.NoResidualAddsError, ValueError), (se_inject.BenchError, RuntimeError),
])
def test_every_error_is_also_the_builtin_a_caller_would_catch(error, builtin):
    assert issubclass(error, se_inject.SEInjectError) and issubclass(error, builtin)


def test_the_public_namespace_holds_no_internals():
    assert all(not name.startswith("_") or name == "__version__" for name in se_inject.__all__)
    for name in se_inject.__all__:
        assert hasattr(se_inject, name), name
    assert se_inject.__version__ == __import__("importlib.metadata").metadata.version("se-inject")


def test_the_version_comes_from_the_installed_metadata():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert se_inject.__version__ and se_inject.__version__ != "0+unknown"


# -- option values it cannot honour, refused before the model changes ------------------------------

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


class MustNotRun(nn.Module):
    """A model whose forward fails the test: options must be refused before any analysis."""

    def __init__(self) -> None:
        super().__init__()
        self.body = small_resnet()

    def forward(self, x):
        raise AssertionError("apply analysed the model before checking its options")


@pytest.mark.parametrize("option", ["act_layer", "gate_layer"])
@pytest.mark.parametrize("layer", [nn.Conv2d, nn.Linear, nn.BatchNorm2d])
def test_a_layer_class_that_is_not_an_activation_is_refused_up_front(option, layer):
    with pytest.raises(OptionError, match=rf"{option}.*{layer.__name__}"):
        se_inject.SEOptions(**{option: layer})
    with pytest.raises(OptionError, match=rf"{option}.*{layer.__name__}"):
        se_inject.apply(MustNotRun(), example_inputs=X32, **{option: layer})


def test_rd_divisor_larger_than_the_channels_gives_no_block_wider_than_its_input():
    """rd_divisor=64 on 16- and 32-channel sites would give every SE 64 hidden units (4x and 2x
    *expansion*). Either the hidden width stays <= C (and the plan says what was built), or the
    option is refused with a message naming rd_divisor."""
    try:
        result = se_inject.inject(small_resnet(), example_inputs=X32, rd_divisor=64)
    except OptionError as e:
        assert "rd_divisor" in str(e)
        return
    built = {name: m for name, m in result.model.named_modules() if isinstance(m, SEBlock)}
    for site in result.plan.sites:
        assert site.hidden <= site.channels, site
        assert built[site.name].rd_channels == site.hidden, site


# -- act_layer and gate_layer are checked by what they do ------------------------------------------
# An activation is elementwise and nonlinear; a gate maps 0 to 0.5 and everything into [0, 1],
# monotonically. The check lives in se_inject.layers, and every way in (SEOptions, apply, SEBlock,
# timm attentions, the gain gates of identity init) goes through it.

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
    """An activation that is not applied unit by unit (mirrored units do not stay equal)."""

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
    """nn.Identity and nn.ReLU as gates and a module returning zeros as the activation: apply refuses
    them before it looks at the model."""
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
    must not turn them into bfloat16 or meta tensors."""
    class Fresh(nn.Module):  # a class never checked before, so the probes run here
        def forward(self, x):
            return torch.nn.functional.silu(x)

    class FreshGate(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)

    with torch.device("meta"), torch.autocast("cpu", dtype=torch.bfloat16):
        options = se_inject.SEOptions(act_layer=Fresh, gate_layer=FreshGate, identity_init=True)
    assert options.act_layer is Fresh


@pytest.mark.parametrize("act, reduction", [(nn.Softmax, 3), (nn.LogSoftmax, 3), (nn.Softmin, 3), (CumSum, 4)],
                         ids=["softmax-odd", "logsoftmax-odd", "softmin-odd", "cumsum-even"])
def test_identity_init_is_an_identity_or_refused(act, reduction):
    """identity_init promises outputs equal to the original's. An activation that is not applied
    unit by unit (softmax, an order-dependent cumsum) is not an activation at all: apply must refuse
    it (for every init, by behaviour, up front), not return a model that is not an identity."""
    model = randomize_norms(small_resnet()).eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = se_inject.apply(model, example_inputs=X32, identity_init=True, act_layer=act,
                                        reduction=reduction, rd_divisor=None)
    except OptionError as e:
        assert f"act_layer={act.__name__} is not an activation" in str(e) and "elementwise" in str(e), str(e)
        return
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(X32), model(X32), rtol=1e-5, atol=1e-6)


# -- example inputs --------------------------------------------------------------------------------

def test_example_input_size_comes_from_timm_pretrained_cfg():
    plan = se_inject.find_sites(timm.create_model("resnet50d"))
    assert plan.input_shapes == [(1, 3, 224, 224)]
    plan = se_inject.find_sites(timm.create_model("resnet18", pretrained_cfg_overlay={"input_size": (3, 96, 96)}))
    assert plan.input_shapes == [(1, 3, 96, 96)] and plan.sites[0].shape == (1, 64, 24, 24)


def test_a_batch_of_one_is_enough_for_a_model_with_batch_norm_in_train_mode():
    """The analysis traces train mode but runs only eval mode, so BatchNorm's training rule (more
    than one value per channel) never meets the default batch of 1, even at a 1x1 feature map."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ResBlock(8, 8), nn.AdaptiveAvgPool2d(1),
                          ResBlock(8, 8)).train()
    result = se_inject.inject(model, example_inputs=torch.randn(1, 3, 8, 8))
    assert [s.name for s in result.plan.sites] == ["1.se", "3.se"]
    assert result.model.training and result.model[3].training


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


def test_two_example_inputs_for_a_one_input_model_is_refused_clearly():
    model = small_resnet()
    before = full_snapshot(model)
    with pytest.raises(SEInjectError, match=r"takes 1 input.*example_inputs.* 2\b"):
        se_inject.apply(model, example_inputs=(X32, X32))
    assert_unchanged(before, model)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = small_resnet()
        self.b = small_resnet()

    def forward(self, x, y):
        return self.a(x) * self.b(y)


def test_one_example_input_for_a_two_input_model_is_refused_clearly():
    model = TwoInputs()
    with pytest.raises(SEInjectError, match=r"takes 2 inputs.*example_inputs.* 1\b") as info:
        se_inject.apply(model, example_inputs=X32)
    assert re.search(r"\by\b", str(info.value)), str(info.value)  # names the missing input
    assert "StopIteration" not in str(info.value)


# -- models it cannot convert ----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [None, "resnet50", torch.randn(3), lambda x: x])
def test_non_modules_are_refused(bad):
    with pytest.raises(NotAModuleError, match="needs a torch.nn.Module, got"):
        se_inject.apply(bad)


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


def test_a_model_on_the_meta_device_is_refused_clearly():
    model = torchvision.models.resnet18().to("meta")
    types = [(n, type(m)) for n, m in model.named_modules()]
    for example in (None, torch.randn(1, 3, 64, 64, device="meta")):
        with pytest.raises(SEInjectError, match=r"meta"):
            se_inject.apply(model, example_inputs=example)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert all(p.is_meta for p in model.parameters())


def test_an_uninitialised_lazy_model_is_refused_clearly():
    model = nn.Sequential(nn.LazyConv2d(16, 3, padding=1), ResBlock(16, 16))
    with pytest.raises(SEInjectError, match=r"(?i)lazy") as info:
        se_inject.apply(model, example_inputs=X32)
    message = str(info.value)
    assert "LazyConv2d" in message and "forward" in message, message  # which module, and what to do
    assert "does not run on an example input" not in message, message
    assert isinstance(model[0], nn.LazyConv2d) and model[0].has_uninitialized_params()


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


# -- wrapped and compiled models -------------------------------------------------------------------

@pytest.fixture
def process_group():
    """A single-process gloo group on a free loopback port: DDP cannot be built without one."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cannot start a gloo process group here: {e}")
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_a_ddp_wrapped_model_is_refused(process_group, inplace):
    """DDP registers its parameters when it is built: SE parameters added afterwards are never
    all-reduced and ranks drift apart. The error says to convert ``model.module`` before wrapping."""
    ddp = torch.nn.parallel.DistributedDataParallel(torchvision.models.resnet18())
    before = full_snapshot(ddp)
    with pytest.raises(SEInjectError, match=r"DistributedDataParallel.*\bmodule\b"):
        se_inject.apply(ddp, example_inputs=X64, inplace=inplace)
    assert_unchanged(before, ddp)


def test_a_compiled_model_is_refused_with_orig_mod():
    """A torch.compile'd model is refused, pointing at ``._orig_mod`` (traced as it is, it would get
    no SE and a warning that it has no residual add)."""
    model = timm.create_model("resnet18")
    compiled = torch.compile(model)
    before = full_snapshot(model)
    for call in (se_inject.apply, se_inject.inject, se_inject.find_sites):
        with pytest.raises(NotAModuleError, match=r"the model \(OptimizedModule\) is compiled by torch.compile.*"
                                                  r"`\._orig_mod`.*torch\.compile\(se_inject\.apply"):
            call(compiled, example_inputs=X64[:1])
    assert_unchanged(before, model)
    inner = small_resnet()
    inner[1] = torch.compile(inner[1])
    with pytest.raises(NotAModuleError, match=r"^1, a submodule of Sequential, \(OptimizedModule\) is compiled"):
        se_inject.apply(inner, example_inputs=X32)


def test_a_dataparallel_subclass_is_refused_with_module():
    class MyDP(nn.DataParallel):
        pass

    for wrapper in (nn.DataParallel, MyDP):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = wrapper(small_resnet())
        with pytest.raises(NotAModuleError, match=rf"\({wrapper.__name__}\) is wrapped in DataParallel.*`\.module`"):
            se_inject.apply(wrapped, example_inputs=X32)


def test_a_ddp_subclass_and_fsdp_are_refused_by_class(process_group):
    """A subclass of DistributedDataParallel passes a check by class name, and its reducer would not
    see the new SE parameters. FSDP2's fully_shard changes the module's class in place."""
    from torch.distributed.fsdp import fully_shard

    class MyDDP(nn.parallel.DistributedDataParallel):
        pass

    ddp = MyDDP(small_resnet())
    before = full_snapshot(ddp)
    with pytest.raises(NotAModuleError, match=r"\(MyDDP\) is wrapped in DistributedDataParallel.*`\.module`"):
        se_inject.apply(ddp, example_inputs=X32, inplace=True)
    assert_unchanged(before, ddp)
    sharded = fully_shard(small_resnet())
    with pytest.raises(SEInjectError, match=r"sharded by FSDP \(FSDPModule\).*then shard it"):
        se_inject.apply(sharded, example_inputs=X32)
