"""Unit tests of the layers under the API: the graph index, the insert pass, the tracer, scopes,
block extraction and the call recorder, each on small hand-written modules."""

from __future__ import annotations

import pytest
import torch
from timm.layers import StdConv2d
from torch import fx, nn

from se_inject.rewrite.cut import Candidate, build_blocks
from se_inject.trace.record import outputs_match, recording
from se_inject.sites.graph_index import GraphIndex
from se_inject.rewrite.insert_pass import InsertionPoint, free_attribute_name, insert_modules
from se_inject.trace.scopes import ShapeRecorder, propagate_shapes
from se_inject.trace.search import discover_scopes, runnable_scopes
from se_inject.sites.classify import ResidualAdd, classify_adds
from se_inject.rewrite.rewritten import graph_module_like
from se_inject.trace.tracer import SETracer, trace
from tests.helpers import ResBlock, upstream

X = torch.randn(2, 3, 16, 16)


# -- graph index ------------------------------------------------------------------------------

def test_graph_index_ancestors_agree_with_a_plain_walk():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 16, 1), ResBlock(16, 16), ResBlock(16, 32, stride=2)))
    index = GraphIndex(gm)
    for a in index.nodes:
        for b in index.nodes:
            assert index.reaches(a, b) == (a in upstream(b)), (a.name, b.name)


def test_graph_index_tells_data_from_parameters():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.w + self.w

    index = GraphIndex(fx.symbolic_trace(M()))
    assert {n.name: index.is_data[n] for n in index.nodes} == {
        "x": True, "w": False, "mul": True, "add": True, "output": True}


# -- the insert pass --------------------------------------------------------------------------

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


# -- the tracer -------------------------------------------------------------------------------

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


# -- scopes and shapes ------------------------------------------------------------------------

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


# -- capture and comparison -------------------------------------------------------------------

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


# -- block extraction -------------------------------------------------------------------------

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
