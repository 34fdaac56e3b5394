"""The fused SE op (se_inject.fused): its Triton kernels, its autograd formula, compile and export.

The Triton kernels run on CPU tensors through Triton's interpreter, in one subprocess started with
TRITON_INTERPRET=1 (the variable must be set before ``triton.jit`` decorates the kernels, and must
not leak into other test files): it saves inputs, outputs and gradients, and the tests here compare
them with the plain-torch reference. Everything else runs in this process on the op's CPU path.

Tolerances, relative to the reference's largest magnitude: 1e-5 for fp32 results, 2e-2 for bf16
and 4e-3 for fp16. The kernels compute in fp32 and round once per stored tensor, but a
low-precision dx goes through two roundings (dz, stored between K1 and K2, then dx), and
``dx = dz * g + ds / S`` can cancel, so its error is relative to the larger ``dz * g``.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch
from torch import nn

import se_inject.fused as fused
from se_inject.fused import _common, _plan, backward, scale, squeeze
from se_inject.fused.se_residual import se_residual_op
from se_inject.layers import ACT_LAYERS, GATE_LAYERS
from se_inject.modules.se_block import SEBlock

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ("x", "shortcut", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-12}


class Case(NamedTuple):
    name: str
    shape: tuple
    layout: str = "contiguous"  # contiguous | channels_last | sliced | permuted
    dtype: torch.dtype = torch.float32
    sc_dtype: Optional[torch.dtype] = torch.float32  # None: no shortcut
    sc_layout: str = "same"
    out_act: str = "relu"
    act: str = "relu"
    gate: str = "sigmoid"
    gain: Optional[float] = 2.0
    grad: str = "randn"  # randn | sum (an expanded, all-strides-0 gradient)
    in_place: bool = False  # the add was `x += shortcut`: out keeps x's dtype


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CASES = [
    Case("nchw-relu", (2, 5, 7, 3)),
    Case("nhwc-silu-hardsig", (2, 5, 7, 3), "channels_last", out_act="silu", act="silu",
         gate="hard_sigmoid", gain=None),
    Case("nhwc-none-nosc-sumgrad", (2, 5, 7, 3), "channels_last", sc_dtype=None, out_act="none",
         act="gelu", grad="sum"),
    Case("nhwc-2cblocks-splits", (3, 70, 9, 11), "channels_last"),
    Case("nchw-bf16", (2, 70, 9, 11), dtype=BF16, sc_dtype=BF16),
    Case("1d-batch1-long", (1, 3, 1100), out_act="silu", act="mish"),
    Case("1d-bf16-nosc", (2, 6, 37), dtype=BF16, sc_dtype=None, act="relu6"),
    Case("3d-ndhwc-silu", (2, 4, 3, 5, 2), "channels_last", out_act="silu", act="hard_swish"),
    Case("3d-bf16", (2, 4, 3, 5, 2), dtype=BF16, sc_dtype=BF16, out_act="none"),
    Case("bf16-x-fp32-sc", (2, 5, 7, 3), "channels_last", dtype=BF16, sc_dtype=F32),
    Case("mixed-layouts-silu", (2, 5, 7, 3), sc_layout="channels_last", out_act="silu"),
    Case("nhwc-bf16-silu-nosc", (2, 9, 6, 5), "channels_last", dtype=BF16, sc_dtype=None,
         out_act="silu"),
    Case("nhwc-fp16", (2, 5, 7, 3), "channels_last", dtype=F16, sc_dtype=F16),
    Case("sliced-x", (2, 5, 4, 3), "sliced", out_act="none"),
    Case("permuted-x", (2, 5, 4, 3), "permuted", sc_dtype=None, out_act="silu"),
    # NCHW maps whose rows are not 16-element aligned (ResNet's 7x7 and 14x14): flat elementwise
    # kernels, and reductions over aligned windows (C * S a whole number of 16-byte vectors)
    Case("nchw-8x8-aligned-rows", (2, 6, 8, 8), out_act="silu"),  # S % 16 == 0: 2-D tiles
    Case("nchw-7x7-bf16", (2, 16, 7, 7), dtype=BF16, sc_dtype=BF16),
    Case("nchw-7x7-fp32-silu", (2, 8, 7, 7), out_act="silu", act="silu"),
    Case("nchw-14x14-bf16-silu-nosc", (2, 8, 14, 14), dtype=BF16, sc_dtype=None, out_act="silu"),
    Case("nchw-14x14-fp32-none", (3, 4, 14, 14), out_act="none", act="gelu"),
    Case("nhwc-7x7-300ch-bf16", (1, 300, 7, 7), "channels_last", dtype=BF16, sc_dtype=BF16),
    # an expanded (all-strides-0) gradient beside NCHW tensors: strided tiles where views differ
    Case("sumgrad-nchw-7x7-none", (2, 8, 7, 7), sc_dtype=None, out_act="none", grad="sum"),
    # an in-place add with a wider shortcut: the kernel stores x's dtype itself
    Case("inplace-bf16-x-fp32-sc", (2, 16, 7, 7), dtype=BF16, sc_dtype=F32, in_place=True),
    Case("inplace-nhwc-bf16-silu", (2, 16, 5, 5), "channels_last", dtype=BF16, sc_dtype=F32,
         out_act="silu", in_place=True),
]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.to(memory_format=fmt) if t.dim() in (4, 5) else t
    if layout == "sliced":  # every other channel of a wider tensor: not dense, still collapsible
        return torch.cat([t, torch.randn_like(t)], dim=1)[:, 0::2]
    if layout == "permuted":  # (N, H, C, W) in memory: the spatial dims do not collapse
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t


def make_inputs(case: Case, seed: int = 0, hidden: int = 3) -> dict:
    torch.manual_seed(seed)
    C, ones = case.shape[1], (1,) * (len(case.shape) - 2)
    x = _layout(torch.randn(case.shape), case.layout).to(case.dtype)
    sc = None
    if case.sc_dtype is not None:
        sc_layout = case.layout if case.sc_layout == "same" else case.sc_layout
        sc = _layout(torch.randn(case.shape), sc_layout).to(case.sc_dtype)
    return {
        "x": x, "shortcut": sc,
        # a positive fc1 bias keeps the hidden units alive, so the squeeze gradient is not 0
        "fc1_weight": torch.randn(hidden, C, *ones) * 0.5, "fc1_bias": torch.rand(hidden) + 0.5,
        "fc2_weight": torch.randn(C, hidden, *ones) * 0.5, "fc2_bias": torch.randn(C),
        "gain": torch.tensor(case.gain) if case.gain is not None else None,
    }


def run_with_grads(fn, case: Case, inputs: dict, grad_out: Optional[torch.Tensor]) -> tuple:
    """``fn(**leaves)`` and the gradients of every parameter; grads of ``out * grad_out``."""
    leaves = {k: (v.detach().requires_grad_(k in PARAMS) if v is not None else None)
              for k, v in inputs.items()}
    out = fn(**leaves, act=case.act, gate=case.gate, out_act=case.out_act, in_place=case.in_place)
    if grad_out is None:
        out.sum().backward()
    else:
        out.backward(grad_out.to(out.dtype))
    return out.detach(), {k: leaves[k].grad for k in PARAMS if leaves[k] is not None}


def assert_matches(got: torch.Tensor, ref: torch.Tensor, what: str,
                   precision: Optional[torch.dtype] = None) -> None:
    """``got`` against the float64 reference, within the tolerance of its dtype (or of
    ``precision``, where the maths rounded to a narrower dtype on the way)."""
    tol = max(TOL[got.dtype], TOL[precision or got.dtype])
    ref = ref.detach().to(torch.float64)
    torch.testing.assert_close(got.to(torch.float64), ref, rtol=tol,
                               atol=tol * max(ref.abs().max().item(), 1e-30), msg=what)


def reference_with_grads(case: Case, inputs: dict, grad_out: Optional[torch.Tensor]) -> tuple:
    """The oracle: se_residual_reference in fp32 on the same (upcast) values."""
    up = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    return run_with_grads(fused.se_residual_reference, case, up, grad_out)


def _interpret_worker(path: str) -> None:
    """Runs in the TRITON_INTERPRET=1 subprocess: the Triton path on CPU tensors, saved to path."""
    if not fused.INTERPRETED:
        raise RuntimeError("the worker must run with TRITON_INTERPRET=1 set before import")
    launches = _record_launches()
    results = {}
    for case in CASES:
        inputs = make_inputs(case)
        launches.clear()
        torch.manual_seed(1)
        out_shape_dtype = scale.out_dtype(inputs["x"], inputs["shortcut"], case.in_place)
        grad_out = torch.randn(case.shape, dtype=out_shape_dtype) if case.grad == "randn" else None
        out, grads = run_with_grads(fused.se_residual, case, inputs, grad_out)
        seen = dict(launches)
        op_out, op_grads = run_with_grads(_through_the_op, case, inputs, grad_out)
        results[case.name] = {
            "supports": fused.supports(inputs["x"], inputs["shortcut"], case.act, case.gate,
                                       case.out_act),
            "inputs": inputs, "grad_out": grad_out, "out": out, "grads": grads,
            "launches": seen, "op_out": op_out, "op_grads": op_grads,
        }
    results["launchers"] = _interpret_launchers()
    torch.save(results, path)


def _through_the_op(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gain, act, gate,
                    out_act, in_place):
    """``torch.ops.se_inject.se_residual`` itself, with its registered autograd: the path every
    tracer sees (eager calls of ``se_residual`` skip the dispatcher)."""
    return se_residual_op(x, shortcut, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gain, act, gate,
                          out_act, in_place)[0]


def _record_launches() -> dict:
    """Wrap every launch of the fused modules to record {kernel: (FLAT, ALIGN)} as it runs."""
    seen = {}
    for module in (squeeze, scale, backward):
        def record(kernel, programs, args, meta, _launch=module.launch):
            name = kernel.fn.__name__.strip("_").replace("_kernel", "")
            seen[name] = (meta.get("FLAT"), meta.get("ALIGN"))
            if name == "scale":
                seen["scale stores"] = args[3].dtype  # the output the kernel writes
            _launch(kernel, programs, args, meta)

        module.launch = record
    return seen


def _interpret_launchers() -> dict:
    """The reductions with forced splits, and the scale with a learnable gate through the launchers."""
    torch.manual_seed(2)
    found = {}
    for name, x in {"nhwc": _layout(torch.randn(1, 70, 9, 11), "channels_last"),
                    "nchw-long": torch.randn(1, 3, 2100)}.items():
        found[name] = {"x": x, **{k: squeeze.squeeze_launch(x, splits=k) for k in (1, 2, 3)}}
    x, sc, g = torch.randn(2, 70, 40), torch.randn(2, 70, 40), torch.rand(2, 70)
    dout = torch.randn(2, 70, 40)
    found["gate_grad"] = {"args": (dout, x, sc, None, g, "silu"),
                          "got": backward.gate_grad_launch(dout, x, sc, None, g, "silu", splits=3)}
    out = scale.scale_launch(x, g, sc, "relu")  # and its gradients by the backward's launchers
    dg, dz = backward.gate_grad_launch(dout, x, sc, out, g, "relu")
    found["scale_op"] = {"args": (x, g, sc, dout), "out": out,
                         "grads": [backward.input_grad_launch(dz, x, g, None), dg, dz]}
    return found


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter at the repo root; TRITON_INTERPRET only if given."""
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**full, **env},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("interpreted") / "results.pt"
    code = f"from tests.test_fused import _interpret_worker; _interpret_worker({str(path)!r})"
    done = python(code, TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr[-6000:]
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_interpreted_triton_matches_reference(interpreted, case):
    rec = interpreted[case.name]
    assert rec["supports"], "the Triton path did not run"
    inputs, out = rec["inputs"], rec["out"]
    ref_out, ref_grads = reference_with_grads(case, inputs, rec["grad_out"])
    assert out.dtype == scale.out_dtype(inputs["x"], inputs["shortcut"], case.in_place)
    if case.in_place:
        assert out.dtype == inputs["x"].dtype
    assert_matches(out, ref_out, "out")
    for name, grad in rec["grads"].items():
        assert grad.dtype == inputs[name].dtype, name
        # the shortcut's gradient is dz, in the output's dtype (bf16 for an in-place add)
        assert_matches(grad, ref_grads[name], f"grad of {name}", out.dtype if name == "shortcut" else None)
    if case.layout in ("contiguous", "channels_last"):
        assert out.stride() == inputs["x"].stride()
        assert rec["grads"]["x"].stride() == inputs["x"].stride()
    # the registered op (what compile and export run) computes exactly what the eager path does
    torch.testing.assert_close(rec["op_out"], out, rtol=0, atol=0)
    for name, grad in rec["grads"].items():
        torch.testing.assert_close(rec["op_grads"][name], grad, rtol=0, atol=0, msg=name)
    if case.name.startswith(("nchw-7x7", "nchw-14x14", "inplace-bf16")):
        # the NCHW paths ran: flat elementwise kernels, aligned windows in the reductions
        vec = 16 // inputs["x"].element_size()
        assert rec["launches"] == {"scale": (True, None), "input_grad": (True, None),
                                   "squeeze": (None, vec), "gate_grad": (None, vec),
                                   "scale stores": out.dtype}
    if case.name == "nchw-8x8-aligned-rows":  # aligned rows vectorise in the strided tiles
        assert rec["launches"] == {"scale": (False, None), "squeeze": (None, 1), "gate_grad": (None, 1),
                                   "input_grad": (False, None), "scale stores": torch.float32}
    if case.name == "sumgrad-nchw-7x7-none":  # the backward reads the expanded gradient: strided
        assert rec["launches"] == {"scale": (True, None), "squeeze": (None, 4), "gate_grad": (None, 1),
                                   "input_grad": (False, None), "scale stores": torch.float32}
    if case.in_place:  # x's dtype stored by the kernel itself, not an fp32 result cast afterwards
        assert rec["launches"]["scale stores"] == inputs["x"].dtype


def test_interpreted_squeeze_splits_and_scale_op(interpreted):
    found = interpreted["launchers"]
    for name in ("nhwc", "nchw-long"):
        want = squeeze.squeeze_mean_reference(found[name]["x"])
        for k in (1, 2, 3):
            assert_matches(found[name][k], want, f"{name} splits={k}")
    dg, dz = found["gate_grad"]["got"]
    want_dg, want_dz = backward.gate_grad_reference(*found["gate_grad"]["args"])
    assert_matches(dg, want_dg, "dg with 3 splits")
    assert_matches(dz, want_dz, "dz")
    x, g, sc, dout = found["scale_op"]["args"]
    leaves = [t.clone().requires_grad_() for t in (x, g, sc)]
    out = torch.relu(leaves[0] * leaves[1][:, :, None] + leaves[2])
    out.backward(dout)
    assert_matches(found["scale_op"]["out"], out, "scale op out")
    for got, leaf in zip(found["scale_op"]["grads"], leaves):
        assert_matches(got, leaf.grad, "scale op grad")


# ---- the reference and the op's CPU path ----------------------------------------------------


def test_names_are_those_of_seblock():
    assert set(fused.ACTS) == set(ACT_LAYERS) and set(fused.GATES) == set(GATE_LAYERS)


@pytest.mark.parametrize("dims,act,gate", [(1, "silu", "sigmoid"), (2, "relu", "hard_sigmoid"),
                                           (3, "mish", "sigmoid")])
def test_reference_is_seblock_forward(dims, act, gate):
    se = SEBlock(16, rd_channels=4, act_layer=act, gate_layer=gate, spatial_dims=dims)
    se.set_gain_(2.0)
    x = torch.randn((2, 16) + (5,) * dims)
    got = fused.se_residual_reference(x, None, se.fc1.weight, se.fc1.bias, se.fc2.weight,
                                      se.fc2.bias, se.gain, act, gate, "none")
    torch.testing.assert_close(got, se(x), rtol=0, atol=0)


GRADCHECK = [("relu", "sigmoid", "relu", True), ("silu", "hard_sigmoid", "silu", True),
             ("gelu", "sigmoid", "none", False), ("relu6", "sigmoid", "silu", False),
             ("hard_swish", "hard_sigmoid", "relu", True), ("mish", "sigmoid", "none", True)]


@pytest.mark.parametrize("act,gate,out_act,with_sc", GRADCHECK)
@pytest.mark.parametrize("path", ["eager", "op"])
def test_gradcheck_float64(act, gate, out_act, with_sc, path):
    """Both ways in: the eager autograd Function and the registered op's autograd formula."""
    case = Case("gc", (2, 4, 3, 3), dtype=torch.float64,
                sc_dtype=torch.float64 if with_sc else None)
    inputs = {k: (v.double() if v is not None else None) for k, v in make_inputs(case).items()}
    names = [k for k in PARAMS if inputs[k] is not None]
    call = fused.se_residual if path == "eager" else _through_the_op

    def fn(*tensors):
        kw = {**inputs, **dict(zip(names, tensors))}
        return call(**kw, act=act, gate=gate, out_act=out_act, in_place=False)

    leaves = [inputs[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(fn, leaves)
    want = fused.se_residual_reference(**inputs, act=act, gate=gate, out_act=out_act)
    torch.testing.assert_close(fn(*leaves), want, rtol=1e-12, atol=1e-12)


def test_eager_calls_skip_the_dispatcher_and_everything_else_goes_through_the_op(monkeypatch):
    """A plain eager call runs the op's body without the custom-op layers; under a
    torch-function mode, a dispatch mode (fake tensors, make_fx, export) the op itself runs."""
    import importlib

    from torch.fx.experimental.proxy_tensor import make_fx

    module = importlib.import_module("se_inject.fused.se_residual")
    calls, real = [], module.se_residual_op
    monkeypatch.setattr(module, "se_residual_op", lambda *args: calls.append(1) or real(*args))
    inputs = make_inputs(CASES[0])
    names = {"act": "relu", "gate": "sigmoid", "out_act": "relu"}
    want = fused.se_residual(**inputs, **names)
    assert calls == []
    with torch.device("cpu"):
        torch.testing.assert_close(fused.se_residual(**inputs, **names), want, rtol=0, atol=0)
    assert calls == [1]
    gm = make_fx(lambda x, sc: fused.se_residual(x, sc, *list(inputs.values())[2:], **names))(
        inputs["x"], inputs["shortcut"])
    assert calls == [1, 1] and SE_OP in _targets(gm)


def test_second_output_is_the_squeeze_and_its_gradient_flows():
    inputs = make_inputs(CASES[0])
    leaves = {k: (v.detach().requires_grad_() if k in PARAMS else v) for k, v in inputs.items()}
    out, s = se_residual_op(*leaves.values(), "relu", "sigmoid", "relu")
    weight = torch.randn_like(s)
    (out.sum() + (s * weight).sum()).backward()
    ref = {k: (v.detach().requires_grad_() if k in PARAMS else v) for k, v in inputs.items()}
    ref_out = fused.se_residual_reference(**ref, act="relu", gate="sigmoid", out_act="relu")
    (ref_out.sum() + (ref["x"].mean((2, 3)) * weight).sum()).backward()
    assert_matches(s, ref["x"].mean((2, 3)), "s")
    for name in PARAMS:
        assert_matches(leaves[name].grad, ref[name].grad, name)


@pytest.mark.parametrize("x_dtype,sc_dtype,want", [
    (BF16, F32, F32), (F32, BF16, F32), (BF16, None, BF16), (F16, BF16, F32), (BF16, BF16, BF16)])
def test_output_and_gradient_dtypes(x_dtype, sc_dtype, want):
    case = Case("dt", (2, 4, 3, 3), "channels_last", dtype=x_dtype, sc_dtype=sc_dtype)
    inputs = make_inputs(case)
    out, grads = run_with_grads(fused.se_residual, case, inputs, None)
    assert out.dtype == want
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert {k: g.dtype for k, g in grads.items()} == {k: inputs[k].dtype for k in grads}


def test_autocast_does_not_reach_the_mlp():
    """Under autocast the op computes what it computes without it: its fp32 MLP is not cast."""
    case = Case("ac", (2, 8, 4, 4), dtype=BF16, sc_dtype=F32)
    inputs = make_inputs(case)
    plain, plain_grads = run_with_grads(fused.se_residual, case, inputs, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, cast_grads = run_with_grads(fused.se_residual, case, inputs, None)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cast_grads[name], grad, rtol=0, atol=0)


BAD = {"act": "tanh", "gate": "relu", "out_act": "gelu", "fc1_weight": torch.randn(3, 5, 1, 1),
       "fc2_bias": torch.randn(3), "shortcut": torch.randn(2, 4, 3, 2), "gain": torch.ones(1),
       "x": torch.randn(2, 4)}


@pytest.mark.parametrize("arg", list(BAD))
def test_bad_arguments_raise_value_error_naming_them(arg):
    kwargs = {**make_inputs(Case("bad", (2, 4, 3, 3))), "act": "relu", "gate": "sigmoid",
              "out_act": "relu", arg: BAD[arg]}
    with pytest.raises(ValueError, match=rf"^{arg}[= ]"):
        fused.se_residual(**kwargs)


def test_supports_checks_names_dtypes_and_dims():
    x = torch.randn(2, 4, 3, 3)
    assert not fused.INTERPRETED  # the interpreted subprocess did not leak into this process
    assert not fused.supports(x, None, "relu", "sigmoid", "relu")  # CPU tensors: torch ops
    with torch._subclasses.fake_tensor.FakeTensorMode():
        xc = torch.empty(2, 4, 3, 3, device="cuda")
        assert fused.supports(xc, xc.half(), "relu", "sigmoid", "silu") == _common.HAS_TRITON
        assert not fused.supports(xc, None, "tanh", "sigmoid", "relu")
        assert not fused.supports(xc, None, "relu", "sigmoid", "gelu")
        assert not fused.supports(xc.double(), None, "relu", "sigmoid", "relu")
        assert not fused.supports(xc[:, :, 0, 0], None, "relu", "sigmoid", "relu")
        assert not fused.supports(xc, xc[:, :, :2], "relu", "sigmoid", "relu")


# ---- where the kernels run: the one decision and the GPU's capability -------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA GPU of a given compute capability is present (None: CUDA unavailable, as
    for fake CUDA tensors on this machine, where any GPU is assumed); returns the setter."""
    def set_capability(cap: Optional[tuple]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cap is not None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
        _common.device_supported.cache_clear()

    yield set_capability
    _common.device_supported.cache_clear()


def _fake_cuda(*shape, dtype=torch.float32):
    with torch._subclasses.fake_tensor.FakeTensorMode():
        return torch.empty(shape, device="cuda", dtype=dtype)


def _ops_run_by(module: nn.Module, *args) -> set:
    """The se_inject ops a (fake-CUDA) call of ``module`` runs, traced by make_fx."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(module, tracing_mode="fake")(*args)
    return {str(n.target) for n in gm.graph.nodes if "se_inject" in str(n.target)}


@pytest.mark.parametrize("cap,dtype,want", [
    ((6, 1), torch.float32, False), ((6, 1), torch.float16, False),
    ((7, 0), torch.float32, True), ((7, 5), torch.float16, True),
    ((7, 5), torch.bfloat16, False), ((8, 0), torch.bfloat16, True), ((9, 0), torch.bfloat16, True),
])
def test_the_gpu_capability_decides_whether_the_kernels_run(fake_gpu, cap, dtype, want):
    """Below Triton's minimum (7.0) nothing runs the kernels; bf16 needs Ampere (8.0)."""
    pytest.importorskip("triton")
    fake_gpu(cap)
    x = _fake_cuda(2, 16, 5, 5, dtype=dtype)
    assert fused.supports(x, None, "relu", "sigmoid", "relu") is want
    assert fused.use_fused("auto", x, None, "relu", "sigmoid", "relu") is want


@pytest.mark.parametrize("x_dtype,sc_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_a_bf16_shortcut_or_branch_on_a_turing_gpu_takes_the_plain_path(fake_gpu, x_dtype, sc_dtype):
    pytest.importorskip("triton")
    fake_gpu((7, 5))
    x, sc = _fake_cuda(2, 16, 5, 5, dtype=x_dtype), _fake_cuda(2, 16, 5, 5, dtype=sc_dtype)
    assert not fused.supports(x, sc, "relu", "sigmoid", "relu")
    assert fused.supports(x.float(), sc.float(), "relu", "sigmoid", "relu")


def test_a_block_on_a_pascal_gpu_runs_plain_torch_ops_even_with_fused_kernels(fake_gpu):
    """Capability 6.1 (a GTX 1080): the block's forward never reaches Triton, whatever kernels."""
    from se_inject import SEResidual

    pytest.importorskip("triton")
    with torch._subclasses.fake_tensor.FakeTensorMode():
        se = SEResidual(16, out_act="relu", kernels="fused", device="cuda")
        x = torch.empty(2, 16, 5, 5, device="cuda")
    fake_gpu((6, 1))
    assert _ops_run_by(se, x, x) == set()
    fake_gpu(None)  # planning the launches would ask a real GPU for its size
    assert _ops_run_by(se, x, x) == {"se_inject.se_residual.default"}


@pytest.mark.parametrize("kernels,compiling,cuda,want", [
    ("plain", False, True, False), ("plain", True, True, False),
    ("auto", False, True, True), ("auto", True, True, False),
    ("fused", False, True, True), ("fused", True, True, True),
    ("auto", False, False, False), ("fused", False, False, False), ("fused", True, False, False),
    ("bogus", False, True, False),
])
def test_use_fused_is_the_decision_table(monkeypatch, kernels, compiling, cuda, want):
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    x = _fake_cuda(2, 16, 5, 5) if cuda else torch.randn(2, 16, 5, 5)
    assert fused.use_fused(kernels, x, None, "relu", "sigmoid", "relu") is want
    # unsupported names (a layer class without a registry name is None) always mean plain
    assert not fused.use_fused(kernels, x, None, None, "sigmoid", "relu")
    assert not fused.use_fused(kernels, x, None, "relu", "sigmoid", "gelu")


# ---- layouts, tiles and splits ----------------------------------------------------------------


@pytest.mark.parametrize("make,strides,copied", [
    (lambda: torch.randn(2, 6, 4, 5), (120, 20, 1), False),
    (lambda: torch.randn(2, 6, 4, 5).to(memory_format=torch.channels_last), (120, 1, 6), False),
    (lambda: torch.randn(2, 6, 3, 4, 5).to(memory_format=torch.channels_last_3d),
     (360, 1, 6), False),
    (lambda: torch.randn(2, 12, 4, 5)[:, ::2], (240, 40, 1), False),
    (lambda: torch.ones(()).expand(2, 6, 4, 5), (0, 0, 0), False),
    (lambda: torch.randn(2, 6, 4, 1), (24, 4, 1), False),
    (lambda: torch.randn(2, 4, 6, 5).transpose(1, 2), (120, 20, 1), True),
])
def test_ncs_view_uses_strides_and_copies_only_what_does_not_collapse(make, strides, copied):
    x = make()
    view = _plan.ncs(x)
    assert (view.stride_n, view.stride_c, view.stride_s) == strides
    assert (view.tensor is not x) == copied
    out = _plan.empty_ncs(x, torch.float32)
    assert _plan.collapsible(out) and out.shape == x.shape


def test_tiles_follow_the_contiguous_axis_and_split_small_grids():
    nhwc = _plan.pick_tile(256, 3136, 1, 256, _plan.REDUCE_ELEMS)
    assert (nhwc.block_c, nhwc.block_s, nhwc.c_fast) == (64, 32, True)
    nchw = _plan.pick_tile(256, 3136, 3136, 1, _plan.POINTWISE_ELEMS)
    assert (nchw.block_s, nchw.block_c, nchw.c_fast) == (1024, 4, False)
    tiny = _plan.pick_tile(3, 5, 5, 1, _plan.POINTWISE_ELEMS)
    assert (tiny.block_s, tiny.block_c) == (8, 4)
    # splits only when N x channel blocks are too few programs, of at least 2 tiles each
    assert _plan.num_splits(rows=256 * 4, s_tiles=98, target=528) == 1
    assert _plan.num_splits(rows=4, s_tiles=98, target=528) == 49  # >= 2 tiles per split
    assert _plan.num_splits(rows=32, s_tiles=2, target=528) == 1
    assert _plan.num_splits(rows=1, s_tiles=1000, target=528) == 500


RESNET_STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


def test_launch_settings_follow_the_written_out_rules():
    """num_warps by tile size (Liger's rule: 8 from 2048 elements), tiles that fill the GPU."""
    assert [_plan.pointwise_warps(n) for n in (4096, 2048, 1024, 512, 256)] == [8, 4, 2, 1, 1]
    # flat NCHW: 4096 elements per program at batch 256, halved until an H100 (528) fills
    assert _plan.flat_block(256, 2048 * 49, target=528) == 4096
    assert _plan.flat_block(1, 2048 * 49, target=528) == 256
    assert _plan.flat_block(1, 256 * 3136, target=528) == 1024
    # reductions: channels_last small maps take 8 positions x 256 channels, large ones 32 x 64
    for (C, side), want in zip(RESNET_STAGES, [(32, 64), (32, 64), (8, 256), (8, 256)]):
        tile, warps = _plan.reduction_tile(C, side * side, 1, C)
        assert ((tile.block_s, tile.block_c), warps) == (want, 4)
    # NCHW 7x7: aligned windows of 49 + 7 elements fit in 64-position rows; scalar loads take
    # 8 warps (8 elements per thread), vectorised ones 4
    tile, warps = _plan.reduction_tile(2048, 49, 49, 1, align=8)
    assert ((tile.block_s, tile.block_c), warps) == ((64, 32), 4)
    assert _plan.reduction_tile(2048, 49, 49, 1)[1] == 8
    assert _plan.reduction_tile(256, 3136, 3136, 1)[1] == 4


@pytest.mark.parametrize("dtype,layout,align", [
    (torch.bfloat16, "contiguous", 8), (torch.float32, "contiguous", 4),
    (torch.bfloat16, "channels_last", 1), (torch.float16, "sliced", 1)])
def test_nchw_at_7x7_walks_the_flat_axis_and_aligned_windows(dtype, layout, align):
    """Contiguous NCHW at S = 49: flat elementwise plans, reductions over aligned windows of
    16-byte vectors; other layouts keep the strided tiles."""
    x = _layout(torch.empty(4, 32, 7, 7, dtype=dtype), layout)
    v = _plan.ncs(x)
    flat = layout == "contiguous"
    assert _plan.pointwise_plan(tuple(x.shape), (v.strides, v.strides), x.device).flat is flat
    assert _plan.reduction_grid(x, (v, v)).align == align
    # a shortcut in another layout makes the elementwise kernel strided again
    other = _plan.ncs(x.contiguous(memory_format=torch.channels_last))
    assert not _plan.pointwise_plan(tuple(x.shape), (v.strides, other.strides), x.device).flat
    # rows of 56 x 56 = 3136 positions are 16-element aligned: 2-D tiles, vectorised as they are
    big = _plan.ncs(torch.empty(4, 32, 56, 56, dtype=dtype))
    assert not _plan.pointwise_plan((4, 32, 56, 56), (big.strides,) * 2, x.device).flat
    assert _plan.reduction_grid(big.tensor, (big,)).align == 1


def test_launch_plans_are_cached_per_shape_strides_dtype_and_device():
    x = torch.empty(2, 64, 7, 7, dtype=torch.bfloat16)
    v = _plan.ncs(x)
    _plan.pointwise_plan.cache_clear()
    first = _plan.pointwise_plan(tuple(x.shape), (v.strides,) * 3, x.device)
    assert _plan.pointwise_plan(tuple(x.shape), (v.strides,) * 3, x.device) is first
    assert _plan.pointwise_plan.cache_info().hits == 1
    nhwc = _plan.ncs(x.contiguous(memory_format=torch.channels_last))
    assert _plan.pointwise_plan(tuple(x.shape), (nhwc.strides,) * 3, x.device) is not first
    grid = _plan.reduction_grid(x, (v,))
    assert _plan.reduction_grid(x, (v,)) is grid
    assert _plan.reduction_grid(x.float(), (v,)).align == 4 != grid.align  # dtype is in the key
    # one launch plans once: a second identical call of a launcher is all cache hits
    with torch._subclasses.fake_tensor.FakeTensorMode():
        xc = torch.empty(2, 64, 7, 7, device="cuda", dtype=torch.bfloat16)
        g = torch.empty(2, 64, device="cuda")
        scale.scale_launch(xc, g, xc, "relu")
        before = _plan.pointwise_plan.cache_info()
        scale.scale_launch(xc, g, xc, "relu")
        after = _plan.pointwise_plan.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 0)


def _trace_on_fake_cuda(fn, *shapes_and_layouts):
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch._subclasses.fake_tensor.FakeTensorMode():
        args = [_layout(torch.empty(shape, device="cuda"), layout)
                for shape, layout in shapes_and_layouts]
    return make_fx(fn, tracing_mode="fake")(*args)


@pytest.mark.parametrize("layout,stride_c,stride_s", [("channels_last", 1, 96),
                                                      ("contiguous", 20, 1)])
def test_cuda_launches_trace_as_triton_kernels_without_copies(layout, stride_c, stride_s):
    """On (fake) CUDA tensors each launcher records one wrap_triton kernel, on x itself."""
    pytest.importorskip("triton")
    shape = (2, 96, 4, 5)

    def tail(x, sc):
        s = squeeze.squeeze_launch(x)
        out = scale.scale_launch(x, s, sc, "silu")
        dg, dz = backward.gate_grad_launch(out, x, sc, None, s, "silu")
        return backward.input_grad_launch(dz, x, s, dg)

    gm = _trace_on_fake_cuda(tail, (shape, layout), (shape, layout))
    kernels = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(kernels) == 4
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for node in kernels:
        kwargs = node.kwargs["kwargs"]
        # x (or dx, allocated like x) goes in with its own strides: no copy, no relayout
        assert kwargs.get("stride_c", kwargs.get("sxc")) == stride_c
        assert kwargs.get("stride_s", kwargs.get("sxs")) == stride_s
        assert node is kernels[-1] or x in kwargs.values()
    copies = [n for n in gm.graph.nodes if "clone" in str(n.target) or "copy" in str(n.target)]
    assert not copies


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dynamic_spatial_sizes_reach_the_kernels_as_integers_without_guards(layout):
    """Traced with symbolic shapes (torch.compile(dynamic=True), export with a dynamic H, W), the
    launches take S as a SymInt (each kernel divides by it), never a SymFloat ``1 / S``, and
    planning adds no guard, so one graph serves every map size."""
    from torch.fx.experimental.proxy_tensor import make_fx

    pytest.importorskip("triton")

    def tail(x, sc):
        s = squeeze.squeeze_launch(x)
        out = scale.scale_launch(x, s, sc, "silu")
        dg, dz = backward.gate_grad_launch(out, x, sc, None, s, "silu")
        return backward.input_grad_launch(dz, x, s, dg)

    x = _layout(torch.randn(2, 16, 7, 7), layout)
    gm = make_fx(tail, tracing_mode="symbolic")(x, x.clone())
    kernels = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(kernels) == 4
    for node in kernels:
        values = {k: (v.meta["val"] if isinstance(v, torch.fx.Node) else v)
                  for k, v in node.kwargs["kwargs"].items()}
        assert isinstance(values["S"], torch.SymInt)
        assert not [k for k, v in values.items() if isinstance(v, (float, torch.SymFloat))]
    assert gm.shape_env.guards == []


# ---- torch.compile and torch.export ------------------------------------------------------------


class TinySE(nn.Module):
    """A residual SE tail calling the fused op, as the integrated graph will."""

    def __init__(self, channels: int = 6, hidden: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.register_buffer("gain", torch.tensor(2.0))

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return fused.se_residual(x, shortcut, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                 self.fc2.bias, self.gain, "silu", "sigmoid", "relu")


SE_OP = torch.ops.se_inject.se_residual.default


@pytest.fixture
def tiny():
    torch._dynamo.reset()
    x = torch.randn(2, 6, 5, 4).to(memory_format=torch.channels_last)
    yield TinySE(), x, torch.randn(2, 6, 5, 4)
    torch._dynamo.reset()


def _targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_compile_sees_one_op_and_aot_traces_its_backward(tiny):
    """Dynamo keeps one opaque op; AOTAutograd traces the registered backward, and inside it the
    ops decompose into what they run (what inductor sees). Gradients match eager."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    model, x, sc = tiny
    dynamo_graphs, aot_graphs = [], []

    def keep(gm, example_inputs):
        aot_graphs.append(gm)
        return make_boxed_func(gm)

    def backend(gm, example_inputs):
        dynamo_graphs.append(gm)
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    grads = []
    for fn in (compiled, model):
        model.zero_grad()
        leaves = [x.clone().requires_grad_(), sc.clone().requires_grad_()]
        fn(*leaves).square().sum().backward()
        grads.append([t.grad for t in leaves] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (graph,) = dynamo_graphs
    assert _targets(graph).count(SE_OP) == 1
    assert not [t for t in _targets(graph) if "mean" in str(t) or "linear" in str(t)]
    forward, backward_graph = aot_graphs
    assert not [t for gm in aot_graphs for t in _targets(gm) if "se_inject" in str(t)]
    assert torch.ops.aten.sigmoid_backward.default in _targets(backward_graph)
    assert torch.ops.aten.silu_backward.default in _targets(backward_graph)


def test_export_keeps_the_op_with_fake_shapes_dtypes_and_strides(tiny):
    model, x, sc = tiny
    exported = torch.export.export(model, (x.bfloat16(), sc))
    nodes = [n for n in exported.graph.nodes if n.target == SE_OP]
    assert len(nodes) == 1
    out_meta, s_meta = nodes[0].meta["val"]
    assert out_meta.dtype == torch.float32 and s_meta.dtype == torch.float32
    assert out_meta.shape == x.shape and s_meta.shape == x.shape[:2]
    assert out_meta.stride() == x.stride()  # channels_last propagates through the fake kernel
    torch.testing.assert_close(exported.module()(x.bfloat16(), sc), model(x.bfloat16(), sc),
                               rtol=0, atol=0)


def test_without_triton_the_package_imports_and_runs_on_torch_ops():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, se_inject.fused as f\n"
            "x, w1 = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 1, 1)\n"
            "w2 = torch.randn(4, 2, 1, 1)\n"
            "assert not f.HAS_TRITON and not f.supports(x, x, 'relu', 'sigmoid', 'relu')\n"
            "args = (x, x, w1, torch.zeros(2), w2, torch.zeros(4))\n"
            "torch.testing.assert_close(f.se_residual(*args), f.se_residual_reference(*args))\n")
    done = python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Triton not available" not in done.stderr
