"""The one-shot GPU command, without a GPU: benchmarks/gpu_se.py and its kernel section,
benchmarks/gpu_kernels.py.

gpu_se.py: its plan, its budget, its results, and honest compiles. The fast tests run the command's
sections with their work replaced (a fake clock, a fake ``se_inject.bench``, stubbed subprocesses);
the slow one replays the command's sections in order for real, on the CPU with tiny models, through
a torch.compile backend that counts what it compiles and runs, under a recompile limit of 1.

gpu_kernels.py, when the fused kernels fail: a failing kernel check must not cost the rest of a
one-shot GPU run: the later sections run with plain kernels and say so, a CUDA error (which leaves
the process's CUDA context unusable) restarts the script for them, and gpu_se.py switches its own
model sections to plain kernels. Its sections are replaced by recorders here; the CPU smoke run
(``python benchmarks/gpu_kernels.py --interpret-smoke``) runs them for real.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch._dynamo

import se_inject
import se_inject.fused
from benchmarks import gpu_check, gpu_kernels, gpu_se
from se_inject.cost.bench import BenchResult, Cell, Spread, Timing


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _restore_kernel_choice(monkeypatch):
    """Runs may switch this process to plain kernels (se_inject.fused.use_fused); undone after."""
    monkeypatch.setattr(se_inject.fused, "use_fused", se_inject.fused.use_fused)


def _run(tmp_path: Path, monkeypatch, took: dict[str, float], budget_s=430.0, **kwargs) -> tuple[gpu_se.Run, list]:
    """A Run whose sections only advance the clock (``took[kind]`` seconds) and say what ran."""
    clock, ran = Clock(), []

    def fake(kind):
        def run(self, section):
            ran.append(section.name)
            clock.now += took.get(section.name, took.get(kind, 1.0))
            return {}
        return run

    for kind in ("kernels", "kernel_timings", "check", "bench"):
        monkeypatch.setattr(gpu_se.Run, "_" + kind, fake(kind))
    return gpu_se.Run(tmp_path, budget_s=budget_s, smoke=True, clock=clock, **kwargs), ran


def _json(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "gpu-se.json").read_text())


# -- the plan ------------------------------------------------------------------------------------

def _budget_table() -> list[tuple[str, float, float]]:
    """(section, estimate, running sum) per row of gpu_se's docstring table."""
    lines = gpu_se.__doc__.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("==  "))
    spans = [(m.start(), m.end()) for m in re.finditer("=+", lines[head])]
    end = next(i for i in range(head + 3, len(lines)) if lines[i].startswith("=="))
    rows = []
    for line in lines[head + 3:end]:
        cells = [line[a:b].strip() for a, b in spans[:-1]] + [line[spans[-1][0]:].strip()]
        if cells[0]:
            rows.append((cells[1], float(cells[3]), float(cells[4])))
    return rows


def test_the_sections_run_in_priority_order_and_the_docstring_table_gives_each_estimate():
    sections = gpu_se.plan()
    assert [s.name for s in sections] == ["kernels", "check", "resnet50", "latency", "kernel timings", "cuda graphs",
                                          "freezing", "more models", "resnet50 b1 train"]
    table = _budget_table()
    assert table[0] == ("start", gpu_se.START_S, gpu_se.START_S)
    assert [(name, estimate) for name, estimate, _ in table[1:]] == [(s.name, s.estimate_s) for s in sections]
    running = gpu_se.START_S
    for name, estimate, total in table[1:]:
        running += estimate
        assert total == running, name
    # the must-haves (kernel checks, the check, the batch-256 cells, batch-1 latency) fit the budget
    must = dict((name, total) for name, _, total in table)["latency"]
    assert must <= gpu_se.BUDGET_S < gpu_se.HARD_LIMIT_S <= 480


def test_the_model_sections_are_issue_20s_command_and_batch_1_latency_times_plain_beside_fused():
    sections = {s.name: s.bench for s in gpu_se.plan()}
    r50 = sections["resnet50"]
    assert (r50["models"], r50["variants"], r50["modes"], r50["compiled"], r50["batch_sizes"]) == (
        ["resnet50"], ["original", "se_inject", "timm"], ["infer", "train"], [False, True], [256])
    assert (r50["device"], r50["dtype"], r50["channels_last"], r50["img_size"], r50["backend"]) == (
        "cuda", "bf16", True, 224, "inductor")
    latency = sections["latency"]
    assert latency["batch_sizes"] == [1] and latency["compiled"] == [False, True]
    assert {"se_inject plain", "se_inject fused", "original"} <= set(latency["variants"])
    graphs = sections["cuda graphs"]
    assert graphs["compile_mode"] == "reduce-overhead" and graphs["batch_sizes"] == [1]
    assert sections["freezing"]["freeze"] is True and sections["freezing"]["compiled"] == [True]
    assert sections["more models"]["models"] == ["convnext_tiny", "mobilenetv2_100"]
    b1_train = sections["resnet50 b1 train"]
    assert (b1_train["modes"], b1_train["batch_sizes"], b1_train["compiled"]) == (["train"], [1], [False, True])
    # every harness setting is one se_inject.bench takes, and the smoke plan keeps the sections on the CPU
    for section in gpu_se.plan(smoke=True):
        if section.bench:
            settings = dict(section.bench)
            models = settings.pop("models")
            assert set(models) <= set(gpu_se.SMOKE_MODELS.values())
            assert (settings["device"], settings["backend"], settings["batch_sizes"][0] <= 2) == ("cpu", "eager", True)
            assert not set(settings) - set(inspect.signature(se_inject.bench).parameters)


# -- the budget ----------------------------------------------------------------------------------

def test_a_section_that_does_not_fit_is_recorded_as_skipped_with_the_reason(tmp_path, monkeypatch):
    # the kernel checks, the check and resnet50 use up the budget: resnet50 ran 1.5x its estimate
    run, ran = _run(tmp_path, monkeypatch, {"kernels": 100, "check": 30, "resnet50": 300})
    assert run.run() == 0
    assert ran == ["kernels", "check", "resnet50"]
    sections = {s["name"]: s for s in _json(tmp_path)["sections"]}
    assert [s["status"] for s in sections.values()] == ["done"] * 3 + ["skipped"] * 6
    assert sections["latency"]["reason"] == ("time budget: needs about 105 s (estimate 70 s x 1.50, as the model "
                                             "sections so far ran), 0 s left")
    assert sections["kernel timings"]["reason"] == "time budget: needs about 45 s, 0 s left"  # not a model section
    assert sections["resnet50"]["seconds"] == 300
    markdown = (tmp_path / "gpu-se.md").read_text()
    assert "| latency | skipped | 70 |  | time budget: needs about 105 s" in markdown


def test_later_model_sections_are_estimated_from_how_long_the_earlier_ones_took(tmp_path, monkeypatch):
    run, ran = _run(tmp_path, monkeypatch, {"kernels": 100, "check": 30, "resnet50": 100, "latency": 35})
    run.run()
    assert run.scale() == 0.5  # the model sections ran at half their estimates (and less, later: the floor)
    # so after kernels 100, check 30, resnet50 100 and latency 35 (165 s left), everything fits: kernel
    # timings at its 45 s, the model sections at half theirs
    assert ran == ["kernels", "check", "resnet50", "latency", "kernel timings", "cuda graphs", "freezing",
                   "more models", "resnet50 b1 train"]
    run, ran = _run(tmp_path / "slow", monkeypatch, {"kernels": 50, "check": 10, "resnet50": 1000}, budget_s=5000)
    for index in range(3):
        run.section(index)
    assert run.scale() == gpu_se.SCALE_RANGE[1] == 3.0  # 1000 / 200 = 5, clamped
    assert (run.needed(run.sections[3]), run.needed(run.sections[4])) == (210, 45)  # latency; kernel timings


def test_without_the_kernel_checks_every_section_runs_plain_kernels_and_says_why(tmp_path, monkeypatch):
    run, ran = _run(tmp_path, monkeypatch, {}, budget_s=60)  # the kernel checks need 110 s
    run.run()
    state = _json(tmp_path)
    assert state["sections"][0]["status"] == "skipped"
    assert state["plain_kernels"] == "the kernel checks did not run (time budget): the fused kernels are unchecked"
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(2, 16, 5, 5, device="cuda")
    assert se_inject.fused.use_fused("fused", x, None, "relu", "sigmoid", "relu") is False
    markdown = (tmp_path / "gpu-se.md").read_text()
    assert "**Plain kernels from the point noted on**: the kernel checks did not run" in markdown


TIMING = {"kind": "time", "stage": "256x56x56", "layout": "nchw", "what": "squeeze", "impl": "triton squeeze",
          "us": 163.24, "p20_us": 160.0, "p80_us": 170.0, "gb_per_s": 2520.3}


def _fake_kernels(monkeypatch, tmp_path: Path, exit_code: int, kernels_ok: bool) -> list:
    """gpu_kernels.py replaced: it writes its log as a run whose checks gave ``kernels_ok``."""
    started = []

    def fake_run(cmd, **kwargs):
        started.append(cmd)
        log = Path(cmd[cmd.index("--out") + 1])
        records = [{"kind": "env"}, TIMING] if "--timings-only" in cmd else [
            {"kind": "env"}, {"kind": "check", "ok": kernels_ok}, {"kind": "checks done", "kernels_ok": kernels_ok}]
        with log.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        return subprocess.CompletedProcess(cmd, exit_code)

    monkeypatch.setattr(subprocess, "run", fake_run)
    return started


def _fake_bench(monkeypatch, calls: list, files: list, tmp_path: Path):
    """se_inject.bench replaced: one finished and one skipped cell per call, the files read after each."""
    def bench(models, *, variants, on_cell, batch_sizes, modes, compiled, **settings):
        calls.append({"models": models, "variants": variants, **settings})
        t = Timing("original", (2.0, 2.2), Spread(2.1, 2.05, 2.15), Spread(476.0, 470.0, 480.0), 1.5)
        se = Timing(variants[1], (2.4, 2.6), Spread(2.5, 2.45, 2.55), Spread(400.0, 390.0, 410.0), 2.5,
                    saved_bytes=3 * 2 ** 20)
        for cell in (Cell(models[0], batch_sizes[0], modes[0], compiled[0], 2, (t, se),
                          overhead={variants[1]: Spread(0.19, 0.18, 0.2)}),
                     Cell(models[0], batch_sizes[0], modes[-1], compiled[-1], 0, skipped="time budget: 3 s left")):
            on_cell(cell)
            files.append((_json(tmp_path), (tmp_path / "gpu-se.md").read_text()))
        return BenchResult(settings={}, environment={})

    monkeypatch.setattr(se_inject, "bench", bench)


def test_every_cell_is_written_as_it_finishes_with_the_device_versions_commit_and_command(tmp_path, monkeypatch):
    _fake_kernels(monkeypatch, tmp_path, 0, True)
    calls, files = [], []
    _fake_bench(monkeypatch, calls, files, tmp_path)
    run = gpu_se.Run(tmp_path, budget_s=None, smoke=True, argv=["--smoke", "--commit", "abc123"], commit="abc123")
    run.section(2)  # resnet50
    (first, first_md), (second, second_md) = files
    assert [c["section"] for c in first["cells"]] == ["resnet50"] and len(second["cells"]) == 2
    assert first["sections"][2]["status"] == "running"
    assert (first["commit"], first["command"]) == ("abc123", "python benchmarks/gpu_se.py --smoke --commit abc123")
    assert {"device", "torch", "timm", "se_inject", "triton"} <= set(first["environment"])
    cell = first["cells"][0]
    assert cell["timings"][1]["ms"]["median"] == 2.5 and cell["overhead"]["se_inject"]["median"] == 0.19
    row = ("| resnet18 | 2 | infer | eager | se_inject | 2.50 (2.45–2.55) | 400.0 | +19.0% (+18.0…+20.0) |  | 2.5 "
           "| 3.0 |")
    assert row in first_md
    assert "commit abc123" in first_md and "Command: `python benchmarks/gpu_se.py --smoke --commit abc123`" in first_md
    assert "| resnet18 | 2 | train | compiled | skipped | time budget: 3 s left |" in second_md
    assert _json(tmp_path)["sections"][2]["status"] == "done"
    assert [line["event"] for line in map(json.loads, (tmp_path / "gpu-se.jsonl").read_text().splitlines())] == [
        "section", "cell", "cell", "section"]


def test_failed_kernel_checks_switch_the_rest_to_plain_kernels_and_leave_the_fused_variant_out(tmp_path, monkeypatch):
    started = _fake_kernels(monkeypatch, tmp_path, 2, False)
    calls, files = [], []
    _fake_bench(monkeypatch, calls, files, tmp_path)
    checked = []
    monkeypatch.setattr(gpu_se, "check", lambda device, name, size, batch, fused: checked.append(fused) or _checked())
    run = gpu_se.Run(tmp_path, budget_s=None, smoke=True)
    assert run.run() == 1  # the kernel checks failed
    state = _json(tmp_path)
    assert state["plain_kernels"].startswith("the fused kernels failed or did not finish their checks")
    assert checked == [False]  # the check expects no fused calls
    resnet50, latency = calls[:2]
    assert resnet50["variants"] == ["original", "se_inject", "timm"]
    assert latency["variants"] == ["original", "se_inject plain", "timm"]
    assert state["sections"][2]["notes"] == ["plain kernels: " + state["plain_kernels"]]
    assert state["sections"][3]["notes"] == ["plain kernels, 'se_inject fused' left out: " + state["plain_kernels"]]
    assert "--no-timings" in started[0] and {"--timings-only", "--plain-only"} <= set(started[1])
    assert "**Plain kernels from the point noted on**: the fused kernels failed" in (tmp_path / "gpu-se.md").read_text()


def test_passing_kernel_checks_keep_the_fused_variants_and_time_the_kernels_last(tmp_path, monkeypatch):
    started = _fake_kernels(monkeypatch, tmp_path, 0, True)
    calls, files = [], []
    _fake_bench(monkeypatch, calls, files, tmp_path)
    monkeypatch.setattr(gpu_se, "check", lambda device, name, size, batch, fused: _checked())
    assert gpu_se.Run(tmp_path, budget_s=None, smoke=True).run() == 0
    assert _json(tmp_path)["plain_kernels"] is None
    assert [c["variants"] for c in calls][1] == ["original", "se_inject plain", "se_inject fused", "timm"]
    assert "--timings-only" in started[1] and "--plain-only" not in started[1]
    assert [s["status"] for s in _json(tmp_path)["sections"]] == ["done"] * 9
    markdown = (tmp_path / "gpu-se.md").read_text()
    assert "| 256x56x56 | nchw | squeeze | triton squeeze | 163.2 (160.0–170.0) | 2520 |" in markdown
    assert "1 of 1 op checks passed." in markdown


def test_a_cuda_error_restarts_the_remaining_sections_in_a_fresh_process_with_plain_kernels(tmp_path, monkeypatch):
    class Exec(Exception):
        pass

    def execv(path, args):
        raise Exec(args)

    def crash(self, section):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    run, _ = _run(tmp_path, monkeypatch, {}, budget_s=None, argv=["--smoke", "--resume", "2"])
    monkeypatch.setattr(gpu_se.Run, "_bench", crash)
    monkeypatch.setattr(gpu_se.os, "execv", execv)
    with pytest.raises(Exec) as info:
        run.run()
    args = info.value.args[0]
    assert args[2:] == ["--smoke", "--resume", "3"] and args[1].endswith("gpu_se.py")  # the old --resume dropped
    state = _json(tmp_path)
    assert state["sections"][2]["status"] == "error" and "illegal memory access" in state["sections"][2]["error"]
    assert state["plain_kernels"].startswith("a CUDA error (RuntimeError: CUDA error: an illegal memory access")
    # the fresh process reads the results back, runs plain kernels, and goes on from section 3
    monkeypatch.setattr(se_inject.fused, "use_fused", lambda *a, **k: True)
    resumed, ran = _run(tmp_path, monkeypatch, {}, budget_s=None, resume=3)
    assert se_inject.fused.use_fused() is False and resumed.state["sections"][2]["status"] == "error"
    resumed.run()
    assert ran == [s.name for s in gpu_se.plan()[3:]]


def test_at_the_hard_limit_the_results_are_written_and_the_process_ends(tmp_path, monkeypatch):
    run, _ = _run(tmp_path, monkeypatch, {}, hard_limit_s=470)
    run.update(run.state["sections"][2], status="running")
    monkeypatch.setattr(gpu_se.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    with pytest.raises(SystemExit) as info:
        run.hard_stop()
    assert info.value.code == gpu_se.EXIT_HARD_LIMIT == 3
    state = _json(tmp_path)
    assert state["stopped"] == "hard limit: the process ended itself at 470 s"
    assert state["sections"][2]["status"] == "cut off"
    assert "**Stopped**: hard limit" in (tmp_path / "gpu-se.md").read_text()


def test_a_subprocess_is_given_no_more_time_than_the_hard_limit_leaves(tmp_path, monkeypatch):
    run, _ = _run(tmp_path, monkeypatch, {}, hard_limit_s=470)
    run.clock.now += 400
    assert run._timeout(190) == 65  # 470 - 400 - 5
    assert gpu_se.Run(tmp_path / "none", budget_s=None, smoke=True)._timeout(190) == 190


# -- the check -----------------------------------------------------------------------------------

def test_the_check_compares_fused_and_plain_training_steps_of_a_converted_resnet(monkeypatch):
    result = gpu_check.check(torch.device("cpu"), "resnet18", 64, 2)
    # on the CPU both runs take plain ops: identical in fp32, and the same errors under bf16
    assert result["ok"] and result["se_blocks"] == 8 and result["fused_calls"] == {"fp32": 0, "bf16": 0}
    assert (result["fp32"]["out"], result["fp32"]["loss"], result["fp32"]["grad_max"]) == (0.0, 0.0, 0.0)
    assert result["bf16"]["fused"] == result["bf16"]["plain"] and result["bf16"]["plain"]["out"] > 0
    assert {k: (v["graphs"], v["fused_ops"]) for k, v in result["traced"].items()} == {"auto": (1, 0), "fused": (1, 0)}
    # fused gradients 2% off fail it
    monkeypatch.setattr(gpu_check, "_training_step", _gradients_off(gpu_check._training_step, 1.02))
    result = gpu_check.check(torch.device("cpu"), "resnet18", 64, 2)
    assert not result["ok"] and result["fp32"]["grad_max"] == pytest.approx(0.02, rel=1e-3)


def _gradients_off(step, factor):
    def wrong(model, x, y, kernels, bf16):
        run = step(model, x, y, kernels, bf16)
        if kernels == "fused":
            run["grads"] = {n: g * factor for n, g in run["grads"].items()}
        return run
    return wrong


def _checked() -> dict:
    """What a passing check returns, for runs whose check is replaced."""
    errors = {"out": 0.0, "loss": 0.0, "grad_max": 0.0, "worst_grad": "conv1.weight"}
    return {"ok": True, "model": "resnet18", "se_blocks": 8, "fused_calls": {"fp32": 0, "bf16": 0},
            "fused_calls_expected": 0, "fp32": errors, "bf16": {"plain": errors, "fused": errors},
            "traced": {k: {"graphs": 1, "fused_ops": 0, "rel_err": 0.0} for k in ("auto", "fused")}}


# -- torch.compile: every variant of every section compiled fresh, nothing eager -----------------

class _Counting:
    """A torch.compile backend that runs the graphs as traced and counts, per graph, its runs;
    ``cells`` is the number of cells finished when each graph was compiled."""

    def __init__(self) -> None:
        self.graphs: list[int] = []  # per graph compiled: the index of the cell it was compiled in
        self.runs: Counter = Counter()
        self.cells = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        index = len(self.graphs)
        self.graphs.append(self.cells)

        def run(*args):
            self.runs[index] += 1
            return gm.forward(*args)
        return run


@pytest.mark.slow
def test_every_compiled_variant_of_every_section_runs_its_own_fresh_graph_even_at_a_recompile_limit_of_1(
        tmp_path, monkeypatch):
    """gpu_se's model sections, in its order, on tiny models: compiled resnet cells, the check's
    traces, batch-1 latency, CUDA graphs' mode, freezing, two more families, batch-1 training.
    Each compiled cell must compile exactly one graph per variant, and each graph must run in
    every warm-up and timed iteration of its variant (eager code, as past the recompile limit,
    would run no graph)."""
    counting = _Counting()
    name = f"gpu_se_counting_{id(counting)}"  # a new name each time: dynamo keeps registered names
    torch._dynamo.register_backend(counting, name=name)
    run = gpu_se.Run(tmp_path, budget_s=None, smoke=True, backend=name)
    finished = run.cell

    def cell(section, c):
        finished(section, c)
        counting.cells += 1

    monkeypatch.setattr(run, "cell", cell)
    with torch._dynamo.config.patch(recompile_limit=1):
        for index, section in enumerate(run.sections):
            if section.kind in ("check", "bench"):
                run.section(index)
    state = _json(tmp_path)
    assert [s["status"] for s in state["sections"] if s["kind"] in ("check", "bench")] == ["done"] * 7, \
        [s.get("error") for s in state["sections"]]
    assert state["sections"][1]["result"]["ok"]
    cells = state["cells"]
    assert len(cells) == 4 + 2 + 1 + 1 + 4 + 2 and not any(c["skipped"] for c in cells)
    compiled_in = Counter(counting.graphs)
    settings = {s.name: s.bench for s in run.sections}
    for index, c in enumerate(cells):
        variants = [t["variant"] for t in c["timings"]]
        graphs = [g for g, cell_index in enumerate(counting.graphs) if cell_index == index]
        if not c["compiled"]:
            assert index not in compiled_in, c
            continue
        assert len(graphs) == len(variants), (c["section"], c["model"], c["mode"])
        s = settings[c["section"]]
        per_variant = s["warmup"] + c["rounds"] * s["reps"] + (c["mode"] == "train")  # + the saved-bytes forward
        assert [counting.runs[g] for g in graphs] == [per_variant] * len(variants), (c["section"], c["model"])
    assert (torch._dynamo.config.fail_on_recompile_limit_hit, torch._dynamo.config.error_on_recompile) == (False, False)


# -- the kernel section (benchmarks/gpu_kernels.py) when the fused kernels fail --------------------

def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def sections(monkeypatch):
    """Replace every section of gpu_kernels.main by a recorder; returns what ran, and how."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # main sets it for the smoke run; restored after
    ran: list = []
    monkeypatch.setattr(gpu_kernels, "compile_check", lambda *a: ran.append("compile op"))
    monkeypatch.setattr(gpu_kernels, "training_step_check", lambda *a: ran.append("compile training step"))
    monkeypatch.setattr(gpu_kernels, "export_check", lambda *a: ran.append("export"))
    monkeypatch.setattr(gpu_kernels, "stage_timings",
                        lambda fused, rec, *a: ran.append(("time", a[-1], rec.kernels_ok)))
    return ran


def test_a_wrong_kernel_result_switches_every_later_section_to_plain_kernels(tmp_path, monkeypatch, sections):
    def failing_checks(fused, rec, device, checks):
        rec.failures += 1
        rec.kernels_ok = False
        rec.write("check", ok=False)

    monkeypatch.setattr(gpu_kernels, "run_checks", failing_checks)
    out = tmp_path / "k.jsonl"
    assert gpu_kernels.main(["--interpret-smoke", "--out", str(out)]) == 2
    records = _records(out)
    kinds = [r["kind"] for r in records]
    assert "plain kernels" in kinds and {"kind": "checks done", "kernels_ok": False} in records
    skipped = {r["what"]: r["reason"] for r in records if r["kind"] == "skipped"}
    for name in ("compile op", "compile training step", "export"):
        assert skipped[name] == gpu_kernels.PLAIN_ONLY
    # every stage is still timed, both layouts, with the Triton rows left out
    assert sorted(sections) == sorted(("time", layout, False) for _ in gpu_kernels.STAGES
                                      for layout in gpu_kernels.LAYOUTS)


def test_passing_checks_run_the_compile_sections_and_fused_timings(tmp_path, monkeypatch, sections):
    monkeypatch.setattr(gpu_kernels, "run_checks", lambda fused, rec, device, checks: rec.write("check", ok=True))
    out = tmp_path / "k.jsonl"
    assert gpu_kernels.main(["--interpret-smoke", "--out", str(out)]) == 0
    assert sections[:3] == ["compile op", "compile training step", "export"]
    assert ("time", "nchw", True) in sections and ("time", "channels_last", True) in sections


def test_a_cuda_error_in_the_checks_restarts_the_rest_with_plain_kernels(tmp_path, monkeypatch, sections):
    def crashing_checks(fused, rec, device, checks):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    started = []
    monkeypatch.setattr(gpu_kernels, "run_checks", crashing_checks)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: started.append(cmd) or subprocess.CompletedProcess(cmd, 2))
    out = tmp_path / "k.jsonl"
    assert gpu_kernels.main(["--interpret-smoke", "--out", str(out), "--budget-s", "100"]) == 2
    (cmd,) = started
    assert "--plain-only" in cmd and cmd.count("--budget-s") == 1 and float(cmd[-1]) <= 100
    assert sections == []  # nothing else ran in the process whose CUDA context is gone
    assert [r["kind"] for r in _records(out)][-2:] == ["error", "restart"]


def test_no_timings_runs_the_checks_and_the_compile_sections_only(tmp_path, monkeypatch, sections):
    monkeypatch.setattr(gpu_kernels, "run_checks", lambda fused, rec, device, checks: rec.write("check", ok=True))
    out = tmp_path / "k.jsonl"
    assert gpu_kernels.main(["--interpret-smoke", "--out", str(out), "--no-timings"]) == 0
    assert sections == ["compile op", "compile training step", "export"]
    assert {"kind": "checks done", "kernels_ok": True} in _records(out)


@pytest.mark.parametrize("plain", [False, True])
def test_timings_only_times_every_stage_without_checking_or_compiling_again(tmp_path, monkeypatch, sections, plain):
    # gpu_se.py's second run, after its model sections: --plain-only when the first run's checks failed
    monkeypatch.setattr(gpu_kernels, "run_checks", lambda *args: pytest.fail("the checks ran again"))
    out = tmp_path / "k.jsonl"
    argv = ["--interpret-smoke", "--out", str(out), "--timings-only"] + (["--plain-only"] if plain else [])
    assert gpu_kernels.main(argv) == (2 if plain else 0)
    assert sorted(sections) == sorted(("time", layout, not plain) for _ in gpu_kernels.STAGES
                                      for layout in gpu_kernels.LAYOUTS)
    kinds = [r["kind"] for r in _records(out)]
    assert "checks done" not in kinds  # gpu_se.py reads the verdict of the run that checked
    assert ("plain kernels" if plain else "checks skipped") in kinds


@pytest.mark.parametrize("exit_code,checks_ok,plain", [(0, True, False), (1, True, False), (2, False, True),
                                                       (-11, None, True)])
def test_gpu_se_runs_its_model_sections_with_plain_kernels_unless_the_kernel_checks_passed(
        tmp_path, monkeypatch, exit_code, checks_ok, plain):
    log = tmp_path / "gpu-kernels.jsonl"
    lines = [{"kind": "env"}] + ([{"kind": "checks done", "kernels_ok": checks_ok}] if checks_ok is not None else [])
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, exit_code))
    monkeypatch.setattr(se_inject.fused, "use_fused", se_inject.fused.use_fused)  # restored after the test
    result = gpu_se._kernels_section(["gpu_kernels.py"], log, 10)
    assert result["kernels_ok"] is not plain
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(2, 16, 5, 5, device="cuda")
    assert se_inject.fused.use_fused("fused", x, None, "relu", "sigmoid", "relu") is (not plain)
    if plain:
        assert "plain kernels" in result["plain_kernels_from_here"]
