"""Build and check the module of every site of the rewritten blocks, before the model changes.

:func:`build_sites_modules` is the pipeline's step between verification and the swap: each site's
module is built on its block's device and in its site's dtype (:func:`se_inject.modules.build.
build_module`) and run once on a tensor of its site's shape (:func:`~se_inject.modules.build.
check_module`), so that a module that cannot be built, does not run or changes its input's shape is
an error while the model is still untouched. :func:`site_record` gives the plan's :class:`Site`
what comes from that module.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import OptionError
from ..modules.attentions import hidden_width
from ..modules.build import build_module, check_module, identity_check
from ..modules.se_block import SEResidual
from ..options import SEOptions, attention_label
from ..utils import describe_error, join_path
from .cut import BlockRewrite, Candidate

__all__ = ["build_sites_modules", "site_record"]


def _site_tensor(cand: Candidate) -> tuple[int, tuple[int, ...], torch.dtype]:
    """Channels, shape and dtype of what the module of a candidate takes."""
    where = cand.place if cand.place is not None else cand.verdict
    return where.channels, tuple(where.shape), where.dtype


def build_sites_modules(rewrites: list[BlockRewrite], options: SEOptions) -> None:
    """Build and check the module of every site of ``rewrites``, in the order
    the swap installs them, before anything in the model changes (``Candidate.module``).

    Raises:
        OptionError: a module cannot be built, does not run on its site's input, changes its shape
            or dtype, or is not an identity where identity init was asked for; it names the
            attention and the site.
    """
    label, identity = attention_label(options.attn), identity_check(options)
    for rw in rewrites:
        param = next((p for p in rw.module.parameters() if p.is_floating_point()), None)
        device = param.device if param is not None else None
        for p in rw.placements:
            cand = p.candidate
            channels, shape, dtype = _site_tensor(cand)
            site = join_path(rw.path, p.name)
            residual = (p.fused, p.add_in_place) if p.fused is not None else None
            try:
                module = build_module(options, channels, len(shape) - 2, device=device, dtype=dtype,
                                      residual=residual)
            except OptionError:
                raise
            except Exception as e:
                raise OptionError(f"attn={label} cannot be built for {channels} channels at {site}: "
                                  f"{describe_error(e)}") from e
            if not isinstance(module, SEResidual):  # SE that does the add: its layers were checked by SEOptions
                check_module(module, label, site, shape, dtype, identity, device)
            cand.module = module


def site_record(cand: Candidate, options: SEOptions) -> dict[str, Any]:
    """The fields of a plan's Site that come from the module built for a candidate."""
    channels, shape, _ = _site_tensor(cand)
    module = cand.module
    return {"channels": channels, "hidden": hidden_width(module, options.attn), "shape": shape, "attn": attention_label(options.attn),
            "position": options.position, "where": cand.where,
            "param_count": sum(p.numel() for p in module.parameters())}
