"""Compare two coverage results outcome by outcome (what a refactor or a new feature must keep).

    python benchmarks/compare_coverage.py benchmarks/results/coverage.json /tmp/new/coverage.json

Outcomes are matched by (family, model). Every field must be equal but ``seconds``; a
``max_rel_diff`` that moved by float noise only (both below ``--noise``, default 1e-5) counts as
equal. Prints each difference and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def differences(old: list[dict], new: list[dict], noise: float) -> list[str]:
    key = lambda o: (o.get("family"), o["model"])  # noqa: E731
    a, b = {key(o): o for o in old}, {key(o): o for o in new}
    out = [f"{k}: only in {'the first' if k in a else 'the second'}" for k in sorted(set(a) ^ set(b), key=str)]
    for k in sorted(set(a) & set(b), key=str):
        fields = (set(a[k]) | set(b[k])) - {"seconds"}
        changed = {f: (a[k].get(f), b[k].get(f)) for f in fields if a[k].get(f) != b[k].get(f)}
        diff = changed.get("max_rel_diff")
        if diff and all(v is not None and v < noise for v in diff):
            del changed["max_rel_diff"]
        if changed:
            out.append(f"{k}: {changed}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--noise", type=float, default=1e-5)
    args = p.parse_args(argv)
    old, new = (json.loads(path.read_text())["outcomes"] for path in (args.old, args.new))
    found = differences(old, new, args.noise)
    print("\n".join(found) if found else f"identical: {len(old)} outcomes (seconds and float noise aside)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
