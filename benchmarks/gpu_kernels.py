"""The fused SE kernels (se_inject.fused) on a GPU: correctness first, then per-stage timings.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

One prepared command for a one-shot run on a CUDA machine; it writes JSON lines as it goes and
starts no section that would not fit in what is left of its time budget (170 s by default):

    python benchmarks/gpu_kernels.py              # --out benchmarks/results/gpu-kernels.jsonl
    python benchmarks/gpu_kernels.py --interpret-smoke    # CPU, TRITON_INTERPRET=1, tiny shapes

``gpu_se.py`` runs it twice: sections 1-2 first (``--no-timings``), section 3 after its model
benchmarks (``--timings-only``, with ``--plain-only`` if the checks failed), as its budget ranks them.

1. ``check``: the op against ``se_residual_reference`` (fp32, on the same values) in fp32 and
   bf16, NCHW (7x7 and 14x14 maps too) and channels_last, 1-D/2-D/3-D, an in-place add with a
   wider shortcut, forward and every gradient, batch-1 shapes that split the squeeze, with the
   test suite's tolerances; ``supports`` must be true (the Triton path ran). If a check fails,
   every later section uses plain kernels only and says so (a CUDA error, which leaves the
   process's CUDA context unusable, restarts the script in a fresh process for them); the exit
   code is then 2, so ``gpu_se.py`` runs its model sections with plain kernels too.
2. ``compile``, each fresh (``torch._dynamo.reset()``, a recompile-limit hit raises):
   torch.compile(fullgraph=True) of the op, forward and backward, against eager; a compiled
   training step of a converted resnet10t with ``kernels="fused"`` against the eager plain ops
   (forward, loss, every gradient; the compiled graph must hold one fused op per SE block); and
   ``torch.export`` of the fused model, run and compared. Then ``mutation``: which kernel
   arguments inductor's analysis says are written (only outputs, or compiled code clones inputs).
3. ``time``: ``triton.testing.do_bench`` (median, p20, p80 in microseconds) at ResNet-50's stage
   shapes (N=256, bf16), channels_last and NCHW: torch mean vs the Triton squeeze; torch
   ``x*g+sc`` then relu (and the original model's add + relu) vs the fused kernel; a copy
   (bandwidth reference) and the floor (one read at copy bandwidth, half a copy); the whole SE
   tail forward; and the backward (torch autograd of the reference under bf16 autocast vs the
   fused backward).

Without a CUDA device (and without --interpret-smoke) it says so and exits 0.
"""

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # ResNet-50 (channels, side)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
LAYOUTS = ("channels_last", "nchw")
#: Seconds each compile section is expected to take on an H100 machine (it starts only if they are left)
COMPILE_ESTIMATES = {"compile op": 35.0, "compile training step": 60.0, "export": 20.0}
CHECKS = [  # (shape, dtype, channels_last, shortcut, out_act, act[, in_place])
    ((8, 256, 14, 14), torch.float32, False, True, "relu", "relu"),
    ((8, 256, 7, 7), torch.bfloat16, False, True, "relu", "relu"),
    ((4, 512, 14, 14), torch.bfloat16, False, True, "silu", "relu"),
    ((4, 256, 7, 7), torch.bfloat16, False, True, "relu", "relu", True),
    ((8, 256, 14, 14), torch.float32, True, True, "silu", "silu"),
    ((8, 256, 14, 14), torch.bfloat16, True, True, "relu", "relu"),
    ((8, 256, 14, 14), torch.bfloat16, False, False, "none", "gelu"),
    ((3, 70, 9, 11), torch.bfloat16, True, True, "silu", "hard_swish"),
    ((1, 2048, 7, 7), torch.bfloat16, True, True, "relu", "relu"),
    ((1, 256, 56, 56), torch.float32, True, True, "relu", "relu"),
    ((4, 64, 3, 9, 11), torch.float32, True, True, "relu", "mish"),
    ((4, 96, 301), torch.bfloat16, False, True, "silu", "relu6"),
]
SMOKE_CHECKS = [((2, 70, 5, 4), torch.float32, True, True, "relu", "relu"),
                ((2, 6, 37), torch.bfloat16, False, False, "silu", "gelu"),
                ((2, 16, 7, 7), torch.bfloat16, False, True, "relu", "relu", True)]


class Recorder:
    """Appends one JSON object per line to ``path`` and flushes it, so a cut-off run keeps data.

    ``kernels_ok`` turns False when a kernel check fails: later sections then run plain kernels.
    """

    def __init__(self, path: Path, budget_s: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        self.deadline = time.monotonic() + budget_s
        self.failures = 0
        self.kernels_ok = True

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self, kind: str, **fields: Any) -> None:
        self.file.write(json.dumps({"kind": kind, **fields}) + "\n")
        self.file.flush()
        print(kind, json.dumps(fields))


def make_inputs(shape: tuple, dtype: torch.dtype, channels_last: bool, shortcut: bool,
                device: torch.device, gen: torch.Generator) -> dict:
    C, hidden, ones = shape[1], max(2, shape[1] // 16), (1,) * (len(shape) - 2)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=device) * scale

    x = randn(*shape)
    sc = randn(*shape) if shortcut else None
    if channels_last and fmt is not None:
        x = x.to(memory_format=fmt)
        sc = sc.to(memory_format=fmt) if sc is not None else None
    return {"x": x.to(dtype), "shortcut": sc.to(dtype) if sc is not None else None,
            "fc1_weight": randn(hidden, C, *ones, scale=C ** -0.5),
            "fc1_bias": torch.rand(hidden, generator=gen, device=device) + 0.5,
            "fc2_weight": randn(C, hidden, *ones, scale=hidden ** -0.5), "fc2_bias": randn(C),
            "gain": torch.tensor(2.0, device=device)}


def forward_backward(fn: Callable, inputs: dict, names: tuple, grad_out: torch.Tensor,
                     cast: Callable[[torch.Tensor], torch.Tensor], in_place: bool = False) -> tuple:
    leaves = {k: (cast(v).detach().requires_grad_(k != "gain") if v is not None else None)
              for k, v in inputs.items()}
    out = fn(**leaves, act=names[0], gate="sigmoid", out_act=names[1], in_place=in_place)
    out.backward(cast(grad_out).to(out.dtype))
    grads = {k: v.grad for k, v in leaves.items() if v is not None and v.grad is not None}
    return out.detach(), grads


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (got.double() - ref.double()).abs().max().item()
    return diff / max(ref.double().abs().max().item(), 1e-30)


def run_checks(fused: Any, rec: Recorder, device: torch.device, checks: list) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for shape, dtype, cl, with_sc, out_act, act, *rest in checks:
        in_place = bool(rest and rest[0])
        inputs = make_inputs(shape, dtype, cl, with_sc, device, gen)
        if in_place and inputs["shortcut"] is not None:  # a wider shortcut, as under autocast
            inputs["shortcut"] = inputs["shortcut"].float()
        grad_out = torch.randn(shape, generator=gen, device=device).to(dtype)
        supports = fused.supports(inputs["x"], inputs["shortcut"], act, "sigmoid", out_act)
        out, grads = forward_backward(fused.se_residual, inputs, (act, out_act), grad_out,
                                      lambda t: t, in_place)
        ref, ref_grads = forward_backward(fused.se_residual_reference, inputs, (act, out_act),
                                          grad_out, lambda t: t.float(), in_place)
        errors = {"out": rel_err(out, ref),
                  **{k: rel_err(g, ref_grads[k]) for k, g in grads.items()}}
        # the shortcut's gradient is dz, in the output's dtype
        tols = {"out": TOL[out.dtype], **{k: max(TOL[g.dtype], TOL[out.dtype]) for k, g in grads.items()}}
        ok = supports and all(errors[k] <= tols[k] for k in errors)
        ok = ok and (not cl or out.stride() == inputs["x"].stride())
        ok = ok and (not in_place or out.dtype == inputs["x"].dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()  # a kernel's illegal access surfaces here, not later
        rec.failures += not ok
        rec.kernels_ok = rec.kernels_ok and ok
        rec.write("check", shape=list(shape), dtype=str(dtype), channels_last=cl,
                  shortcut=with_sc, out_act=out_act, act=act, in_place=in_place, supports=supports,
                  ok=ok, rel_err=errors)


def bench(fn: Callable[[], Any], device: torch.device) -> dict:
    """Median and 20th/80th percentiles in microseconds (do_bench on CUDA, a loop on CPU)."""
    if device.type == "cuda":
        import triton.testing

        p20, p50, p80 = triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.2, 0.5, 0.8])
        return {"us": p50 * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3}
    fn()
    start = time.perf_counter()
    fn()
    return {"us": (time.perf_counter() - start) * 1e6, "p20_us": None, "p80_us": None}


def stage_timings(fused: Any, rec: Recorder, device: torch.device, batch: int, C: int,
                  side: int, layout: str = "channels_last") -> None:
    """Every timing at one stage shape and layout; only torch's rows when the kernels failed."""
    from se_inject.fused import backward, scale, squeeze

    gen = torch.Generator(device=device).manual_seed(0)
    inputs = make_inputs((batch, C, side, side), torch.bfloat16, layout == "channels_last", True,
                         device, gen)
    x, sc = inputs["x"], inputs["shortcut"]
    g = torch.rand(batch, C, generator=gen, device=device)
    g4 = g.to(x.dtype)[:, :, None, None]
    mbytes = x.numel() * x.element_size() / 1e6
    stage = f"{C}x{side}x{side}"

    def put(what: str, impl: str, result: dict, passes: float) -> None:
        gbps = passes * mbytes / result["us"] * 1e3 if result["us"] else None  # MB/us = TB/s
        rec.write("time", stage=stage, layout=layout, batch=batch, tensor_mb=round(mbytes, 1),
                  what=what, impl=impl, passes=passes, gb_per_s=gbps, **result)

    y = torch.empty_like(x)
    copy = bench(lambda: y.copy_(x), device)
    put("bandwidth", "copy", copy, 2)
    put("bandwidth", "floor: one read at copy bandwidth", {**copy, "us": copy["us"] / 2,
                                                            "p20_us": None, "p80_us": None}, 1)
    put("squeeze", "torch mean", bench(lambda: x.mean((2, 3)), device), 1)
    put("scale", "torch relu(x*g+sc)", bench(lambda: torch.relu(x * g4 + sc), device), 3)
    put("scale", "torch relu(x+sc) (original model)", bench(lambda: torch.relu(x + sc), device), 3)
    args = (inputs["fc1_weight"], inputs["fc1_bias"], inputs["fc2_weight"], inputs["fc2_bias"],
            inputs["gain"], "relu", "sigmoid", "relu")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        put("se tail forward", "torch reference (autocast)",
            bench(lambda: fused.se_residual_reference(x, sc, *args), device), 4)
    if not rec.kernels_ok:
        rec.write("skipped", what=f"Triton rows at {stage} {layout}", reason=PLAIN_ONLY)
        backward_timings(fused, put, device, inputs, args, fused_rows=False)
        return
    put("squeeze", "triton squeeze", bench(lambda: squeeze.squeeze_launch(x), device), 1)
    put("scale", "triton fused scale+add+relu",
        bench(lambda: scale.scale_launch(x, g, sc, "relu"), device), 3)
    put("se tail forward", "fused op", bench(lambda: fused.se_residual(x, sc, *args), device), 4)
    backward_timings(fused, put, device, inputs, args)
    dout = torch.randn_like(x)
    out = scale.scale_launch(x, g, sc, "relu")
    put("backward kernels", "K1 gate grad (relu, stores dz)",
        bench(lambda: backward.gate_grad_launch(dout, x, sc, out, g, "relu"), device), 4)
    put("backward kernels", "K2 input grad",
        bench(lambda: backward.input_grad_launch(dout, x, g, g), device), 2)


def backward_timings(fused: Any, put: Callable, device: torch.device, inputs: dict,
                     args: tuple, fused_rows: bool = True) -> None:
    """The backward alone: autograd.grad on a kept graph, for the reference and the op."""
    variants = [("torch autograd of the reference (autocast)", fused.se_residual_reference, True),
                ("fused backward", fused.se_residual, False)]
    for impl, fn, autocast in variants[:2 if fused_rows else 1]:
        leaves = [inputs[k].detach().requires_grad_() for k in ("x", "shortcut")]
        params = [a.detach().requires_grad_() for a in args[:4]]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = fn(*leaves, *params, *args[4:])
        grad = torch.randn_like(out)
        wrt = leaves + params
        put("se tail backward", impl,
            bench(lambda: torch.autograd.grad(out, wrt, grad, retain_graph=True), device), 6)
        del out


def mutation_analysis(rec: Recorder, device: torch.device) -> None:
    """Which kernel arguments inductor believes each launch writes (private API, best effort)."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw
    from torch.fx.experimental.proxy_tensor import make_fx

    from se_inject.fused import backward, scale, squeeze

    x = torch.randn(4, 96, 5, 6, device=device, dtype=torch.bfloat16).to(
        memory_format=torch.channels_last)
    g = torch.rand(4, 96, device=device)

    def tail(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        s = squeeze.squeeze_launch(x)
        out = scale.scale_launch(x, g, x, "silu")
        dg, dz = backward.gate_grad_launch(out, x, x, None, g, "silu")
        return backward.input_grad_launch(dz, x, s, dg)

    gm = make_fx(tail, tracing_mode="fake")(x, g)
    for node in gm.graph.nodes:
        if "triton_kernel_wrapper" not in str(node.target):
            continue
        kw = node.kwargs
        real = {k: (_like(v.meta["val"], device) if isinstance(v, torch.fx.Node) else v)
                for k, v in kw["kwargs"].items()}
        name = tkw.kernel_side_table.get_kernel(kw["kernel_idx"]).fn.__name__
        try:
            mutated = tkw.get_mutated_tensors(kw["kernel_idx"], kw["constant_args_idx"], real,
                                              kw.get("tma_descriptor_metadata", {}))
        except Exception as e:  # the private API moved between torch versions
            mutated = f"unavailable: {type(e).__name__}: {e}"
        rec.write("mutation", kernel=name, mutated=mutated)


def _like(val: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=device)


def _fresh_compile() -> None:
    """Each compiled variant from scratch, and a recompile-limit hit raises instead of silently
    running eager."""
    torch._dynamo.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def compile_check(fused: Any, rec: Recorder, device: torch.device, shape: tuple) -> None:
    """torch.compile(fullgraph=True) of the op, forward and backward, against eager.

    Under --interpret-smoke the compiled graph takes the op's torch-ops path (interpreted kernels
    cannot run on fake tensors) and eager the interpreted kernels.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = make_inputs(shape, torch.bfloat16, True, True, device, gen)
    grad_out = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
    start = time.monotonic()
    _fresh_compile()
    compiled = torch.compile(fused.se_residual, fullgraph=True)
    out, grads = forward_backward(compiled, inputs, ("relu", "relu"), grad_out, lambda t: t)
    ref, ref_grads = forward_backward(fused.se_residual, inputs, ("relu", "relu"), grad_out,
                                      lambda t: t)
    errors = {"out": rel_err(out, ref), **{k: rel_err(g, ref_grads[k]) for k, g in grads.items()}}
    ok = all(e <= 1e-2 for e in errors.values())
    rec.failures += not ok
    rec.write("compile", what="op forward+backward", ok=ok, rel_err=errors,
              seconds=round(time.monotonic() - start, 1))


def _small_model(device: torch.device, smoke: bool) -> tuple:
    """A converted resnet10t (four SE blocks, each before a residual add) and a batch for it."""
    import timm

    import se_inject

    torch.manual_seed(0)
    size, batch = (32, 2) if smoke else (64, 16)
    model = se_inject.apply(timm.create_model("resnet10t", num_classes=10, zero_init_last=False),
                            example_inputs=torch.randn(1, 3, size, size))
    fmt = torch.contiguous_format if smoke else torch.channels_last
    model = model.to(device).to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    return model, x, torch.randint(0, 10, (batch,), device=device)


def _training_step(model: Callable, params: dict, x: torch.Tensor, target: torch.Tensor,
                   device: torch.device) -> tuple:
    for p in params.values():
        p.grad = None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(x)
    loss = torch.nn.functional.cross_entropy(out.float(), target)
    loss.backward()
    return out.detach().float(), loss.detach(), {n: p.grad.detach().clone() for n, p in params.items()}


def training_step_check(rec: Recorder, device: torch.device, smoke: bool) -> None:
    """A compiled training step with kernels="fused" against eager plain ops: forward, loss and
    every parameter's gradient; the dynamo graph must hold one fused op per SE block."""
    import se_inject
    from se_inject import SEBlock

    model, x, target = _small_model(device, smoke)
    model.train()
    params = dict(model.named_parameters())
    blocks = sum(isinstance(m, SEBlock) for m in model.modules())
    se_inject.set_kernels(model, "plain")
    ref_out, ref_loss, ref_grads = _training_step(model, params, x, target, device)
    se_inject.set_kernels(model, "fused")
    graphs: list = []
    inductor = "aot_eager" if smoke else "inductor"  # the CPU smoke run checks code paths only

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return torch._dynamo.lookup_backend(inductor)(gm, example_inputs)

    start = time.monotonic()
    _fresh_compile()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out, loss, grads = _training_step(compiled, params, x, target, device)
    ops = sum(str(n.target) == "se_inject.se_residual.default" for g in graphs for n in g.graph.nodes)
    errors = {"out": rel_err(out, ref_out), "loss": rel_err(loss, ref_loss),
              **{f"grad {n}": rel_err(g, ref_grads[n]) for n, g in grads.items()}}
    worst = max((k for k in errors if k.startswith("grad")), key=errors.get)
    ok = (ops == _fused_ops_expected(blocks, device) and errors["out"] < 3e-2 and errors["loss"] < 3e-2
          and errors[worst] < 1e-1)
    rec.failures += not ok
    rec.write("compile", what="training step, kernels='fused' compiled vs plain eager", ok=ok,
              se_blocks=blocks, fused_ops_in_graph=ops, out_rel_err=errors["out"],
              loss_rel_err=errors["loss"], grad_rel_err_max=errors[worst], worst_grad=worst,
              backend=inductor, seconds=round(time.monotonic() - start, 1))
    se_inject.set_kernels(model, "auto")


def export_check(rec: Recorder, device: torch.device, smoke: bool) -> None:
    """torch.export of the fused model (eval): one fused op per SE block, same outputs."""
    import se_inject
    from se_inject import SEBlock

    model, x, _ = _small_model(device, smoke)
    model = se_inject.set_kernels(model.eval(), "fused")
    blocks = sum(isinstance(m, SEBlock) for m in model.modules())
    start = time.monotonic()
    with torch.no_grad():
        want = model(x)
        exported = torch.export.export(model, (x,))
        got = exported.module()(x)
    ops = sum(str(n.target) == "se_inject.se_residual.default" for n in exported.graph.nodes)
    err = rel_err(got, want)
    ok = ops == _fused_ops_expected(blocks, device) and err < 1e-3
    rec.failures += not ok
    rec.write("compile", what="torch.export of the fused model", ok=ok, se_blocks=blocks,
              fused_ops_in_graph=ops, rel_err=err, seconds=round(time.monotonic() - start, 1))


def _fused_ops_expected(blocks: int, device: torch.device) -> int:
    """Fused ops a traced graph must hold: one per SE block on CUDA; none in the CPU smoke run,
    where interpreted kernels need real data, so tracing (fake tensors) takes the plain ops."""
    return blocks if device.type == "cuda" else 0


PLAIN_ONLY = "a kernel check failed: every later section uses plain kernels only"
CUDA_ERRORS = ("CUDA error", "illegal memory access", "AcceleratorError", "device-side assert")


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu-kernels.jsonl"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--budget-s", type=float, default=170.0, help="start no new work after this")
    p.add_argument("--interpret-smoke", action="store_true",
                   help="CPU tensors through Triton's interpreter, tiny shapes (checks code paths)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile checks")
    p.add_argument("--no-timings", action="store_true",
                   help="checks only: no per-stage timings (gpu_se.py runs them later, in a second process)")
    p.add_argument("--timings-only", action="store_true",
                   help="the per-stage timings alone, for kernels whose checks passed in an earlier process "
                        "(with --plain-only: torch's rows only)")
    p.add_argument("--plain-only", action="store_true",
                   help=argparse.SUPPRESS)  # the restart after a CUDA error in the kernel checks
    args = p.parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before se_inject.fused decorates its kernels
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("gpu_kernels.py: no CUDA device here, nothing to measure "
              "(run it on a GPU machine, or pass --interpret-smoke to check its code paths)")
        return 0
    import se_inject.fused as fused

    rec = Recorder(args.out, args.budget_s)
    rec.write("env", torch=torch.__version__, triton=_triton_version(), device=_device_name(device),
              interpreted=fused.INTERPRETED, argv=sys.argv[1:], time=time.strftime("%FT%T%z"))
    if args.plain_only:
        rec.kernels_ok = False
        rec.write("plain kernels", reason=PLAIN_ONLY + (" (the checks failed in an earlier process)"
                                                        if args.timings_only else " (restarted after a CUDA error)"))
    elif args.timings_only:
        rec.write("checks skipped", reason="--timings-only: the kernel checks passed in an earlier process")
    else:
        error = guarded(rec, "checks", run_checks, fused, rec, device,
                        SMOKE_CHECKS if args.interpret_smoke else CHECKS)
        if error is not None:
            rec.kernels_ok = False
            if any(e in error for e in CUDA_ERRORS):  # this process's CUDA context is gone
                return _restart_plain_only(rec, argv)
        if not rec.kernels_ok:
            rec.write("plain kernels", reason=PLAIN_ONLY)
    if not args.timings_only:
        rec.write("checks done", kernels_ok=rec.kernels_ok)
    if not (args.no_compile or args.timings_only):
        compile_sections(fused, rec, device, args.interpret_smoke)
    batch = 2 if args.interpret_smoke else args.batch_size
    for C, side in [] if args.no_timings else STAGES:
        for layout in LAYOUTS:
            if rec.left() < 10:
                rec.write("skipped", what=f"stage {C}x{side}x{side} {layout}", reason="time budget")
                continue
            c, sd = (C // 32, max(3, side // 8)) if args.interpret_smoke else (C, side)
            guarded(rec, f"stage {c}x{sd}x{sd} {layout}", stage_timings, fused, rec, device, batch,
                    c, sd, layout)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rec.write("done", failures=rec.failures, kernels_ok=rec.kernels_ok, seconds_left=round(rec.left(), 1))
    return 2 if not rec.kernels_ok else (1 if rec.failures else 0)


def compile_sections(fused: Any, rec: Recorder, device: torch.device, smoke: bool) -> None:
    """The op compiled, a compiled training step, export, mutation analysis: each only if its
    estimate fits in what is left, and none when the kernel checks failed."""
    shape = (2, 16, 5, 5) if smoke else (8, 256, 14, 14)
    sections = [("compile op", lambda: compile_check(fused, rec, device, shape)),
                ("compile training step", lambda: training_step_check(rec, device, smoke)),
                ("export", lambda: export_check(rec, device, smoke))]
    for name, run in sections:
        estimate = 5.0 if smoke else COMPILE_ESTIMATES[name]
        if not rec.kernels_ok:
            rec.write("skipped", what=name, reason=PLAIN_ONLY)
        elif rec.left() < estimate:
            rec.write("skipped", what=name, reason=f"time budget: needs about {estimate:.0f} s, "
                                                   f"{rec.left():.0f} s left")
        else:
            guarded(rec, name, run)
    torch._dynamo.reset()
    if device.type == "cuda" and rec.kernels_ok:
        guarded(rec, "mutation analysis", mutation_analysis, rec, device)


def _restart_plain_only(rec: Recorder, argv: Optional[list]) -> int:
    """Run the remaining sections in a fresh process (plain kernels only); its exit code."""
    import subprocess

    args = [a for a in (sys.argv[1:] if argv is None else argv)]
    if "--budget-s" in args:
        i = args.index("--budget-s")
        del args[i:i + 2]
    rec.write("restart", reason="CUDA error in the kernel checks; the rest runs in a fresh process",
              budget_s=round(rec.left(), 1))
    rec.file.close()
    done = subprocess.run([sys.executable, __file__, *args, "--plain-only", "--budget-s",
                           str(max(1.0, rec.left()))])
    return 2 if done.returncode in (0, 1, 2) else done.returncode


def guarded(rec: Recorder, section: str, fn: Callable, *args: Any) -> Optional[str]:
    """Run one section; an exception is recorded as a failure (and returned, as text) and the
    run goes on."""
    try:
        fn(*args)
    except Exception as e:  # a one-shot run should report every section it can
        rec.failures += 1
        error = f"{type(e).__name__}: {e}"
        rec.write("error", section=section, error=error, traceback=traceback.format_exc()[-3000:])
        return error
    return None


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreted)"


if __name__ == "__main__":
    sys.exit(main())
