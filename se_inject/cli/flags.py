"""The SE options as command-line flags: ``--rd-divisor`` for ``rd_divisor``, one per option of
:class:`~se_inject.options.SEOptions`, documented by the option itself.

:data:`FLAGS` is the command line's own metadata of each option (argparse's ``metavar``,
``choices``, ``type`` and ``action``, how a flag's value becomes the option's, and a note for the
help); the option list, the defaults and the documentation are the options'. A new option without
an entry here is refused when the parser is built.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Optional

from ..layers import ACT_LAYERS, GATE_LAYERS
from ..modules.attentions import ATTENTIONS
from ..options import ATTENTION_DEFAULT, KERNELS, POSITIONS, SEOptions, default_text

__all__ = ["FLAGS", "add_options", "options_from"]


def _from_cli_divisor(value: int) -> Optional[int]:
    return None if value == 0 else value


#: Per option: argparse's keyword arguments, plus ``convert`` (flag value -> option value) and
#: ``note`` (appended to the help).
FLAGS: dict[str, dict[str, Any]] = {
    "reduction": dict(metavar="R", type=int),
    "rd_divisor": dict(metavar="N", type=int, convert=_from_cli_divisor, note="on the command line 0 stands for None"),
    "act_layer": dict(metavar="NAME", choices=sorted(ACT_LAYERS)),
    "gate_layer": dict(metavar="NAME", choices=sorted(GATE_LAYERS)),
    "identity_init": dict(action="store_true"),
    "include": dict(action="append", metavar="PATTERN", note="repeatable"),
    "exclude": dict(action="append", metavar="PATTERN", note="repeatable"),
    "min_channels": dict(metavar="N", type=int),
    "attn": dict(metavar="NAME", choices=sorted(ATTENTIONS)),
    "position": dict(metavar="WHERE", choices=list(POSITIONS)),
    "fuse_residual": dict(action=argparse.BooleanOptionalAction),
    "kernels": dict(metavar="MODE", choices=list(KERNELS)),
}


def _flags(name: str) -> dict[str, Any]:
    if name not in FLAGS:
        raise KeyError(f"SEOptions.{name} has no command-line flag: add it to se_inject.cli.flags.FLAGS")
    return FLAGS[name]


def add_options(parser: argparse.ArgumentParser) -> None:
    """One flag per SE option (``--rd-divisor`` for ``rd_divisor``), documented by the option."""
    for f in dataclasses.fields(SEOptions):
        flags = _flags(f.name)
        kwargs = {k: v for k, v in flags.items() if k not in ("convert", "note")}
        note = flags.get("note")
        shown = default_text(f.name) if f.default is ATTENTION_DEFAULT else str(f.default)
        default = "" if kwargs.get("action") else f" (default {shown})"
        help_text = f.metadata["doc"].rstrip(".") + (f"; {note}" if note else "") + default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=help_text, **kwargs)


def options_from(args: argparse.Namespace) -> dict[str, Any]:
    """The SE options given on the command line, as keyword arguments of ``inject``."""
    options = {}
    for f in dataclasses.fields(SEOptions):
        flags = _flags(f.name)
        value = getattr(args, f.name)
        if value is None and flags.get("action") is not None:
            continue  # an unrepeated --include / --exclude: the option's own default
        convert = flags.get("convert")
        options[f.name] = convert(value) if convert and value is not None else f.default if value is None else value
    return options
