"""Issue 11, items 2 to 7: the red-team repros, one test per class, each asserting what a demanding
user needs. Where the right answer is a clear error, the test asserts an ``SEInjectError`` with a
proposed message fragment; where the input can be supported, the test asserts that it works.

Run:  PYTHONPATH=$PWD python -m pytest -q tests/test_hardening.py -p no:cacheprovider
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import se_inject
from se_inject import OptionError, RecipeError, SEBlock, SEInjectError, VerificationError
from tests.client_helpers import (
    ROOT,
    assert_unchanged,
    full_snapshot,
    run_cli,
    se_blocks,
)
from tests.helpers import DlaLike, ResBlock, randomize_norms, small_resnet

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
X64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _proxies_in(module: nn.Module) -> list[str]:
    """Attributes of ``module`` and its children that hold torch.fx Proxies (directly or in lists)."""
    found = []
    for name, m in module.named_modules():
        for k, v in vars(m).items():
            values = v if isinstance(v, (list, tuple)) else [v]
            if any(isinstance(x, torch.fx.Proxy) for x in values):
                found.append(f"{name or '<root>'}.{k}")
    return found


# == 2. A block called with an extra argument ======================================================

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
    """The issue's repro: b1 is called with ``scale=0.5``, b2 with the default. Each converted block
    takes the arguments its module takes, computes what the module computes for the call the model
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
    must still accept the call its parent makes (today its GraphModule takes ``x`` only, so only
    the rewritten parent can call it; a user's own call or hook gets a TypeError)."""
    model = randomize_norms(DlaLike("tensor")).eval()
    converted = se_inject.apply(model, example_inputs=X32, identity_init=True).eval()
    assert "top.mid.se" in se_blocks(converted)
    h = model.stem(X32)
    with torch.no_grad():
        torch.testing.assert_close(converted.top.mid(h, h), model.top.mid(h, h))
        torch.testing.assert_close(converted.top.mid(h, shortcut=None), model.top.mid(h))


# == 3. Threads ======================================================================================

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


# == 4. Analysis never writes to the user's modules; inplace=True is transactional =================

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
    """MultiScaleRoIAlign caches ``scales`` / ``map_levels`` on first use; today tracing stores
    Proxies there: a fresh detector fails with a misleading ExampleInputError, and with
    inplace=True the user's detector is left broken (``roi_heads.box_roi_pool.scales`` a Proxy)."""
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


def test_a_hook_handle_taken_before_inplace_apply_still_removes_the_hook():
    model = torchvision.models.resnet18().eval()
    fired = []
    handle = model.layer1[0].register_forward_hook(lambda m, a, o: fired.append(1))
    se_inject.apply(model, example_inputs=X64, inplace=True)
    assert isinstance(model.layer1[0].se, SEBlock)
    with torch.no_grad():
        model(X64)
    assert fired == [1]
    handle.remove()
    with torch.no_grad():
        model(X64)
    assert fired == [1], "the hook still fires on the swapped block after handle.remove()"


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
    """Issue 23 row 6: a process-wide forward hook fired 190 times during one find_sites. Global
    forward, forward-pre and backward hooks must stay silent in the calling thread during apply /
    find_sites (not in other threads), and be back afterwards, also after a failed call, with
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


# == 5. Inputs se_inject does not support: clear errors, or it works =================================

def test_a_model_on_the_meta_device_is_refused_clearly():
    model = torchvision.models.resnet18().to("meta")
    types = [(n, type(m)) for n, m in model.named_modules()]
    for example in (None, torch.randn(1, 3, 64, 64, device="meta")):
        with pytest.raises(SEInjectError, match=r"meta"):
            se_inject.apply(model, example_inputs=example)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert all(p.is_meta for p in model.parameters())


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


def test_apply_under_inference_mode_returns_a_model_that_trains():
    model = torchvision.models.resnet18()
    with torch.inference_mode():
        converted = se_inject.apply(model, example_inputs=X64)
    assert not [n for n, p in converted.named_parameters() if p.is_inference()]
    assert not [n for n, b in converted.named_buffers() if b.is_inference()]
    converted.train()
    converted(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert all(p.grad is not None for p in converted.parameters())


def test_an_uninitialised_lazy_model_is_refused_clearly():
    model = nn.Sequential(nn.LazyConv2d(16, 3, padding=1), ResBlock(16, 16))
    with pytest.raises(SEInjectError, match=r"(?i)lazy") as info:
        se_inject.apply(model, example_inputs=X32)
    message = str(info.value)
    assert "LazyConv2d" in message and "forward" in message, message  # which module, and what to do
    assert "does not run on an example input" not in message, message
    assert isinstance(model[0], nn.LazyConv2d) and model[0].has_uninitialized_params()


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
    """rd_divisor=64 on 16- and 32-channel sites: today every SE gets 64 hidden units (4x and 2x
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


class CumSum(nn.Module):
    """An activation that is not applied unit by unit (mirrored units do not stay equal)."""

    def forward(self, x):
        return x.cumsum(-1)


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


# == 6. List (and dict) outputs ======================================================================

@pytest.mark.parametrize("output", ["tensor", "tuple", "list", "dict"])
def test_the_output_container_does_not_change_the_sites(output):
    """The same network returning a tensor, a tuple, a list or a dict gets the same SE sites, with no
    refused module (fx returns its own immutable list / dict, which is not a different structure)."""
    torch.manual_seed(0)
    reference = [s.name for s in se_inject.find_sites(DlaLike("tensor").eval(), example_inputs=X32).sites]
    assert reference == ["top.mid.se", "top.se"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = se_inject.find_sites(DlaLike(output).eval(), example_inputs=X32)
    assert [s.name for s in plan.sites] == reference
    assert not [w for w in caught if issubclass(w.category, se_inject.RefusedModuleWarning)]


@pytest.mark.parametrize("feature_cls", ["list", "dict"])
def test_a_features_only_model_gets_the_sites_of_the_classifier(feature_cls):
    """timm's dla34 as a feature extractor (a list or dict of maps) and as a classifier: the same
    SE sites, and the classifier's SE weights load into the feature extractor."""
    torch.manual_seed(0)
    classifier = se_inject.inject(timm.create_model("dla34"), example_inputs=X64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        features = se_inject.inject(timm.create_model("dla34", features_only=True, feature_cls=feature_cls),
                                    example_inputs=X64)
    assert not [str(w.message)[:200] for w in caught if issubclass(w.category, se_inject.RefusedModuleWarning)]
    assert [s.name for s in features.plan.sites] == [s.name for s in classifier.plan.sites]
    se_state = {k: v for k, v in classifier.model.state_dict().items() if ".se." in k}
    missing, unexpected = features.model.load_state_dict(se_state, strict=False)
    assert not unexpected and not [k for k in missing if ".se." in k]


# == 7. The CLI, save and load =======================================================================

SMALL = ["--input-size", "3", "64", "64"]


def _main(argv: list[str]) -> int:
    from se_inject.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize("name", ["efficientnet_b0", "ese_vovnet19b_dw"])
def test_sites_explains_a_model_without_sites(name, capsys):
    """The dry run exists for exactly this case: it must list what was skipped and why (or say the
    model has no adds at all), in text and in JSON; today it prints an error pointing at itself,
    and ``--json`` prints ``[]``."""
    plan = se_inject.find_sites(timm.create_model(name), example_inputs=torch.randn(1, 3, 64, 64))
    assert not plan.sites
    code = _main(["sites", name, *SMALL, "--json"])
    out = capsys.readouterr()
    assert code in (0, 1)
    data = json.loads(out.out)
    assert isinstance(data, dict) and data["model"] == name and data["sites"] == []
    assert [(s["name"], s["reason"]) for s in data["skipped"]] == [(s.name, s.reason) for s in plan.skipped]

    code = _main(["sites", name, *SMALL])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code in (0, 1)
    assert "lists them" not in text, text  # no pointing at itself
    for skip in plan.skipped:
        assert skip.name in text and skip.reason in text, (skip, text)
    if not plan.skipped:
        assert re.search(r"no (residual )?adds?", text), text


def _resnet10t_result(**kw):
    torch.manual_seed(0)
    return se_inject.inject(timm.create_model("resnet10t", **kw), example_inputs=X64)


@pytest.mark.parametrize("model_name, model_kwargs, message", [
    ("resnet1Ot", {}, r"resnet1Ot"),                      # not a timm model
    ("resnet18", {}, r"resnet18"),                        # a timm model, but not this one
    ("resnet10t", {"num_classes": 10}, r"num_classes|model_kwargs"),  # not how it was built
    ("resnet10t", {"no_such_kwarg": 1}, r"no_such_kwarg"),
], ids=["unknown-name", "other-model", "other-num-classes", "bad-kwarg"])
def test_save_checks_the_name_and_kwargs_before_writing(tmp_path, model_name, model_kwargs, message):
    result = _resnet10t_result()
    out = tmp_path / "saved"
    with pytest.raises(SEInjectError, match=message):
        se_inject.save(result, out, model_name=model_name, model_kwargs=model_kwargs)
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_a_failed_overwrite_keeps_the_previous_save(tmp_path, monkeypatch):
    """save(overwrite=True) fails after it has started writing (here: writing the recipe fails, as on
    a full disk). The previous save must still load, with its own weights: write beside, then
    rename. (Today the weights are replaced first, so the old recipe's checksum no longer matches.)"""
    out = tmp_path / "saved"
    torch.manual_seed(0)
    small = se_inject.inject(timm.create_model("test_resnet"), example_inputs=X64)
    se_inject.save(small, out, model_name="test_resnet")
    expected = {k: v.clone() for k, v in small.model.state_dict().items()}
    big = _resnet10t_result()

    def disk_full(real):
        def write(obj, *args, **kwargs):
            if isinstance(obj, dict) and "format_version" in obj:
                raise OSError(28, "No space left on device")
            return real(obj, *args, **kwargs)
        return write

    monkeypatch.setattr(json, "dumps", disk_full(json.dumps))
    monkeypatch.setattr(json, "dump", disk_full(json.dump))
    with pytest.raises(OSError, match="No space left"):
        se_inject.save(big, out, model_name="resnet10t", overwrite=True)
    monkeypatch.undo()
    loaded = se_inject.load(out)
    state = loaded.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


def test_a_bf16_model_loads_back_as_bf16(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t").to(torch.bfloat16)
    result = se_inject.inject(model, example_inputs=X64.to(torch.bfloat16))
    se_inject.save(result, tmp_path / "bf16", model_name="resnet10t")
    loaded = se_inject.load(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (k, a), b in zip(result.model.state_dict().items(), loaded.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k


def test_a_tampered_recipe_input_shape_is_refused_before_allocating(tmp_path):
    """example_input_shape [1, 3, 10**6, 10**6] asks for 12 TB: load must refuse the recipe
    (RecipeError naming the field), not try to allocate it (a RuntimeError from the allocator
    today; a shape a little smaller would take all the memory of the machine)."""
    result = _resnet10t_result()
    out = tmp_path / "saved"
    se_inject.save(result, out, model_name="resnet10t")
    recipe = json.loads((out / "recipe.json").read_text())
    recipe["example_input_shape"] = [1, 3, 10 ** 6, 10 ** 6]
    (out / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(RecipeError, match=r"example_input_shape"):
        se_inject.load(out)


def test_a_negative_input_size_is_a_one_line_usage_error():
    done = run_cli("sites", "resnet18", "--input-size", "3", "-5", "64")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "--input-size" in errors[0], done.stderr


def test_convert_out_pointing_at_a_file_fails_before_converting(tmp_path, monkeypatch, capsys):
    """``convert --out FILE``: one error line naming the file, exit status 1 or 2, no traceback, the
    file untouched, and no conversion first (today: a FileExistsError traceback after converting)."""
    import se_inject.cli

    target = tmp_path / "a_file"
    target.write_text("keep me")
    converted = []
    monkeypatch.setattr(se_inject.cli, "inject", lambda *a, **k: converted.append(1) or se_inject.inject(*a, **k))
    code = _main(["convert", "resnet10t", *SMALL, "--out", str(target)])  # an exception escaping fails here
    err = capsys.readouterr().err
    assert code in (1, 2), code
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and str(target) in errors[0], err
    assert target.read_text() == "keep me"
    assert not converted, "the model was converted before --out was checked"


def test_a_legacy_torch_save_state_dict_is_read(tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) writes the pre-1.6 format, which
    torch.load(weights_only=True) reads safely; a pickle that runs code must still be refused."""
    state = timm.create_model("resnet10t").state_dict()
    path = tmp_path / "legacy.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    read = se_inject.read_state_dict(path)
    assert list(read) == list(state) and all(torch.equal(read[k], v) for k, v in state.items())

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": Evil()}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(se_inject.CheckpointError):
        se_inject.read_state_dict(evil)


@pytest.mark.parametrize("args", [
    ["report", "resnet10t", *SMALL],
    ["sites", "hrnet_w18_small", *SMALL],
    ["report", "resnet10t", "efficientnet_b0", *SMALL],
    ["report", "resnet10t", *SMALL, "--include", "[red]layer9*"],
    ["report", "resnt10t"],
], ids=["report", "sites-skipped", "several-with-error", "error-echoing-user-text", "unknown-model"])
def test_cli_output_off_a_terminal_is_plain_text(args, monkeypatch, capsys):
    """Off a terminal (captured output), the CLI prints no ANSI escape codes, and text the user gave
    is printed as given, not read as rich markup ('[red]layer9*' must not become a red 'layer9*')."""
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    _main(list(args))
    out = capsys.readouterr()
    for stream in (out.out, out.err):
        assert "\x1b" not in stream, repr(stream[:500])
    if "--include" in args:
        assert "'[red]layer9*'" in out.err, out.err
