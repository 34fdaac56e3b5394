"""The GPU command's kernel section (benchmarks/gpu_kernels.py) when the fused kernels fail.

A failing kernel check must not cost the rest of a one-shot GPU run: the later sections run with
plain kernels and say so, a CUDA error (which leaves the process's CUDA context unusable)
restarts the script for them, and gpu_se.py switches its own model sections to plain kernels.
The sections themselves are replaced by recorders here; the CPU smoke run
(``python benchmarks/gpu_kernels.py --interpret-smoke``) runs them for real.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import se_inject
import se_inject.fused
from benchmarks import gpu_kernels, gpu_se


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
