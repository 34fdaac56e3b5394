"""The GPU command's correctness check: a converted resnet50 on CUDA, fused against plain kernels.

``benchmarks/gpu_se.py`` runs :func:`check` after the kernel checks (``gpu_kernels.py``, which
test the op alone at chosen shapes) and before any timing: the same op inside a whole converted
model, at its real shapes and strides, in a training step and in a fullgraph trace. A check that
fails switches the command's later sections to plain kernels.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.nn import functional as F

try:
    from . import gpu_kernels
except ImportError:  # run as a script: python benchmarks/gpu_se.py
    import gpu_kernels  # type: ignore[no-redef]

import se_inject

__all__ = ["check"]


class _Calls:
    """Counts the calls of ``module.name`` while the context is open (the function still runs)."""

    def __init__(self, module: Any, name: str) -> None:
        self.module, self.name, self.count = module, name, 0

    def __enter__(self) -> "_Calls":
        self.original = getattr(self.module, self.name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return self.original(*args, **kwargs)

        setattr(self.module, self.name, counted)
        return self

    def __exit__(self, *exc: Any) -> None:
        setattr(self.module, self.name, self.original)


def check(device: torch.device, name: str = "resnet50", size: int = 224, batch: int = 8,
          fused: bool = True) -> dict[str, Any]:
    """A converted ``name`` on ``device``: fused against plain kernels, forward, loss, every gradient.

    A training step (train mode, cross-entropy, backward) runs four times on the same weights and
    batch, TF32 off: plain and fused kernels in fp32, and plain and fused under bf16 autocast.

    * fp32: fused against plain, each error relative to plain's largest value: output and loss
      within 1e-3, the worst gradient of all parameters within 1e-2 (rounding through 50 layers;
      a wrong kernel is off by order 1);
    * bf16: both against the fp32 plain run; fused's errors at most twice plain's plus 0.005 (as
      accurate as plain bf16, whose gradient errors alone can reach order 1 for SE's small
      weights, so this checks the bf16 path runs and stays finite, not its last digits);
    * the fused op called once per SE block and pass (on CUDA, with ``fused``), and
      ``torch.compile(fullgraph=True)`` of the eval model (a capturing backend: tracing only, fp32)
      holds one fused op per SE block with kernels="fused", none with "auto", and matches eager.
    """
    import timm

    import se_inject.fused
    from se_inject import SEBlock

    torch.manual_seed(0)
    model = se_inject.apply(timm.create_model(name, zero_init_last=False), example_inputs=torch.randn(1, 3, size, size))
    blocks = sum(isinstance(m, SEBlock) for m in model.modules())
    model = model.to(device=device, memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device=device, memory_format=torch.channels_last)
    expected = blocks if device.type == "cuda" and fused else 0
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            classes = model.eval()(x[:1]).shape[-1]
        y = torch.randint(0, classes, (batch,), generator=gen).to(device)
        runs = {(kernels, bf16): _training_step(model, x, y, kernels, bf16) for bf16 in (False, True)
                for kernels in ("plain", "fused")}
        traced = {kernels: _traced(model, x, kernels) for kernels in ("auto", "fused")}
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        se_inject.set_kernels(model, "auto")
    reference = runs[("plain", False)]
    result: dict[str, Any] = {
        "model": name, "batch": batch, "img_size": size, "se_blocks": blocks, "fused_calls_expected": expected,
        "fused_calls": {"fp32": runs[("fused", False)]["calls"], "bf16": runs[("fused", True)]["calls"]},
        "fp32": _errors(runs[("fused", False)], reference),
        "bf16": {k: _errors(runs[(k, True)], reference) for k in ("plain", "fused")}, "traced": traced}
    fp32 = result["fp32"]["out"] <= 1e-3 and result["fp32"]["loss"] <= 1e-3 and result["fp32"]["grad_max"] <= 1e-2
    bf16 = all(result["bf16"]["fused"][k] <= 2 * result["bf16"]["plain"][k] + 5e-3 for k in ("out", "loss", "grad_max"))
    calls = set(result["fused_calls"].values()) == {expected}
    trace = (traced["fused"]["fused_ops"] == expected and traced["auto"]["fused_ops"] == 0
             and all(t["rel_err"] <= 1e-4 for t in traced.values()))
    result["ok"] = fp32 and bf16 and calls and trace
    return result


def _training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, kernels: str,
                   bf16: bool) -> dict[str, Any]:
    """One forward (train mode), cross-entropy and backward with ``kernels``: output, loss, every
    gradient, and how often the fused op was called."""
    import se_inject.fused

    se_inject.set_kernels(model, kernels)
    model.train().zero_grad(set_to_none=True)
    with _Calls(se_inject.fused, "se_residual") as calls, torch.autocast(x.device.type, dtype=torch.bfloat16,
                                                                          enabled=bf16):
        out = model(x)
    loss = F.cross_entropy(out.float(), y)
    loss.backward()
    return {"out": out.detach().float(), "loss": loss.detach(), "calls": calls.count,
            "grads": {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}}


def _errors(run: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``run``'s output, loss and worst gradient against ``reference``'s (relative to its largest value)."""
    grads = {n: gpu_kernels.rel_err(run["grads"][n], g) for n, g in reference["grads"].items()}
    worst = max(grads, key=grads.get)
    return {"out": gpu_kernels.rel_err(run["out"], reference["out"]),
            "loss": gpu_kernels.rel_err(run["loss"], reference["loss"]), "grad_max": grads[worst], "worst_grad": worst}


def _traced(model: torch.nn.Module, x: torch.Tensor, kernels: str) -> dict[str, Any]:
    """``torch.compile(fullgraph=True)`` of the eval model with ``kernels``, through a backend that
    keeps the graphs and runs them as traced: its fused ops, and its output against eager (fp32)."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return gm.forward

    se_inject.set_kernels(model, kernels)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.eval()(x)
        compiled = torch.compile(model, backend=capture, fullgraph=True)(x)
    torch._dynamo.reset()
    ops = sum(str(n.target) == "se_inject.se_residual.default" for g in graphs for n in g.graph.nodes)
    return {"graphs": len(graphs), "fused_ops": ops, "rel_err": gpu_kernels.rel_err(compiled, eager)}
