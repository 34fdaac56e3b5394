"""SE blocks running the fused op inside converted models: the same outputs and gradients as the
plain path, with the add (in place or not) and the activation the block took over.

The Triton kernels run on CPU tensors through Triton's interpreter, in a subprocess started with
TRITON_INTERPRET=1 (it must be set before Triton decorates the kernels); the parent compares.
"""

from __future__ import annotations

import pytest
import torch

import se_inject
from se_inject import SEBlock, SEResidual
from tests.helpers import randomize_norms, small_resnet
from tests.test_fused import python

SPELLINGS = ("plus", "iadd", "add_")


def _convert(spelling: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_norms(small_resnet(spelling=spelling))
    x = torch.randn(2, 3, 8, 8)
    return se_inject.apply(model, example_inputs=x[:1]), x


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if ".se." in n}


def _fused_worker(path: str) -> None:
    """In the TRITON_INTERPRET=1 subprocess: each spelling, fused, with the op's calls counted."""
    from se_inject.modules import se_block

    fused = se_block._load_fused()
    assert fused.INTERPRETED
    calls = {"n": 0}
    real = fused.se_residual

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    fused.se_residual = counted
    results = {}
    for spelling in SPELLINGS:
        model, x = _convert(spelling)
        se_inject.set_kernels(model.train(), "fused")
        calls["n"] = 0
        results[spelling] = (*_run(model, x), calls["n"])
    torch.save(results, path)


@pytest.fixture(scope="module")
def fused_results(tmp_path_factory) -> dict:
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("fused-model") / "results.pt"
    done = python(f"from tests.test_fused_model import _fused_worker; _fused_worker({str(path)!r})",
                  TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr[-6000:]
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_fused_se_in_a_model_matches_the_plain_path(fused_results, spelling):
    model, x = _convert(spelling)
    se_inject.set_kernels(model.train(), "plain")
    out, grads = _run(model, x)
    fused_out, fused_grads, calls = fused_results[spelling]
    assert calls == 3  # every SE block ran the fused op
    torch.testing.assert_close(fused_out, out, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == grads.keys() and len(grads) == 12
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_se_takes_over_the_add_and_the_relu(spelling):
    """fx records ``out += x`` as an out-of-place add; ``out.add_(x); relu(out)`` adds in place and
    its ReLU reads ``out``, not the add, so that ReLU stays (reading what SE returns)."""
    model, _ = _convert(spelling)
    for i in (1, 2, 3):
        se, graph = model[i].se, model[i].graph
        assert type(se) is SEResidual and se.add_in_place is (spelling == "add_")
        assert se.out_act == ("none" if spelling == "add_" else "relu")
        node = next(n for n in graph.nodes if n.target == "se")
        branch, shortcut = node.args
        assert branch.target == "bn2" and (shortcut.op == "placeholder" or shortcut.target == "downsample.1")
        relus_after = [n for n in graph.nodes if n.op == "call_module" and n.target == "relu" and n.args[0] is node]
        assert len(relus_after) == (1 if spelling == "add_" else 0)


def test_without_fusion_se_stays_before_the_add():
    torch.manual_seed(0)
    model = se_inject.apply(small_resnet(), example_inputs=torch.randn(1, 3, 8, 8), fuse_residual=False)
    assert type(model[1].se) is SEBlock
    assert "self.se(" in model[1].code and " + " in model[1].code


def test_plain_kernels_are_the_default_off_cuda():
    model, x = _convert("plus")
    assert {m.kernels for m in model.modules() if isinstance(m, SEBlock)} == {"auto"}
    with torch.no_grad():
        auto = model.eval()(x)
        plain = se_inject.set_kernels(model, "plain")(x)
    assert torch.equal(auto, plain)  # on CPU "auto" runs exactly the plain torch ops


@pytest.mark.parametrize("add_in_place", [False, True])
@pytest.mark.parametrize("out_act", ["relu", "silu"])
def test_the_compiled_tail_matches_eager(add_in_place, out_act):
    # Eager runs the tail as one addcmul; under torch.compile it is written as the original add
    # (x * g, then the add) so inductor plans buffers as for the original model. Same values,
    # gradients and dtypes either way, a bf16 branch with an fp32 shortcut (autocast) included.
    torch.manual_seed(0)
    se = SEResidual(16, out_act=out_act, add_in_place=add_in_place).to(torch.bfloat16)
    compiled = torch.compile(se, fullgraph=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 16, 5, 5, dtype=dtype).to(torch.bfloat16).requires_grad_()
        shortcut = torch.randn(2, 16, 5, 5, dtype=dtype, requires_grad=True)
        results = []
        for run in (se, compiled):
            out = run(x, shortcut)
            out.float().sum().backward()
            results.append((out.detach(), x.grad, shortcut.grad))
            x.grad = shortcut.grad = None
        (eager, dx, dsc), (comp, cdx, cdsc) = results
        expected_dtype = torch.bfloat16 if add_in_place else torch.promote_types(torch.bfloat16, dtype)
        assert eager.dtype == comp.dtype == expected_dtype
        assert dsc.dtype == cdsc.dtype == dtype
        for a, b in ((eager, comp), (dx, cdx), (dsc, cdsc)):
            torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


_BUILT_ON_CUDA = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from se_inject import SEResidual
from se_inject.modules import se_block

def ops_compiled(se, x):
    graphs = []
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm
    torch._dynamo.reset()
    torch.compile(se, backend=backend, fullgraph=True)(x, x)
    return [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]

with FakeTensorMode():  # CUDA tensors without a GPU: compiled, never run
    x = torch.empty(2, 16, 5, 5, device="cuda")
    fused = SEResidual(16, out_act="relu", kernels="fused", device="cuda")
    auto = SEResidual(16, out_act="relu", device="cuda")
    print(repr((se_block._FUSED is not None, ops_compiled(fused, x), ops_compiled(auto, x))))
"""


def test_a_block_built_on_cuda_runs_the_fused_op_when_its_first_call_is_compiled():
    """No ``.to()`` (so ``_apply`` never ran) and a compiled first call: the fused package must be
    imported before dynamo traces (it cannot import while tracing), or "fused" silently runs
    plain ops. "auto" runs the plain ops under compile, as documented."""
    pytest.importorskip("triton")
    done = python(_BUILT_ON_CUDA)
    assert done.returncode == 0, done.stderr[-4000:]
    loaded, fused_ops, auto_ops = eval(done.stdout.strip().splitlines()[-1])
    assert loaded
    assert fused_ops == ["se_inject.se_residual.default", "<built-in function getitem>"]
    assert not [op for op in auto_ops if "se_inject" in op] and "<built-in function linear>" in auto_ops
