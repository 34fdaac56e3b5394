"""Read weights for a source model from a file, without unpickling code.

``.safetensors`` files are read with safetensors; anything else with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Union

import safetensors.torch
import torch
from torch import nn

from ..errors import CheckpointError
from ..utils import describe_mismatch, first_line

__all__ = ["read_state_dict", "load_checkpoint"]

_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema")


def _legacy_torch_file(path: Path) -> bool:
    """Whether ``path`` starts like a pre-1.6 ``torch.save`` file (a pickle protocol header)."""
    with path.open("rb") as f:
        return f.read(1) == b"\x80"


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a state_dict from a ``.safetensors`` file or a ``torch.save`` file (zip or legacy).

    A torch checkpoint that wraps its state_dict under ``"state_dict"``, ``"model"`` or
    ``"state_dict_ema"`` (timm's and torchvision's training scripts do) is unwrapped.

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state: Any = safetensors.torch.load_file(str(path))
        else:  # zip archives and the legacy (pre-1.6) format; weights_only refuses pickled code
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = first_line(e) or type(e).__name__
        kind = "torch.save file" if zipfile.is_zipfile(path) or _legacy_torch_file(path) else "file"
        raise CheckpointError(f"cannot read checkpoint {path} as a .safetensors or torch.save file: this {kind} "
                              f"fails with {type(e).__name__}: {reason[:300]}") from e
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not (isinstance(state, dict) and state and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise CheckpointError(f"checkpoint {path} does not hold a state_dict (a mapping of names to tensors)")
    return state


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Load the weights in ``path`` into ``model``, strictly: every key, every shape.

    Raises:
        CheckpointError: the file cannot be read (see :func:`read_state_dict`) or does not fit
            ``model``; the message names the first missing, unexpected and mis-shaped tensors.
    """
    state = read_state_dict(path)
    mismatch = describe_mismatch(model.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__}: {mismatch}")
    model.load_state_dict(state, strict=True)
