"""Fused GPU kernels for Squeeze-and-Excitation, in Triton, and the ``torch.library`` op that runs them.

Paper: `Squeeze-and-Excitation Networks`, Hu et al., CVPR 2018 - https://arxiv.org/abs/1709.01507

On a GPU, SE is memory-bound: every op it adds reads or writes a whole feature map. The fused
path reads x once for the squeeze and once more for ``out_act(x * g + shortcut)``, which replaces
the separate scale, residual add and activation (``docs/gpu.md`` in the repository has the
measurements this follows, with the machines and commits they come from).

* :func:`se_residual`: the fused op ``se_inject::se_residual`` (Triton on CUDA, torch ops elsewhere;
  one ``torch.ops.se_inject.se_residual`` node under torch.compile and torch.export).
* :func:`se_residual_reference`: the same maths in plain torch ops; the CPU path and test oracle.
* :func:`use_fused`: the one decision between the Triton kernels and plain torch ops (the
  ``kernels`` mode, torch.compile, names, tensors and the GPU's capability);
  :func:`supports` is ``use_fused("fused", ...)``.

The room's modules: ``se_residual.py`` (the op: its forward, autograd and the decision),
``squeeze.py`` (the squeeze kernel and its launcher), ``scale.py`` (the scale-add-activation
kernel and its launcher), ``backward.py`` (the backward's two kernels and their launchers),
``mlp.py`` (the excitation MLP and its written-out backward), ``_common.py`` (Triton, where the
kernels run, shared program ids, the one launch function, op registration) and ``_plan.py``
(tiles, ``num_warps`` and grids from shapes, strides, dtypes and the device, cached). The names of
the activations, gates and activations after the add, and their maths, are the core vocabulary
:mod:`se_inject.layers`.
"""

from ._common import HAS_TRITON, INTERPRETED, OUT_ACTS
from .mlp import ACTS, GATES
from .se_residual import se_residual, se_residual_reference, supports, use_fused

__all__ = ["se_residual", "se_residual_reference", "supports", "use_fused", "ACTS", "GATES",
           "OUT_ACTS", "HAS_TRITON", "INTERPRETED"]
