"""Converted models work wherever the original works, as clients use them.

timm's own model tests (huggingface/pytorch-image-models, tests/test_models.py: test_model_forward,
test_model_backward, test_model_default_cfgs, test_model_forward_torchscript,
test_model_forward_features, test_model_forward_intermediates(_features), test_model_forward_fx,
test_model_backward_fx, test_model_forward_fx_torchscript, test_model_forward_torchscript_with_
features_fx) run here on models converted by ``se_inject.apply``, for seven families, as one
parametrised test (``test_client_check_on_both[check_forward-resnet18]``, ...). Each check runs on
the original first (``on_both``): the converted model's test is skipped only where the original
fails the same check. Differences from timm's tests: smaller inputs (64 px; 96 px for features;
``pool_size`` is checked at 64 px with the stride the pretrained_cfg implies), and a few checks
compare outputs where timm only checks shapes.

Then: torchvision's feature extraction (pytorch/vision test/test_backbone_utils.py) on converted
torchvision models, timm ``feature_cls='fx'`` feature nets, the activation after the add that SE
computes, and the deployment paths (TorchScript script / trace / save-load, torch.export, ONNX
through onnxruntime, torch.compile). ``-m "not slow"`` leaves out the heavier families of the heavy
checks, and the heavier deployment models.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import random
import warnings
from typing import Callable

import pytest
import timm
import torch
import torchvision
from timm.layers import get_channel_dim, get_spatial_dim
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import se_inject
from se_inject import SEBlock
from tests.client_helpers import Family, create_fx_model, on_both, se_blocks

torch.set_num_threads(min(2, torch.get_num_threads()))  # at most 2, whatever the machine (and xdist) gave

# Seven families: plain and deep ResNets, ConvNeXt, inverted residuals, RegNet, DLA's trees (blocks
# called with extra arguments), and NF-ResNet (timm no-trace blocks holding the adds).
FAMILIES = ["resnet18", "resnet26d", "convnext_atto", "mobilenetv2_100", "regnetx_002", "dla34", "nf_resnet26"]
#: Families the expensive checks (TorchScript, fx + TorchScript) run on outside of -m slow.
CORE = ("resnet18", "mobilenetv2_100", "convnext_atto")

FWD = (1, 3, 64, 64)       # timm: TARGET_FWD_SIZE 384
BWD = (2, 3, 64, 64)       # timm: TARGET_BWD_SIZE 128, batch 2
FEAT = (1, 3, 96, 96)      # timm: TARGET_FFEAT_SIZE 96
FX = (1, 3, 64, 64)        # timm: TARGET_FWD_FX_SIZE 128
JIT = (1, 3, 64, 64)       # timm: TARGET_JIT_SIZE 128


@pytest.fixture(scope="module")
def family(request) -> Family:
    """One family at a time (module scope + indirect parametrisation groups tests by family)."""
    return Family(request.param)


def families() -> list[str]:
    return list(FAMILIES)


def randn(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


# -- timm's checks, each a function of a model factory ---------------------------------------------

def check_forward(make: Callable[..., nn.Module]) -> None:
    model = make().eval()
    inputs = randn(FWD)
    outputs = model(inputs)
    assert outputs.shape[0] == FWD[0]
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    try:  # grad checkpointing, if supported, must not change the output
        model.set_grad_checkpointing()
    except Exception:
        pass
    else:
        outputs2 = model(inputs)
        assert torch.allclose(outputs, outputs2, rtol=1e-4, atol=1e-5), "Output does not match"


def check_backward(make: Callable[..., nn.Module]) -> None:
    model = make(num_classes=42)
    num_params = sum(x.numel() for x in model.parameters())
    model.train()
    outputs = model(randn(BWD))
    if isinstance(outputs, tuple):
        outputs = torch.cat(outputs)
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum(x.grad.numel() for x in model.parameters() if x.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"


def check_default_cfgs(make: Callable[..., nn.Module]) -> None:
    model = make().eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    pool_size = cfg["pool_size"]
    spatial_axis = get_spatial_dim(getattr(model, "output_fmt", "NCHW"))
    feat_axis = get_channel_dim(getattr(model, "output_fmt", "NCHW"))
    input_size = tuple(cfg["input_size"])
    # pool_size is given for input_size; where input_size / pool_size is a whole stride (32 here),
    # check the same stride at 64 px instead of 224 px (cheaper; timm checks at input_size).
    strides = {i // p for i, p in zip(input_size[1:], pool_size)}
    if len(strides) == 1 and all(i % p == 0 for i, p in zip(input_size[1:], pool_size)):
        (stride,) = strides
        pool_size = (64 // stride, 64 // stride)
        input_size = (input_size[0], pool_size[0] * stride, pool_size[1] * stride)
    input_tensor = randn((1, *input_size))

    outputs = model.forward_features(input_tensor)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    assert outputs.shape[spatial_axis[0]] == pool_size[0], f"unpooled feature shape {outputs.shape} != config"
    assert outputs.shape[spatial_axis[1]] == pool_size[1], f"unpooled feature shape {outputs.shape} != config"
    assert outputs.shape[feat_axis] == model.num_features
    assert outputs_pre.shape[1] == model.head_hidden_size

    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 2 and outputs.shape[1] == model.head_hidden_size
    assert outputs.shape == outputs_pre.shape

    model.reset_classifier(0, "")
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 4
    assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

    model = make(num_classes=0, global_pool="").eval()
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 4
    assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

    classifier = cfg["classifier"]
    for c in (classifier,) if isinstance(classifier, str) else classifier:
        assert c + ".weight" in state_dict, f"{c} not in model params"
    first_conv = cfg["first_conv"]
    for fc in (first_conv,) if isinstance(first_conv, str) else first_conv:
        assert fc + ".weight" in state_dict, f"{fc} not in model params"


def check_forward_torchscript(make: Callable[..., nn.Module]) -> None:
    model = make(scriptable=True).eval()
    scripted = torch.jit.script(model)
    x = randn(JIT)
    outputs = scripted(x)
    assert outputs.shape[0] == JIT[0]
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    with torch.no_grad():
        torch.testing.assert_close(outputs, model(x), rtol=1e-4, atol=1e-5)  # (not in timm's test)


def _check_feature_outputs(model: nn.Module, outputs, fmt: str = "NCHW") -> None:
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    feat_axis, spatial_axis = get_channel_dim(fmt), get_spatial_dim(fmt)
    assert len(expected_channels) == len(outputs)
    for e, r, o in zip(expected_channels, expected_reduction, outputs):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(FEAT[-2] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(FEAT[-1] / r) + 1
        assert o.shape[0] == FEAT[0]
        assert not torch.isnan(o).any()


def check_forward_features(make: Callable[..., nn.Module]) -> None:
    model = make(features_only=True).eval()
    assert len(model.feature_info.channels()) >= 3
    _check_feature_outputs(model, model(randn(FEAT)), getattr(model, "output_fmt", "NCHW"))


def check_forward_intermediates_features(make: Callable[..., nn.Module]) -> None:
    model = make(features_only=True, feature_cls="getter").eval()
    _check_feature_outputs(model, model(randn(FEAT)), getattr(model, "output_fmt", "NCHW"))


def check_forward_features_fx(make: Callable[..., nn.Module]) -> None:
    """test_model_forward_features with ``feature_cls='fx'`` (timm's FeatureGraphNet)."""
    model = make(features_only=True, feature_cls="fx").eval()
    _check_feature_outputs(model, model(randn(FEAT)), getattr(model, "output_fmt", "NCHW"))


def check_forward_intermediates(make: Callable[..., nn.Module]) -> None:
    model = make().eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(feature_info.channels()) >= 3
    inpt = randn(FEAT)
    output, intermediates = model.forward_intermediates(inpt, output_fmt="NCHW")
    model.feature_info = feature_info  # _check_feature_outputs reads channels() / reduction()
    _check_feature_outputs(model, intermediates)
    assert torch.allclose(output, model.forward_features(inpt))
    try:
        model.set_grad_checkpointing()
    except Exception:
        pass
    else:
        output3, _ = model.forward_intermediates(inpt, output_fmt="NCHW")
        assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5), "Output does not match"


def check_forward_fx(make: Callable[..., nn.Module]) -> None:
    model = make().eval()
    with torch.inference_mode():
        inputs = randn(FX)
        outputs = model(inputs)
        fx_model = create_fx_model(model)
        fx_outputs = torch.cat(tuple(fx_model(inputs).values()))
    torch.testing.assert_close(fx_outputs, outputs, rtol=1e-5, atol=1e-6)  # timm: exact equality
    assert not torch.isnan(outputs).any()


def check_backward_fx(make: Callable[..., nn.Module]) -> None:
    model = make(num_classes=42).train()
    num_params = sum(x.numel() for x in model.parameters())
    fx_model = create_fx_model(model, train=True)
    outputs = torch.cat(tuple(fx_model(randn(BWD)).values()))
    outputs.mean().backward()
    for n, x in fx_model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum(x.grad.numel() for x in fx_model.parameters() if x.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any()


def check_forward_fx_torchscript(make: Callable[..., nn.Module]) -> None:
    model = make(scriptable=True).eval()
    scripted = torch.jit.script(create_fx_model(model))
    with torch.inference_mode():
        outputs = torch.cat(tuple(scripted(randn(JIT)).values()))
    assert outputs.shape[0] == JIT[0]
    assert not torch.isnan(outputs).any()


def check_symbolic_trace(make: Callable[..., nn.Module]) -> None:
    """Plain ``torch.fx.symbolic_trace`` (no timm leaves): what graph-rewriting tools do first."""
    model = make().eval()
    gm = fx.symbolic_trace(model)
    x = randn(FX)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def check_feature_graph_net(make: Callable[..., nn.Module]) -> None:
    """timm's fx feature wrapper around an existing model (how timm builds ``feature_cls='fx'``):
    its features are what the feature modules output in the model's own forward."""
    model = make().eval()
    info = model.feature_info
    out_indices = tuple(range(len(info)))
    net = timm.models.FeatureGraphNet(model, out_indices=out_indices)
    x = randn(FEAT)
    seen = {}
    handles = [model.get_submodule(i["module"]).register_forward_hook(
        lambda m, a, o, k=i["module"]: seen.__setitem__(k, o)) for i in info]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        features = net(x)
    assert len(features) == len(info)
    for f, i in zip(features, info):
        torch.testing.assert_close(f, seen[i["module"]], rtol=1e-5, atol=1e-6)


def check_features_fx_torchscript(make: Callable[..., nn.Module]) -> None:
    """timm's test_model_forward_torchscript_with_features_fx: a ``feature_cls='fx'`` feature net,
    scripted (for the converted side: the feature net itself converted, as a client would)."""
    model = make(scriptable=True, features_only=True, feature_cls="fx").eval()
    x = randn(FEAT)
    scripted = torch.jit.script(model)
    with torch.inference_mode():
        outputs = scripted(x)
        eager = model(x)
    assert isinstance(outputs, list) and len(outputs) == len(eager)
    for o, e in zip(outputs, eager):
        assert o.shape[0] == FEAT[0] and not torch.isnan(o).any()
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-6)


# -- the checks, per family -------------------------------------------------------------------------

#: The client checks above, each run on the original and on the converted model of every family.
CHECKS = [check_forward, check_backward, check_default_cfgs, check_forward_torchscript, check_forward_features,
          check_forward_features_fx, check_forward_intermediates_features, check_forward_intermediates,
          check_forward_fx, check_backward_fx, check_forward_fx_torchscript, check_symbolic_trace,
          check_feature_graph_net, check_features_fx_torchscript]
#: The expensive checks: outside of -m slow they run on the CORE families only.
HEAVY = (check_forward_torchscript, check_forward_fx_torchscript, check_features_fx_torchscript)


def family_checks() -> list:
    """Every check on every family, family after family, a heavy check outside CORE marked slow.

    Each test gets its own ``functools.partial`` of its check. pytest groups the tests of a module by
    equal module-scoped parameters; the checks' own values would group them by check, and the
    module-scoped ``family`` would then be rebuilt at every test instead of once per family.
    """
    return [pytest.param(name, functools.partial(check), id=f"{check.__name__}-{name}",
                         marks=pytest.mark.slow if check in HEAVY and name not in CORE else ())
            for name in FAMILIES for check in CHECKS]


@pytest.mark.parametrize("family, check", family_checks(), indirect=["family"], scope="module")
def test_client_check_on_both(family, check):
    """A client check on the original model, then on the converted one: the converted model's test
    is skipped only where the original fails the same check."""
    on_both(family, check)


@pytest.mark.parametrize("family", families(), indirect=True)
def test_converted_features_only_model_gets_the_classifier_sites(family):
    """A ``features_only`` net converted gets the SE blocks of the same network as a classifier, and
    the classifier's SE weights load into it (fine-tune the classifier, reuse it as a backbone)."""
    classifier = family.converted()
    features = family.converted(features_only=True)
    feature_modules = {name for name, _ in family.original(features_only=True).named_modules()}

    def in_features(path: str):  # timm's feature nets flatten top-level Sequentials: stages.0 -> stages_0
        for candidate in (path, path.replace(".", "_", 1)):
            if candidate in feature_modules:
                return candidate
        return None

    renamed = {}
    for se in se_blocks(classifier):
        block, _, leaf = se.rpartition(".")
        where = in_features(block)
        if where is not None:
            renamed[se] = f"{where}.{leaf}"
    assert se_blocks(features) == list(renamed.values())
    se_state = {renamed[se] + key[len(se):]: value for key, value in classifier.state_dict().items()
                for se in renamed if key.startswith(se + ".")}
    missing, unexpected = features.load_state_dict(se_state, strict=False)
    assert not unexpected
    assert set(se_state) >= {k for k in features.state_dict() if any(k.startswith(s + ".") for s in se_blocks(features))}


@pytest.mark.parametrize("name, kwargs", [("resnet18", {}), ("regnetx_002", {"features_only": True, "feature_cls": "fx"})],
                         ids=["resnet18", "regnetx_002-features-fx"])
def test_a_copy_of_a_converted_model_is_the_same_model(name, kwargs):
    """``copy.deepcopy`` (timm's ModelEma, DataParallel replicas, user code) and pickling keep the
    converted model as it is: module class names, public attributes (feature_info, pretrained_cfg),
    state_dict and outputs."""
    import pickle

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_inject.GraphModuleRootWarning)
        model = se_inject.apply(timm.create_model(name, **kwargs), example_inputs=randn((1, 3, 64, 64))).eval()

    def public(m: nn.Module) -> list[str]:
        # shape_env: fx's own bookkeeping, which deep-copying any GraphModule adds (timm's too)
        return sorted(k for k in vars(m) if not k.startswith("_") and k not in ("training", "meta", "shape_env"))

    x = randn((1, 3, 64, 64))
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert [(n, type(m).__name__, public(m)) for n, m in copied.named_modules()] == \
               [(n, type(m).__name__, public(m)) for n, m in model.named_modules()]
        assert list(copied.state_dict()) == list(model.state_dict())
        with torch.no_grad():
            a, b = model(x), copied.eval()(x)
        for u, v in zip(a if isinstance(a, (list, tuple)) else [a], b if isinstance(b, (list, tuple)) else [b]):
            torch.testing.assert_close(u, v)


# -- SEBlock itself: traceable and scriptable, same numerics and state_dict --------------------------

@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("identity", [False, True], ids=["gain1", "gain2"])
def test_se_block_traces_and_scripts(dims, identity):
    se = SEBlock(32, spatial_dims=dims)
    if identity:
        se.init_identity_()
        with torch.no_grad():
            se.fc1.weight.normal_()  # keep the gain buffer, leave the identity
            se.fc2.weight.normal_()
    se.eval()
    keys = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] + (["gain"] if identity else [])
    x = randn((2, 32) + (5,) * dims)
    with torch.no_grad():
        expected = se(x)
        gm = fx.symbolic_trace(se)
        torch.testing.assert_close(gm(x), expected)
        scripted = torch.jit.script(se)
        torch.testing.assert_close(scripted(x), expected)
    assert sorted(se.state_dict()) == sorted(keys)
    assert sorted(scripted.state_dict()) == sorted(keys)


# -- torchvision feature extraction (pytorch/vision test/test_backbone_utils.py) --------------------

TV_RETURN_NODES = {
    "resnet50": {"layer2": "c3", "layer3": "c4", "layer4": "c5"},
    "mobilenet_v2": {"features.6": "c3", "features.13": "c4", "features.17": "c5"},
}


def _tv_model(name: str, converted: bool) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    return se_inject.apply(model, example_inputs=randn((1, 3, 64, 64))).eval() if converted else model


@pytest.mark.parametrize("converted", [False, True], ids=["original", "converted"])
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_torchvision_create_feature_extractor(name, converted):
    """``create_feature_extractor(converted, return_nodes={'layer4': 'c5'})``: the features must be
    what those modules output in the model's own forward."""
    model = _tv_model(name, converted)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes == eval_nodes
    return_nodes = TV_RETURN_NODES[name]
    assert all(any(n.startswith(p + ".") for n in eval_nodes) for p in return_nodes)
    if converted:  # the SE blocks are nodes a user can ask for
        for se in se_blocks(model)[:3]:
            assert any(n == se or n.startswith(se + ".") for n in eval_nodes), se
    extractor = create_feature_extractor(model, return_nodes=return_nodes)
    x = randn((1, 3, 64, 64))
    seen = {}
    handles = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen.__setitem__(p, o))
               for p in return_nodes]
    with torch.no_grad():
        model(x)
        features = extractor(x)
    for h in handles:
        h.remove()
    assert list(features) == list(return_nodes.values())
    for path, key in return_nodes.items():
        torch.testing.assert_close(features[key], seen[path])


def _tv_return_nodes(model: nn.Module, k: int = 10) -> tuple[list[str], list[str]]:
    """torchvision's _get_return_nodes: 10 random nodes that return tensors."""
    random.seed(0)
    exclude = ["getitem", "floordiv", "size", "chunk", "_assert", "eq", "dim", "getattr"]
    train_nodes, eval_nodes = get_graph_node_names(model, suppress_diff_warning=True)
    train_nodes = [n for n in train_nodes if not any(x in n for x in exclude)]
    eval_nodes = [n for n in eval_nodes if not any(x in n for x in exclude)]
    return random.sample(train_nodes, k), random.sample(eval_nodes, k)


@pytest.mark.parametrize("script", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_feature_extractor_forward_backward(name, script):
    """torchvision's test_forward_backward / test_jit_forward_backward, on the converted model."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=1)
    model = se_inject.apply(model, example_inputs=randn((1, 3, 64, 64))).train()
    train_return_nodes, eval_return_nodes = _tv_return_nodes(model)
    extractor = create_feature_extractor(model, train_return_nodes=train_return_nodes,
                                         eval_return_nodes=eval_return_nodes, suppress_diff_warning=True)
    if script:
        extractor = torch.jit.script(extractor)
    out = extractor(randn((2, 3, 64, 64)))
    sum(o.mean() for o in out.values()).backward()


def test_torchvision_intermediate_layer_getter_and_fx_agree_on_a_converted_model():
    """torchvision's test_feature_extraction_methods_equivalence, on the converted resnet18."""
    from torchvision.models._utils import IntermediateLayerGetter

    model = _tv_model("resnet18", converted=True)
    return_layers = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}
    ilg_model = IntermediateLayerGetter(model, return_layers).eval()
    fx_model = create_feature_extractor(model, return_layers)
    for (n1, p1), (n2, p2) in zip(ilg_model.named_parameters(), fx_model.named_parameters()):
        assert n1 == n2 and p1.equal(p2)
    x = randn((1, 3, 64, 64))
    with torch.no_grad():
        ilg_out, fx_out = ilg_model(x), fx_model(x)
    assert list(ilg_out) == list(fx_out)
    for k in ilg_out:
        assert ilg_out[k].equal(fx_out[k])


def test_torchvision_fpn_backbone_on_a_converted_resnet():
    """Detection code takes backbones through IntermediateLayerGetter + FPN."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    model = _tv_model("resnet18", converted=True)
    backbone = BackboneWithFPN(model, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], 64).eval()
    with torch.no_grad():
        out = backbone(randn((1, 3, 64, 64)))
    assert list(out) == ["0", "1", "2", "pool"] and all(v.shape[1] == 64 for v in out.values())


# -- the activation after the add, which SE computes (fuse_residual=True) ---------------------------

def _act_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    tv = name.startswith("tv:")
    model = torchvision.models.get_model(name[3:], weights=None) if tv else timm.create_model(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)  # not timm's zero-init last BN: SE then sees real branches
    return model.eval()


# (model, the activation modules after the adds: their node names in a trace of the original)
ACT_NODES = [("resnet18", ["layer1.0.act2", "layer2.1.act2", "layer4.1.act2"]),
             ("tv:resnet18", ["layer1.0.relu_1", "layer3.0.relu_1", "layer4.1.relu_1"])]


@pytest.mark.parametrize("name, nodes", ACT_NODES, ids=[n for n, _ in ACT_NODES])
def test_a_feature_extractor_of_the_activations_after_the_adds_works_on_the_converted_model(name, nodes):
    """SE that does its add also computes the activation after it, yet traces of the converted model
    keep the activation's node: ``create_feature_extractor(model, ["layer1.0.act2"])`` finds
    ``layer1.0.act2`` (not "node 'layer1.0.act2' is not present"), with its name and its values."""
    model = _act_model(name)
    converted = se_inject.apply(model, example_inputs=randn((1, 3, 64, 64)), identity_init=True).eval()
    assert any(getattr(m, "out_act", "none") != "none" for m in converted.modules())  # the tail is fused
    original_nodes = get_graph_node_names(model)[1]
    converted_nodes = get_graph_node_names(converted)[1]
    act_nodes = [n for n in original_nodes if n.rsplit(".", 1)[-1].startswith(("act", "relu"))]
    assert set(nodes) <= set(act_nodes) and not set(act_nodes) - set(converted_nodes)
    x = randn((2, 3, 64, 64))
    with torch.no_grad():
        want = create_feature_extractor(model, return_nodes=nodes)(x)
        got = create_feature_extractor(converted, return_nodes=nodes)(x)
    assert list(got) == nodes
    for node in nodes:
        assert torch.equal(got[node], want[node]), node


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("name, nodes", ACT_NODES, ids=[n for n, _ in ACT_NODES])
def test_hooks_on_the_activation_after_the_add_fire_in_the_converted_model(name, nodes, inplace):
    """A forward hook on ``layer1[0].act2`` must fire, not just stay registered, though SE computes
    that activation. Hooks registered before apply (carried by the copy, or the caller's own modules
    with inplace=True) and after it fire with the inputs and outputs of the original; a pre-hook
    changing the input counts."""
    model = _act_model(name)
    path = nodes[0].removesuffix("_1")
    x = randn((2, 3, 64, 64))
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    record = lambda tag: lambda m, args, out: seen.append((tag, args[0].detach().clone(), out.detach().clone()))
    handle = model.get_submodule(path).register_forward_hook(record("before"))
    with torch.no_grad():
        expected = model(x)
    original, seen[:] = list(seen), []
    converted = se_inject.apply(model, example_inputs=x[:1], identity_init=True, inplace=inplace).eval()
    assert (converted is model) == inplace
    with torch.no_grad():
        out = converted(x)
    assert torch.equal(out, expected) and len(seen) == len(original) > 0
    for (_, a_in, a_out), (_, b_in, b_out) in zip(seen, original):
        assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)
    act = converted.get_submodule(path)
    handle.remove()  # removes the hook from the caller's module (with inplace=True, the converted one)
    act._forward_hooks.clear()
    seen.clear()
    late = act.register_forward_hook(record("after"))
    with torch.no_grad():
        converted(x)
    assert [tag for tag, *_ in seen] == ["after"] * len(original)
    late.remove()
    zeroed = act.register_forward_pre_hook(lambda m, args: (torch.zeros_like(args[0]),))
    with torch.no_grad():
        y = converted(x)
    zeroed.remove()
    model_again = _act_model(name)
    model_again.get_submodule(path).register_forward_pre_hook(lambda m, args: (torch.zeros_like(args[0]),))
    with torch.no_grad():
        assert torch.equal(y, model_again(x))
        seen.clear()
        assert torch.equal(converted(x), expected) and not seen


class _FunctionalTail(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + x)


def test_a_functional_activation_after_the_add_keeps_its_node_name():
    """A functional activation has no module SE could call under its path while fx traces, so SE does
    the add only and the activation stays in the block's graph: ``1.relu_1`` is still a node."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _FunctionalTail(), _FunctionalTail()).eval()
    converted = se_inject.apply(model, example_inputs=randn((1, 3, 16, 16)), identity_init=True).eval()
    assert [m.out_act for m in converted.modules() if isinstance(m, se_inject.SEResidual)] == ["none", "none"]
    nodes = ["1.relu_1", "2.relu_1"]
    assert set(nodes) <= set(get_graph_node_names(model)[1]) & set(get_graph_node_names(converted)[1])
    x = randn((2, 3, 16, 16))
    with torch.no_grad():
        want = create_feature_extractor(model, return_nodes=nodes)(x)
        got = create_feature_extractor(converted, return_nodes=nodes)(x)
    assert all(torch.equal(got[n], want[n]) for n in nodes)


def test_copies_of_a_converted_model_keep_se_pointing_at_their_own_activation_module():
    """SE keeps a reference to the activation it computes for, not a child; deepcopy and pickle must
    keep the two one module (a hook on the copy's act2 fires in the copy, not in the original)."""
    import pickle

    converted = se_inject.apply(_act_model("resnet18"), example_inputs=randn((1, 3, 64, 64)))
    for copied in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        fired = []
        copied.layer2[1].act2.register_forward_hook(lambda m, a, o: fired.append(1))
        with torch.no_grad():
            converted(randn((1, 3, 64, 64)))
            assert not fired
            copied(randn((1, 3, 64, 64)))
        assert fired == [1]
        assert copied.layer2[1].se._act_module is copied.layer2[1].act2
        assert sorted(copied.state_dict()) == sorted(converted.state_dict())


# -- deployment -------------------------------------------------------------------------------------

DEPLOY = ["resnet10t", pytest.param("mobilenetv2_100", marks=pytest.mark.slow),
          pytest.param("convnext_atto", marks=pytest.mark.slow)]


def _converted(name: str, **options) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    return se_inject.apply(model, example_inputs=randn((1, 3, 64, 64)), **options).eval()


@pytest.mark.parametrize("identity", [False, True], ids=["random-se", "identity-init"])
def test_torchscript_script_save_load(identity):
    model = _converted("resnet18", identity_init=identity)
    x = randn((2, 3, 64, 64))
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(scripted(x), expected)
        torch.testing.assert_close(loaded(x), expected)


def test_torchscript_trace():
    model = _converted("resnet10t", identity_init=True)
    with torch.no_grad():
        traced = torch.jit.trace(model, randn((1, 3, 64, 64)))
        x = torch.randn(3, 3, 64, 64)
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("name", DEPLOY)
def test_torch_export(name):
    model = _converted(name)
    batch = torch.export.Dim("batch", min=1, max=16)
    exported = torch.export.export(model, (randn((2, 3, 64, 64)),), dynamic_shapes=({0: batch},))
    module = exported.module()
    for n in (2, 3):
        x = torch.randn(n, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(module(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", DEPLOY)
def test_onnx_dynamo_export_runs_in_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _converted(name)
    x = randn((2, 3, 64, 64))
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)


# -- torch.compile and torch.export of whole torchvision models (slow) -----------------------------

MODELS = {
    "resnet18": torchvision.models.resnet18,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "convnext_tiny": torchvision.models.convnext_tiny,
}


@pytest.fixture
def _fresh_dynamo():
    """A clean dynamo cache before and after a compile test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_matches_eager(name):
    x = torch.randn(2, 3, 32, 32)
    model = se_inject.apply(MODELS[name](num_classes=10), example_inputs=x[:1]).eval()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.usefixtures("_fresh_dynamo")
def test_compiled_training_step_matches_eager_gradients():
    # float64: in float32, inductor's equally valid rounding flips a few BatchNorm/ReLU kinks of a
    # batch of 4 and moves some gradients by percents, which would hide a real error.
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    model = se_inject.apply(torchvision.models.resnet18(num_classes=10), example_inputs=x[:1].float())
    model = model.double().train()
    torch.compile(model, fullgraph=True)(x).square().mean().backward()
    compiled = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().mean().backward()
    assert any(".se." in n for n in compiled)
    for n, p in model.named_parameters():
        torch.testing.assert_close(compiled[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.slow
@pytest.mark.usefixtures("_fresh_dynamo")
def test_export_matches_eager():
    x = torch.randn(2, 3, 32, 32)
    model = se_inject.apply(torchvision.models.resnet18(num_classes=10), example_inputs=x[:1]).eval()
    exported = torch.export.export(model, (x,))
    assert any("se.fc1.weight" in name for name in exported.state_dict)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)
