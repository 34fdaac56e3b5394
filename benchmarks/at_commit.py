"""Run a benchmark's worker against se_inject as it was at another commit, side by side with now.

A worker is the same script started again with ``--worker``: it imports se_inject from the path
it is given first on ``PYTHONPATH``, measures, and prints one JSON object as its last line of
stdout. :func:`source_at` extracts ``se_inject/`` of a commit (``git archive``, no worktree) into
a temporary folder, so "before" and "after" come from one command on one machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def source_at(commit: str, into: Optional[Path] = None) -> Path:
    """A folder holding ``se_inject/`` as it was at ``commit`` (put it first on PYTHONPATH)."""
    into = into or Path(tempfile.mkdtemp(prefix=f"se_inject-{commit[:10]}-"))
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "se_inject"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    return into


def run_worker(script: Path, args: Sequence[str], source: Path, env: Optional[dict] = None,
               timeout: float = 1800) -> Any:
    """``python <script> --worker <args>`` with ``source`` first on PYTHONPATH; its JSON result."""
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join([str(source), str(ROOT), full.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script), "--worker", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} --worker failed against {source}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def head_commit() -> str:
    """The checked-out commit, with ``+dirty`` when the work tree has uncommitted changes."""
    sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "se_inject"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return sha + ("+dirty" if dirty else "")
