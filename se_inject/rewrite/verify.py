"""Check that rewritten blocks reproduce their modules.

fx can trace a module into a graph that computes something else (in-place ops, pytorch issue
68301). Each rewritten block carries a copying identity where SE will go, so on the input its
module received in a real forward, its graph must give the module's output; a mismatch also
exposes in-place ops that would alias the branch output.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..trace.record import outputs_match, recording
from ..utils import describe_error
from .cut import BlockRewrite

__all__ = ["verify_blocks"]


def verify_blocks(model: nn.Module, rewrites: Sequence[BlockRewrite], example_inputs: tuple[Any, ...]
                  ) -> dict[str, str]:
    """Run ``model`` once and compare each rewritten block's graph with its module's output.

    Returns:
        What went wrong, by block path, for the blocks that do not reproduce their module.
    """
    if not rewrites:
        return {}
    with recording(rw.module for rw in rewrites) as calls, torch.no_grad():
        model(*example_inputs)
    problems: dict[str, str] = {}
    with torch.no_grad():
        for rw in rewrites:
            call = calls.get(rw.module)
            if call is None:
                continue
            try:
                problem = outputs_match(call.output, rw.gm(*call.args, **call.kwargs))
            except Exception as e:
                problem = f"the traced graph fails: {describe_error(e)}"
            if problem is not None:
                problems[rw.path] = problem
    return problems
