"""What the caller's context must not change (issue 22 rows 7, 8 and 11): apply called inside an
autocast region or under an ambient default device builds SE on the model's device and in its
dtype, and wrappers (torch.compile, DataParallel, DistributedDataParallel, FSDP) are refused by
class with what to do.

Run:  PYTHONPATH=$PWD python -m pytest -q tests/test_caller_context.py -p no:cacheprovider
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

import se_inject
from se_inject import NotAModuleError, SEBlock, SEInjectError
from tests.client_helpers import assert_unchanged, full_snapshot
from tests.helpers import randomize_norms, small_resnet
from tests.test_hardening import process_group  # noqa: F401 (a fixture: a single-process gloo group)

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _se_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if ".se." in n or n.startswith("se.")]


# -- autocast -------------------------------------------------------------------------------------

@pytest.mark.parametrize("identity_init", [True, False])
def test_apply_inside_autocast_builds_se_in_the_models_dtype(identity_init):
    """Issue 22 row 7: inside ``torch.autocast`` identity init was refused (the options probe ran in
    bfloat16), and SE blocks were built in bfloat16 inside a float32 model, which then failed outside
    autocast. The analysis runs without autocast: SE is float32, the model runs both ways."""
    model = randomize_norms(timm.create_model("resnet18", num_classes=5)).eval()
    with torch.no_grad():
        expected = model(X64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = se_inject.inject(model, example_inputs=X64[:1], identity_init=identity_init)
        assert torch.is_autocast_enabled("cpu")  # the caller's region is given back
    assert result.plan.sites and all(s.shape[0] == 1 for s in result.plan.sites)
    params = _se_params(result.model)
    assert len(params) == 8 * 4 and {p.dtype for _, p in params} == {torch.float32}
    with torch.no_grad():
        out = result.model.eval()(X64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert result.model(X64).dtype == torch.bfloat16
    assert out.dtype == torch.float32
    if identity_init:
        assert torch.equal(out, expected)


# -- ambient default device -----------------------------------------------------------------------

@pytest.fixture
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _hf_resnet() -> nn.Module:
    transformers, config = _hf_resnet_config()
    torch.manual_seed(0)
    return transformers.ResNetModel(config)


@pytest.mark.parametrize("identity_init", [True, False])
@pytest.mark.parametrize("how", ["with torch.device", "set_default_device"])
@pytest.mark.parametrize("make, x, sites", [(small_resnet, X32, 3), (_hf_resnet, X64[:1], 5)],
                         ids=["small", "hf-resnet"])
def test_a_cpu_model_converts_under_an_ambient_meta_device(make, x, sites, identity_init, how, request):
    """Issue 22 row 11: under ``with torch.device("meta")`` se_inject made its own tensors on the
    meta device: a raw RuntimeError from the options probe ("Tensor.item() cannot be called on meta
    tensors"), or "Cannot copy out of meta tensor". SE blocks go on the model's device."""
    model = randomize_norms(make()).eval()
    with torch.no_grad():
        expected = model(x)
    if how == "set_default_device":
        request.getfixturevalue("default_device_meta")
        converted = se_inject.apply(model, example_inputs=x, identity_init=identity_init)
        assert torch.zeros(1).is_meta  # the caller's default device is given back
        torch.set_default_device(None)
    else:
        with torch.device("meta"):
            converted = se_inject.apply(model, example_inputs=x, identity_init=identity_init)
            assert torch.zeros(1).is_meta
    assert not any(t.is_meta for t in (*converted.parameters(), *converted.buffers()))
    assert len(_se_params(converted)) == sites * 4
    with torch.no_grad():
        out = converted.eval()(x)
    if identity_init:
        out, expected = getattr(out, "last_hidden_state", out), getattr(expected, "last_hidden_state", expected)
        assert torch.equal(out, expected)


def _hf_resnet_config():
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.ResNetConfig(embeddings_size=10, hidden_sizes=[10, 20, 30, 40],
                                                   depths=[1, 1, 2, 1])


@pytest.mark.parametrize("identity_init", [True, False])
def test_a_model_built_inside_a_meta_device_context_is_refused_with_an_se_inject_error(identity_init):
    """transformers builds models inside ``torch.device("meta")`` (its own tests do too): apply on such
    a model, inside or outside the context, is the meta refusal, never a raw torch error."""
    transformers, config = _hf_resnet_config()
    x = torch.randn(1, 3, 64, 64)
    with torch.device("meta"):
        inside = transformers.ResNetModel(config)
        for example in (x.to("meta"), None):
            with pytest.raises(NotAModuleError, match="meta device"):
                se_inject.apply(inside, example_inputs=example, identity_init=identity_init)
    with pytest.raises(NotAModuleError, match="meta device"):
        se_inject.apply(inside, example_inputs=x.to("meta"), identity_init=identity_init)
    with torch.device("meta"):  # a real model applied inside the context works
        real = transformers.ResNetModel(config).to_empty(device="cpu")
        with torch.no_grad():
            for p in real.parameters():
                p.normal_(0, 0.1)
        for b in real.buffers():
            b.zero_() if b.is_floating_point() else None
        for m in real.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.fill_(1.0)
        converted = se_inject.apply(real.eval(), example_inputs=x, identity_init=identity_init)
    assert not any(t.is_meta for t in converted.parameters()) and _se_params(converted)
    with torch.no_grad():
        out, ref = converted.eval()(x).last_hidden_state, real(x).last_hidden_state
    if identity_init:
        assert torch.equal(out, ref)


# -- wrappers -------------------------------------------------------------------------------------

def test_a_compiled_model_is_refused_with_orig_mod():
    """Issue 22 row 8: a torch.compile'd model got no SE and a warning that it has no residual add."""
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
    """A subclass of DistributedDataParallel passed the old check by class name, and its reducer did
    not see the new SE parameters. FSDP2's fully_shard changes the module's class in place."""
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
