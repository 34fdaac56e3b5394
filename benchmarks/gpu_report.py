"""``benchmarks/gpu_se.py``'s results as markdown: the run, its sections, every cell as it came.

:func:`markdown` draws the command's state (what ``gpu-se.json`` holds) and gpu_kernels.py's log;
``gpu_se.py`` rewrites ``gpu-se.md`` with it after every cell, so a cut-off run keeps its tables.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["markdown"]


def _md_table(columns: list[str], rows: list[list[str]], align: str) -> list[str]:
    return (["| " + " | ".join(columns) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _pct(spread: Optional[dict[str, float]]) -> str:
    if not spread:
        return ""
    return f"{100 * spread['median']:+.1f}% ({100 * spread['q1']:+.1f}…{100 * spread['q3']:+.1f})"


def _mib(value: Optional[int]) -> str:
    return "" if value is None else f"{value / 2 ** 20:.1f}"


def _cell_rows(cells: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for c in cells:
        where = [c["model"], str(c["batch_size"]), c["mode"], "compiled" if c["compiled"] else "eager"]
        if c["skipped"]:
            rows.append(where + ["skipped", c["skipped"]] + [""] * 6)
            continue
        for t in c["timings"]:
            ms, v = t["ms"], t["variant"]
            rows.append(where + [v, f"{ms['median']:.2f} ({ms['q1']:.2f}–{ms['q3']:.2f})",
                                 f"{t['images_per_s']['median']:,.1f}", _pct(c["overhead"].get(v)),
                                 _pct(c["vs_twin"].get(v)), f"{t['warmup_s']:.1f}", _mib(t["saved_bytes"]),
                                 _mib(t["cuda_peak_bytes"])])
    return rows


def _note(record: dict[str, Any]) -> str:
    """Why a section was skipped or failed, or what it noted."""
    if record["status"] == "running":
        return "cut off here if the run ended"
    if record.get("result") and not record["result"].get("ok", True):
        return "FAILED: the fused kernels did not match plain ones"
    if record.get("kernels_ok") is False:
        return record.get("plain_kernels_from_here", "")
    return record.get("reason") or record.get("error") or "; ".join(record.get("notes", []))


def markdown(state: dict[str, Any], kernel_records: list[dict[str, Any]]) -> str:
    """The results as markdown: the run, its sections, the checks, every cell, the kernel timings."""
    lines = _header(state)
    lines += _kernel_checks(state.get("kernel_log") or {})
    checked = next((s.get("result") for s in state["sections"] if s["kind"] == "check" and s.get("result")), None)
    lines += _check(checked) if checked else []
    for s in state["sections"]:
        cells = [c for c in state["cells"] if c["section"] == s["name"]]
        lines += _cells(s, cells) if cells else []
    lines += _kernel_timings([r for r in kernel_records if r.get("kind") == "time"])
    lines += ["ms: median over rounds of the mean per iteration (IQR); vs original / vs timm: median (IQR) of the "
              "per-round paired ratios less 1; warm-up includes compilation; saved: bytes a training step keeps for "
              "backward; peak: CUDA memory a step allocates beyond the resident models."]
    return "\n".join(lines) + "\n"


def _header(state: dict[str, Any]) -> list[str]:
    env = state["environment"]
    cuda = f", CUDA {env['cuda']}, compute capability {env['capability']}" if env.get("cuda") else ""
    limits = "no time budget" if state["budget_s"] is None else (
        f"budget {state['budget_s']:.0f} s, hard limit {state['hard_limit_s'] or 0:.0f} s")
    lines = [f"# SE on {env['device']}: the GPU command{' (smoke run)' if state['smoke'] else ''}", "",
             f"torch {env['torch']}, Triton {env.get('triton')}{cuda}, timm {env['timm']}, se_inject "
             f"{env['se_inject']} at commit {state['commit']}; started {state['started']}; {limits}.", "",
             f"Command: `{state['command']}`", ""]
    if state["plain_kernels"]:
        lines += [f"**Plain kernels from the point noted on**: {state['plain_kernels']}.", ""]
    if state["stopped"]:
        lines += [f"**Stopped**: {state['stopped']}.", ""]
    rows = [[s["name"], s["status"], f"{s['estimate_s']:.0f}",
             "" if s.get("seconds") is None else f"{s['seconds']:.0f}", _note(s)] for s in state["sections"]]
    return lines + ["## Sections", ""] + _md_table(["section", "status", "estimate s", "took s", "note"], rows, "llrrl")


def _kernel_checks(summary: dict[str, Any]) -> list[str]:
    if not (summary.get("checks") or summary.get("errors")):
        return []
    lines = ["## Kernel checks (gpu_kernels.py)", "",
             f"{summary['checks_ok']} of {summary['checks']} op checks passed."]
    lines += [f"- compiled: {c['what']}: {'ok' if c['ok'] else 'FAILED'} ({c['seconds']} s)"
              for c in summary["compile"]]
    return lines + [f"- error: {e}" for e in summary["errors"]] + [f"- skipped: {s}" for s in summary["skipped"]] + [""]


def _check(checked: dict[str, Any]) -> list[str]:
    traced, calls = checked["traced"], checked["fused_calls"]
    lines = [f"## Check: a converted {checked['model']}, fused against plain kernels", "",
             f"{'ok' if checked['ok'] else 'FAILED'}: {checked['se_blocks']} SE blocks; fused op calls per training "
             f"step {calls['fp32']} in fp32 and {calls['bf16']} under bf16 (expected "
             f"{checked['fused_calls_expected']}); "
             f"fullgraph trace: {traced['fused']['fused_ops']} fused ops with kernels='fused', "
             f"{traced['auto']['fused_ops']} with 'auto'. Errors relative to the reference's largest value:", ""]
    runs = [("fp32, fused vs plain", checked["fp32"])] + [(f"bf16 {k} vs fp32 plain", checked["bf16"][k])
                                                          for k in ("plain", "fused")]
    return lines + _md_table(["run", "output", "loss", "worst gradient", "of"],
                             [[label, f"{e['out']:.2e}", f"{e['loss']:.2e}", f"{e['grad_max']:.2e}", e["worst_grad"]]
                              for label, e in runs], "lrrrl")


def _cells(section: dict[str, Any], cells: list[dict[str, Any]]) -> list[str]:
    settings = section["settings"]
    how = (f"{settings['dtype']}{', channels_last' if settings['channels_last'] else ''}, {settings['img_size']} px, "
           f"{settings['rounds']} rounds x {settings['reps']} reps, backend {settings['backend']}"
           + (f", mode {settings['compile_mode']}" if settings.get("compile_mode") else "")
           + (", freezing" if settings.get("freeze") else ""))
    columns = ["model", "batch", "mode", "", "variant", "ms (IQR)", "images/s", "vs original", "vs timm", "warm-up s",
               "saved MiB", "peak MiB"]
    return [f"## {section['name']}: {section['about']}", "", how + ".", ""] + _md_table(columns, _cell_rows(cells),
                                                                                        "lllll" + "r" * 7)


def _kernel_timings(timings: list[dict[str, Any]]) -> list[str]:
    if not timings:
        return []
    rows = [[r["stage"], r["layout"], r["what"], r["impl"],
             f"{r['us']:.1f}" + (f" ({r['p20_us']:.1f}–{r['p80_us']:.1f})" if r.get("p20_us") is not None else ""),
             "" if r.get("gb_per_s") is None else f"{r['gb_per_s']:.0f}"] for r in timings]
    return (["## Kernel timings (gpu_kernels.py; µs: median (p20–p80))", ""]
            + _md_table(["stage", "layout", "what", "impl", "µs", "GB/s"], rows, "llllrr"))
