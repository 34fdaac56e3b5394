"""What apply leaves as it was: everything of the caller's but what it promises to change.

The caller's model, by value and by identity, when apply makes a copy; its hooks and their handles;
modules that cache on first use; with inplace=True, the whole model when the conversion fails
anywhere; torch's process-wide state (fx's patches under several threads, global module hooks); and
the caller's context: autocast, inference mode, an ambient default device.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import se_inject
from se_inject import NotAModuleError, OptionError, SEBlock, SEInjectError
from tests.client_helpers import ROOT, assert_unchanged, full_snapshot
from tests.helpers import ResBlock, assert_same_snapshot, randomize_norms, small_resnet, snapshot

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
X64_1 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # a batch of one


def _se_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if ".se." in n or n.startswith("se.")]


# -- the caller's model and its hooks --------------------------------------------------------------

def test_input_model_is_untouched_by_apply_and_find_sites():
    model = timm.create_model("resnet18").train()
    model.layer1[0].bn1.eval()  # a mixed train/eval state must survive too
    before = snapshot(model)
    se_inject.apply(model, identity_init=True)
    se_inject.find_sites(model)
    assert_same_snapshot(before, snapshot(model))


def test_user_hooks_do_not_run_during_apply_and_still_fire_after():
    model = torchvision.models.resnet18().eval()
    seen = []
    model.layer1[0].register_forward_hook(lambda m, i, o: seen.append(o * 2))  # even one that edits
    out = se_inject.apply(model)
    assert seen == []
    out(torch.randn(1, 3, 64, 64))
    assert [t.shape for t in seen] == [torch.Size([1, 64, 16, 16])]


def test_a_hook_handle_taken_before_inplace_apply_still_removes_the_hook():
    model = torchvision.models.resnet18().eval()
    fired = []
    handle = model.layer1[0].register_forward_hook(lambda m, a, o: fired.append(1))
    se_inject.apply(model, example_inputs=X64_1, inplace=True)
    assert isinstance(model.layer1[0].se, SEBlock)
    with torch.no_grad():
        model(X64_1)
    assert fired == [1]
    handle.remove()
    with torch.no_grad():
        model(X64_1)
    assert fired == [1], "the hook still fires on the swapped block after handle.remove()"


def _proxies_in(module: nn.Module) -> list[str]:
    """Attributes of ``module`` and its children that hold torch.fx Proxies (directly or in lists)."""
    found = []
    for name, m in module.named_modules():
        for k, v in vars(m).items():
            values = v if isinstance(v, (list, tuple)) else [v]
            if any(isinstance(x, torch.fx.Proxy) for x in values):
                found.append(f"{name or '<root>'}.{k}")
    return found


class CachingScale(nn.Module):
    """Caches a value on first use, as torchvision's MultiScaleRoIAlign caches ``scales``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = None

    def forward(self, x):
        if self.scale is None:
            self.scale = 1.0 / x.shape[-1]
        return x * self.scale


def _caching_model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), ResBlock(16, 16), CachingScale(),
                                         ResBlock(16, 16))).eval()


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_a_module_that_caches_on_first_use_is_converted_and_left_clean(inplace):
    model = _caching_model()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        expected = reference(X32)
    before = full_snapshot(model)
    result = se_inject.inject(model, example_inputs=X32, identity_init=True, inplace=inplace)
    assert [s.name for s in result.plan.sites] == ["1.se", "3.se"]
    if not inplace:
        assert_unchanged(before, model)
        assert model[2].scale is None
    assert not _proxies_in(result.model), _proxies_in(result.model)
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(X32), expected)


def _fresh_detector() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None).eval()


@pytest.mark.slow
def test_a_fresh_faster_rcnn_converts_like_a_warm_one():
    """MultiScaleRoIAlign caches ``scales`` / ``map_levels`` on first use. Tracing must not store
    Proxies there: a fresh detector would fail with a misleading ExampleInputError, and with
    inplace=True the user's detector would be left broken (``roi_heads.box_roi_pool.scales`` a
    Proxy)."""
    images = ([torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(0))],)
    warm = _fresh_detector()
    with torch.no_grad():
        warm(*images)
    expected_sites = [s.name for s in se_inject.find_sites(warm, example_inputs=images).sites]
    assert expected_sites

    fresh = _fresh_detector()
    before = full_snapshot(fresh)
    result = se_inject.inject(fresh, example_inputs=images)
    assert [s.name for s in result.plan.sites] == expected_sites
    assert fresh.roi_heads.box_roi_pool.scales is None and fresh.roi_heads.box_roi_pool.map_levels is None
    assert_unchanged(before, fresh)
    assert not _proxies_in(result.model), _proxies_in(result.model)[:5]
    with torch.no_grad():
        assert len(result.model.eval()(*images)) == 1

    fresh = _fresh_detector()
    result = se_inject.inject(fresh, example_inputs=images, inplace=True)
    assert result.model is fresh and [s.name for s in result.plan.sites] == expected_sites
    assert not _proxies_in(fresh), _proxies_in(fresh)[:5]
    with torch.no_grad():
        assert len(fresh(*images)) == 1


# -- inplace=True converts all or nothing ----------------------------------------------------------

class _Fault(RuntimeError):
    pass


class FlakyBlock(ResBlock):
    """A residual block whose forward raises on its n-th call (counted outside the module, so that
    counting does not change the module's attributes)."""

    calls = {"n": 0, "fail_at": 0}

    def forward(self, x):
        FlakyBlock.calls["n"] += 1
        if FlakyBlock.calls["n"] == FlakyBlock.calls["fail_at"]:
            raise _Fault(f"injected fault on call {FlakyBlock.calls['n']}")
        return super().forward(x)


def _flaky_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), ResBlock(16, 16), FlakyBlock(16, 32, stride=2),
                          nn.Sequential(ResBlock(32, 32), ResBlock(32, 32)))
    model = randomize_norms(model).train()
    model[3][0].eval()  # mixed training flags
    model.tag = "user attribute"
    return model


def _hooked(model: nn.Module) -> tuple[list[str], list]:
    fired: list[str] = []
    handles = [
        model[2].register_forward_hook(lambda m, a, o: fired.append("fwd")),
        model[3][1].register_forward_pre_hook(lambda m, a: fired.append("pre")),
        model.register_forward_hook(lambda m, a, o: fired.append("root")),
    ]
    return fired, handles


def _assert_transactional(model: nn.Module, before: dict, fired: list[str], handles: list) -> None:
    assert_unchanged(before, model)
    with torch.no_grad():
        model.eval()(X32)
    assert sorted(fired) == ["fwd", "pre", "root"], fired
    for h in handles:
        h.remove()
    fired.clear()
    with torch.no_grad():
        model(X32)
    assert fired == [], f"a hook handle taken before apply no longer removes its hook: {fired}"


def test_inplace_apply_is_transactional_when_a_forward_fails_during_analysis():
    """Fault injection: FlakyBlock raises on its k-th call, for every k that apply reaches. Whenever
    apply(inplace=True) fails, the model must be exactly as it was: modules, parameters, buffers,
    attributes, hooks (the handles still remove them) and training flags."""
    FlakyBlock.calls.update(n=0, fail_at=0)
    se_inject.apply(_flaky_model(), example_inputs=X32, inplace=True)
    total = FlakyBlock.calls["n"]
    assert total >= 2
    failed = 0
    for k in range(1, total + 1):
        model = _flaky_model()
        fired, handles = _hooked(model)
        before = full_snapshot(model)
        FlakyBlock.calls.update(n=0, fail_at=k)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                se_inject.apply(model, example_inputs=X32, inplace=True)
        except Exception:  # noqa: BLE001 - any failure must leave the model as it was
            failed += 1
            FlakyBlock.calls.update(fail_at=0)
            _assert_transactional(model, before, fired, handles)
    assert failed, "no injected fault made apply fail"


def test_inplace_apply_is_transactional_when_the_swap_fails():
    """Fault injection at the swap: a module-registration hook (a public torch API) raises on one of
    the last submodule registrations apply makes (the SE blocks going into the rewritten blocks and
    the rewritten blocks into the model). However far the swap got, a failed apply must leave the
    model exactly as it was."""
    from torch.nn.modules.module import register_module_module_registration_hook

    counter = {"n": 0, "fail_at": 0}

    def hook(module, name, submodule):
        counter["n"] += 1
        if counter["n"] == counter["fail_at"]:
            raise _Fault(f"injected fault on registration {counter['n']} ({name})")

    handle = register_module_module_registration_hook(hook)
    failed = 0
    try:
        FlakyBlock.calls.update(n=0, fail_at=0)
        probe = _flaky_model()
        counter.update(n=0)  # count what apply registers, not what building the model does
        se_inject.apply(probe, example_inputs=X32, inplace=True)
        total = counter["n"]
        assert total >= 6
        for k in range(total - 5, total + 1):
            model = _flaky_model()
            fired, handles = _hooked(model)
            before = full_snapshot(model)
            counter.update(n=0, fail_at=k)
            try:
                se_inject.apply(model, example_inputs=X32, inplace=True)
            except _Fault:
                failed += 1
                counter.update(fail_at=0)
                _assert_transactional(model, before, fired, handles)
            counter.update(fail_at=0)
    finally:
        handle.remove()
    assert failed, "no injected fault made apply fail"


# -- torch's process-wide state: fx's patches under threads, global module hooks -------------------

def test_apply_from_several_threads_at_once():
    """Six threads convert six models at once, three times over. Every conversion must succeed and
    give the plan a serial conversion gives, and torch's process-wide state must be as before: fx
    patches ``nn.Module.__call__`` / ``__getattr__`` while it traces, and a race can leave them
    patched for the rest of the process (so this runs in a subprocess of its own)."""
    code = ("import json; from tests.client_helpers import convert_in_threads; "
            "print('REPORT ' + json.dumps(convert_in_threads(rounds=3)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert all(report["serial"].values()), report["serial"]
    problems = {"hung": report["hung"], "failures": report["failures"][:4],
                "mismatches": report["mismatches"][:4],
                "left patched": [k for k, ok in report["globals_restored"].items() if not ok]}
    assert not any(problems.values()), problems


class SpawnsAForward(ResBlock):
    """Runs a small module's forward in another thread from inside its own forward: that thread's
    calls must keep their global hooks while se_inject's analysis runs this block."""

    other = nn.ReLU()

    def forward(self, x):
        import threading
        worker = threading.Thread(target=self.other, args=(torch.zeros(1),))
        worker.start()
        worker.join()
        return super().forward(x)


def _global_hooks(seen: list[str]) -> list:
    from torch.nn.modules import module as m
    return [m.register_module_forward_pre_hook(lambda mod, a: seen.append(f"pre {type(mod).__name__}")),
            m.register_module_forward_hook(lambda mod, a, o: seen.append(f"fwd {type(mod).__name__}")),
            m.register_module_forward_hook(lambda mod, a, k, o: seen.append(f"kw {type(mod).__name__}"),
                                           with_kwargs=True, always_call=True),
            m.register_module_full_backward_hook(lambda mod, gi, go: seen.append(f"bwd {type(mod).__name__}"))]


def test_global_module_hooks_do_not_run_during_the_analysis_and_are_restored_even_on_failure():
    """Global forward, forward-pre and backward hooks must stay silent in the calling thread during
    apply / find_sites (not in other threads; a process-wide forward hook would otherwise fire
    some 190 times during one find_sites), and be back afterwards, also after a failed call, with
    handles that still remove them."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), SpawnsAForward(16, 16), ResBlock(16, 16)).eval()
    seen: list[str] = []
    handles = _global_hooks(seen)
    try:
        plan = se_inject.find_sites(model, example_inputs=X32)
        assert [s.name for s in plan.sites] == ["1.se", "2.se"]
        out = se_inject.apply(model, example_inputs=X32, identity_init=True)
        assert sorted(set(seen)) == ["fwd ReLU", "kw ReLU", "pre ReLU"], seen  # only the other thread's calls
        with pytest.raises(OptionError, match="include pattern"):  # fails after the analysis
            se_inject.apply(model, example_inputs=X32, include=["nowhere.*"])
        with pytest.raises(SEInjectError):  # fails inside the analysis
            se_inject.find_sites(model, example_inputs=torch.randn(2, 5, 32, 32))
        seen.clear()
        with torch.no_grad():
            out(X32)
        se = type(out[1].se).__name__
        assert {f"pre {se}", f"fwd {se}", f"kw {se}", "fwd Sequential"} <= set(seen), seen
        seen.clear()
        model(X32).sum().backward()  # (SE's in-place ReLU, like any, cannot take a full backward hook)
        assert {"fwd ResBlock", "bwd ResBlock", "bwd Conv2d"} <= set(seen), seen
    finally:
        for h in handles:
            h.remove()
    seen.clear()
    out(X32)
    model(X32).sum().backward()
    assert seen == []


def test_global_registration_hooks_still_see_the_se_blocks_built():
    """The registration hooks are left alone: the SE blocks installed are built during the analysis,
    and a hook that acts on every new parameter (device placement, say) must see theirs."""
    from torch.nn.modules.module import register_module_parameter_registration_hook
    seen: list[str] = []
    handle = register_module_parameter_registration_hook(lambda mod, name, p: seen.append(type(mod).__name__))
    try:
        se_inject.apply(nn.Sequential(nn.Conv2d(3, 16, 1), ResBlock(16, 16)).eval(), example_inputs=X32)
    finally:
        handle.remove()
    assert "Conv2d" in seen  # SE's fc1 and fc2 are 1x1 convs


# -- autocast and inference mode -------------------------------------------------------------------

@pytest.mark.parametrize("identity_init", [True, False])
def test_apply_inside_autocast_builds_se_in_the_models_dtype(identity_init):
    """The analysis runs without the caller's ``torch.autocast``: SE is float32 in a float32 model,
    and the model runs both ways. (Under autocast the options probe would refuse identity init in
    bfloat16, and SE blocks built in bfloat16 would fail outside autocast.)"""
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


def test_apply_under_inference_mode_returns_a_model_that_trains():
    model = torchvision.models.resnet18()
    with torch.inference_mode():
        converted = se_inject.apply(model, example_inputs=X64_1)
    assert not [n for n, p in converted.named_parameters() if p.is_inference()]
    assert not [n for n, b in converted.named_buffers() if b.is_inference()]
    converted.train()
    converted(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert all(p.grad is not None for p in converted.parameters())


# -- an ambient default device ---------------------------------------------------------------------

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
    """Under ``with torch.device("meta")`` SE blocks go on the model's device. se_inject's own
    tensors made on the meta device would give raw RuntimeErrors ("Tensor.item() cannot be called
    on meta tensors" from the options probe, or "Cannot copy out of meta tensor")."""
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
