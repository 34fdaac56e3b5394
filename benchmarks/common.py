"""What every benchmark script shares: one table drawn both with rich and as markdown, and
results written with the library versions and the command that produced them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import timm
import torch
import torchvision
from rich.console import Console
from rich.table import Table

import se_inject

RESULTS = Path(__file__).resolve().parent / "results"


def versions() -> dict[str, str]:
    """The versions a result depends on."""
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "se_inject": se_inject.__version__}


def command(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command line that reproduces a run: ``python benchmarks/<script> <args>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([f"python benchmarks/{script}", *args])


def table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
          align: str = "", heading: Optional[str] = None) -> str:
    """Print ``rows`` as a rich table and return the same table as markdown.

    ``align`` has one letter per column, ``l`` or ``r`` (default: the first column left, the
    others right, as for a name and its numbers). ``heading`` is a markdown heading put above
    the table.
    """
    align = align or "l" + "r" * (len(columns) - 1)
    rich_table = Table(title=title, title_justify="left")
    for name, a in zip(columns, align):
        rich_table.add_column(name, justify="left" if a == "l" else "right")
    md = ([heading, ""] if heading else []) + [
        "| " + " | ".join(columns) + " |", "|" + "".join("---|" if a == "l" else "---:|" for a in align)]
    for row in rows:
        rich_table.add_row(*row)
        md.append("| " + " | ".join(row) + " |")
    console.print(rich_table)
    return "\n".join(md) + "\n"


def write_results(stem: str, data: dict[str, Any], markdown: str, *, script: str,
                  argv: Optional[Sequence[str]] = None, out: Path = RESULTS, title: str = "") -> Path:
    """Write ``<out>/<stem>.json`` (the data, the versions and the command) and ``<stem>.md``
    (``title``, the markdown and the command). Returns the markdown file's path."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = command(script, argv)
    (out / f"{stem}.json").write_text(json.dumps({**versions(), **data, "command": cmd}, indent=2) + "\n")
    md_path = out / f"{stem}.md"
    md_path.write_text((f"# {title}\n\n" if title else "") + markdown.rstrip() + f"\n\nCommand: `{cmd}`\n")
    return md_path
