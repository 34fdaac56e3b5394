"""How se_inject traces a model to find its blocks.

The deep scope search on small hand-written models: containers, options baked in, modules whose own
code fx cannot follow made leaves, opaque leaves' channel dims, and what the rest of the pipeline
does with such scopes; untraceable roots that fall back to their children, and timm's no-trace
leaves; and the pieces under it: the tracer, scope discovery, shape propagation, the call recorder.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import pytest
import timm
import torch
from timm.layers import StdConv2d
from torch import fx, nn

import se_inject
from se_inject import GraphModuleRootWarning, SEBlock
from se_inject.trace.record import outputs_match, record_calls, recording
from se_inject.trace.scopes import propagate_shapes
from se_inject.trace.search import discover_scopes, runnable_scopes
from se_inject.trace.specialize import trace_as
from se_inject.trace.tracer import SETracer, trace
from se_inject.trace.train_mode import _reads_training
from tests.helpers import ResBlock

X = torch.randn(2, 3, 16, 16)
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# -- the deep scope search -------------------------------------------------------------------------

class TFPadConv(nn.Module):
    """A conv whose padding is computed with int() of the input size, as HF's MobileNetV2ConvLayer."""

    def __init__(self, cin: int, cout: int, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = int(x.shape[-1]) % 2 + 1  # fx cannot follow int() of a size
        return self.act(self.bn(self.conv(nn.functional.pad(x, (pad, 2 - pad, pad, 2 - pad)))))


class PadBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = TFPadConv(c, c)
        self.conv2 = TFPadConv(c, c, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class Checked(nn.Module):
    """Control flow on a size, as HF's embeddings check their channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError("wrong channel count")
        return self.conv(x)


@dataclass
class Output:
    last: torch.Tensor
    hidden: Optional[tuple] = None


def decorated(forward):
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):  # what transformers' decorators look like to fx
        return forward(self, *args, **kwargs)

    return wrapper


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList([ResBlock(16, 16), nn.Sequential(PadBlock(16), PadBlock(16))])

    @decorated
    def forward(self, x: torch.Tensor, output_hidden: bool = False) -> tuple:
        hidden = () if output_hidden else None
        for stage in self.stages:
            x = stage(x)
            if output_hidden:
                hidden = hidden + (x,)
        return x, hidden


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = Checked()
        self.encoder = Encoder()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, output_hidden: Optional[bool] = None) -> Output:
        x, hidden = self.encoder(self.embed(x), output_hidden=bool(output_hidden))
        return Output(self.head(x.mean((2, 3))), hidden)


def test_the_search_reaches_every_block_and_lists_only_modules_whose_own_code_fx_cannot_follow():
    model = Model().eval()
    scopes, untraceable, _ = runnable_scopes(model, (X,))
    assert scopes[0].path == "" and scopes[0].specialised and scopes[0].faithful
    convs = {f"encoder.stages.1.{i}.conv{j}" for i in (0, 1) for j in (1, 2)}
    assert {u.path for u in untraceable} == {"embed"} | convs
    for u in untraceable:  # each one fails even with its children kept whole: its own code is the problem
        module = model.get_submodule(u.path)
        try:
            trace_as(module, list(module.children()))
        except Exception:
            continue
        raise AssertionError(f"{u.path} traces with its children as leaves")


def test_blocks_behind_containers_options_and_opaque_layers_get_se_and_the_model_keeps_its_class():
    model = Model().eval()
    result = se_inject.inject(model, example_inputs=X, identity_init=True)
    assert [s.name for s in result.plan.sites] == [
        "encoder.stages.0.se", "encoder.stages.1.0.se", "encoder.stages.1.1.se"]
    assert type(result.model) is Model and type(result.model.encoder) is Encoder
    with torch.no_grad():
        for flag in (None, True):
            expected, got = model(X, output_hidden=flag), result.model.eval()(X, output_hidden=flag)
            assert type(got) is Output
            torch.testing.assert_close(got.last, expected.last)
    assert len(got.hidden) == 2  # the options still work: only blocks were swapped


def test_an_opaque_leaf_channel_dim_is_proven_from_the_forward():
    block = nn.Sequential(nn.Conv2d(3, 8, 1), PadBlock(8)).eval()
    plan = se_inject.find_sites(block, example_inputs=X)
    assert [s.name for s in plan.sites] == ["1.se"] and plan.sites[0].channels == 8


def test_record_calls_keeps_options_not_tensors():
    model = Model().eval()
    recording = record_calls(model, (X,))
    call = recording.get(model.encoder)
    assert call.tensor_names == ["x"] and call.options == {"output_hidden": False} and call.passed == 2
    assert all(value is None for _, value, _, is_tensor in call.arguments if is_tensor)
    assert isinstance(recording.output, Output)


def test_a_traced_dataclass_output_keeps_its_class():
    class Returns(nn.Module):
        def forward(self, x):
            return Output(x * 2)

    gm = trace_as(Returns())
    assert type(gm(X)) is Output


def test_a_block_called_with_options_is_left_alone():
    class Optioned(ResBlock):
        def forward(self, x, scale: float = 1.0):
            return super().forward(x) * scale

    class Caller(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Optioned(3, 3)

        def forward(self, x, scale: Optional[float] = None):
            if scale is not None and scale < 0:
                raise ValueError
            return self.block(x, scale=1.0 if scale is None else scale)

    model = Caller().eval()
    plan = se_inject.find_sites(model, example_inputs=X)
    assert not plan.sites and [s.reason for s in plan.skipped] == ["untraceable-block"]


class DropPathLike(nn.Module):
    """A Hugging Face style drop-path: nothing at all in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1) >= self.drop_prob
        return x * keep / (1 - self.drop_prob)


class DropBlockPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop_path = DropPathLike(0.5)

    def forward(self, x):
        return x + self.drop_path(torch.relu(self.conv(x)))


def test_a_hugging_face_style_drop_path_stays_a_module_and_keeps_its_train_behaviour():
    DropPathLike.__name__ = "MyDropPath"  # HF names them <Model>DropPath
    try:
        with pytest.warns(GraphModuleRootWarning):
            model = se_inject.apply(DropBlockPath().eval(), example_inputs=X)
    finally:
        DropPathLike.__name__ = "DropPathLike"
    calls = [n.target for n in model.graph.nodes if n.op == "call_module"]
    assert calls.index("se") < calls.index("drop_path")  # SE before the drop path, as timm's SE-ResNets
    model.train()
    torch.manual_seed(0)
    outputs = {tuple(model(torch.ones(8, 3, 4, 4)).flatten()[:8].tolist()) for _ in range(4)}
    assert len(outputs) > 1


def test_a_module_that_computes_nothing_in_eval_mode_but_reads_training_is_seen():
    # Not named like a drop path: traced inline, it emits no node in eval mode; the train-mode
    # check must still look at it, and the graphs differ.
    plan = se_inject.find_sites(DropBlockPath().eval(), example_inputs=X)
    assert not plan.sites and [s.reason for s in plan.skipped] == ["train-eval-differ"]


def test_training_in_a_comment_is_not_code():
    class Commented(nn.Module):
        def forward(self, x):  # useful for training neural nets
            """Not in training mode either."""
            return x

    class Reads(nn.Module):
        def forward(self, x):
            return x * 2 if self.training else x

    assert not _reads_training(Commented) and _reads_training(Reads)


def test_fx_graph_of_a_specialised_scope_takes_only_its_tensors():
    model = Model().eval()
    call = record_calls(model, (X,)).get(model.encoder)
    gm = trace_as(model.encoder, [m for m in model.modules() if isinstance(m, TFPadConv)], call)
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x"] and isinstance(gm, fx.GraphModule)
    assert type(model.encoder) is Encoder  # the shim is gone


# -- untraceable roots fall back to their children; timm's no-trace leaves -------------------------

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


# -- the tracer ------------------------------------------------------------------------------------

def test_tracer_keeps_convs_norms_and_timm_layers_as_leaves():
    model = nn.Sequential(StdConv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    gm = trace(model)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "call_module", "output"]
    assert all("nn_module_stack" in n.meta for n in gm.graph.nodes if n.op == "call_module")


def test_tracer_extra_leaves_are_kept_whole():
    block = ResBlock(8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), block)
    tracer = SETracer(extra_leaves=[block])
    graph = tracer.trace(model)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["0", "1"]


# -- scopes, shapes and the call recorder ----------------------------------------------------------

class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(ResBlock(8, 8), ResBlock(8, 8))

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = x * 1.0
        return self.blocks(x)


def test_discover_scopes_falls_back_to_children():
    scopes, untraceable = discover_scopes(Untraceable())
    assert [s.path for s in scopes] == ["blocks"]
    assert [u.path for u in untraceable] == [""] and "TraceError" in untraceable[0].error


def test_propagate_shapes_records_inputs_calls_and_faithfulness():
    model = Untraceable().eval()
    scopes, _ = discover_scopes(model)
    _, failed = propagate_shapes(model, scopes, (X,))
    (scope,) = scopes
    assert failed == [] and scope.calls == 1 and scope.faithful and scope.batch_size == 2
    assert scope.args[0].shape == (2, 8, 16, 16)
    shapes = {n.target: tuple(n.meta["tensor_meta"].shape) for n in scope.gm.graph.nodes if n.op == "call_module"}
    assert shapes["0.conv1"] == shapes["1.bn2"] == (2, 8, 16, 16)


def test_runnable_scopes_skips_the_children_of_nothing_and_reports_the_root():
    scopes, untraceable, output = runnable_scopes(Untraceable().eval(), (X,))
    assert [s.path for s in scopes] == ["blocks"] and output.shape == (2, 8, 16, 16)


def test_recording_keeps_first_call_clones_and_removes_its_hooks():
    relu = nn.ReLU()
    model = nn.Sequential(relu, relu)
    with recording([relu]) as calls:
        model(torch.tensor([-1.0, 2.0]))
    call = calls[id(relu)]
    assert call.count == 2 and torch.equal(call.args[0], torch.tensor([-1.0, 2.0]))
    assert torch.equal(call.output, torch.tensor([0.0, 2.0]))
    assert not relu._forward_hooks and not relu._forward_pre_hooks


def test_outputs_match_reports_structure_shape_and_value_differences():
    t = torch.ones(2)
    assert outputs_match((t, t), (t, t.clone())) is None
    assert outputs_match((t,), [t]) == "the output structure differs"
    assert outputs_match(t, torch.ones(3)) == "an output shape differs"
    assert outputs_match(t, t + 1) == "max |difference| 1"
